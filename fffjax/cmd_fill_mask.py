"""``fffjax fill-mask MODEL TEXT [--top-k K] [--json]``."""

import argparse
import json

HELP = "the most likely tokens at each mask token of a text (MODEL: published folder, export or checkpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="published Hugging Face folder, fffjax export, checkpoint or run folder")
    parser.add_argument("text", help="text with the tokenizer's mask token, e.g. 'the capital of france is <mask>.'")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per mask token (default 5)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: MODEL's)")
    parser.add_argument("--json", action="store_true", help="print one JSON list per mask token")


def run(args: argparse.Namespace) -> int:
    from fffjax.pretrained import from_pretrained
    from fffjax.text import fill_mask

    model, tokenizer = from_pretrained(args.model, tokenizer=args.tokenizer, kind="mlm")
    text = args.text
    if tokenizer.mask_token not in text:  # accept the other common spelling of the mask token
        text = text.replace("[MASK]" if tokenizer.mask_token == "<mask>" else "<mask>", tokenizer.mask_token)
    results = fill_mask(model, tokenizer, text, top_k=args.top_k)
    for index, candidates in enumerate(results):
        if args.json:
            print(json.dumps(candidates))
            continue
        if len(results) > 1:
            print(f"mask {index + 1}:")
        for candidate in candidates:
            print(f"  {candidate['score']:.4f}  {candidate['token']:<16} {candidate['sequence']}")
    return 0
