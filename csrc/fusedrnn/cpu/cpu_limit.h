#pragma once

#include <string>

namespace fusedrnn::cpu {

// The CPUs' worth of time per period that the process's cgroups allow it, rounded up (a container's
// `--cpus`, a Kubernetes CPU limit): the least over the cgroup and its ancestors of cgroup v2's
// cpu.max or cgroup v1's cpu.cfs_quota_us / cpu.cfs_period_us. 0 where no limit is set or none can be
// read (not Linux, no cgroup file system). `root` prefixes /proc and /sys (tests give a fake tree).
int cgroup_cpu_limit(const std::string& root = "");

}  // namespace fusedrnn::cpu
