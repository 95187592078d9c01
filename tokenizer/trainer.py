"""`unimm train-tokenizer`: the staged trainer shared by every tokenizer preset.

Stages run back to back on one global step counter:
- teacher (GAE only, `train.teacher_steps`): pre-train the semantic downsampler E_sp with its decoder D_sp
  by cosine feature distillation against the frozen VFM; E_sp is frozen afterwards.
- stage 1 (`train.stage1`): PS-VAE/S-AE with the representation encoder frozen; for PS-VAE the pixel
  decoder reads the detached latent (`detach_pixel_latent`). Single-stage presets (VAE, GAE, ReaLS, RAE)
  only have this stage.
- stage 2 (`train.stage2`): end to end (`train_encoder`), semantic / feature losses taken against a frozen
  copy of the original encoder (the teacher, reloaded from its pretrained weights).
- decoder (`train.decoder`): only the pixel decoder learns, on sampled latents of the fixed encoder; with
  `train.init_from` it fine-tunes a finished tokenizer without moving its latent space (the saved latent
  statistics are kept), so generators trained on that tokenizer decode better without retraining.

One optimizer holds every parameter of the model for the whole run (so DeepSpeed sees a fixed set);
parts that are frozen in a stage simply run without a graph and get no gradient. The discriminator has
its own optimizer outside DeepSpeed, its gradients averaged across ranks by hand.
The learning rate is a pure function of the step (warm-up at the start of each stage, then constant or
cosine), so an exact resume needs no scheduler state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_distributed

from data.config import DataConfig
from data.datasets import build_dataset
from data.loader import ResumableLoader
from eval.reconstruction import psnr_per_image
from tokenizer.config import StageConfig, TokenizerTrainingConfig
from tokenizer.encoders import RepresentationEncoder
from tokenizer.layers.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from tokenizer.losses import (
    LastLayerCapture,
    PerceptualLoss,
    adaptive_generator_weight_by_replay,
    adversarial_start_factor,
    alignment_loss,
    cosine_distillation_loss,
    gaussian_kl_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    pixel_reconstruction_loss,
    semantic_preservation_loss,
    semantic_reconstruction_loss,
    teacher_feature_loss,
)
from tokenizer.model import ENCODER_CONFIG_DIR, SemanticAutoencoder
from unimm.errors import UserError
from unimm.training.logging import save_image_grid

TOKENIZER_DIR = "tokenizer"


@dataclass
class StagePlan:
    name: str  # teacher | stage1 | stage2 | decoder
    start: int
    steps: int
    config: StageConfig


def stage_plan(config: TokenizerTrainingConfig) -> list[StagePlan]:
    from unimm.training.schedule import scheduled_lr

    train = config.train
    plan, start = [], 0
    if train.teacher_steps:
        plan.append(StagePlan("teacher", start, train.teacher_steps, StageConfig(steps=train.teacher_steps, learning_rate=train.stage1.learning_rate)))
        start += train.teacher_steps
    for name in ("stage1", "stage2", "decoder"):
        stage = getattr(train, name)
        if stage.steps:
            plan.append(StagePlan(name, start, stage.steps, stage))
            start += stage.steps
    if not plan:
        raise UserError("the schedule has no steps; set train.stage1.steps, train.stage2.steps and/or train.decoder.steps")
    model = config.model
    # PS-VAE's stage 1 detaches the pixel path because its latent learns from the semantic losses. Only some losses
    # reach the latent (`compute_losses`): PS-VAE's L_s through its semantic decoder, GAE's semantic preservation
    # and ReaLS's alignment, both on the posterior mean. S-AE's teacher term acts on the encoder's tokens, upstream
    # of the latent projection, and a VAE's pixel encoder has no other loss: detached, such a latent would learn
    # from the KL term alone (and collapse to the prior) or from nothing.
    # All three need the representation encoder (as the backbone for PS-VAE, as the teacher for GAE and ReaLS).
    latent_has_semantic_loss = {
        "psvae": config.loss.semantic_weight > 0 and model.semantic.decoder and model.encoder.role == "backbone",
        "gae": config.loss.semantic_preservation_weight > 0 and model.encoder.role != "none",
        "reals": config.loss.alignment_weight > 0 and model.encoder.role != "none",
    }.get(model.family, False)
    # RAE's latent is the frozen encoder's features: with nothing to learn before the latent, detaching is harmless
    # (unless a stage trains the encoder).
    latent_is_frozen_features = (model.encoder.role == "backbone" and model.family != "psvae"
                                 and model.latent.bottleneck != "gaussian")
    for stage in plan:  # a bad schedule (e.g. cooldown_steps longer than a stage) fails now, not when the stage starts
        latent_is_learned = not latent_is_frozen_features or stage.config.train_encoder
        if stage.config.detach_pixel_latent and stage.name != "decoder" and latent_is_learned and not latent_has_semantic_loss:
            raise UserError(
                f"train.{stage.name}.detach_pixel_latent is on, but no semantic loss reaches this {model.family} model's "
                f"latent, which would learn from the KL term alone; set train.{stage.name}.detach_pixel_latent=false"
            )
        try:
            scheduled_lr(0, 1.0, train.lr_schedule, train.warmup_steps, stage.steps, train.min_lr_ratio, train.cooldown_steps)
        except ValueError as error:
            raise UserError(f"train.lr_schedule in stage {stage.name}: {error}") from None
    return plan


def stage_at(plan: list[StagePlan], step: int) -> StagePlan:
    for stage in plan:
        if step < stage.start + stage.steps:
            return stage
    return plan[-1]


def learning_rate_at(config: TokenizerTrainingConfig, plan: list[StagePlan], step: int) -> float:
    """Warm-up at the start of every stage, then constant or cosine (over the stage) towards min_lr_ratio."""
    from unimm.training.schedule import scheduled_lr

    stage = stage_at(plan, step)
    train = config.train
    return scheduled_lr(
        step - stage.start, stage.config.learning_rate, train.lr_schedule, train.warmup_steps, stage.steps, train.min_lr_ratio,
        train.cooldown_steps,
    )


def image_data_config(config: TokenizerTrainingConfig, shards: str, shuffle: bool = True, batch_size: int | None = None) -> DataConfig:
    from data.index import expand_shards

    patterns = [pattern for pattern in shards.split(",") if pattern]
    if not patterns:
        raise UserError("no training data; pass train.data=<shard files, directories or globs, comma-separated>")
    paths = expand_shards(patterns, config.train.data_format)
    return DataConfig(
        format=config.train.data_format,
        shards=[str(path) for path in paths],
        kind="image",
        image_fields=config.train.image_field.split(";"),
        resolution=config.model.image_size,
        seed=config.train.seed,
        shuffle=shuffle,
        batch_size=batch_size or config.train.batch_size,
        num_workers=config.train.num_workers,
        drop_last=True,
    )


def load_tokenizer_weights(model: SemanticAutoencoder, directory: str) -> None:
    """Start `model` from a saved tokenizer (weights and latent statistics); its architecture must match."""
    source = SemanticAutoencoder.from_pretrained(directory)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(f"train.init_from='{directory}' does not fit this preset's model ({first}); start from the preset it was trained with") from None


class TokenizerTrainer:
    def __init__(self, config: TokenizerTrainingConfig, resume: bool = True):
        from accelerate.utils import DistributedDataParallelKwargs

        from unimm.training.distributed import build_accelerator

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.plan = stage_plan(config)
        self.total_steps = self.plan[-1].start + self.plan[-1].steps
        train = config.train
        self.accelerator = build_accelerator(
            mixed_precision=train.mixed_precision,
            deepspeed_config=train.deepspeed_config or None,
            log_dir=self.output_dir / "logs",
            micro_batch_size=train.batch_size,
            gradient_clipping=train.grad_clip,
            # Plain DDP (no DeepSpeed): stage 1 leaves the frozen encoder without gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(train.seed)  # identical initial weights on every rank

        # init_from replaces every weight, so the encoder config saved in that tokenizer is all the backbone needs.
        saved_encoder = Path(train.init_from) / ENCODER_CONFIG_DIR if train.init_from else None
        model = SemanticAutoencoder.build(config.model, encoder_config_dir=saved_encoder if saved_encoder and saved_encoder.is_dir() else None)
        if train.init_from:
            load_tokenizer_weights(model, train.init_from)
        # Only a decoder-stage schedule started from a finished tokenizer keeps that tokenizer's latent space.
        self.keeps_latent_space = bool(train.init_from) and all(stage.name == "decoder" for stage in self.plan)
        self.encoder_kind = model.backbone.kind if model.backbone is not None else ""
        self.teacher = self._build_teacher()
        self.perceptual = None
        if config.loss.perceptual_weight > 0:
            backbone = config.loss.perceptual_backbone
            if backbone == "random":  # tests only: LPIPS heads on an untrained VGG16
                self.perceptual = PerceptualLoss(random_backbone=True).to(self.device)
            else:
                self.perceptual = PerceptualLoss(backbone or None).to(self.device)
        self.discriminator = self.discriminator_optimizer = None
        if config.loss.adversarial_weight > 0 and config.loss.adversarial_start_step < self.total_steps:
            self.discriminator = PatchDiscriminator(
                PatchDiscriminatorConfig(
                    base_channels=config.loss.discriminator_channels,
                    num_layers=config.loss.discriminator_layers,
                    norm=config.loss.discriminator_norm,
                )
            ).to(self.device)
            self.discriminator_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=train.discriminator_learning_rate,
                betas=(train.adam_beta1, train.adam_beta2), weight_decay=0.0,
            )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.plan[0].config.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.weight_decay,
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.last_layer_capture = LastLayerCapture(self.unwrapped.last_decoder_layer) if self.discriminator is not None else None
        from unimm.training.ema import ExponentialMovingAverage

        self.ema = ExponentialMovingAverage(self.unwrapped, decay=train.ema_decay, warmup=train.ema_warmup)

        data_config = image_data_config(config, train.data)
        self.loader = ResumableLoader(build_dataset(data_config), data_config, rank=self.rank, world_size=self.world_size, infinite=True)
        self.preview_images = self._preview_batch()
        self.step = 0
        if resume:
            self._maybe_resume()

    # ------------------------------------------------------------------------------------ set-up
    @property
    def unwrapped(self) -> SemanticAutoencoder:
        return self.accelerator.unwrap_model(self.model)

    def _needs_teacher(self) -> bool:
        config, loss = self.config, self.config.loss
        if config.model.encoder.role == "teacher":
            return True
        stage2 = config.train.stage2
        if not stage2.steps or not stage2.train_encoder:
            return False  # a frozen backbone is its own teacher
        teacher_weight = stage2.teacher_feature_weight if stage2.teacher_feature_weight >= 0 else loss.teacher_feature_weight
        return loss.semantic_weight > 0 or teacher_weight > 0

    def _build_teacher(self) -> RepresentationEncoder | None:
        if not self._needs_teacher():
            return None
        encoder = self.config.model.encoder
        try:
            teacher = RepresentationEncoder.from_pretrained(encoder.name_or_path, kind=encoder.kind or None, image_size=encoder.image_size)
        except OSError as error:
            raise UserError(f"cannot load the teacher encoder '{encoder.name_or_path}' ({error.__class__.__name__}); pass a local directory") from None
        teacher.requires_grad_(False)
        return teacher.eval().to(self.device)

    def _preview_batch(self) -> torch.Tensor:
        """A fixed batch of held-out (or, without val data, training) images for grids and quick PSNR."""
        shards = self.config.train.val_data or self.config.train.data
        data_config = image_data_config(self.config, shards, shuffle=False, batch_size=8)
        loader = ResumableLoader(build_dataset(data_config), data_config)
        return next(iter(loader))["image"]

    def _maybe_resume(self) -> None:
        from unimm.training.state import find_latest_checkpoint, load_training_state

        checkpoint = find_latest_checkpoint(self.output_dir)
        if checkpoint is None:
            return
        state = load_training_state(
            checkpoint, models=self._models(), optimizers=self._optimizers(), ema={"model": self.ema}
        )
        if state.loader_state is not None:
            self.loader.load_state_dict(state.loader_state)
        self.step = state.step
        if self.is_main:
            print(f"resumed from {checkpoint} at step {self.step}", flush=True)

    def _models(self) -> dict:
        models = {"model": self.unwrapped}
        if self.discriminator is not None:
            models["discriminator"] = self.discriminator
        return models

    def _optimizers(self) -> dict:
        optimizers = {"model": self.optimizer}
        if self.discriminator_optimizer is not None:
            optimizers["discriminator"] = self.discriminator_optimizer
        return optimizers

    # ---------------------------------------------------------------------------------- one step
    def _stage_weight(self, stage: StageConfig, name: str) -> float:
        value = getattr(stage, name)
        return value if value >= 0 else getattr(self.config.loss, name)

    def pixel_terms(self, reconstruction: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted pixel and perceptual terms of L_p (the adversarial term is added by the caller)."""
        loss = self.config.loss
        terms = {"pixel": pixel_reconstruction_loss(reconstruction, images, loss.pixel_kind) * loss.pixel_weight}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, images) * loss.perceptual_weight
        return terms

    def compute_losses(self, images: torch.Tensor, stage: StagePlan, step: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
        """Generator-side loss of one batch; returns (loss, logged terms, reconstruction for the discriminator)."""
        loss_config = self.config.loss
        family = self.config.model.family
        if stage.name == "teacher":
            with torch.no_grad():
                teacher_tokens = self.teacher.patch_tokens(images)
            outputs = self.model(images, teacher_tokens=teacher_tokens, teacher_stage=True)
            loss = cosine_distillation_loss(outputs["teacher_reconstruction"], teacher_tokens)
            return loss, {"teacher_cosine": loss.item()}, None

        teacher_tokens = teacher_global = None
        if stage.name == "decoder":
            terms = self.pixel_terms(self.model(images, sample=True, decoder_only=True)["reconstruction"], images)
            return sum(terms.values()), {name: value.item() for name, value in terms.items()}, None
        if self.teacher is not None and (stage.config.train_encoder or self.config.model.encoder.role == "teacher"):
            with torch.no_grad():
                teacher_tokens, teacher_global = self.teacher.patch_and_global_tokens(images)
        outputs = self.model(
            images,
            sample=True,
            detach_pixel_latent=stage.config.detach_pixel_latent,
            train_backbone=stage.config.train_encoder,
            teacher_tokens=teacher_tokens,
        )
        reconstruction = outputs["reconstruction"]
        terms: dict[str, torch.Tensor] = {}

        # L_p: the LDM recipe (pixel + perceptual + adversarial with the adaptive weight and a delayed start).
        terms.update(self.pixel_terms(reconstruction, images))
        pixel_total = sum(terms.values())
        factor = adversarial_start_factor(step, loss_config.adversarial_start_step) if self.discriminator is not None else 0.0
        if factor > 0:
            self.discriminator.requires_grad_(False)
            generator = generator_adversarial_loss(self.discriminator(reconstruction))
            weight = torch.tensor(1.0, device=images.device)
            if loss_config.adaptive_adversarial_weight:
                weight = adaptive_generator_weight_by_replay(
                    self.last_layer_capture,
                    self.unwrapped.pixel_decoder.last_output_to_image,
                    lambda image: sum(self.pixel_terms(image, images).values()),
                    lambda image: generator_adversarial_loss(self.discriminator(image)),
                )
            self.discriminator.requires_grad_(True)
            terms["adversarial"] = factor * loss_config.adversarial_weight * weight * generator
            pixel_total = pixel_total + terms["adversarial"]

        semantic_group, pixel_group = loss_config.group_weights(self.encoder_kind)
        total = pixel_group * pixel_total

        kl_weight = self._stage_weight(stage.config, "kl_weight")
        semantic_total = torch.zeros((), device=images.device)
        if "logvar" in outputs and kl_weight > 0:
            terms["kl"] = gaussian_kl_loss(outputs["mean"], outputs["logvar"]) * kl_weight
            semantic_total = semantic_total + terms["kl"]
        if family == "psvae" and loss_config.semantic_weight > 0 and "semantic_reconstruction" in outputs:
            # Stage 1: the frozen encoder's own tokens are the original features. Stage 2: the frozen teacher's;
            # both the fine-tuned encoder's features f'_h and the semantic decoder's f''_h are held to them.
            target = teacher_tokens if teacher_tokens is not None else outputs["encoder_tokens"].detach()
            semantic = semantic_reconstruction_loss(outputs["semantic_reconstruction"], target)["total"]
            if stage.config.train_encoder:
                semantic = semantic + semantic_reconstruction_loss(outputs["encoder_tokens"], target)["total"]
            terms["semantic"] = semantic * loss_config.semantic_weight
            semantic_total = semantic_total + terms["semantic"]
            if loss_config.linear_readout_weight > 0 and "linear_semantic_reconstruction" in outputs:
                readout = semantic_reconstruction_loss(outputs["linear_semantic_reconstruction"], target)["total"]
                terms["linear_readout"] = readout * loss_config.linear_readout_weight
                semantic_total = semantic_total + terms["linear_readout"]
        total = total + semantic_group * semantic_total

        teacher_weight = self._stage_weight(stage.config, "teacher_feature_weight")
        if family != "psvae" and teacher_weight > 0 and teacher_tokens is not None and "encoder_tokens" in outputs:
            terms["teacher_feature"] = teacher_feature_loss(outputs["encoder_tokens"], teacher_tokens) * teacher_weight
            total = total + terms["teacher_feature"]
        if "teacher_latent" in outputs and loss_config.semantic_preservation_weight > 0:
            terms["semantic_preservation"] = (
                semantic_preservation_loss(outputs["mean"], outputs["teacher_latent"]) * loss_config.semantic_preservation_weight
            )
            total = total + terms["semantic_preservation"]
        if "aligned_patches" in outputs and loss_config.alignment_weight > 0 and teacher_tokens is not None:
            align = alignment_loss(
                outputs["aligned_patches"], teacher_tokens, loss_config.alignment_cosine_weight, loss_config.alignment_smooth_weight
            ) + alignment_loss(
                outputs["aligned_cls"], teacher_global, loss_config.alignment_cosine_weight, loss_config.alignment_smooth_weight
            )
            terms["alignment"] = align * loss_config.alignment_weight
            total = total + terms["alignment"]
        logged = {name: value.item() for name, value in terms.items()}
        return total, logged, (reconstruction.detach() if factor > 0 else None)

    def discriminator_step(self, images: torch.Tensor, reconstruction: torch.Tensor, step: int) -> float:
        factor = adversarial_start_factor(step, self.config.loss.adversarial_start_step)
        loss = factor * hinge_discriminator_loss(self.discriminator(images), self.discriminator(reconstruction))
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1 and torch_distributed.is_initialized():
            for parameter in self.discriminator.parameters():  # data-parallel by hand: outside DeepSpeed
                if parameter.grad is not None:
                    torch_distributed.all_reduce(parameter.grad)
                    parameter.grad /= self.world_size
        torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.config.train.grad_clip or float("inf"))
        self.discriminator_optimizer.step()
        return loss.item()

    # ---------------------------------------------------------------------------------- the loop
    def train(self, max_steps: int | None = None) -> list[dict]:
        """Run to the end of the schedule (or `max_steps` more steps); returns the logged records."""
        from unimm.training.loop import log_record, open_run, optimizer_update, set_learning_rate

        train = self.config.train
        logger = open_run(self.config, self.output_dir, self.is_main, self.total_steps, self.step)
        stop = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        records = []
        iterator = iter(self.loader)
        started = time.time()
        self.model.train()
        while self.step < stop:
            stage = stage_at(self.plan, self.step)
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(self.loader)
                batch = next(iterator)
            images = batch["image"].to(self.device)
            learning_rate = learning_rate_at(self.config, self.plan, self.step)
            set_learning_rate(self.optimizer, learning_rate)
            loss, terms, reconstruction = self.compute_losses(images, stage, self.step)
            grad_norm = optimizer_update(self.accelerator, self.model, self.optimizer, loss, train.grad_clip)
            if reconstruction is not None:
                terms["discriminator"] = self.discriminator_step(images, reconstruction, self.step)
            self.ema.update(self.unwrapped)
            self.step += 1

            record = {"step": self.step, "stage": stage.name, "loss": loss.item(), "lr": learning_rate, "grad_norm": grad_norm, **terms}
            records.append(record)
            logger.progress(1, loss=f"{record['loss']:.4f}", stage=stage.name)
            if self.step % train.log_every == 0 or self.step == stop:
                log_record(logger, record, started)
            if train.image_every and (self.step % train.image_every == 0 or self.step == self.total_steps):
                self.log_reconstructions(logger)
            if self.step % train.checkpoint_every == 0 or self.step == stop:
                self.save_checkpoint()
        logger.flush()
        if self.step >= self.total_steps:
            self.finalize()
        return records

    def save_checkpoint(self) -> None:
        from unimm.training.state import save_training_state

        save_training_state(
            self.output_dir,
            step=self.step,
            models=self._models(),
            optimizers=self._optimizers(),
            ema={"model": self.ema},
            loader_state=self.loader.state_dict(),
            extra={"stage": stage_at(self.plan, max(self.step - 1, 0)).name},
            keep_last=self.config.train.keep_checkpoints,
        )

    @torch.no_grad()
    def log_reconstructions(self, logger) -> None:
        if not self.is_main:
            return
        model = self.unwrapped
        was_training = model.training
        model.eval()
        with self.ema.average_parameters(model):
            images = self.preview_images.to(self.device)
            reconstruction = model.decode(model.encode(images)).clamp(-1, 1)
        model.train(was_training)
        psnr = psnr_per_image((reconstruction + 1) / 2, (images + 1) / 2).mean().item()
        logger.log_scalars({"preview_psnr_ema": psnr}, self.step)
        grid = torch.cat([images, reconstruction]).cpu()
        logger.log_images("reconstructions_ema", grid, self.step, nrow=len(images))
        save_image_grid(grid, self.output_dir / "samples" / f"step-{self.step:07d}.png", columns=len(images))

    def finalize(self) -> Path | None:
        """Write the EMA tokenizer with exact latent statistics to `<output_dir>/tokenizer`."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        model = self.unwrapped
        model.eval()
        destination = self.output_dir / TOKENIZER_DIR
        with self.ema.average_parameters(model):
            if self.keeps_latent_space:
                count = int(model.latent_statistics_count)  # the encoder never moved: its statistics still hold
                note = f"latent space and statistics kept from {self.config.train.init_from}"
            else:
                mean, var, count = latent_statistics(model, self._statistics_batches(), self.device)
                model.set_latent_statistics(mean.float(), var.float(), count)
                note = f"latent statistics over {count} images"
            model.save_pretrained(destination)
        print(f"saved the EMA tokenizer to {destination} ({note})", flush=True)
        return destination

    def _statistics_batches(self):
        data_config = image_data_config(self.config, self.config.train.data, shuffle=False, batch_size=min(64, self.config.train.stats_images))
        loader = ResumableLoader(build_dataset(data_config), data_config)
        seen = 0
        for batch in loader:
            yield batch["image"]
            seen += len(batch["image"])
            if seen >= self.config.train.stats_images:
                return


@torch.no_grad()
def latent_statistics(model: SemanticAutoencoder, batches, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact per-channel mean and (population) variance of `encode` over all positions of all images (float64)."""
    total = total_squares = None
    count = 0
    images_seen = 0
    for images in batches:
        latents = model.encode(images.to(device)).double()  # (B, C, h, w)
        per_channel = latents.transpose(0, 1).flatten(1)  # (C, B*h*w)
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        squares = per_channel.pow(2).sum(1)
        total_squares = squares if total_squares is None else total_squares + squares
        count += per_channel.shape[1]
        images_seen += len(images)
    if not count:
        raise UserError("no images to compute latent statistics from")
    mean = total / count
    var = total_squares / count - mean.pow(2)
    return mean.cpu(), var.clamp_min(0).cpu(), images_seen
