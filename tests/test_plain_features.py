"""What a plain install (no extras) needs to work and to say: a LLaMA tokenizer shipped as
``tokenizer.model`` only loads (SentencePiece); a data set too small for ``--eval-size`` and
a model folder without a tokenizer are refused in one line naming the flag that fixes them;
the commands keep transformers' PyTorch notice and raw warnings off the terminal.

``.ci/plain_features.sh`` runs the chat fine-tune and ``generate --chat`` in a venv without
extras; these tests check the same parts in the test venv.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from falqon_jax.train.config import PAPER
from falqon_jax.train.prepare import load_tokenizer
from falqon_jax.train.run import UserError, main

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama"
REPO = Path(__file__).resolve().parents[1]
NOTICE = "PyTorch was not found"


def write_alpaca(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Say {i}.", "input": "",
                                "output": f"{i} is a number."}) + "\n")
    return path


def write_config(directory: Path, intermediate_size: int = 176) -> Path:
    """A tiny LLaMA's Hugging Face ``config.json`` alone in ``directory``."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": intermediate_size, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}))
    return directory


def train_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line ``python -m falqon_jax.train ARGS`` ends with (exit code 2)."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


# --------------------------------------------------------------------------------------
# A LLaMA tokenizer shipped as tokenizer.model only.


@pytest.mark.skipif(not (LLAMA_TOKENIZER / "tokenizer.model").is_file(),
                    reason="../shared/tokenizers/llama is missing")
def test_tokenizer_model_only_loads_like_tokenizer_json(tmp_path):
    from transformers import AutoTokenizer

    from falqon_jax.generate import load_tokenizer as generate_tokenizer
    from falqon_jax.sources import Loaded

    only = tmp_path / "spm"
    only.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(LLAMA_TOKENIZER / name, only / name)
    config = dataclasses.replace(PAPER, model="tiny", init="random", data="x.jsonl",
                                 tokenizer=str(only))
    text = "Once upon a time, a llama read 42 books.\nThe end."
    want = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER, local_files_only=True)
    for tokenizer in (load_tokenizer(config),
                      generate_tokenizer(Loaded(model=None, kind="hf"), str(only))):
        assert len(tokenizer) == len(want) == 32000
        assert tokenizer.encode(text) == want.encode(text)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


# --------------------------------------------------------------------------------------
# Messages naming the fix.


def test_small_data_set_names_eval_size(tmp_path, capsys):
    data = write_alpaca(tmp_path / "small.jsonl", 40)
    common = ("--model", "tiny", "--init", "random", "--data", str(data))
    err = train_error(capsys, *common, "--out", str(tmp_path / "a"))  # default --eval-size 100
    assert "all 40 examples are held out for eval loss (--eval-size 100)" in err
    assert "--eval-size 4" in err  # a tenth, leaving a batch of 16 to train on
    # too few left for a batch: a smaller --eval-size that leaves one
    err = train_error(capsys, *common, "--eval-size", "30", "--out", str(tmp_path / "b"))
    assert "only 10 training examples" in err and "30 of its 40" in err
    assert "--eval-size 4" in err
    # no --eval-size fixes a data set smaller than a batch
    err = train_error(capsys, *common, "--eval-size", "2", "--batch-size", "64",
                      "--out", str(tmp_path / "c"))
    assert "lower --batch-size and --eval-size" in err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_eval_size_is_honoured_exactly():
    from falqon_jax.train import data

    items = list(range(40))
    train, held = data.split(items, 4, seed=0)
    assert len(held) == 4 and len(train) == 36 and sorted(train + held) == items
    assert data.split(items, 4, seed=0) == (train, held)  # a resumed run splits alike


def test_model_folder_without_tokenizer_names_tokenizer_flag(tmp_path, capsys):
    model = write_config(tmp_path / "model")  # a checkpoint folder's config, no tokenizer
    config = dataclasses.replace(PAPER, model=str(model), data="x.jsonl")
    with pytest.raises(UserError, match=r"holds no tokenizer .*; pass --tokenizer DIR"):
        load_tokenizer(config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=rf"--tokenizer {empty} holds no tokenizer"):
        load_tokenizer(dataclasses.replace(config, tokenizer=str(empty)))
    data = write_alpaca(tmp_path / "small.jsonl", 40)
    err = train_error(capsys, "--model", str(model), "--data", str(data), "--eval-size", "4",
                      "--out", str(tmp_path / "run"))
    assert f"--model {model} holds no tokenizer" in err and "pass --tokenizer DIR" in err

    from falqon_jax.generate import UsageError
    from falqon_jax.generate import load_tokenizer as generate_tokenizer
    from falqon_jax.sources import Loaded

    with pytest.raises(UsageError, match=rf"--tokenizer {empty} holds no tokenizer"):
        generate_tokenizer(Loaded(model=None, kind="hf"), str(empty))


# --------------------------------------------------------------------------------------
# Quiet output.

# As on a plain install: transformers finds no PyTorch (``find_spec`` of a module set to
# None in ``sys.modules`` is None), then runs a command's entry point (``--help``: the
# preamble only) and imports transformers as the commands do.
HIDE_TORCH = """
import runpy, sys
sys.modules["torch"] = None
module = sys.argv[1]
if module != "-":
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
import transformers
"""


def run_without_torch(module: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", HIDE_TORCH, module], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def notice_without_torch() -> None:
    """Skips unless importing transformers without PyTorch prints the notice at all."""
    if NOTICE not in run_without_torch("-"):
        pytest.skip("this transformers prints no PyTorch notice without PyTorch")


@pytest.mark.parametrize("module", ["falqon_jax.train", "falqon_jax.generate",
                                    "falqon_jax.export", "falqon_jax.bench", "falqon_jax.demo"])
def test_commands_keep_the_pytorch_notice_quiet(module, notice_without_torch):
    assert NOTICE not in run_without_torch(module)


def test_project_warnings_print_as_one_note_line(tmp_path, capsys, monkeypatch):
    import falqon_jax
    from falqon_jax import cli

    passed_on = []
    monkeypatch.setattr(warnings, "showwarning", lambda *args: passed_on.append(args))
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "")  # undone after the test
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    cli.quiet_output()
    cli.quiet_output()  # twice: still one line per warning
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"
    model = write_config(tmp_path / "model", intermediate_size=172)  # not a multiple of 16
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        plan = falqon_jax.load_model(model, method="falqon", rank=16, init="random").plan
        warnings.showwarning("someone else's", UserWarning, "/elsewhere/module.py", 1)
    assert (plan.q, plan.gate) == ("falqon", "frozen")
    assert [args[:3] for args in passed_on] == [
        ("someone else's", UserWarning, "/elsewhere/module.py")]
    # the project's own warning as one line; other code's passed on as they were
    assert capsys.readouterr().err.splitlines() == [
        "note: falqon leaves 3 layer kind(s) unconverted (dense, frozen): gate (172x64), "
        "up (172x64), down (64x172): not a multiple of 16 (FP8 GEMM requirement)"]
