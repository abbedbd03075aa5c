"""Reading compiled programs: FP8 casts, GEMMs and memory, counted from (Stable)HLO text.

These counts are exact facts about a program on any backend, unlike CPU wall-clock, which
says nothing about FP8 speed (CPUs emulate FP8).

Two views are counted:

* ``lowered``: the StableHLO that JAX emits (``jax.jit(f).lower(...).as_text()``) -- what the
  program asks for, identical on every backend.
* ``compiled``: the optimized HLO (``.compile().as_text()``); backend-specific. XLA's CPU
  backend, which has no FP8 arithmetic, adds float8<->float16 round trips here that a GPU
  build would not.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax

from falqon_jax.bench.cases import Case, base_row

_FP8_TYPE = r"f8E4M3FN|f8E5M2|f8e4m3fn|f8e5m2"
# StableHLO: %3 = stablehlo.convert %2 : (tensor<8x16xf32>) -> tensor<8x16xf8E4M3FN>
_SHLO_CONVERT = re.compile(r"stablehlo\.convert .*-> tensor<([0-9x]*)x?(" + _FP8_TYPE + r")>")
_SHLO_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<[0-9x]*x?([a-zA-Z0-9]+)>, tensor<")
# HLO: %convert.3 = f8e4m3fn[8,16]{1,0} convert(f32[8,16]{1,0} %x)
_HLO_CONVERT = re.compile(r"= (" + _FP8_TYPE + r")\[([0-9,]*)\][^ ]* convert\(")
_HLO_DOT = re.compile(
    r"= [a-z0-9]+\[[0-9,]*\][^ ]* (dot|convolution)\(|custom_call_target=\"__cublas"
)


@dataclass(frozen=True)
class ProgramCounts:
    """Counts for one program. ``*_large`` counts tensors with >= ``large_elements``."""

    fp8_casts: int
    fp8_casts_large: int
    gemms: int
    fp8_gemms: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _elements(dims: str, sep: str) -> int:
    size = 1
    for d in filter(None, dims.split(sep)):
        size *= int(d)
    return size


def count_lowered(text: str, large_elements: int) -> ProgramCounts:
    """Count casts to FP8 and ``dot_general``s in StableHLO text."""
    casts = [_elements(m.group(1), "x") for m in _SHLO_CONVERT.finditer(text)]
    dots = _SHLO_DOT.findall(text)
    fp8_dots = [t for t in dots if t.lower().startswith("f8")]
    return ProgramCounts(
        fp8_casts=len(casts),
        fp8_casts_large=sum(n >= large_elements for n in casts),
        gemms=len(dots),
        fp8_gemms=len(fp8_dots),
    )


def count_compiled(text: str, large_elements: int) -> ProgramCounts:
    """Count casts to FP8 and GEMMs in optimized HLO text (fusion bodies included)."""
    casts = [_elements(m.group(2), ",") for m in _HLO_CONVERT.finditer(text)]
    gemm_lines = [line for line in text.splitlines() if _HLO_DOT.search(line)]
    fp8_gemms = [line for line in gemm_lines if re.search(r"\((" + _FP8_TYPE + r")\[", line)]
    return ProgramCounts(
        fp8_casts=len(casts),
        fp8_casts_large=sum(n >= large_elements for n in casts),
        gemms=len(gemm_lines),
        fp8_gemms=len(fp8_gemms),
    )


def analyze(fn, *args: Any, large_elements: int = 1 << 20, donate_argnums=()) -> dict[str, Any]:
    """Lower and compile ``fn(*args)`` (args may be ``jax.ShapeDtypeStruct``s) and report
    casts, GEMMs, memory (``memory_analysis``) and XLA's cost analysis (flops, bytes)."""
    lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX returns one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {
        "lowered": count_lowered(lowered.as_text(), large_elements).as_dict(),
        "compiled": count_compiled(compiled.as_text(), large_elements).as_dict(),
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
        "argument_bytes": int(getattr(memory, "argument_size_in_bytes", -1)),
        "output_bytes": int(getattr(memory, "output_size_in_bytes", -1)),
        "flops": float(cost.get("flops", -1.0)),
        "bytes_accessed": float(cost.get("bytes accessed", -1.0)),
    }


# --------------------------------------------------------------------------------------
# Collectives, per loop body (a scanned layer stack is one ``while`` loop; its body runs
# once per layer, so its collectives are the per-layer communication).

_COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                   "collective-permute")
_HLO_COLLECTIVE = re.compile(
    r"= \(?([a-z0-9]+)\[[^=]*? (" + "|".join(_COLLECTIVE_OPS) + r")(?:-start)?\("
)
_HLO_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_HLO_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_HLO_BODY = re.compile(r"body=%?([\w.\-]+)")
_HLO_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclass(frozen=True)
class LoopCollectives:
    """Collectives of one loop body (or of the top level, outside every loop).

    ``loop`` is the ``while`` op's JAX name (``"top level"`` for the rest); ``counts`` maps
    ``"<op> <dtype>"`` (e.g. ``"all-gather f8e4m3fn"``) to how many the body holds.
    """

    loop: str
    counts: dict[str, int]


def collectives(hlo_text: str) -> list[LoopCollectives]:
    """Collectives in HLO text (``compiled.as_text()`` or an XLA dump), grouped by the
    ``while`` body they run in; nested loops are reported on their own. Bodies without
    collectives are left out."""
    bodies: dict[str, list[str]] = {}
    current = entry = None
    for line in hlo_text.splitlines():
        header = _HLO_HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            bodies[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    loop_names: dict[str, str] = {}
    for lines in bodies.values():
        for line in lines:
            body = _HLO_BODY.search(line)
            if body and " while(" in line:
                name = _HLO_OP_NAME.search(line)
                loop_names[body.group(1)] = name.group(1) if name else body.group(1)

    def count(root: str) -> dict[str, int]:
        totals: dict[str, int] = {}
        stack, seen = [root], set()
        while stack:
            comp = stack.pop()
            if comp in seen or comp not in bodies:
                continue
            seen.add(comp)
            for line in bodies[comp]:
                found = _HLO_COLLECTIVE.search(line)
                if found:
                    key = f"{found.group(2)} {found.group(1)}"
                    totals[key] = totals.get(key, 0) + 1
                for called in _HLO_CALLED.findall(line):
                    if called not in loop_names:  # nested loops are counted on their own
                        stack.append(called)
        return totals

    roots = ([("top level", entry)] if entry else []) + [
        (name, body) for body, name in loop_names.items()
    ]
    result = [LoopCollectives(name, count(root)) for name, root in roots]
    return [r for r in result if r.counts]

# --------------------------------------------------------------------------------------
# The ``hlo`` subcommand's rows.


_HLO_LAYOUT_OP = re.compile(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* (copy|transpose)\(")


def count_layout_ops(compiled_text: str, large_elements: int) -> dict[str, int]:
    """Copies and transposes of tensors with >= ``large_elements`` elements in optimized
    HLO text (fusion bodies included): dense data movement such as a copy of a weight
    around an in-place update, or a weight transposed for a GEMM layout."""
    counts = {"copy": 0, "transpose": 0}
    for match in _HLO_LAYOUT_OP.finditer(compiled_text):
        size = math.prod(int(d) for d in match.group(1).split(",") if d)
        if size >= large_elements:
            counts[match.group(2)] += 1
    return {"compiled_copies_large": counts["copy"],
            "compiled_transposes_large": counts["transpose"]}


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
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    row = base_row(case, env)
    row.update(count_lowered(lowered_text, large_elements).as_dict())
    compiled_counts = count_compiled(compiled_text, large_elements).as_dict()
    row.update({f"compiled_{k}": v for k, v in compiled_counts.items()})
    row.update(count_layout_ops(compiled_text, large_elements))
    row.update(
        {
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
            "argument_bytes": int(getattr(memory, "argument_size_in_bytes", -1)),
            "output_bytes": int(getattr(memory, "output_size_in_bytes", -1)),
            "alias_bytes": int(getattr(memory, "alias_size_in_bytes", -1)),
            "flops": float(cost.get("flops", -1.0)),
            "bytes_accessed": float(cost.get("bytes accessed", -1.0)),
            "large_elements": large_elements,
            "compile_s": round(seconds, 3),
        }
    )
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
