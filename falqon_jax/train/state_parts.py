"""The two parts of a train state: what training changes, and the frozen rest.

A step's checkpoint holds only the changing part: the trainable parameters (FALQON's ``b``,
LoRA's factors, everything under ``full``), the optimizer state (AdamW moments, FALQON proxy
buffers and step count) and the step counter. The frozen part -- FP8 backbone weights and
their scales, FALQON's ``A`` rows (they share ``w8``), norms, embeddings, unconverted
layers -- is written once per run. The FALQON rules that merge rows into the FP8 weights
(``visible_merge``, ``paper``, ``reference``) change ``w8``, so under them every melded
``w8`` belongs to the changing part (its scale never changes).

Parts are plain nested dicts keyed by the state's path names (``params/layers/mlp/up_proj/b``,
``opt_state/0/mu/...``), so Orbax stores them as readable trees of arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from falqon_jax import rules
from falqon_jax.melded import is_melded
from falqon_jax.model import methods
from falqon_jax.tree_paths import nested_get, nested_set, path_names


def rule_writes_w8(method: str, rule: str) -> bool:
    """Whether training with ``method``/``rule`` changes the melded FP8 weights (a melded
    method under a rule that merges into them)."""
    return methods.get(method).melded and rules.get(rule).merges_into_w8


def changing_mask(state: Any, trainable: Any, *, writes_w8: bool) -> Any:
    """Bool tree shaped like ``state`` (a :class:`~falqon_jax.train.trainer.TrainState`):
    ``True`` for leaves that training changes.

    ``trainable`` is the model's trainable mask over ``state.params``; ``writes_w8`` adds
    every melded ``w8`` (the merging rules, see :func:`rule_writes_w8`).
    """
    params = trainable
    if writes_w8:
        params = jax.tree.map(lambda m: dataclasses.replace(m, w8=True) if is_melded(m) else m,
                              trainable, is_leaf=is_melded)
    everything = jax.tree.map(lambda _: True, state)
    return everything._replace(params=params)


def _paths(tree: Any, mask: Any) -> list[tuple[tuple[str, ...], bool, Any]]:
    """``(names, selected, leaf)`` for every leaf of ``tree`` (``mask`` has its structure)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    flags = jax.tree.leaves(mask)
    if len(flags) != len(leaves):
        raise ValueError(f"mask has {len(flags)} leaves, the tree {len(leaves)}")
    return [(path_names(path), bool(flag), leaf)
            for (path, leaf), flag in zip(leaves, flags, strict=True)]


def select(tree: Any, mask: Any) -> dict[str, Any]:
    """The leaves of ``tree`` where ``mask`` is true, as a nested dict of path names."""
    part: dict[str, Any] = {}
    for names, selected, leaf in _paths(tree, mask):
        if selected:
            nested_set(part, names, leaf)
    return part


def invert(mask: Any) -> Any:
    """The complementary mask."""
    return jax.tree.map(lambda m: not m, mask)


def fill(tree: Any, mask: Any, part: dict[str, Any]) -> Any:
    """``tree`` with its leaves where ``mask`` is true taken from ``part`` (as
    :func:`select` made it)."""
    leaves = []
    for names, selected, leaf in _paths(tree, mask):
        leaves.append(nested_get(part, names) if selected else leaf)
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    """One nested dict with the leaves of all ``parts`` (nested dicts of path names, as
    :func:`select` makes them, holding disjoint leaves: e.g. a run's frozen params and a
    step's changing ones). Raises ``ValueError`` for a path in two parts."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in merged:
                merged[key] = value
            elif isinstance(merged[key], dict) and isinstance(value, dict):
                merged[key] = merge(merged[key], value)
            else:
                raise ValueError(f"{key!r} is in two parts")
    return merged
