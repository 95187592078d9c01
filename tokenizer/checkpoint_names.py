"""Checkpoint key names that differ between `transformers` releases.

transformers 5.2x renamed the attention projections of its ViT-family encoders (DINOv2, ViT, ...): older
releases call them ``attention.attention.{query,key,value}`` and ``attention.output.dense``, newer ones
``attention.{q,k,v,o}_proj``. A tokenizer saved under one release must load under the other, so keys are
matched to the names the live model uses, in either direction.
"""

from __future__ import annotations

from collections.abc import Iterable

ATTENTION_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _counterpart(name: str, expected: set[str]) -> str:
    """`name` under the other naming when the model knows that one, else `name` itself."""
    for older, newer in ATTENTION_RENAMES:
        for source, target in ((older, newer), (newer, older)):
            candidate = name.replace(source, target)
            if source in name and candidate in expected:
                return candidate
    return name


def match_state_dict_names(state: dict, expected_names: Iterable[str]) -> dict:
    """`state` with each key the model does not know renamed to its counterpart under the other naming,
    when the model knows that one (other keys are left alone, so real mismatches still show up)."""
    expected = set(expected_names)
    if expected.issuperset(state):
        return state
    return {name if name in expected else _counterpart(name, expected): tensor for name, tensor in state.items()}
