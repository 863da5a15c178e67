// PackedLinear: y = x @ W^T (+ bias) in float32 for the few rows of a decode step, from a copy of W packed for
// streaming.
//
// Why: a small model's decode step reads every weight once from far memory (the small benchmark shape holds ~19 MB of
// weights against 2 MB of L2 per core). MKL's small-matrix sgemm reads W [out, in] as many strided rows at once and ran
// the step's products at half the speed it reaches on the same weights warm (benchmarks/RESULTS.md). Packed in groups
// of 32 outputs, each group stored as [in][32], the kernel reads W as one sequential stream, multiplies each 32-wide
// slice by every input row (broadcast) and keeps the sums in registers: bound by memory at a few rows, by arithmetic
// at many.
//
// Numerics: each output is one float32 sum over the inputs in order, with fused multiply-adds, then + bias, then + the
// old y when accumulating. The order does not depend on the row count, on the other rows or on which thread computes
// the group, so a row's result is the same whatever batch it is in.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "vector_math.h"

namespace calm_cpu {

constexpr int kPackWidth = 32;    // outputs per group: two 16-float AVX-512 registers
constexpr int kPackRowBlock = 8;  // input rows per register tile: 16 accumulators, the weights and a broadcast
// Inputs ahead whose weights are prefetched. At 8 rows 16 (2 KB), about the distance that kept one core's stream at
// its ~22 GB/s (4, 8, 16, 32, 64 tried; 1.0 ms against 1.2 ms without, for the small shape's step). At 1-2 rows an
// input takes a quarter of the time, so 64 (8 KB): CALM-M's batch-1 step, whose 0.8 GB of weights come from DRAM,
// went from 0.96x to 1.04-1.05x the sgemm step's speed (benchmarks/cpu_step_ab.py).
constexpr int pack_prefetch(int rows) { return rows <= 2 ? 64 : 16; }

// Whether this CPU runs the AVX-512F kernels (here and in vector_math.h); elsewhere the caller keeps the sgemm.
inline bool avx512_supported() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

// W [out, in] (row-major, as nn.Linear stores it) packed: group g holds outputs 32g..32g+31 as [in][32], the last
// group zero-padded.
class PackedLinear {
 public:
  PackedLinear(const float* weight, int out, int in) : out_(out), in_(in), groups_((out + kPackWidth - 1) / kPackWidth) {
    if (out < 1 || in < 1) throw std::invalid_argument("PackedLinear: empty weight");
    const size_t count = static_cast<size_t>(groups_) * in * kPackWidth;
    data_.reset(static_cast<float*>(std::aligned_alloc(64, ((count * sizeof(float) + 63) / 64) * 64)));
    if (!data_) throw std::bad_alloc();
    float* d = data_.get();
    for (int g = 0; g < groups_; ++g)
      for (int k = 0; k < in; ++k)
        for (int j = 0; j < kPackWidth; ++j) {
          const int o = g * kPackWidth + j;
          d[(static_cast<size_t>(g) * in + k) * kPackWidth + j] = o < out ? weight[static_cast<size_t>(o) * in + k] : 0.0f;
        }
  }
  int out() const { return out_; }
  int in() const { return in_; }
  int groups() const { return groups_; }
  size_t bytes() const { return static_cast<size_t>(groups_) * in_ * kPackWidth * sizeof(float); }
  const float* group(int g) const { return data_.get() + static_cast<size_t>(g) * in_ * kPackWidth; }

 private:
  int out_, in_, groups_;
  std::unique_ptr<float[], AlignedFree> data_;
};

#if defined(__x86_64__)
// Rows r0..r0+R-1 of y, outputs of one group (`cols` of them valid, from column c0): R x 2 accumulators over the
// inputs in order.
template <int R>
__attribute__((target("avx512f"))) inline void packed_tile(const float* w, int in, const float* x, int ldx, float* y,
                                                         int ldy, int c0, int cols, const float* bias, bool accumulate) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int k = 0; k < in; ++k) {
    // Past the end of the weights this reads nothing: a prefetch never faults.
    const char* ahead = reinterpret_cast<const char*>(w + static_cast<size_t>(k + pack_prefetch(R)) * kPackWidth);
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    const __m512 w0 = _mm512_load_ps(w + static_cast<size_t>(k) * kPackWidth);
    const __m512 w1 = _mm512_load_ps(w + static_cast<size_t>(k) * kPackWidth + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[static_cast<size_t>(r) * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(w0, xb, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xb, acc[r][1]);
    }
  }
  const __mmask16 m0 = lanes_mask(cols), m1 = lanes_mask(cols - 16);
  const __mmask16 mask[2] = {m0, m1};
  for (int h = 0; h < 2; ++h) {
    if (mask[h] == 0) continue;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask[h], bias + c0 + 16 * h) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      float* dst = y + static_cast<size_t>(r) * ldy + c0 + 16 * h;
      __m512 v = bias ? _mm512_add_ps(acc[r][h], b) : acc[r][h];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[h], dst));
      _mm512_mask_storeu_ps(dst, mask[h], v);
    }
  }
}
#endif

// y[:, 32 g0 .. min(32 g1, out)) of y [rows, ldy] = x [rows, ldx] @ W^T + bias (+ y when accumulating), for the groups
// g0..g1-1. Each group's weights stay in cache while every block of rows passes over them.
inline void packed_linear(const PackedLinear& w, const float* bias, const float* x, int ldx, int rows, float* y, int ldy,
                          int g0, int g1, bool accumulate) {
#if defined(__x86_64__)
  for (int g = g0; g < g1; ++g) {
    const int c0 = g * kPackWidth, cols = std::min(kPackWidth, w.out() - c0);
    for (int r0 = 0; r0 < rows; r0 += kPackRowBlock) {
      const float* xr = x + static_cast<size_t>(r0) * ldx;
      float* yr = y + static_cast<size_t>(r0) * ldy;
      switch (std::min(kPackRowBlock, rows - r0)) {
        case 1: packed_tile<1>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
        case 2: packed_tile<2>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
        case 3: packed_tile<3>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
        case 4: packed_tile<4>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
        case 5: packed_tile<5>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
        case 6: packed_tile<6>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
        case 7: packed_tile<7>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
        default: packed_tile<8>(w.group(g), w.in(), xr, ldx, yr, ldy, c0, cols, bias, accumulate); break;
      }
    }
  }
#else
  (void)w, (void)bias, (void)x, (void)ldx, (void)rows, (void)y, (void)ldy, (void)g0, (void)g1, (void)accumulate;
  throw std::runtime_error("packed_linear: needs an x86-64 CPU with AVX-512F");
#endif
}

}  // namespace calm_cpu
