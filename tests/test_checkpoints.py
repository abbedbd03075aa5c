"""Checkpoints: what each one holds, the frozen part written once per run, damaged files,
fingerprints and the stop conditions' settings."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax.train.checkpoints import CheckpointError, CheckpointStore
from falqon_jax.train.fingerprint import fingerprint
from falqon_jax.train.run import main
from falqon_jax.train.state_parts import changing_mask, select
from falqon_jax.train.stopping import parse_duration
from falqon_jax.train.trainer import TrainState
from tests.test_train import QUICK, assert_same_saved_state

# --------------------------------------------------------------------------------------
# Fingerprints, the store and durations, without training.


def test_fingerprint_changes_with_any_bit_and_not_with_copies():
    tree = {"w8": jnp.asarray(np.arange(-64, 64).reshape(8, 16), jnp.float8_e4m3fn),
            "b": jnp.linspace(-1, 1, 48, dtype=jnp.float32).reshape(3, 16),
            "h": jnp.ones((5,), jnp.bfloat16), "step": jnp.int32(7)}
    digest = fingerprint(tree)
    assert digest == fingerprint(jax.tree.map(lambda x: jnp.array(np.asarray(x)), tree))
    assert fingerprint({}) is None
    for name, leaf in tree.items():
        raw = np.asarray(leaf).copy()
        bits = raw.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[raw.dtype.itemsize])
        for bit in (0, 8 * raw.dtype.itemsize - 1):
            flipped = bits.copy().reshape(-1)
            flipped[-1] ^= np.array(1 << bit).astype(bits.dtype)
            changed = flipped.reshape(bits.shape).view(raw.dtype)
            assert fingerprint(tree | {name: jnp.asarray(changed)}) != digest, (name, bit)
    swapped = np.asarray(tree["b"]).copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert fingerprint(tree | {"b": jnp.asarray(swapped)}) != digest  # positions count
    assert fingerprint(tree | {"b": tree["b"].reshape(16, 3)}) != digest  # and shapes
    assert fingerprint({"c": tree["b"], **{k: v for k, v in tree.items() if k != "b"}}) != digest


def _toy_state(w: float, b: float) -> TrainState:
    """A train state with one frozen leaf (``w``) and one trainable one (``b``)."""
    params = {"w": jnp.full((4, 16), w, jnp.float32), "b": jnp.full((4, 2), b, jnp.float32)}
    return TrainState(params, ({"mu": params["b"] * 0},), (), jnp.int32(1))


def _toy_store(out: Path, state: TrainState) -> CheckpointStore:
    return CheckpointStore(out, 3, changing_mask(state, {"w": False, "b": True},
                                                  writes_w8=False))


def test_store_keeps_the_frozen_part_once_and_proves_what_it_restores(tmp_path):
    state = _toy_state(1.0, 2.0)
    # Training that changed the frozen part is caught at the run's first save.
    store = _toy_store(tmp_path / "wrong", state)
    store.write_frozen(state)
    with pytest.raises(CheckpointError, match="frozen part of the train state changed"):
        store.save(1, _toy_state(1.5, 2.0), {"step": 1})
    store.close()

    store = _toy_store(tmp_path, state)
    store.write_frozen(state)
    store.save(1, state, {"step": 1})
    store.wait()
    store.close()
    assert set(select(state, store.changing)["params"]) == {"b"}

    # Restored onto a state with other values: b from the checkpoint, w from OUT/frozen
    # (the model loaded again would give other weights).
    step, restored = _toy_store(tmp_path, state).restore_latest(_toy_state(9.0, 9.0))
    assert step == 1 and float(restored.params["w"][0, 0]) == 1.0
    assert float(restored.params["b"][0, 0]) == 2.0

    # OUT/frozen damaged: a model that gives the same frozen weights again still resumes;
    # one that does not is one error naming what to do.
    for data in (tmp_path / "frozen" / "state").rglob("d/*"):
        data.write_bytes(b"\0" * data.stat().st_size)
    step, restored = _toy_store(tmp_path, state).restore_latest(_toy_state(1.0, 9.0))
    assert step == 1 and float(restored.params["b"][0, 0]) == 2.0
    with pytest.raises(CheckpointError, match="frozen weights of this run .* cannot be "
                       "restored .* start a new run with another --out"):
        _toy_store(tmp_path, state).restore_latest(_toy_state(9.0, 9.0))


def test_checkpoints_of_the_whole_state_from_the_earlier_layout_still_resume(tmp_path):
    """Before the frozen part was split off, each checkpoint held the whole train state
    (and its meta no "format"): such a run resumes, and its next saves use the new layout."""
    import orbax.checkpoint as ocp

    state = _toy_state(1.0, 2.0)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({"step": 3})))
    manager.wait_until_finished()
    manager.close()
    store = _toy_store(tmp_path, state)
    step, restored = store.restore_latest(_toy_state(9.0, 9.0))
    assert step == 3 and float(restored.params["w"][0, 0]) == 1.0
    assert float(restored.params["b"][0, 0]) == 2.0
    store.write_frozen(restored)
    store.save(4, restored._replace(step=jnp.int32(4)), {"step": 4})
    store.close()
    step, again = _toy_store(tmp_path, state).restore_latest(_toy_state(9.0, 9.0))
    assert step == 4 and float(again.params["w"][0, 0]) == 1.0
    assert (tmp_path / "frozen").is_dir()


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("45m", 2700),
                                          ("3.5h", 12600), ("1:30:00", 5400), ("2:30", 150),
                                          ("1-00:00:00", 86400), ("2d", 172800)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0", "-5m", "1:2:3:4", "inf"])
def test_parse_duration_refuses_nonsense(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_bad_max_time_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--max-time", "soon"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-time" in err[0] and "invalid duration" in err[0]


# --------------------------------------------------------------------------------------
# Training runs of the demo.


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _saved_tree(out, step):
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(Path(out) / "checkpoints" / str(step) / "state")


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_default_rule_checkpoints_hold_the_trainable_state_only(tmp_path, capsys):
    """Under the default rule a step's checkpoint holds b, its two AdamW moments and the
    step counts: at most their bytes (from the shapes) plus 64 KiB of metadata, while the
    FP8 backbone, A, norms and embeddings sit once in OUT/frozen."""
    from falqon_jax.melded import is_melded
    from falqon_jax.train.runs import load_run

    out = tmp_path / "run"
    code, _, err = _run(capsys, "--steps", 4, "--save-every", 2, "--out", out,
                        "--eval-every", 1000, "--sample-tokens", 0)
    assert code == 0, err
    params = load_run(out)[0].params
    layers = [x for x in jax.tree.leaves(params, is_leaf=is_melded) if is_melded(x)]
    b_bytes = sum(layer.b.nbytes for layer in layers)
    all_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    trainable_state = 3 * b_bytes + 4 * 4  # b, mu, nu (float32); step and optimizer counts
    for step in (2, 4):
        size = _file_bytes(out / "checkpoints" / str(step))
        assert size <= trainable_state + 64 * 1024, (size, trainable_state)
        saved = _saved_tree(out, step)["params"]
        assert {k for x in jax.tree_util.tree_flatten_with_path(saved)[0]
                for k in [x[0][-1].key]} == {"b"}
    # Everything else sits once in OUT/frozen (compressed: FP8 values and small weights
    # take fewer bytes than their shapes say).
    import orbax.checkpoint as ocp

    frozen = ocp.PyTreeCheckpointer().restore(out / "frozen" / "state")["params"]
    frozen_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(frozen))
    assert frozen_bytes == all_bytes - b_bytes


def _damage(step_dir: Path, how: str) -> None:
    """Truncate (``cut``) or overwrite the middle (``flip``, the file still decodes) of the
    largest data file of a checkpoint."""
    data = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    if how == "cut":
        data.write_bytes(raw[: len(raw) // 2])
    else:
        middle = len(raw) // 2
        raw[middle:middle + 16] = bytes(b ^ 0x5A for b in raw[middle:middle + 16])
        data.write_bytes(raw)


def test_damaged_newest_checkpoints_fall_back_to_the_one_before(tmp_path, capsys):
    """Checkpoint 6 truncated, checkpoint 4 with overwritten bytes (it still decodes; its
    fingerprint catches it): --resume sets both aside with one line each, continues from
    step 2 and ends with the uninterrupted run's losses and saved state, bit for bit.

    The run uses the paper's rule, which merges rows into the FP8 weights, so its
    checkpoints hold ``w8`` (and the resume shows they hold all that changes)."""
    flags = ["--rule", "paper", "--steps", 6, "--save-every", 2, "--log-every", 1, *QUICK[2:]]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert _run(capsys, *flags, "--out", whole)[0] == 0
    saved = _saved_tree(whole, 6)["params"]["layers"]["mlp"]["up_proj"]
    assert set(saved) == {"w8", "b"}  # its scale never changes: frozen
    shutil.copytree(whole, broken)
    _damage(broken / "checkpoints" / "6", "cut")
    _damage(broken / "checkpoints" / "4", "flip")
    code, stdout, err = _run(capsys, "--out", broken, "--resume")
    assert code == 0, err
    assert "Traceback" not in err
    notes = [ln for ln in err.splitlines() if "cannot be restored" in ln]
    assert len(notes) == 2, err
    assert notes[0].startswith("checkpoint 6 ") and "moved it to" in notes[0]
    assert notes[1].startswith("checkpoint 4 ") and "fingerprint" in notes[1]
    assert "steps 2->6" in stdout + err
    assert sorted(p.name for p in (broken / "damaged").iterdir()) == ["4", "6"]
    assert _losses(broken) == _losses(whole)
    assert_same_saved_state(whole, broken, 6)


def test_resume_takes_the_runs_own_settings_and_max_time_saves(tmp_path, capsys):
    """``--out OUT --resume`` alone continues a run with its saved settings (flags given
    override them); ``--max-time`` shorter than the first step stops after it, saves and
    exits 75."""
    out = tmp_path / "run"
    code, _, err = _run(capsys, "--steps", 100000, "--out", out, "--max-time", "1s",
                        "--warmup-ratio", 0, "--log-every", 1, *QUICK)
    assert code == 75, err
    assert "--max-time reached: saved step 1 " in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    code, stdout, err = _run(capsys, "--out", out, "--resume", "--steps", 2)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["warmup_ratio"] == 0 and saved["steps"] == 2 and saved["max_time"] is None
    assert "steps 1->2" in stdout + err
    assert _losses(out)[0] == [1, 2]


def test_identity_mismatch_names_the_command_that_continues_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "config.json").write_text(dataclasses.replace(
        __import__("falqon_jax.train.config", fromlist=["DEMO"]).DEMO, rank=8).to_json())
    code, _, err = _run(capsys, "--out", out, "--resume", "--rank", 16, "--steps", 1)
    assert code == 2
    assert f"python -m falqon_jax.train --out {out} --resume" in err and "rank" in err
    code, _, err = _run(capsys, "--out", out, "--steps", 1)
    assert code == 2 and "already holds a run with other settings" in err
