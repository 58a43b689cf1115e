"""Scale-out on GPUs: ``base`` pretraining tokens/s (data parallel, FSDP) and the tree-parallel FFF layer.

Two measurements for each device count ``n`` in ``--counts`` (``n <= len(jax.devices())``), at a
**fixed per-device batch**, so perfect scaling is ``n x`` the one-device tokens/s:

1. ``pretrain``: optimizer steps of crammed BERT ``--config`` (default ``base``: UltraFastBERT
   1x11) with :class:`fffjax.train.Trainer` and the MLM objective on random token ids, under
   a named configuration of :data:`fffjax.train.sharding.PARALLELISM` on a ``(n / m, m)`` mesh
   (``name@m``), e.g.

   * ``dp``: every parameter and optimizer moment replicated, gradients all-reduced;
   * ``fsdp``: parameters and optimizer moments sharded on their first dimension over ``data``
     (GSPMD gathers weights before use and reduce-scatters gradients);
   * ``tree@2``: FFF layers tree-parallel over a model axis of 2 (tokens routed by all-to-all),
     everything else data-parallel over ``n / 2``. Attention runs on the tokens of its ``data``
     shard, so it is replicated over the model axis: this measures the FFF saving, not a pure
     scale-out of the whole model.

2. ``layer``: forward + backward of one FFF-v2 layer (H ``--hidden``, ``--depth``) on
   ``--layer-tokens`` tokens per device, tree-parallel over ``n`` devices
   (:func:`fffjax.parallel.fff_v2_subtree_parallel`, weights in the permuted layout, sharded),
   split into **compute** (the same step on one device's share of the work: the step at ``n = 1``
   with the same per-device tokens) and **all-to-all** (the five exchanges of one step, each
   ``n x capacity`` rows, timed alone in a ``shard_map``).

3. ``mesh1`` (one device only): the tree-parallel layer on a mesh of one device against the plain
   kernel, forward and forward + backward, weights as jit arguments, on ``--layer-tokens`` tokens:
   :func:`fffjax.ops.fff_v2_hard` with ``--mesh1-implementations`` (default ``pallas`` and ``xla``)
   beside :func:`fffjax.parallel.fff_v2_tree_parallel` running the same implementation inside its
   ``shard_map``, interleaved by :func:`fffjax.bench.side_by_side`. The gap is the cost of the
   ``shard_map`` and its routing bookkeeping around the kernel.

Splitting the attention's tokens over both mesh axes (so tree@m scales the whole model) needs the
trainer to split batches over ``("data", "model")``; it splits them over ``data`` only.

Timing: :func:`fffjax.bench.latency` (each step waited for): ``--steps`` steps after ``--warmup``
steps, the median of ``--repeats`` repeats. Results are appended row by row to
``experiments/results/<out>.{json,md}`` (``--out``, default ``scaleout_<device kind>``).

Run on the GPU machine (one call per kind)::

    python experiments/bench_scaleout.py --counts 1           # one GPU
    python experiments/bench_scaleout.py --counts 1 2         # two GPUs
    python experiments/bench_scaleout.py --counts 1 2 4 8     # eight GPUs
    python experiments/bench_scaleout.py --counts 1 --schemes mesh1 --layer-tokens 65536   # one GPU, mesh of 1

Smoke test on CPU (8 fake devices, tiny shapes)::

    python experiments/bench_scaleout.py --cpu-devices 8 --config tiny --counts 1 2 \\
        --per-device-batch 2 --hidden 64 --depth 5 --layer-tokens 256 --steps 2 --warmup 1 --out smoke \\
        --compute-dtype float32
"""

import argparse
import json
import math
import os
from pathlib import Path

from fffjax import bench

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- pretraining


def random_mlm_batch(rng, batch: int, seq: int, vocab: int) -> dict:
    """An MLM batch (:func:`fffjax.data.mlm.mask_tokens`) of uniformly random word-piece ids."""

    from fffjax.data.mlm import mask_tokens
    from fffjax.data.tokenizer import WORDPIECE_SPECIALS

    words = WORDPIECE_SPECIALS.word_ids(vocab)
    return mask_tokens(words[rng.integers(0, len(words), size=(batch, seq))], rng, vocab_size=vocab,
                       specials=WORDPIECE_SPECIALS)


def bench_pretrain(args, n: int, scheme: str) -> dict:
    """``scheme``: a name of ``fffjax.train.sharding.PARALLELISM``, optionally ``@m`` for a model axis of
    size ``m`` (default 1; the mesh is ``(n / m, m)``). The Trainer runs the modules in
    ``args.compute_dtype``."""
    import jax
    import numpy as np
    from flax import nnx

    from fffjax import train
    from fffjax.models.config import get_config
    from fffjax.models.crammed_bert import CrammedBertMLM
    from fffjax.train import sharding as shd

    config = get_config(args.config)
    name, _, m = scheme.partition("@")
    model_axis = int(m or 1)
    if n % model_axis:
        raise ValueError(f"scheme {scheme!r}: model axis {model_axis} does not divide {n} devices")
    mesh = shd.make_mesh(n // model_axis, model_axis, devices=jax.devices()[:n])
    batch = args.per_device_batch * n
    train_config = train.TrainConfig(steps=10_000, batch_size=batch, compute_dtype=args.compute_dtype,
                                    data_parallel=n // model_axis, model_parallel=model_axis)
    model = CrammedBertMLM(config, implementation=args.implementation, rngs=nnx.Rngs(0))
    rules = shd.apply_parallelism(model, name, mesh)
    trainer = train.Trainer(model, train.mlm_objective, train_config, mesh=mesh, rules=rules)
    host = random_mlm_batch(np.random.default_rng(0), batch, config.max_seq_length, config.vocab_size)
    # Trainer.step places the host batch, runs the jitted step and fetches the metrics (blocking),
    # as a training loop does.
    seconds = bench.latency(trainer.step, host, calls=args.steps, warmup=args.warmup, repeats=args.repeats)
    tokens = batch * config.max_seq_length
    return {"bench": "pretrain", "config": args.config, "scheme": scheme, "devices": n, "per_device_batch":
            args.per_device_batch, "seq": config.max_seq_length, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "compute_dtype": args.compute_dtype, "implementation": args.implementation}


# ----------------------------------------------------------------------------- tree-parallel layer


def bench_layer(args, n: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from fffjax import parallel, v2

    mesh = jax.make_mesh((n,), ("model",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    top_levels = n.bit_length() - 1
    dtype = jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32
    p = v2.init(jax.random.key(0), args.hidden, args.depth, dtype=dtype)
    names = ("w_in", "b_in", "w_out")
    tops, subs = {}, {}
    for name in names:
        tops[name], subs[name] = parallel.to_tree_parallel_layout(p[name], levels=args.depth + 1, top_levels=top_levels)
    tokens = args.layer_tokens * n
    x = jax.random.normal(jax.random.key(1), (tokens, args.hidden), dtype)
    sh = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    weights = [jax.device_put(tops[k], sh(P())) for k in names] + [jax.device_put(subs[k], sh(P("model")))
                                                                    for k in names]
    x = jax.device_put(x, sh(P("model")))

    def loss(x, *w):
        y = parallel.fff_v2_subtree_parallel(x, *w, depth=args.depth, mesh=mesh,
                                             capacity_factor=args.capacity_factor)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    seconds = bench.latency(step, x, *weights, calls=args.steps, warmup=args.warmup, repeats=args.repeats)

    # The exchanges alone: 3 forward (tokens, tree ids, outputs) and 2 backward, n x capacity rows.
    items = args.layer_tokens
    cap = max(1, min(items, math.ceil(args.capacity_factor * items / n)))
    buf = jax.device_put(jnp.zeros((n * n, cap, args.hidden), dtype), sh(P("model")))
    ids = jax.device_put(jnp.zeros((n * n, cap), jnp.int32), sh(P("model")))

    def exchanges(buf, ids):
        out = buf
        for _ in range(4):
            out = jax.lax.all_to_all(out, "model", 0, 0)
        return out, jax.lax.all_to_all(ids, "model", 0, 0)

    a2a = jax.jit(jax.shard_map(exchanges, mesh=mesh, in_specs=(P("model"), P("model")),
                                out_specs=(P("model"), P("model"))))
    a2a_seconds = bench.latency(a2a, buf, ids, calls=args.steps, warmup=args.warmup, repeats=args.repeats)
    return {"bench": "layer", "scheme": "layer", "devices": n, "hidden": args.hidden, "depth": args.depth,
            "tokens_per_device": args.layer_tokens, "capacity": cap, "step_s": seconds,
            "tokens_per_s": tokens / seconds, "all_to_all_s": a2a_seconds, "compute_dtype": args.compute_dtype}


def bench_mesh1(args) -> list[dict]:
    """The tree-parallel layer on a mesh of one device against the plain kernel (module docstring, 3.)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType

    from fffjax import ops, parallel, v2

    mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    dtype = jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32
    p = v2.init(jax.random.key(0), args.hidden, args.depth, dtype=dtype)
    weights = (p["w_in"], p["b_in"], p["w_out"])
    x = jax.random.normal(jax.random.key(1), (args.layer_tokens, args.hidden), dtype)
    layers = {}
    for impl in args.mesh1_implementations:
        layers[f"plain {impl}"] = lambda x, *w, impl=impl: ops.fff_v2_hard(
            x, *w, depth=args.depth, implementation=impl)
        layers[f"tree-parallel {impl}"] = lambda x, *w, impl=impl: parallel.fff_v2_tree_parallel(
            x, *w, depth=args.depth, mesh=mesh, capacity_factor=args.capacity_factor, implementation=impl)
    variants = {}
    for name, layer in layers.items():
        forward = jax.jit(layer)
        step = jax.jit(jax.grad(lambda x, *w, layer=layer: jnp.sum(layer(x, *w).astype(jnp.float32) ** 2),
                                argnums=(0, 1, 2, 3)))
        variants[f"{name} forward"] = lambda forward=forward: forward(x, *weights)
        variants[f"{name} forward+backward"] = lambda step=step: step(x, *weights)
    timings = bench.side_by_side(variants, rounds=args.repeats * args.steps, warmup=args.warmup, log=bench.log)
    rows = []
    for name, t in timings.items():
        layer, _, pass_ = name.rpartition(" ")
        impl = layer.split(" ")[-1]
        plain = timings[f"plain {impl} {pass_}"].median_s
        rows.append({"bench": "mesh1", "scheme": name, "devices": 1, "hidden": args.hidden, "depth": args.depth,
                     "tokens_per_device": args.layer_tokens, "step_s": t.median_s,
                     "tokens_per_s": args.layer_tokens / t.median_s, "vs_plain": t.median_s / plain,
                     "compute_dtype": args.compute_dtype})
    return rows


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    """The table of ``report["rows"]`` with each row's scaling efficiency against its one-device row."""
    rows = report["rows"]
    lines = ["# Scale-out: tokens/s at a fixed per-device batch", "", bench.provenance_line(report), "",
             "Scaling efficiency = tokens/s(n) / (n x tokens/s(1)). Layer rows: compute = the one-device "
             "step at the same per-device tokens; all-to-all = the step's five exchanges timed alone.", "",
             "| bench | scheme | devices | step (ms) | tokens/s | scaling efficiency | all-to-all (ms) "
             "| compute (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["bench"] != "mesh1"):
        base = next((b for b in rows if b["bench"] == r["bench"] and b["scheme"] == r["scheme"] and b["devices"] == 1),
                    None) or next((b for b in rows if b["bench"] == r["bench"] == "pretrain" and b["scheme"] == "dp"
                                   and b["devices"] == 1), None)   # tree@m has no 1-device run: vs dp
        eff = f"{r['tokens_per_s'] / (r['devices'] * base['tokens_per_s']):.1%}" if base else "–"
        a2a = f"{1e3 * r['all_to_all_s']:.2f}" if "all_to_all_s" in r else "–"
        comp = f"{1e3 * base['step_s']:.2f}" if r["bench"] == "layer" and base else "–"
        lines.append(f"| {r['bench']} | {r['scheme']} | {r['devices']} | {1e3 * r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {eff} | {a2a} | {comp} |")
    mesh1 = [r for r in rows if r["bench"] == "mesh1"]
    if mesh1:
        lines += ["", "## The tree-parallel layer on a mesh of one device against the plain kernel", "",
                  "| variant | tokens | ms | tokens/s | time vs the plain kernel |", "|---|---|---|---|---|"]
        lines += [f"| {r['scheme']} | {r['tokens_per_device']} | {1e3 * r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
                  f"| {r['vs_plain']:.2f}x |" for r in mesh1]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--schemes", nargs="+", default=["dp", "fsdp", "tree@2", "layer"],
                    help="pretraining: a fffjax.train.sharding.PARALLELISM name, '@m' for a model axis of m "
                         "devices; 'layer': the tree-parallel FFF layer benchmark; 'mesh1': the tree-parallel "
                         "layer on a mesh of one device against the plain kernel (runs at n = 1 only)")
    ap.add_argument("--config", default="base")
    ap.add_argument("--per-device-batch", type=int, default=64, help="sequences per device and step")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--implementation", default=None, help="FFF-v2 implementation of the model (None: fastest)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--depth", type=int, default=11)
    ap.add_argument("--layer-tokens", type=int, default=16384, help="tokens per device (layer benchmark)")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--mesh1-implementations", nargs="+", default=["pallas", "xla"],
                    help="fff_v2_hard implementations the mesh1 scheme times, plain and tree-parallel")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices (smoke tests)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import jax

    if a.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    counts = [n for n in a.counts if n <= len(jax.devices())]
    if any(n & (n - 1) for n in counts):
        ap.error("--counts must be powers of two (the tree layer's axis)")
    kind = jax.devices()[0].device_kind.replace(" ", "_").lower()
    out = a.out or f"scaleout_{kind}"
    head = bench.provenance(__file__, argv)
    rows = []
    existing = RESULTS / f"{out}.json"
    if existing.exists():       # keep rows measured by earlier calls (other device kinds / counts)
        rows = [r for r in json.loads(existing.read_text())["rows"]
                if not (r["devices"] in counts and (r["scheme"] in a.schemes or r["bench"] in a.schemes))]
    for n in counts:
        for scheme in a.schemes:
            if scheme.partition("@")[2] and n % int(scheme.partition("@")[2]) or scheme == "mesh1" and n != 1:
                continue
            if scheme == "mesh1":
                new = bench_mesh1(a)
            else:
                new = [bench_layer(a, n) if scheme == "layer" else bench_pretrain(a, n, scheme)]
            for row in new:
                row["device_kind"] = jax.devices()[0].device_kind
                rows.append(row)
                print(json.dumps(row), flush=True)
            rows.sort(key=lambda r: (r["bench"], r["scheme"], r["devices"]))
            report = {**head, "rows": rows}
            bench.write_results(RESULTS, out, report=report, markdown=markdown(report))
    print((RESULTS / f"{out}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
