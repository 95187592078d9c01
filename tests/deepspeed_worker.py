"""A tiny training job run by tests/test_deepspeed_cpu.py under ``deepspeed --num_gpus 2 --no_local_rank``.

It trains a small MLP (with dropout, so the RNG state matters) with DeepSpeed ZeRO-2 through
``unimm.training.build_accelerator``, keeps an EMA, follows a warm-up + cosine schedule, saves a
training-state checkpoint half-way and keeps going. With ``--resume`` it restores that checkpoint and
trains the second half again. Each rank writes ``result.rank<k>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unimm.training import (  # noqa: E402
    ExponentialMovingAverage,
    TrainingLogger,
    build_accelerator,
    build_warmup_cosine_scheduler,
    clip_gradients,
    load_training_state,
    save_training_state,
    uses_deepspeed,
)
from unimm.training.ema import gathered  # noqa: E402

MICRO_BATCH = 8
FEATURES = 16


class ToyLoader:
    """Batches that depend only on (rank, position); ``state_dict`` is the position, like ResumableLoader."""

    def __init__(self, rank: int):
        self.rank = rank
        self.position = 0
        # Plain tensors, not an nn.Linear, whose initialisation would draw from the global RNG.
        self.teacher = torch.randn(FEATURES, 1, generator=torch.Generator().manual_seed(1234))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(10_000 * self.position + self.rank)
        self.position += 1
        x = torch.randn(MICRO_BATCH, FEATURES, generator=generator)
        return x, torch.tanh(x @ self.teacher)

    def state_dict(self) -> dict:
        return {"position": self.position, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        assert state["rank"] == self.rank
        self.position = int(state["position"])


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().float().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def full_digest(module: nn.Module) -> str:
    with gathered(list(module.parameters())):
        return digest(module.parameters())


def evaluation_loss(module: nn.Module) -> float:
    generator = torch.Generator().manual_seed(999)
    x = torch.randn(256, FEATURES, generator=generator)
    teacher = ToyLoader(0).teacher
    module.eval()
    with torch.no_grad():
        loss = nn.functional.mse_loss(module(x), torch.tanh(x @ teacher)).item()
    module.train()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-at", type=int, default=6)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--deepspeed-config", default="configs/deepspeed/zero2.json")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()

    accelerator = build_accelerator(
        mixed_precision="bf16",  # falls back to fp32 on the CPU
        deepspeed_config=args.deepspeed_config,
        micro_batch_size=MICRO_BATCH,
        gradient_clipping=1.0,
    )
    rank = accelerator.process_index
    setup_seconds = time.time() - started

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = build_warmup_cosine_scheduler(optimizer, warmup_steps=3, total_steps=args.steps, min_lr_ratio=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ExponentialMovingAverage(model, decay=0.9)
    loader = ToyLoader(rank)
    torch.manual_seed(100 + rank)  # dropout differs per rank, as in real data-parallel training

    start_step = 0
    if args.resume:
        loaded = load_training_state(
            out / "run",
            models={"model": model},
            optimizers={"model": optimizer},
            schedulers={"model": scheduler},
            ema={"model": ema},
        )
        loader.load_state_dict(loaded.loader_state)
        start_step = loaded.step
        assert loaded.extra["note"] == "half-way", loaded.extra
        checkpoint_digests = {
            "params": full_digest(accelerator.unwrap_model(model)),
            "rng": digest([torch.get_rng_state()]),
        }

    module = accelerator.unwrap_model(model)
    initial_eval = evaluation_loss(module)
    logger = TrainingLogger(out / "logs", total_steps=args.steps, initial_step=start_step, progress=False)
    losses, lrs, grad_norms = [], [], []
    step_seconds = time.time()
    for step in range(start_step, args.steps):
        x, y = loader.next()
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        grad_norms.append(clip_gradients(accelerator, model, 1.0))
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
        optimizer.zero_grad()
        ema.update(model)
        losses.append(loss.item())
        logger.log_scalars({"loss": loss, "lr": lrs[-1]}, step + 1)
        if step + 1 == args.save_at and not args.resume:
            save_training_state(
                out / "run",
                step=step + 1,
                models={"model": model},
                optimizers={"model": optimizer},
                schedulers={"model": scheduler},
                ema={"model": ema},
                loader_state=loader.state_dict(),
                extra={"note": "half-way"},
                keep_last=2,
            )
            checkpoint_digests = {
                "params": full_digest(accelerator.unwrap_model(model)),
                "rng": digest([torch.get_rng_state()]),
            }
    step_seconds = time.time() - step_seconds
    logger.close()

    with gathered(list(module.parameters())):  # ZeRO-3: full tensors for the comparison
        parameters = [p.detach().clone() for p in module.parameters()]
    flat = torch.cat([p.reshape(-1) for p in parameters])
    everyone = [torch.zeros_like(flat) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(everyone, flat)
    result = {
        "rank": rank,
        "num_processes": accelerator.num_processes,
        "world_size_env": int(os.environ.get("WORLD_SIZE", 1)),
        "deepspeed": uses_deepspeed(accelerator),
        "engine": type(model).__name__,
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage,
        "train_batch_size": accelerator.deepspeed_config["train_batch_size"],
        "start_step": start_step,
        "checkpoint_digests": checkpoint_digests,
        "losses": losses,
        "lrs": lrs,
        "grad_norms": grad_norms,
        "initial_eval": initial_eval,
        "final_eval": evaluation_loss(module),
        "params_equal_across_ranks": all(torch.equal(everyone[0], other) for other in everyone[1:]),
        "param_digest": digest(parameters),
        "ema_digest": digest(ema.shadow.values()),
        "ema_updates": ema.num_updates,
        "setup_seconds": setup_seconds,
        "step_seconds": step_seconds,
    }
    name = "result-resumed" if args.resume else "result"
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
