"""The ``speed`` subcommand's rows: run each train step on the default device and report
wall-clock time per step, tokens/s and model-FLOPs utilisation against the device's peaks."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax.bench.cases import Case, base_row

CPU_NOTE = "CPU wall-clock: not indicative of FP8 speed (FP8 is emulated on CPU)"

# Dense peak throughput in TFLOP/s, (bf16, fp8) per device kind; ``None`` where the device
# has no FP8 tensor cores. Matched in order against ``jax.Device.device_kind`` (so the more
# specific names come first). Vendor datasheet numbers without structured sparsity.
PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H200 NVL", 835.0, 1671.0),
    ("GH200", 989.0, 1979.0),
    ("H200", 989.0, 1979.0),  # H200 SXM
    ("H100", 989.0, 1979.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0, 4500.0),
    ("L40S", 362.0, 733.0),
    ("L4", 121.0, 242.5),
    ("A100", 312.0, None),
)




# --------------------------------------------------------------------------------------
# Environment.


def environment() -> dict[str, Any]:
    """Backend, device kind, JAX/jaxlib versions and the host CPU (for every row)."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "backend": device.platform,
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "host_cpu": _cpu_model(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_flops(device_kind: str) -> tuple[float | None, float | None]:
    """``(bf16, fp8)`` dense peak FLOP/s for a device kind; ``None`` when unknown/absent."""
    for name, bf16, fp8_peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return bf16 * 1e12, (None if fp8_peak is None else fp8_peak * 1e12)
    return None, None


def synthetic(abstract: Any, key: jax.Array) -> Any:
    """Concrete arrays for an abstract pytree, made on the device in one jitted call.

    Float leaves (FP8 included) get small random values (``N(0, 0.02)``, cast), integer
    leaves random values in ``[0, 16)`` (valid NF4 codes and dynamic-code indices), so the
    work of a step is that of a real model; scales are ``2e-4``-ish positives.
    """
    leaves, treedef = jax.tree.flatten(abstract)

    def make(key: jax.Array) -> list[jax.Array]:
        keys = jax.random.split(key, max(len(leaves), 1))
        made = []
        for k, leaf in zip(keys, leaves, strict=False):
            dtype = jnp.dtype(leaf.dtype)
            if jnp.issubdtype(dtype, jnp.floating):
                value = 0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
                if leaf.shape == ():
                    value = jnp.abs(value) / 100 + 1e-4
                made.append(value.astype(dtype))
            elif jnp.issubdtype(dtype, jnp.integer):
                made.append(jax.random.randint(k, leaf.shape, 0, 16).astype(dtype))
            else:
                made.append(jnp.zeros(leaf.shape, dtype))
        return made

    return jax.tree.unflatten(treedef, jax.jit(make)(key))


def speed_row(
    case: Case, env: dict[str, Any], *, repeats: int, warmup: int, seed: int
) -> dict[str, Any]:
    """Run ``case`` on the default device: median seconds per step after ``warmup`` steps.

    Params, optimizer state and inputs are synthetic (:func:`synthetic`; token ids below
    256): the work of a step does not depend on the values, and nothing slow (FALQON's SVD
    init of every layer) runs before the timing. The first call includes compilation and
    is reported as ``first_step_s``; ``compiles`` counts the programs compiled for the step
    (1: the state a step returns is the state it took, so no timed step compiles).
    """
    key = jax.random.key(seed)
    state = synthetic(case.state, key)
    inputs = case.make_inputs(jax.random.fold_in(key, 1000))
    step = jax.jit(case.step, donate_argnums=(0,))

    def run_once() -> float:
        nonlocal state
        start = time.perf_counter()
        result = step(state, *inputs)
        jax.block_until_ready(result)
        seconds = time.perf_counter() - start
        state = result[0]
        return seconds

    compile_start = time.perf_counter()
    first = run_once()
    compile_s = time.perf_counter() - compile_start
    del first
    for _ in range(max(warmup - 1, 0)):
        run_once()
    times = [run_once() for _ in range(repeats)]
    del state
    # programs compiled for the step: 1 when the state it returns matches the state it took
    cache_size = getattr(step, "_cache_size", None)
    median = statistics.median(times)
    bf16_peak, fp8_peak = peak_flops(env["device"]) if env["backend"] == "gpu" else (None, None)
    achieved = case.model_flops / median
    row = base_row(case, env)
    row.update(
        {
            "step_time_s": median,
            "step_times_s": times,
            "tokens_per_s": case.tokens / median,
            "achieved_tflops": achieved / 1e12,
            "mfu_bf16": None if bf16_peak is None else achieved / bf16_peak,
            "mfu_fp8": None if fp8_peak is None else achieved / fp8_peak,
            "first_step_s": round(compile_s, 3),
            "compiles": None if cache_size is None else cache_size(),
            "repeats": repeats,
            "warmup": warmup,
        }
    )
    if env["backend"] == "cpu":
        row["note"] = CPU_NOTE
    return row


SPEED_HEADER = (
    f"{'method':<9} {'shape':<16} {'step s':>10} {'tokens/s':>11} {'TFLOP/s':>8} "
    f"{'mfu_bf16':>8} {'mfu_fp8':>8}"
)

def format_speed(row: dict[str, Any]) -> str:
    """One table line of a ``speed`` row."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    return (
        f"{row['method']:<9} {row['shape']:<16} {row['step_time_s']:>10.4f} "
        f"{row['tokens_per_s']:>11.0f} {row['achieved_tflops']:>8.2f} "
        f"{pct(row['mfu_bf16']):>8} {pct(row['mfu_fp8']):>8}"
    )


