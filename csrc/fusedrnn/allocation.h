// Allocations whose size comes from a caller's shapes: the size checked against what size_t holds, and
// a failure that says how much was asked (std::bad_alloc says only "std::bad_alloc"). Both throw
// AllocationError, a std::bad_alloc, so Python sees a MemoryError with its text (pybind11 passes what()
// on) and C++ callers catch it as any failed allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
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

// Uninitialised scratch kept between calls and grown to the largest asked of it, 64-byte aligned (the
// thread team's ranks write 64-byte-aligned ranges of units: no cache line written by two cores). Kept,
// because a fresh multi-megabyte allocation is a fresh mmap whose page faults and zeroing cost a
// visible share of a call (see bench/NOTES.md, "Figures behind the code", scratch).
class KeptBuffer {
 public:
  // At least `bytes` bytes; `what` names the buffer in an allocation failure.
  unsigned char* reserve(std::size_t bytes, const char* what) {
    if (bytes > capacity_) {
      // Released before allocating, so peak memory is not old + new; the capacity follows, so a failed
      // allocation leaves an empty buffer rather than a null one of the old size.
      release();
      data_.reset(static_cast<unsigned char*>(
          allocate_named(bytes, what, [](std::size_t size) { return ::operator new[](size, std::align_val_t(64)); })));
      capacity_ = bytes;
    }
    return data_.get();
  }
  // `count` values of T: reserve(count * sizeof(T)), the size checked.
  template <typename T>
  T* reserve_values(std::uint64_t count, const char* what) {
    return reinterpret_cast<T*>(reserve(checked_bytes(count, sizeof(T), 0, what), what));
  }
  // Frees the buffer; returns the bytes it held.
  std::size_t release() {
    const std::size_t bytes = capacity_;
    data_.reset();
    capacity_ = 0;
    return bytes;
  }

 private:
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<unsigned char[], Free> data_;
  std::size_t capacity_ = 0;
};

}  // namespace fusedrnn
