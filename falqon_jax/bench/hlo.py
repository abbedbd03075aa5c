"""The ``hlo`` rows: FP8 casts, GEMMs and memory of a lowered and compiled step.

These counts are exact facts about a program on any backend, unlike CPU wall-clock, which
says nothing about FP8 speed (CPUs emulate FP8).

Two views are counted:

* ``lowered``: the StableHLO that JAX emits (``jax.jit(f).lower(...).as_text()``) -- what the
  program asks for, identical on every backend.
* ``compiled``: the optimized HLO (``.compile().as_text()``); backend-specific. XLA's CPU
  backend, which has no FP8 arithmetic, adds float8<->float16 round trips here that a GPU
  build would not.

The text is read by :mod:`falqon_jax.gpu_program` (:func:`~falqon_jax.gpu_program.count_lowered`,
:func:`~falqon_jax.gpu_program.count_compiled`, :func:`~falqon_jax.gpu_program.layout_moves`);
this module compiles, collects and formats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from falqon_jax import gpu_program
from falqon_jax.bench.cases import Case, base_row


def _memory_and_cost(compiled: Any) -> dict[str, Any]:
    """Per-device bytes (``memory_analysis``) and XLA's cost analysis (flops, bytes) of a
    compiled program; ``-1`` where the backend does not say."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX returns one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
        "argument_bytes": int(getattr(memory, "argument_size_in_bytes", -1)),
        "output_bytes": int(getattr(memory, "output_size_in_bytes", -1)),
        "alias_bytes": int(getattr(memory, "alias_size_in_bytes", -1)),
        "flops": float(cost.get("flops", -1.0)),
        "bytes_accessed": float(cost.get("bytes accessed", -1.0)),
    }


def analyze(fn: Callable[..., Any], *args: Any, large_elements: int = 1 << 20,
            donate_argnums: tuple[int, ...] = ()) -> dict[str, Any]:
    """Lower and compile ``fn(*args)`` (args may be ``jax.ShapeDtypeStruct``s) and report
    casts, GEMMs (``lowered``/``compiled``: :class:`~falqon_jax.gpu_program.ProgramCounts`
    as dicts; casts of tensors with >= ``large_elements`` elements count as large), memory
    (``memory_analysis``) and XLA's cost analysis (flops, bytes)."""
    lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
    compiled = lowered.compile()
    program = gpu_program.parse(compiled.as_text())
    report = {
        "lowered": gpu_program.count_lowered(lowered.as_text(), large_elements).as_dict(),
        "compiled": gpu_program.count_compiled(program, large_elements).as_dict(),
    }
    report.update(_memory_and_cost(compiled))
    del report["alias_bytes"]
    return report


def count_layout_ops(program: gpu_program.Program, large_elements: int) -> dict[str, int]:
    """Copies and transposes of tensors with >= ``large_elements`` elements in a compiled
    program (fusion bodies included; :func:`falqon_jax.gpu_program.layout_moves`), as the
    ``compiled_copies_large`` / ``compiled_transposes_large`` columns."""
    moves = gpu_program.layout_moves(program, large_elements)
    return {"compiled_copies_large": sum(m.opcode == "copy" for m in moves),
            "compiled_transposes_large": sum(m.opcode == "transpose" for m in moves)}


def hlo_row(
    case: Case, env: dict[str, Any], large_elements: int | None, dump: Path | None = None
) -> dict[str, Any]:
    """Lower and compile ``case`` from abstract inputs and collect the counts.

    The same analysis as :func:`analyze` (its counters, memory and cost
    analysis) from one compilation, plus :func:`count_layout_ops`; ``dump`` (a folder)
    receives the lowered StableHLO and the optimized HLO text of the case.

    ``fp8_casts``/``gemms``/... come from the lowered StableHLO (backend-independent);
    ``compiled_*`` from the backend's optimized HLO. ``large_elements`` (default
    ``2 * tokens * max(rank, 16)``, above every ``tokens x rank`` tensor) sets which casts
    count as large.
    """
    if large_elements is None:
        large_elements = 2 * case.tokens * max(case.extra["rank"], 16)
    start = time.perf_counter()
    lowered = jax.jit(case.step, donate_argnums=(0,)).lower(case.state, *case.inputs)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    lowered_text, compiled_text = lowered.as_text(), compiled.as_text()
    program = gpu_program.parse(compiled_text)
    row = base_row(case, env)
    row.update(gpu_program.count_lowered(lowered_text, large_elements).as_dict())
    compiled_counts = gpu_program.count_compiled(program, large_elements).as_dict()
    row.update({f"compiled_{k}": v for k, v in compiled_counts.items()})
    row.update(count_layout_ops(program, large_elements))
    row.update(_memory_and_cost(compiled))
    row.update({"large_elements": large_elements, "compile_s": round(seconds, 3)})
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = f"{case.method}_{case.shape.replace(':', '_')}"
        (dump / f"{stem}.lowered.mlir").write_text(lowered_text)
        (dump / f"{stem}.compiled.hlo").write_text(compiled_text)
    return row


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}" if n >= 0 else "n/a"


HLO_HEADER = (
    f"{'method':<9} {'shape':<16} {'casts':>5} {'large':>5} {'gemms':>5} {'fp8g':>4} "
    f"{'c.casts':>7} {'c.copy':>6} {'temp MB':>9} {'arg MB':>9} {'GFLOP':>10}"
)


def format_hlo(row: dict[str, Any]) -> str:
    """One table line of an ``hlo`` row."""
    return (
        f"{row['method']:<9} {row['shape']:<16} {row['fp8_casts']:>5} "
        f"{row['fp8_casts_large']:>5} {row['gemms']:>5} {row['fp8_gemms']:>4} "
        f"{row['compiled_fp8_casts']:>7} {row['compiled_copies_large']:>6} "
        f"{_mb(row['temp_bytes']):>9} "
        f"{_mb(row['argument_bytes']):>9} {row['flops'] / 1e9:>10.1f}"
    )
