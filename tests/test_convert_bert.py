"""fffjax.convert.bert: a BERT encoder with every kind of feedforward slot to and from the state dict of the
torch model every BERT export carries (``modeling_fff_bert.py``): strict loads, equal hidden states on a
padded batch (rows compared while their FFF routing is safe), exact round trips, a plain ``BertModel``
state dict for an all-dense model, and errors that name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _bert_export_helpers import SMALL, mixed_bert, padded_batch, safe_rows, torch_modeling_package  # noqa: E402

from fffjax.convert.bert import bert_hf_config, bert_keys, export_bert, import_bert  # noqa: E402
from fffjax.models.bert import Bert, bert_checkpoint_config  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-5
hf_bert = torch_modeling_package()


def _torch_bert(model: Bert):
    config = hf_bert.FffBertConfig(**bert_hf_config(bert_checkpoint_config(model)))
    return hf_bert.FffBertModel(config).eval()


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _hidden(module, ids, mask, types):
    with torch.no_grad():
        return module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      token_type_ids=torch.from_numpy(types)).last_hidden_state.numpy()


def _ours(model, ids, mask, types):
    return np.asarray(model(*(jnp.asarray(a, jnp.int32) for a in (ids, mask, types))))


def test_export_loads_strict_and_gives_our_hidden_states():
    model = mixed_bert(seed=1)
    state_dict = export_bert(model)
    specs = bert_checkpoint_config(model)["ffn_layers"]
    assert [spec["kind"] for spec in specs] == ["dense", "fff_v1", "fff_v2", "dense"]
    module = _torch_bert(model)
    assert list(state_dict) == list(module.state_dict()) == bert_keys(SMALL, specs)
    depth = state_dict["encoder.layer.1.ffn.depth"]
    assert depth.dtype == np.int64 and depth.shape == () and int(depth) == 2
    assert state_dict["encoder.layer.1.ffn.node_biases"].shape == (3, 1)
    assert state_dict["encoder.layer.2.ffn.linear_out.weight"].shape == (32, 14)
    assert state_dict["encoder.layer.3.intermediate.dense.weight"].shape == (12, 32)
    assert all(v.dtype == np.float32 for k, v in state_dict.items() if not k.endswith(".depth"))
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)

    ids, mask, types = padded_batch(SMALL, seed=2)
    got, want = _hidden(module, ids, mask, types), _ours(model, ids, mask, types)
    assert got.shape == want.shape == (*ids.shape, SMALL.hidden_size)
    safe = safe_rows(model, ids, mask, types)
    assert safe.sum() >= 3
    real = (mask == 1) & safe[:, None]
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)


def test_round_trip_through_the_state_dict_is_exact():
    model = mixed_bert(seed=3)
    state_dict = export_bert(model)
    checkpoint_config = bert_checkpoint_config(model)
    for config in (bert_hf_config(checkpoint_config), checkpoint_config):
        back = import_bert(state_dict, config)
        assert back.config == model.config and bert_checkpoint_config(back) == checkpoint_config
        assert back.embeddings.dropout.deterministic
        jax.tree.map(np.testing.assert_array_equal, _params(back), _params(model))
    # the depth is optional, as is the pooler of a BertModel
    without_depth = {k: v for k, v in state_dict.items() if not k.endswith(".depth")}
    jax.tree.map(np.testing.assert_array_equal, _params(import_bert(without_depth, checkpoint_config)), _params(model))


def test_an_all_dense_model_exports_a_bert_model_state_dict():
    model = Bert(SMALL, rngs=nnx.Rngs(4))
    model.eval()
    state_dict = export_bert(model)
    reference = transformers.BertModel(transformers.BertConfig(**SMALL.to_hf_dict()), add_pooling_layer=False).eval()
    assert list(state_dict) == list(reference.state_dict())
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    ids, mask, types = padded_batch(SMALL, seed=5)
    real = mask == 1
    np.testing.assert_allclose(_hidden(reference, ids, mask, types)[real], _ours(model, ids, mask, types)[real],
                               atol=ATOL, rtol=0)
    back = import_bert(state_dict, SMALL)   # a BertConfig: every slot dense
    jax.tree.map(np.testing.assert_array_equal, _params(back), _params(model))


def test_torch_init_imports_with_equal_hidden_states():
    torch.manual_seed(0)
    module = _torch_bert(mixed_bert(seed=6))
    with torch.no_grad():   # biases that route away from zero, layer norms away from one
        for value in module.state_dict().values():
            if value.is_floating_point():
                value.add_(0.3 * torch.randn(value.shape))
    model = import_bert(module.state_dict(), module.config.to_dict())   # torch tensors in
    ids, mask, types = padded_batch(SMALL, seed=7)
    safe = safe_rows(model, ids, mask, types)
    assert safe.sum() >= 3
    real = (mask == 1) & safe[:, None]
    np.testing.assert_allclose(_ours(model, ids, mask, types)[real], _hidden(module, ids, mask, types)[real],
                               atol=ATOL, rtol=0)


def test_import_errors_name_the_key():
    model = mixed_bert(seed=8)
    state_dict, config = export_bert(model), bert_checkpoint_config(model)
    broken = {k: v for k, v in state_dict.items() if k != "encoder.layer.2.ffn.linear_in.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.2.ffn.linear_in.bias'\]"):
        import_bert(broken, config)
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.1.intermediate.dense.weight'\]"):
        import_bert({**state_dict, "encoder.layer.1.intermediate.dense.weight": np.ones((64, 32), np.float32)}, config)
    wrong = {**state_dict, "encoder.layer.1.ffn.w1s": np.zeros((4, 32, 7), np.float32)}
    with pytest.raises(ValueError, match=r"'encoder.layer.1.ffn.w1s'\]: expected shape \(4, 32, 8\).*\(4, 32, 7\)"):
        import_bert(wrong, config)
    narrow = {**state_dict, "encoder.layer.3.output.dense.weight": np.zeros((32, 13), np.float32)}
    with pytest.raises(ValueError, match=r"'encoder.layer.3.output.dense.weight'\]: expected shape \(32, 12\)"):
        import_bert(narrow, config)
    with pytest.raises(ValueError, match=r"'encoder.layer.1.ffn.depth'\]: expected the integer depth 2"):
        import_bert({**state_dict, "encoder.layer.1.ffn.depth": np.array(3, np.int64)}, config)
    with pytest.raises(ValueError, match=r"'ffn_layers'\] must hold one ffn spec per layer \(4\)"):
        import_bert(state_dict, {**config, "ffn_layers": config["ffn_layers"][:3]})
    with pytest.raises(ValueError, match="does not fit the config"):
        import_bert(state_dict, SMALL)
