"""FFF-v1 local optimizers: ``fastfeedforward.optim.LocalSGD`` / ``LocalAdam`` as optax transformations.

The package trains each tree row (a node, or a leaf with all its tensors) on its own "local
batch": a row is updated only once the samples that reached it (the FFF module's usage counters,
:attr:`fffjax.nn.FFF.node_usage` / ``leaf_usage``) reach ``local_batch_size``; until then its
gradient keeps accumulating. An updated row's accumulated gradient is scaled by
``local_batch_size / usage``, Adam's step count is per row, and afterwards the row's gradient
sum and usage are reset.

Usage counts are passed to ``update`` as optax extra arguments: ``usage`` is a pytree with the
structure of the gradients whose leaves are either a ``(rows,)`` count vector (``rows`` = the
parameter's first dimension) or ``None`` for parameters outside any tree (updated every step,
as plain SGD / Adam). :func:`fff_usage` builds it for an NNX model, :func:`v1_usage` for the
parameter dict of :mod:`fffjax.v1`; :func:`reset_usage` returns the counts after a step. One
step, stateful NNX style::

    tx = local_adam(1e-3, local_batch_size=64)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model, x, y)          # the forward adds to the usage counters
    optimizer.update(model, grads, usage=fff_usage(model))
    reset_fff_usage(model, local_batch_size=64)

``legacy=True`` reproduces fastfeedforward 0.2.1 exactly, two quirks included (the default
corrects them):

- ``LocalAdam`` decays the first moment of *skipped* rows by ``b1`` (an in-place ``mul_`` inside
  a ``torch.where``).
- ``LocalSGD`` with momentum applies the *previous* step's momentum buffer (the new buffer is
  made by ``torch.where`` but the old one is used), and its first step initialises the buffer of
  every row, skipped ones included (a row with zero usage then holds ``inf``/``nan``, which
  stays there with ``nesterov=True``).

Without ``legacy`` every row behaves as ``torch.optim.SGD`` / ``torch.optim.Adam`` run on the
sequence of that row's scaled local-batch gradients.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fffjax._typing import Array, Float
from fffjax.nn import FFF

_NODE_PARAMS = ("node_weights", "node_biases")
_LEAF_PARAMS = ("w1s", "b1s", "w2s", "b2s")


# --------------------------------------------------------------------------- usage pytrees


def reset_usage(usage: Float[Array, " rows"], local_batch_size: int) -> Float[Array, " rows"]:
    """The counts after a step: rows that were updated (``usage >= local_batch_size``) restart at 0."""
    _check_local_batch_size(local_batch_size)
    return jnp.where(usage >= local_batch_size, jnp.zeros_like(usage), usage)


def v1_usage(
    params: dict[str, Array], node_usage: Float[Array, " nodes"], leaf_usage: Float[Array, " leaves"]
) -> dict[str, Array | None]:
    """The ``usage`` pytree for a :mod:`fffjax.v1` parameter dict: node rows count ``node_usage``,
    leaf rows ``leaf_usage``; other keys get ``None``."""
    return {
        name: node_usage if name in _NODE_PARAMS else leaf_usage if name in _LEAF_PARAMS else None
        for name in params
    }


def _fff_modules(model: nnx.Module) -> dict[tuple, Any]:
    """Graph path -> FFF module, for every FFF in ``model`` that counts usage."""
    return {
        tuple(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, FFF) and node.usage_mode != "none"
    }


def _key_name(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def fff_usage(model: nnx.Module, wrt=nnx.Param) -> Any:
    """The ``usage`` pytree for ``nnx.state(model, wrt)``: the usage counters of every FFF
    (``usage_mode`` "soft" or "hard") for its node and leaf parameters, ``None`` elsewhere.

    Its structure is that of the gradients ``nnx.Optimizer(model, tx, wrt=wrt)`` passes to
    ``tx.update``.
    """
    fffs = _fff_modules(model)

    def usage_of(path, _):
        keys = tuple(_key_name(k) for k in path)
        module = fffs.get(keys[:-1])
        if module is None:
            return None
        if keys[-1] in _NODE_PARAMS:
            return module.node_usage[...]
        if keys[-1] in _LEAF_PARAMS:
            return module.leaf_usage[...]
        return None

    return jax.tree_util.tree_map_with_path(usage_of, nnx.as_pure(nnx.state(model, wrt)))


def reset_fff_usage(model: nnx.Module, local_batch_size: int) -> None:
    """Reset, in place, the counters of the rows every FFF in ``model`` just updated (see :func:`reset_usage`)."""
    for module in _fff_modules(model).values():
        module.node_usage[...] = reset_usage(module.node_usage[...], local_batch_size)
        module.leaf_usage[...] = reset_usage(module.leaf_usage[...], local_batch_size)


# --------------------------------------------------------------------------- shared row logic


def _check_local_batch_size(local_batch_size) -> None:
    if not isinstance(local_batch_size, int) or isinstance(local_batch_size, bool) or local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be a positive int, got {local_batch_size!r}")


def _rows(param: Array) -> int:
    return param.shape[0] if param.ndim else 1


def _expand(row_values: Array, like: Array) -> Array:
    """``(rows,)`` -> broadcastable against ``like`` (``(rows, 1, ...)``; a scalar stays a scalar)."""
    if like.ndim == 0:
        return row_values.reshape(())
    return row_values.reshape(row_values.shape + (1,) * (like.ndim - 1))


def _row_masks(usage, grad_sum: Array, local_batch_size: int, path) -> tuple[Array, Array]:
    """Which rows update, as ``(rows,)`` bools, and the matching ``(rows,)`` usage (ones where absent)."""
    rows = _rows(grad_sum)
    if usage is None:
        return jnp.ones((rows,), bool), jnp.full((rows,), float(local_batch_size), jnp.float32)
    usage = jnp.asarray(usage)
    if usage.shape != (rows,):
        raise ValueError(
            f"usage{jax.tree_util.keystr(path)} must have shape ({rows},) (the parameter's rows), "
            f"got {tuple(usage.shape)}")
    return usage >= local_batch_size, usage.astype(jnp.float32)


def _map_rows(fn, grads, usage, *trees):
    """``fn(path, grad, usage_or_None, *leaves)`` over the gradient leaves; ``usage=None`` means none anywhere."""
    if usage is None:
        usage = jax.tree.map(lambda _: None, grads)
    try:
        return jax.tree_util.tree_map_with_path(
            lambda path, u, g, *rest: fn(path, g, u, *rest), usage, grads, *trees,
            is_leaf=lambda u: u is None)
    except ValueError as error:
        if "usage" in str(error):
            raise
        raise ValueError(
            f"usage must have the structure of the gradients (a leaf or None per parameter): {error}") from error


def _unzip(tree_of_tuples, n: int, like) -> tuple:
    """A tree of ``n``-tuples (shaped as ``like``) -> ``n`` trees."""
    return jax.tree.transpose(jax.tree.structure(like), jax.tree.structure((0,) * n), tree_of_tuples)


# --------------------------------------------------------------------------- LocalAdam


class LocalAdamState(NamedTuple):
    """State of :func:`local_adam`; every field has the structure of the parameters.

    Attributes:
        grad_sum: gradients accumulated since each row's last update (the package's ``p.grad``).
        count: ``(rows,)`` per-row step counts (the package's per-row ``step``).
        mu, nu: first and second moments.
        nu_max: running maximum of ``nu`` (``amsgrad``; zeros otherwise).
    """

    grad_sum: Any
    count: Any
    mu: Any
    nu: Any
    nu_max: Any


def local_adam(
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    local_batch_size: int,
    legacy: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``fastfeedforward.optim.LocalAdam`` as an optax transformation (returns the updates to add).

    ``update(grads, state, params, *, usage=None)``: ``usage`` as in the module docstring; rows
    with ``usage < local_batch_size`` are left unchanged and keep accumulating their gradient;
    the others take an Adam step on ``grad_sum * local_batch_size / usage`` with their own step
    count. ``weight_decay`` is the package's (and ``torch.optim.Adam``'s) L2 term added to the
    gradient, so ``params`` is needed when it is non-zero.

    Args:
        learning_rate, b1, b2, eps, weight_decay, amsgrad: as ``torch.optim.Adam``.
        local_batch_size: samples a row must see before it is updated (> 0).
        legacy: reproduce 0.2.1 exactly, including its decay of skipped rows' first moment.
    """
    _check_local_batch_size(local_batch_size)
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
        raise ValueError(f"b1 and b2 must be in [0, 1), got {b1!r}, {b2!r}")
    if learning_rate < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(
            f"learning_rate, eps and weight_decay must be >= 0, got {learning_rate!r}, {eps!r}, {weight_decay!r}")

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return LocalAdamState(
            grad_sum=jax.tree.map(zeros, params),
            count=jax.tree.map(lambda p: jnp.zeros((_rows(p),), jnp.float32), params),
            mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params),
            nu_max=jax.tree.map(zeros, params))

    def update_fn(grads, state, params=None, *, usage=None, **_):
        if weight_decay != 0 and params is None:
            raise ValueError("local_adam with weight_decay needs params")
        params_or_grads = grads if params is None else params

        def row_step(path, grad, u, grad_sum, count, mu, nu, nu_max, param):
            grad_sum = grad_sum + grad
            update_rows, u = _row_masks(u, grad_sum, local_batch_size, path)
            upd = _expand(update_rows, grad)
            # The package divides by usage / local_batch_size (1 for skipped rows).
            g = grad_sum / _expand(jnp.where(update_rows, u / local_batch_size, 1.0), grad).astype(grad.dtype)
            if weight_decay != 0:
                g = g + weight_decay * param
            count = jnp.where(update_rows, count + 1, count)
            mu_step = b1 * mu + (1 - b1) * g
            mu = jnp.where(upd, mu_step, b1 * mu if legacy else mu)
            nu = jnp.where(upd, b2 * nu + (1 - b2) * g * g, nu)
            nu_max = jnp.where(upd, jnp.maximum(nu_max, nu), nu_max) if amsgrad else nu_max
            bc1 = jnp.where(update_rows, 1 - b1**count, 1.0)
            bc2 = jnp.where(update_rows, 1 - b2**count, 1.0)
            second = nu_max if amsgrad else nu
            denom = jnp.sqrt(second) / _expand(jnp.sqrt(bc2), grad).astype(grad.dtype) + eps
            step = -(learning_rate / _expand(bc1, grad)).astype(grad.dtype) * mu / denom
            update = jnp.where(upd, step, jnp.zeros_like(step))
            grad_sum = jnp.where(upd, jnp.zeros_like(grad_sum), grad_sum)
            return update, grad_sum, count, mu, nu, nu_max

        out = _map_rows(row_step, grads, usage, state.grad_sum, state.count, state.mu, state.nu,
                        state.nu_max, params_or_grads)
        updates, *fields = _unzip(out, 6, grads)
        return updates, LocalAdamState(*fields)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- LocalSGD


class LocalSGDState(NamedTuple):
    """State of :func:`local_sgd`; every field has the structure of the parameters.

    Attributes:
        grad_sum: gradients accumulated since each row's last update.
        count: ``(rows,)`` per-row update counts (a row's momentum buffer starts at its first update).
        momentum: the momentum buffers.
        started: ``()`` 0/1, whether a step was taken (0.2.1 initialises all buffers at its first step).
    """

    grad_sum: Any
    count: Any
    momentum: Any
    started: Any


def local_sgd(
    learning_rate: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    local_batch_size: int,
    legacy: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``fastfeedforward.optim.LocalSGD`` as an optax transformation (returns the updates to add).

    ``update(grads, state, params, *, usage=None)`` as :func:`local_adam`: updated rows step on
    ``grad_sum * local_batch_size / usage`` with ``torch.optim.SGD``'s momentum, dampening,
    Nesterov and L2 ``weight_decay``.

    Args:
        learning_rate, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        local_batch_size: samples a row must see before it is updated (> 0).
        legacy: reproduce 0.2.1 exactly, including its one-step-late momentum buffer.
    """
    _check_local_batch_size(local_batch_size)
    if learning_rate < 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(
            f"learning_rate, momentum and weight_decay must be >= 0, got {learning_rate!r}, {momentum!r}, "
            f"{weight_decay!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening == 0")

    def init_fn(params):
        return LocalSGDState(
            grad_sum=jax.tree.map(jnp.zeros_like, params),
            count=jax.tree.map(lambda p: jnp.zeros((_rows(p),), jnp.float32), params),
            momentum=jax.tree.map(jnp.zeros_like, params),
            started=jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params=None, *, usage=None, **_):
        if weight_decay != 0 and params is None:
            raise ValueError("local_sgd with weight_decay needs params")
        params_or_grads = grads if params is None else params
        first_step = state.started == 0

        def row_step(path, grad, u, grad_sum, count, buf, param):
            grad_sum = grad_sum + grad
            update_rows, u = _row_masks(u, grad_sum, local_batch_size, path)
            upd = _expand(update_rows, grad)
            scale = local_batch_size / u
            if not legacy:  # 0.2.1 scales every row, dividing by zero usage
                scale = jnp.where(update_rows, scale, 0.0)
            d = grad_sum * _expand(scale, grad).astype(grad.dtype)
            if weight_decay != 0:
                d = d + weight_decay * param
            if momentum == 0:
                direction = d
            elif legacy:
                # First step: buf = d for all rows (the in-place zeroing of skipped rows reaches the
                # stored buffer only without Nesterov); later: the old buffer drives the step.
                stepped = jnp.where(upd, momentum * buf + (1 - dampening) * d, buf)
                first_buf = d if nesterov else jnp.where(upd, d, jnp.zeros_like(d))
                used_buf = jnp.where(first_step, d, buf)
                buf = jnp.where(first_step, first_buf, stepped)
                direction = d + momentum * used_buf if nesterov else used_buf
            else:
                fresh = _expand(count == 0, grad)
                new_buf = jnp.where(fresh, d, momentum * buf + (1 - dampening) * d)
                buf = jnp.where(upd, new_buf, buf)
                direction = d + momentum * buf if nesterov else buf
            count = jnp.where(update_rows, count + 1, count)
            update = jnp.where(upd, -learning_rate * direction, jnp.zeros_like(direction))
            grad_sum = jnp.where(upd, jnp.zeros_like(grad_sum), grad_sum)
            return update, grad_sum, count, buf

        out = _map_rows(row_step, grads, usage, state.grad_sum, state.count, state.momentum,
                        params_or_grads)
        updates, grad_sum, count, buf = _unzip(out, 4, grads)
        return updates, LocalSGDState(grad_sum, count, buf, jnp.ones((), jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
