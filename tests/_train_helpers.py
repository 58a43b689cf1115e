"""The small crammed-BERT run of the training tests: model config, data rows, one shared TrainConfig."""

import dataclasses

import numpy as np

from fffjax.models import get_config
from fffjax.train import TrainConfig

VOCAB, SEQ = 96, 16


def small_config(ffn: str = "fff"):
    base = get_config("tiny" if ffn == "fff" else "tiny-dense")
    return dataclasses.replace(base, vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                               max_seq_length=SEQ, fff_depth=3, dense_width=64, head_dim=16)


# One TrainConfig shared by most tests, so their Trainers share one compiled step.
BASE = TrainConfig(steps=20, batch_size=16, learning_rate=3e-3)


def mlm_rows(n: int = 96, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).integers(5, VOCAB, size=(n, SEQ)).astype(np.int32)
    rows[:, 0] = 2
    return rows
