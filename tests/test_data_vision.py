"""Image data: IDX reading, the cached MNIST/Fashion-MNIST loaders (on synthetic IDX files), errors."""

import gzip

import numpy as np
import pytest

from fffjax.data import fetch, vision


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


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    fetch.write_idx(path, a)
    np.testing.assert_array_equal(fetch.read_idx(path), a)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")  # float magic
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        fetch.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # header says 5 bytes, holds 2
    with pytest.raises(ValueError, match="header says"):
        fetch.read_idx(short)


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


def test_verify_rejects_data_that_is_not_the_canonical_set(tmp_path):
    write_fake(tmp_path, "mnist")
    with pytest.raises(ValueError, match="failed verification"):
        fetch.verify("mnist", tmp_path)
    with pytest.raises(fetch.DataMissingError):
        fetch.main(["--verify", "fashion_mnist", "--root", str(tmp_path)])


def test_array_digest_ignores_compression(tmp_path):
    plain = write_fake(tmp_path / "a", "mnist", gz=False)
    write_fake(tmp_path / "b", "mnist", gz=True)
    da = fetch.array_digest(*fetch.load_idx_arrays("mnist", tmp_path / "a"))
    db = fetch.array_digest(*fetch.load_idx_arrays("mnist", tmp_path / "b"))
    assert da == db
    assert da != fetch.array_digest(plain["train-images-idx3-ubyte"][:-1])


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
