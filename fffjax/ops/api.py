"""Public hard-inference functions, argument checks and the implementation registry."""

import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fffjax import tree, v1, v2

# op name -> implementation name -> function(x2d, *weights, **static) -> y2d
_REGISTRY: dict[str, dict[str, Callable]] = {"fff_v1_hard": {}, "fff_v2_hard": {}}
# Preference order per platform; "xla" is always last and always works.
_PREFERENCE = {"gpu": ("pallas", "xla"), "cuda": ("pallas", "xla"), "cpu": ("cpu_ffi", "xla")}
_DEFAULT_PREFERENCE = ("xla",)
_LAZY_BACKENDS = {"pallas": "pallas_kernels"}


def register_implementation(op: str, name: str, fn: Callable) -> None:
    """Make ``fn`` available as ``implementation=name`` for ``op`` ("fff_v1_hard" or "fff_v2_hard").

    ``fn`` takes 2-D ``x`` (tokens, H) and the op's weights with its keyword arguments, and may
    raise ``NotImplementedError`` for a case it does not cover (the next implementation is tried
    when the choice was automatic).
    """
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {sorted(_REGISTRY)}, got {op!r}")
    _REGISTRY[op][name] = fn


def _load_lazy_backends() -> None:
    for name, module in _LAZY_BACKENDS.items():
        if all(name not in impls for impls in _REGISTRY.values()):
            try:
                importlib.import_module(module)
            except ImportError:
                pass


def available_implementations(op: str = "fff_v2_hard") -> tuple[str, ...]:
    """Names registered for ``op`` (lazy backends such as Pallas are imported on first use)."""
    _load_lazy_backends()
    return tuple(_REGISTRY[op])


# On a GPU, an FFF-v2 layer whose path holds more than this fraction of its neurons runs faster as
# the masked dense form on the tensor cores: 128 trees of depth 4 (5 of 31 neurons per tree) took
# 54.0 ms masked dense against 148 ms for the best Pallas kernel at 2**20 bf16 tokens on the H200,
# and 93 ms against 2190 ms per training step (experiments/results/bench_gpu.md); one tree of
# depth 11 (12 of 4095) is 38x faster through Pallas.
DENSE_PATH_FRACTION = 1 / 16


def _candidates(op: str, implementation: str | None, static: dict | None = None) -> list[str]:
    _load_lazy_backends()
    impls = _REGISTRY[op]
    if implementation is not None:
        if implementation not in impls:
            raise ValueError(
                f"implementation must be one of {sorted(impls)} or None, got {implementation!r}"
            )
        return [implementation]
    platform = jax.default_backend()
    names = [name for name in _PREFERENCE.get(platform, _DEFAULT_PREFERENCE) if name in impls]
    if platform in ("gpu", "cuda") and op == "fff_v2_hard" and static and "reference" in impls:
        depth = static["depth"]
        if (depth + 1) / tree.v2_nodes_per_tree(depth) > DENSE_PATH_FRACTION:
            names = ["reference"] + names
    return names


def _dispatch(op: str, implementation: str | None, x2d, weights, static) -> jax.Array:
    names = _candidates(op, implementation, static)
    for i, name in enumerate(names):
        try:
            return _REGISTRY[op][name](x2d, *weights, **static)
        except NotImplementedError:
            if implementation is not None or i == len(names) - 1:
                raise
    raise AssertionError("unreachable: 'xla' is always registered")


def _check_x(x, width: int, width_name: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(f"x must have shape (..., {width}) to match {width_name}, got {tuple(x.shape)}")


def _check_shape(name: str, a, expected: tuple) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(a.shape)}")


def _check_depth(depth) -> None:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")


def fff_v2_hard(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1, implementation: str | None = None):
    """FFF-v2 (UltraFastBERT) hard forward: each token evaluates the ``depth + 1`` neurons on its path.

    Args:
        x: ``(..., H)`` floating inputs.
        w_in: ``(K*N, H)`` node weights (= the published ``linear_in.weight``), ``N = 2**(depth+1) - 1``.
        b_in: ``(K*N,)`` node biases.
        w_out: ``(K*N, H_out)`` output rows (= the published ``linear_out.weight.T``).
        depth: descents per tree (>= 0).
        n_trees: K, the number of independent trees, whose outputs are summed.
        implementation: ``"xla"``, ``"cpu_ffi"`` (C++ CPU kernel), ``"reference"``, ``"pallas"`` or
            ``None`` (fastest available: ``"cpu_ffi"`` then ``"xla"`` on the CPU; on a GPU
            ``"pallas"``, or ``"reference"`` (masked dense) when the path holds more than
            :data:`DENSE_PATH_FRACTION` of each tree's neurons, as in 128 trees of depth 4).

    Returns:
        ``(..., H_out)`` in the dtype of ``x``. Routing goes right on a strictly positive logit.
    """
    _check_depth(depth)
    if not isinstance(n_trees, int) or n_trees < 1:
        raise ValueError(f"n_trees must be an int >= 1, got {n_trees!r}")
    n = n_trees * tree.v2_nodes_per_tree(depth)
    if w_in.ndim != 2:
        raise ValueError(f"w_in must have shape ({n}, H), got {tuple(w_in.shape)}")
    _check_shape("w_in", w_in, (n, w_in.shape[1]))
    _check_x(x, w_in.shape[1], "w_in.shape[1]")
    _check_shape("b_in", b_in, (n,))
    if w_out.ndim != 2 or w_out.shape[0] != n:
        raise ValueError(f"w_out must have shape ({n}, H_out), got {tuple(w_out.shape)}")
    lead = x.shape[:-1]
    y = _dispatch("fff_v2_hard", implementation, x.reshape(-1, x.shape[-1]), (w_in, b_in, w_out),
                  {"depth": depth, "n_trees": n_trees})
    return y.reshape(*lead, w_out.shape[1])


def fff_v1_hard(
    x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth: int,
    activation: Callable = jax.nn.relu, leaf_output_bias: bool = True, implementation: str | None = None,
):
    """FFF-v1 hard forward: descend ``depth`` levels (right when ``z >= 0``), then the reached leaf's MLP.

    Args:
        x: ``(..., in)`` floating inputs.
        node_weights: ``(2**depth - 1, in)``; node_biases: ``(2**depth - 1,)`` or the package's ``(n, 1)``.
        w1s: ``(2**depth, in, width)``; b1s: ``(2**depth, width)``;
        w2s: ``(2**depth, width, out)``; b2s: ``(2**depth, out)`` (the package's (in, out) layouts).
        activation: hidden-layer activation of the leaves.
        leaf_output_bias: add ``b2s`` (``False`` reproduces fastfeedforward 0.2.1's eval, which drops it).
        implementation: ``"xla"``, ``"cpu_ffi"`` (C++ CPU kernel, ``jax.nn.relu`` only), ``"reference"``,
            ``"pallas"`` or ``None`` (fastest available: ``"cpu_ffi"`` then ``"xla"`` on the CPU).

    Returns:
        ``(..., out)`` in the dtype of ``x``.
    """
    _check_depth(depth)
    n_nodes, n_leaves = tree.v1_sizes(depth)
    if w1s.ndim != 3:
        raise ValueError(f"w1s must have shape ({n_leaves}, in, width), got {tuple(w1s.shape)}")
    din, width = w1s.shape[1], w1s.shape[2]
    _check_x(x, din, "w1s.shape[1]")
    _check_shape("w1s", w1s, (n_leaves, din, width))
    _check_shape("node_weights", node_weights, (n_nodes, din))
    if node_biases.ndim == 2:
        _check_shape("node_biases", node_biases, (n_nodes, 1))
        node_biases = node_biases[:, 0]
    _check_shape("node_biases", node_biases, (n_nodes,))
    _check_shape("b1s", b1s, (n_leaves, width))
    if w2s.ndim != 3:
        raise ValueError(f"w2s must have shape ({n_leaves}, {width}, out), got {tuple(w2s.shape)}")
    _check_shape("w2s", w2s, (n_leaves, width, w2s.shape[2]))
    _check_shape("b2s", b2s, (n_leaves, w2s.shape[2]))
    lead = x.shape[:-1]
    y = _dispatch(
        "fff_v1_hard", implementation, x.reshape(-1, din),
        (node_weights, node_biases, w1s, b1s, w2s, b2s),
        {"depth": depth, "activation": activation, "leaf_output_bias": leaf_output_bias},
    )
    return y.reshape(*lead, w2s.shape[2])


_jit_static_v2 = functools.partial(jax.jit, static_argnames=("depth", "n_trees"))
_jit_static_v1 = functools.partial(jax.jit, static_argnames=("depth", "activation", "leaf_output_bias"))

from fffjax.ops import cpu_ffi, xla  # noqa: E402  (they import nothing from this module)

register_implementation("fff_v2_hard", "xla", xla.fff_v2_hard_xla)
register_implementation("fff_v2_hard", "cpu_ffi", cpu_ffi.registered_fn)
register_implementation("fff_v2_hard", "reference", _jit_static_v2(v2.masked_forward))
register_implementation("fff_v1_hard", "xla", _jit_static_v1(v1.hard_forward))
register_implementation("fff_v1_hard", "cpu_ffi", cpu_ffi.registered_fn_v1)
register_implementation("fff_v1_hard", "reference", _jit_static_v1(v1.hard_forward_reference))
