"""The communication of the sharded train step, read from its compiled program.

:func:`step_collectives` lowers and compiles the real train step (:class:`Trainer`) of a
model card over a device mesh from abstract shapes -- no weights are allocated, so
``llama-7b`` works on a laptop -- and counts the collectives per loop body with
:func:`falqon_jax.gpu_program.collectives_by_loop`. The decoder layers are one ``nn.scan``
loop in the forward and one in the backward, so those bodies' counts are the per-layer
collectives.

Two programs are read:

* ``partitioned``: the HLO right after XLA's SPMD partitioner (from an XLA dump), before
  backend passes: which collectives the partitioner chose, and in which dtype.
* ``compiled``: the final optimized HLO of the backend in use. XLA:CPU has no float8
  collectives and widens FP8 all-gathers to f16 here; a GPU build keeps them 1 byte.

The dump needs ``XLA_FLAGS`` set before JAX starts, so ``python -m falqon_jax.bench
collectives`` runs this in a fresh interpreter (see :func:`child_environment`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from falqon_jax import gpu_program, sharding
from falqon_jax.model.config import load_card
from falqon_jax.train.config import PAPER, TrainConfig
from falqon_jax.train.plan import abstract_step

DUMP_ENV = "FALQON_HLO_DUMP"


def child_environment(devices: int, dump_dir: Path) -> dict[str, str]:
    """Environment for a fresh interpreter that simulates ``devices`` host devices (used
    only if the backend is the CPU) and dumps the HLO after SPMD partitioning."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags += (f" --xla_force_host_platform_device_count={devices}"
              f" --xla_dump_to={dump_dir} --xla_dump_hlo_pass_re=spmd-partitioning")
    return dict(os.environ, XLA_FLAGS=flags.strip(), **{DUMP_ENV: str(dump_dir)})


def label(loop: str) -> str:
    """A readable name for a loop of the train step (forward/backward per layer, ...)."""
    if loop == "top level":
        return "per step (outside loops)"
    if "transpose(" in loop and "Llama" in loop:
        return "backward, per layer"
    if "jvp(Llama" in loop:
        return "forward, per layer"
    if loop.endswith("/while") and loop.count("/while") == 1:
        return "per micro-batch (outside layers)"
    return loop


def step_collectives(
    card: str, method: str, mesh_spec: str, *, rank: int, batch: int, seq: int,
    grad_accum: int, remat: bool, top_k: int = PAPER.top_k,
) -> dict[str, Any]:
    """Compile the sharded train step of ``card`` and count its collectives.

    Returns a dict with ``mesh``, ``partitioned`` / ``compiled`` (``{label: {"<op> <dtype>":
    count}}``; ``partitioned`` is ``None`` unless run under :func:`child_environment`) and
    per-device ``argument_bytes`` / ``temp_bytes`` from ``memory_analysis()``.
    """
    config = dataclasses.replace(
        PAPER, model=card, method=method, rank=rank, batch_size=batch, grad_accum=grad_accum,
        mesh=mesh_spec, remat=remat, top_k=top_k, dtype="bfloat16",
    )
    mesh = sharding.parse_mesh(mesh_spec)
    sharding.check_batch(mesh, batch, grad_accum)
    compiled = _compile(config, mesh, seq)
    dump = os.environ.get(DUMP_ENV)
    partitioned = _partitioned_text(Path(dump)) if dump else None
    memory = compiled.memory_analysis()
    return {
        "model": card, "method": method, "mesh": dict(mesh.shape), "rank": rank,
        "batch": batch, "seq": seq, "grad_accum": grad_accum, "remat": remat,
        "backend": jax.default_backend(),
        "partitioned": by_loop(partitioned) if partitioned else None,
        "compiled": by_loop(compiled.as_text()),
        "argument_bytes": int(getattr(memory, "argument_size_in_bytes", -1)),
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
    }


def _compile(config: TrainConfig, mesh: jax.sharding.Mesh, seq: int) -> Any:
    return abstract_step(config, load_card(config.model), mesh, seq).compile()


def _partitioned_text(dump_dir: Path) -> str | None:
    found = sorted(dump_dir.glob("*_train_step*after_spmd-partitioning*.txt"),
                   key=lambda p: p.stat().st_size)
    return found[-1].read_text() if found else None


def by_loop(text: str) -> dict[str, dict[str, int]]:
    """Collectives of HLO text per loop :func:`label` (``{label: {"<op> <dtype>": n}}``)."""
    result: dict[str, dict[str, int]] = {}
    for loop in gpu_program.collectives_by_loop(gpu_program.parse(text)):
        merged = result.setdefault(label(loop.loop), {})
        for key, n in loop.counts.items():
            merged[key] = merged.get(key, 0) + n
    return result


def format_report(row: dict[str, Any]) -> str:
    """A readable table of one :func:`step_collectives` result."""
    lines = [f"{row['method']} on {row['model']}, mesh {row['mesh']}, batch {row['batch']} x "
             f"{row['seq']} tokens, grad-accum {row['grad_accum']}, remat {row['remat']}, "
             f"backend {row['backend']}"]
    for view in ("partitioned", "compiled"):
        table = row[view]
        if table is None:
            continue
        lines.append(f"  {view}:")
        for label, counts in table.items():
            text = ", ".join(f"{n} {key}" for key, n in sorted(counts.items()))
            lines.append(f"    {label:34s} {text}")
    lines.append(f"  per device: arguments {row['argument_bytes'] / 2**20:.1f} MiB, "
                 f"temporaries {row['temp_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)
