"""FALQON's row-wise top-k proxy update as an optax ``GradientTransformation``.

Use it last in a chain::

    tx = optax.chain(
        optax.clip_by_global_norm(3.0),
        optax.masked(optax.adamw(2e-3), trainable_mask),  # or plain optax.adamw(2e-3)
        falqon_update(top_k=10),
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

For every :class:`~falqon_jax.melded.MeldedLinear` in ``params`` (stacked ones too: top-k is
per matrix) the transformation keeps a float32 proxy buffer ``Buf (..., out, rank)`` and,
each step:

1. ``Buf += u_b``, the incoming update for ``b`` (e.g. AdamW's step);
2. ranks the rows of ``Buf`` by their L1 norm and picks the top ``k``;
3. merges them into the FP8 backbone with the existing scale,
   ``W8[K] = Q(DQ(W8[K]) + Buf[K] @ A)`` (saturating at the E4M3 max);
4. clears the merged rows (``reset="merged"``, the paper) or the whole buffer
   (``reset="all"``, the authors' reference code).

A matrix whose incoming update is exactly zero (no optimizer step happened: accumulation
mini-steps of ``optax.MultiSteps``, a zero learning rate) merges nothing and keeps its buffer.

``updates`` may hold ``None`` for leaves that were not differentiated (for example when
gradients are taken only with respect to the trainable leaves); ``None`` passes through.
Incoming updates for ``w8`` and ``scale`` (zero gradients, or weight decay) are discarded and
``b`` gets a zero update, so it stays exactly zero. Every other leaf passes through unchanged.

How the merge reaches the weights: the update for ``w8`` is a :class:`RowMerge` -- the ``k``
row indices and their increments -- instead of a dense array. ``optax.apply_updates`` computes
``w8 + update``; ``RowMerge.__radd__`` turns that into a scatter of ``k`` rows into ``w8``.
So plain ``optax.apply_updates`` works, untouched rows stay bit-identical, and with the
params donated to ``jax.jit`` the weight is updated in place without any dense temporary
(a dense ``w8``-shaped update would cost ``out x in`` bytes per matrix, and FP8 addition of a
dense delta could not reproduce ``Q(DQ(W8) + delta)`` exactly anyway). ``RowMerge`` is linear
under the masks optax applies (``optax.MultiSteps`` multiplies updates by 0 or 1,
``apply_if_finite`` selects zeros): an all-zero ``RowMerge`` leaves ``w8`` bit-identical.
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
    """Optimizer state: one float32 proxy buffer ``(..., out, rank)`` per melded matrix.

    ``buffers`` is a nested dict mirroring the params' paths (e.g.
    ``{"layers": {"mlp": {"up": Array}}}``), so checkpoints stay readable.
    """

    buffers: dict[str, Any]


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


def falqon_update(
    top_k: int | None = 10, *, reset: Resets = "merged"
) -> optax.GradientTransformation:
    """FALQON's proxy-buffer update with row-wise top-k merging.

    Args:
      top_k: rows merged per matrix per step (the paper uses 10; ``None`` merges every row).
        Must not exceed any melded layer's ``out``.
      reset: ``"merged"`` clears only the merged rows of the buffer (the paper);
        ``"all"`` clears the whole buffer after each merge (the reference code).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``. Its state is a
      :class:`FalqonState` (a plain pytree of float32 arrays).
    """
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if reset not in ("merged", "all"):
        raise ValueError(f'reset must be "merged" or "all", got {reset!r}')

    def init_fn(params: optax.Params) -> FalqonState:
        buffers: dict[str, Any] = {}
        for path, layer in _melded_layers(params):
            _nested_set(buffers, path, jnp.zeros(layer.b.shape, jnp.float32))
        return FalqonState(buffers)

    def update_fn(updates, state: FalqonState, params=None):
        if params is None:
            raise ValueError("falqon_update needs params: call tx.update(grads, state, params)")
        new_buffers: dict[str, Any] = {}

        def visit(path, update, layer):
            if not is_melded(layer):
                return update
            names = _path_names(path)
            incoming = update.b.astype(jnp.float32)
            stepped = jnp.any(incoming != 0, axis=(-2, -1))  # per (stacked) matrix
            buffer = _nested_get(state.buffers, names) + incoming
            k = _resolve_k(top_k, layer, names)
            rows, delta, buffer = _select_and_reset(buffer, stepped, layer, k, reset)
            _nested_set(new_buffers, names, buffer)
            return MeldedLinear(
                w8=RowMerge(rows=rows, delta=delta),
                scale=jnp.zeros_like(layer.scale),
                b=jnp.zeros_like(layer.b),
                out=layer.out,
                rank=layer.rank,
            )

        new_updates = jax.tree_util.tree_map_with_path(
            visit, updates, params, is_leaf=_melded_or_none
        )
        return new_updates, FalqonState(new_buffers)

    return optax.GradientTransformation(init_fn, update_fn)


def _select_and_reset(
    buffer: jax.Array, stepped: jax.Array, layer: MeldedLinear, k: int, reset: Resets
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pick the top-k rows of ``buffer`` by L1 norm and compute their increments.

    Args:
      buffer: float32 ``(..., out, rank)``, already holding this step's update.
      stepped: bool ``(...)``, False where the matrix received an all-zero update (no
        optimizer step: nothing is merged and the buffer is kept).
      layer: the (possibly stacked) melded layer the buffer belongs to.

    Returns:
      ``rows`` int32 ``(..., k)``, ``delta`` float32 ``(..., k, in)`` in quantized units
      (``Buf[K] @ A / scale == Buf[K] @ A8``), and the buffer after the reset.
    """
    row_norms = jnp.sum(jnp.abs(buffer), axis=-1)  # (..., out)
    # Rank by the norms rounded to 10 significant bits, ties to the lower row index (a
    # stable sort; a top_k partitioned over a sharded axis breaks ties differently). Rows
    # within ~0.1% of each other are interchangeable for the method, and this keeps the
    # choice independent of float32 summation order, i.e. of the device layout. Right after
    # Adam's first step, whose updates all have magnitude lr, nearly every row ties.
    coarse = _round_mantissa(row_norms, 10)
    rows = jnp.argsort(-coarse, axis=-1, stable=True)[..., :k]
    picked = jnp.take_along_axis(buffer, rows[..., None], axis=-2)  # (..., k, rank)
    a8 = layer.w8[..., layer.out :, :].astype(jnp.float32)  # (..., rank, in)
    delta = (picked @ a8) * stepped[..., None, None]  # == Buf[K] @ (A8 * s) / s
    if reset == "all":
        cleared = jnp.zeros_like(buffer)
    else:
        keep = jnp.ones(row_norms.shape, jnp.float32)
        keep = jnp.put_along_axis(keep, rows, 0.0, axis=-1, inplace=False)
        cleared = buffer * keep[..., None]
    buffer = jnp.where(stepped[..., None, None], cleared, buffer)
    return rows.astype(jnp.int32), delta, buffer


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
            return MeldedLinear(w8=False, scale=False, b=True, out=leaf.out, rank=leaf.rank)
        return jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)

    return jax.tree.map(mark, params, is_leaf=is_melded)


def falqon_optimizer(
    inner: optax.GradientTransformation,
    top_k: int | None = 10,
    *,
    reset: Resets = "merged",
    every_k: int = 1,
) -> optax.GradientTransformation:
    """``inner`` (e.g. clipping + AdamW) on the trainable leaves, then :func:`falqon_update`.

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
    return optax.chain(optax.masked(inner, trainable_mask), falqon_update(top_k, reset=reset))


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
