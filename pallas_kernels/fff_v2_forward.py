"""FFF-v2 (UltraFastBERT) hard forward as a Pallas-Triton GPU kernel, beside its jnp reference.

Token-order kernel: one program per ``block_t`` tokens (and per share of the trees, see
``tree_programs``). The token block's inputs stay in registers as power-of-two column chunks. Per
tree, the descent computes each token's logit against the row of its current node (a gathered,
masked load of ``w_in[node, chunk]``), adds the bias, applies the exact GELU (polynomial erf) and
steps to ``2n + 1 + (z > 0)``; with ``lookahead = L > 1`` the levels are walked in rounds of up to
``L`` levels (:func:`round_spans`), each gathering the rows of the whole subtree below each token's
node as one tile (loads that do not wait on each other) and then descending through its logits in
registers; optionally the top ``dense_levels`` levels are computed for all
their nodes at once with a tensor-core ``dot`` (tokens of a block share those rows). With
``tree_rows`` a program takes one token instead, and the rows of its tiles are that token's trees,
all walked at once. Then every
output chunk sums ``gelu(z) * w_out[node, chunk]`` over the visited nodes in float32 and is stored
once. Optionally the kernel also writes each (tree, level)'s node and logit, the residuals the
training backward needs.

Grouped kernel (``split_level > 0``, one tree): tokens are routed through the top levels and
grouped by subtree first (:func:`group_by_subtree`), then each block runs its subtree densely.

At few tokens (up to :data:`WALK_MAX_TOKENS`) the grouped pipeline's fixed costs (route kernel,
ranking, layout, several launches) dominate; :func:`default_config` then picks the token-order
kernel as a single launch with small token blocks, one level per round and the trees spread
over programs (:func:`walk_config`).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from fffjax import tree, v2
from fffjax._vma import out_struct
from pallas_kernels import _common as cm

ROUTES = ("kernel", "gemm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FffV2ForwardConfig:
    """Block sizes of the FFF-v2 forward kernel.

    Attributes:
        block_t: tokens per program (power of two; >= 16 when ``dense_levels > 0``).
        chunk: columns per chunk of ``H`` and ``H_out`` (power of two, capped at the padded width).
        dense_levels: top levels of each tree computed densely with a tensor-core ``dot`` over their
            ``2**dense_levels - 1`` nodes (0: every level by row gathers).
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages; above 1 the grouped kernel runs its column
            chunks as loops for Triton to pipeline (widths that are a multiple of ``chunk``).
        split_level: 0, or ``s > 0`` for the grouped kernel (one tree only): tokens are first routed
            through the top ``s`` levels by the route kernel and grouped by the level-``s``
            subtree they enter, so that every block of ``block_t`` tokens shares its whole top path
            and runs its ``2**(depth+1-s) - 1``-node subtree densely on the tensor cores
            (``block_t >= 16``); ``dense_levels`` is then unused.
        route: how the grouped layout routes tokens through the top ``s`` levels: ``"kernel"``, the
            route kernel below, or ``"gemm"``, one XLA (cuBLAS) matmul writing the ``(T, 2**s - 1)``
            float32 top logits, then the descent through them (see :func:`route_to_subtrees`).
        route_block_t, route_chunk, route_num_warps, route_num_stages: the route kernel's tokens per
            program, columns per chunk, warps and pipelining stages (as above); a larger block rereads
            the top ``2**s - 1`` weight rows from L2 for fewer tokens.
        lookahead: levels per round of the token-order kernel's row gathers (below ``dense_levels``):
            a round loads the ``2**lookahead - 1`` rows of the subtree under each token's node, none
            waiting on another, then descends ``lookahead`` levels; more rows read for fewer dependent
            memory round trips, which is what a few tokens' latency is made of.
        tree_programs: programs along a second grid axis of the token-order kernel that share the
            trees (a divisor of ``n_trees``); above 1 each writes a float32 partial output and one XLA
            sum adds them, so that few tokens still occupy many multiprocessors.
        tree_rows: the token-order kernel with one program per token whose tile rows are the
            token's ``K`` trees (``next_pow2(K)`` rows), walked together: ``depth + 1`` dependent
            rounds of ``K`` independent row reads, and the trees' outputs summed in registers instead
            of the float32 partial outputs and XLA sum of ``tree_programs > 1``. Needs ``block_t = 1``,
            ``lookahead = 1``, no dense levels, one tree program; forward only (no residuals).
        chunk_tokens: 0, or ``C > 0`` for the grouped kernel's one-pass layout (forward without
            residuals): the tokens are routed and grouped ``C`` at a time, the grouped kernel of a
            chunk right after its route kernel (:func:`chunked_grouped_forward`), so that the grouped
            kernel's second read of the chunk's ``x`` rows finds them in L2 when ``C * H`` elements fit
            there; the route kernel also places each token in its subtree's bucket (atomic counts),
            which replaces the rank kernel and the layout.
    """

    block_t: int = 16
    chunk: int = 256
    dense_levels: int = 0
    num_warps: int = 8
    num_stages: int = 1
    split_level: int = 0
    route_block_t: int = 64
    route_num_warps: int = 4
    route_chunk: int = 128
    route_num_stages: int = 1
    route: str = "kernel"
    lookahead: int = 1
    tree_programs: int = 1
    tree_rows: bool = False
    chunk_tokens: int = 0

    def __post_init__(self):
        cm.check_powers_of_two(self, ("block_t", "chunk", "route_block_t", "route_chunk"))
        for name in ("num_warps", "num_stages", "route_num_warps", "route_num_stages", "lookahead",
                     "tree_programs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dense_levels < 0:
            raise ValueError(f"dense_levels must be >= 0, got {self.dense_levels}")
        if self.dense_levels > 0 and self.block_t < 16:
            raise ValueError(f"dense_levels > 0 needs block_t >= 16 (tensor-core dot), got {self.block_t}")
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")
        if self.split_level < 0:
            raise ValueError(f"split_level must be >= 0, got {self.split_level}")
        if self.tree_rows and (self.block_t, self.lookahead, self.dense_levels, self.split_level,
                               self.tree_programs) != (1, 1, 0, 0, 1):
            raise ValueError("tree_rows needs block_t=1, lookahead=1, dense_levels=0, split_level=0 and "
                             f"tree_programs=1, got {self.block_t}, {self.lookahead}, {self.dense_levels}, "
                             f"{self.split_level} and {self.tree_programs}")
        if self.chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {self.chunk_tokens}")
        if self.split_level > 0 and self.block_t < 16:
            raise ValueError(f"split_level > 0 needs block_t >= 16 (tensor-core dot), got {self.block_t}")


DEFAULT_CONFIG = FffV2ForwardConfig()
# Tiles of the grouped layout at many tokens: the fastest of the sweep in
# experiments/results/bench_gpu_sweep.json (1x11, 2**20 bf16 tokens).
GROUPED_CONFIG = FffV2ForwardConfig(block_t=64, chunk=64, num_warps=4, num_stages=3, split_level=7,
                                    route_block_t=256, route_chunk=64, route_num_warps=8, route_num_stages=3)
# Below FEW_TOKENS tokens (a base batch of 256 x 128 is 2**15) larger token blocks and 8-warp grouped
# programs fill the GPU better: the sweep in experiments/results/fff_route_gpu.md.
FEW_TOKENS = 2**18
FEW_TOKENS_CONFIG = dataclasses.replace(GROUPED_CONFIG, block_t=128, num_warps=8, route_block_t=128)
# Up to WALK_MAX_TOKENS tokens (decoding batches) the token-order kernel in one launch beats the grouped
# pipeline, whose route, rank and layout stages cost the same few launches at any token count.
WALK_MAX_TOKENS = 256
WALK_PROGRAMS = 128        # token blocks the walk aims for: about one per multiprocessor of a Hopper GPU
WALK_MAX_TREE_PROGRAMS = 16
# The token-order kernel (the walk included) unrolls levels x column chunks; at most this many chunks per
# row keeps its Triton program for a wide layer (H = 4096) as small as for H = 768: with 256-column chunks it
# would repeat them 16 times per level, a program five times larger that Triton compiles too slowly for a
# model's step.
MAX_ROW_CHUNKS = 4
# A token block's inputs stay in registers as float32: at most this many values (16 tokens of H <= 1024, the
# widths the default tiles run at) per program, so that a wide layer's blocks hold fewer tokens rather than
# spill.
MAX_BLOCK_VALUES = 16 * 1024
# One level per round: the fastest measured on the GPU (experiments/results/few_tokens_gpu.md, 1x11 at 1, 8
# and 64 tokens, against rounds of three levels gathered row by row; few_tokens_gpu_walk_rounds.md, 1x11 at
# 1 token, against rounds that gather a whole subtree as one tile, lookahead 2, 3 and 6, each slower: the
# tile's extra rows cost more than the dependent round trips they save).
WALK_CONFIG = FffV2ForwardConfig(block_t=1, chunk=256, num_warps=4, lookahead=1)
MAX_DEPTH = 15                  # the deepest tree the kernels take; fffjax.ops falls back to "xla" beyond
MAX_GROUPED_SUBTREE_LEVELS = 5   # the subtree's dense tile stays <= 64 columns
MAX_ROUTE_LEVELS = 8             # the route kernel's tile of top logits stays <= 256 columns


def walk_config(n_tokens: int, n_trees: int, base: FffV2ForwardConfig | None = None, *,
                width: int | None = None) -> FffV2ForwardConfig:
    """The few-token configuration: the token-order kernel with ``base``'s tiles (None:
    :data:`WALK_CONFIG`, read at call time, so that a benchmark can tune it), token blocks of
    ``base.block_t`` or more so that there are at most about :data:`WALK_PROGRAMS` of them, column
    chunks of :func:`row_chunk` for ``width`` (the larger of H and H_out; None: any), and the trees spread
    over up to :data:`WALK_MAX_TREE_PROGRAMS` programs (a divisor of ``n_trees``); with
    ``base.tree_rows``, one token and all its trees per program instead."""
    base = WALK_CONFIG if base is None else base
    if base.tree_rows:
        block_t, tree_programs = 1, 1
    else:
        block_t = max(base.block_t, min(16, cm.next_pow2(pl.cdiv(n_tokens, WALK_PROGRAMS))))
        tree_programs = math.gcd(n_trees, WALK_MAX_TREE_PROGRAMS)
    return dataclasses.replace(base, block_t=block_t, chunk=row_chunk(base.chunk, width), split_level=0,
                               dense_levels=0, tree_programs=tree_programs)


def row_chunk(chunk: int, width: int | None) -> int:
    """The token-order kernel's column chunk: ``chunk``, or wider (a power of two) so that a row of
    ``width`` columns (None: any) takes at most :data:`MAX_ROW_CHUNKS`."""
    return chunk if width is None else max(chunk, cm.next_pow2(pl.cdiv(width, MAX_ROW_CHUNKS)))


def default_config(depth: int, n_trees: int, n_tokens: int | None = None, dtype=None, *,
                   width: int | None = None) -> FffV2ForwardConfig:
    """The block sizes used when none are given.

    Up to :data:`WALK_MAX_TOKENS` tokens, any shape and dtype: :func:`walk_config` (one launch). Above,
    one tree of depth 5..12 and 16-bit inputs: the grouped kernel with ``split_level = depth - 4``
    (depth 11: 7) and :data:`GROUPED_CONFIG`'s tiles (:data:`FEW_TOKENS_CONFIG`'s below
    :data:`FEW_TOKENS` tokens), several times faster than the token-order kernel there. Otherwise
    the token-order kernel with row gathers (column chunks of :func:`row_chunk`, token blocks of at
    most :data:`MAX_BLOCK_VALUES` input values); float32 too,
    because IEEE float32 tile dots (no tf32) run without tensor cores and make the grouped kernel the
    slower one (``experiments/results/bench_gpu.md``).
    """
    if n_tokens is not None and n_tokens <= WALK_MAX_TOKENS:
        return walk_config(n_tokens, n_trees, width=width)
    wide = dtype is not None and jnp.dtype(dtype).itemsize >= 4
    if wide or not (n_trees == 1 and MAX_GROUPED_SUBTREE_LEVELS <= depth <= 7 + MAX_GROUPED_SUBTREE_LEVELS):
        block_t = DEFAULT_CONFIG.block_t
        if width is not None:
            block_t = max(1, min(block_t, MAX_BLOCK_VALUES // cm.next_pow2(width)))
        return dataclasses.replace(DEFAULT_CONFIG, block_t=block_t, chunk=row_chunk(DEFAULT_CONFIG.chunk, width))
    tiles = FEW_TOKENS_CONFIG if n_tokens is not None and n_tokens < FEW_TOKENS else GROUPED_CONFIG
    return dataclasses.replace(tiles, split_level=depth + 1 - MAX_GROUPED_SUBTREE_LEVELS)


def operand_config(x, w_out, *, depth: int, n_trees: int) -> FffV2ForwardConfig:
    """:func:`default_config` for these operands: ``x`` of ``(T, H)`` and ``w_out`` of ``(N, H_out)`` give
    the token count, the dtype and the row width (the larger of ``H`` and ``H_out``)."""
    return default_config(depth, n_trees, x.shape[0], x.dtype, width=max(x.shape[1], w_out.shape[1]))


def round_spans(levels: int, lookahead: int) -> list[int]:
    """The levels of each round of row gathers: ``ceil(levels / lookahead)`` rounds as even as possible
    (deeper rounds no longer than shallower ones), so that ``lookahead = 6`` walks 12 levels as 6 + 6
    and 8 levels as 4 + 4 rather than 6 + 2: fewer rows for the same number of dependent round trips."""
    if levels <= 0:
        return []
    n_rounds = -(-levels // lookahead)
    short, extra = divmod(levels, n_rounds)
    return [short + 1] * extra + [short] * (n_rounds - extra)


def _kernel(x_ref, w_in_ref, b_in_ref, w_out_ref, *out_refs, n_tokens, width_in, width_out, depth,
            n_trees, cfg: FffV2ForwardConfig, save_residuals: bool):
    y_ref = out_refs[0]
    c_in, n_in = cm.column_chunks(width_in, cfg.chunk)
    c_out, n_out = cm.column_chunks(width_out, cfg.chunk)
    per_tree = tree.v2_nodes_per_tree(depth)
    levels = depth + 1
    dense = min(cfg.dense_levels, levels)
    if cfg.tree_rows:      # row r: tree r of token program_id(0)
        bt = cm.next_pow2(n_trees)
        row0 = pl.program_id(0)
        trees = jnp.arange(bt, dtype=jnp.int32)
        rows = jnp.zeros((bt,), jnp.int32) + row0
        row_ok = trees < n_trees
    else:
        bt = cfg.block_t
        row0 = pl.program_id(0) * bt
        rows = row0 + jnp.arange(bt, dtype=jnp.int32)
        row_ok = rows < n_tokens
    x_chunks = []
    for c in range(n_in):
        cols, ok = cm.chunk_indices(c, c_in, width_in)
        x_chunks.append(cm.load_rows(x_ref, rows, cols, ok, row_ok))
    x32 = [xc.astype(jnp.float32) for xc in x_chunks]
    n_dense = cm.next_pow2(max(16, 2**dense - 1)) if dense else 0

    def tree_body(k, y_chunks):
        base = k * per_tree
        node = jnp.zeros((bt,), jnp.int32)             # heap index inside the tree
        path = []                                       # (flat node, logit) per level
        if dense:
            # All nodes of the top `dense` levels at once: (bt, n_dense) logits on the tensor cores.
            top = jnp.arange(n_dense, dtype=jnp.int32)
            top_ok = top < 2**dense - 1
            top_rows = base + jnp.where(top_ok, top, 0)
            logits = jnp.zeros((bt, n_dense), jnp.float32)
            for c in range(n_in):
                cols, ok = cm.chunk_indices(c, c_in, width_in)
                w = cm.load_rows(w_in_ref, top_rows, cols, ok, top_ok)
                logits += cm.dot(x_chunks[c], w.astype(x_chunks[c].dtype), trans_b=True)
            logits += cm.load(b_in_ref.at[top_rows], mask=top_ok, other=0.0).astype(jnp.float32)[None, :]
            on_path = jnp.zeros((bt, n_dense), jnp.bool_)
            for _ in range(dense):
                hit = top[None, :] == node[:, None]
                z = jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
                on_path = on_path | hit
                path.append((base + node, z))
                node = 2 * node + 1 + (z > 0).astype(jnp.int32)
            top_act = jnp.where(on_path, cm.gelu(logits), 0.0)
        level = dense
        for span in round_spans(levels - dense, cfg.lookahead):
            # One round: the logits of the span-level subtree under each token's node, gathered as one
            # (bt * pad, chunk) tile whose row r is token r // pad's subtree position h = r % pad in
            # heap order (h < 2**span - 1 used). Position h at relative depth d is node * 2**d + h.
            pad = cm.next_pow2(2**span - 1)
            r = jnp.arange(bt * pad, dtype=jnp.int32)
            tok, h = r // pad, r % pad
            scale = jnp.ones_like(h)
            for d in range(1, span):
                scale = jnp.where(h + 1 >= 2**d, 2**d, scale)
            if pad == 1:   # one level: row r is token r
                node_r = node
            else:
                owner = tok[:, None] == jnp.arange(bt, dtype=jnp.int32)[None, :]      # (bt * pad, bt)
                node_r = jnp.sum(jnp.where(owner, node[None, :], 0), axis=1)
            ok_r = row_ok if pad == 1 else (h < 2**span - 1) & (row0 + tok < n_tokens)
            flat_r = base + jnp.where(ok_r, node_r * scale + h, 0)
            z_r = cm.load(b_in_ref.at[flat_r], mask=ok_r, other=0.0).astype(jnp.float32)
            for c in range(n_in):
                cols, ok = cm.chunk_indices(c, c_in, width_in)
                if pad == 1 or bt == 1:
                    x_r = x32[c]
                else:
                    x_r = cm.load_rows(x_ref, row0 + tok, cols, ok, ok_r).astype(jnp.float32)
                z_r += jnp.sum(x_r * cm.load_rows(w_in_ref, flat_r, cols, ok, ok_r).astype(jnp.float32), axis=1)
            pos = jnp.zeros((bt,), jnp.int32)
            for _ in range(span):
                if pad == 1:
                    z = z_r
                else:
                    hit = r[None, :] == (jnp.arange(bt, dtype=jnp.int32) * pad + pos)[:, None]   # (bt, bt * pad)
                    z = jnp.sum(jnp.where(hit, z_r[None, :], 0.0), axis=1)
                path.append((base + node, z))
                right = (z > 0).astype(jnp.int32)
                node = 2 * node + 1 + right
                pos = 2 * pos + 1 + right
            level += span
        if save_residuals:
            node_ref, z_ref = out_refs[1], out_refs[2]
            for level, (flat, z) in enumerate(path):
                p = k * levels + level
                cm.store(node_ref.at[p, rows], flat, mask=row_ok)
                cm.store(z_ref.at[p, rows], z, mask=row_ok)
        new = []
        for c in range(n_out):
            cols, ok = cm.chunk_indices(c, c_out, width_out)
            acc = y_chunks[c]
            if dense:
                w = cm.load_rows(w_out_ref, top_rows, cols, ok, top_ok)
                act = top_act if x_ref.dtype == jnp.float32 else top_act.astype(x_ref.dtype)
                acc += cm.dot(act, w.astype(act.dtype))
            for flat, z in path[dense:]:
                acc += cm.gelu(z)[:, None] * cm.load_rows(w_out_ref, flat, cols, ok).astype(jnp.float32)
            new.append(acc)
        return tuple(new)

    init = tuple(jnp.zeros((bt, c_out), jnp.float32) for _ in range(n_out))
    if cfg.tree_rows:
        # Rows past the last tree point at tree 0, so that every address stays in range; their loads are
        # masked off (logit 0, GELU 0) and the sum leaves them out as well.
        y_chunks = tree_body(jnp.where(row_ok, trees, 0), init)
        token = jnp.zeros((1,), jnp.int32) + row0
        for c in range(n_out):
            cols, ok = cm.chunk_indices(c, c_out, width_out)
            total = jnp.sum(jnp.where(row_ok[:, None], y_chunks[c], 0.0), axis=0)[None, :]
            cm.store_rows(y_ref, token, cols, total, ok, token < n_tokens)
        return
    share = n_trees // cfg.tree_programs          # trees of this program: share * g .. share * (g + 1) - 1
    first = pl.program_id(1) * share if cfg.tree_programs > 1 else 0
    if share == 1:
        y_chunks = tree_body(first, init)
    else:
        y_chunks = jax.lax.fori_loop(0, share, lambda i, acc: tree_body(first + i, acc), init)
    # With several tree programs, y is their (tree_programs * T, H_out) float32 partial sums.
    out_rows = rows + pl.program_id(1) * n_tokens if cfg.tree_programs > 1 else rows
    for c in range(n_out):
        cols, ok = cm.chunk_indices(c, c_out, width_out)
        cm.store_rows(y_ref, out_rows, cols, y_chunks[c], ok, row_ok)


def subtree_table(sub, *, split: int, depth: int):
    """The columns of a grouped block's dense table for level-``split`` subtree ``sub``.

    Column ``c < split``: the shared ancestor at level ``c``; column ``split + h``: the subtree's heap
    node ``h``. Returns ``(col, rows, col_ok)``, each ``(n_cols,)``: the column index, the flat node
    of each used column (0 where unused), and whether the column is used.
    """
    deep = depth + 1 - split                     # levels inside the subtree
    n_used = split + 2**deep - 1
    n_cols = cm.next_pow2(max(16, n_used))
    col = jnp.arange(n_cols, dtype=jnp.int32)
    top_node = (jnp.left_shift(1, col) - 1) + jnp.right_shift(sub, jnp.maximum(split - col, 0))
    h = jnp.maximum(col - split, 0)
    level = jnp.zeros_like(h)
    for t in range(1, deep):
        level += (h + 1 >= 2**t).astype(jnp.int32)
    deep_node = (jnp.left_shift(1, split + level) - 1) + jnp.left_shift(sub, level) + (h + 1 - jnp.left_shift(1, level))
    col_ok = col < n_used
    return col, jnp.where(col < split, top_node, jnp.where(col_ok, deep_node, 0)), col_ok


def descend_table(logits, col, *, split: int, depth: int):
    """The path of each token through a grouped table of logits ``(bt, n_cols)``.

    Returns ``on_path (bt, n_cols)`` and, per level, ``(column (bt,), logit (bt,))``.
    """
    bt = logits.shape[0]
    on_path = jnp.broadcast_to((col < split)[None, :], logits.shape)
    path = []
    for level in range(split):
        path.append((jnp.full((bt,), level, jnp.int32), jnp.sum(jnp.where(col[None, :] == level, logits, 0.0), axis=1)))
    heap = jnp.zeros((bt,), jnp.int32)
    for _ in range(depth + 1 - split):
        hit = col[None, :] == (split + heap)[:, None]
        z = jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        path.append((split + heap, z))
        on_path = on_path | hit
        heap = 2 * heap + 1 + (z > 0).astype(jnp.int32)
    return on_path, path


def block_tokens(slots_ref, block, block_t: int, n_tokens: int):
    """``(slot_rows, tok, tok_ok)``, each ``(block_t,)``: grouped block ``block``'s slots, their
    tokens and which slots hold one. Empty slots get token ``n_tokens``, out of range: their masked
    loads and stores touch no memory on the GPU and are dropped in interpret mode."""
    slot_rows = block * block_t + jnp.arange(block_t, dtype=jnp.int32)
    tok = cm.load(slots_ref.at[slot_rows])
    tok_ok = tok >= 0
    return slot_rows, jnp.where(tok_ok, tok, n_tokens), tok_ok


def _grouped_kernel(slots_ref, block_sub_ref, x_ref, w_in_ref, b_in_ref, w_out_ref, *out_refs, n_tokens,
                    width_in, width_out, depth, split, cfg: FffV2ForwardConfig, save_residuals: bool):
    """One block of tokens that all entered level-``split`` subtree ``block_sub[b]`` (single tree).

    With ``save_residuals`` it also stores the block's whole table of logits (every slot, padding
    included, so that the backward never reads uninitialised memory).
    """
    b = pl.program_id(0)
    slot_rows, tok, tok_ok = block_tokens(slots_ref, b, cfg.block_t, n_tokens)
    col, logits = _grouped_block(block_sub_ref[b], tok, tok_ok, x_ref, w_in_ref, b_in_ref, w_out_ref, out_refs[0],
                                 width_in=width_in, width_out=width_out, depth=depth, split=split, cfg=cfg)
    if save_residuals:
        cm.store(out_refs[1].at[slot_rows[:, None], col[None, :]], logits)


def _grouped_block(sub, tok, tok_ok, x_ref, w_in_ref, b_in_ref, w_out_ref, y_ref, *, width_in, width_out, depth,
                   split, cfg: FffV2ForwardConfig):
    """``y[tok] = `` the layer for the block's tokens ``tok (bt,)`` (where ``tok_ok``), all of which entered
    level-``split`` subtree ``sub``: one dense table of their shared path and the subtree's nodes. Returns
    the table's ``(col, logits)``."""
    col, rows, col_ok = subtree_table(sub, split=split, depth=depth)
    pipelined = cfg.num_stages > 1
    logits = cm.table_dot(x_ref, tok, tok_ok, w_in_ref, rows, col_ok, width_in, cfg.chunk, loop=pipelined)
    logits += cm.load(b_in_ref.at[rows], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
    on_path, _ = descend_table(logits, col, split=split, depth=depth)
    act = jnp.where(on_path, cm.gelu(logits), 0.0)
    act = act if x_ref.dtype == jnp.float32 else act.astype(x_ref.dtype)
    cm.store_table_product(y_ref, tok, tok_ok, act, w_out_ref, rows, col_ok, width_out, cfg.chunk,
                           loop=pipelined)
    return col, logits


def _route_rows(x_ref, w_in_ref, b_in_ref, rows, row_ok, *, width_in, split, chunk, loop):
    """``sub (len(rows),)``: the level-``split`` subtree each token of ``rows`` enters: the top
    ``2**split - 1`` logits by one tensor-core dot per column chunk, then ``split`` strict ``> 0`` steps."""
    n_top = 2**split - 1
    n_cols = cm.next_pow2(max(16, n_top))
    top = jnp.arange(n_cols, dtype=jnp.int32)
    top_ok = top < n_top
    top_rows = jnp.where(top_ok, top, 0)
    logits = cm.table_dot(x_ref, rows, row_ok, w_in_ref, top_rows, top_ok, width_in, chunk, loop=loop)
    logits += cm.load(b_in_ref.at[top_rows], mask=top_ok, other=0.0).astype(jnp.float32)[None, :]
    node = jnp.zeros(rows.shape, jnp.int32)
    for _ in range(split):
        z = jnp.sum(jnp.where(top[None, :] == node[:, None], logits, 0.0), axis=1)
        node = 2 * node + 1 + (z > 0).astype(jnp.int32)
    return node - n_top


def _route_kernel(x_ref, w_in_ref, b_in_ref, sub_ref, *, n_tokens, width_in, split, block_t, chunk, loop):
    """Each token's level-``split`` subtree (:func:`_route_rows`). Only ``sub (T,)`` goes back to HBM."""
    rows = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    row_ok = rows < n_tokens
    sub = _route_rows(x_ref, w_in_ref, b_in_ref, rows, row_ok, width_in=width_in, split=split, chunk=chunk,
                      loop=loop)
    cm.store(sub_ref.at[rows], sub, mask=row_ok)


def route_to_subtrees(x, w_in, b_in, *, split: int, config: FffV2ForwardConfig = GROUPED_CONFIG,
                      interpret: bool = False):
    """``sub (T,)`` int32: the level-``split`` subtree (``0 .. 2**split - 1``) each token enters.

    ``config.route == "kernel"`` and 16-bit ``x``: a Pallas kernel (tiles from ``config.route_*``), so
    that the top logits never go to HBM: it reads ``x`` once and writes 4 bytes per token. Otherwise
    one XLA matmul writes the ``(T, 2**split - 1)`` float32 logits and the descent reads them back.
    """
    n_tokens, width_in = x.shape
    wide = jnp.dtype(x.dtype).itemsize >= 4
    if wide or config.route == "gemm":
        # Float32 always: Triton does not finish compiling an IEEE float32 tile dot of this size (no tf32)
        # in reasonable time, and float32 is not the fast path.
        n_top = 2**split - 1
        logits = jnp.dot(x, w_in[:n_top].T, precision=jax.lax.Precision.HIGHEST if wide else None,
                         preferred_element_type=jnp.float32) + b_in[:n_top].astype(jnp.float32)
        node = jnp.zeros((n_tokens,), jnp.int32)
        for _ in range(split):
            z = jnp.take_along_axis(logits, node[:, None], axis=1)[:, 0]
            node = 2 * node + 1 + (z > 0).astype(jnp.int32)
        return node - n_top
    kernel = functools.partial(_route_kernel, n_tokens=n_tokens, width_in=width_in, split=split,
                               block_t=config.route_block_t, chunk=config.route_chunk,
                               loop=config.route_num_stages > 1)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((n_tokens,), jnp.int32, x, w_in, b_in),
        grid=(pl.cdiv(n_tokens, config.route_block_t),),
        compiler_params=cm.compiler_params(config.route_num_warps, config.route_num_stages),
        interpret=interpret,
        name="fff_v2_route",
    )(x, w_in, b_in)


def _route_place_kernel(chunk_ref, x_ref, w_in_ref, b_in_ref, counts_in_ref, counts_ref, slots_ref, *, n_tokens,
                        width_in, split, chunk_tokens, block_t, chunk, loop):
    """Routes a block of chunk ``c = chunk_ref[0]``'s tokens (:func:`_route_rows`) and places each in its
    subtree's bucket: ``slots[sub * C + k] = token`` for the ``k``-th token of subtree ``sub`` placed in
    the chunk. A block's tokens of one subtree are ranked in token order (a cumulative sum of their
    one-hot table); one atomic add per subtree on ``counts[c]`` reserves the block's places after the
    blocks placed before it (in whichever order the programs run: every token's output is computed
    from its own row, so the order of a bucket changes no value)."""
    del counts_in_ref   # the same buffer as counts_ref
    c = chunk_ref[0]
    n_sub = 2**split
    n_cols = cm.next_pow2(max(16, n_sub))
    local = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    rows = c * chunk_tokens + local
    row_ok = (local < chunk_tokens) & (rows < n_tokens)
    sub = _route_rows(x_ref, w_in_ref, b_in_ref, rows, row_ok, width_in=width_in, split=split, chunk=chunk,
                      loop=loop)
    cols = jnp.arange(n_cols, dtype=jnp.int32)
    hit = ((sub[:, None] == cols[None, :]) & row_ok[:, None]).astype(jnp.int32)     # (block_t, n_cols)
    rank = jnp.sum(hit * (jnp.cumsum(hit, axis=0) - hit), axis=1)
    # counts has n_cols (>= n_sub) entries per chunk, so the add needs no mask (interpret mode has none).
    placed_before = plgpu_triton.atomic_add(counts_ref, (c * n_cols + cols,), jnp.sum(hit, axis=0))
    start = jnp.sum(hit * placed_before[None, :], axis=1)
    # Tokens past the chunk's end point past the table: a masked lane could otherwise share a real
    # token's slot, and interpret mode writes masked lanes back with the old value.
    slot = jnp.where(row_ok, sub * chunk_tokens + start + rank, n_sub * chunk_tokens)
    cm.store(slots_ref.at[slot], rows, mask=row_ok)


def _chunk_grouped_kernel(chunk_ref, counts_ref, slots_ref, x_ref, w_in_ref, b_in_ref, w_out_ref, *y_refs,
                          n_tokens, width_in, width_out, depth, split, chunk_tokens, cfg: FffV2ForwardConfig):
    """Program ``b`` runs block ``b`` of chunk ``c = chunk_ref[0]``'s buckets (:func:`_route_place_kernel`):
    subtree ``s`` owns ``ceil(counts[c, s] / bt)`` consecutive blocks, in subtree order; programs past
    the last block store nothing. ``y_refs`` is ``(y,)`` or, with an aliased input, ``(y_in, y)``."""
    y_ref = y_refs[-1]
    c = chunk_ref[0]
    bt = cfg.block_t
    n_sub = 2**split
    n_cols = cm.next_pow2(max(16, n_sub))
    cols = jnp.arange(n_cols, dtype=jnp.int32)
    counts = cm.load(counts_ref.at[c * n_cols + cols])
    blocks = (counts + bt - 1) // bt
    ends = jnp.cumsum(blocks)
    b = pl.program_id(0)
    sub = jnp.minimum(jnp.sum((ends <= b).astype(jnp.int32)), n_sub - 1)
    mine = cols == sub
    first = jnp.sum(jnp.where(mine, ends - blocks, 0))
    count = jnp.sum(jnp.where(mine, counts, 0))
    pos = (b - first) * bt + jnp.arange(bt, dtype=jnp.int32)
    tok_ok = (pos >= 0) & (pos < count)
    tok = cm.load(slots_ref.at[sub * chunk_tokens + pos], mask=tok_ok, other=n_tokens)
    tok = jnp.where(tok_ok, tok, n_tokens)
    _grouped_block(sub, tok, tok_ok, x_ref, w_in_ref, b_in_ref, w_out_ref, y_ref, width_in=width_in,
                   width_out=width_out, depth=depth, split=split, cfg=cfg)


def chunked_grouped_forward(x, w_in, b_in, w_out, *, depth: int, split: int, config: FffV2ForwardConfig,
                            interpret: bool = False):
    """The grouped forward in one pass over ``x``: ``y (T, H_out)`` in ``x.dtype``.

    For each chunk of ``C = config.chunk_tokens`` tokens, two launches: the route kernel places the
    chunk's tokens in per-subtree buckets (:func:`_route_place_kernel`), then the grouped kernel runs
    the buckets (:func:`_chunk_grouped_kernel`) while the chunk's rows of ``x`` are still in L2 (for
    ``C * H`` elements well under its size). The chunks run in a ``lax.fori_loop`` with a static trip
    count (no host round trip per chunk); ``y`` is the first chunk's output buffer, written in place
    by the others (``input_output_aliases``), so that no pass initialises it.
    """
    n_tokens, width_in = x.shape
    width_out = w_out.shape[1]
    chunk_tokens = min(config.chunk_tokens, n_tokens)
    n_chunks = pl.cdiv(n_tokens, chunk_tokens)
    n_sub = 2**split
    n_cols = cm.next_pow2(max(16, n_sub))
    bt = config.block_t
    inputs = (x, w_in, b_in, w_out)
    place = pl.pallas_call(
        functools.partial(_route_place_kernel, n_tokens=n_tokens, width_in=width_in, split=split,
                          chunk_tokens=chunk_tokens, block_t=config.route_block_t, chunk=config.route_chunk,
                          loop=config.route_num_stages > 1),
        out_shape=(out_struct((n_chunks * n_cols,), jnp.int32, *inputs),
                   out_struct((n_sub * chunk_tokens,), jnp.int32, *inputs)),
        grid=(pl.cdiv(chunk_tokens, config.route_block_t),),
        input_output_aliases={4: 0},
        compiler_params=cm.compiler_params(config.route_num_warps, config.route_num_stages),
        interpret=interpret,
        name="fff_v2_route_place",
    )
    grouped = functools.partial(_chunk_grouped_kernel, n_tokens=n_tokens, width_in=width_in, width_out=width_out,
                                depth=depth, split=split, chunk_tokens=chunk_tokens, cfg=config)
    grouped_call = dict(out_shape=out_struct((n_tokens, width_out), x.dtype, *inputs),
                        grid=(pl.cdiv(chunk_tokens, bt) + n_sub,),
                        compiler_params=cm.compiler_params(config.num_warps, config.num_stages),
                        interpret=interpret, name="fff_v2_forward_chunk")

    def run_chunk(c, counts, y=None):
        chunk = jnp.reshape(c, (1,)).astype(jnp.int32)
        counts, slots = place(chunk, x, w_in, b_in, counts)
        if y is None:
            return counts, pl.pallas_call(grouped, **grouped_call)(chunk, counts, slots, *inputs)
        return counts, pl.pallas_call(grouped, input_output_aliases={7: 0}, **grouped_call)(
            chunk, counts, slots, *inputs, y)

    counts, y = run_chunk(0, jnp.zeros((n_chunks * n_cols,), jnp.int32))
    counts, y = jax.lax.fori_loop(1, n_chunks, lambda c, carry: run_chunk(c, *carry), (counts, y))
    return y


RANK_CHUNK = 64          # tokens per step of the rank kernel's loop
RANK_PROGRAMS = 256      # about two waves of a Hopper GPU's 132 SMs


def _rank_kernel(sub_ref, rank_ref, count_ref, *, n_tokens, n_sub, steps):
    """Program ``p`` walks its ``steps * RANK_CHUNK`` tokens in order and stores, per token, how many
    earlier tokens of the program entered the same subtree (``rank``), and, per subtree, how many of
    its tokens did (``count[p]``). A running count per subtree is carried across the loop; a chunk's
    ranks come from a cumulative sum of its one-hot ``(RANK_CHUNK, n_cols)`` table."""
    n_cols = cm.next_pow2(max(16, n_sub))
    cols = jnp.arange(n_cols, dtype=jnp.int32)
    first = pl.program_id(0) * steps * RANK_CHUNK

    def body(step, running):
        rows = first + step * RANK_CHUNK + jnp.arange(RANK_CHUNK, dtype=jnp.int32)
        row_ok = rows < n_tokens
        sub = cm.load(sub_ref.at[rows], mask=row_ok, other=-1)
        hit = (sub[:, None] == cols[None, :]).astype(jnp.int32)
        before = jnp.cumsum(hit, axis=0) - hit + running[None, :]
        cm.store(rank_ref.at[rows], jnp.sum(hit * before, axis=1), mask=row_ok)
        return running + jnp.sum(hit, axis=0)

    counts = jax.lax.fori_loop(0, steps, body, jnp.zeros((n_cols,), jnp.int32))
    cm.store(count_ref.at[pl.program_id(0) * n_sub + cols], counts, mask=cols < n_sub)


def rank_in_subtree(sub, n_sub: int, *, interpret: bool = False):
    """A stable counting sort's parts, without a sort, for ``sub (T,)`` in ``0 .. n_sub - 1``.

    The tokens are cut into ``P`` consecutive spans of ``span`` tokens (one Pallas program each).
    Returns ``(rank (T,), counts (P, n_sub), span)``: ``rank[t]`` is the number of tokens of ``t``'s
    span before ``t`` in the same subtree, ``counts[p, s]`` the number of span ``p``'s tokens in
    subtree ``s``. A token's place in subtree order is then the tokens of its subtree in earlier
    spans plus its rank.
    """
    n_tokens = sub.shape[0]
    n_chunks = pl.cdiv(n_tokens, RANK_CHUNK)
    steps = min(64, cm.next_pow2(pl.cdiv(n_chunks, RANK_PROGRAMS)))
    n_programs = pl.cdiv(n_chunks, steps)
    rank, counts = pl.pallas_call(
        functools.partial(_rank_kernel, n_tokens=n_tokens, n_sub=n_sub, steps=steps),
        out_shape=(out_struct((n_tokens,), jnp.int32, sub), out_struct((n_programs * n_sub,), jnp.int32, sub)),
        grid=(n_programs,),
        compiler_params=cm.compiler_params(4, 1),
        interpret=interpret,
        name="fff_v2_rank",
    )(sub)
    return rank, counts.reshape(n_programs, n_sub), steps * RANK_CHUNK


def group_by_subtree(x, w_in, b_in, *, split: int, config: FffV2ForwardConfig = GROUPED_CONFIG,
                     interpret: bool = False):
    """Route every token through the top ``split`` levels and lay the tokens out in blocks of
    ``block_t = config.block_t`` by subtree.

    Returns:
        ``slots (n_blocks * block_t,)`` int32 token indices (-1 = empty slot), each subtree's tokens
        in token order, padded to whole blocks, and ``block_sub (n_blocks,)`` the subtree of each
        block, with ``n_blocks = cdiv(T, block_t) + 2**split`` (a static bound).

    No sort (:func:`rank_in_subtree` instead, cheaper than XLA's radix sort of the tokens) and no
    ``jnp.searchsorted`` with its default method (a ``while`` loop whose every GPU step waits on the
    host).
    """
    n_tokens, block_t = x.shape[0], config.block_t
    n_sub = 2**split
    sub = route_to_subtrees(x, w_in, b_in, split=split, config=config, interpret=interpret)
    rank, span_counts, span = rank_in_subtree(sub, n_sub, interpret=interpret)
    counts = jnp.sum(span_counts, axis=0)
    earlier_spans = jnp.cumsum(span_counts, axis=0) - span_counts          # (P, n_sub)
    padded = (counts + block_t - 1) // block_t * block_t
    padded_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded).astype(jnp.int32)])
    token = jnp.arange(n_tokens, dtype=jnp.int32)
    slot = padded_start[sub] + earlier_spans[token // span, sub] + rank
    n_blocks = pl.cdiv(n_tokens, block_t) + n_sub
    slots = jnp.full((n_blocks * block_t,), -1, jnp.int32).at[slot].set(token, unique_indices=True)
    block_sub = jnp.searchsorted(padded_start[1:], jnp.arange(n_blocks, dtype=jnp.int32) * block_t, side="right",
                                 method="compare_all")
    return slots, jnp.minimum(block_sub, n_sub - 1).astype(jnp.int32)


def check_shapes(x, w_in, b_in, w_out, depth: int, n_trees: int) -> None:
    """Raise ``ValueError`` naming the argument that does not fit the FFF-v2 layout (``x`` is
    ``(tokens, H)``; the kernels take depths up to :data:`MAX_DEPTH`)."""
    v2.check_arguments(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    if depth > MAX_DEPTH:
        raise ValueError(f"depth must be <= {MAX_DEPTH} for the Pallas kernels, got {depth}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (tokens, H), got {tuple(x.shape)}")


class PathResiduals(NamedTuple):
    """What the token-order kernel saves for the backward: ``nodes`` (int32) and ``logits``
    (float32), both ``(n_trees * (depth + 1), T)``; row ``k * (depth + 1) + level`` holds tree
    ``k``'s visited flat node and its logit at ``level``."""

    nodes: jax.Array
    logits: jax.Array


class GroupedResiduals(NamedTuple):
    """What the grouped kernel saves for the backward: its token layout ``slots (n_blocks * bt,)``
    and ``block_sub (n_blocks,)`` (see :func:`group_by_subtree`) and every block's table of logits
    ``(n_blocks * bt, n_cols)`` float32, columns as in :func:`subtree_table`."""

    slots: jax.Array
    block_sub: jax.Array
    logits: jax.Array


@functools.partial(jax.jit, static_argnames=("depth", "n_trees", "interpret", "config", "save_residuals"))
def fff_v2_forward(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1, interpret: bool = False,
                   config: FffV2ForwardConfig = DEFAULT_CONFIG, save_residuals: bool = False):
    """The kernel call. Returns ``y (T, H_out)`` or, with ``save_residuals``, ``(y, residuals)``:
    :class:`GroupedResiduals` from the grouped kernel, else :class:`PathResiduals`."""
    check_shapes(x, w_in, b_in, w_out, depth, n_trees)
    n_tokens, width_in = x.shape
    width_out = w_out.shape[1]
    split = grouped_split(config, depth, n_trees)
    if split > 0 and (depth + 1 - split > MAX_GROUPED_SUBTREE_LEVELS or split > MAX_ROUTE_LEVELS):
        raise ValueError(
            f"config.split_level={config.split_level} does not fit depth {depth}: the grouped kernel needs "
            f"{depth + 1 - MAX_GROUPED_SUBTREE_LEVELS} <= split_level <= {MAX_ROUTE_LEVELS} (at most "
            f"{MAX_GROUPED_SUBTREE_LEVELS} levels per subtree, at most {MAX_ROUTE_LEVELS} routed levels); use "
            "split_level=0 (the token-order kernel) or default_config(depth, n_trees)")
    common = dict(n_tokens=n_tokens, width_in=width_in, width_out=width_out, depth=depth, cfg=config,
                  save_residuals=save_residuals)
    inputs = (x, w_in, b_in, w_out)
    out_shape = [out_struct((n_tokens, width_out), x.dtype, *inputs)]
    if split > 0 and config.chunk_tokens and not save_residuals:
        return chunked_grouped_forward(x, w_in, b_in, w_out, depth=depth, split=split, config=config,
                                       interpret=interpret)
    if split > 0:
        slots, block_sub = group_by_subtree(x, w_in, b_in, split=split, config=config, interpret=interpret)
        kernel = functools.partial(_grouped_kernel, split=split, **common)
        grid = (block_sub.shape[0],)
        operands = (slots, block_sub, x, w_in, b_in, w_out)
        if save_residuals:
            n_cols = subtree_table(0, split=split, depth=depth)[0].shape[0]
            out_shape.append(out_struct((slots.shape[0], n_cols), jnp.float32, *inputs))
    else:
        if n_trees % config.tree_programs:
            raise ValueError(f"config.tree_programs={config.tree_programs} must divide n_trees={n_trees}")
        if config.tree_rows and save_residuals:
            raise ValueError("config.tree_rows is forward only: it writes no residuals (save_residuals=False)")
        kernel = functools.partial(_kernel, n_trees=n_trees, **common)
        grid = (pl.cdiv(n_tokens, config.block_t), config.tree_programs)
        operands = (x, w_in, b_in, w_out)
        if config.tree_programs > 1:
            out_shape[0] = out_struct((config.tree_programs * n_tokens, width_out), jnp.float32, *inputs)
        if save_residuals:
            p = n_trees * (depth + 1)
            out_shape += [out_struct((p, n_tokens), jnp.int32, *inputs),
                          out_struct((p, n_tokens), jnp.float32, *inputs)]
    out = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=grid,
        compiler_params=cm.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="fff_v2_forward_grouped" if split else "fff_v2_forward",
    )(*operands)
    y = out[0]
    if split == 0 and config.tree_programs > 1:
        y = jnp.sum(y.reshape(config.tree_programs, n_tokens, width_out), axis=0).astype(x.dtype)
    if not save_residuals:
        return y
    if split > 0:
        return y, GroupedResiduals(slots, block_sub, out[1])
    return y, PathResiduals(out[1], out[2])


def grouped_split(config: FffV2ForwardConfig, depth: int, n_trees: int) -> int:
    """The split level the grouped kernel runs with for this layer (0: the token-order kernel)."""
    return min(config.split_level, depth) if n_trees == 1 else 0


def fff_v2_hard(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1, interpret: bool = False,
                config: FffV2ForwardConfig | None = None):
    """FFF-v2 hard forward through the Pallas kernel (argument layout of :func:`fffjax.ops.fff_v2_hard`).

    Args:
        x: ``(T, H)`` float32 or bfloat16 tokens.
        w_in: ``(K*N, H)``; b_in: ``(K*N,)``; w_out: ``(K*N, H_out)``; ``N = 2**(depth+1) - 1``.
        depth: descents per tree (0..15); n_trees: K.
        interpret: run the kernel in Pallas interpret mode (CPU).
        config: block sizes (default: :func:`default_config`).

    Returns:
        ``(T, H_out)`` in ``x.dtype``, accumulated in float32.
    """
    if config is None:
        config = operand_config(x, w_out, depth=depth, n_trees=n_trees)
    return fff_v2_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=interpret, config=config)


def fff_v2_hard_reference(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1):
    """The jnp reference the kernel is tested against: fffjax's row-gather forward on float32 copies
    of the inputs (16-bit products rounded before the sum would be less exact than the kernel),
    returned in ``x.dtype``."""
    f32 = [a.astype(jnp.float32) for a in (x, w_in, b_in, w_out)]
    return v2.conditional_forward(*f32, depth=depth, n_trees=n_trees).astype(x.dtype)
