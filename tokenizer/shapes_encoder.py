"""A small representation encoder for the Shapes world: the stand-in for DINOv2 on a CPU.

It is a `transformers` `Dinov2Model` (the same class as `facebook/dinov2-base`, only a tiny config),
trained from scratch with a discriminative objective on procedurally rendered scenes, then written
with `save_pretrained` so every tokenizer loads it through `RepresentationEncoder.from_pretrained`,
exactly like the real DINOv2.

Objective (supervised, dense + global, so the *patch* tokens carry semantics the way DINOv2's do):
- per patch: the colour and the shape of the object that covers most of the patch (or "background");
- per image, from the mean of the patch tokens: the object count, the background, the texture and
  the rendering style.
The prediction heads are discarded; only the backbone is saved.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.shapes.render import render_object_coverage, render_scene_array
from data.shapes.scene import MAX_OBJECTS, Scene, sample_scene
from data.shapes.vocabulary import BACKGROUNDS, COLORS, SHAPES, STYLES, TEXTURES
from tokenizer.encoders import RepresentationEncoder, map_to_tokens
from unimm.training.schedule import warmup_cosine_lr, warmup_factor

# A patch belongs to an object when the object covers at least this fraction of it.
PATCH_COVERAGE_THRESHOLD = 0.25


@dataclass
class ShapesEncoderConfig:
    output_dir: str = "runs/shapes-encoder"
    resolution: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    mlp_ratio: int = 4
    num_train_scenes: int = 12000
    num_val_scenes: int = 500
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    log_every: int = 100


@dataclass
class SceneLabels:
    """Dense and global targets of a batch of scenes."""

    patch_color: torch.Tensor  # (N, h*w) in 0..len(COLORS), len(COLORS) = background
    patch_shape: torch.Tensor  # (N, h*w) in 0..len(SHAPES), len(SHAPES) = background
    count: torch.Tensor  # (N,) number of objects - 1
    background: torch.Tensor  # (N,)
    texture: torch.Tensor  # (N,)
    style: torch.Tensor  # (N,)


def scene_patch_labels(scene: Scene, resolution: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(h*w,) colour and shape class of the object covering most of each patch, background otherwise."""
    grid = resolution // patch_size
    colors = np.full(grid * grid, len(COLORS), dtype=np.int64)
    shapes = np.full(grid * grid, len(SHAPES), dtype=np.int64)
    if not scene.objects:
        return colors, shapes
    coverage = render_object_coverage(scene, resolution)  # (objects, H, W)
    per_patch = coverage.reshape(len(scene.objects), grid, patch_size, grid, patch_size).mean((2, 4))
    per_patch = per_patch.reshape(len(scene.objects), grid * grid)
    owner = per_patch.argmax(0)
    covered = per_patch.max(0) >= PATCH_COVERAGE_THRESHOLD
    for patch in np.flatnonzero(covered):
        obj = scene.objects[owner[patch]]
        colors[patch] = COLORS.index(obj.color)
        shapes[patch] = SHAPES.index(obj.shape)
    return colors, shapes


def render_pool(num_scenes: int, seed: int, resolution: int, patch_size: int) -> tuple[torch.Tensor, SceneLabels]:
    """Images (N, 3, H, W) in [-1, 1] and their labels, from scenes seeded by `seed`."""
    rng = np.random.default_rng(seed)
    images = np.empty((num_scenes, resolution, resolution, 3), dtype=np.uint8)
    patch_colors, patch_shapes, counts, backgrounds, textures, styles = [], [], [], [], [], []
    for index in range(num_scenes):
        scene = sample_scene(rng)
        images[index] = render_scene_array(scene, resolution)
        colors, shapes = scene_patch_labels(scene, resolution, patch_size)
        patch_colors.append(colors)
        patch_shapes.append(shapes)
        counts.append(len(scene.objects) - 1)
        backgrounds.append(BACKGROUNDS.index(scene.background))
        textures.append(TEXTURES.index(scene.texture))
        styles.append(STYLES.index(scene.style))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = SceneLabels(
        patch_color=torch.from_numpy(np.stack(patch_colors)),
        patch_shape=torch.from_numpy(np.stack(patch_shapes)),
        count=torch.tensor(counts),
        background=torch.tensor(backgrounds),
        texture=torch.tensor(textures),
        style=torch.tensor(styles),
    )
    return pixels, labels


def _select(labels: SceneLabels, index: torch.Tensor) -> SceneLabels:
    return SceneLabels(**{name: value[index] for name, value in vars(labels).items()})


def backbone_config(config: ShapesEncoderConfig):
    """The transformers config of the Shapes encoder (the same class as `facebook/dinov2-base`)."""
    import transformers

    return transformers.Dinov2Config(
        image_size=config.resolution,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
    )


def build_backbone(config: ShapesEncoderConfig) -> RepresentationEncoder:
    return RepresentationEncoder.from_config(backbone_config(config), kind="dinov2")


class ShapesProbeHeads(nn.Module):
    """Training-only heads: dense (per patch) and global (mean of patch tokens)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.patch_color = nn.Linear(hidden_size, len(COLORS) + 1)
        self.patch_shape = nn.Linear(hidden_size, len(SHAPES) + 1)
        self.count = nn.Linear(hidden_size, MAX_OBJECTS)
        self.background = nn.Linear(hidden_size, len(BACKGROUNDS))
        self.texture = nn.Linear(hidden_size, len(TEXTURES))
        self.style = nn.Linear(hidden_size, len(STYLES))

    def losses_and_accuracies(self, tokens: torch.Tensor, labels: SceneLabels) -> tuple[torch.Tensor, dict[str, float]]:
        """tokens (B, h*w, D) -> summed cross-entropy and per-task accuracy."""
        pooled = tokens.mean(1)  # (B, D)
        logits = {
            "patch_color": self.patch_color(tokens),
            "patch_shape": self.patch_shape(tokens),
            "count": self.count(pooled),
            "background": self.background(pooled),
            "texture": self.texture(pooled),
            "style": self.style(pooled),
        }
        total = tokens.new_zeros(())
        accuracies = {}
        for name, task_logits in logits.items():
            target = getattr(labels, name)
            total = total + F.cross_entropy(task_logits.flatten(0, -2), target.flatten())
            accuracies[name] = (task_logits.argmax(-1) == target).float().mean().item()
        return total, accuracies


def _learning_rate(step: int, config: ShapesEncoderConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * warmup_factor(step + 1, config.warmup_steps)  # the first step already learns
    return warmup_cosine_lr(step, config.learning_rate, config.warmup_steps, config.steps)


@torch.no_grad()
def evaluate(encoder: RepresentationEncoder, heads: ShapesProbeHeads, images, labels, batch_size: int = 250) -> dict:
    encoder.eval()
    sums: dict[str, float] = {}
    for start in range(0, len(images), batch_size):
        index = torch.arange(start, min(start + batch_size, len(images)))
        _, accuracies = heads.losses_and_accuracies(encoder.patch_tokens(images[index]), _select(labels, index))
        for name, value in accuracies.items():
            sums[name] = sums.get(name, 0.0) + value * len(index)
    encoder.train()
    return {name: total / len(images) for name, total in sums.items()}


def train_shapes_encoder(config: ShapesEncoderConfig, log=print) -> dict:
    """Train, save the backbone with `save_pretrained` to `config.output_dir`, return the final metrics."""
    torch.manual_seed(config.seed)
    started = time.time()
    train_images, train_labels = render_pool(config.num_train_scenes, config.seed, config.resolution, config.patch_size)
    val_images, val_labels = render_pool(config.num_val_scenes, config.seed + 1_000_003, config.resolution, config.patch_size)
    log(f"rendered {config.num_train_scenes} + {config.num_val_scenes} scenes in {time.time() - started:.0f}s")

    encoder = build_backbone(config)
    heads = ShapesProbeHeads(config.hidden_size)
    parameters = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    encoder.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        index = torch.randint(0, len(train_images), (config.batch_size,), generator=generator)
        images = train_images[index]
        # Horizontal flips double the data; the dense labels flip with the image.
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        labels = _select(train_labels, index)
        grid = config.resolution // config.patch_size
        for name in ("patch_color", "patch_shape"):
            dense = getattr(labels, name).view(-1, grid, grid)
            setattr(labels, name, torch.where(flip.view(-1, 1, 1), dense.flip(-1), dense).view(-1, grid * grid))
        loss, accuracies = heads.losses_and_accuracies(map_to_tokens(encoder(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if (step + 1) % config.log_every == 0 or step == 0:
            summary = " ".join(f"{name}={value:.3f}" for name, value in accuracies.items())
            log(f"step {step + 1}/{config.steps} loss={loss.item():.4f} {summary} ({time.time() - started:.0f}s)")

    metrics = {"val_accuracy": evaluate(encoder, heads, val_images, val_labels), "wall_seconds": time.time() - started}
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(str(output))
    (output / "shapes_encoder_metrics.json").write_text(json.dumps({"config": asdict(config), **metrics}, indent=2))
    log(f"saved {output} val {json.dumps(metrics['val_accuracy'])}")
    return metrics
