"""Training metrics on disk: a JSONL log that a resumed run continues, its reader, and loss plots."""

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class MetricsLog:
    """Appends one JSON object per line; `truncate_after(step)` drops lines of later steps (resume)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def last_step(self) -> int:
        """The step of the last record (0 when there is none)."""
        records = self.read() if self.path.exists() else []
        return int(records[-1].get("step", 0)) if records else 0

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(curves: Mapping[str, tuple[Iterable[int], Iterable[float]]], out: Path | str, *,
                title: str = "", ylabel: str = "loss", smooth: int = 1) -> Path:
    """Writes a PNG with one line per named `(steps, values)` curve (`smooth`: moving-average width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, values) in curves.items():
        steps, values = np.asarray(list(steps)), np.asarray(list(values), float)
        if smooth > 1 and len(values) >= smooth:
            values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1:]
        ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def tokens_per_second(tokens: int, seconds: float) -> float:
    """`tokens / seconds`, NaN for a zero or negative duration."""
    return tokens / seconds if seconds > 0 else math.nan
