"""The FALQON melded linear layer: an FP8 backbone with its LoRA ``A`` rows melded in.

A linear layer ``y = x W^T`` with ``W`` of shape ``(out, in)`` (the Hugging Face / PyTorch
layout) becomes a :class:`MeldedLinear`:

* ``w8`` -- float8_e4m3fn ``(out + rank, in)``: rows ``[:out]`` are the quantized backbone
  ``W``, rows ``[out:]`` are the frozen LoRA factor ``A``. One per-tensor scale covers both.
* ``scale`` -- float32 scalar, the dequantization multiplier: ``w8.astype(f32) * scale``.
* ``b`` -- float32 ``(out, rank)``, the trainable LoRA side.
* ``b_in_forward`` (static) -- how ``b`` reaches the model:

  - ``True`` (the default, update rules ``visible`` / ``visible_merge`` of
    :func:`falqon_jax.optax.falqon_update`): ``b`` is a live adapter,
    ``y = x W^T + (A x) b^T``, so every update of ``b`` counts at once, however small.
  - ``False`` (the paper's rules ``paper`` / ``reference``): **``b`` is always zero**; its
    updates accumulate in a proxy buffer and are merged row by row into ``w8``, so the
    forward pass never adds ``b (A x)``.

The GEMMs of :func:`apply` (``T`` tokens; the input ``x`` is never saved for the backward):

* forward, proxy rules: ONE FP8 GEMM of ``Q(x)`` with the melded ``[W; A]``, which yields
  ``x W^T`` and ``A x`` together;
* forward, live ``b``: ``A x`` as a rank-sized FP8 GEMM (one for all the layers that read
  the same ``x``, :func:`apply_shared`), ``(A x) b^T`` in the compute dtype, and the
  backbone's FP8 GEMM ``Q(x) W^T`` adding it as its bias;
* backward: ``dL/dx`` is ONE FP8 GEMM, against ``W`` (proxy rules) or against the melded
  ``[W; A]`` with ``[Q(g), Q(g b)]`` on one E5M2 grid (live ``b``: ``g W + (g b) A``);
  ``dL/db`` a rank-sized FP8 GEMM; a live ``b`` adds ``g b`` in the compute dtype.

The effective weight is always ``DQ(w8[:out]) + b DQ(w8[out:])`` (:func:`effective_weight`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from falqon_jax import fp8, sharding

# FP8 tensor-core GEMMs need every matrix dimension to be a multiple of this.
FP8_ALIGNMENT = 16
# The name (jax.ad_checkpoint.checkpoint_name) of the residual Q(A x) of the backward.
SAVED_RESIDUAL = "falqon_ax8"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MeldedLinear:
    """Parameters of one melded layer (a pytree; ``out`` and ``rank`` are static).

    Stacked layers (e.g. from ``nn.scan``) carry extra leading axes on every leaf:
    ``w8 (..., out + rank, in)``, ``scale (...)``, ``b (..., out, rank)``.
    """

    w8: jax.Array
    scale: jax.Array
    b: jax.Array
    out: int = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))
    b_in_forward: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def in_features(self) -> int:
        return self.w8.shape[-1]

    def a(self) -> jax.Array:
        """The frozen LoRA factor ``A`` dequantized: float32 ``(..., rank, in)``."""
        return self.w8[..., self.out :, :].astype(jnp.float32) * _expand(self.scale, 2)


def _expand(scale: jax.Array, n: int) -> jax.Array:
    """Append ``n`` singleton axes so a (possibly stacked) scale broadcasts over matrices."""
    return jnp.reshape(scale, jnp.shape(scale) + (1,) * n)


def is_melded(node: object) -> bool:
    """True for a :class:`MeldedLinear` (use as ``is_leaf`` when mapping over params)."""
    return isinstance(node, MeldedLinear)


def check_convertible(out: int, in_features: int, rank: int) -> str | None:
    """Why a layer of this shape cannot be melded, or ``None`` if it can."""
    if out % FP8_ALIGNMENT or in_features % FP8_ALIGNMENT:
        return (
            f"layer shape (out={out}, in={in_features}) is not a multiple of {FP8_ALIGNMENT} "
            "(FP8 GEMM requirement); leave this layer unconverted"
        )
    return rank_problem(out, in_features, rank)


def rank_problem(out: int, in_features: int, rank: int) -> str | None:
    """Why ``rank`` is not a valid LoRA rank for an ``(out, in)`` layer, or ``None``.

    A rank is valid in ``1..min(out, in)``; FALQON and every adapter baseline use this rule.
    """
    if rank <= 0 or rank > min(out, in_features):
        limit = min(out, in_features)
        return f"rank must be in 1..{limit} for a ({out}, {in_features}) layer, got {rank}"
    return None


def init(
    w: jax.Array,
    rank: int,
    *,
    key: jax.Array | None = None,
    init: Literal["svd", "random", "given"] = "svd",
    a_row_norm: float | None = None,
    b_in_forward: bool = True,
    a: jax.Array | None = None,
) -> MeldedLinear:
    """Meld a float weight ``w`` of shape ``(out, in)`` into a :class:`MeldedLinear`.

    ``init="svd"`` (FALQON): quantize ``W``, take the rank-``rank`` SVD of the quantization
    error ``E = W - DQ(Q(W)) ~ U_r S_r V_r^T`` and set ``A = sqrt(S_r) V_r^T``.
    ``init="random"`` (ablation, as in the reference code): ``A`` is drawn from a normal
    with ``W``'s mean and standard deviation and clipped to ``W``'s range; needs ``key``.
    ``init="given"``: ``A`` is the float32 ``(rank, in)`` array ``a`` (e.g. the top right
    singular vectors of a gradient, :mod:`falqon_jax.train.grad_init`).

    ``a_row_norm``: rescale every row of ``A`` to this L2 norm (``None`` keeps the natural
    scale above). With a live ``b`` and Adam, ``A``'s scale sets how far one step moves the
    weight (``dW = db A``); :func:`lora_row_norm` gives PEFT LoRA's. ``A`` never gets a
    larger magnitude than ``W`` (it is shrunk if it would), so the shared scale stays ``W``'s.

    Then ``[W; A]`` is quantized to E4M3 with one per-tensor scale and ``b = 0``.
    Raises ``ValueError`` for shapes that are not multiples of 16 or an invalid rank.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"init expects a 2-D weight (out, in), got shape {w.shape}")
    out, in_features = w.shape
    problem = check_convertible(out, in_features, rank)
    if problem:
        raise ValueError(problem)
    if init == "svd":
        a = _svd_factor(w, rank)
    elif init == "random":
        if key is None:
            raise ValueError('init="random" needs a PRNG key: pass key=jax.random.key(seed)')
        a = _random_factor(w, rank, key)
    elif init == "given":
        if a is None or tuple(a.shape) != (rank, in_features):
            got = None if a is None else tuple(a.shape)
            raise ValueError(f'init="given" needs a of shape {(rank, in_features)}, got {got}')
        a = jnp.asarray(a, jnp.float32)
    else:
        raise ValueError(f'init must be "svd", "random" or "given", got {init!r}')
    if a_row_norm is not None:
        norms = jnp.linalg.norm(a, axis=1, keepdims=True)
        a = a * (a_row_norm / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))
        w_max, a_max = jnp.max(jnp.abs(w)), jnp.max(jnp.abs(a))
        a = a * jnp.where(a_max > w_max, w_max / a_max, 1.0)  # keep the scale W's
    w8, scale = fp8.quantize(jnp.concatenate([w, a], axis=0), fp8.E4M3)
    b = jnp.zeros((out, rank), jnp.float32)
    return MeldedLinear(w8=w8, scale=scale, b=b, out=out, rank=rank,
                        b_in_forward=bool(b_in_forward))


def lora_row_norm(in_features: int, rank: int, alpha: float) -> float:
    """The expected row norm of PEFT LoRA's ``A`` times its ``alpha / rank`` multiplier.

    PEFT draws ``A`` uniformly in ``+-1/sqrt(in)`` (``kaiming_uniform_(a=sqrt(5))``), whose
    rows have expected squared norm ``1/3``, and scales ``B A`` by ``alpha / rank``. A frozen
    ``A`` with rows of this norm gives a live ``b`` LoRA's step size from the first step.
    """
    del in_features  # the expected norm does not depend on the width
    return float(alpha) / float(rank) / 3.0**0.5


def _svd_factor(w: jax.Array, rank: int) -> jax.Array:
    """``sqrt(S_r) V_r^T`` of the E4M3 quantization error of ``w``: float32 ``(rank, in)``."""
    q, s = fp8.quantize(w, fp8.E4M3)
    error = w - fp8.dequantize(q, s)
    _, sing, vt = jnp.linalg.svd(error, full_matrices=False)
    return jnp.sqrt(sing[:rank])[:, None] * vt[:rank]


def _random_factor(w: jax.Array, rank: int, key: jax.Array) -> jax.Array:
    """``A ~ N(mean(W), std(W))`` clipped to ``[min(W), max(W)]``: float32 ``(rank, in)``."""
    noise = jax.random.normal(key, (rank, w.shape[1]), jnp.float32)
    return jnp.clip(jnp.mean(w) + jnp.std(w) * noise, jnp.min(w), jnp.max(w))


def dequantize(p: MeldedLinear) -> jax.Array:
    """The backbone ``DQ(w8[:out])``: float32 ``(..., out, in)``."""
    return p.w8[..., : p.out, :].astype(jnp.float32) * _expand(p.scale, 2)


def effective_weight(p: MeldedLinear) -> jax.Array:
    """What the layer computes with: ``DQ(w8[:out]) + b DQ(w8[out:])``, float32
    ``(..., out, in)`` (``b`` is zero for the proxy rules, so this is ``DQ(w8[:out])``)."""
    return dequantize(p) + jnp.matmul(p.b.astype(jnp.float32), p.a())


# --------------------------------------------------------------------------------------
# Forward and backward.

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # (T, in) x (R, in) -> (T, R)
_CONTRACT_OUT = (((1,), (0,)), ((), ()))  # (T, out) x (out, in) -> (T, in)
_CONTRACT_TOKENS = (((0,), (0,)), ((), ()))  # (T, out) x (T, r) -> (out, r)
_CONTRACT_RANK = (((1,), (1,)), ((), ()))  # (T, r) x (out, r) -> (T, out)
_CONTRACT_ROWS = (((1,), (0,)), ((), ()))  # (T, out) x (out, r) -> (T, r); (T, r) x (r, in)


def apply(p: MeldedLinear, x: jax.Array) -> jax.Array:
    """``y = x W^T`` through the melded FP8 weight.

    Args:
      p: an unstacked :class:`MeldedLinear` (``w8`` is 2-D).
      x: ``(..., in)``, bfloat16 or float32.

    Returns:
      ``y`` of shape ``(..., out)`` in ``x``'s dtype: ``x W^T``, plus ``(A x) b^T`` when
      ``p.b_in_forward``. Gradients flow to ``x`` and ``p.b``; ``w8`` and ``scale`` get zero
      cotangents.
    """
    return apply_shared((p,), x)[0]


def apply_shared(layers: Sequence[MeldedLinear], x: jax.Array) -> tuple[jax.Array, ...]:
    """:func:`apply` of several layers to the same ``x`` (e.g. q/k/v, or gate/up): the same
    outputs, one per layer, and the same gradients, sharing work between the layers:
    ``Q(x)`` is made once, the live layers' ``A x`` is one FP8 GEMM over their stacked
    ``A`` rows, and in the backward each layer's ``dL/dx`` GEMM adds the sum of the layers
    before it as its bias, so no per-layer ``dL/dx`` is written and summed again (the sum
    is rounded to ``x``'s dtype after each layer, as the separate results were).
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("apply_shared needs at least one layer")
    for p in layers:
        if p.w8.ndim != 2:
            raise ValueError(
                f"apply takes one layer; got stacked weights of shape {p.w8.shape} "
                "(map over the leading axes, e.g. with nn.scan or jax.lax.scan)"
            )
        if x.shape[-1] != p.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the layer expects {p.in_features}")
    return _melded_matmuls(layers, x)


@jax.custom_vjp
def _melded_matmuls(layers: tuple[MeldedLinear, ...], x: jax.Array) -> tuple[jax.Array, ...]:
    return _forward(layers, x)[0]


def _forward(layers: tuple[MeldedLinear, ...],
             x: jax.Array) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The layers' outputs ``y_i`` ``(..., out_i)`` and ``A_i x`` ``(T, rank_i)``, in
    ``x``'s dtype, from one quantization ``Q_e4m3(x)``.

    Without a live ``b`` (the paper's rules) a layer is ONE FP8 GEMM of ``Q(x)`` with
    ``[W; A]``: it yields ``x W^T`` and ``A x`` together, accumulated in float32 and
    written in the compute dtype (on a GPU the FP8 GEMM itself rounds it).

    With a live ``b``, ``y = x W^T + (A x) b^T``: ``A x`` of all live layers is one FP8
    GEMM of ``Q(x)`` with their stacked ``A`` rows (``T x sum(rank)``, float32, then each
    layer's scale), ``(A x) b^T`` a rank-``r`` GEMM in the compute dtype (float32
    accumulation; not FP8: ``b``'s small updates must not round away), and the backbone's
    FP8 GEMM ``Q(x) W^T`` adds it as its bias. Melding ``A`` into that GEMM would need
    ``A x`` before the GEMM that makes it, so the sum would be a pass of its own over the
    ``T x (out + rank)`` result; as a bias it is read by a GEMM bound by its FLOPs (on
    cuBLASLt; XLA's Triton GEMMs take no tensor bias, and there the sum joins the next
    kernel), at the price of reading ``Q(x)`` (one byte per value) once more.
    """
    tokens = x.reshape(-1, x.shape[-1])
    x8, x_scale = fp8.quantize(tokens, fp8.E4M3)
    weights = [sharding.gathered(p.w8) for p in layers]  # FSDP: gathered as FP8, 1 B/value
    live = [i for i, p in enumerate(layers) if p.b_in_forward]
    ax: dict[int, jax.Array] = {}
    if live:
        rows = jnp.concatenate([lax.slice_in_dim(weights[i], layers[i].out,
                                                 layers[i].out + layers[i].rank, axis=0)
                                for i in live], axis=0)
        acc = lax.dot_general(x8, rows, _CONTRACT_LAST, preferred_element_type=jnp.float32)
        start = 0
        for i in live:
            rank = layers[i].rank
            ax[i] = (acc[:, start:start + rank] * (x_scale * layers[i].scale)).astype(x.dtype)
            start += rank
    ys = []
    for i, p in enumerate(layers):
        if p.b_in_forward:
            b = sharding.gathered(p.b).astype(x.dtype)  # FSDP: gathered (f32, out x rank)
            low_rank = lax.dot_general(ax[i], b, _CONTRACT_RANK,
                                       preferred_element_type=x.dtype)
            backbone = lax.slice_in_dim(weights[i], 0, p.out, axis=0)
            y = fp8.fp8_dot(x8, x_scale, backbone, p.scale, _CONTRACT_LAST,
                            x.dtype) + low_rank
        else:
            both = fp8.fp8_dot(x8, x_scale, weights[i], p.scale, _CONTRACT_LAST, x.dtype)
            y, ax[i] = both[:, : p.out], both[:, p.out:]
        ys.append(y.reshape(x.shape[:-1] + (p.out,)))
    return tuple(ys), tuple(ax[i] for i in range(len(layers)))


def _melded_fwd(layers: tuple[MeldedLinear, ...], x: jax.Array):
    ys, axs = _forward(layers, x)
    residuals = []
    for p, ax in zip(layers, axs, strict=True):
        ax8, ax_scale = fp8.quantize_gemm_result(ax, fp8.E4M3)  # dL/db's FP8 operand
        # Residuals: the tiny ``Q(A x)`` and the weights that are already resident (their
        # own shards under FSDP; the backward gathers them again) -- never ``x``.
        ax8, ax_scale = checkpoint_name((ax8, ax_scale), SAVED_RESIDUAL)
        residuals.append((ax8, ax_scale, p.w8, p.scale, p.b if p.b_in_forward else None))
    return ys, tuple(residuals)


def _melded_bwd(residuals, gs):
    """``dL/db`` of every layer and ``dL/dx`` summed over them.

    With a live ``b``, ``dL/dx = g W + (g b) A = [g, g b] [W; A]``: ``g b`` (``T x r``,
    float32 accumulation) joins ``g`` on ONE E5M2 grid, scaled by the largest magnitude of
    either (so neither saturates), and one FP8 GEMM against the melded weight gives both
    terms -- the rank term rounds like ``g`` itself (E5M2), and no ``T x in`` tensor of
    its own is written and read again. ``dL/db = Q(g)^T Q(A x)`` in FP8.
    """
    dtype = gs[0].dtype
    dx = None
    grads = []
    for (ax8, ax_scale, w8, scale, b), g in zip(residuals, gs, strict=True):
        rank = ax8.shape[1]
        out = w8.shape[0] - rank
        g_tokens = g.reshape(-1, out)
        weight = sharding.gathered(w8)
        if b is None:
            g8, g_scale = fp8.quantize(g_tokens, fp8.E5M2)
            weight = lax.slice_in_dim(weight, 0, out, axis=0)
        else:  # [g, g b] on one E5M2 grid, against the melded [W; A]
            gb = lax.dot_general(g_tokens, sharding.gathered(b).astype(dtype),
                                 _CONTRACT_ROWS, preferred_element_type=jnp.float32)
            gb = gb.astype(dtype)
            amax = jnp.maximum(fp8.abs_max(g_tokens), fp8.abs_max(gb))
            g_scale = fp8.scale_from_amax(amax, fp8.E5M2)
            g8 = fp8.cast_to_fp8(jnp.concatenate([g_tokens, gb], axis=1), g_scale, fp8.E5M2)
        # (T, in), written by the GEMM in g's dtype (float32 accumulation), the running
        # sum of the layers before it added as the GEMM's bias
        term = fp8.fp8_dot(g8, g_scale, weight, scale, _CONTRACT_OUT, dtype)
        dx = term if dx is None else term + dx
        g8 = lax.slice_in_dim(g8, 0, out, axis=1)
        db = fp8.fp8_dot(g8, g_scale, ax8, ax_scale, _CONTRACT_TOKENS)  # (out, rank)
        grads.append(MeldedLinear(w8=jnp.zeros_like(w8), scale=jnp.zeros_like(scale), b=db,
                                  out=out, rank=rank, b_in_forward=b is not None))
    in_features = residuals[0][2].shape[1]
    return tuple(grads), dx.reshape(gs[0].shape[:-1] + (in_features,))


_melded_matmuls.defvjp(_melded_fwd, _melded_bwd)

