"""Training configuration: defaults (the paper's, or the built-in demo's), recipes and flags.

Precedence, lowest first: defaults < ``--recipe FILE.toml`` (or a shipped recipe by name)
< command-line flags. With no ``--model``, ``--data`` or ``--recipe`` the defaults are the
demo's (the ``tiny`` card on the built-in data set), so ``python -m falqon_jax.train --steps
30`` runs 30 steps of the demo. Otherwise they follow the FALQON paper's LLaMA-7B setup, and
the model must be named: ``--data`` alone is refused rather than fine-tuning (and
downloading) a model the user did not ask for. A recipe's values are checked like the same
flags on the command line (a string is parsed as the flag would parse it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from falqon_jax import packaged, rules
from falqon_jax.cli import OneLineParser
from falqon_jax.model.methods import A_SCALES, DEFAULT_A_GAIN, DEFAULT_A_SCALE
from falqon_jax.train import reporting
from falqon_jax.train.stopping import parse_duration

METHODS = ("falqon", "lora", "fp8_lora", "qlora", "full")
DEMO_DATA = "demo"


class ConfigError(ValueError):
    """Invalid configuration; the message is one line saying what to change."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run (written to ``OUT/config.json``)."""

    model: str = "llama-7b"
    data: str = ""
    data_split: str = "train"
    data_config: str | None = None
    tokenizer: str | None = None
    method: str = "falqon"
    rank: int = 64
    alpha: float = 16.0
    rule: str = rules.DEFAULT_RULE
    top_k: int = 10
    reset: str = "merged"
    rounding: str = "nearest"
    init_a: str = "svd"
    a_scale: str = DEFAULT_A_SCALE
    a_gain: float = DEFAULT_A_GAIN
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    lr: float = 2e-3
    schedule: str = "constant"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    beta2: float = 0.999
    max_grad_norm: float = 3.0
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1875
    schedule_steps: int | None = None  # the learning-rate schedule's horizon; None: steps
    source_len: int = 16
    target_len: int = 512
    eval_size: int = 100
    seed: int = 0
    dtype: str = "bfloat16"
    remat: bool = True
    attention: str = "auto"  # see falqon_jax.model.attention.choose
    init: str | None = None
    out: str = "runs/falqon"
    save_every: int = 500
    eval_every: int = 250
    log_every: int = 10
    report_to: tuple[str, ...] = ()  # see falqon_jax.train.reporting; not in identity()
    keep_checkpoints: int = 3
    max_time: float | None = None  # seconds; see falqon_jax.train.stopping
    sample_tokens: int = 32
    # --eval-tasks: lm-eval tasks the final model is scored on (not part of the run's
    # identity: a resumed run may add or change them)
    eval_tasks: str = ""  # comma-separated lm-eval task names; "" for none
    eval_fewshot: int | None = None  # None: each task's own
    eval_limit: float | None = None  # examples per task (a fraction below 1); None: all
    eval_include_path: str | None = None  # a folder of the user's own task YAML files
    mesh: str = ""
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0

    @property
    def is_demo(self) -> bool:
        return self.data == DEMO_DATA

    @property
    def planned_steps(self) -> int:
        """The steps the learning-rate schedule is planned over: warm-up is
        ``round(warmup_ratio * planned_steps)`` steps and the decay ends at
        ``planned_steps`` (``--schedule-steps``, else ``--steps``)."""
        return self.schedule_steps or self.steps

    @property
    def tokenizer_source(self) -> str:
        """Where the run's Hugging Face tokenizer comes from: ``--tokenizer``, else
        ``--model`` (a directory, a Hub name, or a card whose Hub ``source`` has one; see
        :func:`falqon_jax.model.resolve.tokenizer_directory`)."""
        return self.tokenizer or self.model

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run it continues."""
        keys = ("model", "method", "rank", "alpha", "rule", "top_k", "reset", "rounding",
                "init_a", "a_scale", "a_gain", "targets",
                "dtype", "data", "data_split", "data_config", "seed", "batch_size",
                "grad_accum", "source_len", "target_len", "eval_size")
        return {k: _jsonable(getattr(self, k)) for k in keys}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


PAPER = TrainConfig()
DEMO = dataclasses.replace(
    PAPER,
    model="tiny",
    data=DEMO_DATA,
    init="random",
    rank=16,
    lr=2e-2,
    batch_size=16,
    steps=1000,
    source_len=32,
    target_len=32,
    eval_size=10,
    dtype="float32",
    remat=False,
    targets=("q", "k", "v", "o", "gate", "up", "down", "lm_head"),
    out="runs/demo",
    save_every=500,
    eval_every=250,
    log_every=50,
    sample_tokens=26,
)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m falqon_jax.train",
        description="Fine-tune a LLaMA with FALQON (or a baseline). With no arguments: the "
        "built-in CPU demo. Flags override the defaults one by one: the demo's, or the "
        "paper's (LLaMA-7B on Alpaca) once --model or --recipe is given; where the two "
        "differ, each flag's help shows both ('demo X, paper Y').",
        argument_default=argparse.SUPPRESS,
    )
    for add_flags in (_source_flags, _method_flags, _optimizer_flags, _run_flags, _eval_flags):
        add_flags(p.add_argument)
    _show_defaults(p)
    return p


def _source_flags(add: Callable[..., Any]) -> None:
    """What to fine-tune, on what: recipe, model, data, tokenizer."""
    add("--recipe", help="TOML file of settings (keys are flag names with underscores), or "
        "the name of a recipe shipped with the package, e.g. llama-7b-alpaca-falqon (the "
        "paper's runs and a small SmolLM2 run; a wrong name lists them all)")
    add("--model", help="Hugging Face checkpoint: a local directory, a Hub name (org/name or "
        "org/name@revision, downloaded into the Hugging Face cache) or a model card ("
        f"{', '.join(packaged.names(packaged.cards_dir()))}: its Hub source's weights, or "
        "with --init random its architecture)")
    add("--data", help="data set: a Hub name (org/name[@revision]), a local JSON / JSONL / "
        f"Parquet / Arrow file or data set directory, or '{DEMO_DATA}'; records in Alpaca, "
        "Guanaco text, chat messages or prompt/completion format")
    add("--data-split", help="split of a data set")
    add("--data-config", help="configuration (subset) of a data set that has several")
    add("--tokenizer", help="tokenizer: a directory or Hub name (default: the model's)")


def _method_flags(add: Callable[..., Any]) -> None:
    """The method, the adapter and FALQON's rule and ``A``."""
    add("--method", choices=METHODS, help="falqon (LoRA melded into an FP8 backbone), lora "
        "(bf16 LoRA), fp8_lora (FP8 backbone, GEMMs quantized on the fly), qlora (NF4 "
        "backbone), full (full fine-tuning)")
    add("--rank", type=int, help="adapter rank")
    add("--alpha", type=float, help="LoRA alpha (the adapter's scale is alpha / rank)")
    add("--rule", choices=tuple(rules.RULES), help="FALQON update rule: " + ", ".join(
        f"{rule.name} ({rule.summary})" for rule in rules.RULES.values()))
    add("--top-k", type=int, help="FALQON rows merged per matrix per step (rules paper, "
        "visible_merge)")
    add("--reset", choices=rules.RESETS, help="FALQON paper rule: buffer reset after a merge")
    add("--rounding", choices=rules.ROUNDINGS, help="FALQON merges: nearest, stochastic, or "
        "feedback (the rounding residual goes back into the proxy buffer)")
    add("--init-a", choices=("svd", "random", "grad"), help="FALQON's A: svd (of the FP8 "
        "quantization error, the paper), random, or grad (top singular vectors of each "
        "weight's loss gradient on the first training batches)")
    add("--a-scale", choices=A_SCALES, help="FALQON's A row norm: lora (PEFT "
        "LoRA's, times alpha/rank) or natural (the paper's sqrt(S) V^T)")
    add("--a-gain", type=float, help="FALQON: multiply the lora row norm of A (with a live b "
        "and Adam, the same as multiplying b's learning rate)")
    add("--targets", help="comma-separated layers to adapt: q,k,v,o,gate,up,down[,lm_head]")


def _optimizer_flags(add: Callable[..., Any]) -> None:
    """The optimizer, the batches and the steps."""
    add("--lr", type=float, help="peak learning rate")
    add("--schedule", choices=("constant", "cosine", "linear"), help="learning rate after "
        "warm-up: constant, or decaying to 0 at the schedule's last step")
    add("--warmup-ratio", type=float, help="fraction of the schedule's steps of linear "
        "warm-up from 0")
    add("--weight-decay", type=float, help="AdamW weight decay")
    add("--beta2", type=float, help="AdamW beta2")
    add("--max-grad-norm", type=float, help="global-norm gradient clipping (0: none)")
    add("--batch-size", type=int, help="examples per optimizer step")
    add("--grad-accum", type=int, help="micro-batches per step; batch-size must divide by it")
    add("--steps", type=int, help="optimizer steps to train to")
    add("--schedule-steps", type=int, help="steps the warm-up and decay are planned over "
        "(default: --steps; a resumed run keeps the one it started with)")
    add("--source-len", type=int, help="max prompt tokens")
    add("--target-len", type=int, help="max response tokens")
    add("--eval-size", type=int, help="held-out examples for eval loss")
    add("--seed", type=int, help="seed of the data order, the held-out split, random "
        "weights and adapter initialisation")
    add("--dtype", choices=("bfloat16", "float32"), help="compute dtype")
    add("--remat", action=argparse.BooleanOptionalAction, help="gradient checkpointing")


def _run_flags(add: Callable[..., Any]) -> None:
    """How the run executes: kernels, output, checkpoints, devices, resume, plan."""
    add("--attention", choices=("auto", "cudnn", "xla"), help="attention kernel: cudnn "
        "(fused flash attention, NVIDIA GPUs, bfloat16), xla (any device), or auto (cudnn "
        "where it runs)")
    add("--init", choices=("random",), help="random weights (for a card without a "
        "checkpoint; without it, the model's own)")
    add("--out", help="output directory: metrics.jsonl, config.json, checkpoints/")
    add("--save-every", type=int, help="checkpoint every N steps (and at the end)")
    add("--eval-every", type=int, help="eval loss every N steps (and at the end)")
    add("--log-every", type=int, help="write a metrics line every N steps")
    add("--report-to", type=_reporters, metavar="NAMES", help="also log "
        "the metrics to these, comma-separated: tensorboard (OUT/tensorboard; needs the "
        "tensorboard extra), wandb (OUT/wandb, offline unless WANDB_API_KEY is set; needs "
        "the wandb extra)")
    add("--keep-checkpoints", type=int, help="how many recent checkpoints to keep")
    add("--max-time", type=_duration, help="save and exit (status 75) before this much time "
        "has passed, e.g. a scheduler's time limit minus a margin: seconds, 45m, 3.5h, "
        "H:MM:SS or D-HH:MM:SS")
    add("--sample-tokens", type=int, help="tokens generated for the final sample")
    add("--mesh", help="device mesh, e.g. data=2,fsdp=4 (default: all devices on fsdp)")
    add("--coordinator", help="multi-host: address:port of process 0 (jax.distributed); "
        "or set FALQON_DISTRIBUTED=auto to let JAX detect the cluster (SLURM, ...)")
    add("--num-processes", type=int, help="multi-host: number of processes (hosts)")
    add("--process-id", type=int, help="multi-host: this process's index")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add("--plan", metavar="GPU[:N][,GPU[:N]...]", help="do not train: compile this "
        "command's train step for N GPUs (default 1) of a kind -- h100, h200, a100, l4 -- "
        "without one, and print the peak memory per device, whether it fits, the largest batch "
        "that does and the smallest --grad-accum that fits --batch-size; several kinds "
        "(h100,h200,h100:8) give one table row each (needs the "
        f"h100 extra: {packaged.install_command('h100')}; no weights are loaded, --data may "
        "be left out)")


def _eval_flags(add: Callable[..., Any]) -> None:
    """Scoring the final model on lm-evaluation-harness tasks (the eval extra)."""
    add("--eval-tasks", help="at the end, score the final model on these comma-separated "
        "lm-eval tasks (e.g. mmlu, or arc_easy,arc_challenge) as python -m falqon_jax.eval "
        "does; results in OUT/eval/ (needs the eval extra: "
        f"{packaged.install_command('eval')})")
    add("--eval-fewshot", type=int, help="few-shot examples for --eval-tasks (default: "
        "each task's own)")
    add("--eval-limit", type=float, help="at most this many examples per --eval-tasks task "
        "(a fraction below 1: that share); for quick checks")
    add("--eval-include-path", help="folder of your own lm-eval task YAML files for "
        "--eval-tasks")


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each setting's default to its help: ``(default: X)``, or ``(default: demo X,
    paper Y)`` where the demo's and the paper's differ."""
    def shown(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(value) or "none"
        return "none" if value is None or value == "" else str(value)

    for action in parser._actions:
        if action.dest not in _FIELDS or action.help is None:
            continue
        demo, paper = getattr(DEMO, action.dest), getattr(PAPER, action.dest)
        if action.dest in ("model", "data") or demo == paper is None or demo == paper == "":
            continue
        text = shown(paper) if demo == paper else f"demo {shown(demo)}, paper {shown(paper)}"
        action.help = f"{action.help} (default: {text})".replace("%", "%%")


def _reporters(text: str) -> tuple[str, ...]:
    try:
        return reporting.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def resolve(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    """Parse flags into a validated :class:`TrainConfig` and the ``--resume`` flag."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    resume = bool(args.pop("resume", False))
    plan = args.pop("plan", None)
    recipe = args.pop("recipe", None)
    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(_read_recipe(recipe))
    values.update(args)
    demo_data = values.get("data", DEMO_DATA) == DEMO_DATA
    base = DEMO if "model" not in values and demo_data and recipe is None else PAPER
    if base is PAPER and "model" not in values:
        where = f"recipe {recipe} names no model: add model = ..." if recipe else \
            f"--data {values['data']} needs --model"
        raise ConfigError(f"{where} (a card such as llama-7b, a local checkpoint directory "
                          "or a Hub name org/name); with neither --model nor --data the "
                          "command runs the built-in demo")
    if "targets" in values and isinstance(values["targets"], str):
        values["targets"] = tuple(t.strip() for t in values["targets"].split(",") if t.strip())
    elif "targets" in values:
        values["targets"] = tuple(values["targets"])
    config = dataclasses.replace(base, **values)
    validate(config, need_data=plan is None)
    return config, resume


def length_buckets(config: TrainConfig) -> tuple[int, int]:
    """Padded batch lengths: powers of two from 64 up to the longest possible example."""
    longest = -(-(config.source_len + config.target_len) // 16) * 16
    return min(64, longest), longest


def plan_request(argv: list[str] | None) -> str | None:
    """The ``--plan GPU[:N]`` of a command line, or ``None``."""
    return vars(build_parser().parse_args(argv)).get("plan")


def recipe_file(path: str) -> Path:
    """The recipe ``--recipe path`` names: a TOML file, else a recipe shipped with the
    package by its name (``llama-7b-alpaca-falqon``, ``train/llama-7b-alpaca-falqon.toml``
    from any directory). Raises :class:`ConfigError` listing the shipped recipes."""
    file = Path(path)
    if file.is_file():
        return file
    shipped = packaged.recipes_dir() / f"{file.name.removesuffix('.toml')}.toml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe {path} does not exist; pass a TOML file or a shipped recipe: "
                      f"{', '.join(packaged.names(packaged.recipes_dir())) or 'none'}")


def _read_recipe(path: str) -> dict[str, Any]:
    file = recipe_file(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {path} is not valid TOML: {err}") from None
    actions = {a.dest: a for a in build_parser()._actions}
    if "tasks" in raw and "data" not in raw:
        raise ConfigError(f"recipe {path} is an evaluation recipe: run it with python -m "
                          f"falqon_jax.eval --model MODEL --recipe {path}, or score a run's "
                          "final model with --eval-tasks")
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _FIELDS or name == "resume" or name not in actions:
            raise ConfigError(f"recipe {path}: unknown setting '{key}'")
        values[name] = _recipe_value(path, key, value, actions[name])
    return values


_KINDS = {int: "an integer", float: "a number", _duration: "a duration (seconds, 45m, 3.5h)",
          _reporters: f"none or a comma list of {', '.join(reporting.REPORTERS)}"}


def _recipe_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` of recipe setting ``key`` checked like its flag: a string goes through the
    flag's own parsing (``rank = "64"`` is ``--rank 64``), other values must have the flag's
    type, and choices are the flag's."""
    flag = action.option_strings[0]

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"recipe {path}: {key} = {value!r} is not valid for {flag}; "
                           f"expected {expected}")

    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if action.dest == "targets":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if not isinstance(value, str):
            raise wrong("a list of layer names or a comma-separated string")
        return value
    if action.dest == "report_to" and isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise wrong(_KINDS[_reporters])
        value = ",".join(value) or "none"
    convert = action.type
    if isinstance(value, str):
        if convert is not None:
            try:
                value = convert(value)
            except (ValueError, argparse.ArgumentTypeError):
                raise wrong(_KINDS.get(convert, "a valid value")) from None
    elif convert is None or isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong(_KINDS.get(convert, "a string"))
    elif convert is int and not isinstance(value, int):
        raise wrong("an integer")
    else:
        value = convert(value) if convert in (int, float) else float(value)
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


def validate(c: TrainConfig, *, need_data: bool = True) -> None:
    """Range checks that need no model; model-dependent checks happen after loading.
    ``need_data=False`` (``--plan``) accepts a configuration without ``--data``."""
    positive = ("rank", "top_k", "batch_size", "grad_accum", "steps", "source_len", "target_len",
                "save_every", "eval_every", "log_every", "keep_checkpoints")
    for name in positive:
        value = getattr(c, name)
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if c.schedule_steps is not None and c.schedule_steps <= 0:
        raise ConfigError(f"--schedule-steps must be positive, got {c.schedule_steps}")
    if c.a_gain <= 0:
        raise ConfigError(f"--a-gain must be positive, got {c.a_gain}")
    if c.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {c.lr}")
    if not 0 <= c.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {c.warmup_ratio}")
    if c.max_grad_norm < 0 or c.weight_decay < 0 or not 0 < c.beta2 < 1:
        raise ConfigError("--max-grad-norm and --weight-decay must be >= 0, --beta2 in (0, 1)")
    if c.max_time is not None and not (isinstance(c.max_time, int | float) and c.max_time > 0):
        raise ConfigError(f"--max-time must be a positive number of seconds, got {c.max_time!r}")
    if c.eval_size < 0 or c.sample_tokens < 0:
        raise ConfigError("--eval-size and --sample-tokens must be >= 0")
    if c.eval_fewshot is not None and c.eval_fewshot < 0:
        raise ConfigError(f"--eval-fewshot must be >= 0, got {c.eval_fewshot}")
    if c.eval_limit is not None and not c.eval_limit > 0:
        raise ConfigError(f"--eval-limit must be positive, got {c.eval_limit}")
    if c.batch_size % c.grad_accum:
        raise ConfigError(
            f"--batch-size {c.batch_size} must be divisible by --grad-accum {c.grad_accum}"
        )
    known = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}
    unknown = set(c.targets) - known
    if unknown or not c.targets:
        raise ConfigError(f"--targets must name layers from {sorted(known)}, got {list(c.targets)}")
    if not c.data and need_data:
        raise ConfigError("--data is required with --model: pass an instruction data set (a "
                          "file, a directory or a Hugging Face Hub name)")
    try:
        reporting.check_names(c.report_to)
    except ValueError as err:
        raise ConfigError(f"--report-to: {err}") from None
    if not c.data_split:
        raise ConfigError("--data-split must name a split, e.g. train")
