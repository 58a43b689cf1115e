"""``fffjax demo``: FFF-v1 against an equally wide FF on scikit-learn's digits, end to end.

Trains FFF-v1 (soft mixture plus a small hardening entropy loss) and a two-layer FF of the same
training width (``2**depth * leaf_width`` hidden units) with optax Adam; hardens the FFF (eval
mode: one leaf per sample), fine-tunes its leaves with hard decisions (the package's
``use_hard_decisions``: the routing is frozen, each leaf learns its own region) and prints the
soft and hard test accuracies and the FF's; measures the jitted hard FFF
forward (:func:`fffjax.ops.fff_v1_hard`: ``"cpu_ffi"`` on the CPU when its kernel builds, else
``"xla"``) against the jitted FF forward on the same test batch; saves an orbax checkpoint; exports the FFF to a ``fastfeedforward.FFF`` state dict file
and, when torch is installed, loads it into the PyTorch package and checks that its hard
decisions give fffjax's hard-mode predictions. Run it with ``fffjax demo`` (``--help`` for options).
"""

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from fffjax import bench, ops, v1
from fffjax.ops import cpu_ffi
from fffjax.data.vision import Split, load_digits
from fffjax.nn import FFF
from fffjax.train.checkpoint import save_checkpoint
from fffjax.train.optim import with_standard_promotion


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of the demo (all recorded in the checkpoint's config)."""

    out: str = "runs/demo"  # output directory: checkpoint/ and fff.safetensors
    seed: int = 0  # parameter init and batch order
    epochs: int = 30  # soft training epochs (the FF baseline trains epochs + hardening_epochs)
    hardening_epochs: int = 20  # leaf fine-tuning with hard decisions
    depth: int = 3  # FFF routing levels: 2**depth leaves
    leaf_width: int = 8  # hidden units per leaf; the FF baseline has 2**depth * leaf_width
    batch_size: int = 64
    learning_rate: float = 3e-3
    hardening_learning_rate: float = 1e-2
    entropy_weight: float = 0.3  # hardening loss: weight of the mean node entropy (soft phase)
    timing_repeats: int = 30  # timed repeats (median reported), each `timing_calls` calls
    timing_calls: int = 20


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo measured."""

    fff_soft_accuracy: float  # after soft training, train mode
    fff_hard_accuracy_before: float  # after soft training, eval mode (hard descent)
    fff_hard_accuracy: float  # after the hardening fine-tune, eval mode
    ff_accuracy: float
    fff_hard_seconds: float  # median time of one jitted hard FFF forward on the test batch
    ff_seconds: float  # the same for the jitted FF forward
    speedup: float  # ff_seconds / fff_hard_seconds
    checkpoint: Path
    export: Path | None  # None when safetensors is not installed
    torch_agreement: float | None  # argmax agreement of fastfeedforward's hard decisions with fffjax
    torch_max_abs_diff: float | None
    legacy_agreement: float | None  # 0.2.1 eval() vs fffjax legacy_eval=True
    legacy_max_abs_diff: float | None
    wall_seconds: float


class MLP(nnx.Module):
    """The FF baseline: ``Linear -> ReLU -> Linear``."""

    def __init__(self, in_features: int, hidden: int, out_features: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
        self.output = nnx.Linear(hidden, out_features, rngs=rngs)

    def __call__(self, x):
        return self.output(jax.nn.relu(self.hidden(x)))


def ff_forward(x, w1, b1, w2, b2):
    """The FF baseline as a pure function (what the speed comparison times)."""
    return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def fff_loss(model: FFF, x, y, entropy_weight: float, hard: bool = False):
    logits, entropies = model(x, return_entropies=True, use_hard_decisions=hard)
    task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    entropy = entropies.mean() if entropies.size else jnp.zeros(())
    return task + entropy_weight * entropy, (logits, entropy)


def ff_loss(model: MLP, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, jnp.zeros(()))


def train(
    model: nnx.Module, loss_fn, data: Split, *, epochs: int, learning_rate: float, batch_size: int,
    seed: int, desc: str,
) -> list[dict]:
    """Adam on ``loss_fn(model, x, y) -> (loss, (logits, entropy))``; updates ``model`` in place.

    Returns per-epoch metrics (mean loss, train accuracy, mean node entropy).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = with_standard_promotion(optax.adam(learning_rate))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def objective(p):
            return loss_fn(nnx.merge(graphdef, p, rest), x, y)

        (loss, (logits, entropy)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return optax.apply_updates(params, updates), opt_state, loss, correct, entropy

    rng = np.random.default_rng(seed)
    n_batches = max(1, len(data.x_train) // batch_size)
    example = data.x_train[:batch_size], data.y_train[:batch_size]
    step = step.lower(params, opt_state, *example).compile()  # before the bar, so its rate is honest
    history = []
    with tqdm(total=epochs * n_batches, desc=desc, unit="step", leave=True) as bar:
        for epoch in range(epochs):
            order = rng.permutation(len(data.x_train))[: n_batches * batch_size]
            losses, corrects, entropies = [], [], []
            for batch in order.reshape(n_batches, -1):
                params, opt_state, loss, correct, entropy = step(
                    params, opt_state, data.x_train[batch], data.y_train[batch])
                losses.append(loss), corrects.append(correct), entropies.append(entropy)
                bar.update()
            metrics = {
                "epoch": epoch + 1,
                "loss": float(np.mean(jax.device_get(losses))),
                "train_acc": float(np.sum(jax.device_get(corrects)) / order.size),
                "entropy": float(np.mean(jax.device_get(entropies))),
            }
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['train_acc']:.3f}",
                            H=f"{metrics['entropy']:.3f}")
    nnx.update(model, params)
    return history


@jax.jit
def predict(model: nnx.Module, x):
    """``model(x)`` jitted (modules are pytrees; the train/eval mode is static, one trace each)."""
    return model(x)


def accuracy(model: nnx.Module, x, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predict(model, x)).argmax(-1) == labels))


def check_in_fastfeedforward(export_path: Path, fff: FFF, x_test: np.ndarray) -> dict | None:
    """Load the exported file into ``fastfeedforward.FFF`` (strict) and compare its hard outputs with fffjax's.

    Returns ``None`` when torch or fastfeedforward is not installed.
    """
    try:
        import fastfeedforward
        import torch
    except ImportError:
        return None
    from fffjax.convert import import_fastfeedforward, load

    state_dict = load(export_path)
    torch_fff = fastfeedforward.FFF(fff.in_features, fff.leaf_width, fff.out_features, fff.depth)
    torch_fff.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    x = torch.from_numpy(np.asarray(x_test, np.float32))
    torch_fff.train()
    with torch.no_grad():
        torch_hard = torch_fff.training_forward(x, use_hard_decisions=True).numpy()
    fff.eval()
    ours = np.asarray(predict(fff, jnp.asarray(x_test)))
    # 0.2.1's eval() drops the leaf output bias: compare it only with legacy_eval=True.
    legacy = import_fastfeedforward(state_dict, legacy_eval=True)
    legacy.eval()
    torch_fff.eval()
    with torch.no_grad():
        torch_legacy = torch_fff(x).numpy()
    ours_legacy = np.asarray(predict(legacy, jnp.asarray(x_test)))
    return {
        "agreement": float(np.mean(torch_hard.argmax(-1) == ours.argmax(-1))),
        "max_abs_diff": float(np.max(np.abs(torch_hard - ours))),
        "legacy_agreement": float(np.mean(torch_legacy.argmax(-1) == ours_legacy.argmax(-1))),
        "legacy_max_abs_diff": float(np.max(np.abs(torch_legacy - ours_legacy))),
    }


def run_demo(config: DemoConfig = DemoConfig(), *, print_fn=print) -> DemoResult:
    """Run the whole demo and return its measurements (printing a report through ``print_fn``)."""
    from fffjax.convert import export_fastfeedforward, save

    start = time.perf_counter()
    data = load_digits(seed=config.seed)
    n_features, n_classes = data.x_train.shape[1], data.n_classes
    width = 2**config.depth * config.leaf_width
    print_fn(f"digits: {len(data.x_train)} train / {len(data.x_test)} test, {n_features} features, "
             f"{n_classes} classes; jax {jax.__version__} on {jax.default_backend()}")
    print_fn(f"FFF-v1 depth {config.depth}, leaf width {config.leaf_width} (training width {width}, "
             f"inference width {config.depth} + {config.leaf_width}) vs FF of width {width}")

    key_fff, key_ff = jax.random.split(jax.random.key(config.seed))
    fff = FFF(n_features, config.leaf_width, n_classes, config.depth, rngs=nnx.Rngs(params=key_fff))
    mlp = MLP(n_features, width, n_classes, rngs=nnx.Rngs(params=key_ff))
    common = dict(data=data, batch_size=config.batch_size, seed=config.seed)
    train(fff, lambda m, x, y: fff_loss(m, x, y, config.entropy_weight), epochs=config.epochs,
          learning_rate=config.learning_rate, desc="FFF-v1 soft", **common)
    x_test = jnp.asarray(data.x_test)
    soft_acc = accuracy(fff, x_test, data.y_test)
    fff.eval()  # hard descent: one leaf per sample, the leaf output bias included
    hard_before = accuracy(fff, x_test, data.y_test)
    fff.train()
    # Hardening: rounded decisions, so the routing gets no gradient and each leaf fits its region.
    train(fff, lambda m, x, y: fff_loss(m, x, y, 0.0, hard=True), epochs=config.hardening_epochs,
          learning_rate=config.hardening_learning_rate, desc="FFF-v1 hard", **common)
    fff.eval()
    hard_acc = accuracy(fff, x_test, data.y_test)
    train(mlp, ff_loss, epochs=config.epochs + config.hardening_epochs,
          learning_rate=config.learning_rate, desc="FF         ", **common)
    ff_acc = accuracy(mlp, x_test, data.y_test)
    print_fn(f"FFF-v1 test accuracy after soft training: soft {soft_acc:.4f}, hard (eval mode) {hard_before:.4f}")
    print_fn(f"FFF-v1 test accuracy after {config.hardening_epochs} hardened epochs: hard {hard_acc:.4f}")
    print_fn(f"FF     test accuracy: {ff_acc:.4f}")

    p = fff.params()
    fff_weights = tuple(p[name] for name in v1.PARAM_NAMES)
    ff_weights = (mlp.hidden.kernel[...], mlp.hidden.bias[...], mlp.output.kernel[...], mlp.output.bias[...])
    implementation = "cpu_ffi" if jax.default_backend() == "cpu" and cpu_ffi.available() else "xla"
    fff_hard = jax.jit(lambda x, w: ops.fff_v1_hard(x, *w, depth=config.depth, implementation=implementation))
    ff_dense = jax.jit(lambda x, w: ff_forward(x, *w))
    # Interleaved rounds of `timing_calls` back-to-back calls, the last one waited for: dispatch
    # overlaps compute as in a serving loop.
    timings = bench.side_by_side(
        {"fff": lambda: fff_hard(x_test, fff_weights), "ff": lambda: ff_dense(x_test, ff_weights)},
        rounds=config.timing_repeats, calls=config.timing_calls)
    times = {name: timing.median_s for name, timing in timings.items()}
    speedup = times["ff"] / times["fff"]
    print_fn(f"hard inference on the {len(data.x_test)}-sample test batch (jitted, median of "
             f"{config.timing_repeats}x{config.timing_calls} calls): FFF hard ({implementation}) "
             f"{times['fff'] * 1e6:.1f} us, FF {times['ff'] * 1e6:.1f} us -> speedup {speedup:.2f}x")
    fff_macs = config.depth * n_features + config.leaf_width * (n_features + n_classes)
    ff_macs = width * (n_features + n_classes)
    print_fn(f"multiply-adds per sample: FFF hard {fff_macs}, FF {ff_macs} ({ff_macs / fff_macs:.1f}x fewer)")
    if speedup < 1:
        print_fn("  (at this size the FF is one small matmul; the FFF's dependent per-level row gathers "
                 "cost more than the arithmetic they save)")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_config = {
        "model": "fffjax.nn.FFF", "in_features": n_features, "out_features": n_classes,
        "activation": "relu", **dataclasses.asdict(config),
        "results": {"fff_soft_accuracy": soft_acc, "fff_hard_accuracy_before_hardening": hard_before,
                    "fff_hard_accuracy": hard_acc, "ff_accuracy": ff_acc, "speedup": speedup},
    }
    params = {
        "fff": nnx.to_pure_dict(nnx.state(fff, nnx.Param)),
        "ff": nnx.to_pure_dict(nnx.state(mlp, nnx.Param)),
    }
    checkpoint = save_checkpoint(out / "checkpoint", params, ckpt_config, overwrite=True)
    print_fn(f"orbax checkpoint: {checkpoint}")
    try:
        export = save(export_fastfeedforward(fff), out / "fff.safetensors")
        print_fn(f"exported to fastfeedforward.FFF's state dict: {export}")
    except ImportError:  # safetensors comes with the `torch` extra
        export = None
        print_fn("safetensors not installed (pip install -e '.[torch]'): skipped the export")

    check = check_in_fastfeedforward(export, fff, data.x_test) if export is not None else None
    if check is None:
        print_fn("torch / fastfeedforward not installed: skipped the check in PyTorch")
    else:
        n = len(data.x_test)
        print_fn(f"fastfeedforward.FFF (strict load) hard decisions vs fffjax hard mode: argmax agreement "
                 f"{check['agreement']:.2%} ({round(check['agreement'] * n)}/{n}), "
                 f"max abs diff {check['max_abs_diff']:.2e}")
        print_fn(f"fastfeedforward 0.2.1 eval() vs fffjax legacy_eval=True: argmax agreement "
                 f"{check['legacy_agreement']:.2%}, max abs diff {check['legacy_max_abs_diff']:.2e}")
    wall = time.perf_counter() - start
    print_fn(f"wall time {wall:.1f} s")
    check = check or {}
    return DemoResult(
        soft_acc, hard_before, hard_acc, ff_acc, times["fff"], times["ff"], speedup, checkpoint, export,
        check.get("agreement"), check.get("max_abs_diff"), check.get("legacy_agreement"),
        check.get("legacy_max_abs_diff"), wall)


# --------------------------------------------------------------------------- CLI


HELP = "train FFF-v1 and an equally wide FF on digits, harden, time, checkpoint, export to PyTorch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fffjax demo`` options."""
    defaults = DemoConfig()
    parser.add_argument("--out", default=defaults.out, help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (default: %(default)s)")
    parser.add_argument("--hardening-epochs", type=int, default=defaults.hardening_epochs,
                        help="leaf fine-tuning epochs with hard decisions (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=defaults.depth, help="FFF depth (default: %(default)s)")
    parser.add_argument("--leaf-width", type=int, default=defaults.leaf_width,
                        help="FFF leaf width (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; returns the exit status."""
    for name, low in (("epochs", 1), ("leaf_width", 1), ("hardening_epochs", 0), ("depth", 0)):
        if getattr(args, name) < low:
            raise SystemExit(f"fffjax demo: --{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    result = run_demo(DemoConfig(
        out=args.out, seed=args.seed, epochs=args.epochs, hardening_epochs=args.hardening_epochs,
        depth=args.depth, leaf_width=args.leaf_width))
    if result.torch_agreement is not None and result.torch_agreement < 1.0:
        print("warning: fastfeedforward's hard decisions disagree with fffjax on some samples")
        return 1
    return 0
