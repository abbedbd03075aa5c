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


def melded_backward_live(w8, scale, out, ax, g, gb):
    """The live-b backward: ``[g, g b]`` on one E5M2 grid against the melded ``[W; A]``;
    ``gb`` is ``g b`` as the caller computed it. Returns (dx, db, gext8, sg, ax8, sax)."""
    gext8, sg = quantize(np.concatenate([g, gb], axis=1), E5M2)
    dx = f64(gext8) @ f64(w8) * float(sg) * float(scale)
    ax8, sax = quantize(ax, E4M3)
    db = f64(gext8[:, :out]).T @ f64(ax8) * float(sg) * float(sax)
    return dx, db, gext8, sg, ax8, sax


def summation_bound(a_abs: np.ndarray, b_abs: np.ndarray, k: int, factor: float) -> np.ndarray:
    """Worst-case error of float32 recursive summation of a dot product of length ``k``
    (``k * 2^-24`` relative to the sum of absolute terms), plus one rounding for the
    output scaling; ``a_abs @ b_abs`` are the absolute terms, ``factor`` the scales."""
    return (k + 2) * 2.0**-24 * (a_abs @ b_abs) * factor


def top_rows(matrix: np.ndarray, k: int) -> np.ndarray:
    """The documented row ranking: L1 norms (float32) truncated to 10 mantissa bits, largest
    first, ties to the lower index. ``matrix (out, r) -> (k,)``."""
    norms = np.abs(np.asarray(matrix, np.float32)).sum(axis=1, dtype=np.float32)
    coarse = (norms.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.argsort(-coarse, kind="stable")[:k]


class FalqonReference:
    """Float64 model of the proxy-buffer update for one (possibly stacked) melded layer."""

    def __init__(self, w8: np.ndarray, out: int, top_k: int, reset: str,
                 feedback: bool = False):
        self.w8 = np.array(w8)  # (L, R, in) float8
        self.out, self.top_k, self.reset, self.feedback = out, top_k, reset, feedback
        self.buf = np.zeros(self.w8.shape[:-2] + (out, self.w8.shape[-2] - out))

    def step(self, update_b: np.ndarray) -> None:
        self.buf = self.buf + np.asarray(update_b, np.float64)
        for layer in range(self.w8.shape[0]):
            buf = self.buf[layer]
            rows = top_rows(buf, self.top_k)
            a8 = f64(self.w8[layer, self.out :])
            # W8[K] = Q(DQ(W8[K]) + Buf[K] @ A) with A = A8 * s; the scale cancels.
            new = f64(self.w8[layer, rows]) + buf[rows] @ a8
            lim = fmax(self.w8.dtype)
            self.w8[layer, rows] = np.clip(new, -lim, lim).astype(self.w8.dtype)
            residual = new - f64(self.w8[layer, rows])  # what rounding left out
            if self.reset == "all":
                buf[:] = 0
            else:
                buf[rows] = 0
            if self.feedback:  # the residual, in A's row space, waits for the next merge
                buf[rows] = lstsq_rows(residual, self.w8[layer, self.out :])


def lstsq_rows(residual: np.ndarray, a8: np.ndarray) -> np.ndarray:
    """``c`` minimising ``||c @ a8 - residual||`` row by row: ``(k, in) -> (k, r)``."""
    return np.linalg.lstsq(f64(a8).T, np.asarray(residual, np.float64).T, rcond=None)[0].T


def finite_values(dtype) -> np.ndarray:
    """Every finite value of an FP8 format, sorted, as float64 (from all 256 codes)."""
    values = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


def neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The representable values ``lo <= x <= hi`` of ``dtype`` bracketing float64 ``x``
    (inside the finite range); ``lo == hi`` where ``x`` is representable."""
    table = finite_values(dtype)
    x = np.asarray(x, np.float64)
    hi = table[np.clip(np.searchsorted(table, x, side="left"), 0, table.size - 1)]
    lo = table[np.clip(np.searchsorted(table, x, side="right") - 1, 0, table.size - 1)]
    return lo, hi


def step_away_from_zero(q: np.ndarray) -> np.ndarray:
    """Spacing from each FP8 value to the next one away from zero (float64); at the largest
    finite value, the spacing below it."""
    table = finite_values(q.dtype)
    mag = np.abs(f64(q))
    i = np.searchsorted(table, mag)
    top = i >= table.size - 1
    up = table[np.minimum(i + 1, table.size - 1)]
    return np.where(top, mag - table[np.maximum(i - 1, 0)], up - mag)


class VisibleMergeReference:
    """Float64 model of the ``visible_merge`` rule for one (possibly stacked) melded layer:
    ``b`` is live; the top-k rows of ``b`` are folded into ``w8`` where an entry's change
    reaches a full FP8 step, and the least-squares remainder stays in ``b``."""

    def __init__(self, w8: np.ndarray, b: np.ndarray, out: int, top_k: int):
        self.w8 = np.array(w8)  # (L, R, in)
        self.b = np.array(b, np.float64)  # (L, out, r)
        self.out, self.top_k = out, top_k

    def step(self, update_b: np.ndarray) -> None:
        self.b = self.b + np.asarray(update_b, np.float64)
        for layer in range(self.w8.shape[0]):
            b = self.b[layer]
            rows = top_rows(b, self.top_k)
            a8 = self.w8[layer, self.out :]
            old = self.w8[layer, rows]
            delta = b[rows] @ f64(a8)
            reaches = np.abs(delta) >= step_away_from_zero(old)
            lim = fmax(old.dtype)
            new = np.clip(f64(old) + np.where(reaches, delta, 0.0), -lim, lim).astype(old.dtype)
            self.w8[layer, rows] = new
            b[rows] = lstsq_rows(delta - (f64(new) - f64(old)), a8)
