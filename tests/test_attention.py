"""Causal self-attention (:mod:`falqon_jax.model.attention`): the choice of kernel, the masked
and fused paths against a float64 NumPy reference, and the LLaMA with ``attention="cudnn"``
against ``attention="xla"``.

cuDNN cannot run on the CPU, so the model-level tests run :func:`~falqon_jax.model.attention.
fused` with ``implementation="xla"`` (the model looks ``attention.fused`` up at call time):
that checks what the model hands the fused kernel (row lengths of a right-padded batch, the
same keys for every query as the masked path's bias), not cuDNN itself. The slow SmolLM2
test uses the real cuDNN kernel when JAX's devices are NVIDIA GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax.model import attention as attention_module
from falqon_jax.model.attention import choose, fused, masked
from falqon_jax.model.config import load_card
from falqon_jax.model.llama import Llama, LlamaModel, plan_linears, trainable_mask
from falqon_jax.model.loading import random_params
from falqon_jax.train.trainer import combine, partition, token_loss_sum
from tests.helpers import decode_step_by_step, rel_err

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
F32_MIN = float(np.finfo(np.float32).min)

# Attention shapes: grouped queries (2 query heads per key/value head), right padding.
BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 3, 16, 4, 2, 8
LENGTHS = np.array([16, 11, 5], np.int32)

# float32 against float64: a softmax over 16 keys and dot products of 8 or 16 terms, each
# rounded to float32 (2**-24 relative), stay far below 1e-5 of the largest output.
F32_TOL = 1e-5
# bfloat16 outputs (8 significant bits: 2**-8 relative rounding) after bfloat16
# probabilities times bfloat16 values: a few bfloat16 ulps of the largest output.
BF16_TOL = 2.0**-6


# --------------------------------------------------------------------------------------
# choose


@pytest.mark.parametrize("platform", ["gpu", "cuda"])
def test_choose_auto_on_nvidia(platform):
    assert choose("auto", platform, jnp.bfloat16) == "cudnn"
    assert choose("auto", platform, "bfloat16") == "cudnn"
    assert choose("auto", platform, jnp.float16) == "cudnn"
    assert choose("auto", platform, jnp.float32) == "xla"
    assert choose("auto", platform, "float32") == "xla"


def test_choose_auto_and_xla_elsewhere():
    assert choose("auto", "cpu", jnp.bfloat16) == "xla"
    assert choose("auto", "tpu", jnp.bfloat16) == "xla"
    for platform in ("cpu", "gpu", "cuda", "tpu"):
        for dtype in (jnp.bfloat16, jnp.float32):
            assert choose("xla", platform, dtype) == "xla"


def test_choose_cudnn():
    assert choose("cudnn", "gpu", jnp.bfloat16) == "cudnn"
    assert choose("cudnn", "cuda", "float16") == "cudnn"
    with pytest.raises(ValueError, match="--attention") as error:
        choose("cudnn", "cpu", jnp.bfloat16)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--dtype") as error:
        choose("cudnn", "gpu", jnp.float32)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["flash", "CUDNN", ""])
def test_choose_unknown(name):
    with pytest.raises(ValueError, match="attention must be one of"):
        choose(name, "gpu", jnp.bfloat16)


# --------------------------------------------------------------------------------------
# A float64 NumPy reference of grouped-query causal attention over right-padded rows.


def allowed_keys(lengths: np.ndarray, seq: int) -> np.ndarray:
    """Bool ``(batch, seq, keys)``: key ``t`` is visible to query ``s`` of row ``i`` iff
    ``t <= s`` and ``t < lengths[i]`` (a padded query sees all of its row's real keys)."""
    slots = np.arange(seq)
    return (slots[None, None, :] <= slots[None, :, None]) & (
        slots[None, None, :] < np.asarray(lengths)[:, None, None])


def reference(q, k, v, lengths, w):
    """Float64 attention output ``(b, s, heads, head_dim)`` and the gradients of
    ``sum(out * w)`` with respect to ``q``, ``k``, ``v`` (the softmax backward by hand).

    Query head ``j`` reads key/value head ``j // (heads // kv_heads)``."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scale = d**-0.5
    kr, vr = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, kr) * scale
    scores = np.where(allowed_keys(lengths, s)[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhst,bthd->bshd", probs, vr)
    d_probs = np.einsum("bshd,bthd->bhst", w, vr)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
    dq = scale * np.einsum("bhst,bthd->bshd", d_scores, kr)
    dk = scale * np.einsum("bhst,bshd->bthd", d_scores, q)
    dv = np.einsum("bhst,bshd->bthd", probs, w)

    def fold(g):  # gradients of the repeated heads back onto their key/value head
        return g.reshape(b, g.shape[1], kv_heads, groups, d).sum(axis=3)

    return out, (dq, fold(dk), fold(dv))


def test_reference_gradient_is_the_finite_difference():
    """The hand-written backward of :func:`reference` against central differences (all
    float64), on a small case with grouped queries and padding."""
    rng = np.random.default_rng(1)
    shapes = [(2, 5, 4, 3), (2, 5, 2, 3), (2, 5, 2, 3)]
    q, k, v = (rng.standard_normal(shape) for shape in shapes)
    w = rng.standard_normal(shapes[0])
    lengths = np.array([5, 3])
    _, grads = reference(q, k, v, lengths, w)
    eps = 1e-6
    for index, x in enumerate((q, k, v)):
        numeric = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            args = [q, k, v]
            plus, minus = x.copy(), x.copy()
            plus[pos] += eps
            minus[pos] -= eps
            args[index] = plus
            up = (reference(*args, lengths, w)[0] * w).sum()
            args[index] = minus
            down = (reference(*args, lengths, w)[0] * w).sum()
            numeric[pos] = (up - down) / (2 * eps)
        assert np.abs(numeric - grads[index]).max() < 1e-7
    # the padded keys (positions >= length) get no gradient: nothing attends to them
    assert not grads[1][1, 3:].any() and not grads[2][1, 3:].any()


@pytest.fixture(scope="module")
def qkvw():
    """Random float32 ``q``, ``k``, ``v`` and the cotangent ``w``."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((BATCH, SEQ, HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((BATCH, SEQ, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((BATCH, SEQ, KV_HEADS, HEAD_DIM)).astype(np.float32)
    w = rng.standard_normal((BATCH, SEQ, HEADS, HEAD_DIM)).astype(np.float32)
    return q, k, v, w


def right_padding_bias(lengths: np.ndarray, seq: int) -> np.ndarray:
    """The float32 bias the LLaMA gives :func:`masked` for a right-padded batch without a
    cache: 0 where ``key <= query`` and ``key < length``, float32's minimum elsewhere."""
    return np.where(allowed_keys(lengths, seq), 0.0, F32_MIN).astype(np.float32)


def fused_xla(q, k, v, lengths):
    return fused(q, k, v, lengths, implementation="xla")


def masked_padded(q, k, v, lengths):  # lengths: concrete (NumPy), the bias is built here
    return masked(q, k, v, jnp.asarray(right_padding_bias(lengths, q.shape[1])))


KERNELS = {"fused": fused_xla, "masked": masked_padded}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_float32_matches_reference(kernel, qkvw):
    """Forward and the gradients of ``sum(out * w)`` with respect to ``q``, ``k``, ``v``."""
    q, k, v, w = qkvw
    attend = KERNELS[kernel]

    def objective(q, k, v):
        out = attend(q, k, v, LENGTHS)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    ref_out, ref_grads = reference(q, k, v, LENGTHS, w)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, ref_out) < F32_TOL
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        assert grad.shape == ref.shape, name
        assert rel_err(grad, ref) < F32_TOL, name
    # the padded keys get no gradient, the padded queries' outputs are real attention
    for row, length in enumerate(LENGTHS):
        assert not np.asarray(grads[1])[row, length:].any()
        assert not np.asarray(grads[2])[row, length:].any()


def test_bfloat16_fused_matches_masked(qkvw):
    """In bfloat16 both paths agree within a few bfloat16 ulps, and with the reference."""
    q, k, v, _ = (jnp.asarray(x, jnp.bfloat16) for x in qkvw)
    a = jax.jit(fused_xla)(q, k, v, jnp.asarray(LENGTHS))
    b = jax.jit(functools.partial(masked_padded, lengths=LENGTHS))(q, k, v)
    assert a.dtype == b.dtype == jnp.bfloat16
    ref, _ = reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                       LENGTHS, np.zeros(q.shape))
    assert rel_err(a, b) < BF16_TOL
    assert rel_err(a, ref) < BF16_TOL
    assert rel_err(b, ref) < BF16_TOL


@pytest.mark.parametrize("implementation", ["xla", "cudnn"])
def test_bfloat16_fused_gradients(implementation, qkvw):
    """:func:`fused` in bfloat16 (what cuDNN computes in) against the reference: forward and
    gradients within a few bfloat16 ulps (measured with XLA on the CPU: 2.6e-3 forward,
    at most 3.3e-3 for the gradients, about one ulp, 2**-8). cuDNN only on NVIDIA GPUs."""
    if implementation == "cudnn" and jax.devices()[0].platform not in ("gpu", "cuda"):
        pytest.skip("cuDNN needs an NVIDIA GPU")
    q, k, v, w = (jnp.asarray(x, jnp.bfloat16) for x in qkvw)
    lengths = jnp.asarray(LENGTHS)

    def objective(q, k, v):
        out = fused(q, k, v, lengths, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    ref_out, ref_grads = reference(*(x.astype(jnp.float32) for x in (q, k, v)), LENGTHS,
                                   w.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref_out) < BF16_TOL
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        assert grad.dtype == jnp.bfloat16, name
        assert rel_err(grad, ref) < BF16_TOL, name
    for row, length in enumerate(LENGTHS):
        assert not np.asarray(grads[1], np.float32)[row, length:].any()
        assert not np.asarray(grads[2], np.float32)[row, length:].any()


# --------------------------------------------------------------------------------------
# The model: attention="cudnn" (fused, here through XLA) against attention="xla" (masked).

MODEL_LENGTHS = np.array([16, 12, 7])


@pytest.fixture
def fused_on_xla(monkeypatch):
    """:func:`fused` as the model calls it, computed by XLA (cuDNN needs an NVIDIA GPU);
    the list of the ``lengths`` it was run with (NumPy)."""
    calls = []

    def patched(q, k, v, lengths):
        jax.debug.callback(lambda x: calls.append(np.asarray(x)), lengths)
        return fused(q, k, v, lengths, implementation="xla")

    monkeypatch.setattr(attention_module, "fused", patched)
    return calls


def model_batch(config, lengths, seq=16, seed=0):
    """Random tokens ``(rows, seq)`` and the 0/1 int32 mask of right padding."""
    tokens = np.random.default_rng(seed).integers(3, config.vocab_size, size=(len(lengths), seq))
    mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return tokens.astype(np.int32), mask


@pytest.mark.parametrize("method", ["full", "falqon"])
def test_model_cudnn_matches_xla(method, fused_on_xla):
    """Logits of a right-padded batch and the gradients of the token loss with respect to
    the trainable params (FALQON: FP8 layers with per-tensor activation scales, so a padded
    position that differed would change the real ones too)."""
    config = load_card("tiny")
    plan = plan_linears(config, method, rank=4)
    xla = Llama(config, plan, jnp.float32, attention="xla")
    cudnn = Llama(config, plan, jnp.float32, attention="cudnn")
    params = random_params(xla, 0)
    trainable, frozen = partition(params, trainable_mask(params, plan))
    tokens, mask = model_batch(config, MODEL_LENGTHS)
    loss_mask = mask.astype(np.float32)

    def loss(module, trainable):
        logits = module.apply({"params": combine(trainable, frozen)}, tokens, mask)
        return token_loss_sum(logits, tokens, loss_mask), logits

    results = {}
    for name, module in (("xla", xla), ("cudnn", cudnn)):
        step = jax.jit(jax.value_and_grad(functools.partial(loss, module), has_aux=True))
        results[name] = step(trainable)
    assert fused_on_xla, "attention='cudnn' did not call attention.fused"
    for lengths in fused_on_xla:
        np.testing.assert_array_equal(lengths, MODEL_LENGTHS)
    (loss_x, logits_x), grads_x = results["xla"]
    (loss_c, logits_c), grads_c = results["cudnn"]
    real = mask.astype(bool)
    assert np.isfinite(logits_c).all()
    assert rel_err(np.asarray(logits_c)[real], np.asarray(logits_x)[real]) < F32_TOL
    # both paths give a padded query the same keys (all its row's real ones): the padded
    # positions agree too
    assert rel_err(logits_c, logits_x) < F32_TOL
    assert abs(float(loss_c) - float(loss_x)) <= F32_TOL * abs(float(loss_x))
    flat_x, tree_x = jax.tree.flatten(grads_x)
    flat_c, tree_c = jax.tree.flatten(grads_c)
    assert tree_x == tree_c and flat_x
    for gx, gc in zip(flat_x, flat_c, strict=True):
        assert np.abs(np.asarray(gx)).max() > 0
        assert rel_err(gc, gx) < 1e-4


def test_model_kv_cache_with_cudnn(monkeypatch):
    """With a KV cache attention="cudnn" runs the masked path (never :func:`fused`), so
    left-padded prompts still work: prefill then one token at a time gives the full
    forward's logits."""

    def refuse(*args, **kwargs):
        raise AssertionError("attention.fused called with a KV cache")

    monkeypatch.setattr(attention_module, "fused", refuse)
    config = load_card("tiny")
    plan = plan_linears(config, "full")
    xla_module = Llama(config, plan, jnp.float32, attention="xla")
    params = random_params(xla_module, 0)
    cudnn = LlamaModel(Llama(config, plan, jnp.float32, attention="cudnn"), params)
    xla = LlamaModel(xla_module, params)
    tokens, _ = model_batch(config, [12, 12], seq=12, seed=1)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # a left-padded prompt
    prefill = 6
    full = np.asarray(xla.logits(tokens, mask))

    ours, _ = decode_step_by_step(cudnn, tokens, mask, prefill, max_len=16)
    real = mask.astype(bool)
    assert rel_err(ours[real], full[real]) < F32_TOL
    theirs, _ = decode_step_by_step(xla, tokens, mask, prefill, max_len=16)
    assert rel_err(ours[real], theirs[real]) < F32_TOL


# --------------------------------------------------------------------------------------
# A short SmolLM2 run.


def padded_batches(tokenizer, rows: int, count: int, seq: int):
    """``count`` right-padded batches ``(tokens int32, loss mask float32, attention int32)``
    of ``rows`` texts each, cut to at most ``seq`` tokens, of varied lengths."""
    words = ("the model learns a small adapter while its backbone stays in eight bit "
             "floating point and every merge rounds a few rows of the weight").split()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        tokens = np.zeros((rows, seq), np.int32)
        attention = np.zeros((rows, seq), np.int32)
        for row in range(rows):
            text = " ".join(rng.choice(words, size=int(rng.integers(8, 40))))
            ids = tokenizer.encode(text)[:seq]
            tokens[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
        ids = tokenizer.encode(" ".join(words * 3))[:seq]
        tokens[0], attention[0] = ids, 1  # one full row per batch
        batches.append((tokens, attention.astype(np.float32), attention))
    return batches


@pytest.mark.slow
def test_smollm2_short_run_losses(tmp_path_factory, monkeypatch):
    """Four FALQON steps of SmolLM2-135M in bfloat16 on right-padded batches: the losses
    with attention="cudnn" (cuDNN on an NVIDIA GPU, else the fused call through XLA) are
    those of attention="xla" within bfloat16 tolerance.

    The tolerance is the noise of this model's numerics, not of attention alone: with FP8
    activations (per-tensor scales) a rounding difference anywhere flips FP8 roundings
    downstream, and computing the masked attention in float32 instead of bfloat16 already
    moves these batches' first losses by up to 1.1%. Measured on the CPU (fused through
    XLA): at most 0.7% apart over the four steps."""
    if not (SMOLLM2 / "model.Q4_1.gguf").is_file():
        pytest.skip(f"{SMOLLM2} not present")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from falqon_jax import load_model
    from falqon_jax.bench.accuracy import prepare_smollm2
    from falqon_jax.model.methods import linear_method
    from falqon_jax.train.config import PAPER
    from falqon_jax.train.trainer import Trainer

    directory = prepare_smollm2(cache=tmp_path_factory.mktemp("smollm2"))
    if jax.devices()[0].platform not in ("gpu", "cuda"):
        monkeypatch.setattr(attention_module, "fused",
                            functools.partial(fused, implementation="xla"))
    config = dataclasses.replace(PAPER, model=str(directory), data="x", batch_size=4,
                                 dtype="bfloat16", remat=False, rank=16, steps=4)
    method = linear_method(config)
    assert method == "falqon"
    batches = padded_batches(AutoTokenizer.from_pretrained(directory), rows=4, count=4, seq=48)
    # one load (FALQON's SVD initialisation is most of this test's time) for both kernels
    model = load_model(directory, method=method, rank=config.rank, alpha=config.alpha,
                       dtype=config.dtype, targets=config.targets, seed=config.seed,
                       attention="cudnn")
    modules = {"cudnn": model.module, "xla": model.module.clone(attention="xla")}
    assert modules["cudnn"].attention == "cudnn" and modules["xla"].attention == "xla"
    losses = {}
    for attention, module in modules.items():

        def forward(params, tokens, attention, module=module):
            return module.apply({"params": params}, tokens, attention)

        trainer = Trainer(config, forward, model.trainable(), mesh=None)
        # the train step donates its state: each run starts from its own copy
        state = trainer.init_state(jax.tree.map(jnp.copy, model.params))
        losses[attention] = []
        for tokens, mask, attention_mask in batches:
            state, metrics = trainer.train_step(state, jnp.asarray(tokens), jnp.asarray(mask),
                                                jnp.asarray(attention_mask))
            losses[attention].append(float(metrics["loss"]))
    xla, cudnn = np.array(losses["xla"]), np.array(losses["cudnn"])
    assert np.isfinite(xla).all() and xla[-1] < xla[0] - 0.5, losses
    np.testing.assert_allclose(cudnn, xla, rtol=2e-2)


def test_cudnn_where_it_cannot_run_is_one_line_and_nothing_written(tmp_path, capsys):
    """``--attention cudnn`` on a CPU: one line naming the flag, a non-zero exit, no run
    directory; ``--attention xla`` and ``auto`` are accepted by the same parser."""
    from falqon_jax.train.run import main

    out = tmp_path / "run"
    code = main(["--attention", "cudnn", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--attention" in err[0], err
    assert not out.exists()
