// The extension module calm_engine._calm_cpu: StepWeights and its parts, DecodeStep on numpy arrays, the levels this
// CPU runs, and the helpers registered by their own files (philox.cpp, exact_sampler.cpp; test_bindings.cpp's
// kernels in the submodule `testing`). Plain pybind11 on numpy buffers, so building it needs no torch headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "blas.h"
#include "decode_step.h"
#include "isa.h"
#include "step_weights.h"

namespace py = pybind11;
using namespace calm_cpu;

void register_philox(py::module_& m);          // philox.cpp
void register_exact_sampler(py::module_& m);   // exact_sampler.cpp
void register_test_bindings(py::module_& m);   // test_bindings.cpp

namespace {

using IdArray = py::array_t<int64_t, py::array::c_style>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// A numpy array (or None: absent) as the step holds it; StepWeights checks its type, layout and shape.
Array to_array(const py::object& object) {
  Array a;
  if (object.is_none()) return a;
  if (!py::isinstance<py::array>(object))
    throw py::type_error("StepWeights holds numpy arrays (a tensor's .numpy() view) or None, got " +
                         std::string(py::str(py::type::of(object).attr("__name__"))));
  const auto array = py::reinterpret_borrow<py::array>(object);
  a.data = const_cast<void*>(array.data());
  a.shape.assign(array.shape(), array.shape() + array.ndim());
  a.dtype = py::str(array.dtype());
  a.c_contiguous = (array.flags() & py::array::c_style) != 0;
  a.writable = array.writeable();
  a.owner = std::shared_ptr<void>(array.inc_ref().ptr(), [](void* p) {
    py::gil_scoped_acquire gil;
    Py_DECREF(static_cast<PyObject*>(p));
  });
  return a;
}

py::object to_python(const Array& a) {
  if (!a.present()) return py::none();
  return py::reinterpret_borrow<py::object>(static_cast<PyObject*>(a.owner.get()));
}

std::vector<Array> to_arrays(const std::vector<py::object>& objects) {
  std::vector<Array> arrays;
  for (const auto& object : objects) arrays.push_back(to_array(object));
  return arrays;
}

template <class T>
void array_property(py::class_<T>& c, const char* name, Array T::*member) {
  c.def_property_readonly(name, [member](const T& t) { return to_python(t.*member); });
}

// DecodeStep on numpy arrays: shapes checked here, values by the step; the GIL released while it runs.
class PyDecodeStep {
 public:
  // vocab_screen: None, or (address of cblas_gemm_bf16bf16f32 or 0, the projection's bfloat16 bits [vocab, in],
  // upper bounds of its row norms [vocab]): the vocabulary argmax then goes through the screen.
  PyDecodeStep(const StepWeights& weights, std::uintptr_t sgemm, std::uintptr_t set_threads_local, int threads,
               const std::string& isa, const py::object& vocab_screen) {
    if (sgemm == 0 || set_threads_local == 0)
      throw std::invalid_argument("DecodeStep: sgemm and set_threads_local must be addresses of torch's BLAS, got 0");
    Blas blas{reinterpret_cast<Sgemm>(sgemm), reinterpret_cast<SetThreadsLocal>(set_threads_local), nullptr};
    py::tuple screen;
    if (!vocab_screen.is_none()) {
      screen = vocab_screen.cast<py::tuple>();
      if (screen.size() != 3)
        throw std::invalid_argument("DecodeStep: vocab_screen is (gemm_bf16 address or 0, weight_bf16, row_norms)");
      blas.gemm_bf16 = reinterpret_cast<GemmBf16>(screen[0].cast<std::uintptr_t>());
    }
    step_ = std::make_unique<DecodeStep>(weights, blas, threads, parse_isa(isa));
    if (!vocab_screen.is_none()) enable_screen(screen[1], screen[2]);
  }

  std::string isa() const { return isa_name(step_->isa()); }
  int64_t packed_bytes() const { return step_->packed_bytes(); }
  int64_t screen_fallback_rows() const { return step_->screen_fallback_rows(); }

  // ids [B, K], positions [B], slots [B] (int64), noise [B, noise] -> next ids [B, K]. Writes the cache.
  py::array_t<int64_t> run(IdArray ids, IdArray positions, IdArray slots, FloatArray noise) {
    const int batch = check_rows("run", ids, positions, slots);
    check_noise("run", noise, batch);
    py::array_t<int64_t> result({batch, step_->weights().shapes.chunk_size});
    int64_t* out = result.mutable_data();
    {
      py::gil_scoped_release release;
      step_->run(ids.data(), positions.data(), slots.data(), batch, noise.data(), out);
    }
    return result;
  }

  // A prefill (DecodeStep::prefill): ids [R, K], positions [R], slots [R], last [B], noise [B, noise] -> [B, K].
  py::array_t<int64_t> prefill(IdArray ids, IdArray positions, IdArray slots, IdArray last, FloatArray noise) {
    const int rows = check_rows("prefill", ids, positions, slots);
    const int batch = static_cast<int>(last.size());
    check_noise("prefill", noise, batch);
    py::array_t<int64_t> result({batch, step_->weights().shapes.chunk_size});
    int64_t* out = result.mutable_data();
    {
      py::gil_scoped_release release;
      step_->prefill(ids.data(), positions.data(), slots.data(), rows, last.data(), batch, noise.data(), out);
    }
    return result;
  }

  // decode_hidden / prefill_hidden: run / prefill up to the final hidden states [B, hidden] (float32).
  py::array_t<float> decode_hidden(IdArray ids, IdArray positions, IdArray slots) {
    const int batch = check_rows("decode_hidden", ids, positions, slots);
    py::array_t<float> result({batch, step_->weights().shapes.hidden});
    float* out = result.mutable_data();
    {
      py::gil_scoped_release release;
      step_->decode_hidden(ids.data(), positions.data(), slots.data(), batch, out);
    }
    return result;
  }

  py::array_t<float> prefill_hidden(IdArray ids, IdArray positions, IdArray slots, IdArray last) {
    const int rows = check_rows("prefill_hidden", ids, positions, slots);
    const int batch = static_cast<int>(last.size());
    py::array_t<float> result({batch, step_->weights().shapes.hidden});
    float* out = result.mutable_data();
    {
      py::gil_scoped_release release;
      step_->prefill_hidden(ids.data(), positions.data(), slots.data(), rows, last.data(), batch, out);
    }
    return result;
  }

  // hidden [B, hidden], noise [B, N, noise] -> chunks [B, N, K] (DecodeStep::sample_pool).
  py::array_t<int64_t> sample_pool(FloatArray hidden, FloatArray noise) {
    const Shapes& shapes = step_->weights().shapes;
    if (hidden.ndim() != 2 || hidden.shape(1) != shapes.hidden || noise.ndim() != 3 ||
        noise.shape(0) != hidden.shape(0) || noise.shape(2) != shapes.noise || noise.shape(1) < 1)
      throw std::invalid_argument("DecodeStep.sample_pool: expected hidden [B, hidden] and noise [B, N, noise]");
    const int batch = static_cast<int>(hidden.shape(0)), samples = static_cast<int>(noise.shape(1));
    py::array_t<int64_t> result({batch, samples, shapes.chunk_size});
    int64_t* out = result.mutable_data();
    {
      py::gil_scoped_release release;
      step_->sample_pool(hidden.data(), batch, noise.data(), samples, out);
    }
    return result;
  }

  py::dict pool_stats() const {
    const PoolStats& s = step_->pool_stats();
    py::dict d;
    d["head_seconds"] = s.head_seconds, d["decoder_seconds"] = s.decoder_seconds;
    d["argmax_seconds"] = s.argmax_seconds, d["rows"] = s.rows, d["candidates"] = s.candidates;
    d["fallback_rows"] = s.fallback_rows;
    return d;
  }

 private:
  void enable_screen(const py::handle& weight_bf16, const py::handle& row_norms) {
    const Array& projection = step_->weights().decoder.projection;
    const auto bits = py::reinterpret_borrow<py::object>(weight_bf16);
    const auto norms = py::reinterpret_borrow<py::object>(row_norms);
    if (!py::isinstance<py::array_t<uint16_t>>(bits) || !py::isinstance<py::array_t<float>>(norms))
      throw std::invalid_argument("DecodeStep: vocab_screen's weight_bf16 must be a uint16 array, row_norms float32");
    screen_bf16_ = py::reinterpret_borrow<py::array>(bits);
    screen_norm_ = py::reinterpret_borrow<py::array>(norms);
    if (screen_bf16_.ndim() != 2 || screen_bf16_.shape(0) != projection.shape[0] ||
        screen_bf16_.shape(1) != projection.shape[1] || !(screen_bf16_.flags() & py::array::c_style) ||
        screen_norm_.ndim() != 1 || screen_norm_.shape(0) != projection.shape[0] ||
        !(screen_norm_.flags() & py::array::c_style))
      throw std::invalid_argument("DecodeStep: vocab_screen expects C-contiguous weight_bf16 [vocab, in] and row_norms "
                                  "[vocab] for decoder.projection [vocab, in]");
    step_->enable_screen(static_cast<const uint16_t*>(screen_bf16_.data()),
                         static_cast<const float*>(screen_norm_.data()));
    if (!step_->screen_reads_weight_bf16()) screen_bf16_ = py::array();  // the packed copy alone is read
  }

  // ids [R, K], positions [R] and slots [R] -> R.
  int check_rows(const char* caller, const IdArray& ids, const IdArray& positions, const IdArray& slots) const {
    const int rows = static_cast<int>(ids.shape(0));
    if (ids.ndim() != 2 || ids.shape(1) != step_->weights().shapes.chunk_size || positions.size() != rows ||
        slots.size() != rows)
      throw std::invalid_argument(std::string("DecodeStep.") + caller +
                                  ": expected ids [R, K], positions [R] and slots [R]");
    return rows;
  }

  void check_noise(const char* caller, const FloatArray& noise, int batch) const {
    if (noise.ndim() != 2 || noise.shape(0) != batch || noise.shape(1) != step_->weights().shapes.noise)
      throw std::invalid_argument(std::string("DecodeStep.") + caller + ": expected noise [B, noise]");
  }

  std::unique_ptr<DecodeStep> step_;
  py::array screen_bf16_, screen_norm_;  // kept alive for the screen
};

void register_step_weights(py::module_& m) {
  py::class_<StepWeights> weights(m, "StepWeights",
                                  "The model as the C++ step reads it (csrc/step_weights.h); checked at construction");
  py::class_<Shapes> shapes(weights, "Shapes");
  shapes
      .def(py::init<int, int, int, int, int, int, std::string, int, int, int, std::string>(), py::arg("hidden"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("chunk_size"), py::arg("vocab"),
           py::arg("activation"), py::arg("noise"), py::arg("latent"), py::arg("decoder_hidden"),
           py::arg("decoder_activation"))
      .def_readonly("hidden", &Shapes::hidden)
      .def_readonly("heads", &Shapes::heads)
      .def_readonly("kv_heads", &Shapes::kv_heads)
      .def_readonly("head_dim", &Shapes::head_dim)
      .def_readonly("chunk_size", &Shapes::chunk_size)
      .def_readonly("vocab", &Shapes::vocab)
      .def_readonly("activation", &Shapes::activation)
      .def_readonly("noise", &Shapes::noise)
      .def_readonly("latent", &Shapes::latent)
      .def_readonly("decoder_hidden", &Shapes::decoder_hidden)
      .def_readonly("decoder_activation", &Shapes::decoder_activation);

  py::class_<Linear> linear(weights, "Linear");
  linear.def(py::init([](const py::object& w, const py::object& b) { return Linear{to_array(w), to_array(b)}; }),
             py::arg("weight"), py::arg("bias") = py::none());
  array_property(linear, "weight", &Linear::weight);
  array_property(linear, "bias", &Linear::bias);

  py::class_<Norm> norm(weights, "Norm");
  norm.def(py::init([](const py::object& w, const py::object& b, float eps) {
             return Norm{to_array(w), to_array(b), eps};
           }),
           py::arg("weight"), py::arg("bias"), py::arg("eps"))
      .def_readonly("eps", &Norm::eps);
  array_property(norm, "weight", &Norm::weight);
  array_property(norm, "bias", &Norm::bias);

  py::class_<GatedMLP>(weights, "GatedMLP")
      .def(py::init([](Linear gate_up, Linear down, std::string activation) {
             return GatedMLP{gate_up, down, std::move(activation)};
           }),
           py::arg("gate_up"), py::arg("down"), py::arg("activation"))
      .def_readonly("gate_up", &GatedMLP::gate_up)
      .def_readonly("down", &GatedMLP::down)
      .def_readonly("activation", &GatedMLP::activation);

  py::class_<BackboneLayer>(weights, "BackboneLayer")
      .def(py::init([](Norm input_norm, Linear qkv, Linear o, Norm post_norm, GatedMLP mlp) {
             return BackboneLayer{input_norm, qkv, o, post_norm, mlp};
           }),
           py::arg("input_norm"), py::arg("qkv"), py::arg("o"), py::arg("post_norm"), py::arg("mlp"))
      .def_readonly("input_norm", &BackboneLayer::input_norm)
      .def_readonly("qkv", &BackboneLayer::qkv)
      .def_readonly("o", &BackboneLayer::o)
      .def_readonly("post_norm", &BackboneLayer::post_norm)
      .def_readonly("mlp", &BackboneLayer::mlp);

  py::class_<Backbone> backbone(weights, "Backbone");
  backbone
      .def(py::init([](const py::object& embed, std::vector<BackboneLayer> layers, Norm norm) {
             return Backbone{to_array(embed), std::move(layers), norm};
           }),
           py::arg("embed"), py::arg("layers"), py::arg("norm"))
      .def_readonly("layers", &Backbone::layers)
      .def_readonly("norm", &Backbone::norm);
  array_property(backbone, "embed", &Backbone::embed);

  py::class_<Compression>(weights, "Compression")
      .def(py::init([](Linear first, Linear second, Norm norm) { return Compression{first, second, norm}; }),
           py::arg("first"), py::arg("second"), py::arg("norm"))
      .def_readonly("first", &Compression::first)
      .def_readonly("second", &Compression::second)
      .def_readonly("norm", &Compression::norm);

  py::class_<HeadBlock>(weights, "HeadBlock")
      .def(py::init([](Norm norm, Linear noise_half, Linear hidden_half, Linear second, Linear third, Linear down) {
             return HeadBlock{norm, noise_half, hidden_half, second, third, down};
           }),
           py::arg("norm"), py::arg("noise_half"), py::arg("hidden_half"), py::arg("second"), py::arg("third"),
           py::arg("down"))
      .def_readonly("norm", &HeadBlock::norm)
      .def_readonly("noise_half", &HeadBlock::noise_half)
      .def_readonly("hidden_half", &HeadBlock::hidden_half)
      .def_readonly("second", &HeadBlock::second)
      .def_readonly("third", &HeadBlock::third)
      .def_readonly("down", &HeadBlock::down);

  py::class_<EnergyHead>(weights, "EnergyHead")
      .def(py::init([](Linear hidden_embed, Norm hidden_norm, Linear noise_embed, Norm noise_norm,
                       std::vector<HeadBlock> blocks, Norm final_norm, Linear final_first, Linear final_second) {
             return EnergyHead{hidden_embed, hidden_norm, noise_embed,  noise_norm,
                               std::move(blocks), final_norm, final_first, final_second};
           }),
           py::arg("hidden_embed"), py::arg("hidden_norm"), py::arg("noise_embed"), py::arg("noise_norm"),
           py::arg("blocks"), py::arg("final_norm"), py::arg("final_first"), py::arg("final_second"))
      .def_readonly("hidden_embed", &EnergyHead::hidden_embed)
      .def_readonly("hidden_norm", &EnergyHead::hidden_norm)
      .def_readonly("noise_embed", &EnergyHead::noise_embed)
      .def_readonly("noise_norm", &EnergyHead::noise_norm)
      .def_readonly("blocks", &EnergyHead::blocks)
      .def_readonly("final_norm", &EnergyHead::final_norm)
      .def_readonly("final_first", &EnergyHead::final_first)
      .def_readonly("final_second", &EnergyHead::final_second);

  py::class_<DecoderLayer>(weights, "DecoderLayer")
      .def(py::init([](Norm norm, GatedMLP mlp) { return DecoderLayer{norm, mlp}; }), py::arg("norm"), py::arg("mlp"))
      .def_readonly("norm", &DecoderLayer::norm)
      .def_readonly("mlp", &DecoderLayer::mlp);

  py::class_<Decoder> decoder(weights, "Decoder");
  decoder
      .def(py::init([](Linear latent_to_hidden, std::vector<DecoderLayer> layers, Linear expand, Norm norm,
                       const py::object& projection) {
             return Decoder{latent_to_hidden, std::move(layers), expand, norm, to_array(projection)};
           }),
           py::arg("latent_to_hidden"), py::arg("layers"), py::arg("expand"), py::arg("norm"), py::arg("projection"))
      .def_readonly("latent_to_hidden", &Decoder::latent_to_hidden)
      .def_readonly("layers", &Decoder::layers)
      .def_readonly("expand", &Decoder::expand)
      .def_readonly("norm", &Decoder::norm);
  array_property(decoder, "projection", &Decoder::projection);

  weights
      .def(py::init([](Shapes shapes, Backbone backbone, Compression compression, EnergyHead head, Decoder decoder,
                       const std::vector<py::object>& keys, const std::vector<py::object>& values,
                       const py::object& rope_cos, const py::object& rope_sin) {
             return StepWeights(shapes, backbone, compression, head, decoder, to_arrays(keys), to_arrays(values),
                                to_array(rope_cos), to_array(rope_sin));
           }),
           py::arg("shapes"), py::arg("backbone"), py::arg("compression"), py::arg("head"), py::arg("decoder"),
           py::arg("keys"), py::arg("values"), py::arg("rope_cos"), py::arg("rope_sin"))
      .def_readonly("shapes", &StepWeights::shapes)
      .def_readonly("backbone", &StepWeights::backbone)
      .def_readonly("compression", &StepWeights::compression)
      .def_readonly("head", &StepWeights::head)
      .def_readonly("decoder", &StepWeights::decoder)
      .def_property_readonly("keys", [](const StepWeights& w) {
        py::list arrays;
        for (const auto& a : w.keys) arrays.append(to_python(a));
        return arrays;
      })
      .def_property_readonly("values", [](const StepWeights& w) {
        py::list arrays;
        for (const auto& a : w.values) arrays.append(to_python(a));
        return arrays;
      })
      .def_property_readonly("capacity", &StepWeights::capacity)
      .def_property_readonly("scratch_slot", &StepWeights::scratch_slot);
  array_property(weights, "rope_cos", &StepWeights::rope_cos);
  array_property(weights, "rope_sin", &StepWeights::rope_sin);
}

}  // namespace

PYBIND11_MODULE(_calm_cpu, m) {
  m.doc() = "CPU helpers of the calm-engine decode step (see csrc/bindings.cpp)";
  m.def("supported_isas", &supported_isa_names,
        "the instruction-set levels of the C++ decode step this CPU runs, lowest first (csrc/isa.h)");
  register_step_weights(m);
  py::class_<PyDecodeStep>(m, "DecodeStep", "One whole T = 1 decode step or prefill, or its hidden states and pools, on the CPU (csrc/decode_step.h)")
      .def(py::init<const StepWeights&, std::uintptr_t, std::uintptr_t, int, const std::string&, py::object>(),
           py::arg("weights"), py::arg("sgemm"), py::arg("set_threads_local"), py::arg("threads"),
           py::arg("isa") = "generic", py::arg("vocab_screen") = py::none())
      .def_property_readonly("isa", &PyDecodeStep::isa)
      .def_property_readonly("packed_bytes", &PyDecodeStep::packed_bytes)
      .def_property_readonly("screen_fallback_rows", &PyDecodeStep::screen_fallback_rows)
      .def("run", &PyDecodeStep::run, py::arg("ids"), py::arg("positions"), py::arg("slots"), py::arg("noise"))
      .def("prefill", &PyDecodeStep::prefill, py::arg("ids"), py::arg("positions"), py::arg("slots"), py::arg("last"),
           py::arg("noise"))
      .def("decode_hidden", &PyDecodeStep::decode_hidden, py::arg("ids"), py::arg("positions"), py::arg("slots"))
      .def("prefill_hidden", &PyDecodeStep::prefill_hidden, py::arg("ids"), py::arg("positions"), py::arg("slots"),
           py::arg("last"))
      .def("sample_pool", &PyDecodeStep::sample_pool, py::arg("hidden"), py::arg("noise"))
      .def_property_readonly("pool_stats", &PyDecodeStep::pool_stats);
  register_philox(m);
  register_exact_sampler(m);
  register_test_bindings(m);
}
