// Allocations whose size comes from a caller's shapes: the size checked against what size_t holds, and
// a failure that says how much was asked (std::bad_alloc says only "std::bad_alloc"). Both throw
// AllocationError, a std::bad_alloc, so Python sees a MemoryError with its text (pybind11 passes what()
// on) and C++ callers catch it as any failed allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <new>
#include <string>
#include <utility>

namespace fusedrnn {

class AllocationError : public std::bad_alloc {
 public:
  explicit AllocationError(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

// "34359738432 bytes (32.0 GiB)".
inline std::string describe_bytes(std::size_t bytes) {
  char gib[32];
  std::snprintf(gib, sizeof gib, "%.1f", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return std::to_string(bytes) + " bytes (" + gib + " GiB)";
}

// count * value_bytes + extra_bytes, or AllocationError naming `what` where that is past the largest
// object size (PTRDIFF_MAX: what numpy and operator new can make at all).
inline std::size_t checked_bytes(std::uint64_t count, std::size_t value_bytes, std::size_t extra_bytes,
                                 const char* what) {
  constexpr std::size_t kMax = std::numeric_limits<std::ptrdiff_t>::max();
  if (count > (kMax - extra_bytes) / value_bytes)
    throw AllocationError(std::string("fusedrnn: ") + what + ": " + std::to_string(count) + " values of " +
                          std::to_string(value_bytes) + " bytes are past the address space");
  return static_cast<std::size_t>(count) * value_bytes + extra_bytes;
}

// allocate(bytes), a failed allocation rethrown as AllocationError naming `what` and the bytes.
template <typename Allocate>
auto allocate_named(std::size_t bytes, const char* what, Allocate&& allocate) -> decltype(allocate(bytes)) {
  try {
    return allocate(bytes);
  } catch (const AllocationError&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw AllocationError("fusedrnn: out of memory allocating " + describe_bytes(bytes) + " for " + what);
  }
}

}  // namespace fusedrnn
