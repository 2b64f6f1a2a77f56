// XLA FFI handlers for fusedrnn.jax on the CPU: one recurrent layer (every direction) forward and
// backward, called from inside XLA programs. The buffers are decoded and checked as on every platform
// (jax_ffi_layer.h, which also describes them); here they run on the CPU backend. No numerics here.
//
// The XLA FFI headers are header-only (the API table arrives with each call), so nothing here links
// against jaxlib and `import fusedrnn` never needs it. The handlers live in _core, beside the NumPy
// bindings, so that both run on the one thread team of the process. _core also holds the device
// handlers (jax_ffi_device.h) over the emulated device, as CPU targets for the tests, and, for the
// CUDA platform, handlers that only say why the CUDA module's cannot be used (registered then).
//
// Under jax.vmap the handlers run the layer once per mapped element, except inference with shared
// weights, which folds the mapped elements into the batch (forward_folded). Training cannot fold: each
// mapped element needs its own weight gradients.
//
// Run-time checks that shapes cannot express (lengths in [1, T], NaN or infinity in the inputs) return an
// INVALID_ARGUMENT error naming the argument, which JAX raises as an exception from the call. The
// finiteness checks are asked for per call: the sequence (x forward, dy backward) where it is the
// caller's (the first layer's x, the last layer's dy), the states (h0, c0, dh_n, dc_n) in every layer.
#include "jax_ffi.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string_view>
#include <vector>

#include "fusedrnn/cells.h"
#include "fusedrnn/cpu/backend.h"
#include "fusedrnn/cpu/passes.h"
#include "fusedrnn/cuda/emulated.h"
#include "fusedrnn/layer.h"
#include "jax_ffi_device.h"
#include "jax_ffi_layer.h"

namespace py = pybind11;
namespace cpu = fusedrnn::cpu;
using fusedrnn::CellKind;
using fusedrnn::Index;
using namespace fusedrnn::jax_ffi;

namespace {

template <typename T>
ffi::Error check_finite(const T* data, Index count, const char* name) {
  if (data != nullptr && !cpu::parallel_all_finite(data, count)) return non_finite_error(name);
  return ffi::Error::Success();
}

// The lengths of mapped element n as int64, checked; empty when absent.
ffi::Error read_lengths(const Lengths& lengths, Index n, Index steps, std::vector<Index>& out) {
  out.clear();
  return lengths.empty() ? ffi::Error::Success() : lengths.widen(lengths.at(n), steps, out);
}

// Scratch that starts on a 64-byte boundary (the backend's ranks write neighbouring ranges of units).
template <typename T>
struct AlignedScratch {
  std::unique_ptr<unsigned char[]> storage;
  T* data = nullptr;
  explicit AlignedScratch(Index count) {
    if (count == 0) return;
    storage.reset(new unsigned char[static_cast<std::size_t>(count) * sizeof(T) + 64]);
    const auto raw = reinterpret_cast<std::uintptr_t>(storage.get());
    data = reinterpret_cast<T*>(storage.get() + (64 - raw % 64) % 64);
  }
};

// One layer's directions on the CPU backend, through the call that may run both at once, as the NumPy
// modules do (the same split, so the same bits).
template <typename T>
void run_directions(const std::vector<fusedrnn::LayerForwardParams<T>>& d) {
  if (d.size() == 2)
    cpu::layer_forward_directions<T>(d[0], d[1]);
  else
    cpu::layer_forward<T>(d[0]);
}

template <typename T>
void run_directions(const std::vector<fusedrnn::LayerBackwardParams<T>>& d) {
  if (d.size() == 2)
    cpu::layer_backward_directions<T>(d[0], d[1]);
  else
    cpu::layer_backward<T>(d[0]);
}

// Inference under vmap with weights shared by every mapped element: the N mapped elements' rows are
// one layer call of N*B rows (their inputs gathered into one (T, N*B, I) array, the outputs scattered
// back), since a step's recurrent GEMM over N*B rows costs far less than N calls of B rows.
template <typename T>
ffi::Error forward_folded(const ForwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index D = c.D;
  const Batched<const T>&x = c.x, &h0 = c.h0, &c0 = c.c0;
  const Batched<T>&y = c.y, &h_n = c.h_n, &c_n = c.c_n;
  const Index steps = c.steps, rows = c.rows, input = c.input, hidden = c.hidden, state = c.state;
  const Index N = c.batch.count, all = N * rows, DR = D * state;
  const bool has_c = !c_n.empty();
  AlignedScratch<T> xs(steps * all * input), ys(steps * all * DR), h0s(h0.empty() ? 0 : D * all * state),
      c0s(c0.empty() ? 0 : D * all * hidden), hns(D * all * state), cns(has_c ? D * all * hidden : 0);
  std::vector<Index> lengths, all_lengths;
  // Moves mapped element n's (outer, B, width) block to or from rows n*B.. of an (outer, N*B, width) one.
  auto gather = [&](const T* from, T* to, Index outer, Index width, Index n) {
    for (Index o = 0; o < outer; ++o)
      std::copy(from + o * rows * width, from + (o + 1) * rows * width, to + (o * all + n * rows) * width);
  };
  auto scatter = [&](const T* from, T* to, Index outer, Index width, Index n) {
    for (Index o = 0; o < outer; ++o)
      std::copy(from + (o * all + n * rows) * width, from + (o * all + n * rows + rows) * width, to + o * rows * width);
  };
  for (Index n = 0; n < N; ++n) {
    if (ffi::Error e = read_lengths(c.lengths, n, steps, lengths); e.failure()) return e;
    if (!lengths.empty()) {
      all_lengths.resize(static_cast<std::size_t>(all), steps);
      std::copy(lengths.begin(), lengths.end(), all_lengths.begin() + n * rows);
    }
    if (ffi::Error e = first_failure({check_finite(check_sequence ? x.at(n) : nullptr, x.elements(), "x"),
                                      check_finite(check_states ? h0.at(n) : nullptr, h0.elements(), "h0"),
                                      check_finite(check_states ? c0.at(n) : nullptr, c0.elements(), "c0")});
        e.failure())
      return e;
    gather(x.at(n), xs.data, steps, input, n);
    if (!h0.empty()) gather(h0.at(n), h0s.data, D, state, n);
    if (!c0.empty()) gather(c0.at(n), c0s.data, D, hidden, n);
  }
  const Index proj = c.weights.proj;
  fusedrnn::LayerShape shape{steps, all, input, hidden, {}, false, proj};
  const fusedrnn::TapeLayout layout = fusedrnn::tape_layout(c.cell, shape, false);
  // An inference tape for each direction: they may run at once.
  AlignedScratch<T> hs(D * layout.hs.values()), cs(D * layout.cs.values()), rs(D * layout.rs.values());
  std::vector<fusedrnn::LayerForwardParams<T>> params(static_cast<std::size_t>(D));
  for (Index d = 0; d < D; ++d) {
    const Index h_at = d * all * state, c_at = d * all * hidden;
    fusedrnn::LayerForwardParams<T>& p = params[static_cast<std::size_t>(d)];
    p.cell = c.cell;
    p.shape = {steps, all, input, hidden, {all_lengths.empty() ? nullptr : all_lengths.data(), 1}, d == 1, proj};
    p.weights = c.weights.at(d, 0, input);
    p.x = {xs.data, {all * input, input, 1}};
    if (!h0.empty()) p.h0 = {h0s.data + h_at, {state, 1}};
    if (!c0.empty()) p.c0 = {c0s.data + c_at, {hidden, 1}};
    p.y = {ys.data + d * state, {all * DR, DR, 1}};
    p.h_n = {hns.data + h_at, {state, 1}};
    if (has_c) p.c_n = {cns.data + c_at, {hidden, 1}};
    p.tape = fusedrnn::direction_tape<T>(layout, d, false, hs.data, cs.data, nullptr, rs.data);
    p.cell_clip = c.cell_clip;
  }
  run_directions(params);
  for (Index n = 0; n < N; ++n) {
    scatter(ys.data, y.at(n), steps, DR, n);
    scatter(hns.data, h_n.at(n), D, state, n);
    if (has_c) scatter(cns.data, c_n.at(n), D, hidden, n);
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error cpu_forward(ForwardCall<T>& c, bool check_sequence, bool check_states) {
  if (!c.training && c.batch.count > 1 && c.shared_weights()) return forward_folded<T>(c, check_sequence, check_states);
  // Inference keeps its tape (two state slots, the cell output) in scratch of the call, one for each
  // direction, as they may run at once; training writes the tape results.
  const Index D = c.D;
  AlignedScratch<T> scratch_hs(c.training ? 0 : D * c.layout.hs.values());
  AlignedScratch<T> scratch_cs(c.training ? 0 : D * c.layout.cs.values());
  AlignedScratch<T> scratch_rs(c.training ? 0 : D * c.layout.rs.values());
  auto scratch = [&](Index d) {
    return fusedrnn::direction_tape<T>(c.layout, d, false, scratch_hs.data, scratch_cs.data, nullptr, scratch_rs.data);
  };
  std::vector<Index> lengths;
  std::vector<fusedrnn::LayerForwardParams<T>> params(static_cast<std::size_t>(D));
  for (Index n = 0; n < c.batch.count; ++n) {
    if (ffi::Error e = read_lengths(c.lengths, n, c.steps, lengths); e.failure()) return e;
    if (ffi::Error e = first_failure({check_finite(check_sequence ? c.x.at(n) : nullptr, c.x.elements(), "x"),
                                      check_finite(check_states ? c.h0.at(n) : nullptr, c.h0.elements(), "h0"),
                                      check_finite(check_states ? c.c0.at(n) : nullptr, c.c0.elements(), "c0")});
        e.failure())
      return e;
    for (Index d = 0; d < D; ++d)
      params[static_cast<std::size_t>(d)] =
          c.params(n, d, lengths.empty() ? nullptr : lengths.data(), c.training ? c.tape_at(n, d) : scratch(d));
    run_directions(params);
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error cpu_backward(const BackwardCall<T>& c, bool check_sequence, bool check_states) {
  std::vector<Index> lengths;
  for (Index n = 0; n < c.batch.count; ++n) {
    if (ffi::Error e = read_lengths(c.lengths, n, c.steps, lengths); e.failure()) return e;
    if (ffi::Error e = first_failure({check_finite(check_sequence ? c.dy.at(n) : nullptr, c.dy.elements(), "dy"),
                                      check_finite(check_states ? c.dh_n.at(n) : nullptr, c.dh_n.elements(), "dh_n"),
                                      check_finite(check_states ? c.dc_n.at(n) : nullptr, c.dc_n.elements(), "dc_n")});
        e.failure())
      return e;
    std::vector<fusedrnn::LayerBackwardParams<T>> params;
    for (Index d = 0; d < c.D; ++d) params.push_back(c.params(n, d, lengths.empty() ? nullptr : lengths.data()));
    run_directions(params);
  }
  return ffi::Error::Success();
}

ffi::Error layer_forward(std::string_view cell_name, std::int64_t directions, bool training, bool check_sequence,
                         bool check_states, double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                         ffi::AnyBuffer lengths, ffi::RemainingArgs weights, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> h_n, ffi::Result<ffi::AnyBuffer> c_n,
                         ffi::Result<ffi::AnyBuffer> hs, ffi::Result<ffi::AnyBuffer> cs,
                         ffi::Result<ffi::AnyBuffer> saved, ffi::Result<ffi::AnyBuffer> rs) {
  CellKind cell;
  if (ffi::Error e = parse_attributes(cell_name, directions, cell_clip, cell); e.failure()) return e;
  return by_dtype("forward", x.element_type(), [&](auto zero) -> ffi::Error {
    using T = decltype(zero);
    ForwardCall<T> call(cell, directions, training, cell_clip, x, h0, c0, lengths, *y, *h_n, *c_n, *hs, *cs, *saved,
                        *rs);
    if (ffi::Error e = call.check(weights); e.failure()) return e;
    return cpu_forward<T>(call, check_sequence, check_states);
  });
}

ffi::Error layer_backward(std::string_view cell_name, std::int64_t directions, bool check_sequence, bool check_states,
                          double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer lengths, ffi::AnyBuffer hs,
                          ffi::AnyBuffer cs, ffi::AnyBuffer saved, ffi::AnyBuffer rs, ffi::AnyBuffer dy,
                          ffi::AnyBuffer dh_n, ffi::AnyBuffer dc_n, ffi::RemainingArgs weights,
                          ffi::Result<ffi::AnyBuffer> dx,
                          ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::AnyBuffer> dc0,
                          ffi::RemainingRets weight_grads) {
  CellKind cell;
  if (ffi::Error e = parse_attributes(cell_name, directions, cell_clip, cell); e.failure()) return e;
  return by_dtype("backward", x.element_type(), [&](auto zero) -> ffi::Error {
    using T = decltype(zero);
    BackwardCall<T> call(cell, directions, cell_clip, x, lengths, hs, cs, saved, rs, dy, dh_n, dc_n, *dx, *dh0,
                         *dc0);
    if (ffi::Error e = call.check(weights, weight_grads); e.failure()) return e;
    return cpu_backward<T>(call, check_sequence, check_states);
  });
}

// The device handlers' body over the emulated device: host memory throughout, the workspace a host
// array, so the tests run the device path (workspace sizing, staging, the orchestration) through XLA.
class EmulatedDevice {
 public:
  void* workspace(std::size_t bytes) {
    storage_.resize((bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
    return storage_.data();
  }
  void to_host(void* to, const void* from, std::size_t bytes) { std::memcpy(to, from, bytes); }
  void to_device(void* to, const void* from, std::size_t bytes) { std::memcpy(to, from, bytes); }
  template <typename T>
  void flag_non_finite(const T* data, Index count, int* flag) {
    fusedrnn::gpu::emulated::flag_non_finite(data, count, flag);
  }
  template <typename T>
  std::size_t forward_workspace_bytes(const fusedrnn::LayerForwardParams<T>& p) {
    return fusedrnn::gpu::emulated::forward_workspace_bytes(p);
  }
  template <typename T>
  std::size_t backward_workspace_bytes(const fusedrnn::LayerBackwardParams<T>& p) {
    return fusedrnn::gpu::emulated::backward_workspace_bytes(p);
  }
  template <typename T>
  void forward(const fusedrnn::LayerForwardParams<T>& p, void* workspace) {
    fusedrnn::gpu::emulated::layer_forward(p, workspace, fusedrnn::gpu::RecurrencePath::kAuto);
  }
  template <typename T>
  void backward(const fusedrnn::LayerBackwardParams<T>& p, void* workspace) {
    fusedrnn::gpu::emulated::layer_backward(p, workspace, fusedrnn::gpu::RecurrencePath::kAuto);
  }

 private:
  std::vector<std::max_align_t> storage_;
};

ffi::Error emulated_forward(std::string_view cell_name, std::int64_t directions, bool training, bool check_sequence,
                            bool check_states, double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer h0,
                            ffi::AnyBuffer c0, ffi::AnyBuffer lengths, ffi::RemainingArgs weights,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> h_n,
                            ffi::Result<ffi::AnyBuffer> c_n, ffi::Result<ffi::AnyBuffer> hs,
                            ffi::Result<ffi::AnyBuffer> cs, ffi::Result<ffi::AnyBuffer> saved,
                            ffi::Result<ffi::AnyBuffer> rs) {
  EmulatedDevice dev;
  return device_layer_forward(dev, cell_name, directions, training, check_sequence, check_states, cell_clip, x, h0,
                              c0, lengths, weights, *y, *h_n, *c_n, *hs, *cs, *saved, *rs);
}

ffi::Error emulated_backward(std::string_view cell_name, std::int64_t directions, bool check_sequence,
                             bool check_states, double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer lengths,
                             ffi::AnyBuffer hs, ffi::AnyBuffer cs, ffi::AnyBuffer saved, ffi::AnyBuffer rs,
                             ffi::AnyBuffer dy, ffi::AnyBuffer dh_n, ffi::AnyBuffer dc_n, ffi::RemainingArgs weights,
                             ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dh0,
                             ffi::Result<ffi::AnyBuffer> dc0, ffi::RemainingRets weight_grads) {
  EmulatedDevice dev;
  return device_layer_backward(dev, cell_name, directions, check_sequence, check_states, cell_clip, x, lengths, hs,
                               cs, saved, rs, dy, dh_n, dc_n, weights, *dx, *dh0, *dc0, weight_grads);
}

// Why the CUDA handlers are not there, set by fusedrnn.jax when it registers unavailable() for CUDA.
std::string& cuda_unavailable_reason() {
  static std::string reason = "fusedrnn.jax: no CUDA handlers";
  return reason;
}

// Takes a call of either target, bound as the real handlers are (a jaxlib may refuse a call whose
// attributes a handler does not bind), and fails it.
constexpr auto unavailable = [](auto&&...) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, cuda_unavailable_reason());
};

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerForward, layer_forward, forward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerBackward, layer_backward, backward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerForwardEmulated, emulated_forward, forward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerBackwardEmulated, emulated_backward, backward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerForwardUnavailable, unavailable, forward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerBackwardUnavailable, unavailable, backward_binding());

namespace fusedrnn::bindings {

void def_jax_ffi(py::module_& m) {
  py::dict targets;
  targets["fusedrnn_layer_forward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerForward));
  targets["fusedrnn_layer_backward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerBackward));
  m.attr("jax_ffi_targets") = targets;
  py::dict emulated;
  emulated["fusedrnn_layer_forward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerForwardEmulated));
  emulated["fusedrnn_layer_backward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerBackwardEmulated));
  m.attr("jax_ffi_emulated_device_targets") = emulated;
  // For the CUDA platform when the CUDA module's handlers cannot be used: calls fail with the reason.
  py::dict unavailable;
  unavailable["fusedrnn_layer_forward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerForwardUnavailable));
  unavailable["fusedrnn_layer_backward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerBackwardUnavailable));
  m.attr("jax_ffi_unavailable_targets") = unavailable;
  m.def("set_jax_ffi_unavailable_reason", [](const std::string& reason) { cuda_unavailable_reason() = reason; },
        py::arg("reason"), "The error message of the jax_ffi_unavailable_targets handlers.");
  // The FFI API and jaxlib the handlers were compiled against: a running jaxlib older than this one
  // refuses them at call time, so fusedrnn.jax checks before registering.
  m.attr("jax_ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("jax_ffi_built_with_jaxlib") = FUSEDRNN_JAXLIB_VERSION;
}

}  // namespace fusedrnn::bindings
