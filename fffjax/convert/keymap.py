"""A model's parameter tree to and from a flat PyTorch state dict, by a key map: what the whole-model
converters (:mod:`fffjax.convert.ultrafastbert`, :mod:`fffjax.convert.decoder`) share.

A key map is a list of entries ``(torch key, parameter path, transposed)`` in the torch model's
``state_dict`` order. ``parameter path`` is the tuple of keys into
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (list indices as ints), or :data:`NORM_FACTOR` for an
attention layer's ``norm_factor`` buffer (``1/sqrt(head width)``: a constant here, not a parameter);
``transposed`` marks an ``nn.Linear`` weight (torch's ``weight`` is our ``kernel.T``). Exports are
float32 numpy arrays; imports take numpy arrays of any floating dtype (bfloat16 included), check every
key, shape and ``norm_factor``, and cast to float32.
"""

from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from fffjax.models.config import TransformerShape

NORM_FACTOR = None  # the path of a norm_factor buffer, which is a constant here, not a parameter

Entry = tuple[str, "tuple | None", bool]


def norm_entries(torch_prefix: str, path: tuple) -> list[Entry]:
    """A LayerNorm's two entries: torch ``weight`` and ``bias`` are Flax's ``scale`` and ``bias``."""
    return [(f"{torch_prefix}.weight", (*path, "scale"), False), (f"{torch_prefix}.bias", (*path, "bias"), False)]


def get_path(tree: Any, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def export_params(params: Any, entries: list[Entry], config: TransformerShape) -> dict[str, np.ndarray]:
    """The state dict of ``params`` (a parameter pure dict) under ``entries``: float32 numpy arrays in
    key-map order, every ``norm_factor`` buffer ``config.norm_factor`` as a 0-d array."""
    out = {}
    for key, path, transposed in entries:
        if path is NORM_FACTOR:
            out[key] = np.array(config.norm_factor, np.float32)
            continue
        array = np.array(get_path(params, path), np.float32)  # a writable copy (torch.from_numpy warns otherwise)
        out[key] = np.ascontiguousarray(array.T) if transposed else array
    return out


def expected_shapes(build: Callable[[], nnx.Module], entries: list[Entry]) -> dict[str, tuple]:
    """The torch shape of every key of ``entries`` for the module ``build()`` makes, which runs
    abstractly (``nnx.eval_shape``: no array is materialised)."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build), nnx.Param))
    shapes = {}
    for key, path, transposed in entries:
        if path is NORM_FACTOR:
            shapes[key] = ()
        else:
            shape = tuple(get_path(abstract, path).shape)
            shapes[key] = shape[::-1] if transposed else shape
    return shapes


def merge_tied(arrays: Mapping[str, np.ndarray], kept: str, tied: str) -> dict[str, np.ndarray]:
    """``arrays`` with the tied copy ``tied`` of the matrix ``kept`` folded into it: a file may hold
    either key or both (then they must be equal, since the model ties them); the result holds ``kept``
    only (when either was present)."""
    arrays = dict(arrays)
    if kept in arrays and tied in arrays:
        a, b = arrays[kept], arrays[tied]
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) if a.shape == b.shape else None
            raise ValueError(
                f"state_dict[{kept!r}] {a.shape} and state_dict[{tied!r}] {b.shape} differ "
                f"(max abs difference {diff}); the model ties them, so they must be equal")
        del arrays[tied]
    elif tied in arrays:
        arrays[kept] = arrays.pop(tied)
    return arrays


def check_keys(arrays: Mapping[str, Any], required: list[str], optional: set[str], described: str) -> None:
    """Raises ``ValueError`` naming the ``required`` keys ``arrays`` lacks and the keys it holds that are
    neither required nor ``optional``; ``described`` says what the state dict should be."""
    missing = [k for k in required if k not in arrays]
    unexpected = [k for k in arrays if k not in required and k not in optional]
    if missing or unexpected:
        parts = (([f"missing keys {missing}"] if missing else [])
                 + ([f"unexpected keys {unexpected}"] if unexpected else []))
        raise ValueError(f"{described}: {'; '.join(parts)}")


def params_from_arrays(arrays: Mapping[str, np.ndarray], entries: list[Entry], shapes: Mapping[str, tuple],
                       config: TransformerShape) -> dict:
    """The parameter pure dict that ``arrays`` hold under ``entries`` (keys absent from ``arrays`` are
    skipped), float32, kernels transposed back.

    Raises ``ValueError`` naming the key for a shape other than ``shapes[key]``, a non-floating dtype,
    or a ``norm_factor`` other than ``config.norm_factor`` (to the precision of its dtype).
    """
    params: dict = {}
    for key, path, transposed in entries:
        if key not in arrays:
            continue
        array = arrays[key]
        if tuple(array.shape) != shapes[key]:
            raise ValueError(f"state_dict[{key!r}]: expected shape {shapes[key]} for this config, "
                             f"found {tuple(array.shape)}")
        if not np.issubdtype(np.asarray(array).dtype, np.floating) and array.dtype.name != "bfloat16":
            raise ValueError(f"state_dict[{key!r}]: expected a floating dtype, found {array.dtype}")
        stored_eps = float(ml_dtypes.finfo(array.dtype).eps)
        array = np.asarray(array).astype(np.float32)
        if path is NORM_FACTOR:
            # A half-precision file holds the scale rounded to its own precision.
            if not np.isclose(float(array), config.norm_factor, rtol=max(1e-6, stored_eps), atol=0):
                raise ValueError(f"state_dict[{key!r}] = {float(array)} but this config's attention scale is "
                                 f"1/sqrt({config.attention_head_width}) = {config.norm_factor}")
            continue
        set_path(params, path, array.T if transposed else array)
    return params
