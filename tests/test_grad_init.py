"""``--init-a grad``: A from the top right singular vectors of each weight's loss gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from falqon_jax import melded
from falqon_jax.model.methods import Dense
from falqon_jax.train import grad_init


def test_gradient_directions_are_the_top_right_singular_vectors():
    g = np.random.default_rng(0).standard_normal((2, 48, 32)).astype(np.float32)
    got = np.asarray(grad_init.gradient_directions(jnp.asarray(g), 4), np.float64)
    for layer in range(2):
        _, _, vt = np.linalg.svd(g[layer].astype(np.float64), full_matrices=False)
        for i in range(4):  # singular vectors are defined up to sign
            assert abs(abs(got[layer, i] @ vt[i]) - 1) < 1e-4


def test_realign_rebuilds_melded_layers_from_dense_weights_and_gradients():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((3, 48, 32)) * 0.05, jnp.float32)  # stacked (L, out, in)
    grad = jnp.asarray(rng.standard_normal((3, 48, 32)), jnp.float32)
    placeholder = jax.vmap(lambda w: melded.init(w, 8, key=jax.random.key(0), init="random"))(w)
    params = {"proj": placeholder, "norm": jnp.ones((32,))}
    dense = {"proj": Dense(w), "norm": jnp.ones((32,))}
    grads = {"proj": Dense(grad), "norm": None}
    out = grad_init.realign(params, dense, grads, lambda in_features, rank: 0.1)
    layer = out["proj"]
    assert layer.w8.shape == (3, 56, 32) and layer.b_in_forward
    a = np.asarray(layer.a(), np.float64)
    want = np.asarray(grad_init.gradient_directions(grad, 8), np.float64) * 0.1
    np.testing.assert_allclose(np.abs(a), np.abs(want), rtol=2.0**-4 + 1e-6, atol=1e-3)
    np.testing.assert_allclose(np.asarray(melded.dequantize(layer)), np.asarray(w),
                               rtol=2.0**-4, atol=1e-3)
    assert out["norm"] is params["norm"]
