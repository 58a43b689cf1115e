"""``fffjax pretrain``: MLM pretraining of crammed BERT (FFF or dense) on the offline corpus.

    fffjax pretrain --config tiny --steps 600 --out runs/pretrain-tiny
    fffjax pretrain --config experiments/configs/pretrain_tiny.json

``--config`` is a model preset (``tiny``, ``tiny-dense``, ``base``, ``base-dense``), a model JSON
(``ModelConfig`` or a published ``config.json``), or a run JSON ``{"model": NAME_OR_DICT,
"train": {TrainConfig fields}, "data": {"sources": [...], "seq_length": N, "holdout": F}}``;
flags given on the command line override the file. The corpus must have been fetched
(``bash experiments/fetch_text.sh``); the WordPiece tokenizer (vocabulary = the model's
``vocab_size``) is trained on first use and cached beside the corpus, and so are the packed token
rows; ``--tokenizer`` uses a given one instead (a tokenizer folder such as a published model's, or a
``tokenizer.json``), with its own special ids. The run folder gets ``metrics.jsonl``, ``loss.png``,
``checkpoints/<step>/`` (resumable: run the same command again to continue) and ``tokenizer/``
(the tokenizer files, as transformers writes them).
"""

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fffjax.data import corpus, pipeline
from fffjax.data.tokenizer import Tokenizer, train_wordpiece

HELP = "MLM-pretrain crammed BERT (FFF or dense twin) on the offline corpus, resumable"

DATA_DEFAULTS = {"sources": list(corpus.PROSE_SOURCES), "seq_length": None, "holdout": 0.01, "eval_batches": 4}


def load_run_config(name_or_path: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """`(ModelConfig, train overrides, data settings)` from `--config` (see the module docstring)."""
    from fffjax.models.config import ModelConfig, get_config

    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "model" in data:
            model = data["model"]
            if isinstance(model, str):
                model_config = get_config(model)
            else:
                model_config = ModelConfig.from_dict(model)
            unknown = sorted(set(data) - {"model", "train", "data", "comment"})
            if unknown:
                raise ValueError(f"config {path}: unknown run keys {unknown}; expected model, train, data")
            return model_config, dict(data.get("train", {})), {**DATA_DEFAULTS, **data.get("data", {})}
    return get_config(name_or_path), {}, dict(DATA_DEFAULTS)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model preset, model JSON or run JSON")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/<command>-<config>)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--grad-accum", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 master weights)")
    parser.add_argument("--data-parallel", type=int, default=None)
    parser.add_argument("--model-parallel", type=int, default=None)
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--keep", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="text cache (default data_cache/text)")
    parser.add_argument("--no-resume", action="store_true",
                        help="refuse to continue an existing run (error if --out holds checkpoints)")
    parser.add_argument("--no-progress", action="store_true")


def train_config_from(args: argparse.Namespace, overrides: dict[str, Any], defaults: dict[str, Any]):
    """A `TrainConfig` from defaults < run-file overrides < command-line flags."""
    from fffjax.train.config import TrainConfig

    fields = dict(defaults)
    fields.update(overrides)
    flag_map = {"steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "learning_rate",
                "seed": "seed", "data_parallel": "data_parallel", "model_parallel": "model_parallel",
                "save_every": "save_every", "keep": "keep", "eval_every": "eval_every"}
    for flag, field in flag_map.items():
        if getattr(args, flag, None) is not None:
            fields[field] = getattr(args, flag)
    if getattr(args, "bf16", False):
        fields["compute_dtype"] = "bfloat16"
    return TrainConfig.from_dict(fields)


def _tag(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def prepare_tokenizer(cache: Path, sources: list[str], vocab_size: int) -> Path:
    """The cached tokenizer for (sources, vocab_size), trained on first use."""
    files = corpus.corpus_files(cache, sources)
    path = cache / "tokenizers" / f"wordpiece{vocab_size}-{_tag(sorted(sources))}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".tmp{os.getpid()}.json")
        train_wordpiece(files, vocab_size, out=tmp)
        tmp.replace(path)  # atomic: concurrent runs never read a half-written file
    return path


def prepare_rows(cache: Path, sources: list[str], tokenizer: Tokenizer, seq_length: int) -> np.ndarray:
    """Packed `(n, seq_length)` MLM rows of the corpus, cached as `.npy` (keyed by the tokenizer's contents)."""
    path = cache / "tokens" / f"{_tag(tokenizer.backend.to_str())}-{_tag(sorted(sources))}-s{seq_length}.npy"
    if path.is_file():
        return np.load(path)
    stream = tokenizer.encode_stream(corpus.read_paragraphs(corpus.corpus_files(cache, sources)))
    rows = pipeline.pack_sequences(stream, seq_length, cls_id=tokenizer.cls_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, rows)
    tmp.replace(path)
    return rows


def eval_batch_list(held_out: np.ndarray, batch_size: int, n_batches: int, tokenizer: Tokenizer) -> list[dict]:
    """Fixed held-out MLM batches (masking seeded once, the same for every evaluation and model)."""
    n = min(n_batches, len(held_out) // batch_size)
    fixed = pipeline.mlm_pipeline(held_out, batch_size, vocab_size=tokenizer.vocab_size, specials=tokenizer.specials)
    position = pipeline.initial_position(12345)
    batches = []
    for _ in range(n):
        batch, position = fixed.next(position)
        batches.append(batch)
    return batches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--sources", nargs="*", default=None,
                        help=f"corpus sources (default: prose {list(corpus.PROSE_SOURCES)}; "
                             f"all: {list(corpus.SOURCES)})")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="use this tokenizer (folder or tokenizer.json) instead of training one on the corpus")


PRETRAIN_DEFAULTS = {"steps": 1000, "batch_size": 32, "learning_rate": 1e-3, "save_every": 100, "eval_every": 100}


def run(args: argparse.Namespace) -> int:
    from flax import nnx

    from fffjax.models import CrammedBertMLM, count_parameters
    from fffjax.train.loop import fit
    from fffjax.train.objectives import mlm_objective
    from fffjax.train.trainer import Trainer

    model_config, train_overrides, data = load_run_config(args.config)
    config = train_config_from(args, train_overrides, PRETRAIN_DEFAULTS)
    sources = args.sources if args.sources else data["sources"]
    seq_length = args.seq_length or data["seq_length"] or model_config.max_seq_length
    if seq_length > model_config.max_seq_length:
        raise ValueError(f"--seq-length: at most the model's max_seq_length {model_config.max_seq_length}, "
                         f"got {seq_length}")
    cache = args.cache or corpus.default_cache()
    out = args.out or Path("runs") / f"pretrain-{Path(str(args.config)).stem}"
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer.from_pretrained(args.tokenizer or prepare_tokenizer(cache, sources, model_config.vocab_size))
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"--tokenizer: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
                         f"{model_config.vocab_size}")
    model_config = dataclasses.replace(model_config, pad_token_id=tokenizer.pad_id)
    tokenizer.save_pretrained(out / "tokenizer")
    rows = prepare_rows(cache, sources, tokenizer, seq_length)
    train_rows, held_out = pipeline.split_holdout(rows, data["holdout"], seed=0)
    vocab = tokenizer.vocab_size
    batches = pipeline.mlm_pipeline(train_rows, config.batch_size, vocab_size=vocab, specials=tokenizer.specials)
    eval_batches = eval_batch_list(held_out, config.batch_size, data["eval_batches"], tokenizer)

    model = CrammedBertMLM(model_config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    trainer = Trainer(model, mlm_objective, config)
    print(f"pretrain {args.config}: {count_parameters(model):,} parameters, {len(train_rows):,} train rows of "
          f"{seq_length} tokens ({len(held_out):,} held out), vocab {vocab}, mesh {dict(trainer.mesh.shape)}, "
          f"out {out}")
    records = fit(trainer, batches, out_dir=out, model_config=model_config.to_dict(),
                  run_info={"command": "pretrain", "tokenizer": str((out / "tokenizer").absolute()), "sources": sources,
                            "seq_length": seq_length, "config_arg": str(args.config)},
                  eval_batches=lambda: eval_batches, resume=not args.no_resume, progress=not args.no_progress,
                  tokens_per_example=seq_length, plot_title=f"MLM pretraining, {args.config}")
    final = records[-1] if records else {}
    summary = {k: final[k] for k in ("step", "loss", "accuracy", "eval_loss", "eval_accuracy") if k in final}
    (out / "summary.json").write_text(json.dumps(
        {"model": model_config.to_dict(), "train": dataclasses.asdict(config), **summary}, indent=2))
    print(json.dumps(summary))
    return 0
