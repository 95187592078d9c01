"""Write a Shapes dataset in the layouts of the real corpora, so the same loaders read it.

``<out>/t2i/<split>/shard-*.tar``           webdataset, as pixparse/cc12m-wds: ``png`` + ``txt`` + ``json``
                                           (``json`` holds ``caption_llava``/``caption_llava_short`` as the
                                           LLaVA-NeXT recaptions do, and the exact ``scene`` graph)
``<out>/t2i-parquet/<split>/shard-*.parquet`` the same samples as a parquet table (``image`` struct column)
``<out>/edit/<split>/shard-*.parquet``      OmniEdit layout: omni_edit_id, task, src_img, edited_img,
                                           edited_prompt_list, width, height, sc/pq/o scores
``<out>/geneval_shapes.jsonl``             GenEval-format prompts (six tags)
``<out>/dpg_shapes.csv``                   DPG-Bench-style questions
``<out>/config.yaml``                      the resolved configuration that wrote all of the above
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.shapes.captions import captions_for, long_caption
from data.shapes.edits import EDIT_TASKS, sample_edit
from data.shapes.prompts import DPG_COLUMNS, dpg_questions, geneval_prompts, scene_for_spec
from data.shapes.render import render_scene
from data.shapes.scene import sample_scene
from data.shards import write_parquet_shards, write_webdataset_shards
from eval.geneval_rules import GENEVAL_TAGS
from unimm.atomic import atomic_write_text
from unimm.config import save_resolved_config

SPLITS = ("train", "val")
# Disjoint random streams: a sample's content depends only on (seed, stream, index), never on order.
STREAM_IDS = {"train": 0, "val": 1, "edit-train": 2, "edit-val": 3, "judge-check": 4}


@dataclass
class ShapesDatasetConfig:
    resolution: int = 64
    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    num_edit_train: int = 1000
    num_edit_val: int = 100
    # Fraction of text-to-image samples laid out from a random GenEval-style spec (counting, positions,
    # colour binding) with the spec's prompt as the short caption, so those prompt forms are covered. The
    # tag is drawn uniformly first, then a spec of that tag: drawn from the pooled specs, 900 of the 1060 are
    # colour-binding pairs and "a photo of a circle" would be one caption in a thousand spec samples.
    spec_fraction: float = 0.5
    # Relative weight of each tag when a spec sample draws its tag, in GENEVAL_TAGS order (single_object,
    # two_object, counting, colors, position, color_attr); empty means uniform. [1, 1, 1, 1, 3, 3] gives
    # positions and colour binding, where the shipped T2I model is weakest, 30 % of the spec samples each.
    spec_tag_weights: list[float] = field(default_factory=list)
    samples_per_shard: int = 1000
    write_parquet: bool = True
    num_dpg_items: int = 100


def sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM_IDS[stream], index])


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


_SPECS_BY_TAG: dict[str, list[dict]] | None = None


def _specs_by_tag() -> dict[str, list[dict]]:
    """Every distinct GenEval-style spec of the Shapes world (no sampling), grouped by tag in GENEVAL_TAGS order."""
    global _SPECS_BY_TAG
    if _SPECS_BY_TAG is None:
        specs = geneval_prompts(tag_counts={tag: 10**9 for tag in GENEVAL_TAGS})
        _SPECS_BY_TAG = {tag: [spec for spec in specs if spec["tag"] == tag] for tag in GENEVAL_TAGS}
    return _SPECS_BY_TAG


def spec_tag_probabilities(weights: list[float]) -> np.ndarray | None:
    """The tag distribution of spec samples from `spec_tag_weights` (None: uniform); raises ValueError on bad weights."""
    if not weights:
        return None
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(GENEVAL_TAGS),) or not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(
            f"spec_tag_weights needs {len(GENEVAL_TAGS)} non-negative numbers, not all 0, one per tag in the order "
            f"{', '.join(GENEVAL_TAGS)}; got {list(weights)}"
        )
    return weights / weights.sum()


def text_to_image_sample(config: ShapesDatasetConfig, split: str, index: int) -> dict:
    rng = sample_rng(config.seed, split, index)
    if rng.random() < config.spec_fraction:
        probabilities = spec_tag_probabilities(config.spec_tag_weights)
        # Uniform draws keep rng.integers, so datasets written before the weights existed stay byte-identical.
        tag_index = int(rng.integers(len(GENEVAL_TAGS))) if probabilities is None else int(rng.choice(len(GENEVAL_TAGS), p=probabilities))
        pool = _specs_by_tag()[GENEVAL_TAGS[tag_index]]
        spec = pool[int(rng.integers(len(pool)))]
        scene = scene_for_spec(spec, rng)
        captions = {"caption_llava_short": spec["prompt"], "caption_llava": long_caption(scene), "txt": spec["prompt"]}
    else:
        scene = sample_scene(rng)
        captions = captions_for(scene, rng)
    return {
        "__key__": f"{split}{index:07d}",
        "png": png_bytes(render_scene(scene, config.resolution)),
        "txt": captions["txt"],
        "json": {
            "caption_llava": captions["caption_llava"],
            "caption_llava_short": captions["caption_llava_short"],
            "scene": scene.to_dict(),
        },
    }


def edit_row(config: ShapesDatasetConfig, split: str, index: int) -> dict:
    stream = f"edit-{split}"
    rng = sample_rng(config.seed, stream, index)
    task = EDIT_TASKS[index % len(EDIT_TASKS)]  # balanced over the seven kinds
    edit = sample_edit(rng, sample_scene, task)
    return {
        "omni_edit_id": f"shapes-{split}-{index:07d}",
        "task": edit.task,
        "src_img": png_bytes(render_scene(edit.source, config.resolution)),
        "edited_img": png_bytes(render_scene(edit.edited, config.resolution)),
        "edited_prompt_list": list(edit.instructions),
        "width": config.resolution,
        "height": config.resolution,
        # The pairs are exact, so the quality scores OmniEdit filters on are at their maximum.
        "sc_score_1": 10.0, "sc_score_2": 10.0, "pq_score": 10.0, "o_score": 10.0,
        "src_scene": json.dumps(edit.source.to_dict()),
        "edited_scene": json.dumps(edit.edited.to_dict()),
        "touched_objects": list(edit.touched_objects),
    }


def t2i_parquet_row(sample: dict) -> dict:
    return {
        "__key__": sample["__key__"],
        "image": sample["png"],
        "caption_llava": sample["json"]["caption_llava"],
        "caption_llava_short": sample["json"]["caption_llava_short"],
        "scene": json.dumps(sample["json"]["scene"]),
    }


def _render_all(function, config: ShapesDatasetConfig, split: str, count: int, workers: int, desc: str, progress: bool) -> list:
    """`function(config, split, i)` for i < count, in index order; rendered by `workers` processes when > 1.

    A sample depends only on (seed, stream, index), so the parallel result is identical to the serial one.
    """
    arguments = [(config, split, index) for index in range(count)]
    if workers <= 1 or count < 2 * workers:
        return [function(*item) for item in tqdm(arguments, desc=desc, disable=not progress, leave=False)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        chunks = pool.imap(_starmap_chunk, [(function, arguments[i:i + 256]) for i in range(0, count, 256)])
        return [sample for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False) for sample in chunk]


def _starmap_chunk(job: tuple) -> list:
    function, arguments = job
    return [function(*item) for item in arguments]


def write_shapes_dataset(config: ShapesDatasetConfig, out_dir: str | Path, progress: bool = True, workers: int = 1) -> dict:
    """Render and write everything; returns a summary with counts and paths. `workers` > 1 renders in parallel
    processes (same bytes as serial)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, out_dir)
    summary: dict = {"out": str(out_dir), "resolution": config.resolution}
    for split, count in (("train", config.num_train), ("val", config.num_val)):
        samples = _render_all(text_to_image_sample, config, split, count, workers, f"t2i {split}", progress)
        write_webdataset_shards(samples, out_dir / "t2i" / split, samples_per_shard=config.samples_per_shard)
        if config.write_parquet:
            write_parquet_shards(
                [t2i_parquet_row(s) for s in samples], out_dir / "t2i-parquet" / split,
                rows_per_shard=config.samples_per_shard, image_columns=("image",),
            )
        summary[f"t2i_{split}"] = count
    for split, count in (("train", config.num_edit_train), ("val", config.num_edit_val)):
        rows = _render_all(edit_row, config, split, count, workers, f"edit {split}", progress)
        write_parquet_shards(
            rows, out_dir / "edit" / split, rows_per_shard=config.samples_per_shard, image_columns=("src_img", "edited_img")
        )
        summary[f"edit_{split}"] = count
    prompts = geneval_prompts(seed=config.seed)
    atomic_write_text(out_dir / "geneval_shapes.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))
    summary["geneval_prompts"] = len(prompts)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=DPG_COLUMNS)
    writer.writeheader()
    rows = dpg_questions(config.num_dpg_items, seed=config.seed)
    writer.writerows(rows)
    atomic_write_text(out_dir / "dpg_shapes.csv", buffer.getvalue())
    summary["dpg_questions"] = len(rows)
    return summary
