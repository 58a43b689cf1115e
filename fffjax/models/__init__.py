"""Crammed-BERT / UltraFastBERT models: configurations and NNX modules."""

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

__all__ = [
    "CONFIGS",
    "CrammedBertClassifier",
    "CrammedBertMLM",
    "ModelConfig",
    "cast_parameters",
    "count_parameters",
    "get_config",
    "mlm_logits_at",
    "model_from_params",
    "model_kind",
    "sinusoidal_positions",
]
