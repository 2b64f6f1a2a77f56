// pybind11 bindings of the CUDA backend (fusedrnn._cuda): device arrays from any library that exposes
// __cuda_array_interface__ (CuPy, torch CUDA tensors, Numba), checked once (dtype, shape, device,
// writability) and described as layer.h's views; the call is enqueued on the caller's stream. The
// caller allocates every output and tape array with its own library (fusedrnn/_cuda_layer.py), so this
// module never owns device arrays beyond a call's workspace. No numerics here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "fusedrnn/cells.h"
#include "fusedrnn/cuda/cuda_layer.h"
#include "fusedrnn/layer.h"
#include "arguments.h"
#include "gil.h"
#ifdef FUSEDRNN_WITH_XLA_FFI
#include "jax_ffi_cuda.h"
#endif

// The module's name: _cuda on the CUDA runtime; _cuda_emulated over cuda_emulated_runtime.cpp.
#ifdef FUSEDRNN_EMULATED_RUNTIME
#define FUSEDRNN_CUDA_MODULE _cuda_emulated
namespace fusedrnn::bindings {
void def_emulated_runtime(pybind11::module_& m);
}
#else
#define FUSEDRNN_CUDA_MODULE _cuda
#endif

namespace py = pybind11;
namespace gpu = fusedrnn::gpu;
using fusedrnn::CellKind;
using fusedrnn::Index;
using fusedrnn::bindings::checked_cell_clip;
using fusedrnn::bindings::kRecurrencePathNames;
using fusedrnn::bindings::parse_cell;
using fusedrnn::bindings::parse_named;
using fusedrnn::bindings::shape_str;

namespace {


// A typestr ("<f4") as NumPy names its dtype ("float32", ">f4" for the other byte order); the typestr
// itself where NumPy has no such dtype.
std::string dtype_name(const std::string& typestr) {
  try {
    return py::str(py::module_::import("numpy").attr("dtype")(typestr));
  } catch (const py::error_already_set&) {
    return typestr;
  }
}

// One argument's __cuda_array_interface__ (version 2 or 3), checked.
struct DeviceArray {
  void* data = nullptr;
  std::vector<Index> shape;
  std::vector<Index> strides;  // in elements
};

// The device every array of a call is on: the first array's, and every other must match.
struct CallDevice {
  int device = -1;
  std::string first;
};

// `dtype_from`: what decides the dtype, for the message when it differs (" (x's)").
DeviceArray device_array(const py::handle& obj, const char* name, const char* typestr, std::size_t item,
                         const std::vector<Index>& shape, bool writable, CallDevice& call,
                         const char* dtype_from = "") {
  if (!py::hasattr(obj, "__cuda_array_interface__"))
    throw py::type_error(std::string(name) + ": expected a CUDA device array (one with __cuda_array_interface__), got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  const py::dict cai = obj.attr("__cuda_array_interface__");
  const std::string got_type = py::str(cai["typestr"]);
  if (got_type != typestr)
    throw py::type_error(std::string(name) + ": expected dtype " + dtype_name(typestr) + dtype_from + ", got " + dtype_name(got_type));
  DeviceArray a;
  for (const py::handle d : py::tuple(cai["shape"])) a.shape.push_back(d.cast<Index>());
  if (a.shape != shape)
    throw py::value_error(std::string(name) + ": expected shape " + shape_str(shape) + ", got " + shape_str(a.shape));
  const py::tuple data = cai["data"];
  a.data = reinterpret_cast<void*>(data[0].cast<std::uintptr_t>());
  if (writable && data[1].cast<bool>()) throw py::value_error(std::string(name) + ": array is read-only");
  const py::object strides = cai.contains("strides") ? py::object(cai["strides"]) : py::object(py::none());
  a.strides.assign(shape.size(), 0);
  Index dense = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    Index bytes = static_cast<Index>(dense * item);
    if (!strides.is_none()) bytes = py::tuple(strides)[d].cast<Index>();
    if (bytes % static_cast<Index>(item) != 0)
      throw py::value_error(std::string(name) + ": strides must be whole elements");
    a.strides[d] = bytes / static_cast<Index>(item);
    dense *= shape[d];
  }
  if (reinterpret_cast<std::uintptr_t>(a.data) % item != 0)
    throw py::value_error(std::string(name) + ": data is not aligned to its element size");
  if (dense > 0) {
    const int device = gpu::cuda::device_of(a.data);
    if (device < 0) throw py::value_error(std::string(name) + ": not CUDA device memory");
    if (call.device < 0) {
      call.device = device;
      call.first = name;
    } else if (device != call.device) {
      throw py::value_error(std::string(name) + ": on CUDA device " + std::to_string(device) + ", but " + call.first +
                            " is on device " + std::to_string(call.device));
    }
  }
  return a;
}

// Whether two indices of `a` address one element: a zero stride on a dimension longer than one (a
// broadcast or expanded view), or strides too short for the dimensions inside them. Dimensions taken by
// stride, each must step past everything the shorter ones reach (sufficient, and what any view cut
// from one dense array meets). An output like that would be written by many threads at once.
bool overlaps_itself(const DeviceArray& a) {
  std::vector<std::pair<Index, Index>> dims;  // (|stride|, extent) of the dimensions longer than one
  for (std::size_t d = 0; d < a.shape.size(); ++d)
    if (a.shape[d] > 1) dims.emplace_back(a.strides[d] < 0 ? -a.strides[d] : a.strides[d], a.shape[d]);
  std::sort(dims.begin(), dims.end());
  Index reach = 0;  // how far the dimensions so far step from the first element
  for (const auto& [stride, extent] : dims) {
    if (stride <= reach) return true;
    reach += stride * (extent - 1);
  }
  return false;
}

// Every array of the tape that its layout has: hs always; cs, saved and rs where the cell and shape have them.
template <typename Tape>
void require_tape(const Tape& tape, const fusedrnn::TapeLayout& layout) {
  if (!tape.hs || (layout.cs.values() > 0 && !tape.cs) || (layout.saved.values() > 0 && !tape.saved) ||
      (layout.rs.values() > 0 && !tape.rs))
    throw py::value_error("hs, cs, saved, rs: the tape's arrays are required");
}

template <typename V>
V view(const DeviceArray& a) {
  V v;
  v.data = static_cast<decltype(v.data)>(a.data);
  if constexpr (std::is_same_v<decltype(v.stride), Index>)
    v.stride = a.strides[0];
  else
    for (std::size_t d = 0; d < a.strides.size(); ++d) v.stride[d] = a.strides[d];
  return v;
}

// The typed arguments of a call: every array is an object with __cuda_array_interface__, or None.
template <typename T>
struct Arrays {
  const char* typestr = sizeof(T) == 4 ? "<f4" : "<f8";
  const char* dtype_from;  // what decides T, for the messages: " (x's)" in forward
  CallDevice device;

  explicit Arrays(const char* dtype_from) : dtype_from(dtype_from) {}

  template <typename V>
  V in(const py::object& obj, const char* name, const std::vector<Index>& shape) {
    if (obj.is_none()) return V{};
    return view<V>(device_array(obj, name, typestr, sizeof(T), shape, false, device, dtype_from));
  }
  template <typename V>
  V out(const py::object& obj, const char* name, const std::vector<Index>& shape) {
    if (obj.is_none()) return V{};
    const DeviceArray a = device_array(obj, name, typestr, sizeof(T), shape, true, device, dtype_from);
    if (overlaps_itself(a))
      throw py::value_error(std::string(name) + ": its elements overlap (a broadcast or expanded view); an output "
                            "needs memory of its own for every element");
    return view<V>(a);
  }
  T* dense_out(const py::object& obj, const char* name, const std::vector<Index>& shape) {
    if (obj.is_none()) return nullptr;
    const DeviceArray a = device_array(obj, name, typestr, sizeof(T), shape, true, device, dtype_from);
    Index expected = 1;
    for (std::size_t d = shape.size(); d-- > 0;) {
      if (shape[d] > 1 && a.strides[d] != expected) throw py::value_error(std::string(name) + ": must be C-contiguous");
      expected *= shape[d];
    }
    return static_cast<T*>(a.data);
  }
  // One of the tape's arrays (layer.h), C-contiguous; null where the call has none.
  T* tape(const py::object& obj, const char* name, const fusedrnn::TapeArray& shape) {
    return shape.values() > 0 ? dense_out(obj, name, {shape.leading, shape.batch, shape.width}) : nullptr;
  }
};

// Runs `enqueue(workspace)` on the arrays' device with `bytes` of stream-ordered workspace.
template <typename F>
void on_device(const CallDevice& device, std::size_t bytes, std::uintptr_t stream_handle, F&& enqueue) {
  void* stream = reinterpret_cast<void*>(stream_handle);
  fusedrnn::bindings::ReleasedGil release;
  const int previous = gpu::cuda::current_device();
  if (device.device >= 0 && device.device != previous) gpu::cuda::set_current_device(device.device);
  void* workspace = nullptr;
  try {
    workspace = gpu::cuda::allocate(bytes, stream);
    enqueue(workspace);
    gpu::cuda::release(workspace, stream);
  } catch (...) {
    if (workspace) gpu::cuda::release(workspace, stream);
    if (device.device >= 0 && device.device != previous) gpu::cuda::set_current_device(previous);
    throw;
  }
  if (device.device >= 0 && device.device != previous) gpu::cuda::set_current_device(previous);
}

template <typename T>
void forward_typed(CellKind cell, const std::vector<Index>& dims, const py::object& x, const py::object& w_ih,
                   const py::object& w_hh, const py::object& b_ih, const py::object& b_hh, const py::object& h0,
                   const py::object& c0, const py::object& lengths, bool reverse, const py::object& y,
                   const py::object& h_n, const py::object& c_n, const py::object& hs, const py::object& cs,
                   const py::object& saved, bool training, const py::object& cell_clip, std::uintptr_t stream,
                   gpu::RecurrencePath path, const py::object& w_hr, const py::object& rs) {
  const Index T_ = dims[0], B = dims[1], I = dims[2], H = dims[3], P = dims[4], R = P > 0 ? P : H;
  const fusedrnn::CellFacts& f = fusedrnn::cell_facts(cell);
  const Index gh = f.gates * H;
  Arrays<T> arr(" (x's)");
  fusedrnn::LayerForwardParams<T> p;
  p.cell = cell;
  p.shape = {T_, B, I, H, {}, reverse, P};
  p.x = arr.template in<fusedrnn::View3<const T>>(x, "x", {T_, B, I});
  // weight_hh first: the caller reads hidden_size from its columns, so a mismatch there is reported against it.
  p.weights.w_hh = arr.template in<fusedrnn::View2<const T>>(w_hh, "weight_hh", {gh, R});
  p.weights.w_ih = arr.template in<fusedrnn::View2<const T>>(w_ih, "weight_ih", {gh, I});
  p.weights.w_hr = arr.template in<fusedrnn::View2<const T>>(w_hr, "weight_hr", {P, H});
  if ((P > 0) != (p.weights.w_hr.data != nullptr))
    throw py::value_error("weight_hr: required exactly when shape has a projection size P > 0");
  p.weights.b_ih = arr.template in<fusedrnn::View1<const T>>(b_ih, "bias_ih", {gh});
  p.weights.b_hh = arr.template in<fusedrnn::View1<const T>>(b_hh, "bias_hh", {gh});
  if (!p.weights.b_ih.data != !p.weights.b_hh.data) throw py::value_error("bias_ih, bias_hh: pass both or neither");
  p.h0 = arr.template in<fusedrnn::View2<const T>>(h0, "h0", {B, R});
  if (!f.has_cell_state && !c0.is_none()) throw py::value_error("c0: only an LSTM has a cell state");
  p.c0 = arr.template in<fusedrnn::View2<const T>>(c0, "c0", {B, H});
  if (!lengths.is_none())
    p.shape.lengths =
        view<fusedrnn::View1<const Index>>(device_array(lengths, "lengths", "<i8", 8, {B}, false, arr.device));
  if (!p.x.data || !p.weights.w_ih.data || !p.weights.w_hh.data)
    throw py::value_error("x, weight_ih, weight_hh: required");
  p.y = arr.template out<fusedrnn::View3<T>>(y, "out", {T_, B, R});
  p.h_n = arr.template out<fusedrnn::View2<T>>(h_n, "h_n", {B, R});
  p.c_n = arr.template out<fusedrnn::View2<T>>(c_n, "c_n", {B, H});
  if (!p.y.data || !p.h_n.data || (f.has_cell_state && !p.c_n.data))
    throw py::value_error("y, h_n, c_n: output arrays are required");
  const fusedrnn::TapeLayout layout = fusedrnn::tape_layout(cell, p.shape, training);
  p.tape.training = training;
  p.tape.hs = arr.tape(hs, "hs", layout.hs);
  p.tape.cs = arr.tape(cs, "cs", layout.cs);
  p.tape.saved = arr.tape(saved, "saved", layout.saved);
  p.tape.rs = arr.tape(rs, "rs", layout.rs);
  require_tape(p.tape, layout);
  p.cell_clip = static_cast<T>(checked_cell_clip(cell_clip, cell));
  on_device(arr.device, gpu::cuda::forward_workspace_bytes(p), stream,
            [&](void* workspace) { gpu::cuda::layer_forward(p, workspace, reinterpret_cast<void*>(stream), path); });
}

template <typename T>
void backward_typed(CellKind cell, const std::vector<Index>& dims, bool reverse, const py::object& x,
                    const py::object& w_ih, const py::object& w_hh, const py::object& b_ih, const py::object& b_hh,
                    const py::object& lengths, const py::object& hs, const py::object& cs, const py::object& saved,
                    const py::object& dy, const py::object& dh_n, const py::object& dc_n, const py::object& dx,
                    bool accumulate_dx, const py::object& dh0, const py::object& dc0, const py::object& dw_ih,
                    const py::object& dw_hh, const py::object& db_ih, const py::object& db_hh,
                    const py::object& dh_norm, const py::object& cell_clip, std::uintptr_t stream,
                    gpu::RecurrencePath path, const py::object& w_hr, const py::object& rs,
                    const py::object& dw_hr, Index grad_groups) {
  const Index T_ = dims[0], B = dims[1], I = dims[2], H = dims[3], P = dims[4], R = P > 0 ? P : H;
  if (grad_groups < 1 || B % grad_groups != 0)
    throw py::value_error("grad_groups: expected a divisor of the batch (" + std::to_string(B) + "), got " +
                          std::to_string(grad_groups));
  const fusedrnn::CellFacts& f = fusedrnn::cell_facts(cell);
  const Index gh = f.gates * H;
  Arrays<T> arr(" (the forward's)");
  fusedrnn::LayerBackwardParams<T> p;
  p.cell = cell;
  p.shape = {T_, B, I, H, {}, reverse, P};
  p.x = arr.template in<fusedrnn::View3<const T>>(x, "x", {T_, B, I});
  p.weights.w_ih = arr.template in<fusedrnn::View2<const T>>(w_ih, "weight_ih", {gh, I});
  p.weights.w_hh = arr.template in<fusedrnn::View2<const T>>(w_hh, "weight_hh", {gh, R});
  p.weights.w_hr = arr.template in<fusedrnn::View2<const T>>(w_hr, "weight_hr", {P, H});
  p.weights.b_ih = arr.template in<fusedrnn::View1<const T>>(b_ih, "bias_ih", {gh});
  p.weights.b_hh = arr.template in<fusedrnn::View1<const T>>(b_hh, "bias_hh", {gh});
  if (!lengths.is_none())
    p.shape.lengths =
        view<fusedrnn::View1<const Index>>(device_array(lengths, "lengths", "<i8", 8, {B}, false, arr.device));
  const fusedrnn::TapeLayout layout = fusedrnn::tape_layout(cell, p.shape, true);
  p.tape.training = true;
  p.tape.hs = arr.tape(hs, "hs", layout.hs);
  p.tape.cs = arr.tape(cs, "cs", layout.cs);
  p.tape.saved = arr.tape(saved, "saved", layout.saved);
  p.tape.rs = arr.tape(rs, "rs", layout.rs);
  p.dy = arr.template in<fusedrnn::View3<const T>>(dy, "dy", {T_, B, R});
  p.dh_n = arr.template in<fusedrnn::View2<const T>>(dh_n, "dh_n", {B, R});
  if (!f.has_cell_state && !dc_n.is_none()) throw py::value_error("dc_n: only an LSTM has a cell state");
  p.dc_n = arr.template in<fusedrnn::View2<const T>>(dc_n, "dc_n", {B, H});
  p.dx = arr.template out<fusedrnn::View3<T>>(dx, "dx", {T_, B, I});
  p.accumulate_dx = accumulate_dx;
  p.dh0 = arr.template out<fusedrnn::View2<T>>(dh0, "dh0", {B, R});
  p.dc0 = arr.template out<fusedrnn::View2<T>>(dc0, "dc0", {B, H});
  // With grad_groups Q > 1 each weight and bias gradient is (Q, ...), C-contiguous: Q gradients one after
  // another.
  p.grad_groups = grad_groups;
  const auto matrix = [&](const py::object& obj, const char* name, Index rows, Index cols) -> fusedrnn::View2<T> {
    if (grad_groups == 1) return arr.template out<fusedrnn::View2<T>>(obj, name, {rows, cols});
    return {arr.dense_out(obj, name, {grad_groups, rows, cols}), {cols, 1}};
  };
  const auto vector = [&](const py::object& obj, const char* name, Index rows) -> fusedrnn::View1<T> {
    if (grad_groups == 1) return arr.template out<fusedrnn::View1<T>>(obj, name, {rows});
    return {arr.dense_out(obj, name, {grad_groups, rows}), 1};
  };
  p.dw_ih = matrix(dw_ih, "grads.weight_ih", gh, I);
  p.dw_hh = matrix(dw_hh, "grads.weight_hh", gh, R);
  if (!p.dw_ih.data || !p.dw_hh.data) throw py::value_error("grads.weight_ih, grads.weight_hh: gradient buffers are required");
  if (P == 0 && !dw_hr.is_none()) throw py::value_error("grads.weight_hr: the layer has no projection");
  p.dw_hr = matrix(dw_hr, "grads.weight_hr", P, H);
  if (P > 0 && !p.dw_hr.data)
    throw py::value_error("grads.weight_hr: the layer has a projection, so its gradient buffer is required");
  if ((P > 0) != (p.weights.w_hr.data && p.tape.rs))
    throw py::value_error("weight_hr, rs: required exactly when shape has a projection size P > 0");
  const bool has_bias = p.weights.b_ih.data != nullptr;
  if (!has_bias && (!db_ih.is_none() || !db_hh.is_none()))
    throw py::value_error("grads.bias_ih, grads.bias_hh: the layer has no biases, so it has no bias gradients");
  p.db_ih = vector(db_ih, "grads.bias_ih", gh);
  p.db_hh = vector(db_hh, "grads.bias_hh", gh);
  if (has_bias && (!p.db_ih.data || !p.db_hh.data))
    throw py::value_error("grads.bias_ih, grads.bias_hh: the layer has biases, so both are required");
  if (!dh_norm.is_none()) {
    const DeviceArray norms = device_array(dh_norm, "dh_norm", "<f8", 8, {T_}, true, arr.device);
    if (T_ > 1 && norms.strides[0] != 1) throw py::value_error("dh_norm: must be contiguous");
    p.dh_norm = static_cast<double*>(norms.data);
  }
  if (!p.x.data || !p.weights.w_ih.data || !p.weights.w_hh.data) throw py::value_error("x, weight_ih, weight_hh: required");
  require_tape(p.tape, layout);
  p.cell_clip = static_cast<T>(checked_cell_clip(cell_clip, cell));
  on_device(arr.device, gpu::cuda::backward_workspace_bytes(p), stream,
            [&](void* workspace) { gpu::cuda::layer_backward(p, workspace, reinterpret_cast<void*>(stream), path); });
}

// (T, B, I, H, P) from shape (T, B, I, H) or (T, B, I, H, P): P, the projection size, 0 for none.
std::vector<Index> layer_dims(const py::tuple& shape, CellKind cell) {
  if (shape.size() != 4 && shape.size() != 5) throw py::value_error("shape: expected (T, B, I, H) or (T, B, I, H, P)");
  std::vector<Index> dims;
  for (const py::handle d : shape) {
    dims.push_back(d.cast<Index>());
    if (dims.back() < (dims.size() == 5 ? 0 : 1))
      throw py::value_error("shape: every size must be >= 1 (P >= 0), got " + shape_str(dims));
  }
  if (dims.size() == 4) dims.push_back(0);
  if (dims[4] >= dims[3]) throw py::value_error("shape: expected P < H, got " + shape_str(dims));
  if (dims[4] > 0 && !fusedrnn::cell_facts(cell).projection)
    throw py::value_error("shape: only an LSTM takes a projection (P > 0)");
  return dims;
}

}  // namespace

PYBIND11_MODULE(FUSEDRNN_CUDA_MODULE, m) {
  m.doc() = "fusedrnn CUDA backend: one layer, one direction per call, on device arrays";
#ifdef FUSEDRNN_EMULATED_RUNTIME
  fusedrnn::bindings::def_emulated_runtime(m);
#endif

  m.def("layer_forward",
        [](const std::string& cell, const std::string& dtype, const py::tuple& shape, const py::object& x,
           const py::object& w_ih, const py::object& w_hh, const py::object& b_ih, const py::object& b_hh,
           const py::object& h0, const py::object& c0, const py::object& lengths, bool reverse, const py::object& y,
           const py::object& h_n, const py::object& c_n, const py::object& hs, const py::object& cs,
           const py::object& saved, bool training, const py::object& cell_clip, std::uintptr_t stream,
           const std::string& recurrence, const py::object& w_hr, const py::object& rs) {
          const CellKind kind = parse_cell(cell);
          const std::vector<Index> dims = layer_dims(shape, kind);
          const gpu::RecurrencePath path = parse_named("recurrence", recurrence, kRecurrencePathNames);
          if (dtype == "float32")
            forward_typed<float>(kind, dims, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, y, h_n, c_n, hs, cs,
                                 saved, training, cell_clip, stream, path, w_hr, rs);
          else if (dtype == "float64")
            forward_typed<double>(kind, dims, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, y, h_n, c_n, hs,
                                  cs, saved, training, cell_clip, stream, path, w_hr, rs);
          else
            throw py::type_error("dtype: expected float32 or float64, got " + dtype);
        },
        py::arg("cell"), py::arg("dtype"), py::arg("shape"), py::arg("x"), py::arg("weight_ih"),
        py::arg("weight_hh"), py::arg("bias_ih"), py::arg("bias_hh"), py::arg("h0"), py::arg("c0"),
        py::arg("lengths"), py::arg("reverse"), py::arg("y"), py::arg("h_n"), py::arg("c_n"), py::arg("hs"),
        py::arg("cs"), py::arg("saved"), py::arg("training"), py::arg("cell_clip"), py::arg("stream"),
        py::arg("recurrence") = "auto", py::arg("weight_hr") = py::none(), py::arg("rs") = py::none(),
        "Enqueues one direction of one layer on `stream` (a cudaStream_t as an int). Writes y, h_n, c_n "
        "and the tape (hs, cs, saved and, with a projection, rs: layer.h's tape layout, allocated by the "
        "caller). shape (T, B, I, H, P) with P > 0 projects an LSTM's hidden state by weight_hr (P, H).");

  m.def("layer_backward",
        [](const std::string& cell, const std::string& dtype, const py::tuple& shape, bool reverse,
           const py::object& x, const py::object& w_ih, const py::object& w_hh, const py::object& b_ih,
           const py::object& b_hh, const py::object& lengths, const py::object& hs, const py::object& cs,
           const py::object& saved, const py::object& dy, const py::object& dh_n, const py::object& dc_n,
           const py::object& dx, bool accumulate_dx, const py::object& dh0, const py::object& dc0,
           const py::object& dw_ih, const py::object& dw_hh, const py::object& db_ih, const py::object& db_hh,
           const py::object& dh_norm, const py::object& cell_clip, std::uintptr_t stream,
           const std::string& recurrence, const py::object& w_hr, const py::object& rs, const py::object& dw_hr,
           Index grad_groups) {
          const CellKind kind = parse_cell(cell);
          const std::vector<Index> dims = layer_dims(shape, kind);
          const gpu::RecurrencePath path = parse_named("recurrence", recurrence, kRecurrencePathNames);
          if (dtype == "float32")
            backward_typed<float>(kind, dims, reverse, x, w_ih, w_hh, b_ih, b_hh, lengths, hs, cs, saved, dy, dh_n,
                                  dc_n, dx, accumulate_dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dh_norm, cell_clip,
                                  stream, path, w_hr, rs, dw_hr, grad_groups);
          else if (dtype == "float64")
            backward_typed<double>(kind, dims, reverse, x, w_ih, w_hh, b_ih, b_hh, lengths, hs, cs, saved, dy, dh_n,
                                   dc_n, dx, accumulate_dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dh_norm, cell_clip,
                                   stream, path, w_hr, rs, dw_hr, grad_groups);
          else
            throw py::type_error("dtype: expected float32 or float64, got " + dtype);
        },
        py::arg("cell"), py::arg("dtype"), py::arg("shape"), py::arg("reverse"), py::arg("x"), py::arg("weight_ih"),
        py::arg("weight_hh"), py::arg("bias_ih"), py::arg("bias_hh"), py::arg("lengths"), py::arg("hs"),
        py::arg("cs"), py::arg("saved"), py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("dx"),
        py::arg("accumulate_dx"), py::arg("dh0"), py::arg("dc0"), py::arg("grad_weight_ih"),
        py::arg("grad_weight_hh"), py::arg("grad_bias_ih"), py::arg("grad_bias_hh"), py::arg("dh_norm"),
        py::arg("cell_clip"), py::arg("stream"), py::arg("recurrence") = "auto", py::arg("weight_hr") = py::none(),
        py::arg("rs") = py::none(), py::arg("grad_weight_hr") = py::none(), py::arg("grad_groups") = 1,
        "Enqueues the backward of one layer_forward(training=True) on `stream`: accumulates into the weight "
        "and bias gradients (and grad_weight_hr with a projection; dx unless accumulate_dx is False), "
        "writes dh0, dc0 and dh_norm. `recurrence` as layer_forward's: 'auto', 'per_step' or 'persistent' "
        "(where it fits). grad_groups=Q > 1: the batch's rows in Q consecutive groups, each group's weight "
        "and bias gradients apart, the gradient buffers (Q, ...) C-contiguous.");

  m.def("device_count", &gpu::cuda::device_count, "CUDA devices visible (0 without a driver or GPU).");
  m.def("device_name", &gpu::cuda::device_name, py::arg("device"));
  m.def("runtime_version", &gpu::cuda::runtime_version);
  m.def("set_graphs", &gpu::cuda::set_graphs, py::arg("enabled"),
        "Records each per-step loop as a CUDA Graph the first time its arrays and sizes are seen and "
        "replays it for later calls with the same ones (no per-step host work). Off by default.");
  m.def("graphs", &gpu::cuda::graphs);
  m.def("graph_counts", [] { return py::make_tuple(gpu::cuda::graphs_recorded(), gpu::cuda::graphs_replayed()); },
        "(recorded, replayed): per-step loops recorded as CUDA Graphs and replays of them so far.");
  m.def(
      "thread_resources",
      [] {
        const gpu::LeaseCounts counts = gpu::cuda::thread_resource_counts();
        return py::make_tuple(counts.made, counts.held);
      },
      "(made, held): sets of per-thread resources (a cuBLAS handle, a stream and the graphs recorded on "
      "it) made so far, and held by threads now. A thread holds one set per device it has called on and "
      "hands it back when it ends, for a later thread to reuse.");
  m.attr("architectures") = FUSEDRNN_CUDA_ARCHITECTURES;
  m.attr("compiler_version") = FUSEDRNN_CUDA_COMPILER_VERSION;
#ifdef FUSEDRNN_WITH_XLA_FFI
  fusedrnn::bindings::def_jax_ffi_cuda(m);
#endif
}
