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
// Under jax.vmap the handlers run the layer once per mapped element, or, with weights shared by every
// element, fold the elements into the batch of one call (Fold).
//
// Run-time checks that shapes cannot express (lengths in [1, T], NaN or infinity in the inputs) return an
// INVALID_ARGUMENT error naming the argument, which JAX raises as an exception from the call. The
// finiteness checks are asked for per call: the sequence (x forward, dy backward) where it is the
// caller's (the first layer's x, the last layer's dy), the states (h0, c0, dh_n, dc_n) in every layer.
#include "jax_ffi.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "fusedrnn/allocation.h"
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

// A handler call's scratch arrays (KeptBuffer: 64-byte aligned), taken in order through one CallScratch.
// Sets of arrays are kept between calls in one pool for the process, so what stays allocated follows how
// many calls XLA ran at once, not how many of its threads ever ran one.
class CallScratch {
 public:
  CallScratch() : set_(take_set()) {}
  ~CallScratch() {
    std::lock_guard<std::mutex> hold(pool_mutex());
    idle_sets().push_back(std::move(set_));
  }
  CallScratch(const CallScratch&) = delete;
  CallScratch& operator=(const CallScratch&) = delete;

  // Frees the kept arrays of the sets no call holds and returns their bytes.
  static std::size_t release() {
    std::lock_guard<std::mutex> hold(pool_mutex());
    std::size_t bytes = 0;
    for (Set& set : idle_sets())
      for (fusedrnn::KeptBuffer& b : set) bytes += b.release();
    idle_sets().clear();
    return bytes;
  }

  // `count` values, uninitialised; null when count is 0.
  template <typename T>
  T* take(Index count) {
    if (count == 0) return nullptr;
    if (next_ == set_.size()) set_.emplace_back();
    return set_[next_++].reserve_values<T>(static_cast<std::uint64_t>(count), "a handler call's scratch");
  }

 private:
  using Set = std::vector<fusedrnn::KeptBuffer>;
  // The set most recently given back (its arrays the likeliest to fit), or a new one.
  static Set take_set() {
    std::lock_guard<std::mutex> hold(pool_mutex());
    std::vector<Set>& idle = idle_sets();
    if (idle.empty()) return {};
    Set set = std::move(idle.back());
    idle.pop_back();
    return set;
  }
  // Never destroyed: a call may still run while the process exits.
  static std::mutex& pool_mutex() {
    static std::mutex* mutex = new std::mutex;
    return *mutex;
  }
  static std::vector<Set>& idle_sets() {
    static std::vector<Set>* sets = new std::vector<Set>;
    return *sets;
  }
  Set set_;
  std::size_t next_ = 0;
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

// Training folds on the CPU only where each element has at most kMaxFoldedTrainingRows rows: beyond
// that the tape's gathers and scatters and each element's own weight-gradient GEMMs cost more than the
// folded recurrence saves, since an element's own rows already keep a step's GEMM busy (bench/NOTES.md,
// "Per-sample gradients through fusedrnn.jax").
constexpr Index kMaxFoldedTrainingRows = 2;

// Fold's copies in host memory.
struct HostCopy {
  template <typename T>
  void operator()(T* to, Index to_pitch, const T* from, Index from_pitch, Index values, Index count) const {
    for (Index r = 0; r < count; ++r) std::copy_n(from + r * from_pitch, values, to + r * to_pitch);
  }
};

// Every element's lengths side by side, checked; empty when the call has none.
ffi::Error fold_lengths(const Lengths& lengths, Index elements, Index steps, std::vector<Index>& all_lengths) {
  all_lengths.clear();
  if (lengths.empty()) return ffi::Error::Success();
  std::vector<Index> one;
  for (Index n = 0; n < elements; ++n) {
    if (ffi::Error e = read_lengths(lengths, n, steps, one); e.failure()) return e;
    all_lengths.insert(all_lengths.end(), one.begin(), one.end());
  }
  return ffi::Error::Success();
}

// The tape of a folded call (N*B rows) in `scratch`: every direction's arrays back to back, as the
// directions may run at once.
template <typename T>
struct FoldedTape {
  bool training;
  fusedrnn::TapeLayout layout;  // of one direction
  std::array<T*, 4> arrays;     // hs, cs, saved, rs; null where the layout has none

  template <typename Call>
  FoldedTape(const Call& c, Index all, bool training_, CallScratch& scratch)
      : training(training_),
        layout(layout_for_rows(c, all, training_)),
        arrays{scratch.take<T>(c.D * layout.hs.values()), scratch.take<T>(c.D * layout.cs.values()),
               scratch.take<T>(c.D * layout.saved.values()), scratch.take<T>(c.D * layout.rs.values())} {}

  fusedrnn::LayerTape<T> direction(Index d) const {
    return fusedrnn::direction_tape<T>(layout, d, training, arrays[0], arrays[1], arrays[2], arrays[3]);
  }
};

// NaN or infinity in a mapped element's inputs where asked for: the sequence (x forward, dy backward)
// and the states (h0, c0 forward; dh_n, dc_n backward).
template <typename T>
ffi::Error check_inputs(const ForwardCall<T>& c, const ForwardArrays<T>& one, bool check_sequence, bool check_states) {
  return first_failure({check_finite(check_sequence ? one.x : nullptr, c.x.elements(), "x"),
                        check_finite(check_states ? one.h0 : nullptr, c.h0.elements(), "h0"),
                        check_finite(check_states ? one.c0 : nullptr, c.c0.elements(), "c0")});
}

template <typename T>
ffi::Error check_inputs(const BackwardCall<T>& c, const BackwardArrays<T>& one, bool check_sequence, bool check_states) {
  return first_failure({check_finite(check_sequence ? one.dy : nullptr, c.dy.elements(), "dy"),
                        check_finite(check_states ? one.dh_n : nullptr, c.dh_n.elements(), "dh_n"),
                        check_finite(check_states ? one.dc_n : nullptr, c.dc_n.elements(), "dc_n")});
}

// Gathers every mapped element's inputs and the lengths into the folded call's arrays, checking each
// element's inputs first; gather(one, n) moves element n's.
template <typename Call, typename Gather>
ffi::Error fold_inputs(const Call& c, bool check_sequence, bool check_states,
                       std::vector<Index>& all_lengths, const Gather& gather) {
  if (ffi::Error e = fold_lengths(c.lengths, c.batch.count, c.steps, all_lengths); e.failure()) return e;
  for (Index n = 0; n < c.batch.count; ++n) {
    const auto one = c.arrays(n);
    if (ffi::Error e = check_inputs(c, one, check_sequence, check_states); e.failure()) return e;
    gather(one, n);
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error forward_folded(const ForwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count, D = c.D, steps = c.steps, DR = D * c.state;
  const Fold fold(N, c.rows);
  const Index all = fold.all();
  CallScratch scratch;
  T* const xs = scratch.take<T>(steps * all * c.input);
  T* const h0s = scratch.take<T>(c.h0.empty() ? 0 : D * all * c.state);
  T* const c0s = scratch.take<T>(c.c0.empty() ? 0 : D * all * c.hidden);
  const ForwardArrays<T> folded{xs, h0s, c0s, scratch.take<T>(steps * all * DR), scratch.take<T>(D * all * c.state),
                                scratch.take<T>(c.c_n.empty() ? 0 : D * all * c.hidden), all};
  const FoldedTape<T> tape(c, all, c.training, scratch);
  std::vector<Index> all_lengths;
  if (ffi::Error e = fold_inputs(c, check_sequence, check_states, all_lengths,
                                 [&](const ForwardArrays<T>& one, Index n) {
                                   fold.gather(one.x, xs, steps, c.input, n, HostCopy{});
                                   fold.gather(one.h0, h0s, D, c.state, n, HostCopy{});
                                   fold.gather(one.c0, c0s, D, c.hidden, n, HostCopy{});
                                 });
      e.failure())
    return e;
  std::vector<fusedrnn::LayerForwardParams<T>> params;
  for (Index d = 0; d < D; ++d)
    params.push_back(c.params(folded, 0, d, all_lengths.empty() ? nullptr : all_lengths.data(), tape.direction(d)));
  run_directions(params);
  for (Index n = 0; n < N; ++n) {
    const ForwardArrays<T> one = c.arrays(n);
    fold.scatter<T>(folded.y, one.y, steps, DR, n, HostCopy{});
    fold.scatter<T>(folded.h_n, one.h_n, D, c.state, n, HostCopy{});
    fold.scatter<T>(folded.c_n, one.c_n, D, c.hidden, n, HostCopy{});
    if (c.training)
      fold.scatter_tape<T>(c.layout, D, tape.arrays, {c.tape.hs.at(n), c.tape.cs.at(n), c.tape.saved.at(n), c.tape.rs.at(n)},
                           n, HostCopy{});
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error cpu_forward(ForwardCall<T>& c, bool check_sequence, bool check_states) {
  if (Fold::applies(c, kMaxFoldedTrainingRows)) return forward_folded<T>(c, check_sequence, check_states);
  // Inference keeps its tape (two state slots, the cell output) in scratch of the call, one for each
  // direction, as they may run at once; training writes the tape results.
  const Index D = c.D;
  CallScratch call_scratch;
  T* const scratch_hs = call_scratch.take<T>(c.training ? 0 : D * c.layout.hs.values());
  T* const scratch_cs = call_scratch.take<T>(c.training ? 0 : D * c.layout.cs.values());
  T* const scratch_rs = call_scratch.take<T>(c.training ? 0 : D * c.layout.rs.values());
  auto scratch = [&](Index d) {
    return fusedrnn::direction_tape<T>(c.layout, d, false, scratch_hs, scratch_cs, nullptr, scratch_rs);
  };
  std::vector<Index> lengths;
  std::vector<fusedrnn::LayerForwardParams<T>> params(static_cast<std::size_t>(D));
  for (Index n = 0; n < c.batch.count; ++n) {
    if (ffi::Error e = read_lengths(c.lengths, n, c.steps, lengths); e.failure()) return e;
    if (ffi::Error e = check_inputs(c, c.arrays(n), check_sequence, check_states); e.failure()) return e;
    for (Index d = 0; d < D; ++d)
      params[static_cast<std::size_t>(d)] =
          c.params(n, d, lengths.empty() ? nullptr : lengths.data(), c.training ? c.tape_at(n, d) : scratch(d));
    run_directions(params);
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error backward_folded(const BackwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count, D = c.D, steps = c.steps, DR = D * c.state;
  const Fold fold(N, c.rows);
  const Index all = fold.all();
  CallScratch scratch;
  T* const xs = scratch.take<T>(steps * all * c.input);
  T* const dys = scratch.take<T>(steps * all * DR);
  T* const dhns = scratch.take<T>(D * all * c.state);
  T* const dcns = scratch.take<T>(c.dc_n.empty() ? 0 : D * all * c.hidden);
  const FoldedTape<T> tape(c, all, true, scratch);
  const std::array<const T*, 4> tape_in{tape.arrays[0], tape.arrays[1], tape.arrays[2], tape.arrays[3]};
  const BackwardArrays<T> folded{xs, dys, dhns, dcns, scratch.take<T>(steps * all * c.input),
                                 scratch.take<T>(D * all * c.state),
                                 scratch.take<T>(c.dc0.empty() ? 0 : D * all * c.hidden), tape_in,
                                 c.arrays(0).grads, all, N};
  std::vector<Index> all_lengths;
  if (ffi::Error e = fold_inputs(c, check_sequence, check_states, all_lengths,
                                 [&](const BackwardArrays<T>& one, Index n) {
                                   fold.gather(one.x, xs, steps, c.input, n, HostCopy{});
                                   fold.gather(one.dy, dys, steps, DR, n, HostCopy{});
                                   fold.gather(one.dh_n, dhns, D, c.state, n, HostCopy{});
                                   fold.gather(one.dc_n, dcns, D, c.hidden, n, HostCopy{});
                                   fold.gather_tape<T>(c.layout, D, one.tape, tape.arrays, n, HostCopy{});
                                 });
      e.failure())
    return e;
  std::vector<fusedrnn::LayerBackwardParams<T>> params;
  for (Index d = 0; d < D; ++d)
    params.push_back(c.params(folded, 0, d, all_lengths.empty() ? nullptr : all_lengths.data()));
  run_directions(params);
  for (Index n = 0; n < N; ++n) {
    const BackwardArrays<T> one = c.arrays(n);
    fold.scatter<T>(folded.dx, one.dx, steps, c.input, n, HostCopy{});
    fold.scatter<T>(folded.dh0, one.dh0, D, c.state, n, HostCopy{});
    fold.scatter<T>(folded.dc0, one.dc0, D, c.hidden, n, HostCopy{});
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error cpu_backward(const BackwardCall<T>& c, bool check_sequence, bool check_states) {
  if (Fold::applies(c, kMaxFoldedTrainingRows)) return backward_folded<T>(c, check_sequence, check_states);
  std::vector<Index> lengths;
  for (Index n = 0; n < c.batch.count; ++n) {
    if (ffi::Error e = read_lengths(c.lengths, n, c.steps, lengths); e.failure()) return e;
    if (ffi::Error e = check_inputs(c, c.arrays(n), check_sequence, check_states); e.failure()) return e;
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
  const cpu::KeepOffOpenMPRuntime off_openmp_runtime;  // XLA's thread, or the caller's inline
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
  const cpu::KeepOffOpenMPRuntime off_openmp_runtime;  // XLA's thread, or the caller's inline
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
    storage_.emplace_back((bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
    return storage_.back().data();
  }
  void to_host(void* to, const void* from, std::size_t bytes) { std::memcpy(to, from, bytes); }
  void to_device(void* to, const void* from, std::size_t bytes) { std::memcpy(to, from, bytes); }
  void copy_rows(void* to, std::size_t to_pitch, const void* from, std::size_t from_pitch, std::size_t row_bytes,
                 std::size_t rows) {
    for (std::size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<unsigned char*>(to) + r * to_pitch, static_cast<const unsigned char*>(from) + r * from_pitch,
                  row_bytes);
  }
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
  std::vector<std::vector<std::max_align_t>> storage_;  // one per workspace asked for
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

std::size_t release_jax_call_scratch() { return CallScratch::release(); }

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
