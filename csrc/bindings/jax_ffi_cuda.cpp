// XLA FFI handlers of fusedrnn.jax for the CUDA platform, in the CUDA module (fusedrnn._cuda): the
// device handlers' body (jax_ffi_device.h) on XLA's CUDA stream, with their workspace from XLA's
// allocator. Compiled by the host compiler (cuda_layer.h needs no CUDA headers); fusedrnn.jax registers
// them for platform "CUDA" when this module loads.
#include "jax_ffi_cuda.h"

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "fusedrnn/cuda/cuda_layer.h"
#include "fusedrnn/layer.h"
#include "jax_ffi_device.h"
#include "jax_ffi_layer.h"

namespace py = pybind11;
namespace cuda = fusedrnn::gpu::cuda;
using fusedrnn::Index;
using namespace fusedrnn::jax_ffi;

namespace {

// The device of jax_ffi_device.h on a GPU: XLA's stream and scratch allocator. The copies to the host
// wait for the stream (cuda::copy_to_host), so they see what XLA enqueued before the call.
class CudaDevice {
 public:
  CudaDevice(void* stream, ffi::ScratchAllocator& scratch) : stream_(stream), scratch_(scratch) {}

  // XLA's scratch allocator takes alignments up to 16 bytes only, so the 256 the kernels and cuBLAS
  // want comes from asking for that much more and rounding up.
  void* workspace(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    constexpr std::size_t kAlignment = 256;
    const std::optional<void*> p = scratch_.Allocate(bytes + kAlignment - 1, 16);
    if (!p) return nullptr;
    const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(*p);
    return reinterpret_cast<void*>((address + kAlignment - 1) / kAlignment * kAlignment);
  }
  void to_host(void* to, const void* from, std::size_t bytes) { cuda::copy_to_host(to, from, bytes, stream_); }
  void to_device(void* to, const void* from, std::size_t bytes) { cuda::copy_to_device(to, from, bytes, stream_); }
  void copy_rows(void* to, std::size_t to_pitch, const void* from, std::size_t from_pitch, std::size_t row_bytes,
                 std::size_t rows) {
    cuda::copy_rows(to, to_pitch, from, from_pitch, row_bytes, rows, stream_);
  }
  template <typename T>
  void flag_non_finite(const T* data, Index count, int* flag) {
    cuda::flag_non_finite(data, count, flag, stream_);
  }
  template <typename T>
  std::size_t forward_workspace_bytes(const fusedrnn::LayerForwardParams<T>& p) {
    return cuda::forward_workspace_bytes(p);
  }
  template <typename T>
  std::size_t backward_workspace_bytes(const fusedrnn::LayerBackwardParams<T>& p) {
    return cuda::backward_workspace_bytes(p);
  }
  template <typename T>
  void forward(const fusedrnn::LayerForwardParams<T>& p, void* workspace) {
    cuda::layer_forward(p, workspace, stream_, fusedrnn::gpu::RecurrencePath::kAuto);
  }
  template <typename T>
  void backward(const fusedrnn::LayerBackwardParams<T>& p, void* workspace) {
    cuda::layer_backward(p, workspace, stream_, fusedrnn::gpu::RecurrencePath::kAuto);
  }

 private:
  void* stream_;
  ffi::ScratchAllocator& scratch_;
};

ffi::Error cuda_forward(std::string_view cell_name, std::int64_t directions, bool training, bool check_sequence,
                        bool check_states, double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                        ffi::AnyBuffer lengths, ffi::RemainingArgs weights, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Result<ffi::AnyBuffer> h_n, ffi::Result<ffi::AnyBuffer> c_n,
                        ffi::Result<ffi::AnyBuffer> hs, ffi::Result<ffi::AnyBuffer> cs,
                        ffi::Result<ffi::AnyBuffer> saved, ffi::Result<ffi::AnyBuffer> rs, void* stream,
                        ffi::ScratchAllocator scratch) {
  CudaDevice dev(stream, scratch);
  return device_layer_forward(dev, cell_name, directions, training, check_sequence, check_states, cell_clip, x, h0,
                              c0, lengths, weights, *y, *h_n, *c_n, *hs, *cs, *saved, *rs);
}

ffi::Error cuda_backward(std::string_view cell_name, std::int64_t directions, bool check_sequence, bool check_states,
                         double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer lengths, ffi::AnyBuffer hs,
                         ffi::AnyBuffer cs, ffi::AnyBuffer saved, ffi::AnyBuffer rs, ffi::AnyBuffer dy,
                         ffi::AnyBuffer dh_n, ffi::AnyBuffer dc_n, ffi::RemainingArgs weights,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dh0,
                         ffi::Result<ffi::AnyBuffer> dc0, ffi::RemainingRets weight_grads, void* stream,
                         ffi::ScratchAllocator scratch) {
  CudaDevice dev(stream, scratch);
  return device_layer_backward(dev, cell_name, directions, check_sequence, check_states, cell_clip, x, lengths, hs,
                               cs, saved, rs, dy, dh_n, dc_n, weights, *dx, *dh0, *dc0, weight_grads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerForwardCuda, cuda_forward,
                              forward_binding().Ctx<ffi::PlatformStream<void*>>().Ctx<ffi::ScratchAllocator>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerBackwardCuda, cuda_backward,
                              backward_binding().Ctx<ffi::PlatformStream<void*>>().Ctx<ffi::ScratchAllocator>());

namespace fusedrnn::bindings {

void def_jax_ffi_cuda(py::module_& m) {
  py::dict targets;
  targets["fusedrnn_layer_forward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerForwardCuda));
  targets["fusedrnn_layer_backward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerBackwardCuda));
  m.attr("jax_ffi_targets") = targets;
  m.attr("jax_ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("jax_ffi_built_with_jaxlib") = FUSEDRNN_JAXLIB_VERSION;
}

}  // namespace fusedrnn::bindings
