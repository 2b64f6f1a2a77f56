#include "fusedrnn/recurrence.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "fusedrnn/blas.h"
#include "fusedrnn/cells.h"

// The pointwise passes are compiled for several x86-64 levels and the best one the CPU supports is
// picked when the library loads (GCC function multiversioning), so one binary runs everywhere and uses
// AVX-512 or AVX2 where present.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSEDRNN_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSEDRNN_ISA_CLONES
#endif

namespace fusedrnn {
namespace {

using Index = std::int64_t;

// Scratch buffers, uninitialised (the core writes every element before reading it) and kept per thread
// between calls: a fresh multi-megabyte allocation is a fresh mmap whose page faults and zeroing cost
// ~15% of an LSTM training step. Each buffer a call needs has its own ScratchSlot.
enum class ScratchSlot { kGatesX, kGatesH, kWhhT, kGradGatesX, kGradGatesH, kGradState, kGradCell, kCount };

template <typename T>
T* scratch(ScratchSlot slot, Index n) {
  struct Buffer {
    std::unique_ptr<T[]> data;
    Index capacity = 0;
  };
  thread_local Buffer buffers[static_cast<int>(ScratchSlot::kCount)];
  Buffer& b = buffers[static_cast<int>(slot)];
  if (n > b.capacity) {
    b.data.reset();  // release before allocating, so peak memory is not old + new
    b.data.reset(new T[static_cast<std::size_t>(n)]);
    b.capacity = n;
  }
  return b.data.get();
}

template <typename T>
void copy_or_zero(T* dst, const T* src, Index n) {
  if (src)
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  else
    std::fill(dst, dst + n, T(0));
}

inline bool step_valid(const Index* lengths, Index b, Index t) { return !lengths || t < lengths[b]; }

// Slot of the state read (previous) and written (next) at time t; see "State slots" in the header.
inline Index prev_slot(bool reverse, Index t) { return reverse ? t + 1 : t; }
inline Index next_slot(bool reverse, Index t) { return reverse ? t : t + 1; }

template <typename T>
struct StateSlots {
  T* base;
  Index stride;  // B*H
  bool training;
  T* at(Index slot) const { return base ? base + (training ? slot : (slot & 1)) * stride : nullptr; }
};

// One time step of the fused forward pointwise pass over all rows: biases, activations, state update,
// the output row and what backward needs.
template <typename Cell, typename T>
FUSEDRNN_ISA_CLONES void forward_pointwise(Index batch, Index hidden, const Index* lengths, Index t,
                                           const T* __restrict gx, const T* __restrict gh,
                                           const T* __restrict b_hh, const T* __restrict h_prev,
                                           const T* __restrict c_prev, T* __restrict h_next,
                                           T* __restrict c_next, T* __restrict saved, T* __restrict y,
                                           Index ldy) {
  constexpr int G = Cell::kGates;
  constexpr int S = Cell::kSaved > 0 ? Cell::kSaved : 1;
  const Index gh_width = G * hidden;
  for (Index b = 0; b < batch; ++b) {
    const T* hp = h_prev + b * hidden;
    T* hn = h_next + b * hidden;
    T* yr = y + b * ldy;
    if (!step_valid(lengths, b, t)) {
      std::copy(hp, hp + hidden, hn);
      if constexpr (Cell::kHasCellState)
        std::copy(c_prev + b * hidden, c_prev + (b + 1) * hidden, c_next + b * hidden);
      std::fill(yr, yr + hidden, T(0));
      continue;
    }
    const T* xr = gx + b * gh_width;
    const T* hr = gh + b * gh_width;
    for (Index j = 0; j < hidden; ++j) {
      T xg[G], hg[G], sv[S];
      for (int k = 0; k < G; ++k) {
        xg[k] = xr[k * hidden + j];
        hg[k] = hr[k * hidden + j] + b_hh[k * hidden + j];
      }
      T h, c = T(0);
      T cp = T(0);
      if constexpr (Cell::kHasCellState) cp = c_prev[b * hidden + j];
      Cell::forward(xg, hg, hp[j], cp, sv, h, c);
      if constexpr (Cell::kSaved > 0)
        for (int k = 0; k < Cell::kSaved; ++k) saved[(b * Cell::kSaved + k) * hidden + j] = sv[k];
      if constexpr (Cell::kHasCellState) c_next[b * hidden + j] = c;
      hn[j] = h;
      yr[j] = h;
    }
  }
}

// One time step of the fused backward pointwise pass: gate gradients for this step and the parts of the
// previous states' gradients that do not go through W_hh. An invalid step passes dh and dc through.
template <typename Cell, typename T>
FUSEDRNN_ISA_CLONES void backward_pointwise(Index batch, Index hidden, const Index* lengths, Index t,
                                            const T* __restrict saved, const T* __restrict h_prev,
                                            const T* __restrict c_prev, const T* __restrict h_next,
                                            const T* __restrict c_next, const T* __restrict dy,
                                            Index lddy, const T* __restrict dh, T* __restrict dc,
                                            T* __restrict dgx, T* __restrict dgh,
                                            T* __restrict dh_prev) {
  constexpr int G = Cell::kGates;
  constexpr int S = Cell::kSaved > 0 ? Cell::kSaved : 1;
  const Index gh_width = G * hidden;
  for (Index b = 0; b < batch; ++b) {
    const Index row = b * hidden;
    T* dgx_r = dgx + b * gh_width;
    T* dgh_r = dgh + b * gh_width;
    if (!step_valid(lengths, b, t)) {
      std::fill(dgx_r, dgx_r + gh_width, T(0));
      if constexpr (Cell::kSplitRecurrentGrad) std::fill(dgh_r, dgh_r + gh_width, T(0));
      std::copy(dh + row, dh + row + hidden, dh_prev + row);
      continue;
    }
    const T* dyr = dy + b * lddy;
    for (Index j = 0; j < hidden; ++j) {
      T sv[S], dxg[G], dhg[G];
      if constexpr (Cell::kSaved > 0)
        for (int k = 0; k < Cell::kSaved; ++k) sv[k] = saved[(b * Cell::kSaved + k) * hidden + j];
      T cp = T(0), cn = T(0), dcn = T(0);
      if constexpr (Cell::kHasCellState) {
        cp = c_prev[row + j];
        cn = c_next[row + j];
        dcn = dc[row + j];
      }
      T dhp, dcp;
      Cell::backward(sv, h_prev[row + j], cp, h_next[row + j], cn, dh[row + j] + dyr[j], dcn, dxg, dhg,
                     dhp, dcp);
      for (int k = 0; k < G; ++k) dgx_r[k * hidden + j] = dxg[k];
      if constexpr (Cell::kSplitRecurrentGrad)
        for (int k = 0; k < G; ++k) dgh_r[k * hidden + j] = dhg[k];
      dh_prev[row + j] = dhp;
      if constexpr (Cell::kHasCellState) dc[row + j] = dcp;
    }
  }
}

// out[k] += sum over rows of m[r, k], accumulated in double so long sequences lose no precision.
template <typename T>
void add_column_sums(const T* m, Index rows, Index cols, T* out) {
  std::vector<double> acc(static_cast<std::size_t>(cols), 0.0);
  for (Index r = 0; r < rows; ++r)
    for (Index k = 0; k < cols; ++k) acc[k] += m[r * cols + k];
  for (Index k = 0; k < cols; ++k) out[k] += static_cast<T>(acc[k]);
}

template <typename Cell, typename T>
void forward_impl(const LayerForwardArgs<T>& a) {
  const LayerShape& s = a.shape;
  const Index steps = s.steps, batch = s.batch, input = s.input, hidden = s.hidden;
  const Index gh_width = Cell::kGates * hidden;
  const Index state = batch * hidden;

  std::vector<T> zero_bias;
  if (!a.weights.b_ih || !a.weights.b_hh) zero_bias.assign(static_cast<std::size_t>(gh_width), T(0));
  const T* b_hh = a.weights.b_hh ? a.weights.b_hh : zero_bias.data();

  // Input projection of all steps at once: gx = x W_ih^T + b_ih, (T*B, G*H).
  T* gx = scratch<T>(ScratchSlot::kGatesX, steps * batch * gh_width);
  if (a.weights.b_ih)
    for (Index r = 0; r < steps * batch; ++r)
      std::copy(a.weights.b_ih, a.weights.b_ih + gh_width, gx + r * gh_width);
  blas::gemm<T>(false, true, steps * batch, gh_width, input, T(1), a.x, input, a.weights.w_ih, input,
                a.weights.b_ih ? T(1) : T(0), gx, gh_width);

  // W_hh^T (H, G*H), so each step's GEMM reads its weights untransposed: OpenBLAS packs that operand
  // faster than a transposed one, which matters when the per-step GEMM is small (measured: B=1, H=128
  // 4.7 vs 5.4 us; B=32, H=256 130 vs 143 us).
  T* w_hh_t = scratch<T>(ScratchSlot::kWhhT, hidden * gh_width);
  for (Index r = 0; r < gh_width; ++r)
    for (Index k = 0; k < hidden; ++k) w_hh_t[k * gh_width + r] = a.weights.w_hh[r * hidden + k];

  T* gh = scratch<T>(ScratchSlot::kGatesH, batch * gh_width);
  const StateSlots<T> hs{a.tape.hs, state, a.tape.training};
  const StateSlots<T> cs{a.tape.cs, state, a.tape.training};
  const Index first = s.reverse ? steps : 0;
  copy_or_zero(hs.at(first), a.h0, state);
  if constexpr (Cell::kHasCellState) copy_or_zero(cs.at(first), a.c0, state);
  const Index saved_step = batch * Cell::kSaved * hidden;

  for (Index i = 0; i < steps; ++i) {
    const Index t = s.reverse ? steps - 1 - i : i;
    const T* h_prev = hs.at(prev_slot(s.reverse, t));
    blas::gemm<T>(false, false, batch, gh_width, hidden, T(1), h_prev, hidden, w_hh_t, gh_width,
                  T(0), gh, gh_width);
    T* saved = a.tape.saved ? a.tape.saved + (a.tape.training ? t * saved_step : 0) : nullptr;
    forward_pointwise<Cell, T>(batch, hidden, s.lengths, t, gx + t * batch * gh_width, gh,
                               b_hh, h_prev, cs.at(prev_slot(s.reverse, t)), hs.at(next_slot(s.reverse, t)),
                               cs.at(next_slot(s.reverse, t)), saved, a.y + t * batch * a.ldy, a.ldy);
  }

  const Index last = s.reverse ? 0 : steps;
  copy_or_zero(a.h_n, hs.at(last), state);
  if constexpr (Cell::kHasCellState) copy_or_zero(a.c_n, cs.at(last), state);
}

template <typename Cell, typename T>
void backward_impl(const LayerBackwardArgs<T>& a) {
  const LayerShape& s = a.shape;
  const Index steps = s.steps, batch = s.batch, input = s.input, hidden = s.hidden;
  const Index gh_width = Cell::kGates * hidden;
  const Index state = batch * hidden;
  if (!a.tape.training) throw std::logic_error("fusedrnn: backward needs a tape recorded in training");

  T* dgx = scratch<T>(ScratchSlot::kGradGatesX, steps * batch * gh_width);
  T* dgh = Cell::kSplitRecurrentGrad ? scratch<T>(ScratchSlot::kGradGatesH, steps * batch * gh_width) : dgx;

  // Running gradients of the hidden state (two buffers: the step reads one and writes the other) and
  // of the cell state (updated in place).
  T* dh = scratch<T>(ScratchSlot::kGradState, 2 * state);
  T* dh_other = dh + state;
  copy_or_zero(dh, a.dh_n, state);
  T* dc = Cell::kHasCellState ? scratch<T>(ScratchSlot::kGradCell, state) : nullptr;
  if constexpr (Cell::kHasCellState) copy_or_zero(dc, a.dc_n, state);

  // Without dy every step reads one row of zeros (row stride 0).
  std::vector<T> zero_row;
  const T* dy = a.dy;
  Index lddy = a.lddy;
  if (!dy) {
    zero_row.assign(static_cast<std::size_t>(hidden), T(0));
    dy = zero_row.data();
    lddy = 0;
  }

  const StateSlots<T> hs{a.tape.hs, state, true};
  const StateSlots<T> cs{a.tape.cs, state, true};
  const Index saved_step = batch * Cell::kSaved * hidden;
  for (Index i = 0; i < steps; ++i) {
    const Index t = s.reverse ? i : steps - 1 - i;
    const Index prev = prev_slot(s.reverse, t), next = next_slot(s.reverse, t);
    T* dgx_t = dgx + t * batch * gh_width;
    T* dgh_t = dgh + t * batch * gh_width;
    backward_pointwise<Cell, T>(batch, hidden, s.lengths, t,
                                a.tape.saved ? a.tape.saved + t * saved_step : nullptr, hs.at(prev),
                                cs.at(prev), hs.at(next), cs.at(next), dy + t * batch * lddy, lddy, dh,
                                dc, dgx_t, dgh_t, dh_other);
    blas::gemm<T>(false, false, batch, hidden, gh_width, T(1), dgh_t, gh_width, a.weights.w_hh, hidden,
                  T(1), dh_other, hidden);
    std::swap(dh, dh_other);
  }
  if (a.dh0) std::memcpy(a.dh0, dh, static_cast<std::size_t>(state) * sizeof(T));
  if constexpr (Cell::kHasCellState)
    if (a.dc0) std::memcpy(a.dc0, dc, static_cast<std::size_t>(state) * sizeof(T));

  // Everything that does not feed the recurrence, as GEMMs over all T*B rows.
  const Index rows = steps * batch;
  if (a.dx)
    blas::gemm<T>(false, false, rows, input, gh_width, T(1), dgx, gh_width, a.weights.w_ih, input,
                  T(1), a.dx, input);
  blas::gemm<T>(true, false, gh_width, input, rows, T(1), dgx, gh_width, a.x, input, T(1), a.dw_ih,
                input);
  const T* h_prev_rows = hs.at(prev_slot(s.reverse, 0));  // slot 0 (forward) or 1 (reverse)
  blas::gemm<T>(true, false, gh_width, hidden, rows, T(1), dgh, gh_width, h_prev_rows, hidden, T(1),
                a.dw_hh, hidden);
  if (a.db_ih) add_column_sums(dgx, rows, gh_width, a.db_ih);
  if (a.db_hh) add_column_sums(dgh, rows, gh_width, a.db_hh);
}

// Calls f.template operator()<Cell>() for the cell type behind `kind`.
template <typename F>
void with_cell(CellKind kind, F&& f) {
  switch (kind) {
    case CellKind::kRnnTanh: return f(RnnCell<Nonlinearity::kTanh>{});
    case CellKind::kRnnRelu: return f(RnnCell<Nonlinearity::kRelu>{});
    case CellKind::kGru: return f(GruCell{});
    case CellKind::kLstm: return f(LstmCell{});
  }
  throw std::invalid_argument("fusedrnn: unknown cell kind");
}

}  // namespace

int gate_count(CellKind cell) {
  int g = 0;
  with_cell(cell, [&](auto c) { g = decltype(c)::kGates; });
  return g;
}

int saved_per_unit(CellKind cell) {
  int n = 0;
  with_cell(cell, [&](auto c) { n = decltype(c)::kSaved; });
  return n;
}

bool has_cell_state(CellKind cell) {
  bool v = false;
  with_cell(cell, [&](auto c) { v = decltype(c)::kHasCellState; });
  return v;
}

bool split_recurrent_grad(CellKind cell) {
  bool v = false;
  with_cell(cell, [&](auto c) { v = decltype(c)::kSplitRecurrentGrad; });
  return v;
}

template <typename T>
void layer_forward(const LayerForwardArgs<T>& args) {
  with_cell(args.cell, [&](auto c) { forward_impl<decltype(c), T>(args); });
}

template <typename T>
void layer_backward(const LayerBackwardArgs<T>& args) {
  with_cell(args.cell, [&](auto c) { backward_impl<decltype(c), T>(args); });
}

template void layer_forward<float>(const LayerForwardArgs<float>&);
template void layer_forward<double>(const LayerForwardArgs<double>&);
template void layer_backward<float>(const LayerBackwardArgs<float>&);
template void layer_backward<double>(const LayerBackwardArgs<double>&);

}  // namespace fusedrnn
