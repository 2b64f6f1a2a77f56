// The device-API seam: the few operations the CUDA backend's orchestration (layer_impl.h) asks of a
// device, so that the orchestration is written once and runs on a real GPU (cuda_device.cuh: cuBLAS and
// kernel launches on a stream) or on the host (emulated.h: host BLAS and loops over the grid).
//
// A Device provides, all enqueued in order on the device's one stream (the host is never synchronised):
//   gemm<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
//       row-major C (m x n, row stride ldc) = alpha op(A) op(B) + beta C, as cpu/blas.h's gemm.
//   gemm_batched<T>(trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc,
//                   stride_c, count)
//       count such GEMMs, the i-th on a + i*stride_a, b + i*stride_b and c + i*stride_c.
//   launch(kernel, LaunchShape)
//       runs a kernel body (below) over shape.blocks blocks of shape.threads threads, each block with
//       shape.shared_bytes of shared memory; the threads of a block meet at a barrier between phases.
//   launch_cooperative(kernel, LaunchShape)
//       as launch, but after each phase p with kernel.grid_barrier_after(p) every block of the grid
//       meets (a grid-wide barrier: all blocks must be resident at once; cooperative_blocks says how
//       many can be); after the other phases, the threads of each block meet as in launch.
//   cooperative_blocks<Kernel>(threads, shared_bytes): blocks of that size that can be resident at once.
//   max_shared_bytes(): shared memory a block may use.
//   multiprocessors(): the device's multiprocessors (blocks that run at the same time, one each).
//   sequence(key, enqueue): enqueues what enqueue() enqueues. A device may record it the first time a
//       key is seen and replay the recording for an equal key instead of calling enqueue() (CUDA
//       Graphs), so the key must hold every value the work depends on (layer_impl.h, SequenceKey).
// Memory is set and copied by kernels (kernels.h: Copy3, Fill), which also read any strides.
//
// A kernel body is a plain struct of device pointers and sizes (copied to the device by value) with
//   FUSEDRNN_HD Index phases(unsigned threads) const;   // barrier-separated phases, >= 1
//   FUSEDRNN_HD void operator()(const ThreadIndex&, Index phase, unsigned char* shared) const;
// and, launched cooperatively, also
//   FUSEDRNN_HD bool grid_barrier_after(Index phase) const;  // whether the barrier after it is grid-wide
// A value that must outlive its phase lives in shared or global memory, never in a local variable: the
// emulation runs each phase of a block (or of the grid) for every thread before the next phase starts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "fusedrnn/cells.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::gpu {

// Where a thread is in its launch (one-dimensional grids and blocks).
struct ThreadIndex {
  unsigned block = 0, blocks = 1, thread = 0, threads = 1;
  FUSEDRNN_HD Index global() const { return static_cast<Index>(block) * threads + thread; }
  FUSEDRNN_HD Index grid_threads() const { return static_cast<Index>(blocks) * threads; }
};

// The phases a launch of `kernel` runs, counted in Index: a persistent kernel runs 1 + 3T of them, which
// overflows 32 bits from T ~ 7e8 (and a negative count would run none, silently).
template <typename Kernel>
FUSEDRNN_HD Index phase_count(const Kernel& kernel, unsigned threads) {
  static_assert(std::is_same_v<decltype(kernel.phases(threads)), Index>, "a kernel's phases() returns Index");
  return kernel.phases(threads);
}

struct LaunchShape {
  unsigned blocks = 1;
  unsigned threads = 1;
  std::size_t shared_bytes = 0;
};

// Threads per block of the elementwise kernels: a multiple of the warp, and a power of two (the block
// reductions halve it).
constexpr unsigned kBlockThreads = 256;

// Hands out aligned pieces of one workspace; with no workspace (base null) it only counts the bytes,
// so sizing and carving are the same code.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<unsigned char*>(base)) {}
  template <typename U>
  U* take(Index count) {
    constexpr std::size_t kAlign = 256;  // cudaMalloc's alignment: every buffer starts a fresh segment
    used_ = (used_ + kAlign - 1) / kAlign * kAlign;
    U* p = base_ ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ += static_cast<std::size_t>(count) * sizeof(U);
    return p;
  }
  std::size_t bytes() const { return used_; }

 private:
  unsigned char* base_;
  std::size_t used_ = 0;
};

// Enough blocks of kBlockThreads for one thread per item (at least one block).
inline LaunchShape covering(Index items) {
  const Index blocks = (items + kBlockThreads - 1) / kBlockThreads;
  return {static_cast<unsigned>(blocks > 0 ? blocks : 1), kBlockThreads, 0};
}

}  // namespace fusedrnn::gpu
