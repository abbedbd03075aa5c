"""The update rules of ``falqon_update`` against float64 NumPy models: ``visible`` (a live
``b``), ``visible_merge``, the authors' ``reference`` rule, and the merge roundings
(stochastic, error feedback)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from falqon_jax import fp8, melded
from falqon_jax.optax import falqon_update
from tests import reference as ref
from tests.test_optax import (
    OUT,
    RANK,
    _assert_merged_like_reference,
    _bits,
    _fake_updates,
    _params,
)


def _stepper(tx):
    @jax.jit
    def step(params, state, updates):
        updates, state = tx.update(updates, state, params)
        return optax.apply_updates(params, updates), state

    return step


def test_visible_applies_the_update_to_b_and_leaves_w8_alone():
    params = _params(20, live=True)
    tx = falqon_update(rule="visible")  # top-k does not apply
    state = tx.init(params)
    assert state.buffers == {}  # no proxy buffer: b itself holds the update
    step = _stepper(tx)
    rng = np.random.default_rng(21)
    want = {name: np.asarray(params[name].b, np.float64) for name in ("stack", "single")}
    w8_before = {name: _bits(params[name].w8).copy() for name in ("stack", "single")}
    for _ in range(3):
        incoming = _fake_updates(params, rng)
        params, state = step(params, state, incoming)
        for name in want:
            want[name] = want[name] + np.asarray(incoming[name].b, np.float64)
            np.testing.assert_allclose(np.asarray(params[name].b), want[name], rtol=1e-6,
                                       atol=1e-8)
            np.testing.assert_array_equal(_bits(params[name].w8), w8_before[name])
    assert int(state.count) == 3


def _steps_beside_reference(params, tx, model, seed):
    """Three steps of ``tx`` on random updates (``seed``), each followed by the same step of
    ``model`` (the float64 reference of the ``stack`` layer) and a check that the FP8
    ``w8`` merged like the reference's; yields the optimizer state after each step."""
    state = tx.init(params)
    step = _stepper(tx)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        incoming = _fake_updates(params, rng)
        params, state = step(params, state, incoming)
        model.step(np.asarray(incoming["stack"].b))
        _assert_merged_like_reference(params["stack"].w8, model.w8)
        yield state


def test_reference_rule_is_k_rank_and_whole_buffer_cleared():
    params = _params(22)
    tx = falqon_update(3, rule="reference")  # the authors' code ignores top_k and reset
    model = ref.FalqonReference(np.asarray(params["stack"].w8), OUT, RANK, "all")
    for state in _steps_beside_reference(params, tx, model, 23):
        assert not np.any(np.asarray(state.buffers["stack"]))


@pytest.mark.parametrize("reset", ["merged", "all"])
def test_feedback_keeps_the_rounding_residual_in_the_buffer(reset):
    params = _params(24)
    tx = falqon_update(4, rule="paper", reset=reset, rounding="feedback")
    model = ref.FalqonReference(np.asarray(params["stack"].w8), OUT, 4, reset, feedback=True)
    for state in _steps_beside_reference(params, tx, model, 25):
        got = np.asarray(state.buffers["stack"], np.float64)
        # float32 solve of a 16 x 16 Gram system vs float64 least squares
        np.testing.assert_allclose(got, model.buf, rtol=1e-3, atol=1e-4 * np.abs(model.buf).max())
        assert np.any(got != 0)


def test_visible_merge_matches_reference_and_keeps_the_effective_weight():
    params = _params(26, live=True)
    tx = falqon_update(5, rule="visible_merge")
    state = tx.init(params)
    layer = params["stack"]
    model = ref.VisibleMergeReference(np.asarray(layer.w8), np.asarray(layer.b), OUT, 5)
    w_max = np.abs(np.asarray(layer.w8.astype(jnp.float32))[:, :OUT]).max()
    step = _stepper(tx)
    rng = np.random.default_rng(27)
    merged_any = False
    for _ in range(3):
        before = params["stack"]
        incoming = _fake_updates(params, rng, scale=0.05)  # reaches FP8 steps, no saturation
        params, state = step(params, state, incoming)
        model.step(np.asarray(incoming["stack"].b))
        _assert_merged_like_reference(params["stack"].w8, model.w8)
        np.testing.assert_allclose(np.asarray(params["stack"].b), model.b, rtol=1e-3,
                                   atol=1e-4 * np.abs(model.b).max())
        merged_any |= bool(np.any(_bits(params["stack"].w8) != _bits(before.w8)))
        # What the layer computes moved by the update, up to the part of each merged row's
        # remainder outside A's row space: per entry at most one step of the old value (not
        # merged) or half a step of the new one (merged).
        eff_before = np.asarray(melded.effective_weight(before), np.float64)
        eff_after = np.asarray(melded.effective_weight(params["stack"]), np.float64)
        wanted = eff_before + np.asarray(incoming["stack"].b, np.float64) @ np.asarray(
            before.a(), np.float64)
        scale = np.asarray(before.scale, np.float64)[:, None]
        steps = np.maximum(ref.step_away_from_zero(np.asarray(before.w8)[:, :OUT]),
                           ref.step_away_from_zero(np.asarray(params["stack"].w8)[:, :OUT]))
        steps = steps * scale[..., None]
        lost = np.linalg.norm(eff_after - wanted, axis=-1)
        assert np.all(lost <= np.linalg.norm(steps, axis=-1) + 1e-6)
        assert np.median(lost) < 1e-6  # rows not merged this step lose nothing
        backbone = np.abs(np.asarray(params["stack"].w8.astype(jnp.float32))[:, :OUT])
        assert backbone.max() <= w_max  # no merge saturated (that would lose more)
    assert merged_any


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    rng = np.random.default_rng(28)
    x = np.concatenate([rng.uniform(-20, 20, 60), rng.uniform(-0.02, 0.02, 4),
                        [447.0, -1000.0, 0.0, 1.0]]).astype(np.float32)
    draws = jax.vmap(lambda k: fp8.round_to(jnp.asarray(x), fp8.E4M3, "stochastic", k))(
        jax.random.split(jax.random.key(0), 4000))
    got = np.asarray(draws.astype(jnp.float32), np.float64)
    clipped = np.clip(x, -448, 448).astype(np.float64)
    e4m3 = ml_dtypes.float8_e4m3fn
    lo, hi = ref.neighbours(clipped, e4m3)
    assert np.all((got == lo) | (got == hi))
    p = np.where(hi > lo, (clipped - lo) / np.where(hi > lo, hi - lo, 1), 0)
    sigma = (hi - lo) * np.sqrt(p * (1 - p) / got.shape[0])
    assert np.all(np.abs(got.mean(axis=0) - clipped) <= 5 * sigma + 1e-12)
    # Representable values come back exactly; nearest mode is a plain saturating cast.
    np.testing.assert_array_equal(got[:, -1], 1.0)
    nearest = fp8.round_to(jnp.asarray(x), fp8.E4M3)
    np.testing.assert_array_equal(np.asarray(nearest).view(np.uint8),
                                  np.clip(x, -448, 448).astype(e4m3).view(np.uint8))


def test_stochastic_merges_land_on_neighbours_of_the_exact_merge():
    params = _params(29)
    tx = falqon_update(4, rule="paper", rounding="stochastic", seed=3)
    state = tx.init(params)
    incoming = _fake_updates(params, np.random.default_rng(30))
    new, state = _stepper(tx)(params, state, incoming)
    w8 = np.asarray(params["single"].w8)
    changed = np.flatnonzero(np.any(_bits(new["single"].w8) != _bits(w8), axis=1))
    assert 0 < len(changed) <= 4
    buf = np.asarray(incoming["single"].b, np.float64)
    exact = ref.f64(w8[changed]) + buf[changed] @ ref.f64(w8[OUT:])
    got = ref.f64(np.asarray(new["single"].w8)[changed])
    e4m3 = ml_dtypes.float8_e4m3fn
    lo, hi = ref.neighbours(np.clip(exact, -448, 448), e4m3)
    # float32 vs float64 Buf @ A can move a value across a code boundary: allow 0.1%.
    assert np.mean((got == lo) | (got == hi)) > 0.999
    near = np.clip(exact, -448, 448).astype(e4m3).astype(np.float64)
    assert np.mean(got != near) > 0.05  # not just round-to-nearest
