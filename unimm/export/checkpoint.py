"""A generator training checkpoint as a pipeline directory, to sample or evaluate a run before it ends.

A run writes its pipeline (``<run>/pipeline``, the EMA weights) only when it finishes. Its checkpoints
(``<run>/checkpoint-<step>/``) hold the same EMA average, the live weights and the optimizer state; this
module rebuilds the model from the run's resolved ``config.yaml``, loads either set of weights and writes the
directory ``UnimmPipeline.from_pretrained`` (and so ``unimm generate`` / ``unimm eval shapes --model``) reads.
Nothing is unpickled: both weight files are safetensors.
"""

from __future__ import annotations

from pathlib import Path

from unimm.errors import UserError

WEIGHT_KINDS = ("ema", "live")


def export_checkpoint_pipeline(source: str | Path, output: str | Path, weights: str = "ema", tokenizer: str | None = None) -> dict:
    """Write the pipeline of `source` (a checkpoint directory, or a run directory: its latest checkpoint) to
    `output`. `weights`: "ema" (what the run's own pipeline would hold) or "live" (the optimised weights).
    `tokenizer` overrides the run's image tokenizer path (e.g. when the run directory moved). Returns a report."""
    from unimm.config import RESOLVED_CONFIG_NAME, load_resolved_config
    from unimm.models.backbone import load_text_tokenizer
    from unimm.models.generator import UnimmGenerator
    from unimm.pipeline import UnimmPipeline
    from unimm.train_config import GeneratorTrainingConfig
    from unimm.trainer import load_frozen_tokenizer
    from unimm.training.state import load_weights, read_ema, read_training_state_meta, resolve_checkpoint

    if weights not in WEIGHT_KINDS:
        raise UserError(f"weights must be one of {', '.join(WEIGHT_KINDS)}, not '{weights}'")
    checkpoint = resolve_checkpoint(source)
    run_dir = checkpoint.parent
    if not (run_dir / RESOLVED_CONFIG_NAME).is_file():
        raise UserError(f"{run_dir} has no {RESOLVED_CONFIG_NAME}; point at a checkpoint of a `unimm train` run directory")
    try:
        config = load_resolved_config(GeneratorTrainingConfig, run_dir)
    except UserError as error:
        raise UserError(f"{run_dir} is not a `unimm train` (generator) run: {error}") from None
    image_tokenizer = load_frozen_tokenizer(tokenizer or config.tokenizer)
    if config.model.latent_channels == 0:
        config.model.latent_channels = image_tokenizer.latent_shape[0]
    # The backbone's pretrained weights would be replaced at once: build the architecture only.
    model = UnimmGenerator.build(config.model, pretrained=False)
    if weights == "live":
        load_weights(checkpoint / "model.model.safetensors", model)
    else:
        shadow, buffers, _ = read_ema(checkpoint / "ema.model.safetensors")
        try:
            model.load_state_dict(ema_generator_state(model, shadow, buffers, where=str(checkpoint)))  # strict: shapes too
        except RuntimeError as error:
            raise UserError(f"the EMA weights in {checkpoint} do not fit the run's model: {str(error).splitlines()[0]}") from None
    pipeline = UnimmPipeline(model.eval(), load_text_tokenizer(config.model.backbone.name_or_path), image_tokenizer,
                             config.sampling, config.model.backbone.max_text_tokens)
    pipeline.save_pretrained(output)
    step = int(read_training_state_meta(checkpoint)["step"])
    return {"checkpoint": str(checkpoint), "step": step, "weights": weights, "output": str(output)}


def ema_generator_state(model, shadow: dict, buffers: dict, where: str = "the EMA") -> dict:
    """The generator's persistent state (its ``state_dict`` names) with every parameter taken from the EMA average;
    raises UserError when the average lacks one. Names only: under ZeRO-3 the live model's tensors are empty
    partitions, so their shapes say nothing (the full-size tensors are the EMA's)."""
    averaged = {**shadow, **buffers}
    names = list(model.state_dict())
    missing = [name for name in names if name not in averaged]
    if missing:
        raise UserError(f"the EMA weights in {where} do not fit the run's model (missing {missing[:3]})")
    return {name: averaged[name] for name in names}
