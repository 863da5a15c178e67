// The step's operations along a row: RMSNorm, LayerNorm and the MLPs' activations.
#pragma once

#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>

#include "isa.h"

namespace calm_cpu {

enum class Activation { kSilu, kGelu, kGeluTanh, kRelu };

// The activation called `name` (the config's hidden_act); std::invalid_argument naming the known ones otherwise.
inline Activation parse_activation(const std::string& name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_pytorch_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  throw std::invalid_argument("unknown activation '" + name + "' (known: silu, gelu, gelu_pytorch_tanh, relu)");
}

inline float activate(float x, Activation a) {
  switch (a) {
    case Activation::kSilu:
      return x / (1.0f + std::exp(-x));
    case Activation::kGelu:
      return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + std::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
  }
  return x;
}

// out[i] = act(g[i]) * u[i] (u null: act(g[i])) for n values; out may be g. SiLU through the level's kernel.
inline void activate_into(const StepKernels& kernels, Activation a, const float* g, const float* u, float* out,
                          int n) {
  if (a == Activation::kSilu) {
    kernels.silu_mul(g, u, out, n);
    return;
  }
  for (int i = 0; i < n; ++i) out[i] = u ? activate(g[i], a) * u[i] : activate(g[i], a);
}

// out [rows, size] = weight * x / sqrt(mean(x^2) + eps), row by row; out may be in.
inline void rms_norm(const float* weight, float eps, const float* in, float* out, int rows, int size) {
  for (int r = 0; r < rows; ++r) {
    const float* x = in + static_cast<size_t>(r) * size;
    float* y = out + static_cast<size_t>(r) * size;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < size; ++c) sum += x[c] * x[c];
    const float scale = 1.0f / std::sqrt(sum / size + eps);
    for (int c = 0; c < size; ++c) y[c] = weight[c] * (x[c] * scale);
  }
}

// x [rows, size] = (x - mean) / sqrt(var + eps) * weight + bias, in place, row by row.
inline void layer_norm(const float* weight, const float* bias, float eps, float* x, int rows, int size) {
  for (int r = 0; r < rows; ++r) {
    float* v = x + static_cast<size_t>(r) * size;
    float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
    for (int c = 0; c < size; ++c) mean += v[c];
    mean /= size;
#pragma omp simd reduction(+ : var)
    for (int c = 0; c < size; ++c) var += (v[c] - mean) * (v[c] - mean);
    const float scale = 1.0f / std::sqrt(var / size + eps);
    for (int c = 0; c < size; ++c) v[c] = (v[c] - mean) * scale * weight[c] + bias[c];
  }
}

}  // namespace calm_cpu
