"""Mesh, partition rules and global arrays for training on a `("data", "model")` mesh.

Choice: **Auto (GSPMD) axes with explicit shardings**. Parameters and optimizer moments get a
`NamedSharding` from the rules below (they are placed with it, and the trainer's step constrains
its new state to it), batches are split on `data`, and XLA inserts the collectives. Auto keeps the
model code free of sharding annotations (the same NNX modules run unsharded), which Explicit mode
would not (every op would need a sharding-aware type). The numerics are the same as on one device
up to float reassociation.

Partition rules map a parameter's dotted path (`layers.0.ffn.w_in`, from
`jax.tree_util.tree_leaves_with_path` on the pure-dict state) to a `PartitionSpec`: the first rule
whose regular expression matches (`re.search`) wins. A rule whose spec does not divide the shape
on this mesh falls back to replication, so one rule set serves every mesh size. With no match, a
matrix is sharded along its last dimension on `model` when that divides, everything else is
replicated. The FFF node tables `w_in`/`w_out (nodes, hidden)` shard the hidden dimension:
sharding the nodes would break the locality of the per-level row gathers.
"""

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fffjax import nn

DATA, MODEL = "data", "model"
Rules = Sequence[tuple[str, P]]

DEFAULT_RULES: Rules = (
    (r"(norm|bias|scale_factor|b_in|b_out)", P()),  # vectors: replicated
    (r"(^|\.)(w_in|w_out)$", P(None, MODEL)),  # FFF node tables (nodes, hidden): shard hidden
    (r"embedding", P(None, MODEL)),  # word embedding (vocab, hidden): shard hidden
    (r"query_key_value\.kernel$", P(None, MODEL)),  # (H, 3H), per-head [q|k|v]: whole heads per shard
    (r"attn\.dense\.kernel$", P(MODEL, None)),  # attention output (H, H): row parallel
    (r"dense_in\.kernel$", P(None, MODEL)),  # dense FF (H, W): column parallel
    (r"dense_out\.kernel$", P(MODEL, None)),  # dense FF (W, H): row parallel
    (r"(^|\.)head\.", P()),  # classifier output layer: small, replicated
)


# Named parallelism configurations: partition rules; "tree" also makes the FFF layers tree-parallel
# over `model` (`parallelism_rules` / `apply_parallelism`). The FFF node tables stay whole there:
# `fffjax.parallel` gives each device its subtrees' rows itself.
_TREE_TABLES: Rules = ((r"(^|\.)(w_in|w_out|b_in)$", P()),)
PARALLELISM: dict[str, Rules] = {
    "dp": ((r".*", P()),),                                   # data parallel: everything replicated
    "fsdp": ((r".*", P(DATA)),),                             # parameters + moments split over data (dim 0)
    "tp": DEFAULT_RULES,                                     # tensor parallel attention / dense FF / FFF hidden
    "tree": _TREE_TABLES + ((r".*", P()),),                  # tree-parallel FFF, the rest data parallel
    "tp+tree": _TREE_TABLES + tuple(DEFAULT_RULES),          # tensor-parallel attention, tree-parallel FFF
    "fsdp+tree": _TREE_TABLES + ((r".*", P(DATA)),),         # FSDP for the rest, tree-parallel FFF
}


def parallelism_rules(name: str) -> Rules:
    """Partition rules of a named parallelism configuration (keys of `PARALLELISM`)."""
    if name not in PARALLELISM:
        raise ValueError(f"parallelism must be one of {sorted(PARALLELISM)}, got {name!r}")
    return PARALLELISM[name]


def apply_parallelism(model, name: str, mesh: Mesh) -> Rules:
    """Prepare `model` for configuration `name` on `mesh` (tree-parallel FFF layers over `model` for
    the `tree` variants, a no-op otherwise) and return its partition rules for `Trainer(rules=...)`."""
    rules = parallelism_rules(name)
    nn.set_tree_parallel(model, mesh if "tree" in name else None, MODEL)
    return rules


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, model)` mesh with Auto axes; `data=-1` uses every device left after `model`."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model: expected a divisor of the {len(devices)} devices, got {model}")
    if data == -1:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"data x model: expected {len(devices)} devices, got {data} x {model}")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2, devices=devices)


def path_name(path) -> str:
    """A dotted name for a pytree path (`layers.0.ffn.w_in`)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return ".".join(parts)


def _fits(spec: P, shape: tuple[int, ...], mesh: Mesh) -> bool:
    if len(spec) > len(shape):
        return False
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
            return False
    return True


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The partition spec of one parameter (see the module docstring)."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            return spec if _fits(spec, shape, mesh) else P()
    if len(shape) >= 2:
        spec = P(*([None] * (len(shape) - 1)), MODEL)
        return spec if _fits(spec, shape, mesh) else P()
    return P()


def tree_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """`NamedSharding`s for every leaf of a parameter tree, by `spec_for` on its path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_name(path), np.shape(x), mesh, rules)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over `data`, other dimensions whole."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def to_global(tree, shardings):
    """Places host values (the same on every process) as global arrays with the given shardings.

    Works with several processes: each builds only its addressable shards from its own copy.
    """

    def place(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


def to_host(tree):
    """Fully replicated or fully addressable global arrays as numpy (gathers across processes)."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
