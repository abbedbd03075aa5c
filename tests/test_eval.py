"""Evaluation with lm-evaluation-harness (``python -m falqon_jax.eval``, ``train
--eval-tasks``): the scores are the model's own log-likelihoods and greedy continuations
(checked against a direct computation with the project's forward), they equal lm-eval's
``hf`` backend on the same checkpoint, batches are bucketed, the command line and a training
run's end write the results, and every mistake is one line with exit code 2.

Tasks are lm-eval YAML files over local JSON Lines files written here (``dataset_path:
json``): nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from falqon_jax.eval.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama"
SMOL = SHARED / "models" / "smollm2-135m-instruct"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
QUICK = ["--save-every", "1000", "--eval-every", "1000", "--sample-tokens", "0"]

# --report-to tensorboard where its writer and reader are installed (the test extra)
TENSORBOARD = ["--report-to", "tensorboard"] if all(
    importlib.util.find_spec(m) for m in ("tensorboardX", "tensorboard")) else []
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval (the eval extra) not installed")


# --------------------------------------------------------------------------------------
# Local tasks.


def write_task(folder: Path, name: str, docs: list[dict], **config) -> None:
    """An lm-eval task ``name`` over ``docs``, as ``folder/name.yaml`` and its data."""
    import yaml

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": str(data)}, "test_split": "train", **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def multiple_choice(folder: Path, name: str, docs: list[dict]) -> None:
    """``docs``: ``question``, ``choices``, ``answer`` (the index of the right choice)."""
    write_task(folder, name, docs, output_type="multiple_choice",
               doc_to_text="{{question}}", doc_to_choice="{{choices}}", doc_to_target="answer",
               metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])


def generation(folder: Path, name: str, docs: list[dict], until: list[str],
               max_gen_toks: int) -> None:
    """``docs``: ``question``, ``answer``; scored by exact match."""
    write_task(folder, name, docs, output_type="generate_until", doc_to_text="{{question}}",
               doc_to_target="answer",
               generation_kwargs={"until": until, "max_gen_toks": max_gen_toks},
               metric_list=[{"metric": "exact_match"}])


def rolling(folder: Path, name: str, texts: list[str]) -> None:
    """Perplexity over ``texts`` (``loglikelihood_rolling``)."""
    write_task(folder, name, [{"text": t} for t in texts], output_type="loglikelihood_rolling",
               doc_to_text="", doc_to_target="{{text}}",
               metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])


def letter_tasks(folder: Path) -> Path:
    """Short ASCII tasks in the demo's own format (the character tokenizer reads them):
    ``letters_mc`` (which letters follow?), ``letters_gen`` (continue the alphabet) and
    ``letters_text`` (perplexity). Every input fits the shortest bucket (32 tokens)."""
    docs = []
    for i, c in enumerate(LETTERS[1:-2]):
        after = LETTERS[LETTERS.index(c) + 1:][:8]
        wrong = [LETTERS[:LETTERS.index(c)][::-1][:8], after[::-1], "qq"]
        answer = i % 4  # the right choice in every position
        choices = wrong[:answer] + [after] + wrong[answer:]
        docs.append({"question": f"letters after {c}", "choices": choices, "answer": answer})
    multiple_choice(folder, "letters_mc", docs)
    generation(folder, "letters_gen", [{"question": f"letters after {c}",
                                        "answer": LETTERS[LETTERS.index(c) + 1:]}
                                       for c in "bdfh"], until=["\n", "z"], max_gen_toks=10)
    rolling(folder, "letters_text", ["letters after b cdefg", "abc", "the quick brown fox"])
    return folder


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> Path:
    return letter_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture
def no_env_info(monkeypatch):
    """lm-eval's record of the environment (torch's collect_env, seconds) left out."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def one_line_exit_2(capsys, argv, message):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


# --------------------------------------------------------------------------------------
# The scores are the model's: a direct computation with its forward.


@pytest.fixture(scope="module")
def tiny():
    """The demo's tiny LLaMA with random weights (float32) and the character tokenizer."""
    from falqon_jax.sources import load_any
    from falqon_jax.train.demo_data import CharTokenizer

    return load_any("tiny", init="random", dtype="float32").model, CharTokenizer()


def evaluate_tiny(tiny, letters) -> dict:
    """Every request type on the tiny model through ``lm_eval.simple_evaluate``."""
    from falqon_jax.eval.harness import Settings, evaluate

    model, tok = tiny
    settings = Settings(tasks=("letters_mc", "letters_gen", "letters_text"),
                        include_path=str(letters), batch_size=5, log_samples=True,
                        bootstrap_iters=0)
    with jax.default_matmul_precision("highest"):
        return evaluate(model.module, model.params, tok, settings)


def direct_logp(model, rows: list[list[int]]) -> list[np.ndarray]:
    """Per row, float64 log-softmax of the model's logits at each position: one forward of
    all rows, each alone in its row of a 64-token right-padded batch."""
    tokens = np.zeros((len(rows), 64), np.int32)
    mask = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model.logits(tokens, mask), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return [logp[i, :len(row)] for i, row in enumerate(rows)]


@needs_lm_eval
def test_scores_are_the_models_own(tiny, letters, no_env_info):
    """The three request types on the tiny model: lm-eval's results, whose scores are the
    model's own log-likelihoods and greedy continuations (computed here directly)."""
    results = evaluate_tiny(tiny, letters)
    check_layout(results)
    check_multiple_choice(tiny, results)
    check_rolling_and_generation(tiny, results)


def check_layout(r: dict) -> None:
    assert {"results", "configs", "versions", "n-shot", "n-samples", "config",
            "samples"} <= r.keys()
    assert set(r["results"]) == {"letters_mc", "letters_gen", "letters_text"}
    assert {"acc,none", "acc_stderr,none", "acc_norm,none"} <= r["results"]["letters_mc"].keys()
    assert "exact_match,none" in r["results"]["letters_gen"]
    assert "word_perplexity,none" in r["results"]["letters_text"]
    assert r["n-samples"]["letters_mc"] == {"original": 23, "effective": 23}
    assert r["config"]["model_backend"] == "falqon_jax" and r["config"]["batch_size"] == 5


def check_multiple_choice(tiny, tiny_results: dict) -> None:
    """Each choice's log-likelihood is the sum of the model's log-probabilities of its
    tokens after BOS + the question (the demo's format), computed here directly; accuracy
    is the share of questions whose right choice scores highest."""
    model, tok = tiny
    samples = tiny_results["samples"]["letters_mc"]
    pairs = [args for s in samples for args in s["arguments"]]
    rows = [[tok.bos_token_id] + tok.encode(ctx + cont) for ctx, cont in pairs]
    logps = direct_logp(model, rows)
    want = [sum(lp[len(row) - len(cont) - 1 + k, row[len(row) - len(cont) + k]]
                for k in range(len(cont)))
            for lp, row, (_, cont) in zip(logps, rows, pairs, strict=True)]
    got = [resp[0][0] for s in samples for resp in s["resps"]]
    np.testing.assert_allclose(got, want, atol=1e-4)
    greedy = [resp[0][1] for s in samples for resp in s["resps"]]
    assert greedy == [bool(np.all(lp[len(row) - len(cont) - 1:-1].argmax(-1)
                                  == row[len(row) - len(cont):]))
                      for lp, row, (_, cont) in zip(logps, rows, pairs, strict=True)]
    scores = np.array(want).reshape(len(samples), -1)
    gold = np.array([s["target"] for s in samples])
    acc = np.mean(scores.argmax(1) == gold)
    lengths = np.array([[len(c) for c in s["doc"]["choices"]] for s in samples])
    acc_norm = np.mean((scores / lengths).argmax(1) == gold)
    result = tiny_results["results"]["letters_mc"]
    assert result["acc,none"] == pytest.approx(acc) and result["acc_norm,none"] == \
        pytest.approx(acc_norm)


def check_rolling_and_generation(tiny, tiny_results: dict) -> None:
    """``loglikelihood_rolling``: the log-probability of BOS + the text after the prefix
    token (BOS); ``generate_until``: greedy decoding with full forwards, cut at the first
    stop sequence."""
    model, tok = tiny
    samples = tiny_results["samples"]["letters_text"]
    rows = [[1, 1] + tok.encode(s["arguments"][0][0]) for s in samples]
    want = [sum(lp[t, row[t + 1]] for t in range(len(row) - 1))
            for lp, row in zip(direct_logp(model, rows), rows, strict=True)]
    np.testing.assert_allclose([s["resps"][0][0] for s in samples], want, atol=1e-4)

    samples = tiny_results["samples"]["letters_gen"]
    prompts = [[1] + tok.encode(s["arguments"][0][0]) for s in samples]
    rows = [list(p) for p in prompts]
    for _ in range(10):
        logps = direct_logp(model, rows)
        rows = [row + [int(lp[-1].argmax())] for row, lp in zip(rows, logps, strict=True)]
    texts = []
    for row, prompt in zip(rows, prompts, strict=True):
        text = tok.decode(row[len(prompt):])  # stops at EOS
        for stop in ("\n", "z"):
            text = text.split(stop)[0]
        texts.append(text)
    assert [s["resps"][0][0] for s in samples] == texts
    assert tiny_results["results"]["letters_gen"]["exact_match,none"] == pytest.approx(
        np.mean([t == s["target"] for t, s in zip(texts, samples, strict=True)]))


def test_batches_are_bucketed_sorted_and_shared(tiny):
    """Inputs of 2 to 70 tokens (of at most 64 scored: longer ones lose tokens on the left)
    compile one program per bucket (32, 64) and batch size, the scores do not depend on the
    batching, and requests with the same model input (choices that differ in their last
    token) share one row."""
    from falqon_jax.eval import scoring

    model, _ = tiny
    rng = np.random.default_rng(0)
    pairs = [(list(rng.integers(3, 99, size=n)), list(rng.integers(3, 99, size=m)))
             for n, m in [(2, 1), (30, 3), (9, 40), (40, 30), (5, 1), (1, 2), (50, 1)]]
    pairs += [(pairs[0][0] + [7], [k]) for k in (4, 5, 6)]  # one shared input
    assert scoring.buckets(512) == (32, 64, 128, 256, 512)
    assert scoring.buckets(48) == (32, 48)
    before = scoring.score_rows._cache_size()
    results = {}
    with jax.default_matmul_precision("highest"):
        for batch in (2, 16):
            scorer = scoring.Scorer(model.module, model.params, batch_size=batch,
                                    max_length=64, progress=False)
            calls: list[int] = []
            original = scorer._forward
            scorer._forward = lambda rows, calls=calls, original=original: \
                calls.append(len(rows)) or original(rows)
            results[batch] = scorer.loglikelihoods(pairs)
            assert sum(calls) == len(pairs) - 2  # the three shared-input requests: one row
    assert scoring.score_rows._cache_size() - before <= 4  # 2 buckets x 2 batch sizes
    np.testing.assert_allclose([r[0] for r in results[16]], [r[0] for r in results[2]],
                               rtol=1e-6)
    assert [r[1] for r in results[16]] == [r[1] for r in results[2]]
    # the 70-token request: its first 5 context tokens fall off the 64-token input (+ 1)
    truncated = scoring.Scorer(model.module, model.params, batch_size=2, max_length=64,
                               progress=False)
    context, continuation = pairs[3]
    with jax.default_matmul_precision("highest"):
        assert truncated.loglikelihoods([(context[5:], continuation)])[0][0] == \
            pytest.approx(results[2][3][0], abs=1e-5)


@needs_lm_eval
@pytest.mark.slow
def test_a_mesh_gives_the_same_scores(letters, tmp_path):
    """``--mesh fsdp=2`` on two simulated devices (weights sharded, rows split; a batch of 3
    rounded up to 4): every request scores as on one device."""
    script = (
        "import sys; from falqon_jax.eval.cli import main; "
        "args = ['--model', 'tiny', '--init', 'random', '--tokenizer', 'char', '--tasks', "
        "'letters_mc,letters_gen,letters_text', '--include-path', sys.argv[1], '--dtype', "
        "'float32', '--batch-size', '3', '--log-samples', '--bootstrap-iters', '0']; "
        "assert main(args + ['--output', sys.argv[2] + '/one.json']) == 0; "
        "assert main(args + ['--output', sys.argv[2] + '/two.json', '--mesh', 'fsdp=2']) == 0")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, str(letters), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["config"]["mesh"] == "fsdp=2" and two["config"]["batch_size"] == 4
    assert_same_scores(two, one, atol=1e-5)


# --------------------------------------------------------------------------------------
# The harness's own reference: lm-eval's hf backend on the same checkpoint.


def hf_reference(model_dir: Path, tasks: list[str], manager) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    return lm_eval.simple_evaluate(model=hf, tasks=tasks, task_manager=manager,
                                   log_samples=True, bootstrap_iters=0)


def assert_same_scores(ours: dict, ref: dict, atol: float) -> None:
    """Per request: log-likelihoods within ``atol`` nats, the same greedy flags and
    generations; per task: the same metrics (perplexities within rounding)."""
    assert set(ours["samples"]) == set(ref["samples"])
    for task, samples in ref["samples"].items():
        mine = {s["doc_id"]: s for s in ours["samples"][task]}
        for s in samples:
            assert mine[s["doc_id"]]["arguments"] == s["arguments"]
            for a, b in zip(mine[s["doc_id"]]["resps"], s["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):
                    assert a == b, (task, s["doc_id"])
                elif isinstance(b, float):
                    assert a == pytest.approx(b, abs=atol), (task, s["doc_id"])
                else:
                    assert a[0] == pytest.approx(b[0], abs=atol), (task, s["doc_id"])
                    assert a[1] == b[1], (task, s["doc_id"])
        for metric, value in ref["results"][task].items():
            if not isinstance(value, float):
                assert ours["results"][task][metric] == value, metric
            elif "perplexity" in metric or "bits_per_byte" in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), metric
            else:
                assert ours["results"][task][metric] == pytest.approx(value, abs=1e-12), metric


def text_tasks(folder: Path) -> Path:
    """English tasks for real tokenizers: a multiple choice (word-boundary spaces, a
    context ending in a newline, one longer than a 32-token context), a generation task and
    texts longer than 32 tokens (several rolling windows at a 32-token context)."""
    facts = [("The capital of France is", ["Paris", "London", "Berlin", "Rome"], 0),
             ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin"], 0),
             ("The opposite of hot is", ["warm", "cold", "wet"], 1),
             ("Two plus two equals", ["three", "four", "five", "twenty-two"], 1),
             ("A week has seven", ["days", "hours", "months"], 0),
             ("Question: Which animal barks?\nAnswer:", [" a dog", " a cat", " a fish"], 0),
             ("Here is a long question to see how a prompt too long for the model's small "
              "context is cut on the left: which colour is the clear daytime sky?",
              ["blue", "green"], 0)]
    multiple_choice(folder, "facts_mc", [{"question": q, "choices": c, "answer": a}
                                         for q, c, a in facts])
    generation(folder, "facts_gen", [{"question": q, "answer": c[a]} for q, c, a in facts],
               until=["\n", "."], max_gen_toks=8)
    text = ("Once upon a time, in a small village by the sea, there lived an old fisherman "
            "who went out every morning before dawn. He knew every rock and every current, "
            "and the gulls followed his boat home each evening, hoping for a share of the "
            "catch. One day a storm came from the west, and the sea turned grey and wild.")
    rolling(folder, "story_text", [text, "A short line.", "Hello world"])
    return folder


def random_llama_dir(tmp: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer LLaMA (32-token context) saved by transformers, with the tokenizer
    files of ``tokenizer_dir`` beside it."""
    import shutil

    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "m")
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, tmp / "m" / f.name)
    return tmp / "m"


@needs_lm_eval
@pytest.mark.parametrize("tokenizer_dir", [
    pytest.param(LLAMA_TOKENIZER, id="llama-tokenizer-adds-bos"),
    pytest.param(SMOL, id="smollm2-tokenizer-adds-none", marks=pytest.mark.slow)])
def test_scores_equal_lm_evals_hf_backend(tokenizer_dir, tmp_path, capsys, no_env_info):
    """A random LLaMA saved by transformers, scored by ``python -m falqon_jax.eval``
    (``--method full``, float32) and by lm-eval's ``hf`` backend on the same folder: the
    same requests, log-likelihoods within 1e-4 nats, the same greedy flags, generations and
    metrics. The LLaMA tokenizer adds a BOS, SmolLM2's adds none (its prefix token is its
    BOS, ``<|im_start|>``); with the model's 32-token context the story is scored in
    several windows and the longest generation prompt is left-truncated to 24 tokens."""
    pytest.importorskip("torch")
    if not tokenizer_dir.is_dir():
        pytest.skip(f"{tokenizer_dir} not present")
    from falqon_jax.eval.harness import task_manager

    model_dir = random_llama_dir(tmp_path, tokenizer_dir)
    (tmp_path / "tasks").mkdir()
    tasks = text_tasks(tmp_path / "tasks")
    names = ["facts_mc", "facts_gen", "story_text"]
    with jax.default_matmul_precision("highest"):
        code = main(["--model", str(model_dir), "--tasks", ",".join(names), "--include-path",
                     str(tasks), "--dtype", "float32", "--batch-size", "3", "--log-samples",
                     "--bootstrap-iters", "0", "--output", str(tmp_path / "ours.json")])
    assert code == 0, capsys.readouterr().err
    ours = json.loads((tmp_path / "ours.json").read_text())
    ref = json.loads(json.dumps(hf_reference(model_dir, names, task_manager(names, str(tasks))),
                                default=str))
    windows = ours["samples"]["story_text"][0]
    assert windows["resps"][0][0] < -100  # a long text, scored over several windows
    assert_same_scores(ours, ref, atol=1e-4)


@needs_lm_eval
@pytest.mark.slow
def test_smollm2_scores_equal_lm_evals_hf_backend(tmp_path, no_env_info):
    """SmolLM2-135M-Instruct (converted from the GGUF in ../shared), float32, ``--method
    full``: per request within 1e-3 nats of lm-eval's ``hf`` backend on the same folder,
    identical greedy generations and identical accuracy."""
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    if not (SMOL / "model.Q4_1.gguf").is_file():
        pytest.skip(f"{SMOL} not present")
    from falqon_jax.bench.accuracy import CACHE, prepare_smollm2
    from falqon_jax.eval.harness import Settings, evaluate, task_manager
    from falqon_jax.sources import load_any

    cache = CACHE if (CACHE / "smollm2-135m-instruct" / "model.safetensors").exists() \
        else tmp_path
    model_dir = prepare_smollm2(cache=cache)
    (tmp_path / "tasks").mkdir()
    tasks = text_tasks(tmp_path / "tasks")
    names = ["facts_mc", "facts_gen", "story_text"]
    manager = task_manager(names, str(tasks))
    loaded = load_any(model_dir, method="full", dtype="float32")
    from falqon_jax.generate import load_tokenizer

    with jax.default_matmul_precision("highest"):
        ours = evaluate(loaded.model.module, loaded.model.params,
                        load_tokenizer(loaded, None),
                        Settings(tasks=tuple(names), include_path=str(tasks), batch_size=4,
                                 log_samples=True, bootstrap_iters=0), manager=manager)
    ours = json.loads(json.dumps(ours, default=str))
    ref = json.loads(json.dumps(hf_reference(model_dir, names, manager), default=str))
    assert_same_scores(ours, ref, atol=1e-3)
    assert ours["results"]["facts_mc"]["acc,none"] == ref["results"]["facts_mc"]["acc,none"]


@pytest.mark.slow
def test_long_documents_are_within_1e3_nats_of_float64(tmp_path):
    """The longest of the first 100 Alpaca responses (245 tokens, with the prefix token as
    ``loglikelihood_rolling`` scores it): the project's float32 log-likelihood within 1e-3
    nats of transformers' forward in float64. transformers' own float32 forward is about
    1.9e-3 nats off on this one (its log-likelihoods run about 7e-6 nats per token high;
    BENCHMARKS.md), so a forward with that much bias fails here."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    alpaca = SHARED / "data" / "alpaca_data_1k.json"
    if not (SMOL / "model.Q4_1.gguf").is_file() or not alpaca.is_file():
        pytest.skip(f"{SMOL} or {alpaca} not present")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from falqon_jax.bench.accuracy import CACHE, prepare_smollm2
    from falqon_jax.eval.scoring import Scorer
    from falqon_jax.sources import load_any

    cache = CACHE if (CACHE / "smollm2-135m-instruct" / "model.safetensors").exists() \
        else tmp_path
    model_dir = prepare_smollm2(cache=cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [r["output"] for r in json.loads(alpaca.read_text())[:100]]
    doc = max(([tokenizer.eos_token_id if tokenizer.bos_token_id is None
                else tokenizer.bos_token_id] + tokenizer.encode(t, add_special_tokens=False)
               for t in texts), key=len)
    assert len(doc) == 246
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        ids = torch.tensor([doc])
        logp = torch.log_softmax(reference(ids).logits[0], dim=-1)
        exact = float(logp[torch.arange(len(doc) - 1), ids[0, 1:]].sum())
    loaded = load_any(model_dir, method="full", dtype="float32")
    scorer = Scorer(loaded.model.module, loaded.model.params, batch_size=1, progress=False)
    [(ours, _)] = scorer.loglikelihoods([(doc[:1], doc[1:])])
    assert abs(ours - exact) < 1e-3, (ours, exact)


# --------------------------------------------------------------------------------------
# A training run's --eval-tasks, and the command line on its run directory.


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, letters):
    """A two-step demo run that scores its final model on ``letters_mc``."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval (the eval extra) not installed")
    import lm_eval.evaluator

    from falqon_jax.train.run import main as train

    out = tmp_path_factory.mktemp("runs") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        code = train(["--steps", "2", "--out", str(out), *QUICK, "--eval-tasks", "letters_mc",
                      "--eval-include-path", str(letters), *TENSORBOARD])
    assert code == 0, stderr.getvalue()[-2000:]
    return out, stdout.getvalue()


@needs_lm_eval
def test_eval_tasks_score_the_final_model_of_a_run(evaluated_run, letters, capsys,
                                                   no_env_info):
    """``--eval-tasks`` at the end of a two-step demo run: lm-eval's JSON in ``OUT/eval/``
    and a summary line on stdout. Then ``python -m falqon_jax.eval --model OUT`` scores the
    latest checkpoint, as trained (FP8 backbone, live ``b``), as the run itself did; its
    JSON goes to ``OUT/eval/`` too (a limited run's name says so), lm-eval's table and a
    summary line to stdout."""
    out, stdout = evaluated_run
    results = json.loads((out / "eval" / "results-letters_mc.json").read_text())
    assert 0 <= results["results"]["letters_mc"]["acc,none"] <= 1
    assert "samples" not in results
    config = results["config"]
    assert (config["kind"], config["step"], config["method"], config["dtype"]) == (
        "run", 2, "falqon", "float32")
    line = [ln for ln in stdout.splitlines() if ln.startswith("eval: ")]
    assert line == [f"eval: letters_mc acc {results['results']['letters_mc']['acc,none']:.4f} "
                    f"({out / 'eval' / 'results-letters_mc.json'})"]
    assert json.loads((out / "config.json").read_text())["eval_tasks"] == "letters_mc"
    if TENSORBOARD:  # the metrics beside the run's own scalars, at its last step
        from tests.test_reporting import tensorboard_scalars

        shown = tensorboard_scalars(out)
        for metric in ("acc", "acc_norm"):
            assert shown[f"lm_eval/letters_mc/{metric}"] == [
                (2, pytest.approx(results["results"]["letters_mc"][f"{metric},none"]))]

    code = main(["--model", str(out), "--tasks", "letters_mc", "--include-path", str(letters),
                 "--limit", "10", "--bootstrap-iters", "0"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "|letters_mc|" in stdout.replace(" ", "") and "eval: letters_mc acc" in stdout
    limited = json.loads((out / "eval" / "results-letters_mc-limit10.json").read_text())
    assert limited["n-samples"]["letters_mc"]["effective"] == 10
    assert limited["config"]["step"] == 2
    code = main(["--model", str(out / "checkpoints" / "2"), "--tasks", "letters_mc",
                 "--include-path", str(letters), "--output", str(out / "cli")])
    assert code == 0
    whole = json.loads((out / "cli" / "results-letters_mc-step2.json").read_text())
    for metric in ("acc,none", "acc_norm,none"):
        assert whole["results"]["letters_mc"][metric] == results["results"]["letters_mc"][metric]


@needs_lm_eval
@pytest.mark.slow
def test_a_run_saved_without_eval_settings_resumes_and_adds_them(evaluated_run, tmp_path,
                                                                  letters, capsys):
    """The evaluation settings are no part of a run's identity: a run saved before they
    existed (its config.json without them) resumes, and ``--resume --eval-tasks`` on a
    finished run scores it without training."""
    import shutil

    from falqon_jax.train.config import TrainConfig
    from falqon_jax.train.run import main as train

    assert not {"eval_tasks", "eval_fewshot", "eval_limit", "eval_include_path"} & set(
        TrainConfig().identity())
    old = tmp_path / "old"
    shutil.copytree(evaluated_run[0], old)
    saved = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(
        {k: v for k, v in saved.items() if k not in ("eval_tasks", "eval_fewshot", "eval_limit",
                                                     "eval_include_path")}))
    shutil.rmtree(old / "eval")
    code = train(["--out", str(old), "--resume", "--eval-tasks", "letters_mc",
                  "--eval-include-path", str(letters), "--eval-limit", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert os.listdir(old / "eval") == ["results-letters_mc-limit4.json"]
    assert "eval: letters_mc acc" in captured.out
    assert json.loads((old / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


# --------------------------------------------------------------------------------------
# Recipes.


def test_a_recipe_gives_settings_and_flags_override_them(tmp_path, letters, monkeypatch):
    from falqon_jax.eval import cli
    from falqon_jax.train.config import ConfigError, resolve

    recipe = tmp_path / "mine.toml"
    recipe.write_text(f'tasks = ["letters_mc", "letters_gen"]\nnum_fewshot = 2\nlimit = 5\n'
                      f'include_path = "{letters}"\nbatch_size = "4"\n')
    values = cli.resolve({"recipe": str(recipe), "model": "m", "num_fewshot": 0})
    assert values["tasks"] == "letters_mc,letters_gen" and values["num_fewshot"] == 0
    assert values["limit"] == 5.0 and values["batch_size"] == 4
    assert values["include_path"] == str(letters) and values["method"] == "full"
    with pytest.raises(ConfigError, match="evaluation recipe: run it with python -m "
                                          "falqon_jax.eval"):
        resolve(["--recipe", "eval-mmlu-5shot"])


# --------------------------------------------------------------------------------------
# Mistakes: one line, exit code 2.


@needs_lm_eval
@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/run", "--tasks", "letters_mc"], "--model /nonexistent/run "
     "does not exist"),
    (["--model", "tiny", "--init", "random", "--tasks", "letters_mc"],
     "this model has no known tokenizer: pass --tokenizer DIR, or --tokenizer char"),
    (["--model", "tiny", "--tasks", "letters_mc"], "model card 'tiny' has no weights"),
    (["--tasks", "letters_mc"], "--model is required"),
    (["--model", "tiny"], "--tasks is required"),
    (["--model", "tiny", "--tasks", "letters_mc", "--limit", "0"], "--limit must be positive"),
    (["--model", "tiny", "--tasks", "letters_mc", "--num-fewshot", "-1"], "--num-fewshot"),
    (["--model", "tiny", "--tasks", "letters_mc", "--mesh", "fsdp=4096"], "needs 4096 devices"),
    (["--model", "tiny", "--tasks", "letters_mc", "--dtype", "fp4"], "invalid choice"),
    (["--recipe", "llama-7b-alpaca-falqon", "--model", "tiny"], "is a training recipe"),
    (["--recipe", "no-such-recipe", "--model", "tiny"], "recipe no-such-recipe does not exist"),
])
def test_mistakes_are_one_line(argv, message, letters, capsys):
    if "--tasks" in argv:
        argv = argv + ["--include-path", str(letters)]
    one_line_exit_2(capsys, argv, message)


@needs_lm_eval
def test_a_request_the_model_cannot_score_is_one_line(letters, capsys):
    """After the tasks' progress bars, one line, no traceback."""
    code = main(["--model", "tiny", "--init", "random", "--tokenizer", "char", "--tasks",
                 "letters_mc", "--include-path", str(letters), "--max-length", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == ("error: a continuation of 9 tokens cannot be scored with a "
                                    "context of 4 tokens (--max-length)")


@needs_lm_eval
def test_task_names_are_lm_evals(letters, tmp_path, capsys):
    """The shipped recipes name the paper's tasks as lm-eval knows them; an unknown task is
    one line with exit 2 before any model is loaded, and before a run with --eval-tasks
    trains (one lm-eval task index for all: it takes seconds to build)."""
    from falqon_jax.eval.cli import read_recipe
    from falqon_jax.eval.harness import split_tasks, task_manager
    from falqon_jax.train.run import main as train

    mmlu = read_recipe("eval-mmlu-5shot")
    assert (split_tasks(mmlu["tasks"]), mmlu["num_fewshot"]) == (["mmlu"], 5)
    common = read_recipe("eval-commonsense-0shot")
    assert split_tasks(common["tasks"]) == ["arc_easy", "arc_challenge", "boolq", "hellaswag",
                                            "openbookqa", "piqa", "winogrande"]
    assert common["num_fewshot"] == 0
    manager = task_manager(["mmlu", *split_tasks(common["tasks"])], str(letters))
    assert manager.task_index["mmlu"].kind.name == "GROUP"

    one_line_exit_2(capsys, ["--model", "tiny", "--tasks", "letters_mc,mmlx", "--include-path",
                             str(letters)], "unknown task 'mmlx': not a task, group or tag of "
                    f"lm-eval nor in {letters} (did you mean mmlu")
    one_line_exit_2(capsys, ["--model", "tiny", "--tasks", "letters_mc", "--include-path",
                             str(letters / "nope")], "is not a directory")
    code = train(["--steps", "1", "--out", str(tmp_path / "run"), "--eval-tasks", "mmlx",
                  "--eval-include-path", str(letters)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown task 'mmlx'" in err, err
    assert not (tmp_path / "run").exists()


def test_without_lm_eval_one_line_names_the_install_command(monkeypatch, capsys, tmp_path):
    """lm-eval absent: ``python -m falqon_jax.eval`` and ``train --eval-tasks`` say how to
    install the extra (nothing loaded, nothing trained); ``--help`` works."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    one_line_exit_2(capsys, ["--model", "tiny", "--tasks", "mmlu"],
                    "lm-evaluation-harness (the eval extra): pip install")
    from falqon_jax.train.run import main as train

    code = train(["--steps", "1", "--out", str(tmp_path / "run"), "--eval-tasks", "mmlu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "[eval]" in err, err
    assert not (tmp_path / "run").exists()
    blocked = ("import sys, runpy; sys.modules['lm_eval'] = None; "
               "sys.argv = ['falqon_jax.eval', '--help']; "
               "runpy.run_module('falqon_jax.eval', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--tasks" in proc.stdout and "eval-mmlu-5shot" in proc.stdout
