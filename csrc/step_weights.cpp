// StepWeights' checks at construction (step_weights.h): each failure names the field, what it expected and what it
// got, in the words of ModelWeights (calm_engine/engine/weights.py).
#include "step_weights.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace calm_cpu {

namespace {

constexpr int64_t kAny = -1;  // a dimension any positive size fits

// A dimension a field must have: its size (or kAny) and what it is, e.g. {384, "(heads + 2 kv_heads) head_dim"}.
struct Dim {
  int64_t size;
  std::string meaning;
};

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

std::string dims_text(const std::vector<Dim>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    text += i ? ", " : "";
    text += dims[i].size == kAny ? dims[i].meaning : std::to_string(dims[i].size) + " = " + dims[i].meaning;
  }
  return text + "]";
}

[[noreturn]] void fail(const std::string& field, const std::string& problem) {
  throw std::invalid_argument("StepWeights: " + field + ": " + problem);
}

void check_array(const std::string& field, const Array& a, const std::vector<Dim>& dims, bool writable = false) {
  if (!a.present()) fail(field, "expected an array " + dims_text(dims) + ", got None");
  if (a.dtype != "float32") fail(field, "expected float32, got " + a.dtype);
  if (!a.c_contiguous) fail(field, "expected a C-contiguous array (a view of contiguous storage), got a strided one");
  bool fits = a.shape.size() == dims.size();
  for (size_t i = 0; fits && i < dims.size(); ++i)
    fits = dims[i].size == kAny ? a.shape[i] > 0 : a.shape[i] == dims[i].size;
  if (!fits) fail(field, "expected " + dims_text(dims) + ", got " + shape_text(a.shape));
  if (writable && !a.writable)
    fail(field, "expected a writable array (the step writes the cache), got a read-only one");
}

void check_linear(const std::string& field, const Linear& l, const Dim& out, const Dim& in) {
  check_array(field + ".weight", l.weight, {out, in});
  if (l.bias.present()) check_array(field + ".bias", l.bias, {{l.out(), "out"}});
}

void check_norm(const std::string& field, const Norm& n, const Dim& size, bool layer_norm) {
  check_array(field + ".weight", n.weight, {size});
  if (layer_norm && !n.bias.present())
    fail(field + ".bias", "expected a LayerNorm's bias " + dims_text({size}) + ", got None");
  if (!layer_norm && n.bias.present()) fail(field + ".bias", "expected None (an RMSNorm), got an array");
  if (layer_norm) check_array(field + ".bias", n.bias, {size});
  if (!(std::isfinite(n.eps) && n.eps >= 0.0f))
    fail(field + ".eps", "expected a finite eps >= 0, got " + std::to_string(n.eps));
}

// gate_up [2 inner, width] (gate rows, then up rows) and down [width, inner]; the activation `expected`, parsed into
// mlp.act.
void check_mlp(const std::string& field, GatedMLP& mlp, const Dim& width, const std::string& expected,
               const char* expected_field) {
  check_linear(field + ".gate_up", mlp.gate_up, {kAny, "2 inner"}, width);
  if (mlp.gate_up.out() % 2 != 0)
    fail(field + ".gate_up.weight", "expected an even number of rows (gate rows, then up rows), got " +
                                        shape_text(mlp.gate_up.weight.shape));
  check_linear(field + ".down", mlp.down, width, {mlp.gate_up.out() / 2, "inner"});
  if (mlp.activation != expected)
    fail(field + ".activation", "'" + mlp.activation + "' differs from " + expected_field + " '" + expected + "'");
  mlp.act = parse_activation(mlp.activation);  // known: check_shapes parsed `expected`
}

void check_shapes(const Shapes& s) {
  const std::pair<const char*, int> sizes[] = {
      {"hidden", s.hidden}, {"heads", s.heads},   {"kv_heads", s.kv_heads}, {"head_dim", s.head_dim},
      {"chunk_size", s.chunk_size}, {"vocab", s.vocab}, {"noise", s.noise}, {"latent", s.latent},
      {"decoder_hidden", s.decoder_hidden}};
  for (const auto& [name, size] : sizes)
    if (size < 1)
      fail(std::string("shapes.") + name,
           "expected a positive size, got " + std::to_string(size) + " (the C++ step runs CALM models only)");
  if (s.heads % s.kv_heads != 0)
    fail("shapes.heads", std::to_string(s.heads) + " is not a multiple of kv_heads " + std::to_string(s.kv_heads));
  if (s.head_dim % 2 != 0)
    fail("shapes.head_dim", "expected an even size (rotary pairs), got " + std::to_string(s.head_dim));
  const std::pair<const char*, const std::string*> activations[] = {{"activation", &s.activation},
                                                                     {"decoder_activation", &s.decoder_activation}};
  for (const auto& [name, value] : activations) {
    try {
      parse_activation(*value);
    } catch (const std::invalid_argument& error) {
      fail(std::string("shapes.") + name, error.what());
    }
  }
}

}  // namespace

StepWeights::StepWeights(Shapes shapes_, Backbone backbone_, Compression compression_, EnergyHead head_,
                         Decoder decoder_, std::vector<Array> keys_, std::vector<Array> values_, Array rope_cos_,
                         Array rope_sin_)
    : shapes(std::move(shapes_)), backbone(std::move(backbone_)), compression(std::move(compression_)),
      head(std::move(head_)), decoder(std::move(decoder_)), keys(std::move(keys_)), values(std::move(values_)),
      rope_cos(std::move(rope_cos_)), rope_sin(std::move(rope_sin_)) {
  const Shapes& s = shapes;
  check_shapes(s);
  const Dim hidden{s.hidden, "hidden"}, vocab{s.vocab, "vocab"}, head_dim{s.head_dim, "head_dim"};
  const Dim decoder_hidden{s.decoder_hidden, "decoder_hidden"};

  check_array("backbone.embed", backbone.embed, {vocab, hidden});
  if (backbone.layers.empty()) fail("backbone.layers", "expected at least one layer, got none");
  for (size_t i = 0; i < backbone.layers.size(); ++i) {
    BackboneLayer& layer = backbone.layers[i];
    const std::string field = "backbone.layers[" + std::to_string(i) + "]";
    check_norm(field + ".input_norm", layer.input_norm, hidden, false);
    check_linear(field + ".qkv", layer.qkv, {(s.heads + 2 * s.kv_heads) * s.head_dim, "(heads + 2 kv_heads) head_dim"},
                 hidden);
    check_linear(field + ".o", layer.o, hidden, {s.heads * s.head_dim, "heads head_dim"});
    check_norm(field + ".post_norm", layer.post_norm, hidden, false);
    check_mlp(field + ".mlp", layer.mlp, hidden, s.activation, "shapes.activation");
  }
  check_norm("backbone.norm", backbone.norm, hidden, false);

  check_linear("compression.first", compression.first, {kAny, "inner"},
               {s.chunk_size * s.hidden, "chunk_size hidden"});
  check_linear("compression.second", compression.second, hidden, {compression.first.out(), "inner"});
  check_norm("compression.norm", compression.norm, hidden, true);

  // The head runs at the backbone's width throughout; its blocks' inner widths are free.
  check_linear("head.hidden_embed", head.hidden_embed, hidden, hidden);
  check_norm("head.hidden_norm", head.hidden_norm, hidden, true);
  check_linear("head.noise_embed", head.noise_embed, hidden, {s.noise, "noise"});
  check_norm("head.noise_norm", head.noise_norm, hidden, true);
  for (size_t i = 0; i < head.blocks.size(); ++i) {
    const HeadBlock& b = head.blocks[i];
    const std::string field = "head.blocks[" + std::to_string(i) + "]";
    check_norm(field + ".norm", b.norm, hidden, true);
    check_linear(field + ".hidden_half", b.hidden_half, {kAny, "inner"}, hidden);
    check_linear(field + ".noise_half", b.noise_half, {b.hidden_half.out(), "hidden_half's out"}, hidden);
    check_linear(field + ".second", b.second, {kAny, "inner"}, {b.hidden_half.out(), "hidden_half's out"});
    check_linear(field + ".third", b.third, {2 * s.hidden, "2 hidden (gate, up)"}, {b.second.out(), "second's out"});
    check_linear(field + ".down", b.down, hidden, hidden);
  }
  check_norm("head.final_norm", head.final_norm, hidden, true);
  check_linear("head.final_first", head.final_first, {kAny, "inner"}, hidden);
  check_linear("head.final_second", head.final_second, {s.latent, "latent"}, {head.final_first.out(), "inner"});

  check_linear("decoder.latent_to_hidden", decoder.latent_to_hidden, decoder_hidden, {s.latent, "latent"});
  for (size_t i = 0; i < decoder.layers.size(); ++i) {
    const std::string field = "decoder.layers[" + std::to_string(i) + "]";
    check_norm(field + ".norm", decoder.layers[i].norm, decoder_hidden, false);
    check_mlp(field + ".mlp", decoder.layers[i].mlp, decoder_hidden, s.decoder_activation, "shapes.decoder_activation");
  }
  check_linear("decoder.expand", decoder.expand, {s.chunk_size * s.decoder_hidden, "chunk_size decoder_hidden"},
               decoder_hidden);
  check_norm("decoder.norm", decoder.norm, decoder_hidden, false);
  check_array("decoder.projection", decoder.projection, {vocab, decoder_hidden});

  // The cache: one [slots + 1, kv_heads, capacity, head_dim] per layer, all alike; the rotary tables [capacity, d].
  check_array("rope_cos", rope_cos, {{kAny, "capacity"}, head_dim});
  check_array("rope_sin", rope_sin, {{capacity(), "capacity"}, head_dim});
  const size_t layers = backbone.layers.size();
  if (keys.size() != layers || values.size() != layers)
    fail("keys", "expected one keys and one values array per layer (" + std::to_string(layers) + "), got " +
                     std::to_string(keys.size()) + " and " + std::to_string(values.size()));
  check_array("keys[0]", keys[0], {{kAny, "slots + 1"}, {s.kv_heads, "kv_heads"}, {capacity(), "capacity"}, head_dim},
              true);
  const std::vector<Dim> cache{{keys[0].shape[0], "slots + 1"}, {s.kv_heads, "kv_heads"}, {capacity(), "capacity"},
                               head_dim};
  for (size_t i = 0; i < layers; ++i) {
    check_array("keys[" + std::to_string(i) + "]", keys[i], cache, true);
    check_array("values[" + std::to_string(i) + "]", values[i], cache, true);
  }
}

}  // namespace calm_cpu
