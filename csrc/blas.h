// torch's BLAS as the step calls it: the entry points of the MKL inside libtorch_cpu.so, whose addresses Python
// looks up (calm_engine/engine/cpu_step.py, torch_blas_addresses) and hands over, so that the extension builds
// without torch's headers and links no BLAS of its own.
#pragma once

#include <cstdint>

namespace calm_cpu {

// The Fortran-interface sgemm_ and MKL_Set_Num_Threads_Local.
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
using SetThreadsLocal = int (*)(int);
// MKL's cblas_gemm_bf16bf16f32 (CBLAS enums as ints): C [m, n] (float32) = alpha A [m, k] B [k, n] + beta C.
using GemmBf16 = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);

struct Blas {
  Sgemm sgemm = nullptr;
  SetThreadsLocal set_threads_local = nullptr;
  GemmBf16 gemm_bf16 = nullptr;  // null where torch's MKL does not export it
};

// y [rows, ldy] columns 0..n-1 = x [rows, in] @ w[n, in]^T (+ y when accumulating), in the sgemm's column-major
// view: y^T [n, rows] = w (stored as in x n column-major, hence 'T') @ x^T.
inline void sgemm_rows(Sgemm sgemm, const float* w, int n, int in, const float* x, int rows, float* y, int ldy,
                       bool accumulate) {
  const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  sgemm("T", "N", &n, &rows, &in, &one, w, &in, x, &in, &beta, y, &ldy);
}

}  // namespace calm_cpu
