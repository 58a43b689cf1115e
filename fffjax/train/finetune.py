"""``fffjax finetune``: fine-tune a crammed-BERT classifier on a labelled set (amazon, spam).

    fffjax finetune --config tiny --task amazon --init runs/pretrain-tiny --out runs/ft-tiny-amazon

``--init`` is a pretraining run folder (its latest checkpoint), one checkpoint step folder, or a
published Hugging Face folder (``UltraFastBERT-1x11-long`` as downloaded, or an ``fffjax export``);
the encoder is copied from it and the pooler and head start fresh. The tokenizer is the one stored
with ``--init`` (``--tokenizer`` overrides; without ``--init`` it is required), special ids included,
and is saved into the run folder's ``tokenizer/``. Dropout is on during fine-tuning.
The test split is evaluated at the end (and every ``--eval-every`` steps): ``metrics.jsonl``,
``loss.png``, ``checkpoints/`` and ``result.json`` (test accuracy) go to the run folder.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from fffjax.data import labelled, pipeline
from fffjax.data.tokenizer import Tokenizer
from fffjax.train.pretrain import add_common_arguments, load_run_config, train_config_from

HELP = "fine-tune a crammed-BERT classifier (amazon reviews or spam) from a pretraining checkpoint"
FINETUNE_DEFAULTS = {"steps": 300, "batch_size": 32, "learning_rate": 3e-4, "save_every": 100,
                     "train_mode": True, "peak_fraction": 0.1}


def classifier_batches(texts, labels, tokenizer: Tokenizer, seq_length: int) -> dict[str, np.ndarray]:
    ids, mask = tokenizer.encode_padded(texts, seq_length)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels, np.int32)}


def classifier_accuracy(trainer, arrays: dict[str, np.ndarray], batch_size: int) -> float:
    """Accuracy of the trainer's classifier on a labelled set, padding the last batch with copies of
    its first row (their predictions are ignored) so that every example counts."""
    n = len(arrays["labels"])
    correct = 0
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items() if k != "labels"}
        real = len(chunk["input_ids"])
        if real < batch_size:
            chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)]) for k, v in chunk.items()}
        logits = trainer.predict(chunk)[:real]
        correct += int((logits.argmax(-1) == arrays["labels"][start:start + real]).sum())
    return correct / n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--task", required=True, choices=labelled.TASKS)
    parser.add_argument("--init", type=Path, default=None,
                        help="pretraining run folder, checkpoint step folder or published Hugging Face folder")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder or tokenizer.json (default: the one stored with --init)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from flax import nnx

    from fffjax.models import CrammedBertClassifier
    from fffjax.pretrained import find_tokenizer, load_model
    from fffjax.train.loop import fit
    from fffjax.train.objectives import classification_objective
    from fffjax.train.trainer import Trainer

    model_config, train_overrides, data = load_run_config(args.config)
    init_encoder = None
    tokenizer = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer is not None else None
    if args.init is not None:
        try:
            init_model = load_model(args.init)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--init: {error}") from error
        model_config = init_model.config
        init_encoder = nnx.to_pure_dict(nnx.state(init_model.encoder, nnx.Param))
        tokenizer = tokenizer or find_tokenizer(args.init)
        print(f"finetune: encoder from {args.init}")
    if tokenizer is None:
        raise ValueError("--tokenizer: required when --init is not given or stores no tokenizer")
    model_config = dataclasses.replace(model_config, num_labels=2, pad_token_id=tokenizer.pad_id)
    config = train_config_from(args, train_overrides, FINETUNE_DEFAULTS)
    seq_length = args.seq_length or data["seq_length"] or model_config.max_seq_length
    out = args.out or Path("runs") / f"finetune-{Path(str(args.config)).stem}-{args.task}"

    task = labelled.load_task(args.task, args.cache)
    train = classifier_batches(task.train_texts, task.train_labels, tokenizer, seq_length)
    test = classifier_batches(task.test_texts, task.test_labels, tokenizer, seq_length)
    batches = pipeline.BatchPipeline(train, config.batch_size)

    model = CrammedBertClassifier(model_config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    if init_encoder is not None:
        state = nnx.state(model.encoder, nnx.Param)
        nnx.replace_by_pure_dict(state, init_encoder)
        nnx.update(model.encoder, state)
    tokenizer.save_pretrained(Path(out) / "tokenizer")
    trainer = Trainer(model, classification_objective, config)
    n_eval = (len(test["labels"]) // config.batch_size) * config.batch_size
    eval_batches = [{k: v[i:i + config.batch_size] for k, v in test.items()}
                    for i in range(0, n_eval, config.batch_size)]
    print(f"finetune {args.config} on {args.task}: {len(train['labels'])} train / {len(test['labels'])} test, "
          f"mesh {dict(trainer.mesh.shape)}, out {out}")
    fit(trainer, batches, out_dir=out, model_config=model_config.to_dict(),
        run_info={"command": "finetune", "task": args.task, "init": str(args.init),
                  "tokenizer": str((Path(out) / "tokenizer").absolute()),
                  "seq_length": seq_length},
        eval_batches=lambda: eval_batches, resume=not args.no_resume, progress=not args.no_progress,
        tokens_per_example=seq_length, plot_title=f"fine-tuning {args.config} on {args.task}")
    result = {"task": args.task, "config": str(args.config), "init": str(args.init), "steps": config.steps,
              "test_accuracy": classifier_accuracy(trainer, test, config.batch_size),
              "n_test": int(len(test["labels"])),
              "majority_baseline": float(max(test["labels"].mean(), 1 - test["labels"].mean()))}
    (Path(out) / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0
