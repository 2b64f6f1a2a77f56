// The backend-neutral layer API: one direction of one recurrent layer over a whole sequence, forward
// and backward (backpropagation through time), as plain parameter structs. A backend (cpu/backend.h,
// cuda/layer_impl.h) runs a layer given these; how it shares the work out (threads,
// streams, caches, SIMD) is its own business and appears nowhere here.
//
// Shapes: T steps, B batch rows, I input features, H hidden units, G gate blocks and S values saved per
// unit for backward (cell_facts(cell).gates / .saved, cells.h). Weights are torch.nn's exactly.
// Projection (cells with cell_facts(cell).projection, torch.nn.LSTM's proj_size P, 0 < P < H): the
// hidden state is h = r W_hr^T of the cell's output r = o*tanh(c), so h, y, h0, h_n and their
// gradients have P columns (written R below: P with a projection, else H), W_hh is (G*H, P) and the
// cell state stays (B, H).
//
// Arrays are views: a pointer to element [0, ..., 0] and one element stride (not bytes) per dimension,
// any sign, as NumPy, DLPack and XLA buffers describe them. A backend reads every view as it is; where
// its kernels need a layout a view does not have, the backend makes the copy, not the caller. Input
// views may overlap one another and may use zero strides (broadcast); an output view must not overlap
// any other array of the call, nor itself. The caller owns every array and keeps it alive for the call;
// a backend allocates only its own scratch. The tape (LayerTape) is the exception to "views": forward
// writes it and backward reads it in the fixed dense layout given by tape_layout().
//
// What the computation is:
//  - The input projection x W_ih^T of all T steps is independent of the recurrence (one large GEMM, or
//    any split of it); each step is one recurrent GEMM h W_hh^T for all gates plus the cell's pointwise
//    update (cells.h), with b_ih and b_hh added as torch.nn does (GRU keeps b_hn inside r * (...)).
//  - Backward keeps only the recurrence in its time loop (pointwise backward, dh W_hh); dx, dW_ih,
//    dW_hh and the bias gradients sum over all T*B rows and do not depend on the step order.
//  - A projection adds a GEMM per step each way (h = r W_hr^T; dr = dh W_hr); dW_hr = sum dh^T r
//    over all T*B rows is one GEMM after the loop.
//
// Variable lengths: row b is valid at time t when t < lengths[b]. At an invalid step the state is
// carried unchanged and the output row is zero, so the forward direction ends at the row's own last
// step and the reverse direction starts there. Backward treats invalid steps as identities.
//
// State slots: the hidden (and cell) states live in the tape's `hs` / `cs`, T+1 slots of (B, R) and
// (B, H). The
// forward direction reads slot t and writes slot t+1 at time t; the reverse direction reads t+1 and
// writes t. So slot 0 (forward) or slot T (reverse) holds the initial state, and for both directions
// the T slots read as "previous state" are contiguous, which lets dW_hh be a single GEMM. Without
// training only two slots are kept and used alternately.
#pragma once

#include <cstdint>
#include <limits>

#include "fusedrnn/cells.h"

namespace fusedrnn {

using Index = std::int64_t;

// A view of an (n0, n1, n2) array: element [i][j][k] at data[i*stride[0] + j*stride[1] + k*stride[2]].
// Its shape comes from the LayerShape of the call. T is const for inputs.
template <typename T>
struct View3 {
  T* data = nullptr;
  Index stride[3] = {0, 0, 1};
};

// An (n0, n1) array: element [i][j] at data[i*stride[0] + j*stride[1]].
template <typename T>
struct View2 {
  T* data = nullptr;
  Index stride[2] = {0, 1};
};

// An (n) array: element [i] at data[i*stride].
template <typename T>
struct View1 {
  T* data = nullptr;
  Index stride = 1;
};

// The dense views of an array of the given shape, in C order.
template <typename T>
View3<T> dense(T* data, Index /*n0*/, Index n1, Index n2) { return {data, {n1 * n2, n2, 1}}; }
template <typename T>
View2<T> dense(T* data, Index /*n0*/, Index n1) { return {data, {n1, 1}}; }
template <typename T>
View1<T> dense(T* data) { return {data, 1}; }

// The row stride of a view read as n0*n1 rows of `width` elements (its leading dimensions flattened in
// C order): the last dimension contiguous (or of length 1) and the rows evenly spaced at least a row
// apart, which is what BLAS takes as a leading dimension. -1 when the view is not laid out so.
template <typename T>
Index row_stride(const View3<T>& v, Index n0, Index n1, Index width) {
  if (width > 1 && v.stride[2] != 1) return -1;
  Index ld = width;
  if (n0 > 1 && n1 > 1) {
    if (v.stride[0] != n1 * v.stride[1]) return -1;
    ld = v.stride[1];
  } else if (n0 > 1) {
    ld = v.stride[0];
  } else if (n1 > 1) {
    ld = v.stride[1];
  }
  return ld < width ? -1 : ld;
}

template <typename T>
View3<T> as_view3(const View2<T>& v) { return {v.data, {0, v.stride[0], v.stride[1]}}; }

struct LayerShape {
  Index steps = 0, batch = 0, input = 0, hidden = 0;  // T, B, I, H; each >= 1
  View1<const Index> lengths;  // (B), each in [0, T]; data null: every row has T steps
  bool reverse = false;        // run t = T-1 .. 0
  Index proj = 0;              // P, 0 < P < H, for a projected hidden state; 0: none
  // R: the width of h (and y): P with a projection, else H.
  Index state_size() const { return proj > 0 ? proj : hidden; }
};

template <typename T>
struct LayerWeights {
  View2<const T> w_ih;  // (G*H, I)
  View2<const T> w_hh;  // (G*H, R)
  View1<const T> b_ih;  // (G*H), or data null: no biases (then b_hh is null too)
  View1<const T> b_hh;  // (G*H)
  View2<const T> w_hr;  // (P, H) with a projection, else data null
};

// Where forward leaves what backward needs: dense arrays the caller allocates, best starting on a
// 64-byte boundary (writers of neighbouring ranges of units then share no cache line). Forward writes
// every element backward reads; the caller keeps the tape, x and the weights unchanged until backward
// has run. Training: hs and cs
// hold T+1 slots of (B, R) and (B, H) ("State slots" above), saved (T, B, S*H) the cell's saved values
// (null when S == 0). Inference: hs and cs hold 2 slots, saved is null. cs is null for cells without a
// cell state. With a projection, rs holds the cell's outputs r before W_hr: (T, B, H) in training (slot
// t for time t; backward's dW_hr reads them), one (B, H) slot in inference; null without one.
template <typename T>
struct LayerTape {
  T* hs = nullptr;
  T* cs = nullptr;
  T* saved = nullptr;
  bool training = false;
  T* rs = nullptr;
};

// One array of a direction's tape: `leading` blocks (state slots, or steps) of B rows of `width`
// values. The batch is the middle dimension of every array, so the tape of a batch split by rows into
// several calls is their tapes side by side along it.
struct TapeArray {
  Index leading = 0, batch = 0, width = 0;  // all 0: the call has no such array
  Index values() const { return leading * batch * width; }
};

// The shapes of the tape's arrays for a call, so any caller (an FFI handler declaring its outputs, a
// device allocator, a binding) sizes them from the one rule above.
struct TapeLayout {
  Index slots = 0;  // T+1 (training) or 2
  TapeArray hs;     // (slots, B, R)
  TapeArray cs;     // (slots, B, H) when has_cell_state
  TapeArray saved;  // (T, B, S*H) in training
  TapeArray rs;     // with a projection: (T, B, H) in training, (1, B, H) in inference
  bool has_cell_state = false;
};

inline TapeLayout tape_layout(CellKind cell, const LayerShape& s, bool training) {
  const CellFacts& f = cell_facts(cell);
  TapeLayout l;
  l.slots = training ? s.steps + 1 : 2;
  l.hs = {l.slots, s.batch, s.state_size()};
  if (f.has_cell_state) l.cs = {l.slots, s.batch, s.hidden};
  if (training && f.saved > 0) l.saved = {s.steps, s.batch, f.saved * s.hidden};
  if (s.proj > 0) l.rs = {training ? s.steps : 1, s.batch, s.hidden};
  l.has_cell_state = f.has_cell_state;
  return l;
}

// Direction d's tape where arrays hold every direction's back to back (each `layout`'s count of values a
// direction); an array the layout has no values for is null, whatever pointer is given.
template <typename T>
LayerTape<T> direction_tape(const TapeLayout& layout, Index d, bool training, T* hs, T* cs, T* saved, T* rs) {
  auto at = [d](T* base, Index values) { return values > 0 && base ? base + d * values : nullptr; };
  return {at(hs, layout.hs.values()), at(cs, layout.cs.values()), at(saved, layout.saved.values()), training,
          at(rs, layout.rs.values())};
}

// The slot of the state read (prev) and written (next) at time t: see "State slots" above.
FUSEDRNN_HD Index prev_slot(bool reverse, Index t) { return reverse ? t + 1 : t; }
FUSEDRNN_HD Index next_slot(bool reverse, Index t) { return reverse ? t : t + 1; }

template <typename T>
struct LayerForwardParams {
  CellKind cell = CellKind::kLstm;
  LayerShape shape;
  LayerWeights<T> weights;
  View3<const T> x;   // (T, B, I)
  View2<const T> h0;  // (B, R), or data null: zeros
  View2<const T> c0;  // (B, H), or data null: zeros; cells with a cell state only
  // Outputs, written (every element).
  View3<T> y;         // (T, B, R): h_t of every step, zero at invalid steps; often one direction's R
                      // columns of a (T, B, 2R) layer output
  View2<T> h_n;       // (B, R): each row's final hidden state
  View2<T> c_n;       // (B, H), data null for cells without a cell state
  LayerTape<T> tape;  // written
  T cell_clip = std::numeric_limits<T>::infinity();  // LSTM: bound on |c| (cells.h); +inf: none
};

template <typename T>
struct LayerBackwardParams {
  CellKind cell = CellKind::kLstm;
  LayerShape shape;         // as in forward
  LayerWeights<T> weights;  // as in forward
  View3<const T> x;         // (T, B, I), as in forward
  LayerTape<T> tape;        // as forward filled it, with training = true; read only
  View3<const T> dy;        // (T, B, R) gradient of y, or data null: zero
  View2<const T> dh_n;      // (B, R), or data null: zero
  View2<const T> dc_n;      // (B, H), or data null: zero; cells with a cell state only
  // Outputs. Accumulated (+=): dx and the weight and bias gradients, unless their accumulate_ flag is
  // false. Written: dh0, dc0, dh_norm.
  View3<T> dx;              // (T, B, I), or data null: not wanted
  bool accumulate_dx = true;  // false: dx is written, so its old values are never read
  bool accumulate_weight_grads = true;  // false: dw_*, db_* are written, their old values never read
  View2<T> dh0;             // (B, R), or data null
  View2<T> dc0;             // (B, H), or data null; cells with a cell state only
  View2<T> dw_ih;           // (G*H, I), required
  View2<T> dw_hh;           // (G*H, R), required
  View1<T> db_ih;           // (G*H): required when the layer has biases, else null
  View1<T> db_hh;           // (G*H): as db_ih
  View2<T> dw_hr;           // (P, H): required with a projection, else null
  double* dh_norm = nullptr;  // (T) dense, or null: L2 norm over (B, R) of dL/dh_t (valid rows), time order
  T cell_clip = std::numeric_limits<T>::infinity();  // as in forward
  // Weight and bias gradients per group of rows (per-sample gradients in one call): with grad_groups =
  // Q > 1, the batch's rows form Q consecutive groups of B/Q rows, and dw_ih, dw_hh, dw_hr, db_ih and
  // db_hh each hold Q gradients one after another, dense ((Q*G*H, I), (Q*G*H, R), (Q*P, H), (Q*G*H)),
  // each summed over its group's rows alone.
  Index grad_groups = 1;
};

}  // namespace fusedrnn
