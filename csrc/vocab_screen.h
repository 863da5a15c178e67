// VocabScreen: the exact float32 argmax of x @ W^T over a vocabulary, found with a bfloat16 screen.
//
// Why: the autoencoder's vocabulary projection is the largest product of a small model's decode step (45% of its
// multiply-adds on the small benchmark shape at batch 8). In bfloat16 (MKL's gemm_bf16bf16f32 from torch's library,
// on AMX where the CPU has it) the projection reads half the bytes at a higher rate: steps at batch 8 ran 1.13x
// (small shape) and 1.16x (CALM-M) faster with the screen (benchmarks/RESULTS.md). A rigorous
// bound on the bfloat16 error keeps only the ids that could still be the float32 argmax; those few are recomputed in
// float32, so the result is the float32 argmax (first id on ties), not an approximation of it.
//
// The bound. x and w rounded to bfloat16 (8 significant bits: relative error <= 2^-8 each), their products exact in
// float32, `in` of them summed in float32 in any order:
//   |screen - x.w| <= (2^-7 + 2^-16) sum_i |x_i w_i| + gamma_in sum_i |x_i w_i|,  gamma_n = n 2^-24 / (1 - n 2^-24)
// and the float32 reference's own rounding adds gamma_in once more; sum_i |x_i w_i| <= |x| |w| (Cauchy-Schwarz). So
// with e_v = factor * |x| * |w_v| + tiny (factor = (2^-7 + 2^-16 + 3 gamma_in) plus 1% for the bound's own float32
// arithmetic; tiny covers products flushed to zero), every id whose upper bound screen_v + e_v reaches the best lower
// bound max_u (screen_u - e_u) is a candidate, and the argmax is among them. Candidates whose float32 logits differ
// by no more than float32 rounding are decided by the recomputation's summation order, as between any two float32
// implementations of the projection.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace calm_cpu {

// MKL's cblas_gemm_bf16bf16f32 (CBLAS enums as ints): C [m, n] (float32) = alpha A [m, k] B [k, n] + beta C.
using GemmBf16 = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);

// bfloat16 bits of a finite float, rounded to nearest even (as torch's float -> bfloat16 conversion).
inline uint16_t to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float screen_error_factor(int in) {
  const double unit = std::ldexp(1.0, -24), gamma = in * unit / (1.0 - in * unit);
  return static_cast<float>((std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + 3.0 * gamma) * 1.01);
}

constexpr float kScreenTiny = 1e-30f;  // >= in * 2^-126 for any in below 2^70: products flushed to zero
constexpr size_t kMaxCandidates = 64;  // a row with more falls back to the plain float32 projection
constexpr int kScanBlock = 64;         // ids tested at once for candidates

// The projection's weight W [vocab, in] (float32, row-major), its bfloat16 copy and row norms |w_v| (rounded up).
struct VocabScreen {
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
};

// The rows of x ([rows, in] as bfloat16, bound[r] = factor * |x_r|) against vocabulary ids n0..n1, `tile` ids per
// bfloat16 product.
inline void screen_range(const VocabScreen& v, const uint16_t* x, const float* bound, int rows, int n0, int n1,
                         int tile, ScreenPart& part) {
  part.lower.assign(rows, -INFINITY);
  part.candidates.resize(rows);
  for (auto& list : part.candidates) list.clear();
  part.overflow.assign(rows, 0);
  part.scores.resize(static_cast<size_t>(rows) * tile);
  for (int c0 = n0; c0 < n1; c0 += tile) {
    const int n = std::min(tile, n1 - c0);
    v.gemm(101, 111, 112, rows, n, v.in, 1.0f, x, v.in, v.weight_bf16 + static_cast<size_t>(c0) * v.in, v.in, 0.0f,
           part.scores.data(), n);
    const float* norm = v.row_norm + c0;
    for (int r = 0; r < rows; ++r) {
      const float e = bound[r];
      if (part.overflow[r] || std::isnan(e)) continue;  // NaN: a row prepare_rows left to the caller
      const float* s = part.scores.data() + static_cast<size_t>(r) * n;
      float lower = part.lower[r];
#pragma omp simd reduction(max : lower)
      for (int c = 0; c < n; ++c) lower = std::max(lower, s[c] - (e * norm[c] + kScreenTiny));
      part.lower[r] = lower;
      auto& list = part.candidates[r];
      for (int b0 = 0; b0 < n && !part.overflow[r]; b0 += kScanBlock) {
        const int b1 = std::min(n, b0 + kScanBlock);
        int any = 0;  // almost every block has no candidate: test the block vectorised first
#pragma omp simd reduction(| : any)
        for (int c = b0; c < b1; ++c) any |= s[c] + (e * norm[c] + kScreenTiny) >= lower;
        if (!any) continue;
        for (int c = b0; c < b1; ++c) {
          const float upper = s[c] + (e * norm[c] + kScreenTiny);
          if (upper < lower) continue;
          if (list.size() == kMaxCandidates) {  // drop those the risen lower bound has ruled out
            list.erase(std::remove_if(list.begin(), list.end(), [&](const Candidate& k) { return k.upper < lower; }),
                       list.end());
            if (list.size() == kMaxCandidates) {
              part.overflow[r] = 1;
              break;
            }
          }
          list.push_back({upper, c0 + c});
        }
      }
    }
  }
}

// Row r's argmax from the screened parts (in vocabulary order): its surviving candidates recomputed in float32, the
// first id on ties; -1 when the row overflowed (the caller projects it in full).
inline int64_t pick_candidate(const VocabScreen& v, const float* x_row, int r, const ScreenPart* parts, int count) {
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
      const float* w = v.weight + static_cast<size_t>(k.id) * v.in;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < v.in; ++i) dot += x_row[i] * w[i];
      if (best_id < 0 || dot > best) best = dot, best_id = k.id;
    }
  return best_id;
}

// x [rows, in] float32 -> its bfloat16 copy and bound[r] = factor * |x_r|. A row is unusable (bound NaN: the caller
// projects it in full) unless |x_r| max_row_norm < 1e30: then no product, partial sum or bfloat16 rounding can
// overflow float32, and the bound holds.
inline void prepare_rows(const VocabScreen& v, const float* x, int rows, std::vector<uint16_t>& x_bf16,
                         std::vector<float>& bound, std::vector<char>& usable) {
  const int in = v.in;
  const float factor = screen_error_factor(in);
  x_bf16.resize(static_cast<size_t>(rows) * in);
  bound.resize(rows);
  usable.assign(rows, 1);
  for (int r = 0; r < rows; ++r) {
    const float* row = x + static_cast<size_t>(r) * in;
    double squares = 0.0;
    for (int i = 0; i < in; ++i) squares += static_cast<double>(row[i]) * row[i];
    const double norm = std::sqrt(squares);
    if (!(norm * std::max(v.max_row_norm, 1.0) < 1e30)) {  // NaN, inf, or within reach of float32's range
      usable[r] = 0;
      bound[r] = NAN;
      std::fill_n(x_bf16.data() + static_cast<size_t>(r) * in, in, uint16_t{0});
      continue;
    }
    bound[r] = static_cast<float>(factor * norm * (1.0 + 1e-6));
    for (int i = 0; i < in; ++i) x_bf16[static_cast<size_t>(r) * in + i] = to_bfloat16(row[i]);
  }
}

}  // namespace calm_cpu
