"""``fffjax predict MODEL --input texts.txt [--out predictions.jsonl]``."""

import argparse
import json
from pathlib import Path

HELP = "the labels a fine-tuned classifier gives the texts of a file (one text per line)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="fine-tuned classifier: fffjax checkpoint, run folder or export")
    parser.add_argument("--input", type=Path, required=True, help="UTF-8 text file, one text per line")
    parser.add_argument("--out", type=Path, default=None,
                        help="write JSON lines {label, probabilities, text} there instead of printing a table")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per text (default: the model's maximum)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: MODEL's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from fffjax.cmd_embed import read_lines
    from fffjax.pretrained import from_pretrained
    from fffjax.text import predict

    texts = read_lines(args.input)
    model, tokenizer = from_pretrained(args.model, tokenizer=args.tokenizer, kind="classifier")
    probabilities = predict(model, tokenizer, texts, batch_size=args.batch_size, seq_length=args.seq_length,
                            progress=not args.no_progress and args.out is not None)
    rows = [{"label": int(p.argmax()), "probabilities": [round(float(q), 6) for q in p], "text": t}
            for p, t in zip(probabilities, texts)]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {args.out}: {len(rows)} predictions")
    else:
        for row in rows:
            print(f"{row['label']}\t{max(row['probabilities']):.4f}\t{row['text']}")
    return 0
