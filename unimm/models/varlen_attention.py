"""The block-causal mask as flash-attn varlen calls: the optional fast path behind `attention: flash_attention_2`.

flash-attn has no arbitrary masks, only packed variable-length sequences (`cu_seqlens`) that are either
causal or full, with the causal diagonal aligned bottom-right when a sequence has fewer queries than keys.
The generator's rule (token i sees token j iff same sample and ``block[j] <= block[i]``, see `sequence.py`)
splits exactly into such sequences, one per *segment* of a sample:

- a run of text tokens (each its own block) is **causal** against the sample's keys up to the run's end:
  with the keys ``[earlier segments..., the run]`` the bottom-right diagonal lets run token k see everything
  before it and itself;
- the tokens of one image (one block) are **full** against the sample's keys up to the image's end;
- a padding token is full against itself alone.

So one step is two kernel calls (all causal segments, all full segments) on gathered queries and keys;
the keys of a segment are its sample's prefix, gathered again for each segment that needs them (for
text-to-image: text twice, image once). The same plan serves the KV-cached sampler, whose queries are the
last columns of the keys.

When flash-attn is not installed, or the tensors are not CUDA fp16/bf16, the call runs PyTorch SDPA with
the dense boolean mask: the same numbers, the memory of the dense mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

# (no "flash" in the name: transformers would then try to import its own flash-attn integration)
IMPLEMENTATION_NAME = "unimm_block_varlen"

# The kernel tests inject (`reference_varlen_attention`) so the plan is checked on the CPU; None = flash-attn.
_kernel_override: Callable | None = None


@dataclass
class VarlenGroup:
    """Segments that share one kernel call (all causal, or all full)."""

    query_index: torch.Tensor  # (total_q,) flat query positions, row * Lq + column
    key_index: torch.Tensor  # (total_k,) flat key positions, row * Lk + column
    cu_seqlens_q: torch.Tensor  # (segments + 1,) int32 cumulative query counts
    cu_seqlens_k: torch.Tensor  # (segments + 1,) int32 cumulative key counts
    max_seqlen_q: int
    max_seqlen_k: int

    def to(self, device) -> VarlenGroup:
        return VarlenGroup(self.query_index.to(device), self.key_index.to(device), self.cu_seqlens_q.to(device),
                           self.cu_seqlens_k.to(device), self.max_seqlen_q, self.max_seqlen_k)


@dataclass
class VarlenPlan:
    causal: VarlenGroup | None
    full: VarlenGroup | None

    def groups(self):
        """(group, causal) pairs of the groups that have segments."""
        return [(group, causal) for group, causal in ((self.causal, True), (self.full, False)) if group is not None]


def _group(segments: list[tuple[np.ndarray, np.ndarray]]) -> VarlenGroup | None:
    if not segments:
        return None
    query_lengths = np.array([len(queries) for queries, _ in segments])
    key_lengths = np.array([len(keys) for _, keys in segments])
    return VarlenGroup(
        query_index=torch.from_numpy(np.concatenate([queries for queries, _ in segments])),
        key_index=torch.from_numpy(np.concatenate([keys for _, keys in segments])),
        cu_seqlens_q=torch.from_numpy(np.concatenate([[0], np.cumsum(query_lengths)]).astype(np.int32)),
        cu_seqlens_k=torch.from_numpy(np.concatenate([[0], np.cumsum(key_lengths)]).astype(np.int32)),
        max_seqlen_q=int(query_lengths.max()),
        max_seqlen_k=int(key_lengths.max()),
    )


def plan_varlen(query_samples: torch.Tensor, query_blocks: torch.Tensor, key_samples: torch.Tensor, key_blocks: torch.Tensor) -> VarlenPlan:
    """The segments of the visibility rule for queries (rows, Lq) against keys (rows, Lk).

    The queries are the last Lq key columns (Lq == Lk without a cache). Within a sample, blocks must not
    decrease along the row, which every `build_layout` layout satisfies.
    """
    query_samples, query_blocks = query_samples.cpu().numpy(), query_blocks.cpu().numpy()
    key_samples, key_blocks = key_samples.cpu().numpy(), key_blocks.cpu().numpy()
    rows, query_length = query_samples.shape
    key_length = key_samples.shape[1]
    offset = key_length - query_length
    if offset < 0:
        raise ValueError(f"more queries ({query_length}) than keys ({key_length})")
    causal, full = [], []
    for row in range(rows):
        query_base, key_base = row * query_length, row * key_length
        for pad in np.flatnonzero(query_samples[row] < 0):  # padding sees only itself
            full.append((np.array([query_base + pad]), np.array([key_base + offset + pad])))
        for sample in np.unique(query_samples[row][query_samples[row] >= 0]):
            query_columns = np.flatnonzero(query_samples[row] == sample)
            key_columns = np.flatnonzero(key_samples[row] == sample)
            sample_query_blocks, sample_key_blocks = query_blocks[row, query_columns], key_blocks[row, key_columns]
            if np.any(np.diff(sample_query_blocks) < 0) or np.any(np.diff(sample_key_blocks) < 0):
                raise ValueError(f"sample {sample}: blocks decrease along row {row}; the varlen plan needs them in order")
            blocks, first, counts = np.unique(sample_query_blocks, return_index=True, return_counts=True)
            is_full = counts > 1
            # A segment starts at every multi-token block and at a single-token block that follows one (or is first).
            starts = is_full | np.concatenate([[True], is_full[:-1]])
            segment_of_block = np.cumsum(starts) - 1
            for segment in range(segment_of_block[-1] + 1):
                members = np.flatnonzero(segment_of_block == segment)
                begin, end = first[members[0]], first[members[-1]] + counts[members[-1]]
                queries = query_columns[begin:end]
                key_count = int(np.searchsorted(sample_key_blocks, blocks[members[-1]], side="right"))
                keys = key_columns[:key_count]
                segment_is_causal = not is_full[members[0]] and len(members) > 1
                if segment_is_causal and not np.array_equal(keys[key_count - len(queries):], queries + offset):
                    raise ValueError(f"sample {sample}: a text run is not the end of its keys; the varlen plan cannot express it")
                (causal if segment_is_causal else full).append((query_base + queries, key_base + keys))
    return VarlenPlan(causal=_group(causal), full=_group(full))


class BlockCausalAttention:
    """What the generator hands the backbone as its attention mask under this implementation: the sample and
    block ids of the queries and keys, from which the varlen plan (fast path) or the dense mask (fallback)
    is built once per forward and shared by every layer."""

    def __init__(self, query_samples, query_blocks, key_samples, key_blocks):
        self.query_samples, self.query_blocks = query_samples, query_blocks
        self.key_samples, self.key_blocks = key_samples, key_blocks

    @cached_property
    def plan(self) -> VarlenPlan:
        device = self.query_samples.device
        plan = plan_varlen(self.query_samples, self.query_blocks, self.key_samples, self.key_blocks)
        return VarlenPlan(*(None if group is None else group.to(device) for group in (plan.causal, plan.full)))

    @cached_property
    def dense(self) -> torch.Tensor:
        from unimm.models.sequence import visibility

        return visibility(self.query_samples, self.query_blocks, self.key_samples, self.key_blocks)


@functools.cache
def flash_varlen_kernel():
    """flash-attn's `flash_attn_varlen_func`, or None when it is not installed (looked up once: a failed import
    would otherwise search the path again in every layer of every step)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def select_kernel(query: torch.Tensor) -> Callable | None:
    if _kernel_override is not None:
        return _kernel_override
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return flash_varlen_kernel()
    return None


def set_kernel_override(kernel: Callable | None) -> Callable | None:
    """Run every varlen call through `kernel` (on any device and dtype); returns the previous override."""
    global _kernel_override
    previous, _kernel_override = _kernel_override, kernel
    return previous


def reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
    """flash_attn_varlen_func's semantics in plain PyTorch, one segment at a time: q (total_q, heads, dim),
    k/v (total_k, kv_heads, dim) with query head h reading kv head h // (heads / kv_heads); a causal
    segment of m queries and n keys lets query i see keys j <= i + n - m (bottom-right diagonal)."""
    if dropout_p:
        raise ValueError("the reference kernel has no dropout")
    groups = q.shape[1] // k.shape[1]
    outputs = []
    for segment in range(len(cu_seqlens_q) - 1):
        q_begin, q_end = int(cu_seqlens_q[segment]), int(cu_seqlens_q[segment + 1])
        k_begin, k_end = int(cu_seqlens_k[segment]), int(cu_seqlens_k[segment + 1])
        queries = q[q_begin:q_end].transpose(0, 1)  # (heads, m, dim)
        keys = k[k_begin:k_end].transpose(0, 1).repeat_interleave(groups, dim=0)
        values = v[k_begin:k_end].transpose(0, 1).repeat_interleave(groups, dim=0)
        mask = None
        if causal:
            m, n = q_end - q_begin, k_end - k_begin
            mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(m, device=q.device)[:, None] + (n - m)
        out = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=softmax_scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """A transformers attention function: query (B, H, Lq, D), key/value (B, Hkv, Lk, D) -> (B, Lq, H, D)."""
    if not isinstance(attention_mask, BlockCausalAttention):
        raise TypeError(f"{IMPLEMENTATION_NAME} needs the generator's BlockCausalAttention as its mask, got {type(attention_mask).__name__}")
    kernel = select_kernel(query)
    if kernel is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask.dense, dropout=dropout, scaling=scaling)
    batch, heads, query_length, dim = query.shape
    flat_query = query.transpose(1, 2).reshape(batch * query_length, heads, dim)
    flat_key = key.transpose(1, 2).reshape(-1, key.shape[1], dim)
    flat_value = value.transpose(1, 2).reshape(-1, value.shape[1], dim)
    output = flat_query.new_zeros(flat_query.shape)
    for group, causal in attention_mask.plan.groups():
        segment_output = kernel(
            flat_query[group.query_index], flat_key[group.key_index], flat_value[group.key_index],
            group.cu_seqlens_q, group.cu_seqlens_k, group.max_seqlen_q, group.max_seqlen_k,
            dropout_p=dropout, softmax_scale=scaling, causal=causal,
        )
        output = output.index_copy(0, group.query_index, segment_output.to(output.dtype))
    return output.view(batch, query_length, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION_NAME, varlen_attention_forward)
