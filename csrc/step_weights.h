// StepWeights: the model as the C++ step reads it, the same tree of typed parts as the engine's ModelWeights
// (calm_engine/engine/weights.py), plus the KV cache and the rotary tables. Bound to Python as _calm_cpu.StepWeights
// (bindings.cpp) and built there only by calm_engine/engine/step/native_weights.py; every array is a view of the
// model's own float32 storage, nothing is copied.
//
// Checked once, at construction (step_weights.cpp): every array float32 and C-contiguous, every shape against
// Shapes and the parts it meets, the cache writable; a mismatch is a std::invalid_argument that names the field
// ("backbone.layers[2].qkv.weight: expected [...], got [...]"), so the step itself indexes without checks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "elementwise.h"

namespace calm_cpu {

class PackedLinear;

// An array handed over from Python (a numpy view): its data, element type and shape, and a reference that keeps it
// alive. An absent array (an optional bias of None) has no owner and no data.
struct Array {
  void* data = nullptr;
  std::vector<int64_t> shape;
  std::string dtype;  // numpy's name of the element type, e.g. "float32"
  bool c_contiguous = false, writable = false;
  std::shared_ptr<void> owner;

  bool present() const { return owner != nullptr; }
  const float* floats() const { return static_cast<const float*>(data); }
  float* mutable_floats() const { return static_cast<float*>(data); }
};

// y = x @ weight^T + bias.
struct Linear {
  Array weight;  // [out, in]
  Array bias;    // [out], or absent
  // The weight packed for the level's kernel (packed_linear.h): set by the step on its own copy when it packs.
  const PackedLinear* packed = nullptr;

  int out() const { return static_cast<int>(weight.shape[0]); }
  int in() const { return static_cast<int>(weight.shape[1]); }
};

// RMSNorm (no bias) or LayerNorm (with bias) over `size` values.
struct Norm {
  Array weight;  // [size]
  Array bias;    // [size] for a LayerNorm
  float eps = 0.0f;
};

// down(act(gate) * up), gate_up = [gate rows; up rows].
struct GatedMLP {
  Linear gate_up, down;
  std::string activation;
  Activation act = Activation::kSilu;  // `activation` parsed by StepWeights' checks
};

struct BackboneLayer {
  Norm input_norm;
  Linear qkv;  // [q heads; k heads; v heads] rows
  Linear o;
  Norm post_norm;
  GatedMLP mlp;
};

struct Backbone {
  Array embed;  // [vocab, hidden]
  std::vector<BackboneLayer> layers;
  Norm norm;
};

// A chunk's K token embeddings side by side [K * hidden] -> first -> SiLU -> second -> LayerNorm -> [hidden].
struct Compression {
  Linear first, second;
  Norm norm;
};

// An energy-head block, its first linear split: noise_half (per sample) and hidden_half (per row, carrying the first
// linear's bias); then SiLU, second, SiLU, third (gate and up), SiLU(gate) * up, down.
struct HeadBlock {
  Norm norm;
  Linear noise_half, hidden_half, second, third, down;
};

struct EnergyHead {
  Linear hidden_embed;
  Norm hidden_norm;
  Linear noise_embed;
  Norm noise_norm;
  std::vector<HeadBlock> blocks;
  Norm final_norm;
  Linear final_first, final_second;
};

struct DecoderLayer {
  Norm norm;
  GatedMLP mlp;
};

// latent -> hidden, the first half of the layers, expand to K rows, the second half, the norm, then the vocabulary
// projection (argmax only).
struct Decoder {
  Linear latent_to_hidden;
  std::vector<DecoderLayer> layers;
  Linear expand;
  Norm norm;
  Array projection;  // [vocab, decoder hidden]
};

struct Shapes {
  int hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int chunk_size = 0;  // K, the tokens of one step
  int vocab = 0;
  std::string activation;
  int noise = 0, latent = 0, decoder_hidden = 0;
  std::string decoder_activation;
};

struct StepWeights {
  // Checks everything (see the top of this file).
  StepWeights(Shapes shapes, Backbone backbone, Compression compression, EnergyHead head, Decoder decoder,
              std::vector<Array> keys, std::vector<Array> values, Array rope_cos, Array rope_sin);

  Shapes shapes;
  Backbone backbone;
  Compression compression;
  EnergyHead head;
  Decoder decoder;
  std::vector<Array> keys, values;  // per layer [slots + 1, kv_heads, capacity, head_dim]
  Array rope_cos, rope_sin;         // [capacity, head_dim]

  int capacity() const { return static_cast<int>(rope_cos.shape[0]); }  // positions per slot
  int scratch_slot() const { return static_cast<int>(keys[0].shape[0]) - 1; }  // the last slot a row may write
};

}  // namespace calm_cpu
