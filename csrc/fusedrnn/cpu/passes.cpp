#include "fusedrnn/cpu/passes.h"

#include <algorithm>
#include <atomic>
#include <optional>

#include "fusedrnn/cpu/kernels.h"
#include "fusedrnn/cpu/threads.h"

namespace fusedrnn::cpu {
namespace {

// A rank's share below this many values costs more in the job's start and join than the second core
// saves (see bench/NOTES.md, "Figures behind the code", whole-array passes).
constexpr std::int64_t kMinValuesPerRank = 1 << 16;

// Runs pass(begin, end) over contiguous shares of [0, count), on as many ranks as pay.
template <typename Pass>
void share_out(std::int64_t count, const Pass& pass) {
  std::int64_t ranks = count / kMinValuesPerRank;
  std::optional<ThreadTeam::Lease> team;  // taken only when the pass is worth sharing
  if (ranks > 1) {
    team.emplace(ThreadTeam::instance().lease());
    ranks = std::min<std::int64_t>(ranks, team->size());
  }
  if (ranks <= 1) {
    pass(0, count);
    return;
  }
  team->run(static_cast<int>(ranks), [&](int rank) {
    const std::int64_t begin = count * rank / ranks, end = count * (rank + 1) / ranks;
    pass(begin, end);
  });
}

}  // namespace

template <typename T>
bool parallel_all_finite(const T* values, std::int64_t count) {
  const RecurrenceKernels<T>& kern = kernels_for<T>(active_kernels());
  std::atomic<bool> finite{true};
  share_out(count, [&](std::int64_t begin, std::int64_t end) {
    if (!kern.all_finite(values + begin, end - begin)) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load(std::memory_order_relaxed);  // the job's end orders the ranks' stores before this
}

template <typename T>
std::uint32_t parallel_fingerprint(const T* values, std::int64_t count) {
  const RecurrenceKernels<T>& kern = kernels_for<T>(active_kernels());
  std::atomic<std::uint32_t> total{0};  // a wrapping sum: the ranks' shares add up in any order
  share_out(count, [&](std::int64_t begin, std::int64_t end) {
    total.fetch_add(kern.fingerprint(values + begin, end - begin, begin), std::memory_order_relaxed);
  });
  return total.load(std::memory_order_relaxed);
}

template <typename T>
void parallel_add_into(T* into, const T* from, std::int64_t count) {
  const RecurrenceKernels<T>& kern = kernels_for<T>(active_kernels());
  share_out(count, [&](std::int64_t begin, std::int64_t end) {
    kern.add_into(into + begin, from + begin, end - begin);
  });
}

template bool parallel_all_finite<float>(const float*, std::int64_t);
template bool parallel_all_finite<double>(const double*, std::int64_t);
template std::uint32_t parallel_fingerprint<float>(const float*, std::int64_t);
template std::uint32_t parallel_fingerprint<double>(const double*, std::int64_t);
template void parallel_add_into<float>(float*, const float*, std::int64_t);
template void parallel_add_into<double>(double*, const double*, std::int64_t);

}  // namespace fusedrnn::cpu
