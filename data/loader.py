"""A loader that delivers exact-size batches of good samples and resumes exactly from a saved state.

Corrupt samples are skipped and the batch is refilled from the following positions, so every good
sample of an epoch is delivered once (except the final partial batch when ``drop_last``). The state is
small and plain (ints and a dict of counts, no pickle): the epoch, how many positions of this rank's
epoch order the yielded batches consumed, and the running delivery/skip counts. Because the order is a
pure function of (seed, epoch, world size) and every per-sample random choice is seeded by
(seed, epoch, sample id), a loader restored from a state yields exactly the batches an uninterrupted
one would have yielded next.

Distributed: each rank reads positions ``rank::world_size`` of the shared epoch order. Ranks can see
different numbers of corrupt samples and so yield different numbers of batches; train by steps with
``infinite=True`` rather than relying on equal epoch lengths. A state only resumes at the world size
it was saved with.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.config import DataConfig
from data.datasets import IndexedDataset
from data.index import rank_positions
from unimm.errors import UserError

logger = logging.getLogger(__name__)


def collate_samples(samples: list[dict[str, Any]], pin_memory: bool = False) -> dict[str, Any]:
    """Stack tensors along a new batch dimension (in page-locked memory with `pin_memory`, for fast
    host-to-GPU copies); keep everything else (strings) as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        if isinstance(values[0], torch.Tensor):
            stacked = torch.stack(values)
            batch[name] = stacked.pin_memory() if pin_memory and torch.cuda.is_available() else stacked
        else:
            batch[name] = values
    return batch


def pack_chunk(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worker side: tensors become numpy arrays, which travel pickled in the chunk's one message."""
    return [{name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in sample.items()} for sample in samples]


def unpack_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Main-process side of `pack_chunk` (a no-op for in-process samples, which hold tensors already)."""
    return {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for name, value in sample.items()}


def format_skip_summary(delivered: int, skipped: dict[str, int]) -> str:
    total = sum(skipped.values())
    line = f"data: {delivered} samples delivered, {total} skipped"
    if total:
        reasons = sorted(skipped.items(), key=lambda item: (-item[1], item[0]))
        line += " (" + ", ".join(f"{reason}: {count}" for reason, count in reasons) + ")"
    return line


def hash_seed(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochRequests:
    """The ``(epoch, sample_id)`` requests of the rest of an epoch, produced lazily (a list of tuples
    would cost ~100 bytes per sample for millions of samples)."""

    def __init__(self, epoch: int, sample_ids: np.ndarray):
        self.epoch = epoch
        self.sample_ids = sample_ids

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(sample_id)) for sample_id in self.sample_ids)


class ResumableLoader:
    """Iterate batches of exactly ``config.batch_size`` good samples.

    Each ``iter()`` runs the rest of the current epoch, then advances the epoch; with ``infinite``
    it continues epoch after epoch. Breaking out of a loop and iterating again continues right after
    the last yielded batch.
    """

    def __init__(
        self,
        dataset: IndexedDataset,
        config: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = False,
        pin_memory: bool = False,
    ):
        if config.batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {config.batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not valid for world size {world_size}")
        self.dataset = dataset
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.infinite = infinite
        self.pin_memory = pin_memory
        self.epoch = 0
        self.position = 0
        self.delivered = 0
        self.skipped: Counter[str] = Counter()

    # -- order ---------------------------------------------------------------------------------------
    def epoch_sample_ids(self, epoch: int) -> np.ndarray:
        """The sample ids this rank reads in ``epoch``, in order."""
        config = self.config
        order = self.dataset.index.epoch_order(config.seed, epoch, config.shuffle, config.shuffle_window)
        return rank_positions(order, self.rank, self.world_size)

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self._iterate_epoch()
            if not self.infinite:
                return

    def _iterate_epoch(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        sample_ids = self.epoch_sample_ids(epoch)
        consumed = self.position
        requests = EpochRequests(epoch, sample_ids[consumed:])
        # batch_size=None: workers fetch single samples in sampler order; batches are assembled here so
        # a corrupt sample can be replaced by the next good one.
        # An own generator: creating the iterator would otherwise draw a base seed from the global torch RNG,
        # so a resumed run (which opens an extra iterator mid-epoch) would leave the training RNG stream.
        generator = torch.Generator().manual_seed(hash_seed(self.config.seed, epoch, consumed, self.rank))
        workers = self.config.num_workers
        chunks = DataLoader(
            self.dataset,
            # Workers fetch chunks of consecutive requests and send them as numpy arrays: one tensor per
            # sample through worker shared memory costs milliseconds each and starved GPU runs (a
            # 256-sample batch of latents took 2.5 s with 4 workers against 0.04 s in-process).
            batch_size=self.worker_chunk_size() if workers else 1,
            sampler=requests,
            collate_fn=pack_chunk if workers else list,
            num_workers=workers,
            generator=generator,
        )
        good: list[dict[str, Any]] = []
        pending_skips: Counter[str] = Counter()
        for sample in (unpack_sample(item) for chunk in chunks for item in chunk):
            consumed += 1
            if "corrupt" in sample:
                pending_skips[sample["corrupt"]] += 1
                logger.warning("skipped sample %s: %s", sample["key"], sample["corrupt"])
                continue
            good.append(sample)
            if len(good) == self.config.batch_size:
                # Commit before yielding: a state saved right after this batch must include it.
                self._commit(consumed, pending_skips, len(good))
                pending_skips = Counter()
                batch, good = collate_samples(good, self.pin_memory), []
                yield batch
        if good and not self.config.drop_last:
            self._commit(consumed, pending_skips, len(good))
            pending_skips = Counter()
            batch, good = collate_samples(good, self.pin_memory), []
            yield batch
        # End of epoch: the tail was seen in full, so its skips count; a dropped partial batch does not.
        self._commit(consumed, pending_skips, 0)
        self.epoch = epoch + 1
        self.position = 0

    def worker_chunk_size(self) -> int:
        """Requests per worker message: a few per worker per batch, so workers still take turns within one."""
        return max(1, min(64, self.config.batch_size // (2 * max(1, self.config.num_workers))))

    def _commit(self, position: int, skips: Counter[str], delivered: int) -> None:
        self.position = position
        self.skipped.update(skips)
        self.delivered += delivered

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.config.seed,
            "world_size": self.world_size,
            "num_samples": len(self.dataset),
            "delivered": self.delivered,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["world_size"]) != self.world_size:
            raise UserError(
                f"the data loader state was saved with world size {state['world_size']} but this run has "
                f"{self.world_size}; resume with the same number of processes"
            )
        if int(state["seed"]) != self.config.seed:
            raise UserError(
                f"the data loader state was saved with data.seed={state['seed']} but this run has "
                f"data.seed={self.config.seed}; resume with the same seed"
            )
        saved_samples = state.get("num_samples")
        if saved_samples is not None and int(saved_samples) != len(self.dataset):
            raise UserError(
                f"the data loader state was saved over {saved_samples} samples but the shards now hold "
                f"{len(self.dataset)}; resume with the same data.shards"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.delivered = int(state.get("delivered", 0))
        self.skipped = Counter({str(k): int(v) for k, v in state.get("skipped", {}).items()})

    # -- reporting -----------------------------------------------------------------------------------
    def skip_report(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
        }

    def summary(self) -> str:
        """One line such as ``data: 1234 samples delivered, 3 skipped (truncated image: 2, ...)``."""
        return format_skip_summary(self.delivered, dict(self.skipped))
