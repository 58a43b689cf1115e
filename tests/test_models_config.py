"""fffjax.models.config: the crammed-BERT presets, JSON and published-arch round trips, validation."""

import dataclasses
import json

import pytest

from fffjax.models import CONFIGS, ModelConfig, get_config

TINY = get_config("tiny")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_json_and_arch_round_trip(name):
    config = CONFIGS[name]
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ModelConfig.from_json(config.to_json()) == config
    assert ModelConfig.from_arch(json.loads(json.dumps(config.to_arch()))) == config
    assert ModelConfig.from_arch({"arch": config.to_arch(), "model_type": "crammedBERT"}) == config


def test_base_config_is_ultrafastbert_1x11_long():
    base = get_config("base")
    assert (base.num_layers, base.hidden_size, base.num_heads, base.vocab_size) == (16, 768, 12, 32768)
    assert (base.ffn, base.fff_trees, base.fff_depth, base.fff_nodes) == ("fff", 1, 11, 4095)
    assert base.norm_factor == 0.125 and base.norm_eps == 1e-12 and base.max_seq_length == 128
    arch = base.to_arch()
    assert (arch["intermed_type"], arch["intermed_size"], arch["intermed_depth"]) == ("fff", 1, 11)
    assert arch["embedding"]["vocab_size"] == 32768 and arch["attention"]["num_attention_heads"] == 12
    dense = get_config("base-dense").to_arch()
    assert (dense["intermed_type"], dense["intermed_size"]) == ("ff", 3072) and "intermed_depth" not in dense


def test_get_config_reads_json_files(tmp_path):
    custom = dataclasses.replace(TINY, num_labels=3, num_layers=1)
    (tmp_path / "c.json").write_text(custom.to_json())
    assert get_config(tmp_path / "c.json") == custom
    (tmp_path / "hf.json").write_text(json.dumps({"arch": custom.to_arch(), "model_type": "crammedBERT"}))
    assert get_config(str(tmp_path / "hf.json")) == custom
    with pytest.raises(ValueError, match="neither a preset"):
        get_config("no-such-config")


def test_config_rejects_bad_values_and_unsupported_arch():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        dataclasses.replace(TINY, num_heads=3)
    with pytest.raises(ValueError, match="ffn must be one of"):
        dataclasses.replace(TINY, ffn="moe")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**TINY.to_dict(), "hidden": 3})
    for section, key, value in [(None, "nonlin", "GELUglu"), ("attention", "qkv_bias", True),
                                ("embedding", "pos_embedding", "learned"), (None, "use_bias", True)]:
        arch = TINY.to_arch()
        (arch if section is None else arch[section])[key] = value
        with pytest.raises(ValueError, match=key):
            ModelConfig.from_arch(arch)
    arch = TINY.to_arch()
    arch["embedding"]["vocab_size"] = None
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_arch(arch)


def test_published_arch_with_null_num_labels_and_unresolved_refs():
    arch = get_config("base").to_arch()
    arch["num_labels"] = None
    arch["embedding"]["embedding_dim"] = "${arch.hidden_size}"
    arch["sparse_prediction"] = "${train.objective.mlm_probability}"
    assert ModelConfig.from_arch(arch) == get_config("base")
