"""FSDP / data-parallel training on 8 simulated CPU devices matches one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from falqon_jax.sharding import MeshError, leaf_spec, parse_mesh

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
MESHES = ["fsdp=1", "fsdp=8", "data=2,fsdp=4"]

# Runs in a fresh interpreter: the simulated device count must be set before JAX starts.
SCRIPT = r"""
import json, sys
import jax, numpy as np
from pathlib import Path
from falqon_jax.train.loop import build_mesh
from falqon_jax.train.run import main
from falqon_jax.train.runs import load_run
from falqon_jax.train.config import resolve

out, model, steps, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[5].split()
meshes = sys.argv[4].split(";")
result = {"devices": jax.device_count(), "runs": {}}
for mesh in meshes:
    run = out / mesh.replace("=", "").replace(",", "_")
    args = ["--steps", steps, "--out", str(run), "--log-every", "1", "--mesh", mesh,
            "--eval-every", "1000", "--save-every", "1000", "--sample-tokens", "0",
            "--batch-size", "16", "--grad-accum", "2", "--method", *method]
    if model != "demo":
        args += ["--model", model, "--data", "demo", "--rank", "16", "--dtype", "float32",
                 "--targets", "q,k,v,o,lm_head"]
    assert main(args) == 0, mesh
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    params = jax.tree_util.tree_flatten_with_path(load_run(run)[0].params)[0]
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in params}
    np.savez(run / "params.npz", **{k: v.view(np.uint8) if v.dtype.itemsize == 1
                                    and v.dtype.kind == "V" or "float8" in str(v.dtype)
                                    else v for k, v in leaves.items()})
    result["runs"][mesh] = {"losses": losses, "params": str(run / "params.npz")}

# Restore onto a different mesh: continue the checkpoint written on fsdp=8 for one step on
# data=2,fsdp=4 and (a copy of it) on one device; the extra step's losses must agree.
if "--reshard" in sys.argv:
    import shutil
    more = str(int(steps) + 1)
    shutil.copytree(out / "fsdp8", out / "fsdp8_copy")
    for mesh, name in (("data=2,fsdp=4", "fsdp8"), ("fsdp=1", "fsdp8_copy")):
        run = out / name
        assert main(["--steps", more, "--out", str(run), "--mesh", mesh, "--resume",
                     "--log-every", "1", "--eval-every", "1000", "--save-every", "1000",
                     "--sample-tokens", "0", "--batch-size", "16", "--grad-accum", "2",
                     "--method", *method] + ([] if model == "demo" else
                     ["--model", model, "--data", "demo", "--rank", "16", "--dtype", "float32",
                      "--targets", "q,k,v,o,lm_head"])) == 0
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        result["resumed_" + name] = rows[-1]["loss"]

# Per-device parameter bytes on the fsdp=8 mesh, read from the arrays' shardings.
from falqon_jax.sharding import bytes_per_device, tree_shardings
from falqon_jax import load_model
m = load_model(model if model != "demo" else "tiny", method=method[0], rank=16,
               init=None if model != "demo" else "random", dtype="float32")
config, _ = resolve(["--mesh", "fsdp=8"])
mesh = build_mesh(config)
placed = jax.device_put(m.params, tree_shardings(mesh, m.params))
per_device = bytes_per_device(placed)
result["total_bytes"] = sum(np.asarray(x).nbytes for x in jax.tree.leaves(m.params))
result["per_device_bytes"] = sorted(per_device.values())
print("RESULT" + json.dumps(result))
"""


def _run_meshes(tmp_path, model, steps, method, *extra, meshes=MESHES):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), model, str(steps), ";".join(meshes),
         method, *extra],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _compare(result, param_rtol, loss_rtol=1e-4, fp8_changed=0.0):
    """Per-step losses within ``loss_rtol`` (the first step, before any update, within 1e-5);
    at most a fraction ``fp8_changed`` of FP8 weight values different; other leaves within
    ``param_rtol`` of each leaf's largest value."""
    assert result["devices"] == 8
    base = result["runs"]["fsdp=1"]
    ref = np.load(base["params"])
    assert len(result["runs"]) > 1
    for mesh in [m for m in result["runs"] if m != "fsdp=1"]:
        run = result["runs"][mesh]
        np.testing.assert_allclose(run["losses"][0], base["losses"][0], rtol=1e-5)
        np.testing.assert_allclose(run["losses"], base["losses"], rtol=loss_rtol)
        got = np.load(run["params"])
        assert sorted(got.files) == sorted(ref.files)
        for name in ref.files:
            a, b = ref[name], got[name]
            if a.dtype == np.uint8:  # FP8 weights, compared bit for bit
                assert np.mean(a != b) <= fp8_changed, (name, mesh, np.mean(a != b))
            else:
                scale = float(np.max(np.abs(a))) or 1.0
                assert np.max(np.abs(a - b)) <= param_rtol * scale, name
    total, per_device = result["total_bytes"], result["per_device_bytes"]
    assert len(per_device) == 8
    # Sharded leaves split 8 ways; small replicated leaves (scales, norms) add a little.
    assert max(per_device) < total / 8 * 1.25, (total, per_device)


# Why FALQON runs are compared with a tolerance on the FP8 weights: every step rounds the
# backward's gradients to E5M2 (2 mantissa bits) and the merged rows to E4M3, so a one-ulp
# float32 difference anywhere -- a sharded gradient sum adds its partials in another order --
# can flip one rounding, and the flip moves later steps. One device shows the same thing:
# scaling the frozen MLP weights of stories260K by (1 + 2**-23) (one ulp) changes the second
# step's loss by 3.7e-3 and the third's by 5.6e-4 relative; fsdp=8 and data=2,fsdp=4 stay
# closer (1.7e-7, 8.5e-8, 3.9e-4). A real sharding bug (a gradient summed twice,
# a batch row dropped, a weight slice misplaced) moves the first step's loss or gradients.
# FP8 weights may differ in at most 1% of values per leaf: the flips seen change 0.01-0.35%,
# while top-k merges rewrite 10 rows of every layer (10/48 of the smallest here) each step,
# so a misplaced or missing merge would change far more.
FP8_CHANGED = 0.01


@pytest.mark.slow  # minutes of simulated-mesh runs; .ci/run runs them
def test_falqon_demo_on_meshes_matches_one_device(tmp_path):
    """The demo (FALQON's default rule on the tiny model): the same losses to 1e-4, FP8
    weights bit-identical (the live-``b`` rule never merges into them), ``b`` within 2e-3 of
    each leaf's largest value (Adam-trained, as LoRA's factors below); and a checkpoint
    written on fsdp=8 resumes on data=2,fsdp=4 and on one device with the same loss."""
    result = _run_meshes(tmp_path, "demo", 4, "falqon", "--reshard")
    _compare(result, param_rtol=2e-3, fp8_changed=0.0)
    np.testing.assert_allclose(result["resumed_fsdp8"], result["resumed_fsdp8_copy"], rtol=1e-5)


@pytest.mark.slow  # minutes of simulated-mesh runs; .ci/run runs them
@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/models/stories260K")
def test_stories260k_falqon_fine_tune_on_meshes_matches_one_device(tmp_path):
    """A FALQON fine-tune with the paper's rule (proxy buffers, top-k merges) of the
    pretrained stories260K (q, k, v, o and lm_head melded): the first step's loss to 1e-5,
    three steps to 5e-3 (the one-ulp control above reaches 3.7e-3), FP8 weights equal but
    for rounding flips, ``b`` (zero under this rule) exactly."""
    # data=2,fsdp=4 splits both the batch and the weights; the demo test covers fsdp=8 alone.
    _compare(_run_meshes(tmp_path, str(STORIES), 3, "falqon --rule paper",
                         meshes=["fsdp=1", "data=2,fsdp=4"]),
             param_rtol=1e-6, loss_rtol=5e-3, fp8_changed=FP8_CHANGED)


@pytest.mark.slow
@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/models/stories260K")
def test_stories260k_lora_fine_tune_on_meshes_matches_one_device(tmp_path):
    """A LoRA fine-tune of the pretrained stories260K. Parameters agree to 2e-3 of each
    leaf's largest value: Adam's first step divides by ``|g| + eps``, which turns float32
    summation-order differences of near-zero gradients into visible (harmless) ones."""
    _compare(_run_meshes(tmp_path, str(STORIES), 3, "lora"), param_rtol=2e-3)


def test_mesh_parsing_and_partition_rules():
    import jax

    devices = jax.devices() * 8  # the same CPU device repeated stands in for 8 devices
    assert dict(parse_mesh("", devices).shape) == {"data": 1, "fsdp": 8}
    assert dict(parse_mesh("data=2,fsdp=4", devices).shape) == {"data": 2, "fsdp": 4}
    assert dict(parse_mesh("fsdp=1", devices).shape) == {"data": 1, "fsdp": 1}
    for bad in ("tensor=2", "fsdp=0", "data=x", "fsdp=16"):
        with pytest.raises(MeshError):
            parse_mesh(bad, devices)
    # Last axis if divisible, else the largest divisible one, never the stacked layer axis.
    assert tuple(leaf_spec((4, 4160, 4096), 8, stacked=True)) == (None, None, "fsdp")
    assert tuple(leaf_spec((4, 4160, 4092), 8, stacked=True)) == (None, "fsdp", None)
    assert tuple(leaf_spec((8, 64), 8, stacked=True)) == (None, "fsdp")
    assert tuple(leaf_spec((64, 172), 8, stacked=False)) == ("fsdp", None)
    assert tuple(leaf_spec((8, 3), 8, stacked=True)) == ()
    assert tuple(leaf_spec((8,), 8, stacked=True)) == ()  # per-layer scales: replicated
    assert tuple(leaf_spec((3,), 8, stacked=False)) == ()
    assert tuple(leaf_spec((), 8, stacked=False)) == ()



def test_fsdp_step_gathers_fp8_weights_once_per_layer(tmp_path):
    """The partitioned FALQON train step on fsdp=8 (tiny card: 7 melded projections per
    layer) all-gathers every melded weight as float8_e4m3fn -- 1 byte per value, never
    upcast first -- once in the forward and once in the backward layer body (the remat
    recompute shares the backward's gather); besides them only the live ``b`` of each
    projection (float32, ``out x rank``) and the two norm weights are gathered, and
    nothing reshuffles activations (no all-to-all, no collective-permute)."""
    out = tmp_path / "collectives.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FALQON_HLO_DUMP")}
    proc = subprocess.run(
        [sys.executable, "-m", "falqon_jax.bench", "collectives", "--mesh", "fsdp=8",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forward, per layer" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert row["mesh"] == {"data": 1, "fsdp": 8}
    partitioned = row["partitioned"]
    for body in ("forward, per layer", "backward, per layer"):
        counts = partitioned[body]
        assert counts.get("all-gather f8e4m3fn") == 7, (body, counts)
        gathers = {k: n for k, n in counts.items() if k.startswith("all-gather")}
        assert gathers == {"all-gather f8e4m3fn": 7, "all-gather f32": 7 + 2}, (body, counts)
    for view in (partitioned, row["compiled"]):
        for counts in view.values():
            assert not any(k.startswith(("all-to-all", "collective-permute")) for k in counts)


GENERATE_SCRIPT = r"""
import json, sys
import jax
from falqon_jax import load_model
from falqon_jax.model.generation import generate
from falqon_jax.generate import main
from falqon_jax.sharding import parse_mesh, tree_shardings
from falqon_jax.sources import load_any

m = load_model(sys.argv[1], method="full", dtype="float32")
prompts = [[1] + [10 + 7 * i + j for j in range(i % 5 + 1)] for i in range(8)]
out = {"one": generate(m.module, m.params, prompts, 24)}
for spec in ("fsdp=8", "data=2,fsdp=4"):
    mesh = parse_mesh(spec)
    # what generate --mesh and eval --mesh load: converted onto the mesh, layer by layer
    placed = load_any(sys.argv[1], method="full", dtype="float32", mesh=mesh).model.params
    want = tree_shardings(mesh, m.params)
    for leaf, plain, sharding in zip(jax.tree.leaves(placed), jax.tree.leaves(m.params),
                                     jax.tree.leaves(want), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (spec, leaf.sharding)
        assert (jax.device_get(leaf) == jax.device_get(plain)).all()
    out[spec] = generate(m.module, placed, prompts, 24, mesh=mesh)
    out[spec + " odd batch"] = generate(m.module, placed, prompts[:3], 24, mesh=mesh)
print("RESULT" + json.dumps(out))
assert main(["--model", sys.argv[1], "--prompt-ids", "1,20,30", "--method", "falqon",
             "--rank", "16", "--dtype", "float32", "--max-new-tokens", "8",
             "--mesh", "fsdp=8"]) == 0
"""


@pytest.mark.slow  # minutes of simulated-mesh runs; .ci/run runs them
@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/models/stories260K")
def test_generation_on_meshes_matches_one_device():
    """Greedy generation from stories260K with FSDP-sharded weights (loaded onto the mesh,
    equal to a plain load), the prompts split over the mesh or (3 prompts) replicated, gives
    one device's tokens; the CLI's ``--mesh`` runs
    too (on the FALQON-melded model). In float32 a sharded step differs from one device by
    at most summation order, far below the logit gaps greedy decoding compares. (FALQON's
    FP8 activations can turn such one-ulp differences into rounding flips -- seen here
    after four decoded tokens, one prompt per device -- so its tokens are not compared.)"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, str(STORIES)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    out = json.loads(next(ln for ln in lines if ln.startswith("RESULT"))[len("RESULT"):])
    assert len(out["one"]) == 8 and all(len(row) == 24 for row in out["one"])
    for spec in ("fsdp=8", "data=2,fsdp=4"):
        assert out[spec] == out["one"], spec
        assert out[spec + " odd batch"] == out["one"][:3], spec
    assert len(lines[-1].split(",")) == 8  # the CLI's 8 token ids


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # minutes of simulated-mesh runs; .ci/run runs them
def test_two_processes_train_like_one(tmp_path):
    """Multi-host on one machine: two processes with 4 CPU devices each (gloo collectives)
    join through ``--coordinator``, feed their own rows and train the demo on data=2,fsdp=4
    with the per-step losses of one process with 8 devices; only process 0 prints and logs."""
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # The settings of the demo mesh test's data=2,fsdp=4 run: when that test ran first in
    # this process's session, the 8-device reference below can take its compiled programs
    # from the session's compilation cache.
    flags = ["-m", "falqon_jax.train", "--steps", "4", "--log-every", "1", "--eval-every",
             "1000", "--save-every", "1000", "--sample-tokens", "0", "--batch-size", "16",
             "--grad-accum", "2", "--method", "falqon", "--mesh", "data=2,fsdp=4"]
    env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, *flags, "--out", str(tmp_path / "two"), "--coordinator", coordinator,
         "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # (gloo itself prints connection lines from C++ on every process)
    assert "held-out loss" in outputs[0][0] and "held-out" not in outputs[1][0]
    assert "train:" not in outputs[1][1]  # no second progress bar
    one = subprocess.run(
        [sys.executable, *flags, "--out", str(tmp_path / "one")], capture_output=True,
        text=True, env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    def rows(run):
        return [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text()
                .splitlines()]

    two_rows, one_rows = rows("two"), rows("one")
    assert [r["step"] for r in two_rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two_rows], [r["loss"] for r in one_rows],
                               rtol=1e-4)
    np.testing.assert_allclose(two_rows[-1]["eval_loss"], one_rows[-1]["eval_loss"], rtol=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()
