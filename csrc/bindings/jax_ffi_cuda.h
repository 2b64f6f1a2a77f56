// The XLA FFI handlers of fusedrnn.jax for CUDA (jax_ffi_cuda.cpp), added to the CUDA module when the
// build found the XLA FFI headers (FUSEDRNN_WITH_XLA_FFI).
#pragma once

#include <pybind11/pybind11.h>

namespace fusedrnn::bindings {

// Adds jax_ffi_targets (name -> handler capsule), jax_ffi_api_version and jax_ffi_built_with_jaxlib.
void def_jax_ffi_cuda(pybind11::module_& m);

}  // namespace fusedrnn::bindings
