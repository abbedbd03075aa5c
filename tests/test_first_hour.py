"""A new user's first hour: commands that start on any install, cards and recipes from any
directory and from a wheel, no half-specified runs, recipe values checked like flags, a
write failure anywhere the run writes, and a schedule that a resume keeps."""

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from falqon_jax.train.config import ConfigError, resolve
from tests.test_train import QUICK, _metrics, _run, assert_same_saved_state

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("falqon_jax.train", "falqon_jax.generate", "falqon_jax.export", "falqon_jax.bench",
            "falqon_jax.demo")

# Runs a command as on an install without JAX's CUDA plugin: no ``jax_plugins`` package at
# all (the namespace exists only where some plugin is installed) and no JAX_PLATFORMS.
WITHOUT_PLUGINS = (
    "import runpy, sys; sys.modules['jax_plugins'] = None; "
    "from falqon_jax import targets; assert not targets.plugin_installed(); "
    "sys.argv = [sys.argv[1]] + sys.argv[2:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def _without_plugins(module, *args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run([sys.executable, "-c", WITHOUT_PLUGINS, module, *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_starts_where_no_jax_plugin_is_installed(module):
    result = _without_plugins(module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


def test_plan_without_the_cuda_plugin_names_the_install_command():
    result = _without_plugins("falqon_jax.train", "--plan", "h100")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA plugin: pip install" in lines[0] and "[h100]" in lines[0]


def test_install_command_fits_how_the_package_was_installed():
    from falqon_jax import packaged

    command = packaged.install_command("h100")
    # this checkout is installed editable (pip install -e): the command names its folder
    assert command in (f'pip install -e "{REPO}[h100]"', 'pip install "falqon-jax[h100]"') \
        or command.startswith('pip install "falqon-jax[h100] @ '), command


def _wheel(tmp_path):
    """The package built as a wheel and installed (not editable) into a folder of its own."""
    pytest.importorskip("setuptools", minversion="77")
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("falqon_jax-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    return site


def test_a_wheel_ships_the_cards_and_recipes_and_runs_the_demo_from_anywhere(tmp_path):
    site = _wheel(tmp_path)
    assert sorted(p.name for p in (site / "falqon_jax" / "cards").glob("*.toml")) == \
        sorted(p.name for p in (REPO / "models").glob("*.toml"))
    assert sorted(p.name for p in (site / "falqon_jax" / "recipes").glob("*.toml")) == \
        sorted(p.name for p in (REPO / "train").glob("*.toml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    check = ("import falqon_jax; print(falqon_jax.__file__); "
             "from falqon_jax.model.config import card_source; print(card_source('llama-7b')); "
             "from falqon_jax.train.config import resolve; "
             "print(resolve(['--recipe', 'train/llama-7b-alpaca-falqon.toml'])[0].data); "
             "print(resolve(['--recipe', 'smollm2-135m-capybara-falqon'])[0].model)")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            env=env, cwd=elsewhere, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(site)), lines  # the wheel's package, not the checkout
    assert lines[1:] == ["huggyllama/llama-7b", "tatsu-lab/alpaca",
                         "HuggingFaceTB/SmolLM2-135M-Instruct"]
    demo = subprocess.run([sys.executable, "-m", "falqon_jax.train", "--steps", "2",
                           "--log-every", "1", *QUICK], capture_output=True, text=True,
                          env=env, cwd=elsewhere, timeout=600)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert [r["step"] for r in _metrics(elsewhere / "runs" / "demo")] == [1, 2]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "falqon_jax").rglob("__init__.py")}
    assert found <= listed, found - listed


def test_data_without_a_model_is_refused_before_any_download(tmp_path, capsys):
    data = tmp_path / "my.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    code, _, err = _run(capsys, "--data", data, "--out", tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--data {data} needs --model" in lines[0], err
    assert not (tmp_path / "out").exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'data = "{data}"\n')
    with pytest.raises(ConfigError, match="names no model"):
        resolve(["--recipe", str(recipe)])
    config, _ = resolve(["--data", "demo", "--steps", "3"])  # the demo's own data: the demo
    assert config.is_demo and config.model == "tiny"


def test_recipes_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_path, _ = resolve(["--recipe", "train/llama-7b-alpaca-falqon.toml"])
    by_name, _ = resolve(["--recipe", "llama-7b-alpaca-falqon"])
    assert by_path == by_name and by_name.model == "huggyllama/llama-7b"
    with pytest.raises(ConfigError, match="smollm2-135m-capybara-falqon"):
        resolve(["--recipe", "llama-70b"])
    own = tmp_path / "train" / "llama-7b-alpaca-falqon.toml"  # a file of the user's wins
    own.parent.mkdir()
    own.write_text('model = "my/model"\ndata = "my/data"\n')
    assert resolve(["--recipe", "train/llama-7b-alpaca-falqon.toml"])[0].model == "my/model"


@pytest.mark.parametrize("line, expected", [
    ('rank = "64"', ("rank", 64)),
    ("lr = 1", ("lr", 1.0)),
    ('lr = "3e-4"', ("lr", 3e-4)),
    ('max_time = "3h"', ("max_time", 10800.0)),
    ("max_time = 90", ("max_time", 90.0)),
    ('targets = ["q", "v"]', ("targets", ("q", "v"))),
    ('targets = "q,v"', ("targets", ("q", "v"))),
    ("remat = false", ("remat", False)),
])
def test_recipe_values_are_read_like_the_same_flags(tmp_path, line, expected):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "m"\ndata = "d"\n{line}\n')
    config, _ = resolve(["--recipe", str(recipe)])
    assert getattr(config, expected[0]) == expected[1]


@pytest.mark.parametrize("line, message", [
    ('rank = "6x4"', "rank = '6x4' is not valid for --rank; expected an integer"),
    ("rank = 6.5", "expected an integer"),
    ("rank = true", "expected an integer"),
    ('lr = "fast"', "expected a number"),
    ('max_time = "soon"', "expected a duration"),
    ('remat = "yes"', "expected true or false"),
    ('method = "dora"', "expected one of falqon, lora, fp8_lora, qlora, full"),
    ("out = 3", "expected a string"),
    ("targets = 3", "expected a list of layer names"),
])
def test_recipe_values_of_the_wrong_type_are_one_line(tmp_path, capsys, line, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "m"\ndata = "d"\n{line}\n')
    code, _, err = _run(capsys, "--recipe", recipe)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: recipe {recipe}: ") \
        and message in lines[0], err


def test_help_says_what_every_flag_does_and_its_defaults():
    from falqon_jax.train.config import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = parser.format_help()
    assert "adapter rank (default: demo 16, paper 64)" in " ".join(text.split())
    assert "AdamW beta2 (default: 0.999)" in " ".join(text.split())


# --------------------------------------------------------------------------------------
# A full disk anywhere the run writes: one line, exit 74, nothing lost.

def _one_error_line(err):
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("train:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json.partial"])
def test_a_full_disk_under_a_runs_files_is_one_line_and_exit_74(tmp_path, capsys, name):
    """``/dev/full`` behind the file's name: every write to it fails with ENOSPC."""
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to("/dev/full")
    code, _, err = _run(capsys, "--steps", 2, "--log-every", 1, "--out", out, *QUICK)
    assert code == 74
    target = out / name.removesuffix(".partial")
    # metrics.jsonl fails at step 1's line, after config.json is written; config.json first
    saved, then = ("no checkpoint is complete yet", "continue with --resume") \
        if name == "metrics.jsonl" else \
        ("nothing of the run is saved yet", "run the same command again")
    assert _one_error_line(err) == (
        f"error: cannot write {target}: No space left on device; {saved}: fix that (e.g. "
        f"free space) and {then}")
    (out / name).unlink(missing_ok=True)  # space freed: the same run continues
    again = ["--resume"] if name == "metrics.jsonl" else []
    code, _, err = _run(capsys, "--steps", 2, "--log-every", 1, "--out", out, *again, *QUICK)
    assert code == 0, err
    assert [r["step"] for r in _metrics(out)] == [1, 2]


def test_a_full_file_system_is_one_line_and_exit_74(tmp_path):
    """The run's folder on a 256 kB tmpfs: its config and metrics fit, its frozen weights
    and checkpoints do not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="", PYTHONUNBUFFERED="1")
        result = subprocess.run(
            [sys.executable, "-m", "falqon_jax.train", "--steps", "4", "--save-every", "2",
             "--out", str(out), "--sample-tokens", "0"],
            capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 74, result.stderr[-3000:]
        line = _one_error_line(result.stderr)
        assert line.startswith("error: cannot write ") and \
            "No space left on device" in line and "continue with --resume" in line, line
        assert json.loads((out / "config.json").read_text())["steps"] == 4
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --------------------------------------------------------------------------------------
# The schedule a resume keeps.

WARM = ["--warmup-ratio", "0.5", "--log-every", "1", *QUICK]  # 4 warm-up steps of 8


def test_a_stopped_run_resumed_equals_the_uninterrupted_one_during_warm_up(tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run(capsys, "--steps", 8, "--out", whole, *WARM)[0] == 0
    lrs = [r["lr"] for r in _metrics(whole)]
    assert lrs[:5] == pytest.approx([0.0, 0.005, 0.01, 0.015, 0.02])  # demo lr 2e-2
    # stopped by --max-time after its first step (the first step compiles: over 1 s)
    code, _, err = _run(capsys, "--steps", 8, "--out", cut, "--max-time", "1s", *WARM)
    assert code == 75, err
    assert _run(capsys, "--out", cut, "--resume")[0] == 0
    assert [r["lr"] for r in _metrics(cut)] == lrs
    assert [r["loss"] for r in _metrics(cut)] == [r["loss"] for r in _metrics(whole)]
    assert_same_saved_state(whole, cut, 8)


def _schedule(config):
    from falqon_jax.train.trainer import learning_rate

    return [float(learning_rate(config)(step)) for step in range(config.steps)]


def _saved_run(out, **settings):
    """``out`` holding the ``config.json`` of a demo run with ``settings``."""
    from falqon_jax.train.config import DEMO

    out.mkdir()
    saved = dataclasses.replace(DEMO, out=str(out), warmup_ratio=0.5, **settings)
    (out / "config.json").write_text(saved.to_json())
    return saved


def test_resuming_with_other_steps_keeps_the_planned_schedule(tmp_path, capsys):
    from falqon_jax.train.run import kept_schedule

    saved = _saved_run(tmp_path / "run", steps=2)  # 1 warm-up step
    longer = kept_schedule(dataclasses.replace(saved, steps=5))
    assert ("--steps 5: the learning rate keeps the schedule planned for 2 steps (1 warm-up "
            "step, then at its peak)") in capsys.readouterr().err
    assert longer.schedule_steps == 2 and longer.steps == 5
    assert _schedule(longer) == pytest.approx([0.0, 0.02, 0.02, 0.02, 0.02])
    # planned for 8 steps, trained to 3: the same learning rates as one run of 8
    planned = dataclasses.replace(saved, steps=3, schedule_steps=8)
    whole = dataclasses.replace(saved, steps=8)
    assert _schedule(kept_schedule(dataclasses.replace(planned, steps=8))) == \
        _schedule(whole)[:8]
    assert _schedule(planned) == _schedule(whole)[:3]


def test_resuming_past_the_end_of_a_decay_is_refused_with_the_choice(tmp_path):
    from falqon_jax.train.run import UserError, kept_schedule

    saved = _saved_run(tmp_path / "run", steps=2, schedule="cosine")
    with pytest.raises(UserError) as info:
        kept_schedule(dataclasses.replace(saved, steps=4))
    assert str(info.value) == (
        "--steps 4 goes past step 2, where this run's cosine schedule brings the learning "
        "rate to 0; resume with --steps 2 or less, or add --schedule-steps 4 to plan the "
        "decay anew (the steps still to come then get other learning rates)")
    anew = kept_schedule(dataclasses.replace(saved, steps=4, schedule_steps=4))
    assert anew.schedule_steps == 4 and _schedule(anew)[3] > 0
    shorter = kept_schedule(dataclasses.replace(saved, steps=1))
    assert _schedule(shorter) == _schedule(saved)[:1]
