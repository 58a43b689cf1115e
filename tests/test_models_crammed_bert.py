"""fffjax.models.crammed_bert: the crammed-BERT NNX modules (the configs: test_models_config.py; the
torch parity tests: test_convert_ultrafastbert.py)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fffjax.models import (
    CrammedBertClassifier,
    CrammedBertMLM,
    cast_parameters,
    count_parameters,
    get_config,
    mlm_logits_at,
    sinusoidal_positions,
)
from fffjax.ops import set_implementation

TINY = get_config("tiny")


def _batch(config, batch=3, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, size=(batch, seq))
    lengths = np.array([seq, seq - 5, 3])[:batch]
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, config.pad_token_id)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope="module")
def tiny_mlm():
    model = CrammedBertMLM(TINY, rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_sinusoidal_positions_interleave_sin_and_cos():
    table = sinusoidal_positions(10, 8)
    t, i = 7, 2
    omega = math.exp(-2 * i * math.log(10000.0) / 8)
    np.testing.assert_allclose(table[t, 2 * i], math.sin(t * omega), atol=1e-6)
    np.testing.assert_allclose(table[t, 2 * i + 1], math.cos(t * omega), atol=1e-6)
    np.testing.assert_array_equal(table[0, 1::2], 1.0)


def test_mlm_shapes_init_and_parameter_count(tiny_mlm):
    ids, mask = _batch(TINY)
    logits = tiny_mlm(ids, mask)
    assert logits.shape == (3, 16, TINY.vocab_size) and logits.dtype == jnp.float32
    assert tiny_mlm.encode(ids, mask).shape == (3, 16, TINY.hidden_size)
    emb = tiny_mlm.encoder.embedding
    assert np.all(np.asarray(emb.word_embedding.embedding[...][TINY.pad_token_id]) == 0.0)
    np.testing.assert_allclose(emb.pos_embedding.scale_factor[...], [1 / math.sqrt(TINY.hidden_size)], rtol=1e-6)
    ffn = tiny_mlm.encoder.layers[0].ffn
    assert ffn.w_in[...].shape == (TINY.fff_nodes, TINY.hidden_size)
    assert 0.015 < float(jnp.std(ffn.w_in[...])) < 0.025 and float(jnp.abs(ffn.b_in[...]).max()) == 0.0
    h, n, v, layers = TINY.hidden_size, TINY.fff_nodes, TINY.vocab_size, TINY.num_layers
    expected = v * h + 1 + 2 * h + layers * (4 * h + 3 * h * h + h * h + 2 * n * h + n) + 2 * h
    assert count_parameters(tiny_mlm) == expected


def test_base_shapes_without_materialising():
    abstract = nnx.eval_shape(lambda: CrammedBertMLM(get_config("base"), rngs=nnx.Rngs(0)))
    assert count_parameters(abstract) == 163_671_025
    layer = abstract.encoder.layers[15]
    assert layer.attn.query_key_value.kernel.shape == (768, 2304)
    assert layer.ffn.w_in.shape == (4095, 768) and layer.ffn.w_out.shape == (4095, 768)
    dense = nnx.eval_shape(lambda: CrammedBertMLM(get_config("base-dense"), rngs=nnx.Rngs(0)))
    assert dense.encoder.layers[0].ffn.dense_in.kernel.shape == (768, 3072)


def test_padding_is_masked(tiny_mlm):
    """Appending padded positions leaves the logits of the real tokens unchanged."""
    ids, _ = _batch(TINY, batch=1, seq=8)
    short = tiny_mlm(ids, jnp.ones_like(ids))
    padded_ids = jnp.concatenate([ids, jnp.zeros((1, 5), jnp.int32)], axis=1)
    padded_mask = jnp.concatenate([jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 5), jnp.int32)], axis=1)
    padded = tiny_mlm(padded_ids, padded_mask)
    np.testing.assert_allclose(padded[:, :8], short, atol=2e-5)
    unmasked = tiny_mlm(padded_ids, None)
    assert float(jnp.abs(unmasked[:, :8] - short).max()) > 1e-3


def test_conditional_fff_equals_masked_reference():
    model = CrammedBertMLM(TINY, implementation="xla", rngs=nnx.Rngs(1))
    model.eval()
    ids, mask = _batch(TINY, seed=1)
    conditional = model(ids, mask)
    set_implementation(model, "fff_v2_hard", "reference")
    assert model.encoder.layers[1].ffn.implementation == "reference"
    np.testing.assert_allclose(model(ids, mask), conditional, atol=1e-5)


def test_dense_twin_runs_and_differs_from_fff():
    """Same seed, same input, the same parameters outside the feedforward: the logits differ, and
    only through the feedforward (zeroing both feedforward outputs makes them equal)."""
    from fffjax.models.crammed_bert import DenseFF
    from fffjax.nn import UltraFastFF

    fff = CrammedBertMLM(TINY, rngs=nnx.Rngs(0))
    dense = CrammedBertMLM(get_config("tiny-dense"), rngs=nnx.Rngs(0))
    fff.eval()
    dense.eval()
    assert not any(isinstance(node, UltraFastFF) for _, node in nnx.iter_graph(dense))
    for layer in dense.encoder.layers:
        assert isinstance(layer.ffn, DenseFF) and layer.ffn.dense_in.kernel.shape == (64, 256)
    fff_params = nnx.to_pure_dict(nnx.state(fff, nnx.Param))
    dense_params = nnx.to_pure_dict(nnx.state(dense, nnx.Param))
    dense_params["encoder"]["embedding"] = fff_params["encoder"]["embedding"]
    dense_params["encoder"]["final_norm"] = fff_params["encoder"]["final_norm"]
    for i, layer in dense_params["encoder"]["layers"].items():
        dense_params["encoder"]["layers"][i] = {**fff_params["encoder"]["layers"][i], "ffn": layer["ffn"]}
    dense_state = nnx.state(dense, nnx.Param)
    nnx.replace_by_pure_dict(dense_state, dense_params)
    nnx.update(dense, dense_state)

    ids, mask = _batch(TINY)
    fff_logits, dense_logits = fff(ids, mask), dense(ids, mask)
    assert fff_logits.shape == dense_logits.shape == (3, 16, TINY.vocab_size)
    assert np.isfinite(np.asarray(fff_logits)).all() and np.isfinite(np.asarray(dense_logits)).all()
    # The feedforwards' share of the logits is small at init (normal 0.02 weights), yet far above the
    # float32 rounding that bounds the difference once both feedforwards output zero (below).
    assert float(jnp.abs(fff_logits - dense_logits).max()) > 1e-3

    for layer in fff.encoder.layers:
        layer.ffn.w_out[...] = jnp.zeros_like(layer.ffn.w_out[...])
    for layer in dense.encoder.layers:
        layer.ffn.dense_out.kernel[...] = jnp.zeros_like(layer.ffn.dense_out.kernel[...])
    np.testing.assert_allclose(fff(ids, mask), dense(ids, mask), rtol=0, atol=1e-6)


def test_dropout_train_and_eval_modes():
    config = dataclasses.replace(TINY, dropout=0.5)
    model = CrammedBertMLM(config, rngs=nnx.Rngs(0, dropout=1))
    ids, mask = _batch(TINY)
    first, second = model(ids, mask), model(ids, mask)  # train mode: the dropout stream advances
    assert float(jnp.abs(first - second).max()) > 1e-3
    model.eval()
    np.testing.assert_array_equal(model(ids, mask), model(ids, mask))


def test_fused_attention_equals_the_explicit_form():
    """Eval mode runs fffjax.ops.attention; it must equal the einsum form the training path runs."""
    from fffjax.models.crammed_bert import SelfAttention, additive_mask

    attn = SelfAttention(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
    attn.eval()
    x = jax.random.normal(jax.random.key(2), (3, 16, TINY.hidden_size))
    _, mask = _batch(TINY)
    bias = additive_mask(mask, jnp.float32)
    b, s, h = x.shape
    qkv = (x @ attn.query_key_value.kernel[...]).reshape(b, s, TINY.num_heads, 3, TINY.attention_head_width)
    scores = jnp.einsum("bqnd,bknd->bnqk", qkv[..., 0, :], qkv[..., 1, :]) * TINY.norm_factor + bias[:, None, None, :]
    context = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), qkv[..., 2, :]).reshape(b, s, h)
    want = context @ attn.dense.kernel[...]
    for implementation in (None, "xla", "pallas"):   # pallas: interpret mode on the CPU
        set_implementation(attn, "attention", implementation)
        np.testing.assert_allclose(attn(x, bias), want, atol=1e-5)
        np.testing.assert_allclose(attn(x, None), attn(x, jnp.zeros_like(bias)), atol=1e-6)
    with pytest.raises(ValueError, match="implementation must be one of .* for attention, got 'flash'"):
        set_implementation(attn, "attention", "flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("op", ["layer_norm", "attention", "gelu"])
def test_pallas_kernels_give_the_xla_logits(dtype, op):
    # Interpret mode here. Norms: the one-pass kernel with the attention residual add fused into norm2;
    # attention: the kernel that reads the fused QKV projection, with the padding mask; gelu: the dense
    # twin's feedforward.
    config = get_config("tiny-dense") if op == "gelu" else TINY
    model = CrammedBertMLM(config, dtype=dtype, implementation="xla", rngs=nnx.Rngs(3))
    model.eval()
    ids, mask = _batch(TINY)
    set_implementation(model, op, "xla")
    want = model(ids, mask)
    set_implementation(model, op, "pallas")
    got = model(ids, mask)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2 * float(jnp.max(jnp.abs(want)))   # bf16: a rounding here and there
    np.testing.assert_allclose(got, want, atol=tol)
    with pytest.raises(ValueError, match=f"implementation must be one of .* for {op}, got 'apex'"):
        set_implementation(model, op, "apex")


def test_set_implementation_switches_only_the_modules_of_its_op():
    model = CrammedBertMLM(get_config("tiny-dense"), rngs=nnx.Rngs(0))
    set_implementation(model, "gelu", "pallas")
    layer = model.encoder.layers[0]
    assert layer.ffn.implementation == "pallas"
    assert layer.attn.implementation is None and layer.norm1.implementation is None
    set_implementation(model, "layer_norm", "xla")
    assert model.encoder.final_norm.implementation == "xla" and layer.norm2.implementation == "xla"
    with pytest.raises(ValueError, match="op must be one of"):
        set_implementation(model, "softmax", "xla")


def test_sparse_prediction_matches_full_logits(tiny_mlm):
    ids, mask = _batch(TINY)
    positions = jnp.array([[0, 5, 15], [1, 2, 3], [0, 1, 2]], jnp.int32)
    sparse = mlm_logits_at(tiny_mlm, ids, mask, positions)
    full = tiny_mlm(ids, mask)
    np.testing.assert_allclose(sparse, jnp.take_along_axis(full, positions[..., None], axis=1), atol=1e-5)


def test_pad_row_gets_no_gradient_through_the_lookup(tiny_mlm):
    ids, mask = _batch(TINY)

    def hidden_sum(model):
        return jnp.sum(model.encode(ids, mask) ** 2)

    grads = nnx.jit(nnx.grad(hidden_sum))(tiny_mlm)
    table_grad = grads.encoder.embedding.word_embedding.embedding[...]
    assert float(jnp.abs(table_grad[TINY.pad_token_id]).max()) == 0.0
    assert float(jnp.abs(table_grad[ids[0, 0]]).max()) > 0.0


@pytest.mark.parametrize("num_labels", [1, 3])
def test_classifier_shapes(num_labels):
    config = dataclasses.replace(TINY, num_labels=num_labels)
    model = CrammedBertClassifier(config, rngs=nnx.Rngs(0))
    model.eval()
    ids, mask = _batch(TINY)
    out = model(ids, mask)
    assert out.shape == (3, num_labels) and out.dtype == jnp.float32
    assert model.pooler.dense.kernel.shape == (TINY.hidden_size, TINY.head_dim)


def test_bf16_compute_runs_close_to_fp32(tiny_mlm):
    model = CrammedBertMLM(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.eval()
    ids, mask = _batch(TINY)
    low = model(ids, mask)
    assert low.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(low)))
    assert float(jnp.abs(low - tiny_mlm(ids, mask)).max()) < 0.1
    cast_parameters(model, jnp.bfloat16)
    assert model.encoder.layers[0].ffn.w_in[...].dtype == jnp.bfloat16
    assert model.encoder.layers[0].attn.query_key_value.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(model(ids, mask), low, atol=1e-6)  # the per-call casts gave the same numbers


def test_bad_inputs_raise_clear_errors(tiny_mlm):
    ids, mask = _batch(TINY, seq=8)
    with pytest.raises(ValueError, match="max_seq_length"):
        tiny_mlm(jnp.ones((1, TINY.max_seq_length + 1), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        tiny_mlm(ids, mask[:, :4])
    with pytest.raises(TypeError, match="integer token ids"):
        tiny_mlm(ids.astype(jnp.float32))
    with pytest.raises(TypeError, match="ModelConfig"):
        CrammedBertMLM(TINY.to_dict(), rngs=nnx.Rngs(0))


def test_jit_of_the_module():
    model = CrammedBertMLM(TINY, rngs=nnx.Rngs(0))
    model.eval()
    ids, mask = _batch(TINY)
    jitted = jax.jit(lambda m, i, a: m(i, a))(model, ids, mask)
    np.testing.assert_allclose(jitted, model(ids, mask), atol=1e-5)
