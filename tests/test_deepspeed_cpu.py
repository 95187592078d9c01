"""A genuine two-process DeepSpeed ZeRO-2 run on the CPU (gloo), through our accelerator helpers.

tests/deepspeed_worker.py trains a small MLP for 12 steps, saves a training-state checkpoint at step 6
and keeps going; a second launch resumes from that checkpoint and must end bitwise where the first did
(parameters, EMA, losses, learning rates, gradient norms), which exercises the sharded ZeRO optimizer
state, the per-rank RNG and loader states and the DeepSpeed engine counters.

DeepSpeed JIT-compiles a small C++ op (``deepspeed_shm_comm``) the first time (about 45 s on 2 cores).
tests/conftest.py gives every test a fresh HOME, which would move the default cache
(``~/.cache/torch_extensions``) and rebuild the op on every run; the subprocesses therefore get
``TORCH_EXTENSIONS_DIR`` pointing at the real home's cache, captured here at import time (collection
runs before the HOME fixture), unless the variable is already set. That is the same directory a
plain ``deepspeed`` run uses, so a developer's first manual run and the tests share one build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unimm.training.distributed import SHARED_MEMORY_DIR, deepspeed_shm_path, find_free_port

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "deepspeed_worker.py"


def default_extensions_dir() -> str:
    """torch's own default (``cpp_extension.get_default_build_root()`` + ``py<ver>_<cuda|cpu>``), but
    resolved now, while HOME is still the real one."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    flavour = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    return str(cache / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_{flavour}")


EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir()
TIMEOUT_S = 600  # the first run compiles the op; later runs take ~20-35 s each

pytestmark = pytest.mark.slow


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TORCH_EXTENSIONS_DIR=EXTENSIONS_DIR,
        # A CPU test even on a GPU machine: DeepSpeed's CPU accelerator, gloo, no CUDA devices.
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    return env


def launch(command: list[str], log: Path) -> None:
    try:
        completed = subprocess.run(
            command, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        output = error.stdout if isinstance(error.stdout, str) else (error.stdout or b"").decode(errors="replace")
        log.write_text(output)
        pytest.fail(f"launch timed out after {TIMEOUT_S} s: {' '.join(command)}\n{output[-4000:]}")
    log.write_text(completed.stdout)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout[-6000:]}"


def deepspeed_command(out: Path, *extra: str, port: int | None = None) -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", "2", "--master_port", str(port or find_free_port()), "--no_local_rank",
        str(WORKER), "--out", str(out), *extra,
    ]


def leftover_shared_memory(port: int) -> list[str]:
    """DeepSpeed CPU all-reduce segments of the world on ``port`` still in /dev/shm (none where there is no /dev/shm)."""
    if not SHARED_MEMORY_DIR.is_dir():
        return []
    return [str(path) for rank in (0, 1) if (path := deepspeed_shm_path(rank, "127.0.0.1", str(port))).exists()]


def read_results(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}.rank{rank}.json").read_text()) for rank in (0, 1)]


def check_run(results: list[dict]) -> None:
    for result in results:
        assert result["num_processes"] == 2 and result["world_size_env"] == 2
        assert result["deepspeed"] and result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 2
        assert result["train_batch_size"] == 16  # 8 per process × 2 processes
        assert result["params_equal_across_ranks"]
        assert result["final_eval"] < 0.7 * result["initial_eval"], result
    first, second = results
    assert first["losses"] != second["losses"]  # each rank trained on its own data
    assert first["param_digest"] == second["param_digest"] and first["ema_digest"] == second["ema_digest"]
    assert first["lrs"][0] == 0.0 and max(first["lrs"]) == pytest.approx(1e-2)


def test_two_process_zero2_trains_saves_and_resumes_exactly(tmp_path):
    out = tmp_path / "out"
    port = find_free_port()
    launch(deepspeed_command(out, port=port), tmp_path / "first.log")
    results = read_results(out, "result")
    check_run(results)
    # DeepSpeed never removes its CPU all-reduce segments (~69 MB a rank); our accelerator set-up does.
    assert leftover_shared_memory(port) == []

    checkpoint = out / "run" / "checkpoint-6"
    assert (out / "run" / "latest").read_text().strip() == "checkpoint-6"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "optimizer.model.rank00000.pt" in names and "optimizer.model.rank00001.pt" in names
    assert "loader.rank00001.json" in names and "rng.rank00001.safetensors" in names
    meta = json.loads((checkpoint / "training_state.json").read_text())
    assert meta["world_size"] == 2 and meta["sharded_optimizers"] == ["model"]
    assert meta["engines"]["model"]["global_steps"] == 6

    launch(deepspeed_command(out, "--resume"), tmp_path / "resumed.log")
    resumed = read_results(out, "result-resumed")
    for before, after in zip(results, resumed):
        assert after["start_step"] == 6 and after["ema_updates"] == 12
        assert after["checkpoint_digests"] == before["checkpoint_digests"]
        assert after["losses"] == before["losses"][6:]
        assert after["lrs"] == before["lrs"][6:]
        assert after["grad_norms"] == before["grad_norms"][6:]
        assert after["param_digest"] == before["param_digest"]
        assert after["ema_digest"] == before["ema_digest"]


def test_accelerate_launch_runs_the_same_job(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "deepspeed_zero2_cpu2.yaml"),
        "--main_process_port", str(find_free_port()),
        str(WORKER), "--out", str(out),
    ]
    launch(command, tmp_path / "accelerate.log")
    check_run(read_results(out, "result"))
