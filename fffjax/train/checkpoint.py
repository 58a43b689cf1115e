"""Orbax checkpoints of a parameter pytree plus a JSON config, as a few pure functions.

A checkpoint is one directory holding two orbax items: ``params`` (any pytree of arrays with
string keys, e.g. ``nnx.to_pure_dict(nnx.state(model))`` or a :mod:`fffjax.v1` parameter dict)
and ``config`` (a JSON-serialisable dict: what is needed to rebuild the model). Orbax writes
into a temporary sibling directory and renames it only once every file is written, so a
crash never leaves a half-written checkpoint under the final name.
"""

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"


def _checkpointer() -> ocp.Checkpointer:
    # Named handlers so that metadata() can describe the params item without a target.
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
        PARAMS_ITEM: ocp.StandardCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()}))


def save_checkpoint(path: str | Path, params: Any, config: dict, *, overwrite: bool = False) -> Path:
    """Write ``params`` and ``config`` to the directory ``path`` (atomically; blocks until done).

    Args:
        path: checkpoint directory; it must not exist unless ``overwrite``.
        params: pytree of arrays (jax or numpy).
        config: JSON-serialisable dict.
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The absolute checkpoint path.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a JSON-serialisable dict, got {type(config).__name__}")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as error:
        raise TypeError(f"config must be JSON-serialisable: {error}") from error
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"path {path} already exists (pass overwrite=True to replace it)")
    with _checkpointer() as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(**{
                PARAMS_ITEM: ocp.args.StandardSave(params),
                CONFIG_ITEM: ocp.args.JsonSave(config),
            }),
            force=overwrite,
        )
    return path


def read_config(path: str | Path) -> dict:
    """The JSON config of the checkpoint at ``path``, without reading any array."""
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(
            Path(path).absolute(), args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[CONFIG_ITEM])


def restore_checkpoint(path: str | Path, target: Any | None = None) -> tuple[Any, dict]:
    """Read ``(params, config)`` from the checkpoint at ``path``.

    Args:
        path: a directory written by :func:`save_checkpoint`.
        target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` giving the structure,
            dtypes and shardings to restore into; without it the structure, shapes and dtypes
            come from the checkpoint's metadata (nested dicts, arrays on the default device).

    Returns:
        ``(params, config)``.
    """
    path = Path(path).absolute()
    if not (path / PARAMS_ITEM).is_dir():
        raise FileNotFoundError(f"path {path} is not a checkpoint written by save_checkpoint (no {PARAMS_ITEM}/)")
    with _checkpointer() as checkpointer:
        if target is None:
            tree = checkpointer.metadata(path).item_metadata[PARAMS_ITEM].tree
            abstract = jax.tree.map(lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype), tree)
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = checkpointer.restore(path, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardRestore(abstract), CONFIG_ITEM: ocp.args.JsonRestore()}))
    return restored[PARAMS_ITEM], dict(restored[CONFIG_ITEM])
