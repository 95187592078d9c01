"""Training-state checkpoints: everything an exact resume needs, without unpickling anything.

A checkpoint is a directory ``<run_dir>/checkpoint-<step>/``::

    training_state.json             step, world size, file list, engine counters, the caller's ``extra``
                                    (written last: a directory without it is incomplete)
    model.<name>.safetensors        model weights (tied weights stored once, aliases in the metadata)
    ema.<name>.safetensors          EMA shadow + buffers; decay and update count in the metadata
    optimizer.<name>.pt             optimizer state (torch.save; read back with weights_only=True)
    optimizer.<name>.rank00001.pt   ... one per rank when the optimizer is sharded (DeepSpeed ZeRO)
    scheduler.<name>.json           LR scheduler state (plain JSON)
    rng.rank00000.safetensors       python / numpy / torch / CUDA generator states, per rank
    loader.rank00000.json           the data loader's ``state_dict()``, per rank

Nothing is unpickled on load: tensors come from safetensors, the rest from JSON, and optimizer states
from ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. DeepSpeed's
ZeRO optimizer states hold a few Python objects (the loss scaler, an enum, named tuples); they are
reduced to plain data on save and rebuilt from the live optimizer on load.

Atomicity: the files are written into ``<run_dir>/checkpoint-<step>.tmp-XXXXXXXX/`` and the directory is
renamed to ``checkpoint-<step>`` (``os.replace``) only once every rank has finished, then the ``latest``
pointer file is replaced atomically. A run killed while saving leaves a ``*.tmp-*`` directory (removed
by the next save) and never a half ``checkpoint-<step>``; ``latest`` keeps pointing at the previous
complete checkpoint.

Distributed: :func:`save_training_state` and :func:`load_training_state` are collective: call them on
every rank. Rank 0 writes the shared files (models, EMA, unsharded optimizers, schedulers, metadata);
every rank writes its own RNG state, loader state and optimizer shards.

Limits: resuming needs the same world size when the optimizer is sharded or per-rank loader/RNG states
are restored (DeepSpeed's "elastic" checkpoints are not supported). ZeRO-3 model weights are gathered
for saving and re-partitioned on loading (collectives). Exact (bitwise) resume is tested for ZeRO-2
with two CPU processes (tests/test_deepspeed_cpu.py), and for ZeRO-2 and ZeRO-3 through the generator
trainer under the deepspeed launcher (tests/test_generator_training.py).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from unimm.atomic import atomic_write, atomic_write_text
from unimm.errors import UserError
from unimm.training.distributed import barrier, broadcast_string, get_rank, get_world_size
from unimm.training.ema import ExponentialMovingAverage, gathered, unwrap_module

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# -- RNG -------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator the training loop may draw from (this process only)."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(numpy_state["state"]["key"], dtype=np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": int(numpy["pos"])},
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda", []))
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has %d CUDA generator states, this process sees %d devices; restoring the overlap",
                len(cuda_states),
                torch.cuda.device_count(),
            )
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def save_rng_state(path: str | os.PathLike, state: Mapping[str, Any] | None = None) -> Path:
    """Write an RNG state (default: the current one) as safetensors; scalars go in the metadata."""
    state = capture_rng_state() if state is None else state
    tensors = {"torch": state["torch"].contiguous(), "numpy_key": state["numpy"]["key"].contiguous()}
    for index, cuda_state in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{index}"] = cuda_state.cpu().contiguous()
    scalars = {
        "python": state["python"],
        "numpy": {k: v for k, v in state["numpy"].items() if k != "key"},
        "num_cuda": len(state.get("cuda", [])),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"rng": json.dumps(scalars)}))


def load_rng_state(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        scalars = json.loads(handle.metadata()["rng"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return {
        "python": scalars["python"],
        "numpy": {**scalars["numpy"], "key": tensors["numpy_key"]},
        "torch": tensors["torch"],
        "cuda": [tensors[f"cuda.{i}"] for i in range(scalars["num_cuda"])],
    }


# -- EMA -------------------------------------------------------------------------------------------
def save_ema(path: str | os.PathLike, ema: ExponentialMovingAverage) -> Path:
    state = ema.state_dict()
    tensors = {f"shadow/{k}": v.detach().cpu().contiguous() for k, v in state["shadow"].items()}
    tensors.update({f"buffers/{k}": v.detach().cpu().contiguous() for k, v in state["buffers"].items()})
    metadata = {"decay": repr(state["decay"]), "warmup": str(state["warmup"]), "num_updates": str(state["num_updates"])}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_ema(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """The averaged parameters, the buffers and the metadata of a :func:`save_ema` file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        shadow, buffers = {}, {}
        for key in handle.keys():
            kind, name = key.split("/", 1)
            (shadow if kind == "shadow" else buffers)[name] = handle.get_tensor(key)
    return shadow, buffers, metadata


def load_ema(path: str | os.PathLike, ema: ExponentialMovingAverage) -> None:
    shadow, buffers, metadata = read_ema(path)
    ema.load_state_dict(
        {
            "decay": float(metadata["decay"]),
            "warmup": metadata["warmup"] == "True",
            "num_updates": int(metadata["num_updates"]),
            "shadow": shadow,
            "buffers": buffers,
        }
    )


# -- optimizers ------------------------------------------------------------------------------------
def _deepspeed_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO / bf16 optimizer inside accelerate's wrappers, or ``None``."""
    current = optimizer
    for _ in range(4):
        if current is None:
            return None
        module = type(current).__module__
        if module.startswith(("deepspeed.runtime.zero", "deepspeed.runtime.bf16_optimizer")):
            return current
        current = getattr(current, "optimizer", None)
    return None


def _plain(value: Any, where: str) -> Any:
    """Reduce a state dict to what ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, enum.Enum):  # before the int/str test: DeepSpeed's ZeroStageEnum is an int too
        return _plain(value.value, where)
    if isinstance(value, torch.Tensor):
        # torch.save writes a view's whole storage (e.g. a slice of a ZeRO flat buffer): copy views out.
        if value.untyped_storage().nbytes() > value.numel() * value.element_size():
            return value.detach().clone()
        return value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return [_plain(item, where) for item in value]
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    if hasattr(value, "__dict__"):  # e.g. DeepSpeed's LossScaler: keep its plain attributes
        attributes = {}
        for key, item in vars(value).items():
            try:
                attributes[key] = _plain(item, f"{where}.{key}")
            except TypeError:
                continue
        return {"__object__": f"{type(value).__module__}.{type(value).__qualname__}", "attributes": attributes}
    raise TypeError(f"cannot store {type(value).__name__} at {where} without pickling it")


def _revive_objects(state: dict[str, Any], live: Any) -> dict[str, Any]:
    """Put the live optimizer's objects back where :func:`_plain` reduced them, with saved attributes."""
    for key, value in list(state.items()):
        if isinstance(value, dict) and "__object__" in value:
            target = getattr(live, key, None)
            if target is None:
                state.pop(key)
                continue
            for attribute, item in value["attributes"].items():
                setattr(target, attribute, item)
            state[key] = target
    return state


def _torch_save(path: Path, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _optimizer_file(directory: Path, name: str, rank: int | None) -> Path:
    return directory / (f"optimizer.{name}.pt" if rank is None else f"optimizer.{name}.rank{rank:05d}.pt")


# -- models ----------------------------------------------------------------------------------------
def _engine_counters(model: Any) -> dict[str, int] | None:
    """A DeepSpeed engine's step counters (they decide gradient-accumulation boundaries)."""
    if type(model).__module__.startswith("deepspeed") and hasattr(model, "global_steps"):
        return {
            key: int(getattr(model, key))
            for key in ("global_steps", "global_samples", "micro_steps", "skipped_steps")
            if hasattr(model, key)
        }
    return None


def _weights(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU copies of a module's state dict, each tied tensor once; and the aliases (tied names).

    Copies, because DeepSpeed ZeRO parameters are views into flat buffers, which safetensors refuses
    to store (and which would drag the whole buffer along).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in module.state_dict().items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def save_weights(path: str | os.PathLike, model: nn.Module, metadata: Mapping[str, str] | None = None) -> Path:
    """A model's state dict as safetensors (tied weights stored once, their aliases in the metadata)."""
    tensors, aliases = _weights(unwrap_module(model))
    header = {"aliases": json.dumps(aliases), **dict(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_weights(path: str | os.PathLike, model: nn.Module, strict: bool = True) -> None:
    """Load :func:`save_weights` output into ``model`` (``load_state_dict``; ``strict`` by default)."""
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        for key in handle.keys():
            state[key] = handle.get_tensor(key)
    for alias, target in aliases.items():
        state[alias] = state[target]
    try:
        unwrap_module(model).load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise UserError(f"checkpoint weights {Path(path).name} do not match the model: {error}") from None


def _save_model(path: Path, model: nn.Module, rank: int) -> None:
    module = unwrap_module(model)
    with gathered(list(module.parameters())):  # ZeRO-3: a collective; otherwise a no-op
        if rank == 0:
            save_weights(path, module)


def _load_model(path: Path, model: nn.Module) -> None:
    module = unwrap_module(model)
    with gathered(list(module.parameters()), modifier_rank=0):
        load_weights(path, module)


# -- checkpoint directories ------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{int(step)}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a ``training_state.json``) of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points at, or else the complete checkpoint with the highest step."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        candidate = run_dir / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
        logger.warning("%s points at %s, which is not a complete checkpoint", pointer, candidate.name)
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise UserError(f"no complete checkpoint in {path} (a checkpoint directory holds {STATE_FILE})")
    return latest


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (never ``protect``); the deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    checkpoints = [path for _, path in list_checkpoints(run_dir)]
    doomed = [path for path in checkpoints[:-keep_last] if protect is None or path.resolve() != protect.resolve()]
    for path in doomed:
        # Rename first so a crash mid-delete leaves a *.tmp-* (cleaned later), not a broken checkpoint.
        trash = path.with_name(f"{path.name}.tmp-deleting")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _remove_stale_temporaries(run_dir: Path) -> None:
    for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _check_names(kind: str, mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    mapping = dict(mapping or {})
    for name in mapping:
        if not _NAME_RE.match(name):
            raise ValueError(f"{kind} name {name!r} must match {_NAME_RE.pattern}")
    return mapping


def _json_text(value: Any, what: str) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True)
    except TypeError as error:
        raise TypeError(f"{what} must be plain JSON data (numbers, strings, lists, dicts): {error}") from None


# -- save / load -----------------------------------------------------------------------------------
def save_training_state(
    run_dir: str | os.PathLike,
    *,
    step: int,
    models: Mapping[str, nn.Module] | None = None,
    optimizers: Mapping[str, Any] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    ema: Mapping[str, ExponentialMovingAverage] | None = None,
    loader_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    save_rng: bool = True,
) -> Path:
    """Write ``<run_dir>/checkpoint-<step>`` atomically and point ``latest`` at it; its path.

    Collective: call on every rank. ``loader_state`` is this rank's loader state; ``extra`` (rank 0's
    is kept) must be plain JSON. ``keep_last`` prunes older checkpoints after a successful save.
    """
    run_dir = Path(run_dir)
    models = _check_names("model", models)
    optimizers = _check_names("optimizer", optimizers)
    schedulers = _check_names("scheduler", schedulers)
    emas = _check_names("ema", ema)
    rank, world_size = get_rank(), get_world_size()
    final = run_dir / checkpoint_name(step)

    temporary_name = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(run_dir)
        temporary_name = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=run_dir)).name
    temporary = run_dir / broadcast_string(temporary_name)

    try:
        files: list[str] = []
        engines: dict[str, dict[str, int]] = {}
        for name, model in models.items():
            path = temporary / f"model.{name}.safetensors"
            _save_model(path, model, rank)
            files.append(path.name)
            counters = _engine_counters(model)
            if counters is not None:
                engines[name] = counters
        sharded: list[str] = []
        for name, optimizer in optimizers.items():
            inner = _deepspeed_optimizer(optimizer)
            if inner is not None:
                path = _optimizer_file(temporary, name, rank)
                _torch_save(path, _plain(inner.state_dict(), f"optimizer {name}"))
                sharded.append(name)
            elif rank == 0:
                path = _optimizer_file(temporary, name, None)
                _torch_save(path, _plain(optimizer.state_dict(), f"optimizer {name}"))
                files.append(path.name)
        if rank == 0:
            for name, average in emas.items():
                path = save_ema(temporary / f"ema.{name}.safetensors", average)
                files.append(path.name)
            for name, scheduler in schedulers.items():
                text = _json_text(scheduler.state_dict(), f"scheduler {name} state")
                files.append(atomic_write_text(temporary / f"scheduler.{name}.json", text).name)
        if save_rng:
            save_rng_state(temporary / f"rng.rank{rank:05d}.safetensors")
        if loader_state is not None:
            atomic_write_text(temporary / f"loader.rank{rank:05d}.json", _json_text(dict(loader_state), "loader state"))
        barrier()  # every rank's files are in place
        if rank == 0:
            meta = {
                "format": FORMAT_VERSION,
                "step": int(step),
                "world_size": world_size,
                "files": sorted(files),
                "sharded_optimizers": sharded,
                "per_rank": {"rng": save_rng, "loader": loader_state is not None},
                "engines": engines,
                "extra": dict(extra or {}),
            }
            atomic_write_text(temporary / STATE_FILE, _json_text(meta, "extra"))
            _fsync_directory(temporary)
            if final.exists():  # saving the same step again (e.g. after a resume): swap it out
                old = final.with_name(f"{final.name}.tmp-replaced")
                os.replace(final, old)
                os.replace(temporary, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(temporary, final)
            _fsync_directory(run_dir)
            atomic_write_text(run_dir / LATEST_FILE, final.name + "\n")
            if keep_last is not None:
                prune_checkpoints(run_dir, keep_last, protect=final)
    except BaseException:
        if rank == 0 and temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    barrier()  # nobody reads the checkpoint before it is complete
    return final


@dataclasses.dataclass
class LoadedTrainingState:
    path: Path
    step: int
    world_size: int
    loader_state: dict[str, Any] | None
    extra: dict[str, Any]


def read_training_state_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    checkpoint = Path(checkpoint)
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})") from None


def load_training_state(
    checkpoint: str | os.PathLike,
    *,
    models: Mapping[str, nn.Module] | None = None,
    optimizers: Mapping[str, Any] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    ema: Mapping[str, ExponentialMovingAverage] | None = None,
    restore_rng: bool = True,
) -> LoadedTrainingState:
    """Restore, in place, what :func:`save_training_state` wrote (collective; call on every rank).

    ``checkpoint`` is a checkpoint directory or a run directory (its latest checkpoint). Load after
    ``accelerator.prepare`` (optimizer states then land in the wrapped/sharded optimizers). The data
    loader state is returned for the caller's ``loader.load_state_dict``.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    meta = read_training_state_meta(checkpoint)
    rank, world_size = get_rank(), get_world_size()
    saved_world = int(meta["world_size"])
    per_rank = meta.get("per_rank", {})
    sharded = set(meta.get("sharded_optimizers", []))
    if saved_world != world_size and (sharded or (restore_rng and per_rank.get("rng")) or per_rank.get("loader")):
        raise UserError(
            f"{checkpoint} was saved by {saved_world} processes and this run has {world_size}; resume with "
            f"{saved_world} processes"
        )

    def need(path: Path) -> Path:
        if not path.is_file():
            raise UserError(f"checkpoint {checkpoint} has no {path.name}; it was saved without that part")
        return path

    for name, model in (models or {}).items():
        _load_model(need(checkpoint / f"model.{name}.safetensors"), model)
        counters = meta.get("engines", {}).get(name)
        if counters and _engine_counters(model) is not None:
            for key, value in counters.items():
                setattr(model, key, value)
    for name, optimizer in (optimizers or {}).items():
        inner = _deepspeed_optimizer(optimizer)
        if inner is not None:
            if name not in sharded:
                raise UserError(f"optimizer {name!r} is sharded (DeepSpeed) now but was not when {checkpoint} was saved")
            state = _revive_objects(_torch_load(need(_optimizer_file(checkpoint, name, rank))), inner)
            states: list[Any] = [None] * world_size
            states[rank] = state
            inner.load_state_dict(state_dict_list=states, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            if name in sharded:
                raise UserError(f"optimizer {name!r} was sharded (DeepSpeed) when {checkpoint} was saved but is not now")
            optimizer.load_state_dict(_torch_load(need(_optimizer_file(checkpoint, name, None))))
    for name, scheduler in (schedulers or {}).items():
        scheduler.load_state_dict(json.loads(need(checkpoint / f"scheduler.{name}.json").read_text()))
    for name, average in (ema or {}).items():
        load_ema(need(checkpoint / f"ema.{name}.safetensors"), average)
    loader_state = None
    if per_rank.get("loader"):
        loader_state = json.loads(need(checkpoint / f"loader.rank{rank:05d}.json").read_text())
    if restore_rng and per_rank.get("rng"):
        restore_rng_state(load_rng_state(need(checkpoint / f"rng.rank{rank:05d}.safetensors")))
    barrier()
    return LoadedTrainingState(
        path=checkpoint,
        step=int(meta["step"]),
        world_size=saved_world,
        loader_state=loader_state,
        extra=dict(meta.get("extra", {})),
    )
