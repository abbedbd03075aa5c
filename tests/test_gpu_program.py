"""The GPU program, read without a GPU.

Two kinds of tests:

* The reader (:mod:`falqon_jax.gpu_program`) on hand-written HLO whose counts are known
  (always run).
* Every train step compiled for a compile-only H100 at LLaMA-7B shapes (the paper's
  settings: 32 layers, batch 16 x 512, gradient checkpointing, rank 64, bf16) on both GEMM
  back ends, and the compiled program checked: it compiles, FP8 GEMMs are FP8, nothing
  widens the FP8 backbone, no e5m2 x e5m2 GEMM, FALQON's FP8 FLOPs are the method's
  minimum, and its memory fits in 24 GiB. These need JAX's CUDA plugin (``pip install -e
  ".[h100]"``) and skip without it.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest

from falqon_jax import gpu_program, targets

# --------------------------------------------------------------------------------------
# The reader on hand-written HLO.

HLO = """\
HloModule m, entry_computation_layout={}

%gemm (p0: f8e4m3fn[64,32], p1: f8e4m3fn[16,32]) -> f32[64,16] {
  %p0 = f8e4m3fn[64,32]{1,0} parameter(0)
  %p1 = f8e4m3fn[16,32]{1,0} parameter(1)
  ROOT %d = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

%widen (q0: f8e4m3fn[4,16,32]) -> bf16[16,32] {
  %q0 = f8e4m3fn[4,16,32]{2,1,0} parameter(0)
  %c0 = s32[] constant(0)
  %ds = f8e4m3fn[1,16,32]{2,1,0} dynamic-slice(%q0, %c0, %c0, %c0), dynamic_slice_sizes={1,16,32}
  %b = f8e4m3fn[16,32]{1,0} bitcast(%ds)
  ROOT %cv = bf16[16,32]{1,0} convert(%b)
}

%body (t: (s32[], f8e4m3fn[64,32], f8e4m3fn[4,16,32], bf16[64,32])) -> (s32[], f8e4m3fn[64,32], f8e4m3fn[4,16,32], bf16[64,32]) {
  %t = (s32[], f8e4m3fn[64,32]{1,0}, f8e4m3fn[4,16,32]{2,1,0}, bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f8e4m3fn[64,32]{1,0} get-tuple-element(%t), index=1
  %w = f8e4m3fn[4,16,32]{2,1,0} get-tuple-element(%t), index=2
  %xb = bf16[64,32]{1,0} get-tuple-element(%t), index=3
  %ws = f8e4m3fn[16,32]{1,0} bitcast(%w)
  %g = f32[64,16]{1,0} fusion(%x, %ws), kind=kCustom, calls=%gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %wide = bf16[16,32]{1,0} fusion(%w), kind=kLoop, calls=%widen
  %h = bf16[64,16]{1,0} custom-call(%xb, %wide), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %tr = f8e4m3fn[32,64]{1,0} transpose(%x), dimensions={1,0}
  ROOT %out = (s32[], f8e4m3fn[64,32]{1,0}, f8e4m3fn[4,16,32]{2,1,0}, bf16[64,32]{1,0}) tuple(%i, %x, %w, %xb)
}

%cond (c: (s32[], f8e4m3fn[64,32], f8e4m3fn[4,16,32], bf16[64,32])) -> pred[] {
  %c = (s32[], f8e4m3fn[64,32]{1,0}, f8e4m3fn[4,16,32]{2,1,0}, bf16[64,32]{1,0}) parameter(0)
  ROOT %k = pred[] constant(false)
}

ENTRY %main (a: f8e4m3fn[64,32], w: f8e4m3fn[4,16,32], xb: bf16[64,32]) -> f8e4m3fn[64,32] {
  %a = f8e4m3fn[64,32]{1,0} parameter(0)
  %w = f8e4m3fn[4,16,32]{2,1,0} parameter(1)
  %xb = bf16[64,32]{1,0} parameter(2)
  %z = s32[] constant(0)
  %init = (s32[], f8e4m3fn[64,32]{1,0}, f8e4m3fn[4,16,32]{2,1,0}, bf16[64,32]{1,0}) tuple(%z, %a, %w, %xb)
  %loop = (s32[], f8e4m3fn[64,32]{1,0}, f8e4m3fn[4,16,32]{2,1,0}, bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %r = f8e4m3fn[64,32]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_reader_counts_gemms_per_step_through_the_loop():
    program = gpu_program.parse(HLO)
    assert program.entry == "main"
    assert program.calls_per_step["body"] == 4 and program.calls_per_step["gemm"] == 4
    gemms = {g.name: g for g in gpu_program.gemms(program)}
    fp8, widened = gemms["d"], gemms["h"]
    assert (fp8.kernel, fp8.fp8, fp8.precision, fp8.calls) == ("triton", True, "fp8", 4)
    assert fp8.flops == 2 * 64 * 16 * 32 and fp8.flops_per_step == 4 * 2 * 64 * 16 * 32
    assert (widened.kernel, widened.fp8, widened.precision) == ("cublas", False, "bf16")
    assert widened.widened == ("f8e4m3fn[16,32]->bf16",)  # found inside the fusion
    assert fp8.widened == ()


def test_reader_finds_fp8_transposes_and_the_bytes_of_each_kernel():
    program = gpu_program.parse(HLO)
    moves = gpu_program.fp8_layout_moves(program, large=1)
    assert [(m.name, m.opcode, m.dims, m.calls) for m in moves] == [
        ("tr", "transpose", (32, 64), 4)]
    assert moves[0].bytes_per_step == 4 * 2 * 32 * 64
    kernels = {k.name: k for k in gpu_program.kernels(program)}
    assert set(kernels) == {"g", "wide", "h", "tr"}
    # the widening fusion reads one layer's slice of the stacked weight, not all 4
    assert (kernels["wide"].read, kernels["wide"].written) == (16 * 32, 2 * 16 * 32)
    assert (kernels["g"].read, kernels["g"].written) == (64 * 32 + 16 * 32, 4 * 64 * 16)
    assert kernels["g"].precision == "fp8" and kernels["h"].precision == "bf16"
    assert (kernels["h"].read, kernels["h"].written) == (2 * 64 * 32 + 2 * 16 * 32, 2 * 64 * 16)


SLICED = """\
HloModule m, entry_computation_layout={}

%rows (q0: f8e4m3fn[4,16,32], i: s32[]) -> bf16[4,32] {
  %q0 = f8e4m3fn[4,16,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = f8e4m3fn[1,16,32]{2,1,0} dynamic-slice(%q0, %i, %c0, %c0), dynamic_slice_sizes={1,16,32}
  %b = f8e4m3fn[16,32]{1,0} bitcast(%ds)
  %s = f8e4m3fn[4,32]{1,0} slice(%b), slice={[12:16], [0:32]}
  ROOT %cv = bf16[4,32]{1,0} convert(%s)
}

ENTRY %main (w: f8e4m3fn[4,16,32], i: s32[]) -> bf16[4,32] {
  %w = f8e4m3fn[4,16,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %r = bf16[4,32]{1,0} fusion(%w, %i), kind=kLoop, calls=%rows
}
"""


def test_reader_counts_only_the_rows_a_slice_of_a_layers_slice_reads():
    """One layer of a stacked weight (dynamic-slice), then 4 of its 16 rows: the kernel
    reads those 4 rows, not the layer, nor the stack."""
    (kernel,) = gpu_program.kernels(gpu_program.parse(SLICED))
    assert (kernel.read, kernel.written) == (4 * 32 + 4, 2 * 4 * 32)


def test_roofline_is_the_per_kernel_maximum_of_flops_and_bytes():
    program = gpu_program.parse(HLO)
    peaks = {"fp8": 2e3, "bf16": 1e3, "f16": 1e3, "f32": 5e2}
    bandwidth = 1e2
    bound = gpu_program.roofline(program, peaks, bandwidth)
    expected = {  # per call: (flops / peak, bytes / bandwidth), 4 calls each
        "g": (2 * 64 * 16 * 32 / 2e3, (64 * 32 + 16 * 32 + 4 * 64 * 16) / 1e2),
        "wide": (0.0, (16 * 32 + 2 * 16 * 32) / 1e2),
        "h": (2 * 64 * 16 * 32 / 1e3, (2 * 64 * 32 + 2 * 16 * 32 + 2 * 64 * 16) / 1e2),
        "tr": (0.0, 2 * 32 * 64 / 1e2),
    }
    assert bound.compute_s == pytest.approx(4 * sum(c for c, _ in expected.values()))
    assert bound.memory_s == pytest.approx(4 * sum(m for _, m in expected.values()))
    assert bound.bound_s == pytest.approx(4 * sum(max(c, m) for c, m in expected.values()))
    assert bound.flops == {"fp8": 4 * 2 * 64 * 16 * 32, "bf16": 4 * 2 * 64 * 16 * 32}


def test_reader_counts_casts_gemms_and_layout_moves_once_each_for_the_hlo_bench():
    """The ``hlo`` bench's compiled counts: every instruction once (not per step), GEMMs
    FP8 by their left operand; the lowered counts from StableHLO text."""
    program = gpu_program.parse(HLO)
    counts = gpu_program.count_compiled(program, large_elements=1)
    assert counts.as_dict() == {"fp8_casts": 0, "fp8_casts_large": 0, "gemms": 2,
                                "fp8_gemms": 1}
    moves = gpu_program.layout_moves(program, large=2048)
    assert [(m.name, m.dtype) for m in moves] == [("tr", "f8e4m3fn")]
    assert gpu_program.layout_moves(program, large=2049) == []
    lowered = (
        "%1 = stablehlo.convert %0 : (tensor<64x32xf32>) -> tensor<64x32xf8E4M3FN>\n"
        "%2 = stablehlo.convert %0 : (tensor<f32>) -> tensor<f8E5M2>\n"
        "%3 = stablehlo.dot_general %1, %w, contracting_dims = [1] x [1] : "
        "(tensor<64x32xf8E4M3FN>, tensor<16x32xf8E4M3FN>) -> tensor<64x16xf32>\n"
        "%4 = stablehlo.dot_general %x, %y, contracting_dims = [1] x [1] : "
        "(tensor<64x32xbf16>, tensor<16x32xbf16>) -> tensor<64x16xf32>\n")
    assert gpu_program.count_lowered(lowered, large_elements=2048).as_dict() == {
        "fp8_casts": 2, "fp8_casts_large": 1, "gemms": 2, "fp8_gemms": 1}


COLLECTIVES = """\
HloModule c, entry_computation_layout={}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%layer (t: (s32[], f8e4m3fn[8,16])) -> (s32[], f8e4m3fn[8,16]) {
  %t = (s32[], f8e4m3fn[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %w = f8e4m3fn[8,16]{1,0} get-tuple-element(%t), index=1
  %ag = (f8e4m3fn[8,16]{1,0}, f8e4m3fn[64,16]{1,0}) all-gather-start(%w), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = f8e4m3fn[64,16]{1,0} all-gather-done(%ag)
  ROOT %out = (s32[], f8e4m3fn[8,16]{1,0}) tuple(%i, %w)
}

%layer_cond (c: (s32[], f8e4m3fn[8,16])) -> pred[] {
  %c = (s32[], f8e4m3fn[8,16]{1,0}) parameter(0)
  ROOT %k = pred[] constant(false)
}

%helper (h: f32[4]) -> f32[4] {
  %h = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%h), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}

ENTRY %main (w: f8e4m3fn[8,16], v: f32[4]) -> (f32[], f32[], f32[], f32[], f32[], f32[]) {
  %w = f8e4m3fn[8,16]{1,0} parameter(0)
  %v = f32[4]{0} parameter(1)
  %z = s32[] constant(0)
  %init = (s32[], f8e4m3fn[8,16]{1,0}) tuple(%z, %w)
  %loop = (s32[], f8e4m3fn[8,16]{1,0}) while(%init), condition=%layer_cond, body=%layer, metadata={op_name="jit(step)/while"}, backend_config={"known_trip_count":{"n":"3"}}
  %c = f32[4]{0} call(%v), to_apply=%helper
  %one = f32[] constant(1)
  %two = (f32[4]{0}, f32[4]{0}) all-reduce(%c, %v), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %six = (f32[], f32[], f32[], f32[], f32[], /*index=5*/f32[]) all-reduce(%one, %one, %one, %one, %one, /*index=5*/%one), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}
"""


def test_reader_groups_collectives_by_the_loop_they_run_in():
    """Per loop body, each collective once (an async start counts, its done not; a combined
    one of six tensors, printed with an ``/*index=5*/`` comment, too), named by the
    ``while``'s ``op_name``; a ``call``'s callee counts with its caller. Per step, the
    loop's gather runs once per iteration."""
    program = gpu_program.parse(COLLECTIVES)
    by_loop = [(loop.loop, loop.counts) for loop in gpu_program.collectives_by_loop(program)]
    assert by_loop == [("top level", {"all-reduce f32": 3}),
                       ("jit(step)/while", {"all-gather f8e4m3fn": 1})]
    gather = [c for c in gpu_program.collectives(program) if c.op == "all-gather"]
    assert [(c.name, c.calls, c.tensors) for c in gather] == [
        ("ag", 3, (("f8e4m3fn", (8, 16)),))]


def test_largest_batch_search_doubles_then_bisects():
    from falqon_jax.train.plan import _largest_fitting

    for capacity, expected in [(0, None), (7, None), (8, 8), (40, 40), (100, 96), (4096, 4096)]:
        tried = []

        def fits(batch, capacity=capacity, tried=tried):
            tried.append(batch)
            return batch <= capacity

        assert _largest_fitting(fits, 16, 8) == expected
        assert all(b % 8 == 0 for b in tried) and len(tried) == len(set(tried))


# --------------------------------------------------------------------------------------
# Compiled for an H100, at LLaMA-7B shapes.

needs_plugin = pytest.mark.skipif(not targets.plugin_installed(),
                                  reason='needs JAX\'s CUDA plugin: pip install -e ".[h100]"')
H100 = "h100"
RANK, TOKENS = 64, 16 * 512


@functools.cache
def compiled_row(method: str, backend: str) -> dict:
    """The ``bench gpu`` row of ``method``'s LLaMA-7B train step (compiled once per process)."""
    from falqon_jax import sharding
    from falqon_jax.bench import cases, gpu

    targets.use_compile_only()
    target = targets.get(H100)
    settings = cases.Settings(methods=(method,), shapes=(), tokens=TOKENS, rank=RANK,
                              model_card="llama-7b", model_layers=0, batch=16, seq=512,
                              top_k=10, remat=True, seed=0)
    mesh = targets.target_mesh(target, (1, 1), sharding.AXES)
    case = cases.model_case(method, settings, mesh)
    compiled = gpu.compile_case(case, mesh, targets.GEMM_BACKENDS[backend])
    row = gpu.program_row(case, compiled, target, backend, {}, 0.0)
    row["program"] = gpu_program.parse(compiled.as_text())
    return row


BACKENDS = tuple(targets.GEMM_BACKENDS)


@needs_plugin
@pytest.mark.parametrize("method", ["falqon_paper", "falqon_reference", "falqon_visible_merge",
                                    "falqon_paper_stochastic", "falqon_paper_feedback",
                                    "qlora", "full"])
def test_every_method_compiles_for_an_h100_on_both_backends(method):
    for backend in BACKENDS:
        row = compiled_row(method, backend)
        assert row["e5m2_x_e5m2_gemms"] == 0
        assert row["bytes_over_minimum"] > 1.0  # minimum_bytes is a lower bound
        _check_attention(row)
        if method.startswith("falqon"):
            _check_falqon(row)
        else:
            assert row["fp8_gemms"] == 0 and not row["widened_fp8"]


def _check_attention(row: dict) -> None:
    """cuDNN flash attention (forward, its recomputation and backward: 3 calls per layer)
    with its FLOPs counted, and no ``seq x seq`` tensor anywhere in the step."""
    assert row["fused_attention_calls"] == 3 * 32, row["fused_attention_calls"]
    assert row["seq_x_seq_tensors"] == 0
    assert row["gb_by_kind"]["attention"] > 0 and row["bf16_tflop"] > 0


def _backbone_shapes() -> set[tuple[int, int]]:
    from falqon_jax.model.config import load_card
    from falqon_jax.model.llama import linear_shapes

    shapes = set()
    for target, (out, in_features) in linear_shapes(load_card("llama-7b")).items():
        if target != "lm_head":  # as stored, and transposed (cuBLASLt wants K minor)
            for rows in (out, out + RANK):
                shapes |= {(rows, in_features), (in_features, rows)}
    return shapes


def _check_falqon(row: dict) -> None:
    """Every GEMM that reads the FP8 backbone is an FP8 GEMM, and the only FP8 data widened
    is rank rows of ``A`` (the proxy rules' merge ``Buf[K] @ A`` in float32)."""
    gemms = gpu_program.gemms(row["program"])
    backbone = [g for g in gemms if {g.lhs[1][-2:], g.rhs[1][-2:]} & _backbone_shapes()
                and max(len(g.lhs[1]), len(g.rhs[1])) == 2]
    # per layer: 7 forward melded GEMMs, 6 recomputed (down_proj's is not), 7 for dL/dx
    assert sum(g.calls for g in backbone) == 32 * (7 + 6 + 7), [g.describe() for g in backbone]
    assert all(g.fp8 for g in backbone), [g.describe() for g in backbone if not g.fp8]
    for source in row["widened_fp8"]:  # e.g. f8e4m3fn[64,4096]->f32, or all layers' A
        dims = [int(d) for d in source.split("[")[1].split("]")[0].split(",")]
        assert source.startswith("f8e4m3fn[") and dims[-2] == RANK, row["widened_fp8"]


@needs_plugin
def test_falqon_h100_program_fp8_flops_are_the_minimum_and_it_fits_in_24_gib():
    """The paper's LLaMA-7B step (batch 16 x 512, remat, rank 64, bf16) compiled for an H100:
    FALQON's FP8 GEMM FLOPs are within 1% of the minimum the method needs (no melded GEMM
    recomputed only for ``A x``) and below fp8_lora's; it peaks under 24 GiB and below
    fp8_lora and LoRA; fp8_lora (which needed an optimization barrier) compiles; no method
    runs an e5m2 x e5m2 GEMM; attention is fused in all three; FALQON's roofline bound is
    below fp8_lora's, at most 0.625 of LoRA's on cuBLASLt (measured 0.59) and 2/3 on
    Triton (0.64: XLA's Triton GEMMs take no tensor bias, so the live ``b``'s sum with the
    backbone GEMM is a pass of its own there); FALQON moves at most 3.2x the bytes the step
    cannot do without (``minimum_bytes``), and every program at least that."""
    for backend in BACKENDS:
        falqon, fp8_lora, lora = (compiled_row(m, backend) for m in ("falqon", "fp8_lora", "lora"))
        for row in (falqon, fp8_lora, lora):
            assert "error" not in row and row["e5m2_x_e5m2_gemms"] == 0
        minimum = falqon["fp8_tflop_minimum"]
        assert minimum <= falqon["fp8_tflop"] <= 1.01 * minimum, (falqon["fp8_tflop"], minimum)
        assert falqon["fp8_tflop"] < fp8_lora["fp8_tflop"]
        assert fp8_lora["fp8_tflop"] == pytest.approx(fp8_lora["fp8_tflop_minimum"], rel=1e-3)
        _check_falqon(falqon)
        assert not fp8_lora["widened_fp8"] and lora["fp8_gemms"] == 0
        assert falqon["peak_bytes"] < 24 * targets.GIB
        assert falqon["peak_bytes"] < min(fp8_lora["peak_bytes"], lora["peak_bytes"])
        for row in (falqon, fp8_lora, lora):
            _check_attention(row)
        share = 0.625 if backend == "cublaslt" else 2 / 3
        assert falqon["bound_roofline_ms"] <= lora["bound_roofline_ms"] * share
        assert falqon["bound_roofline_ms"] < fp8_lora["bound_roofline_ms"]
        assert falqon["bytes_over_minimum"] <= 3.2
        for row in (falqon, fp8_lora, lora):
            assert row["bytes_over_minimum"] > 1.0


@needs_plugin
def test_fused_attention_flops_are_counted_from_its_shapes():
    """cuDNN attention compiled alone for an H100 (forward and backward, causal, per-row
    lengths, grouped queries): the reader counts 2 products forward and 5 backward of
    ``2 B N T S H`` FLOPs each over the causal half plus diagonal, in bf16."""
    import jax
    import jax.numpy as jnp

    from falqon_jax.model.attention import fused

    targets.use_compile_only()
    mesh = targets.target_mesh(targets.get(H100))
    b, t, heads, kv_heads, h = 2, 128, 4, 2, 64
    place = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def loss(q, k, v, lengths):
        return jnp.sum(fused(q, k, v, lengths).astype(jnp.float32))

    shapes = [((b, t, heads, h), jnp.bfloat16), ((b, t, kv_heads, h), jnp.bfloat16),
              ((b, t, kv_heads, h), jnp.bfloat16), ((b,), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, d, sharding=place) for s, d in shapes]
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    kernels = [k for k in gpu_program.kernels(gpu_program.parse(text)) if k.kind == "attention"]
    pairs = t * (t + 1) // 2
    assert sorted(k.flops for k in kernels) == [2 * 2 * b * heads * pairs * h,
                                                5 * 2 * b * heads * pairs * h]
    assert {k.precision for k in kernels} == {"bf16"}


@needs_plugin
def test_fsdp_step_over_8_h100s_gathers_fp8_weights_as_fp8():
    """The FSDP step of LLaMA-7B over 8 compile-only H100s: each decoder layer all-gathers
    its seven FP8 weights as FP8 (1 byte per value) in the forward and again in the
    backward (they are not kept gathered); ``b`` travels in bf16, a few KiB."""
    from falqon_jax import sharding
    from falqon_jax.bench import cases, gpu

    targets.use_compile_only()
    target = targets.get(H100)
    settings = cases.Settings(methods=("falqon",), shapes=(), tokens=TOKENS, rank=RANK,
                              model_card="llama-7b", model_layers=0, batch=16, seq=512,
                              top_k=10, remat=True, seed=0)
    mesh = targets.target_mesh(target, (1, 8), sharding.AXES)
    case = cases.model_case("falqon", settings, mesh)
    compiled = gpu.compile_case(case, mesh, targets.GEMM_BACKENDS["cublaslt"])
    row = gpu.collectives_row(case, compiled, target, 8, {})
    gathers = row["collectives_per_layer"]
    assert gathers["all-gather f8e4m3fn"]["tensors"] == 2 * 7, gathers
    # one layer's FP8 weights (out + 64 rows each), an eighth per device, gathered twice
    shards = (4 * 4160 * 4096 + 2 * 11072 * 4096 + 4160 * 11008) / 8
    assert gathers["all-gather f8e4m3fn"]["mib"] * 2**20 == 2 * shards
    assert row["large_gathers_fp8"]
    # the rest: b (out x 64, cast to bf16 before its gather) of the seven projections, twice
    b_shards = 2 * (4 * 4096 + 2 * 11008 + 4096) * RANK * 2 / 8
    wide = {k: v for k, v in gathers.items() if k.startswith("all-gather") and "f8" not in k}
    assert wide["all-gather bf16"]["mib"] * 2**20 == b_shards, wide
    assert set(wide) <= {"all-gather bf16", "all-gather f32"}, wide
    assert wide.get("all-gather f32", {"mib": 0})["mib"] < 0.1, wide  # the two norm weights
    assert row["peak_bytes"] < compiled_row("falqon", "cublaslt")["peak_bytes"]


def test_compile_only_target_configs_are_consistent():
    for name, target in targets.TARGETS.items():
        proto = target.config_proto()
        assert f"device_memory_size: {target.memory_bytes}" in proto and target.name == name
        assert target.has_fp8 == (target.compute_capability >= (8, 9))
    with pytest.raises(targets.TargetError, match="choose from h100"):
        targets.get("v100")
    assert dataclasses.asdict(targets.get(" H100 ")) == dataclasses.asdict(targets.TARGETS["h100"])


# --------------------------------------------------------------------------------------
# python -m falqon_jax.train ... --plan


@needs_plugin
def test_plan_compiles_the_commands_step_and_finds_the_largest_batch_that_fits(capsys):
    """``--plan``: the step of the command compiled for a target; with JAX allowed 40 MB
    of the H100 (XLA_PYTHON_CLIENT_MEM_FRACTION) the largest tiny-model batch that fits is
    found by compiling; an A100 has no FP8 GEMM (XLA widens the operands)."""
    import dataclasses as dc

    from falqon_jax.train import plan
    from falqon_jax.train.config import DEMO

    config = dc.replace(DEMO, batch_size=8, target_len=32, source_len=16)
    usable = 40e6
    fraction = usable / targets.get("h100").memory_bytes
    seen = []
    report = plan.plan(config, targets.get("h100"), 1,
                       {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(fraction)},
                       on_compile=lambda batch, peak: seen.append((batch, peak)))
    assert report.seq == 48 and report.fits and report.memory["peak"] == seen[0][1]
    assert report.largest_batch and report.largest_batch % 8 == 0
    assert report.largest_peak <= report.usable_bytes == int(usable)
    peaks = dict(seen)
    assert all(p > usable for b, p in peaks.items() if b > report.largest_batch)
    assert any(b > report.largest_batch for b in peaks)  # the first batch that does not fit
    assert report.fp8_gemms > 0 and report.gemms > report.fp8_gemms
    text = plan.format_report(config, report)
    assert "fits: yes" in text and f"largest batch that fits: {report.largest_batch}" in text

    a100 = plan.plan(config, targets.get("a100"), 1, {}, search=False)
    assert a100.fp8_gemms == 0 and a100.widened_fp8 > 0
    assert "FP8 GEMMs are not available" in plan.format_report(config, a100)


@needs_plugin
@pytest.mark.parametrize("flags, message", [
    (["--plan", "v100"], "unknown GPU target 'v100'"),
    (["--plan", "h100:0"], "positive integer"),
    (["--plan", "h100:3"], "does not divide over 3 devices"),
    (["--model", "no-such-card", "--plan", "h100"], "unknown model card 'no-such-card'"),
])
def test_plan_mistakes_are_one_line(flags, message, capsys):
    from falqon_jax.train.run import main

    assert main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


# --------------------------------------------------------------------------------------
# python -m falqon_jax.bench gpu


@needs_plugin
def test_bench_gpu_command_writes_a_row_per_program(tmp_path, capsys):
    import json

    from falqon_jax.bench.cli import main

    out = tmp_path / "rows.json"
    assert main(["gpu", "--models", "tiny", "--shapes", "none", "--methods", "falqon",
                 "--backends", "cublaslt", "--rank", "16", "--batch", "4", "--seq", "64",
                 "--fsdp", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    program, fsdp = rows
    assert (program["method"], program["shape"], program["backend"]) == (
        "falqon", "tiny:4L", "cublaslt")
    assert program["fp8_tflop"] >= program["fp8_tflop_minimum"] > 0
    assert program["bound_roofline_ms"] >= max(program["bound_compute_ms"],
                                               program["bound_memory_ms"])
    assert fsdp["devices"] == 2 and fsdp["large_gathers_fp8"] is False  # tiny: no 1M weight
    assert fsdp["collectives_per_layer"]["all-gather f8e4m3fn"]["tensors"] == 14
    text = capsys.readouterr().out
    assert "LOWER BOUNDS" in text and "tiny:4L" in text


@needs_plugin
@pytest.mark.parametrize("flags, message", [
    (["--target", "v100"], "unknown GPU target 'v100'"),
    (["--backends", "cudnn"], "--backends must name cublaslt and/or triton"),
    (["--fsdp", "1"], "--fsdp must be 0"),
    (["--models", "no-such-card"], "unknown model card"),
    (["--methods", "falqon,nope"], "unknown method 'nope'"),
])
def test_bench_gpu_mistakes_are_one_line(flags, message, capsys):
    from falqon_jax.bench.cli import main

    assert main(["gpu", "--shapes", "none", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@needs_plugin
def test_h100_and_h200_compile_a_small_step_to_the_same_memory():
    """What lets ``--plan h100,h200`` compile a small step once (plan.compiles_alike): the
    two GPUs differ to XLA only in memory size and bandwidth, and a step far below either's
    memory compiles to the same memory for both: the same arguments, temporaries within a
    few hundred bytes (measured: 256 of 16 MB here; LLaMA-7B's step: to the byte)."""
    import dataclasses as dc

    from falqon_jax.train import plan
    from falqon_jax.train.config import DEMO

    config = dc.replace(DEMO, batch_size=8, target_len=32, source_len=16)
    h100, h200 = (plan.plan(config, targets.get(name), 1, {}, search=False)
                  for name in ("h100", "h200"))
    assert h100.memory["arguments"] == h200.memory["arguments"]
    assert abs(h100.memory["peak"] - h200.memory["peak"]) <= 4096
    assert (h100.fp8_gemms, h100.gemms) == (h200.fp8_gemms, h200.gemms)


@needs_plugin
def test_plan_of_several_gpus_prints_one_row_each(capsys):
    """``--plan h100,h200,h100:2``: a table row per GPU kind; the H100 reads the H200's
    compiles (a small step), so nothing is compiled for one H100."""
    from falqon_jax.train.run import main

    assert main(["--model", "tiny", "--batch-size", "8", "--target-len", "32",
                 "--plan", "h200,h100,h100:2"]) == 0
    captured = capsys.readouterr()
    rows = captured.out.strip().splitlines()
    assert rows[1].split()[:5] == ["target", "devices", "peak/device", "usable", "fits"]
    assert [r.split()[0] for r in rows[2:5]] == ["h200", "h100", "h100:2"]
    assert all(r.split()[-3:-1] == ["yes", "1"] for r in rows[2:5]), rows
    assert rows[5].startswith("h100 read steps compiled for h200")
    assert "for 1 x h200" in captured.err and "for 1 x h100" not in captured.err


@needs_plugin
@pytest.mark.parametrize("spec, message", [
    ("h100,v100", "unknown GPU target 'v100'"),
    ("h200,h100:0", "--plan h100:0: the device count after ':' must be a positive integer"),
    ("h200,h100:3", "--plan h100:3: the micro-batch of 16 rows"),
])
def test_plan_of_several_gpus_mistakes_are_one_line(spec, message, capsys):
    from falqon_jax.train.run import main

    assert main(["--model", "llama2-70b", "--plan", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


# --------------------------------------------------------------------------------------
# LLaMA-2-70B (80 layers, GQA, batch 16 x 528, rank 64, remat, bf16): the recipes' steps


def _plan_70b(recipe: str, spec: str, environ: dict, **flags) -> tuple:
    from falqon_jax.train import plan
    from falqon_jax.train.config import resolve

    config, _ = resolve(["--recipe", recipe])
    compiled: list = []
    reports = plan.plan_targets(config, plan.parse_requests(spec), environ,
                                progress=compiled.append, **flags)
    return config, reports, compiled


@needs_plugin
def test_llama2_70b_falqon_fits_one_h200_and_eight_h100s_at_batch_16():
    """The 1 x H200 recipe's step fits in the 75% of an H200 JAX takes by default (105.3
    GiB); its train state is the FP8 backbone of 80 layers (64.1 GiB, ``A``'s 64 rows
    included), bf16 embeddings and head (1.0 GiB) and ``b`` with its AdamW moments in
    float32 (4.8 GiB). The 8 x H100 recipe's (FSDP) holds an eighth of that state per
    device and fits. Two compiles."""
    from falqon_jax.train.config import resolve

    _, (h200,), compiled = _plan_70b("llama2-70b-alpaca-falqon-1xh200", "h200", {},
                                     search=False)
    assert h200.fits and h200.memory["peak"] <= 0.75 * h200.target.memory_bytes
    assert 69 * targets.GIB < h200.state_bytes < 71 * targets.GIB, h200.state_bytes
    assert h200.fp8_gemms > 0 and h200.widened_fp8 == 0
    _, (eight,), more = _plan_70b("llama2-70b-alpaca-falqon-8xh100", "h100:8", {},
                                  search=False)
    assert eight.fits and eight.mesh == (1, 8)
    assert eight.state_bytes == pytest.approx(h200.state_bytes / 8, rel=0.01)
    assert eight.memory["peak"] < h200.memory["peak"] / 3
    assert len(compiled + more) == 2
    assert resolve(["--recipe", "llama2-70b-alpaca-falqon-8xh100"])[0].mesh == "fsdp=8"


@needs_plugin
def test_plan_names_the_grad_accum_of_the_one_h100_recipe():
    """One H100: the train state alone (69.9 GiB) is above the 75% JAX takes by default,
    so nothing fits there, and ``--plan h100`` names the smallest --grad-accum that fits
    batch 16 with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: the recipe's 16 (micro-batch 1;
    measured 74.73 GiB of 75.1), since 8 does not (75.53 GiB). Two compiles: the recipe's
    step, then grad-accum 8."""
    config, (h100,), compiled = _plan_70b("llama2-70b-alpaca-falqon-1xh100", "h100", {})
    assert not h100.fits and h100.largest_batch is None
    assert h100.smallest_accum.grad_accum is None
    high = h100.suggested_accum
    assert (high.fraction, high.grad_accum) == (0.95, config.grad_accum) == (0.95, 16)
    peaks = {c.grad_accum: c.peak for c in compiled}
    assert peaks[16] == high.peak <= high.usable_bytes < peaks[8], peaks
    assert [(c.batch, c.grad_accum) for c in compiled] == [(16, 16), (16, 8)]
