// The step's kernels (step_kernels.h) at the AVX-512 levels: 16 floats per register. This file alone is compiled for
// AVX-512F; the step calls into it only where the CPU runs it (isa.cpp).
#if defined(__x86_64__)
// Everything shared is included before the target switch, so no inline function outside the kernels is compiled
// for AVX-512 (the linker could otherwise keep that copy for callers on any CPU).
#include "bf16_products.h"
#include "isa.h"
#include "packed_linear.h"
#include "vocab_screen.h"

#pragma GCC target("avx512f,avx2,fma")
// GCC 12 warns inside avx512fintrin.h about its own deliberately undefined registers (_mm512_undefined_ps) wherever
// an intrinsic built on them is inlined: a false positive, silenced for this unit only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CALM_SIMD_AVX512
#include "step_kernels.h"

calm_cpu::StepKernels calm_cpu::avx512_step_kernels() { return make_step_kernels<Avx512>(); }
#endif
