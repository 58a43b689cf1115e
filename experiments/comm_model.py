"""Communication model of FFF training: tree parallel vs tensor-parallel dense FF vs data parallel.

For a model (a residual stack of ``L`` feedforward layers, optionally inside a transformer whose
other parameters are trained data-parallel) and a mesh ``(data, model)``, the script

1. gives, in closed form, the bytes of every collective's operands per device and training step
   and the bytes each device **sends** (ring all-reduce ``2(n-1)/n``, all-to-all ``(P-1)/P``);
2. checks the closed form against the collectives XLA actually emits: it compiles one training
   step per configuration on the 8 fake CPU devices and sums the operand sizes of every
   ``all-to-all`` / ``all-reduce`` / ``all-gather`` / ``reduce-scatter`` /
   ``collective-permute`` in ``jax.jit(step).lower(...).compile().as_text()`` (collectives inside
   the tree layer's overflow rounds, which run only under routing skew, and scalar collectives
   (the loss, the overflow predicate) are listed apart);
3. extrapolates to ``n`` machines on a slow network (default 100 machines at 1 Gbit/s): the
   tokens/s each scheme's communication can sustain for UltraFastBERT-base (16 layers, H 768,
   FFF 1x11 = 4095 nodes) against data-parallel training of its dense twin (crammed BERT-base,
   FF width 3072), for the FF layers alone and for the whole model.

Configurations:

* ``dp``: data parallel, every parameter replicated; one all-reduce of the gradients per step.
* ``tp``: Megatron tensor parallel dense FF on the ``model`` axis (``w1`` column-, ``w2``
  row-sharded): one all-reduce of the layer output forward and one of the input gradient
  backward, ``tokens x H`` each; weights all-reduced over ``data``.
* ``tree``: :func:`fffjax.parallel.fff_v2_subtree_parallel` on the ``model`` axis: per layer
  three all-to-alls forward (tokens out, their tree ids, outputs back) and two backward, each
  ``P x capacity`` rows; the replicated top levels' gradients all-reduced over the whole mesh,
  the subtree gradients over ``data``.

Run (writes ``experiments/results/comm_model.{md,json,png}``; ``--out NAME`` for other names)::

    python experiments/comm_model.py
"""

import argparse
import dataclasses
import math
import re
from pathlib import Path

from fffjax import bench

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8,
               "s64": 8, "u64": 8}
SCALAR_BYTES = 8      # collectives this small are the loss / predicates, reported apart


@dataclasses.dataclass(frozen=True)
class Model:
    """A residual stack of ``layers`` FF layers of width ``hidden``.

    Attributes:
        layers, hidden: L and H.
        depth, n_trees: the FFF-v2 layers (``K * (2**(depth+1) - 1)`` nodes).
        dense_width: the dense twin's FF width W.
        tokens: global tokens per training step.
        other_params: parameters outside the FF layers (attention, embeddings), always
            data-parallel: every scheme all-reduces their gradients.
        input_grad: whether the first layer's input needs a gradient (true inside a model with
            trained embeddings; false for the bare stack compiled for the check).
        bytes_per_value: 4 (fp32) or 2 (bf16 communication).
        capacity_factor: the tree layer's per-round capacity, as a multiple of the balanced share.
    """

    layers: int
    hidden: int
    depth: int
    dense_width: int
    tokens: int
    n_trees: int = 1
    other_params: int = 0
    input_grad: bool = True
    bytes_per_value: int = 4
    capacity_factor: float = 1.25

    @property
    def nodes(self) -> int:
        return self.n_trees * (2 ** (self.depth + 1) - 1)

    def fff_params(self) -> int:
        return self.layers * self.nodes * (2 * self.hidden + 1)

    def dense_params(self) -> int:
        h, w = self.hidden, self.dense_width
        return self.layers * (2 * h * w + w + h)


# ----------------------------------------------------------------------------- the formula


def formula(model: Model, scheme: str, data: int, model_axis: int) -> dict:
    """Collective operand bytes per device per step, by kind, and the bytes each device sends.

    Returns ``{"operand_bytes": {kind: bytes}, "sent_bytes": bytes, "parts": [(what, kind, bytes, group)]}``.
    """
    v, h, L = model.bytes_per_value, model.hidden, model.layers
    parts = []
    if model.other_params:
        parts.append(("other params (data parallel)", "all-reduce", model.other_params * v, data * model_axis))
    if scheme == "dp":
        parts.append(("FF gradients", "all-reduce", model.dense_params() * v, data * model_axis))
    elif scheme == "tp":
        per_data = model.tokens // data
        bwd_layers = L if model.input_grad else L - 1
        parts.append(("FF output (forward)", "all-reduce", L * per_data * h * v, model_axis))
        parts.append(("FF input gradient (backward)", "all-reduce", bwd_layers * per_data * h * v, model_axis))
        if data > 1:
            w = model.dense_width // model_axis
            parts.append(("FF weight shards over data", "all-reduce", L * (2 * h * w + w + h) * v, data))
    elif scheme == "tree":
        top_levels = model_axis.bit_length() - 1
        per_device = model.tokens // (data * model_axis)
        items = per_device * model.n_trees
        cap = max(1, min(items, math.ceil(model.capacity_factor * items / model_axis)))
        rows = model_axis * cap
        bwd_dx_layers = L if model.input_grad else L - 1
        parts.append(("tokens out + outputs back (forward)", "all-to-all", L * rows * 2 * h * v, model_axis))
        parts.append(("tree ids (forward, int32)", "all-to-all", L * rows * 4, model_axis))
        parts.append(("output gradients out (backward)", "all-to-all", L * rows * h * v, model_axis))
        parts.append(("input gradients back (backward)", "all-to-all", bwd_dx_layers * rows * h * v, model_axis))
        top = model.n_trees * (2**top_levels - 1)
        sub = model.n_trees * (2 ** (model.depth + 1 - top_levels) - 1)
        parts.append(("replicated top levels", "all-reduce", L * top * (2 * h + 1) * v, data * model_axis))
        if data > 1:
            parts.append(("subtree gradients over data", "all-reduce", L * sub * (2 * h + 1) * v, data))
    else:
        raise ValueError(f"scheme must be dp, tp or tree, got {scheme!r}")
    parts = [p for p in parts if p[2] > 0 and p[3] > 1]
    operand = {k: 0 for k in KINDS}
    sent = 0.0
    for _, kind, size, group in parts:
        operand[kind] += size
        sent += size * (2 * (group - 1) / group if kind == "all-reduce" else (group - 1) / group)
    return {"operand_bytes": operand, "sent_bytes": sent, "parts": parts}


# ----------------------------------------------------------------------------- HLO


def hlo_collectives(text: str) -> list[dict]:
    """Every collective of an HLO module: kind, operand bytes, group size, and whether it sits in
    a loop/conditional (the overflow rounds) according to its ``op_name`` metadata."""
    out = []
    pattern = re.compile(r"=\s*(.*?)\s+(" + "|".join(KINDS) + r")(?:-start)?\((.*?)\)(?:,|$)")
    for line in text.splitlines():
        m = pattern.search(line)
        if not m or "-done" in line.split("=")[1].split("(")[0]:
            continue
        result_type, kind = m.group(1), m.group(2)
        # Operand types are not printed in compiled HLO; the result type has the same sizes
        # for all-to-all, all-reduce and collective-permute (gather/scatter are scaled below).
        size = sum(DTYPE_BYTES[d] * math.prod(int(s) for s in dims.split(",") if s)
                   for d, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", result_type) if d in DTYPE_BYTES)
        groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
        iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
        mesh_form = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
        if mesh_form:       # replica_groups=mesh['a'=8,'b'=1] {'a'}: the product of the named axes
            sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh_form.group(1)))
            group = math.prod(int(sizes[n]) for n in re.findall(r"'([^']+)'", mesh_form.group(2)))
        else:
            group = len(groups.group(1).split(",")) if groups else (int(iota.group(2)) if iota else 1)
        if group <= 1:
            continue        # a collective over a size-1 mesh axis moves nothing
        if kind == "all-gather":
            size //= max(group, 1)
        elif kind == "reduce-scatter":
            size *= group
        op_name = re.search(r'op_name="([^"]*)"', line)
        in_loop = bool(op_name and re.search(r"/(while|cond)/", op_name.group(1)))
        out.append({"kind": kind, "bytes": size, "group": group, "overflow_path": in_loop})
    return out


def summarize(collectives: list[dict]) -> dict:
    main = {k: 0 for k in KINDS}
    overflow = {k: 0 for k in KINDS}
    scalars = 0
    for c in collectives:
        if c["bytes"] <= SCALAR_BYTES:
            scalars += c["bytes"]
        elif c["overflow_path"]:
            overflow[c["kind"]] += c["bytes"]
        else:
            main[c["kind"]] += c["bytes"]
    return {"main": main, "overflow_rounds": overflow, "scalars": scalars}


def compiled_step_text(model: Model, scheme: str, data: int, model_axis: int) -> str:
    """Compile one SGD training step of ``model`` under ``scheme`` on a ``(data, model)`` mesh; HLO text."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from fffjax import parallel, v2

    n_dev = data * model_axis
    mesh = jax.make_mesh((data, model_axis), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:n_dev])
    h, L = model.hidden, model.layers
    key = jax.random.key(0)
    x = jax.random.normal(key, (model.tokens, h))
    target = jax.random.normal(jax.random.key(1), (model.tokens, h))
    shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731

    if scheme == "dp":
        w = model.dense_width
        params = [{"w1": jnp.zeros((h, w)), "b1": jnp.zeros((w,)), "w2": jnp.zeros((w, h)), "b2": jnp.zeros((h,))}
                  for _ in range(L)]
        pspec = jax.tree.map(lambda _: P(), params)
        xspec = P(("data", "model"))

        def forward(params, x):
            for p in params:
                x = x + jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
            return x
    elif scheme == "tp":
        w = model.dense_width
        params = [{"w1": jnp.zeros((h, w)), "b1": jnp.zeros((w,)), "w2": jnp.zeros((w, h)), "b2": jnp.zeros((h,))}
                  for _ in range(L)]
        pspec = [{"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()} for _ in range(L)]
        xspec = P("data")

        def megatron(x, w1, b1, w2):
            return jax.lax.psum(jax.nn.relu(x @ w1 + b1) @ w2, "model")

        layer = jax.shard_map(megatron, mesh=mesh, in_specs=(P("data"), P(None, "model"), P("model"),
                                                             P("model", None)), out_specs=P("data"))

        def forward(params, x):
            for p in params:
                x = x + layer(x, p["w1"], p["b1"], p["w2"]) + p["b2"]
            return x
    else:
        top_levels = model_axis.bit_length() - 1
        params = []
        for i in range(L):
            p = v2.init(jax.random.key(10 + i), h, model.depth, n_trees=model.n_trees)
            layer_params = {}
            for name in ("w_in", "b_in", "w_out"):
                top, sub = parallel.to_tree_parallel_layout(p[name], levels=model.depth + 1, top_levels=top_levels,
                                                            n_trees=model.n_trees)
                layer_params["top_" + name], layer_params["sub_" + name] = top, sub
            params.append(layer_params)
        pspec = [{k: (P("model") if k.startswith("sub") else P()) for k in p} for p in params]
        xspec = P(("data", "model"))
        names = ("top_w_in", "top_b_in", "top_w_out", "sub_w_in", "sub_b_in", "sub_w_out")

        def forward(params, x):
            for p in params:
                x = x + parallel.fff_v2_subtree_parallel(
                    x, *(p[n] for n in names), depth=model.depth, n_trees=model.n_trees, mesh=mesh,
                    capacity_factor=model.capacity_factor)
            return x

    def step(params, x, target):
        grads = jax.grad(lambda p: jnp.mean((forward(p, x) - target) ** 2))(params)
        return jax.tree.map(lambda a, g: a - 0.01 * g, params, grads)

    psh = jax.tree.map(shard, pspec)
    jitted = jax.jit(step, in_shardings=(psh, shard(xspec), shard(xspec)), out_shardings=psh)
    del np
    return jitted.lower(params, x, target).compile().as_text()


# ----------------------------------------------------------------------------- extrapolation


def sustainable_tokens_per_s(model: Model, scheme: str, machines: int, bandwidth_bytes_s: float) -> float:
    """Tokens/s the communication of ``scheme`` allows (perfect overlap with compute, one NIC per machine).

    Tree parallel uses a ``machines``-way model axis (data 1) and tensor parallel too; data
    parallel replicates over all machines.
    """
    if scheme in ("tree", "tp"):
        axis = 1 << (machines.bit_length() - 1) if scheme == "tree" else machines
        data = 1
    else:
        axis, data = 1, machines
    # The closed form needs integer shares; scale the tokens so they divide.
    f = formula(model, scheme, data, axis)
    return model.tokens / (f["sent_bytes"] / bandwidth_bytes_s)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=100)
    ap.add_argument("--gbit", type=float, default=1.0)
    ap.add_argument("--out", default="comm_model")
    a = ap.parse_args(argv)
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    head = bench.provenance(__file__, argv)

    # --- check the formula against compiled HLO on 8 fake devices
    small = Model(layers=2, hidden=64, depth=5, dense_width=64, tokens=512, input_grad=False)
    checks = []
    for scheme, data, axis in (("dp", 8, 1), ("tp", 1, 8), ("tp", 2, 4), ("tree", 1, 8), ("tree", 2, 4),
                               ("tree", 4, 2)):
        text = compiled_step_text(small, scheme, data, axis)
        got = summarize(hlo_collectives(text))
        want = formula(small, scheme, data, axis)
        kinds = [k for k in KINDS if got["main"][k] or want["operand_bytes"][k]]
        rel = {k: (got["main"][k] - want["operand_bytes"][k]) / max(want["operand_bytes"][k], 1) for k in kinds}
        checks.append({"scheme": scheme, "mesh": [data, axis], "hlo_main": {k: got["main"][k] for k in kinds},
                       "formula": {k: want["operand_bytes"][k] for k in kinds}, "relative_error": rel,
                       "hlo_overflow_rounds": {k: b for k, b in got["overflow_rounds"].items() if b},
                       "hlo_scalars": got["scalars"], "formula_sent_bytes": want["sent_bytes"]})
        print(checks[-1], flush=True)

    # --- extrapolate: UltraFastBERT-base (1x11) vs its dense twin
    bw = a.gbit * 1e9 / 8
    vocab, h, layers = 32768, 768, 16
    attention = layers * (4 * h * h + 4 * h)              # qkv + output, two LayerNorms
    other = vocab * h + 2 * h + attention
    batches = [2**k for k in range(10, 23)]               # global tokens per step
    curves = {}
    rows = []
    for label, other_params in (("FF layers only", 0), ("whole model", other)):
        for scheme in ("dp", "tp", "tree"):
            pts = []
            for tokens in batches:
                m = Model(layers=layers, hidden=h, depth=11, dense_width=3072, tokens=tokens,
                          other_params=other_params)
                pts.append(sustainable_tokens_per_s(m, scheme, a.machines, bw))
            curves[f"{label}: {scheme}"] = pts
        for tokens in (2**14, 2**17, 2**20):
            m = Model(layers=layers, hidden=h, depth=11, dense_width=3072, tokens=tokens, other_params=other_params)
            row = {"model": label, "tokens_per_step": tokens}
            for scheme in ("dp", "tp", "tree"):
                row[scheme] = sustainable_tokens_per_s(m, scheme, a.machines, bw)
            tree_axis = 1 << (a.machines.bit_length() - 1)
            row["tree_sent_bytes_per_device"] = formula(m, "tree", 1, tree_axis)["sent_bytes"]
            row["dp_sent_bytes_per_device"] = formula(m, "dp", a.machines, 1)["sent_bytes"]
            rows.append(row)

    tree_axis = 1 << (a.machines.bit_length() - 1)
    report = {**head, "check_model": dataclasses.asdict(small), "checks": checks, "machines": a.machines,
              "tree_axis": tree_axis, "gbit_per_s": a.gbit, "batches": batches, "curves": curves, "table": rows}
    lines = [
        "# Communication model: tree parallel vs tensor-parallel dense FF vs data parallel", "",
        bench.provenance_line(report) + " Formula and HLO check: `experiments/comm_model.py`.", "",
        "## Check against compiled HLO (8 fake CPU devices)", "",
        f"Model: {small.layers} residual FF layers, H {small.hidden}, FFF depth {small.depth} "
        f"({small.nodes} nodes), dense width {small.dense_width}, {small.tokens} tokens per step, fp32, "
        f"capacity factor {small.capacity_factor}. Operand bytes per device per step, main path "
        "(overflow rounds, which run only under routing skew, and scalar collectives listed apart).", "",
        "| scheme | mesh (data, model) | kind | formula | HLO | error |", "|---|---|---|---|---|---|",
    ]
    for c in checks:
        for k in c["formula"]:
            lines.append(f"| {c['scheme']} | {tuple(c['mesh'])} | {k} | {c['formula'][k]:,} | {c['hlo_main'][k]:,} "
                         f"| {100 * c['relative_error'][k]:+.2f}% |")
    worst = max(abs(e) for c in checks for e in c["relative_error"].values())
    lines += ["", f"Largest relative error: {100 * worst:.2f}%.", "",
              f"## Extrapolation: {a.machines} machines at {a.gbit:g} Gbit/s", "",
              "UltraFastBERT-base (16 layers, H 768, FFF 1x11 = 4095 nodes per layer, fp32 communication) vs "
              "its dense twin (crammed BERT-base, FF width 3072). Tokens/s that each scheme's communication "
              "can sustain, assuming full overlap with compute and one NIC per machine: dp = data parallel "
              f"dense twin; tp = {a.machines}-way tensor-parallel dense FF; tree = {tree_axis}-way "
              "tree-parallel FFF (power-of-two axis). 'Whole model': attention and embeddings "
              f"({other / 1e6:.1f}M params) trained data-parallel in every scheme.", "",
              "| model | tokens per step | dp dense | tp dense | tree FFF | tree / dp | tree MB sent per device "
              "| dp MB sent per device |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens_per_step']:,} | {r['dp']:,.0f} | {r['tp']:,.0f} | {r['tree']:,.0f} "
                     f"| {r['tree'] / r['dp']:.2f} | {r['tree_sent_bytes_per_device'] / 1e6:,.1f} "
                     f"| {r['dp_sent_bytes_per_device'] / 1e6:,.1f} |")
    lines += ["", "Where tree parallel stops paying: its bytes grow with the tokens (each token crosses the "
              "network twice per FFF layer forward and twice backward), data parallel's do not (one all-reduce "
              "of the gradients per step), so data parallel wins above a crossover batch:", ""]
    for label in ("FF layers only", "whole model"):
        ratio = [t / d for t, d in zip(curves[f"{label}: tree"], curves[f"{label}: dp"])]
        cross = next((i for i, r in enumerate(ratio) if r < 1), None)
        if cross is None:
            lines.append(f"- {label}: tree parallel sustains more tokens/s at every batch up to {batches[-1]:,}.")
        elif cross == 0:
            lines.append(f"- {label}: data parallel sustains more tokens/s at every batch from {batches[0]:,}.")
        else:
            # log-linear interpolation of the ratio between the two bracketing batches
            b0, b1, r0, r1 = batches[cross - 1], batches[cross], ratio[cross - 1], ratio[cross]
            at = math.exp(math.log(b0) + (math.log(b1) - math.log(b0)) * math.log(r0) / (math.log(r0) - math.log(r1)))
            lines.append(f"- {label}: tree parallel ahead below about {at:,.0f} global tokens per step "
                         f"(x{ratio[0]:.1f} at {batches[0]:,}); data parallel ahead above.")
    plt = bench.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, label in zip(axes, ("FF layers only", "whole model")):
        for scheme, style in (("dp", "-o"), ("tp", "-^"), ("tree", "-s")):
            ax.loglog(batches, curves[f"{label}: {scheme}"], style, ms=3,
                      label={"dp": "data parallel (dense twin)", "tp": "tensor parallel (dense FF)",
                             "tree": "tree parallel (FFF 1x11)"}[scheme])
        ax.set_title(f"{label}, {a.machines} machines, {a.gbit:g} Gbit/s")
        ax.set_xlabel("global tokens per step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("tokens/s the network sustains")
    axes[0].legend()
    fig.tight_layout()
    bench.write_results(RESULTS, a.out, report=report, markdown="\n".join(lines), figure=fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
