// The CUDA module's runtime seam (fusedrnn/cuda/cuda_layer.h) over host memory, for the module
// fusedrnn._cuda_emulated: the same bindings (cuda_module.cpp) as fusedrnn._cuda, with the layer calls
// on the device code's host emulation (emulated.h). So everything above the CUDA runtime itself (the
// bindings' checks of __cuda_array_interface__, devices, shapes and outputs; the Python layer that
// allocates and hands over the arrays) runs where there is no GPU. "Device memory" is host memory that
// the caller has declared as on a device (declare_device_memory); anything else is host memory to the
// bindings, as an unregistered pointer is to cudaPointerGetAttributes. Streams are ignored: every call
// runs to completion before it returns.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "fusedrnn/cuda/cuda_layer.h"
#include "fusedrnn/cuda/emulated.h"

namespace py = pybind11;

namespace fusedrnn::gpu::cuda {

namespace {

constexpr int kDevices = 2;

struct MemoryRange {
  std::uintptr_t end;
  int device;
};

// Declared device memory by first address; guarded, as the bindings run without the GIL.
std::mutex memory_mutex;
std::map<std::uintptr_t, MemoryRange> memory;
thread_local int current = 0;

// What stands in for a GPU thread's cuBLAS handle and graphs: each layer call leases a set as the CUDA
// runtime does, so the lending and the return at a thread's end run where there is no GPU.
struct StandInResources {};

void lease_this_threads_resources() {
  ThreadLeases<StandInResources>::of_this_thread(current, [] { return StandInResources{}; });
}

}  // namespace

template <typename T>
std::size_t forward_workspace_bytes(const LayerForwardParams<T>& params) {
  return emulated::forward_workspace_bytes(params);
}

template <typename T>
std::size_t backward_workspace_bytes(const LayerBackwardParams<T>& params) {
  return emulated::backward_workspace_bytes(params);
}

template <typename T>
void layer_forward(const LayerForwardParams<T>& params, void* workspace, void*, RecurrencePath path) {
  lease_this_threads_resources();
  emulated::layer_forward(params, workspace, path);
}

template <typename T>
void layer_backward(const LayerBackwardParams<T>& params, void* workspace, void*, RecurrencePath path) {
  lease_this_threads_resources();
  emulated::layer_backward(params, workspace, path);
}

template <typename T>
void flag_non_finite(const T* data, Index count, int* flag, void*) {
  lease_this_threads_resources();
  emulated::flag_non_finite(data, count, flag);
}

#define FUSEDRNN_INSTANTIATE(T)                                                                             \
  template std::size_t forward_workspace_bytes<T>(const LayerForwardParams<T>&);                            \
  template std::size_t backward_workspace_bytes<T>(const LayerBackwardParams<T>&);                          \
  template void layer_forward<T>(const LayerForwardParams<T>&, void*, void*, RecurrencePath);               \
  template void layer_backward<T>(const LayerBackwardParams<T>&, void*, void*, RecurrencePath);             \
  template void flag_non_finite<T>(const T*, Index, int*, void*);
FUSEDRNN_INSTANTIATE(float)
FUSEDRNN_INSTANTIATE(double)
#undef FUSEDRNN_INSTANTIATE

int device_count() { return kDevices; }
int current_device() { return current; }

void set_current_device(int device) {
  if (device < 0 || device >= kDevices) throw std::runtime_error("set_current_device: no device " + std::to_string(device));
  current = device;
}

int device_of(const void* pointer) {
  const auto address = reinterpret_cast<std::uintptr_t>(pointer);
  std::lock_guard<std::mutex> lock(memory_mutex);
  auto after = memory.upper_bound(address);
  if (after == memory.begin()) return -1;
  const auto& [start, range] = *std::prev(after);
  return address >= start && address < range.end ? range.device : -1;
}

std::string device_name(int device) { return "emulated device " + std::to_string(device); }

// Workspace filled with NaN bytes, so a value read before the call writes it shows in the results.
void* allocate(std::size_t bytes, void*) {
  if (bytes == 0) return nullptr;
  void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0xff, bytes);
  return p;
}

void release(void* pointer, void*) { std::free(pointer); }
void copy_to_device(void* to, const void* from, std::size_t bytes, void*) { std::memcpy(to, from, bytes); }
void copy_to_host(void* to, const void* from, std::size_t bytes, void*) { std::memcpy(to, from, bytes); }

void copy_rows(void* to, std::size_t to_pitch, const void* from, std::size_t from_pitch, std::size_t row_bytes,
               std::size_t rows, void*) {
  for (std::size_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<char*>(to) + r * to_pitch, static_cast<const char*>(from) + r * from_pitch, row_bytes);
}

int runtime_version() { return 0; }
void set_graphs(bool) {}
bool graphs() { return false; }
std::int64_t graphs_recorded() { return 0; }
std::int64_t graphs_replayed() { return 0; }
LeaseCounts thread_resource_counts() { return ThreadLeases<StandInResources>::counts(); }

}  // namespace fusedrnn::gpu::cuda

namespace fusedrnn::bindings {

void def_emulated_runtime(py::module_& m) {
  namespace cuda = fusedrnn::gpu::cuda;
  m.def(
      "declare_device_memory",
      [](std::uintptr_t address, std::size_t bytes, int device) {
        if (device < 0 || device >= cuda::kDevices)
          throw py::value_error("device: expected 0 to " + std::to_string(cuda::kDevices - 1));
        std::lock_guard<std::mutex> lock(cuda::memory_mutex);
        cuda::memory[address] = {address + bytes, device};
      },
      py::arg("address"), py::arg("bytes"), py::arg("device"),
      "Declares host memory [address, address + bytes) as memory of emulated CUDA device `device` (until "
      "forget_device_memory(address)).");
  m.def(
      "forget_device_memory",
      [](std::uintptr_t address) {
        std::lock_guard<std::mutex> lock(cuda::memory_mutex);
        cuda::memory.erase(address);
      },
      py::arg("address"));
}

}  // namespace fusedrnn::bindings
