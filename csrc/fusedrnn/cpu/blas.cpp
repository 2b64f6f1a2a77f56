#include "fusedrnn/cpu/blas.h"

#include <cblas.h>  // the types and declarations; the functions are looked up in the bundled library
#include <dlfcn.h>

#include <limits>
#include <new>
#include <stdexcept>
#include <vector>

namespace fusedrnn::cpu::blas {
namespace {

// The bundled OpenBLAS, opened by its path (lib/ beside the module this code is linked into) with
// RTLD_LOCAL, its functions looked up in it. Not a link-time dependency: the loader would satisfy that
// with any library of the same name (SONAME) loaded before, and bind its symbols in the global scope
// first (another copy's, made global by RTLD_GLOBAL), so this copy could serve another library, or
// another serve fusedrnn, at thread counts the other side set.
struct Library {
  std::string path;
  decltype(&scipy_cblas_sgemm) sgemm = nullptr;
  decltype(&scipy_cblas_dgemm) dgemm = nullptr;
  decltype(&scipy_openblas_set_num_threads) set_num_threads = nullptr;
  decltype(&scipy_openblas_get_num_threads) get_num_threads = nullptr;
  decltype(&scipy_openblas_get_config) get_config = nullptr;
};

template <typename F>
void look_up(void* handle, const Library& lib, const char* name, F& out) {
  out = reinterpret_cast<F>(dlsym(handle, name));
  if (!out) throw std::runtime_error("fusedrnn: the BLAS library " + lib.path + " lacks " + name);
}

Library open_library() {
  Library lib;
  Dl_info self{};
  if (dladdr(reinterpret_cast<void*>(&open_library), &self) == 0 || self.dli_fname == nullptr)
    throw std::runtime_error("fusedrnn: cannot tell where its extension was loaded from, to find its BLAS");
  const std::string module = self.dli_fname;
  const std::size_t slash = module.find_last_of('/');
  lib.path = (slash == std::string::npos ? std::string(".") : module.substr(0, slash)) + "/lib/" FUSEDRNN_BLAS_FILE;
  void* handle = dlopen(lib.path.c_str(), RTLD_NOW | RTLD_LOCAL);  // never closed: used until the process ends
  if (!handle) {
    const char* why = dlerror();
    throw std::runtime_error("fusedrnn: cannot load its BLAS library: " + std::string(why ? why : lib.path));
  }
  look_up(handle, lib, "scipy_cblas_sgemm", lib.sgemm);
  look_up(handle, lib, "scipy_cblas_dgemm", lib.dgemm);
  look_up(handle, lib, "scipy_openblas_set_num_threads", lib.set_num_threads);
  look_up(handle, lib, "scipy_openblas_get_num_threads", lib.get_num_threads);
  look_up(handle, lib, "scipy_openblas_get_config", lib.get_config);
  return lib;
}

// Opened on first use (keep_single_threaded, before any team job: a job must not throw); a failed
// open is tried again on the next use.
const Library& library() {
  static const Library lib = open_library();
  return lib;
}

// scipy-openblas32 takes 32-bit sizes; refuse (never truncate) a dimension past that.
blasint checked(std::int64_t v) {
  if (v < 0 || v > std::numeric_limits<blasint>::max())
    throw std::length_error("fusedrnn: a matrix dimension exceeds the 32-bit BLAS index range");
  return static_cast<blasint>(v);
}

CBLAS_TRANSPOSE op(bool trans) { return trans ? CblasTrans : CblasNoTrans; }

void call(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
          std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  library().sgemm(CblasRowMajor, op(trans_a), op(trans_b), checked(m), checked(n), checked(k), alpha,
                  a, checked(lda), b, checked(ldb), beta, c, checked(ldc));
}

void call(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, double alpha, const double* a,
          std::int64_t lda, const double* b, std::int64_t ldb, double beta, double* c, std::int64_t ldc) {
  library().dgemm(CblasRowMajor, op(trans_a), op(trans_b), checked(m), checked(n), checked(k), alpha,
                  a, checked(lda), b, checked(ldb), beta, c, checked(ldc));
}

// OpenBLAS packs operands into a buffer of the calling thread. On AMD Zen 1, GEMMs with few output
// columns (n up to a few hundred) run several times slower until some GEMM of that thread and value
// type has packed a few tens of KB (see bench/NOTES.md, "Figures behind the code", BLAS buffer). One
// wider GEMM on zeros before a thread's first GEMM of each type does that.
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

void keep_single_threaded() {
  const Library& lib = library();
  if (lib.get_num_threads() != 1) lib.set_num_threads(1);
}

std::string config() { return library().get_config(); }

std::string name() { return FUSEDRNN_BLAS_NAME; }

std::string library_path() { return library().path; }

}  // namespace fusedrnn::cpu::blas
