// Passes over argument and gradient arrays, compiled per SIMD level (kernels_isa.cpp; always inlined, so
// each level's copy stays its own) and shared across the team by passes.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__)
#define FUSEDRNN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FUSEDRNN_ALWAYS_INLINE inline
#endif

namespace fusedrnn::cpu {

template <typename T, typename Bits>
FUSEDRNN_ALWAYS_INLINE Bits bits_of(T value) {
  Bits bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// True when none of the `count` values is NaN or infinite. x - x is +0 (all bits clear) for every
// finite x and NaN otherwise, so the OR of its bits over all values is zero exactly when all are finite:
// one pass of a subtract and an OR a vector, in blocks, so a bad value ends the scan at its block's end,
// where numpy's min and max take two passes with a setup each (see bench/NOTES.md, "Figures behind the code", whole-array passes).
template <typename T>
FUSEDRNN_ALWAYS_INLINE bool all_finite(const T* values, std::int64_t count) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float32 or float64 values");
  using Bits = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;
  constexpr std::int64_t kBlock = 4096;
  constexpr int kChains = 8;  // independent ORs, so the loop is not one dependency chain
  for (std::int64_t start = 0; start < count; start += kBlock) {
    const std::int64_t end = std::min(count, start + kBlock);
    Bits bad[kChains] = {};
    std::int64_t i = start;
    for (; i + kChains <= end; i += kChains)
      for (int c = 0; c < kChains; ++c) bad[c] |= bits_of<T, Bits>(values[i + c] - values[i + c]);
    for (; i < end; ++i) bad[0] |= bits_of<T, Bits>(values[i] - values[i]);
    for (int c = 1; c < kChains; ++c) bad[0] |= bad[c];
    if (bad[0]) return false;
  }
  return true;
}

// into[i] += from[i].
template <typename T>
FUSEDRNN_ALWAYS_INLINE void add_into(T* __restrict into, const T* __restrict from, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) into[i] += from[i];
}

}  // namespace fusedrnn::cpu
