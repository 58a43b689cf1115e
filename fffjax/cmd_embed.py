"""``fffjax embed MODEL --input texts.txt --out emb.npy``."""

import argparse
from pathlib import Path

HELP = ("mean-pooled sentence embeddings of a text file (one text per line) into a .npy file; for a BERT "
        "sentence encoder (all-MiniLM-L6-v2's folder or a BERT checkpoint) its normalised sentence embeddings")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="published Hugging Face folder, fffjax export, checkpoint or run folder")
    parser.add_argument("--input", type=Path, required=True, help="UTF-8 text file, one text per line")
    parser.add_argument("--out", type=Path, required=True, help="the .npy file to write: (n_texts, hidden) float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per text (default: the model's maximum; a BERT's tokenizer's model_max_length)")
    parser.add_argument("--normalize", action="store_true",
                        help="L2-normalise each embedding (a BERT sentence encoder's always are: its own pooling)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: MODEL's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file (the texts of `embed` and `predict`)."""
    if not path.is_file():
        raise FileNotFoundError(f"--input: no file {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--input: {path} holds no text")
    return texts


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from fffjax.pretrained import from_pretrained
    from fffjax.text import embed

    texts = read_lines(args.input)
    model, tokenizer = from_pretrained(args.model, tokenizer=args.tokenizer)
    embeddings = embed(model, tokenizer, texts, batch_size=args.batch_size, seq_length=args.seq_length,
                       normalize=True if args.normalize else None, progress=not args.no_progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, embeddings)
    print(f"wrote {args.out}: {embeddings.shape[0]} x {embeddings.shape[1]} float32")
    return 0
