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

This module is the command line and the settings of a launch (``--resume``, ``--plan``,
the default ``--out``); a run's parts are :mod:`~falqon_jax.train.outdir` (what may be
written to ``--out``), :mod:`~falqon_jax.train.prepare` (data, tokenizer, model),
:mod:`~falqon_jax.train.loop` (the training loop and its exits),
:mod:`~falqon_jax.train.samples` (the closing report) and
:mod:`~falqon_jax.train.outcome` (exit codes, :class:`RunResult`, :class:`UserError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax

from falqon_jax import sharding, targets
from falqon_jax.model.loading import LoadError
from falqon_jax.train import plan, reporting
from falqon_jax.train.checkpoints import CheckpointError
from falqon_jax.train.config import (
    ConfigError,
    TrainConfig,
    build_parser,
    plan_request,
    resolve,
    validate,
)
from falqon_jax.train.data import DataError
from falqon_jax.train.loop import init_distributed, run_training
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
from falqon_jax.train.outdir import check_out_dir, fresh_out
from falqon_jax.train.runs import read_run_config

__all__ = ["EXIT_CHECKPOINT", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
           "EXIT_TIME_LIMIT", "EXIT_USAGE", "RunResult", "UserError", "finetune", "main"]


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
    reporting.check_installed(config.report_to)  # before anything is downloaded or written
    if config.eval_tasks:  # lm-eval installed, the tasks known: one line now, not after training
        from falqon_jax.eval.harness import EvalError, check_train_settings

        try:
            check_train_settings(config)
        except EvalError as err:
            raise ConfigError(str(err)) from None
    if resume:
        config = kept_schedule(config)
    # Every process checks --out before joining: nothing is written before all have joined.
    check_out_dir(config, resume)
    init_distributed(config)
    if jax.process_index() == 0:
        return run_training(config, resume, started)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return run_training(config, resume, started)  # other hosts of a multi-host job: errors only


def main(argv: list[str] | None = None) -> int:
    """``python -m falqon_jax.train [flags]``; returns the exit status (2 for a user mistake,
    reported as one line on stderr; see :class:`RunResult` for the others)."""
    try:
        config, resume = resolve(argv)
        spec = plan_request(argv)
        if spec is not None:
            return run_plan(config, spec)
        args = sys.argv[1:] if argv is None else argv
        if resume:
            config = resumed_config(config, args)
        elif not any(a == "--out" or a.startswith("--out=") for a in args):
            config = dataclasses.replace(config, out=fresh_out(config.out))
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
    """``--plan GPU[:N][,GPU[:N]...]``: compile the step of ``config`` for N compile-only
    GPUs of each kind and print whether it fits, the largest batch and the smallest
    ``--grad-accum`` that do (:mod:`falqon_jax.train.plan`): the detailed report for one
    kind, a table for several; trains nothing, writes nothing."""
    # XLA's notes on fitting a batch (warnings, and an error-level line when the arguments
    # exceed its own aim): read when the CUDA plugin loads, so set before the first compile;
    # "1" is JAX's own default, a user's other setting wins
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        requests = plan.parse_requests(spec)
        targets.use_compile_only()
        plan.architecture(config.model)  # fails fast, one line
    except (targets.TargetError, ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None

    def progress(compiled: plan.Compiled) -> None:
        print(plan.format_compile(compiled), file=sys.stderr, flush=True)

    try:
        reports = plan.plan_targets(config, requests, dict(os.environ), progress=progress)
    except sharding.MeshError as err:
        raise UserError(str(err)) from None
    if len(reports) == 1:
        print(plan.format_report(config, reports[0]))
    else:
        print(plan.format_table(config, reports))
    return 0
