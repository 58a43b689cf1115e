"""FFF layers to and from PyTorch state dicts.

* FFF-v1 <-> ``fastfeedforward==0.2.1``'s ``FFF`` (keys, order, shapes and dtypes of its
  ``state_dict()``)::

      depth ()  int64              node_weights (n_nodes, in)    node_biases (n_nodes, 1)
      w1s (n_leaves, in, width)    b1s (n_leaves, width)
      w2s (n_leaves, width, out)   b2s (n_leaves, out)
      node_usage (n_nodes,)        leaf_usage (n_leaves,)        only with usage tracking

* FFF-v2 <-> UltraFastBERT's ``fff.FFF``: ``linear_in.weight (K*N, H)`` (= ``w_in``),
  ``linear_in.bias (K*N,)`` (= ``b_in``), ``linear_out.weight (H_out, K*N)`` (= ``w_out.T``).

Exports are numpy float32 (the packages' dtype) plus the int64 ``depth``; imports take numpy
arrays, jax arrays or torch tensors. A missing or unexpected key, or a shape that does not fit,
raises ``ValueError`` naming the key, the expected and the found shape.
"""

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax import nn, tree, v1
from fffjax.convert.io import to_numpy_dict

FASTFEEDFORWARD_KEYS = ("depth", "node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s")
USAGE_KEYS = ("node_usage", "leaf_usage")
ULTRAFAST_FF_KEYS = ("linear_in.weight", "linear_in.bias", "linear_out.weight")


def _float32(value) -> np.ndarray:
    return np.asarray(value).astype(np.float32)


def _check_keys(found: Mapping, expected: tuple[str, ...], what: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ValueError(f"{what} state_dict does not fit: {'; '.join(parts)}; expected keys {list(expected)}")


def _check_shape(key: str, array: np.ndarray, expected: tuple, *, explain_count=None, axis: int = 0) -> None:
    """Refuse ``array`` unless its shape is ``expected``; ``explain_count(n)`` (`tree.explain_v2_rows`)
    says which depth or tree count a differing node axis ``axis`` holds."""
    if tuple(array.shape) != tuple(expected):
        detail = ""
        if explain_count is not None and array.ndim == len(expected) and array.shape[axis] != expected[axis]:
            detail = f": {explain_count(array.shape[axis])}"
        raise ValueError(f"state_dict[{key!r}]: expected shape {tuple(expected)}, found {tuple(array.shape)}{detail}")


def _check_ndim(key: str, array: np.ndarray, ndim: int, expected: str) -> None:
    if array.ndim != ndim:
        raise ValueError(f"state_dict[{key!r}]: expected shape {expected}, found {tuple(array.shape)}")


def _check_floating(key: str, array: np.ndarray) -> None:
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"state_dict[{key!r}]: expected a floating dtype, found {array.dtype}")


def _param_dtype(array: np.ndarray):
    # float64 becomes float32 unless jax_enable_x64 is on; bf16/f16 are kept.
    return jax.dtypes.canonicalize_dtype(array.dtype)


def _filled(make: Callable[[], nnx.Module], values: dict[str, jax.Array], *, abstract: bool) -> nnx.Module:
    """``make()`` with the variables named in ``values`` replaced.

    With ``abstract=True`` the module is built under ``nnx.eval_shape`` (no random init, no
    compile: large layers import fast); only allowed when ``values`` covers every variable.
    """
    module = nnx.eval_shape(make) if abstract else make()
    for name, value in values.items():
        variable = getattr(module, name)
        built = variable.get_value()
        if tuple(built.shape) != tuple(value.shape) or built.dtype != value.dtype:
            raise AssertionError(f"internal: {name} built as {built.shape} {built.dtype}, "
                                 f"filled with {value.shape} {value.dtype}")
        variable.set_value(value)
    leftover = [jax.tree_util.keystr(path)
                for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module))
                if isinstance(leaf, jax.ShapeDtypeStruct)]
    if leftover:
        raise AssertionError(f"internal: variables left abstract after import: {leftover}")
    return module


# --------------------------------------------------------------------------- FFF-v1


def export_fastfeedforward(module: nn.FFF) -> dict[str, np.ndarray]:
    """``fastfeedforward.FFF``'s state dict for an :class:`fffjax.nn.FFF`.

    Args:
        module: the FFF-v1 module.

    Returns:
        ``{key: numpy array}`` in the package's key order: ``depth`` (0-d int64), ``node_weights
        (n_nodes, in)``, ``node_biases (n_nodes, 1)``, ``w1s (n_leaves, in, width)``, ``b1s``,
        ``w2s (n_leaves, width, out)``, ``b2s``, then ``node_usage (n_nodes,)`` and ``leaf_usage
        (n_leaves,)`` when the module tracks usage; all float32. It loads with
        ``fastfeedforward.FFF(in, width, out, depth, usage_mode=...).load_state_dict(sd, strict=True)``
        after ``{k: torch.from_numpy(v) for k, v in sd.items()}``.
    """
    if not isinstance(module, nn.FFF):
        raise TypeError(f"module must be a fffjax.nn.FFF, got {type(module).__name__}")
    params = module.params()
    out = {"depth": np.array(module.depth, dtype=np.int64)}
    out["node_weights"] = _float32(params["node_weights"])
    out["node_biases"] = _float32(params["node_biases"]).reshape(-1, 1)
    for name in ("w1s", "b1s", "w2s", "b2s"):
        out[name] = _float32(params[name])
    if module.usage_mode != "none":
        out["node_usage"] = _float32(module.node_usage[...])
        out["leaf_usage"] = _float32(module.leaf_usage[...])
    return out


def _fastfeedforward_shapes(arrays: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
    """``(depth, in, width, out)`` read from ``depth``, ``w1s`` and ``w2s``, after checking their ranks."""
    depth_array = arrays["depth"]
    _check_shape("depth", depth_array, ())
    if not jnp.issubdtype(depth_array.dtype, jnp.integer):
        raise ValueError(f"state_dict['depth']: expected an integer dtype (int64), found {depth_array.dtype}")
    depth = int(depth_array)
    if depth < 0:
        raise ValueError(f"state_dict['depth']: expected a value >= 0, found {depth}")
    _check_ndim("w1s", arrays["w1s"], 3, "(n_leaves, in, width)")
    _check_ndim("w2s", arrays["w2s"], 3, "(n_leaves, width, out)")
    _, din, width = arrays["w1s"].shape
    return depth, din, width, arrays["w2s"].shape[2]


def import_fastfeedforward(
    state_dict: Mapping,
    *,
    activation: Callable = jax.nn.relu,
    legacy_eval: bool = False,
    rngs: nnx.Rngs | None = None,
    usage_mode: str | None = None,
    **module_options,
) -> nn.FFF:
    """An :class:`fffjax.nn.FFF` (in train mode) from a ``fastfeedforward.FFF`` state dict.

    The state dict does not record the package's ``usage_mode``: when it holds ``node_usage`` and
    ``leaf_usage`` the counters are kept and the module counts in ``usage_mode="soft"`` unless told
    otherwise; without them it tracks nothing unless ``usage_mode`` asks (counters then start at 0).

    Args:
        state_dict: ``{key: array}`` (numpy arrays, jax arrays or torch tensors) with the keys of
            :func:`export_fastfeedforward`; ``node_biases`` may be ``(n_nodes, 1)`` or ``(n_nodes,)``.
        activation: the leaves' hidden activation (not stored in the state dict).
        legacy_eval: drop the leaf output bias in eval, as 0.2.1's ``eval()`` does.
        rngs: ``nnx.Rngs`` whose ``dropout`` stream drives dropout and region leak when those are
            on (default ``nnx.Rngs(0)``); the parameters never come from it.
        usage_mode: ``"soft"``, ``"hard"``, ``"none"`` or ``None`` (see above).
        **module_options: further :class:`fffjax.nn.FFF` options (``dropout``, ``region_leak``,
            ``train_hardened``, ``implementation``).

    Returns:
        The module, with parameters in the dtype of the state dict's ``w1s``.

    Raises:
        ValueError: a missing or unexpected key, or a shape that does not fit (naming the key,
            the expected and the found shape).
    """
    arrays = to_numpy_dict(state_dict)
    has_usage = any(k in arrays for k in USAGE_KEYS)
    if usage_mode is None:
        usage_mode = "soft" if has_usage else "none"
    if usage_mode not in nn.USAGE_MODES:
        raise ValueError(f"usage_mode must be one of {nn.USAGE_MODES} or None, got {usage_mode!r}")
    expected_keys = FASTFEEDFORWARD_KEYS + (USAGE_KEYS if has_usage else ())
    _check_keys(arrays, expected_keys, "fastfeedforward.FFF")
    if has_usage and usage_mode == "none":
        raise ValueError("usage_mode='none' but the state_dict holds usage counters node_usage, leaf_usage")
    depth, din, width, dout = _fastfeedforward_shapes(arrays)
    n_nodes, n_leaves = tree.v1_sizes(depth)
    if arrays["node_biases"].ndim == 2:
        _check_shape("node_biases", arrays["node_biases"], (n_nodes, 1))
        arrays["node_biases"] = arrays["node_biases"][:, 0]
    expected = {
        "node_weights": (n_nodes, din), "node_biases": (n_nodes,),
        "w1s": (n_leaves, din, width), "b1s": (n_leaves, width),
        "w2s": (n_leaves, width, dout), "b2s": (n_leaves, dout),
    }
    if has_usage:
        expected |= {"node_usage": (n_nodes,), "leaf_usage": (n_leaves,)}
    for key, shape in expected.items():
        if key == "node_biases" and arrays[key].ndim != 1:
            shape = (n_nodes, 1)  # the package's layout, named in the error
        _check_shape(key, arrays[key], shape)
        _check_floating(key, arrays[key])

    dtype = _param_dtype(arrays["w1s"])
    values = {name: jnp.asarray(arrays[name], dtype) for name in v1.PARAM_NAMES}
    if usage_mode != "none":
        for name, size in zip(USAGE_KEYS, (n_nodes, n_leaves)):
            values[name] = jnp.asarray(arrays[name] if has_usage else np.zeros(size), jnp.float32)
    # Dropout and region leak keep an rng stream in the module: build those concretely.
    keeps_rngs = module_options.get("dropout", 0.0) > 0 or module_options.get("region_leak", 0.0) > 0

    def make():
        return nn.FFF(
            din, width, dout, depth, activation=activation, legacy_eval=legacy_eval,
            usage_mode=usage_mode, dtype=dtype, rngs=nnx.Rngs(0) if rngs is None or not keeps_rngs else rngs,
            **module_options)

    return _filled(make, values, abstract=not keeps_rngs)


# --------------------------------------------------------------------------- FFF-v2


def export_ultrafast_ff(module: nn.UltraFastFF, *, prefix: str = "") -> dict[str, np.ndarray]:
    """UltraFastBERT ``fff.FFF``'s state dict for an :class:`fffjax.nn.UltraFastFF`.

    Args:
        module: the FFF-v2 module (K trees, ``N = 2**(depth+1) - 1`` nodes each, width H).
        prefix: prepended to every key (e.g. ``"encoder.layers.0.ffn."``).

    Returns:
        ``linear_in.weight (K*N, H)``, ``linear_in.bias (K*N,)``, ``linear_out.weight (H_out, K*N)``,
        float32 numpy arrays.
    """
    if not isinstance(module, nn.UltraFastFF):
        raise TypeError(f"module must be a fffjax.nn.UltraFastFF, got {type(module).__name__}")
    return {
        prefix + "linear_in.weight": _float32(module.w_in[...]),
        prefix + "linear_in.bias": _float32(module.b_in[...]),
        prefix + "linear_out.weight": np.ascontiguousarray(_float32(module.w_out[...]).T),
    }


def import_ultrafast_ff(
    state_dict: Mapping,
    *,
    depth: int,
    n_trees: int = 1,
    prefix: str = "",
    implementation: str | None = None,
) -> nn.UltraFastFF:
    """An :class:`fffjax.nn.UltraFastFF` from UltraFastBERT ``fff.FFF`` weights.

    Args:
        state_dict: ``{prefix + key: array}`` with exactly the keys ``linear_in.weight (K*N, H)``,
            ``linear_in.bias (K*N,)``, ``linear_out.weight (H_out, K*N)`` (numpy, jax or torch).
        depth: descents per tree (the layout does not record it).
        n_trees: K.
        prefix: the keys' common prefix.
        implementation: the module's hard-forward implementation.

    Returns:
        The module, with parameters in the dtype of ``linear_in.weight``.

    Raises:
        ValueError: a missing or unexpected key, or a shape that does not fit.
    """
    tree.check_depth(depth)
    tree.check_n_trees(n_trees)
    arrays = to_numpy_dict(state_dict)
    keys = tuple(prefix + k for k in ULTRAFAST_FF_KEYS)
    _check_keys(arrays, keys, "UltraFastBERT fff.FFF")
    w_key, b_key, out_key = keys
    n = n_trees * tree.v2_nodes_per_tree(depth)
    _check_ndim(w_key, arrays[w_key], 2, f"({n}, H)")
    _check_ndim(out_key, arrays[out_key], 2, f"(H_out, {n})")
    features, out_features = arrays[w_key].shape[1], arrays[out_key].shape[0]
    explain = functools.partial(tree.explain_v2_rows, depth=depth, n_trees=n_trees)
    for key, shape, axis in ((w_key, (n, features), 0), (b_key, (n,), 0), (out_key, (out_features, n), 1)):
        _check_shape(key, arrays[key], shape, explain_count=explain, axis=axis)
        _check_floating(key, arrays[key])
    dtype = _param_dtype(arrays[w_key])
    values = {
        "w_in": jnp.asarray(arrays[w_key], dtype),
        "b_in": jnp.asarray(arrays[b_key], dtype),
        "w_out": jnp.asarray(arrays[out_key].T, dtype),
    }

    def make():
        return nn.UltraFastFF(features, depth, n_trees=n_trees, out_features=out_features,
                              implementation=implementation, dtype=dtype, rngs=nnx.Rngs(0))

    return _filled(make, values, abstract=True)
