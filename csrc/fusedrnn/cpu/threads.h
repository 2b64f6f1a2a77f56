// The one native thread team all fusedrnn compute runs on.
//
// A call (a layer's forward or backward) takes a lease on the team, plans from the lease's size and
// runs one or more jobs on it: the calling thread is rank 0 and the team's workers are ranks 1..n-1.
// Callers on several threads take turns, one lease at a time; a resize waits for the lease. Inside
// a job the ranks meet at a spin barrier (one per time step in the recurrence). Workers spin briefly
// after a job, so back-to-back calls (layers, directions) start without a wake-up, then sleep on a
// condition variable; BLAS runs single-threaded inside jobs, so no second pool ever spins beside this
// one. On x86, every rank runs its part with denormals flushed (FTZ/DAZ) and restores the caller's mode
// after.
#pragma once

#include "fusedrnn/cpu/cpu_limit.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
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

namespace fusedrnn::cpu {

// Waits until done() holds: spins first (a step's barrier or a job's end normally comes within
// microseconds), then yields, because when the machine is oversubscribed the thread being waited for
// may need this core to finish. 2048 pauses are tens of microseconds (see bench/NOTES.md, "Figures behind the code", spinning).
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

// The ranks of one job meet here. Each rank counts its arrivals on a cache line of its own with a
// plain store, then watches the other ranks' lines: arriving never waits, where a locked add on a
// shared counter first drains the rank's pending stores and takes the counter's line from the rank
// before (see bench/NOTES.md, "Figures behind the code", barrier).
class SpinBarrier {
 public:
  // Room for `ranks` parties; only while no job runs (it allocates).
  void reserve(int ranks) {
    if (ranks > capacity_) {
      arrivals_ = std::make_unique<Arrivals[]>(static_cast<std::size_t>(ranks));
      capacity_ = ranks;
    }
  }
  // Before each job, on `parties` <= the reserved ranks.
  void reset(int parties) {
    for (int r = 0; r < parties; ++r) arrivals_[r].count.store(0, std::memory_order_relaxed);
  }
  // Returns once each of ranks first..first+count-1 of the job (`rank` one of them; all of the job's,
  // or a group working apart, RankGroup) has called wait() as many times as `rank` has, this call
  // included; what each of them wrote before its call is then visible to all of them.
  void wait(int rank, int first, int count) {
    if (count <= 1) return;
    std::atomic<std::uint64_t>& mine = arrivals_[rank].count;
    const std::uint64_t reached = mine.load(std::memory_order_relaxed) + 1;
    mine.store(reached, std::memory_order_release);
    // One spin budget for all of them, so a rank left waiting behind a descheduled one yields as soon
    // as with a single counter to watch.
    int next = first;
    spin_then_yield_until([&] {
      for (; next < first + count; ++next)
        if (next != rank && arrivals_[next].count.load(std::memory_order_acquire) < reached) return false;
      return true;
    });
  }

 private:
  struct alignas(64) Arrivals {
    std::atomic<std::uint64_t> count{0};
  };
  int capacity_ = 0;
  std::unique_ptr<Arrivals[]> arrivals_;
};

// Ranks first..first+count-1 of a job, working apart from its other ranks: their code knows them by
// local ranks 0..count-1 and they meet only among themselves.
class RankGroup {
 public:
  RankGroup(SpinBarrier& barrier, int first, int count) : barrier_(&barrier), first_(first), count_(count) {}
  void wait(int local_rank) const { barrier_->wait(first_ + local_rank, first_, count_); }

 private:
  SpinBarrier* barrier_;
  int first_, count_;
};

class ThreadTeam {
 public:
  using Job = std::function<void(int rank)>;
  class Lease;

  // The most threads a team may have. Every rank of a job may be inside a GEMM of the bundled OpenBLAS
  // at once, and its buffer table holds 2 * MAX_THREADS (64) concurrent callers; past that it warns,
  // and past a further 512 it ends the process.
  static constexpr int kMaxSize = 128;

  static ThreadTeam& instance();

  // Team size: threads a job may use (the caller included). Changing it joins or starts workers; it
  // waits for the lease in force, so a call already running finishes on the size it planned with and
  // the new size applies from the next call.
  void set_size(int threads);
  // The size now. A call plans with its lease's size(), which cannot change under it.
  int size() const { return size_.load(std::memory_order_relaxed); }

  // Exclusive use of the team for one call; waits while another caller holds it. Throws
  // std::runtime_error once the process has begun to exit (see before_exit).
  Lease lease();

  // Runs jobs on the threads of an OpenMP runtime already loaded in this process (`library`, as the
  // loader names it; torch's libgomp, say) instead of this team's workers: when another library's
  // OpenMP threads spin between that library's own calls, a job on them starts at once and shares no
  // core with a spinner. The split still follows size(), so results are the same bit for bit. Only
  // the first thread to run a job there uses the runtime (a training loop's, whose pool torch's own
  // operators keep awake): libgomp starts a pool for each thread that opens a parallel region, and
  // ends the process when the system refuses one; other threads' jobs run on the team's workers, as
  // do those of a caller whose runtime is set to one thread (torch.set_num_threads(1): no pool is
  // kept awake, and in a forked child, as DataLoader's workers are, the parent's pool is gone while
  // the runtime still counts its threads). An empty `library` goes back to the team's own workers, as
  // does any in a process forked from one that had loaded this library (its runtime's pool is gone).
  // Throws std::invalid_argument when the library is not loaded or lacks the GNU OpenMP entry points.
  void use_openmp_runtime(const std::string& library);
  // The library jobs run on ("" for the team's own workers).
  std::string openmp_runtime();

  // Tests only: every worker sleeps this long after taking a post, before acting on it, which widens
  // the window in which a caller could post its next job (0: no delay).
  static void set_worker_delay_after_post(int microseconds);

 private:
  ThreadTeam();
  void run(int threads, const Job& job);
  bool run_on_openmp(int threads, const Job& job);
  // Starts the workers of a team of `threads` ranks (none running) and makes it the size. Where the
  // system refuses a thread, keeps `fallback` ranks (or one) and throws std::runtime_error saying so.
  void start_team(int threads, int fallback);
  void start_workers(int threads);
  void stop_workers();
  void post(int threads);
  void worker_loop(int rank, std::uint64_t seen);
  void keep_workers_off_caller_cpu();
  static void before_fork();
  static void after_fork_in_parent();
  static void after_fork_in_child();
  static void before_exit();

  // One word says which job is current: (generation << 16) | the job's thread count. A worker reads
  // both halves in one load, so it never pairs a new generation with an older job's thread count (or
  // the reverse), and a worker outside a job never touches job_. Every post changes the generation.
  static std::uint64_t post_word(std::uint64_t generation, int threads) {
    return generation << 16 | static_cast<std::uint64_t>(threads);
  }
  static int post_threads(std::uint64_t word) { return static_cast<int>(word & 0xffff); }

  std::atomic<int> size_{1};
  bool size_is_default_ = true;  // no set_size() has succeeded: a forked child takes its own default
  std::vector<std::thread> workers_;
  std::mutex lease_mutex_;  // held by a Lease or a resize: one call's jobs (or one resize) at a time
  std::mutex sleep_mutex_;  // guards post_ changes, so a worker going to sleep misses no post
  std::condition_variable wake_;
  std::atomic<std::uint64_t> post_{0};
  std::uint64_t generation_ = 0;  // of the last post; written only under lease_mutex_
  std::atomic<int> pending_{0};   // ranks of the current job other than the caller's still running
  std::atomic<bool> stopping_{false};
  bool exiting_ = false;  // set at exit, under lease_mutex_: no lease is granted after
  // The current job: written before its post; read only by the ranks the post names, and left alone
  // until every one of them has counted itself off pending_.
  const Job* job_ = nullptr;
  SpinBarrier barrier_;
  bool workers_lost_ = false;  // a fork copied the team but not its threads
  // GNU OpenMP entry points (libgomp's, and Intel's and LLVM's compatible ones) of the runtime jobs
  // run on, all null while the team's own workers run them; changed under lease_mutex_.
  struct OpenMPRuntime {
    std::string library;
    void (*parallel)(void (*body)(void*), void* data, unsigned threads, unsigned flags) = nullptr;
    int (*thread_num)() = nullptr;
    int (*num_threads)() = nullptr;
    int (*max_threads)() = nullptr;
    std::thread::id caller;  // the one thread whose jobs run there (none yet: the next to run one)
  } openmp_;
  int workers_avoid_cpu_ = -1;  // the caller's CPU that the workers' affinity masks leave out
  CpuMask caller_mask_;         // the caller's affinity mask when the workers' masks were last set
  CpuMask mask_now_;            // the caller's mask at this job (kept to reuse its storage)
};

// Exclusive use of the team for one call (a layer's forward or backward, a whole-array pass): while a
// lease is held the team's size cannot change and no other caller's job runs, so the call plans its
// split from size() and every job of that plan runs on exactly the ranks it was planned for.
class ThreadTeam::Lease {
 public:
  int size() const { return team_->size(); }
  // Runs job(rank) for rank in [0, threads); returns when every rank is done. threads must be in
  // [1, size()]. Jobs must not throw: allocate and check before calling run.
  void run(int threads, const Job& job) { team_->run(threads, job); }
  // The barrier of the running job's ranks.
  SpinBarrier& barrier() { return team_->barrier_; }

 private:
  friend class ThreadTeam;
  explicit Lease(ThreadTeam& team) : team_(&team), hold_(team.lease_mutex_) {}
  ThreadTeam* team_;
  std::unique_lock<std::mutex> hold_;
};

// The thread count fusedrnn uses by default: the CPUs this process may run on, no more than its cgroups'
// CPU limit allows.
int default_thread_count();

}  // namespace fusedrnn::cpu
