"""A small representation encoder for the Shapes world: the stand-in for DINOv2 on a CPU.

It is a `transformers` `Dinov2Model` (the same class as `facebook/dinov2-base`, only a tiny config),
trained from scratch with a discriminative objective on procedurally rendered scenes, then written
with `save_pretrained` so every tokenizer loads it through `RepresentationEncoder.from_pretrained`,
exactly like the real DINOv2.

Objective (supervised, dense + global, so the *patch* tokens carry semantics the way DINOv2's do):
- per patch, for each cell of a `subpatch_grid` x `subpatch_grid` split of the patch: the colour and
  the shape of the object that covers the cell (or "background"). A patch token must therefore say
  *which part* of an object it shows, not only which object: DINOv2's patch features support linear
  part segmentation, and without this a small star and a small circle (about one patch each at 64 px)
  got nearly the same token, so the tokenizer built on it drew every small shape as a blob;
- per image, from the mean of the patch tokens: the object count, the background, the texture and
  the rendering style.
The prediction heads are discarded; only the backbone is saved.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from data.shapes.render import render_object_coverage, render_scene_array
from data.shapes.scene import MAX_OBJECTS, Scene, sample_scene
from data.shapes.vocabulary import BACKGROUNDS, COLORS, SHAPES, STYLES, TEXTURES
from tokenizer.encoders import RepresentationEncoder, map_to_tokens
from unimm.training.schedule import warmup_cosine_lr, warmup_factor


@dataclass
class ShapesEncoderConfig:
    output_dir: str = "runs/shapes-encoder"
    resolution: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    mlp_ratio: int = 4
    # Dense targets per patch: a subpatch_grid x subpatch_grid grid of cells (1 = one label per patch).
    subpatch_grid: int = 4
    # A cell belongs to an object when the object covers at least this fraction of it.
    cell_coverage_threshold: float = 0.5
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

    # Cell maps (N, h*s, w*s) for patches split into s x s cells (s = subpatch_grid).
    cell_color: torch.Tensor  # in 0..len(COLORS), len(COLORS) = background
    cell_shape: torch.Tensor  # in 0..len(SHAPES), len(SHAPES) = background
    count: torch.Tensor  # (N,) number of objects - 1
    background: torch.Tensor  # (N,)
    texture: torch.Tensor  # (N,)
    style: torch.Tensor  # (N,)


def scene_cell_labels(scene: Scene, resolution: int, cells: int, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(cells, cells) colour and shape class of the object covering each cell of a cells x cells grid
    (the one covering most of it, when it covers at least `threshold`), background otherwise."""
    colors = np.full((cells, cells), len(COLORS), dtype=np.int64)
    shapes = np.full((cells, cells), len(SHAPES), dtype=np.int64)
    if not scene.objects:
        return colors, shapes
    coverage = render_object_coverage(scene, resolution)  # (objects, H, W)
    cell = resolution // cells
    per_cell = coverage.reshape(len(scene.objects), cells, cell, cells, cell).mean((2, 4))  # (objects, cells, cells)
    owner = per_cell.argmax(0)
    covered = per_cell.max(0) >= threshold
    object_colors = np.asarray([COLORS.index(obj.color) for obj in scene.objects])
    object_shapes = np.asarray([SHAPES.index(obj.shape) for obj in scene.objects])
    colors[covered] = object_colors[owner[covered]]
    shapes[covered] = object_shapes[owner[covered]]
    return colors, shapes


def render_pool(num_scenes: int, seed: int, config: ShapesEncoderConfig) -> tuple[torch.Tensor, SceneLabels]:
    """Images (N, 3, H, W) in [-1, 1] and their labels, from scenes seeded by `seed`."""
    rng = np.random.default_rng(seed)
    resolution = config.resolution
    cells = resolution // config.patch_size * config.subpatch_grid
    images = np.empty((num_scenes, resolution, resolution, 3), dtype=np.uint8)
    cell_colors, cell_shapes, counts, backgrounds, textures, styles = [], [], [], [], [], []
    for index in range(num_scenes):
        scene = sample_scene(rng)
        images[index] = render_scene_array(scene, resolution)
        colors, shapes = scene_cell_labels(scene, resolution, cells, config.cell_coverage_threshold)
        cell_colors.append(colors)
        cell_shapes.append(shapes)
        counts.append(len(scene.objects) - 1)
        backgrounds.append(BACKGROUNDS.index(scene.background))
        textures.append(TEXTURES.index(scene.texture))
        styles.append(STYLES.index(scene.style))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = SceneLabels(
        cell_color=torch.from_numpy(np.stack(cell_colors)),
        cell_shape=torch.from_numpy(np.stack(cell_shapes)),
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
    """Training-only heads: dense (each patch token predicts its s x s cells) and global (mean of tokens)."""

    def __init__(self, hidden_size: int, subpatch_grid: int = 1):
        super().__init__()
        self.subpatch_grid = subpatch_grid
        cells = subpatch_grid * subpatch_grid
        self.cell_color = nn.Linear(hidden_size, cells * (len(COLORS) + 1))
        self.cell_shape = nn.Linear(hidden_size, cells * (len(SHAPES) + 1))
        self.count = nn.Linear(hidden_size, MAX_OBJECTS)
        self.background = nn.Linear(hidden_size, len(BACKGROUNDS))
        self.texture = nn.Linear(hidden_size, len(TEXTURES))
        self.style = nn.Linear(hidden_size, len(STYLES))

    def _cell_logits(self, head: nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h*w, D) -> logits laid out as the cell map, (B, h*s, w*s, classes)."""
        s = self.subpatch_grid
        return rearrange(head(tokens), "b (h w) (s1 s2 k) -> b (h s1) (w s2) k", h=math.isqrt(tokens.shape[1]), s1=s, s2=s)

    def losses_and_accuracies(self, tokens: torch.Tensor, labels: SceneLabels) -> tuple[torch.Tensor, dict[str, float]]:
        """tokens (B, h*w, D) -> summed cross-entropy and per-task accuracy."""
        pooled = tokens.mean(1)  # (B, D)
        logits = {
            "cell_color": self._cell_logits(self.cell_color, tokens),
            "cell_shape": self._cell_logits(self.cell_shape, tokens),
            "count": self.count(pooled),
            "background": self.background(pooled),
            "texture": self.texture(pooled),
            "style": self.style(pooled),
        }
        # Most cells are background: the cells that show an object get a cross-entropy of their own (averaged
        # over them alone), or the dense heads learn "background" and little about shapes.
        on_objects = labels.cell_shape != len(SHAPES)  # (B, h*s, w*s)
        total = tokens.new_zeros(())
        accuracies = {}
        for name, task_logits in logits.items():
            target = getattr(labels, name)
            total = total + F.cross_entropy(task_logits.flatten(0, -2), target.flatten())
            correct = task_logits.argmax(-1) == target
            accuracies[name] = correct.float().mean().item()
            if name.startswith("cell_") and on_objects.any():
                total = total + F.cross_entropy(task_logits[on_objects], target[on_objects])
                accuracies[f"{name}_on_objects"] = correct[on_objects].float().mean().item()
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
    train_images, train_labels = render_pool(config.num_train_scenes, config.seed, config)
    val_images, val_labels = render_pool(config.num_val_scenes, config.seed + 1_000_003, config)
    log(f"rendered {config.num_train_scenes} + {config.num_val_scenes} scenes in {time.time() - started:.0f}s")

    encoder = build_backbone(config)
    heads = ShapesProbeHeads(config.hidden_size, config.subpatch_grid)
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
        for name in ("cell_color", "cell_shape"):
            dense = getattr(labels, name)
            setattr(labels, name, torch.where(flip.view(-1, 1, 1), dense.flip(-1), dense))
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
