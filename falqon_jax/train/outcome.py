"""How a training run ends: its exit codes, :class:`RunResult` and :class:`UserError`.

Shared by every part of a run (:mod:`~falqon_jax.train.run` re-exports them, with
:func:`~falqon_jax.train.run.finetune`): 0 finished, 2 a user mistake (one line on stderr),
3 a non-finite loss, 74 a file of the run that cannot be written, and the stop requests'
75 (``--max-time``), 130 (Ctrl-C) and 143 (SIGTERM) from :mod:`falqon_jax.train.stopping`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from falqon_jax.train.stopping import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_TIME_LIMIT

EXIT_USAGE, EXIT_DIVERGED, EXIT_CHECKPOINT = 2, 3, 74
__all__ = ["EXIT_CHECKPOINT", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
           "EXIT_TIME_LIMIT", "EXIT_USAGE", "RunResult", "UserError"]


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
