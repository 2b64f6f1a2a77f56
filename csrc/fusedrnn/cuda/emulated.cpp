#include "fusedrnn/cuda/emulated.h"

#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "fusedrnn/cpu/blas.h"
#include "fusedrnn/cuda/device.h"
#include "fusedrnn/cuda/layer_impl.h"

namespace fusedrnn::gpu::emulated {
namespace {

std::atomic<std::int64_t> cooperative_launch_count{0};

// The figures of the GPU the emulation stands for (an H100/H200: 132 SMs, 2048 threads and 228 KB of
// shared memory an SM, 227 KB a block), so the persistent kernels' fit is decided as on one.
constexpr int kMultiprocessors = 132;
constexpr unsigned kThreadsPerMultiprocessor = 2048;
constexpr std::size_t kSharedPerMultiprocessor = 228 * 1024;
constexpr std::size_t kSharedPerBlock = 227 * 1024;

// Shared memory of `blocks` blocks, each block's aligned for any value type.
class SharedMemory {
 public:
  SharedMemory(unsigned blocks, std::size_t bytes)
      : per_block_((bytes + sizeof(Slot) - 1) / sizeof(Slot)), slots_(blocks * per_block_ + 1) {}
  unsigned char* block(unsigned b) { return reinterpret_cast<unsigned char*>(slots_.data() + b * per_block_); }

 private:
  using Slot = std::max_align_t;
  std::size_t per_block_;
  std::vector<Slot> slots_;
};

class EmulatedDevice {
 public:
  template <typename T>
  void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b,
            Index ldb, T beta, T* c, Index ldc) {
    cpu::blas::gemm<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  template <typename T>
  void gemm_batched(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* a, Index lda,
                    Index stride_a, const T* b, Index ldb, Index stride_b, T beta, T* c, Index ldc, Index stride_c,
                    Index count) {
    for (Index i = 0; i < count; ++i)
      gemm<T>(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
  }

  // Block by block; within a block each phase for every thread before the next (a block barrier).
  template <typename Kernel>
  void launch(const Kernel& kernel, const LaunchShape& shape) {
    SharedMemory shared(1, shape.shared_bytes);
    const Index phases = phase_count(kernel, shape.threads);
    for (unsigned b = 0; b < shape.blocks; ++b)
      for (Index p = 0; p < phases; ++p)
        for (unsigned t = 0; t < shape.threads; ++t)
          kernel(ThreadIndex{b, shape.blocks, t, shape.threads}, p, shared.block(0));
  }

  // Between two grid barriers (Kernel::grid_barrier_after) each block runs its phases alone, block
  // after block, each phase for every thread before the next (a block barrier): a schedule a GPU may
  // take, so a grid barrier missing from the kernel shows as a wrong result.
  template <typename Kernel>
  void launch_cooperative(const Kernel& kernel, const LaunchShape& shape) {
    cooperative_launch_count.fetch_add(1);
    SharedMemory shared(shape.blocks, shape.shared_bytes);
    const Index phases = phase_count(kernel, shape.threads);
    for (Index first = 0; first < phases;) {
      Index last = first;
      while (last + 1 < phases && !kernel.grid_barrier_after(last)) ++last;
      for (unsigned b = 0; b < shape.blocks; ++b)
        for (Index p = first; p <= last; ++p)
          for (unsigned t = 0; t < shape.threads; ++t)
            kernel(ThreadIndex{b, shape.blocks, t, shape.threads}, p, shared.block(b));
      first = last + 1;
    }
  }

  template <typename Kernel>
  Index cooperative_blocks(unsigned threads, std::size_t shared_bytes) const {
    if (shared_bytes > kSharedPerBlock) return 0;
    const Index by_threads = kThreadsPerMultiprocessor / threads;
    const Index by_shared = shared_bytes == 0 ? by_threads : static_cast<Index>(kSharedPerMultiprocessor / shared_bytes);
    return kMultiprocessors * (by_threads < by_shared ? by_threads : by_shared);
  }
  std::size_t max_shared_bytes() const { return kSharedPerBlock; }
  Index multiprocessors() const { return kMultiprocessors; }

  template <typename F>
  void sequence(const std::vector<std::int64_t>& /*key*/, F&& enqueue) {
    enqueue();
  }
};

}  // namespace

template <typename T>
std::size_t forward_workspace_bytes(const LayerForwardParams<T>& params) {
  return gpu::forward_workspace_bytes(params);
}

template <typename T>
std::size_t backward_workspace_bytes(const LayerBackwardParams<T>& params) {
  return gpu::backward_workspace_bytes(params);
}

template <typename T>
void layer_forward(const LayerForwardParams<T>& params, void* workspace, RecurrencePath path) {
  EmulatedDevice dev;
  gpu::layer_forward(dev, params, workspace, path);
}

template <typename T>
void layer_backward(const LayerBackwardParams<T>& params, void* workspace, RecurrencePath path) {
  EmulatedDevice dev;
  gpu::layer_backward(dev, params, workspace, path);
}

template <typename T>
void layer_forward(const LayerForwardParams<T>& params, RecurrencePath path) {
  std::vector<unsigned char> workspace(forward_workspace_bytes(params));
  layer_forward(params, workspace.data(), path);
}

template <typename T>
void layer_backward(const LayerBackwardParams<T>& params, RecurrencePath path) {
  std::vector<unsigned char> workspace(backward_workspace_bytes(params));
  layer_backward(params, workspace.data(), path);
}

template <typename T>
void flag_non_finite(const T* data, Index count, int* flag) {
  EmulatedDevice dev;
  gpu::flag_non_finite(dev, data, count, flag);
}

std::int64_t cooperative_launches() { return cooperative_launch_count.load(); }

template <typename T>
PersistentShapes persistent_shapes(CellKind cell, const LayerShape& shape, RecurrencePath path) {
  EmulatedDevice dev;
  PersistentShapes out;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    out = {persistent_shape<Cell, T>(dev, shape, path), persistent_backward_shape<Cell, T>(dev, shape, path)};
  });
  return out;
}

template void layer_forward<float>(const LayerForwardParams<float>&, RecurrencePath);
template void layer_forward<double>(const LayerForwardParams<double>&, RecurrencePath);
template void layer_backward<float>(const LayerBackwardParams<float>&, RecurrencePath);
template void layer_backward<double>(const LayerBackwardParams<double>&, RecurrencePath);
template PersistentShapes persistent_shapes<float>(CellKind, const LayerShape&, RecurrencePath);
template PersistentShapes persistent_shapes<double>(CellKind, const LayerShape&, RecurrencePath);
template void flag_non_finite<float>(const float*, Index, int*);
template void flag_non_finite<double>(const double*, Index, int*);
template std::size_t forward_workspace_bytes<float>(const LayerForwardParams<float>&);
template std::size_t forward_workspace_bytes<double>(const LayerForwardParams<double>&);
template std::size_t backward_workspace_bytes<float>(const LayerBackwardParams<float>&);
template std::size_t backward_workspace_bytes<double>(const LayerBackwardParams<double>&);
template void layer_forward<float>(const LayerForwardParams<float>&, void*, RecurrencePath);
template void layer_forward<double>(const LayerForwardParams<double>&, void*, RecurrencePath);
template void layer_backward<float>(const LayerBackwardParams<float>&, void*, RecurrencePath);
template void layer_backward<double>(const LayerBackwardParams<double>&, void*, RecurrencePath);

}  // namespace fusedrnn::gpu::emulated
