"""One training run: :func:`finetune` (the Python API) and :func:`main` (``python -m
falqon_jax.train``), which fine-tune a LLaMA with FALQON or a baseline.

With no arguments the command runs the built-in demo on the CPU. ``--help`` lists the flags; see
:mod:`falqon_jax.train.config` for defaults and recipes. ``--tokenizer char`` selects the
demo's character tokenizer (:class:`falqon_jax.train.demo_data.CharTokenizer`) for any data.
Mistakes in the input (flags, data, checkpoints, output directory) end with one line on
stderr and exit code 2; a non-finite loss stops the run with exit code 3, keeping the last
good checkpoint; a file of the run that cannot be written (a checkpoint, ``OUT/frozen``,
``config.json`` or ``metrics.jsonl``; e.g. a full disk) stops it with one line and 74.
Ctrl-C (130), SIGTERM (143) and ``--max-time`` (75) finish the current step, save a
checkpoint and exit (:mod:`falqon_jax.train.stopping`); ``--resume`` continues from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from falqon_jax.train.config import (
    ConfigError,
    TrainConfig,
    build_parser,
    length_buckets,
    plan_request,
    resolve,
    validate,
)
from falqon_jax.train.data import DataError
from falqon_jax.train.stopping import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_TIME_LIMIT,
    StopRequests,
)

EXIT_USAGE, EXIT_DIVERGED, EXIT_CHECKPOINT = 2, 3, 74
__all__ = ["EXIT_CHECKPOINT", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
           "EXIT_TIME_LIMIT", "EXIT_USAGE", "RunResult", "UserError", "finetune", "main"]


class UserError(ValueError):
    """A mistake the user can fix; reported as one line without a traceback."""


@dataclass(frozen=True)
class RunResult:
    """How a run ended: ``exit_code`` 0 (finished), 3 (non-finite loss), 74 (a checkpoint
    could not be written), 75 (``--max-time``), 130 (Ctrl-C) or 143 (SIGTERM), the last step
    reached and the last held-out loss (``None`` without held-out data or when no evaluation
    ran)."""

    exit_code: int
    step: int
    eval_loss: float | None
    out: Path


def finetune(config: TrainConfig, *, resume: bool = False) -> RunResult:
    """Fine-tune with ``config`` in this process, exactly as ``python -m falqon_jax.train``
    with the same settings: writes ``config.out`` (``config.json``, ``metrics.jsonl``,
    checkpoints), shows progress on stderr and prints the closing metrics.

    ``resume`` continues from the latest checkpoint in ``config.out`` (from step 0 when the
    run saved none yet). Raises :class:`~falqon_jax.train.config.ConfigError`,
    :class:`~falqon_jax.train.data.DataError` or :class:`UserError` (one-line messages) for
    invalid settings, data, model or output directory; nothing is written before those
    checks pass. Raises :class:`~falqon_jax.train.checkpoints.CheckpointError` when the
    run's frozen weights cannot be read back.
    """
    started = time.monotonic()
    validate(config)
    if resume:
        config = kept_schedule(config)
    # Every process checks --out before joining: nothing is written before all have joined.
    check_out_dir(config, resume)
    init_distributed(config)
    import jax

    if jax.process_index() == 0:
        return _run(config, resume, started)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return _run(config, resume, started)  # other hosts of a multi-host job: errors only


def main(argv: list[str] | None = None) -> int:
    """``python -m falqon_jax.train [flags]``; returns the exit status (2 for a user mistake,
    reported as one line on stderr; see :class:`RunResult` for the others)."""
    from falqon_jax.train.checkpoints import CheckpointError

    try:
        config, resume = resolve(argv)
        plan = plan_request(argv)
        if plan is not None:
            return run_plan(config, plan)
        args = sys.argv[1:] if argv is None else argv
        if resume:
            config = resumed_config(config, args)
        elif not any(a == "--out" or a.startswith("--out=") for a in args):
            config = dataclasses.replace(config, out=_fresh_out(config.out))
        return finetune(config, resume=resume).exit_code
    except (ConfigError, DataError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except KeyboardInterrupt:  # Ctrl-C twice, outside the training loop
        print("\naborted", file=sys.stderr)
        return EXIT_INTERRUPTED


# Settings of one launch rather than of the run: a resumed run takes them from its own flags.
LAUNCH_SETTINGS = ("out", "mesh", "coordinator", "num_processes", "process_id", "max_time")


def resumed_config(config: TrainConfig, argv: list[str]) -> TrainConfig:
    """The settings ``--resume`` continues with: the run's own (``OUT/config.json``), with
    the flags given on the command line on top, so ``--out OUT --resume`` alone continues
    any run. A ``--recipe`` gives every setting itself; without a saved run, ``config``."""
    from falqon_jax.model.loading import LoadError
    from falqon_jax.train.runs import read_run_config

    try:
        saved = read_run_config(Path(config.out))
    except LoadError:
        return config
    given = vars(build_parser().parse_args(argv))
    if "recipe" in given:
        return config
    keys = (given.keys() - {"resume"}) | set(LAUNCH_SETTINGS)
    merged = dataclasses.replace(saved, **{k: getattr(config, k) for k in keys})
    validate(merged)
    return merged


def kept_schedule(config: TrainConfig) -> TrainConfig:
    """``config`` of a resumed run with the learning-rate schedule the run was planned with.

    The warm-up length and the end of the decay follow ``--steps`` when a run starts; a
    resume with another ``--steps`` keeps them (``schedule_steps`` is set to the planned
    horizon and saved with the run), so the steps already planned keep their learning
    rates: a shorter run stops early on the same schedule, and a constant schedule extends
    at its peak. Going past the end of a decaying schedule is refused (its learning rate
    would be 0) unless ``--schedule-steps`` plans it anew. Without a saved run, ``config``.
    """
    from falqon_jax.model.loading import LoadError
    from falqon_jax.train.runs import read_run_config

    try:
        saved = read_run_config(Path(config.out))
    except LoadError:
        return config
    if config.schedule_steps != saved.schedule_steps or config.steps == saved.steps:
        return config  # the horizon was chosen with --schedule-steps, or nothing changed
    planned = saved.planned_steps
    kept = dataclasses.replace(config, schedule_steps=planned)
    if config.steps > planned and config.schedule != "constant":
        raise UserError(
            f"--steps {config.steps} goes past step {planned}, where this run's "
            f"{config.schedule} schedule brings the learning rate to 0; resume with --steps "
            f"{planned} or less, or add --schedule-steps {config.steps} to plan the decay "
            "anew (the steps still to come then get other learning rates)")
    warmup = int(round(config.warmup_ratio * planned))
    after = "at its peak" if config.schedule == "constant" else f"its {config.schedule} decay"
    print(f"--steps {config.steps}: the learning rate keeps the schedule planned for {planned} "
          f"steps ({warmup} warm-up step{'' if warmup == 1 else 's'}, then {after}); "
          "--schedule-steps N plans it anew", file=sys.stderr)
    return kept


def run_plan(config: TrainConfig, spec: str) -> int:
    """``--plan GPU[:N]``: compile the step of ``config`` for N compile-only GPUs and print
    whether it fits (:mod:`falqon_jax.train.plan`); trains nothing, writes nothing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's notes on fitting a batch
    from falqon_jax import sharding, targets
    from falqon_jax.train import plan

    name, _, count = spec.partition(":")
    if count and not (count.isdigit() and int(count) > 0):
        raise UserError(f"--plan {spec}: the device count after ':' must be a positive integer")
    try:
        target = targets.get(name)
        targets.use_compile_only()
        architecture = plan.architecture(config.model)  # noqa: F841 -- fails fast, one line
    except (targets.TargetError, ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None

    def progress(batch: int, peak: int) -> None:
        print(f"  compiled batch {batch}: peak {peak / targets.GIB:.2f} GiB per device",
              file=sys.stderr, flush=True)

    try:
        report = plan.plan(config, target, int(count or 1), dict(os.environ),
                           on_compile=progress)
    except sharding.MeshError as err:
        raise UserError(str(err)) from None
    print(plan.format_report(config, report))
    return 0


def _fresh_out(default: str) -> str:
    """``default``, or ``default-2``, ``-3``, ... if it already holds a run: running the demo
    (or a recipe) twice without ``--out`` starts a new run instead of refusing."""
    from falqon_jax.train.checkpoints import has_checkpoints

    candidate, n = Path(default), 1
    while (candidate / "config.json").exists() or has_checkpoints(candidate):
        n += 1
        candidate = Path(f"{default}-{n}")
    return str(candidate)


# --------------------------------------------------------------------------------------
# Preparing a run.


@dataclass
class Prepared:
    config: TrainConfig
    model: Any
    tokenizer: Any
    train: list
    held_out: list
    held_out_examples: list
    truncated: int
    dropped: int


def check_out_dir(config: TrainConfig, resume: bool) -> None:
    """Refuse to mix runs: nothing in ``--out`` is ever overwritten by a different run.

    ``--resume`` needs a run in ``--out`` with the same identity settings
    (:meth:`TrainConfig.identity`); with no checkpoint saved yet it starts from step 0.
    Without ``--resume``, ``--out`` must hold no run. Each refusal names what works.
    """
    from falqon_jax.train.checkpoints import has_checkpoints
    from falqon_jax.train.runs import read_json

    out = Path(config.out)
    saved = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    holds_run = saved.exists() or has_checkpoints(out)
    previous = read_json(saved) or {}  # missing or unreadable (e.g. cut short): nothing
    # settings added to the identity since the run was saved compare as their defaults
    before = TrainConfig().identity() | previous if previous else {}
    mismatched = [
        f"{k}={before.get(k)!r} (now {v!r})"
        for k, v in config.identity().items() if before.get(k) != v
    ]
    if resume:
        if not holds_run:
            raise UserError(f"--resume: no checkpoint and no run in {out}; start the run with "
                            "the same command without --resume")
        if mismatched:
            raise UserError(
                f"--resume: the checkpoint in {out} is from a different run: "
                + ", ".join(mismatched[:4])
                + f"; continue it with its own settings (python -m falqon_jax.train --out {out}"
                " --resume) or choose another --out"
            )
    elif holds_run and not mismatched:
        raise UserError(f"--out {out} already holds this run; continue it with python -m "
                        f"falqon_jax.train --out {out} --resume, or choose another --out")
    elif holds_run:
        raise UserError(
            f"--out {out} already holds a run with other settings ("
            + ", ".join(mismatched[:4])
            + f"); choose another --out (python -m falqon_jax.train --out {out} --resume "
            "continues that run)"
        )


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new file."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _writing(path: Path):
    """An ``OSError`` inside (a full disk, a read-only file system) becomes a
    :class:`~falqon_jax.train.checkpoints.CheckpointError` naming ``path``: the run stops
    with one line and exit 74, as when a checkpoint cannot be written."""
    from falqon_jax.train.checkpoints import CheckpointError

    try:
        yield
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


CHAR_TOKENIZER = "char"


def uses_char_tokenizer(config: TrainConfig) -> bool:
    """Whether the run uses the built-in character tokenizer (the demo, or ``--tokenizer
    char``): it encodes without ``add_special_tokens`` and decodes without options."""
    return config.is_demo or config.tokenizer == CHAR_TOKENIZER


def load_tokenizer(config: TrainConfig) -> Any:
    """The run's tokenizer: the demo's character tokenizer, or the Hugging Face tokenizer of
    ``--tokenizer`` or ``--model`` (a directory, a Hub name or a card's Hub source)."""
    if uses_char_tokenizer(config):
        from falqon_jax.train.demo_data import CharTokenizer

        return CharTokenizer()
    from falqon_jax.model.resolve import tokenizer_directory, tokenizer_missing

    fix = "pass --tokenizer DIR, a directory or Hugging Face Hub name with the model's tokenizer"
    try:
        source = tokenizer_directory(config.tokenizer_source)
    except ValueError as err:
        first = str(err).splitlines()[0]
        no_files = "has no tokenizer files" in first and not config.tokenizer
        raise UserError(f"{first}; {fix}" if no_files else first) from None
    if source is None:
        raise UserError(
            f"--model {config.model} is a model card without a tokenizer (it names no Hub "
            "source): pass --tokenizer DIR"
        )
    missing = tokenizer_missing(source)
    if missing and config.tokenizer:
        raise UserError(f"--tokenizer {config.tokenizer} {missing}")
    if missing:
        raise UserError(f"--model {config.model} {missing}; {fix}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load a tokenizer from {config.tokenizer_source}: {first}"
                        ) from None


def attention_kernel(config: TrainConfig) -> str:
    """``--attention`` resolved for this process's devices (``UserError`` where the one
    asked for cannot run)."""
    import jax

    from falqon_jax.model.attention import choose

    try:
        return choose(config.attention, jax.devices()[0].platform, config.dtype)
    except ValueError as err:
        raise UserError(str(err)) from None


def load(config: TrainConfig) -> Any:
    from falqon_jax.model.loading import load_model
    from falqon_jax.model.methods import linear_method

    method = linear_method(config)
    attention = attention_kernel(config)
    try:
        return load_model(
            config.model, method=method, rank=config.rank, alpha=config.alpha,
            dtype=config.dtype, targets=config.targets, init=config.init, seed=config.seed,
            remat=config.remat, attention=attention,
        )
    except (ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None


def check_model_limits(config: TrainConfig, model: Any, tokenizer: Any) -> None:
    import jax

    from falqon_jax.melded import is_melded

    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    if vocab > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {vocab} tokens but the model only {model.config.vocab_size}; "
            "pass the checkpoint's own tokenizer with --tokenizer"
        )
    melded = [leaf for leaf in jax.tree.leaves(model.params, is_leaf=is_melded) if is_melded(leaf)]
    if config.method == "falqon" and not melded:
        raise UserError("no layer of this model could be converted to FALQON (dims % 16 != 0)")
    if melded and config.rule in ("paper", "visible_merge"):
        smallest = min(leaf.out for leaf in melded)
        if config.top_k > smallest:
            raise UserError(
                f"--top-k {config.top_k} exceeds the {smallest} rows of the smallest melded "
                "layer; lower --top-k"
            )


def check_model_source(config: TrainConfig) -> None:
    """Fail fast, before the data is read or weights are downloaded, on an unknown card, a
    card without weights, a directory that is not a LLaMA checkpoint, or a Hub name that
    cannot be used (this fetches the Hub model's config and tokenizer files only)."""
    from falqon_jax.model.config import LlamaConfig, load_card
    from falqon_jax.model.resolve import classify, model_directory

    try:
        if classify(config.model) == "card" and config.init == "random":
            load_card(config.model)
        else:
            LlamaConfig.from_hf(model_directory(config.model, weights=False))
    except (ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None


def prepare(config: TrainConfig) -> Prepared:
    from falqon_jax.train import data

    check_model_source(config)

    if config.is_demo:
        from falqon_jax.train.demo_data import make_examples

        train_ex, held_ex = make_examples()
    else:
        examples = data.read_examples(config.data, split=config.data_split,
                                      config=config.data_config)
        train_ex, held_ex = data.split(examples, config.eval_size, config.seed)

    def has_response(example) -> bool:
        if isinstance(example, data.Chat):
            return example.has_response()
        return any(s.trained and s.text.strip() for s in example)

    kept = [e for e in train_ex if has_response(e)]
    held_kept = [e for e in held_ex if has_response(e)]
    dropped = len(train_ex) - len(kept)
    if len(kept) < config.batch_size:
        total, usable = len(train_ex) + len(held_ex), len(kept) + len(held_kept)
        why = []
        if held_ex:
            share = f"all {total}" if not train_ex else f"{len(held_ex)} of its {total}"
            why.append(f"{share} examples are held out for eval loss "
                       f"(--eval-size {config.eval_size})")
        if dropped:
            why.append(f"{dropped} have empty responses")
        because = f": {' and '.join(why)}" if why else ""
        # --eval-size is honoured as given (it is part of a run's identity); name a value
        # that holds out about a tenth and leaves at least one batch to train on.
        if held_ex and usable > config.batch_size:
            fix = (f"pass a smaller --eval-size, e.g. --eval-size "
                   f"{min(max(1, total // 10), usable - config.batch_size)}, or add data")
        else:
            fix = f"lower --batch-size{' and --eval-size' if held_ex else ''} or add data"
        if not kept:
            raise DataError(f"no training examples left in {config.data}{because}; {fix}")
        raise DataError(f"only {len(kept)} training examples in {config.data} for "
                        f"--batch-size {config.batch_size}{because}; {fix}")
    tokenizer = load_tokenizer(config)
    if any(isinstance(e, data.Chat) for e in kept + held_kept) \
            and not data.has_chat_template(tokenizer):
        raise UserError(
            f"{config.data} holds chat records (\"messages\") but the tokenizer "
            f"({config.tokenizer_source}) has no chat template; pass --tokenizer DIR with "
            "one (a chat_template in tokenizer_config.json or chat_template.jinja)")
    model = load(config)
    check_model_limits(config, model, tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) \
            if not uses_char_tokenizer(config) else tokenizer.encode(text)

    lengths = {"source_len": config.source_len, "target_len": config.target_len}
    bos_id = data.leading_bos(tokenizer)

    def tokenize_one(item) -> data.Tokenized:
        if isinstance(item, data.Chat):
            return data.tokenize_rendered(data.render_chat(item, tokenizer), tokenizer, **lengths)
        return data.tokenize_example(item, encode, bos_id=bos_id,
                                     eos_id=tokenizer.eos_token_id, **lengths)

    def tokenize(items):
        out = [tokenize_one(e) for e in items]
        return out, sum(t.truncated for t in out)

    train, truncated = tokenize(kept)
    held_out, _ = tokenize(held_kept)
    return Prepared(config, model, tokenizer, train, held_out, held_kept, truncated, dropped)


# --------------------------------------------------------------------------------------
# The training loop.


def evaluate(trainer, params, held_out, config: TrainConfig, pad_id: int,
             place) -> float | None:
    from falqon_jax.train.data import collate

    if not held_out:
        return None
    total, count = 0.0, 0.0
    for start in range(0, len(held_out), config.batch_size):
        chunk = held_out[start:start + config.batch_size]
        # Pad the last chunk to a full batch (zero-loss rows) so it splits over the mesh.
        chunk = chunk + [_empty_like(chunk[0])] * (config.batch_size - len(chunk))
        batch = collate(chunk, pad_id, length_buckets(config))
        s, n = trainer.eval_step(params, *place(batch))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def build_mesh(config: TrainConfig) -> Any:
    """The device mesh of ``--mesh`` (default: every device on ``fsdp``)."""
    from falqon_jax import sharding

    try:
        mesh = sharding.parse_mesh(config.mesh)
        sharding.check_batch(mesh, config.batch_size, config.grad_accum)
    except sharding.MeshError as err:
        raise UserError(str(err)) from None
    return mesh


def _empty_like(example):
    """A one-token example that carries no loss (fills an incomplete eval batch)."""
    from falqon_jax.train.data import Tokenized

    return Tokenized(example.tokens[:1], np.zeros(1, np.float32), False)


def init_distributed(config: TrainConfig) -> None:
    """Join a multi-host job (``--coordinator`` or ``FALQON_DISTRIBUTED=auto``)."""
    import jax

    if config.coordinator:
        jax.distributed.initialize(coordinator_address=config.coordinator,
                                   num_processes=config.num_processes,
                                   process_id=config.process_id)
    elif os.environ.get("FALQON_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def _run(config: TrainConfig, resume: bool, started: float) -> RunResult:
    mesh = build_mesh(config)
    prep = prepare(config)
    import jax
    from tqdm import tqdm

    from falqon_jax import sharding
    from falqon_jax.train import state_parts
    from falqon_jax.train.checkpoints import (
        CheckpointError,
        CheckpointStore,
        QuietWrites,
        complete_steps,
    )
    from falqon_jax.train.data import batch_stream
    from falqon_jax.train.trainer import Trainer

    model, tok = prep.model, prep.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = Path(config.out)
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    say = tqdm.write

    def forward(params, tokens, attention):
        return model.module.apply({"params": params}, tokens, attention)

    if config.method == "falqon" and config.init_a == "grad" and not resume:
        model.params = gradient_aligned_params(config, prep, pad_id)
    trainer = Trainer(config, forward, model.trainable(), mesh)
    state = trainer.init_state(model.params)
    rows = sharding.batch_sharding(mesh)

    def place(batch):
        return [sharding.global_batch(rows, a) for a in (batch.tokens, batch.mask,
                                                          batch.attention)]

    changing = state_parts.changing_mask(
        state, trainer.mask, writes_w8=state_parts.rule_writes_w8(config.method, config.rule))
    store = CheckpointStore(out, config.keep_checkpoints, changing)
    start = 0
    metrics_path = out / "metrics.jsonl"
    if resume:
        found = store.restore_latest(state)
        if found is None:
            say(f"no checkpoint in {store.directory} yet: starting from step 0")
        else:
            start, state = found
    source = "built-in demo data" if config.is_demo else config.data
    say(f"falqon-jax: {config.method} on {config.model} ({source}), "
        f"{len(prep.train)} train / {len(prep.held_out)} held-out examples, "
        f"{prep.truncated} truncated, {prep.dropped} dropped; steps {start}->{config.steps}; "
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); writing to {out}")

    def meta(step: int) -> dict[str, Any]:
        return {"identity": config.identity(), "step": step, "data_position": step}

    stream = batch_stream(prep.train, config.batch_size, config.seed, pad_id=pad_id,
                          buckets=length_buckets(config), start_step=start)
    # Every process trains and checkpoints (Orbax coordinates the hosts); one writes logs.
    log = open(os.devnull, "w")
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               disable=not primary,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    step = saved = start
    last_eval = None
    longest = 0.0  # the longest loop iteration so far (step, evaluation, save), seconds
    stop = StopRequests(config.max_time, started)
    quiet = QuietWrites()
    try:
        if primary:
            with _writing(metrics_path):
                if resume:
                    _truncate_metrics(metrics_path, start)
                log.close()
                log = metrics_path.open("a")
            with _writing(out / "config.json"):
                _write_atomically(out / "config.json", config.to_json() + "\n")
        store.write_frozen(state)  # once per run: nothing happens when OUT/frozen holds it
        while step < config.steps:
            began = time.perf_counter()
            batch = next(stream)
            new_state, metrics = trainer.train_step(state, *place(batch))
            loss = float(metrics["loss"])
            elapsed = time.perf_counter() - began
            if not math.isfinite(loss):
                bar.close()
                print(f"error: non-finite loss ({loss}) at step {step + 1}; stopped. The last "
                      f"good checkpoint is in {store.directory} (lower --lr or check the data)",
                      file=sys.stderr)
                return RunResult(EXIT_DIVERGED, step, last_eval, out)
            state, step = new_state, step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            record = None
            if step % config.log_every == 0 or step == config.steps:
                record = {"step": step, "loss": loss, "lr": float(metrics["lr"]),
                          "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": float(metrics["tokens"]) / elapsed,
                          "step_time_s": elapsed}
            if step % config.eval_every == 0 or step == config.steps:
                last_eval = evaluate(trainer, state.params, prep.held_out, config, pad_id,
                                     place)
                if last_eval is not None:
                    record = (record or {"step": step}) | {"eval_loss": last_eval}
                    say(f"step {step}: train loss {loss:.4f}, eval loss {last_eval:.4f}")
            if record is not None:
                with _writing(metrics_path):
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if step % config.save_every == 0 or step == config.steps:
                store.save(step, state, meta(step))  # written while training goes on
                saved = step
            longest = max(longest, time.perf_counter() - began)
            if stop.should_stop(step, longest):
                bar.close()
                if saved != step:
                    store.save(step, state, meta(step))
                    saved = step
                store.wait()
                print(f"{stop.why}: saved step {step} to {store.directory}; continue with "
                      "--resume", file=sys.stderr)
                return RunResult(stop.exit_code, step, last_eval, out)
        store.wait()  # the final checkpoint is on disk before the run reports success
    except KeyboardInterrupt:  # Ctrl-C twice: abort at once, saving only a consistent state
        bar.close()
        if not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state)):
            if saved != step:
                store.save(step, state, meta(step))
            store.wait()
            print(f"\ninterrupted: saved step {step} to {store.directory}; continue with "
                  "--resume", file=sys.stderr)
        else:
            print(f"\ninterrupted mid-step; the last checkpoint in {store.directory} is intact",
                  file=sys.stderr)
        return RunResult(EXIT_INTERRUPTED, step, last_eval, out)
    except CheckpointError as err:
        bar.close()
        steps = complete_steps(out)
        if (out / "config.json").exists():
            kept = f"step {steps[-1]} is the last complete checkpoint" if steps else \
                "no checkpoint is complete yet"
            then = "continue with --resume"
        else:  # nothing of this run was saved: --resume would find no run
            kept, then = "nothing of the run is saved yet", "run the same command again"
        print(f"error: {err}; {kept}: fix that (e.g. free space) and {then}", file=sys.stderr)
        return RunResult(EXIT_CHECKPOINT, step, last_eval, out)
    finally:
        stop.restore()
        with contextlib.suppress(OSError):  # flushed after each line: nothing left to lose
            log.close()
        store.close()
        quiet.restore()
    bar.close()
    model.params = state.params
    report_samples(prep, model, last_eval, mesh)
    return RunResult(0, step, last_eval, out)


GRAD_INIT_BATCHES = 4


def gradient_aligned_params(config: TrainConfig, prep: Prepared, pad_id: int) -> Any:
    """``--init-a grad``: the FALQON params with every ``A`` set to the top right singular
    vectors of the dense weight's loss gradient over the first ``GRAD_INIT_BATCHES``
    training batches (:mod:`falqon_jax.train.grad_init`)."""
    import jax.numpy as jnp

    from falqon_jax import melded
    from falqon_jax.model.loading import load_model
    from falqon_jax.train import grad_init
    from falqon_jax.train.data import batch_stream
    from falqon_jax.train.trainer import token_loss_sum

    try:
        dense = load_model(config.model, method="full", dtype=config.dtype,
                           targets=config.targets, init=config.init, seed=config.seed,
                           attention=attention_kernel(config))
    except (ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    stream = batch_stream(prep.train, config.batch_size, config.seed, pad_id=pad_id,
                          buckets=length_buckets(config))
    batches = [next(stream) for _ in range(GRAD_INIT_BATCHES)]

    def forward(params, tokens, attention):
        return dense.module.apply({"params": params}, tokens, attention)

    grads = grad_init.dense_gradients(
        forward, dense.params,
        [(jnp.asarray(b.tokens), jnp.asarray(b.mask), jnp.asarray(b.attention)) for b in batches],
        token_loss_sum)

    def norm(in_features: int, rank: int) -> float | None:
        if config.a_scale != "lora":
            return 1.0  # orthonormal rows, as the SVD gives them
        return config.a_gain * melded.lora_row_norm(in_features, rank, config.alpha)

    return grad_init.realign(prep.model.params, dense.params, grads, norm)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a resumed run logs them again) and a last line cut
    short by a crash."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    _write_atomically(path, "".join(ln + "\n" for ln in kept))


def report_samples(prep: Prepared, model: Any, eval_loss: float | None,
                   mesh: Any = None) -> None:
    """Print the final held-out metrics and a sample generation."""
    from falqon_jax.model.generation import generate

    config, tok = prep.config, prep.tokenizer
    if eval_loss is not None:
        print(f"held-out loss: {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f})")
    if not prep.held_out_examples or config.sample_tokens == 0:
        return
    cases = prep.held_out_examples[: 64 if config.is_demo else 1]

    prompts = [prompt_tokens(ex, tok, config)[: config.source_len] for ex in cases]
    outs = generate(model.module, model.params, prompts, config.sample_tokens,
                    eos_id=tok.eos_token_id, pad_id=0, mesh=mesh)
    texts = [tok.decode(o, skip_special_tokens=True) if not uses_char_tokenizer(config)
             else tok.decode(o) for o in outs]
    if config.is_demo:
        want = ["".join(s.text for s in ex if s.trained) for ex in cases]
        exact = np.mean([t.strip() == w for t, w in zip(texts, want, strict=True)])
        print(f"held-out exact match: {exact:.0%} of {len(cases)} prompts (greedy)")
    print(f"sample: {prompt_text(cases[0], tok)!r} -> {texts[0]!r}")


def prompt_text(example: Any, tokenizer: Any) -> str:
    """The text a sample generation starts from: a chat rendered up to its first assistant
    reply (the template's generation prompt included), else the untrained text."""
    from falqon_jax.train import data

    if isinstance(example, data.Chat):
        segments = data.render_chat(example, tokenizer)
        first = next(i for i, s in enumerate(segments) if s.trained)
        return "".join(s.text for s in segments[:first])
    return "".join(s.text for s in example if not s.trained)


def prompt_tokens(example: Any, tokenizer: Any, config: TrainConfig) -> list[int]:
    """Token ids of :func:`prompt_text`, encoded as in training: a chat exactly as its
    template renders it, other formats with a BOS in front where the tokenizer adds one
    (:func:`falqon_jax.train.data.leading_bos`)."""
    from falqon_jax.train import data

    text = prompt_text(example, tokenizer)
    ids = tokenizer.encode(text) if uses_char_tokenizer(config) \
        else tokenizer.encode(text, add_special_tokens=False)
    bos = data.leading_bos(tokenizer)
    if isinstance(example, data.Chat) or bos is None:
        return ids
    return [bos] + ids

