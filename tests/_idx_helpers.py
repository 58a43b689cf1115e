"""Synthetic IDX files (the MNIST layout) for the image-data tests."""

import numpy as np

from fffjax.data import fetch


def write_fake(root, name, n_train=30, n_test=10, gz=False, seed=0):
    """Four synthetic IDX files of the given sizes; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, a in arrays.items():
        fetch.write_idx(folder / (stem + (".gz" if gz else "")), a)
    return arrays
