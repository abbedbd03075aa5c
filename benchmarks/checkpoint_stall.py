"""Checkpoint size and save stall of the training loop, before and after checkpoints held
only what changes and were written asynchronously.

    python benchmarks/checkpoint_stall.py sizes             # computed from shapes, no weights
    python benchmarks/checkpoint_stall.py stall --model DIR # measured: real train steps + saves

``sizes`` prints, per method, the bytes of the train state that training changes (written
with every checkpoint) and of the frozen rest (written once per run), for LLaMA-7B (the
``llama-7b`` card) and SmolLM2-135M (``--smollm2 DIR``, a Hugging Face directory; default
the converted copy in ``~/.cache/falqon-jax``), at the paper's settings (rank 64, the seven
decoder projections, bf16).

``stall`` loads a Hugging Face LLaMA (FALQON, default rule, rank 64), trains ``--steps``
steps on random tokens and saves every ``--save-every`` steps, three ways:

* ``whole, sync`` -- the previous behaviour: the whole train state in every checkpoint,
  the loop waiting for each write;
* ``changing, sync`` -- the changing part only, still waiting for each write;
* ``changing, async`` -- what ``python -m falqon_jax.train`` does now: the changing part,
  written while training goes on (the loop waits only for the copy off the devices, the
  fingerprints and, if still running, the previous write).

It reports the time the loop spent blocked in each save (the stall; the first save of the
new store also checks the frozen part once), the time the last background write took to
finish after the loop, the bytes of one checkpoint on disk and, for scale, how long the
fingerprint of the saved part takes on its own.
Run from the repository root (``PYTHONPATH=.`` without an installed package).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from falqon_jax.train.config import PAPER, TrainConfig

SMOLLM2 = Path.home() / ".cache" / "falqon-jax" / "smollm2-135m-instruct"
METHODS = [("falqon", "visible"), ("falqon", "paper"), ("lora", None), ("fp8_lora", None),
           ("qlora", None), ("full", None)]


# --------------------------------------------------------------------------------------
# Sizes from shapes.


def state_bytes(config: TrainConfig) -> tuple[int, int]:
    """``(changing, frozen)`` bytes of the train state of ``config``'s run, from shapes."""
    from falqon_jax.model.llama import abstract_params, trainable_mask
    from falqon_jax.train import state_parts
    from falqon_jax.train.runs import run_module
    from falqon_jax.train.trainer import Trainer

    module = run_module(config)
    params = abstract_params(module)
    mask = trainable_mask(params, module.plan)
    trainer = Trainer(config, forward=None, mask=mask)
    state = jax.eval_shape(trainer.fresh_state, params)
    changing = state_parts.changing_mask(
        state, mask, writes_w8=state_parts.rule_writes_w8(config.method, config.rule))

    def nbytes(part: Any) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(part))

    return (nbytes(state_parts.select(state, changing)),
            nbytes(state_parts.select(state, state_parts.invert(changing))))


def sizes(args: argparse.Namespace) -> None:
    models = [("LLaMA-7B", "llama-7b")]
    if Path(args.smollm2).is_dir():
        models.append(("SmolLM2-135M", str(args.smollm2)))
    else:
        print(f"(no {args.smollm2}: SmolLM2-135M left out)", file=sys.stderr)
    rows = []
    for name, model in models:
        for method, rule in METHODS:
            config = dataclasses.replace(PAPER, model=model, data="x", method=method,
                                         rule=rule or PAPER.rule)
            changing, frozen = state_bytes(config)
            label = f"{method} ({rule})" if rule else method
            rows.append({"model": name, "method": label, "changing_bytes": changing,
                         "frozen_bytes": frozen})
            print(f"{name:13s} {label:18s} per checkpoint {changing / 1e9:7.3f} GB  "
                  f"once per run {frozen / 1e9:7.3f} GB  (before: {(changing + frozen) / 1e9:7.3f}"
                  " GB per checkpoint)")
    _write_json(args.json, rows)


# --------------------------------------------------------------------------------------
# Measured stall.


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stall(args: argparse.Namespace) -> None:
    import logging

    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on every save

    from falqon_jax.model.loading import load_model
    from falqon_jax.train import state_parts
    from falqon_jax.train.checkpoints import CheckpointStore
    from falqon_jax.train.fingerprint import fingerprint
    from falqon_jax.train.trainer import Trainer

    config = dataclasses.replace(PAPER, model=str(args.model), data="x", rank=args.rank,
                                 dtype=args.dtype, batch_size=args.batch_size, remat=False)
    began = time.perf_counter()
    model = load_model(config.model, method="falqon", rank=config.rank, alpha=config.alpha,
                       dtype=config.dtype)
    print(f"loaded and converted {args.model} in {time.perf_counter() - began:.1f} s",
          file=sys.stderr)

    def forward(params, tokens, attention):
        return model.module.apply({"params": params}, tokens, attention)

    trainer = Trainer(config, forward, model.trainable())
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.seq_len)
    batch = (jnp.asarray(rng.integers(3, model.config.vocab_size, shape), jnp.int32),
             jnp.ones(shape, jnp.float32), jnp.ones(shape, jnp.int32))
    initial = model.params
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for way in ("whole, sync", "changing, sync", "changing, async"):
            out = Path(tmp) / way.replace(", ", "_")
            state = trainer.init_state(jax.tree.map(jnp.copy, initial))  # steps donate it
            changing = state_parts.changing_mask(state, trainer.mask, writes_w8=False)
            if way == "whole, sync":  # the previous CheckpointStore.save
                manager = ocp.CheckpointManager(
                    out / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))

                def save(step, state, manager=manager):
                    manager.save(step, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        meta=ocp.args.JsonSave({"step": step})), force=True)
                    manager.wait_until_finished()

                finish, close = (lambda: None), manager.close
            else:
                store = CheckpointStore(out, 3, changing)
                store.write_frozen(state)
                sync = way == "changing, sync"

                def save(step, state, store=store, sync=sync):
                    store.save(step, state, {"step": step})
                    if sync:
                        store.wait()

                finish, close = store.wait, store.close
            stalls, steps = [], []
            for step in range(1, args.steps + 1):
                began = time.perf_counter()
                state, metrics = trainer.train_step(state, *batch)
                float(metrics["loss"])
                steps.append(time.perf_counter() - began)
                if step % args.save_every == 0:
                    began = time.perf_counter()
                    save(step, state)
                    stalls.append(time.perf_counter() - began)
            began = time.perf_counter()
            finish()
            tail = time.perf_counter() - began
            close()
            last = out / "checkpoints" / str(args.steps - args.steps % args.save_every)
            timings = []
            for _ in range(3 if way != "whole, sync" else 0):  # the previous saves had none
                began = time.perf_counter()  # what hashing the saved part costs on its own
                fingerprint(state_parts.select(state, changing))
                timings.append(time.perf_counter() - began)
            row = {"way": way, "stall_s": stalls, "stall_median_s": statistics.median(stalls),
                   "final_wait_s": tail, "step_median_s": statistics.median(steps[1:]),
                   "fingerprint_s": statistics.median(timings) if timings else None,
                   "checkpoint_bytes": _dir_bytes(last),
                   "frozen_bytes": _dir_bytes(out / "frozen") if (out / "frozen").exists()
                   else 0}
            results.append(row)
            each = ", ".join(f"{s:.3f}" for s in stalls)
            print(f"{way:16s} stall per save {row['stall_median_s']:.3f} s (median of "
                  f"{len(stalls)}: {each}), last write finished {tail:.3f} s after the loop; "
                  f"checkpoint {row['checkpoint_bytes'] / 1e6:.1f} MB, frozen once "
                  f"{row['frozen_bytes'] / 1e6:.1f} MB; step {row['step_median_s']:.2f} s"
                  + (f"; fingerprint of the saved part {row['fingerprint_s']:.3f} s"
                     if timings else ""))
            shutil.rmtree(out)
    _write_json(args.json, {"machine": _machine(), "settings": vars(args),
                            "results": results})


def _machine() -> dict[str, Any]:
    import flax
    import optax
    import orbax.checkpoint as ocp

    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "?",
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def _write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("sizes", help="checkpoint bytes per method, from shapes")
    s.add_argument("--smollm2", default=str(SMOLLM2), help="SmolLM2-135M as a HF directory")
    s.add_argument("--json", help="also write the rows to this file")
    t = commands.add_parser("stall", help="measured save stall of the training loop")
    t.add_argument("--model", default=str(SMOLLM2), help="a Hugging Face LLaMA directory")
    t.add_argument("--rank", type=int, default=64)
    t.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--save-every", type=int, default=3)
    t.add_argument("--tmp", default=None, help="where checkpoints are written (default: "
                   "the system's temporary directory)")
    t.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    sizes(args) if args.command == "sizes" else stall(args)


if __name__ == "__main__":
    main()
