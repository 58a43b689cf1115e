// FFF-v2 hard forward on the CPU as an XLA FFI custom call (float32).
//
// Per token and tree: walk the D+1 levels, one dot product with the node's w_in row per level
// (logit z = x . w_in[n] + b_in[n], next n = 2n + 1 + (z > 0)), remember (n, gelu(z)); then
// y = sum over trees and levels of gelu(z) * w_out[n]. Only the K*(D+1) rows on the token's paths
// are read. Tokens are processed in small groups so that several independent row streams are in
// flight (hides L2/L3 latency of the gathered rows); tokens are split over threads.
//
// Built by fffjax/ops/cpu_ffi.py with the machine's g++ (-O3 -march=native) at first use.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

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

inline float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// Exact (erf) GELU, as torch nn.GELU() and jax.nn.gelu(approximate=False).
inline float gelu(float z) { return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752f)); }

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

constexpr int kGroup = 4;
// Levels below this many from the bottom are walked in token order; the rest in path order.
constexpr int64_t kSortedLevels = 4;
constexpr int64_t kChunk = 64;

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
        const float logit = z[g] + p.b_in[flat];
        path[t[g] * levels + l] = static_cast<int32_t>(flat);
        acts[t[g] * levels + l] = gelu(logit);
        node[t[g]] = 2 * node[t[g]] + 1 + (logit > 0.0f ? 1 : 0);
      }
    }
  }
}

// y[t] (+)= sum_l acts[t, l] * w_out[path[t, l]] for tokens order[i], i in [i_begin, i_end).
void accumulate(const Problem& p, const int32_t* order, int64_t i_begin, int64_t i_end,
                const int32_t* path, const float* acts, bool add) {
  const int64_t levels = p.levels();
  for (int64_t i = i_begin; i < i_end; ++i) {
    const int64_t t = order ? order[i] : i;
    const int32_t* nodes = path + t * levels;
    const float* a = acts + t * levels;
    float* y = p.y + t * p.h_out;
    int64_t c = 0;
    for (; c + 64 <= p.h_out; c += 64) {
      v16 a0{}, a1{}, a2{}, a3{};
      if (add) {
        a0 = load16(y + c), a1 = load16(y + c + 16), a2 = load16(y + c + 32), a3 = load16(y + c + 48);
      }
      for (int64_t l = 0; l < levels; ++l) {
        const float* r = p.w_out + int64_t{nodes[l]} * p.h_out + c;
        const float s = a[l];
        a0 += s * load16(r);
        a1 += s * load16(r + 16);
        a2 += s * load16(r + 32);
        a3 += s * load16(r + 48);
      }
      store16(y + c, a0);
      store16(y + c + 16, a1);
      store16(y + c + 32, a2);
      store16(y + c + 48, a3);
    }
    for (; c < p.h_out; ++c) {
      float s = add ? y[c] : 0.0f;
      for (int64_t l = 0; l < levels; ++l) s += a[l] * p.w_out[int64_t{nodes[l]} * p.h_out + c];
      y[c] = s;
    }
  }
}

int thread_count(int64_t tokens) {
  int n = static_cast<int>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("FFFJAX_CPU_THREADS")) n = std::atoi(env);
  n = std::max(1, n);
  // Below ~256 tokens per thread, starting threads costs more than it saves.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, tokens / 256)));
}

// Runs fn(i_begin, i_end) over [0, n) split into `threads` contiguous parts.
template <typename F>
void parallel_for(int threads, int64_t n, F fn) {
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (n + threads - 1) / threads;
  for (int i = 1; i < threads; ++i) {
    pool.emplace_back(fn, std::min(n, i * per), std::min(n, (i + 1) * per));
  }
  fn(int64_t{0}, std::min(n, per));
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
  const int threads = thread_count(p.tokens);
  // Scratch reused across calls (thread_local: no fresh pages to fault in on every call).
  thread_local std::vector<int32_t> node, path, order, counts;
  thread_local std::vector<float> acts;
  node.resize(p.tokens);
  path.resize(p.tokens * levels);
  acts.resize(p.tokens * levels);
  // Plain pointers: inside the worker threads the thread_local names would be other objects.
  int32_t* node_p = node.data();
  int32_t* path_p = path.data();
  float* acts_p = acts.data();
  for (int64_t k = 0; k < p.n_trees; ++k) {
    std::fill(node_p, node_p + p.tokens, 0);
    parallel_for(threads, p.tokens, [&](int64_t b, int64_t e) {
      walk(p, k, nullptr, b, e, 0, top, node_p, path_p, acts_p);
    });
    const int32_t* ord = order_by_node(node.data(), p.tokens, top, order, counts) ? order.data() : nullptr;
    parallel_for(threads, p.tokens, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; c += kChunk) {
        const int64_t ce = std::min(e, c + kChunk);
        walk(p, k, ord, c, ce, top, levels, node_p, path_p, acts_p);
        accumulate(p, ord, c, ce, path_p, acts_p, k > 0);
      }
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
  if (depth < 0 || depth > 29 || n_trees < 1) {
    return ffi::Error::InvalidArgument("fffjax_v2_hard: need 0 <= depth <= 29 and n_trees >= 1");
  }
  const int64_t n = n_trees * ((int64_t{2} << depth) - 1);
  if (w_in.dimensions()[0] != n || w_in.dimensions()[1] != h || b_in.dimensions()[0] != n ||
      w_out.dimensions()[0] != n) {
    return ffi::Error::InvalidArgument("fffjax_v2_hard: weight shapes do not match depth/n_trees");
  }
  run(Problem{x.typed_data(), w_in.typed_data(), b_in.typed_data(), w_out.typed_data(),
              y->typed_data(), tokens, h, h_out, depth, n_trees});
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
