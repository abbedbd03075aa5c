"""Evaluation with lm-evaluation-harness on SmolLM2-135M-Instruct (BENCHMARKS.md, "Evaluation
through lm-evaluation-harness"): parity with the harness's own ``hf`` backend, then how far the
FP8 FALQON model moves the scores.

    python benchmarks/eval_smollm2.py [--model DIR] [--docs 200] [--out eval-smollm2.json]

No Hub data set is reachable here, so the tasks are local lm-eval YAML tasks over JSON Lines
files this script writes (``dataset_path: json``), built from ``../shared``'s 1,000 Alpaca
examples and a few hand-written facts:

* ``alpaca_mc`` -- which of four responses answers the instruction (the right one and three
  taken from other examples; the first sentence of each, at most 160 characters);
  ``acc`` / ``acc_norm``, like ARC or HellaSwag;
* ``facts_mc`` -- 24 general-knowledge questions with 3-4 one-word choices;
* ``alpaca_gen`` -- the first 40 instructions, greedy, up to 32 tokens, stop at a blank line;
* ``alpaca_text`` -- word perplexity of the first ``--docs`` responses
  (``loglikelihood_rolling``).

Models: the GGUF in ``../shared`` converted to a Hugging Face folder (``--model``, default the
copy in ``~/.cache/falqon-jax``), scored by ``python -m falqon_jax.eval``'s code as

* ``hf f32`` -- lm-eval's ``hf`` backend (transformers, float32, CPU): the reference;
* ``full f32`` -- the project's forward, ``--method full``, float32;
* ``full bf16`` -- the same in bfloat16 (the project's default compute dtype);
* ``falqon bf16`` -- ``--method falqon``: a fresh conversion (FP8 E4M3 melded ``[W; A]``,
  ``A`` from the SVD of the quantization error, ``b = 0``), FP8 activations, bf16 compute.

Printed: per pair of models, the per-request log-likelihood differences, how often the
chosen answer and the generated text agree, and each model's metrics. Run from the
repository root (``PYTHONPATH=.`` without an installed package).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
ALPACA = SHARED / "data" / "alpaca_data_1k.json"
TASKS = ("alpaca_mc", "facts_mc", "alpaca_gen", "alpaca_text")

FACTS = [
    ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("The capital of Japan is", ["Beijing", "Tokyo", "Seoul", "Bangkok"], 1),
    ("The capital of Italy is", ["Milan", "Venice", "Rome", "Naples"], 2),
    ("The capital of Germany is", ["Berlin", "Munich", "Hamburg", "Vienna"], 0),
    ("The largest planet in the solar system is", ["Mars", "Earth", "Jupiter", "Venus"], 2),
    ("Water is made of hydrogen and", ["oxygen", "carbon", "nitrogen", "helium"], 0),
    ("The chemical symbol for gold is", ["Ag", "Au", "Gd", "Go"], 1),
    ("A triangle has three", ["sides", "wheels", "colours", "minutes"], 0),
    ("The opposite of hot is", ["warm", "cold", "wet", "loud"], 1),
    ("Two plus two equals", ["three", "four", "five", "six"], 1),
    ("Ten times ten equals", ["one hundred", "twenty", "one thousand", "ten"], 0),
    ("A week has seven", ["days", "hours", "months", "years"], 0),
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
    ("Ice is water in its", ["solid", "liquid", "gaseous", "plasma"], 0),
    ("The primary language of Brazil is", ["Spanish", "Portuguese", "French", "English"], 1),
    ("Bees make", ["honey", "milk", "silk", "wool"], 0),
    ("The author of Romeo and Juliet is", ["Dickens", "Shakespeare", "Austen", "Tolstoy"], 1),
    ("The freezing point of water in Celsius is", ["zero", "ten", "fifty", "one hundred"], 0),
    ("The fastest land animal is the", ["cheetah", "turtle", "elephant", "cow"], 0),
    ("Plants take in carbon dioxide and give off", ["oxygen", "helium", "smoke", "salt"], 0),
    ("The Earth orbits the", ["Sun", "Moon", "Mars", "comet"], 0),
    ("A baby dog is called a", ["puppy", "kitten", "calf", "foal"], 0),
    ("The number of continents on Earth is", ["seven", "three", "twelve"], 0),
    ("The colour of a clear daytime sky is", ["blue", "green", "red"], 0),
]


def first_sentence(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    for end in (". ", "! ", "? "):
        if end in text:
            text = text[: text.index(end) + 1]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0]
    return text


def prompt(record: dict[str, str]) -> str:
    extra = f"\n{record['input']}" if record["input"] else ""
    return f"Instruction: {record['instruction']}{extra}\nResponse:"


def write_tasks(folder: Path, docs: int) -> Path:
    """The four local tasks (see the module docstring) as YAML + JSON Lines in ``folder``."""
    import yaml

    records = json.loads(ALPACA.read_text())
    rng = np.random.default_rng(0)
    mc = []
    for i, r in enumerate(records[:docs]):
        others = rng.choice([j for j in range(len(records)) if j != i], 3, replace=False)
        choices = [first_sentence(records[j]["output"]) for j in others]
        answer = int(rng.integers(0, 4))
        choices.insert(answer, first_sentence(r["output"]))
        mc.append({"question": prompt(r), "choices": choices, "answer": answer})
    facts = [{"question": q, "choices": c, "answer": a} for q, c, a in FACTS]
    gen = [{"question": prompt(r), "answer": first_sentence(r["output"])} for r in records[:40]]
    text = [{"text": r["output"]} for r in records[:docs]]

    def task(name: str, rows: list[dict], **config: Any) -> None:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        spec = {"task": name, "dataset_path": "json",
                "dataset_kwargs": {"data_files": str(data)}, "test_split": "train", **config}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    choice = dict(output_type="multiple_choice", doc_to_text="{{question}}",
                  doc_to_choice="{{choices}}", doc_to_target="answer",
                  metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    task("alpaca_mc", mc, **choice)
    task("facts_mc", facts, **choice)
    task("alpaca_gen", gen, output_type="generate_until", doc_to_text="{{question}}",
         doc_to_target="answer", generation_kwargs={"until": ["\n\n"], "max_gen_toks": 32},
         metric_list=[{"metric": "exact_match"}])
    task("alpaca_text", text, output_type="loglikelihood_rolling", doc_to_text="",
         doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}])
    return folder


def score_ours(model_dir: Path, method: str, dtype: str, folder: Path, manager: Any,
               batch_size: int) -> dict:
    import jax

    from falqon_jax.eval.harness import Settings, evaluate
    from falqon_jax.generate import load_tokenizer
    from falqon_jax.sources import load_any

    loaded = load_any(model_dir, method=method, dtype=dtype)
    settings = Settings(tasks=TASKS, include_path=str(folder), batch_size=batch_size,
                        log_samples=True, bootstrap_iters=0)
    with jax.default_matmul_precision("highest"):
        return evaluate(loaded.model.module, loaded.model.params, load_tokenizer(loaded, None),
                        settings, manager=manager)


def score_hf(model_dir: Path, manager: Any, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size)
    return lm_eval.simple_evaluate(model=hf, tasks=list(TASKS), task_manager=manager,
                                   log_samples=True, bootstrap_iters=0)


def responses(results: dict) -> dict[tuple[str, int, int], Any]:
    """Every request's response: (log-likelihood, greedy) pairs, rolling log-likelihoods,
    generated texts; keyed by (task, doc, request)."""
    out = {}
    for task, samples in results["samples"].items():
        for s in samples:
            for k, resp in enumerate(s["resps"]):
                value = resp[0]
                out[task, s["doc_id"], k] = value[0] if isinstance(value, list | tuple) else value
    return out


def scored_tokens(results: dict, tokenizer: Any) -> dict[tuple[str, int, int], int]:
    """How many tokens each log-likelihood request scores: a continuation's (encoded with
    its context, as the hf backend splits them), or a whole text's."""
    out = {}
    for task, samples in results["samples"].items():
        for s in samples:
            for k, args in enumerate(s["arguments"]):
                if len(args) == 1:  # loglikelihood_rolling: the text, from the prefix token
                    out[task, s["doc_id"], k] = len(tokenizer.encode(args[0]))
                elif isinstance(args[1], str):
                    context, continuation = args
                    whole = len(tokenizer.encode(context + continuation))
                    out[task, s["doc_id"], k] = whole - len(tokenizer.encode(context.rstrip()))
    return out


def compare(a: dict, b: dict, tokens: dict[tuple[str, int, int], int]) -> dict[str, Any]:
    """Per-request differences ``a - b`` (also per scored token) and how often the two
    agree."""
    ra, rb = responses(a), responses(b)
    out: dict[str, Any] = {}
    for task in TASKS:
        keys = sorted(k for k in rb if k[0] == task)
        if task == "alpaca_gen":
            out[task] = {"requests": len(keys),
                         "same_text": float(np.mean([ra[k] == rb[k] for k in keys]))}
            continue
        diff = np.array([ra[k] - rb[k] for k in keys], np.float64)
        count = np.array([tokens[k] for k in keys], np.float64)
        row = {"requests": len(keys), "tokens": int(count.sum()),
               "mean_diff": float(diff.mean()),
               "mean_abs_diff": float(np.abs(diff).mean()),
               "max_abs_diff": float(np.abs(diff).max()),
               "mean_abs_diff_per_token": float(np.abs(diff).sum() / count.sum()),
               "max_abs_diff_per_token": float(np.max(np.abs(diff) / count))}
        if task.endswith("_mc"):
            by_doc: dict[int, list] = {}
            for k in keys:
                by_doc.setdefault(k[1], []).append(k)
            row["same_choice"] = float(np.mean([
                np.argmax([ra[k] for k in ks]) == np.argmax([rb[k] for k in ks])
                for ks in by_doc.values()]))
        out[task] = row
    return out


def metrics(results: dict) -> dict[str, float]:
    out = {}
    for task in TASKS:
        for key, value in results["results"][task].items():
            if "," in key and "stderr" not in key and isinstance(value, float):
                out[f"{task} {key.split(',')[0]}"] = value
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("jax", "jaxlib", "flax", "lm_eval", "transformers", "torch", "numpy")
    return {n: version(n) for n in names} | {"python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="SmolLM2 Hugging Face folder (default: "
                        "converted from ../shared's GGUF into ~/.cache/falqon-jax)")
    parser.add_argument("--docs", type=int, default=200, help="alpaca_mc and alpaca_text "
                        "documents (default 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write everything measured as JSON here")
    args = parser.parse_args(argv)

    import lm_eval.evaluator

    from falqon_jax.bench.accuracy import prepare_smollm2
    from falqon_jax.eval.harness import task_manager

    lm_eval.evaluator.add_env_info = lambda results: None  # torch's collect_env: not needed
    model_dir = args.model or prepare_smollm2()
    folder = write_tasks(Path(tempfile.mkdtemp(prefix="eval-smollm2-")), args.docs)
    manager = task_manager(TASKS, str(folder))
    docs = {"alpaca_mc": args.docs, "facts_mc": len(FACTS), "alpaca_text": args.docs}
    runs = {}
    for name, run in (("hf f32", lambda: score_hf(model_dir, manager, args.batch_size)),
                      ("full f32", lambda: score_ours(model_dir, "full", "float32", folder,
                                                      manager, args.batch_size)),
                      ("full bf16", lambda: score_ours(model_dir, "full", "bfloat16", folder,
                                                       manager, args.batch_size)),
                      ("falqon bf16", lambda: score_ours(model_dir, "falqon", "bfloat16",
                                                         folder, manager, args.batch_size))):
        print(f"== {name}", file=sys.stderr, flush=True)
        runs[name] = json.loads(json.dumps(run(), default=str))
    from transformers import AutoTokenizer

    tokens = scored_tokens(runs["hf f32"], AutoTokenizer.from_pretrained(model_dir))
    pairs = [("full f32", "hf f32"), ("full bf16", "full f32"), ("falqon bf16", "full bf16"),
             ("falqon bf16", "full f32")]
    report = {"date": datetime.date.today().isoformat(), "versions": versions(),
              "device": f"CPU ({platform.processor() or platform.machine()})",
              "docs": docs, "metrics": {n: metrics(r) for n, r in runs.items()},
              "differences": {f"{a} - {b}": compare(runs[a], runs[b], tokens)
                              for a, b in pairs}}
    print(json.dumps(report, indent=2))
    if args.out:  # with every request and response of each model
        everything = report | {"samples": {n: r["samples"] for n, r in runs.items()}}
        args.out.write_text(json.dumps(everything, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
