// Resources that one host thread uses at a time on one device (on a GPU: a cuBLAS handle, and the stream
// and graphs of its recordings). A thread gets its set from a process-wide pool on its first call and
// hands it back when the thread ends, for the next thread to reuse. So a server whose threads come and go
// keeps as many sets as it ran threads at once, not one for every thread it ever started. Nothing is
// destroyed: the pool lives as long as the process, since destroying CUDA objects at exit races the
// driver's own teardown. Needs no CUDA, so the emulated runtime leases through the same code.
// A fork takes the pool's lock first, so the child never finds it held by a thread it does not have;
// the sets of those threads stay counted as held there, and are not reused.
#pragma once

#include <pthread.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace fusedrnn::gpu {

struct LeaseCounts {
  std::int64_t made = 0;  // sets made so far in this process
  std::int64_t held = 0;  // sets that threads hold now (the rest wait in the pool)
};

template <typename Resources>
class ThreadLeases {
 public:
  // This thread's set for `device`: the one it holds, else one from the pool, else make()'s.
  template <typename Make>
  static Resources& of_this_thread(int device, Make&& make) {
    Held& held = held_by_this_thread();
    if (auto found = held.by_device.find(device); found != held.by_device.end()) return *found->second;
    std::unique_ptr<Resources> resources = pool().lend(device);
    if (!resources) {
      resources = std::make_unique<Resources>(make());
      pool().count_made();
    }
    return *held.by_device.emplace(device, std::move(resources)).first->second;
  }

  static LeaseCounts counts() { return pool().counts(); }

 private:
  class Pool {
   public:
    std::unique_ptr<Resources> lend(int device) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& waiting = waiting_[device];
      if (waiting.empty()) return nullptr;
      std::unique_ptr<Resources> resources = std::move(waiting.back());
      waiting.pop_back();
      ++counts_.held;
      return resources;
    }

    void count_made() {
      std::lock_guard<std::mutex> lock(mutex_);
      ++counts_.made;
      ++counts_.held;
    }

    void take_back(int device, std::unique_ptr<Resources> resources) {
      std::lock_guard<std::mutex> lock(mutex_);
      waiting_[device].push_back(std::move(resources));
      --counts_.held;
    }

    LeaseCounts counts() {
      std::lock_guard<std::mutex> lock(mutex_);
      return counts_;
    }

    // Around a fork (pthread_atfork), on the forking thread.
    void lock() { mutex_.lock(); }
    void unlock() { mutex_.unlock(); }

   private:
    std::mutex mutex_;
    std::map<int, std::vector<std::unique_ptr<Resources>>> waiting_;
    LeaseCounts counts_;
  };

  // Never destroyed (see above); a thread that ends during exit still finds it.
  static Pool& pool() {
    static Pool* const instance = [] {
      auto* made = new Pool;
      pthread_atfork([] { pool().lock(); }, [] { pool().unlock(); }, [] { pool().unlock(); });
      return made;
    }();
    return *instance;
  }

  // A thread's sets by device, handed back when the thread ends.
  struct Held {
    std::map<int, std::unique_ptr<Resources>> by_device;
    ~Held() {
      for (auto& [device, resources] : by_device) pool().take_back(device, std::move(resources));
    }
  };

  static Held& held_by_this_thread() {
    thread_local Held held;
    return held;
  }
};

}  // namespace fusedrnn::gpu
