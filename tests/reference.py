"""Independent NumPy references (float64 math, ml_dtypes rounding) for the FP8 code paths.

Nothing here imports the code under test. Scales follow the documented convention:
``scale = amax / fmax`` computed in float32 (1.0 for an all-zero tensor), quantization is a
saturating round-to-nearest-even cast of ``x / scale``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)
F32_TINY = np.finfo(np.float32).tiny


def fmax(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).max)


def scale_of(x: np.ndarray, dtype) -> np.float32:
    amax = np.float32(np.max(np.abs(np.asarray(x, np.float32)))) if x.size else np.float32(0)
    if not (amax > 0 and np.isfinite(amax)):
        return np.float32(1.0)
    return np.maximum(amax / np.float32(fmax(dtype)), np.float32(F32_TINY))


def quantize(x: np.ndarray, dtype) -> tuple[np.ndarray, np.float32]:
    """(q, scale) with q in ``dtype`` (ml_dtypes), scale float32."""
    s = scale_of(x, dtype)
    scaled = np.asarray(x, np.float32) / s
    return np.clip(scaled, -fmax(dtype), fmax(dtype)).astype(dtype), s


def f64(q: np.ndarray) -> np.ndarray:
    return np.asarray(q).astype(np.float64)


def melded_forward(w8, scale, out, x):
    """Y = Q(x) . W8^T * s_x * s_M in float64; returns (y, ax, x8, s_x)."""
    tokens = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    x8, sx = quantize(tokens, E4M3)
    both = f64(x8) @ f64(w8).T * float(sx) * float(scale)
    return both[:, :out], both[:, out:], x8, sx


def melded_backward(w8, scale, out, ax, g):
    """dL/dx and dL/db of the reformulated backward, given the saved ``ax`` (float32)."""
    g8, sg = quantize(g, E5M2)
    dx = f64(g8) @ f64(w8[:out]) * float(sg) * float(scale)
    ax8, sax = quantize(ax, E4M3)
    db = f64(g8).T @ f64(ax8) * float(sg) * float(sax)
    return dx, db, g8, sg, ax8, sax


def summation_bound(a_abs: np.ndarray, b_abs: np.ndarray, k: int, factor: float) -> np.ndarray:
    """Worst-case error of float32 recursive summation of a dot product of length ``k``
    (``k * 2^-24`` relative to the sum of absolute terms), plus one rounding for the
    output scaling; ``a_abs @ b_abs`` are the absolute terms, ``factor`` the scales."""
    return (k + 2) * 2.0**-24 * (a_abs @ b_abs) * factor


class FalqonReference:
    """Float64 model of the proxy-buffer update for one (possibly stacked) melded layer."""

    def __init__(self, w8: np.ndarray, out: int, top_k: int, reset: str):
        self.w8 = np.array(w8)  # (L, R, in) float8
        self.out, self.top_k, self.reset = out, top_k, reset
        self.buf = np.zeros(self.w8.shape[:-2] + (out, self.w8.shape[-2] - out))

    def step(self, update_b: np.ndarray) -> None:
        self.buf = self.buf + np.asarray(update_b, np.float64)
        for layer in range(self.w8.shape[0]):
            buf = self.buf[layer]
            norms = np.abs(buf).sum(axis=1)
            rows = np.argsort(-norms, kind="stable")[: self.top_k]
            a8 = f64(self.w8[layer, self.out :])
            # W8[K] = Q(DQ(W8[K]) + Buf[K] @ A) with A = A8 * s; the scale cancels.
            new = f64(self.w8[layer, rows]) + buf[rows] @ a8
            lim = fmax(self.w8.dtype)
            self.w8[layer, rows] = np.clip(new, -lim, lim).astype(self.w8.dtype)
            if self.reset == "all":
                buf[:] = 0
            else:
                buf[rows] = 0
