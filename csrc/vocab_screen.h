// VocabScreen: the exact float32 argmax of x @ W^T over a vocabulary, found with a bfloat16 screen.
//
// Why: the autoencoder's vocabulary projection is the largest product of a small model's decode step (45% of its
// multiply-adds on the small benchmark shape at batch 8). In bfloat16 the projection reads half the bytes: steps at
// batch 8 ran 1.13x (small shape) and 1.16x (CALM-M) faster with the screen on MKL's GEMM alone, more with the packed
// kernels (benchmarks/RESULTS.md). A rigorous bound on the bfloat16 error keeps only the ids that could still be the
// float32 argmax; those few are recomputed in float32, so the result is the float32 argmax (first id on ties), not an
// approximation of it.
//
// Where the products come from (ScreenProducts): MKL's gemm_bf16bf16f32 from torch's library, or a packed copy of the
// weight (bf16_products.h) read by vdpbf16ps (AVX512-BF16), by AMX tiles, or, on AVX2 and AVX-512F, widened to float32
// in registers and multiplied with fused multiply-adds (step_kernels.h).
//
// The bound. x and w rounded to bfloat16 (8 significant bits: relative error <= 2^-8 each), their products exact in
// float32, `in` of them summed in float32 in any order:
//   |screen - x.w| <= (2^-7 + 2^-16) sum_i |x_i w_i| + gamma_in sum_i |x_i w_i|,  gamma_n = n 2^-24 / (1 - n 2^-24)
// and the float32 reference's own rounding adds gamma_in once more; sum_i |x_i w_i| <= |x| |w| (Cauchy-Schwarz). So
// with e_v = factor * |x| * |w_v| + tiny (factor = (2^-7 + 2^-16 + 3 gamma_in) plus 1% for the bound's own float32
// arithmetic; tiny covers products and sums flushed to zero, as AMX and vdpbf16ps do), every id whose upper bound
// screen_v + e_v reaches the best lower bound max_u (screen_u - e_u) is a candidate, and the argmax is among them.
// Candidates whose float32 logits differ by no more than float32 rounding are decided by the recomputation's summation
// order, as between any two float32 implementations of the projection.
//
// The widening kernels meet the bound's premises as they are: a bfloat16 value shifted into the high half of a float32
// is that value exactly, the product of two of them has at most 16 significant bits and so is exact in float32 (no
// overflow: prepare_rows keeps |x| max|w| below 1e30; an underflowing product is inside fma's exact a b + c), and each
// fused multiply-add rounds once, as the sum's addition would: the screen is a float32 sum of the exact products in
// input order, within gamma_in of their exact sum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "bf16_products.h"
#include "blas.h"
#include "isa.h"

namespace calm_cpu {

// bfloat16 bits of a finite float, rounded to nearest even (as torch's float -> bfloat16 conversion).
inline uint16_t to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float from_bfloat16(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

inline float screen_error_factor(int in) {
  const double unit = std::ldexp(1.0, -24), gamma = in * unit / (1.0 - in * unit);
  return static_cast<float>((std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + 3.0 * gamma) * 1.01);
}

constexpr float kScreenTiny = 1e-30f;  // >= in * 2^-126 for any in below 2^70: products flushed to zero
constexpr size_t kMaxCandidates = 64;  // a row with more falls back to the plain float32 projection
constexpr int kScanBlock = 64;         // ids tested at once for candidates

enum class ScreenProducts {
  kGemm,     // MKL's GEMM over weight_bf16
  kWidened,  // packed, widened to float32 (StepKernels::widened_scores; x as float32 values)
  kDpbf16,   // packed, AVX512-BF16
  kAmx,      // packed, AMX tiles (x then holds its rows padded to a multiple of 16)
};

// The projection's weight W [vocab, in] (float32, row-major), its bfloat16 copy, its packed copy and row norms |w_v|
// (rounded up); `products` says which of them the bfloat16 products read, `kernels` holds the scan (and the widened
// products).
struct VocabScreen {
  ScreenProducts products = ScreenProducts::kGemm;
  const StepKernels* kernels = nullptr;
  const PackedBf16Projection* packed = nullptr;
  GemmBf16 gemm = nullptr;
  const float* weight = nullptr;
  const uint16_t* weight_bf16 = nullptr;
  const float* row_norm = nullptr;
  int vocab = 0, in = 0;
  double max_row_norm = 0.0;  // over the vocabulary: bounds every logit and partial sum of a row by |x| max_row_norm
};

// The largest of `count` row norms (0 for none); NaN if any is NaN.
inline double largest_norm(const float* norms, int count) {
  double largest = 0.0;
  for (int i = 0; i < count; ++i) {
    if (std::isnan(norms[i])) return NAN;
    largest = std::max(largest, static_cast<double>(norms[i]));
  }
  return largest;
}

// The rows of x prepared for the screen (prepare_rows): bfloat16 bits [rows padded to 16, in] (for the GEMM, vdpbf16ps
// and AMX), or their float32 values [rows, ld_wide] padded to whole pairs (for the widened products); bound[r] =
// factor * |x_r|, NaN where the row is unusable.
struct ScreenRows {
  std::vector<uint16_t> bf16;
  std::vector<float> wide;
  int ld_wide = 0;
  std::vector<float> bound;
  std::vector<char> usable;
};

struct Candidate {
  float upper;
  int id;
};

// One thread's share of the screen: for every row, the best lower bound over its vocabulary range and, in id order,
// the ids whose upper bound reached the best lower bound seen when they were screened; `overflow` marks rows with too
// many candidates.
struct ScreenPart {
  std::vector<float> lower;
  std::vector<std::vector<Candidate>> candidates;
  std::vector<char> overflow;
  std::vector<float> scores;  // the tile being screened, [rows, tile]

  // Sized for `rows`, every lower bound at -inf, no candidates, no overflow.
  void reset(int rows) {
    lower.assign(rows, -INFINITY);
    candidates.resize(rows);
    for (auto& list : candidates) list.clear();
    overflow.assign(rows, 0);
  }
};

// Appends (upper, id) to a row's candidates. A full list (`most`) first drops the ids the risen lower bound has ruled
// out; false if it is still full (the row overflows).
inline bool push_candidate(std::vector<Candidate>& list, size_t most, float upper, int id, float lower) {
  if (list.size() == most) {
    list.erase(std::remove_if(list.begin(), list.end(), [&](const Candidate& k) { return k.upper < lower; }),
               list.end());
    if (list.size() == most) return false;
  }
  list.push_back({upper, id});
  return true;
}

// The rows against vocabulary ids n0..n1, `tile` ids per bfloat16 product (a multiple of the packed group).
inline void screen_range(const VocabScreen& v, const ScreenRows& x, int rows, int n0, int n1, int tile,
                         ScreenPart& part) {
  part.reset(rows);
  const int rows16 = (rows + 15) / 16 * 16, ld_amx = (tile + 31) / 32 * 32;
  part.scores.resize(static_cast<size_t>(rows16) * ld_amx);
  const StepKernels& kernels = *v.kernels;
  for (int c0 = n0; c0 < n1; c0 += tile) {
    const int n = std::min(tile, n1 - c0);
    int ld = n;  // the scores' row stride
    switch (v.products) {
      case ScreenProducts::kGemm:
        v.gemm(101, 111, 112, rows, n, v.in, 1.0f, x.bf16.data(), v.in, v.weight_bf16 + static_cast<size_t>(c0) * v.in,
               v.in, 0.0f, part.scores.data(), n);
        break;
      case ScreenProducts::kWidened:
        kernels.widened_scores(*v.packed, x.wide.data(), rows, c0, n, part.scores.data());
        break;
      case ScreenProducts::kDpbf16:
        dpbf16_scores(*v.packed, x.bf16.data(), rows, c0, n, part.scores.data());
        break;
      case ScreenProducts::kAmx:
#if defined(__x86_64__)
        ld = ld_amx;
        amx_scores(*v.packed, x.bf16.data(), rows16, v.in, c0, n, part.scores.data(), ld);
#endif
        break;
    }
    const float* norm = v.row_norm + c0;
    for (int r = 0; r < rows; ++r) {
      const float e = x.bound[r];
      if (part.overflow[r] || std::isnan(e)) continue;  // NaN: a row prepare_rows left to the caller
      const float* s = part.scores.data() + static_cast<size_t>(r) * ld;
      const float lower = part.lower[r] = kernels.screen_lower_bound(s, norm, e, n, part.lower[r]);
      auto& list = part.candidates[r];
      for (int b0 = 0; b0 < n && !part.overflow[r]; b0 += kScanBlock) {
        const int b1 = std::min(n, b0 + kScanBlock);
        // almost every block has no candidate: test the block vectorised first
        if (!kernels.screen_any_candidate(s + b0, norm + b0, e, b1 - b0, lower)) continue;
        for (int c = b0; c < b1; ++c) {
          const float upper = s[c] + (e * norm[c] + kScreenTiny);
          if (upper < lower) continue;
          if (!push_candidate(list, kMaxCandidates, upper, c0 + c, lower)) {
            part.overflow[r] = 1;
            break;
          }
        }
      }
    }
  }
}

// Row r's argmax from the screened parts (in vocabulary order): its surviving candidates recomputed in float32, the
// first id on ties; -1 when the row overflowed (the caller projects it in full). Adds the ids recomputed to `recomputed`.
inline int64_t pick_candidate(const VocabScreen& v, const float* x_row, int r, const ScreenPart* parts, int count,
                              int64_t& recomputed) {
  float lower = -INFINITY;
  for (int p = 0; p < count; ++p) {
    if (parts[p].overflow[r]) return -1;
    lower = std::max(lower, parts[p].lower[r]);
  }
  float best = -INFINITY;
  int64_t best_id = -1;
  for (int p = 0; p < count; ++p)
    for (const Candidate& k : parts[p].candidates[r]) {
      if (k.upper < lower) continue;
      ++recomputed;
      const float* w = v.weight + static_cast<size_t>(k.id) * v.in;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < v.in; ++i) dot += x_row[i] * w[i];
      if (best_id < 0 || dot > best) best = dot, best_id = k.id;
    }
  return best_id;
}

// x [rows, in] float32 -> its rows for the screen (ScreenRows). A row is unusable (bound NaN: the caller projects it
// in full) unless |x_r| max_row_norm < 1e30: then no product, partial sum or bfloat16 rounding can overflow float32,
// and the bound holds.
inline void prepare_rows(const VocabScreen& v, const float* x, int rows, ScreenRows& out) {
  const int in = v.in;
  const float factor = screen_error_factor(in);
  const bool wide = v.products == ScreenProducts::kWidened;
  out.bf16.assign(static_cast<size_t>((rows + 15) / 16 * 16) * in, 0);  // rows padded to whole AMX tiles
  out.ld_wide = wide ? 2 * v.packed->pairs() : 0;
  out.wide.assign(static_cast<size_t>(rows) * out.ld_wide, 0.0f);
  out.bound.resize(rows);
  out.usable.assign(rows, 1);
  for (int r = 0; r < rows; ++r) {
    const float* row = x + static_cast<size_t>(r) * in;
    double squares = 0.0;
    for (int i = 0; i < in; ++i) squares += static_cast<double>(row[i]) * row[i];
    const double norm = std::sqrt(squares);
    if (!(norm * std::max(v.max_row_norm, 1.0) < 1e30)) {  // NaN, inf, or within reach of float32's range
      out.usable[r] = 0;
      out.bound[r] = NAN;
      continue;  // its bfloat16 and float32 copies stay zero
    }
    out.bound[r] = static_cast<float>(factor * norm * (1.0 + 1e-6));
    uint16_t* bits = out.bf16.data() + static_cast<size_t>(r) * in;
    for (int i = 0; i < in; ++i) bits[i] = to_bfloat16(row[i]);
    if (wide)
      for (int i = 0; i < in; ++i) out.wide[static_cast<size_t>(r) * out.ld_wide + i] = from_bfloat16(bits[i]);
  }
}

}  // namespace calm_cpu
