// The int8 screen's packing, row preparation, candidate lists and plain reference (int8_products.h).
#include "int8_products.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace calm_cpu {

namespace {

constexpr double kUnit = 1.0 / (1 << 24);  // u = 2^-24

// The smallest float32 >= value (value >= 0, finite).
float rounded_up(double value) {
  const float f = static_cast<float>(value);
  return static_cast<double>(f) >= value ? f : std::nextafter(f, INFINITY);
}

// round(value / scale) clamped to [-most, most]; 0 for a zero scale. The clamp only catches a quotient that
// rounding pushed past `most`; the error it makes is measured with the rest.
int quantised(float value, float scale, int most) {
  if (scale == 0.0f) return 0;
  const float q = std::nearbyint(value / scale);
  return static_cast<int>(std::min(std::max(q, -static_cast<float>(most)), static_cast<float>(most)));
}

}  // namespace

PackedInt8Projection::PackedInt8Projection(const float* weight, const float* row_norm, int vocab, int in)
    : vocab_(vocab), in_(in), quads_((in + 4 * kInt8Widen - 1) / (4 * kInt8Widen) * kInt8Widen), groups_((vocab + kInt8Group - 1) / kInt8Group) {
  if (in < 1 || vocab < 1 || in > kInt8MaxIn)
    throw std::invalid_argument("PackedInt8Projection: expected 1 <= in <= " + std::to_string(kInt8MaxIn) +
                                " and a vocabulary, got in " + std::to_string(in));
  const size_t bytes = static_cast<size_t>(groups_) * quads_ * 64;
  memory_ = allocate_streamed(bytes);
  data_ = static_cast<int8_t*>(memory_.get());
  std::memset(data_, 0, bytes);
  const size_t ids = static_cast<size_t>(groups_) * kInt8Group;
  scale_.assign(ids, 0.0f), norm_.assign(ids, 0.0f), residual_.assign(ids, 0.0f), bias_.assign(ids, 0);
  for (int v = 0; v < vocab; ++v) {
    const float* w = weight + static_cast<size_t>(v) * in;
    float top = 0.0f;
    for (int i = 0; i < in; ++i) top = std::max(top, std::fabs(w[i]));
    const float s = top / 127.0f;
    int32_t rowsum = 0;
    double residual = 0.0;
    int8_t* group = data_ + static_cast<size_t>(v / kInt8Group) * quads_ * 64;
    for (int i = 0; i < in; ++i) {
      const int q = quantised(w[i], s, 127);
      group[static_cast<size_t>(i / 4) * 64 + (v % kInt8Group) * 4 + i % 4] = static_cast<int8_t>(q);
      rowsum += q;
      const double error = static_cast<double>(w[i]) - static_cast<double>(s) * q;  // s q: exact in double
      residual += error * error;
    }
    scale_[v] = s, bias_[v] = kInt8Offset * rowsum, norm_[v] = row_norm[v];
    residual_[v] = rounded_up(std::sqrt(residual) * (1 + 1e-6));  // 1e-6: the double sum's own rounding
  }
}

void prepare_int8_rows(const PackedInt8Projection& w, double max_row_norm, const float* x, int rows, Int8Rows& out) {
  const int in = w.in(), ld = 4 * w.quads();
  const double gamma = in * kUnit / (1.0 - in * kUnit);
  out.bytes.assign(static_cast<size_t>(rows) * ld, kInt8Offset);
  out.scale.assign(rows, 0.0f), out.a.assign(rows, NAN), out.b.assign(rows, NAN), out.usable.assign(rows, 0);
  for (int r = 0; r < rows; ++r) {
    const float* row = x + static_cast<size_t>(r) * in;
    double squares = 0.0;
    float top = 0.0f;
    for (int i = 0; i < in; ++i) squares += static_cast<double>(row[i]) * row[i], top = std::max(top, std::fabs(row[i]));
    const double norm = std::sqrt(squares);
    if (!(norm * std::max(max_row_norm, 1.0) < 1e30)) continue;  // NaN, inf, or within reach of float32's range
    const float s = top / static_cast<float>(kInt8XMax);
    double error = 0.0, kept = 0.0;
    uint8_t* bytes = out.bytes.data() + static_cast<size_t>(r) * ld;
    for (int i = 0; i < in; ++i) {
      const int q = quantised(row[i], s, kInt8XMax);
      bytes[i] = static_cast<uint8_t>(q + kInt8Offset);
      const double hat = static_cast<double>(s) * q;  // exact in double
      error += (row[i] - hat) * (row[i] - hat), kept += hat * hat;
    }
    const double slack = 1.01 * (1 + 1e-6), x_error = std::sqrt(error), x_hat = std::sqrt(kept);
    out.scale[r] = s;
    out.a[r] = rounded_up(slack * (x_error + 4 * kUnit * x_hat + gamma * norm));
    out.b[r] = rounded_up(slack * (1 + 4 * kUnit) * x_hat);
    out.usable[r] = 1;
  }
}

Int8RowsView int8_view(const PackedInt8Projection& w, const Int8Rows& rows) {
  return {rows.bytes.data(), 4 * w.quads(), rows.scale.data(), rows.a.data(), rows.b.data(), rows.usable.data()};
}

void add_int8_candidates(const Int8Scan& scan, int r, const float* upper, int id0, unsigned mask, float lower) {
  auto& list = scan.part->candidates[r];
  for (int j = 0; mask != 0; ++j, mask >>= 1) {
    if (!(mask & 1u)) continue;
    if (!push_candidate(list, kInt8MaxCandidates, upper[j], id0 + j, lower)) {
      scan.overflow[r] = 1;
      return;
    }
  }
}

void int8_scores_reference(const PackedInt8Projection& w, const Int8RowsView& x, int rows, int c0, int n,
                           float* scores, float* bounds) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; ++c) {
      const int v = c0 + c;
      const int8_t* group = w.group(v / kInt8Group);
      int32_t dot = 0;
      for (int i = 0; i < 4 * w.quads(); ++i)
        dot += x.bytes[static_cast<size_t>(r) * x.ld + i] * group[static_cast<size_t>(i / 4) * 64 + (v % kInt8Group) * 4 + i % 4];
      const float d = static_cast<float>(dot - w.bias()[v]);
      scores[static_cast<size_t>(r) * n + c] = (x.scale[r] * w.scale()[v]) * d;
      bounds[static_cast<size_t>(r) * n + c] = x.a[r] * w.norm()[v] + (x.b[r] * w.residual()[v] + kScreenTiny);
    }
}

}  // namespace calm_cpu
