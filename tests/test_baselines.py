"""Baseline layers (bf16 LoRA, FP8 LoRA, NF4 storage, QLoRA) against NumPy references.

The references are float64 NumPy computations of the same math, written from the method
definitions: FP8 rounding via ml_dtypes with fp8.py's per-tensor ``amax / fmax`` scale
convention, and NF4 from the QLoRA definition (normal quantiles, nearest-code rounding).
"""

from __future__ import annotations

import dataclasses
import re
import statistics

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from falqon_jax.baselines import fp8_lora, lora, nf4, qlora

OUT, IN, RANK, ALPHA = 48, 64, 16, 32.0
SCALING = ALPHA / RANK
BATCH = (2, 12)  # 24 tokens
METHODS = [lora, fp8_lora, qlora]

# float32 accumulation against a float64 reference: a K-term dot product computed in float32
# is off by at most about K * 2^-24 * sum_k |a_k b_k| (K <= 64 here, i.e. <= 3.8e-6 of the
# absolute-value product), plus a few more roundings (the FP8 scale multiply, the sum of
# the backbone and adapter terms, the final cast). 1e-5 of that absolute-value bound covers
# all of it while staying far below any real error: one wrong FP8 rounding alone costs at
# least a relative 2^-4 (E4M3) or 2^-3 (E5M2) of one product.
F32_REL = 1e-5


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    """Weight, adapter factors, input and output cotangent as float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return {
        "w": (rng.standard_normal((OUT, IN)) * 0.05).astype(f32),
        "a": (rng.uniform(-1, 1, (RANK, IN)) / np.sqrt(IN)).astype(f32),
        "b": (rng.standard_normal((OUT, RANK)) * 0.02).astype(f32),
        "x": rng.standard_normal(BATCH + (IN,)).astype(f32),
        "g": rng.standard_normal(BATCH + (OUT,)).astype(f32),
    }


def _with_adapter(p, d):
    """``p`` with the adapter factors replaced by the test's (so ``B != 0``)."""
    return dataclasses.replace(p, a=jnp.asarray(d["a"]), b=jnp.asarray(d["b"]))


def _vjp(module, p, x, g):
    """Forward and the cotangents of ``p`` and ``x`` for an output cotangent ``g``."""
    y, pullback = jax.vjp(module.apply, p, jnp.asarray(x))
    dp, dx = pullback(jnp.asarray(g, y.dtype))
    return y, dp, dx


def _assert_within(actual, ref, bound, what: str) -> None:
    """``|actual - ref| <= bound`` elementwise, with a readable failure message."""
    err = np.abs(np.asarray(actual, np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
        f"(actual {np.asarray(actual)[worst]}, reference {ref[worst]})"
    )


def _tokens(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).reshape(-1, a.shape[-1])


# --------------------------------------------------------------------------------------
# Standard LoRA.


def _lora_reference(w, a, b, x, g, scaling):
    """float64 LoRA forward and backward: ``(y, dA, dB, dx)`` over flattened tokens."""
    x, g = _tokens(x), _tokens(g)
    ax = x @ a.T
    y = x @ w.T + scaling * ax @ b.T
    dax = scaling * g @ b
    return y, dax.T @ x, scaling * g.T @ ax, g @ w + dax @ a


def _assert_float32_close(got, refs) -> None:
    """``(y, dA, dB, dx)`` of a float32 layer within float32 rounding of the float64 ``refs``
    (:func:`_lora_reference`'s order; ``y`` and ``dx`` are compared over flattened tokens)."""
    for name, value, ref in zip(("y", "dA", "dB", "dx"), got, refs, strict=True):
        value = np.asarray(value, np.float64).reshape(ref.shape)
        np.testing.assert_allclose(
            value, ref, rtol=F32_REL, atol=F32_REL * np.abs(ref).max(), err_msg=name
        )


def _bf16(v) -> np.ndarray:
    """``v`` rounded to bfloat16, as float64."""
    return np.asarray(v, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


def _bf16_reference(x, w, a, b) -> tuple[np.ndarray, np.ndarray]:
    """A LoRA layer computed in bf16: ``(y, bound)`` float64 ``(tokens, out)``.

    ``y = bf16(x W^T) + bf16(bf16((x A^T) B^T) * s)`` with every operand and ``x A^T``
    rounded to bf16 (the sum itself is not). Each bf16 rounding is within 2^-9 relative;
    ``bound`` allows two ulps (2^-7) of the magnitudes involved, which also absorbs an
    intermediate rounding that lands on the other side.
    """
    xb, wb, ab, bb = (_bf16(v) for v in (_tokens(x), w, a, b))
    ax = _bf16(xb @ ab.T)
    y = _bf16(xb @ wb.T) + _bf16(_bf16(ax @ bb.T) * SCALING)
    bound = 2.0**-7 * (np.abs(xb) @ np.abs(wb).T + SCALING * np.abs(ax) @ np.abs(bb).T)
    return y, bound


def test_lora_init():
    d = _data()
    p = lora.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0))
    assert p.w.dtype == jnp.bfloat16 and p.w.shape == (OUT, IN)
    assert p.a.dtype == jnp.float32 and p.a.shape == (RANK, IN)
    assert p.b.dtype == jnp.float32 and p.b.shape == (OUT, RANK)
    assert not np.any(np.asarray(p.b))
    a = np.asarray(p.a)
    bound = 1 / np.sqrt(IN)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / 6) / sqrt(fan_in)
    assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound  # std of U(-c, c) is c / sqrt(3)
    assert p.scaling == ALPHA / RANK
    np.testing.assert_array_equal(np.asarray(p.w, np.float32), d["w"].astype(ml_dtypes.bfloat16))


def test_lora_float32_forward_and_grads():
    d = _data()
    p = _with_adapter(
        lora.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0), dtype=jnp.float32), d
    )
    y, dp, dx = _vjp(lora, p, d["x"], d["g"])
    w, a, b = (np.float64(d[k]) for k in "wab")
    _assert_float32_close((y, dp.a, dp.b, dx), _lora_reference(w, a, b, d["x"], d["g"], SCALING))
    assert y.shape == BATCH + (OUT,) and y.dtype == jnp.float32
    assert not np.any(np.asarray(dp.w))  # the frozen backbone gets no gradient


# --------------------------------------------------------------------------------------
# FP8 LoRA.


def _fp8_quantize_ref(v: np.ndarray, fmt) -> np.ndarray:
    """Per-tensor FP8 quantize-dequantize with fp8.py's convention, as float64.

    ``scale = amax / fmax`` in float32 (1 for an all-zero tensor), ``v / scale`` in float32,
    saturated to ``+-fmax`` and rounded to nearest even by ml_dtypes.
    """
    v32 = np.asarray(v, np.float32)
    fmax = np.float32(ml_dtypes.finfo(fmt).max)
    amax = np.max(np.abs(v32))
    scale = amax / fmax if amax > 0 else np.float32(1.0)
    q = np.clip(v32 / scale, -fmax, fmax).astype(fmt)
    return q.astype(np.float64) * np.float64(scale)


def _fp8_lora_reference(w8, a, b, x, g, scaling):
    """float64 FP8-LoRA forward and backward of the same quantized math.

    Returns ``(y, dA, dB, dx)`` and elementwise float32 error bounds for each.
    """
    e4, e5 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
    xq, aq, bq = (_fp8_quantize_ref(v, e4) for v in (_tokens(x), a, b))
    axq = _fp8_quantize_ref(xq @ aq.T, e4)
    y = xq @ w8.T + scaling * axq @ bq.T
    gq = _fp8_quantize_ref(_tokens(g), e5)
    db = scaling * gq.T @ axq
    daxq = _fp8_quantize_ref(scaling * gq @ bq, e5)
    da = daxq.T @ xq
    dx = gq @ w8 + daxq @ aq
    ab = np.abs
    bounds = (
        ab(xq) @ ab(w8).T + scaling * ab(axq) @ ab(bq).T,
        ab(daxq).T @ ab(xq),
        scaling * ab(gq).T @ ab(axq),
        ab(gq) @ ab(w8) + ab(daxq) @ ab(aq),
    )
    return (y, da, db, dx), tuple(F32_REL * bd + 1e-30 for bd in bounds)


def test_fp8_lora_init_quantizes_backbone_once():
    d = _data()
    p = fp8_lora.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0))
    assert p.w8.dtype == jnp.float8_e4m3fn and p.w8.shape == (OUT, IN)
    assert p.a.dtype == jnp.float32 and p.b.dtype == jnp.float32
    w8 = np.asarray(p.w8.astype(jnp.float32), np.float64) * float(p.scale)
    np.testing.assert_array_equal(w8, _fp8_quantize_ref(d["w"], ml_dtypes.float8_e4m3fn))


def test_fp8_lora_forward_and_grads_match_reference():
    d = _data()
    p = _with_adapter(fp8_lora.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0)), d)
    y, dp, dx = _vjp(fp8_lora, p, d["x"], d["g"])
    w8 = np.asarray(p.w8.astype(jnp.float32), np.float64) * float(p.scale)
    refs, bounds = _fp8_lora_reference(
        w8, np.float64(d["a"]), np.float64(d["b"]), d["x"], d["g"], SCALING
    )
    for name, got, ref, bound in zip(
        ("y", "dA", "dB", "dx"), (y, dp.a, dp.b, dx), refs, bounds, strict=True
    ):
        _assert_within(np.asarray(got).reshape(ref.shape), ref, bound, name)
    assert y.dtype == jnp.float32 and dx.shape == BATCH + (IN,)
    assert dp.a.dtype == jnp.float32 and dp.b.dtype == jnp.float32
    assert not np.any(np.asarray(dp.w8, np.float32)) and float(dp.scale) == 0.0
    # The FP8 result is a coarse but faithful approximation of the exact layer.
    y_exact = _lora_reference(
        np.float64(d["w"]), np.float64(d["a"]), np.float64(d["b"]), d["x"], d["g"], SCALING
    )[0]
    rel = np.linalg.norm(np.asarray(y).reshape(y_exact.shape) - y_exact) / np.linalg.norm(y_exact)
    assert rel < 0.1


def test_fp8_lora_bf16_input():
    d = _data()
    p = _with_adapter(fp8_lora.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0)), d)
    xb = jnp.asarray(d["x"], jnp.bfloat16)
    y, dp, dx = _vjp(fp8_lora, p, xb, d["g"])
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    w8 = np.asarray(p.w8.astype(jnp.float32), np.float64) * float(p.scale)
    g = np.asarray(jnp.asarray(d["g"], jnp.bfloat16), np.float32)
    (y_ref, da_ref, _, dx_ref), (y_bd, da_bd, _, dx_bd) = _fp8_lora_reference(
        w8, np.float64(d["a"]), np.float64(d["b"]), np.asarray(xb, np.float32), g, SCALING
    )
    # Each GEMM writes its result in bf16 and the two are summed in bf16: three roundings,
    # each within 2^-8 of its value. y_bd / F32_REL bounds |backbone term| + |adapter term|
    # elementwise (the sums of absolute products); the same for dx.
    def rounded(bound, ref):
        return bound + 2.0**-8 * (1 + 2.0**-8) * (bound / F32_REL + np.abs(ref))

    _assert_within(
        np.asarray(y, np.float32).reshape(y_ref.shape), y_ref, rounded(y_bd, y_ref), "bf16 y")
    _assert_within(
        np.asarray(dx, np.float32).reshape(dx_ref.shape), dx_ref, rounded(dx_bd, dx_ref),
        "bf16 dx")
    _assert_within(np.asarray(dp.a), da_ref, da_bd, "bf16 dA")


def test_fp8_lora_every_gemm_is_fp8():
    # Forward + backward: 8 GEMMs, all with FP8 operands, and 6 casts to FP8 -- x, A, x A^T,
    # B to E4M3, g and d(x A^T) to E5M2 (the backbone is stored in FP8 and never re-cast).
    d = _data()
    p = _with_adapter(fp8_lora.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0)), d)

    def loss(params, x):
        return jnp.sum(fp8_lora.apply(params, x).astype(jnp.float32))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    text = fn.lower(p, jnp.asarray(d["x"], jnp.bfloat16)).as_text()
    dots = re.findall(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    assert len(dots) == 8
    assert all("xf8E" in lhs and "xf8E" in rhs for lhs, rhs in dots), dots
    casts = re.findall(r"stablehlo\.convert .*-> tensor<[0-9x]*(f8E4M3FN|f8E5M2)>", text)
    assert sorted(casts) == ["f8E4M3FN"] * 4 + ["f8E5M2"] * 2


@pytest.mark.parametrize("module", [fp8_lora, qlora], ids=["fp8_lora", "qlora"])
def test_saved_residuals(module, capsys):
    # Between forward and backward, fp8_lora keeps x only as FP8, and qlora keeps the NF4
    # storage -- never a dequantized (out, in) copy of the backbone.
    d = _data()
    p = module.init(d["w"], RANK, key=jax.random.key(0))

    def loss(params, x):
        return jnp.sum(module.apply(params, x).astype(jnp.float32))

    jax.ad_checkpoint.print_saved_residuals(loss, p, jnp.asarray(d["x"], jnp.bfloat16))
    saved = re.findall(r"^(\w+)\[([0-9,]*)\]", capsys.readouterr().out, flags=re.MULTILINE)
    tokens = BATCH[0] * BATCH[1]
    large = {f"{OUT},{IN}", f"{tokens},{IN}", f"{BATCH[0]},{BATCH[1]},{IN}"}
    high_precision = [(dt, shape) for dt, shape in saved if not dt.startswith(("f8", "u8"))]
    if module is fp8_lora:
        assert ("f8_e4m3fn", f"{tokens},{IN}") in saved  # Q(x)
        assert not [r for r in high_precision if r[1] in large], saved
    else:
        assert ("u8", str(OUT * IN // 2)) in saved  # the packed NF4 codes
        assert not [r for r in high_precision if r[1] == f"{OUT},{IN}"], saved


def test_fp8_lora_rejects_unaligned_shapes():
    w = np.zeros((40, IN), np.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_lora.init(w, 8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_lora.init(np.zeros((OUT, 72), np.float32), 8, key=jax.random.key(0))


# --------------------------------------------------------------------------------------
# NF4.


def _nf4_table_from_definition() -> np.ndarray:
    """The 16 NF4 values from the QLoRA definition, in float64.

    Quantiles of N(0, 1): 8 for the positive half at probabilities ``linspace(delta, 1/2, 9)``
    without the last, 7 for the negative half at ``linspace(delta, 1/2, 8)`` without the
    last, plus an exact zero, normalized into [-1, 1]; ``delta = 0.9677083`` so that the
    extreme quantiles are finite.
    """
    inv = statistics.NormalDist().inv_cdf
    delta = 0.9677083
    pos = [inv(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
    neg = [-inv(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
    values = np.sort(np.array(pos + neg + [0.0]))
    return values / values.max()


NF4_REF = _nf4_table_from_definition()


def _nf4_codes_ref(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-code NF4 indices of ``w`` by brute force over the 16 values.

    Returns ``(codes (n,), absmax (n // 64,), near_tie (n,))``; ``near_tie`` marks values
    within 1e-6 of a decision boundary, where float32 vs float64 division may disagree.
    """
    blocks = np.asarray(w, np.float64).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    v = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    dist = np.abs(v[..., None] - NF4_REF)
    codes = np.argmin(dist, axis=-1)
    mids = (NF4_REF[1:] + NF4_REF[:-1]) / 2
    near = np.min(np.abs(v[..., None] - mids), axis=-1) < 1e-6
    return codes.reshape(-1), absmax, near.reshape(-1)


def _unpack_ref(packed: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, high nibble first."""
    packed = np.asarray(packed)
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)


def _absmax_ref(t: nf4.NF4Tensor) -> np.ndarray:
    """Reconstructed block absmax from the stored double-quantized fields, float64."""
    q = np.asarray(t.absmax_q)
    scales = np.repeat(np.asarray(t.absmax_scale, np.float64), 256)[: q.shape[0]]
    return nf4.DYNAMIC_CODE[q].astype(np.float64) * scales + float(t.absmax_offset)


def _nf4_dequant_ref(t: nf4.NF4Tensor) -> np.ndarray:
    values = NF4_REF[_unpack_ref(t.codes)].reshape(-1, 64)
    return (values * _absmax_ref(t)[:, None]).reshape(t.shape)


def _weights(shape, seed=0) -> np.ndarray:
    """Normal weights with an all-zero block and a block with one large outlier."""
    w = (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)
    flat = w.reshape(-1)
    flat[64:128] = 0.0
    flat[200] = 0.5
    return w


def test_nf4_table_is_the_qlora_data_type():
    assert nf4.NF4_CODE.dtype == np.float32 and nf4.NF4_CODE.shape == (16,)
    np.testing.assert_allclose(nf4.NF4_CODE, NF4_REF, rtol=0, atol=1e-6)
    assert nf4.NF4_CODE[7] == 0.0 and nf4.NF4_CODE[0] == -1.0 and nf4.NF4_CODE[15] == 1.0


def test_nf4_code_assignment_is_nearest():
    w = _weights((96, 128))
    t = nf4.quantize_nf4(jnp.asarray(w))
    codes_ref, _, near = _nf4_codes_ref(w)
    assert near.sum() < 5
    codes = _unpack_ref(t.codes)
    np.testing.assert_array_equal(codes[~near], codes_ref[~near])
    assert np.all(np.abs(codes[near].astype(int) - codes_ref[near]) <= 1)
    np.testing.assert_array_equal(np.asarray(nf4.unpack_codes(t)), codes)
    # The all-zero block is all zero code (index 7) and dequantizes to exact zeros.
    assert np.all(codes[64:128] == 7)
    deq = np.asarray(nf4.dequantize_nf4(t, jnp.float32)).reshape(-1)
    assert np.all(deq[64:128] == 0.0) and np.all(np.isfinite(deq))


def test_nf4_ties_round_to_the_lower_code():
    # A value exactly halfway between two codes takes the lower one (as bitsandbytes does).
    mid = (nf4.NF4_CODE[8] + nf4.NF4_CODE[9]) / np.float32(2)
    low_mid = (nf4.NF4_CODE[2] + nf4.NF4_CODE[3]) / np.float32(2)
    w = np.zeros(64, np.float32)
    w[:3] = [1.0, mid, low_mid]
    codes = _unpack_ref(nf4.quantize_nf4(jnp.asarray(w)).codes)
    assert codes[:3].tolist() == [15, 8, 2]


def test_nf4_packing_layout():
    # Each block holds the 16 code values in order, four times: the codes are 0..15 repeated
    # and the bytes 0x01, 0x23, ..., 0xEF. Every absmax is 3, so double quantization (mean 3,
    # centred values 0) is exact and so is the round trip.
    w = np.tile(nf4.NF4_CODE * np.float32(3.0), 8).reshape(2, 64)
    t = nf4.quantize_nf4(jnp.asarray(w))
    assert t.codes.dtype == jnp.uint8 and t.codes.shape == (64,)
    expected = np.tile(np.array([16 * k + k + 1 for k in range(0, 16, 2)], np.uint8), 8)
    np.testing.assert_array_equal(np.asarray(t.codes), expected)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize_nf4(t, jnp.float32)), w)


def test_nf4_double_quantization_of_absmax():
    w = _weights((160, 256), seed=1)  # 640 blocks: two full absmax blocks and a half one
    t = nf4.quantize_nf4(jnp.asarray(w))
    nb = w.size // 64
    assert t.absmax_q.dtype == jnp.uint8 and t.absmax_q.shape == (nb,)
    assert t.absmax_scale.dtype == jnp.float32 and t.absmax_scale.shape == (3,)
    assert t.absmax_offset.dtype == jnp.float32 and t.absmax_offset.shape == ()

    _, absmax, _ = _nf4_codes_ref(w)
    offset = absmax.mean()
    centred = np.pad(absmax - offset, (0, 3 * 256 - nb)).reshape(3, 256)
    scales = np.abs(centred).max(axis=1)
    v = centred / scales[:, None]
    idx = np.argmin(np.abs(v[..., None] - nf4.DYNAMIC_CODE.astype(np.float64)), axis=-1)
    recon = (nf4.DYNAMIC_CODE[idx] * scales[:, None] + offset).reshape(-1)[:nb]

    np.testing.assert_allclose(float(t.absmax_offset), offset, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t.absmax_scale), scales, rtol=1e-6)
    assert np.mean(np.asarray(t.absmax_q) == idx.reshape(-1)[:nb]) > 0.99
    got = np.asarray(nf4.dequantize_absmax(t), np.float64)
    np.testing.assert_allclose(got, _absmax_ref(t), rtol=1e-6)
    # Nearest-code rounding: within half the widest gap of the 8-bit map, 0.9 / 64 / 2.
    per_block_scale = np.repeat(scales, 256)[:nb]
    assert np.all(np.abs(got - absmax) <= (0.9 / 128 + 1e-6) * per_block_scale)
    assert np.all(np.abs(got - recon) <= 1e-6 * per_block_scale + 1e-7)


def test_nf4_dynamic_map():
    code = nf4.DYNAMIC_CODE
    assert code.shape == (256,) and code.dtype == np.float32
    assert np.all(np.diff(code) > 0)
    assert 0.0 in code and code[-1] == 1.0
    # 127 positive values mirrored by 127 negative ones, plus 0 and 1.
    pos, neg = code[(code > 0) & (code < 1)], code[code < 0]
    np.testing.assert_array_equal(np.sort(-neg), pos)
    # Smallest: midpoint of [0.1, 1] in the 1e-6 decade; largest below 1: 1 - 0.9 / 128.
    np.testing.assert_allclose(pos[0], 0.55e-6, rtol=1e-6)
    np.testing.assert_allclose(pos[-1], 1 - 0.9 / 128, rtol=1e-7)
    widest_gap = np.max(np.diff(code.astype(np.float64)))
    np.testing.assert_allclose(widest_gap, 0.9 / 64, rtol=1e-5)


def test_nf4_round_trip_error_bound():
    w = _weights((160, 256), seed=2)
    t = nf4.quantize_nf4(jnp.asarray(w))
    deq = np.asarray(nf4.dequantize_nf4(t, jnp.float32), np.float64)
    np.testing.assert_allclose(deq, _nf4_dequant_ref(t), rtol=1e-6, atol=1e-9)
    blocks, deq_blocks = np.float64(w).reshape(-1, 64), deq.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    absmax_err = np.abs(_absmax_ref(t) - absmax)
    half_gap = np.max(np.diff(NF4_REF)) / 2  # (1 - 0.7229...) / 2
    bound = half_gap * absmax + absmax_err + 1e-7
    assert np.all(np.abs(deq_blocks - blocks) <= bound[:, None])
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert rel < 0.12  # typical NF4 error on Gaussian weights is about 0.1
    bf16 = nf4.dequantize_nf4(t)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == w.shape


def test_nf4_rejects_sizes_not_multiple_of_block():
    with pytest.raises(ValueError, match="multiple of"):
        nf4.quantize_nf4(jnp.zeros((3, 20)))


# --------------------------------------------------------------------------------------
# QLoRA.


def test_qlora_float32_forward_and_grads():
    d = _data()
    p = _with_adapter(
        qlora.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0), dtype=jnp.float32), d
    )
    assert p.compute_dtype == "float32"
    y, dp, dx = _vjp(qlora, p, d["x"], d["g"])
    w_hat = _nf4_dequant_ref(p.w)
    refs = _lora_reference(w_hat, np.float64(d["a"]), np.float64(d["b"]), d["x"], d["g"], SCALING)
    _assert_float32_close((y, dp.a, dp.b, dx), refs)
    for leaf in jax.tree.leaves(dp.w):  # the NF4 storage gets no gradient
        assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))


def test_qlora_rejects_sizes_not_multiple_of_block():
    with pytest.raises(ValueError, match="block size"):
        qlora.init(np.zeros((3, 20), np.float32), 2, key=jax.random.key(0))


# --------------------------------------------------------------------------------------
# The shared interface.


@pytest.mark.parametrize("module", [lora, qlora], ids=["lora", "qlora"])
def test_bf16_compute_matches_rounded_reference(module):
    """bf16 compute (the default dtype) against a bf16 LoRA over the backbone as stored: ``w``
    in bf16 (lora) or the dequantized NF4 (qlora)."""
    d = _data()
    p = _with_adapter(module.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0)), d)
    y = module.apply(p, jnp.asarray(d["x"], jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == BATCH + (OUT,)
    w = _nf4_dequant_ref(p.w) if module is qlora else np.asarray(p.w, np.float64)
    y_ref, bound = _bf16_reference(d["x"], w, d["a"], d["b"])
    y_ref = _bf16(y_ref)  # the sum rounded too, as the layer's bf16 output is
    _assert_within(np.asarray(y, np.float32).reshape(y_ref.shape), y_ref, bound, "bf16 y")
    # f32 input, bf16 compute: the output comes back in the input's dtype.
    assert module.apply(p, jnp.asarray(d["x"])).dtype == jnp.float32


@pytest.mark.parametrize("module", METHODS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_grad_over_full_params_and_jit(module):
    d = _data()
    p = _with_adapter(module.init(d["w"], RANK, alpha=ALPHA, key=jax.random.key(0)), d)
    x = jnp.asarray(d["x"], jnp.bfloat16)

    def loss(params, inputs):
        return jnp.sum(module.apply(params, inputs).astype(jnp.float32) ** 2)

    # The NF4 storage holds uint8 codes, for which jax.grad needs allow_int=True.
    grad = jax.grad(loss, allow_int=module is qlora)
    grads = grad(p, x)
    assert jax.tree.structure(grads) == jax.tree.structure(p)
    mask = module.trainable(p)
    assert jax.tree.structure(mask) == jax.tree.structure(p)
    for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask), strict=True):
        if m:
            assert g.dtype == jnp.float32 and np.any(np.asarray(g))
        else:
            assert g.dtype == jax.dtypes.float0 or not np.any(np.asarray(g, np.float32))
    assert sorted(f.name for f in dataclasses.fields(p) if getattr(mask, f.name) is True) == [
        "a",
        "b",
    ]
    # jit gives the same forward and gradients as eager execution.
    np.testing.assert_array_equal(
        np.asarray(jax.jit(module.apply)(p, x), np.float32),
        np.asarray(module.apply(p, x), np.float32),
    )
    jit_grads = jax.jit(grad)(p, x)
    for name in ("a", "b"):
        np.testing.assert_allclose(
            getattr(jit_grads, name),
            getattr(grads, name),
            rtol=1e-6,
            atol=1e-6 * float(jnp.abs(getattr(grads, name)).max()),
        )


@pytest.mark.parametrize("module", METHODS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_init_contract(module):
    d = _data()
    p = module.init(d["w"], RANK, key=jax.random.key(3))
    assert p.rank == RANK and p.alpha == 16.0 and p.scaling == 1.0
    assert p.a.shape == (RANK, IN) and p.b.shape == (OUT, RANK)
    assert p.a.dtype == jnp.float32 and not np.any(np.asarray(p.b))
    # With B = 0 the layer is the (quantized) backbone alone.
    x = jnp.asarray(d["x"])
    zero_a = module.apply(dataclasses.replace(p, a=jnp.zeros_like(p.a)), x)
    np.testing.assert_array_equal(np.asarray(module.apply(p, x)), np.asarray(zero_a))
    for bad_rank in (0, -1, min(OUT, IN) + 1):
        with pytest.raises(ValueError, match="rank"):
            module.init(d["w"], bad_rank, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        module.init(d["w"], RANK)
    with pytest.raises(ValueError, match="2-D"):
        module.init(d["w"].reshape(-1), RANK, key=jax.random.key(0))
    with pytest.raises(ValueError, match="features"):
        module.apply(p, jnp.zeros((3, IN + 16)))


@pytest.mark.parametrize("module", [lora, fp8_lora], ids=["lora", "fp8_lora"])
def test_masked_optimizer_step_touches_only_the_adapter(module):
    d = _data()
    p = module.init(d["w"], RANK, key=jax.random.key(0))
    x = jnp.asarray(d["x"], jnp.bfloat16)
    opt = optax.masked(optax.adamw(1e-2), module.trainable(p))
    state = opt.init(p)

    def loss(params):
        return jnp.mean((module.apply(params, x).astype(jnp.float32) - 1.0) ** 2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new, _ = step(p, state)
    assert np.any(np.asarray(new.b)) and not np.array_equal(np.asarray(new.a), np.asarray(p.a))
    frozen = [f.name for f in dataclasses.fields(p) if f.name not in ("a", "b", "rank", "alpha")]
    for name in frozen:
        np.testing.assert_array_equal(
            np.asarray(getattr(new, name), np.float32), np.asarray(getattr(p, name), np.float32)
        )
    assert float(loss(new)) < float(loss(p))


@pytest.mark.parametrize("module", METHODS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_check_matches_init(module):
    assert module.check(OUT, IN, RANK) is None
    assert "rank" in module.check(OUT, IN, 0)
    if module is fp8_lora:
        assert "multiple of 16" in module.check(40, IN, 8)
    if module is qlora:
        assert "block size" in module.check(3, 20, 2)


@pytest.mark.parametrize("module", METHODS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_stacked_layers_vmap_init_and_scan_apply(module):
    # Stacked models (nn.scan) create each layer's params under vmap and slice them in a scan.
    d = _data()
    ws = jnp.stack([jnp.asarray(d["w"]), 3 * jnp.asarray(d["w"])])
    keys = jax.random.split(jax.random.key(0), 2)
    stacked = jax.vmap(lambda w, k: module.init(w, RANK, key=k))(ws, keys)
    x = jnp.asarray(d["x"])
    _, ys = jax.lax.scan(lambda c, p: (c, module.apply(p, x)), 0, stacked)
    for i in range(2):
        single = module.init(ws[i], RANK, key=keys[i])
        layer = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
        for got, want in zip(jax.tree.leaves(layer), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(
                np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6
            )
        np.testing.assert_allclose(ys[i], module.apply(single, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("module", "leaves", "static"),
    [
        (lora, [".w", ".a", ".b"], (RANK, 16.0)),
        (fp8_lora, [".w8", ".scale", ".a", ".b"], (RANK, 16.0)),
        (qlora, [".w.codes", ".w.absmax_q", ".w.absmax_scale", ".w.absmax_offset", ".a", ".b"],
         (RANK, 16.0, "bfloat16")),
    ],
    ids=["lora", "fp8_lora", "qlora"],
)
def test_pytree_layout_is_backbone_then_adapter(module, leaves, static):
    # Checkpoints and exports read these trees by path; flattening order is backbone first.
    p = module.init(jnp.asarray(_data()["w"]), RANK, key=jax.random.key(0))
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(p)]
    assert paths == leaves
    node_data = jax.tree_util.tree_structure(p).node_data()
    assert node_data is not None and node_data[1] == static
