"""Device meshes and partition rules for FSDP + data-parallel training (JAX SPMD).

The mesh has two axes, ``data`` and ``fsdp``. Every batch is split over both (each device
sees ``batch / (data * fsdp)`` rows). Every array of the train state -- FP8 melded weights,
``b``, proxy buffers, AdamW moments, norms, embeddings -- is split along ``fsdp`` on its
largest axis that divides evenly (never the stacked layer axis of ``nn.scan``'d params), and
replicated over ``data``; arrays with no such axis (scalars, scales) are replicated. XLA's
SPMD partitioner inserts the collectives; no communication is written by hand. Inside a
traced step run under :func:`gathering_weights`, the layers call :func:`gathered` on their
weights: a sharding constraint that makes XLA all-gather each weight in its stored dtype just
before its GEMM (FP8 weights travel as 1 byte per value) and keep the activations split by
rows -- the FSDP pattern -- rather than splitting a GEMM's contraction over devices, which
would also change its float32 summation order.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

_GATHER_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "falqon_gather_mesh", default=None
)


class MeshError(ValueError):
    """A ``--mesh`` specification that cannot be built; the message says why."""


def mesh_sizes(spec: str, available: int) -> dict[str, int]:
    """Axis sizes of ``spec`` like ``"data=2,fsdp=4"`` or ``"fsdp=1"`` given ``available``
    devices. Axes left out have size 1, except that an empty ``spec`` puts every device on
    ``fsdp``. Raises :class:`MeshError` for a bad spec or too few devices."""
    sizes = {"data": 1, "fsdp": available} if not spec.strip() else {"data": 1, "fsdp": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise MeshError(
                f"bad --mesh entry {part!r}: use data=N and/or fsdp=N with N >= 1 "
                "(tensor parallelism is not supported)"
            )
        sizes[name] = int(value)
    needed = sizes["data"] * sizes["fsdp"]
    if needed > available:
        raise MeshError(f"--mesh {spec} needs {needed} devices, only {available} available")
    return sizes


def parse_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the mesh for ``spec`` (see :func:`mesh_sizes`) over the first
    ``data * fsdp`` devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(spec, len(devices))
    needed = sizes["data"] * sizes["fsdp"]
    grid = np.asarray(devices[:needed], dtype=object).reshape(sizes["data"], sizes["fsdp"])
    return Mesh(grid, AXES)


def optional_mesh(spec: str | None) -> Mesh | None:
    """A command's ``--mesh``: ``None`` where none was given (one device), else
    :func:`parse_mesh`; raises :class:`MeshError` for a bad one."""
    return None if spec is None else parse_mesh(spec)


def _is_stacked(path) -> bool:
    return any(getattr(entry, "key", None) == "layers" for entry in path)


def leaf_spec(shape: tuple[int, ...], fsdp: int, stacked: bool) -> PartitionSpec:
    """Shard the last axis if ``fsdp`` divides it, else the largest axis it divides (never a
    stacked layer axis 0); replicate if none.

    The last axis first: a melded weight ``(out + rank, in)`` split along ``in`` keeps its
    backbone rows ``[:out]`` and ``A`` rows ``[out:]`` local slices, where a split along rows
    would force XLA to re-gather it for every slice.
    """
    if fsdp == 1 or not shape:
        return PartitionSpec()
    first = 1 if stacked else 0  # a stacked (layers,) leaf, e.g. the FP8 scales: replicate
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    last = len(shape) - 1
    axis = last if last in candidates else max(candidates, key=lambda a: (shape[a], -a))
    spec: list[str | None] = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """A ``NamedSharding`` for every array leaf of ``tree`` (other leaves map to ``None``)."""
    fsdp = mesh.shape["fsdp"]

    def pick(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        return NamedSharding(mesh, leaf_spec(tuple(leaf.shape), fsdp, _is_stacked(path)))

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ``data`` x ``fsdp``, the sequence axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_ways(mesh: Mesh) -> int:
    """How many ways :func:`batch_sharding` splits the rows (``data * fsdp``)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(mesh: Mesh, batch_size: int, grad_accum: int) -> None:
    """Each micro-batch must split evenly over the mesh's batch axes."""
    ways = batch_ways(mesh)
    micro = batch_size // grad_accum
    if micro % ways:
        raise MeshError(
            f"the micro-batch of {micro} rows (--batch-size {batch_size} / --grad-accum "
            f"{grad_accum}) does not divide over {ways} devices (--mesh); adjust them"
        )


def global_batch(sharding: NamedSharding, rows: np.ndarray) -> jax.Array:
    """A global array from the full batch every host holds: each process contributes its
    own slice of rows (multi-host data loading; on one host, all rows)."""
    per_process = rows.shape[0] // jax.process_count()
    start = jax.process_index() * per_process
    local = rows[start : start + per_process]
    return jax.make_array_from_process_local_data(sharding, local, rows.shape)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of ``tree``'s arrays resident on each device (read from their shards)."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", []):
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


@contextlib.contextmanager
def gathering_weights(mesh: Mesh | None) -> Iterator[None]:
    """While tracing inside this context, :func:`gathered` all-gathers weights over ``mesh``."""
    token = _GATHER_MESH.set(mesh)
    try:
        yield
    finally:
        _GATHER_MESH.reset(token)


def gathered(weight: jax.Array) -> jax.Array:
    """``weight`` (any shape and dtype) replicated on every device of the mesh set by
    :func:`gathering_weights`: an FSDP all-gather in ``weight``'s own dtype, placed right
    before its use. Unchanged outside that context or on a one-device mesh."""
    mesh = _GATHER_MESH.get()
    if mesh is None or mesh.size == 1:
        return weight
    return jax.lax.with_sharding_constraint(weight, NamedSharding(mesh, PartitionSpec()))
