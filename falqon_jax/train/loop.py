"""The training loop of one run (:func:`run_training`): set up the mesh, the model and the
checkpoint store, step to ``--steps`` with logging (``metrics.jsonl``, and ``--report-to``'s
writers: :mod:`~falqon_jax.train.reporting`, closed however the run ends), evaluation and
checkpoints on their schedules, then report. A run ends early in four ways, each a
:class:`RunResult`:

* a non-finite loss -- exit 3, the last good checkpoint kept (:func:`diverged`);
* a stop request (Ctrl-C, SIGTERM, ``--max-time``) -- the step saved (:func:`stopped`);
* Ctrl-C twice -- abort at once, saving only a consistent state (:func:`interrupted`);
* a file of the run that cannot be written -- exit 74 (:func:`not_written`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from tqdm import tqdm

from falqon_jax import sharding
from falqon_jax.model.methods import training_method
from falqon_jax.train import reporting, state_parts
from falqon_jax.train.checkpoints import (
    CheckpointError,
    CheckpointStore,
    QuietWrites,
    complete_steps,
)
from falqon_jax.train.config import TrainConfig, length_buckets
from falqon_jax.train.data import Batch, Tokenized, batch_stream, collate
from falqon_jax.train.outcome import (
    EXIT_CHECKPOINT,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_TIME_LIMIT,
    EXIT_USAGE,
    RunResult,
    UserError,
)
from falqon_jax.train.outdir import truncate_metrics, write_atomically, writing
from falqon_jax.train.prepare import Prepared, gradient_aligned_params, prepare
from falqon_jax.train.samples import report_samples
from falqon_jax.train.stopping import StopRequests
from falqon_jax.train.trainer import Trainer


def run_training(config: TrainConfig, resume: bool, started: float) -> RunResult:
    """Run ``config`` in this process (``--out`` checked, distributed JAX joined): train to
    ``config.steps`` from step 0 or, with ``resume``, from the latest checkpoint."""
    mesh = build_mesh(config)  # before the model: its params are loaded onto the mesh
    run, state = set_up(config, prepare(config, mesh), mesh, resume)
    progress = restored(run, state, resume)
    announce(run, progress.step)
    result = None
    try:
        run.reporter = reporting.open(config, run.out, resume, progress.step,
                                      primary=run.primary)
        result = train(run, progress, resume, started)
        return result
    finally:  # every way out: finished, stopped, diverged, not written, an error
        run.reporter.close(reported_exit_code(result))


def train(run: Run, progress: Progress, resume: bool, started: float) -> RunResult:
    """The run from ``progress`` on: the steps, their logs and checkpoints, then the closing
    report. ``run.reporter`` stays open to the end: a result computed after training is
    logged with ``run.reporter.log(progress.step, {name: value})``."""
    config, mesh = run.config, run.mesh
    stream = batch_stream(run.prep.train, config.batch_size, config.seed, pad_id=run.pad_id,
                          buckets=length_buckets(config), start_step=progress.step)
    # Every process trains and checkpoints (Orbax coordinates the hosts); one writes logs.
    bar = progress_bar(config, progress.step, run.primary)
    stop = StopRequests(config.max_time, started)
    quiet = QuietWrites()
    log = None
    try:
        log = open_log(run, resume, progress.step)
        if run.primary:
            with writing(run.out / "config.json"):
                write_atomically(run.out / "config.json", config.to_json() + "\n")
        run.store.write_frozen(progress.state)  # once per run: nothing when OUT/frozen holds it
        ended = train_steps(run, progress, stream, bar, log, stop)
        if ended is not None:
            return ended
        run.store.wait()  # the final checkpoint is on disk before the run reports success
    except KeyboardInterrupt:  # Ctrl-C twice: abort at once, saving only a consistent state
        bar.close()
        return interrupted(run, progress)
    except CheckpointError as err:
        bar.close()
        return not_written(run, progress, err)
    finally:
        stop.restore()
        with contextlib.suppress(OSError):  # flushed after each line: nothing left to lose
            if log is not None:
                log.close()
        run.store.close()
        quiet.restore()
    bar.close()
    run.prep.model.params = progress.state.params
    report_samples(run.prep, run.prep.model, progress.last_eval, mesh)
    if config.eval_tasks:
        return evaluated(run, progress)
    return RunResult(0, progress.step, progress.last_eval, run.out)


def evaluated(run: Run, progress: Progress) -> RunResult:
    """``--eval-tasks``: the final model, as trained, scored on lm-eval tasks as ``python -m
    falqon_jax.eval`` scores it; the results go to ``OUT/eval/``, a summary line to stdout
    and the metrics to ``--report-to``'s writers (``lm_eval/<task>/<metric>`` at the last
    step). A task that cannot be loaded (e.g. its data set) ends the run with one line and
    exit 2; the trained run is saved either way."""
    from falqon_jax.eval.harness import EvalError, evaluate_trained

    try:
        line, metrics = evaluate_trained(run.prep.model, run.prep.tokenizer, run.config,
                                         run.mesh, run.out, progress.step, run.primary)
    except EvalError as err:
        print(f"error: {err}; the run is saved: score it with python -m falqon_jax.eval "
              f"--model {run.out} --tasks {run.config.eval_tasks}", file=sys.stderr)
        return RunResult(EXIT_USAGE, progress.step, progress.last_eval, run.out)
    run.reporter.log(progress.step, metrics)
    print(line)
    return RunResult(0, progress.step, progress.last_eval, run.out)


# --------------------------------------------------------------------------------------
# Setting up.


def init_distributed(config: TrainConfig) -> None:
    """Join a multi-host job (``--coordinator`` or ``FALQON_DISTRIBUTED=auto``)."""
    if config.coordinator:
        jax.distributed.initialize(coordinator_address=config.coordinator,
                                   num_processes=config.num_processes,
                                   process_id=config.process_id)
    elif os.environ.get("FALQON_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def build_mesh(config: TrainConfig) -> Any:
    """The device mesh of ``--mesh`` (default: every device on ``fsdp``)."""
    try:
        mesh = sharding.parse_mesh(config.mesh)
        sharding.check_batch(mesh, config.batch_size, config.grad_accum)
    except sharding.MeshError as err:
        raise UserError(str(err)) from None
    return mesh


@dataclass
class Run:
    """What the loop works with, set up once by :func:`set_up`."""

    config: TrainConfig
    prep: Prepared
    mesh: Any
    out: Path
    pad_id: int
    primary: bool  # the process that writes logs and prints progress
    trainer: Trainer
    store: CheckpointStore
    rows: Any  # the sharding of a batch's rows over the mesh
    # --report-to's writers (opened once the start step is known; none on other processes)
    reporter: reporting.Reporter = field(default_factory=reporting.Reporter)

    def place(self, batch: Batch) -> list[Any]:
        """A batch's arrays as global arrays, rows split over the mesh."""
        return [sharding.global_batch(self.rows, a) for a in (batch.tokens, batch.mask,
                                                               batch.attention)]

    def meta(self, step: int) -> dict[str, Any]:
        """What a checkpoint of ``step`` records besides the state."""
        return {"identity": self.config.identity(), "step": step, "data_position": step}


@dataclass
class Progress:
    """Where the loop is: the train state after ``step`` steps, the last step saved, the
    last held-out loss and the longest loop iteration so far (step, evaluation, save)."""

    state: Any
    step: int
    saved: int
    last_eval: float | None = None
    longest: float = 0.0  # seconds


def set_up(config: TrainConfig, prep: Prepared, mesh: Any, resume: bool) -> tuple[Run, Any]:
    """``--out`` created; the trainer, its initial state (``A`` gradient-aligned for
    ``--init-a grad`` on a fresh run) and the checkpoint store."""
    model, tok = prep.model, prep.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = Path(config.out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0

    def forward(params, tokens, attention):
        return model.module.apply({"params": params}, tokens, attention)

    if training_method(config).melded and config.init_a == "grad" and not resume:
        model.params = gradient_aligned_params(config, prep, pad_id)
    trainer = Trainer(config, forward, model.trainable(), mesh)
    state = trainer.init_state(model.params)
    rows = sharding.batch_sharding(mesh)
    changing = state_parts.changing_mask(
        state, trainer.mask, writes_w8=state_parts.rule_writes_w8(config.method, config.rule))
    store = CheckpointStore(out, config.keep_checkpoints, changing)
    return Run(config, prep, mesh, out, pad_id, primary, trainer, store, rows), state


def restored(run: Run, state: Any, resume: bool) -> Progress:
    """Step 0 with ``state``, or with ``resume`` the latest checkpoint's step and state."""
    if not resume:
        return Progress(state, step=0, saved=0)
    found = run.store.restore_latest(state)
    if found is None:
        tqdm.write(f"no checkpoint in {run.store.directory} yet: starting from step 0")
        return Progress(state, step=0, saved=0)
    start, state = found
    return Progress(state, step=start, saved=start)


def announce(run: Run, start: int) -> None:
    """One line on what the run trains, on what, where and from which step."""
    config, prep = run.config, run.prep
    source = "built-in demo data" if config.is_demo else config.data
    tqdm.write(
        f"falqon-jax: {config.method} on {config.model} ({source}), "
        f"{len(prep.train)} train / {len(prep.held_out)} held-out examples, "
        f"{prep.truncated} truncated, {prep.dropped} dropped; steps {start}->{config.steps}; "
        f"mesh {dict(run.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); writing to {run.out}")


def progress_bar(config: TrainConfig, start: int, primary: bool) -> tqdm:
    """The step counter on stderr (the primary process only)."""
    return tqdm(total=config.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                disable=not primary,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)


def open_log(run: Run, resume: bool, start: int) -> TextIO:
    """``OUT/metrics.jsonl`` to append to (a resumed run's lines after ``start`` dropped) on
    the primary process; ``os.devnull`` on the others."""
    if not run.primary:
        return open(os.devnull, "w")
    path = run.out / "metrics.jsonl"
    with writing(path):
        if resume:
            truncate_metrics(path, start)
        return path.open("a")


# --------------------------------------------------------------------------------------
# The steps.


def train_steps(run: Run, progress: Progress, stream: Iterator[Batch], bar: tqdm,
                log: TextIO, stop: StopRequests) -> RunResult | None:
    """Train until ``--steps``, logging, evaluating and saving on their schedules; a
    :class:`RunResult` where a non-finite loss or a stop request ends the run first."""
    config = run.config
    while progress.step < config.steps:
        began = time.perf_counter()
        batch = next(stream)
        new_state, metrics = run.trainer.train_step(progress.state, *run.place(batch))
        loss = float(metrics["loss"])
        elapsed = time.perf_counter() - began
        if not math.isfinite(loss):
            bar.close()
            return diverged(run, progress, loss)
        progress.state, progress.step = new_state, progress.step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        record = step_record(run, progress, loss, metrics, elapsed)
        if record is not None:
            with writing(run.out / "metrics.jsonl"):
                log.write(json.dumps(record) + "\n")
                log.flush()
            with writing(run.out):  # OUT/tensorboard, OUT/wandb
                run.reporter.log(progress.step, reporting.scalars(record))
        if due(progress.step, config.save_every, config.steps):
            # written while training goes on
            run.store.save(progress.step, progress.state, run.meta(progress.step))
            progress.saved = progress.step
        progress.longest = max(progress.longest, time.perf_counter() - began)
        if stop.should_stop(progress.step, progress.longest):
            bar.close()
            return stopped(run, progress, stop)
    return None


def due(step: int, every: int, last: int) -> bool:
    """Whether something done every ``every`` steps (and at the last) is due at ``step``."""
    return step % every == 0 or step == last


def step_record(run: Run, progress: Progress, loss: float, metrics: dict[str, Any],
                elapsed: float) -> dict[str, Any] | None:
    """The ``metrics.jsonl`` line of the step just taken, with the held-out loss where an
    evaluation is due (it runs here); ``None`` where neither is due."""
    config, step = run.config, progress.step
    record = None
    if due(step, config.log_every, config.steps):
        record = {"step": step, "loss": loss, "lr": float(metrics["lr"]),
                  "grad_norm": float(metrics["grad_norm"]),
                  "tokens_per_s": float(metrics["tokens"]) / elapsed,
                  "step_time_s": elapsed}
    if due(step, config.eval_every, config.steps):
        progress.last_eval = evaluate(run.trainer, progress.state.params, run.prep.held_out,
                                      config, run.pad_id, run.place)
        if progress.last_eval is not None:
            record = (record or {"step": step}) | {"eval_loss": progress.last_eval}
            tqdm.write(f"step {step}: train loss {loss:.4f}, eval loss {progress.last_eval:.4f}")
    return record


def evaluate(trainer, params, held_out, config: TrainConfig, pad_id: int,
             place) -> float | None:
    """The mean token loss over ``held_out`` (``None`` without held-out examples)."""
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


def _empty_like(example: Tokenized) -> Tokenized:
    """A one-token example that carries no loss (fills an incomplete eval batch)."""
    return Tokenized(example.tokens[:1], np.zeros(1, np.float32), False)


# --------------------------------------------------------------------------------------
# The early exits.


def reported_exit_code(result: RunResult | None) -> int:
    """The exit code the reporters close with (W&B marks a non-zero one failed): the run's,
    1 for an error raised, 0 for a stop that ``--resume`` continues (Ctrl-C, SIGTERM,
    ``--max-time``)."""
    if result is None:
        return 1
    stops = (EXIT_TIME_LIMIT, EXIT_INTERRUPTED, EXIT_TERMINATED)
    return 0 if result.exit_code in stops else result.exit_code


def save_unsaved(run: Run, progress: Progress) -> None:
    """Save the current step unless its checkpoint is saved already."""
    if progress.saved != progress.step:
        run.store.save(progress.step, progress.state, run.meta(progress.step))
        progress.saved = progress.step


def diverged(run: Run, progress: Progress, loss: float) -> RunResult:
    """A non-finite loss: stop without saving; the last good checkpoint stays (exit 3)."""
    print(f"error: non-finite loss ({loss}) at step {progress.step + 1}; stopped. The last "
          f"good checkpoint is in {run.store.directory} (lower --lr or check the data)",
          file=sys.stderr)
    return RunResult(EXIT_DIVERGED, progress.step, progress.last_eval, run.out)


def stopped(run: Run, progress: Progress, stop: StopRequests) -> RunResult:
    """A stop request (Ctrl-C, SIGTERM, ``--max-time``): save the step and exit."""
    save_unsaved(run, progress)
    run.store.wait()
    print(f"{stop.why}: saved step {progress.step} to {run.store.directory}; continue with "
          "--resume", file=sys.stderr)
    return RunResult(stop.exit_code, progress.step, progress.last_eval, run.out)


def interrupted(run: Run, progress: Progress) -> RunResult:
    """Ctrl-C twice: save the state unless the interrupted step consumed it (exit 130)."""
    leaves = jax.tree.leaves(progress.state)
    if not any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
        save_unsaved(run, progress)
        run.store.wait()
        print(f"\ninterrupted: saved step {progress.step} to {run.store.directory}; continue "
              "with --resume", file=sys.stderr)
    else:
        print(f"\ninterrupted mid-step; the last checkpoint in {run.store.directory} is intact",
              file=sys.stderr)
    return RunResult(EXIT_INTERRUPTED, progress.step, progress.last_eval, run.out)


def not_written(run: Run, progress: Progress, err: CheckpointError) -> RunResult:
    """A file of the run could not be written (e.g. a full disk): say what is kept (exit 74)."""
    steps = complete_steps(run.out)
    if (run.out / "config.json").exists():
        kept = f"step {steps[-1]} is the last complete checkpoint" if steps else \
            "no checkpoint is complete yet"
        then = "continue with --resume"
    else:  # nothing of this run was saved: --resume would find no run
        kept, then = "nothing of the run is saved yet", "run the same command again"
    print(f"error: {err}; {kept}: fix that (e.g. free space) and {then}", file=sys.stderr)
    return RunResult(EXIT_CHECKPOINT, progress.step, progress.last_eval, run.out)
