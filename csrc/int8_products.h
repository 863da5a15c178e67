// The vocabulary screen's int8 products (vocab_screen.h's screen with 8-bit operands, for AVX2's vpmaddubsw): the
// packed int8 copy of the projection, the rows of x quantised for it, the bound, and a plain reference of the scores
// and bounds. The AVX2 kernel and its scan are in int8_kernels.h.
//
// Why: at avx2 the bfloat16 screen's products cost one float32 multiply-add each, like the dense projection, so T < 1
// pools (800 decoded rows per request per step) projected densely. vpmaddubsw multiplies 32 byte pairs per
// instruction, and the packed weight is a quarter of the float32 bytes. One core of the AMD EPYC (avx2), 8192 ids x
// 256 inputs x 256 rows, screen and scan: 11.7 ms (46 G products/s) against 13.1 ms for the widened bfloat16 screen and
// 20.2 ms for MKL's sgemm and argmax (a scratch harness, 12:40 UTC, 2 Dec 2026).
//
// Quantisation. Weight row v: s_v = max|w_v| / 127 (float32), q_v = round(w_v / s_v) in [-127, 127], w^_v = s_v q_v,
// r_v = |w_v - w^_v| (in double, rounded up). Row x: s_x = max|x| / 63, q_x = round(x / s_x) in [-63, 63], x^ = s_x q_x,
// stored as unsigned bytes q_x + 63 in [0, 126]. (A zero scale gives q = 0: then the error is the whole row, exactly.)
// The integer dot. vpmaddubsw sums two products of an unsigned and a signed byte into int16 with saturation; with x's
// bytes at most 126 a pair is at most 2 126 127 = 32,004 < 32,767, never saturated; vpmaddwd by ones widens to int32.
// The int32 sum over `in` inputs is at most in 126 127 < 2^31 for in <= kInt8MaxIn, so it is exact; minus
// 63 rowsum(q_v) it is D = sum q_x q_v, |D| <= in 63 127 < 2^24, so float(D) is exact too.
// Why 7 bits for x: with 6 (bytes at most 62) two quads' pairs add in int16 before each widening (kInt8Widen = 2),
// which shares vpmaddubsw's multiplier port: 54 against 46 G products/s per core in the harness above; but its bound
// is about 1.5x as wide, and on the default model's real rows (T = 0.5, N = 200, batch 8, 16 steps of 8 WikiText
// prompts) it left 9.3 candidates per row and 683 of 102,400 rows to the float32 projection, against 3.7 and none,
// for the same argmax time per step (0.40 s on the loaded machine, 12:55 UTC).
// The score: score_v = (s_x s_v) D, two float32 roundings: |score_v - x^.w^_v| <= 2.0001 u |x^| |w^_v| (u = 2^-24),
// plus below 2^-125 absolute where s_x s_v underflows (D < 2^24).
// The bound. x.w_v - x^.w^_v = (x - x^).w_v + x^.(w_v - w^_v), so by Cauchy-Schwarz
//   |x^.w^_v - x.w_v| <= |x - x^| |w_v| + |x^| r_v,
// and |w^_v| <= |w_v| + r_v. The float32 reference's own summation adds gamma_in |x| |w_v| (gamma_n = n u / (1 - n u)),
// as in vocab_screen.h, and score_v -+ e_v rounds once more, by at most u (|score_v| + e_v). So with
//   e_v = A |w_v| + (B r_v + tiny),  A = 1.01 (|x - x^| + 4 u |x^| + gamma_in |x|),  B = 1.01 (1 + 4 u) |x^|
// (|w_v| the row norm rounded up; 1.01 covers e_v's own float32 arithmetic and the u e_v above; A and B computed in
// double and rounded up to float32), every float32 logit lies within e_v of score_v, and the scan keeps every id whose
// score_v + e_v reaches max_u (score_u - e_u): the float32 argmax is among them, recomputed in float32 as
// pick_candidate does (first id on ties). A row is usable on the same terms as vocab_screen.h's prepare_rows.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "packed_linear.h"
#include "vocab_screen.h"

namespace calm_cpu {

constexpr int kInt8Group = 16;       // ids per packed group: two registers of 8 ids x 4 inputs
constexpr int kInt8MaxIn = 2048;     // the widest input whose int32 sums and float32 dots stay exact (above)
constexpr int kInt8XMax = 63;       // x's levels: q_x in [-63, 63]
constexpr int kInt8Offset = kInt8XMax;  // x's bytes are q_x + 63 in [0, 126]
constexpr int kInt8Widen = 1;       // quads summed in int16 before each widening to int32
static_assert(kInt8Widen * 2 * (2 * kInt8XMax) * 127 <= 32767, "the int16 sums must not saturate");
constexpr size_t kInt8MaxCandidates = 512;  // a row with more falls back to the float32 projection, alone

// W [vocab, in] quantised per row and packed in groups of 16 ids, each [in / 4 quads][16 ids][4 inputs] (one 64-byte
// line per quad: vpmaddubsw's 4 bytes per 32-bit lane), zero past `in` and past the vocabulary; per id (padded to
// whole groups, zero past the vocabulary) the scale s_v, 63 rowsum(q_v), the row norm |w_v| and the residual r_v.
class PackedInt8Projection {
 public:
  // weight: finite rows; row_norm: upper bounds of their norms. std::invalid_argument for in > kInt8MaxIn.
  // The quads are padded to whole kInt8Widen.
  PackedInt8Projection(const float* weight, const float* row_norm, int vocab, int in);
  int vocab() const { return vocab_; }
  int in() const { return in_; }
  int quads() const { return quads_; }
  int groups() const { return groups_; }
  const int8_t* group(int g) const { return data_ + static_cast<size_t>(g) * quads_ * 64; }
  const float* scale() const { return scale_.data(); }
  const int32_t* bias() const { return bias_.data(); }
  const float* norm() const { return norm_.data(); }
  const float* residual() const { return residual_.data(); }

 private:
  int vocab_, in_, quads_, groups_;
  std::unique_ptr<void, AlignedFree> memory_;
  int8_t* data_;
  std::vector<float> scale_, norm_, residual_;
  std::vector<int32_t> bias_;
};

// Rows of x prepared for the int8 screen: bytes [rows, 4 quads] (q_x + 63; 63 in the padding and in unusable rows),
// and per row s_x and the bound's A and B (NaN where the row is unusable: the caller projects it in full).
struct Int8Rows {
  std::vector<uint8_t> bytes;
  std::vector<float> scale, a, b;
  std::vector<char> usable;
};

// What the kernels read of Int8Rows: plain pointers (int8_kernels.h is compiled for AVX2 and uses no std container).
struct Int8RowsView {
  const uint8_t* bytes;
  int ld;  // 4 quads
  const float* scale;
  const float* a;
  const float* b;
  const char* usable;
};

// The scan's results for one thread's range (ScreenPart, already sized for the rows): the running lower bound and
// overflow flag per row; candidates go through add_int8_candidates.
struct Int8Scan {
  float* lower;
  char* overflow;
  ScreenPart* part;
};

void prepare_int8_rows(const PackedInt8Projection& w, double max_row_norm, const float* x, int rows, Int8Rows& out);
Int8RowsView int8_view(const PackedInt8Projection& w, const Int8Rows& rows);

// Row r's ids id0 + j for the set bits j of `mask` (in id order), whose upper bounds upper[j] reached `lower`, onto
// its candidates (push_candidate, at most kInt8MaxCandidates), else the row overflows.
void add_int8_candidates(const Int8Scan& scan, int r, const float* upper, int id0, unsigned mask, float lower);

// The plain reference of the kernels' scores and bounds: scores, bounds [rows, n] for ids c0..c0+n-1 (c0 a multiple
// of the group), the same float32 operations in the same order as int8_kernels.h, the integer dot in plain int32.
void int8_scores_reference(const PackedInt8Projection& w, const Int8RowsView& x, int rows, int c0, int n,
                           float* scores, float* bounds);

}  // namespace calm_cpu
