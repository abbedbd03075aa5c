"""Orbax checkpoints of a training run.

Layout of ``OUT``:

* ``frozen/`` -- written once per run: the frozen part of the train state
  (:mod:`falqon_jax.train.state_parts`: FP8 backbone, ``A``, norms, embeddings) and its
  fingerprint (:mod:`falqon_jax.train.fingerprint`).
* ``checkpoints/<step>/`` -- one per save: ``state`` (the changing part: trainable params,
  optimizer state, step) and ``meta`` (JSON: the run's identity settings, the step and data
  position, the fingerprints of the changing part and of the frozen part it goes with).
* ``damaged/<step>/`` -- checkpoints that could not be restored, set aside, never deleted.

:meth:`CheckpointStore.restore_latest` (``--resume``) and :func:`read_checkpoint` (reading a
run back: ``generate``, ``export``, :func:`falqon_jax.restore`) prove what they restore
against both fingerprints (:func:`fingerprint_mismatch`).

Saves are asynchronous: :meth:`CheckpointStore.save` returns once the arrays are copied off
the devices, and the files are written while training goes on; the next save, :meth:`wait`
and :meth:`close` wait for it. Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a crash mid-write leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from falqon_jax.cli import quiet_logger
from falqon_jax.train import state_parts
from falqon_jax.train.fingerprint import fingerprint

FORMAT = 2  # 1: the whole train state in every checkpoint (no "format" key in meta)
FROZEN, CHECKPOINTS, DAMAGED = "frozen", "checkpoints", "damaged"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message is one line."""


def _reason(err: BaseException) -> str:
    """One line saying what went wrong: the operating system's error where TensorStore
    names one (e.g. "No space left on device"), else the first line of the message."""
    text = str(err).strip()
    os_error = re.search(r"os_error_code='?(\d+)", text)
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno)
    if os_error:
        return os.strerror(int(os_error.group(1)))
    first = text.splitlines()[0] if text else type(err).__name__
    first = first.split(". See full TensorStore details")[0]
    return first if len(first) <= 160 else first[:157] + "..."


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def fingerprint_mismatch(tree: Any, wanted: str | None) -> str | None:
    """Why ``tree`` is not the tree saved with fingerprint ``wanted`` (one line), or
    ``None`` when it is, bit for bit."""
    got = fingerprint(tree)
    if got == wanted:
        return None
    return f"its arrays differ from their fingerprint ({got} != {wanted})"


def _read_state(directory: Path, target: Any) -> Any:
    """The ``state`` item of the checkpoint in ``directory`` (``OUT/checkpoints/STEP`` or
    ``OUT/frozen``), restored onto ``target`` (its structure, dtypes and shardings)."""
    reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    return reader.restore(directory, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target))).state


def _all_processes_agree(ok: bool) -> bool:
    """``ok`` on every process of a multi-host job (each reads only its own shards)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class CheckpointStore:
    """Save/restore train states under ``out``, keeping the newest ``keep`` checkpoints.

    ``changing`` is a bool tree shaped like the train state
    (:func:`falqon_jax.train.state_parts.changing_mask`): what each step's checkpoint holds.
    """

    def __init__(self, out: str | Path, keep: int, changing: Any) -> None:
        self.out = Path(out).resolve()
        self.directory = self.out / CHECKPOINTS
        self.frozen_dir = self.out / FROZEN
        self.changing = changing
        self.frozen = state_parts.invert(changing)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._frozen_writer: Any = None
        self._frozen_fingerprint: str | None = None
        self._pending: int | None = None  # the step being written in the background
        self._frozen_checked = False

    # ----------------------------------------------------------------------------------
    # Writing.

    def write_frozen(self, state: Any) -> None:
        """Make ``OUT/frozen`` hold the frozen part of ``state`` (asynchronously), unless it
        already holds exactly these arrays (a resumed run, or one restarted from step 0).
        Call it before the first :meth:`save`, with the state training starts from."""
        frozen = state_parts.select(state, self.frozen)
        self._frozen_fingerprint = fingerprint(frozen)
        if self._frozen_fingerprint is None or self._frozen_on_disk() == self._frozen_fingerprint:
            return
        meta = {"format": FORMAT, "fingerprint": self._frozen_fingerprint}
        writer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
        try:
            writer.save(self.frozen_dir, args=ocp.args.Composite(
                state=ocp.args.StandardSave(frozen), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as err:
            raise CheckpointError(f"cannot write {self.frozen_dir}: {_reason(err)}") from None
        self._frozen_writer = writer

    def _frozen_on_disk(self) -> str | None:
        try:
            return json.loads((self.frozen_dir / "meta" / "metadata").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing the checkpoint of ``step``: returns once the arrays are copied off
        the devices (``state`` may then be donated); :meth:`wait` waits for the files.

        The first save checks that the frozen part of ``state`` is still bit for bit the
        one written (a rule that changed more than the changing part would be caught here).

        Raises :class:`CheckpointError` when this or the previous save failed (e.g. a full
        disk); the checkpoints completed before are intact.
        """
        self._finish_frozen()
        if not self._frozen_checked:  # once per run: steps have changed what they change
            frozen_now = fingerprint(state_parts.select(state, self.frozen))
            if frozen_now != self._frozen_fingerprint:
                raise CheckpointError(
                    f"the frozen part of the train state changed during training (fingerprint "
                    f"{frozen_now}, written {self._frozen_fingerprint}); its checkpoints would "
                    "not restore it")
            self._frozen_checked = True
        changing = state_parts.select(state, self.changing)
        meta = meta | {"format": FORMAT, "fingerprint": fingerprint(changing),
                       "frozen_fingerprint": self._frozen_fingerprint}
        args = ocp.args.Composite(state=ocp.args.StandardSave(changing),
                                  meta=ocp.args.JsonSave(meta))
        self._finish_pending()  # Orbax would wait for it too; this names the step that failed
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as err:
            raise CheckpointError(
                f"cannot write checkpoint {step} to {self.directory}: {_reason(err)}") from None
        self._pending = step

    def _finish_pending(self) -> None:
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise CheckpointError(
                f"cannot write checkpoint {step} to {self.directory}: {_reason(err)}") from None

    def _finish_frozen(self) -> None:
        if self._frozen_writer is None:
            return
        try:
            self._frozen_writer.wait_until_finished()
        except Exception as err:
            raise CheckpointError(f"cannot write {self.frozen_dir}: {_reason(err)}") from None
        finally:
            self._frozen_writer.close()
            self._frozen_writer = None

    def wait(self) -> None:
        """Wait until every save started is on disk (raises :class:`CheckpointError`)."""
        self._finish_frozen()
        self._finish_pending()

    def close(self) -> None:
        """Wait for pending saves and release the store (errors are reported by
        :meth:`wait`; here they are dropped)."""
        try:
            self.wait()
        except CheckpointError:
            pass
        self.manager.close()

    # ----------------------------------------------------------------------------------
    # Reading.

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore_latest(self, like: Any) -> tuple[int, Any] | None:
        """``(step, state)`` of the newest checkpoint that restores intact, onto the
        structure, dtypes and shardings of ``like``; ``None`` when there is none.

        A checkpoint that cannot be restored (truncated or corrupted files, a fingerprint
        that does not match) is moved to ``OUT/damaged/`` with one line on stderr, and the
        one before it is tried. Raises :class:`CheckpointError` when the frozen part
        (``OUT/frozen``) is damaged and cannot be derived again from the model.
        """
        for step in reversed(self.manager.all_steps()):
            why = "unreadable on another process"
            try:  # each process reads its own shards: all must succeed
                meta = self.read_meta(step)
                restored = self._restore_changing(step, meta, like)
                ok = True
            except Exception as err:  # whatever Orbax or TensorStore raise for bad files
                meta, restored, ok, why = {}, None, False, _reason(err)
            if not _all_processes_agree(ok):
                self._set_aside(step, why)
                continue
            if "format" not in meta:  # a checkpoint of the whole state
                return step, restored
            why = fingerprint_mismatch(restored, meta.get("fingerprint"))
            if why is not None:
                self._set_aside(step, why)
                continue
            frozen = self._frozen_part(meta.get("frozen_fingerprint"), like)
            return step, state_parts.fill(state_parts.fill(like, self.changing, restored),
                                          self.frozen, frozen)
        return None

    def _restore_changing(self, step: int, meta: dict[str, Any], like: Any) -> Any:
        """The state a checkpoint holds: its changing part, or (the earlier layout) all."""
        if "format" not in meta:
            target = _abstract(like)
        else:
            target = state_parts.select(_abstract(like), self.changing)
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state

    def _frozen_part(self, wanted: str | None, like: Any) -> dict[str, Any]:
        """The frozen part a checkpoint was saved with: ``like``'s own when it is bit for
        bit the same (the model loaded again gives the same weights), else ``OUT/frozen``."""
        derived = state_parts.select(like, self.frozen)
        if fingerprint(derived) == wanted:
            return derived
        target = state_parts.select(_abstract(like), self.frozen)
        why = "unreadable on another process"
        try:
            restored = _read_state(self.frozen_dir, target)
            ok = True
        except Exception as err:
            restored, ok, why = None, False, _reason(err)
        if _all_processes_agree(ok):
            why = fingerprint_mismatch(restored, wanted)
            if why is None:
                return restored
        raise CheckpointError(
            f"the frozen weights of this run in {self.frozen_dir} cannot be restored ({why}) "
            "and the model does not give the same ones again; restore them from a backup, "
            "or start a new run with another --out")

    def _set_aside(self, step: int, why: str) -> None:
        """Move a checkpoint that cannot be restored to ``OUT/damaged/`` (process 0)."""
        source = self.directory / str(step)
        target = self.out / DAMAGED / str(step)
        n = 1
        while target.exists():
            n += 1
            target = self.out / DAMAGED / f"{step}-{n}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
            print(f"checkpoint {step} in {self.directory} cannot be restored ({why}); moved "
                  f"it to {target}", file=sys.stderr)
        _sync(f"falqon-set-aside-{step}")
        self.manager.reload()


def complete_steps(out: str | Path) -> list[int]:
    """Steps with a complete checkpoint in ``out/checkpoints``, ascending (Orbax writes into
    a temporary directory and gives it the step's name when complete)."""
    directory = Path(out) / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def has_checkpoints(out: str | Path) -> bool:
    return bool(complete_steps(out))


# --------------------------------------------------------------------------------------
# Reading a run back, read-only.


@dataclasses.dataclass(frozen=True)
class SavedStep:
    """One checkpoint of a run as saved, proven against its fingerprints
    (:func:`read_checkpoint`). Trees are nested dicts of path names (as
    :func:`falqon_jax.train.state_parts.select` makes them), every array on one device.

    ``changing``: the step's ``state``: ``params`` (the trainable leaves, plus every melded
    ``w8`` under the merging rules), ``opt_state``, ``falqon_state``, ``step``. ``frozen``:
    ``OUT/frozen``'s, ``{"params": ...}`` (the rest of the params); ``{}`` for a run without
    one (``full``) and for a checkpoint of the earlier layout, whose ``changing`` is the whole
    train state. ``meta``: the checkpoint's JSON (identity settings, step, fingerprints).
    """

    step: int
    meta: dict[str, Any]
    changing: dict[str, Any]
    frozen: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        """The model's params: the changing and the frozen ones as one nested dict."""
        return state_parts.merge(self.frozen.get("params", {}), self.changing.get("params", {}))


def read_checkpoint(step_dir: str | Path, device: jax.Device | None = None) -> SavedStep:
    """``OUT/checkpoints/STEP`` and the run's ``OUT/frozen`` as saved, with their arrays
    on ``device`` (default: the first), whatever mesh wrote them; nothing on disk changes.

    Both parts are proven bit for bit against the fingerprints the checkpoint recorded, as
    :meth:`CheckpointStore.restore_latest` (``--resume``) proves them; a checkpoint of the
    earlier layout (no fingerprints) is read as it is. Raises :class:`CheckpointError`, one
    line naming the damaged directory and what to do, when either cannot be read or differs
    from its fingerprint.
    """
    with quiet_logger("absl"):  # Orbax's "Metadata file does not exist" notes
        return _read_checkpoint(Path(step_dir).resolve(), device)


def _read_checkpoint(step_dir: Path, device: jax.Device | None) -> SavedStep:
    out = step_dir.parent.parent
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    try:
        reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        meta = dict(reader.restore(step_dir, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
        changing = _read_as_saved(step_dir, sharding)
        why = None if "format" not in meta else \
            fingerprint_mismatch(changing, meta.get("fingerprint"))
    except Exception as err:  # whatever Orbax or TensorStore raise for bad files
        meta, changing, why = {}, {}, _reason(err)
    if why is not None:
        earlier = [s for s in complete_steps(out) if s < int(step_dir.name)]
        todo = (f"load an earlier one ({out / CHECKPOINTS / str(earlier[-1])})" if earlier
                else "restore it from a backup")
        raise CheckpointError(
            f"checkpoint {step_dir} cannot be restored ({why}); {todo}, or continue the run "
            f"from the one before with `python -m falqon_jax.train --out {out} --resume`, "
            "which sets it aside")
    frozen: dict[str, Any] = {}
    wanted = meta.get("frozen_fingerprint")
    if "format" in meta and wanted is not None:  # None: the frozen part has no arrays
        frozen_dir = out / FROZEN
        try:
            frozen = _read_as_saved(frozen_dir, sharding)
            why = fingerprint_mismatch(frozen, wanted)
        except Exception as err:
            why = _reason(err)
        if why is not None:
            raise CheckpointError(
                f"the frozen weights of this run in {frozen_dir} cannot be restored ({why}); "
                "restore them from a backup (no checkpoint of this run loads without them)")
    return SavedStep(int(meta.get("step", step_dir.name)), meta, changing, frozen)


def _read_as_saved(directory: Path, sharding: jax.sharding.Sharding) -> Any:
    """The ``state`` item of ``directory`` with the tree, shapes and dtypes it was saved
    with (from its metadata), every array placed by ``sharding``."""
    saved = ocp.StandardCheckpointer().metadata(directory / "state")
    saved = getattr(saved, "item_metadata", saved)  # Orbax versions differ in the wrapping
    saved = getattr(saved, "tree", saved)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          saved)
    return _read_state(directory, target)


class QuietWrites:
    """While training, keeps Orbax's and TensorStore's own reports of a failed write off
    stderr: the run reports the failure itself, in one line (:class:`CheckpointError`).

    Orbax logs the tracebacks of failed background writes (and notes such as reaching a
    preemption sync point) through absl; TensorStore then reports every write still in
    flight into Orbax's event loop, which the failure closed, as a traceback ending in
    ``RuntimeError: Event loop is closed`` printed straight to ``sys.stderr`` (no hook sees
    it). The writes' futures that nobody awaited after the failure are reported by
    asyncio's logger when they are collected ("exception was never retrieved"); that logger
    is quiet too, and :meth:`restore` collects them before it puts everything back.
    """

    def __init__(self) -> None:
        self.loggers = {name: logging.getLogger(name) for name in ("absl", "asyncio")}
        self.levels = {name: logger.level for name, logger in self.loggers.items()}
        for logger in self.loggers.values():
            logger.setLevel(logging.CRITICAL)
        self.stderr = sys.stderr
        sys.stderr = _WithoutClosedLoopReports(self.stderr)

    def restore(self) -> None:
        gc.collect()  # unawaited failed writes are reported now, while still quiet
        for name, logger in self.loggers.items():
            logger.setLevel(self.levels[name])
        if isinstance(sys.stderr, _WithoutClosedLoopReports):
            sys.stderr.flush_held()
            sys.stderr = self.stderr


class _WithoutClosedLoopReports:
    """A text stream passing everything to ``stream`` but tracebacks whose last line is
    ``RuntimeError: Event loop is closed``."""

    HEADER, DROPPED = "Traceback (most recent call last):", "RuntimeError: Event loop is closed"

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.held = ""  # a traceback being written

    def write(self, text: str) -> int:
        if not self.held and not text.startswith(self.HEADER):
            return self.stream.write(text)
        self.held += text
        lines = self.held.split("\n")
        for i, line in enumerate(lines[1:-1], 1):  # complete lines after the header
            if line and not line.startswith(" "):  # the exception line ends the traceback
                block, rest = "\n".join(lines[: i + 1]) + "\n", "\n".join(lines[i + 1:])
                self.held = ""
                if line != self.DROPPED:
                    self.stream.write(block)
                if rest:
                    self.write(rest)
                break
        return len(text)

    def flush_held(self) -> None:
        if self.held:
            self.stream.write(self.held)
            self.held = ""

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)
