"""``fffjax inspect CHECKPOINT [--json]``."""

import argparse
import json

HELP = "show a checkpoint's model config, parameter counts, step and metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="fffjax checkpoint or training-run directory (its latest step)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from fffjax.train.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint  {info['path']}")
    print(f"model       {info['kind']}")
    print(f"step        {info['step'] if info['step'] is not None else '-'}")
    print("config      " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    print("parameters")
    for name, count in info["parameters"].items():
        print(f"  {name:<22} {count:>14,}")
    if info["metrics"]:
        print("metrics     " + ", ".join(f"{k}={v}" for k, v in info["metrics"].items()))
    return 0
