// The CUDA backend's kernel bodies (device.h's kernel concept): host/device functions of the thread's
// place in the grid, so the same code runs as a CUDA kernel and in the host emulation. The gate math is
// cells.h's; these only index, mask by length and move values.
//
// Layouts (dense unless a View): the step's input projection `gx` and recurrent projection `hg` are
// (B, G*H) rows, gate k of unit j at column k*H + j; the saved values of a step are (B, S*H), value k of
// unit j at column k*H + j (the tape layout every backend shares, layer.h); states are (B, R) and (B, H)
// slots (R: P with a projection, else H).
#pragma once

#include <cmath>

#include "fusedrnn/cells.h"
#include "fusedrnn/cuda/device.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::gpu {

FUSEDRNN_HD bool row_valid(const View1<const Index>& lengths, Index t, Index b) {
  return lengths.data == nullptr || t < lengths.data[b * lengths.stride];
}

// Slot `index` of the tape's (slots, B, H) states (layer.h, "State slots"): inference keeps two, used
// alternately.
template <typename T>
FUSEDRNN_HD T* state_slot(T* base, Index index, Index state, bool training) {
  return base ? base + (training ? index : (index & 1)) * state : nullptr;
}

// ---------------------------------------------------------------------------------------------------
// Elementwise moves.

// to[i][j][k] = from[i][j][k] over (n0, n1, n2), or zero where from.data is null. Views of any strides:
// gathers a view into a dense buffer, scatters one back, copies states in and out of the tape's slots.
template <typename T>
struct Copy3 {
  View3<const T> from;
  View3<T> to;
  Index n0 = 0, n1 = 0, n2 = 0;

  FUSEDRNN_HD Index phases(unsigned) const { return 1; }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index, unsigned char*) const {
    const Index n = n0 * n1 * n2;
    for (Index e = at.global(); e < n; e += at.grid_threads()) {
      const Index k = e % n2, j = (e / n2) % n1, i = e / (n1 * n2);
      to.data[i * to.stride[0] + j * to.stride[1] + k * to.stride[2]] =
          from.data ? from.data[i * from.stride[0] + j * from.stride[1] + k * from.stride[2]] : T(0);
    }
  }
};

// to[i] = value for i < n.
template <typename T>
struct Fill {
  T* to = nullptr;
  Index n = 0;
  T value = T(0);

  FUSEDRNN_HD Index phases(unsigned) const { return 1; }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index, unsigned char*) const {
    for (Index e = at.global(); e < n; e += at.grid_threads()) to[e] = value;
  }
};

// *flag = 1 when any of data[0..n) is NaN or infinite; untouched otherwise (the caller zeroes it first).
// Every thread that finds one stores the same value, so no atomics are needed.
template <typename T>
struct FlagNonFinite {
  const T* data = nullptr;
  Index n = 0;
  int* flag = nullptr;

  FUSEDRNN_HD Index phases(unsigned) const { return 1; }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index, unsigned char*) const {
    // v - v is exactly 0 for a finite v and NaN for NaN or infinity, on the host and the device alike.
    for (Index e = at.global(); e < n; e += at.grid_threads())
      if (!(data[e] - data[e] == T(0))) *flag = 1;
  }
};

// ---------------------------------------------------------------------------------------------------
// One step of the recurrence for one (row, unit), forward and backward: the per-step kernels below
// and the persistent kernels call these.

template <typename T>
struct ForwardStep {
  Index batch = 0, hidden = 0, t = 0;
  View1<const Index> lengths;
  const T* gx = nullptr;           // (B, G*H): x_t W_ih^T, without biases
  const T* hg = nullptr;           // (B, G*H): h_{t-1} W_hh^T, without biases
  Index hg_ld = 0;                 // row stride of hg
  View1<const T> b_ih, b_hh;       // (G*H) or data null
  const T* h_prev = nullptr;       // (B, H) slot
  const T* c_prev = nullptr;       // (B, H) slot, cells with a cell state
  T* h_next = nullptr;
  T* c_next = nullptr;
  T* saved = nullptr;              // (B, S*H), or null (inference)
  View2<T> y;                      // this step's (B, H) of y
  T cell_clip = T(0);
  // With a projection: the step's (B, H) cell outputs r, written instead of h_next and y (zero at an
  // invalid row, as dW_hr reads them); ProjectedOutput then writes h_next and y from r W_hr^T.
  T* r = nullptr;
};

template <typename Cell, typename T>
FUSEDRNN_HD void forward_unit(const ForwardStep<T>& s, Index b, Index j) {
  const Index H = s.hidden, state = b * H + j;
  const bool projected = Cell::kProjection && s.r != nullptr;  // then the cell reads no h (cells.h)
  const T h_prev = projected ? T(0) : s.h_prev[state];
  const T c_prev = Cell::kHasCellState ? s.c_prev[state] : T(0);
  if (!row_valid(s.lengths, s.t, b)) {  // the state carries over; the output is zero
    if (Cell::kHasCellState) s.c_next[state] = c_prev;
    if (s.saved)  // unread by backward, but the tape is its caller's array too (JAX's NaN checks)
      for (int k = 0; k < Cell::kSaved; ++k) s.saved[(b * Cell::kSaved + k) * H + j] = T(0);
    if (projected) {
      s.r[state] = T(0);
      return;
    }
    s.h_next[state] = h_prev;
    s.y.data[b * s.y.stride[0] + j * s.y.stride[1]] = T(0);
    return;
  }
  T xg[Cell::kGates], hg[Cell::kGates];
  for (int k = 0; k < Cell::kGates; ++k) {
    const Index n = k * H + j;
    xg[k] = s.gx[b * Cell::kGates * H + n] + (s.b_ih.data ? s.b_ih.data[n * s.b_ih.stride] : T(0));
    hg[k] = s.hg[b * s.hg_ld + n] + (s.b_hh.data ? s.b_hh.data[n * s.b_hh.stride] : T(0));
  }
  T saved[Cell::kSaved > 0 ? Cell::kSaved : 1];
  T carry[Cell::kCarried];
  T c = T(0);
  Cell::gates(xg, hg, h_prev, c_prev, s.cell_clip, saved, carry, c);
  const T h = Cell::output(carry, h_prev, c);
  if (Cell::kHasCellState) s.c_next[state] = c;
  if (s.saved)
    for (int k = 0; k < Cell::kSaved; ++k) s.saved[(b * Cell::kSaved + k) * H + j] = saved[k];
  if (projected) {
    s.r[state] = h;
    return;
  }
  s.h_next[state] = h;
  s.y.data[b * s.y.stride[0] + j * s.y.stride[1]] = h;
}

// With a projection, the end of a forward step: h_next (B, P) holds r_t W_hr^T (a GEMM's result, from
// r zero at invalid rows). A valid row copies it to y; an invalid one carries h_prev and writes zeros.
template <typename T>
struct ProjectedOutput {
  Index batch = 0, proj = 0, t = 0;
  View1<const Index> lengths;
  const T* h_prev = nullptr;  // (B, P) slots
  T* h_next = nullptr;
  View2<T> y;                 // this step's (B, P) of y

  FUSEDRNN_HD Index phases(unsigned) const { return 1; }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index, unsigned char*) const {
    const Index e = at.global();
    if (e >= batch * proj) return;
    const Index b = e / proj, j = e % proj;
    T& out = y.data[b * y.stride[0] + j * y.stride[1]];
    if (row_valid(lengths, t, b)) {
      out = h_next[e];
    } else {
      h_next[e] = h_prev[e];
      out = T(0);
    }
  }
};

template <typename T>
struct BackwardStep {
  Index batch = 0, hidden = 0, t = 0;
  View1<const Index> lengths;
  const T* saved = nullptr;        // (B, S*H) as forward wrote it at t
  const T* h_prev = nullptr;       // (B, H) slots read (prev) and written (next) at t by forward
  const T* c_prev = nullptr;
  const T* h_next = nullptr;
  const T* c_next = nullptr;
  View2<const T> dy;               // this step's (B, H) of dy, or data null
  const T* dh_in = nullptr;        // (B, H): the gradient reaching h_t from later steps
  T* dh_out = nullptr;             // (B, H): the part of dL/dh_{t-1} that bypasses W_hh (the GEMM adds the rest)
  T* dc = nullptr;                 // (B, H): dL/dc_t in, dL/dc_{t-1} out; cells with a cell state
  T* dgx = nullptr;                // (B, G*H): gate gradients for W_ih, b_ih, x
  T* dgh = nullptr;                // (B, G*H): for W_hh, b_hh, h; equal to dgx unless the cell splits them
  T* dh_total = nullptr;           // (B, H): dL/dh_t of valid rows, zero elsewhere (the norms' input)
  T cell_clip = T(0);
  // With a projection: the (B, H) gradient of the step's cell outputs r, dh_t W_hr. Then dy, dh_in,
  // dh_out, dh_total and the h slots, all (B, P), are ProjectedStateGrad's and not touched here.
  const T* dr = nullptr;
};

template <typename Cell, typename T>
FUSEDRNN_HD void backward_unit(const BackwardStep<T>& s, Index b, Index j) {
  const Index H = s.hidden, GH = Cell::kGates * H, state = b * H + j;
  const bool projected = Cell::kProjection && s.dr != nullptr;
  if (!row_valid(s.lengths, s.t, b)) {  // an identity step: gradients pass through, no gate gradient
    for (int k = 0; k < Cell::kGates; ++k) {
      s.dgx[b * GH + k * H + j] = T(0);
      if (Cell::kSplitRecurrentGrad) s.dgh[b * GH + k * H + j] = T(0);
    }
    if (!projected) {
      s.dh_out[state] = s.dh_in[state];
      s.dh_total[state] = T(0);
    }
    return;
  }
  const T dh = projected ? s.dr[state]
                         : s.dh_in[state] + (s.dy.data ? s.dy.data[b * s.dy.stride[0] + j * s.dy.stride[1]] : T(0));
  const T dc = Cell::kHasCellState ? s.dc[state] : T(0);
  T saved[Cell::kSaved > 0 ? Cell::kSaved : 1];
  for (int k = 0; k < Cell::kSaved; ++k) saved[k] = s.saved[(b * Cell::kSaved + k) * H + j];
  const T c_prev = Cell::kHasCellState ? s.c_prev[state] : T(0);
  const T c = Cell::kHasCellState ? s.c_next[state] : T(0);
  T dxg[Cell::kGates], dhg[Cell::kGates];
  T dh_prev = T(0), dc_prev = T(0);
  const T h_prev = projected ? T(0) : s.h_prev[state], h = projected ? T(0) : s.h_next[state];
  Cell::backward(saved, h_prev, c_prev, h, c, s.cell_clip, dh, dc, dxg, dhg, dh_prev, dc_prev);
  for (int k = 0; k < Cell::kGates; ++k) {
    s.dgx[b * GH + k * H + j] = dxg[k];
    if (Cell::kSplitRecurrentGrad) s.dgh[b * GH + k * H + j] = dhg[k];
  }
  if (Cell::kHasCellState) s.dc[state] = dc_prev;
  if (projected) return;
  s.dh_out[state] = dh_prev;
  s.dh_total[state] = dh;
}

// With a projection, the start of a backward step, over (B, P): a valid row's whole gradient reaching
// h_t (dh_in + dy_t) into dh_total, whose product with W_hr is the cell's dr and whose rows of every
// step make dW_hr and the norms; dh_out cleared for the W_hh product to add into (the cell routes
// nothing around W_hh). An invalid row passes dh_in through to dh_out and gets zeros in dh_total.
template <typename T>
struct ProjectedStateGrad {
  Index batch = 0, proj = 0, t = 0;
  View1<const Index> lengths;
  View2<const T> dy;       // this step's (B, P) of dy, or data null
  const T* dh_in = nullptr;  // (B, P)
  T* dh_out = nullptr;       // (B, P)
  T* dh_total = nullptr;     // (B, P)

  FUSEDRNN_HD Index phases(unsigned) const { return 1; }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index, unsigned char*) const {
    const Index e = at.global();
    if (e >= batch * proj) return;
    const Index b = e / proj, j = e % proj;
    if (!row_valid(lengths, t, b)) {
      dh_out[e] = dh_in[e];
      dh_total[e] = T(0);
      return;
    }
    dh_total[e] = dh_in[e] + (dy.data ? dy.data[b * dy.stride[0] + j * dy.stride[1]] : T(0));
    dh_out[e] = T(0);
  }
};

// The per-step pointwise kernels: one thread per (row, unit).
template <typename Cell, typename T>
struct ForwardPointwise {
  ForwardStep<T> step;
  FUSEDRNN_HD Index phases(unsigned) const { return 1; }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index, unsigned char*) const {
    const Index e = at.global();
    if (e < step.batch * step.hidden) forward_unit<Cell, T>(step, e / step.hidden, e % step.hidden);
  }
};

template <typename Cell, typename T>
struct BackwardPointwise {
  BackwardStep<T> step;
  FUSEDRNN_HD Index phases(unsigned) const { return 1; }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index, unsigned char*) const {
    const Index e = at.global();
    if (e < step.batch * step.hidden) backward_unit<Cell, T>(step, e / step.hidden, e % step.hidden);
  }
};

// ---------------------------------------------------------------------------------------------------
// norms[r] = sqrt(sum of rows[r][i]^2 over i < width) in double, one block per row, summed in a fixed
// order (each thread its strided share, then a halving tree over the block): the same bits every run.
// Threads per block: a power of two.
template <typename T>
struct RowNorms {
  const T* rows = nullptr;  // (n, width) dense
  Index width = 0;
  double* norms = nullptr;  // (n)

  FUSEDRNN_HD static int log2(unsigned v) {
    int l = 0;
    while ((1u << l) < v) ++l;
    return l;
  }
  FUSEDRNN_HD Index phases(unsigned threads) const { return 1 + log2(threads); }
  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index phase, unsigned char* shared) const {
    double* sums = reinterpret_cast<double*>(shared);
    if (phase == 0) {
      const T* row = rows + static_cast<Index>(at.block) * width;
      double sum = 0.0;
      for (Index i = at.thread; i < width; i += at.threads) sum += static_cast<double>(row[i]) * row[i];
      sums[at.thread] = sum;
      if (at.threads == 1) norms[at.block] = std::sqrt(sum);
      return;
    }
    const unsigned half = at.threads >> phase;
    if (at.thread < half) sums[at.thread] += sums[at.thread + half];
    if (half == 1 && at.thread == 0) norms[at.block] = std::sqrt(sums[0]);
  }
};

}  // namespace fusedrnn::gpu
