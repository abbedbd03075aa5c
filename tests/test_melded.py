"""The melded layer against a float64 NumPy reference of the same quantized math."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax import melded
from falqon_jax.bench import hlo
from tests import reference as ref

OUT, IN, RANK, TOKENS = 48, 64, 16, 40


def _weight(seed=0, out=OUT, inp=IN):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((out, inp)) * 0.05).astype(np.float32)


def _layer(seed=0, rank=RANK, live=False):
    return melded.init(jnp.asarray(_weight(seed)), rank, b_in_forward=live)


def _live_layer(seed=0):
    """A live-``b`` layer with a non-zero ``b`` (as after some training)."""
    p = _layer(seed, live=True)
    b = np.random.default_rng(seed + 100).standard_normal((OUT, RANK)).astype(np.float32) * 0.1
    return dataclasses.replace(p, b=jnp.asarray(b))


def test_init_layout_and_dtypes():
    p = _layer()
    assert p.w8.shape == (OUT + RANK, IN) and p.w8.dtype == jnp.float8_e4m3fn
    assert p.scale.shape == () and p.scale.dtype == jnp.float32
    assert p.b.shape == (OUT, RANK) and p.b.dtype == jnp.float32 and not np.any(np.asarray(p.b))
    assert (p.out, p.rank, p.in_features) == (OUT, RANK, IN)
    assert melded.dequantize(p).shape == (OUT, IN)


def test_init_svd_factor_matches_numpy_svd_of_quantization_error():
    w = _weight()
    p = melded.init(jnp.asarray(w), RANK)
    # Reference: quantize W alone, SVD (float64) of its error, A = sqrt(S_r) V_r^T.
    q, s = ref.quantize(w, ref.E4M3)
    error = w.astype(np.float64) - ref.f64(q) * float(s)
    u, sing, vt = np.linalg.svd(error, full_matrices=False)
    a_ref = np.sqrt(sing[:RANK])[:, None] * vt[:RANK]
    b0 = u[:, :RANK] * np.sqrt(sing[:RANK])  # the implicit "B.A" of the error
    # The melded matrix is [W; A] quantized with ONE per-tensor scale.
    # Here W's amax dominates A's, so the melded scale is exactly W's own scale.
    assert np.abs(w).max() > np.abs(a_ref).max()
    melded_ref, scale_ref = ref.quantize(np.concatenate([w, a_ref.astype(np.float32)]), ref.E4M3)
    assert float(p.scale) == float(scale_ref)
    a_got = np.asarray(p.a(), np.float64)
    # Singular vectors are defined up to sign; quantization error <= 2^-4 relative, plus the
    # subnormal step at this scale.
    tol = 2.0**-4 * np.abs(a_ref) + 2.0**-9 * float(scale_ref) + 1e-6
    for i in range(RANK):
        sign = np.sign(a_got[i] @ a_ref[i])
        assert np.all(np.abs(a_got[i] - sign * a_ref[i]) <= tol[i]), i
    # The factor property: the adapter pair explains part of the quantization error.
    dq_w = ref.f64(ref.quantize(w, ref.E4M3)[0]) * float(s)
    e = w - dq_w
    assert np.linalg.norm(e - b0 @ a_ref) < np.linalg.norm(e)
    # Backbone rows: W quantized with the melded scale, half-ulp rounding.
    back = np.asarray(melded.dequantize(p), np.float64)
    np.testing.assert_array_equal(
        np.asarray(p.w8)[:OUT].view(np.uint8), melded_ref[:OUT].view(np.uint8)
    )
    assert np.all(np.abs(back - w) <= 2.0**-4 * np.abs(w) + 2.0**-10 * float(scale_ref))


def test_init_random_ablation():
    w = _weight(3)
    p = melded.init(jnp.asarray(w), RANK, key=jax.random.key(0), init="random")
    a = np.asarray(p.a())
    assert a.min() >= w.min() - 2.0**-4 * abs(w.min()) and a.max() <= w.max() * (1 + 2.0**-4)
    assert abs(a.std() - w.std()) < 0.3 * w.std()


@pytest.mark.parametrize(
    "shape,rank,kwargs,match",
    [
        ((40, 64), 8, {}, "multiple of 16"),
        ((48, 60), 8, {}, "multiple of 16"),
        ((48, 64), 0, {}, "rank"),
        ((48, 64), 49, {}, "rank"),
        ((48, 64), 8, {"init": "random"}, "key"),
        ((48, 64), 8, {"init": "pca"}, "init"),
    ],
)
def test_init_rejects_bad_input(shape, rank, kwargs, match):
    with pytest.raises(ValueError, match=match):
        melded.init(jnp.zeros(shape), rank, **kwargs)


@pytest.mark.parametrize("lead", [(TOKENS,), (4, 10)])
def test_forward_matches_reference(lead):
    p = _layer()
    x = np.random.default_rng(5).standard_normal(lead + (IN,)).astype(np.float32)
    y = melded.apply(p, jnp.asarray(x))
    assert y.shape == lead + (OUT,) and y.dtype == jnp.float32
    w8 = np.asarray(p.w8)
    y_ref, _, x8, sx = ref.melded_forward(w8, np.float32(p.scale), OUT, x)
    factor = float(sx) * float(p.scale)
    bound = ref.summation_bound(np.abs(ref.f64(x8)), np.abs(ref.f64(w8[:OUT])).T, IN, factor)
    err = np.abs(np.asarray(y, np.float64).reshape(-1, OUT) - y_ref)
    assert np.all(err <= bound)


def test_forward_bfloat16_returns_bfloat16():
    p = _layer()
    x = np.random.default_rng(6).standard_normal((TOKENS, IN)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = melded.apply(p, xb)
    assert y.dtype == jnp.bfloat16
    w8 = np.asarray(p.w8)
    y_ref, _, x8, sx = ref.melded_forward(w8, np.float32(p.scale), OUT,
                                          np.asarray(xb.astype(jnp.float32)))
    # Same quantized math: float32 summation, then three bfloat16 roundings (unit roundoff
    # u = 2^-8 each): the GEMM's sum, the product of the two scales, the scaled result
    # (fp8.fp8_dot with a bfloat16 result).
    u = 2.0**-8
    f32 = ref.summation_bound(np.abs(ref.f64(x8)), np.abs(ref.f64(w8[:OUT])).T, IN,
                              float(sx) * float(p.scale))
    err = np.abs(np.asarray(y, np.float64) - y_ref)
    assert np.all(err <= f32 * (1 + u) ** 3 + ((1 + u) ** 3 - 1) * np.abs(y_ref))
    assert err.max() > 0  # rounded: the bound is tested, not an identity


def test_live_b_forward_in_bfloat16_rounds_each_term_once():
    """With a live ``b`` in bfloat16 the melded GEMM writes ``y`` and ``A x`` in bfloat16,
    ``(A x) b^T`` is a bfloat16 GEMM (``A x`` and ``b`` cast to it, float32 accumulation, its
    result rounded) and the two are summed in bfloat16: each rounding is within 2^-8 of its
    value, on top of float32 summation (float64 reference)."""
    p = _live_layer(4)
    x = np.random.default_rng(12).standard_normal((TOKENS, IN)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = melded.apply(p, xb)
    assert y.dtype == jnp.bfloat16
    w8, scale, b = np.asarray(p.w8), float(p.scale), np.asarray(p.b, np.float64)
    y_ref, ax_ref, x8, sx = ref.melded_forward(w8, np.float32(scale), OUT,
                                               np.asarray(xb.astype(jnp.float32)))
    lora_abs = np.abs(ax_ref) @ np.abs(b).T
    want = y_ref + ax_ref @ b.T
    f32 = (ref.summation_bound(np.abs(ref.f64(x8)), np.abs(ref.f64(w8)).T, IN, float(sx) * scale)
           [:, :OUT] + ref.summation_bound(np.abs(ax_ref), np.abs(b).T, RANK, 1.0) * 2)
    # y's sum, the scales' product and y rounded (fp8.fp8_dot's bfloat16 result), A x and b
    # rounded (each moves the product by 2^-8 of |A x| |b|), the product rounded, the sum
    # rounded
    bf16 = 2.0**-8 * (1 + 2.0**-7) * (3 * np.abs(y_ref) + 3 * lora_abs + np.abs(want))
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= f32 + bf16)
    assert np.abs(ax_ref @ b.T).max() > 1e-2  # b is live: the bound is not vacuous for it


def _vjp(p, seed):
    """``melded.apply`` of layer ``p`` on a random float32 ``x [TOKENS, IN]`` and its
    backward from a random float32 ``g [TOKENS, OUT]`` (both from ``seed``):
    ``(x, g, y [TOKENS, OUT], dp (the layer's cotangent), dx [TOKENS, IN])``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((TOKENS, IN)).astype(np.float32)
    g = rng.standard_normal((TOKENS, OUT)).astype(np.float32)
    y, vjp = jax.vjp(melded.apply, p, jnp.asarray(x))
    dp, dx = vjp(jnp.asarray(g))
    return x, g, y, dp, dx


def test_backward_matches_reference_and_freezes_w8():
    p = _layer(1)
    x, g, y, dp, dx = _vjp(p, 7)
    # The backward is a function of the saved ``A x`` and g; the reference takes the layer's
    # own ``ax`` and checks it against the float64 forward first.
    (_,), (ax,) = melded._forward((p,), jnp.asarray(x))
    w8 = np.asarray(p.w8)
    _, ax_ref, x8, sx = ref.melded_forward(w8, np.float32(p.scale), OUT, x)
    ax_bound = ref.summation_bound(np.abs(ref.f64(x8)), np.abs(ref.f64(w8[OUT:])).T, IN,
                                   float(sx) * float(p.scale))
    assert np.all(np.abs(np.asarray(ax, np.float64) - ax_ref) <= ax_bound)
    dx_ref, db_ref, g8, sg, ax8, sax = ref.melded_backward(w8, np.float32(p.scale), OUT,
                                                          np.asarray(ax), g)
    dx_bound = ref.summation_bound(np.abs(ref.f64(g8)), np.abs(ref.f64(w8[:OUT])), OUT,
                                   float(sg) * float(p.scale))
    db_bound = ref.summation_bound(np.abs(ref.f64(g8)).T, np.abs(ref.f64(ax8)), TOKENS,
                                   float(sg) * float(sax))
    assert dx.shape == x.shape and dp.b.shape == (OUT, RANK)
    assert np.all(np.abs(np.asarray(dx, np.float64) - dx_ref) <= dx_bound)
    assert np.all(np.abs(np.asarray(dp.b, np.float64) - db_ref) <= db_bound)
    assert not np.any(np.asarray(dp.w8.astype(jnp.float32))) and float(dp.scale) == 0.0


def test_grad_through_a_loss_reaches_b_only():
    p = _layer(2)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, IN)), jnp.float32)
    grads = jax.jit(jax.grad(lambda p, x: jnp.mean(melded.apply(p, x) ** 2)))(p, x)
    assert float(jnp.abs(grads.b).sum()) > 0
    assert not np.any(np.asarray(grads.w8.astype(jnp.float32)))


def test_input_is_not_saved_for_backward():
    p = _layer()
    x = jnp.asarray(np.random.default_rng(9).standard_normal((TOKENS, IN)), jnp.float32)
    _, vjp = jax.vjp(melded.apply, p, x)
    saved = jax.tree_util.tree_leaves(vjp)
    assert saved, "expected residuals"
    for leaf in saved:
        assert jnp.shape(leaf) != x.shape, f"x-shaped residual {jnp.shape(leaf)}"
    shapes = sorted(str(jnp.shape(leaf)) for leaf in saved)
    assert str((TOKENS, RANK)) in shapes  # A x is what the backward keeps


def test_apply_rejects_stacked_weights_and_wrong_width():
    p = _layer()
    stacked = jax.tree.map(lambda a: a[None], p)
    with pytest.raises(ValueError, match="stacked"):
        melded.apply(stacked, jnp.ones((2, IN)))
    with pytest.raises(ValueError, match="features"):
        melded.apply(p, jnp.ones((2, IN + 16)))


@pytest.mark.parametrize("live", [False, True])
def test_fp8_gemms_and_three_casts_per_fwd_bwd(live):
    """Lowered program of fwd+bwd, 3 casts to FP8: 2 token x feature sized (``x``; ``g``,
    with ``g b`` beside it for a live ``b``) and 1 token x rank sized (``A x``). Proxy
    rules: 3 FP8 GEMMs (the melded ``y`` / ``A x``, ``dx``, ``db``), 1 of them forward. A
    live ``b``: 4 FP8 GEMMs (``A x`` and ``Q(x) W^T`` forward, ``dx`` against ``[W; A]``,
    ``db``) and 2 in the compute dtype (``(A x) b^T``, ``g b``)."""
    p = _layer(live=live)
    x = jnp.ones((256, IN), jnp.float32)
    g = jnp.ones((256, OUT), jnp.float32)

    def fwd_bwd(p, x, g):
        y, vjp = jax.vjp(melded.apply, p, x)
        return y, vjp(g)

    report = hlo.analyze(fwd_bwd, p, x, g, large_elements=256 * 32)
    assert report["lowered"] == {"fp8_casts": 3, "fp8_casts_large": 2,
                                 "gemms": 6 if live else 3, "fp8_gemms": 4 if live else 3}
    fwd = hlo.analyze(melded.apply, p, x, large_elements=256 * 32)["lowered"]
    assert (fwd["gemms"], fwd["fp8_gemms"], fwd["fp8_casts"]) == ((3, 2, 1) if live
                                                                  else (1, 1, 1))


def test_live_b_forward_and_backward_match_reference():
    """``y = Q(x) W^T + (A x) b^T`` with ``A x = Q(x) A^T``; ``dL/dx = [Q(g), Q(g b)] [W; A]``
    with ``g`` and ``g b`` on one E5M2 grid; ``dL/db = Q(g)^T Q(A x)``. Float64 NumPy
    reference from the layer's own ``A x``, worst-case float32 summation bounds; ``g b``
    may round to the E5M2 neighbour on the other side (float32 against float64 sums)."""
    p = _live_layer(3)
    x, g, y, dp, dx = _vjp(p, 11)
    w8, scale, b = np.asarray(p.w8), float(p.scale), np.asarray(p.b, np.float64)
    y_ref, ax_ref, x8, sx = ref.melded_forward(w8, np.float32(scale), OUT, x)
    (_,), (ax,) = melded._forward((p,), jnp.asarray(x))
    ax64 = np.asarray(ax, np.float64)
    ax_bound = ref.summation_bound(np.abs(ref.f64(x8)), np.abs(ref.f64(w8[OUT:])).T, IN,
                                   float(sx) * scale)
    assert np.all(np.abs(ax64 - ax_ref) <= ax_bound)
    y_want = y_ref + ax64 @ b.T
    y_bound = (ref.summation_bound(np.abs(ref.f64(x8)), np.abs(ref.f64(w8[:OUT])).T, IN,
                                   float(sx) * scale)
               + ref.summation_bound(np.abs(ax64), np.abs(b).T, RANK, 1.0)
               + 2.0**-24 * (np.abs(y_ref) + np.abs(ax64 @ b.T)))
    assert np.all(np.abs(np.asarray(y, np.float64) - y_want) <= y_bound)
    gb = g.astype(np.float64) @ b
    dx_ref, db_ref, gext8, sg, ax8, sax = ref.melded_backward_live(
        w8, np.float32(scale), OUT, np.asarray(ax), g, gb)
    # g b's own float32 sum may move it across an E5M2 rounding boundary (the midpoint of
    # its two neighbours) where it lies within that sum's error of one: a step of the grid
    # there, times |A|.
    scaled = np.clip(gb / float(sg), -ref.fmax(ref.E5M2), ref.fmax(ref.E5M2))
    lo, hi = ref.neighbours(scaled, ref.E5M2)
    sum_error = ref.summation_bound(np.abs(g.astype(np.float64)), np.abs(b), OUT,
                                    1.0) / float(sg)
    step = np.where(np.abs(scaled - (lo + hi) / 2) <= sum_error, hi - lo, 0.0)
    dx_bound = (ref.summation_bound(np.abs(ref.f64(gext8)), np.abs(ref.f64(w8)), OUT + RANK,
                                    float(sg) * scale)
                + step @ np.abs(ref.f64(w8[OUT:])) * float(sg) * scale)
    assert np.all(np.abs(np.asarray(dx, np.float64) - dx_ref) <= dx_bound)
    # E5M2 keeps g b to a quarter of itself: the rank term is in dx, not lost.
    gb_term = gb @ ref.f64(w8[OUT:]) * scale
    assert np.abs(np.asarray(dx, np.float64) - (dx_ref - gb_term)).max() > 10 * dx_bound.max()
    db_bound = ref.summation_bound(np.abs(ref.f64(gext8[:, :OUT])).T, np.abs(ref.f64(ax8)),
                                   TOKENS, float(sg) * float(sax))
    assert np.all(np.abs(np.asarray(dp.b, np.float64) - db_ref) <= db_bound)
    assert dp.b_in_forward and not np.any(np.asarray(dp.w8.astype(jnp.float32)))
    # The live term is really there: the same layer without it differs by (A x) b^T.
    assert np.abs(ax64 @ b.T).max() > 100 * y_bound.max()


def test_effective_weight_is_backbone_plus_b_a():
    p = _live_layer(4)
    want = ref.f64(np.asarray(p.w8)) * float(p.scale)
    want = want[:OUT] + np.asarray(p.b, np.float64) @ want[OUT:]
    np.testing.assert_allclose(np.asarray(melded.effective_weight(p)), want, rtol=1e-6,
                               atol=1e-7)


def test_a_row_norm_rescales_rows_and_never_exceeds_w():
    w = _weight(5)
    w[0, 0] = 2.0  # an outlier, as real weights have: A's entries stay below W's amax
    norm = melded.lora_row_norm(IN, RANK, 16.0)
    assert norm == pytest.approx(1 / np.sqrt(3))  # alpha / rank = 1
    p = melded.init(jnp.asarray(w), RANK, a_row_norm=norm)
    rows = np.linalg.norm(np.asarray(p.a(), np.float64), axis=1)
    # E4M3 rounds each entry by at most 2^-4 relative (plus subnormals near zero).
    np.testing.assert_allclose(rows, norm, rtol=2.0**-4)
    huge = melded.init(jnp.asarray(w), RANK, a_row_norm=100.0)  # would dominate W's scale
    assert np.abs(np.asarray(huge.a())).max() <= np.abs(w).max() * (1 + 2.0**-4)
    q, s = ref.quantize(w, ref.E4M3)
    assert float(huge.scale) == float(s)  # the shared scale stays W's own


def test_given_a_is_used_as_is():
    w = _weight(7)
    a = np.linalg.qr(np.random.default_rng(8).standard_normal((IN, RANK)))[0].T  # (r, in)
    p = melded.init(jnp.asarray(w), RANK, init="given", a=jnp.asarray(a, jnp.float32))
    got = np.asarray(p.a(), np.float64)
    np.testing.assert_allclose(got, a, rtol=2.0**-4, atol=2.0**-9 * float(p.scale))
    with pytest.raises(ValueError, match="shape"):
        melded.init(jnp.asarray(w), RANK, init="given", a=jnp.zeros((RANK + 1, IN)))
