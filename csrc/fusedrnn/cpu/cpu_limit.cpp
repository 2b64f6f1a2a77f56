#include "fusedrnn/cpu/cpu_limit.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace fusedrnn::cpu {
namespace {

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::istringstream in(text);
  for (std::string part; std::getline(in, part, separator);) parts.push_back(part);
  return parts;
}

// A mountinfo path field, unescaped: the kernel writes space, tab, newline and backslash as \ooo.
std::string unescaped(const std::string& field) {
  std::string path;
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() && field.find_first_not_of("01234567", i + 1) >= i + 4) {
      path += static_cast<char>(std::stoi(field.substr(i + 1, 3), nullptr, 8));
      i += 3;
    } else {
      path += field[i];
    }
  }
  return path;
}

bool has_cpu_controller(const std::string& list) {
  const auto names = split(list, ',');
  return std::find(names.begin(), names.end(), "cpu") != names.end();
}

// CPUs a directory's own limit allows (quota / period), or a negative number where it sets none.
double limit_in(const std::string& dir, bool v2) {
  double quota = -1, period = 0;
  if (v2) {
    std::ifstream in(dir + "/cpu.max");
    std::string max;
    if (!(in >> max >> period) || max == "max") return -1;
    quota = std::strtod(max.c_str(), nullptr);
  } else {
    std::ifstream q(dir + "/cpu.cfs_quota_us"), p(dir + "/cpu.cfs_period_us");
    if (!(q >> quota) || !(p >> period)) return -1;
  }
  return quota > 0 && period > 0 ? quota / period : -1;
}

}  // namespace

bool CpuMask::read_calling_thread() {
#if defined(__linux__)
  constexpr std::size_t kMostCpus = std::size_t{1} << 22;  // the kernel's own bound
  const std::size_t last = words_.size() * sizeof(unsigned long) * CHAR_BIT;  // the length read before
  for (std::size_t cpus = std::max<std::size_t>(CPU_SETSIZE, last); cpus <= kMostCpus; cpus *= 2) {
    words_.assign(CPU_ALLOC_SIZE(cpus) / sizeof(unsigned long), 0);
    if (sched_getaffinity(0, words_.size() * sizeof(unsigned long), reinterpret_cast<cpu_set_t*>(words_.data())) == 0)
      return true;
    if (errno != EINVAL) break;
  }
#endif
  words_.clear();
  return false;
}

int CpuMask::count() const {
  int cpus = 0;
  for (unsigned long word : words_) cpus += __builtin_popcountl(word);
  return cpus;
}

void CpuMask::clear(int cpu) {
  constexpr int kBits = sizeof(unsigned long) * CHAR_BIT;
  if (cpu >= 0 && static_cast<std::size_t>(cpu / kBits) < words_.size()) words_[cpu / kBits] &= ~(1UL << (cpu % kBits));
}

void CpuMask::apply_to(std::thread& thread) const {
#if defined(__linux__)
  pthread_setaffinity_np(thread.native_handle(), words_.size() * sizeof(unsigned long),
                         reinterpret_cast<const cpu_set_t*>(words_.data()));
#else
  (void)thread;
#endif
}

// The cgroup file system is found as the process sees it: /proc/self/mountinfo names where the cgroup
// (v2) or cpu-controller (v1) hierarchy is mounted and which cgroup is at the mount's top (a container
// sees its own cgroup there), and /proc/self/cgroup names the process's cgroup in that hierarchy. Each
// directory from the process's cgroup up to the mount is read, since a parent's limit binds its children.
int cgroup_cpu_limit(const std::string& root) {
  std::ifstream mountinfo(root + "/proc/self/mountinfo");
  std::string line, mount_root, mount_point;
  bool v2 = false;
  while (std::getline(mountinfo, line)) {
    const auto dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::istringstream before(line.substr(0, dash)), after(line.substr(dash + 3));
    std::string id, parent, device, this_root, point, type, source, options;
    if (!(before >> id >> parent >> device >> this_root >> point) || !(after >> type >> source >> options)) continue;
    const bool cpu_v1 = type == "cgroup" && has_cpu_controller(options);
    if (cpu_v1 || (type == "cgroup2" && mount_point.empty())) {
      mount_root = unescaped(this_root), mount_point = unescaped(point), v2 = !cpu_v1;
      if (cpu_v1) break;  // a v1 cpu hierarchy holds the limits where both are mounted
    }
  }
  if (mount_point.empty()) return 0;

  std::ifstream cgroups(root + "/proc/self/cgroup");
  std::string path;
  while (std::getline(cgroups, line)) {  // "id:controllers:path"; cgroup v2's line is "0::path"
    const auto first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    if (v2 ? controllers.empty() : has_cpu_controller(controllers)) path = line.substr(second + 1);
  }
  // The part of the process's cgroup below the mount's top: none where the process's cgroup is the
  // mount's top or lies outside it ("/.." from inside a cgroup namespace whose top it has left), and
  // then the mount's own limits are all there is to read.
  if (mount_root == "/") mount_root.clear();
  std::string below;
  if (path.compare(0, mount_root.size(), mount_root) == 0 && path.size() > mount_root.size() &&
      path[mount_root.size()] == '/' && path.find("/..") == std::string::npos)
    below = path.substr(mount_root.size());
  while (!below.empty() && below.back() == '/') below.pop_back();
  const std::string top = root + mount_point;
  double least = -1;
  for (std::string dir = top + below;; dir.erase(dir.rfind('/'))) {
    const double cpus = limit_in(dir, v2);
    if (cpus > 0 && (least < 0 || cpus < least)) least = cpus;
    if (dir.size() <= top.size()) break;
  }
  if (least <= 0) return 0;
  return static_cast<int>(std::min(std::ceil(least), static_cast<double>(std::numeric_limits<int>::max())));
}

}  // namespace fusedrnn::cpu
