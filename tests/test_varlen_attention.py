"""The varlen plan behind `attention: flash_attention_2`: the block-causal mask as causal/full packed segments.

flash-attn cannot be built on this machine, so the kernel here is `reference_varlen_attention`, flash-attn's
semantics in plain PyTorch. What is tested is everything of ours: that the segments express exactly the
visibility rule (rebuilt mask == dense mask, for every layout the generator makes), and that a generator
running through the plan gives the same outputs and gradients as with SDPA's dense mask.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_generator_model import GRID, build_generator, latents, packed_example, text_model_dir, times  # noqa: F401
from unimm.models import varlen_attention
from unimm.models.backbone import resolve_attention
from unimm.models.sequence import SampleSpec, build_layout, visibility
from unimm.models.varlen_attention import BlockCausalAttention, plan_varlen, reference_varlen_attention


def mask_from_plan(plan, rows: int, query_length: int, key_length: int) -> torch.Tensor:
    """(rows, 1, Lq, Lk) the visibility the plan's kernel calls implement (bottom-right causal diagonal)."""
    mask = torch.zeros(rows * query_length, rows * key_length, dtype=torch.bool)
    for group, causal in plan.groups():
        for segment in range(len(group.cu_seqlens_q) - 1):
            queries = group.query_index[group.cu_seqlens_q[segment]:group.cu_seqlens_q[segment + 1]]
            keys = group.key_index[group.cu_seqlens_k[segment]:group.cu_seqlens_k[segment + 1]]
            for position, query in enumerate(queries):
                visible = keys[: position + 1 + len(keys) - len(queries)] if causal else keys
                assert not mask[query].any(), "a query appears in two segments"
                mask[query, visible] = True
    blocks = mask.view(rows, query_length, rows, key_length)
    assert not any(blocks[row, :, other].any() for row in range(rows) for other in range(rows) if row != other)
    return torch.stack([blocks[row, :, row] for row in range(rows)])[:, None]


LAYOUTS = {
    "text_to_image": lambda: build_layout([SampleSpec([5, 9, 14, 22]), SampleSpec([7]), SampleSpec([])], GRID),
    "edit": lambda: build_layout([SampleSpec([11, 19, 23], True), SampleSpec([], True), SampleSpec([4, 6])], GRID),
    "packed": lambda: build_layout(packed_example()[0], GRID, rows=[[0, 2], [1]]),
    "one_token_image": lambda: build_layout([SampleSpec([3, 4]), SampleSpec([8], True)], (1, 1)),
}


VIEWS = [(name, view) for name in sorted(LAYOUTS) for view in ("whole", "prefix", "cached_step", "uncached_step")
         if view == "whole" or name != "packed"]  # packed layouts have no KV-cached prefix


@pytest.mark.parametrize("name,view", VIEWS)
def test_plan_expresses_exactly_the_visibility_rule(name, view):
    layout = LAYOUTS[name]()
    prefix = layout.prefix_length
    queries, keys = {
        "whole": (slice(None), slice(None)),
        "prefix": (slice(0, prefix), slice(0, prefix)),
        "cached_step": (slice(prefix, None), slice(None)),  # noisy queries against the cached prefix + themselves
        "uncached_step": (slice(prefix, None), slice(prefix, None)),
    }[view]
    ids = (layout.sample_ids[:, queries], layout.block_ids[:, queries], layout.sample_ids[:, keys], layout.block_ids[:, keys])
    plan = plan_varlen(*ids)
    rows, query_length = ids[0].shape
    assert torch.equal(mask_from_plan(plan, rows, query_length, ids[2].shape[1]), visibility(*ids))


def test_plan_uses_few_segments():
    """Text runs are one causal segment each, not one per token: text-to-image is 2 segments per sample."""
    layout = build_layout([SampleSpec(list(range(3, 40))), SampleSpec(list(range(3, 20)))], GRID, rows=[[0, 1]])
    plan = plan_varlen(layout.sample_ids, layout.block_ids, layout.sample_ids, layout.block_ids)
    assert len(plan.causal.cu_seqlens_q) - 1 == 2 and len(plan.full.cu_seqlens_q) - 1 == 2
    assert plan.causal.max_seqlen_q == 37 and plan.full.max_seqlen_k == 37 + GRID[0] * GRID[1]


def test_plan_refuses_blocks_out_of_order():
    samples = torch.zeros(1, 3, dtype=torch.long)
    blocks = torch.tensor([[0, 2, 1]])
    with pytest.raises(ValueError, match="blocks decrease"):
        plan_varlen(samples, blocks, samples, blocks)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_kernel_matches_dense_attention(causal):
    """Two segments (3 queries / 5 keys, 2 / 2), 4 query heads on 2 kv heads."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(count, heads, 8, generator=generator) for count, heads in ((5, 4), (7, 2), (7, 2)))
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 5, 7], dtype=torch.int32)
    output = reference_varlen_attention(q, k, v, cu_q, cu_k, 3, 5, softmax_scale=0.3, causal=causal)
    for (q0, q1), (k0, k1) in (((0, 3), (0, 5)), ((3, 5), (5, 7))):
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1].repeat_interleave(2, dim=1)) * 0.3
        if causal:  # bottom-right: the last query sees every key
            m, n = q1 - q0, k1 - k0
            scores = scores.masked_fill(torch.arange(n)[None] > torch.arange(m)[:, None] + n - m, float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[k0:k1].repeat_interleave(2, dim=1))
        torch.testing.assert_close(output[q0:q1], expected, atol=1e-6, rtol=1e-5)


@pytest.fixture
def counted_kernel():
    calls = []

    def kernel(*args, causal, **kwargs):
        calls.append(causal)
        return reference_varlen_attention(*args, causal=causal, **kwargs)

    previous = varlen_attention.set_kernel_override(kernel)
    yield calls
    varlen_attention.set_kernel_override(previous)


def test_generator_through_the_plan_matches_sdpa_with_gradients(text_model_dir, counted_kernel):  # noqa: F811
    """Training: the same loss and the same gradients as SDPA's dense mask, and both kernel groups ran."""
    specs, noisy, t, clean = packed_example()
    layout = build_layout(specs, GRID, rows=[[0, 2], [1]])
    results = {}
    for implementation in ("sdpa", varlen_attention.IMPLEMENTATION_NAME):
        model = build_generator(text_model_dir)
        model.backbone.config._attn_implementation = implementation
        loss = model(layout, noisy, t, clean).square().mean()
        loss.backward()
        results[implementation] = (loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    layers = build_generator(text_model_dir).backbone.config.num_hidden_layers
    assert sorted(set(counted_kernel)) == [False, True] and len(counted_kernel) == 2 * layers
    (loss_sdpa, grads_sdpa), (loss_varlen, grads_varlen) = results.values()
    torch.testing.assert_close(loss_varlen, loss_sdpa, atol=1e-6, rtol=1e-5)
    assert grads_sdpa.keys() == grads_varlen.keys() and len(grads_sdpa) > 10
    for name in grads_sdpa:
        torch.testing.assert_close(grads_varlen[name], grads_sdpa[name], atol=1e-5, rtol=1e-4, msg=name)


def test_flash_attention_2_request_runs_the_plan(text_model_dir, tmp_path):  # noqa: F811
    from unimm.models.generator import UnimmGenerator

    assert resolve_attention("flash_attention_2") == varlen_attention.IMPLEMENTATION_NAME
    assert resolve_attention("sdpa") == "sdpa"
    model = build_generator(text_model_dir)
    model.save_pretrained(tmp_path)
    loaded = UnimmGenerator.from_pretrained(tmp_path, attention="flash_attention_2")
    assert loaded.backbone.config._attn_implementation == varlen_attention.IMPLEMENTATION_NAME
    layout = build_layout([SampleSpec([5, 9])], GRID)
    with torch.no_grad():  # no flash-attn and a CPU float32 tensor: the dense-mask SDPA fallback
        torch.testing.assert_close(loaded(layout, latents(1, 0), times(1, 0)), model(layout, latents(1, 0), times(1, 0)))


def test_the_attention_function_needs_the_generator_mask(text_model_dir):  # noqa: F811
    model = build_generator(text_model_dir)
    model.backbone.config._attn_implementation = varlen_attention.IMPLEMENTATION_NAME
    with pytest.raises(TypeError, match="BlockCausalAttention"):
        model.backbone(inputs_embeds=torch.zeros(1, 3, model.hidden_size))
    layout = build_layout([SampleSpec([1])], GRID)
    assert isinstance(layout.visibility(), BlockCausalAttention)
    assert layout.visibility(slice(2, None)) is layout.visibility(slice(2, None))  # one plan per view, reused every step
