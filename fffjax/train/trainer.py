"""The UltraFastBERT `Trainer`: a sharded train state and its jitted step, evaluation and prediction.

The train state is a plain dict `{"params", "opt_state", "step"}` whose `params` is the NNX
model's `nnx.Param` state as a pure nested dict (`nnx.to_pure_dict`), so checkpoint keys and
partition rules see dotted paths like `layers.0.ffn.w_in`. Dropout keys are not state: every step
reseeds each dropout stream with `fold_in(fold_in(key(seed), step), stream_index)`, so dropout is a
pure function of (seed, step), identical under any sharding and after a resume.

Gradient accumulation averages `grad_accum` microbatch gradients inside one jitted step;
`compute_dtype="bfloat16"` casts the parameters for the forward and backward pass and switches the
modules to bfloat16 compute (`set_compute_dtype`), while the optimizer keeps float32 master weights.

The jitted functions take a `_Program` as a static argument: everything that changes the traced
program (the model's structure, the config without its run-time fields, the objective, the mesh and
the state's shardings) and no arrays. Trainers of the same structure therefore share one
compilation through `jax.jit`'s own cache, and nothing outlives jax's bounded caches.
"""

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from fffjax._typing import Array
from fffjax.train import sharding as shd
from fffjax.train.config import TrainConfig
from fffjax.train.objectives import LossFn
from fffjax.train.optim import make_optimizer

# TrainConfig fields that the traced program does not depend on (the seed is a run-time argument).
RUNTIME_FIELDS = ("seed", "save_every", "keep", "eval_every", "data_parallel", "model_parallel")


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


@dataclasses.dataclass(frozen=True, eq=False)
class _Program:
    """What a Trainer's jitted functions trace; hashable, so that it is a static argument of `jax.jit`.

    Equal programs trace equal computations: the key holds the model's graph and state structure,
    the values of its non-key, non-parameter state (constants of the trace), the config with its
    run-time fields reset, the objective, the mesh and the state's shardings.
    """

    graphdef: Any
    param_treedef: Any
    rest_treedef: Any
    rest_is_key: tuple[bool, ...]
    rest_static: tuple[np.ndarray | None, ...]
    config: TrainConfig
    objective: LossFn
    mesh: Mesh
    state_sharding_leaves: tuple[jax.sharding.Sharding, ...]
    state_sharding_treedef: Any

    def __post_init__(self):
        statics = tuple(None if a is None else (a.dtype.str, a.shape, a.tobytes()) for a in self.rest_static)
        key = (self.graphdef, self.param_treedef, self.rest_treedef, self.rest_is_key, statics, self.config,
               self.objective, self.mesh, self.state_sharding_leaves, self.state_sharding_treedef)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, _Program) and self._hash == other._hash and self._key == other._key)

    # ---- inside jit

    def model_from(self, params, step: Array | int, seed: Array | int, *, train_mode: bool) -> nnx.Module:
        """An NNX model holding `params`, dropout reseeded for (`seed`, `step`)."""
        param_state = jax.tree.unflatten(self.param_treedef, jax.tree.leaves(params))
        base = jax.random.fold_in(jax.random.key(seed), step)
        rest = []
        for i, (is_key, static) in enumerate(zip(self.rest_is_key, self.rest_static)):
            rest.append(jax.random.fold_in(base, i) if is_key else jnp.zeros_like(static)
                        if static.dtype == np.uint32 else jnp.asarray(static))
        model = nnx.merge(self.graphdef, param_state, jax.tree.unflatten(self.rest_treedef, rest))
        model.train() if train_mode else model.eval()
        return model

    def cast(self, params):
        if self.config.compute_dtype == "float32":
            return params
        return jax.tree.map(lambda p: p.astype(jnp.bfloat16) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

    def loss(self, params, batch, step, micro, seed):
        model = self.model_from(self.cast(params), step * self.config.grad_accum + micro, seed,
                                train_mode=self.config.train_mode)
        loss, metrics = self.objective(model, batch)
        return loss.astype(jnp.float32), metrics

    def train_step(self, state, batch, seed):
        accum = self.config.grad_accum
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
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
        tx = make_optimizer(self.config)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return new_state, out

    def eval_outputs(self, params, batch):
        # dropout is off in eval mode: the seed is unused
        loss, metrics = self.objective(self.model_from(self.cast(params), 0, 0, train_mode=False), batch)
        return {"loss": loss.astype(jnp.float32), **metrics}

    def predict_outputs(self, params, batch):
        model = self.model_from(self.cast(params), 0, 0, train_mode=False)
        return model(batch["input_ids"], batch["attention_mask"])


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _jit_train_step(program: _Program, state, batch, seed):
    new_state, out = program.train_step(state, batch, seed)
    shardings = jax.tree.unflatten(program.state_sharding_treedef, program.state_sharding_leaves)
    # the new state keeps the state's shardings, so the next step and a restore see the same layout
    new_state = jax.lax.with_sharding_constraint(new_state, shardings)
    return new_state, jax.lax.with_sharding_constraint(out, shd.replicated(program.mesh))


@functools.partial(jax.jit, static_argnums=0)
def _jit_eval(program: _Program, params, batch):
    return program.eval_outputs(params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _jit_predict(program: _Program, params, batch):
    return program.predict_outputs(params, batch)


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
        rest_leaves = jax.tree.leaves(rest_state)
        rest_is_key = tuple(_is_rng_key(x) for x in rest_leaves)
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
        self._seed = shd.to_global(np.asarray(config.seed, np.int32), repl)
        sharding_leaves, sharding_treedef = jax.tree.flatten(
            self.state_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        defaults = TrainConfig()
        self._program = _Program(
            graphdef=self.graphdef,
            param_treedef=jax.tree.structure(param_state),
            rest_treedef=jax.tree.structure(rest_state),
            rest_is_key=rest_is_key,
            rest_static=tuple(None if k else np.asarray(x) for x, k in zip(rest_leaves, rest_is_key)),
            config=dataclasses.replace(config, **{name: getattr(defaults, name) for name in RUNTIME_FIELDS}),
            objective=objective,
            mesh=self.mesh,
            state_sharding_leaves=tuple(sharding_leaves),
            state_sharding_treedef=sharding_treedef,
        )

    def model_from(self, params, step: Array | int, *, train_mode: bool, seed: Array | int | None = None) -> nnx.Module:
        """An NNX model holding `params`, dropout reseeded for (`seed`, `step`) (usable inside `jit`)."""
        return self._program.model_from(params, step, self.config.seed if seed is None else seed,
                                        train_mode=train_mode)

    def _loss(self, params, batch, step, micro, seed):
        return self._program.loss(params, batch, step, micro, seed)

    def _train_step(self, state, batch, seed):
        return self._program.train_step(state, batch, seed)

    def _batch_shardings(self, batch):
        return {k: shd.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def place_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
        """Host batch (the same global batch on every process) -> global arrays split on `data`."""
        return shd.to_global(dict(batch), self._batch_shardings(batch))

    def launch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
        """Dispatches one optimizer step on a global host batch and returns its metrics as device
        arrays without waiting for them: the host can prepare the next batch while the step runs
        (`fetch_metrics` waits)."""
        placed = self.place_batch(batch)
        with jax.set_mesh(self.mesh):   # the model's kernels run per device on it (parallel.rows_per_device)
            self.state, metrics = _jit_train_step(self._program, self.state, placed, self._seed)
        return metrics

    @staticmethod
    def fetch_metrics(metrics: Mapping[str, Array]) -> dict[str, float]:
        """Device metrics of `launch` -> host floats (waits for the step)."""
        return {k: float(v) for k, v in shd.to_host(dict(metrics)).items()}

    def step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a global host batch; returns host float metrics."""
        return self.fetch_metrics(self.launch(batch))

    def evaluate(self, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
        """Mean objective metrics (dropout off) over host batches."""
        totals: dict[str, float] = {}
        n = 0
        for batch in batches:
            with jax.set_mesh(self.mesh):
                out = shd.to_host(_jit_eval(self._program, self.state["params"], self.place_batch(batch)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(n, 1) for k, v in totals.items()}

    def predict(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Model outputs (dropout off) for a host batch, as numpy."""
        with jax.set_mesh(self.mesh):
            return np.asarray(shd.to_host(_jit_predict(self._program, self.state["params"], self.place_batch(batch))))

    def model(self) -> nnx.Module:
        """The current parameters as an NNX model in eval mode (host copy)."""
        params = jax.tree.map(jnp.asarray, shd.to_host(self.state["params"]))
        return self.model_from(params, 0, train_mode=False)

    def abstract_state(self):
        """`ShapeDtypeStruct`s with shardings of the train state (an orbax restore target)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.state, self.state_shardings)
