// The vocabulary screen's bfloat16 products from a packed copy of the projection's weight (vocab_screen.h): the
// packed layout, and its kernels on AVX512-BF16 (vdpbf16ps) and on AMX tiles. The AVX2 and AVX-512F kernels, which
// widen the same layout to float32, are in step_kernels.h.
//
// Why packed: MKL's bfloat16 GEMM repacks the whole weight on every call, which at a few rows costs more than the
// products (the small shape's projection took ~0.2 ms at 4 rows). Packed once, a kernel reads it as one stream.
// Numerics: products of bfloat16 values are exact in float32; vdpbf16ps and the AMX tiles sum them in float32
// (flushing subnormals to zero), so the screen's bound holds as for any float32 summation order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "packed_linear.h"

namespace calm_cpu {

// The projection's bfloat16 weight W [vocab, in] in groups of `group` ids (32: AVX512-BF16 and AMX; 2 registers of
// 32-bit lanes for the widening kernels), each stored as [pairs][group ids][2]: a pair of inputs per 32-bit lane, as
// vdpbf16ps reads them. Zero-padded past the vocabulary and, for an odd width, in the last pair; in streamed memory
// (allocate_streamed).
class PackedBf16Projection {
 public:
  PackedBf16Projection(const uint16_t* weight_bf16, int vocab, int in, int group)
      : pairs_((in + 1) / 2), group_(group), groups_((vocab + group - 1) / group) {
    if (in < 1 || vocab < 1 || group < 16 || group % 16 != 0)
      throw std::invalid_argument("PackedBf16Projection: empty weight or a group not a multiple of 16");
    const size_t bytes = static_cast<size_t>(groups_) * pairs_ * group_ * 4;  // a multiple of 64
    memory_ = allocate_streamed(bytes);
    data_ = static_cast<uint16_t*>(memory_.get());
    std::memset(data_, 0, bytes);
    for (int id = 0; id < vocab; ++id)
      for (int i = 0; i < in; ++i) {
        const size_t at = ((static_cast<size_t>(id / group) * pairs_ + i / 2) * group + id % group) * 2 + i % 2;
        data_[at] = weight_bf16[static_cast<size_t>(id) * in + i];
      }
  }
  int pairs() const { return pairs_; }
  int group_size() const { return group_; }
  const uint16_t* group(int g) const { return data_ + static_cast<size_t>(g) * pairs_ * group_ * 2; }

 private:
  int pairs_, group_, groups_;
  std::unique_ptr<void, AlignedFree> memory_;
  uint16_t* data_;
};

#if defined(__x86_64__)
// The first `count` of 16 lanes (none for count <= 0, all for count >= 16): the mask of a partial vector.
inline __mmask16 lanes_mask(int count) {
  return count >= 16 ? __mmask16{0xFFFF} : count <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << count) - 1);
}

// scores [R, ldo] (columns 0..cols-1) of rows x (bfloat16 pairs, row stride ldx in uint16) against one group of 32.
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

// scores [rows16, ld] = x [rows16, in] (bfloat16, rows16 a multiple of 16, in of 32) @ W[c0:c0+n]^T with AMX, W in
// groups of 32: tiles 0-3 sum a 32 x 32 block of scores, 4-5 hold 16 rows x 32 inputs of x, 6-7 the packed weight of
// 32 inputs x 16 ids. Writes whole groups of 32 columns (ld >= n rounded up to 32).
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_scores(const PackedBf16Projection& w, const uint16_t* x,
                                                                   int rows16, int in, int c0, int n, float* scores,
                                                                   int ld) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  const int stride_x = in * 2, stride_w = 32 * 4, stride_s = ld * 4;
  for (int c = 0; c < n; c += 32) {
    const uint16_t* group = w.group((c0 + c) / 32);
    for (int r0 = 0; r0 < rows16; r0 += 32) {
      const bool two = rows16 - r0 >= 32;
      const uint16_t* xr = x + static_cast<size_t>(r0) * in;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int k = 0; k < in; k += 32) {  // 16 pairs of inputs per step
        const uint16_t* wk = group + static_cast<size_t>(k / 2) * 32 * 2;
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

// scores [rows, n] = x [rows, 2 pairs] (bfloat16) @ W[c0:c0+n]^T with AVX512-BF16, W in groups of 32, c0 a multiple
// of 32.
inline void dpbf16_scores(const PackedBf16Projection& w, const uint16_t* x, int rows, int c0, int n, float* scores) {
#if defined(__x86_64__)
  const int ldx = 2 * w.pairs();
  for (int c = 0; c < n; c += 32) {
    const uint16_t* group = w.group((c0 + c) / 32);
    const int cols = std::min(32, n - c);
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
  throw std::runtime_error("dpbf16_scores: needs an x86-64 CPU with AVX512-BF16");
#endif
}

}  // namespace calm_cpu
