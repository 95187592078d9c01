"""The binding probe: does a text-to-image model read how a caption's words bind, or only which words it has?

For every ShapesGenEval position and colour-binding prompt it draws a true scene of the prompt, noises its latent
at a few timesteps and measures the model's flow-matching loss under three captions, with the same noise:

- the prompt ("a photo of a red circle and a blue square"),
- its hard negative, the same words bound the other way ("a photo of a blue circle and a red square"; a relation
  reversed for position prompts: "left of" -> "right of"), built by `unimm.training.hard_negatives`,
- the empty caption (the unconditional model).

A model that reads the binding fits the true scene better under the prompt than under the negative: the margin
L(negative) - L(prompt) is positive and "prefers prompt" is well above one half. A bag-of-words model has a margin
near 0 and prefers the prompt half the time, while the caption itself (L(empty) - L(prompt)) still helps a lot.
No sampling and no judge: it isolates the text conditioning from everything that happens after it.

The margin says whether the binding helps; the response says how much the model listens to it: the mean squared
change of the predicted velocity when the prompt is swapped for its negative, as a share of the change when the
caption is dropped. A bag-of-words model's share is near 0 (the swap keeps every word); one that reads the binding
moves its prediction for a swapped binding by a visible part of what the whole caption moves it.
"""

from __future__ import annotations

import numpy as np
import torch

from data.shapes.vocabulary import COLORS
from unimm.training.hard_negatives import CaptionNegatives, per_sample_flow_loss

# The Shapes world's relation words come in opposite pairs; its colours are one exchange class.
SHAPES_SWAP_PAIRS = [["left", "right"], ["above", "below"]]
SHAPES_EXCHANGE_CLASSES = [list(COLORS)]
BINDING_TAGS = ("position", "color_attr")
DEFAULT_TIMESTEPS = (0.95, 0.85, 0.7, 0.5)


def shapes_caption_negatives() -> CaptionNegatives:
    return CaptionNegatives(SHAPES_SWAP_PAIRS, SHAPES_EXCHANGE_CLASSES)


@torch.no_grad()
def evaluate_binding(pipeline, prompts: list[dict], samples_per_prompt: int = 1, seed: int = 0,
                     timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS, batch_size: int = 32) -> dict:
    """Per tag and timestep: mean margin L(negative) - L(prompt), the fraction of scenes where the prompt fits
    better, and the caption's own gain L(empty) - L(prompt); plus "prefers_prompt" per tag over all timesteps.

    `prompts` are GenEval specs; only position and colour-binding ones (those with a hard negative) are used.
    Scene k of a prompt is drawn with seed + k; every item's noise has its own seed.
    """
    from data.shapes.prompts import scene_for_spec
    from data.shapes.render import render_scene_array
    from eval.shapes_generation import arrays_to_tensor
    from unimm.flow import interpolate, velocity_target
    from unimm.models.sequence import SampleSpec, build_layout

    negatives = shapes_caption_negatives()
    items = []  # (tag, prompt, negative, scene seed)
    for spec in prompts:
        options = negatives.candidates(spec["prompt"]) if spec.get("tag") in BINDING_TAGS else []
        items += [(spec["tag"], spec["prompt"], options[0], seed + k) for k in range(samples_per_prompt) if options]
    if not items:
        raise ValueError("no position or colour-binding prompts with a hard negative to probe")
    tokenizer, generator, device = pipeline.image_tokenizer, pipeline.generator, pipeline.device
    size = tokenizer.config.image_size
    specs_by_prompt = {spec["prompt"]: spec for spec in prompts}
    margins = {tag: {t: [] for t in timesteps} for tag in BINDING_TAGS}
    gains = {tag: {t: [] for t in timesteps} for tag in BINDING_TAGS}
    # Per item: mean squared prediction change, prompt -> negative and prompt -> empty caption.
    binding_moves = {tag: {t: [] for t in timesteps} for tag in BINDING_TAGS}
    caption_moves = {tag: {t: [] for t in timesteps} for tag in BINDING_TAGS}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = [render_scene_array(scene_for_spec(specs_by_prompt[prompt], np.random.default_rng(scene_seed)), size)
                  for _, prompt, _, scene_seed in chunk]
        clean = tokenizer.normalize_latents(tokenizer.encode(arrays_to_tensor(pixels, device))).float()
        # Each item its own noise (one draw per item, shared by its three captions and all timesteps).
        noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(1_000_003 * scene_seed + start + index))
                             for index, (*_, scene_seed) in enumerate(chunk)]).to(device)
        grid = tuple(dimension // generator.config.latent_patch_size for dimension in clean.shape[-2:])
        layouts = [build_layout([SampleSpec(ids) for ids in pipeline.encode_text(texts)], grid).to(device)
                   for texts in ([p for _, p, _, _ in chunk], [n for _, _, n, _ in chunk], [""] * len(chunk))]
        target = velocity_target(clean, noise)
        for t_value in timesteps:
            t = torch.full((len(chunk),), float(t_value), device=device)
            noisy = interpolate(clean, noise, t)
            predictions = [generator(layout, noisy, t).float() for layout in layouts]
            true, negative, empty = (per_sample_flow_loss(prediction, target) for prediction in predictions)
            binding_move, caption_move = ((other - predictions[0]).square().flatten(1).mean(1) for other in predictions[1:])
            for index, (tag, *_rest) in enumerate(chunk):
                margins[tag][t_value].append(float(negative[index] - true[index]))
                gains[tag][t_value].append(float(empty[index] - true[index]))
                binding_moves[tag][t_value].append(float(binding_move[index]))
                caption_moves[tag][t_value].append(float(caption_move[index]))
    result = {}
    for tag in BINDING_TAGS:
        if not margins[tag][timesteps[0]]:
            continue
        by_t = {
            str(t): {
                "margin": float(np.mean(margins[tag][t])),
                "prefers_prompt": float(np.mean(np.array(margins[tag][t]) > 0)),
                "caption_gain": float(np.mean(gains[tag][t])),
                "binding_response": _share(binding_moves[tag][t], caption_moves[tag][t]),
            }
            for t in timesteps
        }
        every = np.concatenate([np.array(margins[tag][t]) for t in timesteps])
        result[tag] = {
            "prefers_prompt": float(np.mean(every > 0)),
            "binding_response": _share([move for t in timesteps for move in binding_moves[tag][t]],
                                       [move for t in timesteps for move in caption_moves[tag][t]]),
            "scenes": len(margins[tag][timesteps[0]]),
            "by_t": by_t,
        }
    return result


def _share(part: list[float], whole: list[float]) -> float:
    """sum(part) / sum(whole), 0 where the caption moves nothing (a caption-blind model)."""
    total = float(np.sum(whole))
    return float(np.sum(part)) / total if total > 0 else 0.0
