#include "fusedrnn/cpu/blas.h"

#include <cblas.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

#include <limits>
#include <stdexcept>

namespace fusedrnn::cpu::blas {
namespace {

// scipy-openblas32 takes 32-bit sizes; refuse (never truncate) a dimension past that.
blasint checked(std::int64_t v) {
  if (v < 0 || v > std::numeric_limits<blasint>::max())
    throw std::length_error("fusedrnn: a matrix dimension exceeds the 32-bit BLAS index range");
  return static_cast<blasint>(v);
}

CBLAS_TRANSPOSE op(bool trans) { return trans ? CblasTrans : CblasNoTrans; }

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                 float alpha, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                 float beta, float* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  scipy_cblas_sgemm(CblasRowMajor, op(trans_a), op(trans_b), checked(m), checked(n), checked(k), alpha,
                    a, checked(lda), b, checked(ldb), beta, c, checked(ldc));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                  double alpha, const double* a, std::int64_t lda, const double* b, std::int64_t ldb,
                  double beta, double* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  scipy_cblas_dgemm(CblasRowMajor, op(trans_a), op(trans_b), checked(m), checked(n), checked(k), alpha,
                    a, checked(lda), b, checked(ldb), beta, c, checked(ldc));
}

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
