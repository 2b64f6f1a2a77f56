// The per-thread recurrence kernels (weight-stationary) and their runtime dispatch by SIMD level.
//
// Each rank of the thread team owns a fixed share of every step: a range of batch rows and a range of
// hidden units with all gate rows of those units (RankShare). Forward, it packs its rows of W_hh once
// per call into panels that stay in its own cache, and per step computes its gates as one small GEMM
// (its batch rows x its gate columns) fused with the pointwise cell update of its share. Backward, it
// packs its units' columns of W_hh, runs the pointwise backward of its share, and computes its share of
// dh @ W_hh.
//
// Two ways to share a step: by units (every rank takes all rows), where each step ends at a barrier
// that publishes the ranks' units of the new state to the others; or by rows (every rank takes all
// units and the whole W_hh), where no state crosses cores and the ranks never wait for each other
// until the sequence ends. The input projection x W_ih^T is computed inside each step by each rank for
// its own share, or by each rank for every step before the first, or by one BLAS GEMM before the job:
// layer.cpp's input_projection chooses by the split, the batch and what fits in L2 (see ForwardPlan).
//
// With a projection (layer.h), each step has a second phase: once the cell outputs r of the step are
// written (by units: after a barrier), each rank computes its share of the columns of h = r W_hr^T,
// its rows of W_hr packed like those of W_hh. Backward mirrors it: each rank first finishes its
// columns of the step's dh (dy added; kept for dW_hr), then (by units: after a barrier) computes its
// units of dr = dh W_hr, which the cell's backward takes as the gradient of its output.
//
// kernels_isa.cpp holds that code once; the build compiles it per SIMD level (AVX-512, AVX2, generic)
// into its own namespace, and active_kernels() picks one at run time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "fusedrnn/cells.h"
#include "fusedrnn/layer.h"
#include "fusedrnn/cpu/threads.h"

namespace fusedrnn::cpu {

// A matrix whose rows are `ld` elements apart (ld >= its width) and whose columns are contiguous: how
// the kernels and BLAS read every caller array (backend.h says which views qualify; the rest are
// copied before the job). A (T, B, W) array is read as T*B rows.
template <typename T>
struct Rows {
  T* data = nullptr;
  Index ld = 0;
  T* row(Index r) const { return data + r * ld; }
  explicit operator bool() const { return data != nullptr; }
};

// Where a step's states live: slot s of (slots, B, W) (W: R for h, H for c); inference keeps two slots
// used alternately.
template <typename T>
struct StateSlots {
  T* base = nullptr;
  Index stride = 0;  // B*W
  bool training = false;
  T* at(Index slot) const { return base ? base + (training ? slot : (slot & 1)) * stride : nullptr; }
};


// A rank's share of each step: batch rows [b0, b1) x hidden units [u0, u1), and the columns [o0, o1)
// of the hidden state h it writes (forward) and whose gradient it finishes (backward): its units
// without a projection, else its share of the projection's P columns.
struct RankShare {
  Index b0 = 0, b1 = 0, u0 = 0, u1 = 0;
  Index o0 = 0, o1 = 0;
  Index rows() const { return b1 - b0; }
  Index units() const { return u1 - u0; }
  Index outputs() const { return o1 - o0; }
};

// Per-rank scratch, allocated by the caller before the job (jobs never allocate): packed weight panels
// and a (rows, padded columns) tile for the step GEMM's output. Packing reads and writes this rank's
// weights once per call, which pays back from a few steps on; shorter sequences skip it. Where forward
// projects x inside the steps, the same again for W_ih, plus the rank's column order of the bias; with
// a projection, the same again for W_hr (forward: its rows o0..o1; backward: its columns u0..u1).
template <typename T>
struct RankScratch {
  T* packed = nullptr;
  T* tile = nullptr;
  T* packed_ih = nullptr;
  T* tile_x = nullptr;  // (rows, kPanel-rounded G*units), or (T, rows, ...) when projected up front
  T* bias_x = nullptr;
  T* packed_hr = nullptr;
  T* tile_hr = nullptr;
};

// What both directions of the recurrence share.
template <typename T>
struct PlanCommon {
  CellKind cell = CellKind::kLstm;
  Index steps = 0, batch = 0, hidden = 0;
  Index proj = 0;                  // P, or 0: no projection
  Index state_size = 0;            // R: P with a projection, else H
  const Index* lengths = nullptr;  // (B) dense, or null
  bool reverse = false;
  Rows<const T> w_hh;              // (G*H, R)
  Rows<const T> w_hr;              // (P, H), or null without a projection
  T cell_clip = T(0);              // +inf: none
  StateSlots<T> hs, cs;            // (., B, R) and (., B, H); cs.base null without a cell state
  // With a projection, the cell outputs r: slot t of (T, B, H) in training, else one (B, H) slot.
  T* rs = nullptr;
  const RankShare* shares = nullptr;        // (ranks)
  bool exchange_state = false;     // units are split across ranks: a barrier ends every step
  const RankScratch<T>* scratch = nullptr;  // (ranks)
  bool pack_weights = true;        // false: W_hh read in place (layer.cpp's packs_forward_weights)
};

// The input projection x W_ih^T + b_ih (+ the b_hh the cell lets fold in) arrives one of three ways:
// computed for every step before the job (gx); or, gx null (x, w_ih and gx_bias set), by each rank for
// its own share with its packed W_ih, either inside each step, beside W_hh in cache, or for every step
// before the first (projected_up_front), into its scratch tile_x, which then holds every step's. Inside
// each step, a cell that reads only each gate's sum of the two projections takes both in one pass
// (stacked_input): W_ih packed above W_hh in the same panels, x_t and h_{t-1} side by side.
template <typename T>
struct ForwardPlan : PlanCommon<T> {
  const T* gx = nullptr;           // (T, B, G*H) or null
  bool projected_up_front = false;  // gx null: each rank projects every step before the first
  bool stacked_input = false;       // gx null: inside each step, in the pass over W_hh's panels
  Rows<const T> x;                 // (T*B, I) rows, read when gx is null
  Index input = 0;
  Rows<const T> w_ih;              // (G*H, I), read when gx is null
  const T* gx_bias = nullptr;      // (G*H) when gx is null
  const T* b_hh = nullptr;         // (G*H), never null; read only for gates the cell keeps it apart
  Rows<const T> h0;                // (B, R), or null: zeros
  Rows<const T> c0;                // (B, H), or null: zeros
  T* saved = nullptr;              // (T, B, S*H) dense in training; null in inference or when S == 0
  Rows<T> y;                       // (T*B, R) rows
  Rows<T> h_n;                     // (B, R)
  Rows<T> c_n;                     // (B, H), or null
};

template <typename T>
struct BackwardPlan : PlanCommon<T> {
  const T* saved = nullptr;        // (T, B, S*H) or null, as forward recorded it (hs, cs, rs too)
  Rows<const T> dy;                // (T*B, R) rows, never null: without dy, one (R) row of zeros, ld 0
  Rows<const T> dh_n;              // (B, R), or null: zero
  Rows<const T> dc_n;              // (B, H), or null: zero
  T* dgx = nullptr;                // (T, B, G*H) gate gradients for W_ih, b_ih and x
  T* dgh = nullptr;                // (T, B, G*H) for W_hh and b_hh; == dgx unless the cell splits them
  T* dh = nullptr;                 // (2, B, R) running hidden-state gradient, two buffers
  T* dc = nullptr;                 // (B, H) running cell-state gradient, or null
  // With a projection: (T, B, P), the whole gradient reaching h_t (zero at invalid steps), for dW_hr.
  T* dhs = nullptr;
  Rows<T> dh0;                     // (B, R), or null
  Rows<T> dc0;                     // (B, H), or null
  double* dh_norm_partial = nullptr;  // (ranks, norm_stride): each rank's sum of squares of dL/dh_t,
  Index norm_stride = 0;              // a row per rank, rows on separate cache lines
  // (ranks, bias_stride) or null: each rank's column sums over its rows and steps of dgx, then (cells
  // that split them) of dgh; every rank zeroes its whole row, so the caller sums all ranks' rows.
  double* bias_grad_partial = nullptr;
  Index bias_stride = 0;
};

// The panel kernel blocks rows by kBlockRows at each SIMD level (kernels_isa.cpp), always a divisor of this.
constexpr Index kBlockRowsMultiple = 12;

// Steps whose rows of a batch fill whole blocks of the panel kernel at every level.
inline Index whole_block_steps(Index batch) { return kBlockRowsMultiple / std::gcd(kBlockRowsMultiple, batch); }

// The steps of x a rank projects in one pass of the panel kernel where it projects every step before
// the first (projected_up_front). By units its rows of successive steps are successive rows of x, as
// many a pass as stay in L2 (256 KiB of x) while each packed W_ih panel passes over them, in whole
// blocks of rows (whole_block_steps); by rows, one step a pass. A pass's rows are blocked from its
// first, and only the last pass of a call leaves a partial block: a call run in chunks of steps that
// start and end on whole blocks (the last chunk ending where the call does) projects every row exactly
// as the whole call does.
inline Index projection_pass_steps(Index rank_rows, Index batch, Index input, std::size_t value_bytes) {
  constexpr std::size_t kPassBytes = 256 * 1024;
  if (rank_rows != batch) return 1;
  const Index block_steps = whole_block_steps(batch);
  const Index pass_rows = static_cast<Index>(kPassBytes / value_bytes) / std::max<Index>(1, input);
  return std::max(block_steps, pass_rows / rank_rows / block_steps * block_steps);
}

// times_weights and times_matrix multiply up to this many rows with kernels that read w in place, once
// per block of rows (BLAS beyond).
constexpr Index kMaxFewRows = 16;

template <typename T>
struct RecurrenceKernels {
  int panel_width;  // columns per packed weight panel; scratch sizes depend on it
  void (*forward)(const ForwardPlan<T>& plan, int rank, const RankGroup& group);
  void (*backward)(const BackwardPlan<T>& plan, int rank, const RankGroup& group);
  // Whole-array passes (checks.h) at this level, over one rank's share (passes.h shares them out).
  bool (*all_finite)(const T* values, Index count);
  std::uint32_t (*fingerprint)(const T* values, Index count, Index first);
  void (*add_into)(T* into, const T* from, Index count);
  // c (rows, columns) = a (rows, depth) w^T, added into c where `accumulate`, w (columns, depth)
  // row-major and read in place (not packed): the GEMM for operands used once.
  void (*times_weights)(Index rows, Index columns, Index depth, const T* a, Index lda, const T* w, Index ldw,
                        bool accumulate, T* c, Index ldc);
  // c (rows, columns) = a (rows, depth) w, added into c where `accumulate`, w (depth, columns)
  // row-major and read in place: the same for the other orientation (backward's products with W).
  void (*times_matrix)(Index rows, Index columns, Index depth, const T* a, Index lda, const T* w, Index ldw,
                       bool accumulate, T* c, Index ldc);
};

struct KernelTable {
  const char* name;
  RecurrenceKernels<float> f32;
  RecurrenceKernels<double> f64;
};

// SIMD levels, lowest first. Only levels compiled in and supported by this CPU can be selected.
std::vector<std::string> supported_simd_levels();
std::vector<std::string> compiled_simd_levels();
// The level in use: the best supported one, or FUSEDRNN_SIMD from the environment if that names a
// supported level. set_simd_level throws std::invalid_argument for a level this machine cannot run.
const KernelTable& active_kernels();
void set_simd_level(const std::string& name);

template <typename T>
const RecurrenceKernels<T>& kernels_for(const KernelTable& table);
template <>
inline const RecurrenceKernels<float>& kernels_for<float>(const KernelTable& t) { return t.f32; }
template <>
inline const RecurrenceKernels<double>& kernels_for<double>(const KernelTable& t) { return t.f64; }

}  // namespace fusedrnn::cpu
