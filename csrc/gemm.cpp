// The step's matrix products and its second thread (gemm.h).
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "packed_linear.h"

namespace calm_cpu {

namespace {

constexpr int64_t kSplitWork = 1 << 16;  // below this many multiply-adds a hand-over costs more than it saves

void run_task(Sgemm sgemm, const StepKernels& kernels, const GemmTask& t) {
  if (t.job != nullptr) {
    t.job(t.context);
    return;
  }
  const Linear& l = *t.l;
  const int out = l.out(), in = l.in();
  const float* bias = l.bias.floats();
  if (l.packed != nullptr) {
    const int width = l.packed->width(), g1 = (t.n1 + width - 1) / width;
    kernels.packed_linear(*l.packed, bias, t.in, in, t.rows, t.out, out, t.n0 / width, g1, t.accumulate);
    return;
  }
  sgemm_rows(sgemm, l.weight.floats() + static_cast<size_t>(t.n0) * in, t.n1 - t.n0, in, t.in, t.rows, t.out + t.n0,
             out, t.accumulate);
  if (bias != nullptr)
    for (int r = 0; r < t.rows; ++r)
      for (int c = t.n0; c < t.n1; ++c) t.out[static_cast<size_t>(r) * out + c] += bias[c];
}

}  // namespace

// A second thread that takes half of each large share during a step. torch's BLAS, called from outside torch with
// its own threads, wakes them per call and lost ~25x at 2 threads here; two single-threaded BLAS calls on halves of
// the output cost microseconds to hand over. On a shared machine the worker may be descheduled, so a posted half is
// claimed by whoever gets to it first: the caller, done with its own half, takes it back instead of waiting for a
// worker that is not running.
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

  void run_pair(const GemmTask& mine, const GemmTask& theirs) {
    task_ = theirs;
    const uint64_t ticket = ++tickets_;
    claimable_.store(ticket, std::memory_order_release);  // publishes task_
    run_task(sgemm_, kernels_, mine);
    uint64_t expected = ticket;
    if (claimable_.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
      run_task(sgemm_, kernels_, task_);  // the worker never took it
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
          run_task(sgemm_, kernels_, task_);
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
  uint64_t tickets_ = 0;                          // the caller's counter
  std::atomic<uint64_t> claimable_{0}, done_{0};  // claimable_: the ticket of an unclaimed task, or 0
};

Gemm::Gemm(const Blas& blas, const StepKernels& kernels, int threads) : blas_(blas), kernels_(kernels) {
  if (threads > 1) worker_ = std::make_unique<GemmWorker>(blas_.sgemm, blas_.set_threads_local, kernels_);
}

Gemm::~Gemm() = default;

void Gemm::product(const Linear& l, const float* in, int rows, std::vector<float>& out) {
  out.resize(static_cast<size_t>(rows) * l.out());
  product_into(l, in, rows, out.data(), false);
}

void Gemm::product_into(const Linear& l, const float* in, int rows, float* out, bool accumulate) {
  const int n = l.out();
  GemmTask task{&l, in, out, rows, 0, n, accumulate};
  if (!worker_ || static_cast<int64_t>(rows) * n * l.in() < kSplitWork || n < 32) {
    run_task(blas_.sgemm, kernels_, task);
    return;
  }
  GemmTask other = task;
  // the first half's groups of the packing width (also for the sgemm: any boundary is right for it)
  const int width = l.packed ? l.packed->width() : 32, groups = (n + width - 1) / width;
  task.n1 = other.n0 = std::min(n, (groups + 1) / 2 * width);
  worker_->run_pair(task, other);
}

void Gemm::run_pair(const GemmTask& mine, const GemmTask& theirs) { worker_->run_pair(mine, theirs); }

Gemm::Session::Session(Gemm& gemm) : gemm_(gemm), previous_threads_(gemm.blas_.set_threads_local(1)) {
  if (gemm_.worker_) gemm_.worker_->begin();
}

Gemm::Session::~Session() {
  if (gemm_.worker_) gemm_.worker_->end();
  gemm_.blas_.set_threads_local(previous_threads_);
}

}  // namespace calm_cpu
