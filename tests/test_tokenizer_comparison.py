"""`unimm eval tokenizer-table`: one row per tokenizer run, empty cells for what a run has not produced yet."""

import json

from unimm.cli import main


def test_rows_read_every_result_file_and_leave_missing_ones_empty(tmp_path, capsys):
    run = tmp_path / "mini-psvae"
    (run / "t2i").mkdir(parents=True)
    (run / "edit").mkdir()
    (run / "recon.json").write_text(json.dumps({"latent_shape": [32, 8, 8], "curve": [
        {"sigma": 0.5, "psnr": 20.0, "ssim": 0.5}, {"sigma": 0.0, "psnr": 28.734, "ssim": 0.8812}]}))
    (run / "probe.json").write_text(json.dumps({"results": [
        {"target": target, "pool": pool, "val_accuracy": accuracy}
        for target, pool, accuracy in (("count", "flatten", 0.681), ("count", "gap", 0.9), ("color", "flatten", 0.5), ("shape", "flatten", 0.25))]}))
    (run / "ceiling.json").write_text(json.dumps({"scores": {"shapes_geneval_ceiling_judge": 1.0, "shapes_geneval_ceiling_tokenizer": 0.2562}}))
    (run / "t2i" / "shapes.json").write_text(json.dumps({"scores": {
        "shapes_geneval": 0.1427, "shapes_geneval_by_tag": {"single_object": 0.4}, "shapes_dpg": 19.516}}))
    (run / "edit" / "shapes.json").write_text(json.dumps({"scores": {"shapes_edit_adherence": 0.0071, "shapes_edit_consistency_psnr": 18.02}}))
    (tmp_path / "mini-vae").mkdir()
    assert main(["eval", "tokenizer-table", "--root", str(tmp_path), "mini-psvae", "mini-vae"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "| mini-psvae | 32×8×8 | 28.73 | 0.881 | 0.681 | 0.500 | 0.250 | 0.256 | 0.143 | 0.40 | 19.5 | 0.007 | 18.0 |"
    assert lines[3] == "| mini-vae | – | – | – | – | – | – | – | – | – | – | – | – |"
    assert main(["eval", "tokenizer-table", "--root", str(tmp_path / "nowhere"), "x"]) == 2
