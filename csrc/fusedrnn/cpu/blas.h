// The BLAS the core uses: row-major GEMM for float and double. The core pins OpenBLAS to one thread and
// calls it from inside its own thread team (threads.h), so OpenBLAS never runs a pool of its own.
#pragma once

#include <cstdint>
#include <string>

namespace fusedrnn::cpu::blas {

// C (m x n, row stride ldc) = alpha * op(A) * op(B) + beta * C, all row-major.
// op(A) is m x k (A is k x m when trans_a), op(B) is k x n (B is n x k when trans_b).
template <typename T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, T alpha,
          const T* a, std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc);

// Sets the BLAS to one thread where it is not (a read of its count where it is).
void keep_single_threaded();
std::string config();  // the BLAS build string, for diagnostics
std::string name();    // the BLAS package and version the core was built against
// The file the BLAS functions are taken from. Like config(), opens the library on first use: throws
// std::runtime_error where it cannot be loaded.
std::string library_path();

}  // namespace fusedrnn::cpu::blas
