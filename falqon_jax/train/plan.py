"""The train step of a configuration, compiled from shapes alone (no weights), and
``python -m falqon_jax.train ... --plan h100``: will this run fit on that GPU?

:func:`abstract_step` builds the trainer's own jitted step (:class:`~falqon_jax.train.trainer.
Trainer`) with abstract arguments (``jax.ShapeDtypeStruct`` placed on a mesh), so nothing is
allocated: the benchmarks compile exactly what training runs. :func:`plan` compiles it for
a compile-only GPU (:mod:`falqon_jax.targets`) and reads the peak memory per device; it then
searches the largest batch that fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax import sharding, targets
from falqon_jax.model.attention import choose as choose_attention
from falqon_jax.model.config import LlamaConfig, load_card
from falqon_jax.model.llama import Llama, abstract_params, plan_linears, trainable_mask
from falqon_jax.model.methods import linear_method
from falqon_jax.train.config import TrainConfig, length_buckets
from falqon_jax.train.trainer import Trainer


@dataclasses.dataclass
class AbstractStep:
    """A train step ready to lower: ``step(*args)`` is the trainer's jitted step, ``args``
    the abstract train state and batch ``(tokens, mask, attention)`` of ``batch`` rows of
    ``seq`` tokens."""

    trainer: Trainer
    step: Callable[..., Any]
    args: tuple[Any, ...]
    batch: int
    seq: int

    def compile(self, compiler_options: dict[str, Any] | None = None) -> Any:
        return self.step.lower(*self.args).compile(compiler_options=compiler_options)


def architecture(model: str) -> LlamaConfig:
    """The architecture of ``--model`` and nothing else: a model card's, or the config.json
    of a checkpoint directory or Hub model (for a Hub name only its config and tokenizer
    files are fetched, never weights). ``ValueError`` (one line) when it is none of them."""
    from falqon_jax.model.resolve import classify, model_directory

    if classify(model) == "card":
        return load_card(model)
    return LlamaConfig.from_hf(model_directory(model, weights=False))


def abstract_step(config: TrainConfig, llama_config: LlamaConfig, mesh: jax.sharding.Mesh,
                  seq: int, batch: int | None = None) -> AbstractStep:
    """The trainer's step for ``config`` on ``mesh`` (axes ``data``, ``fsdp``), the state
    placed by the FSDP partition rules and ``batch`` (default ``config.batch_size``) rows of
    ``seq`` tokens split over the batch axes."""
    batch = config.batch_size if batch is None else batch
    plan = plan_linears(llama_config, linear_method(config), targets=config.targets,
                        rank=config.rank, alpha=config.alpha)
    platform = mesh.devices.flat[0].platform
    module = Llama(llama_config, plan, jnp.dtype(config.dtype), remat=config.remat,
                   attention=choose_attention(config.attention, platform, config.dtype))
    params = abstract_params(module)

    def forward(p, tokens, attention):
        return module.apply({"params": p}, tokens, attention)

    trainer = Trainer(config, forward, trainable_mask(params, plan), mesh)
    state = jax.eval_shape(trainer.fresh_state, params)
    shardings = sharding.tree_shardings(mesh, state)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    rows = sharding.batch_sharding(mesh)
    inputs = [jax.ShapeDtypeStruct((batch, seq), dtype, sharding=rows)
              for dtype in (jnp.int32, jnp.float32, jnp.int32)]
    return AbstractStep(trainer, trainer.sharded_train_step(shardings), (abstract, *inputs),
                        batch, seq)


def target_mesh(config: TrainConfig, target: targets.Target, devices: int) -> jax.sharding.Mesh:
    """``--mesh`` over ``devices`` compile-only devices of ``target``."""
    sizes = sharding.mesh_sizes(config.mesh, devices)
    return targets.target_mesh(target, (sizes["data"], sizes["fsdp"]), sharding.AXES)


# --------------------------------------------------------------------------------------
# --plan


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What :func:`plan` found: memory of the configured step per device, the memory JAX
    may use on the target, and the largest batch that fits (``None`` if even one
    micro-batch per device does not)."""

    target: targets.Target
    devices: int
    seq: int
    memory: dict[str, int]
    usable_bytes: int
    memory_fraction: float
    largest_batch: int | None
    largest_peak: int | None
    fp8_gemms: int
    gemms: int
    widened_fp8: int

    @property
    def fits(self) -> bool:
        return self.memory["peak"] <= self.usable_bytes


def memory_fraction(environ: dict[str, str]) -> float:
    """The fraction of GPU memory JAX preallocates: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` or
    JAX's default 0.75."""
    value = environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        return float(value) if value else targets.JAX_DEFAULT_MEMORY_FRACTION
    except ValueError:
        return targets.JAX_DEFAULT_MEMORY_FRACTION


def plan(config: TrainConfig, target: targets.Target, devices: int, environ: dict[str, str],
         *, search: bool = True, on_compile: Callable[[int, int], None] | None = None
         ) -> PlanReport:
    """Compile the step of ``config`` for ``devices`` ``target`` GPUs (backend: cuBLASLt)
    at the longest padded batch length, then, if ``search``, double and bisect the batch
    (in steps of what splits over the mesh and ``--grad-accum``) to the largest that fits.
    ``on_compile(batch, peak)`` is told about every compile."""
    from falqon_jax import gpu_program

    targets.use_compile_only()
    llama_config = architecture(config.model)
    mesh = target_mesh(config, target, devices)
    sharding.check_batch(mesh, config.batch_size, config.grad_accum)
    seq = length_buckets(config)[1]
    options = targets.GEMM_BACKENDS["cublaslt"]
    fraction = memory_fraction(environ)
    usable = int(target.memory_bytes * fraction)
    peaks: dict[int, int] = {}

    def peak_at(batch: int) -> tuple[int, Any]:
        compiled = abstract_step(config, llama_config, mesh, seq, batch).compile(options)
        peaks[batch] = targets.peak_bytes(compiled)["peak"]
        if on_compile is not None:
            on_compile(batch, peaks[batch])
        return peaks[batch], compiled

    _, compiled = peak_at(config.batch_size)
    memory = targets.peak_bytes(compiled)
    program = gpu_program.parse(compiled.as_text())
    found = gpu_program.gemms(program)
    largest = None
    if search:
        # steps of what splits over the mesh and --grad-accum, at least 8 rows: a finer
        # answer is not worth the extra compiles
        unit = sharding.batch_ways(mesh) * config.grad_accum
        coarse = unit * max(1, 8 // unit)

        def fits(batch: int) -> bool:
            return (peaks[batch] if batch in peaks else peak_at(batch)[0]) <= usable

        if config.batch_size % coarse == 0:
            largest = _largest_fitting(fits, config.batch_size, coarse)
            if largest is None and coarse > unit:  # below the coarse steps: row by row
                largest = _largest_fitting(fits, coarse, unit)
        else:
            largest = _largest_fitting(fits, config.batch_size, unit)
    return PlanReport(
        target=target, devices=devices, seq=seq, memory=memory, usable_bytes=usable,
        memory_fraction=fraction, largest_batch=largest,
        largest_peak=peaks.get(largest) if largest else None,
        fp8_gemms=sum(g.fp8 for g in found), gemms=len(found),
        widened_fp8=sum(bool(g.widened) for g in found))


def _largest_fitting(fits: Callable[[int], bool], start: int, unit: int,
                     limit: int = 1 << 16) -> int | None:
    """The largest multiple of ``unit`` (``start`` is one) for which ``fits`` holds,
    assuming memory grows with the batch: double from ``start``, then bisect; ``None`` when
    not even ``unit`` fits."""
    if fits(start):
        low, high = start, None
        while high is None:
            if low * 2 > limit:
                return low
            if fits(low * 2):
                low *= 2
            else:
                high = low * 2
    else:
        low, high = 0, start  # 0 stands for "nothing fits"
    while high - low > unit:  # low fits (or is 0), high does not
        middle = (low + high) // 2 // unit * unit
        if middle <= low:
            middle = low + unit
        if fits(middle):
            low = middle
        else:
            high = middle
    return low or None


def format_report(config: TrainConfig, report: PlanReport) -> str:
    """The lines ``--plan`` prints."""
    t, m, gib = report.target, report.memory, targets.GIB
    lines = [
        f"plan: {config.method} on {config.model}, batch {config.batch_size} "
        f"(grad-accum {config.grad_accum}) x {report.seq} tokens, rank {config.rank}, "
        f"{config.dtype}, remat {'on' if config.remat else 'off'}; compiled for "
        f"{report.devices} x {t.device} (compile only, cuBLASLt GEMMs; no weights loaded)",
        f"peak memory per device: {m['peak'] / gib:.2f} GiB (arguments {m['arguments'] / gib:.2f}"
        f", temporaries {m['temporaries'] / gib:.2f}); the device has "
        f"{t.memory_bytes / gib:.1f} GiB, JAX uses {report.memory_fraction:.0%} of it: "
        f"{report.usable_bytes / gib:.1f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)",
        f"fits: {'yes' if report.fits else 'NO'}",
    ]
    if report.largest_batch is not None:
        lines.append(f"largest batch that fits: {report.largest_batch} (peak "
                     f"{report.largest_peak / gib:.2f} GiB per device)")
    elif not report.fits:
        lines.append("largest batch that fits: none (not even one row per device); use more "
                     "devices (--mesh), --remat, a lower --rank or a shorter --target-len")
    if t.has_fp8:
        lines.append(f"GEMMs: {report.fp8_gemms} of {report.gemms} are FP8 "
                     f"(tensor cores), {report.widened_fp8} read widened FP8")
    else:
        lines.append(f"FP8 GEMMs are not available on {t.device} (no FP8 tensor cores): "
                     f"{report.widened_fp8} of {report.gemms} GEMMs widen FP8 operands")
    return "\n".join(lines)
