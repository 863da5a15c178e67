// The float vector of one instruction-set level, as the few operations the step's kernels use (step_kernels.h): `Avx2`
// (8 floats, AVX2 + FMA) or `Avx512` (16 floats, AVX-512F). A kernel is written once over `V` and instantiated per
// level in its own translation unit, compiled for that level (kernels_avx2.cpp, kernels_avx512.cpp), which defines
// CALM_SIMD_AVX2 or CALM_SIMD_AVX512 before including this file: each unit sees only its own type.
//
// Every operation rounds as IEEE float32 (one rounding; fmadd: one rounding of a b + c), so a kernel whose order of
// operations per lane does not depend on the width gives the same bits at both levels.
#pragma once

#include <cstdint>

#include <immintrin.h>

namespace calm_cpu {
namespace {  // internal linkage: nothing compiled for one level is ever linked into another's callers

#if defined(CALM_SIMD_AVX512)
struct Avx512 {
  using F = __m512;
  using Bits = __m512i;
  using Tail = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kRowBlock = 8;        // packed products: 16 accumulators, 2 weights, a broadcast (of 32)
  static constexpr int kScreenRowBlock = 8;  // widened screen: 16 accumulators, 4 widened weights, 2 broadcasts

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // The first n lanes, 0 < n < kLanes (the rest read as 0, never touched in memory)
  static Tail tail(int n) { return static_cast<Tail>((1u << n) - 1); }
  static F load(const float* p, Tail t) { return _mm512_maskz_loadu_ps(t, p); }
  static void store(float* p, F v, Tail t) { _mm512_mask_storeu_ps(p, t, v); }
  static F select(Tail t, F a, F b) { return _mm512_mask_blend_ps(t, b, a); }  // a in the tail's lanes, else b

  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  static float reduce_add(F v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(F v) { return _mm512_reduce_max_ps(v); }
  static bool any_ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ) != 0; }
  static bool any_ge(F a, F b, Tail t) { return _mm512_mask_cmp_ps_mask(t, a, b, _CMP_GE_OQ) != 0; }

  static F round_nearest(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p 2^n for integral n, rounded once
  static F scale_pow2(F p, F n) { return _mm512_scalef_ps(p, n); }
  // x where x is NaN, else v
  static F keep_nan(F v, F x) { return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x); }

  // kLanes 32-bit lanes of bfloat16 pairs (64-byte aligned) and each lane's low or high half as a float32
  static Bits load_bits(const uint16_t* p) { return _mm512_load_si512(p); }
  static F low_halves(Bits b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }
  static F high_halves(Bits b) {
    return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
#endif

#if defined(CALM_SIMD_AVX2)
struct Avx2 {
  using F = __m256;
  using Bits = __m256i;
  using Tail = __m256i;  // all ones in the lanes to keep
  static constexpr int kLanes = 8;
  // Rows per register tile (of 16 registers). Packed products: 12 accumulators, 2 weights, a broadcast; 4, 5 and 6
  // ran within 5% of one another, 47-50 GMAC/s at 8 and 32 rows on one core. Widened screen: 10 accumulators, 4
  // widened weights, 2 broadcasts: 44-47 GMAC/s at 32 rows against 40-42 with 4 rows (the small shape's projection,
  // one core, weights in cache).
  static constexpr int kRowBlock = 6;
  static constexpr int kScreenRowBlock = 5;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  // vmaskmovps: masked-off lanes read as 0 and are neither read nor written in memory (no fault past the end)
  static Tail tail(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static F load(const float* p, Tail t) { return _mm256_maskload_ps(p, t); }
  static void store(float* p, F v, Tail t) { _mm256_maskstore_ps(p, t, v); }
  static F select(Tail t, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(t)); }

  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static float reduce_add(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static bool any_ge(F a, F b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ)) != 0; }
  static bool any_ge(F a, F b, Tail t) {
    return _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ), _mm256_castsi256_ps(t))) != 0;
  }

  static F round_nearest(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p 2^n for integral |n| <= 160 and p in [0.5, 2] (all exp_vec asks): p 2^(n/2) is exact (a normal float),
  // then one rounding by 2^(n - n/2), also normal: the same result as AVX-512's scalef.
  static F scale_pow2(F p, F n) {
    const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const F first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const F second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(whole, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, first), second);
  }
  static F keep_nan(F v, F x) { return _mm256_blendv_ps(v, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }

  static Bits load_bits(const uint16_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static F low_halves(Bits b) { return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)); }
  static F high_halves(Bits b) {
    return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
#endif

// n floats from p (n >= kLanes: a whole vector), and back
template <class V>
inline typename V::F load_n(const float* p, int n) {
  return n >= V::kLanes ? V::load(p) : V::load(p, V::tail(n));
}
template <class V>
inline void store_n(float* p, typename V::F v, int n) {
  if (n >= V::kLanes)
    V::store(p, v);
  else
    V::store(p, v, V::tail(n));
}

}  // namespace
}  // namespace calm_cpu
