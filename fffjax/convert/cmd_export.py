"""``fffjax export CHECKPOINT OUT_DIR [--format safetensors|pt] [--overwrite]``."""

import argparse

HELP = "write a checkpoint's crammed-BERT model in the published UltraFastBERT Hugging Face layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="fffjax checkpoint or training-run directory (its latest step)")
    parser.add_argument("out_dir", help="directory to create: config.json + model.safetensors (or pytorch_model.bin)")
    parser.add_argument("--format", choices=("safetensors", "pt"), default="safetensors",
                        help="weights file: model.safetensors (default) or pytorch_model.bin (torch.save)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def run(args: argparse.Namespace) -> int:
    from fffjax.convert.hf import cmd_export

    out = cmd_export(args.checkpoint, args.out_dir, fmt=args.format, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
