"""fffjax.convert.decoder: the causal decoder to and from the state dict of the torch decoder every
export carries (``modeling_fff_decoder.py``), for every feedforward kind: strict loads, equal logits
on a left-padded batch (FFF tokens compared while their routing is safe), equal round trips, and
errors that name the key and the shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _decoder_helpers import SAFE_MARGIN, fff_margins, make, small, torch_modeling_package  # noqa: E402

from fffjax.convert.decoder import decoder_keys, export_decoder, import_decoder  # noqa: E402
from fffjax.convert.hf import hf_config  # noqa: E402

pytestmark = pytest.mark.torch

FFN_KINDS = ("dense", "fff", "narrow", "none")
ATOL = 1e-4
hf_decoder = torch_modeling_package()


def _torch_decoder(config):
    return hf_decoder.FffDecoderForCausalLM(hf_decoder.FffDecoderConfig(**hf_config(config, "causal_lm"))).eval()


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _padded_batch(config, seed=0, seq=20):
    """Three left-padded rows (none, 7 and 15 pads) and a right-padded one."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, size=(4, seq))
    lengths = np.array([seq, seq - 7, 5, 11])
    left = np.arange(seq)[None, ::-1] < lengths[:3, None]
    mask = np.concatenate([left, np.arange(seq)[None, :] < lengths[3:, None]]).astype(np.int64)
    return np.where(mask == 1, ids, config.pad_token_id), mask


def _safe_tokens(model, ids, mask):
    """The real tokens of each row up to its first one whose FFF routing margin is unsafe: the tokens
    whose logits cannot differ by a routing flip, here or in a token they attend to."""
    if model.config.ffn != "fff":
        return mask == 1
    unsafe = (fff_margins(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)) < SAFE_MARGIN) & (mask == 1)
    return (mask == 1) & (np.cumsum(unsafe, axis=1) == 0)


@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_export_loads_strict_and_gives_the_jax_logits(ffn):
    config = small(ffn)
    model = make(config, seed=1)
    state_dict = export_decoder(model)
    module = _torch_decoder(config)
    assert list(state_dict) == list(module.state_dict()) == decoder_keys(config)
    assert all(v.dtype == np.float32 for v in state_dict.values())
    np.testing.assert_array_equal(state_dict["lm_head.weight"], state_dict["model.embedding.word_embedding.weight"])
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)

    ids, mask = _padded_batch(config, seed=2)
    with torch.no_grad():
        got = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    want = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    assert got.shape == want.shape == (*ids.shape, config.vocab_size)
    safe = _safe_tokens(model, ids, mask)
    assert safe.sum() >= 0.5 * mask.sum()
    np.testing.assert_allclose(got[safe], want[safe], atol=ATOL, rtol=0)
    # the positions follow the mask: a left-padded row's tokens get the logits they have alone
    alone = np.asarray(model(jnp.asarray(ids[2:3, mask[2] == 1], jnp.int32)))[0]
    np.testing.assert_allclose(got[2][mask[2] == 1][safe[2][mask[2] == 1]], alone[safe[2][mask[2] == 1]],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_round_trip_through_the_state_dict_is_exact(ffn):
    config = small(ffn, dense_width=24)
    model = make(config, seed=3)
    state_dict = export_decoder(model)
    back = import_decoder(state_dict, config)
    assert back.config == config and back.embedding.dropout.deterministic
    jax.tree.map(np.testing.assert_array_equal, _params(back), _params(model))
    # the config.json dict configures the import as well, and either tied key alone is enough
    for dropped in ("lm_head.weight", "model.embedding.word_embedding.weight"):
        partial = {k: v for k, v in state_dict.items() if k != dropped}
        again = import_decoder(partial, hf_config(config, "causal_lm"))
        jax.tree.map(np.testing.assert_array_equal, _params(again), _params(model))


def test_torch_init_imports_with_equal_logits():
    config = small("fff")
    torch.manual_seed(0)
    module = _torch_decoder(config)
    with torch.no_grad():  # biases that route away from zero, layer norms away from one
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model = import_decoder(module.state_dict(), hf_config(config, "causal_lm"))  # torch tensors in
    ids, mask = _padded_batch(config, seed=4)
    with torch.no_grad():
        want = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    safe = _safe_tokens(model, ids, mask)
    assert safe.sum() >= 0.5 * mask.sum()
    np.testing.assert_allclose(got[safe], want[safe], atol=ATOL, rtol=0)


def test_import_errors_name_keys_and_shapes():
    config = small("fff")
    state_dict = export_decoder(make(config))
    broken = dict(state_dict)
    del broken["model.layers.1.ffn.linear_in.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.ffn.linear_in.bias'\]"):
        import_decoder(broken, config)
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.2.norm1.weight'\]"):
        import_decoder({**state_dict, "model.layers.2.norm1.weight": np.ones(32, np.float32)}, config)
    wrong = {**state_dict, "model.embedding.position_embedding.weight": np.zeros((47, 32), np.float32)}
    with pytest.raises(ValueError, match=r"position_embedding.weight'\]: expected shape \(48, 32\).*found \(47, 32\)"):
        import_decoder(wrong, config)
    with pytest.raises(ValueError, match="norm_factor.*1/sqrt"):
        import_decoder({**state_dict, "model.layers.0.attn.self_attention.norm_factor": np.array(0.5, np.float32)},
                       config)
    with pytest.raises(ValueError, match="must be equal"):
        import_decoder({**state_dict, "lm_head.weight": state_dict["lm_head.weight"] + 1.0}, config)
    with pytest.raises(ValueError, match=r"does not fit the config \(2 layers, ffn 'dense'\)"):
        import_decoder(state_dict, dataclasses.replace(config, ffn="dense"))
    without_width = {k: v for k, v in hf_config(config, "causal_lm").items() if k != "hidden_size"}
    with pytest.raises(ValueError, match=r"config: .*fields \['hidden_size'\]"):
        import_decoder(state_dict, without_width)
