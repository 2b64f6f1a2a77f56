#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

#include <unistd.h>

#include "fusedrnn/allocation.h"
#include "fusedrnn/cpu/backend.h"
#include "fusedrnn/cpu/blas.h"
#include "fusedrnn/cpu/kernels.h"
#include "fusedrnn/cpu/threads.h"

namespace fusedrnn::cpu {
namespace {

// Scratch buffers (KeptBuffer: uninitialised, the core writes every element before reading it), kept
// between calls. Each buffer a call needs has its own ScratchSlot. Only the calling thread allocates;
// team jobs never do.
enum class ScratchSlot {
  kGatesX, kRankBuffers, kGradGates, kGradGatesH, kGradState, kGradOutputs, kNormPartial, kBiasGradPartial,
  kWeightGradPartial, kCount
};

// Two sets of every slot: the two directions of a layer run together each take one.
constexpr int kScratchSets = 2;

// The largest dimension or leading dimension the 32-bit BLAS (scipy-openblas32) takes.
constexpr Index kMaxBlasIndex = std::numeric_limits<std::int32_t>::max();

// The layer calls' scratch, grown to the largest: one for the process, used only under the team's lease,
// since calls take turns on the team whichever thread makes them (per thread, each of XLA's threads that
// ever ran a call, or each of a server's, would keep a copy until it ends). Never destroyed: a call may
// still run while the process exits.
using ScratchSets = std::array<std::array<KeptBuffer, static_cast<int>(ScratchSlot::kCount)>, kScratchSets>;
ScratchSets& scratch_buffers() {
  static ScratchSets* sets = new ScratchSets;
  return *sets;
}

template <typename T>
T* scratch(ScratchSlot slot, Index n, int set = 0) {
  return scratch_buffers()[set][static_cast<int>(slot)].reserve_values<T>(static_cast<std::uint64_t>(n),
                                                                          "a layer call's scratch");
}

ThreadTeam& team() { return ThreadTeam::instance(); }

using TeamLease = ThreadTeam::Lease;

// The team for one call, with BLAS single-threaded inside its jobs (the team is the only pool). Made
// so at every lease: another library's thread limits (threadpoolctl's apply to every BLAS in the
// process) may have changed it since the last call.
TeamLease lease_team() {
  TeamLease tm = team().lease();
  blas::keep_single_threaded();
  return tm;
}

// Rank r's share [begin, end) of n items split as evenly as possible.
std::pair<Index, Index> share(Index n, int ranks, int r) {
  return {n * r / ranks, n * (r + 1) / ranks};
}

// Each rank's share of a step. By rows: even ranges of batch rows, all units and state columns. By
// units: all rows and a contiguous range of hidden units (and, with a projection, of the state's P
// columns) whose boundaries fall on 64-byte lines, so no two ranks write one cache line of a row.
template <typename T>
std::vector<RankShare> rank_shares(Index batch, Index hidden, Index state_size, const LayerSplit& split) {
  constexpr Index align = 64 / sizeof(T);
  std::vector<RankShare> shares(static_cast<std::size_t>(split.ranks));
  for (int r = 0; r < split.ranks; ++r) {
    if (split.by_rows) {
      const auto [b0, b1] = share(batch, split.ranks, r);
      shares[r] = {b0, b1, 0, hidden, 0, state_size};
      continue;
    }
    auto boundary = [&](Index n, int q) {
      const Index even = n * q / split.ranks;
      return q == split.ranks ? n : std::min(n, (even + align / 2) / align * align);
    };
    shares[r] = {0, batch, boundary(hidden, r), boundary(hidden, r + 1), boundary(state_size, r),
                 boundary(state_size, r + 1)};
  }
  return shares;
}

// The weight panels a rank multiplies by in each step: `depth` rows of `columns` columns (rounded up to
// whole panels by rank_scratch); depth 0: none.
struct PanelShape {
  Index depth = 0, columns = 0;
};

// Of one rank: its recurrent weights (W_hh), those for projecting x itself (W_ih, with the bias in its
// column order) and those of a projection (W_hr); the steps whose projection of x its tile holds at
// once (all of them when it projects before the first).
struct RankPanels {
  PanelShape recurrent, input, projection;
  Index input_tile_steps = 1;
  bool stacked_input = false;  // W_ih stacked on W_hh in `recurrent`, with the input's bias row
};

// Per-rank packed-weight and tile buffers, carved from one scratch block at 64-byte boundaries:
// for each shape of `panels_of(share)` with depth > 0, the packed panels and a (rows, columns) tile
// (the input's: input_tile_steps such tiles); with an input, own or stacked, its bias row.
template <typename T, typename PanelsOf>
std::vector<RankScratch<T>> rank_scratch(const std::vector<RankShare>& shares, int panel_width, int scratch_set,
                                         const PanelsOf& panels_of) {
  constexpr Index align = 64 / sizeof(T);
  auto round_up = [](Index n, Index m) { return (n + m - 1) / m * m; };
  const std::size_t ranks = shares.size();
  std::vector<RankPanels> panels(ranks);
  Index total = 0;
  for (std::size_t r = 0; r < ranks; ++r) {
    panels[r] = panels_of(shares[r]);
    for (PanelShape* p : {&panels[r].recurrent, &panels[r].input, &panels[r].projection}) {
      p->columns = round_up(p->columns, panel_width);
      const Index tiles = p == &panels[r].input ? panels[r].input_tile_steps : 1;
      if (p->depth > 0)
        total += round_up(p->depth * p->columns, align) + round_up(tiles * shares[r].rows() * p->columns, align);
    }
    if (panels[r].input.depth > 0) total += round_up(panels[r].input.columns, align);
    if (panels[r].stacked_input) total += round_up(panels[r].recurrent.columns, align);
  }
  T* base = scratch<T>(ScratchSlot::kRankBuffers, total + align, scratch_set);
  base += (align - (reinterpret_cast<std::uintptr_t>(base) / sizeof(T)) % align) % align;
  auto carve = [&](Index n) {
    T* p = base;
    base += round_up(n, align);
    return p;
  };
  std::vector<RankScratch<T>> out(ranks);
  for (std::size_t r = 0; r < ranks; ++r) {
    const RankPanels& p = panels[r];
    const Index rows = shares[r].rows();
    out[r].packed = carve(p.recurrent.depth * p.recurrent.columns);
    out[r].tile = carve(rows * p.recurrent.columns);
    if (p.input.depth > 0) {
      out[r].packed_ih = carve(p.input.depth * p.input.columns);
      out[r].tile_x = carve(p.input_tile_steps * rows * p.input.columns);
      out[r].bias_x = carve(p.input.columns);
    }
    if (p.stacked_input) out[r].bias_x = carve(p.recurrent.columns);
    if (p.projection.depth > 0) {
      out[r].packed_hr = carve(p.projection.depth * p.projection.columns);
      out[r].tile_hr = carve(rows * p.projection.columns);
    }
  }
  return out;
}

// Packing a rank's W_hh slice costs about one pass over it, as does a BLAS call that packs it
// internally; from this many steps on, packing once wins.
constexpr Index kMinStepsToPack = 3;

// The weights every step of the recurrence multiplies by: W_hh, and a projection's W_hr (P, H), with
// which W_hh is (G*H, P).
double recurrent_weight_bytes(CellKind cell, Index hidden, Index proj, std::size_t value_bytes) {
  const double state = static_cast<double>(proj > 0 ? proj : hidden);
  return (cell_facts(cell).gates * state + static_cast<double>(proj)) * static_cast<double>(hidden) *
         static_cast<double>(value_bytes);
}

// Whether forward packs its ranks' recurrent weights once for the call (else each step multiplies
// them in place with the few-rows kernel). From kMinStepsToPack steps, except for a few steps more
// where each rank has one or two rows and a slice of more than an eighth of the L2: there the pass
// that packs it costs more than the steps gain from reading it packed (see bench/NOTES.md, "Figures
// behind the code", few rows).
bool packs_forward_weights(CellKind cell, const LayerShape& s, const LayerSplit& split, std::size_t value_bytes) {
  constexpr Index kMaxStepsInPlace = 8;
  constexpr Index kMaxRowsInPlace = 2;
  if (s.steps < kMinStepsToPack) return false;
  if (s.steps > kMaxStepsInPlace) return true;
  const Index rows_per_rank = split.by_rows ? (s.batch + split.ranks - 1) / split.ranks : s.batch;
  const double slice_bytes =
      recurrent_weight_bytes(cell, s.hidden, s.proj, value_bytes) / (split.by_rows ? 1 : split.ranks);
  return rows_per_rank > kMaxRowsInPlace || slice_bytes <= l2_cache_bytes() / 8.0;
}

// Streaming weights from L3 every step keeps up with the FMAs only when each weight serves enough
// rows: 32 rows make 16 flops a byte.
constexpr Index kMinRowsToStreamWeights = 32;

// The 32-bit BLAS takes no dimension past INT_MAX; refuse before the job starts (jobs must not throw),
// naming the size that is too large.
struct BlasDimension {
  const char* what;
  Index value;
};
void require_blas_range(std::initializer_list<BlasDimension> dims) {
  for (const BlasDimension& d : dims)
    if (d.value > kMaxBlasIndex)
      throw std::length_error(std::string(d.what) + ": " + std::to_string(d.value) +
                              " exceeds the 32-bit BLAS index range (" + std::to_string(kMaxBlasIndex) + ")");
}

// The sizes every layer's GEMMs pass to BLAS.
void require_layer_blas_range(Index steps, Index batch, Index gate_rows, Index input, Index hidden) {
  require_blas_range({{"steps*batch", steps * batch}, {"gates*hidden_size", gate_rows}, {"input_size", input},
                      {"hidden_size", hidden}});
}

// Threads for the large GEMMs outside the recurrence (input projection, dx, weight gradients). They
// have no per-step barrier, so they use the whole team even where the recurrence uses fewer ranks,
// once each thread gets enough work to pay for waking it and joining it again.
int gemm_threads(double flops, int team_threads) {
  constexpr double kMinFlopsPerThread = 4e6;
  const double useful = std::max(1.0, flops / kMinFlopsPerThread);
  return static_cast<int>(std::min<double>(team_threads, useful));
}

// Where forward projects x onto W_ih (see bench/NOTES.md, "Figures behind the code", input
// projection). Each rank can project its own share of x inside each step with the panel kernel, its
// packed W_ih beside W_hh, instead of one BLAS GEMM before the sequence whose output each step reads
// back from L3 or memory. That pays where each step's read of the rank's packed weights is cheap: where
// each rank holds whole rows (by rows, or one rank), both whole weights in half the L2, as for sharing
// rows at all, and a few rows a rank to share each weight read; by units, enough rows that each weight
// read serves as many FMAs as streaming it from L3 needs, wherever the rank's columns of both weights
// are (a B=1 step would read W_ih just to multiply one row). Short of that, by units each rank can
// still project its own gate columns of every step before the first with the panel kernel: the
// result then sits in the rank's own cache, where the shared GEMM, split by steps, leaves each rank's
// share of later steps in the other core's. That pays where the rank's W_ih slice stays in half the
// L2, and where BLAS would use no more of the direction's threads (the team, or its part where both
// directions run at once) than the recurrence's ranks.
enum class InputProjection { kUpFront, kUpFrontByRank, kInSteps };

InputProjection input_projection(CellKind cell, const LayerShape& s, const LayerSplit& split,
                                 std::size_t value_bytes, int direction_threads, bool packs_weights) {
  constexpr Index kMinRowsPerRankInSteps = 4;
  switch (projection_preference()) {
    case ProjectionPreference::kInSteps: return InputProjection::kInSteps;
    case ProjectionPreference::kUpFront: return InputProjection::kUpFront;
    case ProjectionPreference::kUpFrontByRank: return InputProjection::kUpFrontByRank;
    case ProjectionPreference::kAuto: break;
  }
  if (!packs_weights) return InputProjection::kUpFront;
  const double gate_rows = static_cast<double>(cell_facts(cell).gates) * s.hidden;
  const double ih_bytes = gate_rows * s.input * value_bytes;
  const double weight_bytes = ih_bytes + (gate_rows * s.state_size() + s.proj * s.hidden) * value_bytes;
  const double l2 = static_cast<double>(l2_cache_bytes());
  const bool whole_rows = split.by_rows || split.ranks == 1;
  if (whole_rows && weight_bytes <= 0.5 * l2 && s.batch / split.ranks >= kMinRowsPerRankInSteps)
    return InputProjection::kInSteps;
  if (split.by_rows) return InputProjection::kUpFront;
  if (split.ranks > 1 && s.batch >= kMinRowsToStreamWeights) return InputProjection::kInSteps;
  const double gemm_flops = 2.0 * static_cast<double>(s.steps * s.batch) * gate_rows * s.input;
  const bool by_rank =
      ih_bytes / split.ranks <= 0.5 * l2 && gemm_threads(gemm_flops, direction_threads) <= split.ranks;
  return by_rank ? InputProjection::kUpFrontByRank : InputProjection::kUpFront;
}

// The team layout of one call: the split, each rank's share and scratch. The packed panels: forward,
// W_hh R deep by G*units columns (W_ih the same I deep where x is projected inside the steps, or
// stacked above W_hh, I + R deep; W_hr H deep by the rank's state columns); backward, W_hh G*H deep by
// the rank's state columns (W_hr P deep by its units).
template <typename T>
struct TeamLayout {
  LayerSplit split;
  std::vector<RankShare> shares;
  std::vector<RankScratch<T>> buffers;
  InputProjection input_projection = InputProjection::kUpFront;
  bool stacked_input = false;
  bool pack_weights = false;  // the ranks pack their recurrent weights once (else multiply them in place)
};

// Projecting x inside the steps, a cell that reads only each gate's sum of the two projections (all
// but GRU, whose n gate scales its recurrent part by r) takes both in one pass over panels holding W_ih
// above W_hh: each panel's accumulators start and end once a step instead of twice, which pays at
// short depths (see bench/NOTES.md, "Figures behind the code", input projection).
bool stacks_input(CellKind cell, InputProjection projection, bool packs_weights) {
  return projection == InputProjection::kInSteps && packs_weights && !cell_facts(cell).split_recurrent_grad;
}

// What a forward call of shape `s` chooses: the split, whether the ranks pack their weights, where x is
// projected.
struct ForwardChoices {
  LayerSplit split;
  bool pack_weights = false;
  InputProjection input_projection = InputProjection::kUpFront;
};

ForwardChoices forward_choices(CellKind cell, const LayerShape& s, std::size_t value_bytes, int recurrence_threads) {
  ForwardChoices c;
  c.split = layer_split(cell, s.batch, s.hidden, value_bytes, recurrence_threads, s.proj);
  c.pack_weights = packs_forward_weights(cell, s, c.split, value_bytes);
  c.input_projection = input_projection(cell, s, c.split, value_bytes, recurrence_threads, c.pack_weights);
  return c;
}

// `recurrence_threads` (the team, or its part where both directions run at once) may share the
// recurrence; the GEMMs may use the whole team. The choices are made for `planned_steps` (a chunk of a
// forward call's steps chooses as its whole sequence would), the scratch sized for the call's own
// s.steps.
template <typename T>
TeamLayout<T> team_layout(int recurrence_threads, CellKind cell, const LayerShape& s, Index planned_steps,
                          int panel_width, int scratch_set, bool forward) {
  LayerShape planned = s;
  planned.steps = planned_steps;
  // Backward packs from kMinStepsToPack steps (shorter calls read W in place: times_matrix).
  ForwardChoices choices{layer_split(cell, s.batch, s.hidden, sizeof(T), recurrence_threads, s.proj),
                         planned_steps >= kMinStepsToPack, InputProjection::kUpFront};
  if (forward) choices = forward_choices(cell, planned, sizeof(T), recurrence_threads);
  const LayerSplit split = choices.split;
  const bool pack = choices.pack_weights;
  const InputProjection projection = choices.input_projection;
  const bool project = projection != InputProjection::kUpFront;
  const bool stacked = forward && stacks_input(cell, projection, pack);
  const Index gates = cell_facts(cell).gates, state = s.state_size();
  std::vector<RankShare> shares = rank_shares<T>(s.batch, s.hidden, state, split);
  std::vector<RankScratch<T>> buffers = rank_scratch<T>(shares, panel_width, scratch_set, [&](const RankShare& sh) {
    RankPanels p;
    if (forward) {
      p.recurrent = {state + (stacked ? s.input : 0), gates * sh.units()};
      if (project && !stacked) p.input = {s.input, gates * sh.units()};
      p.stacked_input = stacked;
      if (projection == InputProjection::kUpFrontByRank) p.input_tile_steps = s.steps;
      if (s.proj > 0) p.projection = {s.hidden, sh.outputs()};
    } else {
      p.recurrent = {gates * s.hidden, sh.outputs()};
      if (s.proj > 0) p.projection = {s.proj, sh.units()};
    }
    return p;
  });
  return {split, std::move(shares), std::move(buffers), projection, stacked, pack};
}

template <typename T>
void fill_common(PlanCommon<T>& plan, CellKind cell, const LayerShape& s, const Index* lengths, Rows<const T> w_hh,
                 Rows<const T> w_hr, T cell_clip, const LayerTape<T>& tape, const TeamLayout<T>& layout) {
  plan.cell = cell;
  plan.steps = s.steps;
  plan.batch = s.batch;
  plan.hidden = s.hidden;
  plan.proj = s.proj;
  plan.state_size = s.state_size();
  plan.lengths = lengths;
  plan.reverse = s.reverse;
  plan.w_hh = w_hh;
  plan.w_hr = w_hr;
  plan.cell_clip = cell_clip;
  plan.hs = {tape.hs, s.batch * s.state_size(), tape.training};
  plan.cs = {tape.cs, s.batch * s.hidden, tape.training};
  plan.rs = tape.rs;
  plan.shares = layout.shares.data();
  plan.exchange_state = !layout.split.by_rows && layout.split.ranks > 1;
  plan.scratch = layout.buffers.data();
  plan.pack_weights = layout.pack_weights;
}

bool recurrent_bias_apart(CellKind cell, int gate) {
  bool v = false;
  with_cell(cell, [&](auto c) { v = decltype(c)::recurrent_bias_apart(gate); });
  return v;
}

// A view (layer.h) read as rows (kernels.h) where row_stride (layer.h) allows, else null.
// A view is read in place where its rows are evenly spaced at a leading dimension the 32-bit BLAS takes
// (at most max_ld); one spaced further apart is copied, so that no job meets a dimension BLAS refuses
// (jobs must not throw).
template <typename T>
Rows<T> rows_in_place(const View3<T>& v, Index n0, Index n1, Index width, Index max_ld = kMaxBlasIndex) {
  const Index ld = row_stride(v, n0, n1, width);
  return ld < 0 || ld > max_ld ? Rows<T>{} : Rows<T>{v.data, ld};
}

// The caller's arrays of one call as the kernels read them: in place where rows_in_place allows, else
// a dense copy made here, on the calling thread before any job (inputs; outputs that are accumulated
// start from the caller's values) and copied back by finish() after the last job (outputs).
template <typename T>
class Staging {
 public:
  Rows<const T> in(const View3<const T>& v, Index n0, Index n1, Index width, Index max_ld = kMaxBlasIndex) {
    if (!v.data) return {};
    if (const Rows<const T> r = rows_in_place(v, n0, n1, width, max_ld)) return r;
    std::vector<T>& copy = buffers_.emplace_back(static_cast<std::size_t>(n0 * n1 * width));
    gather(v, n0, n1, width, copy.data());
    return {copy.data(), width};
  }
  Rows<const T> in(const View2<const T>& v, Index n0, Index width) { return in(as_view3(v), 1, n0, width); }

  Rows<T> out(const View3<T>& v, Index n0, Index n1, Index width, bool accumulated) {
    if (!v.data) return {};
    if (const Rows<T> r = rows_in_place(v, n0, n1, width)) return r;
    std::vector<T>& copy = buffers_.emplace_back(static_cast<std::size_t>(n0 * n1 * width));
    if (accumulated) gather(View3<const T>{v.data, {v.stride[0], v.stride[1], v.stride[2]}}, n0, n1, width, copy.data());
    pending_.push_back({v, n0, n1, width, copy.data()});
    return {copy.data(), width};
  }
  Rows<T> out(const View2<T>& v, Index n0, Index width, bool accumulated) {
    return out(as_view3(v), 1, n0, width, accumulated);
  }

  // A (n) vector as a dense array: in place when its stride is 1.
  template <typename U>
  const U* in(const View1<const U>& v, Index n, std::vector<U>& copy) {
    if (!v.data || v.stride == 1) return v.data;
    copy.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) copy[i] = v.data[i * v.stride];
    return copy.data();
  }

  void finish() {
    for (const Pending& p : pending_)
      for (Index i = 0; i < p.n0; ++i)
        for (Index j = 0; j < p.n1; ++j)
          for (Index k = 0; k < p.width; ++k)
            p.view.data[i * p.view.stride[0] + j * p.view.stride[1] + k * p.view.stride[2]] =
                p.dense[(i * p.n1 + j) * p.width + k];
  }

 private:
  static void gather(const View3<const T>& v, Index n0, Index n1, Index width, T* to) {
    for (Index i = 0; i < n0; ++i)
      for (Index j = 0; j < n1; ++j) {
        const T* from = v.data + i * v.stride[0] + j * v.stride[1];
        T* row = to + (i * n1 + j) * width;
        if (v.stride[2] == 1)
          std::copy(from, from + width, row);
        else
          for (Index k = 0; k < width; ++k) row[k] = from[k * v.stride[2]];
      }
  }
  struct Pending {
    View3<T> view;
    Index n0, n1, width;
    const T* dense;
  };
  std::deque<std::vector<T>> buffers_;  // a deque: growing it never moves the vectors handed out
  std::vector<Pending> pending_;
};

}  // namespace

Index l2_cache_bytes() {
  static const Index bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long reported = 0;
#endif
    return reported > 0 ? static_cast<Index>(reported) : Index(1) << 20;
  }();
  return bytes;
}

namespace {
// The choice tests and benchmarks may force, one per kind (kAuto unless set).
template <typename Preference>
std::atomic<Preference> preferred{Preference::kAuto};
std::atomic<std::size_t> chunk_bytes_set{0};  // 0: the default
}  // namespace

void set_inference_chunk_bytes(std::size_t bytes) { chunk_bytes_set.store(bytes); }
std::size_t inference_chunk_bytes() {
  constexpr std::size_t kDefaultBytes = std::size_t(64) << 20;
  const std::size_t set = chunk_bytes_set.load();
  return set > 0 ? set : kDefaultBytes;
}

void set_split_preference(SplitPreference preference) { preferred<SplitPreference>.store(preference); }
SplitPreference split_preference() { return preferred<SplitPreference>.load(); }
void set_projection_preference(ProjectionPreference preference) { preferred<ProjectionPreference>.store(preference); }
ProjectionPreference projection_preference() { return preferred<ProjectionPreference>.load(); }
void set_directions_preference(DirectionsPreference preference) { preferred<DirectionsPreference>.store(preference); }
DirectionsPreference directions_preference() { return preferred<DirectionsPreference>.load(); }
void set_weight_grad_preference(WeightGradPreference preference) { preferred<WeightGradPreference>.store(preference); }
WeightGradPreference weight_grad_preference() { return preferred<WeightGradPreference>.load(); }


LayerSplit layer_split(CellKind cell, Index batch, Index hidden, std::size_t value_bytes, int team_threads,
                       Index proj) {
  // The measurements behind each constant: see bench/NOTES.md, "Figures behind the code", layer split.
  // A second rank pays once a step has enough flops: its half of W_hh stays in L1 instead of the whole
  // streaming from L2 each step.
  constexpr double kMinStepFlops = 3e4;
  // By units, each extra rank adds a barrier per step (a scheduler slice when the machine is
  // oversubscribed) and moves the new state between cores; that pays only with enough units a rank.
  constexpr Index kMinUnitsPerRank = 64;
  // By rows, the ranks never meet inside the sequence, but each streams the whole W_hh every step.
  // From L2 (when it takes at most half, leaving room for the step's other data) that is cheap. From
  // L3 it needs kMinRowsToStreamWeights a rank, and where units can be shared, they win: each rank
  // streams only its columns, for every row. Where W_hh fits, rows win from 4 a rank.
  constexpr Index kMinRowsPerRank = 2;
  constexpr Index kMinRowsPerRankOverUnits = 4;
  const double weight_bytes = recurrent_weight_bytes(cell, hidden, proj, value_bytes);
  const double step_flops = 2.0 * static_cast<double>(batch) * weight_bytes / static_cast<double>(value_bytes);
  if (step_flops < kMinStepFlops || team_threads == 1) return {1, false};
  const bool weights_fit = weight_bytes <= 0.5 * static_cast<double>(l2_cache_bytes());
  const SplitPreference preference = split_preference();
  const Index unit_ranks = std::min<Index>(team_threads, std::max<Index>(1, hidden / kMinUnitsPerRank));
  Index row_ranks = std::min<Index>(team_threads, batch / kMinRowsPerRank);
  const LayerSplit by_units{static_cast<int>(unit_ranks), false};
  if (preference == SplitPreference::kUnits) return by_units;
  if (preference == SplitPreference::kRows && row_ranks > 1) return {static_cast<int>(row_ranks), true};
  // The most ranks rows pay on, rather than all or none: a larger team must never leave the recurrence
  // fewer ranks than a smaller one would (32 rows on 16 ranks would give 2 a rank, too few; 8 ranks
  // with 4 each still pay). Rows win while they give at least as many ranks as units do.
  if (!weights_fit && unit_ranks > 1) return by_units;
  if (!weights_fit) row_ranks = std::min<Index>(row_ranks, batch / kMinRowsToStreamWeights);
  if (unit_ranks > 1) row_ranks = std::min<Index>(row_ranks, batch / kMinRowsPerRankOverUnits);
  if (row_ranks > 1 && row_ranks >= unit_ranks) return {static_cast<int>(row_ranks), true};
  return by_units;
}

// Runs `gemms(rank, of)` on `gemm_ranks` threads and the recurrence `recur(rank)` on `ranks`, in the
// order given by `gemms_first`: one job when the counts match (no extra wake-up), two otherwise.
template <typename Gemms, typename Recur>
void run_phases(TeamLease& tm, int gemm_ranks, int ranks, bool gemms_first, const Gemms& gemms,
                const Recur& recur) {
  if (gemm_ranks == ranks) {
    tm.run(ranks, [&](int rank) {
      if (gemms_first) gemms(rank, ranks);
      recur(rank);
      if (!gemms_first) gemms(rank, ranks);
    });
    return;
  }
  if (gemms_first) tm.run(gemm_ranks, [&](int rank) { gemms(rank, gemm_ranks); });
  tm.run(ranks, recur);
  if (!gemms_first) tm.run(gemm_ranks, [&](int rank) { gemms(rank, gemm_ranks); });
}

// A projection needs a cell that takes one (cells.h) and 0 < P < H; the callers check it with their own
// messages, so this is a precondition.
void require_projection_fits(CellKind cell, const LayerShape& s) {
  if (s.proj != 0 && (!cell_facts(cell).projection || s.proj < 0 || s.proj >= s.hidden))
    throw std::invalid_argument("fusedrnn: a projection needs an LSTM and 0 < proj < hidden");
}

namespace {

// A forward call's steps in `count` chunks (see forward_step_chunks): chunk k starts at step
// quantum * (T / quantum * k / count), the last ends at T. `most`: the most chunks the call can take.
struct StepChunks {
  Index count = 1, quantum = 1, most = 1;
  std::pair<Index, Index> steps_of(Index k, Index steps) const {
    const Index t0 = quantum * (steps / quantum * k / count);
    return {t0, k == count - 1 ? steps : quantum * (steps / quantum * (k + 1) / count)};
  }
};

// One direction's forward, planned for `recurrence_threads` ranks of a team of `team_threads` (its
// GEMMs may use them all): the caller's arrays staged, the layout and the kernels' plan. Its parts
// run as jobs of the caller's lease: gemms() on gemm_ranks() ranks before recur() on ranks() ranks.
// A projection by BLAS runs chunk by chunk of `projected_in` (the chunks inference runs in, each
// shared out as a call of its own would be), so a training call's gx is what the same inference
// computes chunk by chunk, bit for bit. The plan points into the object, which therefore stays where
// it was made.
template <typename T>
class ForwardCall {
 public:
  ForwardCall(const LayerForwardParams<T>& a, Index planned_steps, const StepChunks& projected_in,
              int team_threads, int recurrence_threads, int scratch_set)
      : kern_(kernels_for<T>(active_kernels())) {
    const LayerShape& s = a.shape;
    const Index steps = s.steps, batch = s.batch, hidden = s.hidden, proj = s.proj;
    const Index state = s.state_size();
    input_ = s.input;
    gh_width_ = cell_facts(a.cell).gates * hidden;
    rows_ = steps * batch;
    require_projection_fits(a.cell, s);
    require_layer_blas_range(steps, batch, gh_width_, input_, hidden);

    // The caller's arrays as rows, copied only where a view's layout needs it (backend.h).
    x_ = st_.in(a.x, steps, batch, input_);
    w_ih_ = st_.in(a.weights.w_ih, gh_width_, input_);
    const Rows<const T> w_hh = st_.in(a.weights.w_hh, gh_width_, state);
    const Rows<const T> w_hr = proj > 0 ? st_.in(a.weights.w_hr, proj, hidden) : Rows<const T>{};
    const Index* lengths = st_.in(s.lengths, batch, lengths_copy_);
    const T* b_ih = st_.in(a.weights.b_ih, gh_width_, b_ih_copy_);
    const T* b_hh = st_.in(a.weights.b_hh, gh_width_, b_hh_copy_);
    const Rows<T> y = st_.out(a.y, steps, batch, state, false);
    layout_ = team_layout<T>(recurrence_threads, a.cell, s, planned_steps, kern_.panel_width, scratch_set, true);

    // The biases start gx and the projection accumulates onto them (beta = 1), so the step's pointwise
    // pass reads one pre-activation per gate instead of adding two biases, and BLAS skips the pass that
    // clears C for beta = 0. b_hh folds in where the cell allows (all but GRU's n gate).
    has_bias_ = b_ih || b_hh;
    gx_bias_.assign(static_cast<std::size_t>(gh_width_), T(0));
    for (int gate = 0; gate < cell_facts(a.cell).gates && has_bias_; ++gate) {
      const bool fold_hh = b_hh && !recurrent_bias_apart(a.cell, gate);
      for (Index n = gate * hidden; n < (gate + 1) * hidden; ++n) {
        if (b_ih) gx_bias_[n] += b_ih[n];
        if (fold_hh) gx_bias_[n] += b_hh[n];
      }
    }
    if (!b_hh) zero_bias_.assign(static_cast<std::size_t>(gh_width_), T(0));
    up_front_ = layout_.input_projection == InputProjection::kUpFront;
    gx_ = up_front_ ? scratch<T>(ScratchSlot::kGatesX, rows_ * gh_width_, scratch_set) : nullptr;

    fill_common(plan_, a.cell, s, lengths, w_hh, w_hr, a.cell_clip, a.tape, layout_);
    plan_.gx = gx_;
    plan_.projected_up_front = layout_.input_projection == InputProjection::kUpFrontByRank;
    plan_.stacked_input = layout_.stacked_input;
    plan_.x = x_;
    plan_.input = input_;
    plan_.w_ih = w_ih_;
    plan_.gx_bias = gx_bias_.data();
    plan_.b_hh = b_hh ? b_hh : zero_bias_.data();
    plan_.h0 = st_.in(a.h0, batch, state);
    plan_.c0 = st_.in(a.c0, batch, hidden);
    plan_.saved = a.tape.saved;
    plan_.y = y;
    plan_.h_n = st_.out(a.h_n, batch, state, false);
    plan_.c_n = st_.out(a.c_n, batch, hidden, false);
    // Few rows: the projection's cost is reading W_ih, so the ranks share its rows (the product's
    // columns) instead of the product's rows, as many as get enough of it to pay for waking them.
    constexpr double kMinWeightBytesPerThread = 256 * 1024;
    by_columns_ = up_front_ && rows_ <= kMaxFewRows;
    const double ih_bytes = static_cast<double>(gh_width_ * input_ * sizeof(T));
    const double ranks_by_bytes = std::min<double>(team_threads, ih_bytes / kMinWeightBytesPerThread);
    gemm_ranks_ = by_columns_ ? std::max(ranks(), static_cast<int>(ranks_by_bytes)) : ranks();
    for (Index k = 0; up_front_ && !by_columns_ && k < projected_in.count; ++k) {
      const auto [t0, t1] = projected_in.steps_of(k, steps);
      const int run_ranks =
          std::max(ranks(), gemm_threads(2.0 * (t1 - t0) * batch * gh_width_ * input_, team_threads));
      projection_runs_.push_back({t0 * batch, t1 * batch, run_ranks});
      gemm_ranks_ = std::max(gemm_ranks_, run_ranks);
    }
  }
  ForwardCall(const ForwardCall&) = delete;
  ForwardCall& operator=(const ForwardCall&) = delete;

  int ranks() const { return layout_.split.ranks; }
  int gemm_ranks() const { return gemm_ranks_; }
  bool has_gemms() const { return up_front_; }

  // Input projection of this rank's rows of each run (or its columns of every row): gx = x W_ih^T + bias.
  void gemms(int rank, int of) const {
    if (!up_front_) return;
    if (by_columns_) return project(0, rows_, share(gh_width_, of, rank));
    for (const ProjectionRun& run : projection_runs_) {
      if (rank >= run.ranks) continue;
      const auto [r0, r1] = share(run.end - run.begin, run.ranks, rank);
      project(run.begin + r0, run.begin + r1, {0, gh_width_});
    }
  }
  void recur(int rank, const RankGroup& group) const { kern_.forward(plan_, rank, group); }
  // After the last job: outputs that were staged go back to the caller's arrays.
  void finish() { st_.finish(); }

 private:
  // Rows [r0, r1) by columns [c0, c1) of gx: one BLAS call (or the few-rows kernel's).
  void project(Index r0, Index r1, std::pair<Index, Index> columns) const {
    const auto [c0, c1] = columns;
    if (has_bias_)
      for (Index r = r0; r < r1; ++r)
        std::copy(gx_bias_.begin() + c0, gx_bias_.begin() + c1, gx_ + r * gh_width_ + c0);
    kern_.times_weights(r1 - r0, c1 - c0, input_, x_.row(r0), x_.ld, w_ih_.row(c0), w_ih_.ld, has_bias_,
                        gx_ + r0 * gh_width_ + c0, gh_width_);
  }

  // Rows [begin, end) of gx, shared out among `ranks` ranks.
  struct ProjectionRun {
    Index begin, end;
    int ranks;
  };

  const RecurrenceKernels<T>& kern_;
  Staging<T> st_;
  std::vector<Index> lengths_copy_;
  std::vector<T> b_ih_copy_, b_hh_copy_, gx_bias_, zero_bias_;
  Rows<const T> x_, w_ih_;
  Index input_ = 0, gh_width_ = 0, rows_ = 0;
  TeamLayout<T> layout_;
  bool has_bias_ = false, up_front_ = false, by_columns_ = false;
  T* gx_ = nullptr;
  int gemm_ranks_ = 1;
  std::vector<ProjectionRun> projection_runs_;
  ForwardPlan<T> plan_;
};

// A call planned for the whole team of the lease (whose size holds for every job of the call): its
// GEMMs before the recurrence (forward) or after it (backward).
template <typename Call>
void run_on_whole_team(TeamLease& tm, Call& call, bool gemms_first) {
  run_phases(
      tm, call.gemm_ranks(), call.ranks(), gemms_first, [&](int rank, int of) { call.gemms(rank, of); },
      [&](int rank) { call.recur(rank, RankGroup(tm.barrier(), 0, call.ranks())); });
  call.finish();
}

// Inference over a long sequence runs in chunks of steps, a ForwardCall each, the state handed from one
// to the next: the scratch that grows with the steps (the input projection's G*H values a row, the
// copies of x and y a layout needs), which the process keeps after the call, then holds one chunk's
// rows instead of the whole sequence's. Each chunk computes what the training call (which runs whole:
// its tape holds every step anyway) computes for its steps, bit for bit: the choices are made for the
// whole sequence; where the ranks project x with the panel kernel, chunks start and end on whole
// blocks of its rows (projection_pass_steps); where BLAS does, the training call's BLAS calls are the
// chunks' (ForwardCall), since BLAS rounds a row by where it falls in the call.
constexpr Index kMinChunkRowsPerThread = 64;

// The chunks a forward call's steps make (both modes: training projects by them), as few as keep each
// one's scratch under inference_chunk_bytes(), each with kMinChunkRowsPerThread rows a thread at
// least. Checks the whole call's sizes first, before anything is allocated for it.
template <typename T>
StepChunks forward_step_chunks(const LayerForwardParams<T>& a, int recurrence_threads, int team_threads) {
  const LayerShape& s = a.shape;
  const CellFacts& facts = cell_facts(a.cell);
  require_projection_fits(a.cell, s);
  require_layer_blas_range(s.steps, s.batch, facts.gates * s.hidden, s.input, s.hidden);
  StepChunks chunks;
  const ForwardChoices choices = forward_choices(a.cell, s, sizeof(T), recurrence_threads);
  const bool by_rank_whole_rows = choices.input_projection == InputProjection::kUpFrontByRank &&
                                  (!choices.split.by_rows || choices.split.ranks == 1);
  if (by_rank_whole_rows) chunks.quantum = whole_block_steps(s.batch);
  Index row_values = choices.input_projection == InputProjection::kInSteps ? 0 : facts.gates * s.hidden;
  if (!rows_in_place(a.x, s.steps, s.batch, s.input)) row_values += s.input;
  if (a.y.data && !rows_in_place(a.y, s.steps, s.batch, s.state_size())) row_values += s.state_size();
  const double bytes = static_cast<double>(s.steps * s.batch * row_values) * sizeof(T);
  const Index min_steps = (kMinChunkRowsPerThread * team_threads + s.batch - 1) / s.batch;
  const Index min_quanta = (min_steps + chunks.quantum - 1) / chunks.quantum;
  chunks.most = std::max<Index>(1, s.steps / chunks.quantum / min_quanta);
  const Index wanted = static_cast<Index>(std::ceil(bytes / static_cast<double>(inference_chunk_bytes())));
  chunks.count = std::clamp<Index>(wanted, 1, chunks.most);
  return chunks;
}

// The params of each chunk of a forward call, in the order they run (the reverse direction's from the
// last steps back): the caller's x and y at the chunk's steps, the lengths counted from its first step,
// and the state handed on through buffers of its own (the caller's h0 and c0 start the first chunk to
// run, its h_n and c_n end the last). One chunk is the call itself.
template <typename T>
class ForwardChunks {
 public:
  ForwardChunks(const LayerForwardParams<T>& a, StepChunks chunks) : a_(a), chunks_(chunks) {
    const LayerShape& s = a.shape;
    if (chunks_.count == 1) return;
    for (std::vector<T>& h : h_) h.resize(static_cast<std::size_t>(s.batch * s.state_size()));
    if (cell_facts(a.cell).has_cell_state)
      for (std::vector<T>& c : c_) c.resize(static_cast<std::size_t>(s.batch * s.hidden));
    if (s.lengths.data) lengths_.resize(static_cast<std::size_t>(s.batch));
  }
  ForwardChunks(const ForwardChunks&) = delete;
  ForwardChunks& operator=(const ForwardChunks&) = delete;

  Index count() const { return chunks_.count; }

  // The params of the i-th chunk to run; the lengths they point to hold until the next call.
  LayerForwardParams<T> chunk(Index i) {
    const Index n = chunks_.count;
    if (n == 1) return a_;
    const LayerShape& s = a_.shape;
    const auto [t0, t1] = chunks_.steps_of(s.reverse ? n - 1 - i : i, s.steps);
    LayerForwardParams<T> p = a_;
    p.shape.steps = t1 - t0;
    p.x.data += t0 * a_.x.stride[0];
    if (p.y.data) p.y.data += t0 * a_.y.stride[0];
    if (s.lengths.data) {
      for (Index b = 0; b < s.batch; ++b)
        lengths_[b] = std::clamp<Index>(s.lengths.data[b * s.lengths.stride] - t0, 0, t1 - t0);
      p.shape.lengths = dense<const Index>(lengths_.data());
    }
    const Index r = s.state_size(), h = s.hidden;
    const bool has_c = !c_[0].empty();
    if (i > 0) {
      p.h0 = dense<const T>(h_[(i - 1) % 2].data(), s.batch, r);
      if (has_c) p.c0 = dense<const T>(c_[(i - 1) % 2].data(), s.batch, h);
    }
    if (i < n - 1) {
      p.h_n = dense<T>(h_[i % 2].data(), s.batch, r);
      if (has_c) p.c_n = dense<T>(c_[i % 2].data(), s.batch, h);
    }
    return p;
  }

 private:
  const LayerForwardParams<T>& a_;
  StepChunks chunks_;
  std::vector<T> h_[2], c_[2];  // the state a chunk ends with, read by the next
  std::vector<Index> lengths_;
};

template <typename T>
void run_forward(TeamLease& tm, const LayerForwardParams<T>& a) {
  const StepChunks step_chunks = forward_step_chunks(a, tm.size(), tm.size());
  if (a.tape.training) {
    ForwardCall<T> call(a, a.shape.steps, step_chunks, tm.size(), tm.size(), 0);
    run_on_whole_team(tm, call, true);
    return;
  }
  ForwardChunks<T> chunks(a, step_chunks);
  for (Index i = 0; i < chunks.count(); ++i) {
    ForwardCall<T> call(chunks.chunk(i), a.shape.steps, StepChunks{}, tm.size(), tm.size(), 0);
    run_on_whole_team(tm, call, true);
  }
}

}  // namespace

template <typename T>
void layer_forward(const LayerForwardParams<T>& a) {
  TeamLease tm = lease_team();
  run_forward(tm, a);
}

namespace {

// The weight gradients sum over all steps' rows (K = T*B). Split by gate rows (M), each rank reads
// only its columns of the gate gradients but gets a short M, which OpenBLAS runs markedly slower than
// the whole M over half the rows (see bench/NOTES.md, "Figures behind the code", weight gradients).
// Split by rows, each further rank sums into a partial of its own, added after a barrier; worth it
// while those partials are small beside L2, and while each rank sums enough rows that adding the
// partials (as many values as the GEMM's output) costs little beside them. Large layers gained
// nothing by rows, so stay split by M.
bool weight_grads_by_rows(const LayerShape& s, int gates, int ranks, std::size_t value_bytes) {
  constexpr Index kMinRowsPerPartial = 256;
  if (ranks == 1) return false;
  const WeightGradPreference preference = weight_grad_preference();
  if (preference != WeightGradPreference::kAuto) return preference == WeightGradPreference::kRows;
  const double partial_bytes =
      static_cast<double>(ranks - 1) * gates * s.hidden * (s.input + s.state_size()) * value_bytes;
  return partial_bytes <= 0.25 * static_cast<double>(l2_cache_bytes()) &&
         s.steps * s.batch >= kMinRowsPerPartial * ranks;
}

// One direction's backward, planned like ForwardCall: recur() on ranks() ranks, then gemms() (dx, the
// weight and bias gradients) on gemm_ranks(); `barrier` is the team's, which gemms() meets at when
// the weight gradients are summed by rows.
template <typename T>
class BackwardCall {
 public:
  BackwardCall(const LayerBackwardParams<T>& a, int team_threads, int recurrence_threads, int scratch_set,
               SpinBarrier& barrier)
      : a_(a), kern_(kernels_for<T>(active_kernels())), barrier_(barrier) {
    const LayerShape& s = a.shape;
    const Index steps = s.steps, batch = s.batch, hidden = s.hidden;
    input_ = s.input;
    proj_ = s.proj;
    hidden_ = hidden;
    width_ = s.state_size();  // R
    const CellFacts& facts = cell_facts(a.cell);
    const int gates = facts.gates;
    gh_width_ = gates * hidden;
    rows_ = steps * batch;
    steps_ = steps;
    batch_ = batch;
    groups_ = a.grad_groups;
    if (!a.tape.training) throw std::logic_error("fusedrnn: backward needs a tape recorded in training");
    if (groups_ < 1 || batch % groups_ != 0)
      throw std::invalid_argument("fusedrnn: grad_groups must divide the batch into groups of equal size");
    require_projection_fits(a.cell, s);
    require_layer_blas_range(steps, batch, gh_width_, input_, hidden);

    // The caller's arrays as rows, copied only where a view's layout needs it (backend.h). Per group
    // of rows, each row's GEMMs step B rows at a time through the gate gradients, x and the states, so
    // there x is also copied where B of its row strides would pass the BLAS range.
    x_ = st_.in(a.x, steps, batch, input_, groups_ > 1 ? kMaxBlasIndex / batch : kMaxBlasIndex);
    if (groups_ > 1)
      require_blas_range({{"grad_groups*gates*hidden_size", groups_ * gh_width_},
                          {"batch*gates*hidden_size", batch * gh_width_},
                          {"batch*input_size", batch * x_.ld},
                          {"batch*state_size", batch * width_},
                          {"batch*hidden_size", batch * std::max(proj_, hidden)}});
    w_ih_ = st_.in(a.weights.w_ih, gh_width_, input_);
    const Rows<const T> w_hh = st_.in(a.weights.w_hh, gh_width_, width_);
    const Rows<const T> w_hr = proj_ > 0 ? st_.in(a.weights.w_hr, proj_, hidden) : Rows<const T>{};
    const Index* lengths = st_.in(s.lengths, batch, lengths_copy_);
    const Rows<const T> dy = st_.in(a.dy, steps, batch, width_);
    dx_ = st_.out(a.dx, steps, batch, input_, a.accumulate_dx);
    dw_ih_ = st_.out(a.dw_ih, groups_ * gh_width_, input_, a.accumulate_weight_grads);
    dw_hh_ = st_.out(a.dw_hh, groups_ * gh_width_, width_, a.accumulate_weight_grads);
    dw_hr_ = proj_ > 0 ? st_.out(a.dw_hr, groups_ * proj_, hidden, a.accumulate_weight_grads) : Rows<T>{};
    layout_ = team_layout<T>(recurrence_threads, a.cell, s, s.steps, kern_.panel_width, scratch_set, false);
    const int ranks = layout_.split.ranks;

    dgx_ = scratch<T>(ScratchSlot::kGradGates, rows_ * gh_width_, scratch_set);
    dgh_ = facts.split_recurrent_grad ? scratch<T>(ScratchSlot::kGradGatesH, rows_ * gh_width_, scratch_set) : dgx_;
    const Index dh_values = 2 * batch * width_;
    T* grad_state = scratch<T>(ScratchSlot::kGradState, dh_values + (facts.has_cell_state ? batch * hidden : 0),
                               scratch_set);
    dhs_ = proj_ > 0 ? scratch<T>(ScratchSlot::kGradOutputs, rows_ * proj_, scratch_set) : nullptr;
    norm_stride_ = (steps + 7) / 8 * 8;
    norm_partial_ = scratch<double>(ScratchSlot::kNormPartial, norm_stride_ * ranks, scratch_set);
    bias_grads_ = a.db_ih.data || a.db_hh.data;
    const Index bias_columns = facts.split_recurrent_grad ? 2 * gh_width_ : gh_width_;  // dgx's, then dgh's
    bias_stride_ = (bias_columns + 7) / 8 * 8;
    if (!dy) zero_row_.assign(static_cast<std::size_t>(width_), T(0));

    fill_common(plan_, a.cell, s, lengths, w_hh, w_hr, a.cell_clip, a.tape, layout_);
    plan_.saved = a.tape.saved;
    plan_.dy = dy ? dy : Rows<const T>{zero_row_.data(), 0};
    plan_.dh_n = st_.in(a.dh_n, batch, width_);
    plan_.dc_n = st_.in(a.dc_n, batch, hidden);
    plan_.dgx = dgx_;
    plan_.dgh = dgh_;
    plan_.dh = grad_state;
    plan_.dc = facts.has_cell_state ? grad_state + dh_values : nullptr;
    plan_.dhs = dhs_;
    plan_.dh0 = st_.out(a.dh0, batch, width_, false);
    plan_.dc0 = st_.out(a.dc0, batch, hidden, false);
    plan_.dh_norm_partial = norm_partial_;
    plan_.norm_stride = norm_stride_;
    plan_.bias_stride = bias_stride_;

    // Rows of all steps' previous hidden states: slot 0 (forward) or 1 (reverse), contiguous.
    h_prev_rows_ = plan_.hs.at(prev_slot(s.reverse, 0));
    const double gemm_flops =
        2.0 * rows_ * (gh_width_ * (2 * input_ + width_) + static_cast<double>(proj_) * hidden);
    gemm_ranks_ = std::max(ranks, gemm_threads(gemm_flops, team_threads));
    // A row of column sums a rank: the recurrence's ranks sum every step's, or per group of rows each
    // GEMM rank sums its groups' (grouped_grads), after the recurrence.
    const int bias_rows = groups_ > 1 ? gemm_ranks_ : ranks;
    bias_partial_ =
        bias_grads_ ? scratch<double>(ScratchSlot::kBiasGradPartial, bias_stride_ * bias_rows, scratch_set) : nullptr;
    plan_.bias_grad_partial = bias_partial_;
    weight_values_ = gh_width_ * (input_ + width_);
    grads_by_rows_ = groups_ == 1 && weight_grads_by_rows(s, gates, gemm_ranks_, sizeof(T));
    partials_ = grads_by_rows_
                    ? scratch<T>(ScratchSlot::kWeightGradPartial, (gemm_ranks_ - 1) * weight_values_, scratch_set)
                    : nullptr;
  }
  BackwardCall(const BackwardCall&) = delete;
  BackwardCall& operator=(const BackwardCall&) = delete;

  int ranks() const { return layout_.split.ranks; }
  int gemm_ranks() const { return gemm_ranks_; }

  void recur(int rank, const RankGroup& group) const { kern_.backward(plan_, rank, group); }

  // The recurrence ended at a barrier after its last pointwise pass, so every gate gradient is in
  // place. Everything that does not feed the recurrence is split across the ranks: dx by rows, the
  // weight gradients by rows or gate rows (weight_grads_by_rows), the bias gradients by gate rows.
  void gemms(int rank, int of) const {
    const Index gh_width = gh_width_, input = input_, width = width_, rows = rows_;
    const T* const dgx = dgx_;
    const T* const dgh = dgh_;
    const auto [r0, r1] = share(rows, of, rank);
    if (dx_)
      kern_.times_matrix(r1 - r0, input, gh_width, dgx + r0 * gh_width, gh_width, w_ih_.data, w_ih_.ld,
                         a_.accumulate_dx, dx_.row(r0), dx_.ld);
    if (groups_ > 1) return grouped_grads(rank, of);
    const auto [g0, g1] = share(gh_width, of, rank);
    const bool add = a_.accumulate_weight_grads;
    const T grads_beta = add ? T(1) : T(0);
    if (grads_by_rows_) {
      // Rank 0 sums into the gradients, rank q > 0 into partial q - 1: (G*H, I) then (G*H, H).
      T* const partial = rank == 0 ? nullptr : partials_ + (rank - 1) * weight_values_;
      const Rows<T> into_ih = rank == 0 ? dw_ih_ : Rows<T>{partial, input};
      const Rows<T> into_hh = rank == 0 ? dw_hh_ : Rows<T>{partial + gh_width * input, width};
      const T beta = rank == 0 ? grads_beta : T(0);
      if (r1 > r0) {
        blas::gemm<T>(true, false, gh_width, input, r1 - r0, T(1), dgx + r0 * gh_width, gh_width, x_.row(r0),
                      x_.ld, beta, into_ih.data, into_ih.ld);
        blas::gemm<T>(true, false, gh_width, width, r1 - r0, T(1), dgh + r0 * gh_width, gh_width,
                      h_prev_rows_ + r0 * width, width, beta, into_hh.data, into_hh.ld);
      } else if (rank > 0) {
        std::fill(partial, partial + weight_values_, T(0));
      } else if (!add) {  // rank 0 without rows still starts the sums the partials are added to
        for (Index g = 0; g < gh_width; ++g) {
          std::fill(dw_ih_.row(g), dw_ih_.row(g) + input, T(0));
          std::fill(dw_hh_.row(g), dw_hh_.row(g) + width, T(0));
        }
      }
    } else {
      blas::gemm<T>(true, false, g1 - g0, input, rows, T(1), dgx + g0, gh_width, x_.data, x_.ld, grads_beta,
                    dw_ih_.row(g0), dw_ih_.ld);
      blas::gemm<T>(true, false, g1 - g0, width, rows, T(1), dgh + g0, gh_width, h_prev_rows_, width,
                    grads_beta, dw_hh_.row(g0), dw_hh_.ld);
    }
    // dW_hr (+)= sum over all steps' rows of dh^T r, each rank its share of W_hr's rows.
    if (proj_ > 0) {
      const auto [p0, p1] = share(proj_, of, rank);
      if (p1 > p0)
        blas::gemm<T>(true, false, p1 - p0, hidden_, rows, T(1), dhs_ + p0, proj_, a_.tape.rs, hidden_,
                      grads_beta, dw_hr_.row(p0), dw_hr_.ld);
    }
    // The bias gradients: the ranks' column sums of dgx and (cells that split them) dgh, in rank order.
    const auto sum_into = [add](T& grad, double sum) { grad = (add ? grad : T(0)) + static_cast<T>(sum); };
    if (bias_grads_)
      for (Index c = g0; c < g1; ++c) {
        double from_x = 0.0, from_h = 0.0;
        for (int r = 0; r < ranks(); ++r) {
          from_x += bias_partial_[r * bias_stride_ + c];
          if (dgh != dgx) from_h += bias_partial_[r * bias_stride_ + gh_width + c];
        }
        if (a_.db_ih.data) sum_into(a_.db_ih.data[c * a_.db_ih.stride], from_x);
        if (a_.db_hh.data) sum_into(a_.db_hh.data[c * a_.db_hh.stride], dgh != dgx ? from_h : from_x);
      }
    if (grads_by_rows_) {
      // Every partial is complete; each rank adds its gate rows of them, in rank order (deterministic).
      RankGroup(barrier_, 0, of).wait(rank);
      for (int q = 0; q + 1 < of; ++q) {
        const T* partial_ih = partials_ + q * weight_values_;
        const T* partial_hh = partial_ih + gh_width * input;
        for (Index g = g0; g < g1; ++g) {
          for (Index i = 0; i < input; ++i) dw_ih_.row(g)[i] += partial_ih[g * input + i];
          for (Index i = 0; i < width; ++i) dw_hh_.row(g)[i] += partial_hh[g * width + i];
        }
      }
    }
  }

  // The weight and bias gradients of each group of rows apart (grad_groups > 1), each rank its share of
  // the groups. A row's steps sit B rows apart in the gate gradients, x and the states, so each row's
  // sums are GEMMs over its T steps with the leading dimensions times B; a group's rows add into its
  // gradients in row order (deterministic whatever the team).
  void grouped_grads(int rank, int of) const {
    const Index gh_width = gh_width_, input = input_, width = width_, batch = batch_, steps = steps_;
    const Index group_rows = batch / groups_;
    const T* const dgx = dgx_;
    const T* const dgh = dgh_;
    const bool add = a_.accumulate_weight_grads;
    const bool split_bias = dgh != dgx;
    double* const bias_sums = bias_grads_ ? bias_partial_ + rank * bias_stride_ : nullptr;
    const auto [q0, q1] = share(groups_, of, rank);
    for (Index q = q0; q < q1; ++q) {
      if (bias_sums) std::fill(bias_sums, bias_sums + (split_bias ? 2 : 1) * gh_width, 0.0);
      for (Index j = 0; j < group_rows; ++j) {
        const Index b = q * group_rows + j;
        const T beta = add || j > 0 ? T(1) : T(0);
        blas::gemm<T>(true, false, gh_width, input, steps, T(1), dgx + b * gh_width, batch * gh_width, x_.row(b),
                      batch * x_.ld, beta, dw_ih_.row(q * gh_width), dw_ih_.ld);
        blas::gemm<T>(true, false, gh_width, width, steps, T(1), dgh + b * gh_width, batch * gh_width,
                      h_prev_rows_ + b * width, batch * width, beta, dw_hh_.row(q * gh_width), dw_hh_.ld);
        if (proj_ > 0)
          blas::gemm<T>(true, false, proj_, hidden_, steps, T(1), dhs_ + b * proj_, batch * proj_,
                        a_.tape.rs + b * hidden_, batch * hidden_, beta, dw_hr_.row(q * proj_), dw_hr_.ld);
        if (bias_grads_)
          for (Index t = 0; t < steps; ++t) {
            const T* from_x = dgx + (t * batch + b) * gh_width;
            const T* from_h = dgh + (t * batch + b) * gh_width;
            for (Index c = 0; c < gh_width; ++c) bias_sums[c] += static_cast<double>(from_x[c]);
            if (split_bias)
              for (Index c = 0; c < gh_width; ++c) bias_sums[gh_width + c] += static_cast<double>(from_h[c]);
          }
      }
      if (!bias_grads_) continue;
      for (Index c = 0; c < gh_width; ++c) {
        const double from_x = bias_sums[c], from_h = split_bias ? bias_sums[gh_width + c] : from_x;
        for (const auto& [grad, sum] : {std::pair{a_.db_ih, from_x}, std::pair{a_.db_hh, from_h}}) {
          if (!grad.data) continue;
          T& into = grad.data[(q * gh_width + c) * grad.stride];
          into = (add ? into : T(0)) + static_cast<T>(sum);
        }
      }
    }
  }

  // After the last job: the gradient norms, and staged outputs back to the caller's arrays.
  void finish() {
    if (a_.dh_norm)
      for (Index t = 0; t < steps_; ++t) {
        double sum = 0.0;
        for (int r = 0; r < ranks(); ++r) sum += norm_partial_[r * norm_stride_ + t];
        a_.dh_norm[t] = std::sqrt(sum);
      }
    st_.finish();
  }

 private:
  const LayerBackwardParams<T>& a_;
  const RecurrenceKernels<T>& kern_;
  SpinBarrier& barrier_;
  Staging<T> st_;
  std::vector<Index> lengths_copy_;
  std::vector<T> zero_row_;
  Rows<const T> x_, w_ih_;
  Rows<T> dx_, dw_ih_, dw_hh_, dw_hr_;
  Index input_ = 0, proj_ = 0, hidden_ = 0, width_ = 0, gh_width_ = 0, rows_ = 0, steps_ = 0, batch_ = 0;
  Index groups_ = 1;
  TeamLayout<T> layout_;
  T *dgx_ = nullptr, *dgh_ = nullptr, *dhs_ = nullptr, *partials_ = nullptr;
  const T* h_prev_rows_ = nullptr;
  Index norm_stride_ = 0, bias_stride_ = 0, weight_values_ = 0;
  double *norm_partial_ = nullptr, *bias_partial_ = nullptr;
  bool bias_grads_ = false, grads_by_rows_ = false;
  int gemm_ranks_ = 1;
  BackwardPlan<T> plan_;
};

template <typename T>
void run_backward(TeamLease& tm, const LayerBackwardParams<T>& a) {
  BackwardCall<T> call(a, tm.size(), tm.size(), 0, tm.barrier());
  run_on_whole_team(tm, call, false);
}

}  // namespace

template <typename T>
void layer_backward(const LayerBackwardParams<T>& a) {
  TeamLease tm = lease_team();
  run_backward(tm, a);
}

namespace {

// The team's parts for two directions at once: its first half (rounded down) and the rest.
int first_part(int team_threads) { return team_threads / 2; }

// Both directions' recurrences in one job, direction 0 on the first ranks and 1 on the rest, each
// meeting only its own ranks.
template <typename Call>
void recur_together(TeamLease& tm, const Call& c0, const Call& c1) {
  const int r0 = c0.ranks(), r1 = c1.ranks();
  tm.run(r0 + r1, [&](int rank) {
    if (rank < r0)
      c0.recur(rank, RankGroup(tm.barrier(), 0, r0));
    else
      c1.recur(rank - r0, RankGroup(tm.barrier(), r0, r1));
  });
}

}  // namespace

// Two directions at once, each on its part of the team, pay where a direction's ranks would each do
// little per weight read: sharing units (a barrier a step, spared for each rank given up), one rank
// (a core idle beside the recurrence), or sharing rows with few rows a rank (each step streams all of
// W_hh for them; a part's ranks get twice the rows). And only while each rank's weights still fit in
// half its L2 on the part: streamed from L3, fewer ranks read them more slowly. A direction with
// enough rows a rank already uses the team with no barrier inside the sequence: the directions stay
// in turn (see bench/NOTES.md, "Figures behind the code", directions).
bool directions_together(CellKind cell, const LayerShape& s, std::size_t value_bytes, int team_threads) {
  constexpr Index kMinRowsPerRankApart = 8;
  if (team_threads < 2) return false;
  switch (directions_preference()) {
    case DirectionsPreference::kTogether: return true;
    case DirectionsPreference::kApart: return false;
    case DirectionsPreference::kAuto: break;
  }
  const LayerSplit whole = layer_split(cell, s.batch, s.hidden, value_bytes, team_threads, s.proj);
  if (whole.by_rows && s.batch / whole.ranks >= kMinRowsPerRankApart) return false;
  const LayerSplit part = layer_split(cell, s.batch, s.hidden, value_bytes, first_part(team_threads), s.proj);
  const int weight_shares = part.by_rows ? 1 : part.ranks;
  return recurrent_weight_bytes(cell, s.hidden, s.proj, value_bytes) / weight_shares <=
         0.5 * static_cast<double>(l2_cache_bytes());
}

template <typename T>
void layer_forward_directions(const LayerForwardParams<T>& d0, const LayerForwardParams<T>& d1) {
  TeamLease tm = lease_team();
  const int n = tm.size();
  if (!directions_together(d0.cell, d0.shape, sizeof(T), n)) {
    run_forward(tm, d0);
    run_forward(tm, d1);
    return;
  }
  // Both directions in the same number of chunks, as many as either needs and both can take.
  StepChunks k0 = forward_step_chunks(d0, first_part(n), n), k1 = forward_step_chunks(d1, n - first_part(n), n);
  k0.count = k1.count = std::min({std::max(k0.count, k1.count), k0.most, k1.most});
  const bool training = d0.tape.training;
  ForwardChunks<T> chunks0(d0, training ? StepChunks{} : k0), chunks1(d1, training ? StepChunks{} : k1);
  for (Index i = 0; i < chunks0.count(); ++i) {
    ForwardCall<T> c0(chunks0.chunk(i), d0.shape.steps, training ? k0 : StepChunks{}, n, first_part(n), 0);
    ForwardCall<T> c1(chunks1.chunk(i), d1.shape.steps, training ? k1 : StepChunks{}, n, n - first_part(n), 1);
    for (const ForwardCall<T>* c : {&c0, &c1})
      if (c->has_gemms()) tm.run(c->gemm_ranks(), [&](int rank) { c->gemms(rank, c->gemm_ranks()); });
    recur_together(tm, c0, c1);
    c0.finish();
    c1.finish();
  }
}

// Direction 1's dx adds into what direction 0's writes, so its GEMMs run after 0's; and where dx had
// to be staged (a copy made when the call is planned) the directions run in turn.
template <typename T>
void layer_backward_directions(const LayerBackwardParams<T>& d0, const LayerBackwardParams<T>& d1) {
  TeamLease tm = lease_team();
  const int n = tm.size();
  const LayerShape& s = d1.shape;
  const bool dx_in_place = !d1.dx.data || rows_in_place(d1.dx, s.steps, s.batch, s.input);
  if (!dx_in_place || !directions_together(d0.cell, d0.shape, sizeof(T), n)) {
    run_backward(tm, d0);
    run_backward(tm, d1);
    return;
  }
  BackwardCall<T> c0(d0, n, first_part(n), 0, tm.barrier());
  BackwardCall<T> c1(d1, n, n - first_part(n), 1, tm.barrier());
  recur_together(tm, c0, c1);
  for (const BackwardCall<T>* c : {&c0, &c1})
    tm.run(c->gemm_ranks(), [&](int rank) { c->gemms(rank, c->gemm_ranks()); });
  c0.finish();
  c1.finish();
}

ProjectionPreference input_projection_choice(CellKind cell, const LayerShape& s, std::size_t value_bytes,
                                             int threads) {
  switch (forward_choices(cell, s, value_bytes, threads).input_projection) {
    case InputProjection::kInSteps: return ProjectionPreference::kInSteps;
    case InputProjection::kUpFrontByRank: return ProjectionPreference::kUpFrontByRank;
    case InputProjection::kUpFront: break;
  }
  return ProjectionPreference::kUpFront;
}

int team_size() { return team().size(); }
void set_team_size(int threads) { team().set_size(threads); }
void use_openmp_runtime(const std::string& library) { team().use_openmp_runtime(library); }
std::string openmp_runtime() { return team().openmp_runtime(); }
void set_team_worker_delay(int microseconds) { ThreadTeam::set_worker_delay_after_post(microseconds); }

std::size_t release_scratch() {
  TeamLease tm = team().lease();  // waits for a running call, which may be using it
  std::size_t bytes = 0;
  for (auto& set : scratch_buffers())
    for (KeptBuffer& b : set) bytes += b.release();
  return bytes;
}

template void layer_forward<float>(const LayerForwardParams<float>&);
template void layer_forward<double>(const LayerForwardParams<double>&);
template void layer_backward<float>(const LayerBackwardParams<float>&);
template void layer_backward<double>(const LayerBackwardParams<double>&);
template void layer_forward_directions<float>(const LayerForwardParams<float>&, const LayerForwardParams<float>&);
template void layer_forward_directions<double>(const LayerForwardParams<double>&, const LayerForwardParams<double>&);
template void layer_backward_directions<float>(const LayerBackwardParams<float>&, const LayerBackwardParams<float>&);
template void layer_backward_directions<double>(const LayerBackwardParams<double>&,
                                                const LayerBackwardParams<double>&);

}  // namespace fusedrnn::cpu
