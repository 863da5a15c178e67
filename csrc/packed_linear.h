// PackedLinear: a copy of a weight W [out, in] packed for streaming by the decode step's products
// (step_kernels.h: y = x @ W^T (+ bias) in float32 for the few rows of a decode step).
//
// Why: a small model's decode step reads every weight once from far memory (the small benchmark shape holds ~19 MB of
// weights against 2 MB of L2 per core). MKL's small-matrix sgemm reads W [out, in] as many strided rows at once and ran
// the step's products at half the speed it reaches on the same weights warm (benchmarks/RESULTS.md). Packed in groups
// of `width` outputs (two registers: 32 with AVX-512, 16 with AVX2), each group stored as [in][width], the kernel reads
// W as one sequential stream, multiplies each slice by every input row (broadcast) and keeps the sums in registers:
// bound by memory at a few rows, by arithmetic at many.
//
// Numerics: each output is one float32 sum over the inputs in order, with fused multiply-adds, then + bias, then + the
// old y when accumulating. The order depends neither on the row count, the other rows, the thread that computes the
// group, nor the register width, so a row's result is the same whatever batch it is in, at AVX2 and at AVX-512.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>

namespace calm_cpu {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

// W [out, in] (row-major, as nn.Linear stores it) packed: group g holds outputs width g .. width (g + 1) - 1 as
// [in][width], the last group zero-padded; 64-byte aligned.
class PackedLinear {
 public:
  PackedLinear(const float* weight, int out, int in, int width)
      : out_(out), in_(in), width_(width), groups_((out + width - 1) / width) {
    if (out < 1 || in < 1) throw std::invalid_argument("PackedLinear: empty weight");
    if (width < 1 || width % 16 != 0) throw std::invalid_argument("PackedLinear: width must be a multiple of 16");
    data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes())));
    if (!data_) throw std::bad_alloc();
    float* d = data_.get();
    for (int g = 0; g < groups_; ++g)
      for (int k = 0; k < in; ++k)
        for (int j = 0; j < width; ++j) {
          const int o = g * width + j;
          d[(static_cast<size_t>(g) * in + k) * width + j] = o < out ? weight[static_cast<size_t>(o) * in + k] : 0.0f;
        }
  }
  int out() const { return out_; }
  int in() const { return in_; }
  int width() const { return width_; }
  int groups() const { return groups_; }
  size_t bytes() const { return static_cast<size_t>(groups_) * in_ * width_ * sizeof(float); }  // a multiple of 64
  const float* group(int g) const { return data_.get() + static_cast<size_t>(g) * in_ * width_; }

 private:
  int out_, in_, width_, groups_;
  std::unique_ptr<float[], AlignedFree> data_;
};

}  // namespace calm_cpu
