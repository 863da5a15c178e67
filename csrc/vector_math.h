// Vectorised exp, SiLU, dot product and axpy for the decode step's loops (AVX-512F; the caller checks the CPU).
//
// Why: libm's expf is a call per element. A prefill of 64 chunks of the small benchmark shape runs ~180 K SiLUs; one
// at a time they took about 0.9 ms of its 9 ms (the build targets plain x86-64, so nothing else vectorises them).
//
// exp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts so n ln2 is exact enough), e^r by its degree-7
// Taylor polynomial (truncation below 2^-27 relative on that range), then scaled by 2^n. Within 2 ulp of the correctly
// rounded exp for every float (tests/engine/test_cpu_step.py sweeps it against float64); inf past ~88.7, 0 below
// ~-103.3, NaN stays NaN.
#pragma once

#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace calm_cpu {

#if defined(__x86_64__)
// The first `count` of 16 lanes (none for count <= 0, all for count >= 16): the mask of a loop's last, partial vector.
inline __mmask16 lanes_mask(int count) {
  return count >= 16 ? __mmask16{0xFFFF} : count <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << count) - 1);
}

__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f);  // 12 significant bits: n ln2_hi is exact for |n| < 2^12
  const __m512 ln2_lo = _mm512_set1_ps(1.42860682030941723e-6f);
  // Clamped so that n stays small (scalef handles the rest); exp of the clamped values is already inf or 0.
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-110.0f)), _mm512_set1_ps(100.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, xc);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 result = _mm512_scalef_ps(p, n);
  // NaN in, NaN out (the clamp above would have turned it into a number)
  return _mm512_mask_mov_ps(result, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// v[i] = exp(v[i]) for n values.
__attribute__((target("avx512f"))) inline void exp_inplace_avx512(float* v, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, exp_avx512(_mm512_loadu_ps(v + i)));
  if (i < n) {
    const __mmask16 m = lanes_mask(n - i);
    _mm512_mask_storeu_ps(v + i, m, exp_avx512(_mm512_maskz_loadu_ps(m, v + i)));
  }
}

// out[i] = silu(g[i]) * (u ? u[i] : 1) = g / (1 + exp(-g)) (* u), for n values; out may be g.
__attribute__((target("avx512f"))) inline void silu_mul_avx512(const float* g, const float* u, float* out, int n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  int i = 0;
  for (; i < n; i += 16) {
    const __mmask16 m = lanes_mask(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
    __m512 y = _mm512_div_ps(x, _mm512_add_ps(one, exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    if (u != nullptr) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, u + i));
    _mm512_mask_storeu_ps(out + i, m, y);
  }
}
// sum_i a[i] b[i] over n values, 16 partial sums then their total.
__attribute__((target("avx512f"))) inline float dot_avx512(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = lanes_mask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y[i] += p x[i] for n values.
__attribute__((target("avx512f"))) inline void axpy_avx512(float p, const float* x, float* y, int n) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = lanes_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}
#endif

}  // namespace calm_cpu
