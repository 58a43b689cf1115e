"""FFF-v2 and FFF-v1 hard forwards and attention as C++ XLA FFI custom calls on the CPU
(``implementation="cpu_ffi"``).

The kernels (``_fff_cpu.cc``) are compiled at first use with the machine's ``g++ -O3 -march=native``
into a cache directory (``$FFFJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/fffjax``, else
``~/.cache/fffjax``), keyed by a hash of the source, the compiler, the flags and the CPU, and
loaded with ctypes. When no compiler is found or the build fails, :func:`available` is ``False``
and the registry falls back to ``"xla"``.

FFF-v2 semantics are those of :func:`fffjax.v2.conditional_forward`: strict ``> 0`` routing, exact
erf GELU, K trees, any width. FFF-v1 semantics are those of :func:`fffjax.v1.hard_forward`: ``>= 0``
routing, the leaf's two-layer MLP; ``activation=jax.nn.relu`` and the exact GELU ``fffjax.v2.gelu``
are compiled (any other raises ``NotImplementedError``, so the registry falls back to ``"xla"``). Attention is that of
:func:`fffjax.ops.xla.attention` (crammed BERT's fused, per-head interleaved QKV projection, an additive
bias per key, float32 softmax), read from the fused projection as it is, with no transposed copies of
q, k and v; cached attention is that of :func:`fffjax.ops.xla.cached_attention` (a decoder's queries over
its key/value cache, rows read in place). bf16/f16 inputs are computed in float32 and cast back.
Gradients come from ``custom_vjp`` functions whose backward is the differentiable jnp path
(:func:`fffjax.v2.conditional_forward` / :func:`fffjax.v1.hard_forward` / :func:`fffjax.ops.xla.attention` /
:func:`fffjax.ops.xla.cached_attention`).
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fffjax import v1, v2
from fffjax._typing import Array, Float
from fffjax._vma import vary_like
from fffjax.ops import xla
from fffjax.ops._vjp import with_reference_vjp

_SOURCE = Path(__file__).with_name("_fff_cpu.cc")
_TARGET = "fffjax_v2_hard_f32"
_TARGET_V1 = "fffjax_v1_hard_f32"
_TARGET_ATTENTION = "fffjax_attention_f32"
_TARGET_CACHED_ATTENTION = "fffjax_cached_attention_f32"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
_build_error: str | None = None


def cache_dir() -> Path:
    """Directory holding the compiled kernels."""
    if os.environ.get("FFFJAX_CACHE_DIR"):
        return Path(os.environ["FFFJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fffjax"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor()


def _compile(compiler: str) -> Path:
    """Build the shared library unless a matching one is cached; returns its path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        "\n".join([_SOURCE.read_text(), version, " ".join(_FLAGS), _cpu_signature(), jax.ffi.include_dir()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"fff_cpu_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename atomically: parallel test workers may race here.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp],
            capture_output=True, text=True, check=True,
        )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Compile (or find cached), load and register the kernels; ``False`` when that is impossible."""
    global _build_error
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None or platform.system() != "Linux":
        _build_error = "no C++ compiler found (set CXX) or not Linux"
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.FffV2HardF32), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_V1, jax.ffi.pycapsule(lib.FffV1HardF32), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_ATTENTION, jax.ffi.pycapsule(lib.AttentionF32), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_CACHED_ATTENTION, jax.ffi.pycapsule(lib.CachedAttentionF32),
                                    platform="cpu")
    except (OSError, subprocess.CalledProcessError) as err:
        _build_error = getattr(err, "stderr", None) or str(err)
        return False
    return True


def build_error() -> str | None:
    """Why the kernel is unavailable (compiler output), or ``None``."""
    return _build_error


def _call_f32(target: str, x, weights: tuple, out_width: int, **attrs):
    """The FFI ``target`` on float32 copies of ``x (B, H)`` and ``weights``: ``(B, out_width)`` in
    ``x.dtype``, varying over the mesh axes of its inputs (inside ``shard_map``). ``attrs`` are int64."""
    f32 = jnp.float32
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], out_width), f32), vmap_method="sequential")
    y = call(x.astype(f32), *(w.astype(f32) for w in weights), **{k: np.int64(v) for k, v in attrs.items()})
    return vary_like(y.astype(x.dtype), x, *weights)


def _require_usable(x) -> None:
    """Raise ``NotImplementedError`` (so that the registry falls back to ``"xla"``) off the CPU, when
    the kernel did not build, or for a dtype the kernel does not compute in float32."""
    if jax.default_backend() != "cpu" or not available():
        raise NotImplementedError(f"cpu_ffi unavailable: {build_error() or 'not on the CPU backend'}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cpu_ffi computes in float32; got x of dtype {x.dtype}")


_forward = with_reference_vjp(
    lambda x, w_in, b_in, w_out, *, depth, n_trees: _call_f32(
        _TARGET, x, (w_in, b_in, w_out), w_out.shape[1], depth=depth, n_trees=n_trees),
    v2.conditional_forward)


@functools.partial(jax.jit, static_argnames=("depth", "n_trees"))
def fff_v2_hard_cpu(
    x: Float[Array, "batch din"],
    w_in: Float[Array, "nodes din"],
    b_in: Float[Array, " nodes"],
    w_out: Float[Array, "nodes dout"],
    *,
    depth: int,
    n_trees: int = 1,
) -> Float[Array, "batch dout"]:
    """FFF-v2 hard forward through the C++ kernel (CPU only; differentiable through the jnp path).

    Args:
        x: ``(B, H)`` inputs; w_in ``(K*N, H)``; b_in ``(K*N,)``; w_out ``(K*N, H_out)``.
        depth: descents per tree; n_trees: K.

    Returns:
        ``(B, H_out)`` in the dtype of ``x``.
    """
    return _forward((("depth", depth), ("n_trees", n_trees)), x, w_in, b_in, w_out)


def registered_fn(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1):
    """Registry entry: raises ``NotImplementedError`` off the CPU or when the kernel did not build."""
    _require_usable(x)
    return fff_v2_hard_cpu(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)


# --------------------------------------------------------------------------- FFF-v1


# The leaf activations the C++ kernel compiles, by the code its `activation` attribute takes.
V1_ACTIVATIONS = {jax.nn.relu: 0, v2.gelu: 1}

_forward_v1 = with_reference_vjp(
    lambda x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth, leaf_output_bias, activation: _call_f32(
        _TARGET_V1, x, (node_weights, node_biases, w1s, b1s, w2s, b2s), w2s.shape[2], depth=depth,
        leaf_output_bias=leaf_output_bias, activation=V1_ACTIVATIONS[activation]),
    v1.hard_forward)


@functools.partial(jax.jit, static_argnames=("depth", "leaf_output_bias", "activation"))
def fff_v1_hard_cpu(
    x: Float[Array, "batch din"],
    node_weights: Float[Array, "nodes din"],
    node_biases: Float[Array, " nodes"],
    w1s: Float[Array, "leaves din width"],
    b1s: Float[Array, "leaves width"],
    w2s: Float[Array, "leaves width dout"],
    b2s: Float[Array, "leaves dout"],
    *,
    depth: int,
    leaf_output_bias: bool = True,
    activation=jax.nn.relu,
) -> Float[Array, "batch dout"]:
    """FFF-v1 hard forward through the C++ kernel (CPU only; differentiable through jnp).

    Args:
        x: ``(B, in)`` inputs; node_weights ``(2**depth - 1, in)``; node_biases ``(2**depth - 1,)``;
            w1s ``(2**depth, in, width)``; b1s ``(2**depth, width)``; w2s ``(2**depth, width, out)``;
            b2s ``(2**depth, out)``.
        depth: descents (right when ``z >= 0``); leaf_output_bias: add ``b2s``.
        activation: the leaves' hidden activation, ``jax.nn.relu`` or the exact GELU
            :func:`fffjax.v2.gelu` (the keys of :data:`V1_ACTIVATIONS`).

    Returns:
        ``(B, out)`` in the dtype of ``x``.
    """
    if activation not in V1_ACTIVATIONS:
        raise ValueError(f"activation: expected jax.nn.relu or fffjax.v2.gelu, got {activation!r}")
    static = (("depth", depth), ("leaf_output_bias", bool(leaf_output_bias)), ("activation", activation))
    return _forward_v1(static, x, node_weights, node_biases, w1s, b1s, w2s, b2s)


def registered_fn_v1(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth: int,
                     activation=jax.nn.relu, leaf_output_bias: bool = True):
    """Registry entry for ``fff_v1_hard``: raises ``NotImplementedError`` for an activation other than
    ``jax.nn.relu`` and the exact GELU ``fffjax.v2.gelu``, off the CPU, for other dtypes or when the
    kernel did not build."""
    if activation not in V1_ACTIVATIONS:
        raise NotImplementedError(f"cpu_ffi compiles only jax.nn.relu and fffjax.v2.gelu leaves, got {activation!r}")
    _require_usable(x)
    return fff_v1_hard_cpu(x, node_weights, node_biases, w1s, b1s, w2s, b2s, depth=depth,
                           leaf_output_bias=bool(leaf_output_bias), activation=activation)


# --------------------------------------------------------------------------- attention


def _attention_f32(qkv, key_bias, *, num_heads: int, scale: float):
    """The attention FFI target on float32 copies of ``qkv (B, S, 3H)`` and ``key_bias (B, S)`` (zeros
    for None): ``(B, S, H)`` in ``qkv.dtype``."""
    f32 = jnp.float32
    batch, seq, three_h = qkv.shape
    bias = jnp.zeros((batch, seq), f32) if key_bias is None else key_bias.astype(f32)
    call = jax.ffi.ffi_call(_TARGET_ATTENTION, jax.ShapeDtypeStruct((batch, seq, three_h // 3), f32),
                            vmap_method="sequential")
    out = call(qkv.astype(f32), bias, num_heads=np.int64(num_heads), scale=np.float32(scale))
    return vary_like(out.astype(qkv.dtype), qkv, *(() if key_bias is None else (key_bias,)))


_attention_forward = with_reference_vjp(_attention_f32, xla.attention)


@functools.partial(jax.jit, static_argnames=("num_heads", "scale"))
def attention_cpu(
    qkv: Float[Array, "batch seq three_hidden"],
    key_bias: Float[Array, "batch seq"] | None = None,
    *,
    num_heads: int,
    scale: float,
) -> Float[Array, "batch seq hidden"]:
    """:func:`fffjax.ops.xla.attention` through the C++ kernel (CPU only; differentiable through jnp).

    Args:
        qkv: ``(B, S, 3H)``, head ``n``'s query, key and value at columns ``3dn + [0, d)``, ``[d, 2d)``,
            ``[2d, 3d)`` (``d = H / num_heads``).
        key_bias: ``(B, S)`` additive bias per key, or None.
        num_heads: heads; scale: multiplies the scores.

    Returns:
        ``context (B, S, H)`` in the dtype of ``qkv``, head ``n`` at columns ``dn + [0, d)``.
    """
    return _attention_forward((("num_heads", num_heads), ("scale", scale)), qkv, key_bias)


def registered_fn_attention(qkv, key_bias=None, *, num_heads: int, scale: float, causal: bool = False):
    """Registry entry for ``attention``: raises ``NotImplementedError`` off the CPU, for other dtypes,
    for a causal mask (the kernel is bidirectional) or when the kernel did not build."""
    if causal:
        raise NotImplementedError("the cpu_ffi attention kernel is bidirectional; use 'xla' for causal")
    _require_usable(qkv)
    return attention_cpu(qkv, key_bias, num_heads=int(num_heads), scale=float(scale))


# --------------------------------------------------------------------------- cached attention


def _cached_attention_f32(q, k, v, key_bias, *, scale: float):
    """The cached-attention FFI target on float32 copies of ``q (B, Q, heads, d)``, ``k``, ``v (B, T, heads, d)``
    and ``key_bias (B, T)`` (zeros for None): ``(B, Q, heads * d)`` in ``q.dtype``."""
    f32 = jnp.float32
    batch, queries, heads, width = q.shape
    bias = jnp.zeros(k.shape[:2], f32) if key_bias is None else key_bias.astype(f32)
    call = jax.ffi.ffi_call(_TARGET_CACHED_ATTENTION, jax.ShapeDtypeStruct((batch, queries, heads * width), f32),
                            vmap_method="sequential")
    out = call(q.astype(f32), k.astype(f32), v.astype(f32), bias, scale=np.float32(scale))
    return vary_like(out.astype(q.dtype), q, k, v, *(() if key_bias is None else (key_bias,)))


_cached_attention_forward = with_reference_vjp(_cached_attention_f32, xla.cached_attention)


@functools.partial(jax.jit, static_argnames=("scale",))
def cached_attention_cpu(
    q: Float[Array, "batch queries heads width"],
    k: Float[Array, "batch slots heads width"],
    v: Float[Array, "batch slots heads width"],
    key_bias: Float[Array, "batch slots"] | None = None,
    *,
    scale: float,
) -> Float[Array, "batch queries heads_width"]:
    """:func:`fffjax.ops.xla.cached_attention` through the C++ kernel (CPU only; differentiable through jnp):
    one (sequence, head) pair per task, each slot's key and value row read in place."""
    return _cached_attention_forward((("scale", scale),), q, k, v, key_bias)


def registered_fn_cached_attention(q, k, v, key_bias=None, *, scale: float):
    """Registry entry for ``cached_attention``: raises ``NotImplementedError`` off the CPU, for other dtypes
    or when the kernel did not build."""
    _require_usable(q)
    return cached_attention_cpu(q, k, v, key_bias, scale=float(scale))
