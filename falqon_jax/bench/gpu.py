"""The ``gpu`` subcommand: every train step compiled for a GPU that is not there.

Each (method, shape) step -- single linear layers, and whole models at the paper's settings
(``llama-7b`` and ``llama-13b``, every layer, batch 16 x 512 tokens, gradient
checkpointing, rank 64, bf16) -- is compiled for a compile-only GPU (default an H100 SXM;
:mod:`falqon_jax.targets`) once per GEMM back end its autotuner would choose between
(cuBLASLt; Triton with one Hopper tiling), and its optimized program is read
(:mod:`falqon_jax.gpu_program`):

* memory per device (``memory_analysis()``: peak, arguments, temporaries) and whether the
  peak fits in 24 GiB (the paper's claim: FALQON fine-tunes LLaMA-7B on one 24 GB GPU);
* GEMMs by precision and kernel, and FLOPs per step by precision; FP8 tensors widened
  before a GEMM; e5m2 x e5m2 GEMMs (not an FP8 GEMM on cuBLASLt); transposes/copies of
  large FP8 tensors;
* for FALQON and ``fp8_lora``, the FP8 GEMM FLOPs against the minimum the method needs
  (:func:`falqon_jax.bench.cases.minimum_fp8_flops`);
* for models, the bytes the step cannot move less than
  (:func:`falqon_jax.bench.cases.minimum_bytes`) and the program's bytes over them
  (``B/min``);
* lower bounds of the step time (:func:`falqon_jax.gpu_program.roofline`): labelled
  bounds from the program's FLOPs and bytes, not measurements; ``/FLOP`` is the bound over
  the bound its FLOPs alone give.

``--fsdp N`` adds the models' FSDP step over N compile-only GPUs of one node (cuBLASLt):
collectives per decoder layer and the dtype FP8 weights travel in.

The models are compiled from shapes only, so no weights are loaded or allocated; the step
is the trainer's own (:class:`falqon_jax.train.trainer.Trainer`).
"""

from __future__ import annotations

import collections
import time
from typing import Any

from falqon_jax import gpu_program, sharding, targets
from falqon_jax.bench.cases import (
    Case,
    Settings,
    base_row,
    linear_case,
    minimum_bytes,
    minimum_fp8_flops,
    model_case,
    registry_name,
)
from falqon_jax.model import methods

GIB = targets.GIB
FITS_GIB = 24.0
BIG = 1 << 20  # a "large" FP8 tensor for layout moves: at least 1M elements


def peaks(target: targets.Target) -> dict[str, float | None]:
    """FLOP/s per GEMM precision (f32 GEMMs run as TF32 on the tensor cores: XLA's default
    precision on GPUs)."""
    fp8 = None if target.fp8_tflops is None else target.fp8_tflops * 1e12
    bf16 = target.bf16_tflops * 1e12
    return {"fp8": fp8, "bf16": bf16, "f16": bf16, "f32": target.tf32_tflops * 1e12}


def compile_case(case: Case, mesh: Any, options: dict[str, Any]) -> Any:
    """Compile ``case`` with its abstract inputs placed on ``mesh`` (replicated unless they
    carry a sharding of that mesh already)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        sharding_ = getattr(leaf, "sharding", None)
        if not isinstance(sharding_, NamedSharding) or sharding_.mesh != mesh:
            sharding_ = replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_)

    args = jax.tree.map(place, (case.state, *case.inputs))
    return jax.jit(case.step, donate_argnums=(0,)).lower(*args).compile(
        compiler_options=options)


def program_row(case: Case, compiled: Any, target: targets.Target, backend: str,
                env: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The facts of one compiled program (see module doc)."""
    program = gpu_program.parse(compiled.as_text())
    found = gpu_program.gemms(program)
    memory = targets.peak_bytes(compiled)
    bound = gpu_program.roofline(program, peaks(target), target.hbm_bytes_per_s)
    launched = gpu_program.kernels(program)
    kinds = collections.Counter(f"{g.precision} {g.kernel}" for g in found)
    flops = collections.Counter()
    for g in found:
        flops[g.precision] += g.flops_per_step
    widened = sorted({w for g in found for w in g.widened})
    moves = gpu_program.fp8_layout_moves(program, BIG)
    row = base_row(case, env)
    row.update({
        "target": target.name, "device": target.device, "backend": backend,
        "compile_s": round(seconds, 2),
        **{f"{k}_bytes": v for k, v in memory.items()},
        "fits_24gib": memory["peak"] <= FITS_GIB * GIB,
        "gemm_kernels": dict(sorted(kinds.items())),
        "gemms": len(found), "fp8_gemms": sum(g.fp8 for g in found),
        "e5m2_x_e5m2_gemms": sum(g.lhs[0] == g.rhs[0] == "f8e5m2" for g in found),
        "fp8_tflop": flops["fp8"] / 1e12, "bf16_tflop": (flops["bf16"] + flops["f16"]) / 1e12,
        "f32_tflop": flops["f32"] / 1e12,
        "widened_fp8": widened,
        "gemms_with_widened_fp8": sum(bool(g.widened) for g in found),
        "fp8_moves": [{"op": m.opcode, "shape": f"{m.dtype}{list(m.dims)}", "calls": m.calls}
                      for m in moves],
        "fp8_move_gb": sum(m.bytes_per_step for m in moves) / 1e9,
        "bound_compute_ms": bound.compute_s * 1e3, "bound_memory_ms": bound.memory_s * 1e3,
        "bound_roofline_ms": bound.bound_s * 1e3, "kernel_gb": bound.bytes / 1e9,
        "gb_by_kind": bytes_by_kind(launched),
        "fused_attention_calls": sum(k.calls for k in launched if k.kind == "attention"),
        "bound_over_flop_bound": bound.bound_s / bound.compute_s if bound.compute_s else None,
    })
    if case.kind == "model":
        row["seq_x_seq_tensors"] = len(gpu_program.seq_by_seq_tensors(program,
                                                                      case.extra["seq"]))
        least = minimum_bytes(case)
        row["gb_minimum"] = {part: round(b / 1e9, 1) for part, b in least.items()}
        row["bytes_over_minimum"] = bound.bytes / least["total"]
    if case.kind == "model" and methods.get(registry_name(case.method)).fp8:
        minimum = minimum_fp8_flops(case.method, case.llama_config, case.tokens,
                                    case.extra["rank"], case.extra["remat"])
        row["fp8_tflop_minimum"] = minimum / 1e12
    return row


def bytes_by_kind(launched: list[gpu_program.Kernel]) -> dict[str, float]:
    """GB per step moved by each kind of kernel of a program (its
    :func:`falqon_jax.gpu_program.kernels`; kinds: :func:`~falqon_jax.gpu_program.kernel_kind`)."""
    totals: collections.Counter = collections.Counter()
    for kernel in launched:
        totals[kernel.kind] += (kernel.read + kernel.written) * kernel.calls / 1e9
    return {kind: round(gb, 1) for kind, gb in sorted(totals.items())}


def collectives_row(case: Case, compiled: Any, target: targets.Target, devices: int,
                    env: dict[str, Any]) -> dict[str, Any]:
    """Collectives of the FSDP step: per decoder layer (the loop bodies run once a layer,
    forward and backward together) and per step outside the layers, as tensors sent per
    dtype (XLA combines several tensors into one op, so ops are not counted), plus memory
    per device. ``large_gathers_fp8``: every all-gathered tensor of at least ``BIG``
    elements -- the weights -- travels as FP8 (1 byte per value)."""
    program = gpu_program.parse(compiled.as_text())
    layers = case.llama_config.num_layers
    per_layer: dict[str, dict[str, float]] = {}
    per_step: dict[str, dict[str, float]] = {}
    large = []
    for collective in gpu_program.collectives(program):
        table = per_layer if collective.calls == layers else per_step
        times = 1 if collective.calls == layers else collective.calls
        for dtype, dims in collective.tensors:
            entry = table.setdefault(f"{collective.op} {dtype}", {"tensors": 0, "mib": 0.0})
            entry["tensors"] += times
            entry["mib"] += times * gpu_program.size_bytes(dtype, dims) / 2**20
            if collective.op == "all-gather" and table is per_layer \
                    and gpu_program.elements(dims) >= BIG:
                large.append(dtype)
    row = base_row(case, env)
    row.update({"target": target.name, "devices": devices, "backend": "cublaslt",
                "collectives_per_layer": per_layer, "collectives_per_step": per_step,
                "large_gathers_fp8": bool(large) and all(gpu_program.is_fp8(d) for d in large),
                **{f"{k}_bytes": v for k, v in targets.peak_bytes(compiled).items()}})
    return row


# --------------------------------------------------------------------------------------
# The command.


def run(settings: Settings, target: targets.Target, backends: tuple[str, ...],
        model_cards: tuple[str, ...], fsdp: int, env: dict[str, Any], on_row) -> list[dict]:
    """Compile every case and call ``on_row(row)`` as each finishes; returns the rows."""
    import dataclasses

    one = targets.target_mesh(target, (1, 1), sharding.AXES)
    rows = []
    work: list[tuple[str, Any]] = []
    for out, in_features in settings.shapes:
        for method in settings.methods:
            work.append(("linear", (method, out, in_features)))
    for card in model_cards:
        for method in settings.methods:
            work.append(("model", (method, card)))
    if fsdp > 1:
        for card in model_cards:
            for method in settings.methods:
                work.append(("fsdp", (method, card)))
    for kind, spec in work:
        if kind == "linear":
            cases = [(linear_case(*spec, settings), one)]
        else:
            method, card = spec
            card_settings = dataclasses.replace(settings, model_card=card, model_layers=0)
            mesh = one if kind == "model" else targets.target_mesh(target, (1, fsdp),
                                                                   sharding.AXES)
            cases = [(model_case(method, card_settings, mesh), mesh)]
        for case, mesh in cases:
            for backend in (backends if kind != "fsdp" else ("cublaslt",)):
                start = time.perf_counter()
                try:
                    compiled = compile_case(case, mesh, targets.GEMM_BACKENDS[backend])
                except Exception as err:  # noqa: BLE001 -- a compile error is a result here
                    row = base_row(case, env)
                    row.update({"target": target.name, "backend": backend,
                                "error": str(err).strip().splitlines()[0][:300]})
                else:
                    seconds = time.perf_counter() - start
                    row = (collectives_row(case, compiled, target, fsdp, env) if kind == "fsdp"
                           else program_row(case, compiled, target, backend, env, seconds))
                rows.append(row)
                on_row(row)
    return rows


HEADER = (f"{'method':<22} {'shape':<14} {'backend':<8} {'peak GiB':>8} {'args':>6} "
          f"{'temp':>6} {'<=24':>4} {'fp8/gemms':>9} {'FP8 TF':>7} {'bf16 TF':>7} "
          f"{'f32 TF':>6} {'min FP8':>7} {'wid':>3} {'fp8 mv GB':>9} {'FLOP ms':>7} "
          f"{'byte ms':>7} {'bound ms':>8} {'B/min':>5} {'/FLOP':>5}")


def format_row(row: dict[str, Any]) -> str:
    """One table line of a ``gpu`` row (program or FSDP)."""
    lead = f"{row['method']:<22} {row['shape']:<14} {row['backend']:<8}"
    if "error" in row:
        return f"{lead} COMPILE ERROR: {row['error']}"
    if "collectives_per_layer" in row:
        text = ", ".join(f"{v['tensors']} {k} ({v['mib']:.1f} MiB)"
                         for k, v in sorted(row["collectives_per_layer"].items()))
        return (f"{lead} {row['peak_bytes'] / GIB:8.2f} GiB per device on {row['devices']} "
                f"GPUs; per layer: {text}")
    minimum = row.get("fp8_tflop_minimum")
    over_bytes, over_flops = row.get("bytes_over_minimum"), row.get("bound_over_flop_bound")
    return (f"{lead} {row['peak_bytes'] / GIB:8.2f} {row['arguments_bytes'] / GIB:6.2f} "
            f"{row['temporaries_bytes'] / GIB:6.2f} {'yes' if row['fits_24gib'] else 'no':>4} "
            f"{row['fp8_gemms']:>4}/{row['gemms']:<4} {row['fp8_tflop']:7.1f} "
            f"{row['bf16_tflop']:7.1f} {row['f32_tflop']:6.1f} "
            f"{'' if minimum is None else f'{minimum:.1f}':>7} "
            f"{row['gemms_with_widened_fp8']:>3} {row['fp8_move_gb']:9.1f} "
            f"{row['bound_compute_ms']:7.1f} {row['bound_memory_ms']:7.1f} "
            f"{row['bound_roofline_ms']:8.1f} "
            f"{'' if over_bytes is None else f'{over_bytes:.2f}':>5} "
            f"{'' if over_flops is None else f'{over_flops:.2f}':>5}")
