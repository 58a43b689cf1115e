"""FFF-v2 hard inference and conditional training on one GPU, against dense feedforward layers.

Layers: H = 768, one tree of depth 11 ("1x11", UltraFastBERT), 4 trees of depth 9 ("4x9"), 16 of
depth 7 ("16x7") and 128 trees of depth 4 ("128x4"), all about 4096 neurons (``--layers``; the
default run times 1x11 and 128x4).
Forward, tokens 2**14..2**20, float32 and bfloat16: dense FF of width 4095, 4096 and 3072 through
XLA (cuBLAS) and ``torch.nn.Linear`` (where torch is installed), the masked dense FFF form
(``fffjax.v2.masked_forward``), the XLA gather path (``fffjax.v2.conditional_forward``) and the Pallas
kernel (block sizes autotuned at the largest token count among :data:`FORWARD_CANDIDATES`). Tokens/s
and the fraction of the HBM roofline (x read once, y written once, at the copy bandwidth measured in
the same run: :func:`fffjax.bench.copy_bandwidth`). Training step (forward + backward of the layer,
all four gradients): Pallas vs masked dense vs XLA gather with scatter-add.

Timing: :func:`fffjax.bench.stream` (compile and one call, then 3 runs of calls sent back to back
within 0.3 s, the last one waited for; the median); torch's dense layers by CUDA events, the same
way. ``--breakdown`` times each stage of the Pallas path alone in device time
(:func:`fffjax.bench.chained`).

Run on the GPU machine::

    python experiments/bench_gpu.py --out $OUT            # full run: json, md, png
    python experiments/bench_gpu.py --out $OUT --sweep    # block-size sweep only
    python experiments/bench_gpu.py --out experiments/results --merge a/bench_gpu.json b/bench_gpu.json

``--tree-shapes``: the tree-shape table only (``tree_shapes_{gpu,cpu}.{json,md}``): forward and training
step (all four gradients) of each layer through :func:`fffjax.fff_v2_hard` with the default implementation
(``"pallas"`` on a GPU, ``"cpu_ffi"`` with its reference VJP on the CPU), jitted with the weights as
arguments, beside the dense FF of width 4095 timed the same way; quality from the decoder experiments
(``QUALITY_SOURCES``: one column each) where they have the shape. ``--from-json`` redraws a table with the
decoder experiments' current reports, without timing anything::

    python experiments/bench_gpu.py --out $OUT --tree-shapes --dtypes bfloat16 --token-exponents 12 16
    JAX_PLATFORMS=cpu python experiments/bench_gpu.py --out experiments/results --tree-shapes \
        --dtypes float32 --token-exponents 10
    python experiments/bench_gpu.py --tree-shapes --from-json experiments/results/tree_shapes_cpu.json

CPU smoke run of the script (kernels in interpret mode, a few minutes)::

    python experiments/bench_gpu.py --out /tmp/bench_smoke --layers 1x11 --dtypes bfloat16 \\
        --token-exponents 10 --forward-candidates 13 --train-candidates 1 --no-torch
"""

import argparse
import functools
import json
import math
import os
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fffjax  # noqa: E402
import pallas_kernels as pk  # noqa: E402
from fffjax import bench, v2  # noqa: E402
from fffjax.models.decoder import DECODER_CONFIGS  # noqa: E402
from pallas_kernels.fff_v2_forward import FffV2ForwardConfig  # noqa: E402
from pallas_kernels.fff_v2_forward import default_config as fwd_default_config  # noqa: E402
from pallas_kernels.fff_v2_train import FffV2TrainConfig  # noqa: E402

WIDTH = 768
LAYERS = {"1x11": (1, 11), "4x9": (4, 9), "16x7": (16, 7), "128x4": (128, 4)}
DEFAULT_LAYERS = ("1x11", "128x4")
# Decoder experiments whose validation perplexity the tree-shape table shows, one column each.
QUALITY_SOURCES = tuple(Path(__file__).resolve().parent / "results" / name
                        for name in ("decoder_lm_cpu.json", "decoder_lm_cpu_3000.json",
                                     "decoder_lm_cpu_3000_baselines.json", "decoder_lm_cpu_128x4.json",
                                     "decoder_lm_gpu.json"))
DENSE_WIDTHS = (4095, 4096, 3072)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

C = FffV2ForwardConfig
R256 = dict(route_block_t=256, route_chunk=64, route_num_warps=8, route_num_stages=3)
# Forward tiles to try, fastest (within tolerance) wins. 1x11: the grouped kernel (split_level 7: route
# kernel for the top 7 levels, then one program per subtree) with stages > 1 running the column chunks
# as loops that Triton pipelines, varied one field at a time, then route-kernel tiles; last, the
# token-order kernel (split_level 0), with the top levels as one dense tile where dense_levels > 0.
FORWARD_CANDIDATES = {
    "1x11": [C(block_t=64, chunk=128, num_warps=4, num_stages=3, split_level=7, **R256),
             C(block_t=64, chunk=128, num_warps=4, num_stages=4, split_level=7, **R256),
             C(block_t=64, chunk=64, num_warps=4, num_stages=3, split_level=7, **R256),
             C(block_t=64, chunk=256, num_warps=4, num_stages=3, split_level=7, **R256),
             C(block_t=64, chunk=128, num_warps=8, num_stages=3, split_level=7, **R256),
             C(block_t=128, chunk=128, num_warps=4, num_stages=3, split_level=7, **R256),
             C(block_t=32, chunk=128, num_warps=4, num_stages=3, split_level=7, **R256),
             C(block_t=64, chunk=128, num_warps=4, num_stages=3, split_level=7, route_block_t=256, route_chunk=128,
               route_num_warps=8, route_num_stages=3),
             C(block_t=64, chunk=128, num_warps=4, num_stages=3, split_level=7, route_block_t=512, route_chunk=64,
               route_num_warps=8, route_num_stages=3),
             C(block_t=64, chunk=128, num_warps=4, num_stages=3, split_level=7, route_block_t=256, route_chunk=64,
               route_num_warps=4, route_num_stages=4),
             C(block_t=64, chunk=128, num_warps=4, num_stages=3, split_level=7, route_block_t=128, route_num_warps=8,
               route_num_stages=3),
             C(block_t=64, chunk=128, num_warps=4, split_level=7),
             C(block_t=64, chunk=128, num_warps=4, split_level=8),
             C(block_t=16, chunk=256, num_warps=8),
             C(block_t=32, chunk=128, dense_levels=4, num_warps=4),
             C(block_t=64, chunk=128, dense_levels=5, num_warps=8)],
    "4x9": [C(block_t=16, chunk=256, num_warps=8),
            C(block_t=64, chunk=128, dense_levels=5, num_warps=4),
            C(block_t=64, chunk=256, dense_levels=5, num_warps=8)],
    "16x7": [C(block_t=16, chunk=256, num_warps=8),
             C(block_t=64, chunk=128, dense_levels=4, num_warps=4),
             C(block_t=64, chunk=256, dense_levels=5, num_warps=8)],
    "128x4": [C(block_t=16, chunk=256, num_warps=8),
              C(block_t=64, chunk=128, dense_levels=5, num_warps=4),
              C(block_t=64, chunk=256, dense_levels=5, num_warps=8),
              C(block_t=128, chunk=128, dense_levels=5, num_warps=8),
              C(block_t=128, chunk=256, dense_levels=5, num_warps=8)],
}
INTERPRET = jax.default_backend() != "gpu"   # CPU dry runs of the script only
TRAIN_CANDIDATES = [FffV2TrainConfig(grouped_chunk=64, grouped_num_warps=4),
                    FffV2TrainConfig(grouped_chunk=128, grouped_num_warps=8),
                    FffV2TrainConfig(grouped_chunk=64, grouped_num_warps=8, weight_block_t=128),
                    FffV2TrainConfig(grouped_chunk=128, grouped_num_warps=4, weight_block_t=256, weight_chunk=64,
                                     weight_num_warps=8),
                    FffV2TrainConfig(grouped_chunk=128, grouped_num_warps=8, num_stages=3)]


def log(message: str) -> None:
    bench.log(message)


def layer_params(layer: str, dtype):
    n_trees, depth = LAYERS[layer]
    p = v2.init(jax.random.key(0), WIDTH, depth, n_trees=n_trees, dtype=dtype)
    return n_trees, depth, p


def tokens(n: int, dtype, seed: int = 1):
    return jax.random.normal(jax.random.key(seed), (n, WIDTH), dtype)


def dense_xla(width: int, dtype):
    k1, k2 = jax.random.split(jax.random.key(5))
    w1 = jax.random.normal(k1, (WIDTH, width), dtype) * 0.03
    w2 = jax.random.normal(k2, (width, WIDTH), dtype) * 0.03
    b1, b2 = jnp.zeros((width,), dtype), jnp.zeros((WIDTH,), dtype)
    f = jax.jit(lambda x: jax.nn.gelu(x @ w1 + b1, approximate=False) @ w2 + b2)
    return f


def forward_impls(layer: str, dtype, config):
    n_trees, depth, p = layer_params(layer, dtype)
    w = (p["w_in"], p["b_in"], p["w_out"])
    kw = {"depth": depth, "n_trees": n_trees}
    masked = jax.jit(lambda x: v2.masked_forward(x, *w, **kw))
    gather = jax.jit(lambda x: v2.conditional_forward(x, *w, **kw))
    pallas = jax.jit(lambda x: pk.fff_v2_hard(x, *w, **kw, config=config, interpret=INTERPRET))
    return {"masked_dense": masked, "xla_gather": gather, "pallas": pallas}, w, kw


def train_impls(layer: str, dtype, config):
    n_trees, depth, p = layer_params(layer, dtype)
    w = (p["w_in"], p["b_in"], p["w_out"])
    kw = {"depth": depth, "n_trees": n_trees}

    def step(fn):
        def loss(x, a, b, c, dy):
            return jnp.sum(fn(x, a, b, c).astype(jnp.float32) * dy)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        return lambda x, dy: g(x, *w, dy)

    return {
        "masked_dense": step(lambda x, a, b, c: v2.masked_forward(x, a, b, c, **kw)),
        "xla_gather": step(lambda x, a, b, c: v2.conditional_forward(x, a, b, c, **kw)),
        "pallas": step(lambda x, a, b, c: pk.fff_v2_hard_trainable(x, a, b, c, **kw, config=config,
                                                                   interpret=INTERPRET)),
    }


def check_forward(fn, layer, dtype, w, kw):
    """Max |error| / max(1, max|ref|) over 4099 tokens, leaving out the tokens with a routing logit
    within 1e-5 of 0 (:func:`fffjax.v2.routing_margin`: they may take either branch)."""
    x = tokens(4099, dtype, seed=11)
    y = fn(x)
    ref = pk.fff_v2_hard_reference(x, *w, **kw)
    keep = (v2.routing_margin(x, w[0], w[1], **kw) > 1e-5)[:, None]
    err = float(jnp.max(jnp.where(keep, jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)), 0.0)))
    scale = max(1.0, float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))
    return err / scale


def autotune_forward(layer: str, dtype, n_tokens: int, candidates):
    x = tokens(n_tokens, dtype)
    best = None
    rows = []
    for cfg in candidates:
        try:
            fns, w, kw = forward_impls(layer, dtype, cfg)
            t = bench.stream(fns["pallas"], x)
            err = check_forward(fns["pallas"], layer, dtype, w, kw)
        except Exception as e:  # a config that fails to compile or run is skipped, and reported
            log(f"  {layer} {jnp.dtype(dtype).name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
            rows.append({"config": cfg.__dict__, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        row = {"config": cfg.__dict__, "ms": t * 1e3, "rel_err": err}
        if cfg.split_level and jnp.dtype(dtype).itemsize == 2:   # the route kernel alone (16-bit routes in Pallas)
            from pallas_kernels.fff_v2_forward import route_to_subtrees
            route = jax.jit(lambda x, w=w, cfg=cfg: route_to_subtrees(x, w[0], w[1], split=cfg.split_level,
                                                                      config=cfg, interpret=INTERPRET))
            row["route_ms"] = bench.stream(route, x) * 1e3
        log(f"  {layer} {jnp.dtype(dtype).name} T={n_tokens} {cfg}: {t * 1e3:.3f} ms "
            f"(route {row.get('route_ms', float('nan')):.3f} ms)  rel.err {err:.2e}")
        rows.append(row)
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        if err <= tol and (best is None or t < best[1]):
            best = (cfg, t)
    del x
    return (best[0] if best else FffV2ForwardConfig()), rows


def autotune_train(layer: str, dtype, n_tokens: int, forward_cfg, candidates):
    x, dy = tokens(n_tokens, dtype), tokens(n_tokens, jnp.float32, seed=3)
    best, rows = None, []
    for cand in candidates:
        cfg = FffV2TrainConfig(**{**cand.__dict__, "forward": forward_cfg})
        try:
            t = bench.stream(train_impls(layer, dtype, cfg)["pallas"], x, dy)
        except Exception as e:
            log(f"  train {layer} {cand}: FAILED {type(e).__name__}: {str(e)[:300]}")
            rows.append({"config": {k: v for k, v in cand.__dict__.items() if k != "forward"}, "error": str(e)[:300]})
            continue
        log(f"  train {layer} {jnp.dtype(dtype).name} T={n_tokens} gc={cand.grouped_chunk} gw={cand.grouped_num_warps} "
            f"wbt={cand.weight_block_t} wc={cand.weight_chunk} ww={cand.weight_num_warps}: {t * 1e3:.3f} ms")
        rows.append({"config": {k: v for k, v in cand.__dict__.items() if k != "forward"}, "ms": t * 1e3})
        if best is None or t < best[1]:
            best = (cfg, t)
    return (best[0] if best else FffV2TrainConfig(forward=forward_cfg)), rows


def breakdown(layer: str, dtype, n_tokens: int, forward_cfg, train_cfg, alternatives=()) -> dict:
    """Device milliseconds (:func:`fffjax.bench.chained`) of each stage of the grouped Pallas forward and of
    the training step, timed alone, and of the whole forward with each of ``alternatives`` (configs)."""
    from pallas_kernels import fff_v2_forward as fwd
    from pallas_kernels import fff_v2_train as trn

    n_trees, depth, p = layer_params(layer, dtype)
    w_in, b_in, w_out = p["w_in"], p["b_in"], p["w_out"]
    x, dy = tokens(n_tokens, dtype), tokens(n_tokens, dtype, seed=3)
    split = forward_cfg.split_level
    kw = dict(depth=depth, n_trees=n_trees, interpret=INTERPRET)
    stages = {}
    if split:
        stages["route_kernel"] = bench.chained(
            lambda x: fwd.route_to_subtrees(x, w_in, b_in, split=split, config=forward_cfg, interpret=INTERPRET), x)
        s = fwd.route_to_subtrees(x, w_in, b_in, split=split, config=forward_cfg, interpret=INTERPRET)
        stages["rank_kernel"] = bench.chained(lambda s: fwd.rank_in_subtree(s, 2**split, interpret=INTERPRET), s)
        stages["route_and_layout"] = bench.chained(
            lambda x: fwd.group_by_subtree(x, w_in, b_in, split=split, config=forward_cfg, interpret=INTERPRET), x)
    stages["forward"] = bench.chained(lambda x: fwd.fff_v2_forward(x, w_in, b_in, w_out, config=forward_cfg, **kw), x)
    for i, cfg in enumerate(alternatives):
        try:
            stages[f"forward_alt{i}"] = bench.chained(
                lambda x, cfg=cfg: fwd.fff_v2_forward(x, w_in, b_in, w_out, config=cfg, **kw), x)
        except Exception as e:   # a config that fails to compile is reported, not fatal
            log(f"  alternative {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
    stages["forward_with_residuals"] = bench.chained(
        lambda x: fwd.fff_v2_forward(x, w_in, b_in, w_out, config=forward_cfg, save_residuals=True, **kw), x)
    res = fwd.fff_v2_forward(x, w_in, b_in, w_out, config=forward_cfg, save_residuals=True, **kw)
    stages["backward"] = bench.chained(
        lambda x, dy, res: trn.backward_from_residuals(x, w_in, b_in, w_out, res, dy, config=train_cfg, **kw),
        x, dy, res)
    ms = {k: v * 1e3 for k, v in stages.items()}
    log(f"breakdown {layer} {jnp.dtype(dtype).name} T={n_tokens}: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    return {"layer": layer, "dtype": jnp.dtype(dtype).name, "tokens": n_tokens, "config": forward_cfg.__dict__,
            "alternatives": [c.__dict__ for c in alternatives], "ms": ms, "timing": "device (chained)"}


def dense_params(width: int, dtype):
    """``(w1, b1, w2, b2)`` of a dense FF of ``width`` neurons (the arguments of :func:`dense_forward`)."""
    k1, k2 = jax.random.split(jax.random.key(5))
    return (jax.random.normal(k1, (WIDTH, width), dtype) * 0.03, jnp.zeros((width,), dtype),
            jax.random.normal(k2, (width, WIDTH), dtype) * 0.03, jnp.zeros((WIDTH,), dtype))


def dense_forward(x, w1, b1, w2, b2):
    return jax.nn.gelu(x @ w1 + b1, approximate=False) @ w2 + b2


def training_step(forward):
    """Jitted ``(x, *weights, dy) -> grads of sum(forward(x, *weights) * dy)`` w.r.t. ``x`` and every weight."""
    def loss(x, *args):
        *weights, dy = args
        return jnp.sum(forward(x, *weights).astype(jnp.float32) * dy)

    return jax.jit(lambda x, *args: jax.grad(loss, argnums=tuple(range(len(args))))(x, *args))


def decoder_quality(path: Path) -> dict | None:
    """One decoder experiment's quality by layer shape: ``{"source", "size", "width", "device", "tokens",
    "seeds", "layers": {layer: {"perplexity", "sd", "dense", "seeds"}}}`` from its ``SIZE-fff-KxD`` variants
    (validation perplexity, mean and standard deviation over seeds) beside its dense twin ``SIZE-dense``;
    None when the file is missing."""
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    variants = report["variants"]
    size = next(name.removesuffix("-dense") for name in variants if name.endswith("-dense"))
    dense = variants[f"{size}-dense"]["perplexity_mean"]
    prefix = f"{size}-fff-"
    fff = {name.removeprefix(prefix): v for name, v in variants.items() if name.startswith(prefix)}
    some = next(iter(variants.values()))
    seeds = max((len(v["seeds"]) for v in fff.values()), default=0)
    return {"source": path.name, "size": size, "width": DECODER_CONFIGS[f"{size}-dense"].hidden_size,
            "device": report["sweeps"][0]["device_kind"], "tokens": some["tokens"], "seeds": seeds,
            "layers": {layer: {"perplexity": v["perplexity_mean"], "sd": v["perplexity_sd"], "dense": dense,
                               "seeds": len(v["seeds"])} for layer, v in fff.items()}}


def quality_columns() -> list[dict]:
    """:func:`decoder_quality` of every ``QUALITY_SOURCES`` file that exists."""
    return [q for q in map(decoder_quality, QUALITY_SOURCES) if q is not None]


def tree_shapes(args, argv=None) -> dict:
    """Forward and training-step times of each layer shape through the public op's default
    implementation, with the dense FF-4095 timed the same way (``layer = "dense4095"``)."""
    head = bench.provenance(__file__, argv)
    log(f"{head['command']} on {head['device_kind']}, jax {jax.__version__}")
    rows = []
    out = {**head, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "quality": quality_columns(),
           "results": rows}
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        shapes = {}
        for layer in args.layers:
            n_trees, depth, p = layer_params(layer, dtype)
            kw = {"depth": depth, "n_trees": n_trees}

            def fff(x, a, b, c, kw=kw):
                return fffjax.fff_v2_hard(x, a, b, c, **kw)

            shapes[layer] = (fff, (p["w_in"], p["b_in"], p["w_out"]))
        shapes["dense4095"] = (dense_forward, dense_params(4095, dtype))
        fns = {layer: (jax.jit(forward), training_step(forward), w) for layer, (forward, w) in shapes.items()}
        for n in (2**e for e in args.token_exponents):
            x, dy = tokens(n, dtype), tokens(n, jnp.float32, seed=3)
            calls = {}
            for layer, (fwd_fn, train_fn, w) in fns.items():
                calls[f"{layer}/forward"] = functools.partial(fwd_fn, x, *w)
                calls[f"{layer}/train"] = functools.partial(train_fn, x, *w, dy)
            load_before = os.getloadavg()[0]
            times = bench.side_by_side(calls, rounds=args.rounds, budget_s=args.budget_s, log=log)
            for layer in fns:
                f_s, t_s = times[f"{layer}/forward"].median_s, times[f"{layer}/train"].median_s
                rows.append({"layer": layer, "dtype": dname, "tokens": n, "forward_ms": f_s * 1e3,
                             "train_ms": t_s * 1e3, "forward_tokens_per_s": n / f_s, "train_tokens_per_s": n / t_s,
                             "samples": len(times[f"{layer}/forward"].samples_s),
                             "load_average_1min": [load_before, os.getloadavg()[0]]})
                log(f"{layer} {dname} T={n}: forward {f_s * 1e3:.3f} ms, training step {t_s * 1e3:.3f} ms")
            bench.write_results(args.out, f"tree_shapes_{jax.default_backend()}", report=out,
                                markdown=tree_shapes_markdown(out))
    return out


def _quality_cell(column: dict, layer: str) -> str:
    q = column["layers"].get(layer)
    if q is None:
        return "n/a"
    spread = f" ± {q['sd']:.1f}" if q["seeds"] > 1 else ""
    return f"{q['perplexity']:.1f}{spread} ({q['dense']:.1f})"


def tree_shapes_markdown(out: dict) -> str:
    rows, columns = out["results"], out.get("quality", [])
    sources = "; ".join(f"`{c['source']}`: the `{c['size']}` decoder (H = {c['width']}) on "
                        f"{c['device']}, {c['tokens'] / 1e6:.1f}M training tokens, {c['seeds']} seed(s)"
                        for c in columns)
    lines = [f"# FFF-v2 tree shapes at H = {WIDTH} ({out['device_kind']})", "", bench.provenance_line(out), "",
             "Each layer has about 4096 neurons (K trees of depth D: K (2^(D+1) - 1)); a token visits K (D + 1) of "
             "them. Forward and training step (forward + backward, gradients of x and all weights) through "
             "`fffjax.fff_v2_hard` with the default implementation, jitted with the weights as arguments; ms per "
             "call (one call waited for), median of samples interleaved round by round over all layers "
             "(`fffjax.bench.side_by_side`); in brackets the dense FF of width 4095's time "
             "over the layer's (above 1: the FFF layer is faster). Quality: validation perplexity of a causal "
             "decoder trained with this shape of tree, one column per experiment "
             f"({sources}; mean ± sd over seeds where there are several; its dense twin in brackets); n/a where "
             f"an experiment has no such shape. GLIBC_TUNABLES={out.get('glibc_tunables') or '(unset)'}.", ""]
    quality_head = "".join(f" | perplexity, {c['size']}, {c['tokens'] / 1e6:.1f}M tokens "
                           f"(`{Path(c['source']).stem}`)"
                           for c in columns)
    for dname in dict.fromkeys(r["dtype"] for r in rows):
        for n in sorted({r["tokens"] for r in rows if r["dtype"] == dname}):
            sel = {r["layer"]: r for r in rows if r["dtype"] == dname and r["tokens"] == n}
            dense = sel.get("dense4095")
            lines += [f"## {dname}, {n} tokens", "",
                      f"| layer | neurons | on a path | forward ms | training step ms{quality_head} |",
                      "|---|---:|---:|---:|---:" + "|---:" * len(columns) + "|"]
            for layer, r in sel.items():
                if layer == "dense4095":
                    neurons, active, quality = 4095, 4095, ["–"] * len(columns)
                else:
                    k, d = LAYERS[layer]
                    neurons, active = k * (2 ** (d + 1) - 1), k * (d + 1)
                    quality = [_quality_cell(c, layer) for c in columns]
                fwd_cell, train_cell = f"{r['forward_ms']:.3f}", f"{r['train_ms']:.3f}"
                if dense and layer != "dense4095":
                    fwd_cell += f" ({dense['forward_ms'] / r['forward_ms']:.1f}x)"
                    train_cell += f" ({dense['train_ms'] / r['train_ms']:.1f}x)"
                lines.append(f"| {layer} | {neurons} | {active} | {fwd_cell} | {train_cell} |"
                             + "".join(f" {q} |" for q in quality))
            load = next(iter(sel.values())).get("load_average_1min")
            if load:
                lines += ["", f"1-minute load average {load[0]:.2f} before, {load[1]:.2f} after (the machine's other "
                          "work included)."]
            lines.append("")
    return "\n".join(lines) + "\n"


def roofline_s(n_tokens: int, dtype, bandwidth: float) -> float:
    return n_tokens * 2 * WIDTH * jnp.dtype(dtype).itemsize / bandwidth


def run(args, argv=None):
    head = bench.provenance(__file__, argv)
    log(f"{head['command']} on {head['device_kind']}, jax {jax.__version__}")
    bandwidth = bench.copy_bandwidth()
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    token_counts = [2**e for e in args.token_exponents]
    results, tuning = [], {}
    out = {**head, "copy_bandwidth_TBps": bandwidth / 1e12, "tuning": tuning, "results": results}
    if args.breakdown:
        out["breakdown"] = []
        for layer in args.layers:
            for dname in args.dtypes:
                n_trees, depth = LAYERS[layer]
                alternatives = [FORWARD_CANDIDATES[layer][int(i)] for i in (args.forward_candidates or "").split(",")
                                if i]
                for n in token_counts:
                    fcfg = fwd_default_config(depth, n_trees, n, DTYPES[dname])
                    out["breakdown"].append(breakdown(layer, DTYPES[dname], n, fcfg, FffV2TrainConfig(forward=fcfg),
                                                      alternatives))
                    save(out, args)
        return out
    for layer in args.layers:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            cands = FORWARD_CANDIDATES[layer]
            if args.forward_candidates:
                cands = [cands[int(i)] for i in args.forward_candidates.split(",") if int(i) < len(cands)]
            cfg, rows = autotune_forward(layer, dtype, token_counts[-1], cands[:args.max_candidates])
            tuning[f"forward/{layer}/{dname}"] = {"best": cfg.__dict__, "tried": rows}
            if args.sweep and layer == "128x4":
                continue
            tune_tokens = token_counts[-1] if args.sweep else min(args.train_tune_tokens, token_counts[-1])
            tcfg, trows = autotune_train(layer, dtype, tune_tokens, cfg, TRAIN_CANDIDATES[:args.train_candidates])
            tuning[f"train/{layer}/{dname}"] = {"best": {k: v for k, v in tcfg.__dict__.items() if k != "forward"},
                                               "tried": trows}
            if args.sweep:
                continue
            fns, w, kw = forward_impls(layer, dtype, cfg)
            tfns = train_impls(layer, dtype, tcfg)
            slow = set(args.skip)
            for n in token_counts:
                x = tokens(n, dtype)
                roof = roofline_s(n, dtype, bandwidth)
                entries = {}
                for name, fn in fns.items():
                    if name in slow:
                        continue
                    try:
                        entries[name] = bench.stream(fn, x)
                    except Exception as e:
                        log(f"  {name} failed at T={n}: {type(e).__name__}: {str(e)[:200]}")
                        slow.add(name)
                        continue
                    if entries[name] * 8 > args.slow_s:
                        slow.add(name)
                if layer == "1x11":   # the dense baselines do not depend on the FFF layer
                    for width in DENSE_WIDTHS:
                        try:
                            entries[f"dense{width}_xla"] = bench.stream(dense_xla(width, dtype), x)
                        except Exception as e:
                            log(f"  dense{width}_xla failed: {e}")
                        try:   # torch allocates beside JAX's preallocated pool: large sizes can run out
                            ms = bench.torch_dense_ms(WIDTH, width, dname, n) if args.torch else None
                        except Exception as e:
                            log(f"  dense{width}_torch failed: {type(e).__name__}: {str(e)[:200]}")
                            ms = None
                        if ms is not None:
                            entries[f"dense{width}_torch"] = ms / 1e3
                for name, t in entries.items():
                    results.append({"kind": "forward", "layer": layer, "dtype": dname, "tokens": n, "impl": name,
                                    "ms": t * 1e3, "tokens_per_s": n / t, "roofline_ms": roof * 1e3,
                                    "roofline_fraction": roof / t})
                log(f"fwd {layer} {dname} T={n}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in entries.items()))
                dy = tokens(n, jnp.float32, seed=3)
                tentries = {}
                for name, fn in tfns.items():
                    if f"train_{name}" in slow:
                        continue
                    try:
                        tentries[name] = bench.stream(fn, x, dy)
                    except Exception as e:
                        log(f"  train {name} failed at T={n}: {type(e).__name__}: {str(e)[:200]}")
                        slow.add(f"train_{name}")
                        continue
                    if tentries[name] * 8 > args.slow_s:   # the next token count would be too slow: skip it
                        slow.add(f"train_{name}")
                for name, t in tentries.items():
                    results.append({"kind": "train", "layer": layer, "dtype": dname, "tokens": n, "impl": name,
                                    "ms": t * 1e3, "tokens_per_s": n / t})
                log(f"train {layer} {dname} T={n}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in tentries.items()))
                del x, dy
                save(out, args)       # after every token count: a run cut short keeps what it measured
            if not args.sweep:
                plot(out, args.out)
        save(out, args)
    return out


def save(out, args):
    name = "bench_gpu_breakdown" if args.breakdown else "bench_gpu_sweep" if args.sweep else "bench_gpu"
    bench.write_results(args.out, name, report=out,
                        markdown=None if args.sweep or args.breakdown else markdown(out))


def head_of(out: dict) -> dict:
    """The command, device and copy bandwidth of a run: top-level keys, or ``info`` in older files."""
    return out.get("info", out)


def _lookup(results, **key):
    for r in results:
        if all(r[k] == v for k, v in key.items()):
            return r
    return None


def markdown(out) -> str:
    info, results = head_of(out), out["results"]
    lines = [f"# FFF-v2 on {info.get('device_kind') or info['device']}", "", bench.provenance_line(info), "",
             f"Copy bandwidth measured in the run: {info['copy_bandwidth_TBps']:.2f} TB/s (read + write). "
             f"H = {WIDTH}. Times are ms per call, the median of 3 runs of calls sent back to back, the last one "
             "waited for; roofline = x read once + y written once at the measured copy bandwidth.", ""]
    for kind in ("forward", "train"):
        lines += [f"## {'Forward' if kind == 'forward' else 'Training step (forward + backward, all gradients)'}", ""]
        for layer in LAYERS:
            for dname in DTYPES:
                rows = [r for r in results if r["kind"] == kind and r["layer"] == layer and r["dtype"] == dname]
                if not rows:
                    continue
                impls = sorted({r["impl"] for r in rows}, key=lambda s: (not s.startswith("pallas"), s))
                counts = sorted({r["tokens"] for r in rows})
                lines += [f"### {layer}, {dname}", "",
                          "| impl | " + " | ".join(f"2^{int(math.log2(n))}" for n in counts) + " |",
                          "|---" * (len(counts) + 1) + "|"]
                for impl in impls:
                    cells = []
                    for n in counts:
                        r = _lookup(rows, impl=impl, tokens=n)
                        if r is None:
                            cells.append("-")
                        elif kind == "forward" and impl in ("pallas", "xla_gather", "masked_dense"):
                            cells.append(f"{r['ms']:.3f} ms ({100 * r['roofline_fraction']:.0f}%)")
                        else:
                            cells.append(f"{r['ms']:.3f} ms")
                    lines.append(f"| {impl} | " + " | ".join(cells) + " |")
                lines.append("")
    lines += ["## Targets (2^20 tokens, bf16, 1x11)", ""]
    n = max((r["tokens"] for r in results), default=0)

    def get(kind, impl):
        return _lookup(results, kind=kind, layer="1x11", dtype="bfloat16", tokens=n, impl=impl)

    pallas = get("forward", "pallas")
    if pallas:
        dense = [r for r in (get("forward", f"dense{w}_{s}") for w in (4095, 4096) for s in ("xla", "torch")) if r]
        fastest = min(dense, key=lambda r: r["ms"]) if dense else None
        gather = get("forward", "xla_gather")
        lines.append(f"- Forward: {pallas['ms']:.3f} ms = {100 * pallas['roofline_fraction']:.1f}% of the HBM roofline "
                     f"({pallas['roofline_ms']:.3f} ms) (target >= 60%).")
        if fastest:
            lines.append(f"- vs fastest dense FF of width 4095/4096 ({fastest['impl']}, {fastest['ms']:.3f} ms): "
                         f"{fastest['ms'] / pallas['ms']:.1f}x (target >= 15x).")
        if gather:
            lines.append(f"- vs XLA gather ({gather['ms']:.3f} ms): {gather['ms'] / pallas['ms']:.2f}x (target >= 3x).")
    tp, tm = get("train", "pallas"), get("train", "masked_dense")
    if tp and tm:
        lines.append(f"- Training step: Pallas {tp['ms']:.3f} ms vs masked dense {tm['ms']:.3f} ms: "
                     f"{tm['ms'] / tp['ms']:.1f}x (target >= 5x).")
    tg = get("train", "xla_gather")
    if tp and tg:
        lines.append(f"- Training step vs XLA gather + scatter ({tg['ms']:.3f} ms): {tg['ms'] / tp['ms']:.2f}x.")
    lines += ["", "## Autotuning (largest token count)", ""]
    for key, val in out["tuning"].items():
        lines.append(f"- {key}: best `{val['best']}`")
    return "\n".join(lines) + "\n"


def plot(out, folder):
    """``bench_gpu_forward.png`` and ``bench_gpu_train.png``: tokens/s against tokens, one panel per layer and dtype."""
    plt = bench.pyplot()
    info, results = head_of(out), out["results"]
    for kind in ("forward", "train"):
        panels = [(layer, dname) for layer in LAYERS for dname in DTYPES
                  if any(r["kind"] == kind and r["layer"] == layer and r["dtype"] == dname for r in results)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
        for k, (layer, dname) in enumerate(panels):   # one panel per (layer, dtype) that has data
            ax = axes[0][k]
            rows = [r for r in results if r["kind"] == kind and r["layer"] == layer and r["dtype"] == dname]
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["tokens"], r["tokens_per_s"]) for r in rows if r["impl"] == impl)
                style = "-o" if impl in ("pallas", "xla_gather", "masked_dense") else "--x"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl, lw=2 if impl == "pallas" else 1)
            if kind == "forward" and rows:
                bw = info["copy_bandwidth_TBps"] * 1e12
                roof = bw / (2 * WIDTH * jnp.dtype(DTYPES[dname]).itemsize)
                ax.axhline(roof, color="k", ls=":", label="HBM roofline")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{kind} {layer} {dname}")
            ax.set_xlabel("tokens")
            ax.set_ylabel("tokens / s")
            ax.grid(alpha=0.3)
            if rows:
                ax.legend(fontsize=7)
        fig.suptitle(f"FFF-v2 {kind}, H={WIDTH}, {info.get('device_kind') or info['device']}")
        fig.tight_layout()
        bench.write_results(folder, f"bench_gpu_{kind}", figure=fig, dpi=110)


def merge(paths, folder) -> dict:
    """One ``bench_gpu.json``/``.md``/PNGs in ``folder`` from the ``bench_gpu.json`` of separate runs
    (for example one process per layer and dtype, each under its own time limit): their results and
    tuning concatenated, the first run's device and versions with every run's command and the lowest
    copy bandwidth."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    heads = [head_of(r) for r in runs]
    first = {k: v for k, v in heads[0].items() if k not in ("command", "commands", "tuning", "results", "breakdown")}
    out = {**first, "commands": [c for h in heads for c in ([h["command"]] if "command" in h else h["commands"])],
           "copy_bandwidth_TBps": min(h["copy_bandwidth_TBps"] for h in heads),
           "tuning": {k: v for r in runs for k, v in r["tuning"].items()},
           "results": [row for r in runs for row in r["results"]]}
    bench.write_results(folder, "bench_gpu", report=out, markdown=markdown(out))
    plot(out, folder)
    return out


def redraw_tree_shapes(path: Path) -> dict:
    """The tree-shape report at ``path`` with its quality columns read again from ``QUALITY_SOURCES``,
    written back beside it (json and md); its timings are kept as they are."""
    out = {**json.loads(path.read_text()), "quality": quality_columns()}
    bench.write_results(path.parent, path.stem, report=out, markdown=tree_shapes_markdown(out))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).resolve().parent / "results")))
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="only merge the bench_gpu.json of separate runs into --out (no GPU needed)")
    parser.add_argument("--sweep", action="store_true", help="only the block-size sweep at the largest token count")
    parser.add_argument("--breakdown", action="store_true", help="only the per-stage times of the Pallas path")
    parser.add_argument("--tree-shapes", action="store_true",
                        help="only the tree-shape table (tree_shapes_{gpu,cpu}); --layers defaults to all four")
    parser.add_argument("--from-json", default=None, metavar="JSON",
                        help="with --tree-shapes: rewrite that table (json and md, beside it) with the decoder "
                             "experiments' current quality, timing nothing")
    parser.add_argument("--budget-s", type=float, default=3.0, help="seconds per variant in --tree-shapes")
    parser.add_argument("--rounds", type=int, default=15, help="most samples per variant in --tree-shapes")
    parser.add_argument("--layers", nargs="+", default=None, choices=list(LAYERS),
                        help=f"default {' '.join(DEFAULT_LAYERS)} (all with --tree-shapes)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--token-exponents", nargs="+", type=int, default=[14, 16, 18, 20])
    parser.add_argument("--train-tune-tokens", type=int, default=2**18,
                        help="tokens of the training-step autotuning (at most the largest benchmarked count)")
    parser.add_argument("--slow-s", type=float, default=2.0,
                        help="skip the next token count of an implementation whose predicted call time exceeds this")
    parser.add_argument("--forward-candidates", type=str, default=None,
                        help="comma-separated indices into FORWARD_CANDIDATES[layer] to try (default all)")
    parser.add_argument("--max-candidates", type=int, default=100, help="try only the first N block-size candidates")
    parser.add_argument("--train-candidates", type=int, default=len(TRAIN_CANDIDATES))
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--skip", nargs="+", default=[], metavar="IMPL",
                        help="implementations not to time, e.g. xla_gather train_xla_gather (at 128x4 and "
                             "2^20 tokens the gather path needs more memory than a GPU has)")
    args = parser.parse_args(argv)
    if args.from_json and not args.tree_shapes:
        parser.error("--from-json redraws a tree-shape table: pass it with --tree-shapes")
    if args.layers is None:
        args.layers = list(LAYERS) if args.tree_shapes else list(DEFAULT_LAYERS)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.tree_shapes and args.from_json:
        redraw_tree_shapes(Path(args.from_json))
        return
    if args.tree_shapes:
        tree_shapes(args, argv)
        return
    run(args, argv)


if __name__ == "__main__":
    main()
