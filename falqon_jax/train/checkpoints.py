"""Orbax checkpoints of a training run: ``OUT/checkpoints/<step>/`` with the train state
(params incl. FP8 weights, optimizer state incl. FALQON proxy buffers, step) and a JSON
``meta`` item (the run's identity settings and the data position)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointStore:
    """Save/restore train states under ``out/checkpoints``, keeping the newest ``keep``."""

    def __init__(self, out: str | Path, keep: int) -> None:
        self.directory = Path(out).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write a checkpoint for ``step`` and wait until it is on disk."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, step: int, like: Any) -> Any:
        """Restore the state of ``step`` onto the structure, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored.state

    def close(self) -> None:
        self.manager.close()


def has_checkpoints(out: str | Path) -> bool:
    directory = Path(out) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
