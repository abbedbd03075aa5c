"""A run's metrics in TensorBoard and Weights & Biases: ``--report-to tensorboard,wandb``.

``OUT/metrics.jsonl`` is always written; ``--report-to`` (Hugging Face's name: ``none`` by
default, a comma list, ``report_to`` in a recipe) adds the same scalars, at the same steps,
through each tool's own writer:

* ``tensorboard`` -- tensorboardX's ``SummaryWriter`` into ``OUT/tensorboard/`` (view with
  ``tensorboard --logdir OUT/tensorboard``);
* ``wandb`` -- a W&B run in ``OUT/wandb/``: offline unless ``WANDB_API_KEY`` is set (then
  online) or ``WANDB_MODE`` says otherwise; ``wandb sync OUT/wandb/offline-run-*`` uploads
  an offline run later. Project ``WANDB_PROJECT`` (default ``falqon-jax``), name
  ``WANDB_NAME`` (default the name of ``--out``), config the run's settings.

Each writer is an optional extra (:data:`EXTRAS`); :func:`check_installed` names the pip
command before anything else happens. The loop calls :func:`open` once it knows the step it
starts from, :meth:`Reporter.log` with each ``metrics.jsonl`` line's scalars
(:func:`scalars`) and :meth:`Reporter.close` on every way out. Only the primary process
(process 0) writes; on the others the reporter does nothing.

A resumed run (``--resume``) appends to the same places without repeating a step: TensorBoard
hides the events of the steps after the checkpoint it resumes from (``purge_step``), which
are logged again, as in ``metrics.jsonl``; W&B continues the same run (its id is kept in
``OUT/wandb/falqon-jax.json``) and, since a W&B history only grows, keeps the values it has
for the steps it already got and takes the ones after. ``--report-to`` is not part of a
run's identity: a resumed run keeps the run's reporters unless the flag is given again, and
may add or drop one.

Anything else with scalars to show -- e.g. evaluation results at the end of a run -- calls
``reporter.log(step, {name: value})`` with names of its own (``lm_eval/hellaswag/acc``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import secrets
import string
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from falqon_jax import packaged
from falqon_jax.train.outcome import UserError

REPORTERS = ("tensorboard", "wandb")
# the module each reporter writes with, and the extra that installs it (one per writer:
# wandb brings a service binary, pydantic and OpenTelemetry that a TensorBoard user has no
# use for; tensorboardX is small)
MODULES = {"tensorboard": "tensorboardX", "wandb": "wandb"}
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_STATE = "falqon-jax.json"  # in OUT/wandb: the run id and the last step W&B got


def parse(text: str) -> tuple[str, ...]:
    """``--report-to``'s value: ``none`` (or empty) is no reporter, else a comma list of
    :data:`REPORTERS`. Raises ``ValueError`` with a one-line message."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names in ([], ["none"]):
        return ()
    return check_names(names)


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each a known reporter once. Raises ``ValueError``."""
    if isinstance(names, str):
        raise ValueError(f"report_to must be a tuple of reporter names, got {names!r}")
    names = tuple(names)
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"unknown reporter {unknown[0]!r}: use none or a comma list of "
                         f"{', '.join(REPORTERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a reporter is named twice: {','.join(names)}")
    return names


def check_installed(names: Iterable[str]) -> None:
    """Raise :class:`UserError` (one line with the pip command) unless every reporter in
    ``names`` can be imported. Called before the run downloads or trains anything."""
    missing = []
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            missing.append(name)
    if missing:
        needs = ", ".join(MODULES[n] for n in missing)
        extras = ",".join(EXTRAS[n] for n in missing)
        raise UserError(f"--report-to {','.join(missing)} needs {needs}: "
                        f"{packaged.install_command(extras)}")


# metrics.jsonl's keys -> the names the reporters show (grouped as train/... and eval/...)
_NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
          "tokens_per_s": "train/tokens_per_s", "step_time_s": "train/step_time_s",
          "eval_loss": "eval/loss"}


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of a ``metrics.jsonl`` line under the names the reporters show:
    ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``,
    ``train/step_time_s``, ``eval/loss`` (another key ``k``: ``train/k``); ``step`` is
    the step they are logged at, not a scalar."""
    return {_NAMES.get(k, f"train/{k}"): float(v) for k, v in record.items() if k != "step"}


class Reporter:
    """The writers of one launch of a run. :meth:`log` and :meth:`close` go to each;
    a reporter without writers (``--report-to none``, a process other than 0) does
    nothing."""

    def __init__(self, writers: Iterable[Any] = ()) -> None:
        self.writers = list(writers)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``values`` (``{name: number}``) at ``step`` to every writer."""
        if values:
            for writer in self.writers:
                writer.log(step, {k: float(v) for k, v in values.items()})

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every writer (W&B marks the run failed for a non-zero
        ``exit_code``); later calls do nothing. A writer that fails to close is named in one
        ``note:`` line on stderr: the run's own outcome stands."""
        writers, self.writers = self.writers, []
        for writer in writers:
            try:
                writer.close(exit_code)
            except Exception as err:
                print(f"note: could not close {writer.name}: {err}", file=sys.stderr)


def open(config: Any, out: Path, resume: bool, start_step: int, *,
         primary: bool = True) -> Reporter:
    """The reporters of ``config.report_to`` for a launch of the run in ``out`` that starts
    after ``start_step`` (``resume``: continuing the run's earlier launches). A process
    other than the primary gets one that does nothing. Raises :class:`UserError` when a
    writer cannot start (e.g. W&B online without a valid key)."""
    names = tuple(getattr(config, "report_to", ()))
    if not primary or not names:
        return Reporter()
    check_installed(names)
    writers: list[Any] = []
    try:
        for name in names:
            make = _TensorBoard if name == "tensorboard" else _WandB
            writers.append(make(config, Path(out), resume, start_step))
    except BaseException:
        Reporter(writers).close(1)  # those opened already
        raise
    return Reporter(writers)


class _TensorBoard:
    """tensorboardX's ``SummaryWriter`` into ``OUT/tensorboard``, flushed after each log (as
    ``metrics.jsonl`` is). A resumed launch writes a new event file whose ``purge_step``
    hides, in TensorBoard, the earlier events after the step it resumes from."""

    name = "the TensorBoard writer"

    def __init__(self, config: Any, out: Path, resume: bool, start_step: int) -> None:
        from tensorboardX import SummaryWriter

        # events.out.tfevents.<seconds>.<host><suffix>: two launches within one second
        # would share a name (and the second truncate the first) without the suffix
        self.writer = SummaryWriter(logdir=str(out / TENSORBOARD_DIR),
                                    purge_step=start_step + 1 if resume else None,
                                    filename_suffix=f".{time.time_ns()}")

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, exit_code: int) -> None:
        self.writer.close()


class _WandB:
    """A W&B run in ``OUT/wandb``, quiet on the console (``silent``, output not captured).
    ``OUT/wandb/falqon-jax.json`` keeps its id and the last step it got, so a resumed launch
    continues the same run and skips the steps it already has."""

    name = "the W&B run"

    def __init__(self, config: Any, out: Path, resume: bool, start_step: int) -> None:
        import wandb

        self.state = out / WANDB_DIR / WANDB_STATE
        saved = _read_state(self.state) if resume else None
        self.run_id = saved["id"] if saved else _new_run_id()
        self.logged = saved["step"] if saved else 0  # steps up to this one W&B has
        if "WANDB_MODE" in os.environ:
            mode = None  # wandb reads it
        else:
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        (out / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = None
        try:
            self.run = wandb.init(
                mode=mode, dir=str(out), id=self.run_id,
                resume="allow" if saved else None,
                reinit="create_new",  # a run of the caller's own (finetune in one) goes on
                project=os.environ.get("WANDB_PROJECT") or "falqon-jax",
                name=os.environ.get("WANDB_NAME") or out.resolve().name,
                settings=wandb.Settings(silent=True, console="off"))
            # after init, as Hugging Face does: a resumed run's changed settings (--steps)
            # replace the old values instead of failing
            self.run.config.update(_settings(config), allow_val_change=True)
        except Exception as err:
            with contextlib.suppress(Exception):
                if self.run is not None:
                    self.run.finish(exit_code=1)
                _teardown(wandb)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"--report-to wandb: W&B could not start the run: {first}"
                            ) from None
        self.wandb, self.top = wandb, 0  # top: the last step this launch logged
        self._save_state()

    def log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.logged:
            return  # an earlier launch of the run logged this step
        self.run.log(values, step=step)
        self.top = max(self.top, step)
        self._save_state()

    def close(self, exit_code: int) -> None:
        try:
            self.run.finish(exit_code=exit_code)
        finally:
            _teardown(self.wandb)

    def _save_state(self) -> None:
        state = {"id": self.run_id, "step": max(self.logged, self.top)}
        partial = self.state.with_name(self.state.name + ".partial")
        partial.write_text(json.dumps(state) + "\n", encoding="utf-8")
        os.replace(partial, self.state)


def _new_run_id() -> str:
    """A W&B run id as W&B makes them: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_state(path: Path) -> dict[str, Any] | None:
    """``{"id": ..., "step": ...}`` of an earlier launch's W&B run, or ``None``."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(state, dict) and isinstance(state.get("id"), str)
            and isinstance(state.get("step"), int)):
        return None
    return state


def _settings(config: Any) -> dict[str, Any]:
    """The run's settings as ``config.json`` holds them."""
    return json.loads(json.dumps(dataclasses.asdict(config))) \
        if dataclasses.is_dataclass(config) else dict(config)


def _teardown(wandb: Any) -> None:
    """End W&B's service process now (not only when Python exits), unless the process has
    another W&B run of its own going (``finetune`` called inside one)."""
    if wandb.run is None:
        wandb.teardown()
