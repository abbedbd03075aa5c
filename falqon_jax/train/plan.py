"""The train step of a configuration, compiled from shapes alone (no weights), and
``python -m falqon_jax.train ... --plan h100``: will this run fit on that GPU?

:func:`abstract_step` builds the trainer's own jitted step (:class:`~falqon_jax.train.trainer.
Trainer`) with abstract arguments (``jax.ShapeDtypeStruct`` placed on a mesh), so nothing is
allocated: the benchmarks compile exactly what training runs. :func:`plan` compiles it for
a compile-only GPU (:mod:`falqon_jax.targets`) and reads the peak memory per device; it then
searches the largest batch that fits and the smallest ``--grad-accum`` that fits the
configured batch. :func:`plan_targets` does so for several GPU kinds at once (``--plan
h100,h200,h100:8``, one table row each), compiling each program once.
"""

from __future__ import annotations

import dataclasses
import time
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

# The memory fraction --plan suggests where nothing fits in the fraction JAX is allowed
# (XLA_PYTHON_CLIENT_MEM_FRACTION): what is left is for the CUDA context and libraries.
SUGGESTED_FRACTION = 0.95
# Bytes per token of a batch's three inputs (tokens int32, loss mask float32, attention
# int32): the arguments of a step besides the train state.
_INPUT_BYTES_PER_TOKEN = 12


class PlanError(ValueError):
    """A ``--plan`` value that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``GPU[:N]`` of ``--plan``: ``devices`` GPUs of ``target``."""

    target: targets.Target
    devices: int = 1

    @property
    def label(self) -> str:
        return self.target.name if self.devices == 1 else f"{self.target.name}:{self.devices}"


def parse_requests(spec: str) -> list[Request]:
    """The targets of ``--plan h100,h200,h100:8`` in order, each once. Raises
    :class:`~falqon_jax.targets.TargetError` for an unknown GPU and :class:`PlanError`
    for a bad device count (one line each)."""
    found: list[Request] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, colon, count = part.partition(":")
        if colon and not (count.strip().isdigit() and int(count) > 0):
            raise PlanError(f"--plan {part}: the device count after ':' must be a positive "
                            "integer")
        request = Request(targets.get(name), int(count) if colon else 1)
        if request not in found:
            found.append(request)
    if not found:
        raise PlanError(f"--plan {spec!r} names no GPU; e.g. --plan h100 or --plan "
                        "h100,h200,h100:8")
    return found


# XLA's GPU compiler aims its scheduling and rematerialization below about 80% of the
# device's memory (measured: the scheduler at 0.8 of it, rematerialization at 0.785 of an
# H200's): a step whose peak stays below this share of both GPUs' memory met that aim on
# neither, and compiles to the same memory for both (see compiles_alike).
UNPRESSED_SHARE = 0.75


def compiles_alike(a: targets.Target, b: targets.Target) -> bool:
    """Whether ``a`` and ``b`` are the same GPU to XLA's compiler (compute capability,
    cores, clock, caches, shared memory) but for the memory size and bandwidth (``h100``
    and ``h200``). Those two still reach it: its scheduling and rematerialization aim below
    a share of the memory, and its cost model reads the bandwidth, so the programs differ
    in instruction names and order. Measured, their memory is the same while neither GPU's
    aim binds (LLaMA-7B at batch 16: to the byte; the demo's tiny model: 256 bytes apart in
    16 MB), and not above it (LLaMA-2-70B at batch 16 in 16 micro-batches: 74.73 GiB
    compiled for an H100, 74.91 GiB for an H200)."""
    def seen(t: targets.Target) -> targets.Target:
        return dataclasses.replace(t, name="", device="", memory_bytes=0, hbm_bytes_per_s=0.0,
                                   bf16_tflops=0.0, tf32_tflops=0.0,
                                   fp8_tflops=None if t.fp8_tflops is None else 0.0)
    return seen(a) == seen(b)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compile of the step: for ``devices`` GPUs of ``target`` (the GPU compiled for),
    ``batch`` rows in ``grad_accum`` micro-batches; ``memory`` per device (see
    :func:`~falqon_jax.targets.peak_bytes`), the compile's wall-clock ``seconds`` and, for
    the configured batch, ``gemm_counts``: FP8 GEMMs, all GEMMs, GEMMs reading widened FP8."""

    target: targets.Target
    devices: int
    batch: int
    grad_accum: int
    memory: dict[str, int]
    seconds: float
    gemm_counts: tuple[int, int, int] | None = None

    @property
    def peak(self) -> int:
        return self.memory["peak"]


class _Programs:
    """The steps of one configuration compiled so far, each once per GPU, device count,
    batch and grad-accum; a GPU that compiles alike with one already compiled for
    (:func:`compiles_alike`) reuses that compile where its peak stays below
    :data:`UNPRESSED_SHARE` of both GPUs' memory."""

    def __init__(self, config: TrainConfig, requests: list[Request],
                 progress: Callable[[Compiled], None] | None) -> None:
        self.config = config
        self.llama_config = architecture(config.model)
        self.seq = length_buckets(config)[1]
        self.gpus = list(dict.fromkeys(r.target for r in requests))
        self.progress = progress
        self.options = targets.GEMM_BACKENDS["cublaslt"]
        self.done: dict[tuple[str, int, int, int], Compiled] = {}
        self.reused: dict[Request, set[str]] = {}  # the other GPUs' compiles each one read

    def mesh(self, request: Request) -> jax.sharding.Mesh:
        return target_mesh(self.config, request.target, request.devices)

    def get(self, request: Request, batch: int, grad_accum: int) -> Compiled:
        """The step for ``request`` at ``batch`` and ``grad_accum``: reused, or compiled."""
        done = self._reusable(request, batch, grad_accum)
        return done if done is not None else self._compile(request, batch, grad_accum)

    def _reusable(self, request: Request, batch: int, grad_accum: int) -> Compiled | None:
        """The compile ``request`` may read: its own, else one for a GPU that compiles
        alike whose peak stays below :data:`UNPRESSED_SHARE` of both GPUs' memory."""
        own = self.done.get((request.target.name, request.devices, batch, grad_accum))
        if own is not None:
            return own
        for other in self.gpus:
            done = self.done.get((other.name, request.devices, batch, grad_accum))
            share = UNPRESSED_SHARE * min(other.memory_bytes, request.target.memory_bytes)
            if done is not None and compiles_alike(other, request.target) and done.peak <= share:
                self.reused.setdefault(request, set()).add(other.name)
                return done
        return None

    def _compile(self, request: Request, batch: int, grad_accum: int) -> Compiled:
        started = time.monotonic()
        memory, counts = self._measure(request, batch, grad_accum)
        done = Compiled(request.target, request.devices, batch, grad_accum, memory,
                        time.monotonic() - started, counts)
        self.done[(request.target.name, request.devices, batch, grad_accum)] = done
        if self.progress is not None:
            self.progress(done)
        return done

    def _measure(self, request: Request, batch: int, grad_accum: int
                 ) -> tuple[dict[str, int], tuple[int, int, int] | None]:
        """Compile the step for ``request`` and read its memory per device and, for the
        configured batch, its GEMM counts (see :class:`Compiled`)."""
        from falqon_jax import gpu_program

        config = dataclasses.replace(self.config, batch_size=batch, grad_accum=grad_accum)
        compiled = abstract_step(config, self.llama_config, self.mesh(request), self.seq,
                                 batch).compile(self.options)
        counts = None
        if (batch, grad_accum) == (self.config.batch_size, self.config.grad_accum):
            found = gpu_program.gemms(gpu_program.parse(compiled.as_text()))
            counts = (sum(g.fp8 for g in found), len(found), sum(bool(g.widened) for g in found))
        return targets.peak_bytes(compiled), counts

    def base(self, request: Request) -> Compiled:
        """The configured step (batch and grad-accum as given)."""
        return self.get(request, self.config.batch_size, self.config.grad_accum)

    def peaks(self, request: Request, grad_accum: int) -> dict[int, int]:
        """Peak per device by batch of the steps at ``grad_accum`` that ``request`` may
        read so far (compiled for it, or reused); compiles nothing."""
        found: dict[int, int] = {}
        for _, devices, batch, accum in list(self.done):
            if (devices, accum) == (request.devices, grad_accum) and batch not in found:
                done = self._reusable(request, batch, accum)
                if done is not None:
                    found[batch] = done.peak
        return found

    def state_bytes(self, request: Request) -> int:
        """The train state per device (the configured step's arguments but its batch):
        every step holds it, whatever its batch."""
        rows = self.config.batch_size // sharding.batch_ways(self.mesh(request))
        return self.base(request).memory["arguments"] - rows * self.seq * _INPUT_BYTES_PER_TOKEN


@dataclasses.dataclass(frozen=True)
class AccumFit:
    """The smallest ``--grad-accum`` whose step fits ``batch`` rows in ``usable_bytes``
    (``fraction`` of the device), with its peak per device; ``grad_accum`` is ``None``
    when none does."""

    batch: int
    fraction: float
    usable_bytes: int
    grad_accum: int | None
    peak: int | None


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What :func:`plan` found for one GPU kind: memory of the configured step per device,
    the memory JAX may use on the target, the largest batch that fits at the configured
    ``--grad-accum`` (``None`` if even one micro-batch per device does not) and the smallest
    ``--grad-accum`` that fits the configured batch (``smallest_accum``; ``suggested_accum``
    the same with :data:`SUGGESTED_FRACTION` of the memory, where none fits in the fraction
    JAX is allowed). ``reused_from``: the GPUs (planned at the same time, compiling alike)
    whose compiles it read; ``state_bytes``: the train state per device."""

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
    mesh: tuple[int, int] = (1, 1)
    reused_from: tuple[str, ...] = ()
    state_bytes: int | None = None
    smallest_accum: AccumFit | None = None
    suggested_accum: AccumFit | None = None

    @property
    def fits(self) -> bool:
        return self.memory["peak"] <= self.usable_bytes

    @property
    def label(self) -> str:
        return Request(self.target, self.devices).label


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
    at the longest padded batch length, then, if ``search``, find the largest batch that
    fits and the smallest ``--grad-accum`` that fits the batch (:func:`plan_targets`).
    ``on_compile(batch, peak)`` is told about every compile."""
    progress = None if on_compile is None else (lambda c: on_compile(c.batch, c.peak))
    return plan_targets(config, [Request(target, devices)], environ, search=search,
                        progress=progress)[0]


def plan_targets(config: TrainConfig, requests: list[Request], environ: dict[str, str], *,
                 search: bool = True, progress: Callable[[Compiled], None] | None = None
                 ) -> list[PlanReport]:
    """:func:`plan` for several GPU kinds at once, one report each, compiling each program
    once: GPUs that compile alike (:func:`compiles_alike`) share the compiles that peak
    below :data:`UNPRESSED_SHARE` of both GPUs' memory (the larger GPU's configured step is
    compiled first), and every search reads the peaks compiled so far. ``progress`` is
    told about every compile.

    The largest batch: steps of what splits over the mesh and ``--grad-accum`` (at least 8
    rows; row by row below that), the next batch tried where the line through the peaks
    compiled so far reaches the memory JAX may use, then bisected. The smallest
    ``--grad-accum``: among those that divide the batch into micro-batches that split over
    the mesh, the first tried is the one whose micro-batch the batch search found to fit.
    Raises :class:`~falqon_jax.sharding.MeshError` (before any compile) when a micro-batch
    does not split over a target's mesh."""
    targets.use_compile_only()
    programs = _Programs(config, requests, progress)
    for r in requests:  # every mesh checked before the first compile
        try:
            sharding.check_batch(programs.mesh(r), config.batch_size, config.grad_accum)
        except sharding.MeshError as err:
            raise sharding.MeshError(f"--plan {r.label}: {err}") from None
    fraction = memory_fraction(environ)
    for r in sorted(requests, key=lambda r: -r.target.memory_bytes):
        programs.base(r)  # the largest GPU first: a smaller one that compiles alike may reuse it
    return [_plan_one(programs, r, fraction, search) for r in requests]


def _plan_one(programs: _Programs, request: Request, fraction: float,
              search: bool) -> PlanReport:
    config = programs.config
    usable = int(request.target.memory_bytes * fraction)
    base = programs.base(request)
    largest = smallest = suggested = None
    if search:
        largest = _largest_batch(programs, request, usable)
        smallest = _smallest_grad_accum(programs, request, fraction)
        if smallest.grad_accum is None and fraction < SUGGESTED_FRACTION:
            suggested = _smallest_grad_accum(programs, request, SUGGESTED_FRACTION)
    mesh = programs.mesh(request)
    fp8, gemms, widened = base.gemm_counts or (0, 0, 0)
    return PlanReport(
        target=request.target, devices=request.devices, seq=programs.seq, memory=base.memory,
        usable_bytes=usable, memory_fraction=fraction, largest_batch=largest,
        largest_peak=programs.peaks(request, config.grad_accum).get(largest) if largest
        else None, fp8_gemms=fp8, gemms=gemms, widened_fp8=widened,
        mesh=(mesh.shape["data"], mesh.shape["fsdp"]),
        reused_from=tuple(sorted(programs.reused.get(request, ()))),
        state_bytes=programs.state_bytes(request), smallest_accum=smallest,
        suggested_accum=suggested)


def _largest_batch(programs: _Programs, request: Request, usable: int) -> int | None:
    """The largest batch whose step at the configured ``--grad-accum`` fits in ``usable``
    bytes per device, ``None`` if none does (at once, without compiling, when the train
    state alone does not fit)."""
    config = programs.config
    accum = config.grad_accum
    state = programs.state_bytes(request)
    if state > usable:
        return None

    def fits(batch: int) -> bool:
        return programs.get(request, batch, accum).peak <= usable

    def estimate(unit: int) -> Callable[[int, int | None], int | None]:
        return lambda low, high: _estimate(programs.peaks(request, accum), usable, unit, low,
                                           high, state)

    # steps of what splits over the mesh and --grad-accum, at least 8 rows: a finer answer
    # is not worth the extra compiles
    unit = sharding.batch_ways(programs.mesh(request)) * accum
    coarse = unit * max(1, 8 // unit)
    if config.batch_size % coarse:
        return _largest_fitting(fits, config.batch_size, unit, estimate=estimate(unit))
    largest = _largest_fitting(fits, config.batch_size, coarse, estimate=estimate(coarse))
    if largest is None and coarse > unit:  # below the coarse steps: row by row
        largest = _largest_fitting(fits, coarse, unit, estimate=estimate(unit))
    return largest


def _smallest_grad_accum(programs: _Programs, request: Request, fraction: float) -> AccumFit:
    """The smallest ``--grad-accum`` that fits the configured batch in ``fraction`` of the
    device: tried first is the one whose micro-batch the steps compiled at the configured
    ``--grad-accum`` (the batch search's) say fits, then its neighbours, then bisection."""
    config = programs.config
    batch, accum = config.batch_size, config.grad_accum
    usable = int(request.target.memory_bytes * fraction)
    state = programs.state_bytes(request)
    ways = sharding.batch_ways(programs.mesh(request))
    candidates = [g for g in range(1, batch + 1) if batch % g == 0 and batch // g % ways == 0]
    found = None
    if state <= usable:
        micro = {b // accum: p for b, p in programs.peaks(request, accum).items()}
        fitting = [m for m, p in micro.items() if p <= usable]
        rows = max(fitting) if fitting else _estimate(micro, usable, 1, 0, None, state)
        first = next((i for i, g in enumerate(candidates) if batch // g <= (rows or 1)),
                     len(candidates) - 1)
        found = _first_fitting(
            candidates, lambda g: programs.get(request, batch, g).peak <= usable, first)
    peak = programs.get(request, batch, found).peak if found else None
    return AccumFit(batch, fraction, usable, found, peak)


def _estimate(peaks: dict[int, int], usable: int, unit: int, low: int, high: int | None,
              state: int, limit: int = 1 << 16) -> int | None:
    """The batch (a multiple of ``unit`` above ``low`` and below ``high``) where the line
    through the two compiled ``peaks`` nearest ``usable`` reaches it -- through one and
    ``(0, state)`` (the train state every batch holds) while there is only one; ``None``
    where the peaks do not grow."""
    under = sorted(b for b, p in peaks.items() if p <= usable)
    over = sorted(b for b, p in peaks.items() if p > usable)
    if under and over:
        pair = (under[-1], over[0])
    elif len(under) > 1 or len(over) > 1:
        pair = (under[-2], under[-1]) if len(under) > 1 else (over[0], over[1])
    elif peaks:
        pair = (0, (under or over)[0])
    else:
        return None
    (b0, b1), points = pair, {0: state, **peaks}
    slope = (points[b1] - points[b0]) / (b1 - b0)
    if slope <= 0:
        return None
    guess = int((b0 + (usable - points[b0]) / slope) // unit * unit)
    return min(max(guess, low + unit), limit if high is None else high - unit)


def _largest_fitting(fits: Callable[[int], bool], start: int, unit: int,
                     limit: int = 1 << 16,
                     estimate: Callable[[int, int | None], int | None] | None = None
                     ) -> int | None:
    """The largest multiple of ``unit`` (``start`` is one) for which ``fits`` holds,
    assuming memory grows with the batch: double from ``start``, then bisect; ``None`` when
    not even ``unit`` fits. ``estimate(low, high)``, where given, proposes each next batch
    instead (``low``: the largest that fits so far, or 0; ``high``: the smallest that does
    not, or ``None``); a proposal that is not a multiple of ``unit`` strictly between them
    (and at most ``limit``) falls back to doubling or bisecting."""
    if fits(start):
        low, high = start, None
    else:
        low, high = 0, start  # 0 stands for "nothing fits"
    while high is None or high - low > unit:  # low fits (or is 0), high does not
        proposal = estimate(low, high) if estimate is not None else None
        if (proposal is None or proposal % unit or proposal <= low or proposal > limit
                or (high is not None and proposal >= high)):
            if high is None:
                if low * 2 > limit:
                    return low
                proposal = low * 2
            else:
                proposal = max((low + high) // 2 // unit * unit, low + unit)
        if fits(proposal):
            low = proposal
        else:
            high = proposal
    return low or None


def _first_fitting(candidates: list[int], fits: Callable[[int], bool],
                   first: int | None = None) -> int | None:
    """The first of ``candidates`` for which ``fits`` holds, assuming it holds from there
    on (more micro-batches, less memory); ``None`` when none does. Tried: ``candidates
    [first]``, then twice the neighbour towards the answer, then bisection."""
    low, high = -1, len(candidates)  # candidates[low] does not fit, candidates[high] does
    probe, tries = first, 0
    while high - low > 1:
        if probe is None or not low < probe < high:
            probe = (low + high) // 2
        tries += 1
        if fits(candidates[probe]):
            high, step = probe, -1
        else:
            low, step = probe, 1
        probe = probe + step if tries < 3 else None
    return candidates[high] if high < len(candidates) else None


# --------------------------------------------------------------------------------------
# What --plan prints


def _gib(n: int) -> str:
    return f"{n / targets.GIB:.2f} GiB"


def format_compile(c: Compiled) -> str:
    """The progress line of one compile (stderr)."""
    return (f"  compiled batch {c.batch} (grad-accum {c.grad_accum}) for {c.devices} x "
            f"{c.target.name}: peak {_gib(c.peak)} per device ({c.seconds:.0f} s)")


def _mesh_text(report: PlanReport) -> str:
    data, fsdp = report.mesh
    return f"fsdp={fsdp}" if data == 1 else f"data={data},fsdp={fsdp}"


def _accum_text(fit: AccumFit) -> str:
    return (f"{fit.grad_accum} (micro-batch {fit.batch // fit.grad_accum}, peak "
            f"{_gib(fit.peak)} per device)")


def _more_devices(report: PlanReport) -> str:
    more = max(8, report.devices * 2)
    return f"more devices (--plan {report.target.name}:{more} --mesh fsdp={more})"


def _accum_line(report: PlanReport) -> str:
    """The ``--grad-accum`` line of the detailed report."""
    fit, high = report.smallest_accum, report.suggested_accum
    head = f"smallest --grad-accum for batch {fit.batch}: "
    if fit.grad_accum is not None:
        return head + _accum_text(fit)
    text = f"{head}none fits in {fit.usable_bytes / targets.GIB:.1f} GiB"
    if high is None:
        return f"{text}; use {_more_devices(report)}, a lower --rank or a shorter --target-len"
    setting = f"XLA_PYTHON_CLIENT_MEM_FRACTION={high.fraction:g}"
    if high.grad_accum is None:
        return f"{text}; none with {setting} either: use {_more_devices(report)}"
    return (text + f"; with {setting} ({high.usable_bytes / targets.GIB:.1f} GiB): "
            + _accum_text(high))


def format_report(config: TrainConfig, report: PlanReport) -> str:
    """The lines ``--plan`` prints for one GPU kind."""
    t, m, gib = report.target, report.memory, targets.GIB
    where = f"{report.devices} x {t.device}"
    if report.devices > 1:
        where += f" (FSDP, mesh {_mesh_text(report)})"
    lines = [
        f"plan: {config.method} on {config.model}, batch {config.batch_size} "
        f"(grad-accum {config.grad_accum}) x {report.seq} tokens, rank {config.rank}, "
        f"{config.dtype}, remat {'on' if config.remat else 'off'}; compiled for "
        f"{where} (compile only, cuBLASLt GEMMs; no weights loaded)",
        f"peak memory per device: {m['peak'] / gib:.2f} GiB (arguments {m['arguments'] / gib:.2f}"
        f", temporaries {m['temporaries'] / gib:.2f}); the device has "
        f"{t.memory_bytes / gib:.1f} GiB, JAX uses {report.memory_fraction:.0%} of it: "
        f"{report.usable_bytes / gib:.1f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)",
        f"fits: {'yes' if report.fits else 'NO'}",
    ]
    if report.largest_batch is not None:
        lines.append(f"largest batch that fits: {report.largest_batch} (peak "
                     f"{report.largest_peak / gib:.2f} GiB per device)")
    elif not report.fits and (report.state_bytes or 0) > report.usable_bytes:
        lines.append(f"largest batch that fits: none (the train state alone is "
                     f"{_gib(report.state_bytes)} per device)")
    elif not report.fits:
        remat = "" if config.remat else "--remat, "
        lines.append(f"largest batch that fits: none (not even one row per device); use "
                     f"{_more_devices(report)}, {remat}a lower --rank or a shorter "
                     "--target-len")
    if report.smallest_accum is not None:
        lines.append(_accum_line(report))
    if t.has_fp8:
        lines.append(f"GEMMs: {report.fp8_gemms} of {report.gemms} are FP8 "
                     f"(tensor cores), {report.widened_fp8} read widened FP8")
    else:
        lines.append(f"FP8 GEMMs are not available on {t.device} (no FP8 tensor cores): "
                     f"{report.widened_fp8} of {report.gemms} GEMMs widen FP8 operands")
    return "\n".join(lines)


def format_table(config: TrainConfig, reports: list[PlanReport]) -> str:
    """The lines ``--plan GPU,GPU,...`` prints: one row per GPU kind."""
    fraction = reports[0].memory_fraction
    rows = [("target", "devices", "peak/device", "usable", "fits",
             f"grad-accum for {config.batch_size}", f"largest batch (grad-accum "
             f"{config.grad_accum})")]
    notes = []
    for r in reports:
        accum = "-"
        if r.smallest_accum is not None:
            accum = str(r.smallest_accum.grad_accum or "none")
            high = r.suggested_accum
            if high is not None:
                accum += f" ({high.grad_accum or 'none'} at {high.fraction:.0%})"
        devices = str(r.devices) + (f" ({_mesh_text(r)})" if r.devices > 1 else "")
        rows.append((r.label, devices, _gib(r.memory["peak"]),
                     f"{r.usable_bytes / targets.GIB:.1f} GiB", "yes" if r.fits else "NO",
                     accum, "-" if r.smallest_accum is None else str(r.largest_batch or "none")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    if any(r.suggested_accum is not None for r in reports):
        notes.append(f"(N at {SUGGESTED_FRACTION:.0%}): the smallest --grad-accum that fits "
                     f"with XLA_PYTHON_CLIENT_MEM_FRACTION={SUGGESTED_FRACTION:g}")
    for r in reports:
        if r.reused_from:
            notes.append(f"{r.label} read steps compiled for {', '.join(r.reused_from)}: "
                         f"below {UNPRESSED_SHARE:.0%} of both GPUs' memory, XLA compiles a "
                         "step to the same memory for both (measured within bytes)")
    head = (f"plan: {config.method} on {config.model}, batch {config.batch_size} (grad-accum "
            f"{config.grad_accum}) x {reports[0].seq} tokens, rank {config.rank}, "
            f"{config.dtype}, remat {'on' if config.remat else 'off'}; compile only "
            f"(cuBLASLt GEMMs; no weights loaded); JAX uses {fraction:.0%} of each GPU's "
            "memory (XLA_PYTHON_CLIENT_MEM_FRACTION)")
    return "\n".join([head, *table, *notes])
