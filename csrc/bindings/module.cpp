// pybind11 bindings: check NumPy arrays once, describe them as the views of the neutral layer API
// (fusedrnn/layer.h, no copies), release the GIL and call the CPU backend (or, for tests, the CUDA
// backend's device code emulated on the host, cuda/emulated.h). No numerics here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <atomic>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include <cmath>
#include <limits>
#include <stdexcept>

#include "fusedrnn/allocation.h"
#include "fusedrnn/cells.h"
#include "fusedrnn/cpu/backend.h"
#include "fusedrnn/cpu/blas.h"
#include "fusedrnn/cpu/cpu_limit.h"
#include "fusedrnn/cpu/kernels.h"
#include "fusedrnn/cpu/passes.h"
#include "fusedrnn/cpu/threads.h"
#include "fusedrnn/cuda/emulated.h"
#include "fusedrnn/layer.h"
#include "arguments.h"
#include "gil.h"
#ifdef FUSEDRNN_WITH_XLA_FFI
#include "jax_ffi.h"
#endif

namespace py = pybind11;
namespace cpu = fusedrnn::cpu;
using fusedrnn::CellKind;
using fusedrnn::Index;
using fusedrnn::bindings::checked_cell_clip;
using fusedrnn::bindings::kRecurrencePathNames;
using fusedrnn::bindings::Named;
using fusedrnn::bindings::name_of;
using fusedrnn::bindings::parse_cell;
using fusedrnn::bindings::parse_named;
using fusedrnn::bindings::shape_str;

namespace {

constexpr Named<cpu::SplitPreference> kSplitNames[] = {{"auto", cpu::SplitPreference::kAuto},
                                                            {"rows", cpu::SplitPreference::kRows},
                                                            {"units", cpu::SplitPreference::kUnits}};
constexpr Named<cpu::ProjectionPreference> kProjectionNames[] = {
    {"auto", cpu::ProjectionPreference::kAuto},
    {"in_steps", cpu::ProjectionPreference::kInSteps},
    {"up_front", cpu::ProjectionPreference::kUpFront},
    {"up_front_by_rank", cpu::ProjectionPreference::kUpFrontByRank}};
constexpr Named<cpu::DirectionsPreference> kDirectionsNames[] = {
    {"auto", cpu::DirectionsPreference::kAuto},
    {"together", cpu::DirectionsPreference::kTogether},
    {"apart", cpu::DirectionsPreference::kApart}};
constexpr Named<cpu::WeightGradPreference> kWeightGradNames[] = {
    {"auto", cpu::WeightGradPreference::kAuto},
    {"rows", cpu::WeightGradPreference::kRows},
    {"gate_rows", cpu::WeightGradPreference::kGateRows}};

// Which backend runs a layer call on NumPy arrays: the CPU backend, or the CUDA backend's device code
// run on the host (tests of that code on machines without a GPU).
enum class Backend { kCpu, kEmulatedDevice };
constexpr Named<Backend> kBackendNames[] = {{"cpu", Backend::kCpu}, {"emulated_device", Backend::kEmulatedDevice}};

namespace gpu = fusedrnn::gpu;
std::atomic<gpu::RecurrencePath> emulated_recurrence_path{gpu::RecurrencePath::kAuto};
void set_emulated_recurrence_path(gpu::RecurrencePath path) { emulated_recurrence_path.store(path); }
gpu::RecurrencePath get_emulated_recurrence_path() { return emulated_recurrence_path.load(); }

// A choice the core keeps (tests and benchmarks force one): set_<name>(kind) and get_<name>().
template <typename E, std::size_t N>
void def_choice(py::module_& m, const std::string& name, const Named<E> (&table)[N], void (*set)(E), E (*get)(),
                const char* set_doc) {
  m.def(("set_" + name).c_str(), [&table, set](const std::string& kind) { set(parse_named("kind", kind, table)); },
        py::arg("kind"), set_doc);
  m.def(("get_" + name).c_str(), [&table, get] { return name_of(get(), table); },
        ("The choice set by set_" + name + ".").c_str());
}

// Whether `arr` holds values of type T. By value, not by identity: an unpickled array's dtype is an
// equal but distinct object.
template <typename T>
bool holds(const py::array& arr) { return py::isinstance<py::array_t<T>>(arr); }

// The item size of a float32 or float64 dtype; a TypeError naming `dtype` for any other.
std::size_t float_item_size(const py::object& dtype_like) {
  const py::dtype dtype = py::dtype::from_args(dtype_like);
  if (dtype.num() == py::dtype::of<float>().num()) return sizeof(float);
  if (dtype.num() == py::dtype::of<double>().num()) return sizeof(double);
  throw py::type_error("dtype: expected float32 or float64, got " + std::string(py::str(dtype)));
}

std::vector<Index> shape_of(const py::array& a) {
  return std::vector<Index>(a.shape(), a.shape() + a.ndim());
}

// Row stride (in elements) of an array whose last dimension is contiguous and whose rows (all leading
// indices, flattened in C order) are evenly spaced without overlap, so the core can walk it as
// (rows, width) with one stride; -1 if it is not. Axes of length 1 may carry any stride.
template <typename T>
Index row_stride(const py::array& arr) {
  const Index item = static_cast<Index>(sizeof(T));
  const int nd = static_cast<int>(arr.ndim());
  const Index width = arr.shape(nd - 1);
  if (width > 1 && arr.strides(nd - 1) != item) return -1;
  Index ld = -1;      // row stride, fixed by the innermost leading axis longer than 1
  Index rows_in = 1;  // rows spanned by one step of the axis being checked
  for (int d = nd - 2; d >= 0; --d) {
    if (arr.shape(d) > 1) {
      if (ld < 0) {
        if (arr.strides(d) % item != 0) return -1;
        ld = arr.strides(d) / item / rows_in;
        if (ld * rows_in * item != arr.strides(d) || ld < width) return -1;
      } else if (arr.strides(d) != ld * rows_in * item) {
        return -1;
      }
    }
    rows_in *= arr.shape(d);
  }
  return ld < 0 ? width : ld;
}

// What decides the dtype every other array of a call must have, said in a dtype mismatch's message.
constexpr const char* kDtypeOfX = "x's";
constexpr const char* kDtypeOfTape = "the forward's";

template <typename T>
void check_dtype_and_shape(const py::array& arr, const char* name, const std::vector<Index>& shape,
                           const char* dtype_rule = nullptr) {
  if (!holds<T>(arr))
    throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                         (dtype_rule ? std::string(" (") + dtype_rule + ")" : "") + ", got " +
                         std::string(py::str(arr.dtype())));
  if (shape_of(arr) != shape)
    throw py::value_error(std::string(name) + ": expected shape " + shape_str(shape) + ", got " +
                          shape_str(shape_of(arr)));
}

py::array require_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a NumPy array, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  return py::reinterpret_borrow<py::array>(obj);
}

// An output array the core writes into (possibly a column slice of a wider one). Returns its row stride.
template <typename T>
Index checked_output(const py::array& arr, const char* name, const std::vector<Index>& shape,
                     const char* dtype_rule = nullptr) {
  check_dtype_and_shape<T>(arr, name, shape, dtype_rule);
  if (!arr.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  if (reinterpret_cast<std::uintptr_t>(arr.data()) % alignof(T) != 0)
    throw py::value_error(std::string(name) + ": its data is not aligned to its element size (a view cut from "
                          "a byte buffer at an odd offset), so the core cannot write it in place");
  const Index ld = row_stride<T>(arr);
  if (ld < 0) throw py::value_error(std::string(name) + ": needs a contiguous last dimension and evenly spaced rows");
  return ld;
}

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

// `arr` itself when its data is aligned for T and every stride is a whole number of elements (any NumPy
// array of T's dtype but a view cut from a raw byte buffer), else an aligned C-contiguous copy: the views
// of layer.h count strides in elements.
template <typename T>
py::array element_addressable(const py::array& arr) {
  bool whole = reinterpret_cast<std::uintptr_t>(arr.data()) % alignof(T) == 0;
  for (py::ssize_t d = 0; d < arr.ndim(); ++d) whole = whole && arr.strides(d) % static_cast<py::ssize_t>(sizeof(T)) == 0;
  return whole ? arr : py::array(arr.attr("copy")());
}

// The layer.h view of a checked array of T (element_addressable): its data and strides in elements.
template <typename T, typename V>
V view_of(const py::array& arr) {
  V v;
  v.data = static_cast<decltype(v.data)>(const_cast<void*>(arr.data()));
  constexpr auto item = static_cast<py::ssize_t>(sizeof(T));
  if constexpr (std::is_same_v<V, fusedrnn::View1<std::remove_pointer_t<decltype(v.data)>>>)
    v.stride = arr.strides(0) / item;
  else
    for (py::ssize_t d = 0; d < arr.ndim(); ++d) v.stride[d] = arr.strides(d) / item;
  return v;
}

template <typename T>
fusedrnn::View3<const T> in3(const py::array& a) { return view_of<T, fusedrnn::View3<const T>>(a); }
template <typename T>
fusedrnn::View2<const T> in2(const py::array& a) { return view_of<T, fusedrnn::View2<const T>>(a); }
template <typename T>
fusedrnn::View3<T> out3(const py::array& a) { return view_of<T, fusedrnn::View3<T>>(a); }
template <typename T>
fusedrnn::View2<T> out2(const py::array& a) { return view_of<T, fusedrnn::View2<T>>(a); }
template <typename T>
fusedrnn::View1<T> out1(const py::array& a) { return view_of<T, fusedrnn::View1<T>>(a); }

// The view of an optional (None: absent) array.
template <typename T>
fusedrnn::View2<const T> in2_or_null(const py::object& obj) {
  return obj.is_none() ? fusedrnn::View2<const T>{} : in2<T>(py::reinterpret_borrow<py::array>(obj));
}
template <typename T>
fusedrnn::View1<const T> in1_or_null(const py::object& obj) {
  return obj.is_none() ? fusedrnn::View1<const T>{}
                       : view_of<T, fusedrnn::View1<const T>>(py::reinterpret_borrow<py::array>(obj));
}
template <typename T>
fusedrnn::View2<T> dense2(T* data, Index cols) { return {data, {cols, 1}}; }

// A new C-contiguous array whose data starts on a 64-byte boundary. The ranks of the thread team own
// ranges of hidden units that start on 64-byte boundaries of each row; numpy aligns to 16 bytes only,
// which would put the two sides of each boundary in one cache line that both cores write every step.
template <typename T>
Arr<T> aligned_array(const std::vector<Index>& shape) {
  constexpr std::size_t kAlign = 64;
  std::uint64_t count = 1;
  for (Index d : shape)
    if (__builtin_mul_overflow(count, static_cast<std::uint64_t>(d), &count))
      count = std::numeric_limits<std::uint64_t>::max();  // past any size: refused just below
  py::array_t<std::uint8_t> storage(
      static_cast<py::ssize_t>(fusedrnn::checked_bytes(count, sizeof(T), kAlign, "a result or tape array")));
  std::uint8_t* raw = storage.mutable_data();
  const std::size_t offset = (kAlign - reinterpret_cast<std::uintptr_t>(raw) % kAlign) % kAlign;
  return Arr<T>(shape, reinterpret_cast<T*>(raw + offset), storage);
}

// The array behind `obj`, checked for dtype and shape, as it is (any strides; see element_addressable).
template <typename T>
py::array checked_input(const py::handle& obj, const char* name, const std::vector<Index>& shape,
                        const char* dtype_rule = nullptr) {
  auto arr = require_array(obj, name);
  check_dtype_and_shape<T>(arr, name, shape, dtype_rule);
  return element_addressable<T>(arr);
}

// Everything forward keeps for backward: the recorded states, the saved gate values, and references to
// the input, weights and lengths it ran with.
struct Tape {
  CellKind cell;
  bool reverse;
  Index steps, batch, input, hidden;
  Index proj;                      // 0: no projection
  py::array x, w_ih, w_hh;
  py::object b_ih, b_hh, lengths;  // None when absent
  py::object w_hr;                 // None without a projection
  py::array hs;
  py::object cs, saved, rs;        // None when the layer has none
  double cell_clip;                // +inf: none
  Backend backend;                 // the one that ran forward runs backward

  Index state_size() const { return proj > 0 ? proj : hidden; }
};

template <typename T>
py::object optional_input(const py::object& obj, const char* name, const std::vector<Index>& shape,
                          const char* dtype_rule) {
  if (obj.is_none()) return py::none();
  return checked_input<T>(obj, name, shape, dtype_rule);
}

py::object checked_lengths(const py::object& obj, Index steps, Index batch) {
  if (obj.is_none()) return py::none();
  if (!py::isinstance<py::array>(obj) ||
      !holds<Index>(py::reinterpret_borrow<py::array>(obj)))
    throw py::type_error("lengths: expected a NumPy int64 array");
  auto arr = element_addressable<Index>(py::reinterpret_borrow<py::array>(obj));
  if (shape_of(arr) != std::vector<Index>{batch})
    throw py::value_error("lengths: expected shape " + shape_str({batch}) + ", got " +
                          shape_str(shape_of(arr)));
  const fusedrnn::View1<const Index> v = view_of<Index, fusedrnn::View1<const Index>>(arr);
  for (Index b = 0; b < batch; ++b)
    if (v.data[b * v.stride] < 1 || v.data[b * v.stride] > steps)
      throw py::value_error("lengths: each length must be in [1, " + std::to_string(steps) +
                            "], got " + std::to_string(v.data[b * v.stride]) + " at index " +
                            std::to_string(b));
  return std::move(arr);
}

// A layer's sizes from the shapes of x (T, B, I), weight_hh (G*H, R) and weight_hr (P, H; null: none),
// checked against each other, the cell and torch.nn's rule 0 < P < H: the one home of these refusals,
// for the host call and (through layer_sizes) the CUDA backend's, so both name the argument alike.
struct LayerSizes {
  Index steps, batch, input, hidden, proj;
};

LayerSizes checked_layer_sizes(CellKind cell, const std::vector<Index>& x, const std::vector<Index>& w_hh,
                               const std::vector<Index>* w_hr) {
  if (x.size() != 3)
    throw py::value_error("x: expected a 3-D array (T, B, input_size), got " + std::to_string(x.size()) + "-D");
  if (x[0] < 1) throw py::value_error("x: expected at least one time step, got shape " + shape_str(x));
  if (x[1] < 1) throw py::value_error("x: empty batch, got shape " + shape_str(x));
  if (x[2] < 1) throw py::value_error("x: input_size must be >= 1, got shape " + shape_str(x));
  if (w_hh.size() != 2)
    throw py::value_error("weight_hh: expected a 2-D array (gates*hidden_size, hidden_size or proj_size)");
  const fusedrnn::CellFacts& facts = fusedrnn::cell_facts(cell);
  // R, the width of h: weight_hh's columns (hidden_size, or proj_size with a projection, whose own
  // columns then give hidden_size: checked first).
  const Index state = w_hh[1];
  Index hidden = state, proj = 0;
  if (w_hr) {
    if (!facts.projection) throw py::value_error("weight_hr: only an LSTM takes a projection (proj_size)");
    if (w_hr->size() != 2)
      throw py::value_error("weight_hr: expected a 2-D array (proj_size, hidden_size), got shape " + shape_str(*w_hr));
    proj = (*w_hr)[0];
    hidden = (*w_hr)[1];
    if (proj < 1 || proj >= hidden)
      throw py::value_error("weight_hr: expected shape (proj_size, hidden_size) with 0 < proj_size < "
                            "hidden_size, got " + shape_str(*w_hr));
  }
  if (state < 1) throw py::value_error("weight_hh: hidden_size must be >= 1, got shape " + shape_str(w_hh));
  const Index gh = facts.gates * hidden;
  if (proj > 0 && w_hh[0] != gh)
    throw py::value_error("weight_hr, weight_hh: weight_hr's columns give hidden_size " + std::to_string(hidden) +
                          ", so weight_hh needs gates*hidden_size = " + std::to_string(gh) + " rows, got shape " +
                          shape_str(w_hh));
  if (proj == 0 && w_hh[0] != gh)
    throw py::value_error("weight_hh: expected shape (" + std::to_string(facts.gates) +
                          "*hidden_size, hidden_size) for cell '" + facts.name + "', got " + shape_str(w_hh));
  return {x[0], x[1], x[2], hidden, proj};
}

// One direction's forward call, its arguments checked and its outputs made: `args` for the core, and
// what the call returns once it has run, (y, h_n, c_n, tape).
template <typename T>
struct PreparedForward {
  fusedrnn::LayerForwardParams<T> args;
  py::tuple result;
  std::vector<py::object> arrays;  // every array args points into, alive until the call has run
};

template <typename T>
PreparedForward<T> prepare_forward(Backend backend, CellKind cell, const py::array& x_obj, const py::object& w_ih_obj,
                               const py::object& w_hh_obj, const py::object& b_ih_obj,
                               const py::object& b_hh_obj, const py::object& h0_obj,
                               const py::object& c0_obj, const py::object& lengths_obj, bool reverse,
                               bool training, const py::object& out_obj, double cell_clip,
                               const py::object& w_hr_obj) {
  const fusedrnn::CellFacts& facts = fusedrnn::cell_facts(cell);
  std::vector<Index> w_hh_shape, w_hr_shape;  // empty where not an array: refused as not 2-D
  if (py::isinstance<py::array>(w_hh_obj)) w_hh_shape = shape_of(py::reinterpret_borrow<py::array>(w_hh_obj));
  if (!w_hr_obj.is_none() && facts.projection) w_hr_shape = shape_of(require_array(w_hr_obj, "weight_hr"));
  const LayerSizes sizes =
      checked_layer_sizes(cell, shape_of(x_obj), w_hh_shape, w_hr_obj.is_none() ? nullptr : &w_hr_shape);
  const Index steps = sizes.steps, batch = sizes.batch, input = sizes.input, hidden = sizes.hidden;
  const Index proj = sizes.proj, state = proj > 0 ? proj : hidden;
  const Index gh = facts.gates * hidden;
  const bool has_c = facts.has_cell_state;

  auto x = checked_input<T>(x_obj, "x", {steps, batch, input});
  // weight_hh first: hidden_size is read from its columns, so a mismatch there is reported against it.
  auto w_hh = checked_input<T>(w_hh_obj, "weight_hh", {gh, proj > 0 ? proj : hidden}, kDtypeOfX);
  auto w_ih = checked_input<T>(w_ih_obj, "weight_ih", {gh, input}, kDtypeOfX);
  py::object w_hr = optional_input<T>(w_hr_obj, "weight_hr", {proj, hidden}, kDtypeOfX);
  py::object b_ih = optional_input<T>(b_ih_obj, "bias_ih", {gh}, kDtypeOfX);
  py::object b_hh = optional_input<T>(b_hh_obj, "bias_hh", {gh}, kDtypeOfX);
  if (b_ih.is_none() != b_hh.is_none())
    throw py::value_error("bias_ih, bias_hh: pass both or neither");
  py::object h0 = optional_input<T>(h0_obj, "h0", {batch, state}, kDtypeOfX);
  if (!has_c && !c0_obj.is_none()) throw py::value_error("c0: only an LSTM has a cell state");
  py::object c0 = optional_input<T>(c0_obj, "c0", {batch, hidden}, kDtypeOfX);
  py::object lengths = checked_lengths(lengths_obj, steps, batch);

  py::array out = out_obj.is_none() ? py::array(aligned_array<T>({steps, batch, state})) : require_array(out_obj, "out");
  checked_output<T>(out, "out", {steps, batch, state}, kDtypeOfX);  // its view (strides) goes to the core as it is

  fusedrnn::LayerForwardParams<T> args;
  args.cell = cell;
  args.shape = {steps, batch, input, hidden, in1_or_null<Index>(lengths), reverse, proj};
  const fusedrnn::TapeLayout layout = fusedrnn::tape_layout(cell, args.shape, training);
  auto tape_array = [](const fusedrnn::TapeArray& shape) {
    return shape.values() == 0 ? py::none()
                               : py::object(aligned_array<T>({shape.leading, shape.batch, shape.width}));
  };
  Arr<T> hs = py::cast<Arr<T>>(tape_array(layout.hs));
  py::object cs = tape_array(layout.cs), saved = tape_array(layout.saved), rs = tape_array(layout.rs);
  Arr<T> h_n = aligned_array<T>({batch, state});
  py::object c_n = has_c ? py::object(aligned_array<T>({batch, hidden})) : py::none();

  args.weights = {in2<T>(w_ih), in2<T>(w_hh), in1_or_null<T>(b_ih), in1_or_null<T>(b_hh), in2_or_null<T>(w_hr)};
  args.x = in3<T>(x);
  args.h0 = in2_or_null<T>(h0);
  args.c0 = in2_or_null<T>(c0);
  args.y = out3<T>(out);
  args.h_n = dense2(h_n.mutable_data(), state);
  if (has_c) args.c_n = dense2(py::cast<Arr<T>>(c_n).mutable_data(), hidden);
  args.tape = {hs.mutable_data(), has_c ? py::cast<Arr<T>>(cs).mutable_data() : nullptr,
               saved.is_none() ? nullptr : py::cast<Arr<T>>(saved).mutable_data(), training,
               rs.is_none() ? nullptr : py::cast<Arr<T>>(rs).mutable_data()};
  args.cell_clip = static_cast<T>(cell_clip);
  py::object tape = py::none();
  if (training)
    tape = py::cast(Tape{cell, reverse, steps, batch, input, hidden, proj, x, w_ih, w_hh, b_ih, b_hh,
                         lengths, w_hr, hs, cs, saved, rs, cell_clip, backend});
  return {args, py::make_tuple(out, h_n, c_n, tape),
          {x, w_ih, w_hh, w_hr, b_ih, b_hh, h0, c0, lengths, out, hs, cs, saved, rs, h_n, c_n}};
}

template <typename T>
py::tuple forward_typed(Backend backend, CellKind cell, const py::array& x, const py::object& w_ih,
                        const py::object& w_hh, const py::object& b_ih, const py::object& b_hh,
                        const py::object& h0, const py::object& c0, const py::object& lengths, bool reverse,
                        bool training, const py::object& out, double cell_clip, const py::object& w_hr) {
  const PreparedForward<T> call = prepare_forward<T>(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths,
                                                     reverse, training, out, cell_clip, w_hr);
  {
    fusedrnn::bindings::ReleasedGil release;
    if (backend == Backend::kCpu)
      cpu::layer_forward<T>(call.args);
    else
      gpu::emulated::layer_forward<T>(call.args, get_emulated_recurrence_path());
  }
  return call.result;
}

py::tuple layer_forward(const std::string& cell_name, const py::object& x, const py::object& weight_ih,
                        const py::object& weight_hh, const py::object& bias_ih,
                        const py::object& bias_hh, const py::object& h0, const py::object& c0,
                        const py::object& lengths, bool reverse, bool training,
                        const py::object& out, const py::object& cell_clip_obj,
                        const std::string& backend_name, const py::object& weight_hr) {
  const Backend backend = parse_named("backend", backend_name, kBackendNames);
  const CellKind cell = parse_cell(cell_name);
  const double cell_clip = checked_cell_clip(cell_clip_obj, cell);
  auto xa = require_array(x, "x");
  if (holds<float>(xa))
    return forward_typed<float>(backend, cell, xa, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths,
                                reverse, training, out, cell_clip, weight_hr);
  if (holds<double>(xa))
    return forward_typed<double>(backend, cell, xa, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths,
                                 reverse, training, out, cell_clip, weight_hr);
  throw py::type_error("x: expected dtype float32 or float64, got " + std::string(py::str(xa.dtype())));
}

// The two items of a per-direction argument (a sequence of length 2).
std::pair<py::object, py::object> per_direction(const py::object& obj, const char* name) {
  if (!py::isinstance<py::sequence>(obj) || py::len(obj) != 2)
    throw py::type_error(std::string(name) + ": expected a sequence of two items, one per direction");
  const py::sequence items = py::reinterpret_borrow<py::sequence>(obj);
  return {items[0], items[1]};
}

// A direction's weights (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), each possibly None.
std::array<py::object, 5> direction_weights(const py::object& obj) {
  if (!py::isinstance<py::sequence>(obj) || py::len(obj) != 5)
    throw py::type_error("weights: expected (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) per direction");
  const py::sequence w = py::reinterpret_borrow<py::sequence>(obj);
  return {w[0], w[1], w[2], w[3], w[4]};
}

template <typename T>
py::tuple forward_directions_typed(CellKind cell, const py::array& x, const py::object& weights,
                                   const py::object& h0, const py::object& c0, const py::object& lengths,
                                   bool training, const py::object& out, double cell_clip) {
  const auto [w0, w1] = per_direction(weights, "weights");
  const auto [h0_0, h0_1] = per_direction(h0, "h0");
  const auto [c0_0, c0_1] = per_direction(c0, "c0");
  const auto [out0, out1] = per_direction(out, "out");
  const std::array<py::object, 5> a = direction_weights(w0), b = direction_weights(w1);
  const PreparedForward<T> d0 = prepare_forward<T>(Backend::kCpu, cell, x, a[0], a[1], a[2], a[3], h0_0, c0_0,
                                                   lengths, false, training, out0, cell_clip, a[4]);
  const PreparedForward<T> d1 = prepare_forward<T>(Backend::kCpu, cell, x, b[0], b[1], b[2], b[3], h0_1, c0_1,
                                                   lengths, true, training, out1, cell_clip, b[4]);
  if (d0.args.shape.hidden != d1.args.shape.hidden || d0.args.shape.proj != d1.args.shape.proj)
    throw py::value_error("weights: the two directions' weights differ in shape");
  {
    fusedrnn::bindings::ReleasedGil release;
    cpu::layer_forward_directions<T>(d0.args, d1.args);
  }
  return py::make_tuple(d0.result, d1.result);
}

py::tuple layer_forward_directions(const std::string& cell_name, const py::object& x, const py::object& weights,
                                   const py::object& h0, const py::object& c0, const py::object& lengths,
                                   bool training, const py::object& out, const py::object& cell_clip_obj) {
  const CellKind cell = parse_cell(cell_name);
  const double cell_clip = checked_cell_clip(cell_clip_obj, cell);
  auto xa = require_array(x, "x");
  if (holds<float>(xa))
    return forward_directions_typed<float>(cell, xa, weights, h0, c0, lengths, training, out, cell_clip);
  if (holds<double>(xa))
    return forward_directions_typed<double>(cell, xa, weights, h0, c0, lengths, training, out, cell_clip);
  throw py::type_error("x: expected dtype float32 or float64, got " + std::string(py::str(xa.dtype())));
}

// One direction's backward call, as PreparedForward: `args` for the core, then (dh0, dc0, dh_norm).
template <typename T>
struct PreparedBackward {
  fusedrnn::LayerBackwardParams<T> args;
  py::tuple result;
  std::vector<py::object> arrays;  // every array args points into beside the tape's
};

template <typename T>
PreparedBackward<T> prepare_backward(const Tape& tape, const py::object& dy_obj, const py::object& dh_n_obj,
                                 const py::object& dc_n_obj, const py::object& dx_obj,
                                 const py::object& grad_w_ih, const py::object& grad_w_hh,
                                 const py::object& grad_b_ih, const py::object& grad_b_hh, bool accumulate_dx,
                                 const py::object& grad_w_hr, bool accumulate_grads, Index grad_groups) {
  const Index steps = tape.steps, batch = tape.batch, input = tape.input, hidden = tape.hidden;
  if (grad_groups < 1 || batch % grad_groups != 0)
    throw py::value_error("grad_groups: expected a divisor of the batch (" + std::to_string(batch) + "), got " +
                          std::to_string(grad_groups));
  const Index proj = tape.proj, state = tape.state_size();
  const fusedrnn::CellFacts& facts = fusedrnn::cell_facts(tape.cell);
  const Index gh = facts.gates * hidden;
  const bool has_c = facts.has_cell_state;
  const bool has_bias = !tape.b_ih.is_none();
  auto data_of = [](const py::object& obj) -> T* {
    return obj.is_none() ? nullptr : static_cast<T*>(py::cast<py::array>(obj).request().ptr);
  };

  fusedrnn::LayerBackwardParams<T> args;
  args.cell = tape.cell;
  args.shape = {steps, batch, input, hidden, in1_or_null<Index>(tape.lengths), tape.reverse, proj};
  args.weights = {in2<T>(tape.w_ih), in2<T>(tape.w_hh), in1_or_null<T>(tape.b_ih), in1_or_null<T>(tape.b_hh),
                  in2_or_null<T>(tape.w_hr)};
  args.x = in3<T>(tape.x);
  args.cell_clip = static_cast<T>(tape.cell_clip);
  args.tape = {static_cast<T*>(tape.hs.request().ptr), data_of(tape.cs), data_of(tape.saved), true,
               data_of(tape.rs)};

  // The output gradients as they are: a column slice of a wider gradient, a broadcast, any strides.
  py::array dy;
  if (!dy_obj.is_none()) {
    dy = checked_input<T>(dy_obj, "dy", {steps, batch, state}, kDtypeOfTape);
    args.dy = in3<T>(dy);
  }
  const py::object dh_n = optional_input<T>(dh_n_obj, "dh_n", {batch, state}, kDtypeOfTape);
  if (!has_c && !dc_n_obj.is_none()) throw py::value_error("dc_n: only an LSTM has a cell state");
  const py::object dc_n = optional_input<T>(dc_n_obj, "dc_n", {batch, hidden}, kDtypeOfTape);
  args.dh_n = in2_or_null<T>(dh_n);
  args.dc_n = in2_or_null<T>(dc_n);

  // The gradient buffers the caller accumulates into (or has written): C-contiguous (the API's rule).
  // Per group of rows, the weight and bias gradients gain a leading dimension of grad_groups.
  auto out_buffer = [](const py::object& obj, const char* name, const std::vector<Index>& shape) -> py::object {
    if (obj.is_none()) return py::none();
    auto arr = require_array(obj, name);
    const Index ld = checked_output<T>(arr, name, shape, kDtypeOfTape);
    if (ld != shape.back() && shape.size() > 1)
      throw py::value_error(std::string(name) + ": must be C-contiguous");
    return std::move(arr);
  };
  auto grouped = [grad_groups](std::vector<Index> shape) {
    if (grad_groups > 1) shape.insert(shape.begin(), grad_groups);
    return shape;
  };
  py::object dx = out_buffer(dx_obj, "dx", {steps, batch, input});
  py::object dw_ih = out_buffer(grad_w_ih, "grads.weight_ih", grouped({gh, input}));
  py::object dw_hh = out_buffer(grad_w_hh, "grads.weight_hh", grouped({gh, state}));
  if (dw_ih.is_none() || dw_hh.is_none())
    throw py::value_error("grads.weight_ih, grads.weight_hh: gradient buffers are required");
  py::object dw_hr = proj > 0 ? out_buffer(grad_w_hr, "grads.weight_hr", grouped({proj, hidden})) : py::none();
  if (proj > 0 && dw_hr.is_none())
    throw py::value_error("grads.weight_hr: the layer has a projection, so its gradient buffer is required");
  if (proj == 0 && !grad_w_hr.is_none())
    throw py::value_error("grads.weight_hr: the layer has no projection");
  py::object db_ih = has_bias ? out_buffer(grad_b_ih, "grads.bias_ih", grouped({gh})) : py::none();
  py::object db_hh = has_bias ? out_buffer(grad_b_hh, "grads.bias_hh", grouped({gh})) : py::none();
  if (has_bias && (db_ih.is_none() || db_hh.is_none()))
    throw py::value_error("grads.bias_ih, grads.bias_hh: the layer has biases, so both are required");
  if (!has_bias && (!grad_b_ih.is_none() || !grad_b_hh.is_none()))
    throw py::value_error("grads.bias_ih, grads.bias_hh: the layer has no biases, so it has no bias gradients");
  auto as_array = [](const py::object& obj) { return py::reinterpret_borrow<py::array>(obj); };
  if (!dx.is_none()) args.dx = out3<T>(as_array(dx));
  args.accumulate_dx = accumulate_dx;
  args.accumulate_weight_grads = accumulate_grads;
  args.grad_groups = grad_groups;
  // Grouped, each buffer is dense: its groups' gradients one after another as rows.
  auto matrix = [grad_groups, &as_array](const py::object& obj, Index cols) {
    return grad_groups > 1 ? dense2(static_cast<T*>(as_array(obj).mutable_data()), cols) : out2<T>(as_array(obj));
  };
  auto vector = [grad_groups, &as_array](const py::object& obj) {
    return grad_groups > 1 ? fusedrnn::View1<T>{static_cast<T*>(as_array(obj).mutable_data()), 1}
                           : out1<T>(as_array(obj));
  };
  args.dw_ih = matrix(dw_ih, input);
  args.dw_hh = matrix(dw_hh, state);
  if (proj > 0) args.dw_hr = matrix(dw_hr, hidden);
  if (has_bias) {
    args.db_ih = vector(db_ih);
    args.db_hh = vector(db_hh);
  }

  Arr<T> dh0 = aligned_array<T>({batch, state});
  py::object dc0 = has_c ? py::object(aligned_array<T>({batch, hidden})) : py::none();
  args.dh0 = dense2(dh0.mutable_data(), state);
  if (has_c) args.dc0 = dense2(py::cast<Arr<T>>(dc0).mutable_data(), hidden);
  py::array_t<double> dh_norm(steps);
  args.dh_norm = dh_norm.mutable_data();
  return {args, py::make_tuple(dh0, dc0, dh_norm), {dy, dh_n, dc_n, dx, dw_ih, dw_hh, dw_hr, db_ih, db_hh}};
}

template <typename T>
py::tuple backward_typed(const Tape& tape, const py::object& dy, const py::object& dh_n, const py::object& dc_n,
                         const py::object& dx, const py::object& grad_w_ih, const py::object& grad_w_hh,
                         const py::object& grad_b_ih, const py::object& grad_b_hh, bool accumulate_dx,
                         const py::object& grad_w_hr, bool accumulate_grads, Index grad_groups) {
  const PreparedBackward<T> call = prepare_backward<T>(tape, dy, dh_n, dc_n, dx, grad_w_ih, grad_w_hh, grad_b_ih,
                                                       grad_b_hh, accumulate_dx, grad_w_hr, accumulate_grads,
                                                       grad_groups);
  {
    fusedrnn::bindings::ReleasedGil release;
    if (tape.backend == Backend::kCpu)
      cpu::layer_backward<T>(call.args);
    else
      gpu::emulated::layer_backward<T>(call.args, get_emulated_recurrence_path());
  }
  return call.result;
}

// Both directions' backward: `tapes`, `dy`, `dh_n`, `dc_n` and `grads` (grad_weight_ih, grad_weight_hh,
// grad_bias_ih, grad_bias_hh, grad_weight_hr) one per direction; direction 1 adds into the dx that
// direction 0 writes (or adds into, with accumulate_dx); each direction's gradients are added into
// (accumulate_grads) or written.
template <typename T>
py::tuple backward_directions_typed(const Tape& t0, const Tape& t1, const py::object& dy, const py::object& dh_n,
                                    const py::object& dc_n, const py::object& dx, const py::object& grads,
                                    bool accumulate_dx, bool accumulate_grads, Index grad_groups) {
  const auto [dy0, dy1] = per_direction(dy, "dy");
  const auto [dh_n0, dh_n1] = per_direction(dh_n, "dh_n");
  const auto [dc_n0, dc_n1] = per_direction(dc_n, "dc_n");
  const auto [g0, g1] = per_direction(grads, "grads");
  const std::array<py::object, 5> a = direction_weights(g0), b = direction_weights(g1);
  const PreparedBackward<T> d0 =
      prepare_backward<T>(t0, dy0, dh_n0, dc_n0, dx, a[0], a[1], a[2], a[3], accumulate_dx, a[4], accumulate_grads,
                          grad_groups);
  const PreparedBackward<T> d1 = prepare_backward<T>(t1, dy1, dh_n1, dc_n1, dx, b[0], b[1], b[2], b[3], true, b[4],
                                                     accumulate_grads, grad_groups);
  {
    fusedrnn::bindings::ReleasedGil release;
    cpu::layer_backward_directions<T>(d0.args, d1.args);
  }
  return py::make_tuple(d0.result, d1.result);
}

py::tuple layer_backward_directions(const py::object& tapes, const py::object& dy, const py::object& dh_n,
                                    const py::object& dc_n, const py::object& dx, const py::object& grads,
                                    bool accumulate_dx, bool accumulate_grads, Index grad_groups) {
  const auto [first, second] = per_direction(tapes, "tapes");
  const Tape& t0 = py::cast<const Tape&>(first);
  const Tape& t1 = py::cast<const Tape&>(second);
  if (t0.backend != Backend::kCpu || t1.backend != Backend::kCpu)
    throw py::value_error("tapes: both directions together run on the CPU backend only");
  if (t0.reverse || !t1.reverse || t0.cell != t1.cell || t0.steps != t1.steps || t0.batch != t1.batch ||
      t0.input != t1.input || t0.hidden != t1.hidden || t0.proj != t1.proj ||
      holds<float>(t0.x) != holds<float>(t1.x))
    throw py::value_error("tapes: expected the forward and the reverse direction of one layer");
  if (dx.is_none()) throw py::value_error("dx: both directions together need the buffer they share");
  if (holds<float>(t0.x))
    return backward_directions_typed<float>(t0, t1, dy, dh_n, dc_n, dx, grads, accumulate_dx, accumulate_grads,
                                            grad_groups);
  return backward_directions_typed<double>(t0, t1, dy, dh_n, dc_n, dx, grads, accumulate_dx, accumulate_grads,
                                           grad_groups);
}

// pass(values, size) over a contiguous, aligned float32/float64 array, without the GIL.
template <typename Pass>
auto whole_array_pass(const py::array& a, const Pass& pass) {
  const bool dense = (a.flags() & (py::array::c_style | py::array::f_style)) != 0;
  if (!dense) throw py::type_error("a: expected a C- or Fortran-contiguous array");
  if (reinterpret_cast<std::uintptr_t>(a.data()) % a.itemsize() != 0) throw py::type_error("a: expected an aligned array");
  const Index size = a.size();
  if (holds<float>(a)) {
    const auto* values = static_cast<const float*>(a.data());
    fusedrnn::bindings::ReleasedGil release;
    return pass(values, size);
  }
  if (holds<double>(a)) {
    const auto* values = static_cast<const double*>(a.data());
    fusedrnn::bindings::ReleasedGil release;
    return pass(values, size);
  }
  throw py::type_error("a: expected float32 or float64, got " + std::string(py::str(a.dtype())));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fusedrnn native core: fused recurrent layers (one layer, one direction per call)";

  py::dict cells;
  for (const fusedrnn::CellFacts& c : fusedrnn::kCells) {
    py::dict facts;
    facts["gates"] = c.gates;
    facts["saved"] = c.saved;
    facts["has_cell_state"] = c.has_cell_state;
    facts["projection"] = c.projection;
    cells[c.name] = facts;
  }
  m.attr("cells") = cells;  // name -> facts, in the core's order: the one list of cells

  py::class_<Tape>(m, "Tape", "What a training-mode layer_forward keeps for layer_backward.")
      .def_property_readonly("cell", [](const Tape& t) { return std::string(fusedrnn::cell_facts(t.cell).name); })
      .def_property_readonly("reverse", [](const Tape& t) { return t.reverse; })
      .def_property_readonly("backend", [](const Tape& t) { return name_of(t.backend, kBackendNames); })
      .def_property_readonly("has_bias", [](const Tape& t) { return !t.b_ih.is_none(); })
      .def_property_readonly("dtype", [](const Tape& t) { return t.x.dtype(); })
      .def_property_readonly("shape", [](const Tape& t) {
        return py::make_tuple(t.steps, t.batch, t.input, t.hidden);
      })
      .def_property_readonly("proj_size", [](const Tape& t) { return t.proj; },
                             "The projection size P (h has P features), 0 without a projection.")
      .def_property_readonly("inputs", [](const Tape& t) {
        py::dict inputs;
        inputs["x"] = t.x;
        inputs["weight_ih"] = t.w_ih;
        inputs["weight_hh"] = t.w_hh;
        for (const auto& [name, a] : {std::pair{"bias_ih", &t.b_ih}, {"bias_hh", &t.b_hh}, {"weight_hr", &t.w_hr}})
          if (!a->is_none()) inputs[name] = *a;
        return inputs;
      }, "The forward's arrays that backward reads again (referenced, not copied), by layer_forward's names.")
      .def_property_readonly("nbytes", [](const Tape& t) {
        Index n = t.hs.nbytes();
        for (const py::object* a : {&t.cs, &t.saved, &t.rs})
          if (!a->is_none()) n += py::cast<py::array>(*a).nbytes();
        return n;
      }, "Bytes of state recorded for backward (beyond the input and weights it references).");

  m.def("layer_forward", &layer_forward, py::arg("cell"), py::arg("x"), py::arg("weight_ih"),
        py::arg("weight_hh"), py::arg("bias_ih"), py::arg("bias_hh"), py::arg("h0"), py::arg("c0"),
        py::arg("lengths"), py::arg("reverse"), py::arg("training"), py::arg("out"),
        py::arg("cell_clip") = py::none(), py::arg("backend") = "cpu", py::arg("weight_hr") = py::none(),
        "Runs one direction of one layer. Returns (y, h_n, c_n, tape). backend: 'cpu', or "
        "'emulated_device' (the CUDA backend's device code run on the host, for tests); the tape's "
        "backward runs on the same backend. With weight_hr (proj_size, hidden_size), an LSTM's hidden "
        "state is projected: h = W_hr (o * tanh(c)), and h0, y and h_n have proj_size features.");

  m.def("layer_backward",
        [](const Tape& tape, const py::object& dy, const py::object& dh_n, const py::object& dc_n,
           const py::object& dx, const py::object& gw_ih, const py::object& gw_hh,
           const py::object& gb_ih, const py::object& gb_hh, bool accumulate_dx, const py::object& gw_hr,
           bool accumulate_grads, Index grad_groups) {
          if (holds<float>(tape.x))
            return backward_typed<float>(tape, dy, dh_n, dc_n, dx, gw_ih, gw_hh, gb_ih, gb_hh, accumulate_dx, gw_hr,
                                         accumulate_grads, grad_groups);
          return backward_typed<double>(tape, dy, dh_n, dc_n, dx, gw_ih, gw_hh, gb_ih, gb_hh, accumulate_dx, gw_hr,
                                        accumulate_grads, grad_groups);
        },
        py::arg("tape"), py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("dx"),
        py::arg("grad_weight_ih"), py::arg("grad_weight_hh"), py::arg("grad_bias_ih"),
        py::arg("grad_bias_hh"), py::arg("accumulate_dx") = true, py::arg("grad_weight_hr") = py::none(),
        py::arg("accumulate_grads") = true, py::arg("grad_groups") = 1,
        "Backpropagates one layer direction through time. Accumulates into the gradient buffers "
        "(accumulate_grads=False: writes them, their old values never read) and into dx "
        "(accumulate_dx=False: writes dx likewise); returns (dh0, dc0, dh_norm) with dh_norm[t] the norm "
        "of dL/dh_t. grad_groups=Q > 1: the batch's rows in Q consecutive groups, each "
        "group's weight and bias gradients apart, the buffers (Q, ...) C-contiguous.");

  m.def("layer_forward_directions", &layer_forward_directions, py::arg("cell"), py::arg("x"), py::arg("weights"),
        py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("training"), py::arg("out"),
        py::arg("cell_clip") = py::none(),
        "Runs both directions of one bidirectional layer on the CPU: weights, h0, c0 and out one per "
        "direction (the second reversed; weights as (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)). "
        "Where it pays (directions_together) their recurrences run at once, each on part of the thread "
        "team. Returns one (y, h_n, c_n, tape) per direction.");
  m.def("layer_backward_directions", &layer_backward_directions, py::arg("tapes"), py::arg("dy"), py::arg("dh_n"),
        py::arg("dc_n"), py::arg("dx"), py::arg("grads"), py::arg("accumulate_dx"),
        py::arg("accumulate_grads") = true, py::arg("grad_groups") = 1,
        "Backward of layer_forward_directions: tapes, dy, dh_n, dc_n and grads one per direction (grads "
        "as (grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_weight_hr)). Direction 0 "
        "writes dx (accumulate_dx=False) or adds into it, direction 1 adds into it; the gradients are "
        "added into, or written with accumulate_grads=False, per group of rows with grad_groups as in "
        "layer_backward. Returns one (dh0, dc0, dh_norm) per direction.");
  m.def("directions_together", [](const std::string& cell, Index batch, Index hidden, const py::object& dtype) {
    const fusedrnn::LayerShape shape{1, batch, hidden, hidden, {}, false, 0};
    return cpu::directions_together(parse_cell(cell), shape, float_item_size(dtype), cpu::team_size());
  }, py::arg("cell"), py::arg("batch"), py::arg("hidden"), py::arg("dtype") = "float32",
        "Whether both directions of a bidirectional layer of this cell, batch and hidden size run at once "
        "on the thread team as it is now (layer_forward_directions).");
  def_choice(m, "directions", kDirectionsNames, &cpu::set_directions_preference, &cpu::directions_preference,
             "Forces whether both directions of a bidirectional layer run at once, each on part of the "
             "thread team: 'together', 'apart', or 'auto' (together where a direction would share its "
             "recurrence by units, run on one thread or have few rows a thread, and each rank's recurrent weights "
             "still fit in half its L2: the default).");

  m.def("all_finite", [](const py::array& a) {
    return whole_array_pass(a, [](const auto* values, Index size) { return cpu::parallel_all_finite(values, size); });
  }, py::arg("a"), "True when a contiguous float32/float64 array holds no NaN or infinity.");
  m.def("fingerprint", [](const py::array& a) {
    return whole_array_pass(a, [](const auto* values, Index size) { return cpu::parallel_fingerprint(values, size); });
  }, py::arg("a"),
        "A fingerprint of a contiguous float32/float64 array's values and their places in memory order "
        "(a change to a value or its place changes it, but for a chance of about 2**-32): whether an "
        "array kept by reference was changed in place since.");

  m.def("add_into", [](py::array& into, const py::array& from) {
    const auto c_order = py::array::c_style;
    auto aligned = [](const py::array& a) { return reinterpret_cast<std::uintptr_t>(a.data()) % a.itemsize() == 0; };
    if (!(into.flags() & c_order) || !(from.flags() & c_order) || !aligned(into) || !aligned(from) ||
        !into.writeable())
      throw py::type_error("into, from: expected C-contiguous aligned arrays, into writeable");
    if (!into.dtype().attr("__eq__")(from.dtype()).cast<bool>() || into.size() != from.size())
      throw py::value_error("into, from: expected the same dtype and size");
    void* to = into.mutable_data();
    const void* added = from.data();
    const Index size = into.size();
    if (holds<float>(into)) {
      fusedrnn::bindings::ReleasedGil release;
      cpu::parallel_add_into(static_cast<float*>(to), static_cast<const float*>(added), size);
    } else if (holds<double>(into)) {
      fusedrnn::bindings::ReleasedGil release;
      cpu::parallel_add_into(static_cast<double*>(to), static_cast<const double*>(added), size);
    } else {
      throw py::type_error("into: expected float32 or float64, got " + std::string(py::str(into.dtype())));
    }
  }, py::arg("into"), py::arg("from"), "into += from for two C-contiguous arrays of one dtype and size.");

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("n: expected a thread count >= 1, got " + std::to_string(n));
    fusedrnn::bindings::ReleasedGil release;  // waits for a call in progress on another thread to finish
    cpu::set_team_size(n);
  }, py::arg("n"), "Sets the size of the thread team that runs all native compute.");
  m.def("get_num_threads", &cpu::team_size);
  m.attr("max_threads") = cpu::ThreadTeam::kMaxSize;
  m.def("default_num_threads", &cpu::default_thread_count,
        "The team size a process starts with: the CPUs it may run on, no more than its cgroups' CPU limit.");
  m.def("cgroup_cpu_limit", &cpu::cgroup_cpu_limit, py::arg("root") = "",
        "CPUs' worth of time the process's cgroups allow, rounded up; 0 where none is set. `root` prefixes "
        "/proc and /sys.");
  m.def("release_scratch", [] {
    fusedrnn::bindings::ReleasedGil release;  // waits for a call in progress on another thread to finish
    std::size_t freed = cpu::release_scratch();
#ifdef FUSEDRNN_WITH_XLA_FFI
    freed += fusedrnn::bindings::release_jax_call_scratch();
#endif
    return freed;
  }, "Frees the scratch layer calls keep between calls (one for the process, fusedrnn.jax's handlers' too); "
     "returns the bytes freed.");
  m.def("use_openmp_runtime", [](const std::string& library) {
    fusedrnn::bindings::ReleasedGil release;  // waits for a call in progress on another thread to finish
    try {
      cpu::use_openmp_runtime(library);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("library"),
        "Runs the thread team's jobs on the threads of the OpenMP runtime `library` (already loaded in "
        "this process, as the loader names it); \"\" goes back to the team's own workers.");
  m.def("openmp_runtime", &cpu::openmp_runtime,
        "The OpenMP runtime the team's jobs run on, \"\" for the team's own workers.");
  m.def("set_team_worker_delay", &cpu::set_team_worker_delay, py::arg("microseconds"),
        "Tests only: the team's workers pause this long after each job is posted, before acting on it.");
  m.def("layer_sizes", [](const std::string& cell, const std::vector<Index>& x_shape,
                          const std::vector<Index>& weight_hh_shape, const py::object& weight_hr_shape) {
    std::vector<Index> w_hr;
    if (!weight_hr_shape.is_none()) w_hr = weight_hr_shape.cast<std::vector<Index>>();
    const LayerSizes s = checked_layer_sizes(parse_cell(cell), x_shape, weight_hh_shape,
                                             weight_hr_shape.is_none() ? nullptr : &w_hr);
    return py::make_tuple(s.steps, s.batch, s.input, s.hidden, s.proj);
  }, py::arg("cell"), py::arg("x_shape"), py::arg("weight_hh_shape"), py::arg("weight_hr_shape") = py::none(),
        "(steps, batch, input, hidden, proj) of a layer from the shapes of x, weight_hh and weight_hr (None: "
        "no projection), checked as layer_forward checks them (the CUDA backend's calls use it).");
  m.def("layer_split", [](const std::string& cell, Index batch, Index hidden, const py::object& dtype,
                          Index proj_size) {
    const CellKind kind = parse_cell(cell);
    if (batch < 1) throw py::value_error("batch: expected an int >= 1, got " + std::to_string(batch));
    if (hidden < 1) throw py::value_error("hidden: expected an int >= 1, got " + std::to_string(hidden));
    if (proj_size < 0 || (proj_size > 0 && proj_size >= hidden))
      throw py::value_error("proj_size: expected 0 (none) or 0 < proj_size < hidden, got " +
                            std::to_string(proj_size));
    if (proj_size > 0 && !fusedrnn::cell_facts(kind).projection)
      throw py::value_error("proj_size: only an LSTM takes a projection");
    const cpu::LayerSplit split =
        cpu::layer_split(kind, batch, hidden, float_item_size(dtype), cpu::team_size(), proj_size);
    return py::make_tuple(split.ranks, split.by_rows ? "rows" : "units");
  }, py::arg("cell"), py::arg("batch"), py::arg("hidden"), py::arg("dtype") = "float32",
        py::arg("proj_size") = 0,
        "How a layer of this cell, batch, hidden size, dtype and projection size shares its recurrence "
        "across the thread team: (threads, 'rows' or 'units').");
  def_choice(m, "layer_split", kSplitNames, &cpu::set_split_preference, &cpu::split_preference,
             "Forces how layers share their recurrence across the thread team wherever they are large "
             "enough to share: 'rows', 'units', or 'auto' (by the layer's size, the default).");
  m.def("l2_cache_bytes", &cpu::l2_cache_bytes,
        "The per-core L2 size that decides whether layers share batch rows or hidden units.");
  def_choice(m, "input_projection", kProjectionNames, &cpu::set_projection_preference,
             &cpu::projection_preference,
             "Forces where forward projects x onto W_ih: 'in_steps' (each rank its own rows or units, "
             "inside each step), 'up_front' (one GEMM before the sequence), 'up_front_by_rank' (before "
             "the sequence, each rank its own rows or units with the packed kernel), or 'auto' (by the "
             "layer's split and size, the default).");
  m.def("set_inference_chunk_bytes", &cpu::set_inference_chunk_bytes, py::arg("bytes"),
        "The most bytes of scratch an inference call's steps take before it runs in chunks of steps, with "
        "the results of the same call in training mode bit for bit (0: the default, 64 MiB).");
  m.def("get_inference_chunk_bytes", &cpu::inference_chunk_bytes, "The bound set by set_inference_chunk_bytes.");
  m.def("input_projection_choice", [](const std::string& cell, Index steps, Index batch, Index input, Index hidden,
                                      const py::object& dtype) {
    const fusedrnn::LayerShape shape{steps, batch, input, hidden, {}, false, 0};
    return name_of(cpu::input_projection_choice(parse_cell(cell), shape, float_item_size(dtype), cpu::team_size()),
                   kProjectionNames);
  }, py::arg("cell"), py::arg("steps"), py::arg("batch"), py::arg("input"), py::arg("hidden"),
        py::arg("dtype") = "float32",
        "Where forward projects x for one direction of this cell and shape on the thread team as it is "
        "now: 'in_steps', 'up_front' or 'up_front_by_rank' (set_input_projection).");
  def_choice(m, "weight_grad_split", kWeightGradNames, &cpu::set_weight_grad_preference,
             &cpu::weight_grad_preference,
             "Forces how backward splits the weight gradients across the team: 'rows' (each thread its "
             "share of all steps' rows into a partial, partials added after), 'gate_rows' (each thread "
             "its gate rows over all steps), or 'auto' (by the layer's size, the default).");
  m.def("aligned_empty", [](const std::vector<Index>& shape, const py::object& dtype) -> py::array {
    if (float_item_size(dtype) == sizeof(float)) return aligned_array<float>(shape);
    return aligned_array<double>(shape);
  }, py::arg("shape"), py::arg("dtype"),
        "An uninitialised C-contiguous array whose data starts on a 64-byte boundary (layer outputs the "
        "thread team writes by ranges of units).");
  m.def("tape_layout", [](const std::string& cell, Index steps, Index batch, Index hidden, bool training,
                          Index proj_size) {
    const fusedrnn::LayerShape shape{steps, batch, 1, hidden, {}, false, proj_size};
    const fusedrnn::TapeLayout l = fusedrnn::tape_layout(parse_cell(cell), shape, training);
    py::dict shapes;
    const std::pair<const char*, const fusedrnn::TapeArray*> arrays[] = {
        {"hs", &l.hs}, {"cs", &l.cs}, {"saved", &l.saved}, {"rs", &l.rs}};
    for (const auto& [name, a] : arrays)
      if (a->values() > 0) shapes[name] = py::make_tuple(a->leading, a->batch, a->width);
    return shapes;
  }, py::arg("cell"), py::arg("steps"), py::arg("batch"), py::arg("hidden"), py::arg("training"),
        py::arg("proj_size") = 0,
        "The shapes of one layer direction's tape arrays (layer.h), for callers that allocate them "
        "themselves: a dict of (leading, batch, width) for each of hs, cs, saved and rs the call has (cs "
        "with a cell state, saved in training, rs with a projection), the batch always in the middle.");
#ifdef FUSEDRNN_WITH_XLA_FFI
  fusedrnn::bindings::def_jax_ffi(m);
#endif
  m.attr("__version__") = FUSEDRNN_VERSION;
  m.def("blas_config", &cpu::blas::config, "OpenBLAS's build string: version, target, threading.");
  m.def("blas_name", &cpu::blas::name, "The BLAS package and version this build compiled against.");
  m.def("blas_library", &cpu::blas::library_path,
        "The file the BLAS functions are taken from (RuntimeError where it cannot be loaded).");
  {
    py::tuple paths(std::size(kRecurrencePathNames));
    for (std::size_t i = 0; i < std::size(kRecurrencePathNames); ++i) paths[i] = kRecurrencePathNames[i].name;
    m.attr("recurrence_paths") = paths;  // the CUDA backend's, for the Python side's checks
  }
  def_choice(m, "emulated_recurrence_path", kRecurrencePathNames, &set_emulated_recurrence_path,
             &get_emulated_recurrence_path,
             "Tests only: how the emulated device backend runs the recurrence, forward and backward: 'per_step' "
             "(a GEMM and a pointwise kernel a step), 'persistent' (one cooperative kernel, where it fits), or "
             "'auto' (by the layer's size, the default).");
  m.def("emulated_cooperative_launches", &gpu::emulated::cooperative_launches,
        "Tests only: cooperative (grid-barrier) kernel launches the emulated device backend has run.");
  m.def("emulated_persistent_shapes", [](const std::string& cell, Index batch, Index hidden, const py::object& dtype) {
    fusedrnn::LayerShape shape;
    shape.steps = 1;
    shape.batch = batch;
    shape.input = 1;
    shape.hidden = hidden;
    const gpu::RecurrencePath path = get_emulated_recurrence_path();
    const gpu::emulated::PersistentShapes shapes =
        float_item_size(dtype) == sizeof(float) ? gpu::emulated::persistent_shapes<float>(parse_cell(cell), shape, path)
                                                : gpu::emulated::persistent_shapes<double>(parse_cell(cell), shape, path);
    const auto as_dict = [](const gpu::PersistentShape& p) {
      return py::dict(py::arg("blocks") = p.blocks, py::arg("units") = p.units, py::arg("parts") = p.parts,
                      py::arg("shared_bytes") = p.shared_bytes);
    };
    return py::make_tuple(as_dict(shapes.forward), as_dict(shapes.backward));
  }, py::arg("cell"), py::arg("batch"), py::arg("hidden"), py::arg("dtype") = "float32",
        "Tests only: the persistent (forward, backward) kernels' shapes on the emulated device under the "
        "emulated recurrence path, each {blocks, units, parts, shared_bytes}; blocks 0: runs per step.");
  m.def("simd_level", [] { return std::string(cpu::active_kernels().name); },
        "The SIMD level the recurrence kernels run at.");
  m.def("set_simd_level", [](const std::string& name) {
    try {
      cpu::set_simd_level(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("level"));
  m.def("simd_levels_supported", &cpu::supported_simd_levels,
        "Levels compiled in that this CPU can run, lowest first.");
  m.def("simd_levels_compiled", &cpu::compiled_simd_levels);
}
