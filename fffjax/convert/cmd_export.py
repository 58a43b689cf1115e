"""``fffjax export CHECKPOINT OUT_DIR [--format hf|safetensors|pt] [--tokenizer PATH] [--overwrite]``."""

import argparse

HELP = ("write a checkpoint's model as a Hugging Face folder: crammed BERT in the published UltraFastBERT layout, "
        "a causal LM as a decoder folder, a BERT encoder (FFF slots and all) as a BERT folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="fffjax checkpoint or training-run directory (its latest step)")
    parser.add_argument("out_dir", help="directory to create: config.json, the weights, the modeling files "
                                        "(modeling_crammed_bert.py; a causal LM's also modeling_fff_decoder.py, "
                                        "a BERT's modeling_fff_bert.py) and the tokenizer files; it loads in "
                                        "transformers with trust_remote_code")
    parser.add_argument("--format", choices=("hf", "safetensors", "pt"), default="hf",
                        help="weights file: model.safetensors (hf, the default; safetensors is the same) or "
                             "pytorch_model.bin (pt, torch.save)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or tokenizer.json to write beside the weights (default: the one "
                             "stored with the checkpoint, if any)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def run(args: argparse.Namespace) -> int:
    from fffjax.convert.hf import cmd_export
    from fffjax.data.tokenizer import Tokenizer
    from fffjax.pretrained import find_tokenizer

    tokenizer = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer else find_tokenizer(args.checkpoint)
    out = cmd_export(args.checkpoint, args.out_dir, fmt=args.format, overwrite=args.overwrite, tokenizer=tokenizer)
    print(f"wrote {out}" + ("" if tokenizer is not None else " (no tokenizer stored with the checkpoint: "
                                                                "pass --tokenizer to include one)"))
    return 0
