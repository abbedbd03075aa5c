"""The training CLI: demo, outputs, exact resume, divergence, Ctrl-C and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from falqon_jax.train.run import main

SHARED = Path(__file__).resolve().parents[2] / "shared"
ALPACA = SHARED / "data" / "alpaca_data_1k.json"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama"
QUICK = ["--save-every", "1000", "--eval-every", "1000", "--sample-tokens", "0"]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_writes_metrics_config_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, "--steps", 20, "--out", out, "--log-every", 5,
                           "--eval-every", 10, "--save-every", 10)
    assert code == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "step_time_s"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert "eval_loss" in rows[1] and "eval_loss" in rows[3] and "eval_loss" not in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "falqon" and config["model"] == "tiny" and config["steps"] == 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10", "20"]
    assert "held-out loss" in stdout and "sample:" in stdout


def test_gradient_aligned_a_replaces_every_melded_a(tmp_path, capsys):
    """``--init-a grad`` on the demo: the run trains, and the saved A rows are singular
    vectors (orthogonal rows of one norm), not the random placeholder the model was built
    with (whose rows overlap by about 1/sqrt(64) each). The tiny random model's weights are
    small, so the rows are shrunk below 3x LoRA's norm to stay within W's magnitude."""
    from falqon_jax.train.runs import load_run

    out = tmp_path / "grad"
    code, _, err = _run(capsys, "--steps", 2, "--out", out, "--init-a", "grad", *QUICK)
    assert code == 0, err
    q = load_run(out)[0].params["layers"]["self_attn"]["q_proj"]
    rank = q.rank
    w8 = np.asarray(q.w8).astype(np.float32)
    a = w8[:, -rank:, :] * np.asarray(q.scale)[:, None, None]  # (L, r, in)
    gram = a @ np.swapaxes(a, -1, -2)
    gram = gram / np.mean(np.diagonal(gram, axis1=-2, axis2=-1), axis=-1)[:, None, None]
    # E4M3 rounds every entry by <= 2^-4 relative: orthonormal up to a few percent
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(rank), gram.shape), atol=0.05)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    common = ["--log-every", 1, "--grad-accum", 2, *QUICK]
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert _run(capsys, "--steps", 12, "--out", whole, *common)[0] == 0
    assert _run(capsys, "--steps", 6, "--out", half, *common)[0] == 0
    assert _run(capsys, "--steps", 12, "--out", half, "--resume", *common)[0] == 0
    a, b = _metrics(whole), _metrics(half)
    assert [r["step"] for r in b] == list(range(1, 13))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    assert_same_saved_state(whole, half, 12)


def saved_leaves(out, step):
    """Every array a run saved for ``step``: its checkpoint (what training changes) and the
    run's frozen part, as numpy arrays keyed by path."""
    import jax
    import orbax.checkpoint as ocp

    reader = ocp.PyTreeCheckpointer()
    leaves = {}
    for name, path in (("step", out / "checkpoints" / str(step) / "state"),
                       ("frozen", out / "frozen" / "state")):
        tree = reader.restore(path)
        for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaves[name + jax.tree_util.keystr(key)] = np.asarray(leaf)
    return leaves


def assert_same_saved_state(a, b, step):
    """Two runs saved bit-identical states (params, optimizer state, step) at ``step``."""
    x, y = saved_leaves(a, step), saved_leaves(b, step)
    assert sorted(x) == sorted(y) and len(x) > 10
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].tobytes() == y[key].tobytes(), key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "--method", "full", "--lr", 1e8, "--warmup-ratio", 0,
                        "--steps", 20, "--save-every", 1, "--out", out, "--sample-tokens", 0)
    assert code == 3 and "non-finite loss" in err
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 20
    # What was kept is finite and resumable.
    code, _, err = _run(capsys, "--method", "full", "--lr", 1e-3, "--warmup-ratio", 0,
                        "--steps", max(steps) + 1, "--save-every", 1, "--out", out, "--resume",
                        "--sample-tokens", 0)
    assert code != 2, err


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "falqon_jax.train", "--steps", "100000", "--out", str(out),
           "--log-every", "1", *map(str, QUICK)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 200):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"saved step" in err and b"Traceback" not in err
    saved = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) >= 1


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A small randomly initialised LLaMA with the real 32000-token vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    path = tmp_path_factory.mktemp("hf") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.skipif(not (ALPACA.is_file() and LLAMA_TOKENIZER.is_dir()),
                    reason="shared data not present")
def test_the_headline_command_fine_tunes_the_cards_hub_weights_on_a_hub_data_set(
        tmp_path, capsys, monkeypatch, hf_checkpoint, fake_hub):
    """``--model llama-7b --data tatsu-lab/alpaca``: the card's source, huggyllama/llama-7b
    (here a small random LLaMA with LLaMA's tokenizer, served by the stand-in Hub of
    ``tests/hub_server.py``), and the data set are fetched into the Hugging Face cache; the
    run trains with the model's own tokenizer, and reads back offline with it."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import constants

    from falqon_jax.sources import load_any

    files = {p.name: p for p in [*hf_checkpoint.iterdir(), *LLAMA_TOKENIZER.iterdir()]}
    fake_hub.add("huggyllama/llama-7b", files)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(json.loads(ALPACA.read_text())), sink)
    fake_hub.add("tatsu-lab/alpaca", {"data/train-00000-of-00001.parquet": sink.getvalue()},
                 repo_type="dataset")
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "--model", "llama-7b", "--data", "tatsu-lab/alpaca",
                             "--rank", 16, "--batch-size", 4, "--steps", 2,
                             "--target-len", 32, "--eval-size", 8, "--out", out, "--log-every",
                             1, "--dtype", "float32", *QUICK)
    assert code == 0, err
    assert "992 train / 8 held-out" in err + stdout
    # source-len 16 (the paper's) truncates every Alpaca prompt; the log counts them.
    assert "992 truncated" in err + stdout
    assert len(_metrics(out)) == 2
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"], saved["data"], saved["data_split"]) == (
        "llama-7b", "tatsu-lab/alpaca", "train")
    fake_hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_any(out)  # what generate and export do with the run
    snapshot = Path(constants.HF_HUB_CACHE) / "models--huggyllama--llama-7b" / "snapshots"
    assert loaded.kind == "run" and loaded.tokenizer_dir.parent == snapshot
    assert loaded.model.config.vocab_size == 32000


def test_the_headline_command_offline_without_the_weights_is_one_line(tmp_path, capsys,
                                                                       monkeypatch, fake_hub):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = _run(capsys, "--model", "llama-7b", "--data", tmp_path / "x.json",
                  "--out", tmp_path / "out")
    lines = result[2].strip().splitlines()
    assert result[0] == 2 and len(lines) == 1, result
    assert lines[0].startswith("error: model card 'llama-7b' names its weights "
                               "huggyllama/llama-7b: huggyllama/llama-7b is neither a local path "
                               "nor a model in the Hugging Face cache"), lines
    assert "HF_HUB_OFFLINE is set" in lines[0]
    assert not (tmp_path / "out").exists()


def _bad_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda t: ["--data", t / "missing.json"], "does not exist"),
        (lambda t: ["--data", _bad_file(t, "b.json", '[{"instruction": "a", "output": "b"},\n{')],
         "line 2"),
        (lambda t: ["--data", _bad_file(t, "f.json", '[{"instruction": "a"}]')],
         "'output' is missing"),
        (lambda t: ["--data", _bad_file(t, "e.jsonl", '{"prompt": "a", "completion": " "}\n')],
         "no training examples left"),
        (lambda t: ["--model", "llama-99b", "--data", ALPACA], "unknown model card"),
        (lambda t: ["--model", _bad_file(t, "config.json", '{"model_type": "bert"}').parent,
                    "--data", ALPACA], "not a LLaMA"),
        (lambda t: ["--rank", 0], "--rank must be positive"),
        (lambda t: ["--rule", "paper", "--top-k", 64], "--top-k 64 exceeds"),
        (lambda t: ["--lr", -1], "--lr must be positive"),
        (lambda t: ["--batch-size", 6, "--grad-accum", 4], "divisible"),
        (lambda t: ["--resume"], "no checkpoint"),
    ],
    ids=["missing-data", "malformed-json", "missing-field", "empty-after-filter",
         "unknown-card", "not-llama-dir", "rank", "top-k", "lr", "accum", "resume-nothing"],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, make_args,
                                                            message):
    out = tmp_path / "out"
    args = [str(a) for a in make_args(tmp_path)]
    if "--data" in args and "--model" not in args:
        args += ["--model", "tiny", "--init", "random", "--tokenizer", str(LLAMA_TOKENIZER)]
    code, _, err = _run(capsys, *args, "--out", out, "--steps", 2)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists() or not any(out.iterdir())


def test_out_dir_with_another_run_is_refused_and_resume_checks_identity(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(capsys, "--steps", 2, "--out", out, *QUICK)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, _, err = _run(capsys, "--steps", 2, "--out", out, "--rank", 8)
    assert code == 2 and "already holds a run" in err
    code, _, err = _run(capsys, "--steps", 4, "--out", out, "--resume", "--method", "lora")
    assert code == 2 and "different run" in err and "method" in err
    code, _, err = _run(capsys, "--steps", 4, "--out", out, "--resume", "--rank", 8)
    assert code == 2 and "rank" in err
    assert (out / "metrics.jsonl").read_text() == before


def test_user_errors_print_no_traceback_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "falqon_jax.train", "--data", str(tmp_path / "nope.json"),
         "--model", "tiny", "--init", "random", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: data file {tmp_path / 'nope.json'} does not exist; pass --data PATH to an "
        "existing file or a Hugging Face Hub data set name (org/name)"]


def test_every_recipe_parses():
    """The paper's runs name the Hub's LLaMA weights and data sets, so each runs as it is."""
    from falqon_jax.train.config import resolve

    recipes = sorted((Path(__file__).resolve().parents[1] / "train").glob("llama-*.toml"))
    assert len(recipes) == 20
    for recipe in recipes:
        config, resume = resolve(["--recipe", str(recipe)])
        assert not resume and config.steps == 1875 and config.lr == 2e-3 and config.top_k == 10
        assert not config.is_demo
        size = recipe.stem.split("-")[1]
        assert config.model == f"huggyllama/llama-{size}" and config.data_split == "train"
        assert config.data == ("tatsu-lab/alpaca" if "-alpaca-" in recipe.stem
                               else "timdettmers/openassistant-guanaco")
        if recipe.stem.endswith("falqon_paper"):  # the published rule, reproducible
            assert (config.method, config.rule, config.a_scale) == ("falqon", "paper", "natural")
        else:
            assert recipe.stem.endswith(config.method) and config.rule == "visible"
    config, _ = resolve(["--recipe", str(recipes[0].with_name(
        "smollm2-135m-capybara-falqon.toml"))])
    assert (config.model, config.data) == ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                           "trl-lib/Capybara")


def test_flags_override_the_demo_one_by_one():
    from falqon_jax.train.config import DEMO, resolve

    config, _ = resolve(["--steps", "30", "--out", "somewhere"])
    assert config.is_demo and config.steps == 30 and config.out == "somewhere"
    assert config.lr == DEMO.lr and config.model == "tiny"


def test_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--reset", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --reset: invalid choice")


def test_rerunning_without_out_starts_a_new_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, out, err = _run(capsys, "--steps", 1, *QUICK)
        assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo", "demo-2"]
    assert "writing to runs/demo-2" in out + err


def test_default_falqon_learns_the_demo_as_well_as_lora(tmp_path, capsys):
    """The tiny LLaMA of the demo, 60 steps of each method with the demo's settings: FALQON's
    default rule lowers the held-out loss at least as far as LoRA does, so it recovers at
    least 90% of LoRA's improvement from any common start (measured over 1000 steps:
    0.0031 against LoRA's 2.0685, from about 5)."""
    losses = {}
    for method in ("falqon", "lora"):
        out = tmp_path / method
        code, _, err = _run(capsys, "--steps", 60, "--out", out, "--method", method,
                            "--eval-every", 60, "--log-every", 60, "--save-every", 1000,
                            "--sample-tokens", 0)
        assert code == 0, err
        losses[method] = _metrics(out)[-1]["eval_loss"]
    assert losses["lora"] < np.log(99.0), losses  # LoRA learned something (99 tokens)
    assert losses["falqon"] <= losses["lora"], losses
