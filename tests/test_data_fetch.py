"""fffjax.data.fetch: IDX reading and writing, verification against the canonical sets, digests
(on synthetic IDX files, no network)."""

import gzip

import numpy as np
import pytest
from _idx_helpers import write_fake

from fffjax.data import fetch


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
