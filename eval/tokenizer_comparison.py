"""One table comparing tokenizers end to end (the miniature replication of PS-VAE Table 4).

A comparison directory (scripts/mini_table4.sh) holds one run directory per tokenizer preset with
``recon.json`` (`unimm eval recon`), ``probe.json`` (`unimm eval linprobe`), ``ceiling.json`` (`unimm eval
shapes --suites ceiling`: ShapesGenEval of true scenes after the tokenizer's round trip), ``t2i/shapes.json`` and
``edit/shapes.json`` (`unimm eval shapes`). Missing files leave their cells empty ("–") rather than failing,
so a partly finished comparison can be looked at.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.results import markdown_table

COLUMNS = ("tokenizer", "latent", "PSNR", "SSIM", "probe count", "probe colour", "probe shape", "GenEval ceiling",
           "ShapesGenEval", "single obj.", "ShapesDPG", "ShapesEdit", "edit PSNR (dB)")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def comparison_row(run: Path) -> list:
    """The table's cells for one tokenizer's run directory."""
    missing = "–"
    recon, probe, ceiling = _read(run / "recon.json"), _read(run / "probe.json"), _read(run / "ceiling.json")
    t2i, edit = _read(run / "t2i" / "shapes.json"), _read(run / "edit" / "shapes.json")
    clean = next((point for point in (recon or {}).get("curve", []) if point["sigma"] == 0.0), None)
    latent = "×".join(str(size) for size in recon["latent_shape"]) if recon and recon.get("latent_shape") else missing
    probes = {result["target"]: result["val_accuracy"] for result in (probe or {}).get("results", []) if result["pool"] == "flatten"}
    t2i_scores, edit_scores = (t2i or {}).get("scores", {}), (edit or {}).get("scores", {})
    def cell(source: dict | None, value, digits: int) -> str:
        return missing if source is None or value is None else f"{value:.{digits}f}"

    tags = t2i_scores.get("shapes_geneval_by_tag", {})
    return [
        run.name, latent,
        cell(clean, clean and clean["psnr"], 2), cell(clean, clean and clean.get("ssim"), 3),
        *(cell(probes, probes.get(target), 3) for target in ("count", "color", "shape")),
        cell(ceiling, (ceiling or {}).get("scores", {}).get("shapes_geneval_ceiling_tokenizer"), 3),
        cell(t2i, t2i_scores.get("shapes_geneval"), 3), cell(t2i, tags.get("single_object"), 2),
        cell(t2i, t2i_scores.get("shapes_dpg"), 1),
        cell(edit, edit_scores.get("shapes_edit_adherence"), 3), cell(edit, edit_scores.get("shapes_edit_consistency_psnr"), 1),
    ]


def comparison_table(root: str | Path, names: list[str]) -> str:
    root = Path(root)
    return markdown_table(COLUMNS, [comparison_row(root / name) for name in names])
