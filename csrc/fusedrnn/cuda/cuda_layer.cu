// The CUDA backend's entry points: the orchestration (layer_impl.h) on the CUDA device (cuda_device.cuh).
#include "fusedrnn/cuda/cuda_layer.h"

#include "fusedrnn/cuda/cuda_device.cuh"
#include "fusedrnn/cuda/layer_impl.h"

namespace fusedrnn::gpu::cuda {

template <typename T>
std::size_t forward_workspace_bytes(const LayerForwardParams<T>& params) {
  return gpu::forward_workspace_bytes(params);
}

template <typename T>
std::size_t backward_workspace_bytes(const LayerBackwardParams<T>& params) {
  return gpu::backward_workspace_bytes(params);
}

template <typename T>
void layer_forward(const LayerForwardParams<T>& params, void* workspace, void* stream, RecurrencePath path) {
  CudaDevice dev(static_cast<cudaStream_t>(stream));
  gpu::layer_forward(dev, params, workspace, path);
}

template <typename T>
void layer_backward(const LayerBackwardParams<T>& params, void* workspace, void* stream, RecurrencePath path) {
  CudaDevice dev(static_cast<cudaStream_t>(stream));
  gpu::layer_backward(dev, params, workspace, path);
}

template <typename T>
void flag_non_finite(const T* data, Index count, int* flag, void* stream) {
  CudaDevice dev(static_cast<cudaStream_t>(stream));
  gpu::flag_non_finite(dev, data, count, flag);
}

int device_count() {
  int count = 0;
  // No driver or no GPU: report none rather than fail, so callers can skip cleanly.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

void set_current_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

int device_of(const void* pointer) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, pointer) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged ? attributes.device : -1;
}

std::string device_name(int device) {
  cudaDeviceProp properties{};
  check(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties");
  return properties.name;
}

void* allocate(std::size_t bytes, void* stream) {
  void* p = nullptr;
  if (bytes == 0) return nullptr;
  check(cudaMallocAsync(&p, bytes, static_cast<cudaStream_t>(stream)), "cudaMallocAsync");
  return p;
}

void release(void* pointer, void* stream) {
  if (pointer) check(cudaFreeAsync(pointer, static_cast<cudaStream_t>(stream)), "cudaFreeAsync");
}

void copy_to_device(void* to, const void* from, std::size_t bytes, void* stream) {
  check(cudaMemcpyAsync(to, from, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)),
        "cudaMemcpyAsync");
}

void copy_to_host(void* to, const void* from, std::size_t bytes, void* stream) {
  check(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream)),
        "cudaMemcpyAsync");
  check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

void copy_rows(void* to, std::size_t to_pitch, const void* from, std::size_t from_pitch, std::size_t row_bytes,
               std::size_t rows, void* stream) {
  if (rows == 0 || row_bytes == 0) return;
  const auto on = static_cast<cudaStream_t>(stream);
  int device = 0, max_pitch = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&max_pitch, cudaDevAttrMaxPitch, device), "cudaDeviceGetAttribute");
  const auto limit = static_cast<std::size_t>(max_pitch);
  if (to_pitch <= limit && from_pitch <= limit) {
    check(cudaMemcpy2DAsync(to, to_pitch, from, from_pitch, row_bytes, rows, cudaMemcpyDeviceToDevice, on),
          "cudaMemcpy2DAsync");
    return;
  }
  // cudaMemcpy2D refuses pitches past the device's limit (about 2 GB): such rows are copied one by one.
  for (std::size_t r = 0; r < rows; ++r)
    check(cudaMemcpyAsync(static_cast<char*>(to) + r * to_pitch, static_cast<const char*>(from) + r * from_pitch,
                          row_bytes, cudaMemcpyDeviceToDevice, on),
          "cudaMemcpyAsync");
}

int runtime_version() {
  int version = 0;
  check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

void set_graphs(bool enabled) { graphs_enabled().store(enabled); }
bool graphs() { return graphs_enabled().load(); }
std::int64_t graphs_recorded() { return graph_counts().recorded.load(); }
std::int64_t graphs_replayed() { return graph_counts().replayed.load(); }
LeaseCounts thread_resource_counts() { return ThreadResourceLeases::counts(); }

template std::size_t forward_workspace_bytes<float>(const LayerForwardParams<float>&);
template std::size_t forward_workspace_bytes<double>(const LayerForwardParams<double>&);
template std::size_t backward_workspace_bytes<float>(const LayerBackwardParams<float>&);
template std::size_t backward_workspace_bytes<double>(const LayerBackwardParams<double>&);
template void layer_forward<float>(const LayerForwardParams<float>&, void*, void*, RecurrencePath);
template void layer_forward<double>(const LayerForwardParams<double>&, void*, void*, RecurrencePath);
template void layer_backward<float>(const LayerBackwardParams<float>&, void*, void*, RecurrencePath);
template void layer_backward<double>(const LayerBackwardParams<double>&, void*, void*, RecurrencePath);
template void flag_non_finite<float>(const float*, Index, int*, void*);
template void flag_non_finite<double>(const double*, Index, int*, void*);

}  // namespace fusedrnn::gpu::cuda
