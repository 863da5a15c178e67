// DecodeStep::sample_pool (decode_step.h): the pools of temperature sampling, N head samples per row decoded to chunks.
//
// Why here and not in PyTorch: at T < 1 the step decodes N x K rows (N = 200, K = 4: 800 per row) through the
// vocabulary projection, ~95% of the step in dense float32 products on the PyTorch path. Here they go through the
// step's screened argmax where its products are int8 or bfloat16 arithmetic (VocabArgmax::pool_argmax;
// int8_products.h, vocab_screen.h: a proven bound, float32 recomputation of the candidates), which gives the same ids
// as the dense float32 argmax wherever float32 rounding cannot flip them; the hidden-state half of the head runs once
// per row.
#include <algorithm>
#include <chrono>

#include "decode_step.h"

namespace calm_cpu {

namespace {

// Latents decoded per block: the decoder's activations of a block (64 x K rows) and the screen's scores stay in L2.
constexpr int kPoolBlock = 64;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

void DecodeStep::sample_pool(const float* hidden, int batch, const float* noise, int samples, int64_t* out) {
  Gemm::Session session(gemm_);
  pool_stats_ = PoolStats{};
  const int k = w_.shapes.chunk_size, width = w_.shapes.latent, draws = batch * samples;
  Clock::time_point start = Clock::now();
  std::vector<float> latent, normed;
  head(hidden, noise, batch, samples, latent);
  pool_stats_.head_seconds = seconds_since(start);
  for (int d0 = 0; d0 < draws; d0 += kPoolBlock) {
    const int n = std::min(kPoolBlock, draws - d0);
    start = Clock::now();
    decoder_mlp(latent.data() + static_cast<size_t>(d0) * width, n, normed);
    pool_stats_.decoder_seconds += seconds_since(start);
    start = Clock::now();
    vocab_.pool_argmax(gemm_, normed.data(), n * k, out + static_cast<size_t>(d0) * k);
    pool_stats_.argmax_seconds += seconds_since(start);
    pool_stats_.candidates += vocab_.candidates();
    pool_stats_.fallback_rows += vocab_.fallback_rows();
  }
  pool_stats_.rows = static_cast<int64_t>(draws) * k;
}

}  // namespace calm_cpu
