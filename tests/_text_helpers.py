"""Synthetic English text for the tokenizer and the text-pipeline tests (no network, no data files)."""

import numpy as np

WORDS = ("the whale swam under the grey sea while the captain watched from the deck and the crew sang "
         "old songs of home and harbour and the wind rose over the waves").split()


def synthetic_text(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(n_lines)) + "\n"
