"""fffjax.parallel: tree-parallel FFF layers on the 8 fake CPU devices, exact against the
single-device references (the named training configurations that use them: test_train_sharding.py).

Each jitted function is compiled once per mesh and reused for every routing skew (same shapes),
which keeps the file to about a dozen shard_map compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mesh_helpers import make_mesh
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from fffjax import nn, ops, parallel, tree, v1, v2
from fffjax.ops import pallas as ops_pallas

DEPTH, TREES, H, H_OUT, TOKENS = 3, 2, 8, 6, 45


def assert_close_per_tensor(got, want):
    """Every tensor within ``1e-5 * max(1, max|reference|)``."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        tol = 1e-5 * max(1.0, float(jnp.max(jnp.abs(w))))
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= tol, (err, tol)


def loss_and_grads(forward):
    """value_and_grad of a weighted sum of the outputs, w.r.t. every argument."""

    def loss(*args):
        y = forward(*args)
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return jnp.sum(y * weights), y

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(4)), has_aux=True))


def v2_reference(x, w_in, b_in, w_out, n_trees=TREES):
    return ops.fff_v2_hard(x, w_in, b_in, w_out, depth=DEPTH, n_trees=n_trees, implementation="reference")


def v2_cases(top_levels, n_trees=TREES):
    """(name, x, w_in, b_in, w_out): random routing, and every token into the last / first subtree."""
    p = v2.init(jax.random.key(0), H, DEPTH, n_trees=n_trees, out_features=H_OUT)
    x = jax.random.normal(jax.random.key(1), (TOKENS, H))
    cases = [("random", x, p["w_in"], p["b_in"], p["w_out"])]
    top_rows, _ = parallel.subtree_rows(DEPTH + 1, top_levels, n_trees)
    for name, push in (("all_right", 40.0), ("all_left", -40.0)):
        cases.append((name, x, p["w_in"], p["b_in"].at[top_rows].add(push), p["w_out"]))
    return cases


def check_v2(mesh, n_trees=TREES, **kwargs):
    top_levels = mesh.shape["model"].bit_length() - 1
    fwd = functools.partial(parallel.fff_v2_tree_parallel, depth=DEPTH, n_trees=n_trees, mesh=mesh, **kwargs)
    got_fn = loss_and_grads(fwd)
    want_fn = loss_and_grads(functools.partial(v2_reference, n_trees=n_trees))
    for _, *args in v2_cases(top_levels, n_trees):
        (loss, y), grads = got_fn(*args)
        (loss_ref, y_ref), grads_ref = want_fn(*args)
        assert_close_per_tensor(y, y_ref)
        assert_close_per_tensor(grads, grads_ref)


@pytest.mark.parametrize("n_model", [2, 4, 8])
def test_v2_subtree_equals_reference_any_skew(n_model):
    check_v2(make_mesh((n_model,), ("model",)))


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_v2_one_tree_subtree_runs_each_devices_subtree_through_the_registry(implementation):
    # One tree: each device's subtree is a whole FFF-v2 tree, run by ops.fff_v2_hard (None: the C++
    # cpu_ffi kernel here) inside shard_map; forward and gradients stay exact.
    check_v2(make_mesh((2, 2), ("data", "model")), n_trees=1, implementation=implementation)


@pytest.mark.parametrize("n_model", [1, 2, 4, 8])
def test_v2_subtree_runs_each_devices_subtree_through_pallas(n_model):
    # Pallas interpret mode inside the shard_map: forward and the kernels' custom VJP stay exact.
    mesh = make_mesh((n_model,), ("model",))
    _, *args = v2_cases(n_model.bit_length() - 1, 1)[0]
    fwd = functools.partial(parallel.fff_v2_tree_parallel, depth=DEPTH, n_trees=1, mesh=mesh, implementation="pallas")
    assert "pallas_call" in str(jax.make_jaxpr(fwd)(*args))
    check_v2(mesh, n_trees=1, implementation="pallas")


def test_v2_trees_mode_runs_pallas_with_a_data_axis():
    # Tokens replicated over "model": each device's kernel output is summed by psum, x's gradient too.
    check_v2(make_mesh((2, 2), ("data", "model")), mode="trees", implementation="pallas")


def test_v2_pallas_in_subtree_mode_with_several_trees_is_refused_by_name():
    _, x, w_in, b_in, w_out = v2_cases(1)[0]
    with pytest.raises(NotImplementedError, match="n_trees=1"):
        parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=DEPTH, n_trees=TREES,
                                      mesh=make_mesh((2,), ("model",)), implementation="pallas")


def test_v2_pallas_tpu_inside_the_shard_map_is_refused_by_name():
    _, x, w_in, b_in, w_out = v2_cases(1)[0]
    with pytest.raises(NotImplementedError, match="pallas_tpu"):
        parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=DEPTH, n_trees=TREES,
                                      mesh=make_mesh((2,), ("model",)), implementation="pallas_tpu")


@pytest.mark.parametrize("layer", ["v2 subtree", "v2 trees", "v1"])
def test_pallas_in_checked_shard_map_lowers_for_a_gpu(layer, monkeypatch):
    # Compiled kernels run in the checked shard_map: their outputs and the custom VJPs' gradients
    # must carry the mesh axes they vary over. Cross-lowered for an abstract CUDA mesh (Triton
    # lowering included), forward and gradient.
    monkeypatch.setattr(ops_pallas, "_interpret", lambda: False)
    monkeypatch.setattr(parallel, "_checks_vma", lambda implementation: True)
    device = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
    mesh = AbstractMesh((2,), ("model",), (AxisType.Auto,), abstract_device=device)
    if layer == "v1":
        nodes, leaves = tree.v1_sizes(V1_DEPTH)
        dims = ((64, 16), (nodes, 16), (nodes,), (leaves, 16, 16), (leaves, 16), (leaves, 16, 16), (leaves, 16))
        fwd = functools.partial(parallel.fff_v1_tree_parallel, depth=V1_DEPTH, mesh=mesh, implementation="pallas")
        kernels = (2, 2)      # descent and leaf kernels (the backward is the reference's VJP)
    else:
        mode = layer.split()[1]
        n_trees = 1 if mode == "subtree" else 2
        rows = n_trees * tree.v2_nodes_per_tree(DEPTH)
        dims = ((64, 16), (rows, 16), (rows,), (rows, 16))
        fwd = functools.partial(parallel.fff_v2_tree_parallel, depth=DEPTH, n_trees=n_trees, mesh=mesh, mode=mode,
                                implementation="pallas")
        kernels = (1, 3)      # the forward; with the backward kernels
    shapes = [jax.ShapeDtypeStruct(d, jnp.bfloat16) for d in dims]
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2), argnums=tuple(range(len(dims))))
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, n_kernels in zip((fwd, grad), kernels, strict=True):
            text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("__gpu$xla.gpu.triton") >= n_kernels


def test_v2_subtree_with_data_axis_and_tiny_capacity():
    # Tokens sharded over (data, model); 2 items per round and destination: up to 6 rounds.
    check_v2(make_mesh((2, 4), ("data", "model")), capacity_factor=0.5)


def test_v2_subtree_explicit_mesh_and_batch_dims():
    mesh = make_mesh((4,), ("model",), explicit=True)
    _, x, w_in, b_in, w_out = v2_cases(2)[0]
    x3 = x[:44].reshape(4, 11, H)
    y = jax.jit(functools.partial(parallel.fff_v2_tree_parallel, depth=DEPTH, n_trees=TREES, mesh=mesh))(
        x3, w_in, b_in, w_out)
    assert y.shape == (4, 11, H_OUT)
    assert_close_per_tensor(y, v2_reference(x3, w_in, b_in, w_out))


def test_v2_trees_mode_equals_reference():
    check_v2(make_mesh((2, 2), ("data", "model")), mode="trees")


def test_v2_skew_really_routes_everything_to_one_device():
    _, x, w_in, b_in, _ = v2_cases(2)[1]
    z = x @ w_in.T + b_in
    path = v2.path_from_logits(z, depth=DEPTH, n_trees=TREES)           # (B, K, levels)
    level2 = path[:, :, 2] - jnp.arange(TREES)[None, :] * tree.v2_nodes_per_tree(DEPTH)
    assert bool(jnp.all(level2 == 6))                                    # last node of level 2


def test_hlo_uses_all_to_all_for_subtrees_and_all_reduce_for_trees():
    mesh = make_mesh((4,), ("model",))
    _, *args = v2_cases(2)[0]
    sub = jax.jit(functools.partial(parallel.fff_v2_tree_parallel, depth=DEPTH, n_trees=TREES, mesh=mesh))
    trees = jax.jit(functools.partial(parallel.fff_v2_tree_parallel, depth=DEPTH, n_trees=TREES,
                                      mesh=make_mesh((2,), ("model",)), mode="trees"))
    assert "all_to_all" in sub.lower(*args).as_text()
    text = trees.lower(*args).as_text()
    assert "all_reduce" in text and "all_to_all" not in text


def test_layout_round_trip_and_contiguous_blocks():
    levels, top_levels = DEPTH + 1, 2
    top, sub = parallel.subtree_rows(levels, top_levels, TREES)
    n = TREES * tree.num_nodes(levels)
    assert sorted(np.concatenate([top, sub]).tolist()) == list(range(n))
    per_sub = tree.num_nodes(levels - top_levels)
    block = sub.reshape(4, TREES, per_sub)
    # Device 1's subtree of tree 1 is rooted at heap node 4 (level 2, position 1): children 9, 10.
    assert block[1, 1, :3].tolist() == [n // 2 + 4, n // 2 + 9, n // 2 + 10]
    w = jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3)
    t, s = parallel.to_tree_parallel_layout(w, levels=levels, top_levels=top_levels, n_trees=TREES)
    back = parallel.from_tree_parallel_layout(t, s, levels=levels, top_levels=top_levels, n_trees=TREES)
    np.testing.assert_array_equal(back, w)


def test_argument_errors_name_the_argument():
    mesh8 = make_mesh((8,), ("model",))
    _, x, w_in, b_in, w_out = v2_cases(2)[0]
    p2 = v2.init(jax.random.key(0), H, 1)
    with pytest.raises(ValueError, match="depth"):  # depth + 1 = 2 levels, log2(8) = 3 top levels
        parallel.fff_v2_tree_parallel(x, p2["w_in"], p2["b_in"], p2["w_out"], depth=1, mesh=mesh8)
    with pytest.raises(ValueError, match="n_trees"):
        parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=DEPTH, n_trees=TREES, mesh=mesh8, mode="trees")
    with pytest.raises(ValueError, match="mode"):
        parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=DEPTH, n_trees=TREES, mesh=mesh8, mode="x")
    with pytest.raises(ValueError, match="axis"):
        parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=DEPTH, n_trees=TREES, mesh=mesh8, axis="tp")
    with pytest.raises(ValueError, match="power-of-two"):
        parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=DEPTH, n_trees=TREES,
                                      mesh=make_mesh((3,), ("model",)))
    with pytest.raises(ValueError, match="w_in"):
        parallel.fff_v2_tree_parallel(x, w_in[1:], b_in[1:], w_out[1:], depth=DEPTH, n_trees=TREES, mesh=mesh8)
    with pytest.raises(ValueError, match="capacity_factor"):
        parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=DEPTH, n_trees=TREES, mesh=mesh8,
                                      capacity_factor=0.0)
    p1 = v1.init(jax.random.key(0), H, 4, H_OUT, 2)
    with pytest.raises(ValueError, match="depth"):
        parallel.fff_v1_tree_parallel(x, *(p1[n] for n in v1.PARAM_NAMES), depth=2, mesh=mesh8)
    with pytest.raises(ValueError, match="implementation"):
        parallel.fff_v1_tree_parallel(x, *(p1[n] for n in v1.PARAM_NAMES), depth=2, mesh=make_mesh((2,), ("model",)),
                                      soft=True, implementation="pallas")
    with pytest.raises(ValueError, match="node_weights"):
        parallel.fff_v1_tree_parallel(x, p1["node_weights"][:2], p1["node_biases"][:2],
                                      *(p1[n] for n in v1.PARAM_NAMES[2:]), depth=2, mesh=make_mesh((2,), ("model",)))


def test_ultrafastff_module_calls_tree_parallel():
    mesh = make_mesh((2,), ("model",))
    plain = nn.UltraFastFF(H, DEPTH, n_trees=TREES, rngs=nnx.Rngs(0), implementation="reference")
    sharded = nn.UltraFastFF(H, DEPTH, n_trees=TREES, rngs=nnx.Rngs(0), mesh=mesh, tree_parallel_axis="model")
    x = jax.random.normal(jax.random.key(3), (2, 9, H))
    got = jax.jit(lambda m, x: m(x))(sharded, x)
    assert "all_to_all" in jax.jit(lambda m, x: m(x)).lower(sharded, x).as_text()
    assert_close_per_tensor(got, plain(x))


def test_set_tree_parallel_keeps_the_pallas_implementation_of_a_module():
    plain = nn.UltraFastFF(H, DEPTH, rngs=nnx.Rngs(0), implementation="reference")
    model = nn.set_tree_parallel(nn.UltraFastFF(H, DEPTH, rngs=nnx.Rngs(0), implementation="pallas"),
                                 make_mesh((2,), ("model",)), "model")
    x = jax.random.normal(jax.random.key(3), (2, 9, H))
    assert "pallas_call" in str(jax.make_jaxpr(lambda m, x: m(x))(model, x))
    assert_close_per_tensor(jax.jit(lambda m, x: m(x))(model, x), plain(x))


# ----------------------------------------------------------------------------- FFF-v1

V1_DEPTH, V1_WIDTH = 3, 4


def v1_cases(top_levels):
    p = v1.init(jax.random.key(4), H, V1_WIDTH, H_OUT, V1_DEPTH)
    x = jax.random.normal(jax.random.key(5), (TOKENS, H))
    skew = dict(p, node_biases=p["node_biases"].at[: tree.num_nodes(top_levels)].add(40.0))
    return [("random", x, p), ("all_right", x, skew)]


def v1_loss_and_grads(forward):
    def loss(x, params):
        y = forward(x, *(params[n] for n in v1.PARAM_NAMES))
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def check_v1(n_model, **kwargs):
    mesh = make_mesh((n_model,), ("model",))
    fwd = functools.partial(parallel.fff_v1_tree_parallel, depth=V1_DEPTH, mesh=mesh, **kwargs)
    ref = functools.partial(ops.fff_v1_hard, depth=V1_DEPTH, implementation="reference")
    got_fn, want_fn = v1_loss_and_grads(fwd), v1_loss_and_grads(ref)
    for name, x, p in v1_cases(n_model.bit_length() - 1):
        (_, y), grads = got_fn(x, p)
        (_, y_ref), grads_ref = want_fn(x, p)
        assert_close_per_tensor(y, y_ref)
        assert_close_per_tensor(grads, grads_ref)
        if name == "all_right":
            leaves = v1.hard_leaves(x, p["node_weights"], p["node_biases"], V1_DEPTH)
            assert bool(jnp.all(leaves >= 2**V1_DEPTH - 2**V1_DEPTH // n_model))


@pytest.mark.parametrize("n_model", [2, 8])
def test_v1_hard_equals_reference_any_skew(n_model):
    check_v1(n_model)


@pytest.mark.parametrize("n_model", [2, 8])
def test_v1_hard_runs_each_devices_subtree_through_pallas(n_model):
    # Each device's routing nodes and leaves are one FFF-v1 (of depth 0 on 8 devices) run by the kernel.
    x, p = v1_cases(0)[0][1:]
    fwd = functools.partial(parallel.fff_v1_tree_parallel, depth=V1_DEPTH, mesh=make_mesh((n_model,), ("model",)),
                            implementation="pallas")
    assert "pallas_call" in str(jax.make_jaxpr(fwd)(x, *(p[n] for n in v1.PARAM_NAMES)))
    check_v1(n_model, implementation="pallas")


def test_v1_soft_partial_mixtures_sum_to_soft_forward():
    mesh = make_mesh((2, 4), ("data", "model"))
    fwd = functools.partial(parallel.fff_v1_tree_parallel, depth=V1_DEPTH, mesh=mesh, soft=True)

    def ref(x, *weights):
        return v1.soft_forward(dict(zip(v1.PARAM_NAMES, weights)), x, depth=V1_DEPTH).y

    got_fn, want_fn = v1_loss_and_grads(fwd), v1_loss_and_grads(ref)
    _, x, p = v1_cases(2)[0]
    (_, y), grads = got_fn(x, p)
    (_, y_ref), grads_ref = want_fn(x, p)
    assert_close_per_tensor(y, y_ref)
    assert_close_per_tensor(grads, grads_ref)
    assert float(jnp.max(jnp.abs(grads[1]["node_weights"]))) > 0  # soft routing trains the nodes


@pytest.mark.slow
def test_crammed_bert_with_tree_parallel_ffn_matches_single_device():
    from fffjax.models.config import get_config
    from fffjax.models.crammed_bert import CrammedBertMLM
    from fffjax.train.objectives import mlm_objective

    config = get_config("tiny")
    model = CrammedBertMLM(config, implementation="reference", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, config.vocab_size, size=(4, 16), dtype=np.int32)
    positions = np.tile(np.arange(0, 16, 4, dtype=np.int32), (4, 1))
    batch = {"input_ids": ids, "attention_mask": np.ones((4, 16), np.int32), "mask_positions": positions,
             "mask_labels": np.take_along_axis(ids, positions, 1), "mask_weights": np.ones((4, 4), np.float32)}
    model.eval()  # no dropout: both runs see the same computation

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        fn = jax.value_and_grad(lambda p, b: mlm_objective(nnx.merge(graphdef, p, rest), b)[0])
        return jax.jit(fn), params

    fn, params = loss_and_grads(model)
    want, grads_want = fn(params, batch)
    fn, params = loss_and_grads(nn.set_tree_parallel(model, make_mesh((2, 4), ("data", "model")), "model"))
    assert "all_to_all" in fn.lower(params, batch).as_text()
    got, grads_got = fn(params, batch)
    assert_close_per_tensor(got, want)
    assert_close_per_tensor(grads_got, grads_want)

