// Which instruction-set levels this CPU runs, and the step's kernels per level: the generic level's plain loops here,
// the vector levels' from step_kernels.h (kernels_avx2.cpp, kernels_avx512.cpp).
#include "isa.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "bf16_products.h"
#include "vocab_screen.h"

namespace calm_cpu {

namespace {

constexpr const char* kIsaNames[kIsaCount] = {"generic", "avx2", "avx512", "avx512_bf16", "amx"};

std::string joined(const std::vector<std::string>& names) {
  std::string text;
  for (const auto& name : names) text += (text.empty() ? "" : ", ") + name;
  return text;
}

// The generic level: what the build's target (x86-64 with SSE2, or any other CPU) makes of plain loops.
void exp_generic(float* v, int n) {
  for (int i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

void silu_mul_generic(const float* g, const float* u, float* out, int n) {
  for (int i = 0; i < n; ++i) {
    const float y = g[i] / (1.0f + std::exp(-g[i]));
    out[i] = u ? y * u[i] : y;
  }
}

void attend_head_generic(const float* q, const float* keys, const float* values, int length, int d, float scale,
                         float* scores, float* out) {
  float top = -INFINITY;
  for (int t = 0; t < length; ++t) {
    const float* k = keys + static_cast<size_t>(t) * d;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < d; ++i) sum += q[i] * k[i];
    scores[t] = sum * scale;
    top = scores[t] > top ? scores[t] : top;
  }
  float total = 0.0f;
  for (int t = 0; t < length; ++t) total += scores[t] = std::exp(scores[t] - top);
  for (int i = 0; i < d; ++i) out[i] = 0.0f;
  for (int t = 0; t < length; ++t) {
    const float p = scores[t] / total;
    const float* v = values + static_cast<size_t>(t) * d;
    for (int i = 0; i < d; ++i) out[i] += p * v[i];
  }
}

float screen_lower_bound_generic(const float* s, const float* norm, float e, int n, float lower) {
#pragma omp simd reduction(max : lower)
  for (int c = 0; c < n; ++c) lower = std::max(lower, s[c] - (e * norm[c] + kScreenTiny));
  return lower;
}

bool screen_any_candidate_generic(const float* s, const float* norm, float e, int n, float lower) {
  int any = 0;
#pragma omp simd reduction(| : any)
  for (int c = 0; c < n; ++c) any |= s[c] + (e * norm[c] + kScreenTiny) >= lower;
  return any != 0;
}

StepKernels generic_step_kernels() {
  StepKernels k;
  k.exp_inplace = &exp_generic;
  k.silu_mul = &silu_mul_generic;
  k.attend_head = &attend_head_generic;
  k.screen_lower_bound = &screen_lower_bound_generic;
  k.screen_any_candidate = &screen_any_candidate_generic;
  return k;
}

}  // namespace

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

bool isa_supported(Isa isa) {
#if defined(__x86_64__)
  switch (isa) {
    case Isa::kGeneric:
      return true;
    case Isa::kAvx2:  // __builtin_cpu_supports also checks that the OS saves the registers (XGETBV)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return isa_supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f");
    case Isa::kAvx512Bf16:
      return isa_supported(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
    case Isa::kAmx:
      return isa_supported(Isa::kAvx512Bf16) && amx_supported();
  }
#endif
  return isa == Isa::kGeneric;
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (int i = 0; i < kIsaCount; ++i)
    if (isa_supported(static_cast<Isa>(i))) names.emplace_back(kIsaNames[i]);
  return names;
}

Isa best_isa() {
  Isa best = Isa::kGeneric;
  for (int i = 0; i < kIsaCount; ++i)
    if (isa_supported(static_cast<Isa>(i))) best = static_cast<Isa>(i);
  return best;
}

Isa parse_isa(const std::string& name) {
  const std::string levels = joined({kIsaNames, kIsaNames + kIsaCount});
  for (int i = 0; i < kIsaCount; ++i) {
    if (name != kIsaNames[i]) continue;
    if (!isa_supported(static_cast<Isa>(i)))
      throw std::invalid_argument("this CPU does not run the instruction-set level '" + name +
                                  "'; it runs: " + joined(supported_isa_names()));
    return static_cast<Isa>(i);
  }
  throw std::invalid_argument("unknown instruction-set level '" + name + "': the levels are " + levels +
                              "; this CPU runs: " + joined(supported_isa_names()));
}

const StepKernels& step_kernels(Isa isa) {  // isa: a level this CPU runs
  // Each table is built on first use only: the vector units' code may itself use their instructions.
#if defined(__x86_64__)
  if (isa == Isa::kAvx2) {
    static const StepKernels avx2 = avx2_step_kernels();
    return avx2;
  }
  if (isa >= Isa::kAvx512) {
    static const StepKernels avx512 = avx512_step_kernels();
    return avx512;
  }
#endif
  static const StepKernels generic = generic_step_kernels();
  return generic;
}

}  // namespace calm_cpu
