// The exact temperature sampler's control loop (Algorithm 1, calm_engine/engine/sampler.py) over one pool of draws.
//
// As tensor ops the loop is ~15 element-wise operations per draw (3,000 per 200-draw pool, ~10 ms on a CPU whatever
// the batch); here it is a few microseconds. Same state machine, same float32 comparison for the Bernoulli factory,
// so both give identical states (tests/engine/test_csrc.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

namespace py = pybind11;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

void exact_choice(Array<int64_t> chunks, Array<bool> valid, Array<int64_t> inv_floor, Array<float> inv_frac,
                  Array<float> uniforms, Array<bool> done, Array<int64_t> chosen, Array<int64_t> target,
                  Array<int64_t> matches, Array<bool> in_stage2, Array<int64_t> index) {
  if (chunks.ndim() != 3) throw std::invalid_argument("exact_choice: chunks must be [B, S, K]");
  const int64_t rows = chunks.shape(0), samples = chunks.shape(1), k = chunks.shape(2);
  if (valid.size() != rows * samples || uniforms.size() != rows * samples || inv_floor.size() != rows ||
      inv_frac.size() != rows || done.size() != rows || chosen.size() != rows * k || target.size() != rows * k ||
      matches.size() != rows || in_stage2.size() != rows || index.size() != rows) {
    throw std::invalid_argument("exact_choice: state and pool shapes do not match");
  }
  const int64_t* draw = chunks.data();
  const bool* use = valid.data();
  const float* u = uniforms.data();
  bool* is_done = done.mutable_data();
  int64_t* out = chosen.mutable_data();
  int64_t* candidate = target.mutable_data();
  int64_t* count = matches.mutable_data();
  bool* stage2 = in_stage2.mutable_data();
  int64_t* i = index.mutable_data();
  for (int64_t b = 0; b < rows; ++b) {
    const float frac = inv_frac.data()[b];
    int64_t* x = candidate + b * k;
    for (int64_t j = 0; j < samples && !is_done[b]; ++j) {
      if (!use[b * samples + j]) continue;
      const int64_t* p = draw + (b * samples + j) * k;
      bool same = true;
      for (int64_t c = 0; c < k; ++c) same = same && p[c] == x[c];
      if (stage2[b]) {  // the Bernoulli factory for P(x*)^a
        if (same) {
          for (int64_t c = 0; c < k; ++c) out[b * k + c] = x[c];
          is_done[b] = true;
          stage2[b] = false;
        } else if (u[b * samples + j] * static_cast<float>(i[b]) < frac) {
          stage2[b] = false;  // reject: restart stage 1
          count[b] = 0;
        } else {
          ++i[b];
        }
        continue;
      }
      if (count[b] == 0) {  // stage 1: n equal draws in a row
        for (int64_t c = 0; c < k; ++c) x[c] = p[c];
        count[b] = 1;
      } else if (same) {
        ++count[b];
      } else {
        count[b] = 0;  // restart; the mismatching draw is discarded
        continue;
      }
      if (count[b] == inv_floor.data()[b]) {
        i[b] = 1;
        if (frac == 0.0f) {
          for (int64_t c = 0; c < k; ++c) out[b * k + c] = x[c];
          is_done[b] = true;
        } else {
          stage2[b] = true;
        }
      }
    }
  }
}

}  // namespace

void register_exact_sampler(py::module_& m) {
  m.def("exact_choice", &exact_choice, "Algorithm 1 over one pool; updates the state arrays in place",
        py::arg("chunks"), py::arg("valid"), py::arg("inv_floor"), py::arg("inv_frac"), py::arg("uniforms"),
        py::arg("done"), py::arg("chosen"), py::arg("target"), py::arg("matches"), py::arg("in_stage2"),
        py::arg("index"));
}
