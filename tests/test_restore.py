"""Reading a run back for other trainers: :func:`falqon_jax.restore` gives the params the run
ended with, bit for bit; README's plain-Orbax recipe gives the same arrays; and a damaged
checkpoint or ``OUT/frozen`` is refused in one line by ``restore``, ``load_run``,
``generate`` and ``export``, as ``--resume`` refuses it (fingerprints)."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import falqon_jax
from falqon_jax.model.loading import LoadError
from falqon_jax.train.checkpoints import CheckpointError, read_checkpoint
from falqon_jax.train.runs import load_run
from falqon_jax.train.state_parts import select
from tests.test_checkpoints import _damage

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Restoring with plain Orbax"
FLAGS = ["--steps", "2", "--save-every", "1", "--eval-every", "1000", "--sample-tokens", "0"]


def as_dicts(params: Any) -> dict[str, Any]:
    """A params tree (dataclass layers included) as nested dicts of path names."""
    return select(params, jax.tree.map(lambda _: True, params))


def assert_bit_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Same paths, dtypes, shapes and bits (numpy or jax arrays)."""
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


def train(out: Path, *flags: str) -> dict[str, Any]:
    """Train the demo (tiny card) into ``out``, saving steps 1 and 2; returns the params
    the run's model had at its end (host copies, nested dicts of path names)."""
    import falqon_jax.train.loop as loop_module
    from falqon_jax.train.run import main

    ended: dict[str, Any] = {}
    report = loop_module.report_samples

    def keep(prep: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        ended.update(as_dicts(jax.tree.map(np.array, model.params)))
        report(prep, model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "report_samples", keep)  # looked up there at the run's end
        assert main([*FLAGS, *flags, "--out", str(out)]) == 0
    assert ended
    return ended


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A FALQON run of the demo under the default rule (checkpoints hold ``b``)."""
    out = tmp_path_factory.mktemp("restore") / "run"
    return out, train(out)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The same under the paper's rule, which merges rows: checkpoints hold ``w8`` too."""
    out = tmp_path_factory.mktemp("restore") / "paper"
    return out, train(out, "--rule", "paper")


# --------------------------------------------------------------------------------------
# falqon_jax.restore


def test_restore_gives_the_params_the_run_ended_with(run):
    out, ended = run
    restored = falqon_jax.restore(out)
    assert restored.step == 2 and restored.checkpoint == out / "checkpoints" / "2"
    assert restored.config.method == "falqon" and restored.config.rank == 16
    assert_bit_equal(restored.params, ended)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored.params))
    # The documented layout: stacked layers, the melded [W; A] rows, their scales and b.
    up = restored.params["layers"]["mlp"]["up_proj"]
    layers, rank = 4, restored.config.rank
    width = restored.params["embed_tokens"].shape[1]
    assert set(up) == {"w8", "scale", "b"}
    assert up["w8"].dtype == jax.numpy.float8_e4m3fn and up["w8"].shape[::2] == (layers, width)
    out_features = up["w8"].shape[1] - rank
    assert up["scale"].shape == (layers,) and up["scale"].dtype == np.float32
    assert up["b"].shape == (layers, out_features, rank) and up["b"].dtype == np.float32
    assert np.any(np.asarray(up["b"]))  # trained
    # load_run builds the model around the same arrays.
    assert_bit_equal(as_dicts(load_run(out)[0].params), ended)


def test_restore_picks_a_step(run):
    out, _ = run
    first = falqon_jax.restore(out, step=1)
    assert first.step == 1 and first.checkpoint == out / "checkpoints" / "1"
    assert_bit_equal(first.params, falqon_jax.restore(out / "checkpoints" / "1").params)
    assert falqon_jax.restore(out / "checkpoints" / "2", step=2).step == 2
    with pytest.raises(LoadError, match="no checkpoint of step 5 .*steps 1, 2"):
        falqon_jax.restore(out, step=5)
    with pytest.raises(LoadError, match="checkpoint of step 1, not of step 2"):
        falqon_jax.restore(out / "checkpoints" / "1", step=2)
    with pytest.raises(LoadError, match="neither a training run"):
        falqon_jax.restore(out / "frozen")


def test_restore_under_a_rule_that_merges_into_w8(paper_run):
    out, ended = paper_run
    saved = read_checkpoint(out / "checkpoints" / "2")
    assert set(saved.changing["params"]["layers"]["mlp"]["up_proj"]) == {"w8", "b"}
    assert set(saved.frozen["params"]["layers"]["mlp"]["up_proj"]) == {"scale"}
    assert_bit_equal(falqon_jax.restore(out).params, ended)


# --------------------------------------------------------------------------------------
# README's recipe with plain Orbax


def readme_snippet() -> str:
    """The ```python block after README's heading :data:`HEADING`."""
    text = README.read_text(encoding="utf-8")
    if HEADING not in text:
        pytest.skip(f"README.md has no '{HEADING}' section yet (its plain-Orbax recipe)")
    found = re.search(rf"^{re.escape(HEADING)}\n.*?^```python\n(.*?)^```", text,
                      re.S | re.M)
    assert found, f"README's '{HEADING}' section has no ```python block"
    code = found.group(1)
    assert "falqon_jax" not in code, "the recipe must not need falqon_jax"
    return code


@pytest.mark.parametrize("which", ["run", "paper_run"])
def test_readme_plain_orbax_recipe_reads_the_same_arrays(which, request, tmp_path,
                                                         monkeypatch):
    """The recipe, as README prints it, run where ``runs/demo`` is the run: the same
    arrays as ``falqon_jax.restore`` (numpy, bit for bit), and no warning."""
    code = readme_snippet()
    out, ended = request.getfixturevalue(which)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(out, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_recipe"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    params = namespace["params"]
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    assert_bit_equal(params, falqon_jax.restore(out).params)
    assert_bit_equal(params, ended)


# --------------------------------------------------------------------------------------
# Damaged checkpoints: one line, nothing moved


def _restore(out: Path, tmp_path: Path) -> tuple[int, str]:
    try:
        falqon_jax.restore(out)
    except CheckpointError as err:
        return 74, f"error: {err}"
    return 0, ""


def _load_run(out: Path, tmp_path: Path) -> tuple[int, str]:
    try:
        load_run(out)
    except CheckpointError as err:
        return 74, f"error: {err}"
    return 0, ""


def _generate(out: Path, tmp_path: Path) -> tuple[int, str]:
    from falqon_jax.generate import main

    return main(["--model", str(out), "--prompt", "abc", "--max-new-tokens", "2"]), ""


def _export(out: Path, tmp_path: Path) -> tuple[int, str]:
    from falqon_jax.export.cli import main

    code = main(["--checkpoint", str(out), "--out", str(tmp_path / "export")])
    assert not (tmp_path / "export").exists()
    return code, ""


TOOLS = {"restore": _restore, "load_run": _load_run, "generate": _generate, "export": _export}


# Orbax's reader of a truncated file leaves coroutines that report their cancellation when
# collected; the CLIs print one line all the same (pytest turns such reports into warnings).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("part, how", [("step", "flip"), ("step", "cut"), ("frozen", "flip")])
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_damaged_checkpoints_are_refused_in_one_line(run, tool, part, how, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    damaged = out / "checkpoints" / "2" if part == "step" else out / "frozen"
    _damage(damaged, how)
    capsys.readouterr()
    code, raised = TOOLS[tool](out, tmp_path)
    err = raised or capsys.readouterr().err
    assert code == 74, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(damaged.resolve()) in lines[0] and "cannot be restored" in lines[0]
    if part == "step" and how == "flip":  # it still decodes: its fingerprint catches it
        assert "fingerprint" in lines[0]
    if part == "step":  # what to do: the checkpoint before, or --resume
        assert str(out.resolve() / "checkpoints" / "1") in lines[0]
        assert f"python -m falqon_jax.train --out {out.resolve()} --resume" in lines[0]
    else:
        assert "backup" in lines[0]
    # Read-only: nothing is moved aside (only --resume does that).
    assert damaged.is_dir() and not (out / "damaged").exists()
    if part == "step":  # the checkpoint before it still loads
        assert falqon_jax.restore(out, step=1).step == 1
