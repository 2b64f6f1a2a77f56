// The CPU backend: runs the neutral layer calls (layer.h) on fusedrnn's own thread team (threads.h),
// with weight-stationary SIMD kernels (kernels.h) and single-threaded BLAS inside the team's ranks.
//
// Views (layer.h) are read in place when their last dimension is contiguous and their rows evenly
// spaced at least a row apart (a row stride: BLAS lda/ldc and the kernels' row strides cover it); any
// other view is copied into a dense buffer of the call (inputs before, outputs after the call).
//
// Beside the layer calls: the team's size, and the choices the backend makes by a layer's size, which
// tests and benchmarks may force or inspect.
#pragma once

#include <string>

#include <cstddef>
#include <cstdint>

#include "fusedrnn/cells.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::cpu {

template <typename T>
void layer_forward(const LayerForwardParams<T>& params);

template <typename T>
void layer_backward(const LayerBackwardParams<T>& params);

// Both directions of a bidirectional layer (0 forward in time, 1 reversed; one cell and shape): where
// directions_together holds, their recurrences run at once, each on its part of the team (the GEMMs
// before and after on the whole team, direction 0's first); otherwise as the calls above in turn.
// Backward: direction 1 accumulates into the dx direction 0 writes.
template <typename T>
void layer_forward_directions(const LayerForwardParams<T>& direction0, const LayerForwardParams<T>& direction1);
template <typename T>
void layer_backward_directions(const LayerBackwardParams<T>& direction0, const LayerBackwardParams<T>& direction1);
// Whether a bidirectional layer of this shape runs its two directions at once on a team this size.
bool directions_together(CellKind cell, const LayerShape& shape, std::size_t value_bytes, int team_threads);

// The thread team's size (all native compute). A new size applies from the next layer call: one
// already running finishes on the size it started with.
int team_size();
void set_team_size(int threads);
// The threads the team's jobs run on: an OpenMP runtime already loaded in the process (ThreadTeam::
// use_openmp_runtime; "" for the team's own workers).
void use_openmp_runtime(const std::string& library);
std::string openmp_runtime();
// While one lives on a thread, that thread's jobs run on the team's own workers and neither use nor
// take the OpenMP runtime's place (ThreadTeam::use_openmp_runtime): for calls from fusedrnn.jax's
// handlers, which XLA runs on its own threads or inline, so that they never take it from the training
// loop's thread.
class KeepOffOpenMPRuntime {
 public:
  KeepOffOpenMPRuntime();
  ~KeepOffOpenMPRuntime();
  KeepOffOpenMPRuntime(const KeepOffOpenMPRuntime&) = delete;
  KeepOffOpenMPRuntime& operator=(const KeepOffOpenMPRuntime&) = delete;
};
// Frees the scratch layer calls keep between calls (one for the process, whichever threads call), each
// buffer grown to the largest call that used it; returns the bytes freed. Waits for a call in progress.
// The next call allocates afresh.
std::size_t release_scratch();
// Tests only: the team's workers pause this long after each job is posted (ThreadTeam).
void set_team_worker_delay(int microseconds);

// How a layer's recurrence is shared across a team of `team_threads` (see kernels.h): `ranks` threads,
// each owning whole batch rows (by_rows) or a range of hidden units of every row. `proj`: the layer's
// projection size P (layer.h), 0 without one.
struct LayerSplit {
  int ranks = 1;
  bool by_rows = false;
};
LayerSplit layer_split(CellKind cell, Index batch, Index hidden, std::size_t value_bytes, int team_threads,
                       Index proj = 0);
// The per-core L2 size the split assumes (the system's figure, or 1 MB where it gives none).
Index l2_cache_bytes();

// Choices tests and benchmarks may force. kAuto (the default) decides by the layer's size.
// How the recurrence is shared: the others force one kind wherever a layer is large enough to share.
enum class SplitPreference { kAuto, kRows, kUnits };
void set_split_preference(SplitPreference preference);
SplitPreference split_preference();
// Where forward projects x onto W_ih (kernels.h): inside each step, as one GEMM before the sequence, or
// before the sequence by each rank for its own gate columns.
enum class ProjectionPreference { kAuto, kInSteps, kUpFront, kUpFrontByRank };
void set_projection_preference(ProjectionPreference preference);
ProjectionPreference projection_preference();
// Where forward projects x for one direction of this shape whose recurrence has `threads` threads (the
// team, or its part where both directions run at once): the forced choice where one is set; never kAuto.
ProjectionPreference input_projection_choice(CellKind cell, const LayerShape& shape, std::size_t value_bytes,
                                             int threads);
// Whether a bidirectional layer's directions run at once (layer_forward_directions) or in turn.
enum class DirectionsPreference { kAuto, kTogether, kApart };
void set_directions_preference(DirectionsPreference preference);
DirectionsPreference directions_preference();
// How backward splits the weight gradients' GEMMs across the team: kRows (each rank its share of all
// steps' rows, partials added after) or kGateRows (each rank its gate rows over all rows).
enum class WeightGradPreference { kAuto, kRows, kGateRows };
void set_weight_grad_preference(WeightGradPreference preference);
WeightGradPreference weight_grad_preference();
// The most bytes of scratch an inference call's steps may take before it runs in chunks of steps
// (layer.cpp, ForwardChunks; a training call's projection by BLAS runs in the same chunks); 0
// restores the default.
void set_inference_chunk_bytes(std::size_t bytes);
std::size_t inference_chunk_bytes();

}  // namespace fusedrnn::cpu
