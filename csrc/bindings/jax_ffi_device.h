// The body of fusedrnn.jax's handlers on a device (the CUDA backend's layer calls), written once over
// a Device that supplies memory and the calls, so it runs on a GPU (jax_ffi_cuda.cpp, in fusedrnn._cuda)
// and on the emulated device (jax_ffi.cpp, in _core: the tests run it through XLA on the CPU). The
// buffers are decoded and checked as on the CPU (jax_ffi_layer.h).
//
// A Device provides, all in order on the call's one stream:
//   void* workspace(std::size_t bytes)            device memory for the call (null: none to be had)
//   void to_host(void* to, const void* from, std::size_t bytes)    returns once the bytes are there
//   void to_device(void* to, const void* from, std::size_t bytes)  `from` may be reused on return
//   void zero(void* data, std::size_t bytes)
//   forward_workspace_bytes / backward_workspace_bytes (params), forward / backward (params, workspace)
//
// What the host must read (the lengths, and the arrays whose finiteness the call asks to check) is
// copied to the host before any work is enqueued, so a bad argument fails the call with nothing run;
// the copies wait for the stream. The lengths then go to the workspace as int64, which the backend
// reads. One workspace serves every mapped element and direction in turn (they run in stream order):
// [lengths: N*B int64][inference state slots: hs, cs][the layer call's own].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "fusedrnn/cuda/device.h"
#include "fusedrnn/layer.h"
#include "jax_ffi_layer.h"

namespace fusedrnn::jax_ffi {

// An error unless every value of `data` (device memory; null: not asked) is finite.
template <typename T, typename Device>
ffi::Error check_finite_on_host(Device& dev, const T* data, Index count, const char* name) {
  if (data == nullptr || count == 0) return ffi::Error::Success();
  std::vector<T> host(static_cast<std::size_t>(count));
  dev.to_host(host.data(), data, host.size() * sizeof(T));
  if (!std::all_of(host.begin(), host.end(), [](T v) { return std::isfinite(v); })) return non_finite_error(name);
  return ffi::Error::Success();
}

// Every mapped element's lengths read to the host and checked (none: empty vectors).
template <typename Device>
ffi::Error read_lengths_on_host(Device& dev, const Lengths& lengths, Index count, Index steps,
                                std::vector<std::vector<Index>>& out) {
  out.assign(static_cast<std::size_t>(count), {});
  if (lengths.empty()) return ffi::Error::Success();
  std::vector<unsigned char> raw(lengths.bytes());
  for (Index n = 0; n < count; ++n) {
    dev.to_host(raw.data(), lengths.at(n), raw.size());
    if (ffi::Error e = lengths.widen(raw.data(), steps, out[n]); e.failure()) return e;
  }
  return ffi::Error::Success();
}

// The int64 lengths of mapped element n staged into `staged` (n's B values); null when absent.
template <typename Device>
const Index* stage_lengths(Device& dev, const std::vector<Index>& values, Index* staged) {
  if (values.empty()) return nullptr;
  dev.to_device(staged, values.data(), values.size() * sizeof(Index));
  return staged;
}

template <typename T, typename Device>
ffi::Error device_forward(Device& dev, const ForwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count;
  std::vector<std::vector<Index>> lengths;
  if (ffi::Error e = read_lengths_on_host(dev, c.lengths, N, c.steps, lengths); e.failure()) return e;
  for (Index n = 0; n < N; ++n)
    if (ffi::Error e = first_failure({check_finite_on_host(dev, check_sequence ? c.x.at(n) : nullptr,
                                                           c.x.elements(), "x"),
                                      check_finite_on_host(dev, check_states ? c.h0.at(n) : nullptr,
                                                           c.h0.elements(), "h0"),
                                      check_finite_on_host(dev, check_states ? c.c0.at(n) : nullptr,
                                                           c.c0.elements(), "c0")});
        e.failure())
      return e;

  // Inference keeps its two state slots in the workspace; training writes the tape results.
  const bool scratch_tape = !c.training;
  std::size_t layer_bytes = 0;
  for (Index d = 0; d < c.D; ++d)
    layer_bytes = std::max(layer_bytes, dev.forward_workspace_bytes(c.params(0, d, nullptr, LayerTape<T>{})));
  auto carve = [&](gpu::Carver& carver, Index*& staged, LayerTape<T>& tape, unsigned char*& own) {
    staged = carver.template take<Index>(c.lengths.empty() ? 0 : N * c.rows);
    tape.hs = carver.template take<T>(scratch_tape ? c.layout.state_values : 0);
    tape.cs = carver.template take<T>(scratch_tape && c.layout.has_cell_state ? c.layout.state_values : 0);
    own = carver.template take<unsigned char>(static_cast<Index>(layer_bytes));
  };
  Index* staged = nullptr;
  LayerTape<T> scratch;
  unsigned char* own = nullptr;
  gpu::Carver count(nullptr);
  carve(count, staged, scratch, own);
  void* workspace = dev.workspace(count.bytes());
  if (workspace == nullptr && count.bytes() > 0)
    return ffi::Error::Internal("fusedrnn layer forward: could not allocate " + std::to_string(count.bytes()) +
                                " bytes of workspace");
  gpu::Carver carver(workspace);
  carve(carver, staged, scratch, own);
  if (!c.layout.has_cell_state) scratch.cs = nullptr;

  for (Index n = 0; n < N; ++n) {
    const Index* length_values = stage_lengths(dev, lengths[n], staged + n * c.rows);
    for (Index d = 0; d < c.D; ++d)
      dev.forward(c.params(n, d, length_values, c.training ? c.tape_at(n, d) : scratch), own);
  }
  return ffi::Error::Success();
}

template <typename T, typename Device>
ffi::Error device_backward(Device& dev, const BackwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count;
  std::vector<std::vector<Index>> lengths;
  if (ffi::Error e = read_lengths_on_host(dev, c.lengths, N, c.steps, lengths); e.failure()) return e;
  for (Index n = 0; n < N; ++n)
    if (ffi::Error e = first_failure({check_finite_on_host(dev, check_sequence ? c.dy.at(n) : nullptr,
                                                           c.dy.elements(), "dy"),
                                      check_finite_on_host(dev, check_states ? c.dh_n.at(n) : nullptr,
                                                           c.dh_n.elements(), "dh_n"),
                                      check_finite_on_host(dev, check_states ? c.dc_n.at(n) : nullptr,
                                                           c.dc_n.elements(), "dc_n")});
        e.failure())
      return e;

  std::size_t layer_bytes = 0;
  for (Index d = 0; d < c.D; ++d) layer_bytes = std::max(layer_bytes, dev.backward_workspace_bytes(c.params(0, d, nullptr)));
  auto carve = [&](gpu::Carver& carver, Index*& staged, unsigned char*& own) {
    staged = carver.template take<Index>(c.lengths.empty() ? 0 : N * c.rows);
    own = carver.template take<unsigned char>(static_cast<Index>(layer_bytes));
  };
  Index* staged = nullptr;
  unsigned char* own = nullptr;
  gpu::Carver count(nullptr);
  carve(count, staged, own);
  void* workspace = dev.workspace(count.bytes());
  if (workspace == nullptr && count.bytes() > 0)
    return ffi::Error::Internal("fusedrnn layer backward: could not allocate " + std::to_string(count.bytes()) +
                                " bytes of workspace");
  gpu::Carver carver(workspace);
  carve(carver, staged, own);

  for (Index n = 0; n < N; ++n) {
    // The backend accumulates into the weight gradients.
    for (const Batched<T>& g : c.grads) dev.zero(g.at(n), sizeof(T) * static_cast<std::size_t>(g.elements()));
    const Index* length_values = stage_lengths(dev, lengths[n], staged + n * c.rows);
    for (Index d = 0; d < c.D; ++d) dev.backward(c.params(n, d, length_values), own);
  }
  return ffi::Error::Success();
}

// The handlers' bodies over one Device, from the decoded attributes.
template <typename Device>
ffi::Error device_layer_forward(Device& dev, std::string_view cell_name, std::int64_t directions, bool training,
                                bool check_sequence, bool check_states, double cell_clip, ffi::AnyBuffer x,
                                ffi::AnyBuffer h0, ffi::AnyBuffer c0, ffi::AnyBuffer lengths,
                                const ffi::RemainingArgs& weights, ffi::AnyBuffer y, ffi::AnyBuffer h_n,
                                ffi::AnyBuffer c_n, ffi::AnyBuffer hs, ffi::AnyBuffer cs, ffi::AnyBuffer saved) {
  CellKind cell;
  if (ffi::Error e = parse_attributes(cell_name, directions, cell_clip, cell); e.failure()) return e;
  return by_dtype("forward", x.element_type(), [&](auto zero) -> ffi::Error {
    using T = decltype(zero);
    ForwardCall<T> call(cell, directions, training, cell_clip, x, h0, c0, lengths, y, h_n, c_n, hs, cs, saved);
    if (ffi::Error e = call.check(weights); e.failure()) return e;
    return device_forward<T>(dev, call, check_sequence, check_states);
  });
}

template <typename Device>
ffi::Error device_layer_backward(Device& dev, std::string_view cell_name, std::int64_t directions,
                                 bool check_sequence, bool check_states, double cell_clip, ffi::AnyBuffer x,
                                 ffi::AnyBuffer lengths, ffi::AnyBuffer hs, ffi::AnyBuffer cs, ffi::AnyBuffer saved,
                                 ffi::AnyBuffer dy, ffi::AnyBuffer dh_n, ffi::AnyBuffer dc_n,
                                 const ffi::RemainingArgs& weights, ffi::AnyBuffer dx, ffi::AnyBuffer dh0,
                                 ffi::AnyBuffer dc0, const ffi::RemainingRets& weight_grads) {
  CellKind cell;
  if (ffi::Error e = parse_attributes(cell_name, directions, cell_clip, cell); e.failure()) return e;
  return by_dtype("backward", x.element_type(), [&](auto zero) -> ffi::Error {
    using T = decltype(zero);
    BackwardCall<T> call(cell, directions, cell_clip, x, lengths, hs, cs, saved, dy, dh_n, dc_n, dx, dh0, dc0);
    if (ffi::Error e = call.check(weights, weight_grads); e.failure()) return e;
    return device_backward<T>(dev, call, check_sequence, check_states);
  });
}

}  // namespace fusedrnn::jax_ffi
