"""Stopping a run early without losing it: Ctrl-C, SIGTERM and ``--max-time``.

The training loop asks :meth:`StopRequests.should_stop` after every step; when it says so,
the loop saves a checkpoint of that step, waits until it is on disk and exits with
:meth:`StopRequests.exit_code`:

* Ctrl-C (SIGINT): 130. A second Ctrl-C interrupts at once.
* SIGTERM -- the notice SLURM, Kubernetes and preemptible (spot) VMs send before they kill a
  job: 143. Repeated SIGTERMs change nothing (the save is already under way).
* ``--max-time``: 75 (``EX_TEMPFAIL``: run the same command with ``--resume`` to continue).
  The run stops at the first step boundary where the longest step so far (evaluation and
  saving included) would no longer fit before the limit, counted from the start of the run.

In a multi-host job (``jax.distributed``) every process must save the same step. JAX's
preemption service then owns SIGTERM: the signal on any one process is passed to all, and
:func:`jax.experimental.multihost_utils.reached_preemption_sync_point` turns true on every
process at the same step. A Ctrl-C or ``--max-time`` on a process is handed to the same
service (the process raises SIGTERM on itself), so those stops agree as well.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Any

EXIT_TIME_LIMIT, EXIT_INTERRUPTED, EXIT_TERMINATED = 75, 130, 143

_EXIT_CODES = {"interrupt": EXIT_INTERRUPTED, "terminate": EXIT_TERMINATED,
               "time": EXIT_TIME_LIMIT}
_WHY = {"interrupt": "Ctrl-C", "terminate": "SIGTERM", "time": "--max-time reached"}


def _preemption_service() -> Any:
    """JAX's preemption sync manager when this process joined a distributed job."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - moved in a future JAX
        return None
    if distributed.global_state.client is None:
        return None
    return distributed.global_state.preemption_sync_manager


class StopRequests:
    """Collects requests to stop (signals, the time limit) and decides, after each step,
    whether the loop stops there. Call :meth:`restore` when the loop is over."""

    def __init__(self, max_time_s: float | None = None, started: float | None = None) -> None:
        self.reason: str | None = None
        self.max_time_s = max_time_s
        self.started = time.monotonic() if started is None else started
        self._service = _preemption_service()
        self._handed_over = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        if self._service is None:  # else JAX's preemption service handles SIGTERM
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            print(f"\n{_WHY[reason]}: stopping after this step and saving a checkpoint",
                  file=sys.stderr)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.reason == "interrupt":
            raise KeyboardInterrupt
        self._request("interrupt")
        print("(Ctrl-C again to abort at once)", file=sys.stderr)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._request("terminate")

    def should_stop(self, step: int, next_step_s: float = 0.0) -> bool:
        """Whether to stop after ``step`` (just completed) and save it; ``next_step_s`` is how
        long the next step may take (for ``--max-time``). In a multi-host job every process
        must call this after every step."""
        if self.max_time_s is not None and self.reason is None:
            if time.monotonic() - self.started + next_step_s > self.max_time_s:
                self._request("time")
        if self._service is None:
            return self.reason is not None
        if self.reason is not None and not self._handed_over:
            self._handed_over = True
            signal.raise_signal(signal.SIGTERM)  # to JAX's handler: every process stops
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    @property
    def exit_code(self) -> int:
        """The exit status for this stop (another process's SIGTERM counts as SIGTERM)."""
        return _EXIT_CODES[self.reason or "terminate"]

    @property
    def why(self) -> str:
        """Why the run stopped, for the closing line."""
        return _WHY[self.reason] if self.reason else "preemption notice (SIGTERM)"

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``3600``, ``90s``, ``45m``, ``3.5h``, ``1:30:00`` (H:MM:SS),
    ``2-00:00:00`` (SLURM's D-HH:MM:SS). Raises ``ValueError`` with a one-line message."""
    value = text.strip().lower()
    try:
        days = 0.0
        if "-" in value:
            head, value = value.split("-", 1)
            days = float(head)
        if ":" in value:
            parts = [float(p) for p in value.split(":")]
            if len(parts) > 3:
                raise ValueError
            seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif value and value[-1] in "smhd":
            seconds = float(value[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[value[-1]]
        else:
            seconds = float(value)
        seconds += days * 86400
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: use seconds, 90s, 45m, 3.5h, H:MM:SS or "
                         "D-HH:MM:SS") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return seconds
