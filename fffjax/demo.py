"""``fffjax demo``: FFF-v1 against an equally wide FF on scikit-learn's digits, end to end.

Trains FFF-v1 (soft mixture plus a small hardening entropy loss) and a two-layer FF of the same
training width (``2**depth * leaf_width`` hidden units) with the flat trainer
(:mod:`fffjax.train.flat`); hardens the FFF (hard descent: one leaf per sample), fine-tunes its
leaves with rounded decisions (the routing is frozen, each leaf learns its own region) and prints
the soft and hard test accuracies and the FF's; times the jitted hard FFF forward
(:func:`fffjax.ops.fff_v1_hard`: ``"cpu_ffi"`` on the CPU when its kernel builds, else ``"xla"``)
against the jitted FF forward on the same test batch; saves an orbax checkpoint of both parameter
dicts (its config records their :class:`~fffjax.train.flat.ModelSpec`); exports the FFF to a
``fastfeedforward.FFF`` state dict file and, when torch is installed, loads it into the PyTorch
package and checks that its hard decisions give fffjax's hard-mode predictions. Run it with
``fffjax demo`` (``--help`` for options).
"""

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fffjax import bench, ops, v1
from fffjax.data.vision import load_digits
from fffjax.nn import FFF
from fffjax.ops import cpu_ffi
from fffjax.train import flat
from fffjax.train.checkpoint import save_checkpoint


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
    ours = np.asarray(fff(jnp.asarray(x_test)))
    # 0.2.1's eval() drops the leaf output bias: compare it only with legacy_eval=True.
    legacy = import_fastfeedforward(state_dict, legacy_eval=True)
    legacy.eval()
    torch_fff.eval()
    with torch.no_grad():
        torch_legacy = torch_fff(x).numpy()
    ours_legacy = np.asarray(legacy(jnp.asarray(x_test)))
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

    x_train, y_train, x_test, y_test = data.x_train, data.y_train, jnp.asarray(data.x_test), data.y_test
    fff_spec = flat.ModelSpec("fff", n_features, n_classes, depth=config.depth, width=config.leaf_width)
    ff_spec = flat.ModelSpec("ff", n_features, n_classes, width=width)
    recipe = dict(batch_size=config.batch_size, seed=config.seed)
    soft = flat.train(fff_spec, flat.FlatTrainConfig(epochs=config.epochs, learning_rate=config.learning_rate,
                                                     hardening=config.entropy_weight, **recipe),
                      x_train, y_train, progress="FFF-v1 soft")
    soft_acc = flat.accuracy(fff_spec, soft.params, x_test, y_test, mode="soft")
    # Hard descent: one leaf per sample, the leaf output bias included.
    hard_before = flat.accuracy(fff_spec, soft.params, x_test, y_test, mode="hard")
    fff_params = soft.params
    if config.hardening_epochs:
        # Rounded decisions: the routing gets no gradient and each leaf fits its own region.
        hardening = flat.FlatTrainConfig(epochs=config.hardening_epochs, hard_epochs=config.hardening_epochs,
                                         learning_rate=config.hardening_learning_rate, **recipe)
        fff_params = flat.train(fff_spec, hardening, x_train, y_train, params=soft.params,
                                progress="FFF-v1 hard").params
    hard_acc = flat.accuracy(fff_spec, fff_params, x_test, y_test, mode="hard")
    ff = flat.train(ff_spec, flat.FlatTrainConfig(epochs=config.epochs + config.hardening_epochs,
                                                  learning_rate=config.learning_rate, **recipe),
                    x_train, y_train, progress="FF")
    ff_acc = flat.accuracy(ff_spec, ff.params, x_test, y_test)
    print_fn(f"FFF-v1 test accuracy after soft training: soft {soft_acc:.4f}, hard (eval mode) {hard_before:.4f}")
    print_fn(f"FFF-v1 test accuracy after {config.hardening_epochs} hardened epochs: hard {hard_acc:.4f}")
    print_fn(f"FF     test accuracy: {ff_acc:.4f}")

    fff_weights = tuple(fff_params[name] for name in v1.PARAM_NAMES)
    implementation = "cpu_ffi" if jax.default_backend() == "cpu" and cpu_ffi.available() else "xla"
    fff_hard = jax.jit(lambda x, w: ops.fff_v1_hard(x, *w, depth=config.depth, implementation=implementation))
    ff_dense = jax.jit(flat.ff_forward)
    # Interleaved rounds of `timing_calls` back-to-back calls, the last one waited for: dispatch
    # overlaps compute as in a serving loop.
    timings = bench.side_by_side(
        {"fff": lambda: fff_hard(x_test, fff_weights), "ff": lambda: ff_dense(ff.params, x_test)},
        rounds=config.timing_repeats, calls=config.timing_calls)
    times = {name: timing.median_s for name, timing in timings.items()}
    speedup = times["ff"] / times["fff"]
    print_fn(f"hard inference on the {len(data.x_test)}-sample test batch (jitted, median of "
             f"{config.timing_repeats}x{config.timing_calls} calls): FFF hard ({implementation}) "
             f"{times['fff'] * 1e6:.1f} us, FF {times['ff'] * 1e6:.1f} us -> speedup {speedup:.2f}x")
    fff_macs, ff_macs = flat.inference_flops(fff_spec) // 2, flat.inference_flops(ff_spec) // 2
    print_fn(f"multiply-adds per sample: FFF hard {fff_macs}, FF {ff_macs} ({ff_macs / fff_macs:.1f}x fewer)")
    if speedup < 1:
        print_fn("  (at this size the FF is one small matmul; the FFF's dependent per-level row gathers "
                 "cost more than the arithmetic they save)")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_config = {
        "model": "fffjax.nn.FFF", "in_features": n_features, "out_features": n_classes,
        "activation": "relu", **dataclasses.asdict(config),
        "specs": {"fff": dataclasses.asdict(fff_spec), "ff": dataclasses.asdict(ff_spec)},
        "results": {"fff_soft_accuracy": soft_acc, "fff_hard_accuracy_before_hardening": hard_before,
                    "fff_hard_accuracy": hard_acc, "ff_accuracy": ff_acc, "speedup": speedup},
    }
    params = {"fff": fff_params, "ff": ff.params}
    checkpoint = save_checkpoint(out / "checkpoint", params, ckpt_config, overwrite=True)
    fff = flat.to_module(fff_spec, fff_params)
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
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    result = run_demo(DemoConfig(
        out=args.out, seed=args.seed, epochs=args.epochs, hardening_epochs=args.hardening_epochs,
        depth=args.depth, leaf_width=args.leaf_width))
    if result.torch_agreement is not None and result.torch_agreement < 1.0:
        print("warning: fastfeedforward's hard decisions disagree with fffjax on some samples")
        return 1
    return 0
