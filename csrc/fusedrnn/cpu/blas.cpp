#include "fusedrnn/cpu/blas.h"

#include <cblas.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

#include <limits>
#include <new>
#include <stdexcept>
#include <vector>

namespace fusedrnn::cpu::blas {
namespace {

// scipy-openblas32 takes 32-bit sizes; refuse (never truncate) a dimension past that.
blasint checked(std::int64_t v) {
  if (v < 0 || v > std::numeric_limits<blasint>::max())
    throw std::length_error("fusedrnn: a matrix dimension exceeds the 32-bit BLAS index range");
  return static_cast<blasint>(v);
}

CBLAS_TRANSPOSE op(bool trans) { return trans ? CblasTrans : CblasNoTrans; }

void call(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
          std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, op(trans_a), op(trans_b), checked(m), checked(n), checked(k), alpha,
                    a, checked(lda), b, checked(ldb), beta, c, checked(ldc));
}

void call(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, double alpha, const double* a,
          std::int64_t lda, const double* b, std::int64_t ldb, double beta, double* c, std::int64_t ldc) {
  scipy_cblas_dgemm(CblasRowMajor, op(trans_a), op(trans_b), checked(m), checked(n), checked(k), alpha,
                    a, checked(lda), b, checked(ldb), beta, c, checked(ldc));
}

// OpenBLAS packs operands into a buffer of the calling thread. On AMD Zen 1, GEMMs with few output
// columns (n up to a few hundred) ran 2.5-3x slower until some GEMM of that thread and value type had
// packed a few tens of KB (see bench/NOTES.md, "Figures behind the code", BLAS buffer). One wider GEMM
// on zeros before a thread's first GEMM of each type does that.
template <typename T>
void prime_thread_buffer() {
  thread_local bool primed = false;
  if (primed) return;
  primed = true;
  constexpr std::int64_t m = 64, n = 1024, k = 256;
  try {
    const std::vector<T> a(m * k, T(0)), b(k * n, T(0));
    std::vector<T> c(m * n);
    call(false, false, m, n, k, T(1), a.data(), k, b.data(), n, T(0), c.data(), n);
  } catch (const std::bad_alloc&) {
    // Only a speed-up: team jobs must not throw.
  }
}

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a,
          std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  prime_thread_buffer<T>();
  call(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template void gemm<float>(bool, bool, std::int64_t, std::int64_t, std::int64_t, float, const float*,
                          std::int64_t, const float*, std::int64_t, float, float*, std::int64_t);
template void gemm<double>(bool, bool, std::int64_t, std::int64_t, std::int64_t, double, const double*,
                           std::int64_t, const double*, std::int64_t, double, double*, std::int64_t);

void set_num_threads(int n) { scipy_openblas_set_num_threads(n); }

std::string config() { return scipy_openblas_get_config(); }

std::string name() { return FUSEDRNN_BLAS_NAME; }

std::string library_path() {
#if defined(__unix__) || defined(__APPLE__)
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&scipy_cblas_sgemm), &info) != 0 && info.dli_fname != nullptr)
    return info.dli_fname;
#endif
  return "";
}

}  // namespace fusedrnn::cpu::blas
