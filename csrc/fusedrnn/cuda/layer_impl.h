// The CUDA backend's orchestration, written once against the device seam (device.h): which buffers a
// call needs and where they sit in the workspace, which views are read in place and which are staged,
// the order of the GEMMs and kernel launches, their leading dimensions and transposes, and the choice
// between the per-step path and the persistent kernels (persistent.h). cuda_device.cuh runs it on a GPU,
// emulated.h on the host.
//
// Per-step path, forward: one GEMM projects x onto W_ih for all T*B rows; each step is one GEMM
// h_{t-1} W_hh^T and one pointwise kernel (biases, gates, lengths, y, the tape). Backward: each step is
// one pointwise kernel (gate gradients, the gradient bypassing W_hh) and one GEMM adding dg_t W_hh to
// it; after the loop dx, dW_ih, dW_hh and the bias gradients are GEMMs over all T*B rows (the bias
// gradients against a vector of ones, so every sum has a fixed order: no atomics anywhere) and the
// per-step gradient norms a fixed-order block reduction.
//
// A projection (layer.h: h = r W_hr^T, R = P columns) adds a GEMM and a small kernel to each step each
// way: forward, the pointwise kernel writes the cell output r_t into the tape's rs, then h_t = r_t W_hr^T
// goes into the state slot and ProjectedOutput writes y (and carries h at invalid rows); backward,
// ProjectedStateGrad gathers the whole dL/dh_t, a GEMM makes dr_t = dL/dh_t W_hr for the pointwise
// kernel, and after the loop dW_hr = sum_t dL/dh_t^T r_t is one GEMM over the T*B rows. r_t is kept
// in training (the tape's rs, T*B*H values, in the layout every backend shares) rather than recomputed
// from o and c: recomputing would add a pointwise kernel per backward step to save memory the shared
// tape layout holds anyway.
//
// The per-step loops go to the device as one sequence (Device::sequence) under a key of every value
// they bake into their launches, so a device may record a loop once and replay it (CUDA Graphs), leaving
// no per-step work to the host.
//
// Views (layer.h) that GEMMs read or write in place need row_stride >= 0; others are gathered into the
// workspace (outputs scattered back after). The pointwise kernels read and write any view directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "fusedrnn/cells.h"
#include "fusedrnn/cuda/device.h"
#include "fusedrnn/cuda/kernels.h"
#include "fusedrnn/cuda/persistent.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::gpu {

// A GEMM operand: the caller's view when its rows are evenly spaced, else a dense staging buffer.
template <typename T>
struct Operand {
  T* data = nullptr;
  Index ld = 0;
  bool staged = false;
  View3<T> view;  // the caller's view (staged: gathered before, or scattered back after)
  Index n0 = 0, n1 = 0, width = 0;
};

template <typename T, typename U>
Operand<T> operand(const View3<U>& v, Index n0, Index n1, Index width, Carver& carve) {
  Operand<T> o;
  o.view = {const_cast<T*>(v.data), {v.stride[0], v.stride[1], v.stride[2]}};
  o.n0 = n0;
  o.n1 = n1;
  o.width = width;
  if (!v.data) return o;
  const Index ld = row_stride(v, n0, n1, width);
  if (ld >= 0) {
    o.data = const_cast<T*>(v.data);
    o.ld = ld;
    return o;
  }
  o.data = carve.template take<T>(n0 * n1 * width);
  o.ld = width;
  o.staged = true;
  return o;
}

template <typename T, typename U>
Operand<T> operand(const View2<U>& v, Index n0, Index width, Carver& carve) {
  return operand<T>(as_view3(v), 1, n0, width, carve);
}

template <typename T>
View3<T> dense3(T* data, Index n1, Index n2) { return {data, {n1 * n2, n2, 1}}; }

// Copies `o`'s view into its staging buffer (gather) or back (scatter); nothing when read in place.
template <typename T, typename Device>
void gather(Device& dev, const Operand<T>& o) {
  if (!o.staged) return;
  const Copy3<T> k{{o.view.data, {o.view.stride[0], o.view.stride[1], o.view.stride[2]}},
                   dense3(o.data, o.n1, o.width), o.n0, o.n1, o.width};
  dev.launch(k, covering(o.n0 * o.n1 * o.width));
}

template <typename T, typename Device>
void scatter(Device& dev, const Operand<T>& o) {
  if (!o.staged) return;
  const Copy3<T> k{dense3<const T>(o.data, o.n1, o.width), o.view, o.n0, o.n1, o.width};
  dev.launch(k, covering(o.n0 * o.n1 * o.width));
}

// (n0, n1) from -> to, either a view or absent (zeros).
template <typename T, typename Device>
void copy2(Device& dev, const View2<const T>& from, const View2<T>& to, Index n0, Index n1) {
  if (!to.data) return;
  dev.launch(Copy3<T>{as_view3(from), as_view3(to), 1, n0, n1}, covering(n0 * n1));
}

template <typename T>
View2<T> dense2(T* data, Index n1) { return {data, {n1, 1}}; }

// Every value a recorded sequence depends on, as 64-bit words: pointers, sizes, strides, flags, the
// bits of floating-point arguments. Equal keys: the same launches with the same arguments.
class SequenceKey {
 public:
  template <typename... A>
  SequenceKey& add(const A&... values) {
    (push(values), ...);
    return *this;
  }
  template <typename U>
  SequenceKey& add_view(const U& v) {
    push(v.data);
    if constexpr (std::is_same_v<decltype(v.stride), Index>)
      push(v.stride);
    else
      for (Index stride : v.stride) push(stride);
    return *this;
  }
  const std::vector<std::int64_t>& words() const { return words_; }

 private:
  template <typename U>
  void push(const U& value) {
    if constexpr (std::is_pointer_v<U>) {
      words_.push_back(static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(value)));
    } else if constexpr (std::is_floating_point_v<U>) {
      const double widened = value;
      std::int64_t bits;
      std::memcpy(&bits, &widened, sizeof bits);
      words_.push_back(bits);
    } else {
      words_.push_back(static_cast<std::int64_t>(value));
    }
  }
  std::vector<std::int64_t> words_;
};

// The tape's slot `index` of the hidden states, (B, R), and of the cell states, (B, H).
template <typename T>
T* h_slot(T* base, Index index, const LayerShape& s, bool training) {
  return state_slot(base, index, s.batch * s.state_size(), training);
}
template <typename T>
T* c_slot(T* base, Index index, const LayerShape& s, bool training) {
  return state_slot(base, index, s.batch * s.hidden, training);
}

// ---------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
struct ForwardPlan {
  Operand<T> x, w_ih, w_hh, w_hr;
  T* gx = nullptr;  // (T*B, G*H)
  T* hg = nullptr;  // (B, G*H)
};

template <typename T>
ForwardPlan<T> plan_forward(const LayerForwardParams<T>& a, Carver& carve) {
  const LayerShape& s = a.shape;
  const Index gh = cell_facts(a.cell).gates * s.hidden;
  ForwardPlan<T> p;
  p.x = operand<T>(a.x, s.steps, s.batch, s.input, carve);
  p.w_ih = operand<T>(a.weights.w_ih, gh, s.input, carve);
  p.w_hh = operand<T>(a.weights.w_hh, gh, s.state_size(), carve);
  if (s.proj > 0) p.w_hr = operand<T>(a.weights.w_hr, s.proj, s.hidden, carve);
  p.gx = carve.template take<T>(s.steps * s.batch * gh);
  p.hg = carve.template take<T>(s.batch * gh);
  return p;
}

template <typename T>
std::size_t forward_workspace_bytes(const LayerForwardParams<T>& a) {
  Carver count(nullptr);
  plan_forward(a, count);
  return count.bytes();
}

template <typename T, typename Device>
void layer_forward(Device& dev, const LayerForwardParams<T>& a, void* workspace, RecurrencePath path) {
  const LayerShape& s = a.shape;
  const Index B = s.batch, H = s.hidden, R = s.state_size(), P = s.proj, gh = cell_facts(a.cell).gates * H;
  const bool training = a.tape.training;
  Carver carve(workspace);
  const ForwardPlan<T> p = plan_forward(a, carve);
  for (const Operand<T>* o : {&p.x, &p.w_ih, &p.w_hh, &p.w_hr}) gather(dev, *o);

  // x W_ih^T for every step: (T*B, I) x (I, G*H).
  dev.template gemm<T>(false, true, s.steps * B, gh, s.input, T(1), p.x.data, p.x.ld, p.w_ih.data, p.w_ih.ld,
                       T(0), p.gx, gh);
  const Index first = s.reverse ? s.steps : 0, last = s.reverse ? 0 : s.steps;
  copy2<T>(dev, a.h0, dense2(h_slot(a.tape.hs, first, s, training), R), B, R);
  copy2<T>(dev, a.c0, dense2(c_slot(a.tape.cs, first, s, training), H), B, H);

  with_cell(a.cell, [&](auto cell) {
    using Cell = decltype(cell);
    ForwardStep<T> step;
    step.batch = B;
    step.hidden = H;
    step.lengths = s.lengths;
    step.hg = p.hg;
    step.hg_ld = gh;
    step.b_ih = a.weights.b_ih;
    step.b_hh = a.weights.b_hh;
    step.cell_clip = a.cell_clip;
    const PersistentShape persistent = persistent_shape<Cell, T>(dev, s, path);
    if (persistent.blocks > 0) {
      PersistentForward<Cell, T> k;
      k.step = step;
      k.steps = s.steps;
      k.reverse = s.reverse;
      k.gx = p.gx;
      k.w_hh = {p.w_hh.data, {p.w_hh.ld, 1}};
      k.hg = p.hg;
      k.hs = a.tape.hs;
      k.cs = a.tape.cs;
      k.saved = a.tape.saved;
      k.training = training;
      k.y = a.y;
      k.shape = persistent;
      dev.launch_cooperative(k, persistent.launch());
      return;
    }
    SequenceKey key;
    key.add(0, static_cast<int>(a.cell), sizeof(T), s.steps, B, H, s.reverse, training, a.cell_clip, p.gx, p.hg,
            p.w_hh.data, p.w_hh.ld, a.tape.hs, a.tape.cs, a.tape.saved, P, p.w_hr.data, p.w_hr.ld, a.tape.rs)
        .add_view(s.lengths).add_view(a.weights.b_ih).add_view(a.weights.b_hh).add_view(a.y);
    dev.sequence(key.words(), [&] {
      for (Index i = 0; i < s.steps; ++i) {
        const Index t = s.reverse ? s.steps - 1 - i : i;
        step.t = t;
        step.gx = p.gx + t * B * gh;
        step.h_prev = h_slot(a.tape.hs, prev_slot(s.reverse, t), s, training);
        step.c_prev = c_slot(a.tape.cs, prev_slot(s.reverse, t), s, training);
        step.h_next = h_slot(a.tape.hs, next_slot(s.reverse, t), s, training);
        step.c_next = c_slot(a.tape.cs, next_slot(s.reverse, t), s, training);
        step.saved = a.tape.saved ? a.tape.saved + t * B * Cell::kSaved * H : nullptr;
        step.y = {a.y.data + t * a.y.stride[0], {a.y.stride[1], a.y.stride[2]}};
        step.r = P > 0 ? a.tape.rs + (training ? t : 0) * B * H : nullptr;
        // h_{t-1} W_hh^T: (B, R) x (R, G*H).
        dev.template gemm<T>(false, true, B, gh, R, T(1), step.h_prev, R, p.w_hh.data, p.w_hh.ld, T(0), p.hg, gh);
        dev.launch(ForwardPointwise<Cell, T>{step}, covering(B * H));
        if (P > 0) {
          // h_t = r_t W_hr^T: (B, H) x (H, P), then y and the rows that carry h.
          dev.template gemm<T>(false, true, B, P, H, T(1), step.r, H, p.w_hr.data, p.w_hr.ld, T(0), step.h_next, P);
          dev.launch(ProjectedOutput<T>{B, P, t, s.lengths, step.h_prev, step.h_next, step.y}, covering(B * P));
        }
      }
    });
  });
  const View2<const T> h_last = dense2<const T>(h_slot(a.tape.hs, last, s, training), R);
  copy2<T>(dev, h_last, a.h_n, B, R);
  if (a.c_n.data) copy2<T>(dev, dense2<const T>(c_slot(a.tape.cs, last, s, training), H), a.c_n, B, H);
}

// ---------------------------------------------------------------------------------------------------
// Backward.

template <typename T>
struct BackwardPlan {
  Operand<T> x, w_ih, w_hh, dx, dw_ih, dw_hh, db_ih, db_hh, w_hr, dw_hr;
  T* dgx = nullptr;       // (T*B, G*H)
  T* dgh = nullptr;       // (T*B, G*H), or dgx
  T* dh[2] = {};          // (B, R) each: the running dL/dh, alternately read and written
  T* dc = nullptr;        // (B, H)
  T* dh_total = nullptr;  // (T, B*R)
  T* ones = nullptr;      // (T*B)
  T* dr = nullptr;        // (B, H): with a projection, the step's dL/dr = dL/dh_t W_hr
};

template <typename T>
View3<T> as_column(const View1<T>& v) { return {v.data, {0, v.stride, 1}}; }

template <typename T>
BackwardPlan<T> plan_backward(const LayerBackwardParams<T>& a, Carver& carve) {
  const LayerShape& s = a.shape;
  const CellFacts& f = cell_facts(a.cell);
  const Index gh = f.gates * s.hidden, rows = s.steps * s.batch, R = s.state_size();
  const Index state = s.batch * s.hidden, h_state = s.batch * R;
  BackwardPlan<T> p;
  p.x = operand<T>(a.x, s.steps, s.batch, s.input, carve);
  p.w_ih = operand<T>(a.weights.w_ih, gh, s.input, carve);
  p.w_hh = operand<T>(a.weights.w_hh, gh, R, carve);
  p.dx = operand<T>(a.dx, s.steps, s.batch, s.input, carve);
  // With grad_groups Q, each weight gradient is Q of them one after another.
  const Index groups = a.grad_groups;
  p.dw_ih = operand<T>(a.dw_ih, groups * gh, s.input, carve);
  p.dw_hh = operand<T>(a.dw_hh, groups * gh, R, carve);
  if (s.proj > 0) {
    p.w_hr = operand<T>(a.weights.w_hr, s.proj, s.hidden, carve);
    p.dw_hr = operand<T>(a.dw_hr, groups * s.proj, s.hidden, carve);
    p.dr = carve.template take<T>(state);
  }
  // A bias gradient is the (G*H, 1) result of one GEMM, its stride the leading dimension.
  p.db_ih = operand<T>(as_column(a.db_ih), 1, groups * gh, 1, carve);
  p.db_hh = operand<T>(as_column(a.db_hh), 1, groups * gh, 1, carve);
  p.dgx = carve.template take<T>(rows * gh);
  p.dgh = f.split_recurrent_grad ? carve.template take<T>(rows * gh) : p.dgx;
  p.dh[0] = carve.template take<T>(h_state);
  p.dh[1] = carve.template take<T>(h_state);
  if (f.has_cell_state) p.dc = carve.template take<T>(state);
  p.dh_total = carve.template take<T>(rows * R);
  if (a.db_ih.data || a.db_hh.data) p.ones = carve.template take<T>(rows);
  return p;
}

template <typename T>
std::size_t backward_workspace_bytes(const LayerBackwardParams<T>& a) {
  Carver count(nullptr);
  plan_backward(a, count);
  return count.bytes();
}

template <typename T, typename Device>
void layer_backward(Device& dev, const LayerBackwardParams<T>& a, void* workspace, RecurrencePath path) {
  const LayerShape& s = a.shape;
  const Index B = s.batch, H = s.hidden, R = s.state_size(), P = s.proj, gh = cell_facts(a.cell).gates * H;
  const Index rows = s.steps * B;
  if (!a.tape.training) throw std::logic_error("fusedrnn: backward needs a tape recorded in training");
  if (a.grad_groups < 1 || B % a.grad_groups != 0)
    throw std::invalid_argument("fusedrnn: grad_groups must divide the batch into groups of equal size");
  Carver carve(workspace);
  const BackwardPlan<T> p = plan_backward(a, carve);
  for (const Operand<T>* o : {&p.x, &p.w_ih, &p.w_hh, &p.w_hr}) gather(dev, *o);
  if (a.accumulate_weight_grads)
    for (const Operand<T>* o : {&p.dw_ih, &p.dw_hh, &p.db_ih, &p.db_hh, &p.dw_hr}) gather(dev, *o);
  if (a.accumulate_dx) gather(dev, p.dx);
  copy2<T>(dev, a.dh_n, dense2(p.dh[0], R), B, R);
  if (p.dc) copy2<T>(dev, a.dc_n, dense2(p.dc, H), B, H);

  with_cell(a.cell, [&](auto cell) {
    using Cell = decltype(cell);
    BackwardStep<T> step;
    step.batch = B;
    step.hidden = H;
    step.lengths = s.lengths;
    step.dc = p.dc;
    step.cell_clip = a.cell_clip;
    const PersistentShape persistent = persistent_backward_shape<Cell, T>(dev, s, path);
    if (persistent.blocks > 0) {
      PersistentBackward<Cell, T> k;
      k.step = step;
      k.steps = s.steps;
      k.reverse = s.reverse;
      k.w_hh = {p.w_hh.data, {p.w_hh.ld, 1}};
      k.hs = a.tape.hs;
      k.cs = a.tape.cs;
      k.saved = a.tape.saved;
      k.dy = a.dy;
      k.dh[0] = p.dh[0];
      k.dh[1] = p.dh[1];
      k.dgx = p.dgx;
      k.dgh = p.dgh;
      k.dh_total = p.dh_total;
      k.shape = persistent;
      dev.launch_cooperative(k, persistent.launch());
      return;
    }
    SequenceKey key;
    key.add(1, static_cast<int>(a.cell), sizeof(T), s.steps, B, H, s.reverse, a.cell_clip, a.tape.hs, a.tape.cs,
            a.tape.saved, p.dgx, p.dgh, p.dh[0], p.dh[1], p.dc, p.dh_total, p.w_hh.data, p.w_hh.ld, P, p.w_hr.data,
            p.w_hr.ld, p.dr)
        .add_view(s.lengths).add_view(a.dy);
    dev.sequence(key.words(), [&] {
      for (Index i = 0; i < s.steps; ++i) {
        const Index t = s.reverse ? i : s.steps - 1 - i;
        const int in = static_cast<int>(i % 2);  // p.dh[in] holds dL/dh_t entering step t
        step.t = t;
        step.saved = a.tape.saved ? a.tape.saved + t * B * Cell::kSaved * H : nullptr;
        step.h_prev = h_slot<const T>(a.tape.hs, prev_slot(s.reverse, t), s, true);
        step.c_prev = c_slot<const T>(a.tape.cs, prev_slot(s.reverse, t), s, true);
        step.h_next = h_slot<const T>(a.tape.hs, next_slot(s.reverse, t), s, true);
        step.c_next = c_slot<const T>(a.tape.cs, next_slot(s.reverse, t), s, true);
        step.dy = {a.dy.data ? a.dy.data + t * a.dy.stride[0] : nullptr, {a.dy.stride[1], a.dy.stride[2]}};
        step.dh_in = p.dh[in];
        step.dh_out = p.dh[1 - in];
        step.dgx = p.dgx + t * B * gh;
        step.dgh = p.dgh + t * B * gh;
        step.dh_total = p.dh_total + t * B * R;
        if (P > 0) {
          dev.launch(ProjectedStateGrad<T>{B, P, t, s.lengths, step.dy, step.dh_in, step.dh_out, step.dh_total},
                     covering(B * P));
          // dr_t = dL/dh_t W_hr: (B, P) x (P, H).
          dev.template gemm<T>(false, false, B, H, P, T(1), step.dh_total, P, p.w_hr.data, p.w_hr.ld, T(0), p.dr, H);
          step.dr = p.dr;
        }
        dev.launch(BackwardPointwise<Cell, T>{step}, covering(B * H));
        // dL/dh_{t-1} += dg_t W_hh: (B, G*H) x (G*H, R).
        dev.template gemm<T>(false, false, B, R, gh, T(1), step.dgh, gh, p.w_hh.data, p.w_hh.ld, T(1),
                             p.dh[1 - in], R);
      }
    });
  });
  const int last = static_cast<int>(s.steps % 2);  // where the loop left dL/dh_0
  copy2<T>(dev, dense2<const T>(p.dh[last], R), a.dh0, B, R);
  if (p.dc) copy2<T>(dev, dense2<const T>(p.dc, H), a.dc0, B, H);

  // Over all T*B rows. The rows of every step's previous hidden state are T contiguous slots.
  const T* h_prev_rows = h_slot<const T>(a.tape.hs, prev_slot(s.reverse, 0), s, true);
  if (p.dx.data)
    dev.template gemm<T>(false, false, rows, s.input, gh, T(1), p.dgx, gh, p.w_ih.data, p.w_ih.ld,
                         a.accumulate_dx ? T(1) : T(0), p.dx.data, p.dx.ld);
  // A weight gradient (m, n) (+)= A^T B summed over the rows of A (lda apart) and B (ldb apart). With
  // grad_groups Q, the Q groups' gradients one after another: row j of every group at once (a batched
  // GEMM over the groups, K over that row's steps, the leading dimensions times B), the rows of a group
  // adding in row order.
  const Index groups = a.grad_groups, group_rows = B / groups;
  const auto weight_grad = [&](Index m, Index n, const T* a_rows, Index lda, const T* b_rows, Index ldb, T* c,
                               Index ldc) {
    if (groups == 1) {
      dev.template gemm<T>(true, false, m, n, rows, T(1), a_rows, lda, b_rows, ldb,
                           a.accumulate_weight_grads ? T(1) : T(0), c, ldc);
      return;
    }
    for (Index j = 0; j < group_rows; ++j)
      dev.template gemm_batched<T>(true, false, m, n, s.steps, T(1), a_rows + j * lda, B * lda, group_rows * lda,
                                   b_rows + j * ldb, B * ldb, group_rows * ldb,
                                   a.accumulate_weight_grads || j > 0 ? T(1) : T(0), c, ldc, m * ldc, groups);
  };
  weight_grad(gh, s.input, p.dgx, gh, p.x.data, p.x.ld, p.dw_ih.data, p.dw_ih.ld);
  weight_grad(gh, R, p.dgh, gh, h_prev_rows, R, p.dw_hh.data, p.dw_hh.ld);
  // dW_hr (P, H) (+)= dL/dh^T (P, T*B) x r (T*B, H); both are zero at invalid rows.
  if (P > 0) weight_grad(P, H, p.dh_total, P, a.tape.rs, H, p.dw_hr.data, p.dw_hr.ld);
  if (p.ones) {
    dev.launch(Fill<T>{p.ones, rows, T(1)}, covering(rows));
    // db (G*H, 1) (+)= dg^T (G*H, T*B) x ones (T*B, 1).
    if (p.db_ih.data) weight_grad(gh, 1, p.dgx, gh, p.ones, 1, p.db_ih.data, p.db_ih.ld);
    if (p.db_hh.data) weight_grad(gh, 1, p.dgh, gh, p.ones, 1, p.db_hh.data, p.db_hh.ld);
  }
  if (a.dh_norm) {
    const RowNorms<T> norms{p.dh_total, B * R, a.dh_norm};
    dev.launch(norms, LaunchShape{static_cast<unsigned>(s.steps), kBlockThreads, kBlockThreads * sizeof(double)});
  }
  for (const Operand<T>* o : {&p.dx, &p.dw_ih, &p.dw_hh, &p.db_ih, &p.db_hh, &p.dw_hr}) scatter(dev, *o);
}

// ---------------------------------------------------------------------------------------------------
// Input checks.

// *flag (device memory) = 1 when any of data[0..count) is NaN or infinite, else 0.
template <typename T, typename Device>
void flag_non_finite(Device& dev, const T* data, Index count, int* flag) {
  dev.launch(Fill<int>{flag, 1, 0}, covering(1));
  if (count > 0) dev.launch(FlagNonFinite<T>{data, count, flag}, covering(count));
}

}  // namespace fusedrnn::gpu
