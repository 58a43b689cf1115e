"""fffjax.models.decoder: the config (checks, JSON, presets), the causal LM's forward (causality,
padding, the four feedforwards, dropout) and its key/value cache against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _decoder_helpers import SMALL, fff_margins, forward, make, small
from flax import nnx

from fffjax import ops
from fffjax.models import (
    DECODER_CONFIGS,
    CausalLM,
    DecoderConfig,
    cast_parameters,
    causal_lm_from_params,
    get_decoder_config,
)
from fffjax.train import TrainConfig, Trainer, causal_lm_objective

prefill = nnx.jit(lambda model, ids, mask, length: model.prefill(ids, mask, length), static_argnums=3)
decode_step = nnx.jit(lambda model, tokens, cache: model.decode_step(tokens, cache))


def token_ids(shape, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 1, SMALL.vocab_size)


# --------------------------------------------------------------------------------------------- config


def test_config_json_round_trip_and_the_model_entry():
    config = small("narrow", dense_width=None)
    data = config.to_dict()
    assert data["model"] == "causal_lm"
    assert DecoderConfig.from_json(config.to_json()) == config
    assert DecoderConfig.from_dict({k: v for k, v in data.items() if k != "model"}) == config
    with pytest.raises(ValueError, match=r"unknown DecoderConfig fields \['intermed_size'\]"):
        DecoderConfig.from_dict({**data, "intermed_size": 3})
    with pytest.raises(ValueError, match="d\\['model'\\] must be 'causal_lm'"):
        DecoderConfig.from_dict({**data, "model": "mlm"})


def test_config_refuses_bad_values_naming_them():
    with pytest.raises(ValueError, match="ffn must be one of"):
        small("moe")
    with pytest.raises(ValueError, match=r"hidden_size \(32\) must be divisible by num_heads \(3\)"):
        small(num_heads=3)
    with pytest.raises(ValueError, match="dense_width must be an int >= 1, got 0"):
        small("dense", dense_width=0)
    with pytest.raises(ValueError, match="fff_depth must be an int >= 0"):
        small(fff_depth=-1)
    with pytest.raises(ValueError, match="pad_token_id must be an int in"):
        small(pad_token_id=64)
    with pytest.raises(ValueError, match="dropout must be in"):
        small(dropout=1.0)
    with pytest.raises(ValueError, match="load_balance must be a finite coefficient >= 0, got -0.1"):
        small(load_balance=-0.1)
    with pytest.raises(ValueError, match="load_balance_temperature must be finite and > 0, got 0.0"):
        small(load_balance_temperature=0.0)


def test_logits_and_load_balance_sum_each_fff_layer_over_real_tokens():
    from fffjax import v2

    model = make(small(load_balance=0.1))
    ids = np.asarray(token_ids((2, 9)))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    logits, balance = model.logits_and_load_balance(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(logits, model(jnp.asarray(ids), jnp.asarray(mask)))
    inputs = []   # each FFF layer's input, through a spy on its call
    for layer in model.layers:
        ffn = layer.ffn
        layer.ffn = lambda x, ffn=ffn: (inputs.append((x, ffn)), ffn(x))[1]
    model(jnp.asarray(ids), jnp.asarray(mask))
    expected, weights = 0.0, jnp.asarray(mask.ravel(), jnp.float32)
    for x, ffn in inputs:
        path, z = v2.path_logits(x.reshape(-1, x.shape[-1]), ffn.w_in[...], ffn.b_in[...], depth=3, n_trees=2)
        expected += float(v2.load_balance_loss(path, z, depth=3, n_trees=2, weights=weights,
                                               temperature=model.config.load_balance_temperature))
    assert float(balance) == pytest.approx(expected, rel=1e-6) and expected > 0
    for ffn in ("dense", "narrow", "none"):
        assert float(make(small(ffn)).logits_and_load_balance(jnp.asarray(ids))[1]) == 0.0


def test_active_neurons_of_each_feedforward():
    assert small("dense").active_neurons == 4 * 32
    assert small("dense", dense_width=40).active_neurons == 40
    assert small("fff").active_neurons == small("narrow").active_neurons == 2 * (3 + 1)
    assert small("none").active_neurons == 0
    assert small("fff").fff_nodes == 2 * 15


def test_presets_hold_the_issue_shapes():
    for size in ("tiny", "small", "base", "medium", "wide", "xwide"):
        dense = DECODER_CONFIGS[f"{size}-dense"]
        assert dense.active_neurons == 4 * dense.hidden_size
        assert DECODER_CONFIGS[f"{size}-none"].active_neurons == 0
        for trees, depth in ((1, 11), (4, 9), (16, 7)):
            fff = DECODER_CONFIGS[f"{size}-fff-{trees}x{depth}"]
            narrow = DECODER_CONFIGS[f"{size}-narrow-{trees}x{depth}"]
            assert (fff.ffn, fff.fff_trees, fff.fff_depth) == ("fff", trees, depth)
            assert narrow.ffn == "narrow" and narrow.active_neurons == fff.active_neurons == trees * (depth + 1)
            assert fff.hidden_size == dense.hidden_size and fff.num_layers == dense.num_layers
    assert DECODER_CONFIGS["base-dense"].hidden_size == 768
    assert (DECODER_CONFIGS["medium-dense"].hidden_size, DECODER_CONFIGS["medium-dense"].num_layers) == (1024, 24)
    assert (DECODER_CONFIGS["wide-dense"].hidden_size, DECODER_CONFIGS["wide-dense"].num_layers) == (4096, 8)
    assert (DECODER_CONFIGS["xwide-dense"].hidden_size, DECODER_CONFIGS["xwide-dense"].num_layers) == (8192, 4)
    assert get_decoder_config("tiny-fff-4x9") is DECODER_CONFIGS["tiny-fff-4x9"]
    with pytest.raises(ValueError, match="neither a decoder preset"):
        get_decoder_config("tiny-fff-3x3")


def test_config_file(tmp_path):
    path = tmp_path / "decoder.json"
    path.write_text(small("dense").to_json())
    assert get_decoder_config(path) == small("dense")


# -------------------------------------------------------------------------------------------- forward


def test_parameter_tree_of_each_feedforward():
    shapes = {}
    for ffn in ("dense", "fff", "narrow", "none"):
        params = nnx.to_pure_dict(nnx.state(make(small(ffn)), nnx.Param))
        shapes[ffn] = jax.tree.map(lambda a: a.shape, params)
    layer = shapes["dense"]["layers"][0]
    assert shapes["dense"]["embedding"]["word_embedding"]["embedding"] == (64, 32)
    assert shapes["dense"]["embedding"]["position_embedding"]["embedding"] == (48, 32)
    assert layer["attn"]["query_key_value"]["kernel"] == (32, 96)
    assert layer["ffn"]["dense_in"]["kernel"] == (32, 128)
    assert shapes["narrow"]["layers"][0]["ffn"]["dense_in"]["kernel"] == (32, 8)
    assert shapes["fff"]["layers"][0]["ffn"]["w_in"] == (30, 32)
    assert set(shapes["none"]["layers"][0]) == {"norm1", "attn"}
    assert "final_norm" in shapes["none"] and "head" not in shapes["dense"]   # the output layer is tied


@pytest.mark.parametrize("ffn", ["dense", "fff", "narrow", "none"])
def test_logits_depend_only_on_the_prefix(ffn):
    model = make(small(ffn))
    ids = token_ids((2, 12))
    logits = forward(model, ids)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    changed = forward(model, ids.at[:, 7:].set(5))
    np.testing.assert_allclose(changed[:, :7], logits[:, :7], atol=1e-5)
    assert not np.allclose(changed[:, 7:], logits[:, 7:], atol=1e-3)


@pytest.mark.parametrize("ffn", ["dense", "fff"])
def test_padding_left_or_right_gives_each_row_its_own_logits(ffn):
    model = make(small(ffn))
    ids = token_ids((1, 9))
    alone = forward(model, ids)[0]
    padded = jnp.zeros((2, 13), jnp.int32).at[0, 4:].set(ids[0]).at[1, :9].set(ids[0])
    mask = jnp.zeros((2, 13), jnp.int32).at[0, 4:].set(1).at[1, :9].set(1)
    logits = forward(model, padded, mask)
    np.testing.assert_allclose(logits[0, 4:], alone, atol=1e-4)
    np.testing.assert_allclose(logits[1, :9], alone, atol=1e-4)


def test_dropout_acts_in_train_mode_only_and_keeps_attention_causal():
    model, twin = (CausalLM(small("dense", dropout=0.3), rngs=nnx.Rngs(0)) for _ in range(2))
    ids = token_ids((2, 10))
    first = model(ids)
    again = twin(ids.at[:, 6:].set(3))   # the same weights and dropout draws
    np.testing.assert_allclose(again[:, :6], first[:, :6], atol=1e-5)
    model.eval()
    evaluated = model(ids)
    assert not np.allclose(first, evaluated, atol=1e-3)
    np.testing.assert_array_equal(model(ids), evaluated)


def test_refuses_bad_inputs():
    model = make(small("dense"))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(jnp.ones((5,), jnp.int32))
    with pytest.raises(TypeError, match="input_ids must be integer"):
        model(jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(jnp.ones((1, 5), jnp.int32), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="max_seq_length is 48"):
        model(jnp.ones((1, 49), jnp.int32))
    with pytest.raises(ValueError, match="cache_length must be at least the prompt length 5"):
        model.prefill(jnp.ones((1, 5), jnp.int32), None, 4)


def test_attention_runs_through_the_registry(monkeypatch):
    model = make(small("dense"))
    calls = []
    for op in ("attention", "cached_attention"):
        xla = ops.registry._REGISTRY[op]["xla"].fn
        monkeypatch.setitem(ops.registry._REGISTRY[op], "spy",
                            ops.registry.Implementation(fn=lambda *a, _op=op, _xla=xla, **k: calls.append(
                                (_op, k.get("causal"))) or _xla(*a, **k)))
        ops.set_implementation(model, op, "spy")
    ids = token_ids((1, 4))
    model(ids)
    _, cache = model.prefill(ids, None, 8)
    model.decode_step(ids[:, 0], cache)
    assert calls == [("attention", True)] * 4 + [("cached_attention", None)] * 2


# --------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("ffn", ["dense", "fff"])
def test_prefill_and_decode_steps_give_the_full_forward_logits(ffn):
    model = make(small(ffn))
    ids = token_ids((2, 14), seed=4)
    full = forward(model, ids)
    assert fff_margins(model, ids).min() > 1e-4   # routing cannot flip at float32 rounding on these tokens
    logits, cache = prefill(model, ids[:, :6], None, 16)
    np.testing.assert_allclose(logits, full[:, 5], atol=1e-4)
    assert int(cache.length) == 6 and cache.keys[0].shape == (2, 16, 2, 16)
    for t in range(6, 14):
        logits, cache = decode_step(model, ids[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-4)
    assert int(cache.length) == 14 and np.asarray(cache.valid).sum() == 2 * 14
    np.testing.assert_array_equal(cache.positions, [14, 14])


def test_left_padded_prefill_continues_each_row_at_its_own_position():
    model = make(small("fff"))
    ids = token_ids((2, 10), seed=5)
    full = forward(model, ids)
    assert fff_margins(model, ids).min() > 1e-4
    # row 0 holds its first 5 tokens after 3 pads, row 1 its first 8
    padded = jnp.zeros((2, 8), jnp.int32).at[0, 3:].set(ids[0, :5]).at[1].set(ids[1, :8])
    mask = jnp.ones((2, 8), jnp.int32).at[0, :3].set(0)
    logits, cache = prefill(model, padded, mask, 12)
    np.testing.assert_allclose(logits[0], full[0, 4], atol=1e-4)
    np.testing.assert_allclose(logits[1], full[1, 7], atol=1e-4)
    np.testing.assert_array_equal(cache.positions, [5, 8])
    logits, cache = decode_step(model, jnp.stack([ids[0, 5], ids[1, 8]]), cache)
    np.testing.assert_allclose(logits[0], full[0, 5], atol=1e-4)
    np.testing.assert_allclose(logits[1], full[1, 8], atol=1e-4)


def test_a_bfloat16_model_keeps_a_bfloat16_cache_and_float32_logits():
    model = CausalLM(small("fff"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cast_parameters(model, jnp.bfloat16)
    model.eval()
    ids = token_ids((2, 5))
    logits, cache = prefill(model, ids, None, 8)
    assert logits.dtype == jnp.float32 and cache.keys[0].dtype == jnp.bfloat16
    logits, cache = decode_step(model, ids[:, 0], cache)
    assert logits.dtype == jnp.float32 and cache.values[1].dtype == jnp.bfloat16
    full = forward(model, jnp.concatenate([ids, ids[:, :1]], axis=1))[:, -1]
    np.testing.assert_allclose(logits, full, atol=0.1 * float(jnp.abs(full).max()))


def test_from_params_rebuilds_the_model_in_eval_mode():
    model = make(small("fff"))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rebuilt = causal_lm_from_params(small("fff"), params)
    ids = token_ids((1, 6))
    np.testing.assert_array_equal(rebuilt(ids), model(ids))
    assert rebuilt.embedding.dropout.deterministic
    with pytest.raises(ValueError, match=r"params\['layers.0.ffn.b_in'\]: expected shape \(14,\), found \(30,\)"):
        causal_lm_from_params(small("fff", fff_depth=2), params)


# ------------------------------------------------------------------------------------------- training


def test_trains_alike_under_fsdp_and_tree_parallelism_and_close_in_bfloat16():
    rows = np.random.default_rng(0).integers(1, SMALL.vocab_size, (16, 12)).astype(np.int32)
    batch = {"input_ids": rows, "attention_mask": np.ones_like(rows)}
    config = small("fff", init_std=0.02, dropout=0.1)
    losses = {}
    for parallelism, model_parallel, dtype in (("dp", 1, "float32"), ("fsdp", 1, "float32"),
                                               ("fsdp+tree", 2, "float32"), ("dp", 1, "bfloat16")):
        train = TrainConfig(steps=3, batch_size=16, parallelism=parallelism, model_parallel=model_parallel,
                            compute_dtype=dtype, train_mode=True)
        trainer = Trainer(CausalLM(config, rngs=nnx.Rngs(0)), causal_lm_objective, train)
        losses[parallelism, dtype] = [trainer.step(batch)["loss"] for _ in range(3)]
    reference = losses["dp", "float32"]
    assert reference[-1] < reference[0]
    np.testing.assert_allclose(losses["fsdp", "float32"], reference, rtol=1e-5)
    np.testing.assert_allclose(losses["fsdp+tree", "float32"], reference, rtol=1e-5)
    np.testing.assert_allclose(losses["dp", "bfloat16"], reference, rtol=1e-2)
