"""``fffjax generate MODEL "prompt" [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]``."""

import argparse
import sys

HELP = "continue a prompt with a causal LM checkpoint, streaming the tokens to the terminal"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="fffjax checkpoint, run folder or `fffjax export` folder of a causal LM")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens to add (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the most likely tokens holding this probability (1: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: MODEL's)")
    parser.add_argument("--tokens-per-call", type=int, default=1,
                        help="decode steps per jitted call (default 1); more spares the host a dispatch per token "
                             "and streams the text in pieces of that many tokens")


def run(args: argparse.Namespace) -> int:
    from fffjax.data.tokenizer import Tokenizer
    from fffjax.generate import load_causal_lm, stream_text
    from fffjax.pretrained import find_tokenizer

    model = load_causal_lm(args.model)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer is not None else find_tokenizer(args.model)
    if tokenizer is None:
        raise FileNotFoundError(f"model {args.model} holds no tokenizer (tokenizer.json beside the weights or in its "
                                "run folder); pass --tokenizer <folder or tokenizer.json>")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             tokens_per_call=args.tokens_per_call):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
