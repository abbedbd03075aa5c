"""The ``accuracy`` study of ``python -m falqon_jax.bench``: held-out loss per method.

Every run goes through the trainer's Python API (:func:`falqon_jax.train.finetune`,
in-process), so the study measures exactly what ``python -m falqon_jax.train`` does:

1. **The base** is a real pretrained model: by default SmolLM2-135M-Instruct, converted
   from the GGUF file in ``../shared/models/smollm2-135m-instruct`` into a cache directory
   (:func:`prepare_smollm2`; ``--model DIR`` takes any Hugging Face LLaMA directory). Its
   own held-out loss is measured with the same pipeline (:func:`base_config`: LoRA, one step
   at a learning rate of 1e-30, i.e. the untouched weights).
2. **Fine-tune** it with every method and seed for the same steps, rank, learning rate and
   batches (:func:`finetune_config`), plus FALQON's other update rules and ablations
   (:func:`variants`).
3. Report per variant: the held-out loss (mean and sample standard deviation over seeds),
   the fraction of LoRA's improvement over the base it recovers, and wall time.

One held-out set everywhere. ``python -m falqon_jax.train`` draws the held-out examples with
``data.split(examples, eval_size, seed)``, so a different ``--seed`` would also hold out
different examples. The study therefore fixes the split of seed 0 and gives each seed ``s``
its own copy of the data file, reordered so that ``data.split(copy, eval_size, s)`` returns
exactly the same training and held-out examples in the same order (:func:`write_seed_data`,
checked after writing). The seed then changes only what it should: the adapter
initialisation and the order of the training batches.

Runs are kept under ``--out``: a finished run with the same settings is reused, an
interrupted one is resumed (``--resume``), so rerunning the command completes a study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from falqon_jax.model.methods import FALQON
from falqon_jax.rules import PAPER as PAPER_RULE
from falqon_jax.rules import REFERENCE, VISIBLE_MERGE
from falqon_jax.train.config import PAPER, TrainConfig

ADAPTER_METHODS = ("falqon", "lora", "fp8_lora", "qlora", "full")
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SHARED = Path(__file__).resolve().parents[3] / "shared"
SMOLLM2_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "model.Q4_1.gguf"
CACHE = Path.home() / ".cache" / "falqon-jax"


class StudyError(ValueError):
    """A bad setting or a failed run; reported in one line."""


# Every run's training settings, the same for every method: the paper's (PAPER) but for
# these; the command line may replace steps, lr, rank, batch_size, source_len, target_len
# and eval_size. FALQON's top-k is StudySettings.top_k: only FALQON's variants set it.
STUDY = dataclasses.replace(
    PAPER, steps=40, lr=2e-3, rank=16, batch_size=8, source_len=48, target_len=64,
    eval_size=100, dtype="float32", grad_accum=1, remat=False, alpha=16.0, targets=TARGETS,
    weight_decay=0.0, beta2=0.999, max_grad_norm=3.0, keep_checkpoints=1, sample_tokens=0,
    schedule="constant", warmup_ratio=0.03)
TRAIN_FLAGS = ("steps", "lr", "rank", "batch_size", "source_len", "target_len", "eval_size")


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Everything the study needs (see ``python -m falqon_jax.bench accuracy --help``)."""

    data: Path
    out: Path
    model: Path | None = None  # None: SmolLM2-135M-Instruct converted into CACHE
    tokenizer: str | None = None  # None: the model directory's own tokenizer
    methods: tuple[str, ...] = ("lora", "fp8_lora", "qlora", "falqon")
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    ablations: bool = True
    top_k: int = 10
    train: TrainConfig = STUDY  # every run's settings (TRAIN_FLAGS from the command line)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One fine-tuning setting: a ``--method`` and, for FALQON, its rule and options."""

    method: str
    falqon: tuple[tuple[str, Any], ...] = ()  # FALQON's TrainConfig settings (name, value)
    ablation: str = ""

    @property
    def name(self) -> str:
        return self.method + (f"-{self.ablation}" if self.ablation else "")

    def keys(self) -> dict[str, Any]:
        """The row keys naming this variant (FALQON's settings only for FALQON)."""
        row: dict[str, Any] = {"method": self.method}
        row |= dict(self.falqon)
        if self.ablation:
            row["ablation"] = self.ablation
        return row


def falqon_variant(settings: StudySettings, ablation: str = "", **options: Any) -> Variant:
    """FALQON with the default rule unless ``options`` (``rule``, ``top_k``, ``reset``,
    ``rounding``, ``init_a``, ``a_scale``, ``a_gain``) say otherwise."""
    values = {"rule": PAPER.rule, "top_k": settings.top_k, "reset": PAPER.reset,
              "rounding": PAPER.rounding, "init_a": PAPER.init_a, "a_scale": PAPER.a_scale,
              "a_gain": PAPER.a_gain} | options
    return Variant(FALQON.name, tuple(sorted(values.items())), ablation)


def variants(settings: StudySettings) -> list[Variant]:
    """The methods (FALQON with its default rule) followed by FALQON's other rules and
    ablations: the paper's rule as published (top-k proxy merges, ``A`` at its natural
    scale), the authors' code, ``visible_merge``, the default rule with the paper's
    natural-scale ``A``, and the paper's rule with stochastic and error-feedback merges."""
    s = settings
    main = [falqon_variant(s) if m == FALQON.name else Variant(m) for m in s.methods]
    if not s.ablations or FALQON.name not in s.methods:
        return main
    paper = {"rule": PAPER_RULE.name, "a_scale": "natural"}
    return main + [
        falqon_variant(s, PAPER_RULE.name, **paper),
        falqon_variant(s, REFERENCE.name, rule=REFERENCE.name, a_scale="natural", reset="all"),
        falqon_variant(s, VISIBLE_MERGE.name, rule=VISIBLE_MERGE.name),
        falqon_variant(s, "natural A", a_scale="natural"),
        falqon_variant(s, "paper+stochastic", **paper, rounding="stochastic"),
        falqon_variant(s, "paper+feedback", **paper, rounding="feedback"),
    ]


# --------------------------------------------------------------------------------------
# The base model.


def prepare_smollm2(cache: Path = CACHE, gguf: Path = SMOLLM2_GGUF) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory in ``cache`` (converted once with
    ``../shared/tools/gguf_llama_to_hf.py``, which needs ``pip install gguf``; the tokenizer
    files are copied beside it). Weights never go into the repository."""
    import shutil

    target = cache / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    tool = SHARED / "tools" / "gguf_llama_to_hf.py"
    if not gguf.is_file() or not tool.is_file():
        raise StudyError(f"{gguf} or {tool} is missing; pass --model DIR (a Hugging Face "
                         "LLaMA directory with its tokenizer)")
    partial = cache / "smollm2-135m-instruct.partial"
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run([sys.executable, str(tool), str(gguf), str(partial)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise StudyError(f"converting {gguf.name} failed: {last} (pip install gguf?)")
    for f in gguf.parent.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, partial / f.name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


# --------------------------------------------------------------------------------------
# The settings of the runs.


def base_config(settings: StudySettings, model: Path, data: Path, out: Path) -> TrainConfig:
    """The base's held-out loss through the same pipeline: LoRA (``B = 0``), one step at a
    learning rate of 1e-30, so the weights it evaluates are the base's."""
    return dataclasses.replace(
        settings.train, model=str(model), tokenizer=settings.tokenizer, method="lora",
        data=str(data), seed=0, lr=1e-30, steps=1, eval_every=1, log_every=1, save_every=1,
        out=str(out))


def finetune_config(settings: StudySettings, model: Path, variant: Variant, seed: int,
                    data: Path, out: Path) -> TrainConfig:
    """One fine-tune: constant learning rate after 3% warm-up, the same for every method;
    FALQON's rule and options from ``variant``."""
    train = settings.train
    return dataclasses.replace(
        train, model=str(model), tokenizer=settings.tokenizer, method=variant.method,
        data=str(data), seed=seed, eval_every=train.steps, log_every=5,
        save_every=train.steps, out=str(out), **dict(variant.falqon))


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
    from falqon_jax.train import data as data_mod

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


def _same_config(out: Path, config: TrainConfig) -> bool:
    saved = out / "config.json"
    return saved.exists() and json.loads(saved.read_text()) == json.loads(config.to_json())


def train_run(config: TrainConfig, log: Path) -> tuple[float, float]:
    """Run (or reuse, or resume) one training run in this process
    (:func:`falqon_jax.train.finetune`); ``(final eval loss, wall seconds)``."""
    from falqon_jax import train

    out, steps = Path(config.out), config.steps
    done = _final_eval(out, steps)
    if done is not None and _same_config(out, config):
        return done, _recorded_wall(out)
    resume = out.exists() and _same_config(out, config)
    if out.exists() and any(out.iterdir()) and not resume:
        raise StudyError(f"{out} holds a different run; delete it or choose another --out")
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with log.open("a") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        try:
            result = train.finetune(config, resume=resume)
        except (train.ConfigError, train.DataError, train.UserError) as err:
            raise StudyError(f"training run {out}: {err}") from None
    if result.exit_code != 0:
        raise StudyError(f"training run {out} failed with exit code {result.exit_code}; "
                         f"see {log}")
    loss = _final_eval(out, steps)
    if loss is None:
        raise StudyError(f"training run {out} logged no eval loss; see {log}")
    seconds = time.perf_counter() - began + (_recorded_wall(out) if resume else 0.0)
    (out / WALL_FILE).write_text(json.dumps({"wall_s": seconds}) + "\n")
    return loss, seconds


WALL_FILE = "study_wall.json"


def _recorded_wall(out: Path) -> float:
    """The wall seconds a finished run took when the study made it (0 if not recorded)."""
    try:
        return float(json.loads((out / WALL_FILE).read_text())["wall_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


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
    """Measure the base, fine-tune every variant and seed; one row per variant.

    ``on_row(rows)`` is called after every finished variant (e.g. to rewrite a JSON file).
    """
    s = settings
    unknown = [m for m in s.methods if m not in ADAPTER_METHODS]
    if unknown or not s.methods:
        raise StudyError(f"--methods: choose from {', '.join(ADAPTER_METHODS)}")
    if not s.seeds or not s.data.is_file():
        raise StudyError("--seeds must name at least one seed" if not s.seeds
                         else f"--data {s.data} is not a file")
    model = s.model if s.model is not None else prepare_smollm2()
    if not (model / "config.json").is_file():
        raise StudyError(f"--model {model} is not a Hugging Face model directory")
    s.out.mkdir(parents=True, exist_ok=True)
    logs = s.out / "logs"
    began = time.perf_counter()
    base_loss, base_s = train_run(base_config(s, model, s.data, s.out / "base"),
                                  logs / "base.log")
    say(f"base: {model.name}, held-out loss {base_loss:.4f} ({base_s:.0f} s)")
    common = {"model": model.name, "steps": s.train.steps, "lr": s.train.lr,
              "rank": s.train.rank, "batch_size": s.train.batch_size,
              "source_len": s.train.source_len, "target_len": s.train.target_len,
              "base_eval_loss": base_loss,
              "date": datetime.date.today().isoformat()}
    rows: list[dict[str, Any]] = []
    for variant in variants(s):
        seeds = s.ablation_seeds if variant.ablation else s.seeds
        losses, wall = [], 0.0
        for seed in seeds:
            data = write_seed_data(s.data, s.train.eval_size, seed, s.out / "data")
            label = "".join(c if c.isalnum() or c in "-_" else "_" for c in variant.name)
            out = s.out / "runs" / f"{label}-seed{seed}"
            loss, seconds = train_run(finetune_config(s, model, variant, seed, data, out),
                                      logs / f"{out.name}.log")
            losses.append(loss)
            wall += seconds
            say(f"  {variant.name} seed {seed}: held-out loss {loss:.4f} ({seconds:.0f} s)")
        rows.append(summarize(variant, losses, seeds) | common | {"wall_s": wall})
        add_relative(rows)
        if on_row is not None:
            on_row(rows)
    say(f"study: {time.perf_counter() - began:.0f} s")
    return rows


def add_relative(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_lora`` (held-out loss relative to LoRA's) and ``recovered`` (the fraction of
    LoRA's improvement over the base, ``(base - loss) / (base - lora)``) to every row, once
    a LoRA row exists."""
    reference = next((r for r in rows if r["method"] == "lora" and "ablation" not in r), None)
    if reference is None:
        return
    lora = reference["eval_loss_mean"]
    for row in rows:
        row["vs_lora"] = row["eval_loss_mean"] / lora - 1.0
        gain = row["base_eval_loss"] - lora
        row["recovered"] = (row["base_eval_loss"] - row["eval_loss_mean"]) / gain \
            if gain > 0 else None


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """A PNG bar chart of held-out loss per variant (mean, seed spread as error bars, the
    base as a line); ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r["method"] + (f"\n{r['ablation']}" if r.get("ablation") else "") for r in rows]
    means = [r["eval_loss_mean"] for r in rows]
    spread = [r["eval_loss_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4.0), dpi=110)
    colors = ["tab:orange" if r["method"] == FALQON.name else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), means, yerr=spread, color=colors, capsize=3)
    base = rows[0]["base_eval_loss"]
    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"base {base:.3f}")
    low = min(means) - 3 * max(spread + [0.005])
    ax.set_ylim(low, base + 0.25 * (base - low))
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("held-out loss (nats / response token)")
    first = rows[0]
    ax.set_title(f"{first['model']}: {first['steps']} steps, rank {first['rank']}, "
                 f"lr {first['lr']:g}, seeds {','.join(map(str, first['seeds']))}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: method, ablation, held-out loss mean +- std, vs LoRA, the
    fraction of LoRA's improvement recovered, wall seconds, seeds."""
    lines = [f"{'method':<9} {'ablation':<18} {'eval loss':>17} {'vs lora':>8} "
             f"{'recovered':>9} {'wall s':>7}  seeds"]
    if rows:
        lines.insert(0, f"base {rows[0]['base_eval_loss']:.4f}")
    for r in rows:
        vs = f"{100 * r['vs_lora']:+.2f}%" if "vs_lora" in r else "n/a"
        rec = f"{100 * r['recovered']:.0f}%" if r.get("recovered") is not None else "n/a"
        loss = f"{r['eval_loss_mean']:.4f} ± {r['eval_loss_std']:.4f}"
        seeds = ",".join(map(str, r["seeds"]))
        lines.append(f"{r['method']:<9} {r.get('ablation', '-'):<18} {loss:>17} {vs:>8} "
                     f"{rec:>9} {r['wall_s']:>7.0f}  {seeds}")
    return "\n".join(lines)


__all__ = ["StudyError", "StudySettings", "Variant", "base_config", "finetune_config",
           "format_table", "plot", "prepare_smollm2", "run_study", "variants",
           "write_seed_data"]
