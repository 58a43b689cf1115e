"""Flax NNX modules over the pure-function core (:mod:`fffjax.v1`, :mod:`fffjax.v2`, :mod:`fffjax.ops`).

Modules are pytrees: plain ``jax.jit`` / ``jax.grad`` / optax work on them. A new module is in
train mode; ``module.eval()`` / ``module.train()`` switch it (NNX's ``deterministic`` attribute).
Usage counters are mutated by the training forward: run stateful steps under ``nnx.jit`` (or
split/merge) so the update is kept.
"""

from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fffjax import ops, parallel, tree, v1, v2

USAGE_MODES = ("none", "soft", "hard")


class Usage(nnx.Variable):
    """Usage counters of FFF-v1 nodes and leaves (the package's ``usage_mode``); not trained."""


def _check_positive(**sizes) -> None:
    for name, value in sizes.items():
        tree.check_count(value, name, 1)


def _check_probability(**values) -> None:
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


class FFF(nnx.Module):
    """FFF-v1: a tree of sigmoid routers over ``2**depth`` two-layer MLP leaves (``fastfeedforward`` semantics).

    Train mode: ``module(x)`` is the soft mixture over all leaves (the sigmoid weights the right
    child), with dropout after the leaf activation and region leak drawn from ``rngs``;
    ``module(x, return_entropies=True)`` also returns the ``(n_nodes,)`` batch-mean entropies;
    ``use_hard_decisions=True`` (or ``train_hardened``) rounds the sigmoids (zero logit -> left).
    Eval mode: the hard descent (``z >= 0`` -> right) and one leaf, with the leaf output bias
    (``legacy_eval=True`` drops it, as fastfeedforward 0.2.1's eval does; for parity only).

    Args:
        in_features, leaf_width, out_features: widths (> 0).
        depth: routing levels (>= 0); depth 0 is one leaf, a plain MLP.
        activation: leaf hidden activation.
        dropout, region_leak: probabilities in [0, 1], training only.
        train_hardened: round decisions in training.
        legacy_eval: drop ``b2s`` in eval (0.2.1 parity).
        usage_mode: "none", "soft" or "hard" usage counters (``node_usage``, ``leaf_usage``).
        implementation: hard-inference implementation (see :func:`fffjax.ops.fff_v1_hard`).
        dtype: parameter dtype.
        rngs: ``nnx.Rngs``; ``params`` initialises, ``dropout`` drives dropout and region leak.
    """

    kernel_op: ClassVar[str] = "fff_v1_hard"   # see fffjax.ops.set_implementation

    def __init__(
        self,
        in_features: int,
        leaf_width: int,
        out_features: int,
        depth: int,
        *,
        activation: Callable = jax.nn.relu,
        dropout: float = 0.0,
        region_leak: float = 0.0,
        train_hardened: bool = False,
        legacy_eval: bool = False,
        usage_mode: str = "none",
        implementation: str | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_positive(in_features=in_features, leaf_width=leaf_width, out_features=out_features)
        tree.check_depth(depth)
        _check_probability(dropout=dropout, region_leak=region_leak)
        if usage_mode not in USAGE_MODES:
            raise ValueError(f"usage_mode must be one of {USAGE_MODES}, got {usage_mode!r}")
        self.in_features, self.leaf_width, self.out_features, self.depth = (
            in_features, leaf_width, out_features, depth)
        self.activation = activation
        self.dropout, self.region_leak = dropout, region_leak
        self.train_hardened, self.legacy_eval = train_hardened, legacy_eval
        self.usage_mode, self.implementation = usage_mode, implementation
        self.deterministic = False
        params = v1.init(rngs.params(), in_features, leaf_width, out_features, depth, dtype=dtype)
        for name in v1.PARAM_NAMES:
            setattr(self, name, nnx.Param(params[name]))
        n_nodes, n_leaves = tree.v1_sizes(depth)
        if usage_mode != "none":
            self.node_usage = Usage(jnp.zeros((n_nodes,), jnp.float32))
            self.leaf_usage = Usage(jnp.zeros((n_leaves,), jnp.float32))
        self.rngs = rngs["dropout"].fork() if (dropout > 0 or region_leak > 0) else nnx.data(None)

    def params(self) -> dict[str, jax.Array]:
        """The parameters as the dict the pure functions of :mod:`fffjax.v1` take."""
        return {name: getattr(self, name)[...] for name in v1.PARAM_NAMES}

    def __call__(self, x, return_entropies: bool = False, use_hard_decisions: bool | None = None):
        """``x (..., in_features)`` -> ``(..., out_features)`` (and ``(n_nodes,)`` entropies if asked)."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"x must be an array, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if self.deterministic:
            if return_entropies:
                raise ValueError("return_entropies=True needs train mode (module.train())")
            if use_hard_decisions is not None and not use_hard_decisions:
                raise ValueError("use_hard_decisions=False needs train mode: eval is always hard")
            p = self.params()
            return ops.fff_v1_hard(
                x, *(p[n] for n in v1.PARAM_NAMES), depth=self.depth, activation=self.activation,
                leaf_output_bias=not self.legacy_eval, implementation=self.implementation)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        key = self.rngs() if self.rngs is not None else None
        out = v1.soft_forward(
            self.params(), x2, depth=self.depth, activation=self.activation,
            hard_decisions=bool(use_hard_decisions) or self.train_hardened,
            region_leak=self.region_leak, dropout=self.dropout, key=key)
        if self.usage_mode != "none":
            node_inc, leaf_inc = v1.usage_increments(
                out.modifiers, out.mixture, batch=x2.shape[0], depth=self.depth, mode=self.usage_mode)
            self.node_usage[...] = self.node_usage[...] + jax.lax.stop_gradient(node_inc)
            self.leaf_usage[...] = self.leaf_usage[...] + jax.lax.stop_gradient(leaf_inc)
        y = out.y.reshape(*lead, self.out_features)
        return (y, out.entropies) if return_entropies else y


class UltraFastFF(nnx.Module):
    """FFF-v2 (UltraFastBERT's layer): K trees of single GELU neurons, hard ``> 0`` routing.

    Parameters ``w_in (K*N, H)``, ``b_in (K*N,)``, ``w_out (K*N, H_out)``, ``N = 2**(depth+1) - 1``,
    cast to the dtype of the input at each call (a bfloat16 model routes on bfloat16 logits).
    The same hard path in training and inference; ``implementation`` picks the computation
    (``"xla"``: conditional row gathers; ``"reference"``: the published masked dense form;
    ``"pallas"``: GPU kernels with a conditional backward; ``None``: fastest available; see
    :func:`fffjax.ops.fff_v2_hard`).

    Args:
        features: input width H.
        depth: descents per tree (>= 0).
        n_trees: K.
        out_features: output width (default H).
        init: ``"published"`` (the layer's own init) or ``"crammed"`` (normal 0.02, zero bias).
        implementation: see above.
        dtype: parameter dtype.
        rngs: ``nnx.Rngs`` with a ``params`` stream.
        mesh, tree_parallel_axis: when both are set (:func:`set_tree_parallel`), the forward is
            :func:`fffjax.parallel.fff_v2_tree_parallel` over that mesh axis (``mode="subtree"``),
            which equals the single-device result.
    """

    kernel_op: ClassVar[str] = "fff_v2_hard"   # see fffjax.ops.set_implementation

    def __init__(
        self,
        features: int,
        depth: int,
        *,
        n_trees: int = 1,
        out_features: int | None = None,
        init: str = "published",
        implementation: str | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        mesh=None,
        tree_parallel_axis: str | None = None,
    ):
        _check_positive(features=features, n_trees=n_trees)
        if out_features is not None:
            _check_positive(out_features=out_features)
        tree.check_depth(depth)
        self.features, self.depth, self.n_trees = features, depth, n_trees
        self.out_features = features if out_features is None else out_features
        self.implementation = implementation
        self.mesh, self.tree_parallel_axis = mesh, tree_parallel_axis
        p = v2.init(rngs.params(), features, depth, n_trees=n_trees, out_features=out_features,
                    scheme=init, dtype=dtype)
        self.w_in, self.b_in, self.w_out = nnx.Param(p["w_in"]), nnx.Param(p["b_in"]), nnx.Param(p["w_out"])

    def __call__(self, x):
        """``x (..., H)`` -> ``(..., H_out)`` in the dtype of ``x``."""
        if not hasattr(x, "dtype"):
            raise TypeError(f"x must be an array, got {type(x).__name__}")
        w_in, b_in, w_out = (p[...].astype(x.dtype) for p in (self.w_in, self.b_in, self.w_out))
        if self.mesh is not None and self.tree_parallel_axis is not None:
            return parallel.fff_v2_tree_parallel(
                x, w_in, b_in, w_out, depth=self.depth, n_trees=self.n_trees, mesh=self.mesh,
                axis=self.tree_parallel_axis, implementation=self.implementation)
        return ops.fff_v2_hard(x, w_in, b_in, w_out, depth=self.depth, n_trees=self.n_trees,
                               implementation=self.implementation)


def set_tree_parallel(model: nnx.Module, mesh, axis: str = "model") -> nnx.Module:
    """Make every :class:`UltraFastFF` inside ``model`` tree-parallel on ``mesh``'s ``axis``
    (``mesh=None`` turns it off); returns ``model``, changed in place. The weights keep their heap
    layout, so checkpoints and exports are unaffected."""
    if mesh is not None:
        parallel.check_axis(mesh, axis)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, UltraFastFF):
            module.mesh, module.tree_parallel_axis = mesh, (axis if mesh is not None else None)
    return model
