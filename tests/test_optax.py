"""``falqon_update`` against a float64 NumPy model of the proxy-buffer update."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from falqon_jax import melded
from falqon_jax.optax import FalqonState, falqon_optimizer, falqon_update, trainable_mask
from tests import reference as ref

OUT, IN, RANK, LAYERS = 32, 48, 16, 3


def _stacked_layer(seed=0, layers=LAYERS, live=False):
    rng = np.random.default_rng(seed)
    ps = [melded.init(jnp.asarray(rng.standard_normal((OUT, IN)) * 0.05, jnp.float32), RANK,
                      b_in_forward=live)
          for _ in range(layers)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ps)


def _params(seed=0, live=False):
    """Melded layers for the proxy rules (``live=False``) or the ``visible*`` rules."""
    single = melded.init(jnp.asarray(np.random.default_rng(seed + 9).standard_normal((OUT, IN))
                                     * 0.05, jnp.float32), RANK, b_in_forward=live)
    return {"stack": _stacked_layer(seed, live=live), "single": single, "norm": jnp.ones((IN,))}


def _fake_updates(params, rng, scale=0.02):
    """Incoming updates as an optimizer would emit them (random here, to test the merge alone)."""
    def make(leaf):
        if melded.is_melded(leaf):
            b = jnp.asarray(rng.standard_normal(leaf.b.shape) * scale, jnp.float32)
            return melded.MeldedLinear(jnp.zeros_like(leaf.w8), jnp.zeros_like(leaf.scale), b,
                                       leaf.out, leaf.rank, leaf.b_in_forward)
        return jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32)
    return jax.tree.map(make, params, is_leaf=melded.is_melded)


def _bits(a):
    return np.asarray(a).view(np.uint8)


def _assert_merged_like_reference(got_w8, want_w8):
    """Merged entries equal the float64 reference except where float32 vs float64 rounding of
    ``Buf @ A`` straddles an FP8 rounding midpoint: then they differ by one FP8 step."""
    got = np.asarray(got_w8).astype(np.float64)
    want = want_w8.astype(np.float64)
    differ = got != want
    assert differ.mean() <= 1e-3, f"{differ.sum()} of {differ.size} entries differ"
    spacing = np.spacing(np.abs(want).astype(ml_dtypes.float8_e4m3fn)).astype(np.float64)
    assert np.all(np.abs(got - want)[differ] <= spacing[differ] * 1.0001)


@pytest.mark.parametrize("reset", ["merged", "all"])
@pytest.mark.parametrize("top_k", [1, 5, OUT])
def test_matches_reference_over_steps(reset, top_k):
    params = _params()
    tx = falqon_update(top_k, rule="paper", reset=reset)
    state = tx.init(params)
    refs = {name: ref.FalqonReference(
        np.asarray(params[name].w8).reshape((-1, OUT + RANK, IN)), OUT, top_k, reset)
        for name in ("stack", "single")}

    @jax.jit
    def step(params, state, updates):
        updates, state = tx.update(updates, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(1)
    original = params
    for _ in range(4):
        incoming = _fake_updates(params, rng)
        params, state = step(params, state, incoming)
        for name, model in refs.items():
            model.step(np.asarray(incoming[name].b).reshape(model.buf.shape))
            _assert_merged_like_reference(params[name].w8.reshape(model.w8.shape), model.w8)
            np.testing.assert_allclose(
                np.asarray(state.buffers[name]).reshape(model.buf.shape), model.buf,
                rtol=1e-5, atol=1e-7)
    for name in ("stack", "single"):
        assert not np.any(np.asarray(params[name].b))  # b never leaves zero
        np.testing.assert_array_equal(params[name].scale, original[name].scale)
    # Non-melded leaves take their update unchanged (here: 4 random steps were added).
    assert not np.allclose(params["norm"], original["norm"])


def test_untouched_rows_stay_bit_identical_and_only_k_rows_change():
    params = _params(2)
    tx = falqon_update(3, rule="paper")
    state = tx.init(params)
    incoming = _fake_updates(params, np.random.default_rng(3), scale=1.0)
    updates, state = tx.update(incoming, state, params)
    new = optax.apply_updates(params, updates)
    for name in ("stack", "single"):
        before = _bits(params[name].w8).reshape(-1, OUT + RANK, IN)
        after = _bits(new[name].w8).reshape(-1, OUT + RANK, IN)
        for layer in range(before.shape[0]):
            changed = np.flatnonzero(np.any(before[layer] != after[layer], axis=1))
            assert 0 < len(changed) <= 3 and np.all(changed < OUT)  # A rows never change
        # Exactly the merged rows of the buffer were cleared.
        buf = np.asarray(state.buffers[name]).reshape(-1, OUT, RANK)
        assert np.all((buf == 0).all(axis=-1).sum(axis=-1) == 3)


def test_optimizer_chain_under_jit_with_donation():
    params = _params(4)
    tx = falqon_optimizer(optax.chain(optax.clip_by_global_norm(3.0), optax.adamw(2e-3)), 10,
                          rule="paper")
    state = tx.init(params)

    def loss(p, x):
        h = melded.apply(jax.tree.map(lambda a: a[0], p["stack"]), x) * p["norm"][:OUT]
        return jnp.mean((h - 1.0) ** 2)

    @jax.jit
    def train_step(params, state, x):
        grads = jax.grad(loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((64, IN)), jnp.float32)
    first = float(loss(params, x))
    w8_before = np.asarray(params["stack"].w8).copy()
    norm_before = np.asarray(params["norm"]).copy()
    for _ in range(20):
        params, state = step(params, state, x)
    assert float(loss(params, x)) < first
    assert np.any(_bits(params["stack"].w8) != _bits(w8_before))  # merges happened
    assert not np.allclose(params["norm"], norm_before)  # other trainables still train
    assert not np.any(np.asarray(params["stack"].b))


def _float32_frozen_slots(updates):
    """Updates whose frozen w8/scale slots are float32 zeros instead of jax.grad's float8."""
    def widen(leaf):
        if melded.is_melded(leaf):
            return melded.MeldedLinear(jnp.zeros(leaf.w8.shape, jnp.float32), leaf.scale,
                                       leaf.b, leaf.out, leaf.rank, leaf.b_in_forward)
        return leaf
    return jax.tree.map(widen, updates, is_leaf=melded.is_melded)


@pytest.mark.parametrize("form", ["multisteps-around-update", "falqon-optimizer-every-k"])
def test_gradient_accumulation_accumulates_then_merges(form):
    params = _params(6)
    k_steps = 3
    if form == "multisteps-around-update":
        tx = optax.MultiSteps(falqon_update(4, rule="paper"), every_k_schedule=k_steps)
        prepare = _float32_frozen_slots  # optax's float32 accumulators cannot take float8
    else:  # masked accumulation of the trainable leaves only; float8 grads are fine
        tx = falqon_optimizer(optax.identity(), 4, rule="paper", every_k=k_steps)
        prepare = lambda u: u  # noqa: E731
    state = tx.init(params)
    model = ref.FalqonReference(np.asarray(params["stack"].w8), OUT, 4, "merged")

    @jax.jit
    def step(params, state, incoming):
        updates, state = tx.update(incoming, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(7)
    for _ in range(2):
        acc = []
        for mini in range(k_steps):
            before = _bits(params["stack"].w8).copy()
            incoming = _fake_updates(params, rng)
            acc.append(np.asarray(incoming["stack"].b, np.float64))
            params, state = step(params, state, prepare(incoming))
            if mini < k_steps - 1:  # accumulating: the weights keep every bit
                np.testing.assert_array_equal(_bits(params["stack"].w8), before)
        model.step(np.mean(acc, axis=0))
        _assert_merged_like_reference(params["stack"].w8, model.w8)
    assert not np.any(np.asarray(params["stack"].b))


def test_state_is_a_plain_pytree_orbax_can_save(tmp_path):
    import orbax.checkpoint as ocp

    params = _params(8)
    tx = falqon_update(2, rule="paper")
    state = tx.init(params)
    updates, state = tx.update(_fake_updates(params, np.random.default_rng(9)), state, params)
    assert isinstance(state, FalqonState)
    assert set(state.buffers) == {"stack", "single"}
    assert state.buffers["stack"].shape == (LAYERS, OUT, RANK)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)


@pytest.mark.parametrize("rule", ["paper", "visible", "visible_merge"])
def test_merge_touches_only_k_rows_in_memory(rule):
    """One donated update+apply step on a LLaMA-7B MLP matrix (11008 x 4096, rank 64, k=10,
    after AdamW) needs far less temporary memory than a dense copy of the weight (45 MB FP8)."""
    out, inp, rank = 11008, 4096, 64
    p = melded.MeldedLinear(
        w8=jax.ShapeDtypeStruct((out + rank, inp), jnp.float8_e4m3fn),
        scale=jax.ShapeDtypeStruct((), jnp.float32),
        b=jax.ShapeDtypeStruct((out, rank), jnp.float32), out=out, rank=rank,
        b_in_forward=rule != "paper")
    tx = falqon_optimizer(optax.chain(optax.clip_by_global_norm(3.0), optax.adamw(2e-3)), 10,
                          rule=rule)
    state = jax.eval_shape(tx.init, p)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, state, p).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 16 * 2**20, f"temp {temp / 2**20:.1f} MiB"


def test_trainable_mask_marks_only_b():
    params = _params()
    mask = trainable_mask(params)
    assert mask["stack"].b is True and mask["stack"].w8 is False and mask["stack"].scale is False
    assert bool(mask["norm"]) is True


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        falqon_update(0)
    with pytest.raises(ValueError, match="reset"):
        falqon_update(10, reset="some")
    with pytest.raises(ValueError, match="rule"):
        falqon_update(10, rule="some")
    with pytest.raises(ValueError, match="rounding"):
        falqon_update(10, rounding="some")
    params = _params()
    tx = falqon_update(OUT + 1, rule="paper")
    state = tx.init(params)
    with pytest.raises(ValueError, match="exceeds"):
        tx.update(_fake_updates(params, np.random.default_rng(0)), state, params)
    with pytest.raises(ValueError, match="needs params"):
        falqon_update(2).update(params, falqon_update(2, rule="paper").init(params))
    # Layers must match the rule: a live rule on proxy layers would train an unused b.
    with pytest.raises(ValueError, match="b_in_forward=True"):
        falqon_update(2, rule="visible").init(params)
    with pytest.raises(ValueError, match="b_in_forward=False"):
        falqon_update(2, rule="paper").init(_params(live=True))
