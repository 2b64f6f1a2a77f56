// The CUDA backend's orchestration (layer_impl.h) run on the host: the device seam (device.h) emulated
// with the CPU backend's BLAS for the GEMMs and loops over blocks, phases and threads for the kernels,
// shared memory a per-block array. Every pointer is host memory. It exists so the device code (all but
// the seam's thin CUDA implementation, cuda_device.cuh) is tested on machines without a GPU; it is not
// a fast path. Compiled into the CPU build: it needs no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fusedrnn/cuda/persistent.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::gpu::emulated {

template <typename T>
void layer_forward(const LayerForwardParams<T>& params, RecurrencePath path);

template <typename T>
void layer_backward(const LayerBackwardParams<T>& params, RecurrencePath path);

// As above, in a workspace of the caller's (host memory of the *_workspace_bytes the call needs), as a
// device caller provides it.
template <typename T>
std::size_t forward_workspace_bytes(const LayerForwardParams<T>& params);
template <typename T>
std::size_t backward_workspace_bytes(const LayerBackwardParams<T>& params);
template <typename T>
void layer_forward(const LayerForwardParams<T>& params, void* workspace, RecurrencePath path);
template <typename T>
void layer_backward(const LayerBackwardParams<T>& params, void* workspace, RecurrencePath path);

// *flag = 1 when any of data[0..count) is NaN or infinite, else 0, by the device's kernel.
template <typename T>
void flag_non_finite(const T* data, Index count, int* flag);

// Cooperative (grid-barrier) launches so far in this process: tests check a path was taken.
std::int64_t cooperative_launches();

// The persistent forward and backward kernels' shapes for a layer of this cell and value type on the
// emulated device (blocks = 0: that direction runs per step).
struct PersistentShapes {
  PersistentShape forward, backward;
};
template <typename T>
PersistentShapes persistent_shapes(CellKind cell, const LayerShape& shape, RecurrencePath path);

}  // namespace fusedrnn::gpu::emulated
