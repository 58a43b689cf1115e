"""Image classification data sets as flat float32 arrays with fixed train/test splits."""

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """A fixed train/test split: ``x_*`` float32 ``(n, features)`` in [0, 1], ``y_*`` int32 ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images, 64 features), the embedded default data set.

    Pixels 0..16 are scaled to [0, 1]; the split is a fixed stratified shuffle given ``seed``.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    f = lambda a: (a / 16.0).astype(np.float32)  # noqa: E731
    return Split(f(x_tr), y_tr.astype(np.int32), f(x_te), y_te.astype(np.int32), 10)
