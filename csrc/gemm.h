// The step's matrix products, out = in @ W^T (+ bias): on the level's packed kernel where the weight is packed
// (packed_linear.h, step_kernels.h), else on torch's sgemm (blas.h); and the second thread that takes half of each
// large product, or any other share of work (a range of attention rows or of the vocabulary).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "blas.h"
#include "isa.h"
#include "step_weights.h"

namespace calm_cpu {

// A share of work: out[:, n0:n1] of out [rows, l.out] = in [rows, l.in] @ weight[n0:n1]^T + bias[n0:n1] (+ out when
// accumulating), n0 a multiple of the packing width where the weight is packed; or, with `job` set, job(context).
struct GemmTask {
  const Linear* l = nullptr;
  const float* in = nullptr;
  float* out = nullptr;
  int rows = 0, n0 = 0, n1 = 0;
  bool accumulate = false;
  void (*job)(void*) = nullptr;
  void* context = nullptr;
};

class GemmWorker;  // gemm.cpp

class Gemm {
 public:
  // threads: 1, or 2 for a worker thread that takes half of each large share.
  Gemm(const Blas& blas, const StepKernels& kernels, int threads);
  ~Gemm();

  const Blas& blas() const { return blas_; }
  bool two_threads() const { return worker_ != nullptr; }

  // out [rows, l.out] (resized) = in [rows, l.in] @ W^T + bias; neither reads out.
  void product(const Linear& l, const float* in, int rows, std::vector<float>& out);
  // The same into out [rows, l.out], added to it when accumulating. Split between the threads when large.
  void product_into(const Linear& l, const float* in, int rows, float* out, bool accumulate);
  // `mine` here and `theirs` on the worker (or here too, if the worker has not claimed it in time). Two threads only.
  void run_pair(const GemmTask& mine, const GemmTask& theirs);

  // For the length of one call of the step: each thread's BLAS calls single-threaded, and the worker spinning.
  class Session {
   public:
    explicit Session(Gemm& gemm);
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

   private:
    Gemm& gemm_;
    int previous_threads_;
  };

 private:
  Blas blas_;
  const StepKernels& kernels_;
  std::unique_ptr<GemmWorker> worker_;
};

}  // namespace calm_cpu
