// Whole-array passes the bindings run on arguments and results outside the layer calls (the finite
// checks of x and dy, adding a call's input gradients into those kept): the active SIMD level's loop,
// shared across the thread team once each rank gets enough values to pay for a job.
#pragma once

#include <cstdint>

namespace fusedrnn::cpu {

// True when none of the `count` values is NaN or infinite.
template <typename T>
bool parallel_all_finite(const T* values, std::int64_t count);

// checks.h's fingerprint of the whole array; the same for any split of it, so for any team.
template <typename T>
std::uint32_t parallel_fingerprint(const T* values, std::int64_t count);

// into[i] += from[i] for i < count.
template <typename T>
void parallel_add_into(T* into, const T* from, std::int64_t count);

}  // namespace fusedrnn::cpu
