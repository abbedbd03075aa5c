"""Compile-only GPU targets: compile a jitted program for a GPU that is not there.

XLA's whole GPU compiler (HLO passes, the FP8 GEMM rewrite to cuBLASLt, Triton GEMM kernels,
PTX, buffer assignment) runs on a CPU-only machine when JAX's CUDA plugin is installed
(``pip install -e ".[h100]"``): a GPU *target config* stands in for the device. The
compiled program is the one the GPU would run, so its memory (``memory_analysis()``), its
GEMMs and its copies can be read; it cannot be executed.

* :data:`TARGETS` -- the GPUs offered (``h100``, ``h200``, ``a100``, ``l4``): a target
  config each, plus the datasheet peaks the benchmarks' roofline bounds use.
* :func:`use_compile_only` -- keep JAX on the CPU so the CUDA plugin registers its
  compile-only topology without looking for a driver (``JAX_PLATFORMS=cpu``, set inside the
  process: users need not know it). Call it before JAX first touches a device.
* :func:`target_mesh` -- a mesh of ``n`` compile-only devices of a target.
* :data:`GEMM_BACKENDS` -- without the device XLA cannot autotune, so each program is
  compiled once per back end a real GPU's autotuner picks between: cuBLAS(Lt), and Triton
  with one fixed Hopper tiling (the tile must divide every GEMM dimension of the program).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np

from falqon_jax import packaged

GIB = 2**30


class TargetError(ValueError):
    """A target that cannot be used here (unknown name, no CUDA plugin, JAX already on a
    device); the message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU to compile for.

    ``memory_bytes`` is the device memory XLA is told about (nvidia-smi's total);
    ``bf16_tflops`` / ``fp8_tflops`` (``None``: no FP8 tensor cores) / ``tf32_tflops`` are
    dense tensor-core peaks without sparsity and ``hbm_bytes_per_s`` the memory bandwidth,
    from the vendor's datasheet (SXM parts where there are several).
    """

    name: str
    device: str
    compute_capability: tuple[int, int]
    cores: int
    clock_ghz: float
    memory_bytes: int
    hbm_bytes_per_s: float
    l2_bytes: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    threads_per_core: int
    bf16_tflops: float
    fp8_tflops: float | None
    tf32_tflops: float

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tflops is not None

    def config_proto(self) -> str:
        """The ``GpuTargetConfigProto`` (text format) XLA compiles against; the fields of an
        H100 as XLA reports it on the device, with this GPU's values, and the CUDA 12.9 /
        cuDNN 9.8 versions the jax-cuda12 plugin is built against."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: {self.threads_per_core}
  core_count: {self.cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.hbm_bytes_per_s)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
  patch: 0
}}
runtime_version {{
  major: 12
  minor: 9
  patch: 0
}}
device_description_str: "{self.device}"
"""


TARGETS: dict[str, Target] = {
    "h100": Target("h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 84_929_347_584,
                   3.35e12, 50 * 2**20, 233_472, 232_448, 2048, 989.4, 1978.9, 494.7),
    "h200": Target("h200", "NVIDIA H200", (9, 0), 132, 1.98, 150_754_820_096,
                   4.8e12, 50 * 2**20, 233_472, 232_448, 2048, 989.4, 1978.9, 494.7),
    "a100": Target("a100", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 85_899_345_920,
                   2.039e12, 40 * 2**20, 167_936, 166_912, 2048, 312.0, None, 156.0),
    "l4": Target("l4", "NVIDIA L4", (8, 9), 58, 2.04, 24_152_899_584,
                 0.3e12, 48 * 2**20, 102_400, 101_376, 1536, 121.0, 242.0, 60.0),
}

# Compiler options per GEMM back end (XLA DebugOptions for one compile). The Triton tiling
# 64x64x64 with 3 stages divides every GEMM dimension of the benchmarked programs (rank 64
# included) and fits the shared memory of every target above.
TRITON_TILING = "block_m: 64 block_n: 64 block_k: 64 num_stages: 3 num_warps: 4 num_ctas: 1"
GEMM_BACKENDS: dict[str, dict[str, Any]] = {
    "cublaslt": {"xla_gpu_enable_triton_gemm": False},
    "triton": {"xla_gpu_override_gemm_autotuner": TRITON_TILING},
}

# JAX preallocates this fraction of a GPU's memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_DEFAULT_MEMORY_FRACTION = 0.75


def get(name: str) -> Target:
    """The target called ``name``; :class:`TargetError` listing the names otherwise."""
    try:
        return TARGETS[name.strip().lower()]
    except KeyError:
        raise TargetError(f"unknown GPU target {name!r}; choose from "
                          f"{', '.join(TARGETS)}") from None


CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (the GPU compiler; the ``h100`` extra) is installed.

    Without any JAX plugin the namespace package ``jax_plugins`` does not exist, and
    ``find_spec`` of one of its submodules would raise, so the parent is looked up first."""
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)


def use_compile_only() -> None:
    """Keep JAX's runtime on the CPU so the CUDA plugin offers compile-only devices without
    a driver. Must run before JAX first uses a device; raises :class:`TargetError` when the
    plugin is missing or JAX already runs on another platform."""
    if not plugin_installed():
        raise TargetError("compiling for a GPU needs JAX's CUDA plugin: "
                          + packaged.install_command("h100"))
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() != "cpu" and "cpu" not in (jax.config.jax_platforms or ""):
            raise TargetError("JAX already runs on a device here; compile for a GPU target in "
                              "a fresh process (JAX_PLATFORMS=cpu)")
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # inherited by any subprocess
    jax.config.update("jax_platforms", "cpu")


_MESHES: dict[tuple[str, int, tuple[str, ...]], Any] = {}


def target_mesh(target: Target, shape: tuple[int, ...] = (1,),
                axes: tuple[str, ...] = ("d",)) -> Any:
    """A ``jax.sharding.Mesh`` of ``prod(shape)`` compile-only devices of ``target`` (one
    node, ``topology="1x1xN"``), with ``axes`` named as given."""
    key = (target.name, int(np.prod(shape)), axes)
    if key not in _MESHES:
        use_compile_only()
        from jax.experimental import topologies

        count = int(np.prod(shape))
        topology = topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{count}", target_config=target.config_proto())
        _MESHES[key] = topologies.make_mesh(topology, shape, axes)
    return _MESHES[key]


def peak_bytes(compiled: Any) -> dict[str, int]:
    """Memory of a compiled program per device: ``arguments``, ``outputs``, ``aliased``
    (outputs written into donated arguments), ``temporaries`` and ``peak`` (XLA's own peak
    of live buffers where it reports one, else arguments + outputs - aliased +
    temporaries)."""
    memory = compiled.memory_analysis()
    parts = {
        "arguments": int(memory.argument_size_in_bytes),
        "outputs": int(memory.output_size_in_bytes),
        "aliased": int(memory.alias_size_in_bytes),
        "temporaries": int(memory.temp_size_in_bytes),
    }
    reported = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
    parts["peak"] = reported or (parts["arguments"] + parts["outputs"] - parts["aliased"]
                                 + parts["temporaries"])
    return parts
