// The device seam (device.h) on a GPU: cuBLAS for the GEMMs, kernel launches on one stream. Each kernel
// body runs inside run_phases (a block barrier between phases) or run_phases_grid (a cooperative launch,
// the body saying where a barrier is grid-wide). Every call's status is checked and thrown with its text.
#pragma once

#include <cooperative_groups.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fusedrnn/cuda/device.h"
#include "fusedrnn/cuda/thread_leases.h"

namespace fusedrnn::gpu::cuda {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    // The runtime also keeps the error as this thread's last one, which the next launch's check would
    // read back: a caller that catches an out-of-memory error and retries smaller must start clean.
    // (A sticky error, one that spoils the context, comes back from every later call anyway.)
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("fusedrnn: CUDA error in ") + what + ": " + cudaGetErrorName(status) +
                             " (" + cudaGetErrorString(status) + ")");
  }
}

inline void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("fusedrnn: cuBLAS error in ") + what + ": " + cublasGetStatusName(status) +
                             " (" + cublasGetStatusString(status) + ")");
}

template <typename Kernel>
__global__ void run_phases(Kernel kernel) {
  extern __shared__ __align__(16) unsigned char shared[];
  const ThreadIndex at{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x};
  const Index phases = phase_count(kernel, blockDim.x);
  for (Index p = 0; p < phases; ++p) {
    if (p > 0) __syncthreads();
    kernel(at, p, shared);
  }
}

template <typename Kernel>
__global__ void run_phases_grid(Kernel kernel) {
  extern __shared__ __align__(16) unsigned char shared[];
  const ThreadIndex at{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x};
  const Index phases = phase_count(kernel, blockDim.x);
  for (Index p = 0; p < phases; ++p) {
    if (p > 0) {
      if (kernel.grid_barrier_after(p - 1))
        cooperative_groups::this_grid().sync();
      else
        __syncthreads();
    }
    kernel(at, p, shared);
  }
}

// Whether per-step loops are recorded as CUDA Graphs and replayed (Device::sequence); off by default
// until a GPU run shows the recordings replay inside a training loop whose allocator moves the arrays
// (bench/NOTES.md, "CUDA backend on an H200").
inline std::atomic<bool>& graphs_enabled() {
  static std::atomic<bool> enabled{false};
  return enabled;
}

// Sequences recorded and replayed so far in this process (tests and benchmarks check replays happen).
struct GraphCounts {
  std::atomic<std::int64_t> recorded{0}, replayed{0};
};
inline GraphCounts& graph_counts() {
  static GraphCounts counts;
  return counts;
}

// Instantiated graphs by sequence key, the least recently used dropped beyond kCapacity. Recording needs
// a stream other than the legacy default one, so each cache records on a stream of its own and launches
// the graph on the caller's.
class GraphCache {
 public:
  static constexpr std::size_t kCapacity = 32;

  cudaStream_t recording_stream() {
    if (!recording_) check(cudaStreamCreateWithFlags(&recording_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return recording_;
  }

  cudaGraphExec_t find(const std::vector<std::int64_t>& key) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->first == key) {
        entries_.splice(entries_.begin(), entries_, it);
        return it->second;
      }
    return nullptr;
  }

  void add(std::vector<std::int64_t> key, cudaGraphExec_t exec) {
    entries_.emplace_front(std::move(key), exec);
    if (entries_.size() > kCapacity) {
      check(cudaGraphExecDestroy(entries_.back().second), "cudaGraphExecDestroy");
      entries_.pop_back();
    }
  }

 private:
  std::list<std::pair<std::vector<std::int64_t>, cudaGraphExec_t>> entries_;
  cudaStream_t recording_ = nullptr;
};

// What a host thread uses on one device (thread_leases.h).
struct ThreadResources {
  cublasHandle_t blas = nullptr;
  GraphCache graphs;
};
using ThreadResourceLeases = ThreadLeases<ThreadResources>;

class CudaDevice {
 public:
  explicit CudaDevice(cudaStream_t stream)
      : stream_(stream), resources_(resources_of_this_thread()), blas_(resources_.blas) {
    check(cublasSetStream(blas_, stream_), "cublasSetStream");
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&multiprocessors_, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    int shared = 0;
    check(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
    max_shared_ = static_cast<std::size_t>(shared);
  }

  // Row-major C = op(A) op(B): cuBLAS's column-major C^T = op(B)^T op(A)^T, the operands swapped.
  template <typename T>
  void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b,
            Index ldb, T beta, T* c, Index ldc) {
    if (m == 0 || n == 0) return;
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    if constexpr (std::is_same_v<T, float>)
      check(cublasSgemm_64(blas_, op_b, op_a, n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc), "cublasSgemm");
    else
      check(cublasDgemm_64(blas_, op_b, op_a, n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc), "cublasDgemm");
  }

  template <typename T>
  void gemm_batched(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* a, Index lda,
                    Index stride_a, const T* b, Index ldb, Index stride_b, T beta, T* c, Index ldc, Index stride_c,
                    Index count) {
    if (m == 0 || n == 0 || count == 0) return;
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    if constexpr (std::is_same_v<T, float>)
      check(cublasSgemmStridedBatched_64(blas_, op_b, op_a, n, m, k, &alpha, b, ldb, stride_b, a, lda, stride_a,
                                         &beta, c, ldc, stride_c, count),
            "cublasSgemmStridedBatched");
    else
      check(cublasDgemmStridedBatched_64(blas_, op_b, op_a, n, m, k, &alpha, b, ldb, stride_b, a, lda, stride_a,
                                         &beta, c, ldc, stride_c, count),
            "cublasDgemmStridedBatched");
  }

  template <typename Kernel>
  void launch(const Kernel& kernel, const LaunchShape& shape) {
    allow_shared(reinterpret_cast<const void*>(&run_phases<Kernel>), shape.shared_bytes);
    run_phases<Kernel><<<shape.blocks, shape.threads, shape.shared_bytes, stream_>>>(kernel);
    check(cudaGetLastError(), "a kernel launch");
  }

  template <typename Kernel>
  void launch_cooperative(const Kernel& kernel, const LaunchShape& shape) {
    const void* function = reinterpret_cast<const void*>(&run_phases_grid<Kernel>);
    allow_shared(function, shape.shared_bytes);
    void* args[] = {const_cast<Kernel*>(&kernel)};
    check(cudaLaunchCooperativeKernel(function, dim3(shape.blocks), dim3(shape.threads), args, shape.shared_bytes,
                                      stream_),
          "cudaLaunchCooperativeKernel");
  }

  template <typename Kernel>
  Index cooperative_blocks(unsigned threads, std::size_t shared_bytes) {
    if (shared_bytes > max_shared_) return 0;
    const void* function = reinterpret_cast<const void*>(&run_phases_grid<Kernel>);
    allow_shared(function, shared_bytes);
    int per_multiprocessor = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, function, static_cast<int>(threads),
                                                        shared_bytes),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return static_cast<Index>(per_multiprocessor) * multiprocessors_;
  }

  std::size_t max_shared_bytes() const { return max_shared_; }
  Index multiprocessors() const { return multiprocessors_; }

  template <typename F>
  void sequence(const std::vector<std::int64_t>& key, F&& enqueue) {
    if (!graphs_enabled().load()) {
      enqueue();
      return;
    }
    GraphCache& cache = resources_.graphs;
    cudaGraphExec_t exec = cache.find(key);
    if (!exec) {
      exec = record(cache.recording_stream(), std::forward<F>(enqueue));
      cache.add(key, exec);
      graph_counts().recorded.fetch_add(1);
    } else {
      graph_counts().replayed.fetch_add(1);
    }
    check(cudaGraphLaunch(exec, stream_), "cudaGraphLaunch");
  }

 private:
  static ThreadResources& resources_of_this_thread() {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    return ThreadResourceLeases::of_this_thread(device, [] {
      ThreadResources made;
      check(cublasCreate(&made.blas), "cublasCreate");
      return made;
    });
  }

  // Captures what enqueue() enqueues (on `recording`, cuBLAS included) into an instantiated graph.
  template <typename F>
  cudaGraphExec_t record(cudaStream_t recording, F&& enqueue) {
    const cudaStream_t caller = stream_;
    stream_ = recording;
    check(cublasSetStream(blas_, recording), "cublasSetStream");
    check(cudaStreamBeginCapture(recording, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    cudaGraph_t graph = nullptr;
    try {
      enqueue();
    } catch (...) {
      cudaStreamEndCapture(recording, &graph);
      if (graph) cudaGraphDestroy(graph);
      stream_ = caller;
      cublasSetStream(blas_, caller);
      throw;
    }
    const cudaError_t ended = cudaStreamEndCapture(recording, &graph);
    stream_ = caller;
    check(cublasSetStream(blas_, caller), "cublasSetStream");
    check(ended, "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check(made, "cudaGraphInstantiate");
    return exec;
  }

  // Dynamic shared memory past 48 KB must be allowed per kernel first. The allowance is one value per
  // kernel and device for every host thread, so it is always the device's whole opt-in maximum: a
  // thread allowing only its own size could shrink it under another's launch of the same kernel.
  void allow_shared(const void* function, std::size_t bytes) const {
    constexpr std::size_t kDefaultLimit = 48 * 1024;
    if (bytes > kDefaultLimit)
      check(cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_shared_)),
            "cudaFuncSetAttribute");
  }

  cudaStream_t stream_;
  ThreadResources& resources_;
  cublasHandle_t blas_;
  int multiprocessors_ = 0;
  std::size_t max_shared_ = 0;
};

}  // namespace fusedrnn::gpu::cuda
