"""GenEval harness (eval/geneval.py, `unimm eval geneval`).

* GenEval's detection-side rules on hand-made detections: score > 0.3 (> 0.9 for counting), at most 16 per
  class by confidence, colour judged on the first `count` objects only, the mask-on-grey crop, label mapping;
  counting and position edge cases end to end through `score_image`.
* The judges are the real `transformers` classes at toy size (Mask2Former, CLIP): built from configs, saved
  with `save_pretrained` and loaded back, no network.
* Generation with a tiny real `UnimmPipeline` writes exactly the folder the official evaluator reads
  (checked by walking it the way `evaluate_images.py` does), resumes without redoing finished images, refuses
  an out folder made with other settings, and `generate` + `score` run end to end from the CLI.
* With UNIMM_GENEVAL_METADATA pointing at GenEval's evaluation_metadata.jsonl (553 prompts), the real file
  and a subset of it are checked too; the tests skip that part otherwise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.geneval import (
    COLOR_TEMPLATES,
    EVALUATOR_NAME,
    GENEVAL_COLORS,
    GENEVAL_OBJECTS,
    ClipColorClassifier,
    DetectedObject,
    Mask2FormerDetector,
    color_crop,
    evaluate_geneval_folder,
    generate_geneval,
    geneval_label_map,
    read_prompts,
    score_image,
    select_detections,
)
from eval.geneval_rules import GENEVAL_TAGS, relative_position
from eval.results import file_sha256
from unimm.cli import main
from unimm.errors import UserError

# One prompt per GenEval tag, in GenEval's schema (hand-written; the real file is never read unless the env var says so).
SIX_SPECS = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "prompt": "a photo of a dog and a cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}], "prompt": "a photo of two dogs"},
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
    {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a cat"},
    {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red dog and a blue cat"},
]
QUIET = {"progress": False}


def write_jsonl(path: Path, specs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(spec) + "\n" for spec in specs))
    return path


def long_version(specs: list[dict]) -> list[dict]:
    return [{**spec, "prompt": spec["prompt"].replace("a photo of", "A detailed, realistic photograph of") + ", in soft light."} for spec in specs]


def obj(name: str, box, score: float = 0.95, mask=None) -> DetectedObject:
    return DetectedObject(name, tuple(float(value) for value in box), score, mask)


class FixedColors:
    """A colour classifier that answers from a table and records what it was asked."""

    def __init__(self, colors: dict[str, list[str]]):
        self.colors = colors
        self.calls: list[tuple[str, int]] = []

    def classify(self, image, objects, class_name):
        self.calls.append((class_name, len(objects)))
        return self.colors[class_name][:len(objects)]


# ----------------------------------------------------------------------------------------------------
# Detection-side rules on hand-made detections
# ----------------------------------------------------------------------------------------------------
def test_threshold_is_strict_and_counting_prompts_use_0_9():
    objects = [obj("dog", (0, 0, 10, 10), 0.3), obj("dog", (20, 0, 30, 10), 0.31), obj("cat", (0, 20, 10, 30), 0.9),
               obj("cat", (20, 20, 30, 30), 0.91)]
    kept = select_detections(objects, "two_object")
    assert [o.score for o in kept["dog"]] == [0.31] and [o.score for o in kept["cat"]] == [0.91, 0.9]
    counting = select_detections(objects, "counting")
    assert "dog" not in counting and [o.score for o in counting["cat"]] == [0.91]


def test_at_most_16_most_confident_objects_per_class():
    scores = np.linspace(0.4, 0.99, 20)
    rng = np.random.default_rng(0)
    objects = [obj("dog", (i, 0, i + 5, 5), float(score)) for i, score in zip(rng.permutation(20), scores)]
    objects += [obj("cat", (0, 0, 5, 5), 0.5)]
    kept = select_detections(objects, "single_object")
    assert len(kept["dog"]) == 16 and len(kept["cat"]) == 1
    assert [o.score for o in kept["dog"]] == sorted(scores, reverse=True)[:16]


def test_counting_edge_cases():
    spec = SIX_SPECS[2]  # two dogs: include 2, exclude 3
    dogs = [obj("dog", (i * 20, 0, i * 20 + 10, 10), score) for i, score in enumerate([0.99, 0.97, 0.95, 0.85, 0.5])]
    image = Image.new("RGB", (100, 20))
    # Exactly two dogs above 0.9 ... plus more only below 0.9: passes (the 0.3 threshold would see 5 and fail it).
    assert score_image(image, spec, dogs[:2] + dogs[3:])[0] is True
    # A third confident dog trips the exclude rule.
    correct, reasons, _ = score_image(image, spec, dogs)
    assert correct is False and reasons == ["expected dog<3, found 3"]
    # One confident dog is too few.
    correct, reasons, _ = score_image(image, spec, dogs[:1] + dogs[3:])
    assert correct is False and reasons == ["expected dog>=2, found 1"]
    # The cap of 16 is applied before counting: 20 confident dogs are "16" for an exclude of 17.
    many = [obj("dog", (i, 0, i + 1, 1), 0.95) for i in range(20)]
    assert score_image(image, {"tag": "counting", "include": [{"class": "dog", "count": 16}],
                               "exclude": [{"class": "dog", "count": 17}], "prompt": "16 dogs"}, many)[0] is True


def test_position_edge_cases():
    # Margin: centres 12 px apart, boxes 10 + 10 wide -> 0.1 * 20 = 2 px margin leaves 10 px: clearly "left of".
    assert relative_position((0, 0, 10, 10), (12, 0, 22, 10)) == {"left of"}
    # Offset smaller than the margin in both axes -> no relation at all.
    assert relative_position((0, 0, 100, 100), (15, 15, 115, 115)) == set()
    # Direction within 60 degrees of an axis: 45 degrees -> both relations; 59 -> both; 61 -> only "above".
    assert relative_position((0, 0, 2, 2), (100, 100, 102, 102)) == {"left of", "above"}
    for degrees, expected in ((59, {"left of", "above"}), (61, {"above"})):
        dy = np.tan(np.radians(degrees)) * 100
        assert relative_position((0, 0, 0, 0), (100, dy, 100, dy)) == expected
    # The margin shrinks each axis before the angle test: a 45-degree offset between wide boxes is only "above".
    assert relative_position((0, 0, 200, 2), (50, 50, 250, 52)) == {"above"}
    # End to end: every detection of the object must hold against every detection of the target.
    spec = SIX_SPECS[4]  # dog right of cat
    image = Image.new("RGB", (200, 100))
    cat, dog_right, dog_left = obj("cat", (0, 40, 20, 60)), obj("dog", (150, 40, 170, 60)), obj("dog", (30, 40, 50, 60), 0.5)
    assert score_image(image, spec, [cat, dog_right])[0] is True
    assert score_image(image, spec, [cat, dog_right, dog_left])[0] is True  # only the first `count` dogs are checked
    assert score_image(image, spec, [cat, obj("dog", (3, 45, 23, 55))])[0] is False  # centres 3 px apart, margin 4 px: no relation
    correct, reasons, _ = score_image(image, spec, [dog_right])
    assert correct is False and reasons[0] == "expected cat>=1, found 0" and reasons[1] == "no target for dog to be right of"


def test_colour_is_judged_on_the_first_count_objects_only():
    image = Image.new("RGB", (100, 100))
    colors = FixedColors({"dog": ["red", "blue"], "cat": ["blue"]})
    objects = [obj("dog", (0, 0, 10, 10), 0.9), obj("dog", (20, 0, 30, 10), 0.8), obj("cat", (50, 50, 60, 60))]
    correct, _, detections = score_image(image, SIX_SPECS[5], objects, colors)
    assert correct is True and sorted(colors.calls) == [("cat", 1), ("dog", 1)]
    assert [d.color for d in detections["dog"]] == ["red", None]  # the second dog is never classified
    colors = FixedColors({"dog": ["blue"], "cat": ["blue"]})
    correct, reasons, _ = score_image(image, SIX_SPECS[3], objects, colors)
    assert correct is False and reasons[0].startswith("expected red dog>=1, found 0 red")
    # No colour prompt, no classifier call.
    colors = FixedColors({})
    assert score_image(image, SIX_SPECS[1], objects, colors)[0] is True and colors.calls == []


def test_colour_crop_puts_the_mask_on_grey_and_crops_to_the_box():
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 10:20] = True
    mask[5, 10] = False
    crop = color_crop(image, (10, 5, 30, 15), mask)
    assert crop.size == (20, 10)
    pixels = np.asarray(crop)
    assert (pixels[1:, 1:10] == (255, 0, 0)).all()  # inside the mask: the image
    assert (pixels[:, 10:] == (153, 153, 153)).all() and tuple(pixels[0, 0]) == (153, 153, 153)  # outside: "#999"
    assert np.asarray(color_crop(image, (10, 5, 30, 15), None)).mean(axis=(0, 1)).tolist() == [255, 0, 0]


def test_detector_labels_map_to_geneval_names():
    mapping, how, unmapped = geneval_label_map({0: "dog", 1: "Mouse", 2: "dining_table", 3: "banner", 4: "tvmonitor", 5: "Hair-Dryer"})
    assert mapping == {0: "dog", 1: "computer mouse", 2: "dining table", 4: "tv", 5: "hair drier"} and unmapped == ["banner"] and how == "by name"
    mapping, how, _ = geneval_label_map({i: f"LABEL_{i}" for i in range(80)})
    assert mapping[64] == "computer mouse" and list(mapping.values()) == list(GENEVAL_OBJECTS) and "COCO index order" in how
    assert len(GENEVAL_OBJECTS) == len(set(GENEVAL_OBJECTS)) == 80


def test_prompt_files_must_be_line_aligned(tmp_path):
    metadata = write_jsonl(tmp_path / "metadata.jsonl", SIX_SPECS)
    lines, specs, prompts = read_prompts(metadata, write_jsonl(tmp_path / "long.jsonl", long_version(SIX_SPECS)))
    assert specs == SIX_SPECS and lines == [json.dumps(spec) for spec in SIX_SPECS] and prompts[0].startswith("A detailed")
    with pytest.raises(UserError, match="has 5 prompts but the metadata file"):
        read_prompts(metadata, write_jsonl(tmp_path / "short.jsonl", long_version(SIX_SPECS)[:5]))
    shuffled = long_version(SIX_SPECS)
    shuffled[1], shuffled[2] = shuffled[2], shuffled[1]
    with pytest.raises(UserError, match=r"prompt 1 \(line 2\)"):
        read_prompts(metadata, write_jsonl(tmp_path / "shuffled.jsonl", shuffled))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match="line 1: not a GenEval prompt"):
        read_prompts(tmp_path / "bad.jsonl")


# ----------------------------------------------------------------------------------------------------
# Tiny real judges (transformers classes, saved and loaded back)
# ----------------------------------------------------------------------------------------------------
DETECTOR_LABELS = {0: "dog", 1: "cat", 2: "mouse", 3: "banner"}


def write_tiny_mask2former(directory: Path) -> Path:
    """A toy Mask2Former whose class head is biased towards "dog": every query is a confident dog."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32, num_queries=8,
                               encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=32, dim_feedforward=32,
                               num_attention_heads=2, id2label=DETECTOR_LABELS, use_pretrained_backbone=False)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.copy_(torch.tensor([12.0, 0.0, 0.0, 0.0, 0.0]))
    model.save_pretrained(directory)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(directory)
    return directory


def write_tiny_clip(directory: Path) -> Path:
    """A toy CLIP with a byte-level tokenizer (one token per character), written like a hub checkpoint."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in chars + [char + "</w>" for char in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 128, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval-judges")
    return write_tiny_mask2former(root / "mask2former"), write_tiny_clip(root / "clip")


def test_mask2former_detector_from_saved_tiny_model(judges):
    detector = Mask2FormerDetector.from_pretrained(str(judges[0]), device="cpu")
    assert detector.labels == {0: "dog", 1: "cat", 2: "computer mouse"} and detector.judge["labels_without_geneval_class"] == 1
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(2)]
    found = detector.detect(images)
    assert len(found) == 2
    for objects in found:
        dogs = [o for o in objects if o.class_name == "dog"]
        assert 1 <= len(dogs) <= 8 and all(o.class_name in {"dog", "cat", "computer mouse"} for o in objects)
        for o in objects:
            assert o.mask.shape == (48, 48) and o.mask.any() and 0 <= o.score <= 1
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # box = mask extent (mmdet's mask2bbox)
        assert max(o.score for o in dogs) > 0.3  # the biased class head makes confident dogs


def test_mask2former_post_processing_on_known_logits(judges):
    import torch

    detector = Mask2FormerDetector.from_pretrained(str(judges[0]), device="cpu")
    class_logits = torch.full((3, 5), -20.0)
    class_logits[0, 1] = 5.0  # query 0: a cat
    class_logits[1, 3] = 5.0  # query 1: a banner (no GenEval class): its banner pair is dropped
    class_logits[2, 0] = 5.0  # query 2: a dog whose mask lies in the padding: empty once cropped, dropped
    masks = torch.full((3, 16, 16), -8.0)
    masks[0, 2:6, 3:9] = 8.0
    masks[1, 4:8, 10:14] = 8.0
    masks[2, 10:14, 2:6] = 8.0
    # Input padded to 16 x 16 whose valid part is 8 x 16 (the image's top half), the image itself 8 x 16.
    objects = detector._instances(class_logits, masks, (16, 16), (8, 16), (8, 16))
    # Every (query, class) pair of the top k with a non-empty mask is an instance (mmdet keeps them; GenEval's
    # threshold comes later): queries 0 and 1 x the three mapped labels. Only the cat is confident.
    assert sorted(o.class_name for o in objects) == sorted(["dog", "cat", "computer mouse"] * 2)
    confident = [o for o in objects if o.score > 0.3]
    assert [o.class_name for o in confident] == ["cat"]
    cat = confident[0]
    assert cat.box == (3.0, 2.0, 9.0, 6.0)
    probability = torch.softmax(class_logits[0], -1)[1].item()
    assert cat.score == pytest.approx(probability * torch.sigmoid(torch.tensor(8.0)).item(), rel=1e-4)


def test_clip_colour_classifier_from_saved_tiny_model(judges):
    classifier = ClipColorClassifier.from_pretrained(str(judges[1]), device="cpu")
    assert classifier.judge["templates"] == list(COLOR_TEMPLATES) and classifier.judge["colors"] == list(GENEVAL_COLORS)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 5:25] = True
    objects = [obj("dog", (5, 10, 25, 30), mask=mask), obj("dog", (0, 0, 40, 40))]
    colors = classifier.classify(Image.fromarray(pixels), objects, "dog")
    assert len(colors) == 2 and set(colors) <= set(GENEVAL_COLORS)
    assert classifier._classifier("dog").shape == (16, len(GENEVAL_COLORS))
    # Pixels outside the mask do not reach CLIP: changing them leaves the masked object's colour unchanged.
    changed = pixels.copy()
    changed[~mask] = 0
    assert classifier.classify(Image.fromarray(changed), objects[:1], "dog") == colors[:1]
    assert classifier.classify(Image.fromarray(pixels), [], "dog") == []


# ----------------------------------------------------------------------------------------------------
# Generation with a tiny real pipeline, the official layout, resumption, the CLI end to end
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipeline_dir(generator_parts, shapes, tmp_path_factory):
    from tests.generator_fixtures import tiny_generator_config
    from unimm.trainer import GeneratorTrainer

    tokenizer, text_model, _ = generator_parts
    run = tmp_path_factory.mktemp("geneval-pipeline")
    GeneratorTrainer(tiny_generator_config(tokenizer, text_model, str(shapes / "t2i" / "train"), run, steps=1)).train()
    return run / "pipeline"


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_pipeline_dir):
    from unimm.pipeline import UnimmPipeline

    return UnimmPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")


def official_reader(folder: Path) -> list[tuple[str, dict]]:
    """The folder walk of GenEval's evaluation/evaluate_images.py main(): (image path, metadata) pairs."""
    pairs = []
    for subfolder in os.listdir(folder):
        folderpath = os.path.join(folder, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            pairs.append((imagepath, metadata))
    return pairs


def check_official_layout(out: Path, specs: list[dict], lines: list[str], images_per_prompt: int, size: int) -> None:
    """Exactly <out>/<00000>/{metadata.jsonl, samples/0000.png ...} per prompt, plus generation.json."""
    names = [f"{index:05d}" for index in range(len(specs))]
    assert sorted(path.name for path in out.iterdir()) == sorted([*names, "generation.json"])
    for name, spec, line in zip(names, specs, lines):
        folder = out / name
        assert sorted(path.name for path in folder.iterdir()) == ["metadata.jsonl", "samples"]
        assert (folder / "metadata.jsonl").read_text() == line + "\n"
        with open(folder / "metadata.jsonl") as handle:
            assert json.load(handle) == spec  # the official evaluator json.load()s it
        samples = sorted(path.name for path in (folder / "samples").iterdir())
        assert samples == [f"{k:04d}.png" for k in range(images_per_prompt)]
        for sample in samples:
            with Image.open(folder / "samples" / sample) as image:
                assert image.format == "PNG" and image.size == (size, size) and image.mode == "RGB"
    pairs = official_reader(out)
    assert len(pairs) == len(specs) * images_per_prompt
    assert sorted(json.dumps(metadata, sort_keys=True) for _, metadata in pairs) == sorted(
        json.dumps(spec, sort_keys=True) for spec in specs for _ in range(images_per_prompt))


def test_generation_writes_the_official_layout_and_resumes(tiny_pipeline, tmp_path):
    metadata = write_jsonl(tmp_path / "metadata.jsonl", SIX_SPECS)
    long_prompts = write_jsonl(tmp_path / "long.jsonl", long_version(SIX_SPECS))
    out = tmp_path / "out"
    calls = []

    def pipeline(prompts, **sampling):
        calls.append((list(prompts), dict(sampling)))
        return tiny_pipeline(prompts, **sampling)

    pipeline.sampling = tiny_pipeline.sampling
    pipeline.image_tokenizer = tiny_pipeline.image_tokenizer
    record = generate_geneval(pipeline, metadata, out, images_per_prompt=2, long_prompts_path=long_prompts, steps=2, seed=5,
                              batch_size=5, model_id="tiny", **QUIET)
    lines = metadata.read_text().splitlines()
    check_official_layout(out, SIX_SPECS, lines, 2, 32)
    # The long prompts were generated from; the folders hold the original lines. Image k used seed 5 + k.
    generated = [(prompt, seed) for prompts, sampling in calls for prompt, seed in zip(prompts, sampling["seed"])]
    assert sorted(generated) == sorted((spec["prompt"], 5 + k) for spec in long_version(SIX_SPECS) for k in range(2))
    assert all(sampling["steps"] == 2 and sampling["cfg"] == 2.0 and sampling["shift"] == 3.0 and sampling["size"] == 32 for _, sampling in calls)
    saved = json.loads((out / "generation.json").read_text())
    assert saved == record and record["complete"] and record["generated_images"] == 12 and record["skipped_images"] == 0
    assert record["metadata_sha256"] == file_sha256(metadata) and record["long_prompts_sha256"] == file_sha256(long_prompts)
    assert (record["steps"], record["cfg"], record["shift"], record["seed"], record["resolution"]) == (2, 2.0, 3.0, 5, 32)
    assert record["tags"] == list(GENEVAL_TAGS) and record["prompt_source"].startswith("long")

    # A rerun does nothing; a lost image is regenerated alone, with the same pixels (its own seed).
    before = {path: path.stat().st_mtime_ns for path in out.glob("*/samples/*.png")}
    calls.clear()
    again = generate_geneval(pipeline, metadata, out, images_per_prompt=2, long_prompts_path=long_prompts, steps=2, seed=5, **QUIET)
    assert again["generated_images"] == 0 and again["skipped_images"] == 12 and calls == []
    assert {path: path.stat().st_mtime_ns for path in out.glob("*/samples/*.png")} == before
    lost = out / "00003" / "samples" / "0001.png"
    original = np.asarray(Image.open(lost), dtype=np.int16)
    lost.unlink()
    again = generate_geneval(pipeline, metadata, out, images_per_prompt=2, long_prompts_path=long_prompts, steps=2, seed=5, **QUIET)
    assert again["generated_images"] == 1 and calls == [([long_version(SIX_SPECS)[3]["prompt"]], calls[0][1])]
    assert np.abs(np.asarray(Image.open(lost), dtype=np.int16) - original).max() <= 2
    check_official_layout(out, SIX_SPECS, lines, 2, 32)

    # Other settings, or another prompt file, into the same folder are refused.
    with pytest.raises(UserError, match="other settings.*steps"):
        generate_geneval(pipeline, metadata, out, images_per_prompt=2, long_prompts_path=long_prompts, steps=3, seed=5, **QUIET)
    with pytest.raises(UserError, match="other settings.*long_prompts_sha256"):
        generate_geneval(pipeline, metadata, out, images_per_prompt=2, steps=2, seed=5, **QUIET)


def test_generate_and_score_end_to_end_from_the_cli(tiny_pipeline_dir, judges, tmp_path, capsys):
    metadata = write_jsonl(tmp_path / "metadata.jsonl", SIX_SPECS)
    out = tmp_path / "geneval"
    assert main(["eval", "geneval", "generate", "--model", str(tiny_pipeline_dir), "--metadata", str(metadata), "-o", str(out),
                 "--images-per-prompt", "2", "--steps", "2", "--cfg", "1.5", "--seed", "3", "--batch-size", "4", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["generated_images"] == 12 and summary["cfg"] == 1.5
    check_official_layout(out, SIX_SPECS, metadata.read_text().splitlines(), 2, 32)

    (out / "00002" / "samples" / "0001.png").unlink()  # a missing image must count as a failure, not vanish
    results = tmp_path / "results.json"
    assert main(["eval", "geneval", "score", str(out), "--detector", str(judges[0]), "--clip", str(judges[1]),
                 "--out", str(results), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert EVALUATOR_NAME in printed and "official mmdet evaluator" in printed and "| task | correct | images | accuracy |" in printed
    payload = json.loads(results.read_text())
    scores, protocol, details = payload["scores"], payload["protocol"], payload["details"]
    assert scores["evaluator"] == EVALUATOR_NAME and set(GENEVAL_TAGS) | {"overall"} <= set(scores)
    assert scores["overall"] == pytest.approx(np.mean([scores[tag] for tag in GENEVAL_TAGS]))
    assert protocol["judge"]["detector"]["name"] == str(judges[0]) and protocol["judge"]["color_classifier"]["name"] == str(judges[1])
    assert protocol["metadata_sha256"] == file_sha256(metadata) and protocol["official_rule_settings"] is True
    assert (protocol["resolution"], protocol["steps"], protocol["cfg"], protocol["seed"], protocol["images_per_prompt"]) == (32, 2, 1.5, 3, 2)
    assert protocol["rules"]["threshold"] == 0.3 and protocol["rules"]["counting_threshold"] == 0.9 and protocol["rules"]["max_objects_per_class"] == 16
    assert protocol["num_images"] == 12 and protocol["missing_images"] == 1 and "official mmdet evaluator" in protocol["note"]
    assert details["counts"]["counting"]["images"] == 2 and all(counts["images"] == 2 for counts in details["counts"].values())
    missing = [record for record in details["images"] if record["reason"] == "missing image"]
    assert missing == [{"folder": "00002", "image": "0001.png", "tag": "counting", "prompt": "a photo of two dogs", "correct": False,
                        "reason": "missing image", "detections": {}}]
    # The toy detector sees confident dogs: the colour prompts got a CLIP colour for their first dog.
    colour_records = [record for record in details["images"] if record["tag"] == "colors"]
    assert all(record["detections"]["dog"][0][5] in GENEVAL_COLORS for record in colour_records)


def test_cli_errors_are_one_line(tmp_path, capsys):
    metadata = write_jsonl(tmp_path / "metadata.jsonl", SIX_SPECS)
    long_prompts = write_jsonl(tmp_path / "long.jsonl", long_version(SIX_SPECS)[:4])
    cases = [
        (["eval", "geneval", "generate", "--model", "x", "--metadata", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o")], "does not exist"),
        (["eval", "geneval", "generate", "--model", "x", "--metadata", str(metadata), "--long-prompts", str(long_prompts), "-o", str(tmp_path / "o")],
         "line-aligned"),
        (["eval", "geneval", "generate", "--model", "x", "--metadata", str(metadata), "-o", str(tmp_path / "o"), "--images-per-prompt", "0"],
         "at least 1"),
        (["eval", "geneval", "score", str(tmp_path / "none")], "does not exist"),
        (["eval", "geneval", "score", str(tmp_path)], "holds no GenEval prompt folders"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("unimm eval geneval: error: ") and message in error and "\n" not in error


def test_cli_defaults_match_the_library():
    from eval import geneval
    from unimm.cli import eval_geneval_command

    assert eval_geneval_command.DETECTOR_DEFAULT == geneval.DEFAULT_DETECTOR
    assert eval_geneval_command.CLIP_DEFAULT == geneval.DEFAULT_CLIP


def test_folder_scoring_with_fixed_judges(tmp_path):
    """The evaluator reads any folder in the official layout; every image counts and scores are tag means."""
    out = tmp_path / "folder"
    for index, spec in enumerate(SIX_SPECS[:2]):
        (out / f"{index:05d}" / "samples").mkdir(parents=True)
        (out / f"{index:05d}" / "metadata.jsonl").write_text(json.dumps(spec))
        for k in range(2):
            Image.new("RGB", (64, 64)).save(out / f"{index:05d}" / "samples" / f"{k:04d}.png")
    (out / "00001" / "samples" / "0001.png").write_bytes(b"not a png")

    class OneDog:
        judge = {"name": "fixed"}

        def detect(self, images):
            return [[obj("dog", (0, 0, 10, 10), 0.8)] for _ in images]

    result = evaluate_geneval_folder(out, OneDog(), FixedColors({}), results_path=tmp_path / "r.json", **QUIET)
    assert result["scores"] == {"single_object": 1.0, "two_object": 0.0, "overall": 0.5}
    assert result["protocol"]["unreadable_images"] == 1 and result["protocol"]["num_images"] == 4
    assert result["protocol"]["metadata_sha256"] is None and len(result["protocol"]["folder_metadata_sha256"]) == 64
    assert json.loads((tmp_path / "r.json").read_text())["scores"]["overall"] == 0.5


# ----------------------------------------------------------------------------------------------------
# The real GenEval prompt file (only when UNIMM_GENEVAL_METADATA points at it)
# ----------------------------------------------------------------------------------------------------
def real_metadata() -> Path:
    path = os.environ.get("UNIMM_GENEVAL_METADATA")
    if not path or not Path(path).is_file():
        pytest.skip("set UNIMM_GENEVAL_METADATA to GenEval's evaluation_metadata.jsonl to run this test")
    return Path(path)


def real_long_metadata(metadata: Path) -> Path | None:
    path = os.environ.get("UNIMM_GENEVAL_LONG_METADATA") or str(metadata.with_name("evaluation_metadata_long.jsonl"))
    return Path(path) if Path(path).is_file() else None


class BlankPipeline:
    """Stands in for a model where only the layout matters: one small grey image per prompt."""

    def __call__(self, prompts, seed, size, **sampling):
        return [Image.new("RGB", (size, size), (int(s) % 256, 128, 128)) for s in seed]


def test_real_metadata_file_generates_the_official_layout(tmp_path):
    metadata = real_metadata()
    long_prompts = real_long_metadata(metadata)
    lines, specs, prompts = read_prompts(metadata, long_prompts)
    assert len(specs) == 553 and {spec["tag"] for spec in specs} == set(GENEVAL_TAGS)
    requirements = [req for spec in specs for req in spec["include"] + spec.get("exclude", [])]
    assert {req["class"] for req in requirements} <= set(GENEVAL_OBJECTS)
    assert {req["color"] for req in requirements if "color" in req} <= set(GENEVAL_COLORS)
    record = generate_geneval(BlankPipeline(), metadata, tmp_path / "all", images_per_prompt=1, long_prompts_path=long_prompts,
                              steps=1, cfg=1.0, shift=1.0, size=8, batch_size=64, **QUIET)
    assert record["num_prompts"] == 553 and record["metadata_sha256"] == file_sha256(metadata)
    check_official_layout(tmp_path / "all", specs, lines, 1, 8)


def test_real_metadata_subset_with_the_tiny_pipeline(tiny_pipeline, tmp_path):
    metadata = real_metadata()
    lines = [line for line in metadata.read_text().splitlines() if line.strip()]
    subset = [next(line for line in lines if json.loads(line)["tag"] == tag) for tag in GENEVAL_TAGS]
    (tmp_path / "subset.jsonl").write_text("\n".join(subset) + "\n")
    generate_geneval(tiny_pipeline, tmp_path / "subset.jsonl", tmp_path / "out", images_per_prompt=2, steps=1, **QUIET)
    check_official_layout(tmp_path / "out", [json.loads(line) for line in subset], subset, 2, 32)
