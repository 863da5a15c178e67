// One backbone layer's attention in the step (attention.h).
#include "attention.h"

#include <algorithm>
#include <cmath>

namespace calm_cpu {

namespace {

// Below this many multiply-adds the hand-over to the worker costs more than it saves (more than for a product:
// attention's scalar loops cost more per multiply-add).
constexpr int64_t kSplitAttention = 1 << 13;

}  // namespace

// Rows b0..b1 of one layer's attention; `scores` is the thread's buffer of `capacity` scores.
struct Attention::Job {
  const Attention* attention;
  const float* qkv;
  const int64_t *pos, *slot;
  const float *keys, *values;
  float* attn;
  int b0, b1;
  std::vector<float>* scores;
};

Attention::Attention(const StepWeights& weights, const StepKernels& kernels)
    : kernels_(kernels),
      heads_(weights.shapes.heads),
      kv_heads_(weights.shapes.kv_heads),
      head_dim_(weights.shapes.head_dim),
      capacity_(weights.capacity()),
      rope_cos_(weights.rope_cos.floats()),
      rope_sin_(weights.rope_sin.floats()) {}

void Attention::rotate_and_store(float* qkv, int rows, const int64_t* pos, const int64_t* slot, float* keys,
                                 float* values) const {
  const int d = head_dim_, half = d / 2, width = (heads_ + 2 * kv_heads_) * d;
  std::vector<float> rotated(d);
  for (int b = 0; b < rows; ++b) {
    float* row = qkv + static_cast<size_t>(b) * width;
    const float* cos = rope_cos_ + pos[b] * d;
    const float* sin = rope_sin_ + pos[b] * d;
    for (int head = 0; head < heads_ + kv_heads_; ++head) {  // q and k heads
      float* v = row + head * d;
      for (int c = 0; c < d; ++c) rotated[c] = v[c] * cos[c] + (c < half ? -v[c + half] : v[c - half]) * sin[c];
      std::copy(rotated.begin(), rotated.end(), v);
    }
    for (int kvh = 0; kvh < kv_heads_; ++kvh) {
      const size_t at = ((static_cast<size_t>(slot[b]) * kv_heads_ + kvh) * capacity_ + pos[b]) * d;
      std::copy_n(row + (heads_ + kvh) * d, d, keys + at);
      std::copy_n(row + (heads_ + kv_heads_ + kvh) * d, d, values + at);
    }
  }
}

void Attention::attend_rows(void* context) {
  const Job& job = *static_cast<const Job*>(context);
  const Attention& a = *job.attention;
  const int d = a.head_dim_, heads = a.heads_, group = a.heads_ / a.kv_heads_;
  const int width = (a.heads_ + 2 * a.kv_heads_) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float>& scores = *job.scores;
  scores.resize(a.capacity_);
  for (int b = job.b0; b < job.b1; ++b) {
    const float* row = job.qkv + static_cast<size_t>(b) * width;
    const int length = static_cast<int>(job.pos[b]) + 1;
    for (int head = 0; head < heads; ++head) {
      const float* q = row + head * d;
      const size_t base = (static_cast<size_t>(job.slot[b]) * a.kv_heads_ + head / group) * a.capacity_ * d;
      a.kernels_.attend_head(q, job.keys + base, job.values + base, length, d, scale, scores.data(),
                             job.attn + (static_cast<size_t>(b) * heads + head) * d);
    }
  }
}

void Attention::attend(Gemm& gemm, const float* qkv, int rows, const int64_t* pos, const int64_t* slot,
                       const float* keys, const float* values, float* attn) {
  Job jobs[2] = {{this, qkv, pos, slot, keys, values, attn, 0, rows, &scores_[0]},
                 {this, qkv, pos, slot, keys, values, attn, rows, rows, &scores_[1]}};
  int64_t work = 0, done = 0;
  for (int b = 0; b < rows; ++b) work += pos[b] + 1;
  if (!gemm.two_threads() || work * heads_ * head_dim_ < kSplitAttention) {
    attend_rows(&jobs[0]);
    return;
  }
  int split = 0;
  while (split < rows && 2 * (done + pos[split] + 1) <= work) done += pos[split++] + 1;
  jobs[0].b1 = jobs[1].b0 = split;
  GemmTask mine, theirs;
  mine.job = theirs.job = &Attention::attend_rows;
  mine.context = &jobs[0], theirs.context = &jobs[1];
  gemm.run_pair(mine, theirs);
}

}  // namespace calm_cpu
