"""Training utilities: FFF-v1 local optimizers (:mod:`.local_optim`) and orbax checkpoints (:mod:`.checkpoint`)."""

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

__all__ = [
    "LocalAdamState",
    "LocalSGDState",
    "fff_usage",
    "local_adam",
    "local_sgd",
    "reset_fff_usage",
    "reset_usage",
    "v1_usage",
]
