"""The flat-feature trainer: FFF-v1, FFF-v2 and dense (FF) classifiers on flat features, vmapped over seeds.

Models are parameter dicts plus a frozen :class:`ModelSpec`; training is one jitted
``lax.scan`` over the batches of an epoch, so a CPU run of a few epochs of MNIST takes seconds::

    spec = ModelSpec("fff", in_features=784, out_features=10, depth=3, width=16)
    config = FlatTrainConfig(epochs=5, hardening=0.1, hard_epochs=1)
    result = train(spec, config, x_train, y_train)
    accuracy(spec, result.params, x_test, y_test, mode="hard")

FFF-v1 training: ``soft_epochs = epochs - hard_epochs`` epochs of the soft mixture (with the
region leak and the hardening loss ``hardening * mean(node entropies)``, the package notebook's
form), then ``hard_epochs`` epochs with rounded decisions: the nodes get no gradient there (as in
the package's ``train_hardened``), so those epochs fit each leaf to the samples that the hard
descent actually sends it, closing the soft-to-hard gap. FFF-v2 trains on its hard path (its
only mode). ``grad_mask`` (a 0/1 pytree like the params) freezes entries, e.g. everything but the
leaves that some inputs reach (:func:`fffjax.regions.leaf_gradient_mask`).
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fffjax import tree, v1, v2
from fffjax._typing import Array, Float, Int, PRNGKeyArray
from fffjax.train.optim import with_standard_promotion

MODEL_KINDS = ("fff", "ff", "fff2")
SCHEDULES = ("constant", "cosine")
HARDENING_SCHEDULES = ("constant", "ramp")
EVAL_MODES = ("hard", "soft")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to build (hashable: a static argument of the jitted steps).

    Attributes:
        kind: ``"fff"`` (FFF-v1: ``2**depth`` leaves of ``width`` ReLU units), ``"ff"`` (one hidden
            layer of ``width`` ReLU units) or ``"fff2"`` (FFF-v2: ``n_trees`` trees of depth
            ``depth``, single GELU neurons, ``n_trees * (depth + 1)`` neurons on a path).
        in_features, out_features: input and class counts.
        depth: tree depth (``fff``, ``fff2``); ignored for ``ff``.
        width: leaf width (``fff``) or hidden width (``ff``); ignored for ``fff2``.
        n_trees: trees of ``fff2``.
        region_leak: FFF-v1 training-time child-swap probability.
    """

    kind: str
    in_features: int
    out_features: int
    depth: int = 0
    width: int = 1
    n_trees: int = 1
    region_leak: float = 0.0

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        for name in ("in_features", "out_features", "width"):
            tree.check_count(getattr(self, name), name, 1)
        tree.check_depth(self.depth)
        tree.check_n_trees(self.n_trees)
        if not 0.0 <= self.region_leak <= 1.0:
            raise ValueError(f"region_leak must be in [0, 1], got {self.region_leak}")

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``FFF d3 l16``, ``FF w128``, ``FFF2 4x3``."""
        if self.kind == "fff":
            leak = f" leak{self.region_leak:g}" if self.region_leak else ""
            return f"FFF d{self.depth} l{self.width}{leak}"
        if self.kind == "ff":
            return f"FF w{self.width}"
        return f"FFF2 {self.n_trees}x{self.depth}"


@dataclasses.dataclass(frozen=True)
class FlatTrainConfig:
    """How to train.

    Attributes:
        epochs: total epochs (soft + hard for ``fff``).
        hard_epochs: final FFF-v1 epochs trained with rounded decisions (leaves only).
        batch_size: samples per step; the last partial batch of an epoch is dropped.
        learning_rate: peak Adam(W) learning rate.
        schedule: ``"constant"`` or ``"cosine"`` (one-epoch linear warm-up, cosine decay to 0
            over the whole run).
        hardening: weight of the mean node entropy in the loss (FFF-v1).
        hardening_schedule: ``"constant"`` or ``"ramp"`` (linear from 0 to ``hardening`` over the
            soft epochs).
        weight_decay: AdamW decoupled weight decay.
        seed: initialisation, shuffling, region-leak randomness.
    """

    epochs: int = 5
    hard_epochs: int = 0
    batch_size: int = 128
    learning_rate: float = 1e-3
    schedule: str = "constant"
    hardening: float = 0.0
    hardening_schedule: str = "constant"
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs}, {self.batch_size}")
        if not 0 <= self.hard_epochs <= self.epochs:
            raise ValueError(f"hard_epochs must be in [0, epochs={self.epochs}], got {self.hard_epochs}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.hardening_schedule not in HARDENING_SCHEDULES:
            raise ValueError(f"hardening_schedule must be one of {HARDENING_SCHEDULES}, "
                             f"got {self.hardening_schedule!r}")
        if self.hardening < 0 or self.learning_rate <= 0:
            raise ValueError("hardening must be >= 0 and learning_rate > 0")


def init_params(spec: ModelSpec, key: PRNGKeyArray) -> dict[str, Array]:
    """Parameters of ``spec``: the package's init for ``fff``, the published one for ``fff2``,
    torch ``nn.Linear``'s ``U(+-1/sqrt(fan_in))`` for ``ff``."""
    if spec.kind == "fff":
        return v1.init(key, spec.in_features, spec.width, spec.out_features, spec.depth)
    if spec.kind == "fff2":
        return v2.init(key, spec.in_features, spec.depth, n_trees=spec.n_trees, out_features=spec.out_features)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    a, b = 1.0 / math.sqrt(spec.in_features), 1.0 / math.sqrt(spec.width)
    u = jax.random.uniform
    return {
        "w1": u(k1, (spec.in_features, spec.width), jnp.float32, -a, a),
        "b1": u(k2, (spec.width,), jnp.float32, -a, a),
        "w2": u(k3, (spec.width, spec.out_features), jnp.float32, -b, b),
        "b2": u(k4, (spec.out_features,), jnp.float32, -b, b),
    }


def ff_forward(params: dict[str, Array], x: Float[Array, "batch din"]) -> Float[Array, "batch dout"]:
    """One-hidden-layer ReLU network."""
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def training_logits(
    spec: ModelSpec,
    params: dict[str, Array],
    x: Float[Array, "batch din"],
    *,
    hard_decisions: bool,
    key: PRNGKeyArray | None,
) -> tuple[Float[Array, "batch dout"], Float[Array, " nodes"]]:
    """Training-mode logits and the mean node entropies (an empty vector for ``ff``/``fff2``)."""
    if spec.kind == "fff":
        out = v1.soft_forward(params, x, depth=spec.depth, hard_decisions=hard_decisions,
                              region_leak=0.0 if hard_decisions else spec.region_leak, key=key)
        return out.y, out.entropies
    if spec.kind == "fff2":
        y = v2.masked_forward(x, params["w_in"], params["b_in"], params["w_out"],
                              depth=spec.depth, n_trees=spec.n_trees)
        return y, jnp.zeros((0,), x.dtype)
    return ff_forward(params, x), jnp.zeros((0,), x.dtype)


def predict_logits(
    spec: ModelSpec,
    params: dict[str, Array],
    x: Float[Array, "batch din"] | Float[np.ndarray, "batch din"],
    *,
    mode: str = "hard",
    chunk: int = 1024,
) -> Float[Array, "batch dout"]:
    """Inference logits: ``mode="hard"`` is the conditional descent (the deployed model),
    ``"soft"`` the FFF-v1 training mixture (equal to hard for ``ff`` and ``fff2``).

    Evaluated in chunks of ``chunk`` rows to bound the memory of the per-sample leaf gathers.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    return _predict_jit(spec, params, jnp.asarray(x), mode, chunk)


def _predict_chunk(spec: ModelSpec, params, x, mode: str):
    if spec.kind == "fff":
        if mode == "soft":
            return v1.soft_forward(params, x, depth=spec.depth).y
        return v1.hard_forward(x, params["node_weights"], params["node_biases"], params["w1s"],
                               params["b1s"], params["w2s"], params["b2s"], depth=spec.depth)
    if spec.kind == "fff2":
        return v2.conditional_forward(x, params["w_in"], params["b_in"], params["w_out"],
                                      depth=spec.depth, n_trees=spec.n_trees)
    return ff_forward(params, x)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _predict_jit(spec, params, x, mode, chunk):
    n = x.shape[0]
    n_chunks = -(-n // chunk)
    padded = jnp.pad(x, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, -1)
    out = jax.lax.map(lambda xc: _predict_chunk(spec, params, xc, mode), padded)
    return out.reshape(n_chunks * chunk, -1)[:n]


def accuracy(spec: ModelSpec, params, x, y, *, mode: str = "hard") -> float:
    """Fraction of ``x`` whose arg-max logit is the label ``y``."""
    pred = np.asarray(jnp.argmax(predict_logits(spec, params, x, mode=mode), axis=-1))
    return float(np.mean(pred == np.asarray(y)))


def inference_flops(spec: ModelSpec) -> int:
    """Multiply-adds x 2 per sample of the hard (deployed) forward, biases and activations ignored.

    ``fff``: ``depth`` node dot products plus one leaf MLP; ``ff``: the dense MLP; ``fff2``:
    ``n_trees * (depth + 1)`` neurons each with an input and an output row.
    """
    i, o = spec.in_features, spec.out_features
    if spec.kind == "fff":
        return 2 * (spec.depth * i + i * spec.width + spec.width * o)
    if spec.kind == "ff":
        return 2 * (i * spec.width + spec.width * o)
    return 2 * spec.n_trees * (spec.depth + 1) * (i + o)


def training_width(spec: ModelSpec) -> int:
    """Hidden units computed per sample in training: ``2**d * l`` (fff), the width (ff), all
    ``K * (2**(d+1) - 1)`` nodes (fff2, whose published training is dense-masked)."""
    if spec.kind == "fff":
        return 2 ** spec.depth * spec.width
    if spec.kind == "ff":
        return spec.width
    return spec.n_trees * tree.v2_nodes_per_tree(spec.depth)


def n_params(params) -> int:
    """Total parameter count."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def to_module(spec: ModelSpec, params: dict):
    """The trained parameters as an NNX module (:class:`fffjax.nn.FFF` or :class:`fffjax.nn.UltraFastFF`),
    in eval mode, e.g. for :func:`fffjax.convert.export_fastfeedforward`."""
    from flax import nnx

    from fffjax import nn

    if spec.kind == "fff":
        module = nn.FFF(spec.in_features, spec.width, spec.out_features, spec.depth, rngs=nnx.Rngs(0))
    elif spec.kind == "fff2":
        module = nn.UltraFastFF(spec.in_features, spec.depth, n_trees=spec.n_trees,
                                out_features=spec.out_features, rngs=nnx.Rngs(0))
    else:
        raise ValueError("to_module needs an fff or fff2 spec; an ff is a plain parameter dict")
    for name, value in params.items():
        getattr(module, name)[...] = jnp.asarray(value)
    module.eval()
    return module


def make_optimizer(config: FlatTrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW with the configured learning-rate schedule; recipes that differ only in what the
    optimizer does not see (seed, hardening, ...) share one object, hence one compilation."""
    return _optimizer(config.epochs, steps_per_epoch, config.learning_rate, config.schedule, config.weight_decay)


@functools.lru_cache(maxsize=256)
def _optimizer(epochs: int, steps_per_epoch: int, learning_rate: float, schedule: str, weight_decay: float):
    total = max(1, epochs * steps_per_epoch)
    if schedule == "constant":
        lr = learning_rate
    else:
        warmup = min(steps_per_epoch, total // 2)
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, warmup), total, 0.0)
    return with_standard_promotion(optax.adamw(lr, weight_decay=weight_decay))


def loss_fn(spec: ModelSpec, params, x, y, hardening, *, hard_decisions: bool, key):
    """Mean cross-entropy plus ``hardening * mean(node entropies)``; returns ``(loss, accuracy)``."""
    logits, entropies = training_logits(spec, params, x, hard_decisions=hard_decisions, key=key)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    harden = jnp.mean(entropies) if entropies.shape[0] else 0.0
    return ce + hardening * harden, jnp.mean(jnp.argmax(logits, -1) == y)


def _epoch_one(spec, optimizer, batch_size, hard_decisions, params, opt_state, x, y, perm, key, hardening, grad_mask):
    n_batches = x.shape[0] // batch_size
    batches = perm[: n_batches * batch_size].reshape(n_batches, batch_size)

    def step(carry, inp):
        params, opt_state = carry
        idx, k = inp
        grad_fn = jax.value_and_grad(
            lambda p: loss_fn(spec, p, x[idx], y[idx], hardening, hard_decisions=hard_decisions, key=k),
            has_aux=True)
        (loss, acc), grads = grad_fn(params)
        if grad_mask is not None:
            grads = jax.tree.map(lambda g, m: g * m, grads, grad_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if grad_mask is not None:
            # Weight decay would move frozen entries too.
            updates = jax.tree.map(lambda u, m: u * m, updates, grad_mask)
        return (optax.apply_updates(params, updates), opt_state), (loss, acc)

    (params, opt_state), (loss, acc) = jax.lax.scan(
        step, (params, opt_state), (batches, jax.random.split(key, n_batches)))
    return params, opt_state, jnp.mean(loss), jnp.mean(acc)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
def _epoch(spec, optimizer, batch_size, hard_decisions, params, opt_state, x, y, perm, key, hardening, grad_mask):
    """One epoch for a stack of independent runs (leading axis: seeds), sharing the data."""
    one = functools.partial(_epoch_one, spec, optimizer, batch_size, hard_decisions)
    return jax.vmap(one, in_axes=(0, 0, None, None, 0, 0, None, None))(
        params, opt_state, x, y, perm, key, hardening, grad_mask)


class TrainResult(NamedTuple):
    """Result of :func:`train`: final ``params`` and per-epoch ``history`` dicts
    (``epoch``, ``phase`` "soft"/"hard", ``loss``, ``train_batch_accuracy``, ``hardening``)."""

    params: dict
    history: list


def train(
    spec: ModelSpec,
    config: FlatTrainConfig,
    x_train: Float[np.ndarray, "n din"] | Float[Array, "n din"],
    y_train: Int[np.ndarray, " n"] | Int[Array, " n"],
    *,
    params: dict | None = None,
    grad_mask: dict | None = None,
    progress: bool | str = False,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``spec`` on ``(x_train, y_train)`` with ``config.seed``.

    Args:
        spec: the model.
        config: the recipe.
        x_train: ``(n, in_features)`` float inputs.
        y_train: ``(n,)`` integer labels in ``[0, out_features)``.
        params: start from these (fine-tuning) instead of a fresh init.
        grad_mask: 0/1 pytree like ``params``; zero entries never change.
        progress: show a tqdm bar over epochs (a string is its description).
        on_epoch: called with ``(epoch, history_row)`` after every epoch.
    """
    return train_seeds(spec, config, x_train, y_train, seeds=(config.seed,), params=params,
                       grad_mask=grad_mask, progress=progress, on_epoch=on_epoch)[0]


def train_seeds(
    spec: ModelSpec,
    config: FlatTrainConfig,
    x_train: Float[np.ndarray, "n din"] | Float[Array, "n din"],
    y_train: Int[np.ndarray, " n"] | Int[Array, " n"],
    *,
    seeds: tuple[int, ...],
    params: dict | None = None,
    grad_mask: dict | None = None,
    progress: bool | str = False,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[TrainResult]:
    """Independent runs for several seeds at once (vmapped: one compilation, one pass over the
    data per step); each seed fixes init, shuffling and the region leak. Arguments as :func:`train`
    (``params``, if given, is the shared starting point of every seed); ``on_epoch`` rows hold
    the mean over seeds."""
    x = jnp.asarray(x_train, jnp.float32)
    y = jnp.asarray(y_train, jnp.int32)
    if x.ndim != 2 or x.shape[1] != spec.in_features:
        raise ValueError(f"x_train must be (n, {spec.in_features}), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y_train must be ({x.shape[0]},), got {y.shape}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    batch_size = min(config.batch_size, x.shape[0])
    steps = x.shape[0] // batch_size
    keys = [jax.random.split(jax.random.key(s)) for s in seeds]   # (run key, init key) per seed
    if params is None:
        stacked = [init_params(spec, k[1]) for k in keys]
    else:
        stacked = [jax.tree.map(jnp.asarray, params)] * len(seeds)
    params = jax.tree.map(lambda *a: jnp.stack(a), *stacked)
    if grad_mask is not None:
        grad_mask = jax.tree.map(lambda m, p: jnp.broadcast_to(jnp.asarray(m, p.dtype), p.shape[1:]), grad_mask, params)
    optimizer = make_optimizer(config, steps)
    opt_state = jax.vmap(optimizer.init)(params)
    run_keys = jnp.stack([k[0] for k in keys])
    soft_epochs = config.epochs - (config.hard_epochs if spec.kind == "fff" else 0)
    epochs = range(config.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=progress if isinstance(progress, str) else spec.label, leave=False)
    histories = [[] for _ in seeds]
    for epoch in epochs:
        hard = epoch >= soft_epochs
        if config.hardening_schedule == "ramp" and soft_epochs > 1:
            hardening = config.hardening * min(1.0, epoch / (soft_epochs - 1))
        else:
            hardening = config.hardening
        split = jax.vmap(lambda k: jax.random.split(k, 3))(run_keys)
        run_keys, perm_keys, step_keys = split[:, 0], split[:, 1], split[:, 2]
        perms = jax.vmap(lambda k: jax.random.permutation(k, x.shape[0]))(perm_keys)
        params, opt_state, loss, acc = _epoch(
            spec, optimizer, batch_size, hard, params, opt_state, x, y, perms, step_keys,
            jnp.float32(hardening), grad_mask)
        loss, acc = np.asarray(loss), np.asarray(acc)
        for i, history in enumerate(histories):
            history.append({"epoch": epoch, "phase": "hard" if hard else "soft", "loss": float(loss[i]),
                            "train_batch_accuracy": float(acc[i]), "hardening": hardening})
        mean_row = {"epoch": epoch, "phase": "hard" if hard else "soft", "loss": float(loss.mean()),
                    "train_batch_accuracy": float(acc.mean()), "hardening": hardening}
        if progress:
            epochs.set_postfix(loss=f"{mean_row['loss']:.3f}", acc=f"{mean_row['train_batch_accuracy']:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, mean_row)
    return [TrainResult(jax.tree.map(lambda a, i=i: a[i], params), histories[i]) for i in range(len(seeds))]
