// The persistent forward kernel: the whole recurrence in one cooperative launch, for small batches,
// where a step's GEMM is too small to fill the GPU and each launch's latency would dominate.
//
// Block q owns a contiguous range of hidden units and keeps those units' G gate rows of W_hh in shared
// memory for the whole sequence (read from global memory once). Its phases (device.h):
//   0          load its slice of W_hh into shared memory                     then a block barrier
//   1 + 2i     step i's recurrent projection for its units: hg = h_{t-1} W_hh^T, from shared memory
//                                                                           then a block barrier
//   2 + 2i     step i's pointwise update of its units (forward_unit)          then a GRID barrier
// so each step has one grid-wide barrier: every unit of h_t is written before any block reads it.
// The input projection is the per-step path's one GEMM before the launch.
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

  FUSEDRNN_HD int phases(unsigned) const { return 1 + 2 * static_cast<int>(steps); }
  FUSEDRNN_HD bool grid_barrier_after(int phase) const { return phase > 0 && phase % 2 == 0; }

  FUSEDRNN_HD void operator()(const ThreadIndex& at, int phase, unsigned char* shared) const {
    const Index H = step.hidden, B = step.batch, G = Cell::kGates;
    const Index u0 = static_cast<Index>(at.block) * shape.units;
    const Index u1 = u0 + shape.units < H ? u0 + shape.units : H;
    const Index units = u1 > u0 ? u1 - u0 : 0;
    T* w = reinterpret_cast<T*>(shared);  // (G*units, H): row k*units + j is gate k of unit u0 + j
    if (phase == 0) {
      for (Index e = at.thread; e < G * units * H; e += at.threads) {
        const Index r = e / H, q = e % H;
        w[e] = w_hh.data[((r / units) * H + u0 + r % units) * w_hh.stride[0] + q * w_hh.stride[1]];
      }
      return;
    }
    const Index i = (phase - 1) / 2;
    const Index t = reverse ? steps - 1 - i : i;
    const Index state = B * H;
    const T* h_prev = state_slot<T>(hs, prev_slot(reverse, t), state, training);
    if (phase % 2 == 1) {
      for (Index e = at.thread; e < B * G * units; e += at.threads) {
        const Index b = e / (G * units), r = e % (G * units);
        const T* h = h_prev + b * H;
        const T* wr = w + r * H;
        T sum = T(0);
        for (Index q = 0; q < H; ++q) sum += h[q] * wr[q];
        hg[b * G * H + (r / units) * H + u0 + r % units] = sum;
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
    for (Index e = at.thread; e < B * units; e += at.threads) forward_unit<Cell, T>(s, e / units, u0 + e % units);
  }
};

// How a call runs its recurrence. kAuto: persistently where the batch is small and the kernel fits,
// else per step; tests force either (a forced persistent path that does not fit still runs per step).
enum class RecurrencePath { kAuto, kPerStep, kPersistent };

// Up to this batch the per-step path's GEMMs leave most of the GPU idle and launch latency dominates a
// step. An estimate to be measured on a GPU (bench/gpu_check.sh).
constexpr Index kPersistentMaxBatch = 16;

// The persistent kernel's shape for this layer, or blocks = 0 where it should not or cannot run: every
// block's W_hh slice must fit its shared memory and every block be resident at once (occupancy). It
// keeps no W_hr, so a projected layer (LayerShape::proj) runs per step.
template <typename Cell, typename T, typename Device>
PersistentShape persistent_shape(Device& dev, const LayerShape& s, RecurrencePath path) {
  PersistentShape p;
  if (path == RecurrencePath::kPerStep || (path == RecurrencePath::kAuto && s.batch > kPersistentMaxBatch))
    return p;
  if (s.proj > 0) return p;
  const std::size_t row_bytes = static_cast<std::size_t>(Cell::kGates) * s.hidden * sizeof(T);
  const Index max_units = static_cast<Index>(dev.max_shared_bytes() / row_bytes);
  if (max_units < 1) return p;
  const Index blocks = (s.hidden + max_units - 1) / max_units;
  const Index units = (s.hidden + blocks - 1) / blocks;
  const std::size_t shared = static_cast<std::size_t>(units) * row_bytes;
  if (dev.template cooperative_blocks<PersistentForward<Cell, T>>(p.threads, shared) < blocks) return p;
  p.blocks = static_cast<unsigned>(blocks);
  p.units = units;
  p.shared_bytes = shared;
  return p;
}

}  // namespace fusedrnn::gpu
