"""`unimm train`: flow-matching training of the generator for text-to-image or editing.

The frozen tokenizer encodes images on the fly (or a latent cache replaces it) and is never handed to
accelerate/DeepSpeed, so ZeRO partitions only the generator. Everything random in a step (caption and image
dropout, timesteps, noise) comes from a generator seeded by (seed, step, rank), so a resumed run continues
exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from data.config import DataConfig
from unimm.errors import UserError
from unimm.flow import flow_matching_loss, interpolate, training_shift, training_timesteps, velocity_target
from unimm.models.backbone import encode_text, load_text_tokenizer
from unimm.models.generator import UnimmGenerator
from unimm.models.sequence import SampleSpec, build_layout
from unimm.train_config import GeneratorTrainingConfig
from unimm.training.hard_negatives import CaptionNegatives, caption_contrast_loss, per_sample_flow_loss

PIPELINE_DIR = "pipeline"


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    from data.loader import hash_seed

    return torch.Generator(device=device).manual_seed(hash_seed(seed, step, rank, 7))


def learning_rate_at(config: GeneratorTrainingConfig, step: int) -> float:
    from unimm.training.schedule import scheduled_lr

    train = config.train
    return scheduled_lr(
        step, train.learning_rate, train.lr_schedule, train.warmup_steps, train.steps, train.min_lr_ratio, train.cooldown_steps
    )


def load_frozen_tokenizer(path: str):
    from tokenizer.model import SemanticAutoencoder

    if not path:
        raise UserError("no tokenizer; pass tokenizer=<directory written by unimm train-tokenizer, e.g. runs/mini-psvae/tokenizer>")
    if not Path(path).expanduser().is_dir():
        raise UserError(
            f"tokenizer '{path}' is not a directory; training needs trained tokenizer weights "
            f"(unimm train-tokenizer --config <preset>, then tokenizer=<run>/tokenizer)"
        )
    tokenizer = SemanticAutoencoder.from_pretrained(Path(path).expanduser())
    if int(tokenizer.latent_statistics_count.item()) == 0:
        raise UserError(f"tokenizer '{path}' has no latent statistics; it was not finalised by unimm train-tokenizer")
    tokenizer.requires_grad_(False)
    return tokenizer.eval()


class GeneratorTrainer:
    def __init__(self, config: GeneratorTrainingConfig, resume: bool = True):
        from unimm.training.distributed import build_accelerator

        self.config = config
        train = config.train
        self.output_dir = Path(config.output_dir)
        if train.task not in ("text_to_image", "edit"):
            raise UserError(f"train.task must be text_to_image or edit, got {train.task!r}")
        try:
            learning_rate_at(config, 0)  # a bad schedule (e.g. cooldown_steps > steps) fails now, not at its first step
        except ValueError as error:
            raise UserError(f"train.lr_schedule: {error}") from None
        # Before the accelerator: under ZeRO-3 transformers would partition models built after it.
        self.tokenizer = load_frozen_tokenizer(config.tokenizer)
        channels, height, width = self.tokenizer.latent_shape
        model_config = config.model
        if model_config.latent_channels == 0:
            model_config.latent_channels = channels
        elif model_config.latent_channels != channels:
            raise UserError(f"model.latent_channels={model_config.latent_channels} but the tokenizer's latents have {channels} channels")
        patch = model_config.latent_patch_size
        if height % patch or width % patch:
            raise UserError(f"the tokenizer's {height}x{width} latent grid is not divisible by model.latent_patch_size={patch}")
        self.shift = train.shift or training_shift(channels, patch)
        self.text_tokenizer = load_text_tokenizer(model_config.backbone.name_or_path)
        contrast = train.caption_contrast
        self.caption_negatives = None
        if contrast.weight < 0 or contrast.sharpness <= 0:
            raise UserError("train.caption_contrast needs weight >= 0 and sharpness > 0")
        if contrast.weight > 0:
            if train.task != "text_to_image":
                raise UserError("train.caption_contrast is a text-to-image term; set train.caption_contrast.weight=0 for editing")
            try:
                self.caption_negatives = CaptionNegatives(contrast.swap_pairs, contrast.exchange_classes)
            except ValueError as error:
                raise UserError(f"train.caption_contrast: {error}") from None
            if self.caption_negatives.swap_pattern is None and not self.caption_negatives.class_patterns:
                raise UserError("train.caption_contrast.weight > 0 but no swap_pairs or exchange_classes to build negatives from")

        self.accelerator = build_accelerator(
            mixed_precision=train.mixed_precision,
            deepspeed_config=train.deepspeed_config or None,
            log_dir=self.output_dir / "logs",
            micro_batch_size=train.batch_size,
            gradient_clipping=train.grad_clip,
        )
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.tokenizer.to(self.device)

        torch.manual_seed(train.seed)  # identical new layers on every rank
        model = UnimmGenerator.build(model_config)
        if train.init_from:
            self._initialise_from(model, train.init_from)
        if train.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        from unimm.training.ema import ExponentialMovingAverage

        self.ema = ExponentialMovingAverage(self.unwrapped, decay=train.ema_decay, warmup=train.ema_warmup)
        self.loader = self._build_loader()
        self.step = 0
        self.stopped_by_time_limit = False
        if resume:
            self._maybe_resume()

    # ------------------------------------------------------------------------------------ set-up
    @property
    def unwrapped(self) -> UnimmGenerator:
        return self.accelerator.unwrap_model(self.model)

    def _initialise_from(self, model: UnimmGenerator, source: str) -> None:
        """Editing starts from a text-to-image checkpoint: a pipeline/generator directory or a run directory."""
        from unimm.models.generator import CONFIG_FILE

        path = Path(source).expanduser()
        for candidate in (path, path / PIPELINE_DIR):
            if (candidate / CONFIG_FILE).is_file():
                from unimm.models.generator import ZERO_INITIALISED_PREFIXES

                source_model = UnimmGenerator.from_pretrained(candidate)
                loaded = source_model.state_dict()
                # text_blind_layers changes what the weights compute without changing a single parameter, so a
                # mismatch loads cleanly; it is how a text-blind fine-tune starts, and by mistake it is a silent
                # change of the model, so say it.
                source_blind, own_blind = source_model.config.text_blind_layers, model.config.text_blind_layers
                if source_blind != own_blind and self.is_main:
                    print(f"note: train.init_from='{source}' was trained with model.text_blind_layers={source_blind}, this run "
                          f"uses {own_blind} (set model.text_blind_layers={source_blind} to keep its behaviour)", flush=True)
                own = model.state_dict()
                # A part this model adds that starts at zero (text_summary) leaves the loaded model's predictions as they were.
                missing = [name for name in own if name not in loaded and not name.startswith(ZERO_INITIALISED_PREFIXES)]
                unexpected = [name for name in loaded if name not in own]
                resized = [name for name in loaded if name in own and loaded[name].shape != own[name].shape]
                if missing or unexpected or resized:
                    raise UserError(
                        f"train.init_from='{source}' does not fit this model's architecture (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, other shapes {resized[:3]}); use the model.* settings it was trained with"
                    )
                self._check_same_vocabulary(candidate, source)
                model.load_state_dict(loaded, strict=False)
                return
        raise UserError(f"train.init_from='{source}' holds no saved generator ({CONFIG_FILE}); point it at a finished text-to-image run")

    def _check_same_vocabulary(self, directory: Path, source: str) -> None:
        """A pipeline saved with another text tokenizer would have its embedding rows read under other token ids:
        the run would start from scrambled text without any error. (A bare generator directory has no tokenizer.)"""
        if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            return
        if load_text_tokenizer(str(directory)).get_vocab() != self.text_tokenizer.get_vocab():
            raise UserError(
                f"train.init_from='{source}' was trained with another text vocabulary than "
                f"model.backbone.name_or_path='{self.config.model.backbone.name_or_path}'; use the text model it was trained with"
            )

    def _build_loader(self):
        from data.datasets import build_dataset
        from data.index import expand_shards
        from data.latent_cache import LatentCacheDataset, is_latent_cache
        from data.loader import ResumableLoader

        train = self.config.train
        patterns = [pattern for pattern in train.data.split(",") if pattern]
        if not patterns:
            raise UserError("no training data; pass train.data=<shards, directories or globs (comma-separated), or a latent cache>")
        if len(patterns) == 1 and is_latent_cache(patterns[0]):
            dataset = LatentCacheDataset(patterns[0], seed=train.seed)
            if dataset.kind != train.task:
                raise UserError(f"latent cache {patterns[0]} holds {dataset.kind} samples but train.task={train.task}")
            # A cache keeps the captions of the fields it was written with and training draws among all of them,
            # so train.caption_fields cannot narrow them down: a silent mismatch would train on other captions.
            if dataset.caption_fields is not None and dataset.caption_fields != list(train.caption_fields):
                raise UserError(
                    f"latent cache {patterns[0]} holds the captions of {dataset.caption_fields} but train.caption_fields="
                    f"{list(train.caption_fields)}; set train.caption_fields to the cache's fields or write a cache "
                    "with `unimm cache-latents ... caption_fields=[...]`"
                )
            cached_shape = tuple(dataset.latent_shape)
            if cached_shape != tuple(self.tokenizer.latent_shape):
                raise UserError(f"latent cache shape {cached_shape} does not match the tokenizer's {tuple(self.tokenizer.latent_shape)}")
            data_config = DataConfig(seed=train.seed, batch_size=train.batch_size, num_workers=train.num_workers, drop_last=True)
        else:
            data_config = DataConfig(
                format=train.data_format,
                shards=[str(path) for path in expand_shards(patterns, train.data_format)],
                kind=train.task,
                image_fields=list(train.image_fields),
                caption_fields=list(train.caption_fields),
                resolution=self.tokenizer.config.image_size,
                seed=train.seed,
                batch_size=train.batch_size,
                num_workers=train.num_workers,
                drop_last=True,
            )
            dataset = build_dataset(data_config)
        return ResumableLoader(dataset, data_config, rank=self.rank, world_size=self.world_size, infinite=True)

    def _maybe_resume(self) -> None:
        from unimm.training.state import find_latest_checkpoint, load_training_state

        checkpoint = find_latest_checkpoint(self.output_dir)
        if checkpoint is None:
            return
        state = load_training_state(checkpoint, models={"model": self.unwrapped}, optimizers={"model": self.optimizer}, ema={"model": self.ema})
        if state.loader_state is not None:
            self.loader.load_state_dict(state.loader_state)
        self.step = state.step
        if self.is_main:
            print(f"resumed from {checkpoint} at step {self.step}", flush=True)

    # ---------------------------------------------------------------------------------- one step
    @torch.no_grad()
    def latents_of(self, batch: dict, image_key: str, latent_key: str) -> torch.Tensor:
        """Normalised latents (B, C, h, w): from the cache, or encoded now by the frozen tokenizer."""
        if latent_key in batch:
            latents = batch[latent_key].to(self.device).float()
        else:
            latents = self.tokenizer.encode(batch[image_key].to(self.device)).float()
        return self.tokenizer.normalize_latents(latents)

    def compute_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        train = self.config.train
        random = step_generator(train.seed, step, self.rank, "cpu")
        if train.task == "edit":
            clean = self.latents_of(batch, "edited_image", "edited_latent")
            source = self.latents_of(batch, "source_image", "source_latent")
            texts = list(batch["instruction"])
        else:
            clean, source = self.latents_of(batch, "image", "latent"), None
            texts = list(batch["caption"])
        size = len(clean)
        keep_text = torch.rand(size, generator=random) >= train.caption_dropout
        keep_image = torch.rand(size, generator=random) >= train.image_dropout if source is not None else torch.zeros(size, dtype=torch.bool)
        texts = [text if keep else "" for text, keep in zip(texts, keep_text.tolist())]
        t = training_timesteps(size, self.shift, train.timestep_mean, train.timestep_std, generator=random)
        noise = torch.randn(clean.shape, generator=random)
        t, noise = t.to(self.device), noise.to(self.device)
        text_ids = encode_text(self.text_tokenizer, texts, self.config.model.backbone.max_text_tokens)
        specs = [SampleSpec(ids, has_clean_image=bool(keep)) for ids, keep in zip(text_ids, keep_image.tolist())]
        grid = tuple(dimension // self.config.model.latent_patch_size for dimension in clean.shape[-2:])
        layout = build_layout(specs, grid).to(self.device)
        clean_inputs = source[keep_image.to(self.device)] if source is not None and keep_image.any() else None
        noisy = interpolate(clean, noise, t)
        velocity = self.model(layout, noisy, t, clean_inputs)
        loss = flow_matching_loss(velocity, clean, noise)
        metrics = {"text_dropped": float((~keep_text).float().mean()), "mean_t": float(t.mean())}
        if self.caption_negatives is not None:
            contrast = self._caption_contrast(texts, noisy, t, velocity, clean, noise, grid, random)
            if contrast is not None:
                if contrast[1]:
                    metrics["flow_loss"] = float(loss.detach())
                loss = loss + train.caption_contrast.weight * contrast[0]
                metrics.update(contrast[1])
        return loss, metrics

    def _caption_contrast(self, texts, noisy, t, velocity, clean, noise, grid, random):
        """The caption-contrast term on the samples with a hard negative: the same noisy latents under the negative
        caption; None when the batch has none (hard_negatives.py)."""
        negatives = self.caption_negatives.sample(texts, random)
        chosen = [index for index, negative in enumerate(negatives) if negative is not None]
        placeholder = not chosen
        if placeholder:
            if self.world_size == 1:
                return None
            # Every rank must run the same number of forward passes (ZeRO-3 gathers parameters in each), so a rank
            # whose batch has no negative runs one sample under its own caption and adds the term times 0.
            chosen, negatives = [0], [texts[0]] + negatives[1:]
        rows = torch.tensor(chosen, device=noisy.device)
        negative_ids = encode_text(self.text_tokenizer, [negatives[i] for i in chosen], self.config.model.backbone.max_text_tokens)
        layout = build_layout([SampleSpec(ids) for ids in negative_ids], grid).to(self.device)
        negative_velocity = self.model(layout, noisy[rows], t[rows])
        target = velocity_target(clean[rows], noise[rows])
        loss_true = per_sample_flow_loss(velocity[rows], target)
        loss_negative = per_sample_flow_loss(negative_velocity, target)
        contrast = caption_contrast_loss(loss_true, loss_negative, self.config.train.caption_contrast.sharpness)
        if placeholder:
            return contrast * 0.0, {}
        return contrast, {
            "contrast": float(contrast.detach()),
            "negative_fraction": len(chosen) / len(texts),
            "negative_margin": float((loss_negative - loss_true).mean().detach()),
        }

    # ---------------------------------------------------------------------------------- the loop
    def train(self, max_steps: int | None = None) -> list[dict]:
        from unimm.training.loop import log_record, open_run, optimizer_update, set_learning_rate

        train = self.config.train
        logger = open_run(self.config, self.output_dir, self.is_main, train.steps, self.step)
        stop = train.steps if max_steps is None else min(train.steps, self.step + max_steps)
        records = []
        iterator = iter(self.loader)
        started = time.time()
        self.model.train()
        while self.step < stop:
            batch = next(iterator)
            learning_rate = learning_rate_at(self.config, self.step)
            set_learning_rate(self.optimizer, learning_rate)
            loss, terms = self.compute_loss(batch, self.step)
            grad_norm = optimizer_update(self.accelerator, self.model, self.optimizer, loss, train.grad_clip)
            self.ema.update(self.unwrapped)
            self.step += 1
            record = {"step": self.step, "loss": loss.item(), "lr": learning_rate, "grad_norm": grad_norm, **terms}
            records.append(record)
            logger.progress(1, loss=f"{record['loss']:.4f}")
            if self.step % train.log_every == 0 or self.step == stop:
                log_record(logger, record, started)
            if train.sample_every and (self.step % train.sample_every == 0 or self.step == train.steps):
                self.log_samples(logger)
            if train.time_limit_minutes and self.step % train.log_every == 0 and self._out_of_time(started):
                logger.write(f"time limit of {train.time_limit_minutes} min reached at step {self.step}: finishing here")
                stop = self.step
                self.stopped_by_time_limit = True
            if self.step % train.checkpoint_every == 0 or self.step == stop:
                self.save_checkpoint()
        logger.flush()
        if self.step >= train.steps or self.stopped_by_time_limit:
            self.finalize()
        return records

    def _out_of_time(self, started: float) -> bool:
        """The same verdict on every process (the main process's clock decides), so all stop at one step."""
        over = torch.tensor([float(time.time() - started > 60.0 * self.config.train.time_limit_minutes)], device=self.device)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            over = broadcast(over, from_process=0)
        return bool(over.item())

    def save_checkpoint(self) -> None:
        from unimm.training.state import save_training_state

        save_training_state(
            self.output_dir,
            step=self.step,
            models={"model": self.unwrapped},
            optimizers={"model": self.optimizer},
            ema={"model": self.ema},
            loader_state=self.loader.state_dict(),
            keep_last=self.config.train.keep_checkpoints,
        )

    def pipeline(self):
        """A pipeline over the live (unwrapped) model: for sample grids inside `ema.average_parameters`."""
        from unimm.pipeline import UnimmPipeline

        return UnimmPipeline(self.unwrapped, self.text_tokenizer, self.tokenizer, self.config.sampling, self.config.model.backbone.max_text_tokens)

    @torch.no_grad()
    def log_samples(self, logger) -> None:
        """A grid of EMA samples for the configured prompts (text-to-image runs)."""
        if not self.is_main or self.config.train.task != "text_to_image" or not self.config.train.sample_prompts:
            return
        from unimm.training.ema import is_zero3_partitioned

        if is_zero3_partitioned(list(self.unwrapped.parameters())):
            # Sampling on one rank would gather sharded weights alone and hang; sample from the saved pipeline instead.
            logger.write(f"step {self.step}: no sample grid under ZeRO-3 (sample from {self.output_dir / PIPELINE_DIR} after training)")
            return
        from torchvision.transforms.functional import pil_to_tensor

        from unimm.training.logging import save_image_grid

        model = self.unwrapped
        was_training = model.training
        model.eval()
        with self.ema.average_parameters(model):
            images = self.pipeline()(list(self.config.train.sample_prompts), steps=self.config.train.sample_steps, seed=0)
        model.train(was_training)
        grid = torch.stack([pil_to_tensor(image).float() / 127.5 - 1 for image in images])
        logger.log_images("samples_ema", grid, self.step, nrow=len(images))
        save_image_grid(grid, self.output_dir / "samples" / f"step-{self.step:07d}.png", columns=len(images))

    def finalize(self) -> Path | None:
        """Write the EMA generator, the text tokenizer and the image tokenizer as one pipeline directory."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        destination = self.output_dir / PIPELINE_DIR
        from unimm.export.checkpoint import ema_generator_state

        # The EMA shadow is a full fp32 copy on every rank, also under ZeRO-3 where the live weights are sharded.
        state = ema_generator_state(self.unwrapped, self.ema.shadow, self.ema.buffers)  # persistent entries only
        self.pipeline().save_pretrained(destination, generator_state=state)
        print(f"saved the EMA pipeline to {destination}", flush=True)
        return destination
