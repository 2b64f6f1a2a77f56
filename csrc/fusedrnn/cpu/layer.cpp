#include <algorithm>
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

#include "fusedrnn/cpu/backend.h"
#include "fusedrnn/cpu/blas.h"
#include "fusedrnn/cpu/kernels.h"
#include "fusedrnn/cpu/threads.h"

namespace fusedrnn::cpu {
namespace {

// Scratch buffers, uninitialised (the core writes every element before reading it) and kept per calling
// thread between calls: a fresh multi-megabyte allocation is a fresh mmap whose page faults and zeroing
// cost a visible share of a training step (see bench/NOTES.md, "Figures behind the code", scratch). Each buffer a call needs has its own ScratchSlot. Only the calling
// thread allocates; team jobs never do.
enum class ScratchSlot {
  kGatesX, kRankBuffers, kGradGates, kGradGatesH, kGradState, kGradOutputs, kNormPartial, kBiasGradPartial,
  kWeightGradPartial, kCount
};

template <typename T>
T* scratch(ScratchSlot slot, Index n) {
  // 64-byte aligned: ranks write 64-byte-aligned ranges of units in each row (no shared cache lines).
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  struct Buffer {
    std::unique_ptr<T[], Free> data;
    Index capacity = 0;
  };
  thread_local Buffer buffers[static_cast<int>(ScratchSlot::kCount)];
  Buffer& b = buffers[static_cast<int>(slot)];
  if (n > b.capacity) {
    b.data.reset();  // release before allocating, so peak memory is not old + new
    b.data.reset(static_cast<T*>(::operator new[](static_cast<std::size_t>(n) * sizeof(T), std::align_val_t(64))));
    b.capacity = n;
  }
  return b.data.get();
}

// BLAS runs single-threaded inside team jobs: the team is the only pool.
ThreadTeam& team() {
  static ThreadTeam& t = [] () -> ThreadTeam& {
    blas::set_num_threads(1);
    return ThreadTeam::instance();
  }();
  return t;
}

using TeamLease = ThreadTeam::Lease;

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
std::vector<RankScratch<T>> rank_scratch(const std::vector<RankShare>& shares, int panel_width,
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
  T* base = scratch<T>(ScratchSlot::kRankBuffers, total + align);
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

// Streaming weights from L3 every step keeps up with the FMAs only when each weight serves enough
// rows: 32 rows make 16 flops a byte.
constexpr Index kMinRowsToStreamWeights = 32;

// The 32-bit BLAS takes no dimension past INT_MAX; refuse before the job starts (jobs must not throw).
void require_blas_range(std::initializer_list<Index> dims) {
  for (Index d : dims)
    if (d > std::numeric_limits<std::int32_t>::max())
      throw std::length_error("fusedrnn: a matrix dimension exceeds the 32-bit BLAS index range");
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
// back from L3 or memory. That pays where the rank's packed weights stay in L2 between steps: by rows,
// both whole weights in half the L2, as for sharing rows at all; by units, the rank's columns of both
// in the L2, with enough rows that each weight read from it serves as many FMAs as streaming from L3
// needs (a B=1 step would read W_ih just to multiply one row). Short of that, by units each rank can
// still project its own gate columns of every step before the first with the panel kernel: the
// result then sits in the rank's own cache, where the shared GEMM, split by steps, leaves each rank's
// share of later steps in the other core's. That pays where the rank's W_ih slice stays in half the
// L2, and where BLAS would use no more threads than the recurrence's ranks.
enum class InputProjection { kUpFront, kUpFrontByRank, kInSteps };

InputProjection input_projection(CellKind cell, const LayerShape& s, const LayerSplit& split,
                                 std::size_t value_bytes, int team_threads) {
  switch (projection_preference()) {
    case ProjectionPreference::kInSteps: return InputProjection::kInSteps;
    case ProjectionPreference::kUpFront: return InputProjection::kUpFront;
    case ProjectionPreference::kUpFrontByRank: return InputProjection::kUpFrontByRank;
    case ProjectionPreference::kAuto: break;
  }
  if (s.steps < kMinStepsToPack) return InputProjection::kUpFront;
  const double gate_rows = static_cast<double>(cell_facts(cell).gates) * s.hidden;
  const double ih_bytes = gate_rows * s.input * value_bytes;
  const double weight_bytes = ih_bytes + (gate_rows * s.state_size() + s.proj * s.hidden) * value_bytes;
  const double l2 = static_cast<double>(l2_cache_bytes());
  if (split.by_rows) return weight_bytes <= 0.5 * l2 ? InputProjection::kInSteps : InputProjection::kUpFront;
  if (split.ranks == 1) return InputProjection::kUpFront;
  if (s.batch >= kMinRowsToStreamWeights && weight_bytes / split.ranks <= l2) return InputProjection::kInSteps;
  const double gemm_flops = 2.0 * static_cast<double>(s.steps * s.batch) * gate_rows * s.input;
  const bool by_rank = ih_bytes / split.ranks <= 0.5 * l2 && gemm_threads(gemm_flops, team_threads) <= split.ranks;
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
};

// Projecting x inside the steps, a cell that reads only each gate's sum of the two projections (all
// but GRU, whose n gate scales its recurrent part by r) takes both in one pass over panels holding W_ih
// above W_hh: each panel's accumulators start and end once a step instead of twice, which pays at
// short depths (see bench/NOTES.md, "Figures behind the code", input projection).
bool stacks_input(CellKind cell, const LayerShape& s, InputProjection projection) {
  return projection == InputProjection::kInSteps && s.steps >= kMinStepsToPack &&
         !cell_facts(cell).split_recurrent_grad;
}

template <typename T>
TeamLayout<T> team_layout(const TeamLease& team, CellKind cell, const LayerShape& s, int panel_width, bool forward) {
  const LayerSplit split = layer_split(cell, s.batch, s.hidden, sizeof(T), team.size(), s.proj);
  const InputProjection projection =
      forward ? input_projection(cell, s, split, sizeof(T), team.size()) : InputProjection::kUpFront;
  const bool project = projection != InputProjection::kUpFront;
  const bool stacked = forward && stacks_input(cell, s, projection);
  const Index gates = cell_facts(cell).gates, state = s.state_size();
  std::vector<RankShare> shares = rank_shares<T>(s.batch, s.hidden, state, split);
  std::vector<RankScratch<T>> buffers = rank_scratch<T>(shares, panel_width, [&](const RankShare& sh) {
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
  return {split, std::move(shares), std::move(buffers), projection, stacked};
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
  plan.pack_weights = s.steps >= kMinStepsToPack;
}

bool recurrent_bias_apart(CellKind cell, int gate) {
  bool v = false;
  with_cell(cell, [&](auto c) { v = decltype(c)::recurrent_bias_apart(gate); });
  return v;
}

// A view (layer.h) read as rows (kernels.h) where row_stride (layer.h) allows, else null.
template <typename T>
Rows<T> rows_in_place(const View3<T>& v, Index n0, Index n1, Index width) {
  const Index ld = row_stride(v, n0, n1, width);
  return ld < 0 ? Rows<T>{} : Rows<T>{v.data, ld};
}

// The caller's arrays of one call as the kernels read them: in place where rows_in_place allows, else
// a dense copy made here, on the calling thread before any job (inputs; outputs that are accumulated
// start from the caller's values) and copied back by finish() after the last job (outputs).
template <typename T>
class Staging {
 public:
  Rows<const T> in(const View3<const T>& v, Index n0, Index n1, Index width) {
    if (!v.data) return {};
    if (const Rows<const T> r = rows_in_place(v, n0, n1, width)) return r;
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
}  // namespace

void set_split_preference(SplitPreference preference) { preferred<SplitPreference>.store(preference); }
SplitPreference split_preference() { return preferred<SplitPreference>.load(); }
void set_projection_preference(ProjectionPreference preference) { preferred<ProjectionPreference>.store(preference); }
ProjectionPreference projection_preference() { return preferred<ProjectionPreference>.load(); }
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
  // L3 it needs kMinRowsToStreamWeights a rank. Where units can be shared too, rows win from 4 a rank.
  constexpr Index kMinRowsPerRank = 2;
  constexpr Index kMinRowsPerRankOverUnits = 4;
  // A projection's W_hr (P, H) joins W_hh, which is then (G*H, P).
  const double state = static_cast<double>(proj > 0 ? proj : hidden);
  const double weight_values = (cell_facts(cell).gates * state + static_cast<double>(proj)) * hidden;
  const double step_flops = 2.0 * static_cast<double>(batch) * weight_values;
  if (step_flops < kMinStepFlops || team_threads == 1) return {1, false};
  const double weight_bytes = weight_values * value_bytes;
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

template <typename T>
void layer_forward(const LayerForwardParams<T>& a) {
  const LayerShape& s = a.shape;
  const Index steps = s.steps, batch = s.batch, input = s.input, hidden = s.hidden, proj = s.proj;
  const Index state = s.state_size();
  const int gates = cell_facts(a.cell).gates;
  const Index gh_width = gates * hidden, rows = steps * batch;
  require_projection_fits(a.cell, s);
  require_blas_range({rows, gh_width, input, hidden});

  // The caller's arrays as rows, copied only where a view's layout needs it (backend.h).
  Staging<T> st;
  const Rows<const T> x = st.in(a.x, steps, batch, input);
  const Rows<const T> w_ih = st.in(a.weights.w_ih, gh_width, input);
  const Rows<const T> w_hh = st.in(a.weights.w_hh, gh_width, state);
  const Rows<const T> w_hr = proj > 0 ? st.in(a.weights.w_hr, proj, hidden) : Rows<const T>{};
  std::vector<Index> lengths_copy;
  const Index* lengths = st.in(s.lengths, batch, lengths_copy);
  std::vector<T> b_ih_copy, b_hh_copy;
  const T* b_ih = st.in(a.weights.b_ih, gh_width, b_ih_copy);
  const T* b_hh = st.in(a.weights.b_hh, gh_width, b_hh_copy);
  const Rows<T> y = st.out(a.y, steps, batch, state, false);

  const RecurrenceKernels<T>& kern = kernels_for<T>(active_kernels());
  TeamLease tm = team().lease();  // the plan below holds for every job of this call
  const TeamLayout<T> layout = team_layout<T>(tm, a.cell, s, kern.panel_width, true);
  const int ranks = layout.split.ranks;

  // The biases start gx and the projection accumulates onto them (beta = 1), so the step's pointwise
  // pass reads one pre-activation per gate instead of adding two biases, and BLAS skips the pass that
  // clears C for beta = 0. b_hh folds in where the cell allows (all but GRU's n gate).
  const bool has_bias = b_ih || b_hh;
  std::vector<T> gx_bias(static_cast<std::size_t>(gh_width), T(0)), zero_bias;
  for (Index n = 0; n < gh_width && has_bias; ++n) {
    if (b_ih) gx_bias[n] += b_ih[n];
    if (b_hh && !recurrent_bias_apart(a.cell, static_cast<int>(n / hidden))) gx_bias[n] += b_hh[n];
  }
  if (!b_hh) zero_bias.assign(static_cast<std::size_t>(gh_width), T(0));
  const bool up_front = layout.input_projection == InputProjection::kUpFront;
  T* gx = up_front ? scratch<T>(ScratchSlot::kGatesX, rows * gh_width) : nullptr;

  ForwardPlan<T> plan;
  fill_common(plan, a.cell, s, lengths, w_hh, w_hr, a.cell_clip, a.tape, layout);
  plan.gx = gx;
  plan.projected_up_front = layout.input_projection == InputProjection::kUpFrontByRank;
  plan.stacked_input = layout.stacked_input;
  plan.x = x;
  plan.input = input;
  plan.w_ih = w_ih;
  plan.gx_bias = gx_bias.data();
  plan.b_hh = b_hh ? b_hh : zero_bias.data();
  plan.h0 = st.in(a.h0, batch, state);
  plan.c0 = st.in(a.c0, batch, hidden);
  plan.saved = a.tape.saved;
  plan.y = y;
  plan.h_n = st.out(a.h_n, batch, state, false);
  plan.c_n = st.out(a.c_n, batch, hidden, false);

  const int gemm_ranks =
      up_front ? std::max(ranks, gemm_threads(2.0 * rows * gh_width * input, tm.size())) : ranks;
  run_phases(
      tm, gemm_ranks, ranks, true,
      [&](int rank, int of) {
        if (!up_front) return;
        // Input projection of this rank's rows of all steps: gx = x W_ih^T + bias.
        const auto [r0, r1] = share(rows, of, rank);
        if (has_bias)
          for (Index r = r0; r < r1; ++r) std::copy(gx_bias.begin(), gx_bias.end(), gx + r * gh_width);
        blas::gemm<T>(false, true, r1 - r0, gh_width, input, T(1), x.row(r0), x.ld, w_ih.data, w_ih.ld,
                      has_bias ? T(1) : T(0), gx + r0 * gh_width, gh_width);
      },
      [&](int rank) { kern.forward(plan, rank, tm.barrier()); });
  st.finish();
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

}  // namespace

template <typename T>
void layer_backward(const LayerBackwardParams<T>& a) {
  const LayerShape& s = a.shape;
  const Index steps = s.steps, batch = s.batch, input = s.input, hidden = s.hidden, proj = s.proj;
  const Index width = s.state_size();  // R
  const CellFacts& facts = cell_facts(a.cell);
  const int gates = facts.gates;
  const Index gh_width = gates * hidden, rows = steps * batch;
  if (!a.tape.training) throw std::logic_error("fusedrnn: backward needs a tape recorded in training");
  require_projection_fits(a.cell, s);
  require_blas_range({rows, gh_width, input, hidden});

  // The caller's arrays as rows, copied only where a view's layout needs it (backend.h).
  Staging<T> st;
  const Rows<const T> x = st.in(a.x, steps, batch, input);
  const Rows<const T> w_ih = st.in(a.weights.w_ih, gh_width, input);
  const Rows<const T> w_hh = st.in(a.weights.w_hh, gh_width, width);
  const Rows<const T> w_hr = proj > 0 ? st.in(a.weights.w_hr, proj, hidden) : Rows<const T>{};
  std::vector<Index> lengths_copy;
  const Index* lengths = st.in(s.lengths, batch, lengths_copy);
  const Rows<const T> dy = st.in(a.dy, steps, batch, width);
  const Rows<T> dx = st.out(a.dx, steps, batch, input, a.accumulate_dx);
  const Rows<T> dw_ih = st.out(a.dw_ih, gh_width, input, true);
  const Rows<T> dw_hh = st.out(a.dw_hh, gh_width, width, true);
  const Rows<T> dw_hr = proj > 0 ? st.out(a.dw_hr, proj, hidden, true) : Rows<T>{};
  T* const db_ih = a.db_ih.data;
  T* const db_hh = a.db_hh.data;
  const Index db_ih_stride = a.db_ih.stride, db_hh_stride = a.db_hh.stride;
  const RecurrenceKernels<T>& kern = kernels_for<T>(active_kernels());
  TeamLease tm = team().lease();  // the plan below holds for every job of this call
  const TeamLayout<T> layout = team_layout<T>(tm, a.cell, s, kern.panel_width, false);
  const int ranks = layout.split.ranks;

  T* dgx = scratch<T>(ScratchSlot::kGradGates, rows * gh_width);
  T* dgh = facts.split_recurrent_grad ? scratch<T>(ScratchSlot::kGradGatesH, rows * gh_width) : dgx;
  const Index dh_values = 2 * batch * width;
  T* grad_state =
      scratch<T>(ScratchSlot::kGradState, dh_values + (facts.has_cell_state ? batch * hidden : 0));
  T* dhs = proj > 0 ? scratch<T>(ScratchSlot::kGradOutputs, rows * proj) : nullptr;
  const Index norm_stride = (steps + 7) / 8 * 8;
  double* norm_partial = scratch<double>(ScratchSlot::kNormPartial, norm_stride * ranks);
  const bool bias_grads = db_ih || db_hh;
  const Index bias_columns = facts.split_recurrent_grad ? 2 * gh_width : gh_width;  // dgx's, then dgh's
  const Index bias_stride = (bias_columns + 7) / 8 * 8;
  double* bias_partial =
      bias_grads ? scratch<double>(ScratchSlot::kBiasGradPartial, bias_stride * ranks) : nullptr;
  std::vector<T> zero_row;
  if (!dy) zero_row.assign(static_cast<std::size_t>(width), T(0));

  BackwardPlan<T> plan;
  fill_common(plan, a.cell, s, lengths, w_hh, w_hr, a.cell_clip, a.tape, layout);
  plan.saved = a.tape.saved;
  plan.dy = dy ? dy : Rows<const T>{zero_row.data(), 0};
  plan.dh_n = st.in(a.dh_n, batch, width);
  plan.dc_n = st.in(a.dc_n, batch, hidden);
  plan.dgx = dgx;
  plan.dgh = dgh;
  plan.dh = grad_state;
  plan.dc = facts.has_cell_state ? grad_state + dh_values : nullptr;
  plan.dhs = dhs;
  plan.dh0 = st.out(a.dh0, batch, width, false);
  plan.dc0 = st.out(a.dc0, batch, hidden, false);
  plan.dh_norm_partial = norm_partial;
  plan.norm_stride = norm_stride;
  plan.bias_grad_partial = bias_partial;
  plan.bias_stride = bias_stride;

  // Rows of all steps' previous hidden states: slot 0 (forward) or 1 (reverse), contiguous.
  const T* h_prev_rows = plan.hs.at(prev_slot(s.reverse, 0));
  const double gemm_flops = 2.0 * rows * (gh_width * (2 * input + width) + static_cast<double>(proj) * hidden);
  const int gemm_ranks = std::max(ranks, gemm_threads(gemm_flops, tm.size()));
  const Index weight_values = gh_width * (input + width);
  const bool grads_by_rows = weight_grads_by_rows(s, gates, gemm_ranks, sizeof(T));
  T* partials =
      grads_by_rows ? scratch<T>(ScratchSlot::kWeightGradPartial, (gemm_ranks - 1) * weight_values) : nullptr;
  run_phases(tm, gemm_ranks, ranks, false, [&](int rank, int of) {
    // The recurrence ended at a barrier after its last pointwise pass, so every gate gradient is in
    // place. Everything that does not feed the recurrence is split across the ranks: dx by rows, the
    // weight gradients by rows or gate rows (weight_grads_by_rows), the bias gradients by gate rows.
    const auto [r0, r1] = share(rows, of, rank);
    if (dx)
      blas::gemm<T>(false, false, r1 - r0, input, gh_width, T(1), dgx + r0 * gh_width, gh_width, w_ih.data,
                    w_ih.ld, a.accumulate_dx ? T(1) : T(0), dx.row(r0), dx.ld);
    const auto [g0, g1] = share(gh_width, of, rank);
    if (grads_by_rows) {
      // Rank 0 accumulates into the gradients, rank q > 0 into partial q - 1: (G*H, I) then (G*H, H).
      T* const partial = rank == 0 ? nullptr : partials + (rank - 1) * weight_values;
      const Rows<T> into_ih = rank == 0 ? dw_ih : Rows<T>{partial, input};
      const Rows<T> into_hh = rank == 0 ? dw_hh : Rows<T>{partial + gh_width * input, width};
      const T beta = rank == 0 ? T(1) : T(0);
      if (r1 > r0) {
        blas::gemm<T>(true, false, gh_width, input, r1 - r0, T(1), dgx + r0 * gh_width, gh_width, x.row(r0),
                      x.ld, beta, into_ih.data, into_ih.ld);
        blas::gemm<T>(true, false, gh_width, width, r1 - r0, T(1), dgh + r0 * gh_width, gh_width,
                      h_prev_rows + r0 * width, width, beta, into_hh.data, into_hh.ld);
      } else if (rank > 0) {
        std::fill(partial, partial + weight_values, T(0));
      }
    } else {
      blas::gemm<T>(true, false, g1 - g0, input, rows, T(1), dgx + g0, gh_width, x.data, x.ld, T(1),
                    dw_ih.row(g0), dw_ih.ld);
      blas::gemm<T>(true, false, g1 - g0, width, rows, T(1), dgh + g0, gh_width, h_prev_rows, width,
                    T(1), dw_hh.row(g0), dw_hh.ld);
    }
    // dW_hr += sum over all steps' rows of dh^T r, each rank its share of W_hr's rows.
    if (proj > 0) {
      const auto [p0, p1] = share(proj, of, rank);
      if (p1 > p0)
        blas::gemm<T>(true, false, p1 - p0, hidden, rows, T(1), dhs + p0, proj, a.tape.rs, hidden, T(1),
                      dw_hr.row(p0), dw_hr.ld);
    }
    // The bias gradients: the ranks' column sums of dgx and (cells that split them) dgh, in rank order.
    if (bias_grads)
      for (Index c = g0; c < g1; ++c) {
        double from_x = 0.0, from_h = 0.0;
        for (int r = 0; r < ranks; ++r) {
          from_x += bias_partial[r * bias_stride + c];
          if (dgh != dgx) from_h += bias_partial[r * bias_stride + gh_width + c];
        }
        if (db_ih) db_ih[c * db_ih_stride] += static_cast<T>(from_x);
        if (db_hh) db_hh[c * db_hh_stride] += static_cast<T>(dgh != dgx ? from_h : from_x);
      }
    if (grads_by_rows) {
      // Every partial is complete; each rank adds its gate rows of them, in rank order (deterministic).
      tm.barrier().wait(rank);
      for (int q = 0; q + 1 < of; ++q) {
        const T* partial_ih = partials + q * weight_values;
        const T* partial_hh = partial_ih + gh_width * input;
        for (Index g = g0; g < g1; ++g) {
          for (Index i = 0; i < input; ++i) dw_ih.row(g)[i] += partial_ih[g * input + i];
          for (Index i = 0; i < width; ++i) dw_hh.row(g)[i] += partial_hh[g * width + i];
        }
      }
    }
  }, [&](int rank) { kern.backward(plan, rank, tm.barrier()); });
  if (a.dh_norm)
    for (Index t = 0; t < steps; ++t) {
      double sum = 0.0;
      for (int r = 0; r < ranks; ++r) sum += norm_partial[r * norm_stride + t];
      a.dh_norm[t] = std::sqrt(sum);
    }
  st.finish();
}

int team_size() { return team().size(); }
void set_team_size(int threads) { team().set_size(threads); }
void use_openmp_runtime(const std::string& library) { team().use_openmp_runtime(library); }
std::string openmp_runtime() { return team().openmp_runtime(); }
void set_team_worker_delay(int microseconds) { ThreadTeam::set_worker_delay_after_post(microseconds); }

template void layer_forward<float>(const LayerForwardParams<float>&);
template void layer_forward<double>(const LayerForwardParams<double>&);
template void layer_backward<float>(const LayerBackwardParams<float>&);
template void layer_backward<double>(const LayerBackwardParams<double>&);

}  // namespace fusedrnn::cpu
