"""The models: crammed BERT / UltraFastBERT (configurations, NNX modules) and the causal decoder."""

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
    "CONFIGS",
    "DECODER_CONFIGS",
    "CausalLM",
    "CrammedBertClassifier",
    "CrammedBertMLM",
    "DecoderConfig",
    "KVCache",
    "ModelConfig",
    "cast_parameters",
    "causal_lm_from_params",
    "count_parameters",
    "get_config",
    "get_decoder_config",
    "mlm_logits_at",
    "model_from_params",
    "model_kind",
    "sinusoidal_positions",
]
