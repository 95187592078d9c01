"""The embedded default: the trained miniature Shapes models shipped with the repository.

``checkpoints/shapes/`` (made by ``unimm export shapes-default``, see ``scripts/shapes_default.sh``) holds

    tokenizer/        the mini PS-VAE (representation encoder + semantic VAE + pixel decoder), shared by both
    t2i/              the text-to-image pipeline (its pipeline.json points at ../tokenizer)
    edit/             the editing pipeline, fine-tuned from t2i
    scores.json       the Shapes-suite scores of both, measured by ``unimm eval shapes``
    logs/             the resolved training configs and metrics of every stage
    README.md         how they were made: commands, hardware, steps

`unimm generate`, `unimm edit`, `unimm demo` and ``UnimmPipeline.from_pretrained()`` use them when no model is
given. Weights are stored as float16 (they load into float32 modules); the latent statistics stay float32.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from unimm.errors import UserError

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIRS = {"text_to_image": "t2i", "edit": "edit"}
SHARED_TOKENIZER_DIR = "tokenizer"
SCORES_FILE = "scores.json"


def default_checkpoint_root() -> Path:
    """``$UNIMM_DEFAULT_CHECKPOINTS`` or the repository's ``checkpoints/shapes``."""
    return Path(os.environ.get("UNIMM_DEFAULT_CHECKPOINTS") or REPOSITORY_ROOT / "checkpoints" / "shapes").expanduser()


def default_model(task: str = "text_to_image") -> Path:
    """The shipped pipeline directory for ``task`` (``text_to_image`` or ``edit``)."""
    if task not in DEFAULT_MODEL_DIRS:
        raise UserError(f"no shipped model for task '{task}'; the tasks are {', '.join(DEFAULT_MODEL_DIRS)}")
    path = default_checkpoint_root() / DEFAULT_MODEL_DIRS[task]
    if not (path / "pipeline.json").is_file():
        raise UserError(
            f"the shipped {task} model is missing at {path}; restore it with `git checkout -- checkpoints/` "
            "or pass --model DIR (a pipeline directory of a unimm train run)"
        )
    return path


def shipped_scores() -> dict | None:
    """The Shapes-suite scores measured on the shipped models (None when the file is absent)."""
    path = default_checkpoint_root() / SCORES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _floating_to(tensors: dict, dtype) -> dict:
    """`tensors` with the floating-point ones cast to `dtype` (integer buffers such as counts stay as they are)."""
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}


def _cast_safetensors(path: Path, dtype) -> None:
    """Rewrite a safetensors file with its floating-point tensors in `dtype`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from unimm.atomic import atomic_write

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    atomic_write(path, lambda target: save_file(_floating_to(tensors, dtype), str(target), metadata=metadata))


def _summary_scores(t2i_scores: dict | None, edit_scores: dict | None) -> dict:
    """The scores and protocols of `unimm eval shapes --out` files, without the per-item details."""
    summary: dict = {}
    for name, payload in (("text_to_image", t2i_scores), ("edit", edit_scores)):
        if payload:
            summary[name] = {"scores": payload["scores"], "protocol": payload.get("protocol", {})}
    return summary


def package_default_checkpoints(
    t2i_pipeline: str | Path,
    edit_pipeline: str | Path,
    output: str | Path,
    dtype: str = "float16",
    t2i_scores: str | Path | None = None,
    edit_scores: str | Path | None = None,
    logs: dict[str, str | Path] | None = None,
    image_tokenizer: str | Path | None = None,
) -> dict:
    """Write the shipped layout (module docstring) from two finished pipelines that share one image tokenizer.

    ``logs`` maps a stage name (``encoder``, ``tokenizer``, ``t2i``, ``edit``) to its run directory; the
    resolved ``config.yaml`` and ``logs/metrics.jsonl`` of each are copied to ``logs/<stage>/``. Stages already
    in ``output/logs/`` that this export writes nothing for are kept: a model trained further from the shipped
    weights on another machine keeps the history of the runs it started from.
    ``image_tokenizer``: a tokenizer with the pipelines' latent space and another pixel decoder (the
    tokenizer trainer's decoder stage); it replaces theirs. Returns a report with the file sizes.
    """
    import torch

    from tokenizer.model import SemanticAutoencoder
    from unimm.pipeline import UnimmPipeline

    if dtype not in ("float16", "bfloat16", "float32"):
        raise UserError(f"--dtype must be float16, bfloat16 or float32, not '{dtype}'")
    pipelines = {"t2i": UnimmPipeline.from_pretrained(t2i_pipeline, device="cpu"),
                 "edit": UnimmPipeline.from_pretrained(edit_pipeline, device="cpu")}
    if image_tokenizer is None:
        tokenizer_states = [pipeline.image_tokenizer.state_dict() for pipeline in pipelines.values()]
        if tokenizer_states[0].keys() != tokenizer_states[1].keys() or any(
            not torch.equal(tokenizer_states[0][name], tokenizer_states[1][name]) for name in tokenizer_states[0]
        ):
            raise UserError("the text-to-image and editing pipelines use different image tokenizers; they must share one")
    else:
        # The pipelines may carry different decoders of one tokenizer; each must share the replacement's latent space.
        replacement = SemanticAutoencoder.from_pretrained(image_tokenizer)
        for name, pipeline in pipelines.items():
            differences = pipeline.image_tokenizer.latent_space_differences(replacement)
            if differences:
                raise UserError(
                    f"{image_tokenizer} has another latent space than the {name} pipeline's tokenizer (it differs in {differences[0]}"
                    f"{f' and {len(differences) - 1} more' if len(differences) > 1 else ''}); only a decoder-stage fine-tune of it can replace it"
                )
        for pipeline in pipelines.values():
            pipeline.image_tokenizer = replacement

    output = Path(output)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stored_dtype = getattr(torch, dtype)
    tokenizer_dir = pipelines["t2i"].image_tokenizer.save_pretrained(staging / SHARED_TOKENIZER_DIR)
    _cast_safetensors(tokenizer_dir / "model.safetensors", stored_dtype)
    SemanticAutoencoder.from_pretrained(tokenizer_dir)  # the cast file must load back
    for name, pipeline in pipelines.items():
        pipeline.save_pretrained(staging / name, generator_state=_floating_to(pipeline.generator.state_dict(), stored_dtype),
                                 image_tokenizer_path=f"../{SHARED_TOKENIZER_DIR}")

    scores = _summary_scores(
        json.loads(Path(t2i_scores).read_text()) if t2i_scores else None,
        json.loads(Path(edit_scores).read_text()) if edit_scores else None,
    )
    (staging / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
    for stage, run in (logs or {}).items():
        run = Path(run)
        sources = [run / "config.yaml", run / "logs" / "metrics.jsonl", *sorted(run.glob("*metrics.json"))]
        for source, target in ((source, source.name) for source in sources):
            if source.is_file():
                (staging / "logs" / stage).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staging / "logs" / stage / target)
    readme = output / "README.md"
    if readme.is_file():  # hand-written provenance notes survive a re-export
        shutil.copyfile(readme, staging / "README.md")
    if (output / "logs").is_dir():
        for earlier in sorted((output / "logs").iterdir()):
            if earlier.is_dir() and not (staging / "logs" / earlier.name).exists():
                shutil.copytree(earlier, staging / "logs" / earlier.name)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    files = {str(path.relative_to(output)): path.stat().st_size for path in sorted(output.rglob("*")) if path.is_file()}
    return {"output": str(output), "dtype": dtype, "total_bytes": sum(files.values()), "files": files}
