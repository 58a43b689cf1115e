"""FFF-v1 local optimizers against fastfeedforward 0.2.1's LocalSGD / LocalAdam and per-row torch references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fffjax.nn import FFF
from fffjax.train import local_optim, optim

LBS = 8
STEPS = 7
# Shapes in the package's layout; node group and leaf group share one usage vector each.
SHAPES = {
    "node_weights": (3, 5), "node_biases": (3, 1),
    "w1s": (4, 5, 2), "b1s": (4, 2), "w2s": (4, 2, 3), "b2s": (4, 3),
}


def _trajectory(seed=0):
    """Initial params, per-step grads and per-step usage increments (rows cross LBS at different steps)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    node_inc = rng.uniform(0, 6, size=(STEPS, 3)).astype(np.float32)
    leaf_inc = rng.uniform(0, 6, size=(STEPS, 4)).astype(np.float32)
    node_inc[:, 2] = 0.0  # a node never used: never updated (and 0 usage in the scaling)
    leaf_inc[:, 0] = 20.0  # a leaf updated every step
    return params, grads, node_inc, leaf_inc


def _run_torch(make_optimizer, params, grads, node_inc, leaf_inc):
    torch = pytest.importorskip("torch")
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    node_usage, leaf_usage = torch.zeros(3), torch.zeros(4)
    groups = [
        {"params": [tp["node_weights"], tp["node_biases"]], "usage": node_usage},
        {"params": [tp[k] for k in ("w1s", "b1s", "w2s", "b2s")], "usage": leaf_usage},
    ]
    opt = make_optimizer(groups)
    out = []
    for step in range(STEPS):
        opt.zero_grad()
        node_usage += torch.tensor(node_inc[step])  # the forward's usage update
        leaf_usage += torch.tensor(leaf_inc[step])
        for k, p in tp.items():  # backward accumulates into .grad
            g = torch.tensor(grads[step][k])
            p.grad = g if p.grad is None else p.grad + g
        opt.step()
        out.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    return out


def _run_jax(tx, params, grads, node_inc, leaf_inc):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    node_usage, leaf_usage = jnp.zeros(3), jnp.zeros(4)
    step_fn = jax.jit(lambda g, s, p, u: tx.update(g, s, p, usage=u))
    out = []
    for step in range(STEPS):
        node_usage = node_usage + node_inc[step]
        leaf_usage = leaf_usage + leaf_inc[step]
        usage = local_optim.v1_usage(params, node_usage, leaf_usage)
        updates, state = step_fn(jax.tree.map(jnp.asarray, grads[step]), state, params, usage)
        params = optax.apply_updates(params, updates)
        node_usage = local_optim.reset_usage(node_usage, LBS)
        leaf_usage = local_optim.reset_usage(leaf_usage, LBS)
        out.append(jax.tree.map(np.asarray, params))
    return out


def _assert_trajectories_close(got, want):
    for step, (g, w) in enumerate(zip(got, want)):
        for k in SHAPES:
            np.testing.assert_allclose(g[k], w[k], rtol=2e-6, atol=2e-6, equal_nan=True,
                                       err_msg=f"step {step}, {k}")


def _skips_and_updates(node_inc, leaf_inc):
    """Sanity of the trajectory itself: some rows wait several steps, some update every step."""
    usage = np.cumsum(node_inc, axis=0)
    assert (usage[:, 2] == 0).all() and (np.cumsum(leaf_inc, 0)[:, 0] >= LBS).all()
    assert (usage[0, :2] < LBS).any()


ADAM_CONFIGS = [
    dict(),
    dict(weight_decay=0.1),
    dict(amsgrad=True, betas=(0.8, 0.99)),
]


@pytest.mark.torch
@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_local_adam_legacy_matches_package(config):
    LocalAdam = pytest.importorskip("fastfeedforward.optim").LocalAdam
    params, grads, node_inc, leaf_inc = _trajectory()
    _skips_and_updates(node_inc, leaf_inc)
    want = _run_torch(lambda g: LocalAdam(g, lr=0.05, local_batch_size=LBS, **config),
                      params, grads, node_inc, leaf_inc)
    b1, b2 = config.get("betas", (0.9, 0.999))
    tx = local_optim.local_adam(0.05, b1, b2, weight_decay=config.get("weight_decay", 0.0),
                          amsgrad=config.get("amsgrad", False), local_batch_size=LBS, legacy=True)
    _assert_trajectories_close(_run_jax(tx, params, grads, node_inc, leaf_inc), want)


SGD_CONFIGS = [
    dict(),
    dict(weight_decay=0.1),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True),
]


@pytest.mark.torch
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_local_sgd_legacy_matches_package(config):
    LocalSGD = pytest.importorskip("fastfeedforward.optim").LocalSGD
    params, grads, node_inc, leaf_inc = _trajectory(1)
    want = _run_torch(lambda g: LocalSGD(g, lr=0.05, local_batch_size=LBS, **config),
                      params, grads, node_inc, leaf_inc)
    tx = local_optim.local_sgd(0.05, local_batch_size=LBS, legacy=True, **config)
    _assert_trajectories_close(_run_jax(tx, params, grads, node_inc, leaf_inc), want)


def _per_row_reference(make_row_optimizer, params, grads, node_inc, leaf_inc):
    """Every row as its own torch optimizer stepped on its scaled local-batch gradient sums."""
    torch = pytest.importorskip("torch")
    rows = {k: [torch.nn.Parameter(torch.tensor(v[r])) for r in range(v.shape[0])] for k, v in params.items()}
    opts = {k: [make_row_optimizer([p]) for p in ps] for k, ps in rows.items()}
    sums = {k: np.zeros_like(v) for k, v in params.items()}
    node_usage, leaf_usage = np.zeros(3, np.float32), np.zeros(4, np.float32)
    out = []
    for step in range(STEPS):
        node_usage += node_inc[step]
        leaf_usage += leaf_inc[step]
        for k in params:
            usage = node_usage if k.startswith("node") else leaf_usage
            sums[k] += grads[step][k]
            for r, p in enumerate(rows[k]):
                if usage[r] >= LBS:
                    p.grad = torch.tensor(sums[k][r] * np.float32(LBS / usage[r]))
                    opts[k][r].step()
                    sums[k][r] = 0
        node_usage[node_usage >= LBS] = 0
        leaf_usage[leaf_usage >= LBS] = 0
        out.append({k: np.stack([p.detach().numpy() for p in ps]) for k, ps in rows.items()})
    return out


@pytest.mark.torch
@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_local_adam_rows_are_torch_adam(config):
    torch = pytest.importorskip("torch")
    params, grads, node_inc, leaf_inc = _trajectory(2)
    want = _per_row_reference(lambda p: torch.optim.Adam(p, lr=0.05, **config), params, grads, node_inc, leaf_inc)
    b1, b2 = config.get("betas", (0.9, 0.999))
    tx = local_optim.local_adam(0.05, b1, b2, weight_decay=config.get("weight_decay", 0.0),
                          amsgrad=config.get("amsgrad", False), local_batch_size=LBS)
    _assert_trajectories_close(_run_jax(tx, params, grads, node_inc, leaf_inc), want)


@pytest.mark.torch
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_local_sgd_rows_are_torch_sgd(config):
    torch = pytest.importorskip("torch")
    params, grads, node_inc, leaf_inc = _trajectory(3)
    want = _per_row_reference(lambda p: torch.optim.SGD(p, lr=0.05, **config), params, grads, node_inc, leaf_inc)
    tx = local_optim.local_sgd(0.05, local_batch_size=LBS, **config)
    _assert_trajectories_close(_run_jax(tx, params, grads, node_inc, leaf_inc), want)


def test_legacy_adam_differs_from_corrected_only_after_a_skip():
    params, grads, node_inc, leaf_inc = _trajectory(4)
    legacy = _run_jax(local_optim.local_adam(0.05, local_batch_size=LBS, legacy=True), params, grads,
                      node_inc, leaf_inc)
    fixed = _run_jax(local_optim.local_adam(0.05, local_batch_size=LBS), params, grads, node_inc, leaf_inc)
    np.testing.assert_array_equal(legacy[-1]["w1s"][0], fixed[-1]["w1s"][0])  # leaf 0 never skips
    assert not np.allclose(legacy[-1]["w1s"][1:], fixed[-1]["w1s"][1:])


def test_rows_below_threshold_are_untouched_and_accumulate():
    params = {"w": jnp.ones((3, 2))}
    tx = local_optim.local_sgd(1.0, local_batch_size=4)
    state = tx.init(params)
    g = {"w": jnp.ones((3, 2))}
    updates, state = tx.update(g, state, params, usage={"w": jnp.array([0.0, 3.0, 4.0])})
    np.testing.assert_array_equal(updates["w"], [[0, 0], [0, 0], [-1, -1]])
    np.testing.assert_array_equal(state.grad_sum["w"], [[1, 1], [1, 1], [0, 0]])
    # Row 1 reaches 8 after accumulating two gradients: step = 2 * 4 / 8 = 1.
    updates, state = tx.update(g, state, params, usage={"w": jnp.array([0.0, 8.0, 0.0])})
    np.testing.assert_array_equal(updates["w"], [[0, 0], [-1, -1], [0, 0]])
    np.testing.assert_array_equal(local_optim.reset_usage(jnp.array([0.0, 8.0, 7.5]), 8), [0.0, 0.0, 7.5])


def test_params_without_usage_step_every_time_as_adam():
    params = {"w": jnp.array([[1.0, -2.0]]), "fff": jnp.ones((2, 2))}
    grads = {"w": jnp.array([[0.5, 0.25]]), "fff": jnp.ones((2, 2))}
    tx = local_optim.local_adam(0.1, local_batch_size=4)
    ref = optim.with_standard_promotion(optax.adam(0.1, eps=1e-8))
    state, ref_state = tx.init(params), ref.init(params["w"])
    for _ in range(3):
        updates, state = tx.update(grads, state, params, usage={"w": None, "fff": jnp.zeros(2)})
        ref_updates, ref_state = ref.update(grads["w"], ref_state)
        np.testing.assert_allclose(updates["w"], ref_updates, rtol=1e-6)
        np.testing.assert_array_equal(updates["fff"], 0.0)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="local_batch_size"):
        local_optim.local_adam(1e-3, local_batch_size=0)
    with pytest.raises(ValueError, match="nesterov"):
        local_optim.local_sgd(1e-3, nesterov=True, local_batch_size=4)
    tx = local_optim.local_sgd(1.0, local_batch_size=4)
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"usage\['w'\] must have shape \(3,\)"):
        tx.update(params, tx.init(params), params, usage={"w": jnp.zeros(2)})


def test_nnx_optimizer_step_with_module_usage():
    model = FFF(6, 3, 2, 2, usage_mode="soft", rngs=nnx.Rngs(0))
    tx = local_optim.local_adam(1e-2, local_batch_size=12)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 6))
    before = nnx.state(model, nnx.Param)
    before = jax.tree.map(lambda a: np.array(a), nnx.as_pure(before))

    @nnx.jit
    def train_step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads, usage=local_optim.fff_usage(model))
        local_optim.reset_fff_usage(model, 12)

    train_step(model, optimizer, x)  # root usage 8 < 12: nothing moves, usage kept
    np.testing.assert_array_equal(model.node_weights[...], before["node_weights"])
    assert model.node_usage[0] == 8
    train_step(model, optimizer, x)  # root reaches 16: updated and reset
    assert model.node_usage[0] == 0
    assert not np.allclose(model.node_weights[0], before["node_weights"][0])
    usage = local_optim.fff_usage(model)
    assert usage["node_biases"].shape == (3,) and usage["w1s"].shape == (4,)
