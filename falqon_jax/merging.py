"""FALQON's merges into the FP8 weights: the row-wise top-k selection, the proxy buffer of
the paper's rules, ``visible_merge``'s fold of a live ``b``, and the roundings to E4M3.

Each rule's step on one (possibly stacked) melded layer is a pure function of arrays; the
walk over a params pytree that applies it is :func:`melded_transform`, which
:mod:`falqon_jax.optax` builds its transformations with.

How a merge reaches the weights: the update for ``w8`` is a :class:`RowMerge` -- the ``k``
row indices and their increments in quantized units -- instead of a dense array.
``optax.apply_updates`` computes ``w8 + update``; ``RowMerge.__radd__`` turns that into a
write of ``k`` rows into ``w8`` (zero rows for ``visible``). So plain ``optax.apply_updates``
works, untouched rows stay bit-identical, and with the params donated to ``jax.jit`` the
weight is updated in place without any dense temporary. ``RowMerge`` is linear under the
masks optax applies (``optax.MultiSteps`` multiplies updates by 0 or 1, ``apply_if_finite``
selects zeros): an all-zero ``RowMerge`` leaves ``w8`` bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from falqon_jax import fp8
from falqon_jax.melded import MeldedLinear, is_melded
from falqon_jax.rules import Rule
from falqon_jax.tree_paths import nested_get, nested_set, path_names


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


# --------------------------------------------------------------------------------------
# The walk over the params: one function per melded layer, the state kept by path.


@dataclasses.dataclass(frozen=True)
class LayerStep:
    """What a rule's step sees of one (possibly stacked) melded layer.

    ``layer`` the params, ``update_b`` the incoming update of ``b`` as it came and
    ``incoming`` the same in float32 ``(..., out, rank)``,
    ``stepped`` bool ``(...)`` False where the update is exactly zero (no optimizer step),
    ``names`` its path (for messages), ``key`` its stochastic-rounding key, ``buffer`` its
    proxy buffer float32 ``(..., out, rank)`` (proxy rules; else ``None``).
    """

    layer: MeldedLinear
    update_b: jax.Array
    incoming: jax.Array
    stepped: jax.Array
    names: tuple[str, ...]
    key: jax.Array
    buffer: jax.Array | None


# A rule's step on one layer returns (w8 update, b update, new proxy buffer or None).
LayerResult = tuple[RowMerge, jax.Array, "jax.Array | None"]


def melded_transform(rule: Rule, step: Callable[[LayerStep], LayerResult],
                     seed: int) -> optax.GradientTransformation:
    """An optax transformation that runs ``step`` on every melded layer of the params.

    ``step`` gets a :class:`LayerStep` and returns the ``w8`` update (a :class:`RowMerge`),
    ``b``'s update and, for proxy rules, the layer's new buffer. Layers must have
    ``b_in_forward == rule.live_b`` (``ValueError`` otherwise). Leaves that are not melded
    pass through; ``None`` updates too. The state is a :class:`FalqonState`.
    """

    def init_fn(params: optax.Params) -> FalqonState:
        buffers: dict[str, Any] = {}
        for names, layer in _melded_layers(params):
            check_layer(layer, names, rule)
            if rule.proxy_buffer:
                nested_set(buffers, names, jnp.zeros(layer.b.shape, jnp.float32))
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
            names = _names(path)
            check_layer(layer, names, rule)
            incoming = update.b.astype(jnp.float32)
            buffer = nested_get(state.buffers, names) + incoming if rule.proxy_buffer else None
            seen = LayerStep(layer, update.b, incoming,
                             jnp.any(incoming != 0, axis=(-2, -1)),  # per (stacked) matrix
                             names, jax.random.fold_in(base_key, next(position)), buffer)
            w8_update, b_update, buffer = step(seen)
            if buffer is not None:
                nested_set(new_buffers, names, buffer)
            return _layer_update(layer, w8_update, b_update)

        new_updates = jax.tree_util.tree_map_with_path(
            visit, updates, params, is_leaf=_melded_or_none)
        return new_updates, FalqonState(new_buffers, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def check_layer(layer: MeldedLinear, names: tuple[str, ...], rule: Rule) -> None:
    """``ValueError`` unless ``layer`` was built for ``rule`` (``b_in_forward``)."""
    if layer.b_in_forward != rule.live_b:
        where = "/".join(names) or "params"
        how = f"b_in_forward={rule.live_b}"
        raise ValueError(
            f"rule {rule.name!r} needs melded layers built with {how}, but {where} has "
            f"b_in_forward={layer.b_in_forward}: build them with melded.init(..., {how})"
        )


def _layer_update(layer: MeldedLinear, w8_update: RowMerge, b_update: jax.Array) -> MeldedLinear:
    return MeldedLinear(w8=w8_update, scale=jnp.zeros_like(layer.scale), b=b_update,
                        out=layer.out, rank=layer.rank, b_in_forward=layer.b_in_forward)


def _melded_or_none(node: object) -> bool:
    # ``None`` marks a leaf without an update (e.g. a frozen leaf left out of the gradient).
    return node is None or is_melded(node)


def _melded_layers(params) -> list[tuple[tuple[str, ...], MeldedLinear]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_melded)
    return [(_names(path), leaf) for path, leaf in flat if is_melded(leaf)]


def _names(path) -> tuple[str, ...]:
    return path_names(path) or ("params",)


# --------------------------------------------------------------------------------------
# The rules' steps on one layer.


def keep_b(seen: LayerStep) -> LayerResult:
    """``visible``: ``b``'s update goes into ``b``; ``w8`` is left as it is."""
    lead = seen.layer.w8.shape[:-2]
    no_merge = RowMerge(rows=jnp.zeros(lead + (0,), jnp.int32),
                        delta=jnp.zeros(lead + (0, seen.layer.w8.shape[-1]), jnp.float32))
    return no_merge, seen.update_b, None


def fold_live_rows(seen: LayerStep, k: int, rounding: str) -> LayerResult:
    """``visible_merge``: fold the top-``k`` rows of the new ``b`` into ``w8`` where an
    entry's change reaches a full FP8 step; keep the remainder in ``b``.

    Returns the exact ``w8`` increments of ``rows (..., k)``, ``(..., k, in)`` in quantized
    units, and the update of ``b`` (``incoming`` with the merged rows replaced by their
    remainder).
    """
    layer, stepped = seen.layer, seen.stepped
    b_new = layer.b.astype(jnp.float32) + seen.incoming
    rows = top_rows(b_new, k)
    picked = _rows_of(b_new, rows)  # (..., k, r)
    a8 = _a8(layer)
    delta = (picked @ a8) * stepped[..., None, None]  # quantized units
    old = _rows_of(layer.w8, rows)
    reaches = jnp.abs(delta) >= fp8.step_away_from_zero(old)
    new = fp8.round_to(old.astype(jnp.float32) + jnp.where(reaches, delta, 0.0), old.dtype,
                       "stochastic" if rounding == "stochastic" else "nearest", seen.key)
    applied = new.astype(jnp.float32) - old.astype(jnp.float32)
    kept = _to_rank_space(delta - applied, a8)  # (..., k, r)
    kept = jnp.where(stepped[..., None, None], kept, picked)
    b_update = seen.incoming + _put_rows(jnp.zeros_like(b_new), rows, kept - picked)
    return RowMerge(rows, applied), b_update, None


def merge_buffer_rows(seen: LayerStep, k: int, reset: str, rounding: str) -> LayerResult:
    """The proxy rules: pick the top-k rows of the buffer (already holding this step's
    update) by L1 norm, merge them into ``w8`` and reset the buffer; ``b`` stays zero.

    The ``w8`` increments are ``Buf[K] @ A8 == Buf[K] @ A / scale`` in quantized units, which
    :class:`RowMerge` rounds to nearest; for the other roundings the exact
    ``Q(w8[K] + Buf[K] @ A8) - w8[K]``. ``reset="merged"`` clears the merged rows, ``"all"``
    the whole buffer; with ``rounding="feedback"`` the merged rows keep their rounding
    residual instead. A matrix that did not step merges nothing and keeps its buffer.
    """
    buffer, layer, stepped = seen.buffer, seen.layer, seen.stepped
    rows = top_rows(buffer, k)
    picked = _rows_of(buffer, rows)  # (..., k, rank)
    a8 = _a8(layer)
    delta = (picked @ a8) * stepped[..., None, None]
    if rounding == "nearest":
        applied = delta  # RowMerge rounds to nearest itself: one cast of the k rows
    else:
        old = _rows_of(layer.w8, rows)
        mode = "stochastic" if rounding == "stochastic" else "nearest"
        new = fp8.round_to(old.astype(jnp.float32) + delta, old.dtype, mode, seen.key)
        applied = new.astype(jnp.float32) - old.astype(jnp.float32)  # exact increments
    if reset == "all":
        cleared = jnp.zeros_like(buffer)
    else:
        keep = jnp.ones(buffer.shape[:-1], jnp.float32)
        keep = jnp.put_along_axis(keep, rows, 0.0, axis=-1, inplace=False)
        cleared = buffer * keep[..., None]
    if rounding == "feedback":
        cleared = _put_rows(cleared, rows, _to_rank_space(delta - applied, a8))
    buffer = jnp.where(stepped[..., None, None], cleared, buffer)
    return RowMerge(rows, applied), jnp.zeros_like(layer.b), buffer


def rows_to_merge(top_k: int | None, rule: Rule, layer: MeldedLinear,
                  names: tuple[str, ...]) -> int:
    """Rows merged per matrix: ``rank`` for a rule with ``k_is_rank``, every row for
    ``top_k=None``, else ``top_k`` (``ValueError`` if it exceeds the layer's ``out``)."""
    if rule.k_is_rank:
        return layer.rank
    if top_k is None:
        return layer.out
    if top_k > layer.out:
        where = "/".join(names) or "params"
        raise ValueError(f"top_k={top_k} exceeds the {layer.out} rows of the melded layer {where}")
    return top_k


def top_rows(matrix: jax.Array, k: int) -> jax.Array:
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


def _round_mantissa(x: jax.Array, bits: int) -> jax.Array:
    """Non-negative float32 ``x`` truncated to ``bits`` explicit mantissa bits."""
    mask = jnp.uint32((0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF)
    raw = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type(raw & mask, jnp.float32)
