// DecodeStep: one whole CALM decode step (or prefill) at T = 1 on the CPU in float32, for batches up to 64 rows.
//
// Why: at batch 1-8 a step of a small model is ~120 eager PyTorch operations of a few microseconds each, about as
// much time as its matrix products (measured in benchmarks/RESULTS.md). Here the step is one call. At the AVX2 and
// AVX-512 levels (isa.h) the matrix products run on packed copies of the weights (packed_linear.h) and the attention
// and SiLU loops are vectorised (step_kernels.h); at the generic level the products go to the sgemm of the BLAS that
// torch itself links (its address is handed over from Python, so this builds without torch headers). Two threads
// split every large product and the attention (step_tasks.h).
//
// Computes what calm_engine/engine/model_runner.py computes (its PyTorch path is the reference in the tests):
// input compression -> Llama layers over the engine's KV-cache slots -> energy head with the given noise ->
// autoencoder decoder -> vocabulary projection + argmax (first index on ties). With `vocab_screen`, the projection's
// argmax is found through a bfloat16 screen and float32 recomputation of the few ids it leaves (vocab_screen.h): the
// same argmax, with fewer float32 products.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bf16_products.h"
#include "isa.h"
#include "packed_linear.h"
#include "step_tasks.h"
#include "vocab_screen.h"

namespace py = pybind11;

namespace {

using calm_cpu::GemmTask;
using calm_cpu::Linear;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

enum class Activation { kSilu, kGelu, kGeluTanh, kRelu };

Activation parse_activation(const std::string& name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_pytorch_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  throw std::invalid_argument("DecodeStep: unknown activation " + name);
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
inline void activate_into(const calm_cpu::StepKernels& kernels, Activation a, const float* g, const float* u,
                          float* out, int n) {
  if (a == Activation::kSilu) {
    kernels.silu_mul(g, u, out, n);
    return;
  }
  for (int i = 0; i < n; ++i) out[i] = u ? activate(g[i], a) * u[i] : activate(g[i], a);
}

struct Norm {
  const float* weight = nullptr;
  const float* bias = nullptr;  // LayerNorm only
  float eps = 0.0f;
};

class DecodeStep {
 public:
  // `arrays` keeps every buffer alive; `spec` names them (see cpu_step.CpuDecodeStep for the layout).
  // `vocab_screen` is None, or (address of cblas_gemm_bf16bf16f32 or 0, the projection's weight as bfloat16 bits
  // [vocab, in], its row norms [vocab] rounded up): then the vocabulary argmax goes through the screen.
  // `isa`: the instruction-set level (isa.h), one this CPU runs. From avx2 up every linear layer but the vocabulary
  // projection runs on a packed copy of its weight, and the screen's products on a packed copy of the projection.
  DecodeStep(std::uintptr_t sgemm, std::uintptr_t set_threads_local, int threads, py::dict spec, py::list arrays,
             py::object vocab_screen, const std::string& isa)
      : sgemm_(reinterpret_cast<calm_cpu::Sgemm>(sgemm)),
        set_threads_(reinterpret_cast<calm_cpu::SetThreadsLocal>(set_threads_local)),
        isa_(calm_cpu::parse_isa(isa)),
        kernels_(calm_cpu::step_kernels(isa_)) {
    if (threads > 1) worker_ = std::make_unique<calm_cpu::GemmWorker>(sgemm_, set_threads_, kernels_);
    for (auto item : arrays) keep_.push_back(item.cast<FloatArray>());
    auto i = [&](const char* key) { return spec[key].cast<int>(); };
    hidden_ = i("hidden"), heads_ = i("heads"), kv_heads_ = i("kv_heads"), head_dim_ = i("head_dim");
    patch_ = i("patch"), noise_ = i("noise"), latent_ = i("latent"), ae_hidden_ = i("ae_hidden");
    vocab_ = i("vocab"), capacity_ = i("capacity"), slots_ = i("slots");
    act_ = parse_activation(spec["act"].cast<std::string>());
    ae_act_ = parse_activation(spec["ae_act"].cast<std::string>());
    embed_ = data(i("embed"));
    compress0_ = linear(spec["compress0"]), compress2_ = linear(spec["compress2"]);
    compress_norm_ = norm(spec["compress_norm"]);
    rope_cos_ = data(i("rope_cos")), rope_sin_ = data(i("rope_sin"));
    for (auto layer : spec["layers"].cast<py::list>()) {
      auto l = layer.cast<py::dict>();
      layers_.push_back({norm(l["input_norm"]), linear(l["qkv"]), linear(l["o"]), norm(l["post_norm"]),
                         linear(l["gate_up"]), linear(l["down"]), mutable_data(l["keys"].cast<int>()),
                         mutable_data(l["values"].cast<int>())});
    }
    final_norm_ = norm(spec["final_norm"]);
    hidden_embd_ = linear(spec["hidden_embd"]), noise_embd_ = linear(spec["noise_embd"]);
    norm_hidden_ = norm(spec["norm_hidden"]), norm_noise_ = norm(spec["norm_noise"]);
    for (auto block : spec["head_blocks"].cast<py::list>()) {
      auto b = block.cast<py::dict>();
      blocks_.push_back({norm(b["in_ln"]), linear(b["noise_half"]), linear(b["hidden_half"]), linear(b["second"]),
                         linear(b["third"]), linear(b["down"])});
    }
    final_ln_ = norm(spec["final_ln"]), final0_ = linear(spec["final0"]), final2_ = linear(spec["final2"]);
    latent_to_hidden_ = linear(spec["latent_to_hidden"]), expand_ = linear(spec["expand"]);
    for (auto layer : spec["ae_layers"].cast<py::list>()) {
      auto l = layer.cast<py::dict>();
      ae_layers_.push_back({norm(l["norm"]), linear(l["gate_up"]), linear(l["down"])});
    }
    ae_norm_ = norm(spec["ae_norm"]), lm_head_ = linear(spec["lm_head"]);
    if (kernels_.packed_linear != nullptr) pack_linears();
    if (!vocab_screen.is_none()) setup_screen(vocab_screen.cast<py::tuple>());
  }

  std::string isa() const { return calm_cpu::isa_name(isa_); }

  // Bytes of the packed weight copies (0 when the step does not pack).
  int64_t packed_bytes() const {
    int64_t total = 0;
    for (const auto& p : packed_) total += static_cast<int64_t>(p->bytes());
    return total;
  }

  // Rows of this step's vocabulary argmax that the screen could not settle (projected in full instead).
  int64_t screen_fallback_rows() const { return screen_fallback_rows_; }

  // ids [B, K], positions [B], slots [B] (int64), noise [B, noise] -> next ids [B, K]. Writes the cache.
  py::array_t<int64_t> run(py::array_t<int64_t, py::array::c_style> ids, py::array_t<int64_t, py::array::c_style> positions,
                           py::array_t<int64_t, py::array::c_style> slots, FloatArray noise) {
    const int batch = check_rows("run", ids, positions, slots);
    check_noise("run", noise, batch);
    py::array_t<int64_t> result({batch, patch_});
    int64_t* out = result.mutable_data();
    {
      py::gil_scoped_release release;
      StepThreads threads(*this);
      std::vector<float> x;
      forward(ids.data(), positions.data(), slots.data(), batch, x);
      sample_into(x, noise.data(), batch, out);
    }
    return result;
  }

  // A prefill: rows [R] of chunks (ids [R, K]) at chunk positions [R] in slots [R], every prompt's chunks in order,
  // and `last` [B] the row of each prompt's last chunk, noise [B, noise] -> the first generated chunk of each prompt
  // [B, K]. Writes the cache at every row's position.
  py::array_t<int64_t> prefill(py::array_t<int64_t, py::array::c_style> ids,
                               py::array_t<int64_t, py::array::c_style> positions,
                               py::array_t<int64_t, py::array::c_style> slots,
                               py::array_t<int64_t, py::array::c_style> last, FloatArray noise) {
    const int rows = check_rows("prefill", ids, positions, slots);
    const int batch = static_cast<int>(last.size());
    check_noise("prefill", noise, batch);
    const int64_t* row = last.data();
    for (int b = 0; b < batch; ++b)
      if (row[b] < 0 || row[b] >= rows) throw std::invalid_argument("DecodeStep.prefill: last row out of range");
    py::array_t<int64_t> result({batch, patch_});
    int64_t* out = result.mutable_data();
    {
      py::gil_scoped_release release;
      StepThreads threads(*this);
      std::vector<float> x, picked(static_cast<size_t>(batch) * hidden_);
      forward(ids.data(), positions.data(), slots.data(), rows, x);
      for (int b = 0; b < batch; ++b) std::copy_n(x.data() + row[b] * hidden_, hidden_, picked.data() + b * hidden_);
      sample_into(picked, noise.data(), batch, out);
    }
    return result;
  }

 private:
  // For the length of a call: each thread runs its BLAS calls single-threaded, and the worker spins.
  struct StepThreads {
    explicit StepThreads(DecodeStep& step) : step_(step), previous_(step.set_threads_(1)) {
      if (step_.worker_) step_.worker_->begin();
    }
    ~StepThreads() {
      if (step_.worker_) step_.worker_->end();
      step_.set_threads_(previous_);
    }
    DecodeStep& step_;
    int previous_;
  };

  // Checks ids [R, K], positions [R] and slots [R] (ids in the vocabulary, positions and slots in the cache) -> R.
  int check_rows(const char* caller, const py::array_t<int64_t, py::array::c_style>& ids,
                 const py::array_t<int64_t, py::array::c_style>& positions,
                 const py::array_t<int64_t, py::array::c_style>& slots) const {
    const std::string name = std::string("DecodeStep.") + caller;
    const int rows = static_cast<int>(ids.shape(0));
    if (ids.ndim() != 2 || ids.shape(1) != patch_ || positions.size() != rows || slots.size() != rows)
      throw std::invalid_argument(name + ": expected ids [R, K], positions [R] and slots [R]");
    const int64_t* id = ids.data();
    const int64_t* pos = positions.data();
    const int64_t* slot = slots.data();
    for (int r = 0; r < rows; ++r) {
      if (pos[r] < 0 || pos[r] >= capacity_ || slot[r] < 0 || slot[r] > slots_)
        throw std::invalid_argument(name + ": position or slot out of range");
      for (int j = 0; j < patch_; ++j)
        if (id[r * patch_ + j] < 0 || id[r * patch_ + j] >= vocab_) throw std::invalid_argument(name + ": id");
    }
    return rows;
  }

  void check_noise(const char* caller, const FloatArray& noise, int batch) const {
    if (noise.ndim() != 2 || noise.shape(0) != batch || noise.shape(1) != noise_)
      throw std::invalid_argument(std::string("DecodeStep.") + caller + ": expected noise [B, noise]");
  }

  // Input compression (the chunk's K embeddings side by side -> Linear, SiLU, Linear, LayerNorm) -> the Llama
  // layers over the cache -> the final RMSNorm: x [rows, hidden].
  void forward(const int64_t* id, const int64_t* pos, const int64_t* slot, int rows, std::vector<float>& x) {
    const int h = hidden_;
    std::vector<float> embedded(static_cast<size_t>(rows) * patch_ * h), inner;
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < patch_; ++j)
        std::copy_n(embed_ + id[r * patch_ + j] * h, h, embedded.data() + (static_cast<size_t>(r) * patch_ + j) * h);
    gemm(compress0_, embedded.data(), rows, inner);
    activate_into(kernels_, Activation::kSilu, inner.data(), nullptr, inner.data(), static_cast<int>(inner.size()));
    gemm(compress2_, inner.data(), rows, x);
    layer_norm(compress_norm_, x.data(), rows, h);
    backbone(x, rows, pos, slot);
    rms_norm(final_norm_, x.data(), x.data(), rows, h);
  }

  // Energy head with the given noise -> autoencoder decoder -> vocabulary argmax, for hidden rows x.
  void sample_into(const std::vector<float>& x, const float* noise, int batch, int64_t* out) {
    std::vector<float> latent;
    head(x, noise, batch, latent);
    decode_argmax(latent, batch, out);
  }

  struct Layer {
    Norm input_norm;
    Linear qkv, o;
    Norm post_norm;
    Linear gate_up, down;
    float* keys;
    float* values;
  };
  struct Block {
    Norm in_ln;
    Linear noise_half, hidden_half, second, third, down;
  };
  struct AELayer {
    Norm norm;
    Linear gate_up, down;
  };

  const float* data(int index) const { return keep_.at(index).data(); }
  float* mutable_data(int index) { return keep_.at(index).mutable_data(); }

  void pack_linears() {
    std::vector<Linear*> all = {&compress0_, &compress2_, &hidden_embd_, &noise_embd_, &final0_, &final2_,
                                &latent_to_hidden_, &expand_};
    for (auto& l : layers_) all.insert(all.end(), {&l.qkv, &l.o, &l.gate_up, &l.down});
    for (auto& b : blocks_) all.insert(all.end(), {&b.noise_half, &b.hidden_half, &b.second, &b.third, &b.down});
    for (auto& l : ae_layers_) all.insert(all.end(), {&l.gate_up, &l.down});
    // one block for all, so that its 2 MB pages hold no gaps (allocate_streamed)
    const int width = kernels_.pack_width;
    size_t total = 0;
    for (Linear* l : all) total += calm_cpu::PackedLinear::bytes_for(l->out, l->in, width);
    packed_memory_ = calm_cpu::allocate_streamed(total);
    char* next = static_cast<char*>(packed_memory_.get());
    for (Linear* l : all) {
      packed_.push_back(std::make_unique<calm_cpu::PackedLinear>(l->weight, l->out, l->in, width,
                                                                 reinterpret_cast<float*>(next)));
      next += packed_.back()->bytes();
      l->packed = packed_.back().get();
    }
  }

  // The screen of the vocabulary argmax from (gemm address or 0, bfloat16 weight, row norms); see screen_products.
  void setup_screen(const py::tuple& t) {
    screen_bf16_ = t[1].cast<py::array_t<uint16_t, py::array::c_style>>();
    screen_norm_ = t[2].cast<FloatArray>();
    if (screen_bf16_.ndim() != 2 || screen_bf16_.shape(0) != lm_head_.out || screen_bf16_.shape(1) != lm_head_.in ||
        screen_norm_.ndim() != 1 || screen_norm_.shape(0) != lm_head_.out)
      throw std::invalid_argument("DecodeStep: vocab_screen expects a bfloat16 weight [vocab, in] and norms [vocab]");
    screen_.kernels = &kernels_;
    screen_.gemm = reinterpret_cast<calm_cpu::GemmBf16>(t[0].cast<std::uintptr_t>());
    screen_.weight = lm_head_.weight, screen_.weight_bf16 = screen_bf16_.data(), screen_.row_norm = screen_norm_.data();
    screen_.vocab = lm_head_.out, screen_.in = lm_head_.in;
    screen_.max_row_norm = calm_cpu::largest_norm(screen_.row_norm, screen_.vocab);
    if (!(screen_.max_row_norm < 1e30))
      throw std::invalid_argument("DecodeStep: vocab_screen needs finite projection rows of norm below 1e30");
    // A packed copy for the level's kernel (MKL's GEMM repacks the weight on every call).
    int group = 0;
    if (isa_ >= calm_cpu::Isa::kAvx512Bf16 && screen_.in % 2 == 0) {
      group = 32, packed_kind_ = calm_cpu::ScreenProducts::kDpbf16;
      if (isa_ == calm_cpu::Isa::kAmx && screen_.in % 32 == 0) packed_kind_ = calm_cpu::ScreenProducts::kAmx;
    } else if (kernels_.widened_scores != nullptr) {
      group = kernels_.screen_group, packed_kind_ = calm_cpu::ScreenProducts::kWidened;
    } else if (screen_.gemm == nullptr) {
      throw std::invalid_argument("DecodeStep: the vocabulary screen at the generic level needs MKL's bfloat16 GEMM");
    }
    if (group != 0)
      packed_bf16_ = std::make_unique<calm_cpu::PackedBf16Projection>(screen_.weight_bf16, screen_.vocab, screen_.in,
                                                                      group);
    screen_.packed = packed_bf16_.get();
    if (packed_bf16_ && (packed_kind_ != calm_cpu::ScreenProducts::kDpbf16 || screen_.gemm == nullptr)) {
      screen_.weight_bf16 = nullptr;  // never read again
      screen_bf16_ = py::array_t<uint16_t, py::array::c_style>();
    }
    screening_ = true;
  }

  // Where the screen's products come from at `rows` rows: AMX tiles and the widened kernel at any row count;
  // vdpbf16ps up to kPackedScreenRows rows, above on MKL's GEMM (where torch exports it).
  calm_cpu::ScreenProducts screen_products(int rows) const {
    if (!packed_bf16_) return calm_cpu::ScreenProducts::kGemm;
    if (packed_kind_ != calm_cpu::ScreenProducts::kDpbf16 || rows <= kPackedScreenRows || screen_.gemm == nullptr)
      return packed_kind_;
    return calm_cpu::ScreenProducts::kGemm;
  }

  Linear linear(py::handle spec) {
    auto t = spec.cast<py::tuple>();  // (weight index, bias index or -1)
    Linear l;
    const auto& w = keep_.at(t[0].cast<int>());
    l.weight = w.data(), l.out = static_cast<int>(w.shape(0)), l.in = static_cast<int>(w.shape(1));
    const int bias = t[1].cast<int>();
    l.bias = bias >= 0 ? data(bias) : nullptr;
    return l;
  }

  Norm norm(py::handle spec) {
    auto t = spec.cast<py::tuple>();  // (weight index, bias index or -1, eps)
    Norm n;
    n.weight = data(t[0].cast<int>());
    const int bias = t[1].cast<int>();
    n.bias = bias >= 0 ? data(bias) : nullptr;
    n.eps = t[2].cast<float>();
    return n;
  }

  // out [rows, l.out] = in [rows, l.in] @ weight^T + bias, on the packed kernel or the sgemm (neither reads out).
  void gemm(const Linear& l, const float* in, int rows, std::vector<float>& out) {
    out.resize(static_cast<size_t>(rows) * l.out);
    gemm_into(l, in, rows, out.data(), false);
  }

  void gemm_into(const Linear& l, const float* in, int rows, float* out, bool accumulate) {
    GemmTask task{&l, in, out, rows, 0, l.out, accumulate};
    if (!worker_ || static_cast<int64_t>(rows) * l.out * l.in < kSplitWork || l.out < 32) {
      calm_cpu::run_gemm(sgemm_, kernels_, task);
      return;
    }
    GemmTask other = task;
    // the first half's groups of the packing width (also for the sgemm: any boundary is right for it)
    const int width = l.packed ? l.packed->width() : 32, groups = (l.out + width - 1) / width;
    task.n1 = other.n0 = std::min(l.out, (groups + 1) / 2 * width);
    worker_->run_pair(task, other);
  }

  static void rms_norm(const Norm& n, const float* in, float* out, int rows, int size) {
    for (int r = 0; r < rows; ++r) {
      const float* x = in + static_cast<size_t>(r) * size;
      float* y = out + static_cast<size_t>(r) * size;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int c = 0; c < size; ++c) sum += x[c] * x[c];
      const float scale = 1.0f / std::sqrt(sum / size + n.eps);
      for (int c = 0; c < size; ++c) y[c] = n.weight[c] * (x[c] * scale);
    }
  }

  static void layer_norm(const Norm& n, float* x, int rows, int size) {
    for (int r = 0; r < rows; ++r) {
      float* v = x + static_cast<size_t>(r) * size;
      float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
      for (int c = 0; c < size; ++c) mean += v[c];
      mean /= size;
#pragma omp simd reduction(+ : var)
      for (int c = 0; c < size; ++c) var += (v[c] - mean) * (v[c] - mean);
      const float scale = 1.0f / std::sqrt(var / size + n.eps);
      for (int c = 0; c < size; ++c) v[c] = (v[c] - mean) * scale * n.weight[c] + n.bias[c];
    }
  }

  // x [rows, width] += down(act(gate) * up) of the normed x; gate_up packs gate then up.
  void gated_mlp(const Norm& norm, const Linear& gate_up, const Linear& down, Activation act, std::vector<float>& x,
                 int rows, int width) {
    std::vector<float> normed(x.size()), gu, mixed;
    rms_norm(norm, x.data(), normed.data(), rows, width);
    gemm(gate_up, normed.data(), rows, gu);
    const int inner = gate_up.out / 2;
    mixed.resize(static_cast<size_t>(rows) * inner);
    for (int r = 0; r < rows; ++r) {
      const float* g = gu.data() + static_cast<size_t>(r) * gate_up.out;
      activate_into(kernels_, act, g, g + inner, mixed.data() + static_cast<size_t>(r) * inner, inner);
    }
    gemm_into(down, mixed.data(), rows, x.data(), true);
  }

  // Attention of rows b0..b1 of a layer over the cache (queries in qkv, output into attn); `scores` is the
  // thread's buffer of `capacity` scores.
  struct AttendJob {
    const DecodeStep* step;
    const Layer* layer;
    const float* qkv;
    const int64_t *pos, *slot;
    float* attn;
    int b0, b1;
    std::vector<float>* scores;
  };

  static void attend_rows(void* context) {
    const AttendJob& job = *static_cast<const AttendJob*>(context);
    const DecodeStep& s = *job.step;
    const int d = s.head_dim_, heads = s.heads_, group = s.heads_ / s.kv_heads_;
    const int width = (s.heads_ + 2 * s.kv_heads_) * d;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float>& scores = *job.scores;
    scores.resize(s.capacity_);
    for (int b = job.b0; b < job.b1; ++b) {
      const float* row = job.qkv + static_cast<size_t>(b) * width;
      const int length = static_cast<int>(job.pos[b]) + 1;
      for (int head = 0; head < heads; ++head) {
        const float* q = row + head * d;
        const size_t base = (static_cast<size_t>(job.slot[b]) * s.kv_heads_ + head / group) * s.capacity_ * d;
        s.kernels_.attend_head(q, job.layer->keys + base, job.layer->values + base, length, d, scale, scores.data(),
                               job.attn + (static_cast<size_t>(b) * heads + head) * d);
      }
    }
  }

  void backbone(std::vector<float>& x, int batch, const int64_t* pos, const int64_t* slot) {
    const int h = hidden_, d = head_dim_, half = d / 2;
    const int width = (heads_ + 2 * kv_heads_) * d;
    std::vector<float> normed(x.size()), qkv, attn(static_cast<size_t>(batch) * heads_ * d);
    std::vector<float> rotated(d);
    for (auto& layer : layers_) {
      rms_norm(layer.input_norm, x.data(), normed.data(), batch, h);
      gemm(layer.qkv, normed.data(), batch, qkv);
      for (int b = 0; b < batch; ++b) {
        float* row = qkv.data() + static_cast<size_t>(b) * width;
        const float* cos = rope_cos_ + pos[b] * d;
        const float* sin = rope_sin_ + pos[b] * d;
        for (int head = 0; head < heads_ + kv_heads_; ++head) {  // rotate q and k heads (half-split pairs)
          float* v = row + head * d;
          for (int c = 0; c < d; ++c) rotated[c] = v[c] * cos[c] + (c < half ? -v[c + half] : v[c - half]) * sin[c];
          std::copy(rotated.begin(), rotated.end(), v);
        }
        for (int kvh = 0; kvh < kv_heads_; ++kvh) {
          const size_t at = ((static_cast<size_t>(slot[b]) * kv_heads_ + kvh) * capacity_ + pos[b]) * d;
          std::copy_n(row + (heads_ + kvh) * d, d, layer.keys + at);
          std::copy_n(row + (heads_ + kv_heads_ + kvh) * d, d, layer.values + at);
        }
      }
      // Every row's keys and values are in the cache before any row attends: in a prefill, a prompt's rows read
      // the positions of the same prompt written just above (causal attention, up to the row's own position).
      // The rows are split between the two threads by their attention lengths.
      AttendJob jobs[2] = {{this, &layer, qkv.data(), pos, slot, attn.data(), 0, batch, &scores_[0]},
                           {this, &layer, qkv.data(), pos, slot, attn.data(), batch, batch, &scores_[1]}};
      int64_t work = 0, done = 0;
      for (int b = 0; b < batch; ++b) work += pos[b] + 1;
      if (worker_ && work * heads_ * d >= kSplitAttention) {
        int split = 0;
        while (split < batch && 2 * (done + pos[split] + 1) <= work) done += pos[split++] + 1;
        jobs[0].b1 = jobs[1].b0 = split;
        GemmTask mine, theirs;
        mine.job = theirs.job = &DecodeStep::attend_rows;
        mine.context = &jobs[0], theirs.context = &jobs[1];
        worker_->run_pair(mine, theirs);
      } else {
        attend_rows(&jobs[0]);
      }
      gemm_into(layer.o, attn.data(), batch, x.data(), true);
      gated_mlp(layer.post_norm, layer.gate_up, layer.down, act_, x, batch, h);
    }
  }

  void head(const std::vector<float>& hidden, const float* noise, int batch, std::vector<float>& latent) {
    const int c = hidden_;
    std::vector<float> condition, z, normed(static_cast<size_t>(batch) * c), row_part, y, y2, gu, mixed;
    gemm(hidden_embd_, hidden.data(), batch, condition);
    layer_norm(norm_hidden_, condition.data(), batch, c);
    gemm(noise_embd_, noise, batch, z);
    layer_norm(norm_noise_, z.data(), batch, c);
    for (const auto& block : blocks_) {
      gemm(block.hidden_half, condition.data(), batch, row_part);  // carries the first linear's bias
      std::copy(z.begin(), z.end(), normed.begin());
      layer_norm(block.in_ln, normed.data(), batch, c);
      y = row_part;
      gemm_into(block.noise_half, normed.data(), batch, y.data(), true);
      activate_into(kernels_, Activation::kSilu, y.data(), nullptr, y.data(), static_cast<int>(y.size()));
      gemm(block.second, y.data(), batch, y2);
      activate_into(kernels_, Activation::kSilu, y2.data(), nullptr, y2.data(), static_cast<int>(y2.size()));
      gemm(block.third, y2.data(), batch, gu);
      mixed.resize(static_cast<size_t>(batch) * c);
      for (int r = 0; r < batch; ++r) {
        const float* g = gu.data() + static_cast<size_t>(r) * 2 * c;
        activate_into(kernels_, Activation::kSilu, g, g + c, mixed.data() + static_cast<size_t>(r) * c, c);
      }
      gemm_into(block.down, mixed.data(), batch, z.data(), true);
    }
    layer_norm(final_ln_, z.data(), batch, c);
    gemm(final0_, z.data(), batch, y);
    activate_into(kernels_, Activation::kSilu, y.data(), nullptr, y.data(), static_cast<int>(y.size()));
    gemm(final2_, y.data(), batch, latent);
  }

  void decode_argmax(const std::vector<float>& latent, int batch, int64_t* out) {
    const int a = ae_hidden_;
    std::vector<float> x, expanded, normed;
    gemm(latent_to_hidden_, latent.data(), batch, x);
    const size_t stage = ae_layers_.size() / 2;
    for (size_t i = 0; i < stage; ++i)
      gated_mlp(ae_layers_[i].norm, ae_layers_[i].gate_up, ae_layers_[i].down, ae_act_, x, batch, a);
    gemm(expand_, x.data(), batch, expanded);  // [B, K*a] = [B*K, a]
    const int rows = batch * patch_;
    for (size_t i = stage; i < ae_layers_.size(); ++i)
      gated_mlp(ae_layers_[i].norm, ae_layers_[i].gate_up, ae_layers_[i].down, ae_act_, expanded, rows, a);
    normed.resize(expanded.size());
    rms_norm(ae_norm_, expanded.data(), normed.data(), rows, a);
    if (screening_)
      screened_argmax(normed.data(), rows, out);
    else
      projected_argmax(normed.data(), rows, out);
  }

  // The vocabulary argmax of rows x from the float32 projection. The two threads take the two halves of the
  // vocabulary, each in tiles (run_argmax); the lower half wins ties.
  void projected_argmax(const float* x, int rows, int64_t* out) {
    GemmTask mine{&lm_head_, x, nullptr, rows, 0, vocab_, false, &argmax_[0]};
    if (worker_ && vocab_ >= 2 * calm_cpu::kVocabTile) {
      GemmTask theirs = mine;
      mine.n1 = theirs.n0 = (vocab_ / 2) & ~15;
      theirs.best = &argmax_[1];
      worker_->run_pair(mine, theirs);
      for (int r = 0; r < rows; ++r)
        out[r] = argmax_[1].value[r] > argmax_[0].value[r] ? argmax_[1].index[r] : argmax_[0].index[r];
    } else {
      calm_cpu::run_gemm(sgemm_, kernels_, mine);
      std::copy(argmax_[0].index.begin(), argmax_[0].index.end(), out);
    }
  }

  // The two threads screen the two halves of the vocabulary (whole tiles, the lower half first in id order); then each
  // row's candidates are recomputed in float32 here. If the screen leaves any row open (ties or near-ties among more
  // than kMaxCandidates ids, or a non-finite row), all rows are projected in full, as without the screen: the same
  // products at the same row count, so such rows get the same argmax as the unscreened step.
  void screened_argmax(const float* x, int rows, int64_t* out) {
    const int a = lm_head_.in;
    screen_.products = screen_products(rows);
    calm_cpu::prepare_rows(screen_, x, rows, screen_rows_);
    calm_cpu::ScreenTask shares[2];
    for (int p = 0; p < 2; ++p) shares[p] = {&screen_, &screen_rows_, &screen_parts_[p]};
    GemmTask mine{&lm_head_, nullptr, nullptr, rows, 0, vocab_};
    mine.screen = &shares[0];
    const int tiles = (vocab_ + calm_cpu::kVocabTile - 1) / calm_cpu::kVocabTile;
    int parts = 1;
    if (worker_ && tiles >= 2) {
      GemmTask theirs = mine;
      mine.n1 = theirs.n0 = (tiles + 1) / 2 * calm_cpu::kVocabTile;
      theirs.screen = &shares[1];
      worker_->run_pair(mine, theirs);
      parts = 2;
    } else {
      calm_cpu::run_gemm(sgemm_, kernels_, mine);
    }
    screen_fallback_rows_ = 0;
    for (int r = 0; r < rows; ++r) {
      const float* row = x + static_cast<size_t>(r) * a;
      out[r] = screen_rows_.usable[r] ? calm_cpu::pick_candidate(screen_, row, r, screen_parts_, parts) : -1;
      screen_fallback_rows_ += out[r] < 0;
    }
    if (screen_fallback_rows_ == 0) return;
    std::vector<int64_t> whole(rows);
    projected_argmax(x, rows, whole.data());
    for (int r = 0; r < rows; ++r)
      if (out[r] < 0) out[r] = whole[r];
  }

  calm_cpu::Sgemm sgemm_;
  calm_cpu::SetThreadsLocal set_threads_;
  calm_cpu::Isa isa_;
  const calm_cpu::StepKernels& kernels_;
  // With AMX the screen always runs from packed_bf16_ on tiles, and at avx2 / avx512 on the widened kernel: there
  // MKL's bfloat16 GEMM has no bfloat16 arithmetic to use. Unscreened over screened step time, small shape, 2 threads,
  // MKL restricted to the level: AVX2 batch 8 1.05-1.11x with the widened kernel at every row count, 0.94x with MKL's
  // GEMM above 8 rows (batch 32 1.01x, batch 64 0.99x widened); AVX-512F batch 8 1.18x and 0.81x. With AVX512-BF16
  // the screen runs from packed_bf16_ up to this many rows and on MKL's GEMM above, which repacks the weight per call
  // but multiplies faster. Measured with the tile kernel off: small shape, 2 threads, whole steps with one or the
  // other, packed / MKL: 8 rows 0.69-0.73 / 0.73-0.75 ms, 16 rows 0.95-0.98 / 0.89-0.91 ms; at 4 rows the screen's
  // share of the step fell from 0.21 to 0.08 ms.
  static constexpr int kPackedScreenRows = 8;
  static constexpr int64_t kSplitWork = 1 << 16;  // below this many multiply-adds a hand-over costs more than it saves
  static constexpr int64_t kSplitAttention = 1 << 13;  // the same for attention, whose scalar loops cost more per madd
  std::unique_ptr<calm_cpu::GemmWorker> worker_;
  std::vector<float> scores_[2];  // attention scores of this thread and of the worker
  std::unique_ptr<void, calm_cpu::AlignedFree> packed_memory_;  // the packed weights of packed_
  std::vector<std::unique_ptr<calm_cpu::PackedLinear>> packed_;
  bool screening_ = false;  // the vocabulary argmax through screen_
  calm_cpu::VocabScreen screen_;
  std::unique_ptr<calm_cpu::PackedBf16Projection> packed_bf16_;
  calm_cpu::ScreenProducts packed_kind_ = calm_cpu::ScreenProducts::kGemm;  // the kernel that reads packed_bf16_
  py::array_t<uint16_t, py::array::c_style> screen_bf16_;
  FloatArray screen_norm_;
  calm_cpu::ScreenPart screen_parts_[2];
  calm_cpu::ScreenRows screen_rows_;
  int64_t screen_fallback_rows_ = 0;
  calm_cpu::ArgmaxResult argmax_[2];  // the vocabulary halves of this thread and of the worker
  std::vector<FloatArray> keep_;
  int hidden_, heads_, kv_heads_, head_dim_, patch_, noise_, latent_, ae_hidden_, vocab_, capacity_, slots_;
  Activation act_, ae_act_;
  const float* embed_;
  Linear compress0_, compress2_;
  Norm compress_norm_;
  const float *rope_cos_, *rope_sin_;
  std::vector<Layer> layers_;
  Norm final_norm_;
  Linear hidden_embd_, noise_embd_;
  Norm norm_hidden_, norm_noise_;
  std::vector<Block> blocks_;
  Norm final_ln_;
  Linear final0_, final2_, latent_to_hidden_, expand_;
  std::vector<AELayer> ae_layers_;
  Norm ae_norm_;
  Linear lm_head_;
};

}  // namespace

void register_decode_step(py::module_& m) {
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<std::uintptr_t, std::uintptr_t, int, py::dict, py::list, py::object, const std::string&>(),
           py::arg("sgemm"), py::arg("set_threads_local"), py::arg("threads"), py::arg("spec"), py::arg("arrays"),
           py::arg("vocab_screen") = py::none(), py::arg("isa") = "generic")
      .def_property_readonly("isa", &DecodeStep::isa)
      .def_property_readonly("packed_bytes", &DecodeStep::packed_bytes)
      .def_property_readonly("screen_fallback_rows", &DecodeStep::screen_fallback_rows)
      .def("run", &DecodeStep::run, py::arg("ids"), py::arg("positions"), py::arg("slots"), py::arg("noise"))
      .def("prefill", &DecodeStep::prefill, py::arg("ids"), py::arg("positions"), py::arg("slots"), py::arg("last"),
           py::arg("noise"));
}
