// The body of fusedrnn.jax's handlers on a device (the CUDA backend's layer calls), written once over
// a Device that supplies memory and the calls, so it runs on a GPU (jax_ffi_cuda.cpp, in fusedrnn._cuda)
// and on the emulated device (jax_ffi.cpp, in _core: the tests run it through XLA on the CPU). The
// buffers are decoded and checked as on the CPU (jax_ffi_layer.h).
//
// A Device provides, all in order on the call's one stream:
//   void* workspace(std::size_t bytes)            device memory for the call (null: none to be had)
//   void to_host(void* to, const void* from, std::size_t bytes)    returns once the bytes are there
//   void to_device(void* to, const void* from, std::size_t bytes)  `from` may be reused on return
//   void copy_rows(to, to_pitch, from, from_pitch, row_bytes, rows)   device to device, rows `pitch` bytes apart
//   flag_non_finite(data, count, flag)            *flag (device memory) = 1 if data has NaN or infinity
//   forward_workspace_bytes / backward_workspace_bytes (params), forward / backward (params, workspace)
//
// Run-time checks come before any layer work is enqueued, so a bad argument fails the call with nothing
// run: the lengths are copied to the host and checked there, and each array whose finiteness the call
// asks to check is scanned on the device into a flag, the flags read back together (each read waits
// for the stream). The lengths then go to the workspace as int64, which the backend reads. One
// workspace serves every mapped element and direction in turn (they run in stream order): [lengths:
// N*B int64][flags][the call's arrays: the tape a layer call keeps for itself (inference, or a folded
// training call), a folded call's inputs and outputs], and a second one the layer calls' own. With
// the weights shared, the mapped elements fold into one layer call (Fold, jax_ffi_layer.h), however
// many rows each has: a device runs every element's rows at once.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <limits>
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
  std::vector<void*> arrays;  // as many values of the call's dtype as asked each; null where none

  template <typename T, typename Device>
  static ffi::Error allocate(Device& dev, const char* what, Index lengths, Index flags,
                             const std::vector<Index>& arrays, Workspace& out) {
    auto carve = [&](gpu::Carver& carver) {
      out.lengths = carver.template take<Index>(lengths);
      out.flags = carver.template take<int>(flags);
      out.arrays.clear();
      for (Index count : arrays) {
        T* p = carver.template take<T>(count);
        out.arrays.push_back(count > 0 ? p : nullptr);
      }
    };
    gpu::Carver count(nullptr);
    carve(count);
    void* base = allocate_bytes(dev, count.bytes());
    if (base == nullptr && count.bytes() > 0) return out_of_memory(what, count.bytes());
    gpu::Carver carver(base);
    carve(carver);
    return ffi::Error::Success();
  }

  template <typename Device>
  static void* allocate_bytes(Device& dev, std::size_t bytes) {
    return bytes > 0 ? dev.workspace(bytes) : nullptr;
  }

  static ffi::Error out_of_memory(const char* what, std::size_t bytes) {
    return ffi::Error::Internal(std::string("fusedrnn layer ") + what + ": could not allocate " +
                                std::to_string(bytes) + " bytes of workspace");
  }
};

// Fold's copies on the device.
template <typename Device>
struct DeviceCopy {
  Device& dev;
  template <typename T>
  void operator()(T* to, Index to_pitch, const T* from, Index from_pitch, Index values, Index count) const {
    dev.copy_rows(to, static_cast<std::size_t>(to_pitch) * sizeof(T), from,
                  static_cast<std::size_t>(from_pitch) * sizeof(T), static_cast<std::size_t>(values) * sizeof(T),
                  static_cast<std::size_t>(count));
  }
};

template <typename Device, typename T>
std::size_t layer_bytes(Device& dev, const LayerForwardParams<T>& p) {
  return dev.forward_workspace_bytes(p);
}
template <typename Device, typename T>
std::size_t layer_bytes(Device& dev, const LayerBackwardParams<T>& p) {
  return dev.backward_workspace_bytes(p);
}

// The layer calls' own workspace, the largest any of `params` needs.
template <typename Device, typename Params>
ffi::Error layer_workspace(Device& dev, const char* what, const std::vector<Params>& params, void*& out) {
  std::size_t bytes = 0;
  for (const Params& p : params) bytes = std::max(bytes, layer_bytes(dev, p));
  out = Workspace::allocate_bytes(dev, bytes);
  return out == nullptr && bytes > 0 ? Workspace::out_of_memory(what, bytes) : ffi::Error::Success();
}

// Every mapped element's lengths staged into `staged` side by side (n's at n*B), null when absent.
template <typename Device>
const Index* stage_all_lengths(Device& dev, const std::vector<std::vector<Index>>& lengths, Index rows,
                               Index* staged) {
  const Index* first = nullptr;
  for (std::size_t n = 0; n < lengths.size(); ++n) {
    const Index* at = stage_lengths(dev, lengths[n], staged + static_cast<Index>(n) * rows);
    if (n == 0) first = at;
  }
  return first;
}

template <typename T, typename Device>
ffi::Error device_forward(Device& dev, const ForwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count, D = c.D, steps = c.steps;
  const bool folded = Fold::applies(c, std::numeric_limits<Index>::max());
  const Fold fold(N, c.rows);
  const Index rows = folded ? fold.all() : c.rows;  // of each layer call
  std::vector<Checked<T>> checked;
  add_checked(checked, check_sequence, c.x, N, "x");
  add_checked(checked, check_states, c.h0, N, "h0");
  add_checked(checked, check_states, c.c0, N, "c0");
  // The tape a layer call keeps in the workspace: inference's (two state slots, the cell output; the
  // directions in turn), or a folded training call's (every direction's, scattered after).
  const TapeLayout layout = folded ? layout_for_rows(c, rows, c.training) : c.layout;
  const Index tapes = !c.training ? 1 : folded ? D : 0;
  std::vector<Index> counts{tapes * layout.hs.values(), tapes * layout.cs.values(), tapes * layout.saved.values(),
                            tapes * layout.rs.values()};
  if (folded)
    counts.insert(counts.end(), {steps * rows * c.input, c.h0.empty() ? 0 : D * rows * c.state,
                                 c.c0.empty() ? 0 : D * rows * c.hidden, steps * rows * D * c.state,
                                 D * rows * c.state, c.c_n.empty() ? 0 : D * rows * c.hidden});
  Workspace ws;
  if (ffi::Error e = Workspace::allocate<T>(dev, "forward", c.lengths.empty() ? 0 : N * c.rows,
                                            static_cast<Index>(checked.size()), counts, ws);
      e.failure())
    return e;
  std::vector<std::vector<Index>> lengths;
  if (ffi::Error e = read_lengths_on_host(dev, c.lengths, N, steps, lengths); e.failure()) return e;
  if (ffi::Error e = check_finite_on_device(dev, checked, ws.flags); e.failure()) return e;

  const std::array<T*, 4> tape{static_cast<T*>(ws.arrays[0]), static_cast<T*>(ws.arrays[1]),
                               static_cast<T*>(ws.arrays[2]), static_cast<T*>(ws.arrays[3])};
  const auto kept_tape = [&](Index d) {
    return direction_tape<T>(layout, c.training ? d : 0, c.training, tape[0], tape[1], tape[2], tape[3]);
  };
  std::vector<std::vector<LayerForwardParams<T>>> calls;  // each layer call's directions
  const auto array = [&](std::size_t i) { return static_cast<T*>(ws.arrays[i]); };
  // A folded call's inputs and outputs.
  const ForwardArrays<T> all = folded ? ForwardArrays<T>{array(4), array(5), array(6), array(7), array(8), array(9), rows}
                                      : ForwardArrays<T>{};
  if (folded) {
    const Index* length_values = stage_all_lengths(dev, lengths, c.rows, ws.lengths);
    const DeviceCopy<Device> copy{dev};
    for (Index n = 0; n < N; ++n) {
      const ForwardArrays<T> one = c.arrays(n);
      fold.gather(one.x, array(4), steps, c.input, n, copy);
      fold.gather(one.h0, array(5), D, c.state, n, copy);
      fold.gather(one.c0, array(6), D, c.hidden, n, copy);
    }
    calls.emplace_back();
    for (Index d = 0; d < D; ++d) calls.back().push_back(c.params(all, 0, d, length_values, kept_tape(d)));
  } else {
    for (Index n = 0; n < N; ++n) {
      const Index* length_values = stage_lengths(dev, lengths[n], ws.lengths + n * c.rows);
      calls.emplace_back();
      for (Index d = 0; d < D; ++d)
        calls.back().push_back(c.params(n, d, length_values, c.training ? c.tape_at(n, d) : kept_tape(d)));
    }
  }
  if (calls.empty()) return ffi::Error::Success();  // no mapped element
  void* layer = nullptr;
  if (ffi::Error e = layer_workspace(dev, "forward", calls.front(), layer); e.failure()) return e;
  for (const auto& directions : calls)
    for (const LayerForwardParams<T>& p : directions) dev.forward(p, layer);
  if (folded) {
    const DeviceCopy<Device> copy{dev};
    for (Index n = 0; n < N; ++n) {
      const ForwardArrays<T> one = c.arrays(n);
      fold.scatter<T>(all.y, one.y, steps, D * c.state, n, copy);
      fold.scatter<T>(all.h_n, one.h_n, D, c.state, n, copy);
      fold.scatter<T>(all.c_n, one.c_n, D, c.hidden, n, copy);
      if (c.training)
        fold.scatter_tape<T>(c.layout, D, tape, {c.tape.hs.at(n), c.tape.cs.at(n), c.tape.saved.at(n), c.tape.rs.at(n)},
                             n, copy);
    }
  }
  return ffi::Error::Success();
}

template <typename T, typename Device>
ffi::Error device_backward(Device& dev, const BackwardCall<T>& c, bool check_sequence, bool check_states) {
  const Index N = c.batch.count, D = c.D, steps = c.steps;
  const bool folded = Fold::applies(c, std::numeric_limits<Index>::max());
  const Fold fold(N, c.rows);
  const Index rows = folded ? fold.all() : c.rows;
  std::vector<Checked<T>> checked;
  add_checked(checked, check_sequence, c.dy, N, "dy");
  add_checked(checked, check_states, c.dh_n, N, "dh_n");
  add_checked(checked, check_states, c.dc_n, N, "dc_n");
  const TapeLayout layout = layout_for_rows(c, rows, true);
  std::vector<Index> counts;
  if (folded)
    counts = {D * layout.hs.values(), D * layout.cs.values(), D * layout.saved.values(), D * layout.rs.values(),
              steps * rows * c.input, steps * rows * D * c.state, D * rows * c.state,
              c.dc_n.empty() ? 0 : D * rows * c.hidden, steps * rows * c.input, D * rows * c.state,
              c.dc0.empty() ? 0 : D * rows * c.hidden};
  Workspace ws;
  if (ffi::Error e = Workspace::allocate<T>(dev, "backward", c.lengths.empty() ? 0 : N * c.rows,
                                            static_cast<Index>(checked.size()), counts, ws);
      e.failure())
    return e;
  std::vector<std::vector<Index>> lengths;
  if (ffi::Error e = read_lengths_on_host(dev, c.lengths, N, steps, lengths); e.failure()) return e;
  if (ffi::Error e = check_finite_on_device(dev, checked, ws.flags); e.failure()) return e;

  std::vector<std::vector<LayerBackwardParams<T>>> calls;
  if (folded) {
    const auto array = [&](std::size_t i) { return static_cast<T*>(ws.arrays[i]); };
    const std::array<T*, 4> tape{array(0), array(1), array(2), array(3)};
    const BackwardArrays<T> all{array(4), array(5), array(6), array(7), array(8), array(9), array(10),
                                {array(0), array(1), array(2), array(3)}, c.arrays(0).grads, rows, N};
    const Index* length_values = stage_all_lengths(dev, lengths, c.rows, ws.lengths);
    const DeviceCopy<Device> copy{dev};
    for (Index n = 0; n < N; ++n) {
      const BackwardArrays<T> one = c.arrays(n);
      fold.gather(one.x, array(4), steps, c.input, n, copy);
      fold.gather(one.dy, array(5), steps, D * c.state, n, copy);
      fold.gather(one.dh_n, array(6), D, c.state, n, copy);
      fold.gather(one.dc_n, array(7), D, c.hidden, n, copy);
      fold.gather_tape<T>(c.layout, D, one.tape, tape, n, copy);
    }
    calls.emplace_back();
    for (Index d = 0; d < D; ++d) calls.back().push_back(c.params(all, 0, d, length_values));
  } else {
    for (Index n = 0; n < N; ++n) {
      const Index* length_values = stage_lengths(dev, lengths[n], ws.lengths + n * c.rows);
      calls.emplace_back();
      for (Index d = 0; d < D; ++d) calls.back().push_back(c.params(n, d, length_values));
    }
  }
  if (calls.empty()) return ffi::Error::Success();  // no mapped element
  void* layer = nullptr;
  if (ffi::Error e = layer_workspace(dev, "backward", calls.front(), layer); e.failure()) return e;
  for (const auto& directions : calls)
    for (const LayerBackwardParams<T>& p : directions) dev.backward(p, layer);
  if (folded) {
    const DeviceCopy<Device> copy{dev};
    for (Index n = 0; n < N; ++n) {
      const BackwardArrays<T> one = c.arrays(n);
      fold.scatter<T>(static_cast<T*>(ws.arrays[8]), one.dx, steps, c.input, n, copy);
      fold.scatter<T>(static_cast<T*>(ws.arrays[9]), one.dh0, D, c.state, n, copy);
      fold.scatter<T>(static_cast<T*>(ws.arrays[10]), one.dc0, D, c.hidden, n, copy);
    }
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
