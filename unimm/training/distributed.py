"""Distributed set-up shared by the trainers: an ``accelerate.Accelerator``, optionally driving DeepSpeed.

Launching (every training entry point that builds its accelerator with :func:`build_accelerator`)
----------------------------------------------------------------------------------------------------
One process (no launcher): ``unimm train-tokenizer --config CFG`` — a DeepSpeed config still works; the
process then sets up a world of size 1 itself.

DeepSpeed ZeRO-2, two processes, on a CPU-only machine (tested with DeepSpeed 0.19.8, accelerate 1.15,
torch 2.14, the ``gloo`` backend)::

    deepspeed --num_gpus 2 --master_port 29511 --no_local_rank --module unimm \\
        train-tokenizer --config CFG [key=value ...]

(the trainer passes ``deepspeed_config="configs/deepspeed/zero2.json"`` from its config). For a script
instead of a module: ``deepspeed --num_gpus 2 --master_port 29511 --no_local_rank path/to/script.py
ARGS``. ``--no_local_rank`` keeps the launcher from appending ``--local_rank=N`` to the command line
(our CLIs take the rank from the ``LOCAL_RANK`` environment variable instead). ``--num_gpus`` is the
number of processes; on a CPU machine it is honoured even though there is no GPU. Pick a free
``--master_port`` when several runs may share a machine (the default 29500 collides).

The same with accelerate's launcher (equivalent; it runs ``torch.distributed.run`` underneath)::

    accelerate launch --config_file configs/accelerate/deepspeed_zero2_cpu2.yaml \\
        --main_process_port 29511 -m unimm train-tokenizer --config CFG

(relative paths in that YAML resolve against the working directory: launch from the repository root.)
On GPUs drop the CPU specifics: ``deepspeed --num_gpus 8 --no_local_rank --module unimm train ...``.
Tested end to end (2 CPU processes, ZeRO-2, exact resume) by tests/test_deepspeed_cpu.py through
tests/deepspeed_worker.py; one launch takes ~20-40 s once the op below is cached.

What makes DeepSpeed work on the CPU (pitfalls found while setting this up)
---------------------------------------------------------------------------
* ``Accelerator(cpu=True)`` silently ignores the DeepSpeed plugin and runs plain DDP; DeepSpeed needs
  ``cpu=False``. DeepSpeed itself selects its CPU accelerator when CUDA is absent (log line "Setting
  accelerator to CPU"). To run DeepSpeed on the CPU of a GPU machine, set ``DS_ACCELERATOR=cpu`` and
  ``CUDA_VISIBLE_DEVICES=`` before launching.
* Without CUDA, accelerate picks no process-group backend and then reports ``num_processes == 1`` on
  every rank (each rank thinks it is alone: same data shard on both, wrong ``train_batch_size``), while
  DeepSpeed does run a 2-rank world underneath. :func:`build_accelerator` passes
  ``InitProcessGroupKwargs(backend="gloo")`` so both agree on the world.
* DeepSpeed's CPU communication layer JIT-compiles a small C++ op (``deepspeed_shm_comm``) on the first
  run: about 45 s on an idle 2-core machine, about 2 min on a busy one (one rank builds, the other
  waits on the lock). It is cached under
  ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/py<ver>_cpu/deepspeed_shm_comm``);
  later runs load it in well under a second. Tests that change ``HOME`` must keep
  ``TORCH_EXTENSIONS_DIR`` pointing at a stable place or they rebuild it every time.
* ``train_micro_batch_size_per_gpu: "auto"`` is normally inferred from a ``torch.utils.data.DataLoader``
  passed to ``prepare``; our ``ResumableLoader`` is not one, so pass ``micro_batch_size``.
* accelerate steps a *prepared* LR scheduler ``num_processes`` times per optimizer step by default;
  :func:`build_accelerator` sets ``step_scheduler_with_optimizer=False``, so call ``scheduler.step()``
  once per optimizer step (when ``accelerator.sync_gradients``), prepared or not.
* Under DeepSpeed, ``accelerator.backward(loss)`` runs the engine's backward *and* its optimizer step
  (with DeepSpeed's own gradient clipping, ``gradient_clipping`` in the JSON); the wrapped optimizer's
  ``step``/``zero_grad`` are no-ops. Write the loop the plain way (backward, clip, step, zero_grad):
  :func:`clip_gradients` returns the gradient norm in both modes.
* Mixed precision: ``bf16``/``fp16`` are enabled on CUDA only. On a CPU the request falls back to fp32
  (with a warning) so the same config runs in CPU tests; DeepSpeed's ``bf16.enabled: "auto"`` is then
  filled with ``false``.
* ZeRO-2 keeps full parameters on every rank (optimizer state and gradients are partitioned), so EMA and
  weight saving work on any rank. ZeRO-3 partitions parameters: see ``unimm.training.ema``.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unimm.errors import UserError

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"


# -- process topology (works before, without or after an Accelerator) ------------------------------
def get_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()


def broadcast_string(value: str | None, src: int = 0) -> str:
    """Rank ``src``'s ``value`` on every rank (identity in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and get_world_size() > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=src)
        value = box[0]
    assert value is not None
    return value


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_distributed() -> bool:
    """True when a launcher (deepspeed, torchrun, accelerate launch) started this process."""
    return "LOCAL_RANK" in os.environ


# -- configuration ----------------------------------------------------------------------------------
def resolve_mixed_precision(requested: str, cpu: bool = False) -> str:
    """``requested`` on CUDA; ``"no"`` on a CPU (bf16/fp16 training is enabled on GPUs only)."""
    if requested not in MIXED_PRECISION:
        raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {requested!r}")
    if requested != "no" and (cpu or not torch.cuda.is_available()):
        logger.warning("mixed_precision=%s needs a CUDA device; training in fp32 on the CPU", requested)
        return "no"
    return requested


def resolve_deepspeed_config(path: str | os.PathLike) -> Path:
    """A DeepSpeed JSON path as given, or relative to the repository, or a bare name in configs/deepspeed."""
    candidates = [Path(path), REPO_ROOT / path, DEEPSPEED_CONFIG_DIR / path, DEEPSPEED_CONFIG_DIR / f"{path}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(
        f"DeepSpeed config {str(path)!r} not found; give a JSON path or one of "
        f"{', '.join(sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob('*.json')))}"
    )


def deepspeed_requested(deepspeed_config: str | os.PathLike | None) -> bool:
    return deepspeed_config is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _ensure_single_process_world() -> None:
    """Let DeepSpeed initialise a world of one when no launcher set the rendezvous variables."""
    if launched_distributed():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))


def build_deepspeed_plugin(
    deepspeed_config: str | os.PathLike | dict | None,
    gradient_accumulation_steps: int,
    micro_batch_size: int | None = None,
    gradient_clipping: float | None = None,
):
    """A ``DeepSpeedPlugin`` from a JSON file (or dict; ``None``: accelerate's environment variables),
    with the config's ``"auto"`` entries filled from the trainer's own settings."""
    from accelerate.utils import DeepSpeedPlugin

    if isinstance(deepspeed_config, dict):
        source: Any = dict(deepspeed_config)
    elif deepspeed_config is not None:
        source = str(resolve_deepspeed_config(deepspeed_config))
    else:
        source = None  # accelerate launch --use_deepspeed: ACCELERATE_DEEPSPEED_* variables
    plugin = DeepSpeedPlugin(
        hf_ds_config=source,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_clipping=gradient_clipping,
    )
    config = plugin.deepspeed_config
    if micro_batch_size is not None and config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    return plugin


DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's ops/csrc/cpu/comm/shm.cpp SHM_BUFFER_NAME
SHARED_MEMORY_DIR = Path("/dev/shm")


def deepspeed_shm_path(rank: int, addr: str | None = None, port: str | None = None) -> Path | None:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for ``rank`` of the world at
    ``MASTER_ADDR:MASTER_PORT`` (``{prefix}_{uid}_{addr}_{port}_{rank}``), or None outside a launched world."""
    addr = addr or os.environ.get("MASTER_ADDR")
    port = port or os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return SHARED_MEMORY_DIR / f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm(accelerator) -> Path | None:
    """Remove this rank's DeepSpeed CPU all-reduce segment from /dev/shm as soon as every rank has mapped it.

    DeepSpeed creates one ~69 MB segment per rank and never unlinks it, so every CPU DeepSpeed run, finished or
    killed, left its segments in RAM until a reboot (a test suite's worth of launches held 18 GB on our 24 GB
    machine). Each rank creates its own segment and maps every other rank's while DeepSpeed's communication
    backend initialises, before the ``Accelerator`` is returned, so after one barrier no rank needs the names any
    more: unlinking them then frees the memory when the last process unmaps it, however the run ends. The exit
    hook covers a segment created later than this (none in DeepSpeed 0.19). Every rank must call this.
    """
    path = deepspeed_shm_path(get_rank())
    if path is None:
        return None
    atexit.register(path.unlink, missing_ok=True)
    accelerator.wait_for_everyone()
    path.unlink(missing_ok=True)
    return path


def build_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    deepspeed_config: str | os.PathLike | dict | None = None,
    log_dir: str | os.PathLike | None = None,
    cpu: bool = False,
    *,
    micro_batch_size: int | None = None,
    gradient_clipping: float | None = None,
    **accelerator_kwargs: Any,
):
    """An ``Accelerator`` for our trainers.

    ``deepspeed_config``: a JSON path (``configs/deepspeed/zero2.json``, or just ``zero2``), a dict, or
    ``None`` (no DeepSpeed, unless ``accelerate launch --use_deepspeed`` asked for it through the
    environment). ``micro_batch_size`` (per process) and ``gradient_clipping`` fill the JSON's ``"auto"``
    entries. ``cpu=True`` forces the CPU for plain/DDP runs; DeepSpeed runs on the CPU whenever CUDA is
    absent (see the module docstring). Extra keyword arguments go to ``Accelerator``.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    if gradient_accumulation_steps < 1:
        raise UserError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    use_deepspeed = deepspeed_requested(deepspeed_config)
    on_cpu = cpu or not torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(mixed_precision, cpu=on_cpu)

    kwargs_handlers = list(accelerator_kwargs.pop("kwargs_handlers", []) or [])
    accelerator_kwargs.setdefault("step_scheduler_with_optimizer", False)
    if log_dir is not None:
        accelerator_kwargs.setdefault(
            "project_config", ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir))
        )

    if use_deepspeed:
        if cpu and torch.cuda.is_available():
            raise UserError(
                "DeepSpeed on the CPU of a CUDA machine: set DS_ACCELERATOR=cpu and CUDA_VISIBLE_DEVICES= "
                "before launching, or drop the DeepSpeed config"
            )
        _ensure_single_process_world()
        plugin = build_deepspeed_plugin(
            deepspeed_config, gradient_accumulation_steps, micro_batch_size, gradient_clipping
        )
        if on_cpu and not any(isinstance(h, InitProcessGroupKwargs) for h in kwargs_handlers):
            kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            deepspeed_plugin=plugin,
            kwargs_handlers=kwargs_handlers,
            **accelerator_kwargs,
        )
    else:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            cpu=cpu,
            kwargs_handlers=kwargs_handlers,
            **accelerator_kwargs,
        )
    if use_deepspeed and on_cpu:
        release_deepspeed_shm(accelerator)
    expected = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} processes but the launcher started {expected}"
        )
    return accelerator


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def clip_gradients(accelerator, model: nn.Module, max_norm: float | None) -> float | None:
    """Clip the gradients (call after ``backward``, when ``accelerator.sync_gradients``); the norm.

    Under DeepSpeed the engine already clipped (its JSON ``gradient_clipping``) and stepped inside
    ``backward``; this returns the norm it measured. Otherwise it clips to ``max_norm`` (no clipping
    when ``None`` or <= 0, the norm is still returned).
    """
    if uses_deepspeed(accelerator):
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or 0.0)
    else:
        limit = max_norm if max_norm and max_norm > 0 else float("inf")
        norm = accelerator.clip_grad_norm_(model.parameters(), limit)
    if norm is None:
        return None
    return float(norm)
