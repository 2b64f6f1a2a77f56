// The weight-stationary recurrence (see kernels.h), written once and compiled per SIMD level: the build
// defines FUSEDRNN_ISA (the namespace, e.g. isa_avx512), FUSEDRNN_ISA_NAME and FUSEDRNN_VECTOR_BYTES,
// and passes the matching -march. GCC vector extensions give one source for every vector width; the
// pointwise loops rely on the compiler vectorising cells.h's branch-free activations.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "fusedrnn/cpu/blas.h"
#include "fusedrnn/cells.h"
#include "fusedrnn/cpu/checks.h"
#include "fusedrnn/cpu/kernels.h"

#if !defined(FUSEDRNN_ISA) || !defined(FUSEDRNN_VECTOR_BYTES) || !defined(FUSEDRNN_ISA_NAME)
#error "kernels_isa.cpp is compiled once per SIMD level with FUSEDRNN_ISA, FUSEDRNN_ISA_NAME and FUSEDRNN_VECTOR_BYTES"
#endif

// The units of a pointwise pass are independent, but the compiler cannot prove that a gate's saved
// values (offset by k*H) never overlap another's and gives up on runtime alias checks; say so. The
// marker also names the loops .ci/check_vectorised.sh requires vectorised at every SIMD level.
#if defined(__clang__)
#define FUSEDRNN_INDEPENDENT_ITERATIONS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FUSEDRNN_INDEPENDENT_ITERATIONS _Pragma("GCC ivdep")
#else
#define FUSEDRNN_INDEPENDENT_ITERATIONS
#endif

namespace fusedrnn::cpu {
namespace FUSEDRNN_ISA {
namespace {

template <typename T>
struct Simd {
  typedef T Vec __attribute__((vector_size(FUSEDRNN_VECTOR_BYTES)));
  static constexpr int kLanes = FUSEDRNN_VECTOR_BYTES / sizeof(T);
  static constexpr int kPanel = 2 * kLanes;  // columns per packed panel: two vectors

  static Vec load(const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, Vec v) { std::memcpy(p, &v, sizeof v); }
};

// The panels stream from L2 (or L3 when a rank's W_hh slice is larger): fetching the panel rows this
// far ahead beats leaving it to the hardware prefetchers (see bench/NOTES.md, "Figures behind the code", kernels). Prefetching past the
// panel's end is harmless.
constexpr Index kPrefetchRows = 16;

template <typename T>
inline void prefetch_panel_row(const T* row) {
  constexpr std::size_t bytes = Simd<T>::kPanel * sizeof(T);
  for (std::size_t offset = 0; offset < bytes; offset += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + offset, 0, 3);
}

// The left operand of a panel pass: row r's values at a[r*ld + k] for k < depth.
template <typename T>
struct PanelRows {
  const T* a = nullptr;
  Index ld = 0, depth = 0;
  PanelRows from(Index row) const { return {depth > 0 ? a + row * ld : a, ld, depth}; }
};

// c[r][0..kPanel) = init[0..kPanel) + sum_k top[r][k] * panel[k][0..kPanel) for r < MR (init null:
// zeros; `accumulate`: c's own values instead), plus, when `below` has depth, sum_k below[r][k] *
// panel[top.depth + k][...]: two operands side by side without copying them together. Panel row k
// starts at panel + k * panel_ld: kPanel when kDense (packed panels; a constant in the loop), else the
// row stride of a matrix read in place. KS independent accumulator sets split the k loop, so few rows
// still keep enough FMAs in flight to hide their latency; the sets are summed in a fixed order
// (deterministic).
template <typename T, int MR, int KS, bool kDense>
inline void panel_kernel(PanelRows<T> top, PanelRows<T> below, const T* __restrict panel, Index row_stride,
                         const T* __restrict init, bool accumulate, T* __restrict c, Index ldc) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  constexpr int L = S::kLanes;
  const Index panel_ld = kDense ? Index{S::kPanel} : row_stride;
  Vec acc[KS][MR][2];
  for (int s = 0; s < KS; ++s)
    for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = Vec{};
  for (int r = 0; r < MR; ++r) {
    const T* start = accumulate ? c + r * ldc : init;
    if (start) {
      acc[0][r][0] = S::load(start);
      acc[0][r][1] = S::load(start + L);
    }
  }
  // Inlined: left a call, acc lives in memory and every FMA waits on a load and a store.
  auto add_products = [&acc, panel_ld](const T* __restrict a, Index lda, Index depth,
                                       const T* __restrict rows_of_panel) FUSEDRNN_INLINE_LAMBDA {
    Index k = 0;
    for (; k + KS <= depth; k += KS) {
      for (int s = 0; s < KS; ++s) {
        prefetch_panel_row<T>(rows_of_panel + (k + s + kPrefetchRows) * panel_ld);
        const Vec b0 = S::load(rows_of_panel + (k + s) * panel_ld);
        const Vec b1 = S::load(rows_of_panel + (k + s) * panel_ld + L);
        for (int r = 0; r < MR; ++r) {
          const T av = a[r * lda + k + s];
          acc[s][r][0] += av * b0;
          acc[s][r][1] += av * b1;
        }
      }
    }
    for (; k < depth; ++k) {
      const Vec b0 = S::load(rows_of_panel + k * panel_ld);
      const Vec b1 = S::load(rows_of_panel + k * panel_ld + L);
      for (int r = 0; r < MR; ++r) {
        const T av = a[r * lda + k];
        acc[0][r][0] += av * b0;
        acc[0][r][1] += av * b1;
      }
    }
  };
  add_products(top.a, top.ld, top.depth, panel);
  if (below.depth > 0) add_products(below.a, below.ld, below.depth, panel + top.depth * panel_ld);
  for (int s = 1; s < KS; ++s)
    for (int r = 0; r < MR; ++r) {
      acc[0][r][0] += acc[s][r][0];
      acc[0][r][1] += acc[s][r][1];
    }
  for (int r = 0; r < MR; ++r) {
    S::store(c + r * ldc, acc[0][r][0]);
    S::store(c + r * ldc + L, acc[0][r][1]);
  }
}

// Accumulator sets per row count: enough independent FMAs in flight (FMA latency x issue width) when
// few rows share each loaded panel vector. With AVX-512's 32 registers, 4-5 rows also take two sets.
constexpr int kRowsForOneSet = FUSEDRNN_VECTOR_BYTES >= 64 ? 6 : 4;
template <int MR>
constexpr int kKSplit = MR >= kRowsForOneSet ? 1 : (MR >= 2 ? 2 : 4);

// Rows per register block: 2*MR accumulators plus two panel vectors and a broadcast must fit the
// register file (32 vector registers with AVX-512, 16 otherwise). With AVX-512, 12 rows beat 6 (fewer
// loads per FMA, each panel pass covers more rows) and 14 (see bench/NOTES.md, "Figures behind the code", kernels).
constexpr int kBlockRows = FUSEDRNN_VECTOR_BYTES >= 64 ? 12 : 6;
static_assert(kBlockRowsMultiple % kBlockRows == 0, "projection_pass_steps keeps passes to whole blocks");

// Runs the kernel for the last `rows` (< MR) rows, picking the register block of that height.
template <typename T, int MR, bool kDense>
inline void panel_rows_tail(Index rows, PanelRows<T> top, PanelRows<T> below, const T* panel, Index row_stride,
                            const T* init, bool accumulate, T* c, Index ldc) {
  if constexpr (MR > 1) {
    if (rows == MR - 1)
      return panel_kernel<T, MR - 1, kKSplit<MR - 1>, kDense>(top, below, panel, row_stride, init, accumulate, c,
                                                              ldc);
    panel_rows_tail<T, MR - 1, kDense>(rows, top, below, panel, row_stride, init, accumulate, c, ldc);
  }
}

// Which end of the packed weights a step starts from. A rank's weights larger than a cache level
// stream through it every step; with the order reversed on alternate steps, each step starts with the
// panels the last one touched, still in that cache, instead of those evicted longest ago (LRU).
enum class PanelOrder { kAscending, kDescending };

inline PanelOrder panel_order(Index step_index) {
  return step_index % 2 == 0 ? PanelOrder::kAscending : PanelOrder::kDescending;
}

// Where the panels of a panel_gemm are: panel p's row k at data + p * panel_stride + k * row_stride.
template <typename T>
struct Panels {
  const T* data;
  Index panel_stride, row_stride;
  // Packed by pack_panels: each panel's (depth, kPanel) values contiguous.
  static Panels packed(const T* data, Index depth) { return {data, depth * Simd<T>::kPanel, Simd<T>::kPanel}; }
  // A row-major (depth, columns) matrix read in place: panel p is its columns p*kPanel.. of each row.
  static Panels in_place(const T* data, Index ld) { return {data, Simd<T>::kPanel, ld}; }
};

template <typename T, bool kDense>
void panel_passes(Index rows, Index depth, Index panels, const T* a, Index lda, Panels<T> source, T* c, Index ldc,
                  PanelOrder order, const T* column_init, PanelRows<T> below, bool accumulate) {
  constexpr int P = Simd<T>::kPanel;
  constexpr int MR = kBlockRows;
  const PanelRows<T> top{a, lda, depth};
  const Index ld = source.row_stride;
  for (Index visit = 0; visit < panels; ++visit) {
    const Index p = order == PanelOrder::kAscending ? visit : panels - 1 - visit;
    const T* pp = source.data + p * source.panel_stride;
    const T* init = column_init ? column_init + p * P : nullptr;
    T* cp = c + p * P;
    Index r = 0;
    for (; r + MR <= rows; r += MR)
      panel_kernel<T, MR, 1, kDense>(top.from(r), below.from(r), pp, ld, init, accumulate, cp + r * ldc, ldc);
    if (r < rows)
      panel_rows_tail<T, MR, kDense>(rows - r, top.from(r), below.from(r), pp, ld, init, accumulate, cp + r * ldc,
                                     ldc);
  }
}

// c (rows, panels*kPanel) = a (rows, depth) @ the panels (+ column_init in every row, if not null;
// added into c where `accumulate`), `panels` panels of (depth, kPanel) visited in `order`. Each panel
// is reused across all row blocks while it is in L1/L2. With `below` (rows, below.depth), the panels
// are depth + below.depth deep and c = [a below] @ panels.
template <typename T>
void panel_gemm(Index rows, Index depth, Index panels, const T* a, Index lda, Panels<T> source, T* c, Index ldc,
                PanelOrder order, const T* column_init = nullptr, PanelRows<T> below = {},
                bool accumulate = false) {
  if (source.row_stride == Simd<T>::kPanel)
    panel_passes<T, true>(rows, depth, panels, a, lda, source, c, ldc, order, column_init, below, accumulate);
  else
    panel_passes<T, false>(rows, depth, panels, a, lda, source, c, ldc, order, column_init, below, accumulate);
}

// The same with panels packed by pack_panels, depth + below.depth deep.
template <typename T>
void panel_gemm(Index rows, Index depth, Index panels, const T* a, Index lda, const T* packed, T* c, Index ldc,
                PanelOrder order, const T* column_init = nullptr, PanelRows<T> below = {}) {
  panel_gemm<T>(rows, depth, panels, a, lda, Panels<T>::packed(packed, depth + below.depth), c, ldc, order,
                column_init, below);
}

template <typename T>
Index panel_count(Index columns) {
  return (columns + Simd<T>::kPanel - 1) / Simd<T>::kPanel;
}

// Swaps W-lane blocks between two vectors: the low result keeps a's blocks at even block positions and
// takes b's even blocks into the odd ones; the high result takes a's odd blocks into the even positions
// and keeps b's odd ones. One stage of an in-register transpose.
template <typename T, int W, bool kHigh, std::size_t... I>
inline typename Simd<T>::Vec swap_blocks(typename Simd<T>::Vec a, typename Simd<T>::Vec b,
                                         std::index_sequence<I...>) {
  constexpr int L = Simd<T>::kLanes;
  constexpr int shift = kHigh ? W : 0;
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(a, b, ((static_cast<int>(I) & W) == 0 ? static_cast<int>(I) + shift
                                                                         : L + static_cast<int>(I) - W + shift)...);
#else  // GCC before 12 has only the mask-vector form
  using Lane = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
  typedef Lane Mask __attribute__((vector_size(FUSEDRNN_VECTOR_BYTES)));
  return __builtin_shuffle(a, b, Mask{((static_cast<Lane>(I) & W) == 0 ? static_cast<Lane>(I) + shift
                                                                        : L + static_cast<Lane>(I) - W + shift)...});
#endif
}

// Transposes the kLanes x kLanes tile held in v (v[i][j] becomes v[j][i]): log2(kLanes) stages, each
// swapping the off-diagonal W x W blocks of every 2W x 2W block.
template <typename T, int W>
inline void transpose_tile(typename Simd<T>::Vec* v) {
  constexpr int L = Simd<T>::kLanes;
  for (int i = 0; i < L; ++i) {
    if (i & W) continue;
    const auto lo = swap_blocks<T, W, false>(v[i], v[i + W], std::make_index_sequence<L>{});
    const auto hi = swap_blocks<T, W, true>(v[i], v[i + W], std::make_index_sequence<L>{});
    v[i] = lo;
    v[i + W] = hi;
  }
  if constexpr (W > 1) transpose_tile<T, W / 2>(v);
}

// One stage of sum_lanes_each: Count vectors into Count/2, each W-lane block of a result the sum of two
// blocks of one of the pair.
template <typename T, int W, int Count>
inline void sum_block_pairs(typename Simd<T>::Vec* u) {
  constexpr int L = Simd<T>::kLanes;
#pragma GCC unroll 32
  for (int j = 0; j < Count / 2; ++j)
    u[j] = swap_blocks<T, W, false>(u[2 * j], u[2 * j + 1], std::make_index_sequence<L>{}) +
           swap_blocks<T, W, true>(u[2 * j], u[2 * j + 1], std::make_index_sequence<L>{});
  if constexpr (W > 1) sum_block_pairs<T, W / 2, Count / 2>(u);
}

constexpr int bit_reversed(int i, int lanes) {
  int reversed = 0;
  for (int bit = 1, to = lanes / 2; bit < lanes; bit *= 2, to /= 2)
    if (i & bit) reversed |= to;
  return reversed;
}

// Lane q of the result is the sum of v[q]'s lanes (v: kLanes vectors), in a fixed order: log2(kLanes)
// stages of block sums, 2*(kLanes-1) shuffles in all. The stages leave the sums in bit-reversed order,
// so the vectors go in bit-reversed.
template <typename T, std::size_t... I>
inline typename Simd<T>::Vec sum_lanes_each(const typename Simd<T>::Vec* v, std::index_sequence<I...>) {
  constexpr int L = Simd<T>::kLanes;
  typename Simd<T>::Vec u[L] = {v[bit_reversed(static_cast<int>(I), L)]...};
  if constexpr (L > 1) sum_block_pairs<T, L / 2, L>(u);
  return u[0];
}

// One block of few_rows_times_weights: rows m0..m0+MR of a against kLanes/MR rows of W from n0 (the
// first `valid` of them real; the rest repeat the last and are not stored), one accumulator per pair,
// down the depth in vectors; sum_lanes_each then gives the block's outputs as one vector.
template <typename T, int MR>
inline void rows_times_weight_block(Index m0, Index n0, int valid, Index depth, const T* a, Index lda, const T* w,
                                    Index ldw, bool accumulate, T* c, Index ldc) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  constexpr int L = S::kLanes;
  constexpr int NR = L / MR;
  const T* ar[MR];
  const T* wr[NR];
  for (int i = 0; i < MR; ++i) ar[i] = a + (m0 + i) * lda;
  for (int j = 0; j < NR; ++j) wr[j] = w + (n0 + std::min(j, valid - 1)) * ldw;
  Vec acc[L];
#pragma GCC unroll 64
  for (int q = 0; q < L; ++q) acc[q] = Vec{};
  const Index vector_depth = depth - depth % L;
  for (Index k = 0; k < vector_depth; k += L) {
    Vec wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = S::load(wr[j] + k);
    for (int i = 0; i < MR; ++i) {
      const Vec av = S::load(ar[i] + k);
      for (int j = 0; j < NR; ++j) acc[i * NR + j] += av * wv[j];
    }
  }
  T sum[L];
  S::store(sum, sum_lanes_each<T>(acc, std::make_index_sequence<L>{}));
  for (Index k = vector_depth; k < depth; ++k)
    for (int q = 0; q < L; ++q) sum[q] += ar[q / NR][k] * wr[q % NR][k];
  for (int i = 0; i < MR; ++i) {
    T* out = c + (m0 + i) * ldc + n0;
    for (int j = 0; j < valid; ++j) out[j] = accumulate ? out[j] + sum[i * NR + j] : sum[i * NR + j];
  }
}

// Rows m0.. of a (MR at a time, up to `rows`) against all of W, the blocks of W outermost so that
// each stays in L1 while the blocks of rows pass. Returns the first row not done.
template <typename T, int MR>
Index rows_times_weights_pass(Index m0, Index rows, Index columns, Index depth, const T* a, Index lda, const T* w,
                              Index ldw, bool accumulate, T* c, Index ldc) {
  constexpr int NR = Simd<T>::kLanes / MR;
  const Index m_end = m0 + (rows - m0) / MR * MR;
  for (Index n0 = 0; n0 < columns && m0 < m_end; n0 += NR) {
    const int valid = static_cast<int>(std::min<Index>(NR, columns - n0));
    for (Index m = m0; m < m_end; m += MR)
      rows_times_weight_block<T, MR>(m, n0, valid, depth, a, lda, w, ldw, accumulate, c, ldc);
  }
  return m_end;
}

// c[m][n] (+)= sum_k a[m][k] * w[n][k] for m < rows, n < columns (accumulate: added into c): a few
// rows against weights read in place, W row-major with its rows as the product's columns, kLanes dot
// products at a time. Blocks of 4 rows of a (fewer loads per FMA), then of 2 and 1 for the last rows
// (no row computed twice): W is read once per pass, at most three.
template <typename T>
void few_rows_times_weights(Index rows, Index columns, Index depth, const T* a, Index lda, const T* w, Index ldw,
                            bool accumulate, T* c, Index ldc) {
  constexpr int L = Simd<T>::kLanes;
  Index m = 0;
  if constexpr (L >= 4) m = rows_times_weights_pass<T, 4>(m, rows, columns, depth, a, lda, w, ldw, accumulate, c, ldc);
  if constexpr (L >= 2) m = rows_times_weights_pass<T, 2>(m, rows, columns, depth, a, lda, w, ldw, accumulate, c, ldc);
  rows_times_weights_pass<T, 1>(m, rows, columns, depth, a, lda, w, ldw, accumulate, c, ldc);
}

// c (+)= a W^T with W used once (a call too short to pack it, kMinStepsToPack, or an input projection
// of few rows): few_rows_times_weights up to kMaxFewRows rows, BLAS's GEMM beyond. BLAS packs all of W
// on each call, which costs more than a few rows' products (see bench/NOTES.md, "Figures behind the
// code", few rows).
template <typename T>
void times_weights_in_place(Index rows, Index columns, Index depth, const T* a, Index lda, const T* w, Index ldw,
                            bool accumulate, T* c, Index ldc) {
  if (rows <= kMaxFewRows)
    few_rows_times_weights<T>(rows, columns, depth, a, lda, w, ldw, accumulate, c, ldc);
  else
    blas::gemm<T>(false, true, rows, columns, depth, T(1), a, lda, w, ldw, accumulate ? T(1) : T(0), c, ldc);
}

// c (rows, columns) (+)= a (rows, depth) w, w (depth, columns) row-major and read in place (backward's
// products in calls too short to pack W, kMinStepsToPack): from 2 to kMaxFewRows rows the panel kernel
// reads W's rows as they are, a panel's kPanel columns at a time, BLAS taking the columns short of a
// panel; BLAS otherwise, which packs all of W on each call but streams W's rows whole for one row (see
// bench/NOTES.md, "Figures behind the code", few rows).
template <typename T>
void times_matrix_in_place(Index rows, Index columns, Index depth, const T* a, Index lda, const T* w, Index ldw,
                           bool accumulate, T* c, Index ldc) {
  constexpr int P = Simd<T>::kPanel;
  const Index panels = rows >= 2 && rows <= kMaxFewRows ? columns / P : 0;
  if (panels > 0)
    panel_gemm<T>(rows, depth, panels, a, lda, Panels<T>::in_place(w, ldw), c, ldc, PanelOrder::kAscending,
                  nullptr, {}, accumulate);
  const Index done = panels * P;
  if (done < columns)
    blas::gemm<T>(false, false, rows, columns - done, depth, T(1), a, lda, w + done, ldw,
                  accumulate ? T(1) : T(0), c + done, ldc);
}

// packed[p][k][c] = column_start(n)[k * k_stride] for column n = p*kPanel + c < `columns`, zero in the
// padding. Two layouts have a fast path, the rest go value by value: a panel's columns side by side in
// memory (backward: a copy of kPanel values per k), and each column contiguous in k (forward: rows of
// W, transposed a kLanes x kLanes tile at a time in registers); value by value, packing cost as much
// as a few steps of a small layer. A `panel_depth` above `depth` spaces the panels that many rows apart,
// for another call to pack the rows below these.
template <typename T, typename ColumnStart>
void pack_panels(Index depth, Index columns, Index k_stride, T* packed, ColumnStart column_start,
                 Index panel_depth = 0) {
  using S = Simd<T>;
  constexpr int P = S::kPanel;
  constexpr int L = S::kLanes;
  const Index panels = panel_count<T>(columns);
  if (panel_depth == 0) panel_depth = depth;
  for (Index p = 0; p < panels; ++p) {
    const T* start[P];
    for (int c = 0; c < P; ++c) start[c] = p * P + c < columns ? column_start(p * P + c) : nullptr;
    T* dst = packed + p * panel_depth * P;
    bool side_by_side = true;
    for (int c = 0; c < P; ++c) side_by_side = side_by_side && start[c] == start[0] + c;
    if (side_by_side) {
      for (Index k = 0; k < depth; ++k) {
        S::store(dst + k * P, S::load(start[0] + k * k_stride));
        S::store(dst + k * P + L, S::load(start[0] + k * k_stride + L));
      }
      continue;
    }
    for (int half = 0; half < 2; ++half) {
      const T* const* src = start + half * L;
      bool full = k_stride == 1;
      for (int c = 0; c < L; ++c) full = full && src[c] != nullptr;
      Index k = 0;
      if (full)
        for (; k + L <= depth; k += L) {
          typename S::Vec tile[L];
          for (int c = 0; c < L; ++c) tile[c] = S::load(src[c] + k);
          transpose_tile<T, L / 2>(tile);
          for (int i = 0; i < L; ++i) S::store(dst + (k + i) * P + half * L, tile[i]);
        }
      for (; k < depth; ++k)
        for (int c = 0; c < L; ++c) dst[k * P + half * L + c] = src[c] ? src[c][k * k_stride] : T(0);
    }
  }
}

// Requests the cache lines of the first n values at once (at most 16 KB, a third of L1). Right after a
// step's barrier, much of the state the step reads was just written by other cores; asking for those
// lines together overlaps the transfers instead of meeting them one by one inside the GEMM.
template <typename T>
void prefetch_lines(const T* p, Index n) {
  constexpr Index kMaxBytes = 16 * 1024;
  const Index bytes = std::min<Index>(n * static_cast<Index>(sizeof(T)), kMaxBytes);
  const char* start = reinterpret_cast<const char*>(p);
  for (Index offset = 0; offset < bytes; offset += 64) __builtin_prefetch(start + offset);
}

// Requests a block of `rows` rows of `width` values, `ld` apart, into L2. A step's pointwise inputs that
// were written long before (the input projection; in backward, the tape) come from L3 or memory in runs
// of a few lines per row and gate, too short for the hardware prefetchers; asked for at the start of
// the step GEMM, they arrive while it runs.
template <typename T>
void prefetch_block_l2(const T* first, Index rows, Index ld, Index width) {
  const Index bytes = width * static_cast<Index>(sizeof(T));
  for (Index r = 0; r < rows; ++r) {
    const char* start = reinterpret_cast<const char*>(first + r * ld);
    for (Index offset = 0; offset < bytes; offset += 64) __builtin_prefetch(start + offset, 0, 2);
  }
}

inline bool step_valid(const Index* lengths, Index b, Index t) { return !lengths || t < lengths[b]; }

// A row's sum of squares of dh_t (dh[j] + dy[j], or dh[j] alone with dy null) for dh_norm, from its sum
// in T as the pointwise loop adds it up (vectorised: a double accumulator there would not be) where that
// is exact enough. In float32 the squares of values below ~1e-19 flush to zero and above ~2e19 overflow,
// so a row whose sum is not finite, or small enough that flushed squares could matter, is summed again in
// double.
template <typename T>
double row_squares(T sum_in_t, const T* dh, const T* dy, Index n) {
  const T small = static_cast<T>(n) * std::numeric_limits<T>::min() * static_cast<T>(1 << 24);
  if (sum_in_t >= small && sum_in_t <= std::numeric_limits<T>::max()) return static_cast<double>(sum_in_t);
  // Four independent sums: a vanishing gradient (1e-20 and below in float32) takes this path at every
  // early step, so it runs at the adds' throughput, not their latency.
  constexpr int kChains = 4;
  double sums[kChains] = {};
  const auto value = [&](Index j) { return static_cast<double>(dh[j]) + (dy ? static_cast<double>(dy[j]) : 0.0); };
  Index j = 0;
  for (; j + kChains <= n; j += kChains)
    for (int k = 0; k < kChains; ++k) sums[k] += value(j + k) * value(j + k);
  for (; j < n; ++j) sums[0] += value(j) * value(j);
  return (sums[0] + sums[1]) + (sums[2] + sums[3]);
}

template <typename T>
void copy_or_zero(T* dst, const T* src, Index n) {
  if (src)
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  else
    std::fill(dst, dst + n, T(0));
}

// Copies (or, src null, zeroes) columns [c0, c1) of a rank's rows of a (B, W) state.
template <typename T>
void copy_share(Rows<T> dst, Rows<const T> src, const RankShare& sh, Index c0, Index c1) {
  for (Index b = sh.b0; b < sh.b1; ++b) copy_or_zero(dst.row(b) + c0, src ? src.row(b) + c0 : nullptr, c1 - c0);
}

// A rank's share of the hidden state h (its state columns) and of the cell state c (its units).
template <typename T>
void copy_h_share(Rows<T> dst, Rows<const T> src, const RankShare& sh) { copy_share(dst, src, sh, sh.o0, sh.o1); }
template <typename T>
void copy_c_share(Rows<T> dst, Rows<const T> src, const RankShare& sh) { copy_share(dst, src, sh, sh.u0, sh.u1); }

// A dense (B, W) state of the tape or scratch as rows.
template <typename T>
Rows<T> state_rows(T* state, Index width) { return {state, width}; }

// ---------------------------------------------------------------------------------------------------
// Forward

// A step's gate values for a rank's share: row b (from the share's first), gate k, unit j (from its
// first) at first[b*ld + k*gate_stride + j]. The up-front projection gx and the per-rank tiles differ
// only in these strides. T is const for the input projection's, which the pass only reads.
template <typename T>
struct GateRows {
  T* first;
  Index ld, gate_stride;
};

// Pointwise update of a rank's share at time t from its step's input projection `xs` and recurrent
// projection `hs`, in the cell's two stages (cells.h); with a separate output pass, the first stage
// hands its carried values to the second through the slots of `hs` it has just read. kRecord: keep the
// gate values backward needs in `saved`; inference skips those stores (for LSTM, as many bytes as the
// state and output). kProjected: the cell's outputs go to `h_next` = the step's r (B, H), which an
// invalid row gets as zeros (dW_hr reads it), and y and the carried h are left to the projection
// (project_outputs); h_prev is not read.
template <typename Cell, typename T, bool kRecord, bool kProjected>
void forward_units(const ForwardPlan<T>& pl, Index t, const RankShare& sh, GateRows<const T> xs,
                   GateRows<T> hs, const T* __restrict h_prev, const T* __restrict c_prev,
                   T* __restrict h_next, T* __restrict c_next, T* __restrict saved) {
  constexpr int G = Cell::kGates;
  constexpr int S = Cell::kSaved > 0 ? Cell::kSaved : 1;
  constexpr int C = Cell::kCarried;
  static_assert(C <= G, "the carried values reuse the recurrent projection's slots");
  const Index H = pl.hidden;
  const T* __restrict b_hh = pl.b_hh;
  const T clip = pl.cell_clip;
  const Index u0 = sh.u0, units = sh.units();
  // The previous hidden state as the cell reads it: a projecting cell reads none (cells.h).
  auto h_before = [&](Index at) { return kProjected ? T(0) : h_prev[at]; };
  for (Index b = sh.b0; b < sh.b1; ++b) {
    const Index row = b * H + u0;
    T* __restrict yr = kProjected ? nullptr : pl.y.row(t * pl.batch + b) + u0;
    if (!step_valid(pl.lengths, b, t)) {
      if constexpr (kProjected) {
        std::fill(h_next + row, h_next + row + units, T(0));
      } else {
        std::copy(h_prev + row, h_prev + row + units, h_next + row);
        std::fill(yr, yr + units, T(0));
      }
      if constexpr (Cell::kHasCellState) std::copy(c_prev + row, c_prev + row + units, c_next + row);
      // Zeros rather than whatever the tape's memory held: backward never reads them, but the tape is
      // its caller's array too (JAX's NaN checks read every value of a call's results).
      if constexpr (kRecord && Cell::kSaved > 0)
        for (int k = 0; k < Cell::kSaved; ++k)
          std::fill_n(saved + (b * Cell::kSaved + k) * H + u0, units, T(0));
      continue;
    }
    const T* __restrict xr = xs.first + (b - sh.b0) * xs.ld;
    T* __restrict hr = hs.first + (b - sh.b0) * hs.ld;
    const Index xk = xs.gate_stride, hk = hs.gate_stride;
    auto first_stage = [&](Index j, T* carry) {
      T xg[G], hg[G], sv[S];
      for (int k = 0; k < G; ++k) {
        xg[k] = xr[k * xk + j];
        hg[k] = Cell::recurrent_bias_apart(k) ? hr[k * hk + j] + b_hh[k * H + u0 + j] : hr[k * hk + j];
      }
      T c = T(0), cp = T(0);
      if constexpr (Cell::kHasCellState) cp = c_prev[row + j];
      Cell::gates(xg, hg, h_before(row + j), cp, clip, sv, carry, c);
      if constexpr (kRecord && Cell::kSaved > 0)
        for (int k = 0; k < Cell::kSaved; ++k) saved[(b * Cell::kSaved + k) * H + u0 + j] = sv[k];
      if constexpr (Cell::kHasCellState) c_next[row + j] = c;
    };
    auto second_stage = [&](Index j, const T* carry) {
      const T h = Cell::output(carry, h_before(row + j), Cell::kHasCellState ? c_next[row + j] : T(0));
      h_next[row + j] = h;
      if constexpr (!kProjected) yr[j] = h;
    };
    if constexpr (Cell::kOutputPass) {
      FUSEDRNN_INDEPENDENT_ITERATIONS
      for (Index j = 0; j < units; ++j) {
        T carry[C];
        first_stage(j, carry);
        for (int k = 0; k < C; ++k) hr[k * hk + j] = carry[k];
      }
      FUSEDRNN_INDEPENDENT_ITERATIONS
      for (Index j = 0; j < units; ++j) {
        T carry[C];
        for (int k = 0; k < C; ++k) carry[k] = hr[k * hk + j];
        second_stage(j, carry);
      }
    } else {
      FUSEDRNN_INDEPENDENT_ITERATIONS
      for (Index j = 0; j < units; ++j) {
        T carry[C];
        first_stage(j, carry);
        second_stage(j, carry);
      }
    }
  }
}

// The projection of a rank's share at time t: its state columns of h_t = r_t W_hr^T for its rows, into
// h_next and y, or at an invalid step the carried h_prev and zeros.
template <typename T>
void project_outputs(const ForwardPlan<T>& pl, Index t, const RankShare& sh, const RankScratch<T>& scratch,
                     PanelOrder order, const T* r_t, const T* h_prev, T* h_next) {
  const Index H = pl.hidden, R = pl.state_size, outputs = sh.outputs();
  const Index panels = panel_count<T>(outputs), ldt = panels * Simd<T>::kPanel;
  const T* r_rows = r_t + sh.b0 * H;
  if (pl.pack_weights)
    panel_gemm<T>(sh.rows(), H, panels, r_rows, H, scratch.packed_hr, scratch.tile_hr, ldt, order);
  else  // this rank's rows of W_hr, read in place
    times_weights_in_place<T>(sh.rows(), outputs, H, r_rows, H, pl.w_hr.row(sh.o0), pl.w_hr.ld, false,
                              scratch.tile_hr, ldt);
  for (Index b = sh.b0; b < sh.b1; ++b) {
    T* yr = pl.y.row(t * pl.batch + b) + sh.o0;
    T* h = h_next + b * R + sh.o0;
    if (step_valid(pl.lengths, b, t)) {
      const T* from = scratch.tile_hr + (b - sh.b0) * ldt;
      std::copy(from, from + outputs, h);
      std::copy(from, from + outputs, yr);
    } else {
      std::copy(h_prev + b * R + sh.o0, h_prev + b * R + sh.o1, h);
      std::fill(yr, yr + outputs, T(0));
    }
  }
}

// A rank's projection of its share of x for every step, each step's rows at tile_x + t*rows*ldt (the
// bias in every row), in passes of projection_pass_steps.
template <typename T>
void project_every_step(const ForwardPlan<T>& pl, const RankShare& sh, const RankScratch<T>& scratch, Index panels,
                        Index ldt) {
  const Index rows = sh.rows();
  const Index steps_per_pass = projection_pass_steps(rows, pl.batch, pl.input, sizeof(T));
  for (Index t = 0; t < pl.steps; t += steps_per_pass) {
    const Index n = std::min(steps_per_pass, pl.steps - t);
    panel_gemm<T>(n * rows, pl.input, panels, pl.x.row(t * pl.batch + sh.b0), pl.x.ld, scratch.packed_ih,
                  scratch.tile_x + t * rows * ldt, ldt, PanelOrder::kAscending, scratch.bias_x);
  }
}

template <typename Cell, typename T, bool kProjected>
void forward_rank(const ForwardPlan<T>& pl, int rank, const RankGroup& group) {
  constexpr int G = Cell::kGates;
  const Index H = pl.hidden, R = pl.state_size;
  const RankShare& sh = pl.shares[rank];
  const Index u0 = sh.u0, units = sh.units(), rows = sh.rows();
  const Index columns = G * units, panels = panel_count<T>(columns);
  const Index ldt = panels * Simd<T>::kPanel;
  const RankScratch<T>& scratch = pl.scratch[rank];
  const Index first = pl.reverse ? pl.steps : 0;
  const bool busy = units > 0 && rows > 0;
  const bool busy_outputs = sh.outputs() > 0 && rows > 0;
  const bool project = pl.gx == nullptr;
  // Column n of this rank's gates is gate n / units of unit u0 + n % units: that row of W_hh and W_ih,
  // read along k.
  auto gate_row = [&](Index n) { return (n / units) * H + u0 + n % units; };
  // Stacked: each panel holds the input's rows of W_ih, then W_hh's.
  const Index stacked_depth = pl.input + R;
  T* const packed_hh = pl.stacked_input ? scratch.packed + pl.input * Simd<T>::kPanel : scratch.packed;
  if (busy && pl.pack_weights)
    pack_panels<T>(R, columns, 1, packed_hh, [&](Index n) { return pl.w_hh.row(gate_row(n)); },
                   pl.stacked_input ? stacked_depth : R);
  if (busy && project) {
    auto ih_row = [&](Index n) { return pl.w_ih.row(gate_row(n)); };
    if (pl.stacked_input)
      pack_panels<T>(pl.input, columns, 1, scratch.packed, ih_row, stacked_depth);
    else
      pack_panels<T>(pl.input, columns, 1, scratch.packed_ih, ih_row);
    for (Index n = 0; n < ldt; ++n) scratch.bias_x[n] = n < columns ? pl.gx_bias[gate_row(n)] : T(0);
  }
  if constexpr (kProjected)
    if (busy_outputs && pl.pack_weights)
      pack_panels<T>(H, sh.outputs(), 1, scratch.packed_hr, [&](Index n) { return pl.w_hr.row(sh.o0 + n); });
  if (busy && pl.projected_up_front) project_every_step(pl, sh, scratch, panels, ldt);
  if (busy_outputs) copy_h_share(state_rows(pl.hs.at(first), R), pl.h0, sh);
  if constexpr (Cell::kHasCellState)
    if (busy) copy_c_share(state_rows(pl.cs.at(first), H), pl.c0, sh);
  group.wait(rank);  // the input projection and every rank's initial state are in place

  const Index saved_step = pl.batch * Cell::kSaved * H;
  for (Index i = 0; i < pl.steps; ++i) {
    const Index t = pl.reverse ? pl.steps - 1 - i : i;
    const T* h_prev = pl.hs.at(prev_slot(pl.reverse, t));
    T* const h_next = pl.hs.at(next_slot(pl.reverse, t));
    // The cell outputs: h_next itself, or with a projection the step's r (one slot in inference).
    T* const outputs = kProjected ? pl.rs + (pl.hs.training ? t : 0) * pl.batch * H : h_next;
    const PanelOrder order = panel_order(i);
    if (busy) {
      const T* h_rows = h_prev + sh.b0 * R;
      if (pl.exchange_state) prefetch_lines(h_rows, rows * R);
      GateRows<const T> xs;
      if (pl.stacked_input) {
        // One pass: [x_t h_{t-1}] by the stacked panels; the bias joins in the pointwise pass.
        panel_gemm<T>(rows, pl.input, panels, pl.x.row(t * pl.batch + sh.b0), pl.x.ld, scratch.packed,
                      scratch.tile, ldt, order, nullptr, PanelRows<T>{h_rows, R, R});
        xs = {scratch.bias_x, 0, units};
      } else {
        // Packed W_ih then W_hh, each in the step's panel order; a descending step takes them in the
        // reverse order too, so it starts where the previous step ended.
        auto project_step = [&] {
          panel_gemm<T>(rows, pl.input, panels, pl.x.row(t * pl.batch + sh.b0), pl.x.ld, scratch.packed_ih,
                        scratch.tile_x, ldt, order, scratch.bias_x);
        };
        const bool project_now = project && !pl.projected_up_front;
        if (project_now) {
          if (order == PanelOrder::kAscending) project_step();
          xs = {scratch.tile_x, ldt, units};
        } else {
          xs = project ? GateRows<const T>{scratch.tile_x + t * rows * ldt, ldt, units}
                       : GateRows<const T>{pl.gx + (t * pl.batch + sh.b0) * G * H + u0, G * H, H};
          for (int k = 0; k < G; ++k) prefetch_block_l2(xs.first + k * xs.gate_stride, rows, xs.ld, units);
        }
        if (pl.pack_weights)
          panel_gemm<T>(rows, R, panels, h_rows, R, scratch.packed, scratch.tile, ldt, order);
        else  // this rank's rows of each gate block of W_hh, read in place
          for (int k = 0; k < G; ++k)
            times_weights_in_place<T>(rows, units, R, h_rows, R, pl.w_hh.row(k * H + u0), pl.w_hh.ld, false,
                                      scratch.tile + k * units, ldt);
        if (project_now && order == PanelOrder::kDescending) project_step();
      }
      const Index prev = prev_slot(pl.reverse, t), next = next_slot(pl.reverse, t);
      const GateRows<T> hs = {scratch.tile, ldt, units};
      if (pl.saved)
        forward_units<Cell, T, true, kProjected>(pl, t, sh, xs, hs, h_prev, pl.cs.at(prev), outputs,
                                                 pl.cs.at(next), pl.saved + t * saved_step);
      else
        forward_units<Cell, T, false, kProjected>(pl, t, sh, xs, hs, h_prev, pl.cs.at(prev), outputs,
                                                  pl.cs.at(next), nullptr);
    }
    if constexpr (kProjected) {
      if (pl.exchange_state) group.wait(rank);  // every unit of r_t is written before any rank reads it
      if (busy_outputs) project_outputs(pl, t, sh, scratch, order, outputs, h_prev, h_next);
    }
    if (pl.exchange_state) group.wait(rank);  // every column of h_t is written before any rank reads it
  }
  const Index last = pl.reverse ? 0 : pl.steps;
  if (busy_outputs) copy_h_share(pl.h_n, state_rows<const T>(pl.hs.at(last), R), sh);
  if constexpr (Cell::kHasCellState)
    if (busy) copy_c_share(pl.c_n, state_rows<const T>(pl.cs.at(last), H), sh);
}

// ---------------------------------------------------------------------------------------------------
// Backward

// Pointwise backward of a rank's share at time t: gate gradients into dgx/dgh, the part of
// dh_{t-1} that bypasses W_hh into dh_prev, dc in place. An invalid step passes dh and dc through.
// Returns the sum of squares of the total gradient reaching h_t over the valid rows.
// kProjected: the gradient of the cell's output is the step's dr (`dr`, the rank's rows of its units,
// `ldr` apart), finished by finish_projected_grads, which also passes dh through invalid steps and
// takes the norm; h_prev, h_next, dh and dh_prev are not read (the cell reads no h, cells.h).
template <typename Cell, typename T, bool kProjected>
double backward_units(const BackwardPlan<T>& pl, Index t, const RankShare& sh,
                      const T* __restrict saved, const T* __restrict h_prev,
                      const T* __restrict c_prev, const T* __restrict h_next,
                      const T* __restrict c_next, const T* __restrict dh, T* __restrict dh_prev,
                      const T* __restrict dr = nullptr, Index ldr = 0) {
  constexpr int G = Cell::kGates;
  constexpr int S = Cell::kSaved > 0 ? Cell::kSaved : 1;
  const Index H = pl.hidden, gh_width = G * H;
  T* __restrict dgx_t = pl.dgx + t * pl.batch * gh_width;
  T* __restrict dgh_t = pl.dgh + t * pl.batch * gh_width;
  T* __restrict dc = pl.dc;
  const T clip = pl.cell_clip;
  double norm_sq = 0.0;
  const Index u0 = sh.u0, units = sh.units();
  for (Index b = sh.b0; b < sh.b1; ++b) {
    const Index row = b * H + u0;
    T* dgx_r = dgx_t + b * gh_width + u0;
    T* dgh_r = dgh_t + b * gh_width + u0;
    if (!step_valid(pl.lengths, b, t)) {
      for (int k = 0; k < G; ++k) {
        std::fill(dgx_r + k * H, dgx_r + k * H + units, T(0));
        if constexpr (Cell::kSplitRecurrentGrad) std::fill(dgh_r + k * H, dgh_r + k * H + units, T(0));
      }
      if constexpr (!kProjected) std::copy(dh + row, dh + row + units, dh_prev + row);
      continue;
    }
    const T* __restrict dyr = kProjected ? nullptr : pl.dy.row(t * pl.batch + b) + u0;
    const T* __restrict drr = kProjected ? dr + (b - sh.b0) * ldr : nullptr;
    T row_sq = T(0);
    FUSEDRNN_INDEPENDENT_ITERATIONS
    for (Index j = 0; j < units; ++j) {
      T sv[S], dxg[G], dhg[G];
      if constexpr (Cell::kSaved > 0)
        for (int k = 0; k < Cell::kSaved; ++k) sv[k] = saved[(b * Cell::kSaved + k) * H + u0 + j];
      T cp = T(0), cn = T(0), dcn = T(0);
      if constexpr (Cell::kHasCellState) {
        cp = c_prev[row + j];
        cn = c_next[row + j];
        dcn = dc[row + j];
      }
      T dh_total, hp = T(0), hn = T(0);
      if constexpr (kProjected) {
        dh_total = drr[j];
      } else {
        dh_total = dh[row + j] + dyr[j];
        row_sq += dh_total * dh_total;
        hp = h_prev[row + j];
        hn = h_next[row + j];
      }
      T dhp, dcp;
      Cell::backward(sv, hp, cp, hn, cn, clip, dh_total, dcn, dxg, dhg, dhp, dcp);
      for (int k = 0; k < G; ++k) dgx_r[k * H + j] = dxg[k];
      if constexpr (Cell::kSplitRecurrentGrad)
        for (int k = 0; k < G; ++k) dgh_r[k * H + j] = dhg[k];
      if constexpr (!kProjected) dh_prev[row + j] = dhp;
      if constexpr (Cell::kHasCellState) dc[row + j] = dcp;
    }
    if constexpr (!kProjected) norm_sq += row_squares(row_sq, dh + row, dyr, units);
  }
  return norm_sq;
}

// Adds a rank's gate gradients of one step (its rows, its units of each gate) into its column sums,
// in double, while they are still in L1: the bias gradients, without a pass over every step's
// gradients after the recurrence. Each block of two double vectors of columns stays in registers across
// the rows; a column's values go in in row order either way (deterministic).
template <int G, typename T>
void add_column_sums(const T* dg_t, Index H, const RankShare& sh, double* __restrict sums) {
  using D = Simd<double>;
  using Wide = typename D::Vec;
  constexpr int L = D::kLanes;
  typedef T Narrow __attribute__((vector_size(L * sizeof(T))));
  auto widened = [](const T* p) {
    Narrow v;
    std::memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, Wide);
  };
  const Index units = sh.units(), rows = sh.rows(), ld = G * H;
  for (int k = 0; k < G; ++k) {
    const T* __restrict from = dg_t + sh.b0 * ld + k * H + sh.u0;
    double* __restrict to = sums + k * H + sh.u0;
    Index j = 0;
    for (; j + 2 * L <= units; j += 2 * L) {
      Wide low = D::load(to + j), high = D::load(to + j + L);
      for (Index b = 0; b < rows; ++b) {
        low += widened(from + b * ld + j);
        high += widened(from + b * ld + j + L);
      }
      D::store(to + j, low);
      D::store(to + j + L, high);
    }
    for (Index b = 0; b < rows; ++b)
      for (Index q = j; q < units; ++q) to[q] += from[b * ld + q];
  }
}

// With a projection, the first phase of a backward step for a rank's share: its state columns of the
// whole gradient reaching h_t (dh + dy_t) into dhs (zero at an invalid step, whose dh passes through
// to dh_prev instead), dh_prev's columns cleared for the W_hh product to add into. Returns the sum of
// squares over the valid rows.
template <typename T>
double finish_projected_grads(const BackwardPlan<T>& pl, Index t, const RankShare& sh, const T* __restrict dh,
                              T* __restrict dh_prev) {
  const Index R = pl.state_size, P = pl.proj, outputs = sh.outputs();
  double norm_sq = 0.0;
  for (Index b = sh.b0; b < sh.b1; ++b) {
    const Index row = b * R + sh.o0;
    T* __restrict into = pl.dhs + (t * pl.batch + b) * P + sh.o0;
    if (!step_valid(pl.lengths, b, t)) {
      std::fill(into, into + outputs, T(0));
      std::copy(dh + row, dh + row + outputs, dh_prev + row);
      continue;
    }
    const T* __restrict dyr = pl.dy.row(t * pl.batch + b) + sh.o0;
    T row_sq = T(0);
    for (Index j = 0; j < outputs; ++j) {
      const T total = dh[row + j] + dyr[j];
      into[j] = total;
      row_sq += total * total;
      dh_prev[row + j] = T(0);
    }
    norm_sq += row_squares(row_sq, into, static_cast<const T*>(nullptr), outputs);
  }
  return norm_sq;
}

template <typename Cell, typename T, bool kProjected>
void backward_rank(const BackwardPlan<T>& pl, int rank, const RankGroup& group) {
  constexpr int G = Cell::kGates;
  const Index H = pl.hidden, B = pl.batch, R = pl.state_size, P = pl.proj, gh_width = G * H;
  const RankShare& sh = pl.shares[rank];
  const Index u0 = sh.u0, units = sh.units(), rows = sh.rows(), outputs = sh.outputs();
  const bool busy = units > 0 && rows > 0;
  const bool busy_outputs = outputs > 0 && rows > 0;
  const Index panels = panel_count<T>(outputs);
  const Index ldt = panels * Simd<T>::kPanel;
  const Index panels_hr = panel_count<T>(units);
  const Index ldt_hr = panels_hr * Simd<T>::kPanel;
  const RankScratch<T>& scratch = pl.scratch[rank];
  T* dh = pl.dh;
  T* dh_other = pl.dh + B * R;
  // Column n of this rank's slice is column o0 + n of W_hh, read along its G*H rows (and with a
  // projection, column u0 + n of W_hr along its P rows).
  if (busy_outputs && pl.pack_weights)
    pack_panels<T>(gh_width, outputs, pl.w_hh.ld, scratch.packed, [&](Index n) { return pl.w_hh.data + sh.o0 + n; });
  if constexpr (kProjected)
    if (busy && pl.pack_weights)
      pack_panels<T>(P, units, pl.w_hr.ld, scratch.packed_hr, [&](Index n) { return pl.w_hr.data + u0 + n; });
  if (busy_outputs) copy_h_share(state_rows(dh, R), pl.dh_n, sh);
  if constexpr (Cell::kHasCellState)
    if (busy) copy_c_share(state_rows(pl.dc, H), pl.dc_n, sh);
  double* bias_sums = pl.bias_grad_partial ? pl.bias_grad_partial + rank * pl.bias_stride : nullptr;
  if (bias_sums) std::fill(bias_sums, bias_sums + pl.bias_stride, 0.0);  // every rank's row is summed
  const Index saved_step = B * Cell::kSaved * H;
  for (Index i = 0; i < pl.steps; ++i) {
    const Index t = pl.reverse ? i : pl.steps - 1 - i;
    const Index prev = prev_slot(pl.reverse, t), next = next_slot(pl.reverse, t);
    const T* saved_t = pl.saved ? pl.saved + t * saved_step : nullptr;
    double norm_sq = 0.0;
    if constexpr (kProjected) {
      if (busy_outputs) norm_sq = finish_projected_grads(pl, t, sh, dh, dh_other);
      if (pl.exchange_state) group.wait(rank);  // every column of the step's dh is in dhs
      if (busy) {
        // dr = dh_t W_hr for this rank's rows and units.
        const T* dh_rows = pl.dhs + (t * B + sh.b0) * P;
        if (pl.pack_weights)
          panel_gemm<T>(rows, P, panels_hr, dh_rows, P, scratch.packed_hr, scratch.tile_hr, ldt_hr, panel_order(i));
        else
          times_matrix_in_place<T>(rows, units, P, dh_rows, P, pl.w_hr.data + u0, pl.w_hr.ld, false,
                                   scratch.tile_hr, ldt_hr);
        backward_units<Cell, T, true>(pl, t, sh, saved_t, nullptr, pl.cs.at(prev), nullptr, pl.cs.at(next),
                                      nullptr, nullptr, scratch.tile_hr, ldt_hr);
      }
    } else if (busy) {
      norm_sq = backward_units<Cell, T, false>(pl, t, sh, saved_t, pl.hs.at(prev), pl.cs.at(prev),
                                               pl.hs.at(next), pl.cs.at(next), dh, dh_other);
    }
    if (busy && bias_sums) {
      add_column_sums<G>(pl.dgx + t * B * gh_width, H, sh, bias_sums);
      if constexpr (Cell::kSplitRecurrentGrad)
        add_column_sums<G>(pl.dgh + t * B * gh_width, H, sh, bias_sums + gh_width);
    }
    pl.dh_norm_partial[rank * pl.norm_stride + t] = norm_sq;
    if (pl.exchange_state) group.wait(rank);  // every rank's gate gradients of step t are written
    if (busy_outputs) {
      const T* dgh_rows = pl.dgh + (t * B + sh.b0) * gh_width;
      if (pl.exchange_state) prefetch_lines(dgh_rows, rows * gh_width);
      if (i + 1 < pl.steps) {  // the next step's tape and dy, while this step's GEMM runs
        const Index t_next = pl.reverse ? t + 1 : t - 1;
        const Index prev_next = prev_slot(pl.reverse, t_next);  // its other slot is this step's prev
        if (pl.saved)
          prefetch_block_l2(pl.saved + t_next * saved_step + sh.b0 * Cell::kSaved * H + u0,
                            rows * Cell::kSaved, H, units);
        if constexpr (!kProjected) prefetch_block_l2(pl.hs.at(prev_next) + sh.b0 * H + u0, rows, H, units);
        if constexpr (Cell::kHasCellState) prefetch_block_l2(pl.cs.at(prev_next) + sh.b0 * H + u0, rows, H, units);
        if (pl.dy.ld > 0) prefetch_block_l2(pl.dy.row(t_next * B + sh.b0) + sh.o0, rows, pl.dy.ld, outputs);
      }
      if (pl.pack_weights)
        panel_gemm<T>(rows, gh_width, panels, dgh_rows, gh_width, scratch.packed, scratch.tile, ldt,
                      panel_order(i));
      else
        times_matrix_in_place<T>(rows, outputs, gh_width, dgh_rows, gh_width, pl.w_hh.data + sh.o0, pl.w_hh.ld,
                                 false, scratch.tile, ldt);
      for (Index b = sh.b0; b < sh.b1; ++b) {
        T* __restrict out = dh_other + b * R + sh.o0;
        const T* __restrict add = scratch.tile + (b - sh.b0) * ldt;
        for (Index j = 0; j < outputs; ++j) out[j] += add[j];
      }
    }
    std::swap(dh, dh_other);
  }
  if (busy_outputs && pl.dh0) copy_h_share(pl.dh0, state_rows<const T>(dh, R), sh);
  if constexpr (Cell::kHasCellState)
    if (busy && pl.dc0) copy_c_share(pl.dc0, state_rows<const T>(pl.dc, H), sh);
  // The weight-gradient GEMMs that may follow in the same job read every rank's gate gradients; with
  // whole rows per rank no step ended at a barrier yet.
  if (!pl.exchange_state) group.wait(rank);
}

// The projected variants are compiled only for cells that take a projection.
template <typename T>
void forward_entry(const ForwardPlan<T>& plan, int rank, const RankGroup& group) {
  with_cell(plan.cell, [&](auto cell) {
    using Cell = decltype(cell);
    if constexpr (Cell::kProjection)
      if (plan.proj > 0) return forward_rank<Cell, T, true>(plan, rank, group);
    forward_rank<Cell, T, false>(plan, rank, group);
  });
}

template <typename T>
void backward_entry(const BackwardPlan<T>& plan, int rank, const RankGroup& group) {
  with_cell(plan.cell, [&](auto cell) {
    using Cell = decltype(cell);
    if constexpr (Cell::kProjection)
      if (plan.proj > 0) return backward_rank<Cell, T, true>(plan, rank, group);
    backward_rank<Cell, T, false>(plan, rank, group);
  });
}

template <typename T>
bool all_finite_here(const T* values, Index count) { return all_finite(values, count); }

template <typename T>
std::uint32_t fingerprint_here(const T* values, Index count, Index first) { return fingerprint(values, count, first); }

template <typename T>
void add_into_here(T* into, const T* from, Index count) { add_into(into, from, count); }

}  // namespace

extern const KernelTable kTable;
const KernelTable kTable = {
    FUSEDRNN_ISA_NAME,
    {Simd<float>::kPanel, &forward_entry<float>, &backward_entry<float>, &all_finite_here<float>,
     &fingerprint_here<float>, &add_into_here<float>, &times_weights_in_place<float>, &times_matrix_in_place<float>},
    {Simd<double>::kPanel, &forward_entry<double>, &backward_entry<double>, &all_finite_here<double>,
     &fingerprint_here<double>, &add_into_here<double>, &times_weights_in_place<double>, &times_matrix_in_place<double>},
};

}  // namespace FUSEDRNN_ISA
}  // namespace fusedrnn::cpu
