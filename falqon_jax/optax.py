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
per matrix) the ``rule`` decides where the incoming update ``u_b`` of ``b`` goes:

* ``visible`` (default): into ``b`` itself, a live adapter in the forward pass
  (``y += (A x) b^T``); ``w8`` is not touched while training. Nothing rounds away.
* ``visible_merge``: as ``visible``, then the top-``k`` rows of ``b`` are folded into ``w8``
  wherever an entry's change reaches a full FP8 step; the remainder stays in ``b``.
* ``paper`` (the paper's proxy update; ``b`` stays zero and invisible), each step:

  1. ``Buf += u_b`` in a float32 proxy buffer ``Buf (..., out, rank)``;
  2. rank the rows of ``Buf`` by their L1 norm and pick the top ``k``;
  3. merge them into the FP8 backbone with the existing scale,
     ``W8[K] = Q(DQ(W8[K]) + Buf[K] @ A)`` (saturating at the E4M3 max; ``rounding`` picks
     nearest, stochastic, or nearest with the residual fed back into ``Buf``);
  4. clear the merged rows (``reset="merged"``) or the whole buffer (``reset="all"``).
* ``reference`` (the authors' code): ``paper`` with ``k = rank`` and ``reset="all"``.

A matrix whose incoming update is exactly zero (no optimizer step happened: accumulation
mini-steps of ``optax.MultiSteps``, a zero learning rate) merges nothing and keeps its buffer.

``updates`` may hold ``None`` for leaves that were not differentiated (for example when
gradients are taken only with respect to the trainable leaves); ``None`` passes through.
Incoming updates for ``w8`` and ``scale`` (zero gradients, or weight decay) are discarded;
with the proxy rules ``b`` gets a zero update, so it stays exactly zero. Every other leaf
passes through unchanged.

How a merge reaches the weights: the update for ``w8`` is a :class:`RowMerge` -- the ``k``
row indices and their increments in quantized units (rounded to nearest by the merge itself;
stochastic, feedback and ``visible_merge`` pass exact increments they rounded already) --
instead of a dense array. ``optax.apply_updates`` computes ``w8 + update``;
``RowMerge.__radd__`` turns that into a write of ``k`` rows into ``w8`` (zero rows for
``visible``). So plain ``optax.apply_updates`` works, untouched rows stay bit-identical, and
with the params donated to ``jax.jit`` the weight is updated in place without any dense
temporary (a dense ``w8``-shaped update would cost ``out x in`` bytes per matrix).
``RowMerge`` is linear under the masks optax applies (``optax.MultiSteps`` multiplies updates
by 0 or 1, ``apply_if_finite`` selects zeros): an all-zero ``RowMerge`` leaves ``w8``
bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from falqon_jax import fp8
from falqon_jax.melded import MeldedLinear, is_melded

Resets = Literal["merged", "all"]


class FalqonState(NamedTuple):
    """Optimizer state: one float32 proxy buffer ``(..., out, rank)`` per melded matrix
    (proxy rules only; empty for ``visible*``) and the int32 step count.

    ``buffers`` is a nested dict mirroring the params' paths (e.g.
    ``{"layers": {"mlp": {"up": Array}}}``), so checkpoints stay readable.
    """

    buffers: dict[str, Any]
    count: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowMerge:
    """A sparse update of an FP8 weight: add ``delta`` to the rows ``rows`` of ``w8``.

    Fields (leading axes ``...`` for stacked layers):
      rows: int32 ``(..., k)`` -- row indices into ``w8``.
      delta: float32 ``(..., k, in)`` -- the increments in quantized units (already divided by
        the weight's scale), so ``w8[rows] <- Q_sat(w8[rows] + delta)``.

    ``w8 + row_merge`` (Python's reflected add, which is what ``optax.apply_updates`` calls)
    returns the merged ``w8``. Rows whose ``delta`` is exactly zero keep their bits.
    """

    rows: jax.Array
    delta: jax.Array

    # NumPy must not broadcast this object elementwise; let it defer to __radd__.
    __array_ufunc__ = None

    def __radd__(self, w8: jax.Array) -> jax.Array:
        return merge_rows(w8, self.rows, self.delta)

    __add__ = __radd__


def merge_rows(w8: jax.Array, rows: jax.Array, delta: jax.Array) -> jax.Array:
    """``w8[rows] <- Q_sat(w8[rows] + delta)`` with the existing scale.

    Args:
      w8: float8 ``(..., R, in)``.
      rows: int32 ``(..., k)``.
      delta: float32 ``(..., k, in)``, in quantized units.

    Returns:
      ``w8`` with the ``k`` rows rewritten; entries whose ``delta`` is zero are unchanged.

    The rows are written one by one with ``dynamic_update_slice`` in a loop: unlike a
    scatter (whose float8 combiner XLA's CPU backend widens by converting the *whole*
    weight to float16) it updates a donated buffer in place, touching only ``k`` rows.
    """
    w8 = jnp.asarray(w8)
    shape = w8.shape
    if rows.shape[-1] == 0:
        return w8
    stacked = w8.reshape((-1,) + shape[-2:])  # (L, R, in)
    flat_rows = jnp.reshape(rows, (-1,)).astype(jnp.int32)  # (L * k,)
    k = rows.shape[-1]
    old = jnp.take_along_axis(stacked, jnp.reshape(rows, (-1, k, 1)), axis=1)  # (L, k, in)
    new = _add_saturating(old, jnp.reshape(delta, old.shape)).reshape(-1, 1, shape[-1])

    def write_row(i, w):
        layer = i // k
        return jax.lax.dynamic_update_slice(w, new[i][None], (layer, flat_rows[i], 0))

    stacked = jax.lax.fori_loop(0, flat_rows.shape[0], write_row, stacked)
    return stacked.reshape(shape)


def _add_saturating(old: jax.Array, delta: jax.Array) -> jax.Array:
    """``Q_sat(old + delta)`` in ``old``'s float8 dtype; entries with ``delta == 0`` keep
    their exact bits (even ``-0``)."""
    limit = fp8.fp8_max(old.dtype)
    summed = jnp.clip(old.astype(jnp.float32) + delta, -limit, limit).astype(old.dtype)
    return jnp.where(delta == 0, old, summed)


RULES = ("visible", "visible_merge", "paper", "reference")
ROUNDINGS = ("nearest", "stochastic", "feedback")
DEFAULT_RULE = "visible"
_PROXY_RULES = ("paper", "reference")
_MERGING_RULES = ("visible_merge", *_PROXY_RULES)


def rule_uses_live_b(rule: str) -> bool:
    """Whether layers trained by ``rule`` add ``(A x) b^T`` in the forward pass
    (:attr:`~falqon_jax.melded.MeldedLinear.b_in_forward`)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    return rule not in _PROXY_RULES


def rule_merges_into_w8(rule: str) -> bool:
    """Whether ``rule`` writes merged rows into the melded FP8 weights ``w8`` (every rule
    but ``visible``, which never changes them while training)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    return rule in _MERGING_RULES


def falqon_update(
    top_k: int | None = 10,
    *,
    rule: str = DEFAULT_RULE,
    reset: Resets = "merged",
    rounding: str = "nearest",
    seed: int = 0,
) -> optax.GradientTransformation:
    """FALQON's update of the melded layers' ``b`` (and of their FP8 weights).

    Args:
      top_k: rows merged per matrix per step by ``paper`` and ``visible_merge`` (the paper
        uses 10; ``None`` merges every row). Must not exceed any melded layer's ``out``.
      rule: how ``b``'s update reaches the model.

        * ``"visible"`` (default): ``b`` is a live adapter in the forward pass
          (``y += (A x) b^T``); its update is applied to ``b`` directly and nothing is
          merged into ``w8`` while training (exports fold ``b A`` in exactly).
        * ``"visible_merge"``: as ``visible``, then the top-``k`` rows of ``b`` (by L1 norm)
          are merged into ``w8`` wherever an entry's change reaches a full FP8 step of that
          entry; the unapplied remainder goes back into ``b`` (least squares on ``A``'s rows).
        * ``"paper"``: the paper's proxy buffer: ``b`` stays zero, updates accumulate in a
          float32 buffer whose top-``k`` rows are merged into ``w8`` each step, then cleared
          (``reset``).
        * ``"reference"``: the authors' code: the proxy buffer with ``k = rank`` and the whole
          buffer cleared after every merge (``top_k`` and ``reset`` are ignored).
      reset: for ``paper``: ``"merged"`` clears only the merged rows of the buffer (the
        paper), ``"all"`` the whole buffer.
      rounding: how merged entries are rounded to E4M3: ``"nearest"`` (round to nearest
        even), ``"stochastic"`` (unbiased: up with probability equal to the fraction of the
        step), or ``"feedback"`` (nearest, and the rounding residual of the merged rows is
        written back into the proxy buffer instead of being cleared; ``visible_merge``
        always keeps its remainder, so there it equals ``"nearest"``).
      seed: seeds stochastic rounding (with the step count and the layer's position).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``. Its state is a
      :class:`FalqonState` (a plain pytree: float32 buffers and an int32 step count).

    Layers must match the rule: ``visible*`` rules need melded layers built with
    ``b_in_forward=True`` (the default of :func:`falqon_jax.melded.init`), the proxy rules
    ``b_in_forward=False``; a mismatch raises ``ValueError``.
    """
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    live = rule_uses_live_b(rule)
    if reset not in ("merged", "all"):
        raise ValueError(f'reset must be "merged" or "all", got {reset!r}')
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")

    def init_fn(params: optax.Params) -> FalqonState:
        buffers: dict[str, Any] = {}
        for path, layer in _melded_layers(params):
            _check_layer(layer, path, rule, live)
            if not live:
                _nested_set(buffers, path, jnp.zeros(layer.b.shape, jnp.float32))
        return FalqonState(buffers, jnp.zeros((), jnp.int32))

    def update_fn(updates, state: FalqonState, params=None):
        if params is None:
            raise ValueError("falqon_update needs params: call tx.update(grads, state, params)")
        new_buffers: dict[str, Any] = {}
        base_key = jax.random.fold_in(jax.random.key(seed), state.count)
        position = iter(range(1 << 30))

        def visit(path, update, layer):
            if not is_melded(layer):
                return update
            names = _path_names(path)
            _check_layer(layer, names, rule, live)
            key = jax.random.fold_in(base_key, next(position))
            incoming = update.b.astype(jnp.float32)
            stepped = jnp.any(incoming != 0, axis=(-2, -1))  # per (stacked) matrix
            if rule == "visible":
                return _layer_update(layer, _no_merge(layer), update.b)
            if rule == "visible_merge":
                k = _resolve_k(top_k, layer, names)
                rows, delta, u_b = _merge_live_rows(layer, incoming, stepped, k, rounding, key)
                return _layer_update(layer, RowMerge(rows, delta), u_b)
            buffer = _nested_get(state.buffers, names) + incoming
            if rule == "reference":
                k, layer_reset = layer.rank, "all"
            else:
                k, layer_reset = _resolve_k(top_k, layer, names), reset
            rows, delta, buffer = _select_and_reset(buffer, stepped, layer, k, layer_reset,
                                                    rounding, key)
            _nested_set(new_buffers, names, buffer)
            return _layer_update(layer, RowMerge(rows, delta), jnp.zeros_like(layer.b))

        new_updates = jax.tree_util.tree_map_with_path(
            visit, updates, params, is_leaf=_melded_or_none
        )
        return new_updates, FalqonState(new_buffers, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_layer(layer: MeldedLinear, names, rule: str, live: bool) -> None:
    if layer.b_in_forward != live:
        where = "/".join(names) or "params"
        how = "b_in_forward=True" if live else "b_in_forward=False"
        raise ValueError(
            f"rule {rule!r} needs melded layers built with {how}, but {where} has "
            f"b_in_forward={layer.b_in_forward}: build them with melded.init(..., {how})"
        )


def _layer_update(layer: MeldedLinear, w8_update: RowMerge, b_update: jax.Array) -> MeldedLinear:
    return MeldedLinear(
        w8=w8_update,
        scale=jnp.zeros_like(layer.scale),
        b=b_update,
        out=layer.out,
        rank=layer.rank,
        b_in_forward=layer.b_in_forward,
    )


def _no_merge(layer: MeldedLinear) -> RowMerge:
    """A :class:`RowMerge` of zero rows: ``w8`` is left as it is."""
    lead = layer.w8.shape[:-2]
    return RowMerge(rows=jnp.zeros(lead + (0,), jnp.int32),
                    delta=jnp.zeros(lead + (0, layer.w8.shape[-1]), jnp.float32))


def _top_rows(matrix: jax.Array, k: int) -> jax.Array:
    """Indices int32 ``(..., k)`` of the ``k`` rows of ``matrix (..., out, r)`` with the
    largest L1 norm.

    Ranked by the norms rounded to 10 significant bits, ties to the lower row index (a
    stable sort; a top_k partitioned over a sharded axis breaks ties differently). Rows
    within ~0.1% of each other are interchangeable for the method, and this keeps the
    choice independent of float32 summation order, i.e. of the device layout. Right after
    Adam's first step, whose updates all have magnitude lr, nearly every row ties.
    """
    coarse = _round_mantissa(jnp.sum(jnp.abs(matrix), axis=-1), 10)
    return jnp.argsort(-coarse, axis=-1, stable=True)[..., :k].astype(jnp.int32)


def _a8(layer: MeldedLinear) -> jax.Array:
    """``A`` in quantized units (``w8[out:]`` as float32), ``(..., rank, in)``."""
    return layer.w8[..., layer.out :, :].astype(jnp.float32)


def _rows_of(matrix: jax.Array, rows: jax.Array) -> jax.Array:
    """Rows ``rows (..., k)`` of ``matrix (..., R, n)``: ``(..., k, n)``."""
    return jnp.take_along_axis(matrix, rows[..., None], axis=-2)


def _merge_live_rows(
    layer: MeldedLinear, incoming: jax.Array, stepped: jax.Array, k: int, rounding: str,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``visible_merge``: fold the top-``k`` rows of the new ``b`` into ``w8`` where an
    entry's change reaches a full FP8 step; keep the remainder in ``b``.

    Returns ``rows (..., k)``, the exact ``w8`` increments ``(..., k, in)`` in quantized units
    and the update of ``b`` (``incoming`` with the merged rows replaced by their remainder).
    """
    b_new = layer.b.astype(jnp.float32) + incoming
    rows = _top_rows(b_new, k)
    picked = _rows_of(b_new, rows)  # (..., k, r)
    a8 = _a8(layer)
    delta = (picked @ a8) * stepped[..., None, None]  # quantized units
    old = _rows_of(layer.w8, rows)
    reaches = jnp.abs(delta) >= fp8.step_away_from_zero(old)
    new = fp8.round_to(old.astype(jnp.float32) + jnp.where(reaches, delta, 0.0), old.dtype,
                       "stochastic" if rounding == "stochastic" else "nearest", key)
    applied = new.astype(jnp.float32) - old.astype(jnp.float32)
    kept = _to_rank_space(delta - applied, a8)  # (..., k, r)
    kept = jnp.where(stepped[..., None, None], kept, picked)
    return rows, applied, incoming + _put_rows(jnp.zeros_like(b_new), rows, kept - picked)


def _put_rows(matrix: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """``matrix (..., out, r)`` with rows ``rows (..., k)`` replaced by ``values (..., k, r)``."""
    index = jnp.broadcast_to(rows[..., None], values.shape)
    return jnp.put_along_axis(matrix, index, values, axis=-2, inplace=False)


def _to_rank_space(residual: jax.Array, a8: jax.Array) -> jax.Array:
    """Least-squares ``c`` with ``c @ a8 ~ residual``: ``(..., k, in) -> (..., k, r)``."""
    gram = a8 @ jnp.swapaxes(a8, -1, -2)  # (..., r, r)
    ridge = 1e-7 * jnp.mean(jnp.diagonal(gram, axis1=-2, axis2=-1), axis=-1)
    gram = gram + ridge[..., None, None] * jnp.eye(gram.shape[-1], dtype=gram.dtype)
    rhs = residual @ jnp.swapaxes(a8, -1, -2)  # (..., k, r)
    return jnp.swapaxes(jnp.linalg.solve(gram, jnp.swapaxes(rhs, -1, -2)), -1, -2)


def _select_and_reset(
    buffer: jax.Array, stepped: jax.Array, layer: MeldedLinear, k: int, reset: Resets,
    rounding: str, key: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pick the top-k rows of ``buffer`` by L1 norm, round their merge and reset the buffer.

    Args:
      buffer: float32 ``(..., out, rank)``, already holding this step's update.
      stepped: bool ``(...)``, False where the matrix received an all-zero update (no
        optimizer step: nothing is merged and the buffer is kept).
      layer: the (possibly stacked) melded layer the buffer belongs to.

    Returns:
      ``rows`` int32 ``(..., k)``; the increments of those rows of ``w8`` in quantized units
      (``Buf[K] @ A8 == Buf[K] @ A / scale``, which :class:`RowMerge` rounds to nearest; for
      the other roundings the exact ``Q(w8[K] + Buf[K] @ A8) - w8[K]``);
      and the buffer after the reset (with ``rounding="feedback"`` the merged rows keep
      their rounding residual instead of being cleared).
    """
    rows = _top_rows(buffer, k)
    picked = _rows_of(buffer, rows)  # (..., k, rank)
    a8 = _a8(layer)
    delta = (picked @ a8) * stepped[..., None, None]
    if rounding == "nearest":
        applied = delta  # RowMerge rounds to nearest itself: one cast of the k rows
    else:
        old = _rows_of(layer.w8, rows)
        mode = "stochastic" if rounding == "stochastic" else "nearest"
        new = fp8.round_to(old.astype(jnp.float32) + delta, old.dtype, mode, key)
        applied = new.astype(jnp.float32) - old.astype(jnp.float32)  # exact increments
    if reset == "all":
        cleared = jnp.zeros_like(buffer)
    else:
        keep = jnp.ones(buffer.shape[:-1], jnp.float32)
        keep = jnp.put_along_axis(keep, rows, 0.0, axis=-1, inplace=False)
        cleared = buffer * keep[..., None]
    if rounding == "feedback":
        residual = _to_rank_space(delta - applied, a8)
        cleared = _put_rows(cleared, rows, residual)
    buffer = jnp.where(stepped[..., None, None], cleared, buffer)
    return rows, applied, buffer


def _round_mantissa(x: jax.Array, bits: int) -> jax.Array:
    """Non-negative float32 ``x`` truncated to ``bits`` explicit mantissa bits."""
    mask = jnp.uint32((0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF)
    raw = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type(raw & mask, jnp.float32)


def _melded_or_none(node: object) -> bool:
    # ``None`` marks a leaf without an update (e.g. a frozen leaf left out of the gradient).
    return node is None or is_melded(node)


def _resolve_k(top_k: int | None, layer: MeldedLinear, names: tuple[str, ...]) -> int:
    if top_k is None:
        return layer.out
    if top_k > layer.out:
        where = "/".join(names) or "params"
        raise ValueError(f"top_k={top_k} exceeds the {layer.out} rows of the melded layer {where}")
    return top_k


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
    rule: str = DEFAULT_RULE,
    reset: Resets = "merged",
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


# --------------------------------------------------------------------------------------
# Paths of melded layers inside a params pytree.


def _melded_layers(params) -> list[tuple[tuple[str, ...], MeldedLinear]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_melded)
    return [(_path_names(path), leaf) for path, leaf in flat if is_melded(leaf)]


def _path_names(path) -> tuple[str, ...]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names) or ("params",)


def _nested_set(tree: dict, names, value) -> None:
    for name in names[:-1]:
        tree = tree.setdefault(name, {})
    tree[names[-1]] = value


def _nested_get(tree: dict, names):
    for name in names:
        tree = tree[name]
    return tree
