// The step's kernels (step_kernels.h) at the AVX2 level: 8 floats per register, fused multiply-adds; and the int8
// vocabulary screen (int8_kernels.h), at this level only. This file alone is compiled for AVX2 + FMA; the step calls
// into it only where the CPU runs them (isa.cpp).
#if defined(__x86_64__)
// Everything shared is included before the target switch, so no inline function outside the kernels is compiled
// for AVX2 (the linker could otherwise keep that copy for callers on any CPU).
#include "bf16_products.h"
#include "int8_products.h"
#include "isa.h"
#include "packed_linear.h"
#include "vocab_screen.h"

#pragma GCC target("avx2,fma")
#define CALM_SIMD_AVX2
#include "step_kernels.h"
#include "int8_kernels.h"

calm_cpu::StepKernels calm_cpu::avx2_step_kernels() {
  StepKernels k = make_step_kernels<Avx2>();
  k.int8_screen = &int8_screen;
  k.int8_scores = &int8_scores;
  return k;
}
#endif
