"""Weight streaming: an FFF-v2 layer larger than the device memory the run allows, deep levels in pinned host memory.

In one process:

1. copies from pinned host memory to the device: latency (the smallest copy) and bandwidth (the largest);
2. for each way of serving the cold levels (:func:`fffjax.fff_v2_streamed`, ``serve="fetch"`` and
   ``"host"``): its exactness against the on-device layer, on a layer that fits (``--check-depth``), then
   per-token latency and tokens/s at each batch on the big layer, side by side with the hot levels alone,
   and the floor: the bytes a call must move over the link at the measured bandwidth (plus one latency).

The big layer's weights are random (speed does not depend on them): the hot levels drawn on the device,
the cold bundles filled on the host chunk by chunk from one random block, then placed in pinned host
memory. The device memory cap is set through ``XLA_PYTHON_CLIENT_MEM_FRACTION`` before jax starts.

GPU (H=4096, depth 20: a 34 GB layer in bf16 against an 8 GB cap; needs about 2x the cold bytes of host
memory while it is built)::

    python experiments/bench_streaming.py --device-memory-gb 8 --out experiments/results

CPU smoke run (seconds)::

    python experiments/bench_streaming.py --hidden 64 --depth 8 --hot-levels 5 --batches 1 4 \\
        --copy-max-mb 1 --check-depth 5 --budget-s 0.05
"""

import argparse
import os
import shutil
import subprocess
import sys
import time


def cap_device_memory(gigabytes: float | None) -> str | None:
    """Sets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` for a cap of ``gigabytes`` on the first GPU (before jax
    starts); returns the fraction set, or None without a cap or a GPU."""
    if not gigabytes or not shutil.which("nvidia-smi"):
        return None
    total_mib = float(subprocess.check_output(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"], text=True).split()[0])
    fraction = f"{min(1.0, gigabytes * 1e9 / (total_mib * 2**20)):.4f}"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = fraction
    return fraction


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--trees", type=int, default=1)
    ap.add_argument("--hot-levels", type=int, default=18, help="levels kept on the device")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--device-memory-gb", type=float, default=None, help="cap on the GPU memory of this process")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 4096])
    ap.add_argument("--serve", nargs="+", default=["fetch", "staged", "host"], choices=("fetch", "staged", "host"),
                    help="fetch / host: fff_v2_streamed's serving modes; staged: the fetch done outside XLA (a numpy "
                         "gather of the blocks from a host copy, device_put) between two jitted stages")
    ap.add_argument("--copy-max-mb", type=float, default=1024, help="largest host-to-device copy timed")
    ap.add_argument("--check-depth", type=int, default=10, help="depth of the exactness check's layer")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=2.0, help="time per variant and batch")
    ap.add_argument("--fill-chunk-mb", type=float, default=256, help="host chunk the cold bundles are filled by")
    ap.add_argument("--out", default=None, help="folder of streaming_{gpu,cpu}.{json,md}")
    return ap.parse_args(argv)


args = parse(sys.argv[1:] if __name__ == "__main__" else [])
MEM_FRACTION = cap_device_memory(args.device_memory_gb) if __name__ == "__main__" else None

import jax  # noqa: E402  (after the memory cap)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fffjax  # noqa: E402
from fffjax import bench, tree, v2  # noqa: E402
from fffjax.ops import streaming  # noqa: E402

log = bench.log


def copy_times(max_bytes: int, budget_s: float) -> list[dict]:
    """Seconds of one pinned-host-to-device copy (waited for) of 4 KiB .. ``max_bytes``, median of samples."""
    device = jax.devices()[0]
    on_host = jax.sharding.SingleDeviceSharding(device, memory_kind=streaming.COLD_MEMORY_KIND)
    on_device = jax.sharding.SingleDeviceSharding(device)
    rows, n = [], 4096
    while n <= max_bytes:
        src = jax.device_put(np.ones(n, np.uint8), on_host)
        t = bench.side_by_side({"copy": lambda src=src: jax.device_put(src, on_device)}, rounds=args.rounds,
                               budget_s=budget_s)["copy"]
        rows.append({"bytes": n, "s": t.median_s, "gb_per_s": n / t.median_s / 1e9})
        n *= 4
    return rows


def serving_fn(serve: str, cold_np: np.ndarray | None):
    """``f(x, layer)`` for a serving mode; ``"staged"`` reads the blocks from ``cold_np`` (``layer.cold``'s
    values in a numpy array) with a numpy gather and copies them in with ``device_put``."""
    if serve != "staged":
        return jax.jit(lambda x, layer: fffjax.fff_v2_streamed(x, layer, serve=serve))
    hot, finish = jax.jit(streaming.hot_walk), jax.jit(streaming.walk_fetched)

    def staged(x, layer):
        y, block = hot(x, layer)
        blocks = jax.device_put(cold_np[np.asarray(block)])
        return finish(x, blocks, y, layer).astype(x.dtype)

    return staged


def check_exactness(dtype, serve: str) -> float:
    """Max |error| / max(1, max|ref|) of ``serve`` against the float32 on-device layer (tie-free tokens)."""
    depth, hot = args.check_depth, max(0, args.check_depth - 3)
    p = v2.init(jax.random.key(3), args.hidden, depth, n_trees=args.trees, dtype=dtype)
    x = jax.random.normal(jax.random.key(4), (256, args.hidden), dtype)
    layer = fffjax.stream_v2(p["w_in"], p["b_in"], p["w_out"], depth=depth, n_trees=args.trees, hot_levels=hot)
    ref = np.asarray(v2.conditional_forward(*(a.astype(jnp.float32) for a in (x, p["w_in"], p["b_in"], p["w_out"])),
                                            depth=depth, n_trees=args.trees))
    keep = np.asarray(v2.routing_margin(x.astype(jnp.float32), p["w_in"].astype(jnp.float32),
                                        p["b_in"].astype(jnp.float32), depth=depth, n_trees=args.trees) > 1e-3)
    cold_np = streaming.bundle_cold_levels(p["w_in"], p["b_in"], p["w_out"], depth=depth, n_trees=args.trees,
                                           hot_levels=hot)
    y = np.asarray(serving_fn(serve, cold_np)(x, layer).astype(jnp.float32))
    return float(np.abs(y - ref)[keep].max()) / max(1.0, float(np.abs(ref).max()))


def big_layer(dtype) -> tuple[streaming.StreamedV2, np.ndarray | None]:
    """A random layer of ``--depth`` with its hot levels on the device and its cold bundles in pinned host memory,
    and the cold bundles' numpy copy where ``"staged"`` is served (None otherwise)."""
    k, K, H = args.hot_levels, args.trees, args.hidden
    tree.check_depth(args.depth)
    streaming.check_hot_levels(k, args.depth)
    hot = K * (2**k - 1)
    keys = jax.random.split(jax.random.key(0), 3)
    scale = 1 / np.sqrt(H)
    hot_w_in = (jax.random.normal(keys[0], (hot, H), dtype) * scale).astype(dtype)
    hot_b_in = (jax.random.normal(keys[1], (hot,), dtype) * scale).astype(dtype)
    hot_w_out = (jax.random.normal(keys[2], (hot, H), dtype) * scale).astype(dtype)
    blocks, nodes, width = K * 2**k, 2 ** (args.depth + 1 - k) - 1, 2 * H + 1
    np_dtype = jnp.dtype(dtype)
    cold = np.empty((blocks, nodes, width), np_dtype)
    per_chunk = max(1, int(args.fill_chunk_mb * 1e6 // (nodes * width * np_dtype.itemsize)))
    pattern = (np.random.default_rng(0).standard_normal((per_chunk, nodes, width), np.float32) * scale).astype(np_dtype)
    start = time.perf_counter()
    for i in range(0, blocks, per_chunk):
        n = min(per_chunk, blocks - i)
        cold[i:i + n] = pattern[:n]
        if (i // per_chunk) % 32 == 0:
            log(f"filling the cold bundles: {i + n}/{blocks} blocks, {time.perf_counter() - start:.0f} s")
    on_host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=streaming.COLD_MEMORY_KIND)
    cold_host = jax.device_put(cold, on_host)
    cold_host.block_until_ready()
    if "staged" not in args.serve:
        del cold
        cold = None
    log(f"cold bundles in pinned host memory: {cold_host.nbytes / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s")
    return streaming.StreamedV2(hot_w_in=hot_w_in, hot_b_in=hot_b_in, hot_w_out=hot_w_out, cold=cold_host,
                                depth=args.depth, n_trees=K, hot_levels=k), cold


def time_cell(layer: streaming.StreamedV2, cold_np, serve: str, batch: int, latency_s: float,
              bandwidth: float) -> list[dict]:
    """One serving mode at one batch beside the hot levels alone, timed side by side, with the link's floor."""
    itemsize = layer.cold.dtype.itemsize
    bundle = (layer.din + layer.dout + 1) * itemsize
    fns = {serve: serving_fn(serve, cold_np),
           "hot levels only": jax.jit(lambda x, layer: streaming.hot_walk(x, layer)[0])}
    x = jax.random.normal(jax.random.key(batch), (batch, layer.din), layer.cold.dtype)
    first, errors, ok = {}, {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        try:
            jax.block_until_ready(fn(x, layer))
            ok[name] = fn
        except Exception as error:          # a serving mode the platform cannot compile: reported, not fatal
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            log(f"batch {batch}: {name} failed: {errors[name]}")
        first[name] = time.perf_counter() - start
    times = bench.side_by_side({n: (lambda fn=fn: fn(x, layer)) for n, fn in ok.items()}, rounds=args.rounds,
                               budget_s=args.budget_s) if ok else {}
    fetched = batch * layer.n_trees * layer.subtree_nodes * bundle
    moved = {"fetch": fetched, "staged": fetched,
             "host": batch * (layer.din + layer.dout) * itemsize + batch * layer.n_trees * 4, "hot levels only": 0}
    read = {"fetch": fetched, "staged": fetched,
            "host": batch * layer.n_trees * layer.cold_levels * bundle, "hot levels only": 0}
    rows = []
    for name in fns:
        t = times.get(name)
        floor = latency_s + moved[name] / bandwidth if name != "hot levels only" else None
        rows.append({"batch": batch, "variant": name, "ms": t and t.median_s * 1e3,
                     "us_per_token": t and t.median_s * 1e6 / batch, "tokens_per_s": t and batch / t.median_s,
                     "link_bytes": moved[name], "host_rows_read_bytes": read[name],
                     "floor_ms": floor and floor * 1e3, "floor_fraction": floor and t and floor / t.median_s,
                     "first_call_s": first[name], "error": errors.get(name)})
    log(f"batch {batch}: " + ", ".join(f"{r['variant']} {r['ms']:.3f} ms" for r in rows if r["ms"] is not None))
    return rows


def markdown(out: dict) -> str:
    lay = out["layer"]
    lines = [f"# Weight streaming: FFF-v2 deeper than the device's memory ({out['device_kind']})", "",
             bench.provenance_line(out), "",
             f"H = {lay['hidden']}, {lay['trees']} tree(s) of depth {lay['depth']}, {out['dtype']}: "
             f"{lay['total_gb']:.1f} GB of weights; levels 0..{lay['hot_levels'] - 1} on the device "
             f"({lay['hot_gb']:.2f} GB), the {lay['cold_levels']} levels below in pinned host memory "
             f"({lay['cold_gb']:.1f} GB, subtrees of {lay['subtree_nodes']} bundle rows of "
             f"{lay['bundle_bytes']} B). Device memory cap: "
             + (f"{out['device_memory_gb']} GB (XLA_PYTHON_CLIENT_MEM_FRACTION={out['mem_fraction']}), "
                f"the layer is {lay['total_gb'] / out['device_memory_gb']:.1f}x the cap."
                if out.get("mem_fraction") else "none (no GPU, or none asked)."), "",
             "## Pinned host to device copies", "", "| bytes | ms | GB/s |", "|---:|---:|---:|"]
    lines += [f"| {r['bytes']:,} | {r['s'] * 1e3:.3f} | {r['gb_per_s']:.2f} |" for r in out["copies"]]
    lines += ["", f"Latency (smallest copy) {out['latency_s'] * 1e6:.1f} us; bandwidth (largest) "
              f"{out['bandwidth'] / 1e9:.2f} GB/s.", "",
              "## Exactness on a layer that fits", "",
              "Max |error| / max(1, max|ref|) against the float32 on-device layer, depth "
              f"{out['check_depth']}, 256 tokens (tokens with a routing logit within 1e-3 of 0 left out): "
              + ", ".join(f"`{k}` {v:.2e}" for k, v in out["exactness"].items()) + "."
              + "".join(f" `{k}` failed: {v}." for k, v in out.get("errors", {}).items()), "",
              "## Per call", "",
              "*link MB*: bytes a call must move between host and device (fetch and staged: every token's whole "
              "cold subtree; host: the tokens and the partial outputs); *staged*: the fetch done outside XLA, a "
              "numpy gather from a host copy of the bundles and `device_put` between two jitted stages; "
              "*floor*: one copy latency + link bytes at the measured bandwidth; *of floor*: floor / measured "
              "(1 = at the floor). *host rows MB*: "
              "bundle rows read in host memory.", "",
              "| batch | variant | ms | us/token | tokens/s | link MB | host rows MB | floor ms | of floor "
              "| first call s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["results"]:
        if r["ms"] is None:
            lines.append(f"| {r['batch']} | {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        floor = f"{r['floor_ms']:.3f}" if r["floor_ms"] is not None else "-"
        frac = f"{r['floor_fraction']:.0%}" if r["floor_fraction"] is not None else "-"
        lines.append(f"| {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['us_per_token']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['link_bytes'] / 1e6:.2f} | "
                     f"{r['host_rows_read_bytes'] / 1e6:.2f} | "
                     f"{floor} | {frac} | {r['first_call_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Writes the results after every stage: a serving mode that brings the process down (host compute is
    young on GPUs) leaves what ran before it."""
    dtype = jnp.dtype(args.dtype)
    head = bench.provenance(__file__, sys.argv[1:])
    log(f"{head['command']} on {head['device_kind']}, cap {args.device_memory_gb} GB (fraction {MEM_FRACTION})")
    out = {**head, "dtype": dtype.name, "device_memory_gb": args.device_memory_gb, "mem_fraction": MEM_FRACTION,
           "check_depth": args.check_depth, "exactness": {}, "results": []}
    name = "streaming_gpu" if jax.default_backend() == "gpu" else "streaming_cpu"

    def save():
        if args.out:
            bench.write_results(args.out, name, report=out, markdown=markdown(out))

    copies = copy_times(int(args.copy_max_mb * 2**20), min(args.budget_s, 1.0))
    out.update(copies=copies, latency_s=copies[0]["s"], bandwidth=copies[-1]["bytes"] / copies[-1]["s"])
    log(f"copies: latency {out['latency_s'] * 1e6:.1f} us, bandwidth {out['bandwidth'] / 1e9:.2f} GB/s")
    layer, cold_np = big_layer(dtype)
    bundle = (layer.din + layer.dout + 1) * dtype.itemsize
    hot_gb = layer.hot_w_in.nbytes * 2 / 1e9 + layer.hot_b_in.nbytes / 1e9
    out["layer"] = {"hidden": args.hidden, "trees": args.trees, "depth": args.depth, "hot_levels": args.hot_levels,
                    "cold_levels": layer.cold_levels, "subtree_nodes": layer.subtree_nodes, "bundle_bytes": bundle,
                    "hot_gb": hot_gb, "cold_gb": layer.cold.nbytes / 1e9, "total_gb": hot_gb + layer.cold.nbytes / 1e9}
    save()
    for serve in args.serve:
        try:
            out["exactness"][serve] = check_exactness(dtype, serve)
        except Exception as error:          # a serving mode the platform cannot compile: reported, not fatal
            out.setdefault("errors", {})[serve] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            log(f"{serve} failed: {out['errors'][serve]}")
            save()
            continue
        log(f"exactness of {serve}: {out['exactness'][serve]:.2e}")
        save()
        for batch in args.batches:
            out["results"] += time_cell(layer, cold_np, serve, batch, out["latency_s"], out["bandwidth"])
            save()
    print(markdown(out))


if __name__ == "__main__":
    main()
