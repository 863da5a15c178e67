// DecodeStep: the model's forward in the C++ step (decode_step.h).
#include "decode_step.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "elementwise.h"

namespace calm_cpu {

namespace {

void rms_norm(const Norm& n, const float* in, float* out, int rows, int size) {
  calm_cpu::rms_norm(n.weight.floats(), n.eps, in, out, rows, size);
}

void layer_norm(const Norm& n, float* x, int rows, int size) {
  calm_cpu::layer_norm(n.weight.floats(), n.bias.floats(), n.eps, x, rows, size);
}

}  // namespace

DecodeStep::DecodeStep(const StepWeights& weights, const Blas& blas, int threads, Isa isa)
    : w_(weights),
      isa_(isa),
      kernels_(step_kernels(isa)),
      gemm_(blas, kernels_, threads),
      attention_(w_, kernels_),
      vocab_(w_.decoder.projection, isa, kernels_) {
  if (kernels_.packed_linear != nullptr) pack_linears();
}

void DecodeStep::enable_screen(const uint16_t* weight_bf16, const float* row_norm) {
  vocab_.enable_screen(gemm_.blas().gemm_bf16, weight_bf16, row_norm);
}

int64_t DecodeStep::packed_bytes() const {
  int64_t total = 0;
  for (const auto& p : packed_) total += static_cast<int64_t>(p->bytes());
  return total;
}

// Every linear layer but the vocabulary projection (vocab_argmax.h), packed into one block, so that its 2 MB pages
// hold no gaps (allocate_streamed).
void DecodeStep::pack_linears() {
  std::vector<Linear*> all = {&w_.compression.first, &w_.compression.second, &w_.head.hidden_embed,
                              &w_.head.noise_embed,   &w_.head.final_first,    &w_.head.final_second,
                              &w_.decoder.latent_to_hidden, &w_.decoder.expand};
  for (auto& l : w_.backbone.layers) all.insert(all.end(), {&l.qkv, &l.o, &l.mlp.gate_up, &l.mlp.down});
  for (auto& b : w_.head.blocks) all.insert(all.end(), {&b.noise_half, &b.hidden_half, &b.second, &b.third, &b.down});
  for (auto& l : w_.decoder.layers) all.insert(all.end(), {&l.mlp.gate_up, &l.mlp.down});
  const int width = kernels_.pack_width;
  size_t total = 0;
  for (Linear* l : all) total += PackedLinear::bytes_for(l->out(), l->in(), width);
  packed_memory_ = allocate_streamed(total);
  char* next = static_cast<char*>(packed_memory_.get());
  for (Linear* l : all) {
    packed_.push_back(
        std::make_unique<PackedLinear>(l->weight.floats(), l->out(), l->in(), width, reinterpret_cast<float*>(next)));
    next += packed_.back()->bytes();
    l->packed = packed_.back().get();
  }
}

void DecodeStep::check_rows(const char* caller, const int64_t* ids, const int64_t* positions, const int64_t* slots,
                            int rows) const {
  const std::string name = std::string("DecodeStep.") + caller + ": row ";
  const int k = w_.shapes.chunk_size, vocab = w_.shapes.vocab;
  const int capacity = w_.capacity(), scratch = w_.scratch_slot();
  for (int r = 0; r < rows; ++r) {
    if (positions[r] < 0 || positions[r] >= capacity)
      throw std::invalid_argument(name + std::to_string(r) + ": position " + std::to_string(positions[r]) +
                                  " out of range [0, capacity " + std::to_string(capacity) + ")");
    if (slots[r] < 0 || slots[r] > scratch)
      throw std::invalid_argument(name + std::to_string(r) + ": slot " + std::to_string(slots[r]) +
                                  " out of range [0, " + std::to_string(scratch) + "]");
    for (int j = 0; j < k; ++j)
      if (ids[r * k + j] < 0 || ids[r * k + j] >= vocab)
        throw std::invalid_argument(name + std::to_string(r) + ": id " + std::to_string(ids[r * k + j]) +
                                    " out of range [0, vocab " + std::to_string(vocab) + ")");
  }
}

void DecodeStep::run(const int64_t* ids, const int64_t* positions, const int64_t* slots, int batch,
                     const float* noise, int64_t* out) {
  Gemm::Session session(gemm_);
  std::vector<float> x;
  checked_forward("run", ids, positions, slots, batch, nullptr, batch, x);
  sample(x, noise, batch, out);
}

void DecodeStep::prefill(const int64_t* ids, const int64_t* positions, const int64_t* slots, int rows,
                         const int64_t* last, int batch, const float* noise, int64_t* out) {
  Gemm::Session session(gemm_);
  std::vector<float> picked;
  checked_forward("prefill", ids, positions, slots, rows, last, batch, picked);
  sample(picked, noise, batch, out);
}

void DecodeStep::decode_hidden(const int64_t* ids, const int64_t* positions, const int64_t* slots, int batch,
                               float* hidden) {
  Gemm::Session session(gemm_);
  std::vector<float> x;
  checked_forward("decode_hidden", ids, positions, slots, batch, nullptr, batch, x);
  std::copy(x.begin(), x.end(), hidden);
}

void DecodeStep::prefill_hidden(const int64_t* ids, const int64_t* positions, const int64_t* slots, int rows,
                                const int64_t* last, int batch, float* hidden) {
  Gemm::Session session(gemm_);
  std::vector<float> picked;
  checked_forward("prefill_hidden", ids, positions, slots, rows, last, batch, picked);
  std::copy(picked.begin(), picked.end(), hidden);
}

// The rows checked, then forward: the final hidden state of every row (last null), or of the rows last [batch].
void DecodeStep::checked_forward(const char* caller, const int64_t* ids, const int64_t* positions,
                                 const int64_t* slots, int rows, const int64_t* last, int batch,
                                 std::vector<float>& picked) {
  check_rows(caller, ids, positions, slots, rows);
  if (last != nullptr)
    for (int b = 0; b < batch; ++b)
      if (last[b] < 0 || last[b] >= rows)
        throw std::invalid_argument(std::string("DecodeStep.") + caller + ": last[" + std::to_string(b) +
                                    "] = " + std::to_string(last[b]) + " out of range [0, rows " +
                                    std::to_string(rows) + ")");
  if (last == nullptr) {
    forward(ids, positions, slots, rows, picked);
    return;
  }
  const int h = w_.shapes.hidden;
  std::vector<float> x;
  forward(ids, positions, slots, rows, x);
  picked.resize(static_cast<size_t>(batch) * h);
  for (int b = 0; b < batch; ++b) std::copy_n(x.data() + last[b] * h, h, picked.data() + b * h);
}

// Input compression (the chunk's K embeddings side by side -> Linear, SiLU, Linear, LayerNorm) -> the Llama layers
// over the cache -> the final RMSNorm: x [rows, hidden].
void DecodeStep::forward(const int64_t* ids, const int64_t* positions, const int64_t* slots, int rows,
                         std::vector<float>& x) {
  const int h = w_.shapes.hidden, k = w_.shapes.chunk_size;
  const float* embed = w_.backbone.embed.floats();
  std::vector<float> embedded(static_cast<size_t>(rows) * k * h), inner;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < k; ++j)
      std::copy_n(embed + ids[r * k + j] * h, h, embedded.data() + (static_cast<size_t>(r) * k + j) * h);
  gemm_.product(w_.compression.first, embedded.data(), rows, inner);
  activate_into(kernels_, Activation::kSilu, inner.data(), nullptr, inner.data(), static_cast<int>(inner.size()));
  gemm_.product(w_.compression.second, inner.data(), rows, x);
  layer_norm(w_.compression.norm, x.data(), rows, h);
  backbone(x, rows, positions, slots);
  rms_norm(w_.backbone.norm, x.data(), x.data(), rows, h);
}

void DecodeStep::backbone(std::vector<float>& x, int rows, const int64_t* positions, const int64_t* slots) {
  const int h = w_.shapes.hidden;
  std::vector<float> normed(x.size()), qkv, attn(static_cast<size_t>(rows) * w_.shapes.heads * w_.shapes.head_dim);
  for (size_t i = 0; i < w_.backbone.layers.size(); ++i) {
    const BackboneLayer& layer = w_.backbone.layers[i];
    float* keys = w_.keys[i].mutable_floats();
    float* values = w_.values[i].mutable_floats();
    rms_norm(layer.input_norm, x.data(), normed.data(), rows, h);
    gemm_.product(layer.qkv, normed.data(), rows, qkv);
    attention_.rotate_and_store(qkv.data(), rows, positions, slots, keys, values);
    // Every row's keys and values are in the cache before any row attends: in a prefill, a prompt's rows read
    // the positions of the same prompt written just above (causal attention, up to the row's own position).
    attention_.attend(gemm_, qkv.data(), rows, positions, slots, keys, values, attn.data());
    gemm_.product_into(layer.o, attn.data(), rows, x.data(), true);
    gated_mlp(layer.post_norm, layer.mlp, x, rows, h);
  }
}

// x [rows, width] += down(act(gate) * up) of the normed x; gate_up packs gate then up.
void DecodeStep::gated_mlp(const Norm& norm, const GatedMLP& mlp, std::vector<float>& x, int rows, int width) {
  std::vector<float> normed(x.size()), gu, mixed;
  rms_norm(norm, x.data(), normed.data(), rows, width);
  gemm_.product(mlp.gate_up, normed.data(), rows, gu);
  const int both = mlp.gate_up.out(), inner = both / 2;
  mixed.resize(static_cast<size_t>(rows) * inner);
  for (int r = 0; r < rows; ++r) {
    const float* g = gu.data() + static_cast<size_t>(r) * both;
    activate_into(kernels_, mlp.act, g, g + inner, mixed.data() + static_cast<size_t>(r) * inner, inner);
  }
  gemm_.product_into(mlp.down, mixed.data(), rows, x.data(), true);
}

// Energy head with the given noise -> autoencoder decoder -> vocabulary argmax, for hidden rows [batch, hidden].
void DecodeStep::sample(const std::vector<float>& hidden, const float* noise, int batch, int64_t* out) {
  std::vector<float> latent;
  head(hidden.data(), noise, batch, 1, latent);
  decode_argmax(latent.data(), batch, out);
}

// The head's first linear of each block reads [condition, normed z]: its hidden-state half (hidden_half, with the
// bias) depends on the row alone, so it runs once per row and is added to each of the row's samples.
void DecodeStep::head(const float* hidden, const float* noise, int batch, int samples, std::vector<float>& latent) {
  const EnergyHead& head = w_.head;
  const int c = w_.shapes.hidden, draws = batch * samples;
  std::vector<float> condition, z, normed(static_cast<size_t>(draws) * c), row_part, y, y2, gu, mixed;
  gemm_.product(head.hidden_embed, hidden, batch, condition);
  layer_norm(head.hidden_norm, condition.data(), batch, c);
  gemm_.product(head.noise_embed, noise, draws, z);
  layer_norm(head.noise_norm, z.data(), draws, c);
  for (const HeadBlock& block : head.blocks) {
    gemm_.product(block.hidden_half, condition.data(), batch, row_part);  // carries the first linear's bias
    std::copy(z.begin(), z.end(), normed.begin());
    layer_norm(block.norm, normed.data(), draws, c);
    const int width = block.hidden_half.out();
    y.resize(static_cast<size_t>(draws) * width);
    for (int d = 0; d < draws; ++d)
      std::copy_n(row_part.data() + static_cast<size_t>(d / samples) * width, width, y.data() + d * width);
    gemm_.product_into(block.noise_half, normed.data(), draws, y.data(), true);
    activate_into(kernels_, Activation::kSilu, y.data(), nullptr, y.data(), static_cast<int>(y.size()));
    gemm_.product(block.second, y.data(), draws, y2);
    activate_into(kernels_, Activation::kSilu, y2.data(), nullptr, y2.data(), static_cast<int>(y2.size()));
    gemm_.product(block.third, y2.data(), draws, gu);
    mixed.resize(static_cast<size_t>(draws) * c);
    for (int r = 0; r < draws; ++r) {
      const float* g = gu.data() + static_cast<size_t>(r) * 2 * c;
      activate_into(kernels_, Activation::kSilu, g, g + c, mixed.data() + static_cast<size_t>(r) * c, c);
    }
    gemm_.product_into(block.down, mixed.data(), draws, z.data(), true);
  }
  layer_norm(head.final_norm, z.data(), draws, c);
  gemm_.product(head.final_first, z.data(), draws, y);
  activate_into(kernels_, Activation::kSilu, y.data(), nullptr, y.data(), static_cast<int>(y.size()));
  gemm_.product(head.final_second, y.data(), draws, latent);
}

// latent [batch, latent] -> the decoder's final normed states [batch * K, decoder_hidden].
void DecodeStep::decoder_mlp(const float* latent, int batch, std::vector<float>& normed) {
  const Decoder& decoder = w_.decoder;
  const int a = w_.shapes.decoder_hidden;
  std::vector<float> x, expanded;
  gemm_.product(decoder.latent_to_hidden, latent, batch, x);
  const size_t stage = decoder.layers.size() / 2;
  for (size_t i = 0; i < stage; ++i) gated_mlp(decoder.layers[i].norm, decoder.layers[i].mlp, x, batch, a);
  gemm_.product(decoder.expand, x.data(), batch, expanded);  // [B, K*a] = [B*K, a]
  const int rows = batch * w_.shapes.chunk_size;
  for (size_t i = stage; i < decoder.layers.size(); ++i)
    gated_mlp(decoder.layers[i].norm, decoder.layers[i].mlp, expanded, rows, a);
  normed.resize(expanded.size());
  rms_norm(decoder.norm, expanded.data(), normed.data(), rows, a);
}

void DecodeStep::decode_argmax(const float* latent, int batch, int64_t* out) {
  std::vector<float> normed;
  decoder_mlp(latent, batch, normed);
  vocab_.argmax(gemm_, normed.data(), batch * w_.shapes.chunk_size, out);
}

}  // namespace calm_cpu
