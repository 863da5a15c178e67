// VocabScreen: the exact float32 argmax of x @ W^T over a vocabulary, found with a bfloat16 screen.
//
// Why: the autoencoder's vocabulary projection is the largest product of a small model's decode step (45% of its
// multiply-adds on the small benchmark shape at batch 8). In bfloat16 (MKL's gemm_bf16bf16f32 from torch's library,
// or this file's kernels on a packed copy: AMX tiles, AVX512-BF16) the projection reads half the bytes at a higher
// rate: steps at batch 8 ran 1.13x (small shape) and 1.16x (CALM-M) faster with the screen on MKL's GEMM alone
// (benchmarks/RESULTS.md). A rigorous
// bound on the bfloat16 error keeps only the ids that could still be the float32 argmax; those few are recomputed in
// float32, so the result is the float32 argmax (first id on ties), not an approximation of it.
//
// The bound. x and w rounded to bfloat16 (8 significant bits: relative error <= 2^-8 each), their products exact in
// float32, `in` of them summed in float32 in any order:
//   |screen - x.w| <= (2^-7 + 2^-16) sum_i |x_i w_i| + gamma_in sum_i |x_i w_i|,  gamma_n = n 2^-24 / (1 - n 2^-24)
// and the float32 reference's own rounding adds gamma_in once more; sum_i |x_i w_i| <= |x| |w| (Cauchy-Schwarz). So
// with e_v = factor * |x| * |w_v| + tiny (factor = (2^-7 + 2^-16 + 3 gamma_in) plus 1% for the bound's own float32
// arithmetic; tiny covers products and sums flushed to zero, as AMX and vdpbf16ps do), every id whose upper bound screen_v + e_v reaches the best lower
// bound max_u (screen_u - e_u) is a candidate, and the argmax is among them. Candidates whose float32 logits differ
// by no more than float32 rounding are decided by the recomputation's summation order, as between any two float32
// implementations of the projection.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "vector_math.h"

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

// Whether this CPU runs PackedBf16Projection's kernel (AVX512-BF16).
inline bool bf16_kernel_supported() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The projection's bfloat16 weight packed for the AVX512-BF16 screen kernel: groups of 32 ids, each stored as
// [in / 2][32 ids][2] (a pair of inputs per 32-bit lane, as vdpbf16ps reads them), zero-padded past the vocabulary.
//
// Why: MKL's bfloat16 GEMM repacks the whole weight on every call, which at a few rows costs more than the products
// (the small shape's projection took ~0.2 ms at 4 rows). Packed once, the kernel reads it as one stream.
// Numerics: products of bfloat16 values are exact in float32 and vdpbf16ps sums them in float32 (flushing
// subnormals to zero), so the screen's bound below holds as for any float32 summation order.
class PackedBf16Projection {
 public:
  static constexpr int kGroup = 32;
  PackedBf16Projection(const uint16_t* weight_bf16, int vocab, int in)
      : vocab_(vocab), pairs_(in / 2), groups_((vocab + kGroup - 1) / kGroup) {
    if (in % 2 != 0 || in < 2) throw std::invalid_argument("PackedBf16Projection: the width must be even");
    data_.assign(static_cast<size_t>(groups_) * pairs_ * kGroup * 2 + 32, 0);  // + 64 bytes to align the start
    uint16_t* d = aligned();
    for (int g = 0; g < groups_; ++g)
      for (int p = 0; p < pairs_; ++p)
        for (int j = 0; j < kGroup; ++j) {
          const int id = g * kGroup + j;
          if (id >= vocab) continue;
          uint16_t* lane = d + ((static_cast<size_t>(g) * pairs_ + p) * kGroup + j) * 2;
          lane[0] = weight_bf16[static_cast<size_t>(id) * in + 2 * p];
          lane[1] = weight_bf16[static_cast<size_t>(id) * in + 2 * p + 1];
        }
  }
  int pairs() const { return pairs_; }
  const uint16_t* group(int g) const { return aligned() + static_cast<size_t>(g) * pairs_ * kGroup * 2; }

 private:
  uint16_t* aligned() const {
    const auto address = reinterpret_cast<uintptr_t>(data_.data());
    return const_cast<uint16_t*>(data_.data()) + ((64 - address % 64) % 64) / 2;
  }
  int vocab_, pairs_, groups_;
  std::vector<uint16_t> data_;
};

#if defined(__x86_64__)
// scores [R, ldo] (columns 0..cols-1) of rows x (bfloat16 pairs, row stride ldx in uint16) against one group.
template <int R>
__attribute__((target("avx512f,avx512bf16"))) inline void bf16_group_scores(const uint16_t* w, int pairs,
                                                                           const uint16_t* x, int ldx, float* out,
                                                                           int ldo, int cols) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(w + static_cast<size_t>(p + 16) * 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + static_cast<size_t>(p + 16) * 64 + 32), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_load_si512(w + static_cast<size_t>(p) * 64);
    const __m512bh w1 = (__m512bh)_mm512_load_si512(w + static_cast<size_t>(p) * 64 + 32);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + static_cast<size_t>(r) * ldx + 2 * p, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  const __mmask16 m0 = lanes_mask(cols), m1 = lanes_mask(cols - 16);
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(out + static_cast<size_t>(r) * ldo, m0, acc[r][0]);
    _mm512_mask_storeu_ps(out + static_cast<size_t>(r) * ldo + 16, m1, acc[r][1]);
  }
}
#endif

// Whether this CPU and kernel run AMX bfloat16 tiles (cpuid, then Linux's per-process permission for tile data,
// requested once; GCC 12's __builtin_cpu_supports does not report AMX).
inline bool amx_supported() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool supported = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return supported;
#else
  return false;
#endif
}

#if defined(__x86_64__)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// scores [rows16, ld] = x [rows16, in] (bfloat16, rows16 a multiple of 16, in of 32) @ W[c0:c0+n]^T with AMX: tiles
// 0-3 sum a 32 x 32 block of scores, 4-5 hold 16 rows x 32 inputs of x, 6-7 the packed weight of 32 inputs x 16 ids.
// Writes whole groups of 32 columns (ld >= n rounded up to 32).
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_scores(const PackedBf16Projection& w, const uint16_t* x,
                                                                   int rows16, int in, int c0, int n, float* scores,
                                                                   int ld) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  const int stride_x = in * 2, stride_w = PackedBf16Projection::kGroup * 4, stride_s = ld * 4;
  for (int c = 0; c < n; c += PackedBf16Projection::kGroup) {
    const uint16_t* group = w.group((c0 + c) / PackedBf16Projection::kGroup);
    for (int r0 = 0; r0 < rows16; r0 += 32) {
      const bool two = rows16 - r0 >= 32;
      const uint16_t* xr = x + static_cast<size_t>(r0) * in;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int k = 0; k < in; k += 32) {  // 16 pairs of inputs per step
        const uint16_t* wk = group + static_cast<size_t>(k / 2) * PackedBf16Projection::kGroup * 2;
        _tile_loadd(4, xr + k, stride_x);
        _tile_loadd(6, wk, stride_w);
        _tile_loadd(7, wk + 32, stride_w);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, xr + static_cast<size_t>(16) * in + k, stride_x);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* out = scores + static_cast<size_t>(r0) * ld + c;
      _tile_stored(0, out, stride_s);
      _tile_stored(1, out + 16, stride_s);
      if (two) {
        _tile_stored(2, out + static_cast<size_t>(16) * ld, stride_s);
        _tile_stored(3, out + static_cast<size_t>(16) * ld + 16, stride_s);
      }
    }
  }
  _tile_release();
}
#endif

// scores [rows, n] = x [rows, 2 pairs] (bfloat16) @ W[c0:c0+n]^T, c0 a multiple of the group.
inline void packed_bf16_scores(const PackedBf16Projection& w, const uint16_t* x, int rows, int c0, int n,
                               float* scores) {
#if defined(__x86_64__)
  const int ldx = 2 * w.pairs();
  for (int c = 0; c < n; c += PackedBf16Projection::kGroup) {
    const uint16_t* group = w.group((c0 + c) / PackedBf16Projection::kGroup);
    const int cols = std::min(PackedBf16Projection::kGroup, n - c);
    for (int r0 = 0; r0 < rows; r0 += 8) {
      const uint16_t* xr = x + static_cast<size_t>(r0) * ldx;
      float* out = scores + static_cast<size_t>(r0) * n + c;
      switch (std::min(8, rows - r0)) {
        case 1: bf16_group_scores<1>(group, w.pairs(), xr, ldx, out, n, cols); break;
        case 2: bf16_group_scores<2>(group, w.pairs(), xr, ldx, out, n, cols); break;
        case 3: bf16_group_scores<3>(group, w.pairs(), xr, ldx, out, n, cols); break;
        case 4: bf16_group_scores<4>(group, w.pairs(), xr, ldx, out, n, cols); break;
        case 5: bf16_group_scores<5>(group, w.pairs(), xr, ldx, out, n, cols); break;
        case 6: bf16_group_scores<6>(group, w.pairs(), xr, ldx, out, n, cols); break;
        case 7: bf16_group_scores<7>(group, w.pairs(), xr, ldx, out, n, cols); break;
        default: bf16_group_scores<8>(group, w.pairs(), xr, ldx, out, n, cols); break;
      }
    }
  }
#else
  (void)w, (void)x, (void)rows, (void)c0, (void)n, (void)scores;
  throw std::runtime_error("packed_bf16_scores: needs an x86-64 CPU with AVX512-BF16");
#endif
}

// The projection's weight W [vocab, in] (float32, row-major), its bfloat16 copy and row norms |w_v| (rounded up).
// The bfloat16 products go to `packed` where set, else to `gemm` over weight_bf16.
struct VocabScreen {
  const PackedBf16Projection* packed = nullptr;
  bool amx = false;  // the packed products on AMX tiles (x then holds its rows padded to a multiple of 16)
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
#if defined(__x86_64__)
// The scan's two loops with AVX-512 (the build targets plain x86-64, where they ran 4 floats at a time); the same
// arithmetic in the same rounding steps: e * norm, + tiny, then the sum or difference.
__attribute__((target("avx512f"))) inline float lower_bound_avx512(const float* s, const float* norm, float e, int n,
                                                                  float lower) {
  const __m512 ev = _mm512_set1_ps(e), tiny = _mm512_set1_ps(kScreenTiny);
  __m512 best = _mm512_set1_ps(lower);
  for (int c = 0; c < n; c += 16) {
    const __mmask16 m = lanes_mask(n - c);
    const __m512 margin = _mm512_add_ps(_mm512_mul_ps(ev, _mm512_maskz_loadu_ps(m, norm + c)), tiny);
    best = _mm512_mask_max_ps(best, m, best, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + c), margin));
  }
  return _mm512_reduce_max_ps(best);
}

__attribute__((target("avx512f"))) inline bool any_candidate_avx512(const float* s, const float* norm, float e, int n,
                                                                   float lower) {
  const __m512 ev = _mm512_set1_ps(e), tiny = _mm512_set1_ps(kScreenTiny), low = _mm512_set1_ps(lower);
  for (int c = 0; c < n; c += 16) {
    const __mmask16 m = lanes_mask(n - c);
    const __m512 margin = _mm512_add_ps(_mm512_mul_ps(ev, _mm512_maskz_loadu_ps(m, norm + c)), tiny);
    const __m512 upper = _mm512_add_ps(_mm512_maskz_loadu_ps(m, s + c), margin);
    if (_mm512_mask_cmp_ps_mask(m, upper, low, _CMP_GE_OQ)) return true;
  }
  return false;
}
#endif

// max(lower, max_c s[c] - (e norm[c] + tiny)) over c < n.
inline float tile_lower_bound(const float* s, const float* norm, float e, int n, float lower) {
#if defined(__x86_64__)
  static const bool vector = __builtin_cpu_supports("avx512f");
  if (vector) return lower_bound_avx512(s, norm, e, n, lower);
#endif
#pragma omp simd reduction(max : lower)
  for (int c = 0; c < n; ++c) lower = std::max(lower, s[c] - (e * norm[c] + kScreenTiny));
  return lower;
}

// Whether any c < n has s[c] + (e norm[c] + tiny) >= lower.
inline bool any_candidate(const float* s, const float* norm, float e, int n, float lower) {
#if defined(__x86_64__)
  static const bool vector = __builtin_cpu_supports("avx512f");
  if (vector) return any_candidate_avx512(s, norm, e, n, lower);
#endif
  int any = 0;
#pragma omp simd reduction(| : any)
  for (int c = 0; c < n; ++c) any |= s[c] + (e * norm[c] + kScreenTiny) >= lower;
  return any != 0;
}

inline void screen_range(const VocabScreen& v, const uint16_t* x, const float* bound, int rows, int n0, int n1,
                         int tile, ScreenPart& part) {
  part.lower.assign(rows, -INFINITY);
  part.candidates.resize(rows);
  for (auto& list : part.candidates) list.clear();
  part.overflow.assign(rows, 0);
  const int group = PackedBf16Projection::kGroup;
  const int rows16 = (rows + 15) / 16 * 16, ld_amx = (tile + group - 1) / group * group;
  part.scores.resize(static_cast<size_t>(rows16) * ld_amx);
  for (int c0 = n0; c0 < n1; c0 += tile) {
    const int n = std::min(tile, n1 - c0);
    int ld = n;  // the scores' row stride
#if defined(__x86_64__)
    if (v.packed != nullptr && v.amx) {
      ld = ld_amx;
      amx_scores(*v.packed, x, rows16, v.in, c0, n, part.scores.data(), ld);
    } else
#endif
    if (v.packed != nullptr) {
      packed_bf16_scores(*v.packed, x, rows, c0, n, part.scores.data());
    } else {
      v.gemm(101, 111, 112, rows, n, v.in, 1.0f, x, v.in, v.weight_bf16 + static_cast<size_t>(c0) * v.in, v.in, 0.0f,
             part.scores.data(), n);
    }
    const float* norm = v.row_norm + c0;
    for (int r = 0; r < rows; ++r) {
      const float e = bound[r];
      if (part.overflow[r] || std::isnan(e)) continue;  // NaN: a row prepare_rows left to the caller
      const float* s = part.scores.data() + static_cast<size_t>(r) * ld;
      const float lower = part.lower[r] = tile_lower_bound(s, norm, e, n, part.lower[r]);
      auto& list = part.candidates[r];
      for (int b0 = 0; b0 < n && !part.overflow[r]; b0 += kScanBlock) {
        const int b1 = std::min(n, b0 + kScanBlock);
        // almost every block has no candidate: test the block vectorised first
        if (!any_candidate(s + b0, norm + b0, e, b1 - b0, lower)) continue;
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
  x_bf16.assign(static_cast<size_t>((rows + 15) / 16 * 16) * in, 0);  // rows padded to whole AMX tiles
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
