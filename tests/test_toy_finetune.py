"""End to end: FALQON fine-tunes a toy MLP comparably to a float32 LoRA reference."""

import pytest

from falqon_jax.bench import toy

RANK, LR, STEPS = 32, 1e-2, 300


@pytest.fixture(scope="module")
def problem():
    return toy.make_problem(seed=0)


@pytest.fixture(scope="module")
def results(problem):
    return {m: toy.train(m, problem, rank=RANK, lr=LR, steps=STEPS) for m in toy.METHODS}


def test_falqon_loss_falls(results):
    r = results["falqon"]
    assert r["final_loss"] < 0.6 * r["initial_loss"]


def _gain(r):
    return r["initial_loss"] - r["final_loss"]


def test_falqon_matches_float32_lora_on_the_same_adapter_space(results):
    """FALQON can only move W inside the row space of its frozen A; the float32 reference
    that trains B on that same A is the like-for-like comparison. The default rule (a live
    b) keeps every update, so only FP8 arithmetic separates the two: require 95% of the
    reference's loss reduction."""
    ratio = _gain(results["falqon"]) / _gain(results["lora_frozen_a"])
    assert ratio >= 0.95, (results, ratio)


def test_default_rule_beats_the_papers_proxy_merges(problem, results):
    """The paper's rule rounds sub-step updates away at each top-k merge; on the same data
    it must learn less than the default (here: its own previous measurement, about 85%)."""
    paper = toy.train("falqon", problem, rank=RANK, lr=LR, steps=STEPS, rule="paper")
    assert _gain(paper) < _gain(results["falqon"]), (paper, results["falqon"])


def test_standard_lora_reference_learns_the_task(results):
    """Sanity of the task: unrestricted LoRA fits the low-rank teacher delta."""
    r = results["lora"]
    assert r["final_loss"] < 0.05 * r["initial_loss"]


def test_proxy_buffer_beats_merging_every_row(problem, results):
    """Merging every row every step rounds small updates away in FP8; accumulating them in
    the proxy buffer and merging the top-k rows keeps them (the point of the method)."""
    every_row = toy.train("falqon", problem, rank=RANK, lr=LR, steps=STEPS, top_k=None,
                          rule="paper")
    top_k = toy.train("falqon", problem, rank=RANK, lr=LR, steps=STEPS, rule="paper")
    assert top_k["final_loss"] < 0.8 * every_row["final_loss"]
