"""Dense GELU feedforward -> FFF: convert one layer ``y = gelu(x @ w_in + b_in) @ w_out + b_out`` into
an FFF-v1 tree (leaves of several neurons) or FFF-v2 trees (single-neuron nodes), in stages that
cost more and keep more of the layer:

(a) :func:`init_from_dense`: no training. The dense neurons become the FFF's neurons.
(b) :func:`fit_routers`: the routing is fitted to a sample of the layer's inputs.
(c) :func:`distill_layer`: the whole FFF regresses the dense layer's output with optax.

Every stage takes and returns plain dicts of arrays. The dense layer is ``{"w_in" (H, F), "b_in" (F,),
"w_out" (F, H), "b_out" (H,)}`` (the exact erf GELU, as BERT; the names of
``fffjax.models.bert.DenseFfn``'s parameters). A target is a spec dict, the one
``fffjax.models.bert.ffn_spec`` records for a feedforward slot:

* ``{"kind": "fff_v1", "depth": d, "leaf_width": w}``: :mod:`fffjax.v1` parameters
  (``node_weights``, ``node_biases``, ``w1s``, ``b1s``, ``w2s``, ``b2s``), GELU leaves. ``w = F / 2**d``
  splits the dense neurons into ``2**d`` leaves (a fraction ``2**-d`` of them active per token);
  ``w = F`` gives every leaf all the neurons, which reproduces the dense layer exactly.
* ``{"kind": "fff_v2", "depth": D, "n_trees": K}``: :mod:`fffjax.v2` parameters (``w_in``, ``b_in``,
  ``w_out``) plus ``b_out (H,)``, the dense layer's output bias, which FFF-v2 has no place for
  (:func:`to_module` turns it into one extra tree of constant neurons). ``K (2**(D+1) - 1) <= F``:
  each node is one dense neuron; ``K (D + 1)`` neurons are active per token.
* ``{"kind": "dense", "width": F'}``: a narrower dense layer (:func:`prune_dense`, the baseline of
  equal active width), the dense layer's own keys.

:func:`spec_for_fraction` picks a spec for an active fraction, :func:`relative_error` measures a
stage, :func:`to_module` builds the :class:`fffjax.nn.FFF` or :class:`fffjax.nn.UltraFastFF`.
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fffjax import nn, tree, v1, v2
from fffjax._typing import Array, Float

DENSE_KEYS = ("w_in", "b_in", "w_out", "b_out")
KINDS = ("fff_v1", "fff_v2", "dense")
V2_KEYS = ("w_in", "b_in", "w_out", "b_out")
# A constant neuron's pre-activation in the output-bias tree of to_module: any positive value routes right.
BIAS_TREE_LOGIT = 1.0
_gelu = v2.gelu
# The leaf activation to_module gives FFF-v1: the exact GELU as fffjax.v2.gelu, the function
# fffjax.models.bert records as "gelu" and the cpu_ffi FFF-v1 kernel compiles.
EXACT_GELU = v2.gelu


# ----------------------------------------------------------------------------------------- arguments


def check_dense(dense: Mapping[str, Any]) -> tuple[int, int]:
    """``(H, F)`` of a dense layer dict, after checking its keys and shapes (errors name the key)."""
    if not isinstance(dense, Mapping):
        raise TypeError(f"dense must be a dict with keys {DENSE_KEYS}, got {type(dense).__name__}")
    missing = [k for k in DENSE_KEYS if k not in dense]
    if missing:
        raise ValueError(f"dense is missing keys {missing}; expected {list(DENSE_KEYS)}")
    w_in = dense["w_in"]
    if getattr(w_in, "ndim", None) != 2:
        raise ValueError(f"dense['w_in'] must have shape (H, F), got {tuple(getattr(w_in, 'shape', ()))}")
    h, f = w_in.shape
    for key, shape in (("b_in", (f,)), ("w_out", (f, h)), ("b_out", (h,))):
        tree.check_shape(f"dense[{key!r}]", dense[key], shape, f" (w_in is {(h, f)})")
    return h, f


def check_spec(spec: Mapping[str, Any], width: int) -> dict[str, Any]:
    """The spec as a plain dict after checking it against the dense ``width`` F (errors name the key)."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind not in KINDS:
        raise ValueError(f"spec['kind'] must be one of {KINDS}, got {spec!r}")
    if kind == "fff_v1":
        depth = tree.check_depth(spec.get("depth"), "spec['depth']")
        leaf_width = tree.check_count(spec.get("leaf_width"), "spec['leaf_width']", 1)
        if width % 2**depth:
            raise ValueError(f"spec['depth']={depth}: the dense width F={width} must be divisible by 2**depth = "
                             f"{2**depth} to split its neurons into equal leaves")
        if leaf_width not in (width // 2**depth, width):
            raise ValueError(f"spec['leaf_width'] must be F / 2**depth = {width // 2**depth} (one group of neurons "
                             f"per leaf) or F = {width} (every leaf holds all neurons), got {leaf_width}")
        return {"kind": kind, "depth": depth, "leaf_width": leaf_width}
    if kind == "fff_v2":
        depth = tree.check_depth(spec.get("depth"), "spec['depth']")
        n_trees = tree.check_n_trees(spec.get("n_trees"), "spec['n_trees']")
        nodes = n_trees * tree.v2_nodes_per_tree(depth)
        if nodes > width:
            raise ValueError(f"spec: n_trees * (2**(depth+1) - 1) = {nodes} nodes (n_trees={n_trees}, depth={depth}) "
                             f"must not exceed the dense width F={width}: each node is one dense neuron")
        return {"kind": kind, "depth": depth, "n_trees": n_trees}
    narrow = tree.check_count(spec.get("width"), "spec['width']", 1)
    if narrow > width:
        raise ValueError(f"spec['width'] must be <= the dense width F={width}, got {narrow}")
    return {"kind": kind, "width": narrow}


def _check_x(x, h: int, name: str = "x") -> Array:
    if x is None or getattr(x, "ndim", None) != 2 or x.shape[1] != h:
        raise ValueError(f"{name} must be an array of shape (N, {h}) (the layer's inputs), "
                         f"got {None if x is None else tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one row, got shape {tuple(x.shape)}")
    return jnp.asarray(x, jnp.float32)


def _width(dense) -> int:
    return check_dense(dense)[1]


def active_neurons(spec: Mapping[str, Any]) -> int:
    """Neurons (first-layer rows) computed per token: ``leaf_width``, ``K (D + 1)`` or ``width``."""
    kind = spec["kind"]
    if kind == "fff_v1":
        return spec["leaf_width"]
    if kind == "fff_v2":
        return spec["n_trees"] * (spec["depth"] + 1)
    return spec["width"]


def spec_for_fraction(kind: str, width: int, fraction: float) -> dict[str, Any]:
    """A spec whose active neurons per token are about ``fraction`` of the dense ``width`` F.

    ``fff_v1``: ``depth = round(log2(1 / fraction))``, ``leaf_width = F / 2**depth``. ``fff_v2``: the
    deepest trees whose ``K = floor(fraction F / (D + 1))`` trees still fit in F neurons (deeper trees
    route more finely and use more of the dense neurons). ``dense``: ``floor(fraction F)`` neurons.
    FFF-v2 and dense round down (at least one tree or neuron), so that a target stated as "at most
    this fraction active" holds.
    """
    tree.check_count(width, "width", 1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if kind == "fff_v1":
        depth = max(0, round(math.log2(1.0 / fraction)))
        while depth > 0 and width % 2**depth:
            depth -= 1
        return {"kind": kind, "depth": depth, "leaf_width": width // 2**depth}
    if kind == "fff_v2":
        best = {"kind": kind, "depth": 0, "n_trees": max(1, min(width, math.floor(fraction * width)))}
        for depth in range(1, 32):
            n_trees = max(1, math.floor(fraction * width / (depth + 1)))
            if n_trees * tree.v2_nodes_per_tree(depth) > width:
                break
            best = {"kind": kind, "depth": depth, "n_trees": n_trees}
        return best
    if kind == "dense":
        return {"kind": kind, "width": max(1, math.floor(fraction * width))}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ------------------------------------------------------------------------------------------- forwards


def dense_forward(dense: Mapping[str, Array], x: Float[Array, "n h"]) -> Float[Array, "n h"]:
    """``gelu(x @ w_in + b_in) @ w_out + b_out`` with the exact GELU."""
    return _gelu(x @ dense["w_in"] + dense["b_in"]) @ dense["w_out"] + dense["b_out"]


def apply(params: Mapping[str, Array], spec: Mapping[str, Any], x: Float[Array, "n h"]) -> Float[Array, "n h"]:
    """The converted layer's inference forward: FFF-v1's hard descent to one leaf, FFF-v2's hard paths
    plus ``b_out``, or the narrow dense layer."""
    kind = spec["kind"]
    if kind == "fff_v1":
        return v1.hard_forward(x, *(params[n] for n in v1.PARAM_NAMES), depth=spec["depth"], activation=_gelu)
    if kind == "fff_v2":
        y = v2.conditional_forward(x, params["w_in"], params["b_in"], params["w_out"], depth=spec["depth"],
                                   n_trees=spec["n_trees"])
        return y + params["b_out"]
    return dense_forward(params, x)


@functools.partial(jax.jit, static_argnames=("kind", "depth", "n_trees"))
def _apply_jit(params, x, kind, depth, n_trees):
    return apply(params, {"kind": kind, "depth": depth, "n_trees": n_trees}, x)


def _apply_chunked(params, spec, x, chunk: int = 8192) -> np.ndarray:
    key = (spec["kind"], spec.get("depth"), spec.get("n_trees"))
    return np.concatenate([np.asarray(_apply_jit(params, x[i:i + chunk], *key)) for i in range(0, x.shape[0], chunk)])


WEIGHTINGS = ("residual", "uniform")


def token_weights(x: Float[Array, "n h"], target: Float[Array, "n h"], weighting: str = "residual") -> Array:
    """``(N,)`` weights of the tokens in the fits, mean 1.

    ``"residual"``: ``1 / var(x + target)`` over the features, the variance the LayerNorm after a
    transformer's residual add divides by, so that each token's error counts as it does after that
    norm (in BERT a few tokens have feedforward outputs 20 times the others', which would otherwise
    dominate every fit). ``"uniform"``: all 1, the plain squared error.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "uniform":
        return jnp.ones((x.shape[0],), jnp.float32)
    w = 1.0 / jnp.maximum(jnp.var(x + target, axis=1), 1e-12)
    return w / jnp.mean(w)


def relative_error(
    dense: Mapping[str, Array], params: Mapping[str, Array], spec: Mapping[str, Any], x: Float[Array, "n h"]
) -> dict[str, float]:
    """How far the converted layer is from the dense one on inputs ``x``.

    Returns ``{"relative_error": ||y - y_dense|| / ||y_dense - mean(y_dense)||, "residual_error":
    sqrt(mean over tokens of ||y - y_dense||**2 / ||x + y_dense - its mean||**2), "cosine": mean over
    tokens of cos(y, y_dense)}``. The relative error is 0 for an exact conversion and 1 for a layer
    that outputs the dense layer's mean output; the residual error is the error relative to the
    residual sum a LayerNorm normalises next (see :func:`token_weights`).
    """
    h, width = check_dense(dense)
    spec = check_spec(spec, width)
    x = _check_x(x, h)
    target = _apply_chunked(dense, {"kind": "dense"}, x)
    y = _apply_chunked(params, spec, x)
    err = np.linalg.norm(y - target) / max(np.linalg.norm(target - target.mean(0)), 1e-30)
    residual = np.asarray(x) + target
    residual = np.sum((residual - residual.mean(1, keepdims=True)) ** 2, 1)
    residual_err = np.sqrt(np.mean(np.sum((y - target) ** 2, 1) / np.maximum(residual, 1e-30)))
    cos = np.sum(y * target, 1) / np.maximum(np.linalg.norm(y, axis=1) * np.linalg.norm(target, axis=1), 1e-30)
    return {"relative_error": float(err), "residual_error": float(residual_err), "cosine": float(np.mean(cos))}


# ------------------------------------------------------------------------------- (a) FFF-v1 from dense


def balanced_two_means(features: Float[np.ndarray, "n d"], iterations: int = 10) -> np.ndarray:
    """Split rows into two halves of equal size (the first gets the extra one when odd) by balanced
    2-means: start from the sign of the top principal direction, then move the half closest to the
    second centroid there, until the split stops changing. Returns a bool mask, True = second half."""
    n = features.shape[0]
    if n < 2:
        return np.zeros(n, bool)
    centered = features - features.mean(0)
    direction = np.linalg.svd(centered, full_matrices=False)[2][0]
    score = centered @ direction
    right = np.zeros(n, bool)
    for _ in range(iterations):
        new = np.zeros(n, bool)
        new[np.argsort(score, kind="stable")[n - n // 2:]] = True
        if np.array_equal(new, right):
            break
        right = new
        c0, c1 = features[~right].mean(0), features[right].mean(0)
        score = features @ (c1 - c0)
    return right


def neuron_tree(dense: Mapping[str, Array], depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recursive balanced 2-means of the dense neurons (the unit-normalised columns of ``w_in`` with
    ``b_in`` appended) into ``2**depth`` equal groups, in heap order.

    Each node's hyperplane is the difference of its children's mean neurons, ``w = mean(w_in[:, right])
    - mean(w_in[:, left])`` and likewise ``b``: a token goes right when the right group's mean
    pre-activation is the larger. Returns ``groups (2**depth, F / 2**depth)`` neuron indices per leaf,
    ``node_weights (2**depth - 1, H)`` and ``node_biases (2**depth - 1,)`` (float32).
    """
    w_in, b_in = np.asarray(dense["w_in"], np.float64), np.asarray(dense["b_in"], np.float64)
    h, width = w_in.shape
    features = np.concatenate([w_in.T, b_in[:, None]], axis=1)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n_nodes, n_leaves = tree.v1_sizes(depth)
    node_weights, node_biases = np.zeros((n_nodes, h)), np.zeros(n_nodes)
    members = [np.arange(width)]            # neuron sets of the current level's nodes, heap order
    for level in range(depth):
        children = []
        for position, neurons in enumerate(members):
            right = balanced_two_means(features[neurons])
            left_set, right_set = neurons[~right], neurons[right]
            node = tree.level_offset(level) + position
            node_weights[node] = w_in[:, right_set].mean(1) - w_in[:, left_set].mean(1)
            node_biases[node] = b_in[right_set].mean() - b_in[left_set].mean()
            children += [left_set, right_set]
        members = children
    groups = np.stack([np.sort(m) for m in members]) if n_leaves > 1 else np.arange(width)[None]
    return groups, node_weights.astype(np.float32), node_biases.astype(np.float32)


def _init_v1(dense, spec) -> dict[str, Array]:
    depth, leaf_width = spec["depth"], spec["leaf_width"]
    groups, node_weights, node_biases = neuron_tree(dense, depth)
    n_leaves = 2**depth
    if leaf_width != groups.shape[1]:                       # every leaf holds every neuron
        groups = np.broadcast_to(np.arange(leaf_width), (n_leaves, leaf_width))
    w_in, b_in, w_out = (np.asarray(dense[k], np.float32) for k in ("w_in", "b_in", "w_out"))
    return {
        "node_weights": jnp.asarray(node_weights), "node_biases": jnp.asarray(node_biases),
        "w1s": jnp.asarray(np.transpose(w_in[:, groups], (1, 0, 2))),
        "b1s": jnp.asarray(b_in[groups]),
        "w2s": jnp.asarray(w_out[groups]),
        "b2s": jnp.asarray(np.broadcast_to(np.asarray(dense["b_out"], np.float32), (n_leaves, w_out.shape[1]))),
    }


# ------------------------------------------------------------------------------- (a) FFF-v2 from dense


def _neuron_energy(dense, x) -> tuple[np.ndarray, np.ndarray]:
    """Pre-activations ``z (N, F)`` and output energies ``gelu(z)**2 ||w_out row||**2 (N, F)``."""
    z = np.asarray(x @ dense["w_in"] + dense["b_in"], np.float64)
    out_norm2 = np.sum(np.asarray(dense["w_out"], np.float64) ** 2, axis=1)
    return z, np.asarray(_gelu(jnp.asarray(z, jnp.float32)), np.float64) ** 2 * out_norm2


def v2_neuron_assignment(dense: Mapping[str, Array], spec: Mapping[str, Any], x: Float[Array, "n h"]) -> np.ndarray:
    """Which dense neuron each FFF-v2 node is: ``(K * N,)`` indices into F, no neuron twice.

    The ``K N`` neurons of largest output energy ``E[gelu(z)**2] ||w_out row||**2`` on ``x`` are kept
    and dealt to the K trees round-robin by energy. In a tree, each node takes the neuron of its pool
    with the largest energy on the tokens that reach it, times ``4 p (1 - p)`` with ``p`` the share of
    those tokens it sends right (a node that sends every token one way wastes a subtree). The rest of
    the pool is split in two halves by where each neuron's energy lies: the half with the larger share
    of its energy on the tokens the node sends right (``z > 0``) goes to the right subtree, since a
    neuron placed there is computed only for those tokens.
    """
    depth, n_trees = spec["depth"], spec["n_trees"]
    per_tree = tree.v2_nodes_per_tree(depth)
    z, energy = _neuron_energy(dense, x)
    kept = np.argsort(-energy.sum(0), kind="stable")[: n_trees * per_tree]
    assignment = np.zeros(n_trees * per_tree, np.int64)
    for t in range(n_trees):
        pool = kept[t::n_trees]
        stack = [(0, pool, np.ones(z.shape[0], bool))]
        while stack:
            node, pool, reach = stack.pop()
            e = energy[reach][:, pool]
            p = (z[reach][:, pool] > 0).mean(0) if reach.any() else np.full(len(pool), 0.5)
            chosen = int(np.argmax(e.sum(0) * 4 * p * (1 - p) + 1e-30 * np.arange(len(pool))[::-1]))
            neuron = pool[chosen]
            assignment[t * per_tree + node] = neuron
            rest = np.delete(pool, chosen)
            if len(rest) == 0:
                continue
            goes_right = z[:, neuron] > 0
            e_rest = energy[:, rest]
            right_share = (e_rest[reach & goes_right].sum(0) + 1e-30) / (e_rest[reach].sum(0) + 2e-30)
            order = np.argsort(-right_share, kind="stable")
            half = len(rest) // 2
            stack.append((tree.child(node, True), rest[order[:half]], reach & goes_right))
            stack.append((tree.child(node, False), rest[order[half:]], reach & ~goes_right))
    return assignment


def _init_v2(dense, spec, x) -> dict[str, Array]:
    assignment = v2_neuron_assignment(dense, spec, x)
    return {
        "w_in": jnp.asarray(np.asarray(dense["w_in"], np.float32).T[assignment]),
        "b_in": jnp.asarray(np.asarray(dense["b_in"], np.float32)[assignment]),
        "w_out": jnp.asarray(np.asarray(dense["w_out"], np.float32)[assignment]),
        "b_out": jnp.asarray(dense["b_out"], jnp.float32),
    }


def prune_dense(dense: Mapping[str, Array], width: int, x: Float[Array, "n h"] | None = None) -> dict[str, Array]:
    """The dense layer cut to its ``width`` neurons of largest output energy on ``x`` (by weight norms
    ``||w_in col|| ||w_out row||`` without ``x``): the dense student of equal active width."""
    h, full = check_dense(dense)
    check_spec({"kind": "dense", "width": width}, full)
    if x is None:
        w_in, w_out = np.asarray(dense["w_in"]), np.asarray(dense["w_out"])
        importance = np.linalg.norm(w_in, axis=0) * np.linalg.norm(w_out, axis=1)
    else:
        importance = _neuron_energy(dense, _check_x(x, h))[1].sum(0)
    kept = np.sort(np.argsort(-importance, kind="stable")[:width])
    return {"w_in": jnp.asarray(dense["w_in"])[:, kept], "b_in": jnp.asarray(dense["b_in"])[kept],
            "w_out": jnp.asarray(dense["w_out"])[kept], "b_out": jnp.asarray(dense["b_out"])}


def init_from_dense(
    dense: Mapping[str, Array],
    spec: Mapping[str, Any],
    x: Float[Array, "n h"] | None = None,
    *,
    seed: int = 0,
    sample: int = 4096,
) -> dict[str, Array]:
    """Stage (a): the FFF's parameters taken from the dense layer, no training.

    FFF-v1: :func:`neuron_tree` splits the neurons into the leaves and gives the node hyperplanes;
    leaf ``l`` is ``gelu(x @ w_in[:, g_l] + b_in[g_l]) @ w_out[g_l] + b_out`` for its group ``g_l``
    (every leaf repeats ``b_out``), so with ``leaf_width = F`` every leaf is the dense layer. ``x`` is
    not used. FFF-v2: :func:`v2_neuron_assignment` on up to ``sample`` rows of ``x`` (standard normal
    vectors drawn with ``seed`` without ``x``). No FFF-v2 init is exact: a token computes ``K (D + 1)``
    of the neurons, while the dense output needs every neuron that is not switched off for it. The
    dense kind is :func:`prune_dense` on up to ``sample`` rows of ``x``.
    """
    h, width = check_dense(dense)
    spec = check_spec(spec, width)
    if spec["kind"] == "fff_v1":
        return _init_v1(dense, spec)
    if spec["kind"] == "dense" and x is None:
        return prune_dense(dense, spec["width"])
    if x is None:
        x = jax.random.normal(jax.random.key(seed), (sample, h), jnp.float32)
    x = _check_x(x, h)
    if x.shape[0] > sample:
        x = x[np.random.default_rng(seed).choice(x.shape[0], sample, replace=False)]
    if spec["kind"] == "fff_v2":
        return _init_v2(dense, spec, x)
    return prune_dense(dense, spec["width"], x)


# ------------------------------------------------------------------------------------ (b) fit routers


def _adam(learning_rate) -> optax.GradientTransformation:
    from fffjax.train.optim import with_standard_promotion  # local: keeps fffjax.convert's import light

    return with_standard_promotion(optax.adam(learning_rate))


@functools.partial(jax.jit, static_argnames=("activation",))
def _leaf_errors_chunk(params, x, target, activation):
    leaves = v1.leaf_outputs(x, params["w1s"], params["b1s"], params["w2s"], params["b2s"], activation=activation)
    return jnp.sum((leaves - target[:, None, :]) ** 2, axis=-1)


def leaf_errors(params: Mapping[str, Array], x: Float[Array, "n h"], target: Float[Array, "n h"],
                chunk: int = 2048) -> np.ndarray:
    """``(N, 2**depth)`` squared error of every FFF-v1 leaf against ``target`` for every row of ``x``."""
    return np.concatenate([np.asarray(_leaf_errors_chunk(params, x[i:i + chunk], target[i:i + chunk], _gelu))
                           for i in range(0, x.shape[0], chunk)])


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_level(w0, b0, xs, node, label, weight, learning_rate, l2, steps):
    """Weighted logistic regression of one level's hyperplanes (each token against its own node's)."""
    opt = _adam(learning_rate)

    def loss_fn(p):
        w, b = p
        z = jnp.sum(xs * w[node], axis=1) + b[node]
        bce = optax.sigmoid_binary_cross_entropy(z, label)
        return jnp.sum(weight * bce) + l2 * jnp.sum(w**2)

    def step(carry, _):
        p, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (p, _), losses = jax.lax.scan(step, ((w0, b0), opt.init((w0, b0))), None, length=steps)
    return p[0], p[1], losses


def fit_routers(
    dense: Mapping[str, Array],
    params: Mapping[str, Array],
    spec: Mapping[str, Any],
    x: Float[Array, "n h"],
    *,
    steps: int = 100,
    learning_rate: float = 0.05,
    l2: float = 1e-4,
    balance: bool = False,
    refit: bool = True,
    ridge: float = 1e-3,
    weighting: str = "residual",
) -> dict[str, Array]:
    """Stage (b): the routing fitted to the layer's inputs ``x``; returns new parameters.

    FFF-v1: the node hyperplanes are refitted level by level, root first, the leaves kept. A token
    that reaches a node (through the levels fitted above) is labelled with the child whose subtree
    holds the leaf of smallest error against the dense output for it, and weighted by how much the
    choice matters (the difference of the two subtrees' smallest errors); each level's hyperplanes are
    a weighted logistic regression (``steps`` full-batch Adam steps from the current hyperplanes, on
    standardised inputs, ``l2`` penalty). ``balance`` gives each node's two labels equal total weight.
    Then, with ``refit`` (the default), :func:`refit_outputs` fits each leaf's output layer to the
    tokens it now receives: a leaf of ``F / 2**d`` dense neurons keeps their ``w_out`` rows from
    stage (a), made for a sum over all F neurons, so routing alone recovers little of the output.
    Errors are weighted per token by :func:`token_weights` (``weighting``).

    FFF-v2 and dense: a node's router is its own neuron, so moving it changes the output; stage (b) is
    then :func:`refit_outputs` (least squares of the output rows and ``b_out`` given the routing).
    """
    h, width = check_dense(dense)
    spec = check_spec(spec, width)
    tree.check_count(steps, "steps", 0)
    x = _check_x(x, h)
    if spec["kind"] != "fff_v1":
        return refit_outputs(dense, params, spec, x, ridge=ridge, weighting=weighting)
    depth = spec["depth"]
    target = jnp.asarray(_apply_chunked(dense, {"kind": "dense"}, x))
    errors = leaf_errors(params, x, target) * np.asarray(token_weights(x, target, weighting))[:, None]
    n = x.shape[0]
    mu, sigma = jnp.mean(x, 0), jnp.std(x, 0) + 1e-6
    xs = (x - mu) / sigma
    node_weights, node_biases = np.array(params["node_weights"]), np.array(params["node_biases"])
    position = np.zeros(n, np.int64)
    rows = np.arange(n)
    for level in range(depth):
        lo, count = tree.level_offset(level), 2**level
        subtree_best = errors.reshape(n, 2 * count, -1).min(-1)
        left, right = subtree_best[rows, 2 * position], subtree_best[rows, 2 * position + 1]
        label = (right < left).astype(np.float32)
        weight = np.abs(left - right).astype(np.float64)
        if balance:
            for node in range(count):
                for side in (0.0, 1.0):
                    sel = (position == node) & (label == side)
                    total = weight[sel].sum()
                    if total > 0:
                        weight[sel] /= total
        if weight.sum() > 0:
            weight = (weight / weight.sum()).astype(np.float32)
            w = jnp.asarray(node_weights[lo:lo + count]) * sigma
            b = jnp.asarray(node_biases[lo:lo + count]) + jnp.asarray(node_weights[lo:lo + count]) @ mu
            w, b, _ = _fit_level(w, b, xs, jnp.asarray(position), jnp.asarray(label), jnp.asarray(weight),
                                 learning_rate, l2, steps)
            node_weights[lo:lo + count] = np.asarray(w / sigma)
            node_biases[lo:lo + count] = np.asarray(b - (w / sigma) @ mu)
        z = np.sum(np.asarray(x) * node_weights[lo + position], 1) + node_biases[lo + position]
        position = 2 * position + (z >= 0)
    routed = {**params, "node_weights": jnp.asarray(node_weights), "node_biases": jnp.asarray(node_biases)}
    return refit_outputs(dense, routed, spec, x, ridge=ridge, weighting=weighting) if refit else routed


@functools.partial(jax.jit, static_argnames=("kind", "depth", "n_trees"))
def _normal_equations_chunk(params, x, target, weight, kind, depth, n_trees):
    """``A^T A`` and ``A^T y`` of the output layer's least squares on a chunk: per leaf for FFF-v1 (the
    leaf's hidden units with a 1 appended, zero for tokens routed elsewhere), over all nodes for FFF-v2
    (the visited nodes' GELUs, with a 1), over the neurons for dense (with a 1)."""
    if kind == "fff_v1":
        leaf = v1.hard_leaves(x, params["node_weights"], params["node_biases"], depth)
        hidden = _gelu(jnp.einsum("bi,liw->blw", x, params["w1s"]) + params["b1s"])
        hidden = jnp.concatenate([hidden, jnp.ones(hidden.shape[:2] + (1,), hidden.dtype)], axis=2)
        hidden = hidden * jax.nn.one_hot(leaf, params["w1s"].shape[0], dtype=hidden.dtype)[:, :, None]
        weighted = hidden * weight[:, None, None]
        return jnp.einsum("blw,blv->lwv", weighted, hidden), jnp.einsum("blw,bo->lwo", weighted, target)
    if kind == "fff_v2":
        z = x @ params["w_in"].T + params["b_in"]
        path = v2.path_from_logits(z, depth=depth, n_trees=n_trees).reshape(z.shape[0], -1)
        mask = jnp.zeros(z.shape, bool).at[jnp.arange(z.shape[0])[:, None], path].set(True)
        a = jnp.where(mask, _gelu(z), 0.0)
    else:
        a = _gelu(x @ params["w_in"] + params["b_in"])
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    weighted = a * weight[:, None]
    return (weighted.T @ a)[None], (weighted.T @ target)[None]


def refit_outputs(
    dense: Mapping[str, Array],
    params: Mapping[str, Array],
    spec: Mapping[str, Any],
    x: Float[Array, "n h"],
    *,
    ridge: float = 1e-3,
    weighting: str = "residual",
    chunk: int = 2048,
) -> dict[str, Array]:
    """The output rows refitted by least squares to the dense layer's output on ``x``, the routing and
    first layers kept: each FFF-v1 leaf's ``w2s``, ``b2s`` on the tokens it receives; FFF-v2's
    ``w_out`` and ``b_out`` given each token's paths; the narrow dense layer's ``w_out``, ``b_out``.

    The solve is ridge-regularised towards the current values (``ridge`` times the mean diagonal of
    ``A^T A``), so rows no token reaches keep them; tokens are weighted by :func:`token_weights`.
    Returns new parameters.
    """
    h, width = check_dense(dense)
    spec = check_spec(spec, width)
    x = _check_x(x, h)
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge!r}")
    target = jnp.asarray(_apply_chunked(dense, {"kind": "dense"}, x))
    weight = token_weights(x, target, weighting)
    key = (spec["kind"], spec.get("depth"), spec.get("n_trees"))
    gram, rhs = None, None
    for i in range(0, x.shape[0], chunk):
        g, r = _normal_equations_chunk(params, x[i:i + chunk], target[i:i + chunk], weight[i:i + chunk], *key)
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
    gram, rhs = np.asarray(gram, np.float64), np.asarray(rhs, np.float64)
    if spec["kind"] == "fff_v1":
        current = np.concatenate([np.asarray(params["w2s"]), np.asarray(params["b2s"])[:, None]], axis=1)
    else:
        current = np.concatenate([np.asarray(params["w_out"]), np.asarray(params["b_out"])[None]], axis=0)[None]
    dim = gram.shape[1]
    solved = np.empty_like(current, dtype=np.float64)
    for leaf in range(gram.shape[0]):
        lam = ridge * max(np.trace(gram[leaf]) / dim, 1e-12)
        solved[leaf] = np.linalg.solve(gram[leaf] + lam * np.eye(dim), rhs[leaf] + lam * current[leaf])
    solved = solved.astype(np.float32)
    if spec["kind"] == "fff_v1":
        return {**params, "w2s": jnp.asarray(solved[:, :-1]), "b2s": jnp.asarray(solved[:, -1])}
    return {**params, "w_out": jnp.asarray(solved[0, :-1]), "b_out": jnp.asarray(solved[0, -1])}


# ------------------------------------------------------------------------------ (c) layer distillation


def _v1_straight_through(params, x, depth):
    """FFF-v1 whose forward is the hard descent (one leaf) and whose backward is the soft mixture's:
    the leaves get the hard path's gradient, the routers the soft mixture's."""
    z = v1.node_logits(x, params["node_weights"], params["node_biases"])
    soft = v1.leaf_mixture(v1.level_modifiers(jax.nn.sigmoid(z), depth), x.shape[0], x.dtype)
    hard = v1.leaf_mixture(v1.level_modifiers((z >= 0).astype(x.dtype), depth), x.shape[0], x.dtype)
    mixture = hard + soft - jax.lax.stop_gradient(soft)
    leaves = v1.leaf_outputs(x, params["w1s"], params["b1s"], params["w2s"], params["b2s"], activation=_gelu)
    return jnp.sum(leaves * mixture[:, :, None], axis=1)


def _training_forward(params, x, kind, depth, n_trees):
    if kind == "fff_v1":
        return _v1_straight_through(params, x, depth)
    if kind == "fff_v2":
        return v2.masked_forward(x, params["w_in"], params["b_in"], params["w_out"], depth=depth,
                                 n_trees=n_trees) + params["b_out"]
    return dense_forward(params, x)


@functools.partial(jax.jit, static_argnames=("optimizer", "kind", "depth", "n_trees", "batch_size", "steps"))
def _distill_chunk(params, opt_state, key, x, target, weight, scale, optimizer, kind, depth, n_trees, batch_size,
                   steps):
    def loss_fn(p, xb, tb, wb):
        y = _training_forward(p, xb, kind, depth, n_trees)
        return jnp.mean(wb * jnp.sum((y - tb) ** 2, axis=1)) / scale

    def step(carry, step_key):
        p, state = carry
        idx = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], target[idx], weight[idx])
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, losses


def distill_layer(
    dense: Mapping[str, Array],
    params: Mapping[str, Array],
    spec: Mapping[str, Any],
    x: Float[Array, "n h"],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float = 3e-3,
    seed: int = 0,
    log_every: int = 100,
    callback: Callable[[int, float], None] | None = None,
    weighting: str = "residual",
) -> tuple[dict[str, Array], np.ndarray]:
    """Stage (c): layer-wise distillation, every parameter trained with Adam (warm-up, cosine decay)
    to regress the dense layer's output on batches of ``x`` drawn with ``seed``.

    The loss is the squared error over the variance of the dense output, both weighted per token by
    :func:`token_weights` (with ``weighting="uniform"``, the square of :func:`relative_error`'s error).
    FFF-v1 trains the path inference takes: the forward descends hard to one leaf, the backward is
    the soft mixture's (straight-through), so the leaves learn exactly the hard layer and the routers
    get the soft gradient; there is no soft-to-hard gap to close by hardening. FFF-v2 trains its hard
    paths (UltraFastBERT's own training; the routing gets no gradient) plus ``b_out``; the dense kind
    trains as it is.

    Returns the trained parameters and the ``(steps,)`` loss curve. ``callback(step, loss)`` is called
    every ``log_every`` steps with the mean loss of those steps (the steps between calls run in one
    jitted scan).
    """
    h, width = check_dense(dense)
    spec = check_spec(spec, width)
    tree.check_count(steps, "steps", 1)
    tree.check_count(batch_size, "batch_size", 1)
    tree.check_count(log_every, "log_every", 1)
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    x = _check_x(x, h)
    target = jnp.asarray(_apply_chunked(dense, {"kind": "dense"}, x))
    weight = token_weights(x, target, weighting)
    scale = jnp.maximum(jnp.mean(weight * jnp.sum((target - jnp.mean(target, 0)) ** 2, axis=1)), 1e-30)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, min(100, steps // 10)), steps,
                                                  learning_rate * 0.01)
    optimizer = _adam(schedule)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    opt_state = optimizer.init(params)
    key = jax.random.key(seed)
    statics = dict(optimizer=optimizer, kind=spec["kind"], depth=spec.get("depth"), n_trees=spec.get("n_trees"),
                   batch_size=batch_size)
    curve = []
    done = 0
    while done < steps:
        todo = min(log_every, steps - done)
        key, chunk_key = jax.random.split(key)
        params, opt_state, losses = _distill_chunk(params, opt_state, chunk_key, x, target, weight, scale, steps=todo,
                                                   **statics)
        curve.append(np.asarray(losses))
        done += todo
        if callback is not None:
            callback(done, float(np.mean(curve[-1])))
    return params, np.concatenate(curve)


# ------------------------------------------------------------------------------------------- modules


def to_module(
    params: Mapping[str, Array],
    spec: Mapping[str, Any],
    *,
    activation: Callable = EXACT_GELU,
    output_bias: str = "tree",
    implementation: str | None = None,
) -> nn.FFF | nn.UltraFastFF:
    """The converted layer as an NNX module, in eval mode, for a ``layer.ffn`` slot.

    FFF-v1: an :class:`fffjax.nn.FFF` with leaf ``activation`` (the exact GELU). FFF-v2: an
    :class:`fffjax.nn.UltraFastFF`, which has no output bias: ``output_bias="tree"`` appends one tree
    whose neurons are constant (``w_in = 0``, ``b_in > 0``, so every token goes right and each of the
    ``depth + 1`` neurons on its path adds ``b_out / (depth + 1)``), exactly ``b_out`` at the cost of
    ``depth + 1`` more neurons per token (``n_trees`` of the module is then K + 1); ``"drop"`` leaves
    it out. The dense kind has no module here (its parameters are a ``DenseFfn``'s).
    """
    from fffjax.convert.layers import import_fastfeedforward, import_ultrafast_ff

    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind == "fff_v1":
        depth = tree.check_depth(spec.get("depth"), "spec['depth']")
        state = {"depth": np.array(depth, np.int64), **{k: np.asarray(params[k]) for k in v1.PARAM_NAMES}}
        module = import_fastfeedforward(state, activation=activation, implementation=implementation)
    elif kind == "fff_v2":
        depth = tree.check_depth(spec.get("depth"), "spec['depth']")
        n_trees = tree.check_n_trees(spec.get("n_trees"), "spec['n_trees']")
        if output_bias not in ("tree", "drop"):
            raise ValueError(f"output_bias must be 'tree' or 'drop', got {output_bias!r}")
        w_in, b_in, w_out = (np.asarray(params[k], np.float32) for k in ("w_in", "b_in", "w_out"))
        if output_bias == "tree":
            per_tree = tree.v2_nodes_per_tree(depth)
            const = float(np.asarray(_gelu(jnp.float32(BIAS_TREE_LOGIT))))
            row = np.asarray(params["b_out"], np.float32) / np.float32((depth + 1) * const)
            w_in = np.concatenate([w_in, np.zeros((per_tree, w_in.shape[1]), np.float32)])
            b_in = np.concatenate([b_in, np.full(per_tree, BIAS_TREE_LOGIT, np.float32)])
            w_out = np.concatenate([w_out, np.broadcast_to(row, (per_tree, w_out.shape[1]))])
            n_trees += 1
        state = {"linear_in.weight": w_in, "linear_in.bias": b_in, "linear_out.weight": w_out.T}
        module = import_ultrafast_ff(state, depth=depth, n_trees=n_trees, implementation=implementation)
    else:
        raise ValueError(f"spec['kind'] must be 'fff_v1' or 'fff_v2' for a module, got {spec!r}")
    module.eval()
    return module
