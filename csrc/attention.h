// One backbone layer's attention in the step: rotary embedding of the queries and keys, the KV cache's writes, and
// each row's queries over the positions of its cache slot (split between the step's two threads).
#pragma once

#include <cstdint>
#include <vector>

#include "gemm.h"
#include "isa.h"
#include "step_weights.h"

namespace calm_cpu {

class Attention {
 public:
  Attention(const StepWeights& weights, const StepKernels& kernels);

  // qkv [rows, (heads + 2 kv_heads) head_dim]: rotates each row's q and k heads at its position (half-split pairs),
  // then writes its k and v heads into the layer's cache (keys, values [slots + 1, kv_heads, capacity, head_dim]) at
  // (slot, position).
  void rotate_and_store(float* qkv, int rows, const int64_t* pos, const int64_t* slot, float* keys,
                        float* values) const;

  // attn [rows, heads head_dim]: each row's rotated queries (in qkv) over positions 0..pos of its slot, grouped
  // heads sharing a kv head. The rows are split between the two threads by their attention lengths.
  void attend(Gemm& gemm, const float* qkv, int rows, const int64_t* pos, const int64_t* slot, const float* keys,
              const float* values, float* attn);

 private:
  struct Job;
  static void attend_rows(void* job);

  const StepKernels& kernels_;
  int heads_, kv_heads_, head_dim_, capacity_;
  const float *rope_cos_, *rope_sin_;  // [capacity, head_dim]
  std::vector<float> scores_[2];       // the attention scores of this thread and of the worker
};

}  // namespace calm_cpu
