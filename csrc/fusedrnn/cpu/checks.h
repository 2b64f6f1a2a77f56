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

// For a hot lambda called from more than one place, which Clang may leave out of line. GCC inlines
// such lambdas itself, and forcing it changes its other inlining choices in the kernels (slower: see
// bench/NOTES.md, "Built with Clang, again").
#if defined(__clang__)
#define FUSEDRNN_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FUSEDRNN_INLINE_LAMBDA
#endif

namespace fusedrnn::cpu {

template <typename T, typename Bits>
FUSEDRNN_ALWAYS_INLINE Bits bits_of(T value) {
  Bits bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// True when none of the `count` values is NaN or infinite. x - x is zero for every finite x (-0 when
// the caller's thread rounds downward: the sign bit is masked off) and NaN otherwise, so the OR of its
// bits over all values is zero, but for the sign, exactly when all are finite:
// one pass of a subtract and an OR a vector, in blocks, so a bad value ends the scan at its block's end,
// where numpy's min and max take two passes with a setup each (see bench/NOTES.md, "Figures behind the code", whole-array passes).
template <typename T>
FUSEDRNN_ALWAYS_INLINE bool all_finite(const T* values, std::int64_t count) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float32 or float64 values");
  using Bits = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;
  constexpr Bits kSign = Bits(1) << (8 * sizeof(Bits) - 1);
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
    if (bad[0] & ~kSign) return false;
  }
  return true;
}

// A fingerprint of the values' memory: over its 32-bit words w[j] at positions p = first + j (`first` the
// index of values[0]'s first word in the whole array), the sum of mix(w[j] ^ key(p)) wrapping at 32 bits,
// key(p) = (2p + 1) * 0x9e3779b9, so the shares of a split array add up to the whole's (in any order) and
// a value moved elsewhere changes it. mix is a nonlinear bijection (xor-shifts around an odd multiply):
// with the words themselves, a change that adds the same amount to several words could cancel (two sign
// bits flipped add 2^32). The position goes into the mix, not as a weight outside it: values of few kinds
// (one-hot rows: zeros, mix(0) = 0, and ones) would sum to mix(1.0) times the ones' weights, which a move
// keeping that sum (two rows swapped) leaves unchanged.
// A check that an array kept by reference was not changed in place, not a hash against tampering; 32-bit
// words for both dtypes because a 32-bit multiply vectorises at every level (a 64-bit one not before
// AVX-512).
FUSEDRNN_ALWAYS_INLINE std::uint32_t mix_word(std::uint32_t w) {
  w ^= w >> 16;
  w *= 0x7feb352dU;
  w ^= w >> 15;
  return w;
}

template <typename T>
FUSEDRNN_ALWAYS_INLINE std::uint32_t fingerprint(const T* values, std::int64_t count, std::int64_t first) {
  static_assert(sizeof(T) % 4 == 0, "values of whole 32-bit words");
  constexpr std::int64_t kWords = sizeof(T) / 4;
  const auto* bytes = reinterpret_cast<const unsigned char*>(values);
  constexpr std::uint32_t kKeyStep = 0x9e3779b9U;
  std::uint32_t sum = 0, key = static_cast<std::uint32_t>(2 * first * kWords + 1) * kKeyStep;
  for (std::int64_t j = 0; j < count * kWords; ++j, key += 2 * kKeyStep) {
    std::uint32_t word;
    std::memcpy(&word, bytes + 4 * j, 4);
    sum += mix_word(word ^ key);
  }
  return sum;
}

// into[i] += from[i].
template <typename T>
FUSEDRNN_ALWAYS_INLINE void add_into(T* __restrict into, const T* __restrict from, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) into[i] += from[i];
}

}  // namespace fusedrnn::cpu
