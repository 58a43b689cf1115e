"""`TrainConfig`: the optimisation and run settings of the UltraFastBERT trainer (`fffjax.train.Trainer`)."""

import dataclasses
from collections.abc import Mapping
from typing import Any

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and run settings (the model's shape lives in `ModelConfig`).

    Attributes:
        steps: optimizer steps (the schedule spans exactly these).
        batch_size: global batch in sequences per optimizer step.
        grad_accum: microbatches per step (`batch_size` must divide by it).
        learning_rate: the schedule's peak.
        peak_fraction: where the triangle peaks, as a fraction of `steps`.
        b1, b2, eps, weight_decay, clip_norm: AdamW and clipping (recipe defaults).
        compute_dtype: "float32" or "bfloat16" forward/backward.
        seed: model init, data order, masking and dropout all derive from it.
        data_parallel, model_parallel: mesh shape (`data_parallel=-1`: all devices left).
        save_every, keep: checkpoint interval in steps and how many to keep (LatestN).
        train_mode: run the model with dropout (fine-tuning); pretraining ran with dropout off
            (`pretrain_in_train_mode: False` in `bert-o4`).
        eval_every: evaluate held-out data every this many steps (0: only at the end).
        parallelism: a named configuration of `fffjax.train.sharding.PARALLELISM` ("dp", "fsdp",
            "tp", "tree", "tp+tree", "fsdp+tree"): its partition rules replace the Trainer's
            `rules`, and the tree variants make the FFF layers tree-parallel over `model`;
            "" keeps the `rules` argument.
    """

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 1e-3
    peak_fraction: float = 0.5
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-12
    weight_decay: float = 0.01
    clip_norm: float = 0.5
    compute_dtype: str = "float32"
    seed: int = 0
    data_parallel: int = -1
    model_parallel: int = 1
    save_every: int = 100
    keep: int = 3
    train_mode: bool = False
    eval_every: int = 0
    parallelism: str = ""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size: expected a multiple of grad_accum={self.grad_accum}, got {self.batch_size}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if not 0.0 < self.peak_fraction <= 1.0:
            raise ValueError(f"peak_fraction: expected in (0, 1], got {self.peak_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields {sorted(names)}")
        return cls(**d)
