// One direction of one recurrent layer over a whole sequence, forward and backward (BPTT).
//
// Shapes: T steps, B batch rows, I input features, H hidden units, G gate blocks (cells.h), S values
// saved per unit for backward (Cell::kSaved). All buffers are row-major with unit stride in the last
// dimension; the caller owns every buffer and the core allocates only its own scratch (outside the
// time loop). Nothing here aliases unless stated.
//
// Structure (see DESIGN): the input projection of all T steps is one GEMM before the loop; each step is
// one recurrent GEMM for all gates plus one fused pointwise pass; backward keeps only the recurrence in
// the loop and computes dx, dW_ih, dW_hh and the bias gradients as large GEMMs / reductions after it.
// A call runs as one job on the thread team (threads.h): the large GEMMs are split across its ranks,
// each calling single-threaded BLAS, and the time loop is weight-stationary (kernels.h).
//
// Variable lengths: row b is valid at time t when t < lengths[b]. At an invalid step the state is
// carried unchanged and the output row is zero, so the forward direction ends at the row's own last
// step and the reverse direction starts there. Backward treats invalid steps as identities.
//
// State slots: the hidden (and cell) states live in `hs` / `cs` with T+1 slots of (B, H). The forward
// direction reads slot t and writes slot t+1 at time t; the reverse direction reads t+1 and writes t.
// So slot 0 (forward) or slot T (reverse) holds the initial state, and for both directions the T slots
// read as "previous state" are contiguous, which lets dW_hh be a single GEMM. Without training only two
// slots are kept and used alternately.
#pragma once

#include <cstdint>
#include <limits>

#include "fusedrnn/cells.h"

namespace fusedrnn {

inline int gate_count(CellKind cell) { return cell_facts(cell).gates; }
inline int saved_per_unit(CellKind cell) { return cell_facts(cell).saved; }
inline bool has_cell_state(CellKind cell) { return cell_facts(cell).has_cell_state; }
inline bool split_recurrent_grad(CellKind cell) { return cell_facts(cell).split_recurrent_grad; }

template <typename T>
struct LayerWeights {
  const T* w_ih = nullptr;  // (G*H, I)
  const T* w_hh = nullptr;  // (G*H, H)
  const T* b_ih = nullptr;  // (G*H) or null (no bias)
  const T* b_hh = nullptr;  // (G*H) or null
};

struct LayerShape {
  std::int64_t steps = 0, batch = 0, input = 0, hidden = 0;  // T, B, I, H
  const std::int64_t* lengths = nullptr;  // (B), each in [0, T]; null: every row has T steps
  bool reverse = false;
};

// What forward keeps for backward. Training: hs, cs (T+1, B, H) and saved (T, B, S*H), saved null when
// S == 0. Inference: hs, cs (2, B, H) used alternately, and no saved gate values (null). cs is null for
// cells without a cell state.
template <typename T>
struct LayerTape {
  T* hs = nullptr;
  T* cs = nullptr;
  T* saved = nullptr;
  bool training = false;
};

template <typename T>
struct LayerForwardArgs {
  CellKind cell = CellKind::kLstm;
  LayerShape shape;
  LayerWeights<T> weights;
  const T* x = nullptr;   // (T, B, I)
  const T* h0 = nullptr;  // (B, H) or null (zeros)
  const T* c0 = nullptr;  // (B, H) or null (zeros); LSTM only
  T* y = nullptr;         // (T, B, ldy): this direction's H columns of the layer output
  std::int64_t ldy = 0;   // row stride of y, >= H (2H when both directions share one output)
  T* h_n = nullptr;       // (B, H) final hidden state
  T* c_n = nullptr;       // (B, H) final cell state; LSTM only
  LayerTape<T> tape;
  T cell_clip = std::numeric_limits<T>::infinity();  // LSTM: bound on |c| (cells.h)
};

template <typename T>
struct LayerBackwardArgs {
  CellKind cell = CellKind::kLstm;
  LayerShape shape;
  LayerWeights<T> weights;
  const T* x = nullptr;     // (T, B, I), the forward input
  LayerTape<T> tape;        // as forward filled it, with training = true
  const T* dy = nullptr;    // (T, B, lddy) gradient of y, or null
  std::int64_t lddy = 0;
  const T* dh_n = nullptr;  // (B, H) or null
  const T* dc_n = nullptr;  // (B, H) or null; LSTM only
  // Outputs. Accumulated (+=): dx (unless accumulate_dx is false) and the weight and bias gradients.
  // Written: dh0, dc0.
  T* dx = nullptr;          // (T, B, I) or null
  bool accumulate_dx = true;  // false: dx is written, so a caller need not clear it first
  T* dh0 = nullptr;         // (B, H) or null
  T* dc0 = nullptr;         // (B, H) or null; LSTM only
  T* dw_ih = nullptr;       // (G*H, I)
  T* dw_hh = nullptr;       // (G*H, H)
  T* db_ih = nullptr;       // (G*H) or null
  T* db_hh = nullptr;       // (G*H) or null
  double* dh_norm = nullptr;  // (T) or null: L2 norm over (B, H) of dL/dh_t (valid rows), time order
  T cell_clip = std::numeric_limits<T>::infinity();  // as in forward
};

// The thread team's size (all native compute). A new size applies from the next layer call: one
// already running finishes on the size it started with.
int team_size();
void set_team_size(int threads);
// Tests only: the team's workers pause this long after each job is posted (ThreadTeam).
void set_team_worker_delay(int microseconds);

// How a layer's recurrence is shared across a team of `team_threads` (see kernels.h): `ranks` threads,
// each owning whole batch rows (by_rows) or a range of hidden units of every row.
struct LayerSplit {
  int ranks = 1;
  bool by_rows = false;
};
LayerSplit layer_split(CellKind cell, std::int64_t batch, std::int64_t hidden, std::size_t value_bytes,
                       int team_threads);
// The per-core L2 size the split assumes (the system's figure, or 1 MB where it gives none).
std::int64_t l2_cache_bytes();
// kAuto picks the split by the layer's size; the others force one kind wherever a layer is large enough
// to share at all (tests and benchmarks compare the two).
enum class SplitPreference { kAuto, kRows, kUnits };
void set_split_preference(SplitPreference preference);
SplitPreference split_preference();
// Where forward projects x onto W_ih (kernels.h): kAuto by the layer's size and split; the others
// force one way (tests compare them).
enum class ProjectionPreference { kAuto, kInSteps, kUpFront };
void set_projection_preference(ProjectionPreference preference);
ProjectionPreference projection_preference();
// How backward splits the weight gradients' GEMMs across the team: kAuto by the layer's size; kRows
// (each rank its share of all steps' rows, partials added after) or kGateRows (each rank its gate rows
// over all rows) force one way (tests compare them).
enum class WeightGradPreference { kAuto, kRows, kGateRows };
void set_weight_grad_preference(WeightGradPreference preference);
WeightGradPreference weight_grad_preference();

template <typename T>
void layer_forward(const LayerForwardArgs<T>& args);

template <typename T>
void layer_backward(const LayerBackwardArgs<T>& args);

}  // namespace fusedrnn
