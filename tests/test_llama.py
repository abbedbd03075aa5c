"""The Flax LLaMA against transformers on a real checkpoint, plus its KV cache, scan and methods."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax import gpu_program, load_model, melded
from falqon_jax.model import methods
from falqon_jax.model.config import load_card
from falqon_jax.model.llama import (
    LinearPlan,
    Llama,
    abstract_params,
    plan_linears,
    trainable_mask,
)
from falqon_jax.model.loading import random_params
from tests.helpers import decode_step_by_step, rel_err

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
TOL = 1e-4

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES, dtype="float32")


@pytest.fixture(scope="module")
def tokens():
    tokens = np.random.default_rng(0).integers(3, 512, size=(2, 24))
    tokens[:, 0] = 1  # BOS
    return tokens


def hf_logits(hf_model, tokens, mask=None, positions=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return hf_model(torch.tensor(tokens), **kwargs).logits.numpy()


def test_full_matches_transformers(model, hf_model, tokens):
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model.logits(tokens))
    assert ours.shape == (2, 24, 512) and ours.dtype == np.float32
    assert rel_err(ours, hf_logits(hf_model, tokens)) < TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_full_matches_transformers_with_padding(model, hf_model, tokens, side):
    """Padding is masked out as keys; RoPE positions count real tokens only.

    transformers gets the same positions (``cumsum(mask) - 1``) explicitly; only real
    (unpadded) query positions are compared, padded ones are meaningless in both.
    """
    mask = np.ones_like(tokens)
    if side == "left":
        mask[1, :7] = 0
    else:
        mask[1, -7:] = 0
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model.logits(tokens, mask))
    ref = hf_logits(hf_model, tokens, mask, positions)
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    assert rel_err(ours[real], ref[real]) < TOL


def test_left_padding_gives_unpadded_logits(model, tokens):
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    with jax.default_matmul_precision("highest"):
        padded = np.asarray(model.logits(tokens, mask))[0, 5:]
        alone = np.asarray(model.logits(tokens[:1, 5:]))[0]
    assert rel_err(padded, alone) < TOL


def test_kv_cache_matches_full_forward(model, tokens):
    """Prefill a left-padded batch, then decode one token at a time."""
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    prefill = 8
    with jax.default_matmul_precision("highest"):
        full = np.asarray(model.logits(tokens, mask))
        incremental, cache = decode_step_by_step(model, tokens, mask, prefill, max_len=32)
    with pytest.raises(ValueError, match="KV cache full"):
        model.decode(np.ones((2, 9), np.int32), cache)
    real = mask.astype(bool)
    assert rel_err(incremental[real], full[real]) < TOL
    assert int(cache.index) == tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.next_position), mask.sum(axis=1))


def test_greedy_decoding_matches_transformers_generate(model, hf_model):
    new = 24
    prompt = torch.tensor([[1]])
    ref = hf_model.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new)
    out = [1]
    with jax.default_matmul_precision("highest"):
        cache = model.init_cache(batch=1, max_len=new + 1)
        logits, cache = model.decode(np.array([[1]]), cache)
        for _ in range(new):
            out.append(int(np.argmax(logits[0, -1])))
            logits, cache = model.decode(np.array([[out[-1]]]), cache)
    assert out == ref[0].tolist()


def _hlo_op_count(num_layers: int) -> int:
    config = dataclasses.replace(load_card("tiny"), num_layers=num_layers)
    module = Llama(config, LinearPlan(), jnp.bfloat16)
    params = abstract_params(module)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    text = jax.jit(module.apply).lower({"params": params}, tokens).as_text()
    return len(re.findall(r"\bstablehlo\.\w+", text))


def test_scan_keeps_program_size_independent_of_depth():
    """The decoder layers are one ``nn.scan``: 8 layers lower to the same program as 2."""
    two, eight = _hlo_op_count(2), _hlo_op_count(8)
    assert two > 50
    assert eight == two


def test_params_are_stacked_over_layers(model):
    config = model.config
    layers = model.params["layers"]
    assert layers["self_attn"]["q_proj"].w.shape == (config.num_layers, 64, 64)
    assert layers["mlp"]["down_proj"].w.shape == (config.num_layers, 64, 172)
    assert layers["input_layernorm"]["weight"].shape == (config.num_layers, 64)
    assert "lm_head" not in model.params  # stories260K ties lm_head to the embeddings


def test_falqon_gradients_reach_only_b():
    config = dataclasses.replace(load_card("tiny"), num_layers=2)
    plan = plan_linears(config, "falqon", targets=["q", "v", "down"], rank=16)
    module = Llama(config, plan, jnp.float32, remat=True)
    params = random_params(module, seed=0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, size=(2, 8)))

    def loss(p):
        return jnp.mean(module.apply({"params": p}, tokens) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    q = grads["layers"]["self_attn"]["q_proj"]
    assert isinstance(q, melded.MeldedLinear) and q.b.shape == (2, 64, 16)
    assert float(jnp.abs(q.b).max()) > 0
    assert not np.any(np.asarray(q.w8, np.float32))
    assert float(jnp.abs(grads["layers"]["mlp"]["down_proj"].b).max()) > 0
    mask = trainable_mask(params, plan)
    assert mask["layers"]["self_attn"]["q_proj"].b is True
    assert mask["layers"]["self_attn"]["q_proj"].w8 is False
    assert mask["layers"]["self_attn"]["k_proj"] == methods.Dense(False)  # not targeted
    assert mask["embed_tokens"] is False and mask["lm_head"].w is False


def test_remat_flag_checkpoints_the_layers():
    """With ``remat`` the scanned layer is a ``remat`` (checkpoint) in the gradient program."""
    config = dataclasses.replace(load_card("tiny"), num_layers=2)
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)

    def grad_jaxpr(remat: bool) -> str:
        module = Llama(config, LinearPlan(), jnp.bfloat16, remat=remat)
        params = abstract_params(module)

        def loss(p, t):
            return jnp.mean(module.apply({"params": p}, t))

        return str(jax.make_jaxpr(jax.grad(loss))(params, tokens))

    assert re.search(r"\bremat", grad_jaxpr(True))
    assert not re.search(r"\bremat", grad_jaxpr(False))


# --------------------------------------------------------------------------------------
# The method registry.


def test_registry_names_and_unknown_method():
    assert {"full", "frozen", "falqon", "lora", "fp8_lora", "qlora"} <= set(methods.available())
    with pytest.raises(ValueError, match="unknown linear method 'nope'.*falqon"):
        methods.get("nope")


def test_missing_method_module_is_a_clear_error():
    ghost = methods.Method("ghost", "falqon_jax.no_such_method_module")
    with pytest.raises(ImportError, match="'ghost' is registered but its module"):
        ghost.init(jnp.ones((16, 16)), 4, alpha=1.0, key=jax.random.key(0), dtype=jnp.float32)


def test_full_and_falqon_methods():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((48, 32)).astype(np.float32) * 0.1)
    x = jnp.asarray(rng.standard_normal((2, 5, 32)).astype(np.float32))
    key = jax.random.key(0)
    full = methods.get("full")
    p = full.init(w, 8, alpha=16.0, key=key, dtype=jnp.bfloat16)
    assert isinstance(p, methods.Dense) and p.w.dtype == jnp.bfloat16
    y = full.apply(p, x)
    assert y.shape == (2, 5, 48) and y.dtype == jnp.float32
    expected = np.asarray(x) @ np.asarray(p.w.astype(jnp.float32)).T
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)
    assert full.trainable(p) == methods.Dense(True)
    assert methods.get("frozen").trainable(p) == methods.Dense(False)

    falqon = methods.get("falqon")
    m = falqon.init(w, 8, alpha=16.0, key=key, dtype=jnp.bfloat16)
    assert isinstance(m, melded.MeldedLinear) and m.w8.shape == (56, 32)
    assert falqon.apply(m, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="falqon: .*multiple of 16"):
        falqon.init(jnp.ones((172, 64)), 8, alpha=16.0, key=key, dtype=jnp.bfloat16)


def test_plan_leaves_unconvertible_layers_dense_and_frozen():
    config = load_card("tiny")
    odd = dataclasses.replace(config, intermediate_size=172)
    with pytest.warns(
        UserWarning, match=r"falqon leaves 3 layer kind\(s\) unconverted.*gate \(172x64\)"
    ):
        plan = plan_linears(odd, "falqon", rank=16)
    assert (plan.q, plan.gate, plan.down, plan.lm_head) == ("falqon", "frozen", "frozen", "frozen")
    plan = plan_linears(config, "falqon", targets=["q", "v", "lm_head"], rank=16)
    assert (plan.q, plan.k, plan.v, plan.lm_head) == ("falqon", "frozen", "falqon", "falqon")
    assert not plan.train_base
    with pytest.raises(ValueError, match="unknown targets"):
        plan_linears(config, "falqon", targets=["qkv"])


def _falqon_grads_and_program(remat: bool):
    config = dataclasses.replace(load_card("tiny"), num_layers=2)
    plan = plan_linears(config, "falqon", rank=16)
    module = Llama(config, plan, jnp.float32, remat=remat)
    params = random_params(module, seed=0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, size=(2, 16)))

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(module.apply({"params": p}, tokens)) ** 2)

    grad = jax.jit(jax.value_and_grad(loss))
    return grad(params), grad.lower(params).compile().as_text()


def test_remat_saves_q_ax_and_does_not_recompute_down_proj():
    """Gradient checkpointing saves FALQON's ``Q(A x)``: down_proj's melded GEMM (its output
    only joins the residual stream) runs once per layer, not again in the backward; the
    loss and every gradient equal those of the step without checkpointing, bit for bit."""
    (loss, grads), program = _falqon_grads_and_program(remat=True)
    (loss_ref, grads_ref), program_ref = _falqon_grads_and_program(remat=False)

    def down_forward_gemms(text: str) -> int:
        """GEMMs with the melded down_proj weight (64 + 16 rows, 176 in), FP8 widened on CPU."""
        return sum(g.calls for g in gpu_program.gemms(gpu_program.parse(text))
                   if g.rhs[1] == (80, 176))

    layers = 2
    assert down_forward_gemms(program_ref) == layers  # no remat: the forward only
    assert down_forward_gemms(program) == layers  # remat: still once a layer, not twice
    assert float(loss) == float(loss_ref)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
