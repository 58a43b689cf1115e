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


DATASET_NAMES = ("mnist", "fashion_mnist", "digits")


def _idx_split(name: str, root) -> Split:
    from fffjax.data.fetch import load_idx_arrays

    x_tr, y_tr, x_te, y_te = load_idx_arrays(name, root)
    f = lambda a: (a.reshape(a.shape[0], -1) / np.float32(255.0)).astype(np.float32)  # noqa: E731
    return Split(f(x_tr), y_tr.astype(np.int32), f(x_te), y_te.astype(np.int32), 10)


def load_mnist(root=None) -> Split:
    """MNIST (60 000 + 10 000 images, 784 features in [0, 1]) from the data cache.

    Args:
        root: cache folder; default ``$FFFJAX_DATA`` or ``./data_cache``.

    Raises:
        fffjax.data.fetch.DataMissingError: not fetched; the message names the fetch command.
    """
    return _idx_split("mnist", root)


def load_fashion_mnist(root=None) -> Split:
    """Fashion-MNIST (60 000 + 10 000 images, 784 features in [0, 1]) from the data cache.

    Args:
        root: cache folder; default ``$FFFJAX_DATA`` or ``./data_cache``.

    Raises:
        fffjax.data.fetch.DataMissingError: not fetched; the message names the fetch command.
    """
    return _idx_split("fashion_mnist", root)


def load(name: str, root=None) -> Split:
    """A data set by name: ``"mnist"``, ``"fashion_mnist"`` or ``"digits"`` (bundled, always there)."""
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(root)
    if name == "fashion_mnist":
        return load_fashion_mnist(root)
    raise ValueError(f"name must be one of {DATASET_NAMES}, got {name!r}")


def subsample(split: Split, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Split:
    """A class-stratified random subset (for quick runs); ``None`` keeps a side whole."""
    rng = np.random.default_rng(seed)

    def pick(y: np.ndarray, n: int | None) -> np.ndarray:
        if n is None or n >= len(y):
            return np.arange(len(y))
        if n <= 0:
            raise ValueError(f"subset sizes must be positive, got {n}")
        order = rng.permutation(len(y))
        # Round-robin over classes keeps the subset balanced whatever n is.
        by_class = [order[y[order] == c] for c in np.unique(y)]
        ranks = np.concatenate([np.arange(len(idx)) for idx in by_class])
        idx = np.concatenate(by_class)
        return np.sort(idx[np.argsort(ranks, kind="stable")[:n]])

    tr, te = pick(split.y_train, n_train), pick(split.y_test, n_test)
    return Split(split.x_train[tr], split.y_train[tr], split.x_test[te], split.y_test[te], split.n_classes)
