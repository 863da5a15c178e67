// The int8 screen's AVX2 kernel (int8_products.h): integer dots of 4 rows x 16 ids per register block with vpmaddubsw,
// and, fused after each block, the scores, their bounds and the scan (running lower bound, candidates). Included by
// kernels_avx2.cpp alone, after its target switch.
//
// Why fused: a tile of scores written out and scanned in two passes (as vocab_screen.h does) costs more than the
// products themselves at int8 speed; here each block's scores stay in registers, and only a block holding an id whose
// upper bound reaches the row's running lower bound (rarely, past the first few hundred ids) goes to the candidate
// list. An id the running bound rejected is below the final one too, so no candidate is lost.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int8_products.h"

namespace calm_cpu {
namespace {

constexpr int kInt8RowBlock = 4;  // 8 int32 accumulators, 2 weights, a broadcast, ones and 2 products in flight

// acc[r][h] = the unsigned-by-signed byte dots of rows x (4 quads, row stride ldx) with the group's ids 8h..8h+7.
template <int R>
inline void int8_group_dots(const int8_t* w, int quads, const uint8_t* x, int ldx, __m256i (&acc)[R][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int k = 0; k < quads; k += kInt8Widen) {  // quads: whole kInt8Widen
    __m256i sum[R][2];
    for (int j = 0; j < kInt8Widen; ++j) {
      const int8_t* wk = w + static_cast<size_t>(k + j) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wk + 32 * 64), _MM_HINT_T0);
      const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wk));
      const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wk + 32));
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, x + static_cast<size_t>(r) * ldx + 4 * (k + j), sizeof quad);
        const __m256i xb = _mm256_set1_epi32(quad);
        const __m256i p0 = _mm256_maddubs_epi16(xb, w0), p1 = _mm256_maddubs_epi16(xb, w1);
        sum[r][0] = j == 0 ? p0 : _mm256_add_epi16(sum[r][0], p0);
        sum[r][1] = j == 0 ? p1 : _mm256_add_epi16(sum[r][1], p1);
      }
    }
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(sum[r][0], ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(sum[r][1], ones));
    }
  }
}

// Row r's scores and bounds of ids v..v+7 from their integer dots: as int8_scores_reference, operation for operation.
inline void int8_score_bound(const PackedInt8Projection& w, const Int8RowsView& x, int r, int v, __m256i acc,
                             __m256& score, __m256& bound) {
  const __m256 dot = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.bias() + v))));
  score = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(x.scale[r]), _mm256_loadu_ps(w.scale() + v)), dot);
  const __m256 spread = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(x.b[r]), _mm256_loadu_ps(w.residual() + v)),
                                      _mm256_set1_ps(kScreenTiny));
  bound = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(x.a[r]), _mm256_loadu_ps(w.norm() + v)), spread);
}

// The first n of 8 lanes (none for n <= 0, all for n >= 8).
inline __m256 int8_lanes(int n) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

inline float int8_reduce_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Rows r0..r0+R-1 against group g, of which `cols` ids are in range: lower bounds and candidates into `scan`.
template <int R>
void int8_scan_block(const PackedInt8Projection& w, const Int8RowsView& x, int r0, int g, int cols,
                     const Int8Scan& scan) {
  __m256i acc[R][2];
  int8_group_dots<R>(w.group(g), w.quads(), x.bytes + static_cast<size_t>(r0) * x.ld, x.ld, acc);
  const int v = g * kInt8Group;
  const __m256 none = _mm256_set1_ps(-INFINITY);
  for (int i = 0; i < R; ++i) {
    const int r = r0 + i;
    if (!x.usable[r] || scan.overflow[r]) continue;
    __m256 score0, bound0, score1, bound1;
    int8_score_bound(w, x, r, v, acc[i][0], score0, bound0);
    int8_score_bound(w, x, r, v + 8, acc[i][1], score1, bound1);
    __m256 low0 = _mm256_sub_ps(score0, bound0), low1 = _mm256_sub_ps(score1, bound1);
    __m256 up0 = _mm256_add_ps(score0, bound0), up1 = _mm256_add_ps(score1, bound1);
    if (cols < kInt8Group) {  // ids past the range: neither bound counts
      const __m256 keep0 = int8_lanes(cols), keep1 = int8_lanes(cols - 8);
      low0 = _mm256_blendv_ps(none, low0, keep0), up0 = _mm256_blendv_ps(none, up0, keep0);
      low1 = _mm256_blendv_ps(none, low1, keep1), up1 = _mm256_blendv_ps(none, up1, keep1);
    }
    const float lower = int8_reduce_max(_mm256_max_ps(_mm256_max_ps(low0, low1), _mm256_set1_ps(scan.lower[r])));
    scan.lower[r] = lower;
    const __m256 level = _mm256_set1_ps(lower);
    const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(up0, level, _CMP_GE_OQ))) |
                          static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(up1, level, _CMP_GE_OQ))) << 8;
    if (mask == 0) continue;
    alignas(32) float upper[kInt8Group];
    _mm256_store_ps(upper, up0);
    _mm256_store_ps(upper + 8, up1);
    add_int8_candidates(scan, r, upper, v, mask, lower);
  }
}

// Rows r0..r0+R-1 against group g: scores and bounds [rows, ld] from column c (cols of them).
template <int R>
void int8_store_block(const PackedInt8Projection& w, const Int8RowsView& x, int r0, int g, int cols, float* scores,
                      float* bounds, int ld, int c) {
  __m256i acc[R][2];
  int8_group_dots<R>(w.group(g), w.quads(), x.bytes + static_cast<size_t>(r0) * x.ld, x.ld, acc);
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < 2 && cols > 8 * h; ++h) {
      __m256 score, bound;
      int8_score_bound(w, x, r0 + i, g * kInt8Group + 8 * h, acc[i][h], score, bound);
      const __m256i keep = _mm256_castps_si256(int8_lanes(cols - 8 * h));
      const size_t at = static_cast<size_t>(r0 + i) * ld + c + 8 * h;
      _mm256_maskstore_ps(scores + at, keep, score);
      _mm256_maskstore_ps(bounds + at, keep, bound);
    }
}

// The block functions at `rows` (1..R) rows.
template <int R>
void int8_scan_rows(int rows, const PackedInt8Projection& w, const Int8RowsView& x, int r0, int g, int cols,
                    const Int8Scan& scan) {
  if constexpr (R > 1)
    if (rows < R) return int8_scan_rows<R - 1>(rows, w, x, r0, g, cols, scan);
  int8_scan_block<R>(w, x, r0, g, cols, scan);
}

template <int R>
void int8_store_rows(int rows, const PackedInt8Projection& w, const Int8RowsView& x, int r0, int g, int cols,
                     float* scores, float* bounds, int ld, int c) {
  if constexpr (R > 1)
    if (rows < R) return int8_store_rows<R - 1>(rows, w, x, r0, g, cols, scores, bounds, ld, c);
  int8_store_block<R>(w, x, r0, g, cols, scores, bounds, ld, c);
}

// The screen of rows x against ids n0..n1 (n0 a multiple of the group): each group's weights stay in L1 while every
// block of rows passes over them, in id order, so each row's candidates arrive in id order.
void int8_screen(const PackedInt8Projection& w, const Int8RowsView& x, int rows, int n0, int n1, const Int8Scan& scan) {
  const RowBlocks blocks(rows, kInt8RowBlock);
  for (int c = n0; c < n1; c += kInt8Group)
    for (int i = 0; i < blocks.count; ++i) {
      const int r0 = blocks.start(i);
      int8_scan_rows<kInt8RowBlock>(blocks.start(i + 1) - r0, w, x, r0, c / kInt8Group, n1 - c, scan);
    }
}

// scores, bounds [rows, n] of ids c0..c0+n-1 (c0 a multiple of the group), as int8_scores_reference.
void int8_scores(const PackedInt8Projection& w, const Int8RowsView& x, int rows, int c0, int n, float* scores,
                 float* bounds) {
  const RowBlocks blocks(rows, kInt8RowBlock);
  for (int c = 0; c < n; c += kInt8Group)
    for (int i = 0; i < blocks.count; ++i) {
      const int r0 = blocks.start(i);
      int8_store_rows<kInt8RowBlock>(blocks.start(i + 1) - r0, w, x, r0, (c0 + c) / kInt8Group, n - c, scores,
                                     bounds, n, c);
    }
}

}  // namespace
}  // namespace calm_cpu
