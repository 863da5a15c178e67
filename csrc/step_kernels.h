// The decode step's kernels, written once over a float vector `V` (simd.h) and instantiated per level in
// kernels_avx2.cpp and kernels_avx512.cpp: packed products, exp and SiLU, one attention head, and the vocabulary
// screen's scan and bfloat16 products. The plain C++ versions of the generic level are in isa.cpp.
//
// Why vectorised by hand: the build targets plain x86-64 (4 floats, no FMA), so no loop here vectorises by itself
// beyond SSE, and libm's expf is a call per element. A prefill of 64 chunks of the small benchmark shape runs ~180 K
// SiLUs; one at a time they took about 0.9 ms of its 9 ms.
//
// Same bits at every width: the packed products (one float32 sum per output over the inputs in order, fused
// multiply-adds), exp, SiLU, axpy, the scan and the widened screen products compute each lane in the same order of
// float32 operations at AVX2 and AVX-512. Only the dot products' partial sums (kLanes of them, then their total)
// depend on the width.
//
// exp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts so n ln2 is exact enough), e^r by its degree-7
// Taylor polynomial (truncation below 2^-27 relative on that range), then scaled by 2^n. Within 2 ulp of the correctly
// rounded exp for every float (tests/engine/test_cpu_kernels.py sweeps it against float64); inf past ~88.7, 0 below
// ~-103.3, NaN stays NaN.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "bf16_products.h"
#include "isa.h"
#include "packed_linear.h"
#include "simd.h"
#include "vocab_screen.h"

namespace calm_cpu {
namespace {

// Bytes of weights prefetched ahead of the product. 2 KB kept one core's stream at its ~22 GB/s at 8 rows (512 B to
// 8 KB tried; 1.0 ms against 1.2 ms without, for the small shape's step). At 1-2 rows an input takes a quarter of the
// time, so 8 KB: CALM-M's batch-1 step, whose 0.8 GB of weights come from DRAM, went from 0.96x to 1.04-1.05x the
// sgemm step's speed (benchmarks/cpu_step_ab.py).
constexpr int kPrefetchBytes = 2048, kPrefetchBytesFewRows = 8192;

inline void prefetch_span(const void* p, int bytes) {
  for (int b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T0);
}

// Row r0 of block i when `rows` are split into as few blocks of at most `most` as can be, as evenly as can be: 8 rows
// at most 6 run as 4 + 4, whose 8 accumulator chains each keep both FMA units busy, not as 6 + 2, whose second block
// has 4. Block i covers rows block_start(i) .. block_start(i + 1) - 1.
struct RowBlocks {
  int rows, count;
  RowBlocks(int rows, int most) : rows(rows), count((rows + most - 1) / most) {}
  int start(int i) const { return static_cast<int>(static_cast<int64_t>(i) * rows / count); }
};

// Rows 0..R-1 of x against one packed group (2 kLanes outputs, `cols` of them valid, from column c0 of y).
template <class V, int R>
void packed_tile(const float* w, int in, const float* x, int ldx, float* y, int ldy, int c0, int cols,
                 const float* bias, bool accumulate) {
  using F = typename V::F;
  constexpr int kW = V::kLanes, kStride = 2 * kW;  // floats per input of the group
  constexpr int kAhead = (R <= 2 ? kPrefetchBytesFewRows : kPrefetchBytes) / (kStride * 4);
  F acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V::zero();
  for (int k = 0; k < in; ++k) {
    prefetch_span(w + static_cast<size_t>(k + kAhead) * kStride, kStride * 4);  // a prefetch never faults
    const F w0 = V::load(w + static_cast<size_t>(k) * kStride), w1 = V::load(w + static_cast<size_t>(k) * kStride + kW);
    for (int r = 0; r < R; ++r) {
      const F xb = V::set1(x[static_cast<size_t>(r) * ldx + k]);
      acc[r][0] = V::fmadd(w0, xb, acc[r][0]);
      acc[r][1] = V::fmadd(w1, xb, acc[r][1]);
    }
  }
  for (int h = 0; h < 2 && cols > h * kW; ++h) {
    const int c = c0 + h * kW, n = cols - h * kW;
    const F b = bias ? load_n<V>(bias + c, n) : V::zero();
    for (int r = 0; r < R; ++r) {
      float* dst = y + static_cast<size_t>(r) * ldy + c;
      F v = bias ? V::add(acc[r][h], b) : acc[r][h];
      if (accumulate) v = V::add(v, load_n<V>(dst, n));
      store_n<V>(dst, v, n);
    }
  }
}

// packed_tile at `rows` (1..R) rows
template <class V, int R>
void packed_rows(int rows, const float* w, int in, const float* x, int ldx, float* y, int ldy, int c0, int cols,
                 const float* bias, bool accumulate) {
  if constexpr (R > 1)
    if (rows < R) return packed_rows<V, R - 1>(rows, w, in, x, ldx, y, ldy, c0, cols, bias, accumulate);
  packed_tile<V, R>(w, in, x, ldx, y, ldy, c0, cols, bias, accumulate);
}

// y[:, width g0 .. min(width g1, out)) of y [rows, ldy] = x [rows, ldx] @ W^T + bias (+ y when accumulating), for the
// groups g0..g1-1 of W packed 2 kLanes wide. Each group's weights stay in cache while every block of rows passes over
// them.
template <class V>
void packed_linear(const PackedLinear& w, const float* bias, const float* x, int ldx, int rows, float* y, int ldy,
                   int g0, int g1, bool accumulate) {
  // Many rows (a pool's head samples) run in chunks whose inputs stay in L2 while every group passes over them: with
  // all rows under each group, 1,600 rows of 256 inputs came from L3 once per group.
  constexpr int kRowChunk = 8 * V::kRowBlock;
  for (int q0 = 0; q0 < rows; q0 += kRowChunk) {
    const int chunk = rows - q0 < kRowChunk ? rows - q0 : kRowChunk;
    const float* xq = x + static_cast<size_t>(q0) * ldx;
    float* yq = y + static_cast<size_t>(q0) * ldy;
    for (int g = g0; g < g1; ++g) {
      const int c0 = g * w.width(), cols = w.out() - c0 < w.width() ? w.out() - c0 : w.width();
      const RowBlocks blocks(chunk, V::kRowBlock);
      for (int i = 0; i < blocks.count; ++i) {
        const int r0 = blocks.start(i);
        packed_rows<V, V::kRowBlock>(blocks.start(i + 1) - r0, w.group(g), w.in(), xq + static_cast<size_t>(r0) * ldx,
                                     ldx, yq + static_cast<size_t>(r0) * ldy, ldy, c0, cols, bias, accumulate);
      }
    }
  }
}

template <class V>
typename V::F exp_vec(typename V::F x) {
  using F = typename V::F;
  const F log2e = V::set1(1.44269504088896341f);
  const F ln2_hi = V::set1(0.693145751953125f);  // 12 significant bits: n ln2_hi is exact for |n| < 2^12
  const F ln2_lo = V::set1(1.42860682030941723e-6f);
  // Clamped so that n stays small (scale_pow2 handles the rest); exp of the clamped values is already inf or 0.
  const F xc = V::min(V::max(x, V::set1(-110.0f)), V::set1(100.0f));
  const F n = V::round_nearest(V::mul(xc, log2e));
  F r = V::fnmadd(n, ln2_hi, xc);
  r = V::fnmadd(n, ln2_lo, r);
  F p = V::set1(1.0f / 5040.0f);
  p = V::fmadd(p, r, V::set1(1.0f / 720.0f));
  p = V::fmadd(p, r, V::set1(1.0f / 120.0f));
  p = V::fmadd(p, r, V::set1(1.0f / 24.0f));
  p = V::fmadd(p, r, V::set1(1.0f / 6.0f));
  p = V::fmadd(p, r, V::set1(0.5f));
  p = V::fmadd(p, r, V::set1(1.0f));
  p = V::fmadd(p, r, V::set1(1.0f));
  return V::keep_nan(V::scale_pow2(p, n), x);  // NaN in, NaN out (the clamp would have made it a number)
}

template <class V>
void exp_inplace(float* v, int n) {
  for (int i = 0; i < n; i += V::kLanes) store_n<V>(v + i, exp_vec<V>(load_n<V>(v + i, n - i)), n - i);
}

template <class V>
void silu_mul(const float* g, const float* u, float* out, int n) {
  for (int i = 0; i < n; i += V::kLanes) {
    const typename V::F x = load_n<V>(g + i, n - i);
    typename V::F y = V::div(x, V::add(V::set1(1.0f), exp_vec<V>(V::sub(V::zero(), x))));
    if (u != nullptr) y = V::mul(y, load_n<V>(u + i, n - i));
    store_n<V>(out + i, y, n - i);
  }
}

// sum_i a[i] b[i]: kLanes partial sums, then their total
template <class V>
float dot(const float* a, const float* b, int n) {
  typename V::F acc = V::zero();
  for (int i = 0; i < n; i += V::kLanes) acc = V::fmadd(load_n<V>(a + i, n - i), load_n<V>(b + i, n - i), acc);
  return V::reduce_add(acc);
}

template <class V>
void attend_head(const float* q, const float* keys, const float* values, int length, int d, float scale,
                 float* scores, float* out) {
  float top = -INFINITY;
  for (int t = 0; t < length; ++t) {
    scores[t] = dot<V>(q, keys + static_cast<size_t>(t) * d, d) * scale;
    top = scores[t] > top ? scores[t] : top;
  }
  for (int t = 0; t < length; ++t) scores[t] -= top;
  exp_inplace<V>(scores, length);
  float total = 0.0f;
  for (int t = 0; t < length; ++t) total += scores[t];
  for (int i = 0; i < d; i += V::kLanes) store_n<V>(out + i, V::zero(), d - i);
  for (int t = 0; t < length; ++t) {  // out += p_t v_t, one fused multiply-add per element
    const typename V::F p = V::set1(scores[t] / total);
    const float* v = values + static_cast<size_t>(t) * d;
    for (int i = 0; i < d; i += V::kLanes) store_n<V>(out + i, V::fmadd(p, load_n<V>(v + i, d - i), load_n<V>(out + i, d - i)), d - i);
  }
}

// The scan of vocab_screen.h, in its rounding steps: e * norm, + tiny, then the sum or difference.
template <class V>
float screen_lower_bound(const float* s, const float* norm, float e, int n, float lower) {
  using F = typename V::F;
  const F ev = V::set1(e), tiny = V::set1(kScreenTiny);
  F best = V::set1(lower);
  int c = 0;
  for (; c + V::kLanes <= n; c += V::kLanes)
    best = V::max(best, V::sub(V::load(s + c), V::add(V::mul(ev, V::load(norm + c)), tiny)));
  if (c < n) {
    const typename V::Tail t = V::tail(n - c);
    const F candidate = V::sub(V::load(s + c, t), V::add(V::mul(ev, V::load(norm + c, t)), tiny));
    best = V::select(t, V::max(best, candidate), best);
  }
  return V::reduce_max(best);
}

template <class V>
bool screen_any_candidate(const float* s, const float* norm, float e, int n, float lower) {
  using F = typename V::F;
  const F ev = V::set1(e), tiny = V::set1(kScreenTiny), low = V::set1(lower);
  int c = 0;
  for (; c + V::kLanes <= n; c += V::kLanes)
    if (V::any_ge(V::add(V::load(s + c), V::add(V::mul(ev, V::load(norm + c)), tiny)), low)) return true;
  if (c == n) return false;
  const typename V::Tail t = V::tail(n - c);
  return V::any_ge(V::add(V::load(s + c, t), V::add(V::mul(ev, V::load(norm + c, t)), tiny)), low, t);
}

// scores [R, ldo] (columns 0..cols-1) of rows x (float32 values of bfloat16, row stride ldx, padded to whole pairs)
// against one group of 2 kLanes ids packed as [pairs][ids][2]: each 32-bit lane holds the pair's two weights, whose
// float32 values are the lane shifted left by 16 (the first input) and the lane's high half (the second).
// Products of two bfloat16 values are exact in float32, so each fused multiply-add rounds only the sum.
template <class V, int R>
void widened_group_scores(const uint16_t* w, int pairs, const float* x, int ldx, float* out, int ldo, int cols) {
  using F = typename V::F;
  constexpr int kW = V::kLanes, kPair = 4 * kW;  // uint16 per pair of inputs of the group
  constexpr int kAhead = kPrefetchBytes / (kPair * 2);
  F acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V::zero();
  for (int p = 0; p < pairs; ++p) {
    prefetch_span(w + static_cast<size_t>(p + kAhead) * kPair, kPair * 2);
    const typename V::Bits b0 = V::load_bits(w + static_cast<size_t>(p) * kPair);
    const typename V::Bits b1 = V::load_bits(w + static_cast<size_t>(p) * kPair + 2 * kW);
    const F first0 = V::low_halves(b0), second0 = V::high_halves(b0);
    const F first1 = V::low_halves(b1), second1 = V::high_halves(b1);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + static_cast<size_t>(r) * ldx + 2 * p;
      const F xa = V::set1(xr[0]), xb = V::set1(xr[1]);
      acc[r][0] = V::fmadd(second0, xb, V::fmadd(first0, xa, acc[r][0]));
      acc[r][1] = V::fmadd(second1, xb, V::fmadd(first1, xa, acc[r][1]));
    }
  }
  for (int r = 0; r < R; ++r) {
    store_n<V>(out + static_cast<size_t>(r) * ldo, acc[r][0], cols);
    if (cols > kW) store_n<V>(out + static_cast<size_t>(r) * ldo + kW, acc[r][1], cols - kW);
  }
}

template <class V, int R>
void widened_rows(int rows, const uint16_t* w, int pairs, const float* x, int ldx, float* out, int ldo, int cols) {
  if constexpr (R > 1)
    if (rows < R) return widened_rows<V, R - 1>(rows, w, pairs, x, ldx, out, ldo, cols);
  widened_group_scores<V, R>(w, pairs, x, ldx, out, ldo, cols);
}

// scores [rows, n] = x [rows, 2 pairs] @ W[c0:c0+n]^T from the projection packed in groups of 2 kLanes ids, c0 a
// multiple of the group.
template <class V>
void widened_scores(const PackedBf16Projection& w, const float* x, int rows, int c0, int n, float* scores) {
  const int group = w.group_size(), ldx = 2 * w.pairs();
  for (int c = 0; c < n; c += group) {
    const uint16_t* packed = w.group((c0 + c) / group);
    const int cols = n - c < group ? n - c : group;
    const RowBlocks blocks(rows, V::kScreenRowBlock);
    for (int i = 0; i < blocks.count; ++i) {
      const int r0 = blocks.start(i);
      widened_rows<V, V::kScreenRowBlock>(blocks.start(i + 1) - r0, packed, w.pairs(),
                                          x + static_cast<size_t>(r0) * ldx, ldx,
                                          scores + static_cast<size_t>(r0) * n + c, n, cols);
    }
  }
}

template <class V>
StepKernels make_step_kernels() {
  StepKernels k;
  k.pack_width = 2 * V::kLanes;
  k.packed_linear = &packed_linear<V>;
  k.exp_inplace = &exp_inplace<V>;
  k.silu_mul = &silu_mul<V>;
  k.attend_head = &attend_head<V>;
  k.screen_lower_bound = &screen_lower_bound<V>;
  k.screen_any_candidate = &screen_any_candidate<V>;
  k.screen_group = 2 * V::kLanes;
  k.widened_scores = &widened_scores<V>;
  return k;
}

}  // namespace
}  // namespace calm_cpu
