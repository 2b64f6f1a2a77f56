#pragma once

#include <string>
#include <thread>
#include <vector>

namespace fusedrnn::cpu {

// A thread's CPU affinity mask, as long as the kernel's own: a plain cpu_set_t holds 1024 CPUs, and
// sched_getaffinity refuses a mask shorter than the kernel's count of possible CPUs.
class CpuMask {
 public:
  // Reads the calling thread's mask (Linux); false, leaving the mask empty, where it cannot be read.
  bool read_calling_thread();
  bool empty() const { return words_.empty(); }
  int count() const;
  void clear(int cpu);
  // Pins `thread` to these CPUs (Linux).
  void apply_to(std::thread& thread) const;
  bool operator==(const CpuMask& other) const { return words_ == other.words_; }

 private:
  std::vector<unsigned long> words_;  // cpu_set_t's layout: CPU n is bit n % 64 of word n / 64
};

// The CPUs' worth of time per period that the process's cgroups allow it, rounded up (a container's
// `--cpus`, a Kubernetes CPU limit): the least over the cgroup and its ancestors of cgroup v2's
// cpu.max or cgroup v1's cpu.cfs_quota_us / cpu.cfs_period_us. 0 where no limit is set or none can be
// read (not Linux, no cgroup file system). `root` prefixes /proc and /sys (tests give a fake tree).
int cgroup_cpu_limit(const std::string& root = "");

}  // namespace fusedrnn::cpu
