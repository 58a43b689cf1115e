"""Custom calls run device by device on a data mesh.

GSPMD cannot partition a Pallas kernel or an FFI custom call: called under ``jit`` on inputs
sharded over a mesh, such a call runs on the whole gathered batch on every device. The registry
(:mod:`fffjax.ops.registry`) therefore runs every implementation registered with
``per_device=True`` through :func:`rows_per_device`.
"""

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P


def rows_per_device(fn: Callable, rows: tuple, replicated: tuple = (), *, axis: str = "data"):
    """``fn(*rows, *replicated)``, computed device by device on the mesh set by ``jax.set_mesh`` (the
    trainer sets its mesh): ``rows`` split on their first dimension over ``axis``, ``replicated``
    whole on every device, every output split like ``rows``. ``None`` entries of ``rows`` are passed
    through as ``None``.

    For kernels whose output rows depend only on the same input rows. Without a mesh, with one
    device on ``axis``, inside a ``shard_map`` that already maps ``axis`` (the caller is per device),
    or when ``axis`` does not divide the rows, this is ``fn(*rows, *replicated)``. The gradients of
    ``replicated`` are summed over the devices (``shard_map``'s transpose). ``check_vma`` is off:
    the kernels' outputs do not declare how they vary.
    """
    present = tuple(r for r in rows if r is not None)
    mesh = jax.sharding.get_abstract_mesh()
    if (mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1 or axis in mesh.manual_axes
            or any(r.shape[0] % mesh.shape[axis] for r in present)):
        return fn(*rows, *replicated)

    def per_device(*arrays):
        it = iter(arrays[:len(present)])
        return fn(*(None if r is None else next(it) for r in rows), *arrays[len(present):])

    specs = (P(axis),) * len(present) + (P(),) * len(replicated)
    return jax.shard_map(per_device, in_specs=specs, out_specs=P(axis), check_vma=False)(*present, *replicated)
