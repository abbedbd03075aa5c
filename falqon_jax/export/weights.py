"""The weights an export writes for a layer: effective (dequantized + adapter) weights,
base weights, and FP8 weights with their per-tensor scales."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from falqon_jax import fp8, melded
from falqon_jax.export.layout import ExportError
from falqon_jax.model import methods

# --------------------------------------------------------------------------------------
# Effective weights.


def np32(x: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def _lora_delta(layer: Any) -> np.ndarray:
    """``(alpha / rank) B A``: float32 ``(out, in)``."""
    return np.float32(layer.scaling) * (np32(layer.b) @ np32(layer.a))


def check_proxy_b(layer: melded.MeldedLinear, name: str) -> None:
    """Refuse a proxy-rule FALQON layer (``b_in_forward=False``) whose ``b`` is not zero.

    Such a layer never adds ``b (A x)`` in its forward pass, so a non-zero ``b`` is not part
    of the model and its state is corrupt (the proxy rules keep ``b = 0``)."""
    if not layer.b_in_forward and np.any(np32(layer.b) != 0):
        raise ExportError(
            f"{name}: FALQON layer with a proxy update rule (b_in_forward=False) has a "
            "non-zero b (those rules keep b = 0); the state is corrupt or was not produced "
            "by falqon_update"
        )


def falqon_weight(layer: melded.MeldedLinear) -> np.ndarray:
    """FALQON's effective weight ``DQ(w8[:out]) + b DQ(w8[out:])``: float32 ``(out, in)``.

    ``layer`` is one unstacked layer. ``DQ`` is float32 as in :mod:`falqon_jax.melded`; the
    sum and ``b A`` are computed in float64 and rounded to float32 once, so ``b = 0`` gives
    ``DQ(w8[:out])`` bit for bit.
    """
    base = np32(melded.dequantize(layer))
    b = np32(layer.b)
    if not b.any():
        return base
    a = np32(layer.a())
    return (base.astype(np.float64) + b.astype(np.float64) @ a.astype(np.float64)).astype(
        np.float32)


def effective_weight(layer: Any, name: str = "layer") -> np.ndarray:
    """The weight one (unstacked) linear layer computes with: float32 ``(out, in)``.

    Dense: ``w``; FALQON: ``DQ(w8[:out]) + b DQ(w8[out:])`` (:func:`falqon_weight`; a
    proxy-rule layer must have ``b = 0``); LoRA-style layers (``lora``, ``fp8_lora``,
    ``qlora``): ``W + (alpha / rank) B A``, ``W`` dequantized.
    """
    from falqon_jax.baselines import fp8_lora, lora, nf4, qlora

    if isinstance(layer, methods.Dense):
        return np32(layer.w)
    if isinstance(layer, melded.MeldedLinear):
        check_proxy_b(layer, name)
        return falqon_weight(layer)
    if isinstance(layer, lora.LoraLinear):
        return np32(layer.w) + _lora_delta(layer)
    if isinstance(layer, fp8_lora.Fp8LoraLinear):
        return np32(fp8.dequantize(layer.w8, layer.scale)) + _lora_delta(layer)
    if isinstance(layer, qlora.QLoraLinear):
        return np32(nf4.dequantize_nf4(layer.w, jnp.float32)) + _lora_delta(layer)
    raise ExportError(f"{name}: cannot export a linear layer of type {type(layer).__name__}")


def base_weight(layer: Any, name: str = "layer") -> np.ndarray:
    """What an ``fp8`` export writes for a layer kept in ``--dtype`` (e.g. lm_head): float32
    ``(out, in)``. FALQON: the backbone ``DQ(w8[:out])`` alone, since its ``b`` travels in
    the PEFT adapter; anything else: :func:`effective_weight`."""
    if isinstance(layer, melded.MeldedLinear):
        check_proxy_b(layer, name)
        return np32(melded.dequantize(layer))
    return effective_weight(layer, name)


def is_fp8_layer(layer: Any) -> bool:
    from falqon_jax.baselines import fp8_lora

    return isinstance(layer, melded.MeldedLinear | fp8_lora.Fp8LoraLinear)


def fp8_weight(layer: Any, name: str = "layer") -> tuple[np.ndarray, np.float32, np.ndarray | None]:
    """``(weight, scale, a)`` of one layer in FP8: float8_e4m3fn ``(out, in)``, the float32
    dequantization scale, and FALQON's ``A`` rows float8_e4m3fn ``(rank, in)`` (else None).

    FALQON layers (whatever their ``b``, which :func:`adapter_tensors` writes) and
    ``fp8_lora`` layers with ``b = 0`` keep their stored bits; anything else is quantized
    from its effective weight with a per-tensor scale (amax / 448).
    """
    from falqon_jax.baselines import fp8_lora

    if isinstance(layer, melded.MeldedLinear):
        check_proxy_b(layer, name)
        w8 = np.asarray(layer.w8)
        return w8[: layer.out], np.float32(layer.scale), w8[layer.out :]
    if isinstance(layer, fp8_lora.Fp8LoraLinear) and not np.any(np32(layer.b) != 0):
        return np.asarray(layer.w8), np.float32(layer.scale), None
    q, scale = fp8.quantize(jnp.asarray(effective_weight(layer, name)), fp8.E4M3)
    return np.asarray(q), np.float32(scale), None

