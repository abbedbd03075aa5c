"""``--report-to tensorboard,wandb``: the scalars of ``metrics.jsonl`` at the same steps in
TensorBoard's event files and in an offline W&B run, read back with TensorBoard's own reader
and W&B's record format; a resumed run appends without repeating a step; the writers close
on every way out; a missing writer or a bogus name is one line before anything starts."""

import json
import os
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from falqon_jax.train import reporting
from falqon_jax.train.config import ConfigError, TrainConfig, resolve
from falqon_jax.train.run import main, resumed_config
from falqon_jax.train.runs import read_run_config
from tests.test_preemption import ENDLESS, _start, _wait_for_steps
from tests.test_train import QUICK

BOTH = ["--report-to", "tensorboard,wandb"]
NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_s", "step_time_s": "train/step_time_s",
         "eval_loss": "eval/loss"}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline (no key, no mode, no project or name of the user's), its caches and
    settings under ``tmp_path``."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR",
                 "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _close(a, b):
    """``{name: [(step, value), ...]}`` ``a`` and ``b`` alike: the same names and steps,
    values to float32 (TensorBoard keeps float32; a diverging run logs a NaN norm)."""
    return a.keys() == b.keys() and all(
        [s for s, _ in a[k]] == [s for s, _ in b[k]]
        and [v for _, v in a[k]] == pytest.approx([v for _, v in b[k]], rel=1e-6, nan_ok=True)
        for k in a)


def _expected(rows):
    """``{name: [(step, value), ...]}`` the reporters should show for ``metrics.jsonl``
    lines ``rows``."""
    found: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                found.setdefault(NAMES[key], []).append((row["step"], value))
    return found


# --------------------------------------------------------------------------------------
# Reading what the writers wrote.


def tensorboard_scalars(out):
    """``{tag: [(step, value), ...]}`` as TensorBoard shows ``OUT/tensorboard`` (its own
    reader, which applies a resumed writer's ``purge_step``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def wandb_records(path):
    """The records of a ``.wandb`` file (W&B's transaction log: a ``:W&B`` header, then
    LevelDB-log chunks in 32 KiB blocks, each checksummed, holding ``Record`` protos)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left  # a block's tail too short for a chunk header is padding
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), "damaged .wandb chunk"
        pending += chunk
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(out):
    """Each offline run directory of ``OUT/wandb``, in the order they were made, as a
    namespace: ``run`` (its run record), ``settings`` (its config, as the config updates
    leave it), ``rows`` (history rows, ``{name: value}`` with ``_step``) and ``exit`` (its
    exit record; ``None`` where the run was not finished)."""
    runs = []
    for folder in sorted((Path(out) / "wandb").glob("offline-run-*")):
        found = SimpleNamespace(run=None, settings={}, rows=[], exit=None)
        for record in wandb_records(next(folder.glob("*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):
                if kind == "run":
                    found.run = record.run
                updates = (record.run.config if kind == "run" else record.config).update
                found.settings |= {u.key: json.loads(u.value_json) for u in updates}
            elif kind == "history":
                found.rows.append({item.key or "/".join(item.nested_key):
                                   json.loads(item.value_json)
                                   for item in record.history.item})
            elif kind == "exit":
                found.exit = record.exit
        runs.append(found)
    return runs


def wandb_scalars(rows):
    """``{name: [(step, value), ...]}`` of W&B history rows (W&B's own keys left out)."""
    found: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_"):
                found.setdefault(key, []).append((row["_step"], value))
    return found


def wandb_services(parent_pid):
    """Running W&B service processes started by the process ``parent_pid``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"wandb-core") for a in args) and \
                str(parent_pid).encode() in args:
            found.append(int(proc.name))
    return found


def _assert_no_wandb_service_left(pid):
    deadline = time.time() + 10
    while wandb_services(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not wandb_services(pid), "a W&B service process outlived the run"


# --------------------------------------------------------------------------------------
# The run and its resume.


def test_the_scalars_of_metrics_jsonl_in_tensorboard_and_wandb_and_a_resume_appends(
        tmp_path, capsys):
    """A run logs every step to both; its checkpoint of step 4 is lost (as in a kill after
    step 4 was logged, before it was saved), so ``--resume`` continues from step 2 and logs
    steps 3 and 4 again: TensorBoard shows each step once, with the values metrics.jsonl
    ends with; W&B continues the same run, keeps the steps it has and adds 5 and 6."""
    out = tmp_path / "run"
    common = ["--log-every", 1, "--save-every", 2, "--eval-every", 2, "--sample-tokens", 0]
    code, _, err = _run(capsys, "--steps", 4, "--out", out, *common, *BOTH)
    assert code == 0, err
    first = _metrics(out)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert err.count("wandb") == 0  # W&B stays off the console

    assert _close(tensorboard_scalars(out), _expected(first))
    [w] = wandb_runs(out)
    assert wandb_scalars(w.rows) == _expected(first)  # exactly the logged numbers
    assert w.run.display_name == "run" and w.run.project == "falqon-jax"
    assert w.exit.exit_code == 0
    assert w.settings["method"] == "falqon" and w.settings["steps"] == 4
    assert w.settings["report_to"] == ["tensorboard", "wandb"]
    _assert_no_wandb_service_left(os.getpid())

    shutil.rmtree(out / "checkpoints" / "4")
    # --report-to is kept from the run's config.json
    code, _, err = _run(capsys, "--out", out, "--resume", "--steps", 6)
    assert code == 0, err
    final = _metrics(out)
    assert [r["step"] for r in final] == [1, 2, 3, 4, 5, 6]

    shown = tensorboard_scalars(out)
    assert _close(shown, _expected(final))
    assert [s for s, _ in shown["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in shown["eval/loss"]] == [2, 4, 6]

    w1, w2 = wandb_runs(out)
    assert w1.run.run_id == w2.run.run_id  # one W&B run, resumed
    assert json.loads((out / "wandb" / "falqon-jax.json").read_text()) == {
        "id": w1.run.run_id, "step": 6}
    assert [r["_step"] for r in w1.rows + w2.rows] == [1, 2, 3, 4, 5, 6]
    assert wandb_scalars(w1.rows) == _expected(first)
    assert wandb_scalars(w2.rows) == _expected(final[4:])
    assert w2.exit.exit_code == 0 and w2.settings["steps"] == 6
    _assert_no_wandb_service_left(os.getpid())


@pytest.mark.slow
def test_a_resume_may_add_or_drop_a_reporter(tmp_path, capsys):
    """``--report-to`` is no part of the run's identity: a run started without it resumes
    with TensorBoard only, then goes on with none."""
    out = tmp_path / "run"
    assert _run(capsys, "--steps", 2, "--out", out, "--log-every", 1, *QUICK)[0] == 0
    code, _, err = _run(capsys, "--out", out, "--resume", "--steps", 3, "--report-to",
                        "tensorboard")
    assert code == 0, err
    assert _close(tensorboard_scalars(out), _expected(_metrics(out)[2:3]))
    assert not (out / "wandb").exists()
    code, _, err = _run(capsys, "--out", out, "--resume", "--steps", 4, "--report-to", "none")
    assert code == 0, err
    assert [s for s, _ in tensorboard_scalars(out)["train/loss"]] == [3]
    assert read_run_config(out).report_to == ()


# --------------------------------------------------------------------------------------
# Every way out closes the writers.


@pytest.mark.slow
def test_divergence_closes_the_wandb_run_as_failed(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "--method", "full", "--lr", 1e8, "--warmup-ratio", 0,
                        "--steps", 20, "--log-every", 1, "--out", out, *QUICK, *BOTH)
    assert code == 3, err
    logged = _metrics(out)
    [w] = wandb_runs(out)
    assert _close(wandb_scalars(w.rows), _expected(logged)) and w.exit.exit_code == 3
    assert _close(tensorboard_scalars(out), _expected(logged))


def test_max_time_stop_closes_the_writers(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "--steps", 50, "--log-every", 1, "--max-time", 1, "--out", out,
                        *QUICK, *BOTH)
    assert code == 75, err
    logged = _metrics(out)
    [w] = wandb_runs(out)
    assert wandb_scalars(w.rows) == _expected(logged) and w.exit.exit_code == 0
    assert _close(tensorboard_scalars(out), _expected(logged))


@pytest.mark.slow
def test_sigterm_closes_the_writers_and_leaves_no_wandb_process(tmp_path):
    """A preemption notice (SIGTERM) while training: the step is saved, TensorBoard's
    events of every logged step are on disk, the W&B run is finished, and no W&B service
    process outlives the command."""
    out = tmp_path / "run"
    proc = _start(*ENDLESS, "--out", out, *BOTH)
    _wait_for_steps(out, 2, [proc])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    _assert_no_wandb_service_left(proc.pid)
    logged = _metrics(out)
    assert _close(tensorboard_scalars(out), _expected(logged))
    [w] = wandb_runs(out)
    assert wandb_scalars(w.rows) == _expected(logged) and w.exit is not None


# --------------------------------------------------------------------------------------
# Settings and mistakes.


def test_report_to_flag_and_recipe_values(tmp_path):
    assert resolve([])[0].report_to == ()
    assert resolve(["--report-to", "none"])[0].report_to == ()
    assert resolve(["--report-to", "wandb, tensorboard"])[0].report_to == ("wandb",
                                                                           "tensorboard")
    recipe = tmp_path / "r.toml"
    for value, expected in (('["tensorboard", "wandb"]', ("tensorboard", "wandb")),
                            ('"tensorboard"', ("tensorboard",)), ('"none"', ()), ("[]", ())):
        recipe.write_text(f"report_to = {value}\n")
        assert resolve(["--recipe", str(recipe), "--model", "tiny", "--data", "demo"]
                       )[0].report_to == expected
    recipe.write_text('report_to = ["wandb", "mlflow"]\n')
    with pytest.raises(ConfigError, match="report_to.*not valid for --report-to; expected "
                       "none or a comma list of tensorboard, wandb"):
        resolve(["--recipe", str(recipe), "--model", "tiny"])


@pytest.mark.parametrize("value, message", [
    ("bogus", "unknown reporter 'bogus': use none or a comma list of tensorboard, wandb"),
    ("wandb,wandb", "a reporter is named twice: wandb,wandb"),
])
def test_a_bogus_report_to_is_one_line(value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--report-to", value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err == f"error: argument --report-to: {message} (see --help)\n"
    assert not (tmp_path / "run").exists()


def test_a_missing_writer_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    """With wandb (or tensorboardX) not installed the command names the extra and exits 2
    before the model is looked at (a Hub model that is not there would fail otherwise) and
    before --out is written."""
    out = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    argv = ["--model", "nobody/no-such-model", "--data", "demo", "--out", out]
    code, _, err = _run(capsys, *argv, "--report-to", "tensorboard,wandb")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --report-to wandb needs wandb: pip install ")
    assert "[wandb]" in err and not out.exists()
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    code, _, err = _run(capsys, *argv, "--report-to", "tensorboard,wandb")
    assert code == 2 and "needs tensorboardX, wandb: pip install " in err
    assert "[tensorboard,wandb]" in err


def test_report_to_is_not_part_of_the_runs_identity(tmp_path):
    """Old runs (config.json without report_to) resume; ``--out OUT --resume`` keeps the
    run's reporters, ``--report-to`` given again replaces them."""
    assert TrainConfig(report_to=("wandb",)).identity() == TrainConfig().identity()
    out = tmp_path / "run"
    out.mkdir()
    saved = json.loads(TrainConfig(model="tiny", data="demo").to_json())
    del saved["report_to"]  # a run from before --report-to
    (out / "config.json").write_text(json.dumps(saved))
    assert read_run_config(out).report_to == ()
    saved["report_to"] = ["tensorboard"]
    (out / "config.json").write_text(json.dumps(saved))
    assert read_run_config(out).report_to == ("tensorboard",)
    argv = ["--out", str(out), "--resume"]
    assert resumed_config(resolve(argv)[0], argv).report_to == ("tensorboard",)
    argv += ["--report-to", "wandb"]
    assert resumed_config(resolve(argv)[0], argv).report_to == ("wandb",)


def test_only_the_primary_process_writes(tmp_path):
    config = TrainConfig(report_to=("tensorboard", "wandb"))
    reporter = reporting.open(config, tmp_path, False, 0, primary=False)
    reporter.log(1, {"train/loss": 1.0})
    reporter.close()
    assert reporter.writers == [] and list(tmp_path.iterdir()) == []


def test_log_takes_results_of_other_names(tmp_path):
    """What else has scalars (e.g. evaluation results at the end) logs them by name."""
    reporter = reporting.open(TrainConfig(report_to=("tensorboard",)), tmp_path, False, 0)
    reporter.log(7, reporting.scalars({"step": 7, "loss": 2.5, "eval_loss": 2.0}))
    reporter.log(7, {"lm_eval/arc_easy/acc": 0.25})
    reporter.close()
    reporter.close()  # a second close does nothing
    assert tensorboard_scalars(tmp_path) == {"train/loss": [(7, 2.5)], "eval/loss": [(7, 2.0)],
                                             "lm_eval/arc_easy/acc": [(7, 0.25)]}
