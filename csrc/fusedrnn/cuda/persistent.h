// The persistent kernels: the whole recurrence in one cooperative launch, forward and backward, for
// small batches, where a step's GEMM is too small to fill the GPU and each launch's latency would
// dominate. Block q owns a contiguous range of hidden units and keeps a slice of W_hh in shared memory
// for the whole sequence (read from global memory once); each step has one grid-wide barrier.
//
// Forward: the slice is its units' G gate rows, stored transposed, (H, G*units). Its phases (device.h):
//   0          load its slice of W_hh into shared memory                     then a block barrier
//   1 + 2i     step i's recurrent projection for its units, hg = h_{t-1} W_hh^T from shared memory:
//              each (row, gate row)'s sum over H split into `parts` consecutive ranges, one thread
//              each, where threads would otherwise idle (small B * G * units); whole sums go to hg,
//              partial sums to shared memory                                  then a block barrier
//   2 + 2i     step i's pointwise update of its units: hg = the partial sums added in order (where
//              split), then forward_unit                                      then a GRID barrier
// so every unit of h_t is written before any block reads it. The input projection is the per-step
// path's one GEMM before the launch.
//
// Backward: the slice is its units' columns over all G*H gate rows, (G*H, units). Its phases:
//   0          load its slice of W_hh into shared memory                     then a block barrier
//   1 + 3i     step i's (reverse processing order) pointwise backward of its units (backward_unit):
//              its units' gate gradients and the part of dL/dh_{t-1} bypassing W_hh
//                                                                           then a GRID barrier
//   2 + 3i     dg_t W_hh for its units from shared memory, each (row, unit)'s sum over the G*H gate
//              rows split into `parts` consecutive ranges, one thread each, where threads would
//              otherwise idle (small B * units); the partial sums in shared memory  then a block barrier
//   3 + 3i     dL/dh_{t-1} of its units += the partial sums, added in order      then a block barrier
// so every gate row's gradient is written before any block reads it; dL/dh and dL/dc of a unit are
// only ever read and written by its own block. Every sum has a fixed order: the same bits every run. dx and the weight and bias gradients are the per-step
// path's GEMMs after the launch.
#pragma once

#include "fusedrnn/cells.h"
#include "fusedrnn/cuda/device.h"
#include "fusedrnn/cuda/kernels.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::gpu {

struct PersistentShape {
  unsigned blocks = 0;  // 0: the layer does not run persistently
  unsigned threads = kBlockThreads;
  Index units = 0;      // hidden units per block (the last block may have fewer)
  Index parts = 1;      // threads sharing each of a step's sums (forward over H, backward over the gate rows)
  std::size_t shared_bytes = 0;
  LaunchShape launch() const { return {blocks, threads, shared_bytes}; }
};

template <typename Cell, typename T>
struct PersistentForward {
  ForwardStep<T> step;  // the fields every step shares; t, gx, slots, saved and y set per step
  Index steps = 0;
  bool reverse = false;
  const T* gx = nullptr;       // (T*B, G*H)
  View2<const T> w_hh;         // (G*H, H), rows evenly spaced
  T* hg = nullptr;             // (B, G*H): each block writes and reads its own units' columns
  T* hs = nullptr;             // the tape's state slots
  T* cs = nullptr;
  T* saved = nullptr;          // (T, B, S*H) or null
  bool training = false;
  View3<T> y;
  PersistentShape shape;

  FUSEDRNN_HD Index phases(unsigned) const { return 1 + 2 * steps; }
  FUSEDRNN_HD bool grid_barrier_after(Index phase) const { return phase > 0 && phase % 2 == 0; }

  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index phase, unsigned char* shared) const {
    const Index H = step.hidden, B = step.batch, G = Cell::kGates;
    const Index u0 = static_cast<Index>(at.block) * shape.units;
    const Index u1 = u0 + shape.units < H ? u0 + shape.units : H;
    const Index units = u1 > u0 ? u1 - u0 : 0;
    // (H, G*units): column k*units + j is gate k of unit u0 + j, so the threads of a warp, each on its
    // own gate row, read consecutive words (no bank conflicts).
    T* w = reinterpret_cast<T*>(shared);
    const Index rows = G * units;
    if (phase == 0) {
      for (Index e = at.thread; e < rows * H; e += at.threads) {
        const Index q = e / rows, r = e % rows;
        w[e] = w_hh.data[((r / units) * H + u0 + r % units) * w_hh.stride[0] + q * w_hh.stride[1]];
      }
      return;
    }
    const Index i = (phase - 1) / 2;
    const Index t = reverse ? steps - 1 - i : i;
    const Index state = B * H;
    const T* h_prev = state_slot<T>(hs, prev_slot(reverse, t), state, training);
    const Index items = B * rows, parts = shape.parts;  // item e: row e / rows, gate row e % rows
    T* partial = w + H * G * shape.units;                // (parts, items) beside the slice, where parts > 1
    if (phase % 2 == 1) {
      for (Index e = at.thread; e < parts * items; e += at.threads) {
        const Index k = e / items, b = e % items / rows, r = e % rows;
        const T* h = h_prev + b * H;
        const Index q1 = (k + 1) * H / parts;
        T sum = T(0);
        for (Index q = k * H / parts; q < q1; ++q) sum += h[q] * w[q * rows + r];
        if (parts == 1)
          hg[b * G * H + (r / units) * H + u0 + r % units] = sum;
        else
          partial[e] = sum;
      }
      return;
    }
    ForwardStep<T> s = step;
    s.t = t;
    s.gx = gx + t * B * G * H;
    s.hg = hg;
    s.hg_ld = G * H;
    s.h_prev = h_prev;
    s.c_prev = state_slot<T>(cs, prev_slot(reverse, t), state, training);
    s.h_next = state_slot<T>(hs, next_slot(reverse, t), state, training);
    s.c_next = state_slot<T>(cs, next_slot(reverse, t), state, training);
    s.saved = saved ? saved + t * B * Cell::kSaved * H : nullptr;
    s.y = {y.data + t * y.stride[0], {y.stride[1], y.stride[2]}};
    for (Index e = at.thread; e < B * units; e += at.threads) {
      const Index b = e / units, j = e % units;
      if (parts > 1) {
        for (Index g = 0; g < G; ++g) {
          const Index item = b * rows + g * units + j;
          T sum = partial[item];
          for (Index k = 1; k < parts; ++k) sum += partial[k * items + item];
          hg[b * G * H + g * H + u0 + j] = sum;
        }
      }
      forward_unit<Cell, T>(s, b, u0 + j);
    }
  }
};

// How a call runs its recurrence. kAuto: persistently where the layer is small and the kernel fits,
// else per step; tests force either (a forced persistent path that does not fit still runs per step).
enum class RecurrencePath { kAuto, kPerStep, kPersistent };

// Where 'auto' runs persistently: small batches, where the per-step path's GEMMs leave most of the GPU
// idle and launch latency dominates a step, and small layers, since each thread's dot products run the
// whole of H serially. The bounds are where it leads the per-step path (bench/NOTES.md, "CUDA backend
// on an H200").
constexpr Index kPersistentMaxBatch = 16;
constexpr Index kPersistentMaxHidden = 256;

// The blocks and each one's units and W_hh slice for this layer, or blocks = 0 where the persistent
// kernels should not or cannot run: every block's slice must fit its shared memory. They keep no W_hr,
// so a projected layer (LayerShape::proj) runs per step.
template <typename Cell, typename T, typename Device>
PersistentShape persistent_slices(Device& dev, const LayerShape& s, RecurrencePath path) {
  PersistentShape p;
  if (path == RecurrencePath::kPerStep ||
      (path == RecurrencePath::kAuto && (s.batch > kPersistentMaxBatch || s.hidden > kPersistentMaxHidden)))
    return p;
  if (s.proj > 0) return p;
  const std::size_t row_bytes = static_cast<std::size_t>(Cell::kGates) * s.hidden * sizeof(T);
  const Index max_units = static_cast<Index>(dev.max_shared_bytes() / row_bytes);
  if (max_units < 1) return p;
  // A block per multiprocessor, so each step's dot products run on all of them; more blocks with
  // fewer units each only where a slice would not fit.
  const Index spread = s.hidden < dev.multiprocessors() ? s.hidden : dev.multiprocessors();
  Index units = (s.hidden + spread - 1) / spread;
  if (units > max_units) units = max_units;
  const Index blocks = (s.hidden + units - 1) / units;
  units = (s.hidden + blocks - 1) / blocks;
  p.blocks = static_cast<unsigned>(blocks);
  p.units = units;
  p.shared_bytes = static_cast<std::size_t>(units) * row_bytes;
  return p;
}

// Completes a kernel's shape: each block's `items` sums of `terms` terms split over as many of its
// threads as are free (at most one term a part) while the partial sums fit beside the slice; blocks = 0
// where the kernel cannot have every block resident at once (occupancy).
template <typename Kernel, typename T, typename Device>
PersistentShape with_split_sums(Device& dev, PersistentShape p, Index items, Index terms) {
  if (p.blocks == 0) return p;
  const std::size_t part_bytes = static_cast<std::size_t>(items) * sizeof(T);
  Index parts = static_cast<Index>(p.threads) / items;
  const Index by_shared = static_cast<Index>((dev.max_shared_bytes() - p.shared_bytes) / part_bytes);
  if (parts > by_shared) parts = by_shared;
  if (parts > terms) parts = terms;
  if (parts > 1) {
    p.parts = parts;
    p.shared_bytes += static_cast<std::size_t>(parts) * part_bytes;
  }
  if (dev.template cooperative_blocks<Kernel>(p.threads, p.shared_bytes) < p.blocks) p.blocks = 0;
  return p;
}

// The persistent forward kernel's shape: its sums over H for B rows x G*units gate rows a block.
template <typename Cell, typename T, typename Device>
PersistentShape persistent_shape(Device& dev, const LayerShape& s, RecurrencePath path) {
  const PersistentShape p = persistent_slices<Cell, T>(dev, s, path);
  return with_split_sums<PersistentForward<Cell, T>, T>(dev, p, s.batch * Cell::kGates * p.units, s.hidden);
}

// The backward recurrence (phases above). dy, the tape and the buffers are the per-step path's.
template <typename Cell, typename T>
struct PersistentBackward {
  BackwardStep<T> step;  // the fields every step shares; t, the tape's values, dy and the buffers set per step
  Index steps = 0;
  bool reverse = false;
  View2<const T> w_hh;   // (G*H, H), rows evenly spaced
  const T* hs = nullptr;     // the tape (training): T+1 state slots
  const T* cs = nullptr;
  const T* saved = nullptr;  // (T, B, S*H)
  View3<const T> dy;         // (T, B, H), or data null
  T* dh[2] = {};             // (B, H) each: dL/dh entering processing step i is dh[i % 2], leaving it the other
  T* dgx = nullptr;          // (T*B, G*H)
  T* dgh = nullptr;          // (T*B, G*H), or dgx
  T* dh_total = nullptr;     // (T, B*H)
  PersistentShape shape;

  FUSEDRNN_HD Index phases(unsigned) const { return 1 + 3 * steps; }
  FUSEDRNN_HD bool grid_barrier_after(Index phase) const { return phase % 3 == 1; }

  FUSEDRNN_HD void operator()(const ThreadIndex& at, Index phase, unsigned char* shared) const {
    const Index H = step.hidden, B = step.batch, GH = Cell::kGates * H;
    const Index u0 = static_cast<Index>(at.block) * shape.units;
    const Index u1 = u0 + shape.units < H ? u0 + shape.units : H;
    const Index units = u1 > u0 ? u1 - u0 : 0;
    T* w = reinterpret_cast<T*>(shared);  // (G*H, units): w[r * units + j] = W_hh[r][u0 + j]
    if (phase == 0) {
      for (Index e = at.thread; e < GH * units; e += at.threads)
        w[e] = w_hh.data[(e / units) * w_hh.stride[0] + (u0 + e % units) * w_hh.stride[1]];
      return;
    }
    const Index i = (phase - 1) / 3, t = reverse ? i : steps - 1 - i;
    const int kind = static_cast<int>((phase - 1) % 3);
    const Index items = B * units, parts = shape.parts;  // item e: row e / units, unit u0 + e % units
    T* dh_out = dh[1 - i % 2];
    T* partial = w + GH * shape.units;  // (parts, items) beside the slice, where parts > 1
    if (kind == 1) {
      for (Index e = at.thread; e < parts * items; e += at.threads) {
        const Index k = e / items, b = e % items / units, j = e % units;
        const T* g = dgh + (t * B + b) * GH;
        const Index r1 = (k + 1) * GH / parts;
        T sum = T(0);
        for (Index r = k * GH / parts; r < r1; ++r) sum += g[r] * w[r * units + j];
        if (parts == 1)
          dh_out[b * H + u0 + j] += sum;
        else
          partial[e] = sum;
      }
      return;
    }
    if (kind == 2) {
      if (parts == 1) return;
      for (Index e = at.thread; e < items; e += at.threads) {
        T sum = partial[e];
        for (Index k = 1; k < parts; ++k) sum += partial[k * items + e];
        dh_out[e / units * H + u0 + e % units] += sum;
      }
      return;
    }
    const Index state = B * H;
    BackwardStep<T> s = step;
    s.t = t;
    s.saved = saved ? saved + t * B * Cell::kSaved * H : nullptr;
    s.h_prev = state_slot<const T>(hs, prev_slot(reverse, t), state, true);
    s.c_prev = state_slot<const T>(cs, prev_slot(reverse, t), state, true);
    s.h_next = state_slot<const T>(hs, next_slot(reverse, t), state, true);
    s.c_next = state_slot<const T>(cs, next_slot(reverse, t), state, true);
    s.dy = {dy.data ? dy.data + t * dy.stride[0] : nullptr, {dy.stride[1], dy.stride[2]}};
    s.dh_in = dh[i % 2];
    s.dh_out = dh_out;
    s.dgx = dgx + t * B * GH;
    s.dgh = dgh + t * B * GH;
    s.dh_total = dh_total + t * state;
    for (Index e = at.thread; e < B * units; e += at.threads) backward_unit<Cell, T>(s, e / units, u0 + e % units);
  }
};

// The persistent backward kernel's shape: the forward's slices (the same units x G*H values of W_hh,
// only transposed), its sums over the G*H gate rows for B rows x units a block.
template <typename Cell, typename T, typename Device>
PersistentShape persistent_backward_shape(Device& dev, const LayerShape& s, RecurrencePath path) {
  const PersistentShape p = persistent_slices<Cell, T>(dev, s, path);
  return with_split_sums<PersistentBackward<Cell, T>, T>(dev, p, s.batch * p.units, Cell::kGates * s.hidden);
}

}  // namespace fusedrnn::gpu
