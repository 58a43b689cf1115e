"""Reading and writing flat state dicts: ``.safetensors`` (default) and ``.pt`` (``torch.save``).

A state dict here is a flat ``{name: array}`` mapping in PyTorch's naming and layouts. Values may
be numpy arrays, jax arrays or torch tensors; :func:`load` always returns numpy arrays, in the
order the keys were saved. 0-d arrays (such as FFF-v1's ``depth``) survive both formats.

Torch and safetensors are imported only inside the functions that need them.
"""

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth")
# safetensors sorts its keys; the saved order is kept in the file's metadata under this name.
KEY_ORDER_METADATA = "fffjax.key_order"


def _is_torch_tensor(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_numpy(value) -> np.ndarray:
    """A numpy copy of a numpy/jax array or torch tensor; torch bfloat16 becomes ``ml_dtypes.bfloat16``."""
    if _is_torch_tensor(value):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            # numpy has no bfloat16; the float32 detour is exact.
            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy().copy()
    return np.array(value)


def to_numpy_dict(state_dict: Mapping) -> dict[str, np.ndarray]:
    """``{name: numpy array}`` in the same key order; raises ``TypeError`` on a non-string key."""
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        out[key] = to_numpy(value)
    return out


def _format_of(path: Path, format: str | None) -> str:
    if format is None:
        return "pt" if path.suffix.lower() in TORCH_SUFFIXES else "safetensors"
    if format not in ("safetensors", "pt"):
        raise ValueError(f"format must be 'safetensors', 'pt' or None, got {format!r}")
    return format


def save(state_dict: Mapping, path: str | Path, *, format: str | None = None) -> Path:
    """Write a flat state dict.

    Args:
        state_dict: ``{name: array}`` (numpy, jax or torch values).
        path: destination file.
        format: ``"safetensors"`` or ``"pt"``; ``None`` picks ``"pt"`` for a ``.pt``/``.pth`` suffix
            and safetensors for anything else.

    Returns:
        The path written.
    """
    path = Path(path)
    arrays = to_numpy_dict(state_dict)
    if _format_of(path, format) == "pt":
        import torch

        tensors = {}
        for key, array in arrays.items():
            if array.dtype.name == "bfloat16":
                tensors[key] = torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
            else:
                tensors[key] = torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape))
        torch.save(tensors, path)
    else:
        import safetensors.numpy

        # ascontiguousarray turns a 0-d array (FFF-v1 depth) into shape (1,): reshape it back.
        contiguous = {key: np.ascontiguousarray(array).reshape(array.shape) for key, array in arrays.items()}
        safetensors.numpy.save_file(
            contiguous, str(path), metadata={KEY_ORDER_METADATA: json.dumps(list(arrays))})
    return path


def load(path: str | Path, *, format: str | None = None) -> dict[str, np.ndarray]:
    """Read a flat state dict written by :func:`save` (or by torch / safetensors).

    ``.pt`` files are read with ``torch.load(..., weights_only=True)``: nothing but tensors and
    plain containers is ever unpickled, and the top level must be a flat ``{str: tensor}`` mapping.

    Args:
        path: the file.
        format: as in :func:`save`.

    Returns:
        ``{name: numpy array}`` in the saved key order.
    """
    path = Path(path)
    if _format_of(path, format) == "pt":
        import torch

        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path} holds more than tensors; refusing to unpickle it: {err}") from err
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path} must hold a flat {{name: tensor}} mapping, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if not _is_torch_tensor(value):
                raise ValueError(
                    f"{path} must hold a flat {{name: tensor}} mapping; key {key!r} holds {type(value).__name__}")
        return to_numpy_dict(loaded)
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = list(f.keys())
        order = json.loads((f.metadata() or {}).get(KEY_ORDER_METADATA, "null"))
        if isinstance(order, list) and sorted(order) == sorted(keys):
            keys = order
        return {key: f.get_tensor(key) for key in keys}
