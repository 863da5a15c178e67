// The step's last operation: for each row of the decoder's final states, the first id of the largest logit over the
// vocabulary, from the float32 projection or through a screen (the same argmax, with fewer float32 products): the
// bfloat16 screen of vocab_screen.h, or at avx2 the int8 screen of int8_products.h. The step's two threads take the
// two halves of the vocabulary.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "bf16_products.h"
#include "blas.h"
#include "gemm.h"
#include "int8_products.h"
#include "isa.h"
#include "step_weights.h"
#include "vocab_screen.h"

namespace calm_cpu {

constexpr int kVocabTile = 512;  // logits of a tile stay in L2 (64 KB at 32 rows) while they are reduced

// Per row, the largest logit seen and its first column; `logits` is the thread's tile buffer.
struct ArgmaxResult {
  std::vector<float> value;
  std::vector<int64_t> index;
  std::vector<float> logits;
};

class VocabArgmax {
 public:
  // projection: the float32 weight [vocab, in] (StepWeights' decoder.projection).
  VocabArgmax(const Array& projection, Isa isa, const StepKernels& kernels);

  // From now on through the screen: weight_bf16 [vocab, in] the projection's bfloat16 bits, row_norm [vocab] upper
  // bounds of its rows' norms (read on every call; at avx2 copied with the int8 weight, which replaces the bfloat16
  // one for in <= kInt8MaxIn), gemm MKL's bfloat16 GEMM or null. std::invalid_argument where the rows are not finite
  // with norms below 1e30, or at the generic level without the GEMM.
  void enable_screen(GemmBf16 gemm, const uint16_t* weight_bf16, const float* row_norm);
  // Whether the screen still reads weight_bf16 after enable_screen (else its packed copy alone).
  bool reads_weight_bf16() const { return screen_.weight_bf16 != nullptr; }

  // out [rows] = argmax over the vocabulary of x [rows, in] @ W^T, the first id on ties. At avx2 through the int8
  // screen: T = 1 steps of the small shape ran 10% (batch 1) and 2-6% (batch 8) faster than with the widened bfloat16
  // screen (benchmarks/RESULTS.md).
  void argmax(Gemm& gemm, const float* x, int rows, int64_t* out);
  // The same for the many rows of a pool: through the int8 screen where the level has it (avx2: int8_products.h),
  // else through the bfloat16 screen where its products are bfloat16 arithmetic (AMX, vdpbf16ps, MKL's GEMM); the
  // widened kernel (avx512) costs a float32 multiply-add per product like the dense projection, and at pool sizes,
  // where both are bound by arithmetic, its scan made it slower than MKL's sgemm (small shape, T = 0.5, avx2, batch 1:
  // 11.6 ms per 800 rows, benchmarks/RESULTS.md), so there it projects densely.
  void pool_argmax(Gemm& gemm, const float* x, int rows, int64_t* out);

  // Rows of the last call that the screen could not settle (projected in full instead).
  int64_t fallback_rows() const { return fallback_rows_; }
  // Candidates of the last call that the screen left to the float32 recomputation, over all its rows.
  int64_t candidates() const { return candidates_; }

 private:
  void projected(Gemm& gemm, const float* x, int rows, int64_t* out);
  void screened(Gemm& gemm, const float* x, int rows, int64_t* out);
  void int8_screened(Gemm& gemm, const float* x, int rows, int64_t* out);
  // out [rows] from the screen's `parts` parts: each usable row's candidates recomputed in float32 (pick_candidate),
  // and the rows left open (unusable or overflowed) projected in float32, alone.
  void settle_rows(Gemm& gemm, const float* x, int rows, const std::vector<char>& usable, int parts, int64_t* out);
  ScreenProducts screen_products(int rows) const;

  const float* weight_;
  int vocab_, in_;
  Isa isa_;
  const StepKernels& kernels_;
  ArgmaxResult argmax_[2];  // the vocabulary halves of this thread and of the worker
  bool screening_ = false;
  VocabScreen screen_;
  std::unique_ptr<PackedBf16Projection> packed_bf16_;
  ScreenProducts packed_kind_ = ScreenProducts::kGemm;  // the kernel that reads packed_bf16_
  ScreenRows screen_rows_;
  std::unique_ptr<PackedInt8Projection> packed_int8_;  // the int8 screen's copy, where the level has its kernel
  Int8Rows int8_rows_;
  std::vector<float> open_rows_;
  ScreenPart screen_parts_[2];
  int64_t fallback_rows_ = 0, candidates_ = 0;
};

}  // namespace calm_cpu
