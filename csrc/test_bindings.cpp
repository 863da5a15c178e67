// For tests only, in the submodule _calm_cpu.testing: each of the decode step's kernels on its own at a given
// instruction-set level (isa.h): packed products, exp, SiLU, one attention head and the screened vocabulary argmax
// (bfloat16 and int8 screens).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bf16_products.h"
#include "int8_products.h"
#include "isa.h"
#include "packed_linear.h"
#include "vocab_screen.h"

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

const calm_cpu::StepKernels& kernels_of(const std::string& isa) { return calm_cpu::step_kernels(calm_cpu::parse_isa(isa)); }

// y [R, out] of x [R, in] and W [out, in] (+ bias [out]) through the level's packed kernel, for the groups g0..g1 of
// pack_width(isa) outputs only; y is read (accumulate) and written in place, columns outside the groups untouched.
void packed_linear_into(const std::string& isa, FloatArray x, FloatArray weight, std::optional<FloatArray> bias,
                        py::array_t<float> y, bool accumulate, int g0, int g1) {
  const calm_cpu::StepKernels& k = kernels_of(isa);
  if (k.packed_linear == nullptr) throw std::invalid_argument("packed_linear_into: no packed products at " + isa);
  if (x.ndim() != 2 || weight.ndim() != 2 || x.shape(1) != weight.shape(1) || y.ndim() != 2 ||
      y.shape(0) != x.shape(0) || y.shape(1) != weight.shape(0) || !(y.flags() & py::array::c_style) ||
      (bias && (bias->ndim() != 1 || bias->shape(0) != weight.shape(0))))
    throw std::invalid_argument("packed_linear_into: expected x [R, in], weight [out, in], bias [out], y [R, out]");
  calm_cpu::PackedLinear packed(weight.data(), static_cast<int>(weight.shape(0)), static_cast<int>(weight.shape(1)),
                                k.pack_width);
  if (g0 < 0 || g1 > packed.groups() || g0 > g1) throw std::invalid_argument("packed_linear_into: group range");
  k.packed_linear(packed, bias ? bias->data() : nullptr, x.data(), packed.in(), static_cast<int>(x.shape(0)),
                  y.mutable_data(), packed.out(), g0, g1, accumulate);
}

int pack_width(const std::string& isa) { return kernels_of(isa).pack_width; }

py::array_t<float> vector_exp(const std::string& isa, FloatArray x) {
  py::array_t<float> out(x.size());
  std::copy_n(x.data(), x.size(), out.mutable_data());
  kernels_of(isa).exp_inplace(out.mutable_data(), static_cast<int>(x.size()));
  return out;
}

py::array_t<float> vector_silu_mul(const std::string& isa, FloatArray g, std::optional<FloatArray> u) {
  if (u && u->size() != g.size()) throw std::invalid_argument("vector_silu_mul: g and u differ in size");
  py::array_t<float> out(g.size());
  kernels_of(isa).silu_mul(g.data(), u ? u->data() : nullptr, out.mutable_data(), static_cast<int>(g.size()));
  return out;
}

// One query q [d] over keys and values [length, d]: out [d] = softmax(scale q.k) v, written without being read.
void attend_head(const std::string& isa, FloatArray q, FloatArray keys, FloatArray values, float scale,
                 py::array_t<float, py::array::c_style> out) {
  if (q.ndim() != 1 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(1) != q.shape(0) ||
      values.shape(0) != keys.shape(0) || values.shape(1) != q.shape(0) || keys.shape(0) < 1 || out.size() != q.size())
    throw std::invalid_argument("attend_head: expected q [d], keys and values [length >= 1, d], out [d]");
  const int d = static_cast<int>(q.shape(0)), length = static_cast<int>(keys.shape(0));
  std::vector<float> scores(length);
  kernels_of(isa).attend_head(q.data(), keys.data(), values.data(), length, d, scale, scores.data(),
                              out.mutable_data());
}

// A screen's result on its own: (ids [R], rows left open, candidates recomputed per row [R]) from one part of the
// whole vocabulary; a row left open is reduced with a plain float32 loop (first maximum).
py::tuple picked_ids(const calm_cpu::VocabScreen& v, const float* x, int rows, const std::vector<char>& usable,
                     const calm_cpu::ScreenPart& part) {
  py::array_t<int64_t> ids(rows), candidates(rows);
  int64_t fallback = 0;
  for (int r = 0; r < rows; ++r) {
    const float* row = x + static_cast<size_t>(r) * v.in;
    int64_t& recomputed = candidates.mutable_data()[r] = 0;
    int64_t id = usable[r] ? calm_cpu::pick_candidate(v, row, r, &part, 1, recomputed) : -1;
    if (id < 0) {
      ++fallback;
      float best = -INFINITY;
      for (int c = 0; c < v.vocab; ++c) {
        float dot = 0.0f;
        for (int i = 0; i < v.in; ++i) dot += row[i] * v.weight[static_cast<size_t>(c) * v.in + i];
        if (id < 0 || dot > best) best = dot, id = c;
      }
    }
    ids.mutable_data()[r] = id;
  }
  return py::make_tuple(ids, fallback, candidates);
}

// The screened argmax on its own (one thread, one tile per `tile` ids): x [R, in] and the projection's weight
// [vocab, in] (float32), its bfloat16 bits and row norms -> (ids [R], rows projected in full). The scan runs at the
// level `isa`; the bfloat16 products on its packed kernel (`packed`: AMX tiles at amx, vdpbf16ps at avx512_bf16, the
// widened float32 kernel at avx2 and avx512) or on MKL's GEMM at `gemm_bf16`. A row the screen leaves open is reduced
// here with a plain float32 loop (first maximum). Returns (ids [R], rows left open, candidates recomputed per row [R]).
py::tuple screened_vocab_argmax(const std::string& isa, std::uintptr_t gemm_bf16, FloatArray x, FloatArray weight,
                                py::array_t<uint16_t, py::array::c_style> weight_bf16, FloatArray row_norm, int tile,
                                bool packed) {
  if (x.ndim() != 2 || weight.ndim() != 2 || x.shape(1) != weight.shape(1) || weight_bf16.ndim() != 2 ||
      weight_bf16.shape(0) != weight.shape(0) || weight_bf16.shape(1) != weight.shape(1) || row_norm.ndim() != 1 ||
      row_norm.shape(0) != weight.shape(0) || tile < 1)
    throw std::invalid_argument("screened_vocab_argmax: expected x [R, in], weight and its bfloat16 copy [V, in], norms [V]");
  const calm_cpu::Isa level = calm_cpu::parse_isa(isa);
  calm_cpu::VocabScreen v;
  v.kernels = &calm_cpu::step_kernels(level);
  v.gemm = reinterpret_cast<calm_cpu::GemmBf16>(gemm_bf16);
  v.weight = weight.data(), v.weight_bf16 = weight_bf16.data(), v.row_norm = row_norm.data();
  v.vocab = static_cast<int>(weight.shape(0)), v.in = static_cast<int>(weight.shape(1));
  v.max_row_norm = calm_cpu::largest_norm(v.row_norm, v.vocab);
  if (!(v.max_row_norm < 1e30)) throw std::invalid_argument("screened_vocab_argmax: weight rows must be finite, norm < 1e30");
  std::unique_ptr<calm_cpu::PackedBf16Projection> packed_weight;
  if (packed) {
    int group = v.kernels->screen_group;
    v.products = calm_cpu::ScreenProducts::kWidened;
    if (level >= calm_cpu::Isa::kAvx512Bf16) {
      if (v.in % (level == calm_cpu::Isa::kAmx ? 32 : 2) != 0)
        throw std::invalid_argument("screened_vocab_argmax: AMX needs a width of whole 32s, AVX512-BF16 an even one");
      group = 32;
      v.products = level == calm_cpu::Isa::kAmx ? calm_cpu::ScreenProducts::kAmx : calm_cpu::ScreenProducts::kDpbf16;
    }
    if (group == 0) throw std::invalid_argument("screened_vocab_argmax: no packed screen at " + isa);
    if (tile % group != 0) throw std::invalid_argument("screened_vocab_argmax: a packed screen needs tiles of whole groups");
    packed_weight = std::make_unique<calm_cpu::PackedBf16Projection>(v.weight_bf16, v.vocab, v.in, group);
    v.packed = packed_weight.get();
  } else if (v.gemm == nullptr) {
    throw std::invalid_argument("screened_vocab_argmax: without `packed` the products need MKL's GEMM");
  }
  const int rows = static_cast<int>(x.shape(0));
  calm_cpu::ScreenRows prepared;
  calm_cpu::ScreenPart part;
  calm_cpu::prepare_rows(v, x.data(), rows, prepared);
  calm_cpu::screen_range(v, prepared, rows, 0, v.vocab, tile, part);
  return picked_ids(v, x.data(), rows, prepared.usable, part);
}

// The int8 screen's packed weight from weight [V, in] and its row norms [V] (the step's own checks are the caller's).
std::unique_ptr<calm_cpu::PackedInt8Projection> int8_weight(const FloatArray& weight, const FloatArray& row_norm) {
  if (weight.ndim() != 2 || row_norm.ndim() != 1 || row_norm.shape(0) != weight.shape(0))
    throw std::invalid_argument("int8 screen: expected weight [V, in] and row norms [V]");
  return std::make_unique<calm_cpu::PackedInt8Projection>(weight.data(), row_norm.data(),
                                                          static_cast<int>(weight.shape(0)),
                                                          static_cast<int>(weight.shape(1)));
}

// The int8 screen's scores and bounds of x [R, in] against ids c0..c0+n-1 (c0 a multiple of 16) into scores and
// bounds [R, n], from the level's kernel or (reference) the plain loops.
void int8_scores(const std::string& isa, FloatArray x, FloatArray weight, FloatArray row_norm, int c0, int n,
                 py::array_t<float, py::array::c_style> scores, py::array_t<float, py::array::c_style> bounds,
                 bool reference) {
  const auto w = int8_weight(weight, row_norm);
  const int rows = static_cast<int>(x.shape(0));
  if (x.ndim() != 2 || x.shape(1) != weight.shape(1) || c0 < 0 || c0 % calm_cpu::kInt8Group != 0 || n < 0 ||
      c0 + n > w->vocab() || scores.ndim() != 2 || scores.shape(0) != rows || scores.shape(1) != n ||
      bounds.ndim() != 2 || bounds.shape(0) != rows || bounds.shape(1) != n)
    throw std::invalid_argument("int8_scores: expected x [R, in], ids c0 (a multiple of 16) .. c0 + n within the "
                                "vocabulary, scores and bounds [R, n]");
  const calm_cpu::StepKernels& k = kernels_of(isa);
  if (!reference && k.int8_scores == nullptr) throw std::invalid_argument("int8_scores: no int8 kernel at " + isa);
  calm_cpu::Int8Rows prepared;
  calm_cpu::prepare_int8_rows(*w, calm_cpu::largest_norm(row_norm.data(), w->vocab()), x.data(), rows, prepared);
  const calm_cpu::Int8RowsView view = calm_cpu::int8_view(*w, prepared);
  (reference ? calm_cpu::int8_scores_reference : k.int8_scores)(*w, view, rows, c0, n, scores.mutable_data(),
                                                               bounds.mutable_data());
}

// The int8-screened argmax on its own (one thread) at a level with the int8 kernel: x [R, in], the projection's
// weight [V, in] and row norms [V] -> (ids [R], rows left open, candidates recomputed per row [R]); a row left open
// is reduced with a plain float32 loop (first maximum).
py::tuple int8_screened_vocab_argmax(const std::string& isa, FloatArray x, FloatArray weight, FloatArray row_norm) {
  const calm_cpu::StepKernels& k = kernels_of(isa);
  if (k.int8_screen == nullptr) throw std::invalid_argument("int8_screened_vocab_argmax: no int8 kernel at " + isa);
  const auto w = int8_weight(weight, row_norm);
  if (x.ndim() != 2 || x.shape(1) != weight.shape(1))
    throw std::invalid_argument("int8_screened_vocab_argmax: expected x [R, in]");
  calm_cpu::VocabScreen v;
  v.weight = weight.data(), v.in = w->in(), v.vocab = w->vocab();
  const int rows = static_cast<int>(x.shape(0));
  calm_cpu::Int8Rows prepared;
  calm_cpu::prepare_int8_rows(*w, calm_cpu::largest_norm(row_norm.data(), v.vocab), x.data(), rows, prepared);
  calm_cpu::ScreenPart part;
  part.reset(rows);
  k.int8_screen(*w, calm_cpu::int8_view(*w, prepared), rows, 0, v.vocab,
                {part.lower.data(), part.overflow.data(), &part});
  return picked_ids(v, x.data(), rows, prepared.usable, part);
}

}  // namespace

void register_test_bindings(py::module_& module) {
  py::module_ m = module.def_submodule("testing", "the decode step's kernels one by one, for tests");
  m.def("pack_width", &pack_width, py::arg("isa"), "outputs per group of the level's packed products (0: none)");
  m.def("packed_linear_into", &packed_linear_into, py::arg("isa"), py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("y"), py::arg("accumulate"), py::arg("g0"), py::arg("g1"));
  m.def("vector_exp", &vector_exp, py::arg("isa"), py::arg("x"));
  m.def("vector_silu_mul", &vector_silu_mul, py::arg("isa"), py::arg("g"), py::arg("u") = py::none());
  m.def("attend_head", &attend_head, py::arg("isa"), py::arg("q"), py::arg("keys"), py::arg("values"),
        py::arg("scale"), py::arg("out"));
  m.def("screened_vocab_argmax", &screened_vocab_argmax, py::arg("isa"), py::arg("gemm_bf16"), py::arg("x"),
        py::arg("weight"), py::arg("weight_bf16"), py::arg("row_norm"), py::arg("tile"), py::arg("packed"));
  m.def("has_int8_screen", [](const std::string& isa) { return kernels_of(isa).int8_screen != nullptr; },
        py::arg("isa"));
  m.def("int8_scores", &int8_scores, py::arg("isa"), py::arg("x"), py::arg("weight"), py::arg("row_norm"),
        py::arg("c0"), py::arg("n"), py::arg("scores"), py::arg("bounds"), py::arg("reference"));
  m.def("int8_screened_vocab_argmax", &int8_screened_vocab_argmax, py::arg("isa"), py::arg("x"), py::arg("weight"),
        py::arg("row_norm"));
}
