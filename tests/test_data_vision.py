"""fffjax.data.vision: the cached MNIST/Fashion-MNIST loaders (on synthetic IDX files), digits,
subsampling, errors."""

import numpy as np
import pytest
from _idx_helpers import write_fake

from fffjax.data import fetch, vision


@pytest.mark.parametrize("name,loader,gz", [("mnist", vision.load_mnist, False),
                                            ("fashion_mnist", vision.load_fashion_mnist, True)])
def test_loaders_read_the_cache(tmp_path, monkeypatch, name, loader, gz):
    arrays = write_fake(tmp_path, name, gz=gz)
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    split = loader()
    assert split.x_train.shape == (30, 784) and split.x_test.shape == (10, 784)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
    np.testing.assert_allclose(split.x_train, arrays["train-images-idx3-ubyte"].reshape(30, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(split.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert split.n_classes == 10
    # load() by name and an explicit root give the same data.
    np.testing.assert_array_equal(vision.load(name, root=tmp_path).x_test, split.x_test)


def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(fetch.DataMissingError, match="python -m fffjax.data.fetch vision"):
        vision.load("mnist")
    with pytest.raises(FileNotFoundError):
        vision.load_fashion_mnist()


def test_digits_and_bad_names():
    split = vision.load("digits")
    assert split.x_train.shape[1] == 64 and split.n_classes == 10
    with pytest.raises(ValueError, match="name must be one of"):
        vision.load("cifar10")
    with pytest.raises(ValueError, match="name must be one of"):
        fetch.idx_paths("cifar10")


def test_subsample_is_stratified_and_bounded():
    split = vision.load_digits()
    small = vision.subsample(split, n_train=100, n_test=50, seed=1)
    assert len(small.y_train) == 100 and len(small.y_test) == 50
    assert np.bincount(small.y_train, minlength=10).tolist() == [10] * 10
    assert vision.subsample(split).x_train.shape == split.x_train.shape
    with pytest.raises(ValueError, match="positive"):
        vision.subsample(split, n_train=-1)
