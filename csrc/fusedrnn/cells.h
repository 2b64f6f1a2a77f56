// The gate equations of every cell, written once.
//
// Each cell is a struct of static inline functions that update ONE hidden unit of ONE batch row. The
// CPU recurrence and the CUDA kernels loop over units and call them, so a gate equation exists only
// here. Gate order and bias placement follow torch.nn exactly:
//   LSTM  gates i, f, g, o     c' = f*c + i*g,  h' = o*tanh(c')  (projected: h' = W_hr (o*tanh(c')),
//                              the product with W_hr left to the caller, as W_hh's is)
//   GRU   gates r, z, n        n = tanh(xn + r*hn),  h' = (1-z)*n + z*h
//   RNN   one gate             h' = act(x + h)   with act = tanh or relu
// `xg[k]` is gate k's pre-activation from the input projection (W_ih x + b_ih) and `hg[k]` the one from
// the recurrent projection (W_hh h + b_hh). They arrive separately because GRU multiplies only the
// recurrent part of n by r.
//
// Forward runs in two stages: `gates` (the gate activations, the new cell state and kCarried values per
// unit for the second stage) and then `output` (the new hidden state). kOutputPass: the caller runs
// `output` as a loop of its own over the row after `gates`. In one loop LSTM's tanh(c') starts only
// once all four gates are done, a dependency chain too long for the out-of-order window to overlap
// across units; as a second loop those chains overlap. GRU keeps n's tanh in `gates` (backward needs n
// recorded) and RNN has one chain, so for them a second loop only costs and both stages run in one
// (see bench/NOTES.md, "Figures behind the code", output pass).
//
// Backward receives dh (the full gradient of the new hidden state) and dc (of the new cell state) and
// returns the gradients of the gate pre-activations: `dxg` (for W_ih, b_ih and x) and `dhg` (for W_hh,
// b_hh and h). They are equal except for GRU's n gate. `dh_prev` is the part of the previous hidden
// state's gradient that bypasses W_hh (GRU's z*dh); the caller adds dhg @ W_hh to it.
//
// `cell_clip` bounds LSTM's cell state to [-cell_clip, cell_clip] after each update (infinity: no
// bound); the gradient through a clamped element is zero. Other cells ignore it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FUSEDRNN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FUSEDRNN_HD inline __attribute__((always_inline))
#else
#define FUSEDRNN_HD inline
#endif

namespace fusedrnn {

// ---------------------------------------------------------------------------------------------------
// Activations. float uses branch-free polynomial forms (~2e-7 relative error, NaN propagating) that
// compilers vectorise in a loop; std::exp and std::tanh would be scalar calls. double keeps libm.

namespace detail {

FUSEDRNN_HD float bits_to_float(std::int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

FUSEDRNN_HD std::int32_t float_to_bits(float f) {
  std::int32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

constexpr std::int32_t kSignBit = static_cast<std::int32_t>(0x80000000u);

// min(|x|, bound) for bound >= 0, taken on the bits with an integer min. A float select here would let
// the compiler fold the clamped lanes into constants and run everything after it twice under masks. A
// NaN comes out as `bound`: callers put it back.
FUSEDRNN_HD float magnitude_at_most(float x, float bound) {
  const std::int32_t magnitude = float_to_bits(x) & ~kSignBit;
  const std::int32_t limit = float_to_bits(bound);
  return bits_to_float(magnitude < limit ? magnitude : limit);
}

FUSEDRNN_HD float with_sign_of(float magnitude, float x) {
  return bits_to_float(float_to_bits(magnitude) | (float_to_bits(x) & kSignBit));
}

// expm1(r) for x = n*ln2 + r, |r| <= ln2/2, and `scale` = 2^n, so exp(x) = scale + scale*expm1(r) and
// expm1(x) = scale*expm1(r) + (scale - 1). n by the 1.5*2^23 rounding trick, r by Cody-Waite;
// expm1(r) = r + r^2 P(r) with Cephes expf's minimax polynomial (~1 ulp, relative also near 0). 2^n is
// built in the exponent bits, so |x| must stay below 87.
FUSEDRNN_HD float expm1_reduced(float x, float& scale) {
  const float round_shift = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + round_shift;
  const float nf = shifted - round_shift;
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  // n sits in the low mantissa bits of `shifted`; shifted into the exponent field (the high bits fall
  // off) it gives 2^n with the bias added, one integer op fewer than converting nf.
  const std::uint32_t exponent_field = static_cast<std::uint32_t>(float_to_bits(shifted)) << 23;
  scale = bits_to_float(static_cast<std::int32_t>(exponent_field + 0x3F800000u));
  return p * r * r + r;
}

}  // namespace detail

template <typename T>
FUSEDRNN_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// 1 / (1 + exp(-x)) with |x| clamped to 87, which moves the result by less than float resolution near
// 1, and below -87 (where the result is under 1.7e-38) exactly 0: a gate that far off stays off, as in
// exact arithmetic, even where it multiplies a state of 1e20 or more (the clamp alone left 1.6e-38).
template <>
FUSEDRNN_HD float sigmoid<float>(float x) {
  float scale;
  const float s = detail::expm1_reduced(detail::with_sign_of(detail::magnitude_at_most(x, 87.0f), -x), scale);
  const float result = 1.0f / (1.0f + (scale + scale * s));
  return x != x ? x : (x < -87.0f ? 0.0f : result);
}

template <typename T>
FUSEDRNN_HD T tanh_(T x) {
  return std::tanh(x);
}

// tanh(|x|) = e / (e + 2) with e = expm1(2|x|), then x's sign: relative accuracy near zero comes from
// expm1 itself, and near 1 an error in e is damped by 2/(e+2), leaving the rounding of e+2 and of the
// division (at most 1.5 ulp). One exp and one division, no second polynomial for small |x| and no
// select between forms. tanh is 1 in float beyond 9.01, so |x| is clamped to 10.
template <>
FUSEDRNN_HD float tanh_<float>(float x) {
  float scale;
  const float s = detail::expm1_reduced(2.0f * detail::magnitude_at_most(x, 10.0f), scale);
  const float e = scale * s + (scale - 1.0f);
  const float result = detail::with_sign_of(e / (e + 2.0f), x);
  return x != x ? x : result;
}

template <typename T>
FUSEDRNN_HD T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

// ---------------------------------------------------------------------------------------------------
// Cells. kGates: gate blocks in the weights; kSaved: values per unit kept for backward (beyond the
// hidden and cell states, which the recurrence keeps itself); kCarried (<= kGates): values per unit
// `gates` hands to `output`; kOutputPass: see above; kHasCellState: LSTM's c;
// kSplitRecurrentGrad: dhg differs from dxg, so backward needs a second buffer; kProjection: the
// hidden state may be a projection h = W_hr r of the cell's output r (torch.nn.LSTM's proj_size), so
// h's width differs from the units': the cell then reads neither h_prev nor h (callers pass 0) and
// routes no part of dh around W_hh (dh_prev is 0); recurrent_bias_apart(k): gate k's b_hh must stay
// in hg. Elsewhere only xg + hg matters, so a caller may fold b_hh into xg.

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;  // activated i, f, g, o
  static constexpr int kCarried = 1;  // o
  static constexpr bool kOutputPass = true;
  static constexpr bool kHasCellState = true;
  static constexpr bool kSplitRecurrentGrad = false;
  static constexpr bool kProjection = true;
  static constexpr bool recurrent_bias_apart(int /*gate*/) { return false; }

  template <typename T>
  static FUSEDRNN_HD void gates(const T* xg, const T* hg, T /*h_prev*/, T c_prev, T cell_clip, T* saved,
                                T* carry, T& c) {
    const T i = sigmoid(xg[0] + hg[0]);
    const T f = sigmoid(xg[1] + hg[1]);
    const T g = tanh_(xg[2] + hg[2]);
    const T o = sigmoid(xg[3] + hg[3]);
    const T c_raw = f * c_prev + i * g;
    // Written so a NaN fails both tests and propagates.
    const T c_low = c_raw < -cell_clip ? -cell_clip : c_raw;
    c = c_low > cell_clip ? cell_clip : c_low;
    carry[0] = o;
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
  }

  template <typename T>
  static FUSEDRNN_HD T output(const T* carry, T /*h_prev*/, T c) {
    return carry[0] * tanh_(c);
  }

  template <typename T>
  static FUSEDRNN_HD void backward(const T* saved, T /*h_prev*/, T c_prev, T /*h*/, T c, T cell_clip,
                                   T dh, T dc, T* dxg, T* dhg, T& dh_prev, T& dc_prev) {
    const T i = saved[0], f = saved[1], g = saved[2], o = saved[3];
    const T tanh_c = tanh_(c);
    // c is stored clamped, so |c| == cell_clip marks an element the clamp held (zero gradient). With no
    // bound (+inf) an infinite c was not clamped: its gradient is NaN, as torch.nn's is.
    const T dc_clamped = dc + dh * o * (T(1) - tanh_c * tanh_c);
    const T dc_total = std::fabs(c) >= cell_clip && std::isfinite(cell_clip) ? T(0) : dc_clamped;
    dxg[0] = dc_total * g * i * (T(1) - i);
    dxg[1] = dc_total * c_prev * f * (T(1) - f);
    dxg[2] = dc_total * i * (T(1) - g * g);
    dxg[3] = dh * tanh_c * o * (T(1) - o);
    for (int k = 0; k < kGates; ++k) dhg[k] = dxg[k];
    dh_prev = T(0);
    dc_prev = dc_total * f;
  }
};

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // r, z, n and the recurrent part of n (W_hn h + b_hn)
  static constexpr int kCarried = 2;  // z, n
  static constexpr bool kOutputPass = false;
  static constexpr bool kHasCellState = false;
  static constexpr bool kSplitRecurrentGrad = true;
  static constexpr bool kProjection = false;
  static constexpr bool recurrent_bias_apart(int gate) { return gate == 2; }  // r scales all of hn

  template <typename T>
  static FUSEDRNN_HD void gates(const T* xg, const T* hg, T /*h_prev*/, T /*c_prev*/, T /*cell_clip*/,
                                T* saved, T* carry, T& /*c*/) {
    const T r = sigmoid(xg[0] + hg[0]);
    const T z = sigmoid(xg[1] + hg[1]);
    const T n = tanh_(xg[2] + r * hg[2]);
    carry[0] = z;
    carry[1] = n;
    saved[0] = r;
    saved[1] = z;
    saved[2] = n;
    saved[3] = hg[2];
  }

  template <typename T>
  static FUSEDRNN_HD T output(const T* carry, T h_prev, T /*c*/) {
    const T z = carry[0], n = carry[1];
    return (T(1) - z) * n + z * h_prev;
  }

  template <typename T>
  static FUSEDRNN_HD void backward(const T* saved, T h_prev, T /*c_prev*/, T /*h*/, T /*c*/,
                                   T /*cell_clip*/, T dh, T /*dc*/, T* dxg, T* dhg, T& dh_prev,
                                   T& dc_prev) {
    const T r = saved[0], z = saved[1], n = saved[2], hn = saved[3];
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dr = dn * hn * r * (T(1) - r);
    const T dz = dh * (h_prev - n) * z * (T(1) - z);
    dxg[0] = dhg[0] = dr;
    dxg[1] = dhg[1] = dz;
    dxg[2] = dn;
    dhg[2] = dn * r;
    dh_prev = dh * z;
    dc_prev = T(0);
  }
};

enum class Nonlinearity { kTanh, kRelu };

template <Nonlinearity kAct>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 0;  // the derivative follows from the new hidden state alone
  static constexpr int kCarried = 1;  // the pre-activation
  static constexpr bool kOutputPass = false;
  static constexpr bool kHasCellState = false;
  static constexpr bool kSplitRecurrentGrad = false;
  static constexpr bool kProjection = false;
  static constexpr bool recurrent_bias_apart(int /*gate*/) { return false; }

  template <typename T>
  static FUSEDRNN_HD void gates(const T* xg, const T* hg, T /*h_prev*/, T /*c_prev*/, T /*cell_clip*/,
                                T* /*saved*/, T* carry, T& /*c*/) {
    carry[0] = xg[0] + hg[0];
  }

  template <typename T>
  static FUSEDRNN_HD T output(const T* carry, T /*h_prev*/, T /*c*/) {
    return kAct == Nonlinearity::kTanh ? tanh_(carry[0]) : relu(carry[0]);
  }

  template <typename T>
  static FUSEDRNN_HD void backward(const T* /*saved*/, T /*h_prev*/, T /*c_prev*/, T h, T /*c*/,
                                   T /*cell_clip*/, T dh, T /*dc*/, T* dxg, T* dhg, T& dh_prev,
                                   T& dc_prev) {
    // relu passes dh except where it is inactive (h <= 0), an infinite dh included, and where h is NaN
    // (torch's rule), so a select rather than dh times a 0/1 slope.
    const T da = kAct == Nonlinearity::kTanh ? dh * (T(1) - h * h) : (h <= T(0) ? T(0) : dh);
    dxg[0] = dhg[0] = da;
    dh_prev = T(0);
    dc_prev = T(0);
  }
};

// ---------------------------------------------------------------------------------------------------
// The list of cells. A new cell is a struct above, an enum value, a case in with_cell and a row in
// kCells; everything else (the bindings' names, Python's tables) is derived from these.

enum class CellKind { kRnnTanh, kRnnRelu, kGru, kLstm };

// Calls f(Cell{}) for the cell type behind `kind`.
template <typename F>
void with_cell(CellKind kind, F&& f) {
  switch (kind) {
    case CellKind::kRnnTanh: return f(RnnCell<Nonlinearity::kTanh>{});
    case CellKind::kRnnRelu: return f(RnnCell<Nonlinearity::kRelu>{});
    case CellKind::kGru: return f(GruCell{});
    case CellKind::kLstm: return f(LstmCell{});
  }
}

// What a caller outside the kernels needs to know of a cell.
struct CellFacts {
  CellKind kind;
  const char* name;           // as the Python API spells it (torch.nn's mode, lower case)
  int gates;                  // G
  int saved;                  // S
  bool has_cell_state;        // a c state beside h (and so c0, c_n, dc0, dc_n, and cell_clip)
  bool split_recurrent_grad;  // backward needs a second (T, B, G*H) gate-gradient buffer
  bool projection;            // takes a projection of its hidden state (proj_size, weight_hr)
};

template <typename Cell>
constexpr CellFacts facts_of(CellKind kind, const char* name) {
  return {kind, name, Cell::kGates, Cell::kSaved, Cell::kHasCellState, Cell::kSplitRecurrentGrad,
          Cell::kProjection};
}

// In CellKind order.
inline constexpr CellFacts kCells[] = {
    facts_of<RnnCell<Nonlinearity::kTanh>>(CellKind::kRnnTanh, "rnn_tanh"),
    facts_of<RnnCell<Nonlinearity::kRelu>>(CellKind::kRnnRelu, "rnn_relu"),
    facts_of<GruCell>(CellKind::kGru, "gru"),
    facts_of<LstmCell>(CellKind::kLstm, "lstm"),
};

constexpr const CellFacts& cell_facts(CellKind kind) { return kCells[static_cast<int>(kind)]; }

constexpr bool cells_in_kind_order() {
  for (int k = 0; k < static_cast<int>(sizeof kCells / sizeof kCells[0]); ++k)
    if (static_cast<int>(kCells[k].kind) != k) return false;
  return true;
}
static_assert(cells_in_kind_order(), "kCells must list the cells in CellKind order");

}  // namespace fusedrnn
