// XLA FFI handlers for fusedrnn.jax: one recurrent layer (every direction) forward and backward, called
// from inside XLA programs. Like module.cpp for NumPy, they describe XLA's buffers as the views of the
// neutral layer API (fusedrnn/layer.h) and call the CPU backend; no numerics here.
//
// The XLA FFI headers are header-only (the API table arrives with each call), so nothing here links
// against jaxlib and `import fusedrnn` never needs it. The handlers live in _core, beside the NumPy
// bindings, so that both run on the one thread team of the process.
//
// Buffers (D directions; every buffer dense, row-major, as XLA passes them):
//   forward  args  x (T, B, I), h0 (D, B, H), c0 (D, B, H), lengths (B) int32/int64,
//                  then per direction weight_ih (G*H, I), weight_hh (G*H, H) [, bias_ih, bias_hh (G*H)]
//            rets  y (T, B, D*H), h_n (D, B, H), c_n (D, B, H),
//                  hs (D, slots*B*H), cs (D, slots*B*H), saved (D, T*B*S*H) (tape_layout(); training only)
//   backward args  x, lengths, hs, cs, saved (as forward had them), dy (T, B, D*H), dh_n, dc_n (D, B, H),
//                  then the weights as forward had them
//            rets  dx (T, B, I), dh0, dc0 (D, B, H), then one gradient per weight, in the weights' order
// An absent optional buffer (h0, c0, lengths; c_n, cs, dc0 for a cell without a cell state; the tape in
// inference) has no elements. Under jax.vmap (vmap_method="expand_dims") every buffer gains the same
// number of leading dimensions, each either the mapped size or 1 (shared by every mapped element); the
// handlers run the layer once per mapped element, except inference with shared weights, which folds
// the mapped elements into the batch (forward_folded). Training cannot fold: each mapped element
// needs its own weight gradients.
//
// Run-time checks that shapes cannot express (lengths in [1, T], NaN or infinity in the inputs) return an
// INVALID_ARGUMENT error naming the argument, which JAX raises as an exception from the call. The
// finiteness checks are asked for per call: the sequence (x forward, dy backward) where it is the
// caller's (the first layer's x, the last layer's dy), the states (h0, c0, dh_n, dc_n) in every layer.
#include "jax_ffi.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fusedrnn/cells.h"
#include "fusedrnn/cpu/backend.h"
#include "fusedrnn/cpu/passes.h"
#include "fusedrnn/layer.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace py = pybind11;
namespace cpu = fusedrnn::cpu;
using fusedrnn::CellKind;
using fusedrnn::Index;

namespace {

ffi::Error parse_cell(std::string_view name, CellKind& cell) {
  for (const fusedrnn::CellFacts& c : fusedrnn::kCells)
    if (name == c.name) {
      cell = c.kind;
      return ffi::Error::Success();
    }
  return ffi::Error::InvalidArgument("cell: unknown cell '" + std::string(name) + "'");
}

// The mapped (vmap) dimensions of a call: the leading dimensions of its first result.
struct Batch {
  std::vector<Index> dims;
  Index count = 1;
};

Batch batch_of(const ffi::AnyBuffer& first_result, int base_rank) {
  Batch b;
  const auto dims = first_result.dimensions();
  for (std::size_t i = 0; i + base_rank < dims.size(); ++i) {
    b.dims.push_back(dims[i]);
    b.count *= dims[i];
  }
  return b;
}

// One buffer of a call: its element pointer at mapped element n, and its own (unmapped) dimensions.
template <typename T>
class Batched {
 public:
  Batched(const ffi::AnyBuffer& buffer, const Batch& batch)
      : data_(static_cast<T*>(buffer.untyped_data())), batch_(&batch) {
    const auto dims = buffer.dimensions();
    const std::size_t lead = std::min(batch.dims.size(), dims.size());
    lead_.assign(dims.begin(), dims.begin() + lead);
    own_.assign(dims.begin() + lead, dims.end());
    empty_ = buffer.element_count() == 0;
    elements_ = 1;
    for (Index d : own_) elements_ *= d;
  }

  bool empty() const { return empty_; }
  // Whether every mapped element shares this buffer's data (unmapped under vmap, or no vmap at all).
  bool shared() const {
    for (Index d : lead_)
      if (d != 1) return false;
    return true;
  }
  Index dim(std::size_t i) const { return own_[i]; }
  std::size_t rank() const { return own_.size(); }
  Index elements() const { return elements_; }  // of one mapped element

  // Whether every leading dimension is 1 or the batch's (expand_dims), so at() is defined.
  bool well_batched() const {
    if (lead_.size() != batch_->dims.size()) return false;
    for (std::size_t i = 0; i < lead_.size(); ++i)
      if (lead_[i] != 1 && lead_[i] != batch_->dims[i]) return false;
    return true;
  }

  // Mapped element n's data (null for an empty buffer); a dimension of 1 shares its data across n.
  T* at(Index n) const {
    if (empty_) return nullptr;
    Index offset = 0, stride = elements_;
    for (std::size_t i = lead_.size(); i-- > 0;) {
      const Index index = n % batch_->dims[i];
      n /= batch_->dims[i];
      if (lead_[i] != 1) offset += index * stride;
      stride *= lead_[i];
    }
    return data_ + offset;
  }

 private:
  T* data_;
  const Batch* batch_;
  std::vector<Index> lead_, own_;
  Index elements_ = 1;
  bool empty_ = false;
};

ffi::Error shape_error(const char* name, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(name) + ": " + what);
}

template <typename T>
ffi::Error expect(const Batched<T>& b, const char* name, std::initializer_list<Index> shape) {
  if (!b.well_batched()) return shape_error(name, "mapped dimensions do not match the call's");
  if (b.rank() != shape.size()) return shape_error(name, "unexpected rank");
  std::size_t i = 0;
  for (Index d : shape)
    if (b.dim(i++) != d) return shape_error(name, "unexpected shape");
  return ffi::Error::Success();
}

// An optional buffer: empty, or of the given shape.
template <typename T>
ffi::Error expect_optional(const Batched<T>& b, const char* name, std::initializer_list<Index> shape) {
  return b.empty() ? ffi::Error::Success() : expect(b, name, shape);
}

template <typename T>
ffi::Error check_finite(const T* data, Index count, const char* name) {
  if (data != nullptr && !cpu::parallel_all_finite(data, count))
    return ffi::Error::InvalidArgument(std::string(name) + ": contains NaN or infinite values");
  return ffi::Error::Success();
}

// The lengths of mapped element n as int64, checked to lie in [1, T]; empty when absent.
ffi::Error read_lengths(const ffi::AnyBuffer& buffer, const Batch& batch, Index n, Index steps, Index rows,
                        std::vector<Index>& out) {
  out.clear();
  if (buffer.element_count() == 0) return ffi::Error::Success();
  out.resize(static_cast<std::size_t>(rows));
  if (buffer.element_type() == ffi::DataType::S32) {
    Batched<const std::int32_t> lengths(buffer, batch);
    if (ffi::Error e = expect(lengths, "lengths", {rows}); e.failure()) return e;
    std::copy(lengths.at(n), lengths.at(n) + rows, out.begin());
  } else if (buffer.element_type() == ffi::DataType::S64) {
    Batched<const std::int64_t> lengths(buffer, batch);
    if (ffi::Error e = expect(lengths, "lengths", {rows}); e.failure()) return e;
    std::copy(lengths.at(n), lengths.at(n) + rows, out.begin());
  } else {
    return ffi::Error::InvalidArgument("lengths: expected int32 or int64");
  }
  for (Index b = 0; b < rows; ++b)
    if (out[b] < 1 || out[b] > steps)
      return ffi::Error::InvalidArgument("lengths: each length must be in [1, " + std::to_string(steps) +
                                         "] (T), got " + std::to_string(out[b]) + " at index " +
                                         std::to_string(b));
  return ffi::Error::Success();
}

// The weights that follow the fixed arguments: per direction weight_ih, weight_hh [, bias_ih, bias_hh].
template <typename T>
ffi::Error weights_of(const ffi::RemainingArgs& args, Index directions, const Batch& batch, Index gh, Index input,
                      Index hidden, std::vector<Batched<const T>>& out) {
  const std::size_t count = args.size();
  if (count != static_cast<std::size_t>(2 * directions) && count != static_cast<std::size_t>(4 * directions))
    return ffi::Error::InvalidArgument("weights: expected 2 or 4 arrays per direction");
  for (std::size_t i = 0; i < count; ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    if (buffer->element_type() != (sizeof(T) == 4 ? ffi::DataType::F32 : ffi::DataType::F64))
      return ffi::Error::InvalidArgument("weights: expected the dtype of x");
    out.emplace_back(*buffer, batch);
  }
  const std::size_t per = count / static_cast<std::size_t>(directions);
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t k = i % per;
    const char* names[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
    ffi::Error e = k == 0   ? expect(out[i], names[k], {gh, input})
                   : k == 1 ? expect(out[i], names[k], {gh, hidden})
                            : expect(out[i], names[k], {gh});
    if (e.failure()) return e;
  }
  return ffi::Error::Success();
}

// The views of direction d's weights at mapped element n; `per` arrays per direction.
template <typename T>
fusedrnn::LayerWeights<T> weights_at(const std::vector<Batched<const T>>& w, std::size_t per, Index d, Index n,
                                     Index input, Index hidden) {
  const std::size_t i = per * static_cast<std::size_t>(d);
  fusedrnn::LayerWeights<T> lw;
  lw.w_ih = {w[i].at(n), {input, 1}};
  lw.w_hh = {w[i + 1].at(n), {hidden, 1}};
  if (per == 4) {
    lw.b_ih = {w[i + 2].at(n), 1};
    lw.b_hh = {w[i + 3].at(n), 1};
  }
  return lw;
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

// Inference under vmap with weights shared by every mapped element: the N mapped elements' rows are
// one layer call of N*B rows (their inputs gathered into one (T, N*B, I) array, the outputs scattered
// back), since a step's recurrent GEMM over N*B rows costs far less than N calls of B rows.
template <typename T>
ffi::Error forward_folded(CellKind cell, Index D, bool check_sequence, bool check_states, T cell_clip,
                          const Batch& batch,
                          const Batched<const T>& x, const Batched<const T>& h0, const Batched<const T>& c0,
                          const ffi::AnyBuffer& lengths_buf, const std::vector<Batched<const T>>& w, std::size_t per,
                          const Batched<T>& y, const Batched<T>& h_n, const Batched<T>& c_n) {
  const Index steps = x.dim(0), rows = x.dim(1), input = x.dim(2), hidden = h_n.dim(2);
  const Index N = batch.count, all = N * rows, DH = D * hidden;
  const bool has_c = !c_n.empty();
  AlignedScratch<T> xs(steps * all * input), ys(steps * all * DH), h0s(h0.empty() ? 0 : D * all * hidden),
      c0s(c0.empty() ? 0 : D * all * hidden), hns(D * all * hidden), cns(has_c ? D * all * hidden : 0);
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
    if (ffi::Error e = read_lengths(lengths_buf, batch, n, steps, rows, lengths); e.failure()) return e;
    if (!lengths.empty()) {
      all_lengths.resize(static_cast<std::size_t>(all), steps);
      std::copy(lengths.begin(), lengths.end(), all_lengths.begin() + n * rows);
    }
    for (ffi::Error e : {check_finite(check_sequence ? x.at(n) : nullptr, x.elements(), "x"),
                         check_finite(check_states ? h0.at(n) : nullptr, h0.elements(), "h0"),
                         check_finite(check_states ? c0.at(n) : nullptr, c0.elements(), "c0")})
      if (e.failure()) return e;
    gather(x.at(n), xs.data, steps, input, n);
    if (!h0.empty()) gather(h0.at(n), h0s.data, D, hidden, n);
    if (!c0.empty()) gather(c0.at(n), c0s.data, D, hidden, n);
  }
  fusedrnn::LayerShape shape{steps, all, input, hidden, {}, false};
  const fusedrnn::TapeLayout layout = fusedrnn::tape_layout(cell, shape, false);
  AlignedScratch<T> hs(D * layout.state_values), cs(has_c ? D * layout.state_values : 0);
  for (Index d = 0; d < D; ++d) {
    const Index state = d * all * hidden;
    fusedrnn::LayerForwardParams<T> p;
    p.cell = cell;
    p.shape = {steps, all, input, hidden, {all_lengths.empty() ? nullptr : all_lengths.data(), 1}, d == 1};
    p.weights = weights_at(w, per, d, 0, input, hidden);
    p.x = {xs.data, {all * input, input, 1}};
    if (!h0.empty()) p.h0 = {h0s.data + state, {hidden, 1}};
    if (!c0.empty()) p.c0 = {c0s.data + state, {hidden, 1}};
    p.y = {ys.data + d * hidden, {all * DH, DH, 1}};
    p.h_n = {hns.data + state, {hidden, 1}};
    if (has_c) p.c_n = {cns.data + state, {hidden, 1}};
    p.tape = {hs.data + d * layout.state_values, has_c ? cs.data + d * layout.state_values : nullptr, nullptr, false};
    p.cell_clip = cell_clip;
    cpu::layer_forward<T>(p);
  }
  for (Index n = 0; n < N; ++n) {
    scatter(ys.data, y.at(n), steps, DH, n);
    scatter(hns.data, h_n.at(n), D, hidden, n);
    if (has_c) scatter(cns.data, c_n.at(n), D, hidden, n);
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error forward_typed(CellKind cell, Index directions, bool training, bool check_sequence, bool check_states,
                         double cell_clip,
                         ffi::AnyBuffer x_buf, ffi::AnyBuffer h0_buf, ffi::AnyBuffer c0_buf,
                         ffi::AnyBuffer lengths_buf, const ffi::RemainingArgs& args, ffi::AnyBuffer y_buf,
                         ffi::AnyBuffer h_n_buf, ffi::AnyBuffer c_n_buf, ffi::AnyBuffer hs_buf,
                         ffi::AnyBuffer cs_buf, ffi::AnyBuffer saved_buf) {
  const Batch batch = batch_of(y_buf, 3);
  const Batched<const T> x(x_buf, batch), h0(h0_buf, batch), c0(c0_buf, batch);
  const Batched<T> y(y_buf, batch), h_n(h_n_buf, batch), c_n(c_n_buf, batch), hs(hs_buf, batch),
      cs(cs_buf, batch), saved(saved_buf, batch);
  if (x.rank() != 3) return shape_error("x", "expected (T, B, I)");
  const Index steps = x.dim(0), rows = x.dim(1), input = x.dim(2);
  const Index hidden = y.dim(2) / directions;
  const fusedrnn::CellFacts& facts = fusedrnn::cell_facts(cell);
  const Index gh = facts.gates * hidden;
  const Index D = directions;
  for (ffi::Error e : {expect(x, "x", {steps, rows, input}), expect(y, "y", {steps, rows, D * hidden}),
                       expect_optional(h0, "h0", {D, rows, hidden}), expect_optional(c0, "c0", {D, rows, hidden}),
                       expect(h_n, "h_n", {D, rows, hidden}), expect_optional(c_n, "c_n", {D, rows, hidden})})
    if (e.failure()) return e;
  if (facts.has_cell_state == c_n.empty()) return shape_error("c_n", "expected one for a cell with a cell state");
  std::vector<Batched<const T>> w;
  if (ffi::Error e = weights_of<T>(args, D, batch, gh, input, hidden, w); e.failure()) return e;
  const std::size_t per = w.size() / static_cast<std::size_t>(D);

  fusedrnn::LayerShape shape{steps, rows, input, hidden, {}, false};
  const fusedrnn::TapeLayout layout = fusedrnn::tape_layout(cell, shape, training);
  // Inference keeps its two state slots in scratch of the call; training writes the tape results.
  AlignedScratch<T> scratch_hs(training ? 0 : D * layout.state_values);
  AlignedScratch<T> scratch_cs(training || !layout.has_cell_state ? 0 : D * layout.state_values);
  if (training) {
    for (ffi::Error e : {expect(hs, "hs", {D, layout.state_values}),
                         expect_optional(cs, "cs", {D, layout.state_values}),
                         expect_optional(saved, "saved", {D, layout.saved_values})})
      if (e.failure()) return e;
    if (layout.has_cell_state == cs.empty() || (layout.saved_values == 0) != saved.empty())
      return shape_error("tape", "does not match tape_layout()");
  }

  const bool shared_weights = std::all_of(w.begin(), w.end(), [](const Batched<const T>& b) { return b.shared(); });
  if (!training && batch.count > 1 && shared_weights)
    return forward_folded<T>(cell, D, check_sequence, check_states, static_cast<T>(cell_clip), batch, x, h0, c0,
                             lengths_buf, w, per,
                             y, h_n, c_n);

  std::vector<Index> lengths;
  for (Index n = 0; n < batch.count; ++n) {
    if (ffi::Error e = read_lengths(lengths_buf, batch, n, steps, rows, lengths); e.failure()) return e;
    for (ffi::Error e : {check_finite(check_sequence ? x.at(n) : nullptr, x.elements(), "x"),
                         check_finite(check_states ? h0.at(n) : nullptr, h0.elements(), "h0"),
                         check_finite(check_states ? c0.at(n) : nullptr, c0.elements(), "c0")})
      if (e.failure()) return e;
    for (Index d = 0; d < D; ++d) {
      const Index state = d * rows * hidden;
      fusedrnn::LayerForwardParams<T> p;
      p.cell = cell;
      p.shape = {steps, rows, input, hidden, {lengths.empty() ? nullptr : lengths.data(), 1}, d == 1};
      p.weights = weights_at(w, per, d, n, input, hidden);
      p.x = {x.at(n), {rows * input, input, 1}};
      if (!h0.empty()) p.h0 = {h0.at(n) + state, {hidden, 1}};
      if (!c0.empty()) p.c0 = {c0.at(n) + state, {hidden, 1}};
      p.y = {y.at(n) + d * hidden, {rows * D * hidden, D * hidden, 1}};
      p.h_n = {h_n.at(n) + state, {hidden, 1}};
      if (facts.has_cell_state) p.c_n = {c_n.at(n) + state, {hidden, 1}};
      if (training) {
        p.tape = {hs.at(n) + d * layout.state_values,
                  layout.has_cell_state ? cs.at(n) + d * layout.state_values : nullptr,
                  layout.saved_values ? saved.at(n) + d * layout.saved_values : nullptr, true};
      } else {
        p.tape = {scratch_hs.data + d * layout.state_values,
                  layout.has_cell_state ? scratch_cs.data + d * layout.state_values : nullptr, nullptr, false};
      }
      p.cell_clip = static_cast<T>(cell_clip);
      cpu::layer_forward<T>(p);
    }
  }
  return ffi::Error::Success();
}

ffi::Error layer_forward(std::string_view cell_name, std::int64_t directions, bool training, bool check_sequence,
                         bool check_states, double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                         ffi::AnyBuffer lengths, ffi::RemainingArgs weights, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> h_n, ffi::Result<ffi::AnyBuffer> c_n,
                         ffi::Result<ffi::AnyBuffer> hs, ffi::Result<ffi::AnyBuffer> cs,
                         ffi::Result<ffi::AnyBuffer> saved) {
  CellKind cell;
  if (ffi::Error e = parse_cell(cell_name, cell); e.failure()) return e;
  if (directions != 1 && directions != 2) return ffi::Error::InvalidArgument("directions: expected 1 or 2");
  if (std::isnan(cell_clip) || cell_clip <= 0) return ffi::Error::InvalidArgument("cell_clip: expected > 0");
  // An exception must not cross into XLA (a C boundary): the core's become an error of the call.
  try {
    if (x.element_type() == ffi::DataType::F32)
      return forward_typed<float>(cell, directions, training, check_sequence, check_states, cell_clip, x, h0, c0,
                                  lengths,
                                  weights, *y, *h_n, *c_n, *hs, *cs, *saved);
    if (x.element_type() == ffi::DataType::F64)
      return forward_typed<double>(cell, directions, training, check_sequence, check_states, cell_clip, x, h0, c0,
                                   lengths,
                                   weights, *y, *h_n, *c_n, *hs, *cs, *saved);
    return ffi::Error::InvalidArgument("x: expected float32 or float64");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("fusedrnn layer forward: ") + e.what());
  }
}

template <typename T>
ffi::Error backward_typed(CellKind cell, Index directions, bool check_sequence, bool check_states, double cell_clip,
                          ffi::AnyBuffer x_buf, ffi::AnyBuffer lengths_buf, ffi::AnyBuffer hs_buf,
                          ffi::AnyBuffer cs_buf, ffi::AnyBuffer saved_buf, ffi::AnyBuffer dy_buf,
                          ffi::AnyBuffer dh_n_buf, ffi::AnyBuffer dc_n_buf, const ffi::RemainingArgs& args,
                          ffi::AnyBuffer dx_buf, ffi::AnyBuffer dh0_buf, ffi::AnyBuffer dc0_buf,
                          const ffi::RemainingRets& rets) {
  const Batch batch = batch_of(dx_buf, 3);
  const Batched<const T> x(x_buf, batch), hs(hs_buf, batch), cs(cs_buf, batch), saved(saved_buf, batch),
      dy(dy_buf, batch), dh_n(dh_n_buf, batch), dc_n(dc_n_buf, batch);
  const Batched<T> dx(dx_buf, batch), dh0(dh0_buf, batch), dc0(dc0_buf, batch);
  if (x.rank() != 3 || dy.rank() != 3) return shape_error("x", "expected (T, B, I)");
  const Index steps = x.dim(0), rows = x.dim(1), input = x.dim(2);
  const Index D = directions, hidden = dy.dim(2) / D;
  const fusedrnn::CellFacts& facts = fusedrnn::cell_facts(cell);
  const Index gh = facts.gates * hidden;
  for (ffi::Error e : {expect(x, "x", {steps, rows, input}), expect(dx, "dx", {steps, rows, input}),
                       expect(dy, "dy", {steps, rows, D * hidden}), expect(dh_n, "dh_n", {D, rows, hidden}),
                       expect_optional(dc_n, "dc_n", {D, rows, hidden}), expect(dh0, "dh0", {D, rows, hidden}),
                       expect_optional(dc0, "dc0", {D, rows, hidden})})
    if (e.failure()) return e;
  if (facts.has_cell_state == dc0.empty()) return shape_error("dc0", "expected one for a cell with a cell state");
  std::vector<Batched<const T>> w;
  if (ffi::Error e = weights_of<T>(args, D, batch, gh, input, hidden, w); e.failure()) return e;
  const std::size_t per = w.size() / static_cast<std::size_t>(D);
  std::vector<Batched<T>> grads;
  for (std::size_t i = 0; i < w.size(); ++i) {
    ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> g = rets.get<ffi::AnyBuffer>(i);
    if (g.has_error()) return g.error();
    grads.emplace_back(**g, batch);
    if (grads.back().elements() != w[i].elements() || !grads.back().well_batched())
      return shape_error("weight gradients", "expected one per weight, of its shape");
  }
  fusedrnn::LayerShape shape{steps, rows, input, hidden, {}, false};
  const fusedrnn::TapeLayout layout = fusedrnn::tape_layout(cell, shape, true);
  for (ffi::Error e : {expect(hs, "hs", {D, layout.state_values}), expect_optional(cs, "cs", {D, layout.state_values}),
                       expect_optional(saved, "saved", {D, layout.saved_values})})
    if (e.failure()) return e;
  if (layout.has_cell_state == cs.empty() || (layout.saved_values == 0) != saved.empty())
    return shape_error("tape", "does not match tape_layout()");

  std::vector<Index> lengths;
  for (Index n = 0; n < batch.count; ++n) {
    if (ffi::Error e = read_lengths(lengths_buf, batch, n, steps, rows, lengths); e.failure()) return e;
    for (ffi::Error e : {check_finite(check_sequence ? dy.at(n) : nullptr, dy.elements(), "dy"),
                         check_finite(check_states ? dh_n.at(n) : nullptr, dh_n.elements(), "dh_n"),
                         check_finite(check_states ? dc_n.at(n) : nullptr, dc_n.elements(), "dc_n")})
      if (e.failure()) return e;
    for (const Batched<T>& g : grads) std::memset(g.at(n), 0, sizeof(T) * static_cast<std::size_t>(g.elements()));
    for (Index d = 0; d < D; ++d) {
      const Index state = d * rows * hidden;
      const std::size_t i = per * static_cast<std::size_t>(d);
      fusedrnn::LayerBackwardParams<T> p;
      p.cell = cell;
      p.shape = {steps, rows, input, hidden, {lengths.empty() ? nullptr : lengths.data(), 1}, d == 1};
      p.weights = weights_at(w, per, d, n, input, hidden);
      p.x = {x.at(n), {rows * input, input, 1}};
      p.tape = {const_cast<T*>(hs.at(n)) + d * layout.state_values,
                layout.has_cell_state ? const_cast<T*>(cs.at(n)) + d * layout.state_values : nullptr,
                layout.saved_values ? const_cast<T*>(saved.at(n)) + d * layout.saved_values : nullptr, true};
      p.dy = {dy.at(n) + d * hidden, {rows * D * hidden, D * hidden, 1}};
      p.dh_n = {dh_n.at(n) + state, {hidden, 1}};
      if (!dc_n.empty()) p.dc_n = {dc_n.at(n) + state, {hidden, 1}};
      p.dx = {dx.at(n), {rows * input, input, 1}};
      p.accumulate_dx = d > 0;  // the first direction writes dx, the second adds into it
      p.dh0 = {dh0.at(n) + state, {hidden, 1}};
      if (facts.has_cell_state) p.dc0 = {dc0.at(n) + state, {hidden, 1}};
      p.dw_ih = {grads[i].at(n), {input, 1}};
      p.dw_hh = {grads[i + 1].at(n), {hidden, 1}};
      if (per == 4) {
        p.db_ih = {grads[i + 2].at(n), 1};
        p.db_hh = {grads[i + 3].at(n), 1};
      }
      p.cell_clip = static_cast<T>(cell_clip);
      cpu::layer_backward<T>(p);
    }
  }
  return ffi::Error::Success();
}

ffi::Error layer_backward(std::string_view cell_name, std::int64_t directions, bool check_sequence, bool check_states,
                          double cell_clip, ffi::AnyBuffer x, ffi::AnyBuffer lengths, ffi::AnyBuffer hs,
                          ffi::AnyBuffer cs, ffi::AnyBuffer saved, ffi::AnyBuffer dy, ffi::AnyBuffer dh_n,
                          ffi::AnyBuffer dc_n, ffi::RemainingArgs weights, ffi::Result<ffi::AnyBuffer> dx,
                          ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::AnyBuffer> dc0,
                          ffi::RemainingRets weight_grads) {
  CellKind cell;
  if (ffi::Error e = parse_cell(cell_name, cell); e.failure()) return e;
  if (directions != 1 && directions != 2) return ffi::Error::InvalidArgument("directions: expected 1 or 2");
  try {
    if (x.element_type() == ffi::DataType::F32)
      return backward_typed<float>(cell, directions, check_sequence, check_states, cell_clip, x, lengths, hs, cs,
                                   saved, dy,
                                   dh_n, dc_n, weights, *dx, *dh0, *dc0, weight_grads);
    if (x.element_type() == ffi::DataType::F64)
      return backward_typed<double>(cell, directions, check_sequence, check_states, cell_clip, x, lengths, hs, cs,
                                    saved, dy,
                                    dh_n, dc_n, weights, *dx, *dh0, *dc0, weight_grads);
    return ffi::Error::InvalidArgument("x: expected float32 or float64");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("fusedrnn layer backward: ") + e.what());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerForward, layer_forward,
                              ffi::Ffi::Bind()
                                  .Attr<std::string_view>("cell")
                                  .Attr<std::int64_t>("directions")
                                  .Attr<bool>("training")
                                  .Attr<bool>("check_sequence")
                                  .Attr<bool>("check_states")
                                  .Attr<double>("cell_clip")
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // c0
                                  .Arg<ffi::AnyBuffer>()  // lengths
                                  .RemainingArgs()        // weights
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // h_n
                                  .Ret<ffi::AnyBuffer>()  // c_n
                                  .Ret<ffi::AnyBuffer>()  // hs
                                  .Ret<ffi::AnyBuffer>()  // cs
                                  .Ret<ffi::AnyBuffer>()  // saved
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedrnnLayerBackward, layer_backward,
                              ffi::Ffi::Bind()
                                  .Attr<std::string_view>("cell")
                                  .Attr<std::int64_t>("directions")
                                  .Attr<bool>("check_sequence")
                                  .Attr<bool>("check_states")
                                  .Attr<double>("cell_clip")
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // lengths
                                  .Arg<ffi::AnyBuffer>()  // hs
                                  .Arg<ffi::AnyBuffer>()  // cs
                                  .Arg<ffi::AnyBuffer>()  // saved
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // dh_n
                                  .Arg<ffi::AnyBuffer>()  // dc_n
                                  .RemainingArgs()        // weights
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dh0
                                  .Ret<ffi::AnyBuffer>()  // dc0
                                  .RemainingRets()        // weight gradients
);

namespace fusedrnn::bindings {

void def_jax_ffi(py::module_& m) {
  py::dict targets;
  targets["fusedrnn_layer_forward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerForward));
  targets["fusedrnn_layer_backward"] = py::capsule(reinterpret_cast<void*>(&FusedrnnLayerBackward));
  m.attr("jax_ffi_targets") = targets;
  // The FFI API and jaxlib the handlers were compiled against: a running jaxlib older than this one
  // refuses them at call time, so fusedrnn.jax checks before registering.
  m.attr("jax_ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("jax_ffi_built_with_jaxlib") = FUSEDRNN_JAXLIB_VERSION;
}

}  // namespace fusedrnn::bindings
