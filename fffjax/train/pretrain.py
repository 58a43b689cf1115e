"""``fffjax pretrain``: MLM pretraining of crammed BERT (FFF or dense) on the offline corpus.

    fffjax pretrain --config tiny --steps 600 --out runs/pretrain-tiny
    fffjax pretrain --config experiments/configs/pretrain_tiny.json
    fffjax pretrain --config base --random-tokens --bf16 --steps 600   # throughput, no corpus needed

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

``--random-tokens`` trains on rows of uniformly random word pieces instead (the model's vocabulary,
special ids as ``train_wordpiece`` lays them out), with no corpus, no tokenizer and no held-out
evaluation: for measuring training throughput on a machine without the corpus.
"""

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int

from fffjax.data import corpus, pipeline
from fffjax.data.tokenizer import WORDPIECE_SPECIALS, SpecialTokens, Tokenizer, train_wordpiece

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


def run_settings(args: argparse.Namespace, loaded: tuple[Any, dict[str, Any], dict[str, Any]],
                 defaults: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], list[str], int]:
    """``(model config, TrainConfig, data settings, sources, seq_length)`` of a training command.

    ``loaded`` is what the command's ``load_run_config`` read from ``--config``; flags override it.
    """
    model_config, train_overrides, data = loaded
    config = train_config_from(args, train_overrides, defaults)
    sources = args.sources if args.sources else data["sources"]
    seq_length = args.seq_length or data["seq_length"] or model_config.max_seq_length
    if seq_length > model_config.max_seq_length:
        raise ValueError(f"--seq-length: at most the model's max_seq_length {model_config.max_seq_length}, "
                         f"got {seq_length}")
    return model_config, config, data, sources, seq_length


def cache_tag(*parts: Any) -> str:
    """A short content hash naming a cached file."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def prepare_tokenizer(cache: Path, sources: list[str], vocab_size: int) -> Path:
    """The cached tokenizer for (sources, vocab_size), trained on first use."""
    files = corpus.corpus_files(cache, sources)
    path = cache / "tokenizers" / f"wordpiece{vocab_size}-{cache_tag(sorted(sources))}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".tmp{os.getpid()}.json")
        train_wordpiece(files, vocab_size, out=tmp)
        tmp.replace(path)  # atomic: concurrent runs never read a half-written file
    return path


def prepare_rows(cache: Path, sources: list[str], tokenizer: Tokenizer, seq_length: int) -> np.ndarray:
    """Packed `(n, seq_length)` MLM rows of the corpus, cached as `.npy` (keyed by the tokenizer's contents)."""
    path = cache / "tokens" / f"{cache_tag(tokenizer.backend.to_str())}-{cache_tag(sorted(sources))}-s{seq_length}.npy"
    if path.is_file():
        return np.load(path)
    stream = tokenizer.encode_stream(corpus.read_paragraphs(corpus.corpus_files(cache, sources)))
    rows = pipeline.pack_sequences(stream, seq_length, cls_id=tokenizer.cls_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, rows)
    tmp.replace(path)
    return rows


RANDOM_ROWS = 8192  # rows of random word pieces that --random-tokens cycles through


def random_token_rows(n: int, seq_length: int, vocab_size: int, *, specials: SpecialTokens = WORDPIECE_SPECIALS,
                      seed: int = 0) -> Int[np.ndarray, "n seq_length"]:
    """`(n, seq_length)` int32 rows laid out as packed corpus rows (`pipeline.pack_sequences`): the
    `specials.cls` id, then word pieces drawn uniformly from the ids below `vocab_size` that are not special."""
    words = specials.word_ids(vocab_size)
    if seq_length < 2 or len(words) == 0:
        raise ValueError(f"seq_length, vocab_size: expected at least 2 and more than the {len(specials.ids)} "
                         f"special ids, got {seq_length}, {vocab_size}")
    body = words[np.random.default_rng(seed).integers(0, len(words), size=(n, seq_length - 1))]
    return np.concatenate([np.full((n, 1), specials.cls, np.int32), body], axis=1)


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
    parser.add_argument("--random-tokens", action="store_true",
                        help="train on uniformly random word pieces (no corpus, tokenizer or held-out evaluation): "
                             "for measuring throughput")


PRETRAIN_DEFAULTS = {"steps": 1000, "batch_size": 32, "learning_rate": 1e-3, "save_every": 100, "eval_every": 100}


def run(args: argparse.Namespace) -> int:
    from flax import nnx

    from fffjax.models import CrammedBertMLM, count_parameters
    from fffjax.train.loop import fit
    from fffjax.train.objectives import mlm_objective
    from fffjax.train.trainer import Trainer

    model_config, config, data, sources, seq_length = run_settings(
        args, load_run_config(args.config), PRETRAIN_DEFAULTS)
    random_tokens = args.random_tokens
    if random_tokens and (args.tokenizer or args.sources):
        raise ValueError("--random-tokens: trains without a corpus or tokenizer; drop --tokenizer and --sources")
    out = args.out or Path("runs") / f"pretrain-{Path(str(args.config)).stem}"
    out.mkdir(parents=True, exist_ok=True)

    if random_tokens:
        specials, vocab = WORDPIECE_SPECIALS, model_config.vocab_size
        train_rows = random_token_rows(max(RANDOM_ROWS, config.batch_size), seq_length, vocab, seed=config.seed)
        eval_batches = held_out = None
        data_info = {"data": "random-tokens"}
    else:
        cache = args.cache or corpus.default_cache()
        tokenizer = Tokenizer.from_pretrained(
            args.tokenizer or prepare_tokenizer(cache, sources, model_config.vocab_size))
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"--tokenizer: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
                             f"{model_config.vocab_size}")
        tokenizer.save_pretrained(out / "tokenizer")
        specials, vocab = tokenizer.specials, tokenizer.vocab_size
        rows = prepare_rows(cache, sources, tokenizer, seq_length)
        train_rows, held_out = pipeline.split_holdout(rows, data["holdout"], seed=0)
        eval_batches = eval_batch_list(held_out, config.batch_size, data["eval_batches"], tokenizer)
        data_info = {"tokenizer": str((out / "tokenizer").absolute()), "sources": sources}
    model_config = dataclasses.replace(model_config, pad_token_id=specials.pad)
    batches = pipeline.mlm_pipeline(train_rows, config.batch_size, vocab_size=vocab, specials=specials)

    model = CrammedBertMLM(model_config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    trainer = Trainer(model, mlm_objective, config)
    held = "no held-out evaluation" if held_out is None else f"{len(held_out):,} held out"
    print(f"pretrain {args.config}: {count_parameters(model):,} parameters, {len(train_rows):,} "
          f"{'random ' if random_tokens else ''}train rows of {seq_length} tokens ({held}), vocab {vocab}, "
          f"mesh {dict(trainer.mesh.shape)}, out {out}")
    records = fit(trainer, batches, out_dir=out, model_config=model_config.to_dict(),
                  run_info={"command": "pretrain", **data_info, "seq_length": seq_length,
                            "config_arg": str(args.config)},
                  eval_batches=None if eval_batches is None else lambda: eval_batches, resume=not args.no_resume,
                  progress=not args.no_progress, tokens_per_example=seq_length,
                  plot_title=f"MLM pretraining, {args.config}")
    final = records[-1] if records else {}
    summary = {k: final[k] for k in ("step", "loss", "accuracy", "eval_loss", "eval_accuracy") if k in final}
    (out / "summary.json").write_text(json.dumps(
        {"model": model_config.to_dict(), "train": dataclasses.asdict(config), **summary}, indent=2))
    print(json.dumps(summary))
    return 0
