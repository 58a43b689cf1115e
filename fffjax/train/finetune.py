"""``fffjax finetune``: fine-tune a crammed-BERT classifier on a labelled set (amazon, spam).

    fffjax finetune --config tiny --task amazon --init runs/pretrain-tiny --out runs/ft-tiny-amazon

``--init`` is a pretraining run folder (its latest checkpoint) or one checkpoint step folder; the
encoder is copied from it and the pooler and head start fresh. The tokenizer comes from the run
(``--tokenizer`` overrides; without ``--init`` it is required). Dropout is on during fine-tuning.
The test split is evaluated at the end (and every ``--eval-every`` steps): ``metrics.jsonl``,
``loss.png``, ``checkpoints/`` and ``result.json`` (test accuracy) go to the run folder.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from fffjax.data import labelled, pipeline
from fffjax.data.tokenizer import PAD_ID, encode_padded, load_tokenizer
from fffjax.train.pretrain import add_common_arguments, load_run_config, train_config_from

HELP = "fine-tune a crammed-BERT classifier (amazon reviews or spam) from a pretraining checkpoint"
FINETUNE_DEFAULTS = {"steps": 300, "batch_size": 32, "learning_rate": 3e-4, "save_every": 100,
                     "train_mode": True, "peak_fraction": 0.1}


def classifier_batches(texts, labels, tokenizer, seq_length: int) -> dict[str, np.ndarray]:
    ids, mask = encode_padded(tokenizer, texts, seq_length)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels, np.int32)}


def classifier_accuracy(trainer, arrays: dict[str, np.ndarray], batch_size: int) -> float:
    """Accuracy of the trainer's classifier on a labelled set, padding the last batch with `[PAD]`
    rows (their predictions are ignored) so that every example counts."""
    n = len(arrays["labels"])
    correct = 0
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items() if k != "labels"}
        real = len(chunk["input_ids"])
        if real < batch_size:
            chunk = {k: np.concatenate([v, np.full((batch_size - real,) + v.shape[1:], PAD_ID, v.dtype)])
                     for k, v in chunk.items()}
        logits = trainer.predict(chunk)[:real]
        correct += int((logits.argmax(-1) == arrays["labels"][start:start + real]).sum())
    return correct / n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--task", required=True, choices=labelled.TASKS)
    parser.add_argument("--init", type=Path, default=None, help="pretraining run folder or checkpoint step folder")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer JSON (default: the --init run's)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from flax import nnx

    from fffjax.models import CrammedBertClassifier
    from fffjax.train.checkpoint import crammed_bert_config, load_params
    from fffjax.train.loop import fit
    from fffjax.train.objectives import classification_objective
    from fffjax.train.trainer import Trainer

    model_config, train_overrides, data = load_run_config(args.config)
    init_params = None
    tokenizer_path = args.tokenizer
    if args.init is not None:
        try:
            init_params, init_config, record = load_params(args.init)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--init: {error}") from error
        model_config = crammed_bert_config(init_config, record["path"])
        tokenizer_path = tokenizer_path or record["run"].get("tokenizer")
        print(f"finetune: encoder from {record['path']}")
    if tokenizer_path is None:
        raise ValueError("--tokenizer: required without --init (a pretraining run records its tokenizer)")
    model_config = dataclasses.replace(model_config, num_labels=2)
    config = train_config_from(args, train_overrides, FINETUNE_DEFAULTS)
    seq_length = args.seq_length or data["seq_length"] or model_config.max_seq_length
    out = args.out or Path("runs") / f"finetune-{Path(str(args.config)).stem}-{args.task}"

    tokenizer = load_tokenizer(tokenizer_path)
    task = labelled.load_task(args.task, args.cache)
    train = classifier_batches(task.train_texts, task.train_labels, tokenizer, seq_length)
    test = classifier_batches(task.test_texts, task.test_labels, tokenizer, seq_length)
    batches = pipeline.BatchPipeline(train, config.batch_size)

    model = CrammedBertClassifier(model_config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    if init_params is not None:
        state = nnx.state(model, nnx.Param)
        fresh = nnx.to_pure_dict(state)
        if "encoder" not in init_params:
            raise ValueError(f"--init: checkpoint params have no 'encoder' (keys {sorted(init_params)})")
        fresh["encoder"] = init_params["encoder"]
        nnx.replace_by_pure_dict(state, fresh)
        nnx.update(model, state)
    trainer = Trainer(model, classification_objective, config)
    n_eval = (len(test["labels"]) // config.batch_size) * config.batch_size
    eval_batches = [{k: v[i:i + config.batch_size] for k, v in test.items()}
                    for i in range(0, n_eval, config.batch_size)]
    print(f"finetune {args.config} on {args.task}: {len(train['labels'])} train / {len(test['labels'])} test, "
          f"mesh {dict(trainer.mesh.shape)}, out {out}")
    fit(trainer, batches, out_dir=out, model_config=model_config.to_dict(),
        run_info={"command": "finetune", "task": args.task, "init": str(args.init), "tokenizer": str(tokenizer_path),
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
