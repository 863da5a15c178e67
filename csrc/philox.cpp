// philox_uniform: the engine's noise (kernels/philox.py, `uniform_noise_ref`) bit for bit. As tensor ops on a CPU it
// is ~130 small operations per call (about 0.9 ms at batch 1, more than the backbone of a small model); here it is a
// loop of a few microseconds. Plain pybind11 on numpy buffers, so building it needs no torch headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr float kScale = 4.6566127342e-10f;  // tl.rand's int32 -> [0, 1) scale

// The first output word of Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1).
inline uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
  return c0;
}

py::array_t<float> philox_uniform(py::array_t<int64_t, py::array::c_style> seeds,
                                  py::array_t<int64_t, py::array::c_style> counters, int64_t samples, int64_t dim) {
  if (seeds.ndim() != 1 || counters.ndim() != 1 || seeds.shape(0) != counters.shape(0)) {
    throw std::invalid_argument("philox_uniform: seeds and counters must be 1-D arrays of the same length");
  }
  if (samples < 1 || dim < 1 || samples * dim >= (int64_t{1} << 31)) {
    throw std::invalid_argument("philox_uniform: samples * dim must be in [1, 2**31)");
  }
  const int64_t rows = seeds.shape(0), per_row = samples * dim;
  py::array_t<float> out({rows, samples, dim});
  const int64_t* seed = seeds.data();
  const int64_t* counter = counters.data();
  float* result = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t r = 0; r < rows; ++r) {
      const uint64_t key = static_cast<uint64_t>(seed[r]);
      const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
      const uint32_t c1 = static_cast<uint32_t>(counter[r]);
      float* row = result + r * per_row;
      for (int64_t i = 0; i < per_row; ++i) {
        const int32_t bits = static_cast<int32_t>(philox_first_word(static_cast<uint32_t>(i), c1, k0, k1));
        const int32_t folded = bits ^ (bits >> 31);  // x < 0 -> -x - 1
        const float uniform = static_cast<float>(folded) * kScale;  // rounded, then the subtraction rounds again
        row[i] = uniform - 0.5f;
      }
    }
  }
  return out;
}

}  // namespace

void register_philox(py::module_& m) {
  m.def("philox_uniform", &philox_uniform, py::arg("seeds"), py::arg("counters"), py::arg("samples"), py::arg("dim"),
        "float32 [R, samples, dim] uniform on [-0.5, 0.5): Philox4x32-10, key = seed, counter = (i, counter, 0, 0)");
}
