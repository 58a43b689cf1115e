// FFF-v2 and FFF-v1 hard forwards, attention and cached (decode) attention on the CPU as XLA FFI custom calls (float32).
//
// FFF-v2 (FffV2HardF32):
// Per token and tree: walk the D+1 levels, one dot product with the node's w_in row per level
// (logit z = x . w_in[n] + b_in[n], next n = 2n + 1 + (z > 0)), remember (n, gelu(z)); then
// y = sum over trees and levels of gelu(z) * w_out[n]. Only the K*(D+1) rows on the token's paths
// are read.
//
// Memory is what costs: the deep levels' rows (UltraFastBERT 1x11: 2 x 12.6 MB) do not stay in
// cache when tokens are taken in input order. So the top levels are walked in token order (their
// few rows stay in L2), then tokens are counting-sorted by the node they reached, and the last
// kSortedLevels levels plus the output sum run subtree by subtree: tokens sharing a subtree run
// back to back and read its rows of w_in and w_out from memory once. Tokens go in groups of
// kGroup to keep several independent row streams in flight; token ranges are split over threads.
// Layers of many small trees (from kBlockOrderMinTrees) run block by block instead: each token walks
// kTreeGroup trees side by side against one load of its x, the logits go through a 16-lane GELU,
// and the token's output is summed once per group of trees.
//
// FFF-v1 (FffV1HardF32): per sample, descend `depth` levels (z = x . node_weights[n] +
// node_biases[n], right when z >= 0), then the reached leaf's MLP act(x @ w1s[leaf] + b1s[leaf]) @
// w2s[leaf] (+ b2s[leaf]), act ReLU (attribute activation = 0) or exact GELU (1). Both layers read
// rows of the (in, width) / (width, out) layouts: output columns are held in vector registers while the rows stream past (with AVX-512, a layer of 1, 2, 4
// or 8 columns packs several rows per vector instead), kGroupV1 samples interleaved so that their
// independent FMA chains hide each other's latency. At the digits demo's size (450 samples, 64 in,
// depth 3, width 8, 10 out) the call costs ~5 us plus ~100 cycles per sample.
//
// Attention (AttentionF32): crammed BERT's bidirectional attention read from the fused projection
// qkv (B, S, 3H) as it is (head n's q, k, v at columns 3dn + [0, d), [d, 2d), [2d, 3d)), an additive
// bias per key, float32 softmax; context (B, S, H). One (sequence, head) pair at a time, pairs split
// over threads: K transposed and V copied into zero-padded scratch, then blocks of kQueryRows query
// rows: scores against every key (a register-blocked product with K^T), softmax, the weighted sum of V
// rows (the same product with V). XLA's form instead copies q, k, v and the probabilities into
// head-major layouts around two batched matmuls.
//
// Built by fffjax/ops/cpu_ffi.py with the machine's g++ (-O3 -march=native) at first use.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 float lanes; GCC lowers it to one zmm register with AVX-512, two ymm with AVX2.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// Non-temporal store of 16 floats to a 64-byte aligned address (bypasses the caches).
inline void stream16(float* p, v16 v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  typedef float v8 __attribute__((vector_size(32)));
  _mm256_stream_ps(p, reinterpret_cast<__m256>(v8{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]}));
  _mm256_stream_ps(p + 8, reinterpret_cast<__m256>(v8{v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]}));
#else
  store16(p, v);
#endif
}

// Sum of the 16 lanes: pairwise halves (a few shuffles) rather than 16 dependent scalar adds.
inline float hsum(v16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

// GELU of 16 lanes (every GELU of these kernels), 0.5 z (1 + erf(z / sqrt 2)), with erf the rational
// approximation on [-4, 4] (+-1 beyond) of Eigen and XLA's CPU backend: absolute error below 5e-7, against
// std::erf's tens of cycles a call, which in a walk of single-neuron nodes cost as much as the dot products.
inline v16 gelu16(v16 z) {
  v16 x = z * 0.70710678118654752f;
  x = x > 4.0f ? v16{} + 4.0f : x;
  x = x < -4.0f ? v16{} - 4.0f : x;
  const v16 x2 = x * x;
  v16 num = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  num = x2 * num + -2.10102402082508e-06f;
  num = x2 * num + -5.69250639462346e-05f;
  num = x2 * num + -7.34990630326855e-04f;
  num = x2 * num + -2.95459980854025e-03f;
  num = x2 * num + -1.60960333262415e-02f;
  v16 den = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  den = x2 * den + -1.68282697438203e-03f;
  den = x2 * den + -7.37332916720468e-03f;
  den = x2 * den + -1.42647390514189e-02f;
  return 0.5f * z * (1.0f + x * num / den);
}

// a[i] = gelu16(a[i]) for i < n (the tail through a zero-padded vector, so that every element gets the
// same GELU).
inline void gelu_inplace(float* a, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(a + i, gelu16(load16(a + i)));
  if (i < n) {
    float tail[16] = {};
    std::memcpy(tail, a + i, (n - i) * sizeof(float));
    store16(tail, gelu16(load16(tail)));
    std::memcpy(a + i, tail, (n - i) * sizeof(float));
  }
}

// Logits of G tokens against G (possibly different) rows, interleaved for memory-level parallelism.
template <int G>
inline void dots(const float* const* xs, const float* const* rows, int64_t h, float* out) {
  v16 acc0[G], acc1[G];
  for (int g = 0; g < G; ++g) acc0[g] = acc1[g] = v16{};
  int64_t i = 0;
  for (; i + 32 <= h; i += 32) {
    for (int g = 0; g < G; ++g) {
      acc0[g] += load16(xs[g] + i) * load16(rows[g] + i);
      acc1[g] += load16(xs[g] + i + 16) * load16(rows[g] + i + 16);
    }
  }
  for (int g = 0; g < G; ++g) {
    float s = hsum(acc0[g] + acc1[g]);
    for (int64_t j = i; j < h; ++j) s += xs[g][j] * rows[g][j];
    out[g] = s;
  }
}

// x . rows[g] for G rows against one x (loaded once for all G): G independent chains in flight.
template <int G>
inline void dots_shared(const float* x, const float* const* rows, int64_t h, float* out) {
  v16 acc0[G], acc1[G];
  for (int g = 0; g < G; ++g) acc0[g] = acc1[g] = v16{};
  int64_t i = 0;
  for (; i + 32 <= h; i += 32) {
    const v16 x0 = load16(x + i), x1 = load16(x + i + 16);
    for (int g = 0; g < G; ++g) {
      acc0[g] += x0 * load16(rows[g] + i);
      acc1[g] += x1 * load16(rows[g] + i + 16);
    }
  }
  for (int g = 0; g < G; ++g) {
    float s = hsum(acc0[g] + acc1[g]);
    for (int64_t j = i; j < h; ++j) s += x[j] * rows[g][j];
    out[g] = s;
  }
}

constexpr int kGroup = 4;
// Trees walked side by side per token in the block order (their rows share the token's x loads).
constexpr int kTreeGroup = 8;
// Deepest tree supported (node indices are int32).
constexpr int64_t kMaxLevels = 30;
// The last kSortedLevels levels run in subtree order (tokens sorted by node); those above in token order.
constexpr int64_t kSortedLevels = 4;
constexpr int64_t kChunk = 64;
// Tokens per unit of work handed to a thread.
constexpr int64_t kBlock = 256;

struct Problem {
  const float* x;
  const float* w_in;
  const float* b_in;
  const float* w_out;
  float* y;
  int64_t tokens, h, h_out, depth, n_trees;
  int64_t levels() const { return depth + 1; }
  int64_t per_tree() const { return (int64_t{2} << depth) - 1; }
};

// Walks levels [l_begin, l_end) of tree `k` for tokens order[i], i in [i_begin, i_end) (order may
// be null: identity). node[t] is the token's current node within the tree and is advanced;
// path/acts[t * levels + l] receive the flat node index and gelu(logit) of each level.
void walk(const Problem& p, int64_t k, const int32_t* order, int64_t i_begin, int64_t i_end,
          int64_t l_begin, int64_t l_end, int32_t* node, int32_t* path, float* acts) {
  const int64_t offset = k * p.per_tree(), levels = p.levels();
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kGroup) {
    const int g_count = static_cast<int>(std::min<int64_t>(kGroup, i_end - i0));
    int64_t t[kGroup];
    const float* xs[kGroup];
    for (int g = 0; g < kGroup; ++g) {
      const int64_t i = i0 + std::min(g, g_count - 1);  // pad a short group with its last token
      t[g] = order ? order[i] : i;
      xs[g] = p.x + t[g] * p.h;
    }
    for (int64_t l = l_begin; l < l_end; ++l) {
      const float* rows[kGroup];
      for (int g = 0; g < kGroup; ++g) rows[g] = p.w_in + (offset + node[t[g]]) * p.h;
      float z[kGroup];
      dots<kGroup>(xs, rows, p.h, z);
      for (int g = 0; g < g_count; ++g) {
        const int64_t flat = offset + node[t[g]];
        z[g] += p.b_in[flat];
        path[t[g] * levels + l] = static_cast<int32_t>(flat);
        node[t[g]] = 2 * node[t[g]] + 1 + (z[g] > 0.0f ? 1 : 0);
      }
      gelu_inplace(z, g_count);  // the group's GELUs as one vector
      for (int g = 0; g < g_count; ++g) acts[t[g] * levels + l] = z[g];
    }
  }
}

// Walks every level of trees [k0, k0 + g_count) (g_count <= kTreeGroup) for tokens [i_begin, i_end),
// one token at a time with its trees side by side: their rows against the token's x, which is loaded
// once for all of them. path/acts[t * stride + g * levels + l] receive tree k0 + g's flat node index
// and logit at level l (gelu_inplace turns the logits into activations).
void walk_trees(const Problem& p, int64_t k0, int g_count, int64_t i_begin, int64_t i_end, int64_t stride,
                int32_t* path, float* acts) {
  const int64_t levels = p.levels(), per_tree = p.per_tree();
  for (int64_t t = i_begin; t < i_end; ++t) {
    const float* x = p.x + t * p.h;
    int64_t node[kTreeGroup] = {};
    int32_t* path_t = path + t * stride;
    float* acts_t = acts + t * stride;
    for (int64_t l = 0; l < levels; ++l) {
      const float* rows[kTreeGroup];
      int64_t flat[kTreeGroup];
      for (int g = 0; g < kTreeGroup; ++g) {
        const int gg = std::min(g, g_count - 1);  // pad a short group with its last tree
        flat[g] = (k0 + gg) * per_tree + node[gg];
        rows[g] = p.w_in + flat[g] * p.h;
      }
      float z[kTreeGroup];
      dots_shared<kTreeGroup>(x, rows, p.h, z);
      for (int g = 0; g < g_count; ++g) {
        const float logit = z[g] + p.b_in[flat[g]];
        path_t[g * levels + l] = static_cast<int32_t>(flat[g]);
        acts_t[g * levels + l] = logit;  // gelu by the caller, 16 lanes at a time
        node[g] = 2 * node[g] + 1 + (logit > 0.0f ? 1 : 0);
      }
    }
  }
}

// y[t] (+)= sum_l acts[t, l] * w_out[path[t, l]] for tokens order[i], i in [i_begin, i_end):
// 128 output columns at a time held in 8 registers while the token's rows stream past.
// stream_out: store y past the caches (it is not read again soon).
// The token's rows are path/acts[t * stride + r], r < n_rows (at most kTreeGroup * kMaxLevels).
void accumulate(const Problem& p, const int32_t* order, int64_t i_begin, int64_t i_end, int64_t stride,
                int64_t n_rows, const int32_t* path, const float* acts, bool add, bool stream_out) {
  const int64_t levels = n_rows;
  const float* rows[kTreeGroup * kMaxLevels];
  for (int64_t i = i_begin; i < i_end; ++i) {
    const int64_t t = order ? order[i] : i;
    const float* a = acts + t * stride;
    for (int64_t l = 0; l < levels; ++l) rows[l] = p.w_out + int64_t{path[t * stride + l]} * p.h_out;
    float* y = p.y + t * p.h_out;
    // Not read again here: stream it past the caches, which hold the weights.
    const bool stream = stream_out && reinterpret_cast<uintptr_t>(y) % 64 == 0;
    int64_t c = 0;
    for (; c + 128 <= p.h_out; c += 128) {
      v16 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = add ? load16(y + c + 16 * j) : v16{};
      for (int64_t l = 0; l < levels; ++l) {
        const float* r = rows[l] + c;
        const float s = a[l];
        for (int j = 0; j < 8; ++j) acc[j] += s * load16(r + 16 * j);
      }
      if (stream) {
        for (int j = 0; j < 8; ++j) stream16(y + c + 16 * j, acc[j]);
      } else {
        for (int j = 0; j < 8; ++j) store16(y + c + 16 * j, acc[j]);
      }
    }
    for (; c + 16 <= p.h_out; c += 16) {
      v16 acc = add ? load16(y + c) : v16{};
      for (int64_t l = 0; l < levels; ++l) acc += a[l] * load16(rows[l] + c);
      store16(y + c, acc);
    }
    for (; c < p.h_out; ++c) {
      float s = add ? y[c] : 0.0f;
      for (int64_t l = 0; l < levels; ++l) s += a[l] * rows[l][c];
      y[c] = s;
    }
  }
}

// Threads for `items` units of work, each thread taking at least `per_thread` of them: below that,
// starting a thread costs more than it saves (tens of microseconds; on a busy machine a new thread
// may wait milliseconds for a core). FFFJAX_CPU_THREADS=n asks for n threads (each still gets at
// least `forced_min` items).
int thread_count(int64_t items, int64_t per_thread, int64_t forced_min) {
  if (const char* env = std::getenv("FFFJAX_CPU_THREADS")) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::atoi(env), items / forced_min)));
  }
  // One thread: skip the core count, whose lookup (/sys reads, a syscall) costs microseconds, as
  // much as a small call's work.
  if (items < 2 * per_thread) return 1;
  int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
  cpu_set_t allowed;  // honour taskset / cgroup CPU affinity
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) n = CPU_COUNT(&allowed);
#endif
  n = std::max(1, n);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, items / per_thread)));
}

// FFF-v2 tokens per thread: a 1x11 layer over H = 768 takes ~2 us a token on one thread, so 512
// tokens (~1 ms) repay a second thread; the 128 tokens of one sequence do not.
constexpr int64_t kTokensPerThread = 512;
// One full group of trees walked side by side: from there the block order is at least as fast as the tree
// order at H 384 and 768, while with 4 trees the tree order's sort wins (experiments/results/cpu_tree_order.md).
constexpr int64_t kBlockOrderMinTrees = kTreeGroup;

// Runs fn(i_begin, i_end) over [0, n) in blocks of `block` handed out on demand to `threads`
// threads (the caller's included): on a shared machine a descheduled thread does not hold the
// others up, which a fixed split into equal parts would.
template <typename F>
void parallel_for(int threads, int64_t n, int64_t block, F fn) {
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t b = next.fetch_add(block); b < n; b = next.fetch_add(block)) {
      fn(b, std::min(n, b + block));
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

// Tokens ordered by their node at the top of the sorted levels (counting sort), so that tokens
// sharing a subtree run back to back and its rows of w_in and w_out are read from memory once.
// Returns false (identity order) when there are too many subtrees for sorting to pay.
bool order_by_node(const int32_t* node, int64_t tokens, int64_t level, std::vector<int32_t>& order,
                   std::vector<int32_t>& counts) {
  const int64_t first = (int64_t{1} << level) - 1, buckets = int64_t{1} << level;
  if (level == 0 || buckets > 4 * tokens) return false;
  counts.assign(buckets + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) ++counts[node[t] - first + 1];
  for (int64_t b = 0; b < buckets; ++b) counts[b + 1] += counts[b];
  order.resize(tokens);
  for (int64_t t = 0; t < tokens; ++t) order[counts[node[t] - first]++] = static_cast<int32_t>(t);
  return true;
}

void run(const Problem& p) {
  const int64_t levels = p.levels();
  const int64_t top = std::max<int64_t>(0, levels - kSortedLevels);
  const int threads = thread_count(p.tokens, kTokensPerThread, 64);
  // FFFJAX_CPU_SORT=0 walks every level in token order (for measuring what the sort buys).
  const char* sort_env = std::getenv("FFFJAX_CPU_SORT");
  const bool sort = !(sort_env && std::atoi(sort_env) == 0);
  // Scratch reused across calls (thread_local: no fresh pages to fault in on every call).
  const char* order_env = std::getenv("FFFJAX_CPU_TREE_ORDER");
  const bool block_order = p.n_trees > 1 && threads > 1 &&
                           (order_env ? std::atoi(order_env) == 0 : p.n_trees >= kBlockOrderMinTrees);
  const int64_t stride = block_order ? kTreeGroup * levels : levels;
  thread_local std::vector<int32_t> node, path, order, counts;
  thread_local std::vector<float> acts;
  node.resize(p.tokens);
  path.resize(p.tokens * stride);
  acts.resize(p.tokens * stride);
  // Plain pointers: inside the worker threads the thread_local names would be other objects.
  int32_t* node_p = node.data();
  int32_t* path_p = path.data();
  float* acts_p = acts.data();
  // Several trees on several threads: each block of kBlock tokens goes through every tree, kTreeGroup
  // trees side by side (walk_trees), before the next block. Threads start once per call (not twice per
  // tree, which on a busy machine costs more than the work), a tree's rows are reused by the block's
  // tokens, and the block's outputs stay in cache across its trees; the subtree sort is given up, which
  // costs deep trees more than the thread starts save when they are few (4x9), so the block order is
  // taken from kBlockOrderMinTrees trees (experiments/results/cpu_tree_order.md). On one thread the trees
  // run one after the other over all tokens, sorted. FFFJAX_CPU_TREE_ORDER=0 / =1 forces the block /
  // tree order (for measuring the choice).
  if (block_order) {
    parallel_for(threads, p.tokens, kBlock, [&](int64_t b, int64_t e) {
      for (int64_t k0 = 0; k0 < p.n_trees; k0 += kTreeGroup) {
        const int g_count = static_cast<int>(std::min<int64_t>(kTreeGroup, p.n_trees - k0));
        for (int64_t c = b; c < e; c += kChunk) {
          const int64_t ce = std::min(e, c + kChunk);
          walk_trees(p, k0, g_count, c, ce, stride, path_p, acts_p);
          gelu_inplace(acts_p + c * stride, (ce - c) * stride);
          accumulate(p, nullptr, c, ce, stride, g_count * levels, path_p, acts_p, k0 > 0,
                     k0 + kTreeGroup >= p.n_trees);
        }
      }
#if defined(__x86_64__)
      __builtin_ia32_sfence();
#endif
    });
    return;
  }
  for (int64_t k = 0; k < p.n_trees; ++k) {
    std::fill(node_p, node_p + p.tokens, 0);
    parallel_for(threads, p.tokens, kBlock, [&](int64_t b, int64_t e) {
      walk(p, k, nullptr, b, e, 0, top, node_p, path_p, acts_p);
    });
    const int32_t* ord =
        sort && order_by_node(node_p, p.tokens, top, order, counts) ? order.data() : nullptr;
    parallel_for(threads, p.tokens, kBlock, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; c += kChunk) {
        const int64_t ce = std::min(e, c + kChunk);
        walk(p, k, ord, c, ce, top, levels, node_p, path_p, acts_p);
        accumulate(p, ord, c, ce, levels, levels, path_p, acts_p, k > 0, k == 0);
      }
#if defined(__x86_64__)
      __builtin_ia32_sfence();  // order the streamed stores before the thread reports done
#endif
    });
  }
}

ffi::Error FffV2HardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_in,
                         ffi::Buffer<ffi::F32> b_in, ffi::Buffer<ffi::F32> w_out,
                         ffi::ResultBuffer<ffi::F32> y, int64_t depth, int64_t n_trees) {
  if (x.dimensions().size() != 2 || w_in.dimensions().size() != 2 ||
      w_out.dimensions().size() != 2 || b_in.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("fffjax_v2_hard: x, w_in, w_out must be 2-D and b_in 1-D");
  }
  const int64_t tokens = x.dimensions()[0];
  const int64_t h = x.dimensions()[1];
  const int64_t h_out = w_out.dimensions()[1];
  if (depth < 0 || depth + 1 > kMaxLevels || n_trees < 1) {
    return ffi::Error::InvalidArgument("fffjax_v2_hard: need 0 <= depth <= 29 and n_trees >= 1");
  }
  const int64_t n = n_trees * ((int64_t{2} << depth) - 1);
  if (n > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("fffjax_v2_hard: more than 2**31 - 1 nodes");
  }
  if (w_in.dimensions()[0] != n || w_in.dimensions()[1] != h || b_in.dimensions()[0] != n ||
      w_out.dimensions()[0] != n) {
    return ffi::Error::InvalidArgument("fffjax_v2_hard: weight shapes do not match depth/n_trees");
  }
  run(Problem{x.typed_data(), w_in.typed_data(), b_in.typed_data(), w_out.typed_data(),
              y->typed_data(), tokens, h, h_out, depth, n_trees});
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------- FFF-v1

typedef float v8 __attribute__((vector_size(32)));

template <typename V>
inline V load_as(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
inline void store_as(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

inline float relu(float v) { return v > 0.0f ? v : 0.0f; }
inline v8 relu(v8 v) { return v > 0.0f ? v : v8{}; }
inline v16 relu(v16 v) { return v > 0.0f ? v : v16{}; }

// outs[g][c] = act(biases[g][c] + sum_i xs[g][i] * mats[g][i * n + c]) for columns c in [c0, c0 + lanes)
// of V (v16, v8 or float): one accumulator per sample, kept in registers over the k rows.
template <typename V, int G>
inline void columns(const float* const* xs, const float* const* mats, const float* const* biases,
                    int64_t k, int64_t n, int64_t c0, bool use_relu, float* const* outs) {
  V acc[G];
  for (int g = 0; g < G; ++g) acc[g] = biases ? load_as<V>(biases[g] + c0) : V{};
  for (int64_t i = 0; i < k; ++i) {
    for (int g = 0; g < G; ++g) acc[g] += xs[g][i] * load_as<V>(mats[g] + i * n + c0);
  }
  for (int g = 0; g < G; ++g) store_as<V>(outs[g] + c0, use_relu ? relu(acc[g]) : acc[g]);
}

#if defined(__AVX512F__)
// The last n - c0 < 16 columns of `columns` with masked loads and stores (no read past a row).
template <int G>
inline void tail_columns(const float* const* xs, const float* const* mats, const float* const* biases,
                         int64_t k, int64_t n, int64_t c0, bool use_relu, float* const* outs) {
  const __mmask16 mask = static_cast<__mmask16>((1u << (n - c0)) - 1u);
  __m512 acc[G];
  for (int g = 0; g < G; ++g) {
    acc[g] = biases ? _mm512_maskz_loadu_ps(mask, biases[g] + c0) : _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    for (int g = 0; g < G; ++g) {
      acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(xs[g][i]), _mm512_maskz_loadu_ps(mask, mats[g] + i * n + c0), acc[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm512_mask_storeu_ps(outs[g] + c0, mask, use_relu ? _mm512_max_ps(acc[g], _mm512_setzero_ps()) : acc[g]);
  }
}

// The whole (k -> n) layer when n divides 16 (n = 1, 2, 4, 8: narrow leaves): one vector holds
// r = 16 / n consecutive rows of the row-major (k, n) matrix, lane l belonging to row l / n and
// column l % n; the matching inputs come from a permutation of 16 loaded x values. Half or fewer
// loads and FMAs than a broadcast per row (the loads bound the row-by-row loop at these widths).
template <int G>
inline void packed_layer(const float* const* xs, const float* const* mats, const float* const* biases,
                         int64_t k, int64_t n, bool use_relu, float* const* outs) {
  const int64_t r = 16 / n, flat = k * n;
  __m512i idx[16];  // chunk c of an x block reads x[c * r + l / n] in lane l
  for (int64_t c = 0; c < n; ++c) {
    int32_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = static_cast<int32_t>(c * r + l / n);
    idx[c] = _mm512_loadu_si512(lanes);
  }
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < k; i0 += 16) {
    const int64_t rows_left = std::min<int64_t>(16, k - i0);
    const __mmask16 x_mask = rows_left == 16 ? 0xFFFF : static_cast<__mmask16>((1u << rows_left) - 1u);
    __m512 xv[G];
    for (int g = 0; g < G; ++g) xv[g] = _mm512_maskz_loadu_ps(x_mask, xs[g] + i0);
    for (int64_t c = 0; c * r < rows_left; ++c) {
      const int64_t start = (i0 + c * r) * n, left = flat - start;
      const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
      for (int g = 0; g < G; ++g) {
        acc[g] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx[c], xv[g]), _mm512_maskz_loadu_ps(m, mats[g] + start),
                                 acc[g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    float lanes[16];
    _mm512_storeu_ps(lanes, acc[g]);
    for (int64_t c = 0; c < n; ++c) {
      float sum = biases ? biases[g][c] : 0.0f;
      for (int64_t l = c; l < 16; l += n) sum += lanes[l];
      outs[g][c] = use_relu ? relu(sum) : sum;
    }
  }
}
#endif

// The (k -> n) layer for G samples, each with its own (k, n) matrix: 16 columns at a time, then the
// rest (masked with AVX-512, else 8 then one at a time).
template <int G>
void layer(const float* const* xs, const float* const* mats, const float* const* biases, int64_t k,
           int64_t n, bool use_relu, float* const* outs) {
#if defined(__AVX512F__)
  if (n < 16 && 16 % n == 0) {
    packed_layer<G>(xs, mats, biases, k, n, use_relu, outs);
    return;
  }
#endif
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) columns<v16, G>(xs, mats, biases, k, n, c, use_relu, outs);
#if defined(__AVX512F__)
  if (c < n) tail_columns<G>(xs, mats, biases, k, n, c, use_relu, outs);
#else
  for (; c + 8 <= n; c += 8) columns<v8, G>(xs, mats, biases, k, n, c, use_relu, outs);
  for (; c < n; ++c) columns<float, G>(xs, mats, biases, k, n, c, use_relu, outs);
#endif
}

// x . row for G samples, each against its own row; the 16 lanes are summed as a tree (the descent
// waits on each level's sum, so its latency counts).
template <int G>
inline void logits(const float* const* xs, const float* const* rows, int64_t h, float* out) {
  v16 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = v16{};
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    for (int g = 0; g < G; ++g) acc[g] += load16(xs[g] + i) * load16(rows[g] + i);
  }
  for (int g = 0; g < G; ++g) {
    v8 s8 = v8{acc[g][0], acc[g][1], acc[g][2], acc[g][3], acc[g][4], acc[g][5], acc[g][6], acc[g][7]} +
            v8{acc[g][8], acc[g][9], acc[g][10], acc[g][11], acc[g][12], acc[g][13], acc[g][14], acc[g][15]};
    const float s4[4] = {s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]};
    float s = (s4[0] + s4[2]) + (s4[1] + s4[3]);
    for (int64_t j = i; j < h; ++j) s += xs[g][j] * rows[g][j];
    out[g] = s;
  }
}

// Samples interleaved per group: 16 measured 8% faster than 8 and 25% faster than 4 on the digits
// demo (Zen 4, AVX-512); without AVX-512 a v16 takes two of the 16 ymm registers.
#if defined(__AVX512F__)
constexpr int kGroupV1 = 16;
#else
constexpr int kGroupV1 = 8;
#endif

struct ProblemV1 {
  const float* x;
  const float* node_weights;
  const float* node_biases;
  const float* w1s;
  const float* b1s;
  const float* w2s;
  const float* b2s;  // null: no leaf output bias
  float* y;
  int64_t samples, din, width, dout, depth;
  bool use_gelu;  // leaf hidden activation: exact GELU, else ReLU
};

// Samples [begin, end) in groups of kGroupV1 (a short group is padded with its last sample, which
// then writes the same values twice). hidden holds kGroupV1 * width floats.
void v1_samples(const ProblemV1& p, int64_t begin, int64_t end, float* hidden) {
  const int64_t first_leaf = (int64_t{1} << p.depth) - 1;
  for (int64_t s0 = begin; s0 < end; s0 += kGroupV1) {
    const int g_count = static_cast<int>(std::min<int64_t>(kGroupV1, end - s0));
    const float* xs[kGroupV1];
    float* ys[kGroupV1];
    int64_t node[kGroupV1];
    for (int g = 0; g < kGroupV1; ++g) {
      const int64_t s = s0 + std::min(g, g_count - 1);
      xs[g] = p.x + s * p.din;
      ys[g] = p.y + s * p.dout;
      node[g] = 0;
    }
    for (int64_t l = 0; l < p.depth; ++l) {
      const float* rows[kGroupV1];
      for (int g = 0; g < kGroupV1; ++g) rows[g] = p.node_weights + node[g] * p.din;
      float z[kGroupV1];
      logits<kGroupV1>(xs, rows, p.din, z);
      for (int g = 0; g < kGroupV1; ++g) {
        node[g] = 2 * node[g] + 1 + (z[g] + p.node_biases[node[g]] >= 0.0f ? 1 : 0);
      }
    }
    const float* w1[kGroupV1];
    const float* b1[kGroupV1];
    const float* w2[kGroupV1];
    const float* b2[kGroupV1];
    const float* hs[kGroupV1];
    float* hidden_out[kGroupV1];
    for (int g = 0; g < kGroupV1; ++g) {
      const int64_t leaf = node[g] - first_leaf;
      w1[g] = p.w1s + leaf * p.din * p.width;
      b1[g] = p.b1s + leaf * p.width;
      w2[g] = p.w2s + leaf * p.width * p.dout;
      b2[g] = p.b2s ? p.b2s + leaf * p.dout : nullptr;
      hs[g] = hidden_out[g] = hidden + g * p.width;
    }
    layer<kGroupV1>(xs, w1, b1, p.din, p.width, !p.use_gelu, hidden_out);
    if (p.use_gelu) {
      gelu_inplace(hidden, kGroupV1 * p.width);
    }
    layer<kGroupV1>(hs, w2, p.b2s ? b2 : nullptr, p.width, p.dout, false, ys);
  }
}

void run_v1(const ProblemV1& p) {
  // A v1 sample at the package's sizes costs a few hundred to a few thousand multiply-adds: 2048
  // samples per thread (the digits demo's 450 run on one thread).
  const int threads = thread_count(p.samples, 2048, 64);
  parallel_for(threads, p.samples, kBlock, [&](int64_t b, int64_t e) {
    std::vector<float> hidden(kGroupV1 * p.width);
    v1_samples(p, b, e, hidden.data());
  });
}

ffi::Error FffV1HardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> node_weights,
                         ffi::Buffer<ffi::F32> node_biases, ffi::Buffer<ffi::F32> w1s,
                         ffi::Buffer<ffi::F32> b1s, ffi::Buffer<ffi::F32> w2s,
                         ffi::Buffer<ffi::F32> b2s, ffi::ResultBuffer<ffi::F32> y, int64_t depth,
                         int64_t leaf_output_bias, int64_t activation) {
  if (x.dimensions().size() != 2 || node_weights.dimensions().size() != 2 ||
      node_biases.dimensions().size() != 1 || w1s.dimensions().size() != 3 ||
      b1s.dimensions().size() != 2 || w2s.dimensions().size() != 3 || b2s.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(
        "fffjax_v1_hard: x, node_weights, b1s, b2s must be 2-D, node_biases 1-D, w1s and w2s 3-D");
  }
  if (depth < 0 || depth > kMaxLevels) {
    return ffi::Error::InvalidArgument("fffjax_v1_hard: need 0 <= depth <= 30");
  }
  if (activation != 0 && activation != 1) {
    return ffi::Error::InvalidArgument("fffjax_v1_hard: activation must be 0 (ReLU) or 1 (exact GELU)");
  }
  const int64_t samples = x.dimensions()[0], din = x.dimensions()[1];
  const int64_t width = w1s.dimensions()[2], dout = w2s.dimensions()[2];
  const int64_t leaves = int64_t{1} << depth, nodes = leaves - 1;
  if (node_weights.dimensions()[0] != nodes || node_weights.dimensions()[1] != din ||
      node_biases.dimensions()[0] != nodes || w1s.dimensions()[0] != leaves ||
      w1s.dimensions()[1] != din || b1s.dimensions()[0] != leaves || b1s.dimensions()[1] != width ||
      w2s.dimensions()[0] != leaves || w2s.dimensions()[1] != width ||
      b2s.dimensions()[0] != leaves || b2s.dimensions()[1] != dout) {
    return ffi::Error::InvalidArgument("fffjax_v1_hard: weight shapes do not match x and depth");
  }
  run_v1(ProblemV1{x.typed_data(), node_weights.typed_data(), node_biases.typed_data(),
                   w1s.typed_data(), b1s.typed_data(), w2s.typed_data(),
                   leaf_output_bias ? b2s.typed_data() : nullptr, y->typed_data(), samples, din,
                   width, dout, depth, activation == 1});
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------- attention

// exp(x) for x <= 88 (0 below -87.3): 2^n * exp(r) with n = round(x / ln 2) and
// r = x - n ln 2 (ln 2 in two parts) in [-ln2/2, ln2/2], exp(r) by Cephes' degree-6 polynomial (about
// 1 ulp in float32).
inline v16 exp16(v16 x) {
  typedef int32_t v16i __attribute__((vector_size(64)));
  const v16 small = x < -87.3f ? v16{} + 1.0f : v16{};  // lanes whose exp underflows to 0
  x = x < -87.3f ? v16{} - 87.3f : x;
  x = x > 88.0f ? v16{} + 88.0f : x;
  const v16 shifter = v16{} + 12582912.0f;  // 1.5 * 2**23: adding it rounds to an integer
  const v16 t = x * 1.44269504088896341f + shifter;
  const v16 n = t - shifter;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 poly = v16{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return small != 0.0f ? v16{} : poly * scale;
}

// out[r][c] (+)= sum_i a[r][i] * b[i * ldb + c] for R rows and columns c in [c0, c0 + 16 * NV): the
// R x NV accumulators stay in registers while the k rows of b stream past (each loaded vector of b
// serves R rows, each broadcast element of a row serves NV vectors).
template <int R, int NV>
inline void row_block(const float* const* a, const float* b, int64_t ldb, int64_t k, int64_t c0,
                      float* const* out) {
  v16 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NV; ++j) acc[r][j] = v16{};
  }
  for (int64_t i = 0; i < k; ++i) {
    v16 bv[NV];
    for (int j = 0; j < NV; ++j) {
      bv[j] = load16(b + i * ldb + c0 + 16 * j);
#if defined(__AVX512F__)
      // Keep the vector in a register: left alone, GCC folds the load into each of the R FMAs that
      // use it, and the loads, not the FMAs, then bound the loop.
      asm("" : "+v"(bv[j]));
#endif
    }
    for (int r = 0; r < R; ++r) {
      const float s = a[r][i];
      for (int j = 0; j < NV; ++j) acc[r][j] += s * bv[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NV; ++j) store16(out[r] + c0 + 16 * j, acc[r][j]);
  }
}

// The (R rows x width) product of row_block over all columns, width a multiple of 16, 64 at a time.
template <int R>
inline void row_product(const float* const* a, const float* b, int64_t ldb, int64_t k, int64_t width,
                        float* const* out) {
  int64_t c = 0;
  for (; c + 64 <= width; c += 64) row_block<R, 4>(a, b, ldb, k, c, out);
  switch ((width - c) / 16) {
    case 3: row_block<R, 3>(a, b, ldb, k, c, out); break;
    case 2: row_block<R, 2>(a, b, ldb, k, c, out); break;
    case 1: row_block<R, 1>(a, b, ldb, k, c, out); break;
    default: break;
  }
}

// Query rows per block: 4 rows x 4 vectors = 16 accumulators of the 32 AVX-512 registers.
constexpr int kQueryRows = 4;

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

struct AttentionProblem {
  const float* qkv;       // (batch, seq, 3 * heads * d), head n's q, k, v at columns 3dn + [0, d), [d, 2d), [2d, 3d)
  const float* key_bias;  // (batch, seq)
  float* out;             // (batch, seq, heads * d)
  int64_t batch, seq, heads, d;
  float scale;
};

// Scratch of one thread: K transposed (d, seq16), V (seq, d16), the key bias of the current sequence
// (seq16, -inf beyond seq) and the probabilities and context of a block of query rows; zero beyond
// seq and d.
struct AttentionScratch {
  std::vector<float> kt, v, bias, probs, ctx;
  AttentionScratch(const AttentionProblem& p)
      : kt(p.d * round16(p.seq)), v(p.seq * round16(p.d)),
        bias(round16(p.seq), -std::numeric_limits<float>::infinity()), probs(kQueryRows * round16(p.seq)),
        ctx(kQueryRows * round16(p.d)) {}
};

inline float hmax(v16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

// row = row * scale + bias over seq16 lanes, both steps rounded as XLA rounds them: compiled without
// fused multiply-adds, since beside a bias of -10000 (a padded key) one rounding less moves the sum
// by up to 1e-3, which a fully padded sequence's softmax would show. Returns the largest sum.
__attribute__((optimize("fp-contract=off"))) float scale_and_bias(float* row, const float* bias, int64_t seq16,
                                                                   float scale) {
  v16 max = v16{} - std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < seq16; t += 16) {
    const v16 s = load16(row + t) * scale + load16(bias + t);
    store16(row + t, s);
    max = s > max ? s : max;
  }
  return hmax(max);
}

// Softmax of one row of seq16 scores in place: s = score * scale + bias (bias -inf in the padding
// lanes, which become 0), then exp(s - max) / sum.
void softmax_row(float* row, const float* bias, int64_t seq16, float scale) {
  const float max = scale_and_bias(row, bias, seq16, scale);
  v16 sum = v16{};
  for (int64_t t = 0; t < seq16; t += 16) {
    const v16 e = exp16(load16(row + t) - max);
    store16(row + t, e);
    sum += e;
  }
  const float inv = 1.0f / hsum(sum);
  for (int64_t t = 0; t < seq16; t += 16) store16(row + t, load16(row + t) * inv);
}

// Attention of one (sequence b, head n): K and V gathered into the scratch, then kQueryRows query
// rows at a time: scores against every key, softmax, the weighted sum of V rows.
void attention_head(const AttentionProblem& p, int64_t b, int64_t n, AttentionScratch& s) {
  const int64_t seq = p.seq, d = p.d, seq16 = round16(seq), d16 = round16(d);
  const int64_t row_stride = 3 * p.heads * d;
  const float* base = p.qkv + b * seq * row_stride + 3 * d * n;
  constexpr int64_t kAhead = 8;  // rows 9 KB apart (base): the hardware prefetchers do not follow
  for (int64_t t = 0; t < seq; ++t) {
    if (t + kAhead < seq) {
      const char* next = reinterpret_cast<const char*>(base + (t + kAhead) * row_stride + d);
      for (int64_t byte = 0; byte < int64_t{2} * d * int64_t{sizeof(float)}; byte += 64) {
        __builtin_prefetch(next + byte);
      }
    }
    const float* k = base + t * row_stride + d;
    const float* v = k + d;
    for (int64_t i = 0; i < d; ++i) s.kt[i * seq16 + t] = k[i];
    std::memcpy(s.v.data() + t * d16, v, d * sizeof(float));
  }
  std::memcpy(s.bias.data(), p.key_bias + b * seq, seq * sizeof(float));
  for (int64_t q0 = 0; q0 < seq; q0 += kQueryRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kQueryRows, seq - q0));
    const float* qs[kQueryRows];
    const float* ps[kQueryRows];
    float* prob_rows[kQueryRows];
    float* ctx_rows[kQueryRows];
    for (int r = 0; r < kQueryRows; ++r) {
      qs[r] = base + (q0 + std::min(r, rows - 1)) * row_stride;  // a short block repeats its last row
      prob_rows[r] = s.probs.data() + r * seq16;
      ps[r] = prob_rows[r];
      ctx_rows[r] = s.ctx.data() + r * d16;
    }
    row_product<kQueryRows>(qs, s.kt.data(), seq16, d, seq16, prob_rows);
    for (int r = 0; r < rows; ++r) softmax_row(prob_rows[r], s.bias.data(), seq16, p.scale);
    row_product<kQueryRows>(ps, s.v.data(), d16, seq, d16, ctx_rows);
    for (int r = 0; r < rows; ++r) {
      std::memcpy(p.out + ((b * seq + q0 + r) * p.heads + n) * d, ctx_rows[r], d * sizeof(float));
    }
  }
}

// Multiply-adds per thread below which a second thread does not pay (about 0.1 ms of work).
constexpr int64_t kAttentionWorkPerThread = int64_t{1} << 22;

void run_attention(const AttentionProblem& p) {
  const int64_t units = p.batch * p.heads;
  const int64_t work_per_unit = 2 * p.seq * p.seq * p.d;
  const int threads = units == 0 ? 1 : thread_count(units * work_per_unit, kAttentionWorkPerThread, work_per_unit);
  parallel_for(threads, units, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch scratch(p);
    for (int64_t u = begin; u < end; ++u) attention_head(p, u / p.heads, u % p.heads, scratch);
  });
}

ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> key_bias,
                         ffi::ResultBuffer<ffi::F32> out, int64_t num_heads, float scale) {
  if (qkv.dimensions().size() != 3 || key_bias.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("fffjax_attention: qkv must be 3-D and key_bias 2-D");
  }
  const int64_t batch = qkv.dimensions()[0], seq = qkv.dimensions()[1], three_h = qkv.dimensions()[2];
  if (num_heads < 1 || three_h % (3 * num_heads) != 0) {
    return ffi::Error::InvalidArgument("fffjax_attention: 3 * num_heads must divide qkv's last axis");
  }
  if (key_bias.dimensions()[0] != batch || key_bias.dimensions()[1] != seq) {
    return ffi::Error::InvalidArgument("fffjax_attention: key_bias must have shape (batch, seq)");
  }
  run_attention(AttentionProblem{qkv.typed_data(), key_bias.typed_data(), out->typed_data(), batch, seq,
                                 num_heads, three_h / (3 * num_heads), scale});
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------- cached attention

struct CachedAttentionProblem {
  const float* q;         // (batch, queries, heads, d)
  const float* k;         // (batch, slots, heads, d)
  const float* v;         // (batch, slots, heads, d)
  const float* key_bias;  // (batch, slots)
  float* out;             // (batch, queries, heads * d)
  int64_t batch, queries, slots, heads, d;
  float scale;
};

inline float dot_row(const float* a, const float* b, int64_t n) {
  v16 acc = v16{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Queries of one (sequence b, head n) over its cache: scores against every slot's key (rows read in
// place, heads * d apart), the softmax of attention_head, then the probability-weighted sum of the
// value rows. Decoding asks one query per row: a matrix-vector product, bound by reading the cache.
void cached_attention_head(const CachedAttentionProblem& p, int64_t b, int64_t n, std::vector<float>& scores,
                           std::vector<float>& bias, std::vector<float>& ctx) {
  const int64_t slots16 = round16(p.slots), d = p.d, row = p.heads * d;
  const float* k = p.k + b * p.slots * row + n * d;
  const float* v = p.v + b * p.slots * row + n * d;
  std::memcpy(bias.data(), p.key_bias + b * p.slots, p.slots * sizeof(float));
  for (int64_t qi = 0; qi < p.queries; ++qi) {
    const float* q = p.q + (b * p.queries + qi) * row + n * d;
    for (int64_t t = 0; t < p.slots; ++t) scores[t] = dot_row(q, k + t * row, d);
    softmax_row(scores.data(), bias.data(), slots16, p.scale);
    std::fill(ctx.begin(), ctx.end(), 0.0f);
    for (int64_t t = 0; t < p.slots; ++t) {
      const float w = scores[t];
      const float* vt = v + t * row;
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) store16(ctx.data() + i, load16(ctx.data() + i) + w * load16(vt + i));
      for (; i < d; ++i) ctx[i] += w * vt[i];
    }
    std::memcpy(p.out + (b * p.queries + qi) * row + n * d, ctx.data(), d * sizeof(float));
  }
}

void run_cached_attention(const CachedAttentionProblem& p) {
  const int64_t units = p.batch * p.heads;
  const int64_t work_per_unit = std::max<int64_t>(1, 2 * p.queries * p.slots * p.d);
  const int threads = units == 0 ? 1 : thread_count(units * work_per_unit, kAttentionWorkPerThread, work_per_unit);
  parallel_for(threads, units, 1, [&](int64_t begin, int64_t end) {
    // Scores and bias padded to 16 lanes: -inf bias beyond the slots makes them 0 in the softmax.
    std::vector<float> scores(round16(p.slots), 0.0f), ctx(round16(p.d), 0.0f);
    std::vector<float> bias(round16(p.slots), -std::numeric_limits<float>::infinity());
    for (int64_t u = begin; u < end; ++u) cached_attention_head(p, u / p.heads, u % p.heads, scores, bias, ctx);
  });
}

ffi::Error CachedAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::F32> key_bias, ffi::ResultBuffer<ffi::F32> out, float scale) {
  if (q.dimensions().size() != 4 || k.dimensions().size() != 4 || v.dimensions().size() != 4 ||
      key_bias.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("fffjax_cached_attention: q, k, v must be 4-D and key_bias 2-D");
  }
  const int64_t batch = q.dimensions()[0], queries = q.dimensions()[1], heads = q.dimensions()[2],
                d = q.dimensions()[3], slots = k.dimensions()[1];
  for (const auto& kv : {k.dimensions(), v.dimensions()}) {
    if (kv[0] != batch || kv[1] != slots || kv[2] != heads || kv[3] != d) {
      return ffi::Error::InvalidArgument("fffjax_cached_attention: k and v must have shape (batch, slots, heads, d)");
    }
  }
  if (key_bias.dimensions()[0] != batch || key_bias.dimensions()[1] != slots) {
    return ffi::Error::InvalidArgument("fffjax_cached_attention: key_bias must have shape (batch, slots)");
  }
  run_cached_attention(CachedAttentionProblem{q.typed_data(), k.typed_data(), v.typed_data(), key_bias.typed_data(),
                                              out->typed_data(), batch, queries, slots, heads, d, scale});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FffV2HardF32, FffV2HardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("n_trees"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FffV1HardF32, FffV1HardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("leaf_output_bias")
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionF32, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CachedAttentionF32, CachedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
