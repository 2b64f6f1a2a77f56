// The decoding shared by fusedrnn.jax's XLA FFI handlers on every platform (jax_ffi.cpp on the CPU,
// jax_ffi_device.h on a device): attributes and buffers checked and described as the layer calls of
// layer.h, with the error messages users see. Only the backend call differs between the handlers.
//
// Buffers (D directions; every buffer dense, row-major, as XLA passes them; R is the width of h: P for
// an LSTM with a projection, else H):
//   forward  args  x (T, B, I), h0 (D, B, R), c0 (D, B, H), lengths (B) 32- or 64-bit ints,
//                  then per direction weight_ih (G*H, I), weight_hh (G*H, R) [, bias_ih, bias_hh (G*H)]
//                  [, weight_hr (P, H)] (torch.nn's order: an odd count per direction has a projection)
//            rets  y (T, B, D*R), h_n (D, B, R), c_n (D, B, H), and the tape (tape_layout(); training
//                  only): hs (D, T+1, B, R), cs (D, T+1, B, H), saved (D, T, B, S*H), rs (D, T, B, H)
//   backward args  x, lengths, hs, cs, saved, rs (as forward had them), dy (T, B, D*R), dh_n (D, B, R),
//                  dc_n (D, B, H), then the weights as forward had them
//            rets  dx (T, B, I), dh0 (D, B, R), dc0 (D, B, H), then one gradient per weight, in the
//                  weights' order
// An absent optional buffer (h0, c0, lengths; c_n, cs, dc0 for a cell without a cell state; rs without
// a projection; the tape in inference) has no elements. Under jax.vmap (vmap_method="expand_dims")
// every buffer gains the same number of leading dimensions, each either the mapped size or 1 (shared
// by every mapped element); a handler runs the layer once per mapped element and direction (params()).
//
// Pointers are never dereferenced here, so the same code describes host and device buffers; reading
// values (lengths, the finiteness checks) is the handler's, from memory it can read.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "fusedrnn/cells.h"
#include "fusedrnn/layer.h"
#include "xla/ffi/api/ffi.h"

namespace fusedrnn::jax_ffi {

namespace ffi = xla::ffi;

inline ffi::Error shape_error(const char* name, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(name) + ": " + what);
}

inline ffi::Error non_finite_error(const char* name) {
  return ffi::Error::InvalidArgument(std::string(name) + ": contains NaN or infinite values");
}

// The attributes every handler takes: the cell by name, 1 or 2 directions, a cell clip > 0.
inline ffi::Error parse_attributes(std::string_view name, std::int64_t directions, double cell_clip, CellKind& cell) {
  bool known = false;
  for (const CellFacts& c : kCells)
    if (name == c.name) {
      cell = c.kind;
      known = true;
    }
  if (!known) return ffi::Error::InvalidArgument("cell: unknown cell '" + std::string(name) + "'");
  if (directions != 1 && directions != 2) return ffi::Error::InvalidArgument("directions: expected 1 or 2");
  if (std::isnan(cell_clip) || cell_clip <= 0) return ffi::Error::InvalidArgument("cell_clip: expected > 0");
  return ffi::Error::Success();
}

// Runs body<float> or body<double> by x's dtype; an exception must not cross into XLA (a C boundary), so
// the backend's become an error of the call.
template <typename Body>
ffi::Error by_dtype(const char* what, ffi::DataType dtype, Body&& body) {
  try {
    if (dtype == ffi::DataType::F32) return body(float{});
    if (dtype == ffi::DataType::F64) return body(double{});
    return ffi::Error::InvalidArgument("x: expected float32 or float64");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("fusedrnn layer ") + what + ": " + e.what());
  }
}

// The mapped (vmap) dimensions of a call: the leading dimensions of its first result.
struct Batch {
  std::vector<Index> dims;
  Index count = 1;
};

inline Batch batch_of(const ffi::AnyBuffer& first_result, int base_rank) {
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
  // Whether every mapped element has data of its own (no leading dimension of 1 standing for several).
  bool per_element() const {
    for (std::size_t i = 0; i < lead_.size(); ++i)
      if (lead_[i] != batch_->dims[i]) return false;
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
ffi::Error first_failure(std::initializer_list<T> errors) {
  for (const ffi::Error& e : errors)
    if (e.failure()) return e;
  return ffi::Error::Success();
}

// The optional lengths (B) of a call, 32- or 64-bit integers, signed or not, in whatever memory the
// buffer is. Unsigned ones are read as they are, so a value past the signed range is reported as given.
class Lengths {
 public:
  Lengths(const ffi::AnyBuffer& buffer, const Batch& batch)
      : type_(buffer.element_type()), narrow_(buffer, batch), wide_(buffer, batch) {}

  ffi::Error check(Index rows) const {
    if (empty()) return ffi::Error::Success();
    if (narrow()) return expect(narrow_, "lengths", {rows});
    if (type_ == ffi::DataType::S64 || type_ == ffi::DataType::U64) return expect(wide_, "lengths", {rows});
    return ffi::Error::InvalidArgument("lengths: expected 32- or 64-bit integers");
  }
  bool empty() const { return narrow_.empty(); }
  const void* at(Index n) const { return narrow() ? static_cast<const void*>(narrow_.at(n)) : wide_.at(n); }
  std::size_t bytes() const { return static_cast<std::size_t>(narrow_.elements()) * (narrow() ? 4 : 8); }

  // One mapped element's lengths, read from host memory `values` (bytes() of them), as int64 checked to
  // lie in [1, T].
  ffi::Error widen(const void* values, Index steps, std::vector<Index>& out) const {
    const Index rows = narrow_.elements();
    out.resize(static_cast<std::size_t>(rows));
    for (Index b = 0; b < rows; ++b) {
      std::string given;
      switch (type_) {
        case ffi::DataType::S32: out[b] = static_cast<const std::int32_t*>(values)[b]; break;
        case ffi::DataType::U32: out[b] = static_cast<const std::uint32_t*>(values)[b]; break;
        case ffi::DataType::S64: out[b] = static_cast<const std::int64_t*>(values)[b]; break;
        default: {
          const std::uint64_t value = static_cast<const std::uint64_t*>(values)[b];
          out[b] = value > static_cast<std::uint64_t>(steps) ? steps + 1 : static_cast<Index>(value);
          given = std::to_string(value);
        }
      }
      if (out[b] < 1 || out[b] > steps)
        return ffi::Error::InvalidArgument("lengths: each length must be in [1, " + std::to_string(steps) +
                                           "] (T), got " + (given.empty() ? std::to_string(out[b]) : given) +
                                           " at index " + std::to_string(b));
    }
    return ffi::Error::Success();
  }

 private:
  bool narrow() const { return type_ == ffi::DataType::S32 || type_ == ffi::DataType::U32; }

  ffi::DataType type_;
  Batched<const std::int32_t> narrow_;
  Batched<const std::int64_t> wide_;
};

// A layer's weights, from the arguments that follow the fixed ones: per direction weight_ih, weight_hh
// [, bias_ih, bias_hh] [, weight_hr] (torch.nn's order), so an odd count per direction has a projection.
// The sizes follow from them and from R, the width of h in the call's outputs or their gradients.
template <typename T>
struct Weights {
  std::vector<Batched<const T>> w;
  std::size_t per = 0;  // arrays per direction
  Index hidden = 0;     // H
  Index proj = 0;       // P with a projection (then R == P), else 0 (R == H)

  bool projected() const { return per % 2 == 1; }
  bool has_bias() const { return per >= 4; }

  ffi::Error read(const ffi::RemainingArgs& args, CellKind cell, Index directions, const Batch& batch, Index input,
                  Index state) {
    const std::size_t count = args.size();
    per = count / static_cast<std::size_t>(directions);
    if (count % static_cast<std::size_t>(directions) != 0 || per < 2 || per > 5)
      return ffi::Error::InvalidArgument(
          "weights: expected per direction weight_ih, weight_hh [, bias_ih, bias_hh] [, weight_hr]");
    for (std::size_t i = 0; i < count; ++i) {
      ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(i);
      if (buffer.has_error()) return buffer.error();
      if (buffer->element_type() != (sizeof(T) == 4 ? ffi::DataType::F32 : ffi::DataType::F64))
        return ffi::Error::InvalidArgument("weights: expected the dtype of x");
      w.emplace_back(*buffer, batch);
    }
    hidden = state;
    proj = 0;
    if (projected()) {
      if (!cell_facts(cell).projection)
        return ffi::Error::InvalidArgument("weight_hr: only an LSTM takes a projection (proj_size)");
      const Batched<const T>& w_hr = w[per - 1];
      if (!w_hr.well_batched() || w_hr.rank() != 2 || w_hr.dim(0) != state || w_hr.dim(1) <= state)
        return shape_error("weight_hr", "expected (proj_size, hidden_size) with 0 < proj_size < hidden_size, "
                                        "proj_size the width of h");
      hidden = w_hr.dim(1);
      proj = state;
    }
    const Index gh = cell_facts(cell).gates * hidden;
    for (std::size_t i = 0; i < count; ++i) {
      const std::size_t k = i % per;
      const char* names[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
      ffi::Error e = k == 0                        ? expect(w[i], names[k], {gh, input})
                     : k == 1                      ? expect(w[i], names[k], {gh, state})
                     : projected() && k == per - 1 ? expect(w[i], "weight_hr", {proj, hidden})
                                                   : expect(w[i], names[k], {gh});
      if (e.failure()) return e;
    }
    return ffi::Error::Success();
  }

  bool shared() const {
    return std::all_of(w.begin(), w.end(), [](const Batched<const T>& b) { return b.shared(); });
  }

  Index state() const { return proj > 0 ? proj : hidden; }

  // The views of direction d's weights at mapped element n.
  LayerWeights<T> at(Index d, Index n, Index input) const {
    const std::size_t i = per * static_cast<std::size_t>(d);
    LayerWeights<T> lw;
    lw.w_ih = {w[i].at(n), {input, 1}};
    lw.w_hh = {w[i + 1].at(n), {state(), 1}};
    if (has_bias()) {
      lw.b_ih = {w[i + 2].at(n), 1};
      lw.b_hh = {w[i + 3].at(n), 1};
    }
    if (projected()) lw.w_hr = {w[i + per - 1].at(n), {hidden, 1}};
    return lw;
  }
};

// The tape of a call as buffers (training forward's results, backward's arguments): hs, cs, saved, rs,
// absent ones empty.
template <typename E>
struct TapeBuffers {
  Batched<E> hs, cs, saved, rs;

  TapeBuffers(const ffi::AnyBuffer& hs_buf, const ffi::AnyBuffer& cs_buf, const ffi::AnyBuffer& saved_buf,
              const ffi::AnyBuffer& rs_buf, const Batch& batch)
      : hs(hs_buf, batch), cs(cs_buf, batch), saved(saved_buf, batch), rs(rs_buf, batch) {}

  // Each array (D, leading, B, width): every direction's tape_layout() array, the batch a dimension of
  // its own, so that a batch split across devices splits the tape with it.
  ffi::Error check(const TapeLayout& layout, Index directions) const {
    auto expect_array = [directions](const Batched<E>& b, const char* name, const TapeArray& a, bool optional) {
      if (optional && b.empty()) return ffi::Error::Success();
      return expect(b, name, {directions, a.leading, a.batch, a.width});
    };
    if (ffi::Error e = first_failure({expect_array(hs, "hs", layout.hs, false), expect_array(cs, "cs", layout.cs, true),
                                      expect_array(saved, "saved", layout.saved, true),
                                      expect_array(rs, "rs", layout.rs, true)});
        e.failure())
      return e;
    if (layout.has_cell_state == cs.empty() || (layout.saved.values() == 0) != saved.empty() ||
        (layout.rs.values() == 0) != rs.empty())
      return shape_error("tape", "does not match tape_layout()");
    return ffi::Error::Success();
  }

  // Direction d's part of mapped element n's tape. The backend takes the tape's pointers as writable
  // (forward writes them); backward only reads them.
  template <typename T>
  LayerTape<T> at(const TapeLayout& layout, Index n, Index d) const {
    auto writable = [n](const Batched<E>& b) { return const_cast<T*>(b.at(n)); };
    return direction_tape(layout, d, true, writable(hs), writable(cs), writable(saved), writable(rs));
  }
};

// One direction's tape layout for a call's layer over `rows` rows: its own B, or a folded call's N*B.
template <typename Call>
TapeLayout layout_for_rows(const Call& c, Index rows, bool training) {
  return tape_layout(c.cell, LayerShape{c.steps, rows, c.input, c.hidden, {}, false, c.weights.proj}, training);
}

// Where one layer call's arrays lie: a mapped element's part of the buffers (a call's arrays(n)), or
// the handler's scratch holding every element's rows side by side (a folded call). Absent arrays are null.
template <typename T>
struct ForwardArrays {
  const T *x, *h0, *c0;
  T *y, *h_n, *c_n;
  Index rows;
};

template <typename T>
struct BackwardArrays {
  const T *x, *dy, *dh_n, *dc_n;
  T *dx, *dh0, *dc0;
  std::array<const T*, 4> tape;  // hs, cs, saved, rs: every direction's, back to back
  std::vector<T*> grads;         // one per weight, holding grad_groups gradients one after another
  Index rows;
  Index grad_groups;  // LayerBackwardParams::grad_groups
};

// A forward call: its buffers decoded and checked (check()), and the layer call of each mapped element
// and direction (params()).
template <typename T>
struct ForwardCall {
  CellKind cell;
  Index D;
  bool training;
  T cell_clip;
  Batch batch;
  Batched<const T> x, h0, c0;
  Batched<T> y, h_n, c_n;
  TapeBuffers<T> tape;
  Lengths lengths;
  Weights<T> weights;
  Index steps = 0, rows = 0, input = 0, hidden = 0;
  Index state = 0;  // R, the width of h: P with a projection, else H
  TapeLayout layout;  // of one direction

  ForwardCall(CellKind cell_, Index directions, bool training_, double clip, const ffi::AnyBuffer& x_buf,
              const ffi::AnyBuffer& h0_buf, const ffi::AnyBuffer& c0_buf, const ffi::AnyBuffer& lengths_buf,
              const ffi::AnyBuffer& y_buf, const ffi::AnyBuffer& h_n_buf, const ffi::AnyBuffer& c_n_buf,
              const ffi::AnyBuffer& hs_buf, const ffi::AnyBuffer& cs_buf, const ffi::AnyBuffer& saved_buf,
              const ffi::AnyBuffer& rs_buf)
      : cell(cell_), D(directions), training(training_), cell_clip(static_cast<T>(clip)), batch(batch_of(y_buf, 3)),
        x(x_buf, batch), h0(h0_buf, batch), c0(c0_buf, batch), y(y_buf, batch), h_n(h_n_buf, batch),
        c_n(c_n_buf, batch), tape(hs_buf, cs_buf, saved_buf, rs_buf, batch), lengths(lengths_buf, batch) {}

  // Every shape, the weights (from `args`) and the tape checked; fills the sizes.
  ffi::Error check(const ffi::RemainingArgs& args) {
    if (x.rank() != 3 || y.rank() != 3) return shape_error("x", "expected (T, B, I)");
    steps = x.dim(0);
    rows = x.dim(1);
    input = x.dim(2);
    state = y.dim(2) / D;
    if (ffi::Error e = first_failure({expect(x, "x", {steps, rows, input}), expect(y, "y", {steps, rows, D * state}),
                                      lengths.check(rows)});
        e.failure())
      return e;
    if (ffi::Error e = weights.read(args, cell, D, batch, input, state); e.failure()) return e;
    hidden = weights.hidden;
    if (ffi::Error e = first_failure({expect_optional(h0, "h0", {D, rows, state}),
                                      expect_optional(c0, "c0", {D, rows, hidden}),
                                      expect(h_n, "h_n", {D, rows, state}),
                                      expect_optional(c_n, "c_n", {D, rows, hidden})});
        e.failure())
      return e;
    if (cell_facts(cell).has_cell_state == c_n.empty())
      return shape_error("c_n", "expected one for a cell with a cell state");
    layout = layout_for_rows(*this, rows, training);
    return training ? tape.check(layout, D) : ffi::Error::Success();
  }

  // Training: direction d's part of mapped element n's tape results.
  LayerTape<T> tape_at(Index n, Index d) const { return tape.template at<T>(layout, n, d); }

  // Mapped element n's part of the buffers.
  ForwardArrays<T> arrays(Index n) const { return {x.at(n), h0.at(n), c0.at(n), y.at(n), h_n.at(n), c_n.at(n), rows}; }

  // Direction d of the layer call on `a` with mapped element n's weights: `length_values` (a.rows,
  // stride 1; null: every row full length) in the memory the backend reads, `tape` from tape_at() or the
  // handler's scratch.
  LayerForwardParams<T> params(const ForwardArrays<T>& a, Index n, Index d, const Index* length_values,
                               const LayerTape<T>& tape) const {
    const Index h_at = d * a.rows * state, c_at = d * a.rows * hidden;
    LayerForwardParams<T> p;
    p.cell = cell;
    p.shape = {steps, a.rows, input, hidden, {length_values, 1}, d == 1, weights.proj};
    p.weights = weights.at(d, n, input);
    p.x = {a.x, {a.rows * input, input, 1}};
    if (a.h0) p.h0 = {a.h0 + h_at, {state, 1}};
    if (a.c0) p.c0 = {a.c0 + c_at, {hidden, 1}};
    p.y = {a.y + d * state, {a.rows * D * state, D * state, 1}};
    p.h_n = {a.h_n + h_at, {state, 1}};
    if (a.c_n) p.c_n = {a.c_n + c_at, {hidden, 1}};
    p.tape = tape;
    p.cell_clip = cell_clip;
    return p;
  }

  LayerForwardParams<T> params(Index n, Index d, const Index* length_values, const LayerTape<T>& tape) const {
    return params(arrays(n), n, d, length_values, tape);
  }
};

// A backward call, as ForwardCall.
template <typename T>
struct BackwardCall {
  CellKind cell;
  Index D;
  T cell_clip;
  Batch batch;
  Batched<const T> x;
  TapeBuffers<const T> tape;
  Batched<const T> dy, dh_n, dc_n;
  Batched<T> dx, dh0, dc0;
  Lengths lengths;
  Weights<T> weights;
  std::vector<Batched<T>> grads;
  Index steps = 0, rows = 0, input = 0, hidden = 0, state = 0;
  TapeLayout layout;

  BackwardCall(CellKind cell_, Index directions, double clip, const ffi::AnyBuffer& x_buf,
               const ffi::AnyBuffer& lengths_buf, const ffi::AnyBuffer& hs_buf, const ffi::AnyBuffer& cs_buf,
               const ffi::AnyBuffer& saved_buf, const ffi::AnyBuffer& rs_buf, const ffi::AnyBuffer& dy_buf,
               const ffi::AnyBuffer& dh_n_buf, const ffi::AnyBuffer& dc_n_buf, const ffi::AnyBuffer& dx_buf,
               const ffi::AnyBuffer& dh0_buf, const ffi::AnyBuffer& dc0_buf)
      : cell(cell_), D(directions), cell_clip(static_cast<T>(clip)), batch(batch_of(dx_buf, 3)), x(x_buf, batch),
        tape(hs_buf, cs_buf, saved_buf, rs_buf, batch), dy(dy_buf, batch),
        dh_n(dh_n_buf, batch), dc_n(dc_n_buf, batch), dx(dx_buf, batch), dh0(dh0_buf, batch), dc0(dc0_buf, batch),
        lengths(lengths_buf, batch) {}

  ffi::Error check(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets) {
    if (x.rank() != 3 || dy.rank() != 3) return shape_error("x", "expected (T, B, I)");
    steps = x.dim(0);
    rows = x.dim(1);
    input = x.dim(2);
    state = dy.dim(2) / D;
    if (ffi::Error e = first_failure({expect(x, "x", {steps, rows, input}), expect(dx, "dx", {steps, rows, input}),
                                      expect(dy, "dy", {steps, rows, D * state}), lengths.check(rows)});
        e.failure())
      return e;
    if (ffi::Error e = weights.read(args, cell, D, batch, input, state); e.failure()) return e;
    hidden = weights.hidden;
    if (ffi::Error e = first_failure({expect(dh_n, "dh_n", {D, rows, state}),
                                      expect_optional(dc_n, "dc_n", {D, rows, hidden}),
                                      expect(dh0, "dh0", {D, rows, state}),
                                      expect_optional(dc0, "dc0", {D, rows, hidden})});
        e.failure())
      return e;
    if (cell_facts(cell).has_cell_state == dc0.empty())
      return shape_error("dc0", "expected one for a cell with a cell state");
    const std::vector<Batched<const T>>& w = weights.w;
    for (std::size_t i = 0; i < w.size(); ++i) {
      ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> g = rets.get<ffi::AnyBuffer>(i);
      if (g.has_error()) return g.error();
      grads.emplace_back(**g, batch);
      if (grads.back().elements() != w[i].elements() || !grads.back().well_batched())
        return shape_error("weight gradients", "expected one per weight, of its shape");
    }
    layout = layout_for_rows(*this, rows, true);
    return tape.check(layout, D);
  }

  // Mapped element n's part of the buffers.
  BackwardArrays<T> arrays(Index n) const {
    BackwardArrays<T> a{x.at(n), dy.at(n), dh_n.at(n), dc_n.at(n), dx.at(n), dh0.at(n), dc0.at(n), {}, {}, rows, 1};
    a.tape = {tape.hs.at(n), tape.cs.at(n), tape.saved.at(n), tape.rs.at(n)};
    for (const Batched<T>& g : grads) a.grads.push_back(g.at(n));
    return a;
  }

  // Direction d of the layer call on `a` with mapped element n's weights. The weight gradients are
  // written (each direction has its own); the first direction writes dx and the second adds into it.
  LayerBackwardParams<T> params(const BackwardArrays<T>& a, Index n, Index d, const Index* length_values) const {
    const Index h_at = d * a.rows * state, c_at = d * a.rows * hidden;
    const std::size_t i = weights.per * static_cast<std::size_t>(d);
    const TapeLayout a_layout = layout_for_rows(*this, a.rows, true);
    LayerBackwardParams<T> p;
    p.cell = cell;
    p.shape = {steps, a.rows, input, hidden, {length_values, 1}, d == 1, weights.proj};
    p.weights = weights.at(d, n, input);
    p.x = {a.x, {a.rows * input, input, 1}};
    auto writable = [](const T* from) { return const_cast<T*>(from); };
    p.tape = direction_tape(a_layout, d, true, writable(a.tape[0]), writable(a.tape[1]), writable(a.tape[2]),
                            writable(a.tape[3]));
    p.dy = {a.dy + d * state, {a.rows * D * state, D * state, 1}};
    p.dh_n = {a.dh_n + h_at, {state, 1}};
    if (a.dc_n) p.dc_n = {a.dc_n + c_at, {hidden, 1}};
    p.dx = {a.dx, {a.rows * input, input, 1}};
    p.accumulate_dx = d > 0;
    p.accumulate_weight_grads = false;
    p.dh0 = {a.dh0 + h_at, {state, 1}};
    if (a.dc0) p.dc0 = {a.dc0 + c_at, {hidden, 1}};
    p.dw_ih = {a.grads[i], {input, 1}};
    p.dw_hh = {a.grads[i + 1], {state, 1}};
    if (weights.has_bias()) {
      p.db_ih = {a.grads[i + 2], 1};
      p.db_hh = {a.grads[i + 3], 1};
    }
    if (weights.projected()) p.dw_hr = {a.grads[i + weights.per - 1], {hidden, 1}};
    p.cell_clip = cell_clip;
    p.grad_groups = a.grad_groups;
    return p;
  }

  LayerBackwardParams<T> params(Index n, Index d, const Index* length_values) const {
    return params(arrays(n), n, d, length_values);
  }
};

// Under vmap with weights shared by every mapped element, a handler may run the N elements' rows as one
// layer call of N*B rows ("folding"), element n's rows at n*B.. of every (outer, N*B, width) array: a
// step's work over N*B rows costs far less than N calls of B rows while B is small. The inputs (and
// the tape, for the backward) are gathered into the call's scratch and the outputs (and the tape, from
// a training forward) scattered back, so the buffers keep their per-element layout whichever way
// either call ran. The backward writes each element's weight gradients apart (grad_groups = N),
// straight into its results. The copies go through copy(to, to_pitch, from, from_pitch, values,
// count): `count` runs of `values` values, the pitches in values, in the memory the handler's backend
// uses.
class Fold {
 public:
  Fold(Index elements, Index rows) : elements_(elements), rows_(rows) {}

  // Whether a call folds: weights shared by more than one element, the folded sizes within the 32-bit
  // BLAS's range, and in training at most `max_training_rows` rows an element. A backward also needs a
  // tape of each element's own: one tape shared by the elements (a jacrev's cotangents) would be
  // gathered once for each, N times its memory, where each element's call reads it in place.
  template <typename T>
  static bool applies(const ForwardCall<T>& c, Index max_training_rows) {
    return shared_and_in_range(c, c.training, max_training_rows);
  }
  template <typename T>
  static bool applies(const BackwardCall<T>& c, Index max_training_rows) {
    return c.tape.hs.per_element() && shared_and_in_range(c, true, max_training_rows);
  }

  Index all() const { return elements_ * rows_; }

  // Moves mapped element n's (outer, B, width) block to or from rows n*B.. of an (outer, N*B, width) one;
  // nothing for an absent array.
  template <typename T, typename Copy>
  void gather(const T* from, T* to, Index outer, Index width, Index n, const Copy& copy) const {
    if (from) copy(to + n * rows_ * width, all() * width, from, rows_ * width, rows_ * width, outer);
  }
  template <typename T, typename Copy>
  void scatter(const T* from, T* to, Index outer, Index width, Index n, const Copy& copy) const {
    if (to) copy(to, rows_ * width, from + n * rows_ * width, all() * width, rows_ * width, outer);
  }

  // Every direction's tape (hs, cs, saved, rs as `layout` has them for B rows) of mapped element n, to
  // or from the folded tape.
  template <typename T, typename Copy>
  void gather_tape(const TapeLayout& layout, Index directions, const std::array<const T*, 4>& from,
                   const std::array<T*, 4>& to, Index n, const Copy& copy) const {
    for (std::size_t k = 0; k < 4; ++k)
      gather(from[k], to[k], directions * tape_arrays(layout)[k].leading, tape_arrays(layout)[k].width, n, copy);
  }
  template <typename T, typename Copy>
  void scatter_tape(const TapeLayout& layout, Index directions, const std::array<T*, 4>& from,
                    const std::array<T*, 4>& to, Index n, const Copy& copy) const {
    for (std::size_t k = 0; k < 4; ++k)
      scatter<T>(from[k], to[k], directions * tape_arrays(layout)[k].leading, tape_arrays(layout)[k].width, n,
                 copy);
  }

 private:
  template <typename Call>
  static bool shared_and_in_range(const Call& c, bool training, Index max_training_rows) {
    const Index all = c.batch.count * c.rows;
    const Index widest = std::max({c.input, cell_facts(c.cell).gates * c.hidden, c.state});
    const Index blas_max = std::numeric_limits<std::int32_t>::max();
    return c.batch.count > 1 && c.rows > 0 && c.weights.shared() && (!training || c.rows <= max_training_rows) &&
           c.steps * all <= blas_max && all * widest <= blas_max;
  }
  static std::array<TapeArray, 4> tape_arrays(const TapeLayout& l) { return {l.hs, l.cs, l.saved, l.rs}; }
  Index elements_, rows_;
};

// The handlers' signatures, bound once for every platform: a device's binding adds its context
// (stream, scratch allocator) after these.
inline auto forward_binding() {
  return ffi::Ffi::Bind()
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
      .Ret<ffi::AnyBuffer>();  // rs
}

inline auto backward_binding() {
  return ffi::Ffi::Bind()
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
      .Arg<ffi::AnyBuffer>()  // rs
      .Arg<ffi::AnyBuffer>()  // dy
      .Arg<ffi::AnyBuffer>()  // dh_n
      .Arg<ffi::AnyBuffer>()  // dc_n
      .RemainingArgs()        // weights
      .Ret<ffi::AnyBuffer>()  // dx
      .Ret<ffi::AnyBuffer>()  // dh0
      .Ret<ffi::AnyBuffer>()  // dc0
      .RemainingRets();       // weight gradients
}

}  // namespace fusedrnn::jax_ffi
