// The step's vocabulary argmax (vocab_argmax.h).
#include "vocab_argmax.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace calm_cpu {

namespace {

// With AMX the screen always runs from the packed copy on tiles, and at avx2 / avx512 on the widened kernel: there
// MKL's bfloat16 GEMM has no bfloat16 arithmetic to use. Unscreened over screened step time, small shape, 2 threads,
// MKL restricted to the level: AVX2 batch 8 1.05-1.11x with the widened kernel at every row count, 0.94x with MKL's
// GEMM above 8 rows (batch 32 1.01x, batch 64 0.99x widened); AVX-512F batch 8 1.18x and 0.81x. With AVX512-BF16
// the screen runs from the packed copy up to this many rows and on MKL's GEMM above, which repacks the weight per call
// but multiplies faster. Measured with the tile kernel off: small shape, 2 threads, whole steps with one or the
// other, packed / MKL: 8 rows 0.69-0.73 / 0.73-0.75 ms, 16 rows 0.95-0.98 / 0.89-0.91 ms; at 4 rows the screen's
// share of the step fell from 0.21 to 0.08 ms.
constexpr int kPackedScreenRows = 8;

// The float32 projection of rows x against ids n0..n1: per row, the first maximum of the logits into `best`.
struct ProjectJob {
  Sgemm sgemm;
  const float* weight;
  int in;
  const float* x;
  int rows, n0, n1;
  ArgmaxResult* best;
};

// Logits in column tiles, each reduced to (max, first argmax) per row at once, so no more than one tile of logits
// ever exists and the reduction is vectorised: max first, then the first column equal to it.
void project_range(void* context) {
  const ProjectJob& t = *static_cast<const ProjectJob*>(context);
  ArgmaxResult& best = *t.best;
  best.value.assign(t.rows, -INFINITY);
  best.index.assign(t.rows, t.n0);
  best.logits.resize(static_cast<size_t>(t.rows) * kVocabTile);
  for (int c0 = t.n0; c0 < t.n1; c0 += kVocabTile) {
    const int n = std::min(kVocabTile, t.n1 - c0);
    sgemm_rows(t.sgemm, t.weight + static_cast<size_t>(c0) * t.in, n, t.in, t.x, t.rows, best.logits.data(), n,
               false);
    for (int r = 0; r < t.rows; ++r) {
      const float* row = best.logits.data() + static_cast<size_t>(r) * n;
      float top = -INFINITY;
#pragma omp simd reduction(max : top)
      for (int c = 0; c < n; ++c) top = std::max(top, row[c]);
      if (top > best.value[r]) {  // strictly greater: an earlier tile keeps a tie
        best.value[r] = top;
        best.index[r] = c0 + (std::find(row, row + n, top) - row);
      }
    }
  }
}

// One thread's share of the screen: the prepared rows against ids n0..n1, into `part`.
struct ScreenJob {
  const VocabScreen* vocab;
  const ScreenRows* rows;
  int count, n0, n1;
  ScreenPart* part;
};

void screen_job(void* context) {
  const ScreenJob& t = *static_cast<const ScreenJob*>(context);
  screen_range(*t.vocab, *t.rows, t.count, t.n0, t.n1, kVocabTile, *t.part);
}

// One thread's share of the int8 screen: rows against ids n0..n1, into `scan`.
struct Int8Job {
  const StepKernels* kernels;
  const PackedInt8Projection* weight;
  Int8RowsView rows;
  int count, n0, n1;
  Int8Scan scan;
};

void int8_job(void* context) {
  const Int8Job& t = *static_cast<const Int8Job*>(context);
  t.kernels->int8_screen(*t.weight, t.rows, t.count, t.n0, t.n1, t.scan);
}

GemmTask job(void (*run)(void*), void* context) {
  GemmTask task;
  task.job = run, task.context = context;
  return task;
}

}  // namespace

VocabArgmax::VocabArgmax(const Array& projection, Isa isa, const StepKernels& kernels)
    : weight_(projection.floats()),
      vocab_(static_cast<int>(projection.shape[0])),
      in_(static_cast<int>(projection.shape[1])),
      isa_(isa),
      kernels_(kernels) {}

void VocabArgmax::enable_screen(GemmBf16 gemm, const uint16_t* weight_bf16, const float* row_norm) {
  screen_.kernels = &kernels_;
  screen_.gemm = gemm;
  screen_.weight = weight_, screen_.weight_bf16 = weight_bf16, screen_.row_norm = row_norm;
  screen_.vocab = vocab_, screen_.in = in_;
  screen_.max_row_norm = largest_norm(row_norm, vocab_);
  if (!(screen_.max_row_norm < 1e30)) {
    int row = 0;
    while (row + 1 < vocab_ && row_norm[row] < 1e30f) ++row;
    throw std::invalid_argument("vocab_screen: the screen needs finite decoder.projection rows of norm below 1e30; "
                                "row " + std::to_string(row) + " is not");
  }
  if (kernels_.int8_screen != nullptr && in_ <= kInt8MaxIn) {  // the int8 screen serves every call (argmax)
    packed_int8_ = std::make_unique<PackedInt8Projection>(weight_, row_norm, vocab_, in_);
    screen_.weight_bf16 = nullptr;  // never read
    screening_ = true;
    return;
  }
  // A packed copy for the level's kernel (MKL's GEMM repacks the weight on every call).
  int group = 0;
  if (isa_ >= Isa::kAvx512Bf16 && in_ % 2 == 0) {
    group = 32, packed_kind_ = ScreenProducts::kDpbf16;
    if (isa_ == Isa::kAmx && in_ % 32 == 0) packed_kind_ = ScreenProducts::kAmx;
  } else if (kernels_.widened_scores != nullptr) {
    group = kernels_.screen_group, packed_kind_ = ScreenProducts::kWidened;
  } else if (gemm == nullptr) {
    throw std::invalid_argument("vocab_screen: the screen at the generic level needs MKL's bfloat16 GEMM");
  }
  if (group != 0) packed_bf16_ = std::make_unique<PackedBf16Projection>(weight_bf16, vocab_, in_, group);
  screen_.packed = packed_bf16_.get();
  if (packed_bf16_ && (packed_kind_ != ScreenProducts::kDpbf16 || gemm == nullptr))
    screen_.weight_bf16 = nullptr;  // never read again
  screening_ = true;
}

// Where the screen's products come from at `rows` rows: AMX tiles and the widened kernel at any row count;
// vdpbf16ps up to kPackedScreenRows rows, above on MKL's GEMM (where torch exports it).
ScreenProducts VocabArgmax::screen_products(int rows) const {
  if (!packed_bf16_) return ScreenProducts::kGemm;
  if (packed_kind_ != ScreenProducts::kDpbf16 || rows <= kPackedScreenRows || screen_.gemm == nullptr)
    return packed_kind_;
  return ScreenProducts::kGemm;
}

void VocabArgmax::argmax(Gemm& gemm, const float* x, int rows, int64_t* out) {
  fallback_rows_ = candidates_ = 0;
  if (packed_int8_)
    int8_screened(gemm, x, rows, out);
  else if (screening_)
    screened(gemm, x, rows, out);
  else
    projected(gemm, x, rows, out);
}

void VocabArgmax::pool_argmax(Gemm& gemm, const float* x, int rows, int64_t* out) {
  if (screening_ && !packed_int8_ && packed_kind_ == ScreenProducts::kWidened) {
    fallback_rows_ = candidates_ = 0;
    projected(gemm, x, rows, out);
    return;
  }
  argmax(gemm, x, rows, out);
}

// The two threads take the two halves of the vocabulary, each in tiles; the lower half wins ties.
void VocabArgmax::projected(Gemm& gemm, const float* x, int rows, int64_t* out) {
  ProjectJob mine{gemm.blas().sgemm, weight_, in_, x, rows, 0, vocab_, &argmax_[0]};
  if (gemm.two_threads() && vocab_ >= 2 * kVocabTile) {
    ProjectJob theirs = mine;
    mine.n1 = theirs.n0 = (vocab_ / 2) & ~15;
    theirs.best = &argmax_[1];
    gemm.run_pair(job(&project_range, &mine), job(&project_range, &theirs));
    for (int r = 0; r < rows; ++r)
      out[r] = argmax_[1].value[r] > argmax_[0].value[r] ? argmax_[1].index[r] : argmax_[0].index[r];
  } else {
    project_range(&mine);
    std::copy(argmax_[0].index.begin(), argmax_[0].index.end(), out);
  }
}

// The two threads screen the two halves of the vocabulary (whole tiles, the lower half first in id order); then each
// row's candidates are recomputed in float32 here. A row the screen leaves open (ties or near-ties among more than
// kMaxCandidates ids, or a non-finite row) is projected in full, alone (settle_rows).
void VocabArgmax::screened(Gemm& gemm, const float* x, int rows, int64_t* out) {
  screen_.products = screen_products(rows);
  prepare_rows(screen_, x, rows, screen_rows_);
  ScreenJob mine{&screen_, &screen_rows_, rows, 0, vocab_, &screen_parts_[0]};
  const int tiles = (vocab_ + kVocabTile - 1) / kVocabTile;
  int parts = 1;
  if (gemm.two_threads() && tiles >= 2) {
    ScreenJob theirs = mine;
    mine.n1 = theirs.n0 = (tiles + 1) / 2 * kVocabTile;
    theirs.part = &screen_parts_[1];
    gemm.run_pair(job(&screen_job, &mine), job(&screen_job, &theirs));
    parts = 2;
  } else {
    screen_job(&mine);
  }
  settle_rows(gemm, x, rows, screen_rows_.usable, parts, out);
}

// The int8 screen, its vocabulary split between the threads in whole groups (the lower half first), then as screened.
void VocabArgmax::int8_screened(Gemm& gemm, const float* x, int rows, int64_t* out) {
  prepare_int8_rows(*packed_int8_, screen_.max_row_norm, x, rows, int8_rows_);
  const int groups = packed_int8_->groups(), parts = gemm.two_threads() && groups >= 2 ? 2 : 1;
  const int split = parts == 2 ? (groups + 1) / 2 * kInt8Group : vocab_;
  Int8Job jobs[2];
  for (int p = 0; p < parts; ++p) {
    ScreenPart& part = screen_parts_[p];
    part.reset(rows);
    jobs[p] = {&kernels_, packed_int8_.get(), int8_view(*packed_int8_, int8_rows_), rows, p ? split : 0,
               p ? vocab_ : split, {part.lower.data(), part.overflow.data(), &part}};
  }
  if (parts == 2)
    gemm.run_pair(job(&int8_job, &jobs[0]), job(&int8_job, &jobs[1]));
  else
    int8_job(&jobs[0]);
  settle_rows(gemm, x, rows, int8_rows_.usable, parts, out);
}

void VocabArgmax::settle_rows(Gemm& gemm, const float* x, int rows, const std::vector<char>& usable, int parts,
                              int64_t* out) {
  std::vector<int> open;
  for (int r = 0; r < rows; ++r) {
    const float* row = x + static_cast<size_t>(r) * in_;
    out[r] = usable[r] ? pick_candidate(screen_, row, r, screen_parts_, parts, candidates_) : -1;
    if (out[r] < 0) open.push_back(r);
  }
  fallback_rows_ += static_cast<int64_t>(open.size());
  if (open.empty()) return;
  open_rows_.resize(open.size() * static_cast<size_t>(in_));
  for (size_t i = 0; i < open.size(); ++i)
    std::copy_n(x + static_cast<size_t>(open[i]) * in_, in_, open_rows_.data() + i * in_);
  std::vector<int64_t> ids(open.size());
  projected(gemm, open_rows_.data(), static_cast<int>(open.size()), ids.data());
  for (size_t i = 0; i < open.size(); ++i) out[open[i]] = ids[i];
}

}  // namespace calm_cpu
