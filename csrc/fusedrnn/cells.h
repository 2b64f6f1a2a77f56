// The gate equations of every cell, written once.
//
// Each cell is a struct of static inline functions that update ONE hidden unit of ONE batch row. The
// CPU recurrence (and later a CUDA kernel) loops over units and calls them, so a gate equation exists
// only here. Gate order and bias placement follow torch.nn exactly:
//   LSTM  gates i, f, g, o     c' = f*c + i*g,  h' = o*tanh(c')
//   GRU   gates r, z, n        n = tanh(xn + r*hn),  h' = (1-z)*n + z*h
//   RNN   one gate             h' = act(x + h)   with act = tanh or relu
// `xg[k]` is gate k's pre-activation from the input projection (W_ih x + b_ih) and `hg[k]` the one from
// the recurrent projection (W_hh h + b_hh). They arrive separately because GRU multiplies only the
// recurrent part of n by r.
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

// exp(x) for float: x = n*ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 minimax polynomial (Cephes expf),
// 2^n built in the exponent bits. Arguments are clamped so 2^n stays a normal float. Rounding uses the
// 1.5*2^23 trick rather than a sign test: correlated conditions would make GCC emit branches, and
// branches stop the loop from vectorising.
FUSEDRNN_HD float exp_float(float x) {
  float clamped = x < 88.0f ? x : 88.0f;
  clamped = clamped > -87.0f ? clamped : -87.0f;
  const float round_shift = 12582912.0f;
  const float nf = (clamped * 1.44269504088896341f + round_shift) - round_shift;
  const std::int32_t n = static_cast<std::int32_t>(nf);
  const float r = (clamped - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float result = p * bits_to_float((n + 127) << 23);
  return x != x ? x : result;
}

}  // namespace detail

template <typename T>
FUSEDRNN_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <>
FUSEDRNN_HD float sigmoid<float>(float x) {
  return 1.0f / (1.0f + detail::exp_float(-x));
}

template <typename T>
FUSEDRNN_HD T tanh_(T x) {
  return std::tanh(x);
}

// tanh for float: an odd polynomial near zero (keeps relative accuracy where tanh(x) ~ x, Cephes tanhf),
// 1 - 2/(exp(2|x|)+1) elsewhere, both computed and one selected so the loop stays branch-free.
template <>
FUSEDRNN_HD float tanh_<float>(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  const float large_abs = 1.0f - 2.0f / (detail::exp_float(2.0f * a) + 1.0f);
  const float large = std::copysign(large_abs, x);
  return a < 0.625f ? small : large;
}

template <typename T>
FUSEDRNN_HD T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

// ---------------------------------------------------------------------------------------------------
// Cells. kGates: gate blocks in the weights; kSaved: values per unit kept for backward (beyond the
// hidden and cell states, which the recurrence keeps itself); kHasCellState: LSTM's c;
// kSplitRecurrentGrad: dhg differs from dxg, so backward needs a second buffer.

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;  // activated i, f, g, o
  static constexpr bool kHasCellState = true;
  static constexpr bool kSplitRecurrentGrad = false;

  template <typename T>
  static FUSEDRNN_HD void forward(const T* xg, const T* hg, T /*h_prev*/, T c_prev, T cell_clip,
                                  T* saved, T& h, T& c) {
    const T i = sigmoid(xg[0] + hg[0]);
    const T f = sigmoid(xg[1] + hg[1]);
    const T g = tanh_(xg[2] + hg[2]);
    const T o = sigmoid(xg[3] + hg[3]);
    const T c_raw = f * c_prev + i * g;
    // Written so a NaN fails both tests and propagates.
    const T c_low = c_raw < -cell_clip ? -cell_clip : c_raw;
    c = c_low > cell_clip ? cell_clip : c_low;
    h = o * tanh_(c);
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
  }

  template <typename T>
  static FUSEDRNN_HD void backward(const T* saved, T /*h_prev*/, T c_prev, T /*h*/, T c, T cell_clip,
                                   T dh, T dc, T* dxg, T* dhg, T& dh_prev, T& dc_prev) {
    const T i = saved[0], f = saved[1], g = saved[2], o = saved[3];
    const T tanh_c = tanh_(c);
    // c is stored clamped, so |c| == cell_clip marks an element the clamp held (zero gradient).
    const T dc_clamped = dc + dh * o * (T(1) - tanh_c * tanh_c);
    const T dc_total = std::fabs(c) >= cell_clip ? T(0) : dc_clamped;
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
  static constexpr bool kHasCellState = false;
  static constexpr bool kSplitRecurrentGrad = true;

  template <typename T>
  static FUSEDRNN_HD void forward(const T* xg, const T* hg, T h_prev, T /*c_prev*/, T /*cell_clip*/,
                                  T* saved, T& h, T& /*c*/) {
    const T r = sigmoid(xg[0] + hg[0]);
    const T z = sigmoid(xg[1] + hg[1]);
    const T n = tanh_(xg[2] + r * hg[2]);
    h = (T(1) - z) * n + z * h_prev;
    saved[0] = r;
    saved[1] = z;
    saved[2] = n;
    saved[3] = hg[2];
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
  static constexpr bool kHasCellState = false;
  static constexpr bool kSplitRecurrentGrad = false;

  template <typename T>
  static FUSEDRNN_HD void forward(const T* xg, const T* hg, T /*h_prev*/, T /*c_prev*/,
                                  T /*cell_clip*/, T* /*saved*/, T& h, T& /*c*/) {
    const T pre = xg[0] + hg[0];
    h = kAct == Nonlinearity::kTanh ? tanh_(pre) : relu(pre);
  }

  template <typename T>
  static FUSEDRNN_HD void backward(const T* /*saved*/, T /*h_prev*/, T /*c_prev*/, T h, T /*c*/,
                                   T /*cell_clip*/, T dh, T /*dc*/, T* dxg, T* dhg, T& dh_prev,
                                   T& dc_prev) {
    const T slope = kAct == Nonlinearity::kTanh ? T(1) - h * h : (h > T(0) ? T(1) : T(0));
    dxg[0] = dhg[0] = dh * slope;
    dh_prev = T(0);
    dc_prev = T(0);
  }
};

}  // namespace fusedrnn
