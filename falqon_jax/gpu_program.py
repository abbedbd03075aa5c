"""Reading programs: the one parser of HLO text in the package.

The input is the optimized HLO text of a compiled program (``compiled.as_text()``, or a
file of an XLA dump), above all one compiled for a GPU (e.g. for a compile-only target of
:mod:`falqon_jax.targets`); :func:`parse` reads it into a :class:`Program` (computations,
instructions with their result shapes, what calls what, ``while`` trip counts). The GPU
readers count *per step*: an instruction inside a ``while`` body (the scanned decoder
layers) counts once per iteration (XLA's ``known_trip_count``), one inside a fusion as often
as the fusion runs.

* :func:`gemms` -- every GEMM: its kernel (cuBLASLt FP8, cuBLAS(Lt), Triton, or a plain
  ``dot``), the operand dtypes it computes in, FLOPs per call and calls per step, and the
  FP8 tensors widened (converted to a wider type) on the way into it: such a GEMM reads FP8
  bytes but does not run on the FP8 tensor cores.
* :func:`fp8_layout_moves` -- transposes and copies of large FP8 tensors (e.g. a weight
  transposed because cuBLASLt's FP8 GEMMs need both operands K-major).
* :func:`kernels` -- every kernel launch with the bytes it reads and writes, for a roofline
  estimate: a fusion reading a slice of a stacked weight counts the slice, an in-place
  ``dynamic-update-slice`` counts the update.
* :func:`roofline` -- lower bounds of the step time from those counts and a GPU's peaks.
* :func:`collectives` -- every collective with the tensors it sends, per step;
  :func:`collectives_by_loop` -- the same grouped by the ``while`` body they run in (per
  decoder layer), from any backend's program, before or after SPMD partitioning.
* :func:`count_lowered` / :func:`count_compiled` -- casts to FP8 and GEMMs, in the lowered
  StableHLO (``lowered.as_text()``, backend-independent) and in a compiled program of any
  backend (fusion bodies included, each counted once); :func:`layout_moves` -- large copies
  and transposes. These are what ``python -m falqon_jax.bench hlo`` reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from typing import Any

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5, "token": 0}
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
# Instructions that launch no kernel of their own.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
              "conditional", "call", "after-all", "partition-id", "replica-id",
              "opt-barrier", "add-dependency", "domain", "all-gather-done", "all-reduce-done",
              "collective-permute-done", "async-done", "copy-done", "send-done", "recv-done",
              "get-dimension-size", "iota"}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_CUBLAS = {"__cublas$lt$matmul$f8": "cublasLt-fp8", "__cublas$lt$matmul": "cublasLt",
           "__cublas$gemm": "cublas"}


def is_fp8(dtype: str | None) -> bool:
    return bool(dtype) and dtype.startswith("f8")


@dataclasses.dataclass(frozen=True)
class Instr:
    """One HLO instruction. ``shapes``: ``(dtype, dims)`` of the result (several for a
    tuple); ``operands``: operand names; ``attrs``: the text after the operand list."""

    computation: str
    name: str
    opcode: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    operands: tuple[str, ...]
    attrs: str
    is_tuple: bool
    argument: str = ""  # the text inside the parentheses (a parameter's index)
    root: bool = False

    @property
    def parameter_index(self) -> int:
        return int(self.argument) if self.opcode == "parameter" else -1

    @property
    def dtype(self) -> str:
        return self.shapes[0][0] if self.shapes else ""

    @property
    def dims(self) -> tuple[int, ...]:
        return self.shapes[0][1] if self.shapes else ()

    @property
    def bytes(self) -> float:
        return sum(size_bytes(dt, d) for dt, d in self.shapes)


def size_bytes(dtype: str, dims: tuple[int, ...]) -> float:
    """Bytes of a ``dtype[dims]`` tensor."""
    return _BYTES.get(dtype, 1) * math.prod(dims)


def elements(dims: tuple[int, ...]) -> int:
    return math.prod(dims)


def _close(text: str, start: int) -> int:
    """Index just past the bracket opened at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    opening, closing, depth = text[start], pairs[text[start]], 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _shapes(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((dt, tuple(int(d) for d in dims.split(",") if d))
                 for dt, dims in _SHAPE.findall(re.sub(r"/\*.*?\*/", "", type_text)))


@dataclasses.dataclass
class Program:
    """A parsed HLO module: ``computations`` maps each computation to its instructions (in
    order); ``entry`` names the entry computation; ``calls_per_step`` how often each
    computation runs per execution of the program."""

    computations: dict[str, dict[str, Instr]]
    entry: str
    calls_per_step: dict[str, int]
    fusion_of: dict[str, Instr]  # fused computation -> the fusion instruction calling it

    def find(self, computation: str, name: str) -> Instr | None:
        return self.computations.get(computation, {}).get(name)


def parse(text: str) -> Program:
    """Parse optimized HLO text (``compiled.as_text()``) into a :class:`Program`."""
    computations: dict[str, dict[str, Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            header = line.removeprefix("ENTRY ").lstrip("%")
            current = re.match(r"[\w.\-]+", header).group(0)
            computations[current] = {}
            if line.startswith("ENTRY"):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is None:
            continue
        instr = _parse_instruction(current, line)
        if instr is not None:
            computations[current][instr.name] = instr
    program = Program(computations, entry, {}, {})
    program.calls_per_step = _calls_per_step(program)
    return program


def _parse_instruction(computation: str, line: str) -> Instr | None:
    match = re.match(r"\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):
        end = _close(rest, 0)
        type_text, is_tuple = rest[:end], True
    else:
        shape = re.match(r"[a-z][a-z0-9]*\[[0-9,]*\](\{[^}]*\})?", rest)
        if not shape:
            return None
        end, type_text, is_tuple = shape.end(), shape.group(0), False
    tail = rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", tail)
    if not op:
        return None
    close = _close(tail, op.end() - 1)
    operands = tuple(_NAME.findall(tail[op.end():close - 1]))
    return Instr(computation, match.group(2), op.group(1), _shapes(type_text), operands,
                 tail[close:], is_tuple, tail[op.end():close - 1].strip(), bool(match.group(1)))


_CALLED = re.compile(r"(calls|body|condition|to_apply)=%([\w.\-]+)")


def _called(instr: Instr) -> Iterator[tuple[str, str]]:
    """``(computation, role)`` for every computation ``instr`` calls, in the order the text
    names them; ``role`` is the attribute (``calls``, ``body``, ``condition``, ``to_apply``:
    a ``call``'s callee or a scalar reducer) or ``branch`` (a conditional's)."""
    attrs = instr.attrs
    for found in _CALLED.finditer(attrs):
        yield found.group(2), found.group(1)
    branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if branches:
        for name in _NAME.findall(branches.group(1)):
            yield name, "branch"


def trip_count(instr: Instr) -> int:
    """Iterations of a ``while`` (XLA's ``known_trip_count``; 1 if unknown)."""
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    return int(found.group(1)) if found else 1


def _calls_per_step(program: Program) -> dict[str, int]:
    callers: dict[str, list[tuple[str, Instr, str]]] = {}
    for computation, instrs in program.computations.items():
        for instr in instrs.values():
            for called, role in _called(instr):
                if role == "to_apply":  # reducers run per element; calls are inlined by then
                    continue
                callers.setdefault(called, []).append((computation, instr, role))
                if instr.opcode == "fusion" and role == "calls":
                    program.fusion_of[called] = instr
    counts: dict[str, int] = {}

    def count(name: str, depth: int = 0) -> int:
        if name == program.entry:
            return 1
        if name in counts:
            return counts[name]
        if depth > 64 or name not in callers:
            return 0
        total = 0
        for caller, instr, role in callers[name]:
            times = count(caller, depth + 1)
            if role in ("body", "condition"):
                times *= trip_count(instr) + (1 if role == "condition" else 0)
            total += times
        counts[name] = total
        return total

    return {name: count(name) for name in program.computations}


# --------------------------------------------------------------------------------------
# GEMMs.


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One GEMM of the program.

    ``kernel``: ``cublasLt-fp8``, ``cublasLt``, ``cublas``, ``triton`` (a Triton GEMM
    fusion) or ``dot`` (any other fused dot). ``lhs`` / ``rhs``: ``(dtype, dims)`` of the
    operands as the GEMM computes them; ``widened``: FP8 tensors converted to a wider type
    on their way into it (``"f8e4m3fn[64,4096]->bf16"``); ``flops``: per call;
    ``calls``: per step. ``name`` is the instruction (for reading the HLO).
    """

    name: str
    kernel: str
    lhs: tuple[str, tuple[int, ...]]
    rhs: tuple[str, tuple[int, ...]]
    out: tuple[int, ...]
    flops: float
    calls: int
    widened: tuple[str, ...]

    @property
    def fp8(self) -> bool:
        """Both operands FP8: a GEMM on the FP8 tensor cores."""
        return is_fp8(self.lhs[0]) and is_fp8(self.rhs[0])

    @property
    def precision(self) -> str:
        """``fp8``, ``bf16``/``f16`` (16-bit tensor cores) or ``f32``."""
        if self.fp8:
            return "fp8"
        dtypes = {self.lhs[0], self.rhs[0]}
        return "f32" if "f32" in dtypes else ("f16" if "f16" in dtypes else "bf16")

    @property
    def flops_per_step(self) -> float:
        return self.flops * self.calls

    def describe(self) -> str:
        def shape(operand):
            return f"{operand[0]}[{','.join(map(str, operand[1]))}]"

        return f"{shape(self.lhs)} x {shape(self.rhs)} -> [{','.join(map(str, self.out))}]"


def gemms(program: Program) -> list[Gemm]:
    """Every GEMM of ``program`` (cuBLAS custom calls and ``dot`` instructions)."""
    found = []
    for computation, instrs in program.computations.items():
        calls = program.calls_per_step.get(computation, 0)
        for instr in instrs.values():
            if instr.opcode == "custom-call":
                kernel = _CUBLAS.get(custom_call_target(instr))
                if kernel is None:
                    continue
                config = _backend_config(instr).get("gemm_backend_config", {})
                numbers = config.get("dot_dimension_numbers", {})
                contracting = [int(d) for d in numbers.get("lhs_contracting_dimensions", [])]
            elif instr.opcode == "dot":
                kernel = _fusion_kernel(program, computation)
                dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
                contracting = [int(d) for d in dims.group(1).split(",") if d] if dims else []
            else:
                continue
            lhs = program.find(computation, instr.operands[0])
            rhs = program.find(computation, instr.operands[1])
            if lhs is None or rhs is None:
                continue
            k = math.prod(lhs.dims[d] for d in contracting)
            found.append(Gemm(
                name=instr.name, kernel=kernel, lhs=(lhs.dtype, lhs.dims),
                rhs=(rhs.dtype, rhs.dims), out=instr.dims, flops=2.0 * elements(instr.dims) * k,
                calls=calls,
                widened=tuple(w for o in (lhs, rhs) for w in _widened(program, o))))
    return found


def custom_call_target(instr: Instr) -> str:
    """The ``custom_call_target`` of a custom call (``"__cublas$gemm"``, ...); ``""`` if none."""
    target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
    return target.group(1) if target else ""


def _backend_config(instr: Instr) -> dict[str, Any]:
    start = instr.attrs.find("backend_config={")
    if start < 0:
        return {}
    brace = instr.attrs.index("{", start)
    try:
        return json.loads(instr.attrs[brace:_close(instr.attrs, brace)])
    except json.JSONDecodeError:
        return {}


def _fusion_kernel(program: Program, computation: str) -> str:
    """``triton`` for a dot inside a Triton GEMM fusion (nested ones included)."""
    seen = 0
    while computation in program.fusion_of and seen < 8:
        fusion = program.fusion_of[computation]
        if "triton" in json.dumps(_backend_config(fusion).get("fusion_backend_config", {})):
            return "triton"
        computation, seen = fusion.computation, seen + 1
    return "dot"


_PASS_THROUGH = {"bitcast", "copy", "transpose", "reshape", "broadcast", "slice",
                 "dynamic-slice", "get-tuple-element", "multiply", "divide", "clamp"}


def _widened(program: Program, instr: Instr, depth: int = 0) -> list[str]:
    """FP8 tensors converted to a wider type on the way to ``instr`` (a GEMM operand),
    following unary ops, fusion parameters out to the caller and fusion roots in."""
    if depth > 12 or is_fp8(instr.dtype):
        return []
    if instr.opcode == "convert":
        source = program.find(instr.computation, instr.operands[0])
        if source is not None and is_fp8(source.dtype):
            return [f"{source.dtype}[{','.join(map(str, source.dims))}]->{instr.dtype}"]
        return _widened(program, source, depth + 1) if source else []
    if instr.opcode == "parameter" and instr.computation in program.fusion_of:
        fusion = program.fusion_of[instr.computation]
        index = instr.parameter_index
        if index < len(fusion.operands):
            outer = program.find(fusion.computation, fusion.operands[index])
            return _widened(program, outer, depth + 1) if outer else []
        return []
    if instr.opcode == "fusion":
        called = next((c for c, role in _called(instr) if role == "calls"), None)
        root = _root(program, called) if called else None
        return _widened(program, root, depth + 1) if root else []
    if instr.opcode in _PASS_THROUGH:
        found: list[str] = []
        for operand in instr.operands:
            source = program.find(instr.computation, operand)
            if source is not None and source.dims and elements(source.dims) > 1:
                found += _widened(program, source, depth + 1)
        return list(dict.fromkeys(found))
    return []


def _root(program: Program, computation: str) -> Instr | None:
    """The ROOT instruction of ``computation``."""
    instrs = program.computations.get(computation, {})
    return next((i for i in instrs.values() if i.root), None)


# --------------------------------------------------------------------------------------
# Layout moves.


@dataclasses.dataclass(frozen=True)
class LayoutMove:
    """A transpose or copy writing a large ``dtype[dims]`` tensor: ``bytes`` moved per call
    (read + write), ``calls`` per step."""

    name: str
    opcode: str
    dtype: str
    dims: tuple[int, ...]
    calls: int

    @property
    def bytes_per_step(self) -> float:
        return 2.0 * size_bytes(self.dtype, self.dims) * self.calls


def layout_moves(program: Program, large: int = 1 << 20, *,
                 fp8_only: bool = False) -> list[LayoutMove]:
    """Transposes and copies (also inside fusions) that run in the step and whose result is
    one tensor (not a tuple) of at least ``large`` elements; ``fp8_only``: of an FP8 dtype.
    Dense data movement: a copy of a weight around an in-place update, a weight transposed
    for a GEMM's layout."""
    moves = []
    for computation, instrs in program.computations.items():
        calls = program.calls_per_step.get(computation, 0)
        for instr in instrs.values():
            if instr.opcode in ("transpose", "copy") and not instr.is_tuple and calls \
                    and elements(instr.dims) >= large and (is_fp8(instr.dtype) or not fp8_only):
                moves.append(LayoutMove(instr.name, instr.opcode, instr.dtype, instr.dims, calls))
    return moves


def fp8_layout_moves(program: Program, large: int = 1 << 20) -> list[LayoutMove]:
    """:func:`layout_moves` writing an FP8 tensor (e.g. a weight transposed because
    cuBLASLt's FP8 GEMMs need both operands K-major)."""
    return layout_moves(program, large, fp8_only=True)


# --------------------------------------------------------------------------------------
# Kernels and bytes.


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel launch: ``read`` / ``written`` bytes per call, ``calls`` per step,
    ``flops`` per call of its GEMMs and their ``precision`` (``None``: no GEMM)."""

    name: str
    opcode: str
    read: float
    written: float
    calls: int
    flops: float
    precision: str | None
    kind: str = "other"


def kernel_kind(instr: Instr, precision: str | None) -> str:
    """What a kernel is for the bytes tables: ``gemm-<precision>``, ``attention`` (a fused
    attention custom call), ``fp8-cast`` (writes an FP8 tensor), ``copy`` (copies,
    transposes and slices: layout, not math), ``collective`` or ``other`` (norms, RoPE,
    activations, reductions, the loss)."""
    if instr.opcode == "custom-call" and "__cudnn$fmha" in instr.attrs:
        return "attention"
    if precision is not None:
        return f"gemm-{precision}"
    if any(is_fp8(dtype) for dtype, _ in instr.shapes):
        return "fp8-cast"
    if collective_op(instr) is not None:
        return "collective"
    if instr.opcode in ("copy", "transpose", "dynamic-slice", "slice") or re.match(
            r"(loop|input)_(copy|transpose|dynamic_slice|slice)_fusion", instr.name):
        return "copy"
    return "other"


def seq_by_seq_tensors(program: Program, seq: int) -> list[str]:
    """Every instruction of ``program`` with a result of at least three dimensions, two of
    them of size ``seq`` (attention scores ``(b, heads, seq, seq)`` and the like), as
    ``name dtype[dims]``. Bitcasts are views, not tensors: XLA views e.g. the stacked
    ``(layers, 4096, 64)`` adapters of the update as ``(layers, 512, 512)``."""
    found = []
    for instrs in program.computations.values():
        for instr in instrs.values():
            if instr.opcode == "bitcast":
                continue
            for dtype, dims in instr.shapes:
                if len(dims) >= 3 and sum(d == seq for d in dims) >= 2:
                    found.append(f"{instr.name} {dtype}{list(dims)}")
    return found


def kernels(program: Program) -> list[Kernel]:
    """Every kernel launch of the program's control-flow computations (the entry, ``while``
    bodies and conditions, called computations), with the bytes it moves."""
    gemm_of: dict[str, Gemm] = {}
    fused_gemms: dict[str, list[Gemm]] = {}
    for gemm in gemms(program):
        gemm_of[gemm.name] = gemm
    for computation, instrs in program.computations.items():
        for instr in instrs.values():
            if instr.name in gemm_of and instr.opcode == "dot":
                top = _outermost_fusion(program, computation)
                if top is not None:
                    fused_gemms.setdefault(top.name, []).append(gemm_of[instr.name])
    launched = []
    for computation, instrs in program.computations.items():
        if computation in program.fusion_of or not program.calls_per_step.get(computation):
            continue
        calls = program.calls_per_step[computation]
        for instr in instrs.values():
            if instr.opcode in _NO_KERNEL or instr.opcode.endswith("-done"):
                continue
            gemm_list = fused_gemms.get(instr.name, [])
            if instr.name in gemm_of:
                gemm_list = [gemm_of[instr.name]]
            flops = sum(g.flops for g in gemm_list)
            precision = max((g.precision for g in gemm_list), key=_PRECISION_ORDER.index,
                            default=None)
            if not gemm_list and instr.opcode == "custom-call":
                flops, precision = attention_flops(program, instr)
            read, written = _traffic(program, instr)
            launched.append(Kernel(instr.name, instr.opcode, read, written, calls, flops,
                                   precision, kernel_kind(instr, precision)))
    return launched


_PRECISION_ORDER = ["fp8", "bf16", "f16", "f32"]
# cuDNN's fused attention: its matrix products per call (forward: scores and values;
# backward: the scores again, then the value, probability, query and key gradients).
_FMHA_PRODUCTS = {"__cudnn$fmhaSoftmax": 2, "__cudnn$fmhaSoftmaxBackward": 5}


def attention_flops(program: Program, instr: Instr) -> tuple[float, str | None]:
    """``(FLOPs, precision)`` per call of a cuDNN fused-attention custom call, from its
    shapes: ``2 B N T S H`` per matrix product (``(B, N, T, S)`` the scores' shape, ``H`` the
    head size), over the ``(query, key)`` pairs its mask keeps (a causal mask keeps
    ``sum_i min(i + 1, S)`` of ``T S``: cuDNN skips the masked tiles). ``(0, None)`` for any
    other call. Counted so that moving attention into a custom call never hides its work
    from :func:`roofline`."""
    products = _FMHA_PRODUCTS.get(custom_call_target(instr), 0)
    config = _backend_config(instr).get("cudnn_fmha_backend_config", {})
    dims = config.get("intermediate_tensor_shape", {}).get("dimensions", [])
    query = program.find(instr.computation, instr.operands[0]) if instr.operands else None
    if not products or len(dims) != 4 or query is None:
        return 0.0, None
    batch, heads, queries, keys = (int(d) for d in dims)
    pairs = float(queries * keys)
    if "CAUSAL" in config.get("mask_type", ""):
        pairs = float(sum(min(i + 1, keys) for i in range(queries)))
    precision = {"bf16": "bf16", "f16": "f16"}.get(query.dtype, "f32")
    return products * 2.0 * batch * heads * pairs * query.dims[-1], precision


def _outermost_fusion(program: Program, computation: str) -> Instr | None:
    fusion = None
    while computation in program.fusion_of:
        fusion = program.fusion_of[computation]
        computation = fusion.computation
    return fusion


def _traffic(program: Program, instr: Instr) -> tuple[float, float]:
    """``(read, written)`` bytes of one kernel launch."""
    if instr.opcode == "custom-call":  # GEMMs: operands in, the result (not the workspace)
        read = sum(_operand_bytes(program, instr, i) for i in range(len(instr.operands)))
        written = size_bytes(*instr.shapes[0]) if instr.shapes else 0.0
        return read, written
    if instr.opcode != "fusion":
        read = sum(_operand_bytes(program, instr, i) for i in range(len(instr.operands)))
        if instr.opcode == "dynamic-update-slice":
            update = program.find(instr.computation, instr.operands[1])
            return read - _operand_bytes(program, instr, 0), update.bytes if update else 0.0
        return read, instr.bytes
    called = next(c for c, role in _called(instr) if role == "calls")
    body = program.computations.get(called, {})
    params = {p.parameter_index: p for p in body.values() if p.opcode == "parameter"}
    read = 0.0
    for index, operand in enumerate(instr.operands):
        param = params.get(index)
        outer = program.find(instr.computation, operand)
        full = outer.bytes if outer else 0.0
        read += _read_of_parameter(body, param, full) if param else full
    root = _root(program, called)
    written = instr.bytes
    if root is not None:
        outputs = [program.find(called, n) for n in root.operands] if root.opcode == "tuple" \
            else [root]
        written = sum(_written_of(called, program, o) for o in outputs if o is not None)
    return read, written


_SLICES = ("dynamic-slice", "slice", "gather")


def _read_of_parameter(body: dict[str, Instr], param: Instr, full: float) -> float:
    """Bytes a fusion reads of one operand (``full`` bytes): nothing of a buffer it only
    updates in place, else what :func:`_sliced_bytes` finds."""
    users = _users_through_bitcasts(body, param.name)
    if users and all(u.opcode == "dynamic-update-slice" and _is_target(body, u, param.name)
                     for u in users):
        return 0.0
    return _sliced_bytes(body, param, full)


def _sliced_bytes(body: dict[str, Instr], piece: Instr, size: float) -> float:
    """Bytes read of ``piece`` (``size`` bytes): if slices are all it is used for, those
    slices, each counted the same way (e.g. one layer's weight of a stack, then rows of
    that layer), else all of it."""
    users = _users_through_bitcasts(body, piece.name)
    if users and all(u.opcode in _SLICES for u in users):
        return min(size, sum(_sliced_bytes(body, u, u.bytes) for u in users))
    return size


def _users_through_bitcasts(body: dict[str, Instr], name: str) -> list[Instr]:
    users = []
    for instr in body.values():
        if name in instr.operands:
            if instr.opcode == "bitcast":
                users.extend(_users_through_bitcasts(body, instr.name))
            else:
                users.append(instr)
    return users


def _is_target(body: dict[str, Instr], update: Instr, name: str) -> bool:
    target = update.operands[0]
    while target != name:
        source = body.get(target)
        if source is None or source.opcode != "bitcast":
            return False
        target = source.operands[0]
    return True


def _written_of(computation: str, program: Program, output: Instr) -> float:
    instr = output
    while instr.opcode == "bitcast":
        source = program.find(computation, instr.operands[0])
        if source is None:
            break
        instr = source
    if instr.opcode == "dynamic-update-slice":
        update = program.find(computation, instr.operands[1])
        return update.bytes if update else 0.0
    return output.bytes


def _operand_bytes(program: Program, instr: Instr, index: int) -> float:
    operand = program.find(instr.computation, instr.operands[index])
    return operand.bytes if operand else 0.0


# --------------------------------------------------------------------------------------
# Roofline.


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Lower bounds of one step's time on a GPU, in seconds.

    ``compute_s``: every GEMM FLOP at the dense tensor-core peak of its precision (FP8,
    bf16/f16, TF32 for f32 GEMMs), nothing else -- a strict lower bound. ``memory_s``:
    every kernel's bytes (read + written, as counted by :func:`kernels`) at the HBM
    bandwidth. ``bound_s``: per kernel the larger of the two, summed -- the time if every
    kernel ran at its own roofline, one after another, with its operands coming from HBM
    (so a bound under that model, not a measurement: caches and overlap can beat it a
    little; launch gaps, tails and imperfect kernels make a real step slower).
    """

    compute_s: float
    memory_s: float
    bound_s: float
    bytes: float
    flops: dict[str, float]


def roofline(program: Program, peaks: dict[str, float | None], bandwidth: float) -> Roofline:
    """Bounds from ``peaks`` (FLOP/s per precision: ``fp8``, ``bf16``, ``f16``, ``f32``)
    and ``bandwidth`` (bytes/s). A precision without a peak (no FP8 units) uses bf16's."""
    compute = memory = bound = moved = 0.0
    flops: dict[str, float] = {}
    for kernel in kernels(program):
        data = (kernel.read + kernel.written) * kernel.calls
        t_memory = data / bandwidth
        t_compute = 0.0
        if kernel.precision is not None:
            peak = peaks.get(kernel.precision) or peaks["bf16"]
            t_compute = kernel.flops * kernel.calls / peak
            flops[kernel.precision] = flops.get(kernel.precision, 0.0) + kernel.flops * kernel.calls
        compute, memory, moved = compute + t_compute, memory + t_memory, moved + data
        bound += max(t_compute, t_memory)
    return Roofline(compute, memory, bound, moved, flops)


# --------------------------------------------------------------------------------------
# Collectives.


def collective_op(instr: Instr) -> str | None:
    """The collective ``instr`` is (``all-gather``, ...; an async ``-start`` counts as its
    op, its ``-done`` not), or ``None``."""
    op = instr.opcode.removesuffix("-start")
    return op if op in _COLLECTIVES else None


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective: ``op`` (``all-gather``, ...; an async ``-start`` counts as its op),
    the ``(dtype, dims)`` of each tensor it sends (XLA combines several into one op),
    ``calls`` per step and the ``computation`` it runs in."""

    name: str
    op: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    calls: int
    computation: str


def collectives(program: Program) -> list[Collective]:
    """Every collective of the program with the tensors it sends (its operands)."""
    found = []
    for computation, instrs in program.computations.items():
        calls = program.calls_per_step.get(computation, 0)
        for instr in instrs.values():
            op = collective_op(instr)
            if op is None or not calls:
                continue
            tensors = []
            for name in instr.operands:
                operand = program.find(computation, name)
                if operand is not None:
                    tensors.extend(operand.shapes)
            found.append(Collective(instr.name, op, tuple(tensors), calls, computation))
    return found


@dataclasses.dataclass(frozen=True)
class LoopCollectives:
    """Collectives of one loop body (or of the top level, outside every loop).

    ``loop`` is the ``while`` op's JAX name (its ``op_name``; ``"top level"`` for the rest);
    ``counts`` maps ``"<op> <dtype>"`` (e.g. ``"all-gather f8e4m3fn"``, the dtype of the
    result's first tensor) to how many collective instructions the body holds.
    """

    loop: str
    counts: dict[str, int]


def collectives_by_loop(program: Program) -> list[LoopCollectives]:
    """Collectives of ``program`` grouped by the ``while`` body they run in, each counted
    once however often the body runs: a scanned layer stack is one ``while`` loop, so its
    body's collectives are the per-layer communication. Everything a body calls counts with
    it, except nested loops, which are reported on their own. Reads any backend's program,
    also the HLO right after SPMD partitioning (where calls are not yet inlined). Bodies
    without collectives are left out."""
    loops: dict[str, str] = {}  # body computation -> the while's name
    for instrs in program.computations.values():
        for instr in instrs.values():
            if instr.opcode == "while":
                for body, role in _called(instr):
                    if role == "body":
                        name = re.search(r'op_name="([^"]*)"', instr.attrs)
                        loops[body] = name.group(1) if name else body

    def count(root: str) -> dict[str, int]:
        totals: dict[str, int] = {}
        stack, seen = [root], set()
        while stack:
            computation = stack.pop()
            if computation in seen or computation not in program.computations:
                continue
            seen.add(computation)
            for instr in program.computations[computation].values():
                op = collective_op(instr)
                if op is not None:
                    key = f"{op} {instr.dtype}"
                    totals[key] = totals.get(key, 0) + 1
                stack.extend(c for c, _ in _called(instr) if c not in loops)
        return totals

    roots = ([("top level", program.entry)] if program.entry else []) + [
        (name, body) for body, name in loops.items()]
    found = [LoopCollectives(name, count(root)) for name, root in roots]
    return [loop for loop in found if loop.counts]


# --------------------------------------------------------------------------------------
# Counts for ``python -m falqon_jax.bench hlo``: casts to FP8 and GEMMs, before and after
# compiling, on any backend.


@dataclasses.dataclass(frozen=True)
class ProgramCounts:
    """Counts of one program: casts to FP8 (``fp8_casts``; ``fp8_casts_large`` those of
    tensors with at least ``large_elements`` elements), GEMMs, and GEMMs whose left
    operand is FP8."""

    fp8_casts: int
    fp8_casts_large: int
    gemms: int
    fp8_gemms: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_MLIR_FP8 = r"f8E4M3FN|f8E5M2|f8e4m3fn|f8e5m2"
# %3 = stablehlo.convert %2 : (tensor<8x16xf32>) -> tensor<8x16xf8E4M3FN>
_MLIR_CONVERT = re.compile(r"stablehlo\.convert .*-> tensor<([0-9x]*)x?(" + _MLIR_FP8 + r")>")
_MLIR_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<[0-9x]*x?([a-zA-Z0-9]+)>, tensor<")


def count_lowered(text: str, large_elements: int) -> ProgramCounts:
    """Casts to FP8 (``stablehlo.convert``) and GEMMs (``stablehlo.dot_general``; FP8: the
    left operand's element type) in lowered StableHLO text (``lowered.as_text()``): what
    the program asks for, the same on every backend."""
    casts = [math.prod(int(d) for d in m.group(1).split("x") if d)
             for m in _MLIR_CONVERT.finditer(text)]
    dots = _MLIR_DOT.findall(text)
    return ProgramCounts(
        fp8_casts=len(casts),
        fp8_casts_large=sum(n >= large_elements for n in casts),
        gemms=len(dots),
        fp8_gemms=sum(t.lower().startswith("f8") for t in dots),
    )


def count_compiled(program: Program, large_elements: int) -> ProgramCounts:
    """Casts to FP8 (``convert`` to an FP8 tensor) and GEMMs (``dot``, ``convolution``,
    cuBLAS custom calls; FP8: the left operand's dtype) of a compiled program, every
    instruction counted once, fusion bodies included (not per step). Backend-specific:
    XLA:CPU has no FP8 arithmetic and adds float8 <-> float16 round trips a GPU build
    would not."""
    instrs = [i for body in program.computations.values() for i in body.values()]
    casts = [elements(i.dims) for i in instrs
             if i.opcode == "convert" and not i.is_tuple and is_fp8(i.dtype)]
    found = [i for i in instrs if i.opcode in ("dot", "convolution") or (
        i.opcode == "custom-call" and custom_call_target(i).startswith("__cublas"))]

    def lhs_fp8(gemm: Instr) -> bool:
        lhs = program.find(gemm.computation, gemm.operands[0]) if gemm.operands else None
        return lhs is not None and is_fp8(lhs.dtype)

    return ProgramCounts(
        fp8_casts=len(casts),
        fp8_casts_large=sum(n >= large_elements for n in casts),
        gemms=len(found),
        fp8_gemms=sum(lhs_fp8(g) for g in found),
    )
