// The decode step's shares of work (decode_step.cpp): a matrix product, the vocabulary argmax or its screen over a
// range of columns, or any other job; and the second thread that takes half of each large one.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "isa.h"
#include "packed_linear.h"
#include "vocab_screen.h"

namespace calm_cpu {

// torch's BLAS, from its address: the Fortran-interface sgemm_ and MKL_Set_Num_Threads_Local.
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
using SetThreadsLocal = int (*)(int);

// A weight matrix [out, in] (row-major, as nn.Linear stores it) and an optional bias [out].
struct Linear {
  const float* weight = nullptr;
  const float* bias = nullptr;
  int out = 0, in = 0;
  const PackedLinear* packed = nullptr;  // the weight packed for the level's kernel, when the step packs
};

// Per row, the largest logit seen and its first column; `logits` is the thread's tile buffer.
struct ArgmaxResult {
  std::vector<float> value;
  std::vector<int64_t> index;
  std::vector<float> logits;
};

// One thread's share of the screened vocabulary projection: the prepared rows and the thread's results.
struct ScreenTask {
  const VocabScreen* vocab = nullptr;
  const ScreenRows* rows = nullptr;
  ScreenPart* part = nullptr;
};

// out[:, n0:n1] of out [rows, l.out] = in [rows, l.in] @ weight[n0:n1]^T + bias[n0:n1] (+ out if accumulate).
// With `best` set it is the vocabulary projection instead: out is unused, and for every row the first maximum of
// the logits over columns n0..n1 goes to best (see run_argmax).
struct GemmTask {
  const Linear* l = nullptr;
  const float* in = nullptr;
  float* out = nullptr;
  int rows = 0, n0 = 0, n1 = 0;
  bool accumulate = false;
  ArgmaxResult* best = nullptr;
  const ScreenTask* screen = nullptr;  // the screened vocabulary projection of ids n0..n1 instead (vocab_screen.h)
  void (*job)(void*) = nullptr;        // or any other share of work: job(context)
  void* context = nullptr;
};

constexpr int kVocabTile = 512;  // logits of a tile stay in L2 (64 KB at 32 rows) while they are reduced

// Logits in column tiles, each reduced to (max, first argmax) per row at once, so no more than one tile of logits
// ever exists and the reduction is vectorised: max first, then the first column equal to it.
inline void run_argmax(Sgemm sgemm, const GemmTask& t) {
  const Linear& l = *t.l;
  ArgmaxResult& best = *t.best;
  best.value.assign(t.rows, -INFINITY);
  best.index.assign(t.rows, t.n0);
  best.logits.resize(static_cast<size_t>(t.rows) * kVocabTile);
  const float one = 1.0f, zero = 0.0f;
  for (int c0 = t.n0; c0 < t.n1; c0 += kVocabTile) {
    const int n = std::min(kVocabTile, t.n1 - c0);
    sgemm("T", "N", &n, &t.rows, &l.in, &one, l.weight + static_cast<size_t>(c0) * l.in, &l.in, t.in, &l.in, &zero,
          best.logits.data(), &n);
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

// A share of work: the level's packed kernel where the weight is packed (n0 then a multiple of the packing width),
// else the sgemm.
inline void run_gemm(Sgemm sgemm, const StepKernels& kernels, const GemmTask& t) {
  if (t.job != nullptr) {
    t.job(t.context);
    return;
  }
  if (t.screen != nullptr) {
    const ScreenTask& s = *t.screen;
    screen_range(*s.vocab, *s.rows, t.rows, t.n0, t.n1, kVocabTile, *s.part);
    return;
  }
  if (t.best != nullptr) {
    run_argmax(sgemm, t);
    return;
  }
  const Linear& l = *t.l;
  if (l.packed != nullptr) {
    const int width = l.packed->width(), g1 = (t.n1 + width - 1) / width;
    kernels.packed_linear(*l.packed, l.bias, t.in, l.in, t.rows, t.out, l.out, t.n0 / width, g1, t.accumulate);
    return;
  }
  // Column-major view: out^T [n, rows] (leading dimension l.out) = weight rows n0..n1 (stored as in x n
  // column-major, hence 'T') @ in^T.
  const int n = t.n1 - t.n0;
  const float one = 1.0f, beta = t.accumulate ? 1.0f : 0.0f;
  sgemm("T", "N", &n, &t.rows, &l.in, &one, l.weight + static_cast<size_t>(t.n0) * l.in, &l.in, t.in, &l.in, &beta,
        t.out + t.n0, &l.out);
  if (l.bias != nullptr)
    for (int r = 0; r < t.rows; ++r)
      for (int c = t.n0; c < t.n1; ++c) t.out[static_cast<size_t>(r) * l.out + c] += l.bias[c];
}

// A second thread that takes half of each large matrix product during a step. torch's BLAS, called from outside
// torch with its own threads, wakes them per call and lost ~25x at 2 threads here; two single-threaded BLAS calls
// on halves of the output cost microseconds to hand over. On a shared machine the worker may be descheduled, so a
// posted half is claimed by whoever gets to it first: the caller, done with its own half, takes it back instead of
// waiting for a worker that is not running.
class GemmWorker {
 public:
  GemmWorker(Sgemm sgemm, SetThreadsLocal set_threads, const StepKernels& kernels)
      : sgemm_(sgemm), set_threads_(set_threads), kernels_(kernels) {
    thread_ = std::thread([this] { loop(); });
  }
  ~GemmWorker() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }
  void begin() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      active_.store(true);
    }
    wake_.notify_one();
  }
  void end() { active_.store(false); }

  // Runs `mine` here and `theirs` on the worker (or here, if the worker has not claimed it in time).
  void run_pair(const GemmTask& mine, const GemmTask& theirs) {
    task_ = theirs;
    const uint64_t ticket = ++tickets_;
    claimable_.store(ticket, std::memory_order_release);  // publishes task_
    run_gemm(sgemm_, kernels_, mine);
    uint64_t expected = ticket;
    if (claimable_.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
      run_gemm(sgemm_, kernels_, task_);  // the worker never took it
      return;
    }
    while (done_.load(std::memory_order_acquire) != ticket) {
    }
  }

 private:
  void loop() {
    set_threads_(1);
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return active_.load() || stop_; });
        if (stop_) return;
      }
      while (active_.load(std::memory_order_acquire)) {  // spin while the step runs
        uint64_t ticket = claimable_.load(std::memory_order_acquire);
        // A claim names its ticket, so a worker that was descheduled cannot take a later task by mistake.
        if (ticket != 0 && claimable_.compare_exchange_strong(ticket, 0, std::memory_order_acq_rel)) {
          run_gemm(sgemm_, kernels_, task_);
          done_.store(ticket, std::memory_order_release);
        }
      }
    }
  }

  Sgemm sgemm_;
  SetThreadsLocal set_threads_;
  const StepKernels& kernels_;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::atomic<bool> active_{false};
  GemmTask task_;
  uint64_t tickets_ = 0;  // the caller's counter
  std::atomic<uint64_t> claimable_{0}, done_{0};  // claimable_: the ticket of an unclaimed task, or 0
};

}  // namespace calm_cpu
