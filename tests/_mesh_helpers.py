"""Meshes over the 8 fake CPU devices (conftest.py) for the sharded tests."""

import jax
import numpy as np
from jax.sharding import AxisType


def make_mesh(shape, names, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape), devices=jax.devices()[:n])
