"""Runs killed, preempted or starved of disk space, as on shared clusters: nothing is lost
and the same command with --resume continues (exact losses and saved state)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from falqon_jax.train.run import main
from tests.test_train import QUICK, assert_same_saved_state

# The demo, long enough to be stopped from outside; constant learning rate, so a run of N
# steps has the same schedule as any longer one.
ENDLESS = ["-m", "falqon_jax.train", "--steps", "100000", "--warmup-ratio", "0",
           "--log-every", "1", *map(str, QUICK)]


def _losses(out):
    rows = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _start(*args, env=None):
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_steps(out, steps, procs, timeout=300):
    """Wait until ``out/metrics.jsonl`` logs ``steps`` steps (the processes still running)."""
    metrics = Path(out) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps logged in {timeout}s")


def _saved_step(err):
    found = re.findall(r"saved step (\d+) to ", err)
    assert len(found) == 1, err[-3000:]
    return int(found[0])


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_kill_9_before_the_first_checkpoint_then_resume_starts_from_step_0(tmp_path, capsys):
    """SIGKILL before any checkpoint: the plain command names --resume, and --resume starts
    from step 0 (the same losses as the killed run logged), each step logged once."""
    out = tmp_path / "run"
    proc = _start(*ENDLESS, "--out", out)
    _wait_for_steps(out, 2, [proc])
    proc.kill()
    proc.communicate(timeout=60)
    assert not any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
    killed = _losses(out)[1]
    code, _, err = _run(capsys, "--out", out, "--steps", 3)
    assert code == 2
    assert err.strip() == (f"error: --out {out} already holds this run; continue it with "
                           f"python -m falqon_jax.train --out {out} --resume, or choose "
                           "another --out")
    code, stdout, err = _run(capsys, "--out", out, "--resume", "--steps", 3)
    assert code == 0, err
    assert "no checkpoint in " in stdout + err and "yet: starting from step 0" in stdout + err
    steps, losses = _losses(out)
    assert steps == [1, 2, 3]
    overlap = min(len(killed), 3)
    assert losses[:overlap] == killed[:overlap]


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, capsys):
    """SIGTERM (a scheduler's preemption notice) mid-run: the step finishes, a checkpoint is
    saved, the exit status is 143; --resume then ends with the losses and the saved state
    (params, optimizer state) of an uninterrupted run, bit for bit."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    proc = _start(*ENDLESS, "--out", run)
    _wait_for_steps(run, 2, [proc])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    stopped = _saved_step(err)
    assert (run / "checkpoints" / str(stopped)).is_dir()
    total = stopped + 2
    code, _, err = _run(capsys, "--out", run, "--resume", "--steps", total)
    assert code == 0, err
    assert _run(capsys, *ENDLESS[2:], "--steps", total, "--out", whole)[0] == 0
    assert _losses(run) == _losses(whole)
    assert _losses(run)[0] == list(range(1, total + 1))
    assert_same_saved_state(whole, run, total)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
    """A two-process job (4 CPU devices each, gloo), SIGTERM to process 1 only: JAX's
    preemption service passes the notice on, both processes stop at the same step, save it
    together and exit with 143."""
    out = tmp_path / "two"
    env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    coordinator = f"localhost:{_free_port()}"
    procs = [_start(*ENDLESS, "--batch-size", 16, "--grad-accum", 2, "--mesh", "data=2,fsdp=4",
                    "--out", out, "--coordinator", coordinator, "--num-processes", 2,
                    "--process-id", i, env=env) for i in (0, 1)]
    _wait_for_steps(out, 2, procs)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 143, err[-3000:]
        assert "Traceback" not in err
    saved = [_saved_step(err) for err in errs]
    assert saved[0] == saved[1] and saved[0] >= 2
    state = out / "checkpoints" / str(saved[0]) / "state"
    assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                                "ocdbt.process_1"}
    assert _losses(out)[0] == list(range(1, saved[0] + 1))


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_exit_74(tmp_path):
    """Files limited to 300 kB, so writes fail as on a full disk (the demo's frozen part and
    its checkpoints need more; how TensorStore packs them decides which write fails first):
    the run stops with exit 74 and one line naming what failed, nothing else on stderr
    (Orbax's and TensorStore's own reports of the failure are kept off it)."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    out = tmp_path / "run"
    # No compilation cache here: its files would hit the limit too.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "falqon_jax.train", "--steps", "6", "--save-every", "2",
         "--out", str(out), "--sample-tokens", "0", "--eval-every", "1000"],
        capture_output=True, text=True, env=env, preexec_fn=limit_file_size, timeout=600)
    assert result.returncode == 74, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("train:")]
    assert len(lines) == 1, result.stderr[-3000:]
    what = f"{re.escape(str(out / 'frozen'))}|checkpoint \\d+ to " \
        + re.escape(str(out / "checkpoints"))
    assert re.fullmatch(f"error: cannot write ({what}): File too large; (no checkpoint is "
                        r"complete yet|step \d+ is the last complete checkpoint): fix that "
                        r"\(e.g. free space\) and continue with --resume", lines[0]), lines[0]
