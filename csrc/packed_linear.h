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

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace calm_cpu {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

// Memory for weights a kernel streams: 64-byte aligned and, from 1 MB on, on 2 MB pages where Linux grants them
// (madvise). Why: with 4 KB pages each page of a stream is a TLB miss and a new start for the hardware prefetchers,
// which stop at page boundaries. A scratch loop streaming the small shape's 20 MB of packed weights at 1 row took
// 0.66 ms on 2 MB pages against 0.74 ms; whole steps (small shape, 2 threads, alternated with the 4 KB build) took
// 0.60-0.63 against 0.63-0.68 ms at batch 1 and 0.87-0.91 against 0.88-0.96 ms at batch 8 at the AMX level, and
// within 1-4% at AVX2, where batch 8 is bound by arithmetic.
inline std::unique_ptr<void, AlignedFree> allocate_streamed(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  const bool huge = bytes >= kHuge / 2;
  const size_t align = huge ? kHuge : 64, size = (bytes + align - 1) / align * align;
  std::unique_ptr<void, AlignedFree> memory(std::aligned_alloc(align, size > 0 ? size : align));
  if (!memory) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(memory.get(), size, MADV_HUGEPAGE);  // a hint: refused, the pages stay 4 KB
#endif
  return memory;
}

// W [out, in] (row-major, as nn.Linear stores it) packed: group g holds outputs width g .. width (g + 1) - 1 as
// [in][width], the last group zero-padded.
class PackedLinear {
 public:
  // Bytes of the packed copy (a multiple of 64).
  static size_t bytes_for(int out, int in, int width) {
    return static_cast<size_t>((out + width - 1) / width) * in * width * sizeof(float);
  }

  // Packs into `storage` (bytes_for of them, 64-byte aligned, outliving this), or into memory of its own when null.
  PackedLinear(const float* weight, int out, int in, int width, float* storage = nullptr)
      : out_(out), in_(in), width_(width), groups_((out + width - 1) / width) {
    if (out < 1 || in < 1) throw std::invalid_argument("PackedLinear: empty weight");
    if (width < 1 || width % 16 != 0) throw std::invalid_argument("PackedLinear: width must be a multiple of 16");
    if (storage == nullptr) {
      own_ = allocate_streamed(bytes());
      storage = static_cast<float*>(own_.get());
    }
    data_ = storage;
    for (int g = 0; g < groups_; ++g)
      for (int k = 0; k < in; ++k)
        for (int j = 0; j < width; ++j) {
          const int o = g * width + j;
          const float value = o < out ? weight[static_cast<size_t>(o) * in + k] : 0.0f;
          storage[(static_cast<size_t>(g) * in + k) * width + j] = value;
        }
  }
  int out() const { return out_; }
  int in() const { return in_; }
  int width() const { return width_; }
  int groups() const { return groups_; }
  size_t bytes() const { return bytes_for(out_, in_, width_); }
  const float* group(int g) const { return data_ + static_cast<size_t>(g) * in_ * width_; }

 private:
  int out_, in_, width_, groups_;
  std::unique_ptr<void, AlignedFree> own_;
  const float* data_;
};

}  // namespace calm_cpu
