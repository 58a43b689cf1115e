"""The models: crammed BERT / UltraFastBERT (configurations, NNX modules), a plain BERT encoder and the
causal decoder."""

from fffjax.models.bert import (
    Bert,
    BertConfig,
    DenseFfn,
    ffn_inputs,
    load_pretrained_bert,
    sentence_embedding,
)
from fffjax.models.config import CONFIGS, ModelConfig, get_config
from fffjax.models.crammed_bert import (
    CrammedBertClassifier,
    CrammedBertMLM,
    cast_parameters,
    count_parameters,
    mlm_logits_at,
    model_from_params,
    model_kind,
    sinusoidal_positions,
)
from fffjax.models.decoder import (
    DECODER_CONFIGS,
    CausalLM,
    DecoderConfig,
    KVCache,
    causal_lm_from_params,
    get_decoder_config,
)

__all__ = [
    "Bert",
    "BertConfig",
    "CONFIGS",
    "DECODER_CONFIGS",
    "CausalLM",
    "CrammedBertClassifier",
    "CrammedBertMLM",
    "DecoderConfig",
    "DenseFfn",
    "KVCache",
    "ModelConfig",
    "cast_parameters",
    "causal_lm_from_params",
    "count_parameters",
    "ffn_inputs",
    "get_config",
    "get_decoder_config",
    "load_pretrained_bert",
    "mlm_logits_at",
    "model_from_params",
    "model_kind",
    "sentence_embedding",
    "sinusoidal_positions",
]
