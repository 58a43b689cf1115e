"""Run the all-MiniLM-L6-v2 conversion on a GPU machine that has neither the teacher nor the corpus.

The GPU machine takes at most 64 MiB of files along and returns at most 16 MiB per file, while the
teacher's float32 weights are 90 MB and a student's 78 MB. So the conversion travels in pieces:

    # here: the teacher in float16 (45 MB) and the sampled sentences, into a folder git ignores
    python experiments/distill_minilm_gpu.py pack --carry gpu_carry --train-sentences 96000
    # there: the float32 teacher again, the conversion (distill_minilm.py --convert-only), and the
    # students without their embedding tables (the teacher's, frozen) in shards of at most 15 MiB
    python experiments/distill_minilm_gpu.py expand --carry gpu_carry --to /tmp/minilm
    python experiments/distill_minilm.py --teacher /tmp/minilm --sentences gpu_carry/sentences.txt \
        --convert-only --runs /tmp/runs ...
    python experiments/distill_minilm_gpu.py export --runs /tmp/runs --out $OUT
    # here: each student rebuilt on the exact float32 teacher, its last stage measured again against
    # it, written where distill_minilm.py reads finished conversions (then probes and CPU speed)
    python experiments/distill_minilm_gpu.py import --files DIR --carry gpu_carry --runs runs/distill_minilm_gpu
    python experiments/distill_minilm.py --runs runs/distill_minilm_gpu ...

The GPU run distils against the float16-rounded teacher (relative rounding 5e-4 per weight), and
its students keep that teacher's rounded embedding tables (frozen in every stage). The stages measured
there (a, b, c and d) are against the rounded teacher's embeddings; ``import`` rebuilds each student bit
for bit and replaces its last stage's measures by those against the exact teacher (``measured_against``
says which).
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from flax import traverse_util

SHARD_BYTES = 15 * 2**20
TEACHER_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _flatten(tree: dict) -> dict[str, np.ndarray]:
    """``{"layers/0/ffn/w_in": array, ...}`` of a nested parameter dict (safetensors takes string keys)."""
    return {"/".join(map(str, path)): np.asarray(v) for path, v in traverse_util.flatten_dict(tree).items()}


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The nested dict of :func:`_flatten`'s keys (digit parts back to the list indices they were)."""
    return traverse_util.unflatten_dict(
        {tuple(int(part) if part.isdigit() else part for part in name.split("/")): v for name, v in flat.items()})


def pack(args) -> None:
    """The teacher in float16 and the sentences (training lines, then the held-out ones), into ``--carry``."""
    from safetensors.numpy import load_file, save_file

    from fffjax.cmd_distill import default_teacher, sample_sentences

    source = Path(args.teacher or default_teacher())
    target = args.carry / "teacher"
    target.mkdir(parents=True, exist_ok=True)
    for name in TEACHER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()},
              target / "model.safetensors")
    train, held = sample_sentences(args.train_sentences, args.held_out, args.seed, args.sentences)
    lines = [" ".join(s.split()) for s in train + held]
    (args.carry / "sentences.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.carry / "pack.json").write_text(json.dumps({"train_sentences": len(train), "held_out": len(held),
                                                      "seed": args.seed}))
    size = sum(p.stat().st_size for p in args.carry.rglob("*") if p.is_file())
    print(f"packed {len(train)} + {len(held)} sentences and the float16 teacher into {args.carry} "
          f"({size / 2**20:.1f} MiB)")


def expand(args) -> None:
    """The float32 teacher folder of a packed float16 one."""
    from safetensors.numpy import load_file, save_file

    args.to.mkdir(parents=True, exist_ok=True)
    source = args.carry / "teacher"
    for name in TEACHER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, args.to / name)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in weights.items()},
              args.to / "model.safetensors")


def export(args) -> None:
    """Each finished student of ``--runs``: its parameters but the embeddings, in float32 shards of at
    most ``SHARD_BYTES``, its checkpoint config and its report, into ``--out``."""
    from safetensors.numpy import save_file

    from fffjax.models.bert import bert_checkpoint_config, bert_params
    from fffjax.train.checkpoint import load_bert_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in args.runs.iterdir() if (p / "report.json").is_file()):
        student = load_bert_checkpoint(folder / "student")
        flat = {k: v for k, v in _flatten(bert_params(student)).items() if not k.startswith("embeddings/")}
        shards, current, size = [], {}, 0
        for name, value in flat.items():
            if current and size + value.nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[name] = value
            size += value.nbytes
        shards.append(current)
        for i, shard in enumerate(shards):
            save_file(shard, args.out / f"{folder.name}.{i}.safetensors")
        meta = {"config": bert_checkpoint_config(student), "shards": len(shards),
                "report": json.loads((folder / "report.json").read_text())}
        for stage in meta["report"]["stages"].values():
            stage.pop("loss_curves", None)
        (args.out / f"{folder.name}.json").write_text(json.dumps(meta))
        print(f"exported {folder.name}: {len(flat)} arrays in {len(shards)} shards")


def import_(args) -> None:
    """Each exported student rebuilt (on the teacher's embedding tables rounded to float16, as trained),
    its last stage measured again against the exact teacher on the held-out sentences of ``--carry``,
    saved as ``--runs/NAME/student`` with ``report.json``."""
    from safetensors.numpy import load_file

    from fffjax import distill as fd
    from fffjax.cmd_distill import default_teacher
    from fffjax.models.bert import bert_from_params, bert_params
    from fffjax.pretrained import from_pretrained
    from fffjax.train.checkpoint import save_bert_checkpoint

    teacher, tokenizer = from_pretrained(args.teacher or default_teacher())
    packed = json.loads((args.carry / "pack.json").read_text())
    held = (args.carry / "sentences.txt").read_text(encoding="utf-8").splitlines()[-packed["held_out"]:]
    # The student trained on the float16-rounded embedding tables (frozen in every stage): rounding the
    # exact teacher's the same way rebuilds it bit for bit.
    embeddings = {k: v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v
                  for k, v in _flatten(bert_params(teacher)).items() if k.startswith("embeddings/")}
    teacher_held_out = fd.embeddings(teacher, tokenizer, held)
    for meta_path in sorted(args.files.glob("*.json")):
        name = meta_path.stem
        meta = json.loads(meta_path.read_text())
        flat = dict(embeddings)
        for i in range(meta["shards"]):
            flat.update(load_file(args.files / f"{name}.{i}.safetensors"))
        student = bert_from_params(meta["config"], _unflatten(flat))
        report = meta["report"]
        last = list(report["stages"])[-1]
        report["stages"][last]["on_gpu_against_float16_teacher"] = {
            k: report["stages"][last][k] for k in ("cosine", "spearman", "neighbours_at_1", "neighbours_at_10")}
        report["stages"][last].update(fd.measure(student, tokenizer, held, teacher_held_out))
        report["measured_against"] = (f"stages before {last}: the float16-rounded teacher, on the GPU; "
                                      f"stage {last}: the exact float32 teacher, here")
        folder = args.runs / name
        save_bert_checkpoint(folder / "student", student, tokenizer=tokenizer, overwrite=True)
        tmp = folder / "report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(folder / "report.json")
        print(f"imported {name}: stage {last} spearman {report['stages'][last]['spearman']:.4f} "
              f"(GPU, float16 teacher: {report['stages'][last]['on_gpu_against_float16_teacher']['spearman']:.4f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help=pack.__doc__)
    p.add_argument("--carry", type=Path, required=True)
    p.add_argument("--teacher", default=None)
    p.add_argument("--train-sentences", type=int, default=48000)
    p.add_argument("--sentences", type=Path, default=None,
                   help="a file of one sentence a line (its last --held-out lines held out) instead of the corpus")
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("expand", help=expand.__doc__)
    p.add_argument("--carry", type=Path, required=True)
    p.add_argument("--to", type=Path, required=True)
    p = sub.add_parser("export", help=export.__doc__)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("import", help=import_.__doc__)
    p.add_argument("--files", type=Path, required=True)
    p.add_argument("--carry", type=Path, required=True, help="the folder pack wrote (its held-out sentences)")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--teacher", default=None)
    args = parser.parse_args(argv)
    {"pack": pack, "expand": expand, "export": export, "import": import_}[args.command](args)


if __name__ == "__main__":
    main()
