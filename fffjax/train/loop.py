"""The training step and loop: the crammed-BERT AdamW recipe, sharded `jax.jit`, metrics.

Recipe (fff.md §5.5, `bert-o4`): AdamW with betas (0.9, 0.98), eps 1e-12, weight decay 0.01 not
applied to biases and norms, a triangle learning-rate schedule (linear rise from 0 to the peak at
`peak_fraction` of the steps, linear fall to 0 at the end; the published `budget-triangle2` is the
same shape over wall-clock budget, here over steps so runs are reproducible), gradient clipping
to global norm 0.5. Gradient accumulation averages `grad_accum` microbatch gradients inside one
jitted step; `compute_dtype="bfloat16"` casts the parameters for the forward and backward pass and
switches the modules to bfloat16 compute (`set_compute_dtype`), while the optimizer keeps float32
master weights.

The train state is a plain dict `{"params", "opt_state", "step"}` whose `params` is the NNX
model's `nnx.Param` state as a pure nested dict (`nnx.to_pure_dict`), so checkpoint keys and
partition rules see dotted paths like `layers.0.ffn.w_in`. Dropout keys are not state: every step
reseeds each dropout stream with `fold_in(fold_in(key(seed), step), stream_index)`, so dropout is a
pure function of (seed, step), identical under any sharding and after a resume.
"""

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from fffjax._typing import Array, Float, Int
from fffjax.train import sharding as shd

LossFn = Callable[[nnx.Module, dict[str, Array]], tuple[Array, dict[str, Array]]]
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


# --------------------------------------------------------------------------- optimizer


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
    return jax.tree_util.tree_map_with_path(lambda path, _: not NO_DECAY.search(shd.path_name(path)), params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the triangle schedule, decay masked by `decay_mask`."""
    schedule = triangle_schedule(config.learning_rate, config.steps, config.peak_fraction)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )


# --------------------------------------------------------------------------- losses


def mlm_loss(
    logits: Float[Array, "batch k vocab"], labels: Int[Array, "batch k"], weights: Float[Array, "batch k"]
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Weighted mean cross-entropy over the predicted positions, and their accuracy.

    Args:
        logits: `(batch, k, vocab)` logits at the masked positions.
        labels: `(batch, k)` original ids.
        weights: `(batch, k)` 1 for a real prediction, 0 for padding.
    """
    logits = logits.astype(jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total = jnp.maximum(weights.sum(), 1.0)
    loss = (per_token * weights).sum() / total
    accuracy = ((logits.argmax(-1) == labels) * weights).sum() / total
    return loss, {"accuracy": accuracy}


def gather_positions(x: Float[Array, "batch seq *rest"], positions: Int[Array, "batch k"]) -> Array:
    """`x[b, positions[b, j]]` for every b, j: `(batch, k, *rest)`."""
    return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


def mlm_objective(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Sparse-prediction MLM loss of a model called as `model(input_ids, attention_mask)`.

    A model with `encode(ids, mask) -> (B, S, H)` and `decode(hidden) -> logits` is decoded only
    at the masked positions (crammed BERT's sparse prediction); otherwise full logits are gathered.
    """
    if hasattr(model, "encode") and hasattr(model, "decode"):
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        logits = model.decode(gather_positions(hidden, batch["mask_positions"]))
    else:
        logits = gather_positions(model(batch["input_ids"], batch["attention_mask"]), batch["mask_positions"])
    return mlm_loss(logits, batch["mask_labels"], batch["mask_weights"])


def classification_objective(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Mean cross-entropy and accuracy of a classifier `model(input_ids, attention_mask) -> (B, labels)`."""
    logits = model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).mean()}


# --------------------------------------------------------------------------- trainer


_RUNTIME_FIELDS = ("seed", "save_every", "keep", "eval_every", "data_parallel", "model_parallel")
_COMPILED: dict[tuple, Callable] = {}


def _is_rng_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def set_compute_dtype(model: nnx.Module, dtype) -> None:
    """Make every submodule with a floating ``dtype`` attribute (linear, embedding, norm layers, the
    encoder's mask) compute in ``dtype``, in place; parameters keep their dtype.

    Casting the parameters alone is not enough: a module built with ``dtype=float32`` promotes its
    bfloat16 parameter copy back to float32 before the matmul.
    """
    for _, module in nnx.iter_graph(model):
        current = getattr(module, "dtype", None)
        if isinstance(module, nnx.Module) and current is not None and jnp.issubdtype(current, jnp.floating):
            module.dtype = dtype


class Trainer:
    """Holds a model's graph, a sharded train state and the jitted step.

    Args:
        model: an NNX module (its parameters are the initial values; it is not mutated).
        objective: `(model, batch) -> (loss, metrics)`; `mlm_objective` or
            `classification_objective`.
        config: `TrainConfig`.
        mesh: a `("data", "model")` mesh (default: `make_mesh(config.data_parallel,
            config.model_parallel)`).
        rules: partition rules for `fffjax.train.sharding.spec_for`.
    """

    def __init__(self, model: nnx.Module, objective: LossFn, config: TrainConfig, *, mesh: Mesh | None = None,
                 rules: shd.Rules = shd.DEFAULT_RULES):
        self.config = config
        self.objective = objective
        self.mesh = mesh if mesh is not None else shd.make_mesh(config.data_parallel, config.model_parallel)
        if config.parallelism or config.compute_dtype != "float32":
            model = nnx.clone(model)  # the caller's model stays as it was
        if config.parallelism:
            rules = shd.apply_parallelism(model, config.parallelism, self.mesh)
        if config.compute_dtype != "float32":
            set_compute_dtype(model, jnp.dtype(config.compute_dtype))
        if config.batch_size % (self.mesh.shape[shd.DATA] * config.grad_accum) and config.grad_accum > 1:
            raise ValueError(f"batch_size: {config.batch_size} must divide into grad_accum={config.grad_accum} "
                             f"microbatches of a multiple of data={self.mesh.shape[shd.DATA]}")
        if config.batch_size % self.mesh.shape[shd.DATA]:
            raise ValueError(f"batch_size: expected a multiple of data={self.mesh.shape[shd.DATA]}, "
                             f"got {config.batch_size}")
        self.graphdef, param_state, rest_state = nnx.split(model, nnx.Param, ...)
        self._param_treedef = jax.tree.structure(param_state)
        self._rest_treedef = jax.tree.structure(rest_state)
        rest_leaves = jax.tree.leaves(rest_state)
        self._rest_is_key = [_is_rng_key(x) for x in rest_leaves]
        self._rest_static = [None if k else np.asarray(x) for x, k in zip(rest_leaves, self._rest_is_key)]
        params = nnx.to_pure_dict(param_state)
        if [shd.path_name(p)[: -len(".value")] if shd.path_name(p).endswith(".value") else shd.path_name(p)
                for p, _ in jax.tree_util.tree_leaves_with_path(param_state)] != \
                [shd.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]:
            raise RuntimeError("nnx.to_pure_dict changed the leaf order; cannot rebuild the model state")
        self.tx = make_optimizer(config)
        self.param_shardings = shd.tree_shardings(params, self.mesh, rules)
        abstract_opt = jax.eval_shape(self.tx.init, params)
        repl = shd.replicated(self.mesh)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract_opt, self.param_shardings, transform_non_params=lambda _: repl,
            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings, "step": repl}
        host_params = jax.tree.map(np.asarray, params)
        placed = shd.to_global(host_params, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(placed)
        self.state = {"params": placed, "opt_state": opt_state,
                      "step": shd.to_global(np.asarray(0, np.int32), repl)}
        self._rules = tuple(rules)
        self._seed = shd.to_global(np.asarray(config.seed, np.int32), repl)

    # ---- model reconstruction (inside jit)

    def model_from(self, params, step: Array | int, *, train_mode: bool, seed: Array | int | None = None) -> nnx.Module:
        """An NNX model holding `params`, dropout reseeded for (`seed`, `step`) (usable inside `jit`)."""
        param_state = jax.tree.unflatten(self._param_treedef, jax.tree.leaves(params))
        seed = self.config.seed if seed is None else seed
        base = jax.random.fold_in(jax.random.key(seed), step)
        rest = []
        for i, (is_key, static) in enumerate(zip(self._rest_is_key, self._rest_static)):
            rest.append(jax.random.fold_in(base, i) if is_key else jnp.zeros_like(static)
                        if static.dtype == np.uint32 else jnp.asarray(static))
        model = nnx.merge(self.graphdef, param_state, jax.tree.unflatten(self._rest_treedef, rest))
        model.train() if train_mode else model.eval()
        return model

    def _cast(self, params):
        if self.config.compute_dtype == "float32":
            return params
        return jax.tree.map(lambda p: p.astype(jnp.bfloat16) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

    def _loss(self, params, batch, step, micro, seed):
        model = self.model_from(self._cast(params), step * self.config.grad_accum + micro,
                                train_mode=self.config.train_mode, seed=seed)
        loss, metrics = self.objective(model, batch)
        return loss.astype(jnp.float32), metrics

    def _train_step(self, state, batch, seed):
        accum = self.config.grad_accum
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if accum == 1:
            (loss, metrics), grads = grad_fn(state["params"], batch, state["step"], 0, seed)
        else:
            # microbatch j = rows j, j + accum, ...: keeps every microbatch split over `data`
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1),
                                 batch)

            def body(carry, inputs):
                j, mb = inputs
                return jax.tree.map(jnp.add, carry, grad_fn(state["params"], mb, state["step"], j, seed)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state["params"], first, state["step"], 0, seed)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return new_state, out

    def _batch_shardings(self, batch):
        return {k: shd.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def place_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
        """Host batch (the same global batch on every process) -> global arrays split on `data`."""
        return shd.to_global(dict(batch), self._batch_shardings(batch))

    def _compiled(self, kind: str, make: Callable[[], Callable]) -> Callable:
        # Trainers of the same structure share compiled functions: the key holds everything that
        # changes the traced program (the seed is a runtime argument).
        graph_fields = {k: v for k, v in self.config.to_dict().items() if k not in _RUNTIME_FIELDS}
        key = (kind, self.graphdef, self._param_treedef, self._rest_treedef, tuple(sorted(graph_fields.items())),
               self.mesh, self.objective, tuple(self._rest_is_key), self._rules)
        if key not in _COMPILED:
            _COMPILED[key] = make()
        return _COMPILED[key]

    def step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a global host batch; returns host float metrics."""
        placed = self.place_batch(batch)
        repl = shd.replicated(self.mesh)
        step_fn = self._compiled("step", lambda: jax.jit(
            self._train_step, in_shardings=(self.state_shardings, self._batch_shardings(batch), repl),
            out_shardings=(self.state_shardings, repl), donate_argnums=0))
        with jax.set_mesh(self.mesh):   # the model's kernels run per device on it (parallel.rows_per_device)
            self.state, metrics = step_fn(self.state, placed, self._seed)
        return {k: float(v) for k, v in shd.to_host(metrics).items()}

    def _eval_outputs(self, params, batch):
        loss, metrics = self.objective(self.model_from(self._cast(params), 0, train_mode=False), batch)
        return {"loss": loss.astype(jnp.float32), **metrics}

    def _predict_outputs(self, params, batch):
        return self.model_from(self._cast(params), 0, train_mode=False)(batch["input_ids"], batch["attention_mask"])

    def evaluate(self, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
        """Mean objective metrics (dropout off) over host batches."""
        eval_fn = self._compiled("eval", lambda: jax.jit(self._eval_outputs))
        totals: dict[str, float] = {}
        n = 0
        for batch in batches:
            with jax.set_mesh(self.mesh):
                out = shd.to_host(eval_fn(self.state["params"], self.place_batch(batch)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(n, 1) for k, v in totals.items()}

    def predict(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Model outputs (dropout off) for a host batch, as numpy."""
        fn = self._compiled("predict", lambda: jax.jit(self._predict_outputs))
        with jax.set_mesh(self.mesh):
            return np.asarray(shd.to_host(fn(self.state["params"], self.place_batch(batch))))

    def model(self) -> nnx.Module:
        """The current parameters as an NNX model in eval mode (host copy)."""
        params = jax.tree.map(jnp.asarray, shd.to_host(self.state["params"]))
        return self.model_from(params, 0, train_mode=False)

    def abstract_state(self):
        """`ShapeDtypeStruct`s with shardings of the train state (an orbax restore target)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.state, self.state_shardings)


# --------------------------------------------------------------------------- metrics and plots


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
    return tokens / seconds if seconds > 0 else math.nan


def now() -> float:
    return time.perf_counter()


# --------------------------------------------------------------------------- the run loop


def fit(
    trainer: Trainer,
    pipeline,
    *,
    out_dir: Path | str,
    model_config: Mapping[str, Any],
    run_info: Mapping[str, Any] | None = None,
    eval_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
    resume: bool = True,
    progress: bool = True,
    tokens_per_example: int = 0,
    plot_title: str = "",
) -> list[dict[str, Any]]:
    """Trains `trainer` for `config.steps` steps on `pipeline`, with checkpoints and metrics.

    Writes `<out_dir>/metrics.jsonl` (one record per step: loss, accuracy, grad_norm, lr,
    seconds, tokens_per_s; eval_* every `eval_every` steps and at the end), checkpoints under
    `<out_dir>/checkpoints/` (see `fffjax.train.checkpoint.RunCheckpoints`) and `<out_dir>/loss.png`. With `resume`,
    restarts from the latest readable checkpoint (parameters, optimizer, data position, step) and
    drops metric records of later steps, so the continued log equals an uninterrupted one.

    Args:
        trainer: a `Trainer` (its state is replaced on resume).
        pipeline: a `fffjax.data.pipeline.BatchPipeline`.
        out_dir: run folder.
        model_config: the `ModelConfig` dict stored with every checkpoint.
        run_info: extra JSON stored in the checkpoints' `run` item (task, tokenizer, ...).
        eval_batches: a zero-argument callable giving held-out host batches.
        resume: continue from `<out_dir>/checkpoints` when it holds a step.
        progress: show a tqdm bar (process 0 only).
        tokens_per_example: for the tokens/s figure (sequence length).

    Returns:
        The metric records of the whole run (read back from the JSONL file).
    """
    from tqdm.auto import tqdm

    from fffjax.data.pipeline import initial_position
    from fffjax.train.checkpoint import RunCheckpoints

    config = trainer.config
    out_dir = Path(out_dir)
    lead = jax.process_index() == 0
    log = MetricsLog(out_dir / "metrics.jsonl")
    schedule = triangle_schedule(config.learning_rate, config.steps, config.peak_fraction)
    run = {"train": config.to_dict(), **(run_info or {})}
    position = initial_position(config.seed)
    start = 0
    with RunCheckpoints(out_dir / "checkpoints", save_every=config.save_every, keep=config.keep) as checkpoints:
        if not resume and checkpoints.steps():
            raise FileExistsError(f"out_dir: {checkpoints.directory} already holds steps {checkpoints.steps()}; "
                                  "resume, or choose another folder (nothing is overwritten)")
        restored = checkpoints.restore_latest(trainer.abstract_state()) if resume else None
        if restored is not None:
            start = restored["step"]
            trainer.state = {"params": restored["params"], "opt_state": restored["opt_state"],
                             "step": shd.to_global(np.asarray(start, np.int32), shd.replicated(trainer.mesh))}
            position = restored["data"]
            if lead:
                print(f"resumed from {checkpoints.step_dir(start)}")
        if lead:
            log.truncate_after(start)
        bar = tqdm(total=config.steps, initial=start, disable=not (progress and lead), desc="train", unit="step")
        for step in range(start, config.steps):
            batch, position = pipeline.next(position)
            began = now()
            record = {"step": step + 1, **trainer.step(batch)}
            seconds = now() - began
            record.update(lr=float(schedule(step)), seconds=seconds,
                          tokens_per_s=tokens_per_second(config.batch_size * tokens_per_example, seconds))
            last = step + 1 == config.steps
            if eval_batches is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
                record.update({f"eval_{k}": v for k, v in trainer.evaluate(eval_batches()).items()})
            if lead:
                log.write(record)
            checkpoints.save(step + 1, params=trainer.state["params"], opt_state=trainer.state["opt_state"],
                             position=position, config=model_config, run=run, metrics=record, force=last)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
        bar.close()
    records = log.read() if log.path.exists() else []
    if lead and records:
        curves = {"train": ([r["step"] for r in records], [r["loss"] for r in records])}
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            curves["held-out"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
        try:
            plot_losses(curves, out_dir / "loss.png", title=plot_title,
                        smooth=max(1, min(20, len(records) // 20)))
        except ImportError:
            print("matplotlib is not installed (extra `dev`): no loss.png")
    return records
