"""FALQON's ``A`` without an exact SVD (BENCHMARKS.md, "FALQON's A without an exact SVD"):
how much of the exact top singular directions' energy :func:`falqon_jax.melded.top_singular`
(randomized subspace iteration) captures, and what it costs against the exact SVD.

    python benchmarks/top_singular.py smollm2 [--rank 64]     # every projection, real weights
    python benchmarks/top_singular.py shapes [--exact]        # LLaMA-7B/70B shapes, timings

``smollm2``: the E4M3 quantization error of each of SmolLM2-135M-Instruct's 210 decoder
projections (converted from ``../shared``'s GGUF into ``~/.cache/falqon-jax``): per kind,
the smallest share of the exact top-``rank`` energy captured
(``||E V^T||_F^2 / sum(s_exact[:rank]^2)``), the largest relative error of the singular
values, and the share of the whole error's energy the exact top ``rank`` hold.

``shapes``: the quantization error of a Gaussian weight (std 0.02; the flattest spectrum,
the hardest case) of each LLaMA-7B and LLaMA-70B projection shape: seconds of one jitted
``top_singular`` (after its compile) and, with ``--exact``, of ``jnp.linalg.svd`` with the
captured share (the 70B shapes' exact SVDs take many minutes each here: ``--exact`` skips
shapes over 50M values). Prints JSON lines. Run from the repository root (``PYTHONPATH=.``
without an installed package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

SHAPES = {"7b q/o": (4096, 4096), "7b gate/up": (11008, 4096), "7b down": (4096, 11008),
          "70b q/o": (8192, 8192), "70b gate/up": (28672, 8192), "70b down": (8192, 28672)}


def quantization_error(w):
    import jax.numpy as jnp

    from falqon_jax import fp8

    w = jnp.asarray(w, jnp.float32)
    q, s = fp8.quantize(w, fp8.E4M3)
    return w - fp8.dequantize(q, s)


def captured(error: np.ndarray, vt: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(error @ vt.T) ** 2 / np.sum(exact**2))


def smollm2(rank: int) -> None:
    from safetensors.numpy import load_file

    from falqon_jax import melded
    from falqon_jax.bench.accuracy import prepare_smollm2

    weights = load_file(prepare_smollm2() / "model.safetensors")
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for name, w in sorted(weights.items()):
        if not name.endswith("proj.weight"):
            continue
        error = quantization_error(w)
        e64 = np.asarray(error, np.float64)
        full = np.linalg.svd(e64, compute_uv=False)
        sing, vt = melded.top_singular(error, rank)
        exact = full[:rank]
        rel = float(np.max(np.abs(np.asarray(sing, np.float64) - exact) / exact))
        rows.setdefault(name.split(".")[-2], []).append(
            (captured(e64, np.asarray(vt, np.float64), exact), rel,
             float(np.sum(exact**2) / np.sum(full**2))))
    for kind, values in rows.items():
        v = np.asarray(values)
        print(json.dumps({"kind": kind, "rank": rank, "matrices": len(v),
                          "captured_min": round(float(v[:, 0].min()), 5),
                          "captured_median": round(float(np.median(v[:, 0])), 5),
                          "singular_value_rel_err_max": round(float(v[:, 1].max()), 5),
                          "top_share_of_error_energy": round(float(np.median(v[:, 2])), 3)}))


def shapes(rank: int, exact: bool) -> None:
    import jax
    import jax.numpy as jnp

    from falqon_jax import melded

    top = jax.jit(melded.top_singular, static_argnums=1)
    svd = jax.jit(lambda m: jnp.linalg.svd(m, full_matrices=False)[1:])
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        error = quantization_error(rng.standard_normal(shape, np.float32) * 0.02)
        jax.block_until_ready(top(error, rank))  # compile
        start = time.perf_counter()
        sing, vt = jax.block_until_ready(top(error, rank))
        row = {"shape": name, "out_in": shape, "rank": rank,
               "top_singular_s": round(time.perf_counter() - start, 2)}
        if exact and shape[0] * shape[1] <= 50_000_000:
            start = time.perf_counter()
            full, _ = jax.block_until_ready(svd(error))
            row["exact_svd_s"] = round(time.perf_counter() - start, 2)
            e64 = np.asarray(error, np.float64)
            ex = np.asarray(full[:rank], np.float64)
            row["captured"] = round(captured(e64, np.asarray(vt, np.float64), ex), 5)
            row["singular_value_rel_err_max"] = round(
                float(np.max(np.abs(np.asarray(sing, np.float64) - ex) / ex)), 5)
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("smollm2", "shapes"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--exact", action="store_true", help="shapes: time the exact SVD "
                        "too and compare (up to 50M values)")
    args = parser.parse_args(argv)
    if args.what == "smollm2":
        smollm2(args.rank)
    else:
        shapes(args.rank, args.exact)
    return 0


if __name__ == "__main__":
    sys.exit(main())
