"""Smoke tests of ``python -m falqon_jax.bench``: row keys, cast/GEMM invariants, bad flags.

The cast and GEMM counts are facts of each method's design (see the docstrings of
:mod:`falqon_jax.melded`, :mod:`falqon_jax.baselines.fp8_lora`,
:mod:`falqon_jax.baselines.lora`, :mod:`falqon_jax.baselines.qlora` and :mod:`falqon_jax.optax`),
counted in the lowered StableHLO of one
linear-layer train step, which is the same on every backend:

* ``falqon``: casts ``Q_e4m3(x)`` (forward), ``Q_e5m2(g)`` and ``Q_e4m3(A x)`` (backward),
  plus one cast in the optimizer's top-k merge (``Q(DQ(W8[K]) + delta)`` of ``k`` rows):
  4 casts, 2 of them token-sized. GEMMs: forward ``x [W; A]^T``, backward ``g W`` and
  ``g^T (A x)`` in FP8, plus the merge's ``Buf[K] @ A`` in float32: 4, 3 of them FP8.
* ``fp8_lora``: casts ``x, A, B, x A^T`` forward and ``g, d(x A^T)`` backward: 6, 2 large;
  8 GEMMs, all FP8 (3 forward, 5 backward).
* ``lora`` and ``qlora``: no FP8; 3 forward + 5 backward GEMMs.
* ``full``: no FP8; forward, ``dL/dx``, ``dL/dW``: 3 GEMMs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from falqon_jax.bench import cases, cli, speed

# A tiny linear layer: every dimension a multiple of 16, out * in a multiple of 64 (NF4).
TINY = ["--shapes", "64x48", "--tokens", "32", "--rank", "8", "--model-card", "none"]

EXPECTED = {  # method: (fp8_casts, fp8_casts_large, gemms, fp8_gemms), lowered, per layer
    # The default rule: x, [g, g b] and A x cast; 4 FP8 GEMMs (A x, x W^T, [g, g b] [W; A],
    # g^T A x) plus (A x) b^T and g b.
    "falqon": (3, 2, 6, 4),
    # Proxy rules: + the cast of the k merged rows and the Buf[K] @ A GEMM; stochastic and
    # feedback merges round in the optimizer (one more k-row cast); visible_merge also
    # solves its remainder back into b.
    "falqon_paper": (4, 2, 4, 3),
    "falqon_reference": (4, 2, 4, 3),
    "falqon_visible_merge": (5, 2, 9, 4),
    "falqon_paper_stochastic": (5, 2, 4, 3),
    "falqon_paper_feedback": (5, 2, 6, 3),
    "fp8_lora": (6, 2, 8, 8),
    "lora": (0, 0, 8, 0),
    "qlora": (0, 0, 8, 0),
    "full": (0, 0, 3, 0),
}

HLO_KEYS = {
    "method", "shape", "kind", "tokens", "rank", "fp8_casts", "fp8_casts_large", "gemms",
    "fp8_gemms", "compiled_fp8_casts", "compiled_fp8_casts_large", "compiled_gemms",
    "compiled_fp8_gemms", "compiled_copies_large", "temp_bytes", "argument_bytes",
    "output_bytes", "flops", "bytes_accessed", "model_flops", "backend", "device",
    "jax_version",
}
SPEED_KEYS = {
    "method", "shape", "kind", "tokens", "step_time_s", "tokens_per_s", "device", "backend",
    "mfu_bf16", "mfu_fp8", "model_flops", "achieved_tflops",
}


def _rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    assert isinstance(rows, list)
    return rows


def test_hlo_linear_counts(tmp_path: Path) -> None:
    out = tmp_path / "hlo.json"
    assert cli.main(["hlo", *TINY, "--methods", ",".join(cases.METHOD_NAMES),
                       "--json", str(out)]) == 0
    rows = _rows(out)
    assert [r["method"] for r in rows] == list(cases.METHOD_NAMES)
    for row in rows:
        assert HLO_KEYS <= row.keys(), HLO_KEYS - row.keys()
        assert row["shape"] == "64x48" and row["kind"] == "linear" and row["tokens"] == 32
        counts = (row["fp8_casts"], row["fp8_casts_large"], row["gemms"], row["fp8_gemms"])
        assert counts == EXPECTED[row["method"]], row["method"]
        assert row["temp_bytes"] >= 0 and row["argument_bytes"] > 0 and row["flops"] > 0
    by_method = {r["method"]: r for r in rows}
    # FALQON's casts are a strict subset of FP8 LoRA's work: fewer casts, fewer FP8 GEMMs.
    for rule in cases.FALQON_RULES:
        assert by_method[rule]["fp8_casts"] < by_method["fp8_lora"]["fp8_casts"], rule
    # The GEMM FLOP model: full fine-tuning does 6 T out in, FALQON less than the LoRAs.
    assert by_method["full"]["model_flops"] == 6 * 32 * 64 * 48
    assert by_method["falqon"]["model_flops"] < by_method["fp8_lora"]["model_flops"]


def test_hlo_model_counts_one_layer_per_scan_body(tmp_path: Path) -> None:
    """On the tiny card all seven projections are converted; the scanned decoder body is
    counted once. Layers that read the same input (q/k/v, gate/up) quantize it once: 4
    input casts, 7 of the gradient and 7 of ``A x`` (18, 11 token-sized); the paper's rule
    adds one merge cast per stacked matrix (the merge runs outside the scan): 25. FP8
    GEMMs: 7 melded forward, 7 ``dL/dx``, 7 ``dL/db`` (21); the default rule's forward is
    7 backbone GEMMs and 4 of ``A x``, one per shared input (25)."""
    out = tmp_path / "model.json"
    args = ["hlo", "--small", "--shapes", "none", "--methods", "falqon,falqon_paper",
            "--model-layers", "1", "--batch", "2", "--seq", "64", "--json", str(out)]
    assert cli.main(args) == 0
    rows = _rows(out)
    for row in rows:
        assert row["kind"] == "model" and row["shape"] == "tiny:1L" and row["layers"] == 1
        assert row["converted"] == ["q", "k", "v", "o", "gate", "up", "down"]
    counts = [(r["fp8_casts"], r["fp8_casts_large"], r["fp8_gemms"]) for r in rows]
    assert counts == [(18, 11, 25), (25, 11, 21)]


def test_default_rule_keeps_falqons_cost_at_llama7b_shapes(tmp_path: Path) -> None:
    """Compile-only, LLaMA-7B shapes (q/k/v/o and MLP), rank 64: the default rule has fewer
    FP8 casts and fewer GEMMs than FP8 LoRA, and at most 5% more FLOPs (XLA's cost analysis
    and the analytic GEMM count) than the paper's rule."""
    out = tmp_path / "cost.json"
    args = ["hlo", "--shapes", "4096x4096,11008x4096", "--tokens", "2048", "--rank", "64",
            "--model-card", "none", "--methods", "falqon,falqon_paper,fp8_lora",
            "--json", str(out)]
    assert cli.main(args) == 0
    rows = {(r["method"], r["shape"]): r for r in _rows(out)}
    for shape in ("4096x4096", "11008x4096"):
        default, paper, fp8 = (rows[m, shape] for m in ("falqon", "falqon_paper", "fp8_lora"))
        assert default["fp8_casts"] < fp8["fp8_casts"] and default["gemms"] < fp8["gemms"]
        assert default["flops"] <= 1.05 * paper["flops"], shape
        assert default["model_flops"] <= 1.05 * paper["model_flops"], shape


def test_speed_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "speed.json"
    args = ["speed", *TINY, "--repeats", "2", "--warmup", "1", "--json", str(out),
            "--methods", "falqon,fp8_lora,full"]
    assert cli.main(args) == 0
    assert speed.CPU_NOTE in capsys.readouterr().out
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["falqon", "fp8_lora", "full"]
    for row in rows:
        assert SPEED_KEYS <= row.keys(), SPEED_KEYS - row.keys()
        assert row["step_time_s"] > 0 and len(row["step_times_s"]) == 2
        assert row["tokens_per_s"] == pytest.approx(32 / row["step_time_s"])
        assert row["backend"] == "cpu" and row["note"] == speed.CPU_NOTE
        assert row["mfu_bf16"] is None and row["mfu_fp8"] is None


def test_peak_table() -> None:
    assert speed.peak_flops("NVIDIA H200") == (989e12, 1979e12)
    assert speed.peak_flops("NVIDIA H100 80GB HBM3") == (989e12, 1979e12)
    assert speed.peak_flops("NVIDIA H100 PCIe") == (756e12, 1513e12)
    assert speed.peak_flops("NVIDIA L40S")[0] == 362e12  # not taken for an L4
    assert speed.peak_flops("NVIDIA A100-SXM4-80GB") == (312e12, None)  # no FP8 units
    assert speed.peak_flops("cpu") == (None, None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["hlo", "--methods", "falqon,bogus"], "unknown method 'bogus'"),
        (["speed", "--shapes", "64x"], "bad shape '64x'"),
        (["hlo", "--shapes", "64x48", "--rank", "0"], "--rank must be a positive integer"),
        (["hlo", "--model-card", "no-such-card", "--shapes", "none"], "unknown model card"),
        (["hlo", "--shapes", "40x48", "--methods", "falqon"], "not a multiple of 16"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_flags_subprocess() -> None:
    """Through ``python -m``: argparse errors (here a non-integer) are one line, exit 2."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for argv, message in (
        (["speed", "--tokens", "many"], "expected an integer"),
        (["hlo", "--methods", "qlora,nf4"], "unknown method 'nf4'"),
        (["accuracy"], "the following arguments are required: --data"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "falqon_jax.bench", *argv],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K is missing")
def test_accuracy_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``accuracy --quick`` on 24 instructions and the pretrained stories260K (character
    tokenizer: it has no tokenizer of its own): the base, then two methods; the rows carry
    the method, FALQON's settings, the held-out loss and the recovered fraction."""
    records = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}."}
               for w in ("red", "green", "blue", "cyan", "pink", "gold") * 4]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "rows.json"
    argv = ["accuracy", "--quick", "--data", str(data), "--out", str(tmp_path / "runs"),
            "--model", str(STORIES), "--tokenizer", "char", "--rank", "16",
            "--eval-size", "4", "--batch-size", "4", "--source-len", "16", "--target-len",
            "16", "--json", str(out), "--plot", str(tmp_path / "plot.png")]
    assert cli.main(argv) == 0
    assert "recovered" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["falqon", "lora"]
    assert rows[0]["rule"] == "visible" and rows[0]["a_scale"] == "lora"
    assert "rule" not in rows[1]
    for row in rows:
        assert row["seeds"] == [0] and row["eval_loss_std"] == 0.0
        assert math.isfinite(row["eval_loss_mean"]) and row["steps"] == 2
        assert math.isfinite(row["base_eval_loss"])
    assert rows[1]["vs_lora"] == 0.0
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_hlo_small_preset_all_methods(tmp_path: Path) -> None:
    """The full ``--small`` preset (linear + tiny model, every method) runs end to end and
    FALQON has the fewest FP8 casts of the FP8 methods on every shape."""
    out = tmp_path / "small.json"
    every = ",".join(cases.METHOD_NAMES)
    assert cli.main(["hlo", "--small", "--methods", every, "--json", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2 * len(cases.METHOD_NAMES)
    for shape in {r["shape"] for r in rows}:
        fp8_rows = {r["method"]: r for r in rows if r["shape"] == shape}
        assert fp8_rows["falqon"]["fp8_casts"] < fp8_rows["fp8_lora"]["fp8_casts"]


def _tiny_minimum(method: str, remat: bool = True) -> dict[str, float]:
    settings = cases.Settings(methods=(method,), shapes=(), tokens=0, rank=16,
                              model_card="tiny", model_layers=0, batch=2, seq=32, top_k=1,
                              remat=remat, seed=0)
    return cases.minimum_bytes(cases.model_case(method, settings))


def test_minimum_bytes_parts_follow_the_shapes() -> None:
    """The tiny card (H 64, Q 64, KV 32, F 176, 4 layers, vocab 512), 2 x 32 tokens, bf16,
    counted again here from the definition: LoRA's bf16 backbone is read in the same passes
    as fp8_lora's FP8 one, so their weights differ by one byte per backbone value per pass
    (forward, dL/dx, and the recomputation for all but down_proj) less fp8_lora's scales;
    every adapter method has the same activations; full fine-tuning adds the weight
    gradients' second reads; without remat the recomputation's activations and weight
    reads go."""
    h, q, kv, f, layers, vocab, tokens = 64, 64, 32, 176, 4, 512, 64
    qkv = q + 2 * kv
    lora, fp8_lora, falqon, full = (_tiny_minimum(m) for m in
                                    ("lora", "fp8_lora", "falqon", "full"))
    per_pass = q * h + kv * h + kv * h + h * q + f * h + f * h + h * f  # backbone values
    recomputed = per_pass - h * f  # down_proj's output is not read by the backward
    scales = 4 * (2 * 7 + 6)  # fp8_lora's float32 scale per projection, read in each pass
    assert lora["weights"] - fp8_lora["weights"] == layers * (2 * per_pass + recomputed - scales)
    layer = (6 * h + 2 * qkv + 2 * q + 4 * f) + (4 * h + 2 * qkv + 2 * q + 2 * f) \
        + (8 * h + 6 * f + 3 * q + 3 * qkv)
    expected = 2 * tokens * (layers * layer + 3 * h + 4 * vocab)
    assert lora["activations"] == fp8_lora["activations"] == falqon["activations"] == expected
    extra = 2 * tokens * layers * (4 * h + qkv + q + 3 * f)
    assert full["activations"] == expected + extra
    no_remat = _tiny_minimum("fp8_lora", remat=False)
    assert fp8_lora["activations"] - no_remat["activations"] == \
        2 * tokens * layers * (4 * h + 2 * qkv + 2 * q + 2 * f)
    assert fp8_lora["weights"] - no_remat["weights"] == layers * (recomputed + 4 * 6)
    for row in (lora, fp8_lora, falqon, full):
        assert row["total"] == row["weights"] + row["state"] + row["activations"]
    # Full fine-tuning trains the backbone: its state outweighs the adapters'.
    assert full["state"] > lora["state"] > 0 and full["weights"] < lora["weights"]
