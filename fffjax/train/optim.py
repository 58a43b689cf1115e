"""The optax recipe of the UltraFastBERT trainer: crammed BERT's `bert-o4` AdamW.

AdamW with betas (0.9, 0.98), eps 1e-12, weight decay 0.01 not applied to biases and norms, a
triangle learning-rate schedule (linear rise from 0 to the peak at `peak_fraction` of the steps,
linear fall to 0 at the end; the published `budget-triangle2` has the same shape over a wall-clock
budget, here it runs over steps so that runs are reproducible), gradient clipping to global norm
0.5. The FFF-v1 local optimizers are elsewhere (`fffjax.train.local_optim`).
"""

import re
from typing import Any

import jax
import optax

from fffjax.train.config import TrainConfig
from fffjax.train.sharding import path_name


def triangle_schedule(peak: float, steps: int, peak_fraction: float = 0.5) -> optax.Schedule:
    """0 -> `peak` linearly over `round(peak_fraction * steps)` steps, then -> 0 at `steps`."""
    rise = max(1, int(round(peak_fraction * steps)))
    fall = max(1, steps - rise)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, rise), optax.linear_schedule(peak, 0.0, fall)], [rise])


NO_DECAY = re.compile(r"(^|\.)([^.]*norm[^.]*|[^.]*bias[^.]*|b_in|b_out|b\d*)(\.|$)", re.IGNORECASE)


def decay_mask(params) -> Any:
    """True where weight decay applies: everything except biases and norm parameters.

    A leaf is excluded when a component of its dotted path contains `norm` or `bias` (torch's
    `LayerNorm.*`, `*.bias`) or is a bias by fffjax naming (`b_in`, `b_out`, `b`).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: not NO_DECAY.search(path_name(path)), params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the triangle schedule, decay masked by `decay_mask`."""
    schedule = triangle_schedule(config.learning_rate, config.steps, config.peak_fraction)
    return with_standard_promotion(optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
    ))


def with_standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` whose ``init`` and ``update`` trace under jax's standard dtype promotion.

    optax's Adam bias correction raises ``b1`` and ``b2`` (Python floats) to the int32 step count,
    which ``jax_numpy_dtype_promotion="strict"`` rejects. The wrapper keeps fffjax's optax
    optimizers usable when a caller (the test suite does) turns strict promotion on; their results
    are those of ``tx``.
    """

    def init_fn(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update_fn(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)
