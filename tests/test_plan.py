"""``--plan`` without a GPU compiler: the searches, the sharing of compiles between GPUs
that compile alike, what it prints, and the 70B cards and recipes it plans. The compiles
themselves are replaced by a memory model here; the compiled programs are checked in
``tests/test_gpu_program.py`` (needs JAX's CUDA plugin)."""

from __future__ import annotations

import dataclasses
import types

import pytest

from falqon_jax import sharding, targets
from falqon_jax.train import plan
from falqon_jax.train.config import PAPER, resolve

GIB = targets.GIB
H100, H200 = targets.get("h100"), targets.get("h200")

# --------------------------------------------------------------------------------------
# The searches


@pytest.mark.parametrize("first", [None, 0, 2, 4, 7])
def test_first_fitting_finds_the_boundary_from_any_first_guess(first):
    candidates = [1, 2, 4, 8, 16, 32, 64, 128]
    for boundary in [*candidates, None]:  # fits from `boundary` on (None: never)
        tried = []

        def fits(g, boundary=boundary, tried=tried):
            tried.append(g)
            return boundary is not None and g >= boundary

        assert plan._first_fitting(candidates, fits, first) == boundary
        # bisection alone takes 4 tries for 9 outcomes; the walk from a wrong guess adds 2
        assert len(tried) == len(set(tried)) <= 6


def test_first_fitting_checks_one_neighbour_when_the_guess_is_right():
    tried = []
    assert plan._first_fitting([1, 2, 4, 8, 16], lambda g: tried.append(g) or g >= 8, 3) == 8
    assert tried == [8, 4]
    tried.clear()
    assert plan._first_fitting([1, 2, 4, 8, 16], lambda g: tried.append(g) or g >= 16, 2) == 16
    assert tried == [4, 8, 16]


def test_largest_batch_search_guided_by_the_line_through_the_peaks():
    """Peaks that grow along a line: the estimate lands next to the answer, so the search
    compiles 3 or 4 batches where doubling and bisection need up to 12; the answer is the
    same (checked against the plain search for every capacity)."""
    state, per_row, unit = 70 * GIB, 0.8 * GIB, 8
    for usable_rows in [0, 5, 8, 13, 40, 99, 400, 4000]:
        usable = state + usable_rows * per_row
        peaks: dict[int, int] = {}

        def fits(batch, usable=usable, peaks=peaks):
            peaks[batch] = int(state + batch * per_row + 0.1 * GIB)
            return peaks[batch] <= usable

        def estimate(low, high, usable=usable, peaks=peaks):
            return plan._estimate(peaks, usable, unit, low, high, state)

        guided = plan._largest_fitting(fits, 16, unit, estimate=estimate)
        tried = len(peaks)
        peaks.clear()
        plain = plan._largest_fitting(fits, 16, unit)
        assert guided == plain, usable_rows
        assert tried <= 4 and tried <= len(peaks), (usable_rows, tried, len(peaks))


def test_estimate_is_where_the_line_through_the_nearest_peaks_meets_the_limit():
    peaks = {16: 85, 32: 98}
    # through (16, 85) and (32, 98): 105 at 16 + 20 * 16 / 13 = 40.6 -> 40 in steps of 8
    assert plan._estimate(peaks, 105, 8, 32, None, state=70) == 40
    # one peak: through it and (0, state); a proposal stays strictly inside (low, high)
    assert plan._estimate({16: 86}, 78, 1, 0, 16, state=70) == 8
    assert plan._estimate({16: 86}, 78, 8, 0, 16, state=70) == 8
    assert plan._estimate({16: 86}, 200, 8, 16, 24, state=70) == 16
    assert plan._estimate({}, 100, 8, 0, None, state=70) is None
    assert plan._estimate({8: 90, 16: 80}, 85, 8, 0, None, state=70) is None  # not growing


# --------------------------------------------------------------------------------------
# --plan GPU[:N],...


def test_plan_requests_in_order_each_once():
    found = plan.parse_requests("h100, h200,h100:8,h100,")
    assert [r.label for r in found] == ["h100", "h200", "h100:8"]
    assert [r.devices for r in found] == [1, 1, 8]
    assert plan.parse_requests("H200:1")[0].label == "h200"


@pytest.mark.parametrize("spec, error, message", [
    ("h100,v100", targets.TargetError, "unknown GPU target 'v100'"),
    ("h100,h100:0", plan.PlanError, "--plan h100:0: the device count after ':' must be a "
                                    "positive integer"),
    ("h100:x", plan.PlanError, "positive integer"),
    (",", plan.PlanError, "names no GPU"),
])
def test_plan_request_mistakes_are_one_line(spec, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")) as info:
        plan.parse_requests(spec)
    assert "\n" not in str(info.value)


def test_only_h100_and_h200_compile_alike():
    assert plan.compiles_alike(H100, H200)
    for other in ("a100", "l4"):
        assert not plan.compiles_alike(H100, targets.get(other))
    assert plan.compiles_alike(targets.get("l4"), targets.get("l4"))


# --------------------------------------------------------------------------------------
# plan_targets over a memory model instead of XLA


@dataclasses.dataclass
class Model:
    """Memory of a step per device, as compiles report it: the train state split over the
    devices, each row of a micro-batch on a device, a gradient accumulator when
    ``grad_accum`` > 1; compiled for an H100 above 75% of its memory, a little less (XLA's
    aim at the smaller GPU), as measured for the 70B step."""

    state: float = 69.9 * GIB
    per_row: float = 0.84 * GIB
    fixed: float = 1.6 * GIB
    accumulator: float = 1.6 * GIB
    compiles: list = dataclasses.field(default_factory=list)

    def __call__(self, programs, request, batch, grad_accum):
        ways = request.devices
        rows = batch // grad_accum // ways
        peak = self.state / ways + self.fixed + rows * self.per_row
        peak += self.accumulator / ways if grad_accum > 1 else 0
        if request.target.name == "h100" and peak > 0.75 * H100.memory_bytes:
            peak -= 0.2 * GIB
        self.compiles.append((request.label, batch, grad_accum))
        inputs = batch // ways * programs.seq * 12
        memory = {"arguments": int(self.state / ways) + inputs, "outputs": 0, "aliased": 0,
                  "temporaries": int(peak - self.state / ways), "peak": int(peak)}
        return memory, (1, 2, 0) if (batch, grad_accum) == (16, 1) else None


@pytest.fixture
def model(monkeypatch):
    memory = Model()
    monkeypatch.setattr(plan.targets, "use_compile_only", lambda: None)
    monkeypatch.setattr(plan, "target_mesh", lambda config, target, devices: types.
                        SimpleNamespace(shape=sharding.mesh_sizes(config.mesh, devices)))
    monkeypatch.setattr(plan._Programs, "_measure",
                        lambda self, request, batch, accum: memory(self, request, batch, accum))
    return memory


def _requests(spec):
    return plan.parse_requests(spec)


def test_one_h100_finds_the_grad_accum_that_fits_at_the_suggested_fraction(model):
    config = dataclasses.replace(PAPER, model="llama2-70b")
    (report,) = plan.plan_targets(config, _requests("h100"), {})
    assert not report.fits and report.largest_batch is None
    assert report.smallest_accum.grad_accum is None  # the state alone is above 75%
    high = report.suggested_accum
    assert (high.fraction, high.grad_accum) == (0.95, 8)  # micro-batch 2 fits, 4 does not
    assert high.peak <= high.usable_bytes == int(0.95 * H100.memory_bytes)
    # nothing compiled for the 75% answers; the suggested one: 4 (no), then 8 (yes), 2 none
    assert model.compiles == [("h100", 16, 1), ("h100", 16, 4), ("h100", 16, 8)]
    text = plan.format_report(config, report)
    assert "largest batch that fits: none (the train state alone is 69.90 GiB per device)" \
        in text
    assert ("smallest --grad-accum for batch 16: none fits in 59.3 GiB; with "
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (75.1 GiB): 8 (micro-batch 2, peak") in text


def test_at_the_suggested_fraction_both_answers_come_from_few_compiles(model):
    config = dataclasses.replace(PAPER, model="llama2-70b")
    (report,) = plan.plan_targets(config, _requests("h100"),
                                  {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"})
    assert report.largest_batch == 4 and report.smallest_accum.grad_accum == 8
    assert report.suggested_accum is None
    assert len(model.compiles) <= 7, model.compiles
    assert ("smallest --grad-accum for batch 16: 8 (micro-batch 2, peak"
            in plan.format_report(config, report))


def test_several_gpus_share_the_compiles_below_their_aim_and_print_a_table(model):
    """h200 first (the larger GPU): its batch-16 step peaks above 75% of an H100, so the
    H100 compiles its own; the H100's grad-accum steps are its own too. A small step is
    compiled once for both."""
    config = dataclasses.replace(PAPER, model="llama2-70b")
    reports = plan.plan_targets(config, _requests("h100,h200,h100:8"), {})
    h100, h200, eight = reports
    assert [r.fits for r in reports] == [False, True, True]
    assert h200.smallest_accum.grad_accum == 1 and h200.largest_batch == 40
    assert eight.smallest_accum.grad_accum == 1 and eight.mesh == (1, 8)
    assert h100.suggested_accum.grad_accum == 8 and h100.reused_from == ()
    compiled = model.compiles
    assert compiled[:3] == [("h200", 16, 1), ("h100", 16, 1), ("h100:8", 16, 1)]
    assert len(compiled) == len(set(compiled))
    text = plan.format_table(config, reports).splitlines()
    assert text[0].startswith("plan: falqon on llama2-70b, batch 16 (grad-accum 1) x 528")
    assert text[1].split() == ["target", "devices", "peak/device", "usable", "fits",
                               "grad-accum", "for", "16", "largest", "batch", "(grad-accum",
                               "1)"]
    assert text[2].split()[:2] == ["h100", "1"] and "none (8 at 95%)" in text[2]
    assert text[3].split()[-3:] == ["yes", "1", "40"]
    assert text[4].split()[:3] == ["h100:8", "8", "(fsdp=8)"]
    assert text[5].startswith("(N at 95%): the smallest --grad-accum that fits with "
                              "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95")
    assert len(text) == 6

    model.compiles.clear()
    small = dataclasses.replace(config, model="llama2-7b")
    model.state, model.fixed = 6 * GIB, 0.5 * GIB
    h100, h200 = plan.plan_targets(small, _requests("h100,h200"), {}, search=False)
    assert model.compiles == [("h200", 16, 1)] and h100.memory == h200.memory
    assert h100.reused_from == ("h200",) and h200.reused_from == ()
    assert "h100 read steps compiled for h200" in plan.format_table(small, [h100, h200])


def test_a_micro_batch_that_does_not_split_over_a_mesh_stops_before_any_compile(model):
    config = dataclasses.replace(PAPER, model="llama2-70b", batch_size=12)
    with pytest.raises(sharding.MeshError, match="--plan h100:8: the micro-batch of 12 rows"):
        plan.plan_targets(config, _requests("h200,h100:8"), {})
    assert model.compiles == []


# --------------------------------------------------------------------------------------
# The 70B cards and recipes


def test_the_70b_cards_are_the_published_configs():
    """Llama-2-70b-hf's and Llama-3.1-70B's config.json (meta-llama on the Hub)."""
    from falqon_jax.model.config import RopeScaling, card_source, load_card

    two, three = load_card("llama2-70b"), load_card("llama3.1-70b")
    for card in (two, three):
        assert (card.hidden_size, card.intermediate_size, card.num_layers) == (8192, 28672, 80)
        assert (card.num_heads, card.num_kv_heads, card.head_dim) == (64, 8, 128)
        assert card.rms_norm_eps == 1e-5 and not card.tie_word_embeddings
    assert (two.vocab_size, two.rope_theta, two.rope_scaling) == (32000, 10000.0, None)
    assert (two.max_position_embeddings, two.bos_token_id, two.eos_token_id) == (4096, 1, 2)
    assert (three.vocab_size, three.rope_theta) == (128256, 500000.0)
    assert three.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert (three.max_position_embeddings, three.bos_token_id, three.eos_token_id) == (
        131072, 128000, 128001)
    assert card_source("llama2-70b") == "meta-llama/Llama-2-70b-hf"
    assert card_source("llama3.1-70b") == "meta-llama/Llama-3.1-70B"


@pytest.mark.parametrize("recipe, grad_accum, mesh", [
    ("llama2-70b-alpaca-falqon-1xh200", 1, ""),
    ("llama2-70b-alpaca-falqon-1xh100", 16, ""),
    ("llama2-70b-alpaca-falqon-8xh100", 1, "fsdp=8"),
])
def test_the_70b_recipes_are_the_7b_run_on_the_70b_card(recipe, grad_accum, mesh):
    config, _ = resolve(["--recipe", recipe])
    seven, _ = resolve(["--recipe", "llama-7b-alpaca-falqon"])
    assert (config.model, config.grad_accum, config.mesh) == ("llama2-70b", grad_accum, mesh)
    assert config.out == f"runs/{recipe}"
    differs = {k for k, v in dataclasses.asdict(config).items()
               if getattr(seven, k) != v}
    assert differs <= {"model", "grad_accum", "mesh", "out"}, differs
