"""``fffjax import DIR OUT [--overwrite]``."""

import argparse

HELP = ("read a published-layout UltraFastBERT / crammed-BERT directory, or an exported causal LM or BERT, into an "
        "fffjax checkpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src_dir", metavar="DIR",
                        help="config.json + model.safetensors, pytorch_model.bin or *.pt (read with weights_only=True)")
    parser.add_argument("out", metavar="OUT", help="orbax checkpoint directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def run(args: argparse.Namespace) -> int:
    from fffjax.convert.hf import cmd_import

    out = cmd_import(args.src_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
