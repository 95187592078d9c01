"""``unimm demo``: a gallery of text-to-image samples and edits from the shipped Shapes models (or given ones).

Writes ``<out>/gallery.png`` (a contact sheet with each prompt or instruction under its images),
``<out>/index.html`` (the same as a page) and the single images under ``<out>/images/``, and returns what the
command prints: timings and the Shapes-suite scores measured on the shipped models.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

# Prompts in the forms the Shapes world's captions and GenEval-style prompts take: one object, counts,
# colour binding and relative positions (the last is the example).
DEMO_PROMPTS = (
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of a yellow star",
    "a photo of two green triangles",
    "a photo of three purple crosses",
    "a photo of an orange circle and a pink square",
    "a photo of a blue star above a yellow circle",
    "two red circles left of a blue square",
)
EDIT_SEED = 3  # the source scenes and instructions of the edit row (one per OmniEdit task kind)
TILE = 128  # pixels per image on the contact sheet (64 px samples, nearest-neighbour upscaled)
LABEL_HEIGHT = 42


@dataclass
class DemoResult:
    output: Path
    prompts: list[str]
    edits: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _tile(images: list[Image.Image], label: str) -> Image.Image:
    """Images side by side, upscaled to TILE px, with the label wrapped underneath."""
    tile = Image.new("RGB", (TILE * len(images), TILE + LABEL_HEIGHT), (255, 255, 255))
    for index, image in enumerate(images):
        tile.paste(image.convert("RGB").resize((TILE, TILE), Image.NEAREST), (index * TILE, 0))
    draw = ImageDraw.Draw(tile)
    for row, line in enumerate(_wrap(label, max(12, tile.width // 7))[:3]):
        draw.text((4, TILE + 2 + 13 * row), line, fill=(0, 0, 0))
    return tile


def contact_sheet(rows: list[list[Image.Image]], title_lines: list[str]) -> Image.Image:
    """Rows of tiles on white, left-aligned, under a few title lines."""
    header = 16 * len(title_lines) + 8
    width = max(sum(tile.width for tile in row) + 8 * (len(row) - 1) for row in rows)
    height = header + sum(max(tile.height for tile in row) + 12 for row in rows)
    sheet = Image.new("RGB", (width + 16, height + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, line in enumerate(title_lines):
        draw.text((8, 6 + 16 * index), line, fill=(0, 0, 0))
    y = header
    for row in rows:
        x = 8
        for tile in row:
            sheet.paste(tile, (x, y))
            x += tile.width + 8
        y += max(tile.height for tile in row) + 12
    return sheet


def run_demo(output: str | Path, t2i_model: str | None = None, edit_model: str | None = None, prompts=DEMO_PROMPTS,
             seeds_per_prompt: int = 2, num_edits: int = 7, steps: int | None = None, device: str | None = None) -> DemoResult:
    from data.shapes.render import render_scene
    from eval.shapes_suite import shapes_edit_pairs
    from unimm.defaults import default_model
    from unimm.pipeline import UnimmPipeline

    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    result = DemoResult(output=output, prompts=list(prompts))

    started = time.perf_counter()
    generator = UnimmPipeline.from_pretrained(t2i_model or default_model("text_to_image"), device=device)
    result.seconds["load_text_to_image"] = time.perf_counter() - started
    started = time.perf_counter()
    # One batch: every prompt `seeds_per_prompt` times, image k of prompt p with seed p * seeds_per_prompt + k.
    batch = [prompt for prompt in prompts for _ in range(seeds_per_prompt)]
    images = generator(batch, steps=steps, seed=0)
    result.seconds["text_to_image"] = time.perf_counter() - started
    del generator

    sample_rows, entries = [], []
    for index, prompt in enumerate(prompts):
        own = images[index * seeds_per_prompt:(index + 1) * seeds_per_prompt]
        names = []
        for seed_index, image in enumerate(own):
            name = f"images/t2i-{index:02d}-{seed_index}.png"
            image.save(output / name)
            names.append(name)
        sample_rows.append(_tile(own, prompt))
        entries.append({"prompt": prompt, "images": names})

    edit_tiles = []
    if num_edits:
        started = time.perf_counter()
        editor = UnimmPipeline.from_pretrained(edit_model or default_model("edit"), device=device)
        result.seconds["load_edit"] = time.perf_counter() - started
        size = editor.image_tokenizer.config.image_size
        pairs = shapes_edit_pairs(num_edits, seed=EDIT_SEED)
        sources = [render_scene(pair.source, size) for pair in pairs]
        started = time.perf_counter()
        edited = editor.edit(sources, [pair.instructions[0] for pair in pairs], steps=steps, seed=0)
        result.seconds["edit"] = time.perf_counter() - started
        for index, (pair, source, image) in enumerate(zip(pairs, sources, edited)):
            names = {"source": f"images/edit-{index:02d}-source.png", "edited": f"images/edit-{index:02d}-edited.png"}
            source.save(output / names["source"])
            image.save(output / names["edited"])
            edit_tiles.append(_tile([source, image], f"{pair.task}: {pair.instructions[0]}"))
            result.edits.append({"task": pair.task, "instruction": pair.instructions[0], **names})

    title = ["unimm demo: the shipped Shapes models" if not (t2i_model or edit_model) else "unimm demo",
             "text-to-image (two seeds per prompt)" + ("; edits below (input | output)" if edit_tiles else "")]
    rows = [sample_rows[i:i + 4] for i in range(0, len(sample_rows), 4)] + [edit_tiles[i:i + 4] for i in range(0, len(edit_tiles), 4)]
    contact_sheet(rows, title).save(output / "gallery.png")
    _write_html(output / "index.html", entries, result.edits)
    (output / "demo.json").write_text(json.dumps({"prompts": entries, "edits": result.edits, "seconds": result.seconds}, indent=2) + "\n")
    return result


def _write_html(path: Path, entries: list[dict], edits: list[dict]) -> None:
    style = "body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:.5em;width:300px;vertical-align:top}" \
            "img{width:128px;image-rendering:pixelated;margin-right:4px}figcaption{font-size:.9em}"
    parts = [f"<!doctype html><meta charset='utf-8'><title>unimm demo</title><style>{style}</style>",
             "<h1>unimm demo</h1><h2>Text to image</h2>"]
    for entry in entries:
        images = "".join(f"<img src='{html.escape(name)}' alt='{html.escape(entry['prompt'])}'>" for name in entry["images"])
        parts.append(f"<figure>{images}<figcaption>{html.escape(entry['prompt'])}</figcaption></figure>")
    if edits:
        parts.append("<h2>Editing (input, output)</h2>")
        for edit in edits:
            parts.append(
                f"<figure><img src='{html.escape(edit['source'])}' alt='input'><img src='{html.escape(edit['edited'])}' alt='output'>"
                f"<figcaption><b>{html.escape(edit['task'])}</b>: {html.escape(edit['instruction'])}</figcaption></figure>"
            )
    path.write_text("\n".join(parts) + "\n")


def format_scores(scores: dict | None) -> list[str]:
    """Lines for the shipped models' Shapes-suite scores (from checkpoints/shapes/scores.json)."""
    if not scores:
        return ["Shapes-suite scores: none stored with these checkpoints (measure them with `unimm eval shapes`)"]
    lines = ["Shapes-suite scores of the shipped models (`unimm eval shapes`; checkpoints/shapes/README.md has the commands):"]
    t2i = scores.get("text_to_image", {}).get("scores", {})
    if "shapes_geneval" in t2i:
        tags = ", ".join(f"{tag} {value:.2f}" for tag, value in sorted(t2i["shapes_geneval_by_tag"].items()))
        lines.append(f"  ShapesGenEval overall {t2i['shapes_geneval']:.3f}  ({tags})")
    if "shapes_dpg" in t2i:
        lines.append(f"  ShapesDPG {t2i['shapes_dpg']:.1f}")
    if "shapes_geneval_ceiling_tokenizer" in t2i:
        lines.append(f"  ShapesGenEval of true scenes through the shipped tokenizer (the ceiling for any generator on it): "
                     f"{t2i['shapes_geneval_ceiling_tokenizer']:.3f}")
    edit = scores.get("edit", {})
    if "shapes_edit_adherence" in edit.get("scores", {}):
        pairs = edit.get("protocol", {}).get("edit_pairs", "?")
        lines.append(f"  ShapesEdit: follows {100 * edit['scores']['shapes_edit_adherence']:.1f}% of {pairs} instructions; "
                     f"untouched pixels kept at {edit['scores']['shapes_edit_consistency_psnr']:.1f} dB PSNR")
    lines.append("  (the project's targets: ShapesGenEval >= 0.80, ShapesEdit >= 70%; docs/embedded_default.md says where we are)")
    return lines
