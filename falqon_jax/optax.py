"""FALQON's update of melded layers as an optax ``GradientTransformation``.

Use it last in a chain::

    tx = optax.chain(
        optax.clip_by_global_norm(3.0),
        optax.masked(optax.adamw(2e-3), trainable_mask),  # or plain optax.adamw(2e-3)
        falqon_update(),                                  # rule="visible", the default
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

For every :class:`~falqon_jax.melded.MeldedLinear` in ``params`` (stacked ones too: top-k is
per matrix) the ``rule`` (:mod:`falqon_jax.rules`) decides where the incoming update ``u_b``
of ``b`` goes: into ``b``, a live adapter (``visible``, the default: ``w8`` is not touched
while training); or also into ``w8`` by row-wise top-k merges (``visible_merge``; the paper's
proxy buffer, ``paper`` and ``reference``), which :mod:`falqon_jax.merging` carries out.

A matrix whose incoming update is exactly zero (no optimizer step happened: accumulation
mini-steps of ``optax.MultiSteps``, a zero learning rate) merges nothing and keeps its buffer.
``updates`` may hold ``None`` for leaves that were not differentiated; ``None`` passes
through. Incoming updates for ``w8`` and ``scale`` (zero gradients, or weight decay) are
discarded; with the proxy rules ``b`` gets a zero update, so it stays exactly zero. Every
other leaf passes through unchanged. A merge reaches ``w8`` as a :class:`RowMerge` that
``optax.apply_updates`` writes in place (``k`` rows; zero rows for ``visible``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from falqon_jax import rules
from falqon_jax.melded import MeldedLinear, is_melded
from falqon_jax.merging import (
    FalqonState,
    RowMerge,
    fold_live_rows,
    keep_b,
    melded_transform,
    merge_buffer_rows,
    merge_rows,
    rows_to_merge,
)

__all__ = ["FalqonState", "RowMerge", "falqon_optimizer", "falqon_update", "merge_rows",
           "trainable_mask"]


def falqon_update(
    top_k: int | None = 10,
    *,
    rule: str | rules.Rule = rules.DEFAULT_RULE,
    reset: str = "merged",
    rounding: str = "nearest",
    seed: int = 0,
) -> optax.GradientTransformation:
    """FALQON's update of the melded layers' ``b`` (and of their FP8 weights).

    Args:
      top_k: rows merged per matrix per step by ``paper`` and ``visible_merge`` (the paper
        uses 10; ``None`` merges every row). Must not exceed any melded layer's ``out``.
      rule: how ``b``'s update reaches the model, a name in :data:`falqon_jax.rules.RULES`:
        ``"visible"`` (default; ``b`` a live adapter, nothing merged while training; exports
        fold ``b A`` in exactly), ``"visible_merge"`` (then the top-``k`` rows of ``b`` by L1
        norm are merged into ``w8`` wherever an entry's change reaches a full FP8 step; the
        remainder goes back into ``b``, least squares on ``A``'s rows), ``"paper"`` (``b``
        stays zero; updates accumulate in a float32 buffer whose top-``k`` rows are merged
        into ``w8`` each step, then cleared by ``reset``), ``"reference"`` (the authors'
        code: ``k = rank``, the whole buffer cleared; ``top_k`` and ``reset`` are ignored).
      reset: for ``paper``: ``"merged"`` clears only the merged rows of the buffer (the
        paper), ``"all"`` the whole buffer.
      rounding: how merged entries are rounded to E4M3: ``"nearest"``, ``"stochastic"``
        (unbiased: up with probability equal to the fraction of the step), or
        ``"feedback"`` (nearest, and the merged rows' rounding residual is written back into
        the proxy buffer instead of being cleared; ``visible_merge`` always keeps its
        remainder, so there it equals ``"nearest"``).
      seed: seeds stochastic rounding (with the step count and the layer's position).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``. Its state is a
      :class:`FalqonState` (float32 proxy buffers, empty without them, and an int32 count).

    Layers must match the rule: live-``b`` rules need melded layers built with
    ``b_in_forward=True`` (the default of :func:`falqon_jax.melded.init`), the proxy rules
    ``b_in_forward=False``; a mismatch raises ``ValueError``.
    """
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    chosen = rules.get(rule)
    rules.check_reset(reset)
    rules.check_rounding(rounding)
    if not chosen.merges_into_w8:
        step = keep_b
    elif chosen.live_b:
        step = functools.partial(_fold, top_k, chosen, rounding)
    else:
        step = functools.partial(_merge_buffer, top_k, chosen,
                                 "all" if chosen.clears_all else reset, rounding)
    return melded_transform(chosen, step, seed)


def _fold(top_k, rule, rounding, seen):
    return fold_live_rows(seen, rows_to_merge(top_k, rule, seen.layer, seen.names), rounding)


def _merge_buffer(top_k, rule, reset, rounding, seen):
    k = rows_to_merge(top_k, rule, seen.layer, seen.names)
    return merge_buffer_rows(seen, k, reset, rounding)


def trainable_mask(params: optax.Params) -> Any:
    """Bool pytree shaped like ``params``: False for ``w8``/``scale`` of melded layers.

    Pass it to ``optax.masked`` so the inner optimizer keeps no state for the frozen FP8
    weights (plain ``optax.adamw`` works too, but allocates moments for them).
    """

    def mark(leaf):
        if is_melded(leaf):
            return MeldedLinear(w8=False, scale=False, b=True, out=leaf.out, rank=leaf.rank,
                                b_in_forward=leaf.b_in_forward)
        return jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)

    return jax.tree.map(mark, params, is_leaf=is_melded)


def falqon_optimizer(
    inner: optax.GradientTransformation,
    top_k: int | None = 10,
    *,
    rule: str | rules.Rule = rules.DEFAULT_RULE,
    reset: str = "merged",
    rounding: str = "nearest",
    seed: int = 0,
    every_k: int = 1,
) -> optax.GradientTransformation:
    """``inner`` (e.g. clipping + AdamW) on the trainable leaves, then :func:`falqon_update`
    (``top_k``, ``rule``, ``reset``, ``rounding`` and ``seed`` are passed to it).

    Equivalent to ``optax.chain(optax.masked(inner, trainable_mask), falqon_update(...))``,
    with ``inner`` wrapped in ``optax.MultiSteps(inner, every_k)`` for gradient accumulation
    when ``every_k > 1`` (mini-steps emit zero updates, so nothing merges until the
    accumulated step).

    The mask matters: ``jax.grad`` returns float8 zero cotangents for ``w8``. optax cannot
    add those to float32 values (``clip_by_global_norm``'s norm, ``MultiSteps``'
    accumulators: jnp refuses implicit float8 promotion), and AdamW would keep two dense
    moments per frozen weight. Masked, the inner optimizer only ever sees trainable leaves.
    """
    if every_k < 1:
        raise ValueError(f"every_k must be >= 1, got {every_k}")
    if every_k > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=every_k)
    merge = falqon_update(top_k, rule=rule, reset=reset, rounding=rounding, seed=seed)
    return optax.chain(optax.masked(inner, trainable_mask), merge)
