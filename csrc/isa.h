// The instruction-set levels of the C++ decode step, which of them this CPU runs, and the step's kernels per level.
//
// Levels, each including the ones before it:
//   generic      plain C++ loops (the build targets x86-64 without AVX); products on the sgemm of torch's BLAS
//   avx2         AVX2 + FMA kernels, 8 floats per register (step_kernels.h instantiated in kernels_avx2.cpp)
//   avx512       AVX-512F kernels, 16 floats per register (the same templates, kernels_avx512.cpp)
//   avx512_bf16  + the vocabulary screen's products with vdpbf16ps (bf16_products.h)
//   amx          + the vocabulary screen's products on AMX bfloat16 tiles (bf16_products.h): a level of its own
//                because the tiles need Linux's permission besides the cpuid bits, and a CPU can have AVX512-BF16
//                without them (AMD Zen 4)
// The step runs the highest level the CPU supports unless a lower one is asked for (cpu_step.py: the `isa`
// argument or $CALM_CPU_ISA), so one machine tests the paths of every lower one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "packed_linear.h"

namespace calm_cpu {

enum class Isa { kGeneric = 0, kAvx2, kAvx512, kAvx512Bf16, kAmx };
constexpr int kIsaCount = 5;
const char* isa_name(Isa isa);

// Whether this CPU (and, for AMX, the kernel) runs the level's instructions.
bool isa_supported(Isa isa);
// The levels this CPU runs, lowest first, and the highest of them.
std::vector<std::string> supported_isa_names();
Isa best_isa();
// The level called `name`; std::invalid_argument naming the levels and those this CPU runs, for an unknown name or
// one this CPU cannot run.
Isa parse_isa(const std::string& name);

class PackedBf16Projection;
class PackedInt8Projection;
struct Int8RowsView;
struct Int8Scan;

// The decode step's kernels at one level. Where a pointer is null the step does without: the products go to the
// sgemm, the vocabulary screen's products to MKL's bfloat16 GEMM.
struct StepKernels {
  // y[:, groups g0..g1) = x @ W^T (+ bias) (+ y when accumulating), W packed `pack_width` outputs per group
  int pack_width = 0;
  void (*packed_linear)(const PackedLinear& w, const float* bias, const float* x, int ldx, int rows, float* y,
                        int ldy, int g0, int g1, bool accumulate) = nullptr;
  // v[i] = exp(v[i]); out[i] = silu(g[i]) * (u ? u[i] : 1) (out may be g)
  void (*exp_inplace)(float* v, int n) = nullptr;
  void (*silu_mul)(const float* g, const float* u, float* out, int n) = nullptr;
  // One query head over `length` cached positions (keys and values [length, d]): out [d] = softmax(scale q.k) v;
  // scores: a buffer of `length` floats.
  void (*attend_head)(const float* q, const float* keys, const float* values, int length, int d, float scale,
                      float* scores, float* out) = nullptr;
  // The vocabulary screen's scan (vocab_screen.h): max(lower, max_c s[c] - (e norm[c] + tiny)), and whether any
  // s[c] + (e norm[c] + tiny) >= lower.
  float (*screen_lower_bound)(const float* s, const float* norm, float e, int n, float lower) = nullptr;
  bool (*screen_any_candidate)(const float* s, const float* norm, float e, int n, float lower) = nullptr;
  // The screen's bfloat16 products in float32 from the packed projection (groups of `screen_group` ids): scores
  // [rows, n] = x [rows, in] (float32 values of bfloat16) @ W[c0:c0+n]^T
  int screen_group = 0;
  void (*widened_scores)(const PackedBf16Projection& w, const float* x, int rows, int c0, int n,
                         float* scores) = nullptr;
  // The int8 screen (int8_products.h, AVX2 only): rows x against ids n0..n1 into `scan`; and, for its tests, the
  // scores and bounds [rows, n] of ids c0..c0+n-1 (n0 and c0 multiples of its group).
  void (*int8_screen)(const PackedInt8Projection& w, const Int8RowsView& x, int rows, int n0, int n1,
                      const Int8Scan& scan) = nullptr;
  void (*int8_scores)(const PackedInt8Projection& w, const Int8RowsView& x, int rows, int c0, int n, float* scores,
                      float* bounds) = nullptr;
};

const StepKernels& step_kernels(Isa isa);
// The instantiations of step_kernels.h (kernels_avx2.cpp, kernels_avx512.cpp).
StepKernels avx2_step_kernels();
StepKernels avx512_step_kernels();

}  // namespace calm_cpu
