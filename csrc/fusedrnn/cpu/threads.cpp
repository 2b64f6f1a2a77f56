#include "fusedrnn/cpu/threads.h"

#include "fusedrnn/cpu/backend.h"
#include "fusedrnn/cpu/cpu_limit.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#if defined(__linux__)
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#endif

namespace fusedrnn::cpu {
namespace {

// How long an idle worker spins before sleeping: long enough to cover the Python-side gap between the
// layer calls of one model step, short enough not to burn a core when the user does something else.
// A module's forward and backward are separated by its argument checks and gradient buffers; a worker
// asleep by then is woken for each call, and on a virtual machine a wake-up can wait for the host to
// schedule the idle vCPU again (see bench/NOTES.md, "Figures behind the code", spinning).
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(1000);

std::atomic<int> worker_delay_after_post_us{0};

// Flush denormals to zero (FTZ) and treat denormal inputs as zero (DAZ) for the lifetime of the guard:
// denormal arithmetic costs ~100x on x86, and a decaying state drifts into that range.
class FlushDenormals {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  // Other architectures (aarch64 wheels) keep the caller's mode; the user-provided constructor keeps
  // GCC from calling the guards unused.
  FlushDenormals() {}
#endif
};

// Set in a forked child of a process that had loaded this library, by a handler registered as it was
// loaded (before any team started): whatever the parent ran on an OpenMP runtime, that runtime's pool
// did not survive the fork.
bool forked_child = false;
const int fork_handler_registered = [] {
#if defined(__linux__)
  pthread_atfork(nullptr, nullptr, [] { forked_child = true; });
#endif
  return 0;
}();

// Jobs of this thread keep off the OpenMP runtime while this is above zero (KeepOffOpenMPRuntime).
thread_local int off_openmp_runtime = 0;

}  // namespace

KeepOffOpenMPRuntime::KeepOffOpenMPRuntime() { ++off_openmp_runtime; }
KeepOffOpenMPRuntime::~KeepOffOpenMPRuntime() { --off_openmp_runtime; }

// Never destroyed: a call may still be running on the team when the process exits (a daemon thread's,
// which Python does not wait for), and its ranks must not find the barrier and job slots freed under
// them by exit's destructors. The idle workers end with the process.
ThreadTeam& ThreadTeam::instance() {
  static ThreadTeam* team = new ThreadTeam;
  return *team;
}

ThreadTeam::ThreadTeam() {
  try {
    set_size(default_thread_count());
  } catch (const std::runtime_error&) {
    // The system would not start that many threads: the team starts with what set_size kept (one rank
    // at least), where a failure here would fail every call.
  }
  size_is_default_ = true;
#if defined(__linux__)
  pthread_atfork(&ThreadTeam::before_fork, &ThreadTeam::after_fork_in_parent, &ThreadTeam::after_fork_in_child);
#endif
  std::atexit(&ThreadTeam::before_exit);
}

// Exit handlers run before the libraries' destructors, among them OpenBLAS's, which unmaps the
// buffers its GEMMs work in. A call may still be running on the team then (a daemon thread's, which
// Python does not wait for): exit waits for its lease to end and grants no other. The wait is bounded,
// so that a call that never ends cannot hang the exit.
void ThreadTeam::before_exit() {
  ThreadTeam& team = instance();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!team.lease_mutex_.try_lock()) {
    if (std::chrono::steady_clock::now() > give_up) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  team.exiting_ = true;
  team.lease_mutex_.unlock();
}

// A fork copies the team's mutexes as they are, and the threads holding them do not exist in the
// child; so the forking thread takes both first (waiting for a running call to finish), and each side
// releases them after.
void ThreadTeam::before_fork() {
  ThreadTeam& team = instance();
  team.lease_mutex_.lock();
  team.sleep_mutex_.lock();
}

void ThreadTeam::after_fork_in_parent() {
  ThreadTeam& team = instance();
  team.sleep_mutex_.unlock();
  team.lease_mutex_.unlock();
}

// A forked child has the parent's ThreadTeam object but none of its worker threads. The std::thread
// handles are parked where nothing joins or destroys them, and fresh workers start on the next run().
// The condition variable still counts the parent's sleeping workers as waiters (a notify in the child
// would wait for them forever), so a new one is built in its place; the old one is never used again.
void ThreadTeam::after_fork_in_child() {
  ThreadTeam& team = instance();
  new std::vector<std::thread>(std::move(team.workers_));  // deliberately never freed
  team.workers_.clear();
  team.workers_lost_ = true;
  team.openmp_ = OpenMPRuntime{};  // an OpenMP runtime's threads do not survive a fork either
  new (&team.wake_) std::condition_variable();
  team.sleep_mutex_.unlock();
  team.lease_mutex_.unlock();
}

ThreadTeam::Lease ThreadTeam::lease() {
  Lease held(*this);
  if (exiting_) throw std::runtime_error("fusedrnn: the process is exiting");
  if (workers_lost_) {
    // A forked child's first call starts the team again: at the child's own default unless a size was
    // set (a worker may have narrowed its mask). A default team the system refuses runs on one rank,
    // as at the start; a size that was set is refused as set_size refuses it.
    const int threads = size_is_default_ ? default_thread_count() : size();
    barrier_.reserve(threads);
    try {
      start_team(threads, 1);
    } catch (const std::runtime_error&) {
      if (!size_is_default_) throw;
    }
  }
  return held;
}

void ThreadTeam::set_worker_delay_after_post(int microseconds) {
  worker_delay_after_post_us.store(std::max(0, microseconds), std::memory_order_relaxed);
}

void ThreadTeam::set_size(int threads) {
  std::lock_guard<std::mutex> hold(lease_mutex_);
  threads = std::clamp(threads, 1, kMaxSize);
  barrier_.reserve(threads);
  if (threads != size() || static_cast<int>(workers_.size()) != threads - 1) {
    const int previous = size();
    stop_workers();
    start_team(threads, previous);
  }
  size_is_default_ = false;
}

void ThreadTeam::start_team(int threads, int fallback) {
  try {
    start_workers(threads);
  } catch (const std::system_error& err) {
    // The system refused a thread (a process or cgroup limit): the workers started are stopped, and the
    // team keeps `fallback` ranks, or a single rank if even that many cannot start again.
    stop_workers();
    int kept = fallback;
    try {
      start_workers(kept);
    } catch (const std::system_error&) {
      stop_workers();
      kept = 1;
    }
    size_.store(kept, std::memory_order_relaxed);
    throw std::runtime_error("fusedrnn: could not start a team of " + std::to_string(threads) + " threads (" +
                             err.what() + "); it keeps " + std::to_string(kept));
  }
  size_.store(threads, std::memory_order_relaxed);
}

void ThreadTeam::use_openmp_runtime(const std::string& library) {
  OpenMPRuntime runtime;
  if (!library.empty() && !forked_child) {
#if defined(__linux__)
    // RTLD_NOLOAD: only a runtime already in the process; loading a second one would start its own pool.
    void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (!handle) throw std::invalid_argument("library: '" + library + "' is not loaded in this process");
    runtime.library = library;
    runtime.parallel = reinterpret_cast<decltype(runtime.parallel)>(dlsym(handle, "GOMP_parallel"));
    runtime.thread_num = reinterpret_cast<decltype(runtime.thread_num)>(dlsym(handle, "omp_get_thread_num"));
    runtime.num_threads = reinterpret_cast<decltype(runtime.num_threads)>(dlsym(handle, "omp_get_num_threads"));
    runtime.max_threads = reinterpret_cast<decltype(runtime.max_threads)>(dlsym(handle, "omp_get_max_threads"));
    dlclose(handle);  // the process keeps it loaded: it was loaded before, by someone else
    if (!runtime.parallel || !runtime.thread_num || !runtime.num_threads || !runtime.max_threads)
      throw std::invalid_argument("library: '" + library + "' has no GNU OpenMP entry points (GOMP_parallel)");
#else
    throw std::invalid_argument("library: OpenMP runtimes are shared on Linux only");
#endif
  }
  std::lock_guard<std::mutex> hold(lease_mutex_);
  openmp_ = runtime;
}

std::string ThreadTeam::openmp_runtime() {
  std::lock_guard<std::mutex> hold(lease_mutex_);
  return openmp_.library;
}

// One job on the OpenMP runtime's threads; false (nothing run) when the runtime gives the region fewer
// threads than the job's plan needs (inside another parallel region, say), which every thread of the
// region sees alike, so none of them enters the job.
bool ThreadTeam::run_on_openmp(int threads, const Job& job) {
  struct Region {
    const Job* job;
    int threads;
    const OpenMPRuntime* runtime;
    std::atomic<bool> short_of_threads{false};
  } region{&job, threads, &openmp_};
  openmp_.parallel(
      [](void* data) {
        Region& r = *static_cast<Region*>(data);
        if (r.runtime->num_threads() != r.threads) {
          r.short_of_threads.store(true, std::memory_order_relaxed);
          return;
        }
        FlushDenormals ftz;
        (*r.job)(r.runtime->thread_num());
      },
      &region, static_cast<unsigned>(threads), 0);
  return !region.short_of_threads.load(std::memory_order_relaxed);
}

void ThreadTeam::start_workers(int threads) {
  workers_lost_ = false;  // whoever starts the workers, a fork's lost ones are replaced once
  stopping_.store(false);
  // The post is read here, not in the new thread: a job posted before the thread first runs must
  // still count as new to it.
  const std::uint64_t seen = post_.load();
  workers_avoid_cpu_ = -1;
  for (int rank = 1; rank < threads; ++rank)
    workers_.emplace_back([this, rank, seen] { worker_loop(rank, seen); });
}

void ThreadTeam::stop_workers() {
  stopping_.store(true);
  post(0);
  for (auto& w : workers_) w.join();
  workers_.clear();
}

// Publishes a new generation for `threads` ranks (0: none, to stop the workers) and wakes the sleepers.
void ThreadTeam::post(int threads) {
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    post_.store(post_word(++generation_, threads), std::memory_order_release);
  }
  wake_.notify_all();
}

void ThreadTeam::run(int threads, const Job& job) {
  // Reached only through a Lease, which holds lease_mutex_.
  if (threads < 1 || threads > size())
    throw std::logic_error("fusedrnn: a job asked for " + std::to_string(threads) + " threads of a team of " +
                           std::to_string(size()));
  barrier_.reset(threads);
  if (threads == 1) {
    FlushDenormals ftz;
    job(0);
    return;
  }
  if (openmp_.parallel && off_openmp_runtime == 0) {
    if (openmp_.caller == std::thread::id()) openmp_.caller = std::this_thread::get_id();
    if (openmp_.caller == std::this_thread::get_id() && openmp_.max_threads() > 1 && run_on_openmp(threads, job))
      return;
  }
  keep_workers_off_caller_cpu();
  job_ = &job;
  pending_.store(threads - 1, std::memory_order_relaxed);
  post(threads);
  {
    FlushDenormals ftz;
    job(0);
  }
  spin_then_yield_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
  job_ = nullptr;
}

// Linux wakes a sleeping worker on its waker's CPU when it can, and the load balancer takes
// milliseconds to separate them again; two ranks sharing one core then pass every step's barrier by
// yielding, many times slower. Workers are therefore kept off the CPU the caller runs on, within the
// caller's own affinity mask (so they follow taskset and os.sched_setaffinity). Only the workers' masks
// change, and only when the caller's CPU or mask has changed since the last job.
void ThreadTeam::keep_workers_off_caller_cpu() {
#if defined(__linux__)
  const int cpu = sched_getcpu();
  if (cpu < 0 || !mask_now_.read_calling_thread()) return;
  if (cpu == workers_avoid_cpu_ && mask_now_ == caller_mask_) return;
  caller_mask_ = mask_now_;
  workers_avoid_cpu_ = cpu;
  CpuMask others = caller_mask_;
  others.clear(cpu);
  // Where the workers outnumber the other CPUs (one CPU allowed, or a team larger than the mask),
  // keeping them off the caller's would stack them on the rest: they share the caller's mask instead.
  const bool fits = others.count() >= static_cast<int>(workers_.size());
  const CpuMask& mask = fits ? others : caller_mask_;
  for (auto& worker : workers_) mask.apply_to(worker);
#endif
}

// A worker takes each post whole (one load): the generation and the job's thread count together.
// While it runs a job, that job's caller waits on pending_, so no later post can come before the
// worker has counted itself off; a worker outside the job reads nothing but the word.
void ThreadTeam::worker_loop(int rank, std::uint64_t seen) {
  for (;;) {
    // Spin for a while, then sleep until the post changes.
    const auto spin_until = std::chrono::steady_clock::now() + kSpinBeforeSleep;
    std::uint64_t word = post_.load(std::memory_order_acquire);
    for (int i = 0; word == seen; ++i) {
      FUSEDRNN_CPU_RELAX();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        wake_.wait(lock, [&] { return post_.load(std::memory_order_acquire) != seen; });
      }
      word = post_.load(std::memory_order_acquire);
    }
    seen = word;
    if (const int delay = worker_delay_after_post_us.load(std::memory_order_relaxed))
      std::this_thread::sleep_for(std::chrono::microseconds(delay));
    if (stopping_.load(std::memory_order_acquire)) return;
    if (rank < post_threads(word)) {
      {
        FlushDenormals ftz;
        (*job_)(rank);
      }
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
}

int default_thread_count() {
  CpuMask mask;
  int cpus = mask.read_calling_thread() ? mask.count() : 0;
  if (cpus <= 0) cpus = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  // Ranks beyond a cgroup's CPU limit would only take turns: the whole team is throttled together
  // once the period's time is spent, and every step's barrier waits out the pause.
  const int limit = cgroup_cpu_limit();
  return std::min(limit > 0 ? std::min(cpus, limit) : cpus, ThreadTeam::kMaxSize);
}

}  // namespace fusedrnn::cpu
