// The body of fusedrnn.jax's handlers on a device (the CUDA backend's layer calls), written once over
// a Device that supplies memory and the calls, so it runs on a GPU (jax_ffi_cuda.cpp, in fusedrnn._cuda)
// and on the emulated device (jax_ffi.cpp, in _core: the tests run it through XLA on the CPU). The
// buffers are decoded and checked as on the CPU (jax_ffi_layer.h).
//
// A Device provides, all in order on the call's one stream:
//   void* workspace(std::size_t bytes)            device memory for the call (null: none to be had)
//   void to_host(void* to, const void* from, std::size_t bytes)    returns once the bytes are there
//   void to_device(void* to, const void* from, std::size_t bytes)  `from` may be reused on return
//   flag_non_finite(data, count, flag)            *flag (device memory) = 1 if data has NaN or infinity
//   forward_workspace_bytes / backward_workspace_bytes (params), forward / backward (params, workspace)
//
// Run-time checks come before any layer work is enqueued, so a bad argument fails the call with nothing
// run: the lengths are copied to the host and checked there, and each array whose finiteness the call
// asks to check is scanned on the device into a flag, the flags read back together (each read waits
// for the stream). The lengths then go to the workspace as int64, which the backend reads. One
// workspace serves every mapped element and direction in turn (they run in stream order):
// [lengths: N*B int64][flags][inference tape: hs, cs, rs][the layer call's own].
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "fusedrnn/cuda/device.h"
#include "fusedrnn/layer.h"
#include "jax_ffi_layer.h"

namespace fusedrnn::jax_ffi {

// The arrays a call asks to check for NaN and infinity: (data, elements, name) each, data on the device.
template <typename T>
struct Checked {
  const T* data;
  Index count;
  const char* name;
};

// Adds each mapped element's array to `out` when `wanted` (absent arrays are skipped).
template <typename T>
void add_checked(std::vector<Checked<T>>& out, bool wanted, const Batched<const T>& array, Index count,
                 const char* name) {
  if (!wanted || array.empty()) return;
  for (Index n = 0; n < count; ++n) out.push_back({array.at(n), array.elements(), name});
}

// An error naming the first array with a NaN or infinity: one flag per array, set on the device (in
// `flags`, device memory) and read back together.
template <typename T, typename Device>
ffi::Error check_finite_on_device(Device& dev, const std::vector<Checked<T>>& arrays, int* flags) {
  if (arrays.empty()) return ffi::Error::Success();
  for (std::size_t i = 0; i < arrays.size(); ++i) dev.flag_non_finite(arrays[i].data, arrays[i].count, flags + i);
  std::vector<int> found(arrays.size());
  dev.to_host(found.data(), flags, found.size() * sizeof(int));
  for (std::size_t i = 0; i < arrays.size(); ++i)
    if (found[i]) return non_finite_error(arrays[i].name);
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

// The call's workspace, carved as the header says: sized by a first pass over the same carving.
struct Workspace {
  Index* lengths = nullptr;  // N*B
  int* flags = nullptr;      // one per checked array
  void* hs = nullptr;        // inference state slots
  void* cs = nullptr;
  void* rs = nullptr;        // inference cell output before the projection
  unsigned char* layer = nullptr;  // the layer call's own

  template <typename T, typename Device>
  static ffi::Error allocate(Device& dev, const char* what, Index lengths, Index flags, Index states,
                             Index cell_states, Index outputs, std::size_t layer_bytes, Workspace& out) {
    auto carve = [&](gpu::Carver& carver) {
      out.lengths = carver.template take<Index>(lengths);
      out.flags = carver.template take<int>(flags);
      out.hs = carver.template take<T>(states);
      out.cs = carver.template take<T>(cell_states);
      out.rs = carver.template take<T>(outputs);
      out.layer = carver.template take<unsigned char>(static_cast<Index>(layer_bytes));
    };
    gpu::Carver count(nullptr);
    carve(count);
    void* base = dev.workspace(count.bytes());
    if (base == nullptr && count.bytes() > 0)
      return ffi::Error::Internal(std::string("fusedrnn layer ") + what + ": could not allocate " +
                                  std::to_string(count.bytes()) + " bytes of workspace");
    gpu::Carver carver(base);
    carve(carver);
    return ffi::Error::Success();
  }
};

template <typename T, typename Device>
ffi::Error device_forward(Device& dev, const ForwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count;
  std::vector<Checked<T>> checked;
  add_checked(checked, check_sequence, c.x, N, "x");
  add_checked(checked, check_states, c.h0, N, "h0");
  add_checked(checked, check_states, c.c0, N, "c0");
  // Inference keeps its tape (two state slots, the cell output) in the workspace; training writes the
  // tape results.
  const Index states = c.training ? 0 : c.layout.hs.values();
  const Index cell_states = c.training ? 0 : c.layout.cs.values();
  const Index outputs = c.training ? 0 : c.layout.rs.values();
  std::size_t layer_bytes = 0;
  for (Index d = 0; d < c.D; ++d)
    layer_bytes = std::max(layer_bytes, dev.forward_workspace_bytes(c.params(0, d, nullptr, LayerTape<T>{})));
  Workspace ws;
  if (ffi::Error e = Workspace::allocate<T>(dev, "forward", c.lengths.empty() ? 0 : N * c.rows,
                                            static_cast<Index>(checked.size()), states, cell_states, outputs,
                                            layer_bytes, ws);
      e.failure())
    return e;
  std::vector<std::vector<Index>> lengths;
  if (ffi::Error e = read_lengths_on_host(dev, c.lengths, N, c.steps, lengths); e.failure()) return e;
  if (ffi::Error e = check_finite_on_device(dev, checked, ws.flags); e.failure()) return e;

  const LayerTape<T> scratch = direction_tape<T>(c.layout, 0, false, static_cast<T*>(ws.hs), static_cast<T*>(ws.cs),
                                                 nullptr, static_cast<T*>(ws.rs));
  for (Index n = 0; n < N; ++n) {
    const Index* length_values = stage_lengths(dev, lengths[n], ws.lengths + n * c.rows);
    for (Index d = 0; d < c.D; ++d)
      dev.forward(c.params(n, d, length_values, c.training ? c.tape_at(n, d) : scratch), ws.layer);
  }
  return ffi::Error::Success();
}

template <typename T, typename Device>
ffi::Error device_backward(Device& dev, const BackwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count;
  std::vector<Checked<T>> checked;
  add_checked(checked, check_sequence, c.dy, N, "dy");
  add_checked(checked, check_states, c.dh_n, N, "dh_n");
  add_checked(checked, check_states, c.dc_n, N, "dc_n");
  std::size_t layer_bytes = 0;
  for (Index d = 0; d < c.D; ++d)
    layer_bytes = std::max(layer_bytes, dev.backward_workspace_bytes(c.params(0, d, nullptr)));
  Workspace ws;
  if (ffi::Error e = Workspace::allocate<T>(dev, "backward", c.lengths.empty() ? 0 : N * c.rows,
                                            static_cast<Index>(checked.size()), 0, 0, 0, layer_bytes, ws);
      e.failure())
    return e;
  std::vector<std::vector<Index>> lengths;
  if (ffi::Error e = read_lengths_on_host(dev, c.lengths, N, c.steps, lengths); e.failure()) return e;
  if (ffi::Error e = check_finite_on_device(dev, checked, ws.flags); e.failure()) return e;

  for (Index n = 0; n < N; ++n) {
    const Index* length_values = stage_lengths(dev, lengths[n], ws.lengths + n * c.rows);
    for (Index d = 0; d < c.D; ++d) dev.backward(c.params(n, d, length_values), ws.layer);
  }
  return ffi::Error::Success();
}

// The handlers' bodies over one Device, from the decoded attributes.
template <typename Device>
ffi::Error device_layer_forward(Device& dev, std::string_view cell_name, std::int64_t directions, bool training,
                                bool check_sequence, bool check_states, double cell_clip, ffi::AnyBuffer x,
                                ffi::AnyBuffer h0, ffi::AnyBuffer c0, ffi::AnyBuffer lengths,
                                const ffi::RemainingArgs& weights, ffi::AnyBuffer y, ffi::AnyBuffer h_n,
                                ffi::AnyBuffer c_n, ffi::AnyBuffer hs, ffi::AnyBuffer cs, ffi::AnyBuffer saved,
                                ffi::AnyBuffer rs) {
  CellKind cell;
  if (ffi::Error e = parse_attributes(cell_name, directions, cell_clip, cell); e.failure()) return e;
  return by_dtype("forward", x.element_type(), [&](auto zero) -> ffi::Error {
    using T = decltype(zero);
    ForwardCall<T> call(cell, directions, training, cell_clip, x, h0, c0, lengths, y, h_n, c_n, hs, cs, saved, rs);
    if (ffi::Error e = call.check(weights); e.failure()) return e;
    return device_forward<T>(dev, call, check_sequence, check_states);
  });
}

template <typename Device>
ffi::Error device_layer_backward(Device& dev, std::string_view cell_name, std::int64_t directions,
                                 bool check_sequence, bool check_states, double cell_clip, ffi::AnyBuffer x,
                                 ffi::AnyBuffer lengths, ffi::AnyBuffer hs, ffi::AnyBuffer cs, ffi::AnyBuffer saved,
                                 ffi::AnyBuffer rs, ffi::AnyBuffer dy, ffi::AnyBuffer dh_n, ffi::AnyBuffer dc_n,
                                 const ffi::RemainingArgs& weights, ffi::AnyBuffer dx, ffi::AnyBuffer dh0,
                                 ffi::AnyBuffer dc0, const ffi::RemainingRets& weight_grads) {
  CellKind cell;
  if (ffi::Error e = parse_attributes(cell_name, directions, cell_clip, cell); e.failure()) return e;
  return by_dtype("backward", x.element_type(), [&](auto zero) -> ffi::Error {
    using T = decltype(zero);
    BackwardCall<T> call(cell, directions, cell_clip, x, lengths, hs, cs, saved, rs, dy, dh_n, dc_n, dx, dh0, dc0);
    if (ffi::Error e = call.check(weights, weight_grads); e.failure()) return e;
    return device_backward<T>(dev, call, check_sequence, check_states);
  });
}

}  // namespace fusedrnn::jax_ffi
