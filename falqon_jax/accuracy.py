"""The ``accuracy`` study of ``python -m falqon_jax.bench``: held-out loss per method.

Every run goes through the training CLI (:func:`falqon_jax.train.main`, in-process), so the
study measures exactly what ``python -m falqon_jax.train`` does:

1. **Pretrain a base.** The ``tiny`` card (:file:`models/tiny.toml`) from random weights,
   ``--method full``, on the training split of ``--data`` with the built-in character
   tokenizer (``--tokenizer char``), seed 0. Every setting is passed explicitly
   (:func:`pretrain_argv`); the run is deterministic for a given JAX build and device.
2. **Export** its last checkpoint as a float32 Hugging Face directory
   (``python -m falqon_jax.export --format hf --dtype float32``).
3. **Fine-tune** that directory with every method and seed for the same steps, rank,
   learning rate and batches (:func:`finetune_argv`), plus FALQON ablations: top-k, the
   buffer reset rule and the initialisation of ``A``.

One held-out set everywhere. ``python -m falqon_jax.train`` draws the held-out examples with
``data.split(examples, eval_size, seed)``, so a different ``--seed`` would also hold out
different examples. The study therefore fixes the split of seed 0 (the base's) and gives
each seed ``s`` its own copy of the data file, reordered so that ``data.split(copy,
eval_size, s)`` returns exactly the same training and held-out examples in the same order
(:func:`write_seed_data`, checked after writing). The seed then changes only what it should:
the adapter initialisation and the order of the training batches.

Runs are kept under ``--out``: a finished run with the same settings is reused, an
interrupted one is resumed (``--resume``), so rerunning the command completes a study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER_METHODS = ("falqon", "lora", "fp8_lora", "qlora", "full")
TARGETS = "q,k,v,o,gate,up,down"
BASE_CARD = "tiny"


class StudyError(ValueError):
    """A bad setting or a failed run; reported in one line."""


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Everything the study needs (see ``python -m falqon_jax.bench accuracy --help``)."""

    data: Path
    out: Path
    methods: tuple[str, ...] = ("falqon", "lora", "fp8_lora", "qlora")
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    ablations: bool = True
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    steps: int = 150
    lr: float = 2e-3
    rank: int = 16
    top_k: int = 10
    batch_size: int = 16
    source_len: int = 64
    target_len: int = 64
    eval_size: int = 100


@dataclasses.dataclass(frozen=True)
class Variant:
    """One fine-tuning setting: a ``--method`` and, for FALQON, top-k / reset / init of A."""

    method: str
    top_k: int | None = None
    reset: str | None = None
    init_a: str | None = None
    ablation: str = ""

    @property
    def name(self) -> str:
        return self.method + (f"-{self.ablation}" if self.ablation else "")

    def keys(self) -> dict[str, Any]:
        """The row keys naming this variant (FALQON's settings only for FALQON)."""
        row: dict[str, Any] = {"method": self.method}
        if self.method == "falqon":
            row |= {"top_k": self.top_k, "reset": self.reset, "init_a": self.init_a}
        if self.ablation:
            row["ablation"] = self.ablation
        return row


def smallest_melded_rows() -> int:
    """The fewest output rows among the base card's adapted projections (``k``/``v``): the
    largest ``--top-k`` the training CLI accepts, i.e. "every row" of those layers."""
    from falqon_jax.config import load_card
    from falqon_jax.llama import linear_shapes

    shapes = linear_shapes(load_card(BASE_CARD))
    return min(shapes[t][0] for t in TARGETS.split(","))


def variants(settings: StudySettings) -> list[Variant]:
    """The methods (FALQON with the paper's settings) followed by FALQON's ablations."""
    main = [
        Variant(m, settings.top_k, "merged", "svd") if m == "falqon" else Variant(m)
        for m in settings.methods
    ]
    if not settings.ablations or "falqon" not in settings.methods:
        return main
    k_all = smallest_melded_rows()
    ks = dict.fromkeys(k for k in (1, 10, settings.rank, k_all) if k != settings.top_k)
    extra = [Variant("falqon", k, "merged", "svd",
                     f"top_k={k}" + (" (=rank)" if k == settings.rank else "")
                     + (" (=all rows of k/v)" if k == k_all else ""))
             for k in ks]
    extra += [
        Variant("falqon", settings.top_k, "all", "svd", "reset=all"),
        Variant("falqon", settings.top_k, "merged", "random", "init_a=random"),
    ]
    return main + extra


# --------------------------------------------------------------------------------------
# Command lines of the runs.


def _common(settings: StudySettings) -> list[str]:
    s = settings
    return [
        "--tokenizer", "char", "--eval-size", str(s.eval_size),
        "--source-len", str(s.source_len), "--target-len", str(s.target_len),
        "--dtype", "float32", "--batch-size", str(s.batch_size), "--grad-accum", "1",
        "--no-remat", "--rank", str(s.rank), "--alpha", "16", "--targets", TARGETS,
        "--weight-decay", "0", "--beta2", "0.999", "--max-grad-norm", "3.0",
        "--keep-checkpoints", "1", "--sample-tokens", "0",
    ]


def pretrain_argv(settings: StudySettings) -> list[str]:
    """``python -m falqon_jax.train`` flags of the base: ``tiny`` from random weights, all
    weights trained (``--method full``), cosine schedule, seed 0."""
    s = settings
    return [
        "--model", BASE_CARD, "--init", "random", "--method", "full",
        "--data", str(s.data), "--seed", "0", *_common(s),
        "--lr", str(s.pretrain_lr), "--schedule", "cosine", "--warmup-ratio", "0.03",
        "--steps", str(s.pretrain_steps), "--eval-every", str(max(1, s.pretrain_steps // 4)),
        "--log-every", "50", "--save-every", str(s.pretrain_steps),
        "--out", str(s.out / "base"),
    ]


def finetune_argv(settings: StudySettings, variant: Variant, seed: int, data: Path,
                  out: Path) -> list[str]:
    """Flags of one fine-tune of the exported base: constant learning rate after 3% warm-up,
    the same for every method."""
    s = settings
    argv = [
        "--model", str(s.out / "base-hf"), "--method", variant.method,
        "--data", str(data), "--seed", str(seed), *_common(s),
        "--lr", str(s.lr), "--schedule", "constant", "--warmup-ratio", "0.03",
        "--steps", str(s.steps), "--eval-every", str(s.steps), "--log-every", "10",
        "--save-every", str(s.steps), "--out", str(out),
    ]
    if variant.method == "falqon":
        argv += ["--top-k", str(variant.top_k), "--reset", str(variant.reset),
                 "--init-a", str(variant.init_a)]
    return argv


# --------------------------------------------------------------------------------------
# The held-out split, identical for every seed.


def _read_records(path: Path) -> tuple[list[Any], bool]:
    """The file's records (JSON values of a list, or raw JSONL lines) and whether it is a
    JSON list."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text), True
    return [line for line in text.splitlines() if line.strip()], False


def write_seed_data(data: Path, eval_size: int, seed: int, directory: Path) -> Path:
    """A copy of ``data`` whose ``data.split(..., eval_size, seed)`` equals the split of
    seed 0 of the original (same train and held-out examples, same order); ``data`` itself
    for seed 0."""
    from falqon_jax import data as data_mod

    if seed == 0:
        return data
    records, is_list = _read_records(data)
    n = len(records)
    canonical = np.random.default_rng(0).permutation(n)  # the order split() uses for seed 0
    order = np.random.default_rng(seed).permutation(n)
    placed: list[Any] = [None] * n
    for position, index in zip(order, canonical, strict=True):
        placed[int(position)] = records[int(index)]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{data.stem}.seed{seed}{data.suffix or '.json'}"
    if is_list:
        path.write_text(json.dumps(placed, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        path.write_text("".join(line + "\n" for line in placed), encoding="utf-8")
    want = data_mod.split(data_mod.read_examples(data), eval_size, 0)
    got = data_mod.split(data_mod.read_examples(path), eval_size, seed)
    if got != want:
        raise StudyError(f"{path}: could not reproduce the seed-0 split of {data} "
                         "(records that read_examples skips?)")
    return path


# --------------------------------------------------------------------------------------
# Running.


def _final_eval(out: Path, steps: int) -> float | None:
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        record = json.loads(line) if line.strip() else {}
        if record.get("step") == steps and "eval_loss" in record:
            return float(record["eval_loss"])
    return None


def _same_config(out: Path, argv: list[str]) -> bool:
    from falqon_jax.train_config import resolve

    saved = out / "config.json"
    if not saved.exists():
        return False
    config, _ = resolve(argv)
    return json.loads(saved.read_text()) == json.loads(config.to_json())


def train_run(argv: list[str], out: Path, steps: int, log: Path) -> tuple[float, float]:
    """Run (or reuse, or resume) one training run; ``(final eval loss, wall seconds)``."""
    from falqon_jax import train

    done = _final_eval(out, steps)
    if done is not None and _same_config(out, argv):
        return done, 0.0
    resume = out.exists() and _same_config(out, argv)
    if out.exists() and any(out.iterdir()) and not resume:
        raise StudyError(f"{out} holds a different run; delete it or choose another --out")
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with log.open("a") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        code = train.main(argv + (["--resume"] if resume else []))
    if code != 0:
        raise StudyError(f"training run {out} failed with exit code {code}; see {log}")
    loss = _final_eval(out, steps)
    if loss is None:
        raise StudyError(f"training run {out} logged no eval loss; see {log}")
    return loss, time.perf_counter() - began


def export_base(settings: StudySettings) -> Path:
    """The base's last checkpoint as a float32 Hugging Face directory (reused if present)."""
    from falqon_jax import export

    target = settings.out / "base-hf"
    if (target / "config.json").exists():
        return target
    log = settings.out / "logs" / "export.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        code = export.main(["--checkpoint", str(settings.out / "base"), "--out", str(target),
                            "--format", "hf", "--dtype", "float32"])
    if code != 0:
        raise StudyError(f"exporting the base failed (exit code {code}); see {log}")
    return target


def summarize(variant: Variant, losses: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """A row: the variant's keys, mean and sample standard deviation (0 for one seed)."""
    return variant.keys() | {
        "eval_loss_mean": statistics.fmean(losses),
        "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "eval_losses": list(losses),
        "seeds": list(seeds),
    }


def run_study(
    settings: StudySettings,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Pretrain, export, fine-tune every variant and seed; one row per variant.

    ``on_row(rows)`` is called after every finished variant (e.g. to rewrite a JSON file).
    """
    s = settings
    unknown = [m for m in s.methods if m not in ADAPTER_METHODS]
    if unknown or not s.methods:
        raise StudyError(f"--methods: choose from {', '.join(ADAPTER_METHODS)}")
    if not s.seeds or not s.data.is_file():
        raise StudyError("--seeds must name at least one seed" if not s.seeds
                         else f"--data {s.data} is not a file")
    s.out.mkdir(parents=True, exist_ok=True)
    logs = s.out / "logs"
    began = time.perf_counter()
    base_loss, base_s = train_run(pretrain_argv(s), s.out / "base", s.pretrain_steps,
                                  logs / "base.log")
    say(f"base: tiny pretrained {s.pretrain_steps} steps (--method full), held-out loss "
        f"{base_loss:.4f} ({base_s:.0f} s)")
    export_base(s)
    common = {"steps": s.steps, "lr": s.lr, "rank": s.rank, "batch_size": s.batch_size,
              "pretrain_steps": s.pretrain_steps, "base_eval_loss": base_loss,
              "date": datetime.date.today().isoformat()}
    rows: list[dict[str, Any]] = []
    for variant in variants(s):
        seeds = s.ablation_seeds if variant.ablation else s.seeds
        losses, wall = [], 0.0
        for seed in seeds:
            data = write_seed_data(s.data, s.eval_size, seed, s.out / "data")
            label = "".join(c for c in variant.name if c.isalnum() or c in "-_")
            out = s.out / "runs" / f"{label}-seed{seed}"
            loss, seconds = train_run(finetune_argv(s, variant, seed, data, out), out,
                                      s.steps, logs / f"{out.name}.log")
            losses.append(loss)
            wall += seconds
            say(f"  {variant.name} seed {seed}: held-out loss {loss:.4f} ({seconds:.0f} s)")
        rows.append(summarize(variant, losses, seeds) | common | {"wall_s": wall})
        if on_row is not None:
            on_row(rows)
    reference = next((r for r in rows if r["method"] == "lora" and "ablation" not in r), None)
    if reference is not None:
        for row in rows:
            row["vs_lora"] = row["eval_loss_mean"] / reference["eval_loss_mean"] - 1.0
    if on_row is not None:
        on_row(rows)
    say(f"study: {time.perf_counter() - began:.0f} s")
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: method, ablation, held-out loss mean +- std, vs LoRA, seeds."""
    lines = [f"{'method':<9} {'ablation':<28} {'eval loss':>17} {'vs lora':>8}  seeds"]
    for r in rows:
        vs = f"{100 * r['vs_lora']:+.2f}%" if "vs_lora" in r else "n/a"
        loss = f"{r['eval_loss_mean']:.4f} ± {r['eval_loss_std']:.4f}"
        seeds = ",".join(map(str, r["seeds"]))
        lines.append(f"{r['method']:<9} {r.get('ablation', '-'):<28} {loss:>17} {vs:>8}  "
                     f"{seeds}")
    return "\n".join(lines)


__all__ = ["StudyError", "StudySettings", "Variant", "finetune_argv", "format_table",
           "pretrain_argv", "run_study", "variants", "write_seed_data"]
