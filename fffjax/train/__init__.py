"""Training: the UltraFastBERT trainer, its checkpoints, and the FFF-v1 local optimizers.

One concept per module: `config` (`TrainConfig`), `optim` (the optax recipe), `objectives`
(MLM, causal LM, classification), `trainer` (`Trainer`: sharded step, evaluation), `sharding` (mesh,
partition rules), `metrics` (JSONL log, plots), `loop` (`fit`), `checkpoint` (save, resume,
integrity, loading for inference), `local_optim` (FFF-v1 `local_adam` / `local_sgd`), `flat` (the
flat-feature trainer of FFF-v1, FFF-v2 and FF classifiers, vmapped over seeds), and the
`pretrain` / `finetune` commands.
"""

from fffjax.train.checkpoint import (
    CheckpointCorruptError,
    RunCheckpoints,
    inspect_checkpoint,
    load_bert_checkpoint,
    load_checkpoint,
    load_params,
    read_config,
    resolve_checkpoint,
    restore_checkpoint,
    save_bert_checkpoint,
    save_checkpoint,
    tree_digest,
)
from fffjax.train.config import TrainConfig
from fffjax.train.local_optim import (
    LocalAdamState,
    LocalSGDState,
    fff_usage,
    local_adam,
    local_sgd,
    reset_fff_usage,
    reset_usage,
    v1_usage,
)
from fffjax.train.loop import fit
from fffjax.train.objectives import causal_lm_objective, classification_objective, mlm_objective
from fffjax.train.trainer import Trainer

__all__ = [
    "CheckpointCorruptError",
    "LocalAdamState",
    "LocalSGDState",
    "RunCheckpoints",
    "TrainConfig",
    "Trainer",
    "causal_lm_objective",
    "classification_objective",
    "fff_usage",
    "fit",
    "inspect_checkpoint",
    "load_bert_checkpoint",
    "load_checkpoint",
    "load_params",
    "local_adam",
    "local_sgd",
    "mlm_objective",
    "read_config",
    "reset_fff_usage",
    "reset_usage",
    "resolve_checkpoint",
    "restore_checkpoint",
    "save_bert_checkpoint",
    "save_checkpoint",
    "tree_digest",
    "v1_usage",
]
