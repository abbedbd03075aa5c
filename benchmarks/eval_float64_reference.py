"""Which float32 forward is nearer the exact log-likelihoods (BENCHMARKS.md, "Evaluation
through lm-evaluation-harness"): the project's or transformers' (what lm-eval's ``hf``
backend runs), both against transformers' forward in float64.

    python benchmarks/eval_float64_reference.py [--model DIR] [--docs 100]

Each of the first ``--docs`` Alpaca responses of ``../shared`` is scored as lm-eval's
``loglikelihood_rolling`` scores a short document: the prefix token (BOS, else EOS), then the
text's tokens, each token's log-probability given all before it, summed in float64. Printed:
per model, the mean, mean absolute and largest absolute difference from float64 per document,
and the mean difference per token. Needs torch (``pip install torch==2.13.0``). Run from the
repository root (``PYTHONPATH=.`` without an installed package).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_data_1k.json"


def score_transformers(model_dir: Path, docs: list[list[int]], dtype: str) -> np.ndarray:
    """Summed log-likelihood of ``docs[i][1:]`` given what precedes, per document."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    sums = []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc])
            logp = torch.log_softmax(model(ids).logits[0].to(torch_dtype), dim=-1)
            picked = logp[torch.arange(len(doc) - 1), ids[0, 1:]]
            sums.append(float(picked.double().sum()))
    return np.asarray(sums)


def score_ours(model_dir: Path, docs: list[list[int]]) -> np.ndarray:
    """The same with ``python -m falqon_jax.eval``'s scorer, ``--method full``, float32."""
    from falqon_jax.eval.scoring import Scorer
    from falqon_jax.sources import load_any

    loaded = load_any(str(model_dir), method="full", rank=64, alpha=16.0, dtype="float32",
                      seed=0, init=None)
    scorer = Scorer(loaded.model.module, loaded.model.params, batch_size=8, progress=False)
    return np.asarray([lp for lp, _ in scorer.loglikelihoods([(d[:1], d[1:]) for d in docs])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="SmolLM2 Hugging Face folder (default: "
                        "converted from ../shared's GGUF into ~/.cache/falqon-jax)")
    parser.add_argument("--docs", type=int, default=100)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from falqon_jax.bench.accuracy import prepare_smollm2

    model_dir = args.model or prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix = tokenizer.bos_token_id
    prefix = tokenizer.eos_token_id if prefix is None else prefix
    records = json.loads(ALPACA.read_text())[:args.docs]
    docs = [[prefix] + tokenizer.encode(r["output"], add_special_tokens=False) for r in records]
    tokens = np.asarray([len(d) - 1 for d in docs])
    exact = score_transformers(model_dir, docs, "float64")
    rows = {"transformers float32": score_transformers(model_dir, docs, "float32"),
            "falqon-jax float32": score_ours(model_dir, docs)}
    print(f"{len(docs)} documents, {tokens.sum()} tokens (at most {tokens.max()} in one)")
    for name, sums in rows.items():
        diff = sums - exact
        print(f"{name} - float64: mean {diff.mean():+.2e}, mean |.| {np.abs(diff).mean():.2e}, "
              f"max |.| {np.abs(diff).max():.2e} nats per document; mean per token "
              f"{(diff / tokens).mean():+.2e}")
    diff = rows["falqon-jax float32"] - rows["transformers float32"]
    print(f"falqon-jax - transformers (float32): max |.| {np.abs(diff).max():.2e} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
