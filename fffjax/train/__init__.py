"""Training utilities: FFF-v1 local optimizers (:mod:`.optim`) and orbax checkpoints (:mod:`.checkpoint`)."""

from fffjax.train.optim import (
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
