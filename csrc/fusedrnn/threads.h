// The one native thread team all fusedrnn compute runs on.
//
// A layer call is one job: the calling thread is rank 0 and the team's workers are ranks 1..n-1. Inside
// a job the ranks meet at a spin barrier (one per time step in the recurrence). Workers spin briefly
// after a job, so back-to-back calls (layers, directions) start without a wake-up, then sleep on a
// condition variable; BLAS runs single-threaded inside jobs, so no second pool ever spins beside this
// one. Every rank runs its part with denormals flushed (FTZ/DAZ) and restores the caller's mode after.
#pragma once

#include <atomic>
#if defined(__linux__)
#include <sched.h>
#endif
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define FUSEDRNN_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define FUSEDRNN_CPU_RELAX() asm volatile("yield")
#else
#define FUSEDRNN_CPU_RELAX() ((void)0)
#endif

namespace fusedrnn {

// Waits until done() holds: spins first (a step's barrier or a job's end normally comes within
// microseconds), then yields, because when the machine is oversubscribed the thread being waited for
// may need this core to finish. ~2048 pauses are 35 us here (20-150 us across CPUs).
template <typename Done>
void spin_then_yield_until(const Done& done) {
  constexpr int kSpinsBeforeYield = 1 << 11;
  for (int spins = 0; !done(); ++spins) {
    if (spins < kSpinsBeforeYield)
      FUSEDRNN_CPU_RELAX();
    else
      std::this_thread::yield();
  }
}

// Sense-reversing barrier for the ranks of one job; counter and phase on separate cache lines.
class SpinBarrier {
 public:
  void reset(int parties) {
    parties_ = parties;
    arrived_.store(0, std::memory_order_relaxed);
  }
  void wait() {
    if (parties_ <= 1) return;
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return;
    }
    spin_then_yield_until([&] { return phase_.load(std::memory_order_acquire) != phase; });
  }

 private:
  int parties_ = 1;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> phase_{0};
};

class ThreadTeam {
 public:
  using Job = std::function<void(int rank)>;

  static ThreadTeam& instance();
  ~ThreadTeam();

  // Team size: threads a job may use (the caller included). Changing it joins or starts workers.
  void set_size(int threads);
  int size() const { return size_; }

  // Runs job(rank) for rank in [0, threads) with threads <= size(); returns when every rank is done.
  // Jobs must not throw: allocate and check before calling run.
  void run(int threads, const Job& job);

  // The barrier of the running job's ranks.
  SpinBarrier& barrier() { return barrier_; }

 private:
  ThreadTeam();
  void start_workers(int threads);
  void stop_workers();
  void worker_loop(int rank, std::uint64_t seen);
  void keep_workers_off_caller_cpu();
  static void after_fork_in_child();

  int size_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mutex_;      // guards generation_ changes, so a worker going to sleep misses no job
  std::mutex run_mutex_;  // one job (or resize) at a time
  std::condition_variable wake_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stopping_{false};
  const Job* job_ = nullptr;
  int job_threads_ = 0;
  SpinBarrier barrier_;
  bool workers_lost_ = false;  // a fork copied the team but not its threads
  int workers_avoid_cpu_ = -1;  // the caller's CPU that the workers' affinity masks leave out
#if defined(__linux__)
  cpu_set_t caller_mask_{};     // the caller's affinity mask when the workers' masks were last set
#endif
};

// The thread count fusedrnn uses by default: the CPUs this process may run on.
int default_thread_count();

}  // namespace fusedrnn
