// DecodeStep: one whole CALM decode step (or prefill) at T = 1 on the CPU in float32, for batches up to 64 rows: the
// model's forward over the StepWeights (step_weights.h), from a chunk's ids to the next chunk's ids.
//
// Why: at batch 1-8 a step of a small model is ~120 eager PyTorch operations of a few microseconds each, about as
// much time as its matrix products (measured in benchmarks/RESULTS.md). Here the step is one call. At the AVX2 and
// AVX-512 levels (isa.h) the matrix products run on packed copies of the weights (packed_linear.h) and the attention
// and SiLU loops are vectorised (step_kernels.h); at the generic level the products go to the sgemm of the BLAS that
// torch itself links (blas.h). Two threads split every large product, the attention and the vocabulary (gemm.h).
//
// Computes what the engine's PyTorch step computes (its reference in tests/engine/test_cpu_step.py): input
// compression -> Llama layers over the engine's KV-cache slots (attention.h) -> energy head with the given noise ->
// autoencoder decoder -> vocabulary argmax, the first id on ties (vocab_argmax.h; optionally through the bfloat16
// screen of vocab_screen.h: the same argmax, with fewer float32 products).
//
// For T < 1 the step splits in two (sample_pool.cpp): the hidden states of the rows (decode_hidden, prefill_hidden),
// then pools of N head samples per row decoded to chunks (sample_pool), which the engine's sampler chooses among.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "attention.h"
#include "blas.h"
#include "gemm.h"
#include "isa.h"
#include "packed_linear.h"
#include "step_weights.h"
#include "vocab_argmax.h"

namespace calm_cpu {

struct PoolStats {
  double head_seconds = 0, decoder_seconds = 0, argmax_seconds = 0;
  int64_t rows = 0, candidates = 0, fallback_rows = 0;
};

class DecodeStep {
 public:
  // `threads`: 1 or 2. `isa`: a level this CPU runs; from avx2 up every linear layer runs on a packed copy of its
  // weight.
  DecodeStep(const StepWeights& weights, const Blas& blas, int threads, Isa isa);

  // The vocabulary argmax through the screen from now on (VocabArgmax::enable_screen, with the BLAS's bfloat16 GEMM).
  void enable_screen(const uint16_t* weight_bf16, const float* row_norm);
  bool screen_reads_weight_bf16() const { return vocab_.reads_weight_bf16(); }

  const StepWeights& weights() const { return w_; }
  Isa isa() const { return isa_; }
  // Bytes of the packed weight copies (0 when the step does not pack).
  int64_t packed_bytes() const;
  // Rows of the last call's vocabulary argmax that the screen could not settle (projected in full instead).
  int64_t screen_fallback_rows() const { return vocab_.fallback_rows(); }

  // ids [batch, K] at chunk positions [batch] in cache slots [batch], noise [batch, noise] -> the next ids
  // out [batch, K]. Writes the cache. std::invalid_argument for an id, position or slot out of range.
  void run(const int64_t* ids, const int64_t* positions, const int64_t* slots, int batch, const float* noise,
           int64_t* out);
  // A prefill: `rows` chunks (ids [rows, K]) at positions [rows] in slots [rows], every prompt's chunks in order, and
  // last [batch] the row of each prompt's last chunk, noise [batch, noise] -> the first generated chunk of each prompt
  // out [batch, K]. Writes the cache at every row's position.
  void prefill(const int64_t* ids, const int64_t* positions, const int64_t* slots, int rows, const int64_t* last,
               int batch, const float* noise, int64_t* out);

  // run and prefill without the sampling: each row's final hidden state into hidden [batch, hidden].
  void decode_hidden(const int64_t* ids, const int64_t* positions, const int64_t* slots, int batch, float* hidden);
  void prefill_hidden(const int64_t* ids, const int64_t* positions, const int64_t* slots, int rows,
                      const int64_t* last, int batch, float* hidden);
  // Pools: hidden [batch, hidden], noise [batch, samples, noise] -> out [batch, samples, K], sample s of row b decoded
  // from the head's draw with noise[b, s] (the hidden-state half of the head computed once per row).
  void sample_pool(const float* hidden, int batch, const float* noise, int samples, int64_t* out);
  // What the last sample_pool spent: seconds in the head, the decoder's MLP, the vocabulary argmax; the candidates the
  // screen recomputed in float32 and its rows projected in full.
  const PoolStats& pool_stats() const { return pool_stats_; }

 private:
  void check_rows(const char* caller, const int64_t* ids, const int64_t* positions, const int64_t* slots,
                  int rows) const;
  void pack_linears();
  void forward(const int64_t* ids, const int64_t* positions, const int64_t* slots, int rows, std::vector<float>& x);
  void backbone(std::vector<float>& x, int rows, const int64_t* positions, const int64_t* slots);
  void gated_mlp(const Norm& norm, const GatedMLP& mlp, std::vector<float>& x, int rows, int width);
  void sample(const std::vector<float>& hidden, const float* noise, int batch, int64_t* out);
  void checked_forward(const char* caller, const int64_t* ids, const int64_t* positions, const int64_t* slots, int rows,
                       const int64_t* last, int batch, std::vector<float>& picked);
  // latent [batch * samples, latent] from hidden [batch, hidden] and noise [batch * samples, noise].
  void head(const float* hidden, const float* noise, int batch, int samples, std::vector<float>& latent);
  void decoder_mlp(const float* latent, int batch, std::vector<float>& normed);
  void decode_argmax(const float* latent, int batch, int64_t* out);

  StepWeights w_;  // the step's own copy (the arrays shared): its linears point at the packed copies
  Isa isa_;
  const StepKernels& kernels_;
  Gemm gemm_;
  Attention attention_;
  VocabArgmax vocab_;
  std::unique_ptr<void, AlignedFree> packed_memory_;  // the packed weights of packed_
  std::vector<std::unique_ptr<PackedLinear>> packed_;
  PoolStats pool_stats_;
};

}  // namespace calm_cpu
