"""GenEval on the Shapes world: generate images for GenEval-format prompts and score them with the exact
program judge (`data.shapes.judge.score_spec`: include AND, exclude OR, counts, colours, positions).

GenEval's protocol: several seeds per prompt, an image passes when every rule of its spec holds, the score of
a tag is the fraction of its images that pass, and the overall score is the mean over tags.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from unimm.errors import UserError


def load_prompts(path: str | None, tags: list[str] | None = None) -> list[dict]:
    """GenEval-format specs from a JSONL file (default: the Shapes world's own prompt set), filtered by tag."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"prompt file '{path}' does not exist; write one with unimm shapes dataset (geneval_shapes.jsonl)")
        try:
            prompts = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {error.lineno}: not JSON; expected one GenEval spec per line") from None
    else:
        from data.shapes.prompts import geneval_prompts

        prompts = geneval_prompts()
    if tags:
        known = sorted({prompt.get("tag", "") for prompt in prompts})
        unknown = [tag for tag in tags if tag not in known]
        if unknown:
            raise UserError(f"unknown tag(s) {', '.join(unknown)}; the prompts have {', '.join(known)}")
        prompts = [prompt for prompt in prompts if prompt.get("tag") in tags]
    return prompts


def evaluate_geneval(pipeline, prompts: list[dict], samples_per_prompt: int = 4, seed: int = 0, batch_size: int = 32,
                     image_dir: str | Path | None = None, progress: bool = True, **sampling) -> dict:
    """Generate `samples_per_prompt` images per prompt (seeds seed, seed+1, ...) and judge them."""
    from tqdm import tqdm

    from data.shapes.judge import score_spec

    jobs = [(index, sample) for index in range(len(prompts)) for sample in range(samples_per_prompt)]
    passed_by_tag: dict[str, list[bool]] = defaultdict(list)
    records = []
    if image_dir is not None:
        image_dir = Path(image_dir)
        image_dir.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(jobs), batch_size), desc="geneval", disable=not progress):
        chunk = jobs[start:start + batch_size]
        images = pipeline([prompts[index]["prompt"] for index, _ in chunk], seed=[seed + sample for _, sample in chunk], **sampling)
        for (index, sample), image in zip(chunk, images):
            spec = prompts[index]
            passed, reasons = score_spec(image, spec)
            passed_by_tag[spec.get("tag", "")].append(bool(passed))
            record = {"prompt": spec["prompt"], "tag": spec.get("tag", ""), "seed": seed + sample, "passed": bool(passed), "reasons": reasons}
            if image_dir is not None:
                name = f"{index:04d}-{sample:02d}.png"
                image.save(image_dir / name)
                record["image"] = name
            records.append(record)
    by_tag = {tag: sum(values) / len(values) for tag, values in sorted(passed_by_tag.items())}
    return {
        "overall": sum(by_tag.values()) / len(by_tag) if by_tag else 0.0,
        "by_tag": by_tag,
        "images": len(records),
        "samples_per_prompt": samples_per_prompt,
        "records": records,
    }


class RenderedSceneOracle:
    """A stand-in "generator" that draws, for each prompt, a true scene of its spec (`scene_for_spec`, seeded
    by the image's seed), optionally passed through a tokenizer's encode/decode.

    Scored by `evaluate_geneval` it gives the ceilings of ShapesGenEval: with no tokenizer, what the judge
    itself reads from perfect images; with one, the best any generator can do that decodes through it (a
    perfect generator produces exactly the latents of true scenes).
    """

    def __init__(self, prompts: list[dict], tokenizer=None, resolution: int = 64):
        self.specs = {prompt["prompt"]: prompt for prompt in prompts}
        self.tokenizer = tokenizer
        self.resolution = int(tokenizer.config.image_size) if tokenizer is not None else int(resolution)

    def __call__(self, prompts: list[str], seed: list[int], **_sampling):
        import numpy as np
        from PIL import Image

        from data.shapes.prompts import scene_for_spec
        from data.shapes.render import render_scene_array

        # One scene per (prompt, seed): the same scenes for the judge's and the tokenizer's ceiling.
        arrays = [
            render_scene_array(scene_for_spec(self.specs[prompt], np.random.default_rng([int(image_seed), sum(map(ord, prompt))])), self.resolution)
            for prompt, image_seed in zip(prompts, seed)
        ]
        if self.tokenizer is None:
            return [Image.fromarray(array) for array in arrays]
        return tokenizer_round_trip(self.tokenizer, arrays)


def arrays_to_tensor(arrays, device):
    """uint8 (H, W, 3) arrays (a list or a stacked array) -> float (N, 3, H, W) in [-1, 1], the tokenizers' input."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device, torch.float32) / 127.5 - 1.0


def tokenizer_round_trip(tokenizer, arrays: list) -> list:
    """uint8 (H, W, 3) arrays -> PIL images of decode(encode(x)): what a generator that produced exactly the
    latents of these images would show."""
    import torch

    from unimm.pipeline import to_pil

    images = arrays_to_tensor(arrays, next(tokenizer.parameters()).device)
    with torch.no_grad():
        return to_pil(tokenizer.decode(tokenizer.encode(images)).float())


def evaluate_geneval_ceilings(tokenizer, prompts: list[dict], samples_per_prompt: int = 4, seed: int = 0, batch_size: int = 32,
                              progress: bool = True) -> dict:
    """ShapesGenEval of true renders ("judge") and of their tokenizer round trips ("tokenizer")."""
    judge = evaluate_geneval(RenderedSceneOracle(prompts, None, tokenizer.config.image_size), prompts, samples_per_prompt, seed,
                             batch_size, progress=progress)
    through_tokenizer = evaluate_geneval(RenderedSceneOracle(prompts, tokenizer), prompts, samples_per_prompt, seed, batch_size,
                                         progress=progress)
    return {"judge": judge, "tokenizer": through_tokenizer}
