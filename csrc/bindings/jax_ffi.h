// The XLA FFI handlers of fusedrnn.jax (jax_ffi.cpp), added to the _core module when the build found
// the XLA FFI headers (FUSEDRNN_WITH_XLA_FFI).
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>

namespace fusedrnn::bindings {

// Adds jax_ffi_targets (name -> handler capsule), jax_ffi_api_version, jax_ffi_built_with_jaxlib and the
// other jax_ffi_* attributes the Python side reads (jax_ffi.cpp, def_jax_ffi).
void def_jax_ffi(pybind11::module_& m);

// Frees the scratch the CPU handlers keep between calls (one pool for the process) and returns its
// bytes; the arrays of a handler running now are kept.
std::size_t release_jax_call_scratch();

}  // namespace fusedrnn::bindings
