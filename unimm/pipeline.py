"""`UnimmPipeline`: prompts (and input images) in, PIL images out.

A pipeline directory holds everything needed to sample:

    generator_config.json, generator.safetensors   the generator (backbone + embeddings + DDT head)
    tokenizer.json, tokenizer_config.json, ...     the text tokenizer (the backbone's)
    tokenizer/                                     the image tokenizer (semantic autoencoder) and its latent statistics
    pipeline.json                                  sampling defaults (steps, cfg, image_cfg, shift)

The text prefix (and, for editing, the clean input latents) goes through the backbone once per call; its KV
cache is reused by every denoising step, where only the noisy image tokens are run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unimm.errors import UserError
from unimm.flow import edit_guidance, euler_sample, sampling_timesteps, text_guidance
from unimm.models.sequence import SampleSpec, build_layout
from unimm.train_config import SamplingConfig

PIPELINE_FILE = "pipeline.json"
IMAGE_TOKENIZER_DIR = "tokenizer"


def _as_list(value, count: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise UserError(f"{name} has {len(values)} entries for {count} images")
    return values


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in array]


def from_pil(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) in [-1, 1], resized on the shorter side and center-cropped."""
    from data.transforms import resize_center_crop, to_tensor_minus1_1

    return torch.stack([to_tensor_minus1_1(resize_center_crop(image.convert("RGB"), size)) for image in images])


class UnimmPipeline:
    def __init__(self, generator, text_tokenizer, image_tokenizer, sampling: SamplingConfig | None = None, max_text_tokens: int = 128):
        self.generator = generator
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.sampling = sampling or SamplingConfig()
        self.max_text_tokens = max_text_tokens

    # ------------------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, device: str | torch.device | None = None,
                        attention: str | None = None) -> UnimmPipeline:
        """Load from a local pipeline directory or a hub repository id; with none, the shipped Shapes
        text-to-image model (`unimm.defaults`, which also has the editing one)."""
        from tokenizer.model import SemanticAutoencoder
        from unimm.config import apply_delta
        from unimm.defaults import default_model
        from unimm.models.backbone import load_text_tokenizer
        from unimm.models.generator import UnimmGenerator

        path = Path(name_or_path if name_or_path is not None else default_model("text_to_image")).expanduser()
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(str(name_or_path)))
            except Exception as error:  # offline, unknown repo, ...
                raise UserError(f"'{name_or_path}' is neither a pipeline directory nor a reachable hub repository ({error.__class__.__name__})") from None
        if not (path / PIPELINE_FILE).is_file():
            raise UserError(f"{path} is not a unimm pipeline (no {PIPELINE_FILE}); use the pipeline/ directory of a finished unimm train run")
        settings = json.loads((path / PIPELINE_FILE).read_text())
        generator = UnimmGenerator.from_pretrained(path, attention=attention).eval()
        image_tokenizer = SemanticAutoencoder.from_pretrained(path / settings.get("image_tokenizer", IMAGE_TOKENIZER_DIR)).eval()
        sampling = apply_delta(SamplingConfig(), settings.get("sampling", {}), source=str(path / PIPELINE_FILE))
        pipeline = cls(generator, load_text_tokenizer(str(path)), image_tokenizer, sampling, settings.get("max_text_tokens", 128))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return pipeline.to(device)

    def save_pretrained(self, directory: str | Path, generator_state: dict | None = None, image_tokenizer_path: str | None = None) -> Path:
        """`generator_state` replaces the generator's own weights (the trainer passes the EMA average).
        `image_tokenizer_path` (relative to `directory`) references an image tokenizer saved elsewhere, e.g. one
        shared by several pipelines, instead of writing a copy into ``tokenizer/``."""
        from unimm.atomic import atomic_write

        directory = Path(directory)
        self.generator.save_pretrained(directory, state_dict=generator_state)
        self.text_tokenizer.save_pretrained(str(directory))
        if image_tokenizer_path is None:
            self.image_tokenizer.save_pretrained(directory / IMAGE_TOKENIZER_DIR)
        settings = {"image_tokenizer": image_tokenizer_path or IMAGE_TOKENIZER_DIR, "sampling": asdict(self.sampling),
                    "max_text_tokens": self.max_text_tokens}
        atomic_write(directory / PIPELINE_FILE, lambda path: path.write_text(json.dumps(settings, indent=2) + "\n"))
        return directory

    def to(self, device) -> UnimmPipeline:
        self.generator.to(device)
        self.image_tokenizer.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    # ---------------------------------------------------------------------------------- helpers
    def encode_text(self, texts: list[str]) -> list[list[int]]:
        from unimm.models.backbone import encode_text

        return encode_text(self.text_tokenizer, texts, self.max_text_tokens)

    def latent_grid(self, size: int | None) -> tuple[int, int]:
        """Latent (h, w) for a square output of `size` pixels (default: the tokenizer's training size)."""
        channels, height, width = self.image_tokenizer.latent_shape
        native = self.image_tokenizer.config.image_size
        size = size or native
        factor = native // height
        patch = self.generator.config.latent_patch_size
        if size % (factor * patch):
            raise UserError(f"size {size} is not a multiple of {factor * patch} (the tokenizer's downsampling times the patch size)")
        return size // factor, size // factor

    def initial_noise(self, seeds: list[int], grid: tuple[int, int]) -> torch.Tensor:
        """One noise tensor per image from its own seed: an image does not depend on its batch-mates."""
        channels = self.image_tokenizer.latent_shape[0]
        noise = [torch.randn(channels, *grid, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
        return torch.stack(noise).to(self.device)

    def _denoise(self, specs: list[SampleSpec], groups: int, noise: torch.Tensor, clean: torch.Tensor | None, steps: int, shift: float, combine, use_kv_cache: bool) -> torch.Tensor:
        """Run `groups` conditioning variants of the same images in one batch and combine their velocities."""
        grid = (noise.shape[-2] // self.generator.config.latent_patch_size, noise.shape[-1] // self.generator.config.latent_patch_size)
        layout = build_layout(specs, grid).to(self.device)
        prefix = self.generator.encode_prefix(layout, clean) if use_kv_cache else None

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            batch_x, batch_t = x.repeat(groups, 1, 1, 1), t.repeat(groups)
            if use_kv_cache:
                predicted = self.generator.forward_cached(layout, prefix, batch_x, batch_t)
            else:
                predicted = self.generator(layout, batch_x, batch_t, clean)
            return combine(*predicted.float().chunk(groups))

        timesteps = sampling_timesteps(steps, shift, device=self.device)
        return euler_sample(velocity, noise, timesteps)

    def _decode(self, latents: torch.Tensor, output: str):
        images = self.image_tokenizer.decode(self.image_tokenizer.denormalize_latents(latents)).clamp(-1, 1)
        return images if output == "tensor" else to_pil(images)

    def _seeds(self, seed, count: int) -> list[int]:
        if isinstance(seed, (list, tuple)):
            return _as_list(seed, count, "seed")
        return [int(seed) + index for index in range(count)]

    # ---------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(self, prompts: str | list[str], steps: int | None = None, cfg: float | None = None, shift: float | None = None,
                 seed: int | list[int] = 0, size: int | None = None, use_kv_cache: bool = True, output: str = "pil"):
        """Text-to-image: one image per prompt. `seed` is an int (image i gets seed + i) or one seed per image."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = self.sampling
        steps, cfg, shift = steps or sampling.steps, sampling.cfg if cfg is None else cfg, sampling.shift if shift is None else shift
        noise = self.initial_noise(self._seeds(seed, len(prompts)), self.latent_grid(size))
        texts = prompts + ([""] * len(prompts) if cfg != 1 else [])
        specs = [SampleSpec(ids) for ids in self.encode_text(texts)]
        if cfg != 1:
            combine = lambda conditional, unconditional: text_guidance(conditional, unconditional, cfg)  # noqa: E731
            latents = self._denoise(specs, 2, noise, None, steps, shift, combine, use_kv_cache)
        else:
            latents = self._denoise(specs, 1, noise, None, steps, shift, lambda v: v, use_kv_cache)
        return self._decode(latents, output)

    @torch.no_grad()
    def edit(self, images, instructions: str | list[str], steps: int | None = None, cfg: float | None = None, image_cfg: float | None = None,
             shift: float | None = None, seed: int | list[int] = 0, use_kv_cache: bool = True, output: str = "pil"):
        """Edit each input image (PIL, or a (B, 3, H, W) tensor in [-1, 1]) by its instruction.

        Guidance uses three branches: image + instruction, image alone, neither (`edit_guidance`).
        """
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, torch.Tensor):
            images = from_pil(list(images), self.image_tokenizer.config.image_size)
        instructions = _as_list(instructions, len(images), "instructions")
        sampling = self.sampling
        steps = steps or sampling.steps
        cfg = sampling.cfg if cfg is None else cfg
        image_cfg = sampling.image_cfg if image_cfg is None else image_cfg
        shift = sampling.shift if shift is None else shift
        source = self.image_tokenizer.normalize_latents(self.image_tokenizer.encode(images.to(self.device)))
        count = len(source)
        noise = self.initial_noise(self._seeds(seed, count), tuple(source.shape[-2:]))
        ids = self.encode_text(list(instructions) + [""])
        empty = ids[-1]
        specs = [SampleSpec(text, True) for text in ids[:-1]] + [SampleSpec(empty, True)] * count + [SampleSpec(empty, False)] * count
        clean = torch.cat([source, source])

        def combine(full, image_only, unconditional):
            return edit_guidance(full, image_only, unconditional, cfg, image_cfg)

        latents = self._denoise(specs, 3, noise, clean, steps, shift, combine, use_kv_cache)
        return self._decode(latents, output)
