"""``fffjax train-lm``: next-token training of the causal decoder (FFF or a baseline) on the offline corpus.

    fffjax train-lm --config tiny-fff-1x11 --steps 200 --out runs/lm-tiny
    fffjax train-lm --config small-fff-4x9 --bf16 --steps 3000 --seed 1

``--config`` is a decoder preset (``SIZE-FFN``, see `fffjax.models.decoder.get_decoder_config`), a
``DecoderConfig`` JSON, or a run JSON ``{"model": NAME_OR_DICT, "train": {TrainConfig fields},
"data": {"sources": [...], "seq_length": N, "holdout": F, "eval_batches": N}}``; flags override the
file. The corpus must have been fetched (``bash experiments/fetch_text.sh``).

Data: every source of `fffjax.data.corpus.SOURCES` by default. The last ``holdout`` share of each
source's paragraphs is held out whole for validation (`fffjax.data.pipeline.held_out_documents`:
the closing paragraphs of each source, e.g. the end of the King James Bible, the last State of the
Union addresses, the end of the dictionaries). A lower-cased WordPiece tokenizer of the model's
``vocab_size`` is trained on the training paragraphs only; both sides are packed into rows of
``seq_length`` tokens (``[CLS]`` then paragraphs, each closed by ``[SEP]``, which generation treats
as the end of a text). Tokenizer and rows are cached under ``<cache>/lm/``. The run folder gets
``metrics.jsonl`` (``eval_loss`` is the mean next-token cross-entropy over the held-out rows, its
exponential the validation perplexity), ``loss.png``, ``checkpoints/`` (resumable: the same
command continues) and ``tokenizer/``; ``fffjax generate RUN "prompt"`` samples from it.

A model whose ``load_balance`` is non-zero (a ``DecoderConfig`` field, e.g. ``"model": {...,
"load_balance": 0.01}`` in a run JSON) trains FFF-v2 layers with the load-balancing term of
`fffjax.train.objectives.causal_lm_objective`; ``metrics.jsonl`` and ``summary.json`` then also
give the term (``load_balance``, ``eval_load_balance``), while ``loss`` stays the cross-entropy.
"""

import argparse
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fffjax.data import corpus, pipeline
from fffjax.data.tokenizer import Tokenizer, train_wordpiece
from fffjax.train.pretrain import add_common_arguments, cache_tag, run_settings

HELP = "train the causal decoder (FFF or a baseline) on the offline corpus, resumable"

DATA_DEFAULTS = {"sources": list(corpus.SOURCES), "seq_length": None, "holdout": 0.01, "eval_batches": 32}
LM_DEFAULTS = {"steps": 1000, "batch_size": 32, "learning_rate": 1e-3, "save_every": 500, "eval_every": 250}


def load_run_config(name_or_path: str):
    """``(DecoderConfig, train overrides, data settings)`` from ``--config``."""
    from fffjax.models.decoder import DecoderConfig, get_decoder_config

    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "vocab_size" not in data:   # a run JSON, not a DecoderConfig
            unknown = sorted(set(data) - {"model", "train", "data", "comment"})
            if unknown:
                raise ValueError(f"config {path}: unknown run keys {unknown}; expected model, train, data")
            model = data.get("model")
            config = get_decoder_config(model) if isinstance(model, str) else DecoderConfig.from_dict(model)
            return config, dict(data.get("train", {})), {**DATA_DEFAULTS, **data.get("data", {})}
    return get_decoder_config(name_or_path), {}, dict(DATA_DEFAULTS)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    tmp.replace(path)


def prepare_lm_data(cache: Path, sources: list[str], *, vocab_size: int, seq_length: int,
                    holdout: float) -> tuple[Path, np.ndarray, np.ndarray]:
    """``(tokenizer.json path, train rows (n, seq_length), held-out rows (m, seq_length))``, built on
    first use and cached under ``<cache>/lm/`` (keyed by sources and hold-out share; rows also by the
    tokenizer's contents and ``seq_length``; stored as uint16 when the vocabulary fits). A complete
    cache is read without the corpus."""
    folder = cache / "lm" / cache_tag(sorted(sources), holdout)
    tokenizer_path = folder / f"wordpiece{vocab_size}.json"
    split = None

    def paragraphs():
        nonlocal split
        if split is None:
            documents = [corpus.read_paragraphs([f]) for f in corpus.corpus_files(cache, sources)]
            split = pipeline.held_out_documents(documents, holdout)
        return split

    if not tokenizer_path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(tmp) / "train.txt"
            text.write_text("".join(p + "\n" for p in paragraphs()[0]), encoding="utf-8")
            _atomic_write(tokenizer_path, lambda out: train_wordpiece([text], vocab_size, out=out))
    tokenizer = Tokenizer.from_pretrained(tokenizer_path)
    rows = {}
    for index, name in enumerate(("train", "held_out")):
        path = folder / f"{name}-{cache_tag(tokenizer.backend.to_str())}-s{seq_length}.npy"
        if not path.is_file():
            packed = pipeline.pack_sequences(tokenizer.encode_stream(paragraphs()[index]), seq_length,
                                             cls_id=tokenizer.cls_id)
            stored = packed.astype(np.uint16) if tokenizer.vocab_size <= 1 << 16 else packed
            _atomic_write(path, lambda tmp, a=stored: np.save(tmp, a))
        rows[name] = np.load(path).astype(np.int32)
    return tokenizer_path, rows["train"], rows["held_out"]


def eval_batch_list(held_out: np.ndarray, batch_size: int, n_batches: int | None) -> list[dict]:
    """The held-out rows as fixed next-token batches (the first ``n_batches`` full ones; None: all)."""
    n = len(held_out) // batch_size if n_batches is None else min(n_batches, len(held_out) // batch_size)
    if n == 0:
        raise ValueError(f"holdout: {len(held_out)} held-out rows fill no batch of {batch_size}")
    fixed = pipeline.causal_lm_pipeline(held_out, batch_size)
    return [fixed.transform({"input_ids": held_out[i * batch_size: (i + 1) * batch_size]}, None) for i in range(n)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--sources", nargs="*", default=None,
                        help=f"corpus sources (default: all {list(corpus.SOURCES)})")


def run(args: argparse.Namespace) -> int:
    from flax import nnx

    from fffjax.models import count_parameters
    from fffjax.models.decoder import CausalLM
    from fffjax.train.loop import fit
    from fffjax.train.objectives import causal_lm_objective
    from fffjax.train.trainer import Trainer

    model_config, config, data, sources, seq_length = run_settings(args, load_run_config(args.config), LM_DEFAULTS)
    out = args.out or Path("runs") / f"lm-{Path(str(args.config)).stem}"
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or corpus.default_cache()
    tokenizer_path, train_rows, held_out = prepare_lm_data(
        cache, sources, vocab_size=model_config.vocab_size, seq_length=seq_length, holdout=data["holdout"])
    tokenizer = Tokenizer.from_pretrained(tokenizer_path)
    tokenizer.save_pretrained(out / "tokenizer")
    model_config = dataclasses.replace(model_config, pad_token_id=tokenizer.pad_id)
    eval_batches = eval_batch_list(held_out, config.batch_size, data["eval_batches"])
    batches = pipeline.causal_lm_pipeline(train_rows, config.batch_size)

    model = CausalLM(model_config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    trainer = Trainer(model, causal_lm_objective, config)
    tokens = len(train_rows) * seq_length
    print(f"train-lm {args.config}: {count_parameters(model):,} parameters, {len(train_rows):,} train rows of "
          f"{seq_length} tokens ({tokens:,} tokens; {config.steps * config.batch_size * seq_length / tokens:.2f} "
          f"epochs), {len(eval_batches) * config.batch_size:,} held-out rows, vocab {tokenizer.vocab_size}, "
          f"mesh {dict(trainer.mesh.shape)}, out {out}")
    records = fit(trainer, batches, out_dir=out, model_config=model_config.to_dict(),
                  run_info={"command": "train-lm", "tokenizer": str((out / "tokenizer").absolute()),
                            "sources": sources, "seq_length": seq_length, "config_arg": str(args.config)},
                  eval_batches=lambda: eval_batches, resume=not args.no_resume, progress=not args.no_progress,
                  tokens_per_example=seq_length, plot_title=f"causal LM, {args.config}")
    final = records[-1] if records else {}
    summary: dict[str, Any] = {k: final[k] for k in ("step", "loss", "accuracy", "eval_loss", "eval_accuracy",
                                                     "load_balance", "eval_load_balance") if k in final}
    if "eval_loss" in summary:
        summary["eval_perplexity"] = math.exp(summary["eval_loss"])
    summary["epochs"] = config.steps * config.batch_size * seq_length / tokens
    (out / "summary.json").write_text(json.dumps(
        {"model": model_config.to_dict(), "train": dataclasses.asdict(config), **summary}, indent=2))
    print(json.dumps(summary))
    return 0
