// The CUDA backend's entry points on a real GPU (cuda_layer.cu), declared without CUDA headers so the
// bindings compile with the host compiler alone. Every pointer in the params is device memory of the
// current device (lengths too); `stream` is a cudaStream_t (null: the legacy default stream). The calls
// enqueue work on the stream and return; nothing synchronises the host. Errors of CUDA and cuBLAS
// arrive as std::runtime_error carrying their text.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "fusedrnn/cuda/persistent.h"
#include "fusedrnn/cuda/thread_leases.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::gpu::cuda {

// Bytes of device workspace a call needs beside its params (the caller allocates it, any alignment of
// 256 bytes or more: cudaMalloc's).
template <typename T>
std::size_t forward_workspace_bytes(const LayerForwardParams<T>& params);
template <typename T>
std::size_t backward_workspace_bytes(const LayerBackwardParams<T>& params);

template <typename T>
void layer_forward(const LayerForwardParams<T>& params, void* workspace, void* stream, RecurrencePath path);
template <typename T>
void layer_backward(const LayerBackwardParams<T>& params, void* workspace, void* stream, RecurrencePath path);

// Enqueues *flag = 1 when any of data[0..count) is NaN or infinite, else 0 (flag: device memory).
template <typename T>
void flag_non_finite(const T* data, Index count, int* flag, void* stream);

// What the bindings need around the calls.
int device_count();                            // 0 without a driver or GPU
int current_device();
void set_current_device(int device);
int device_of(const void* pointer);            // -1: not device memory (host, or unknown)
std::string device_name(int device);
void* allocate(std::size_t bytes, void* stream);  // stream-ordered
void release(void* pointer, void* stream);
void copy_to_device(void* to, const void* from, std::size_t bytes, void* stream);
void copy_to_host(void* to, const void* from, std::size_t bytes, void* stream);  // waits for the copy
// `rows` runs of `row_bytes` from device memory `from_pitch` bytes apart to device memory `to_pitch` apart.
void copy_rows(void* to, std::size_t to_pitch, const void* from, std::size_t from_pitch, std::size_t row_bytes,
               std::size_t rows, void* stream);
int runtime_version();
// Per-step loops recorded as CUDA Graphs and replayed for calls with the same arrays and sizes (see
// cuda_device.cuh); off by default.
void set_graphs(bool enabled);
bool graphs();
std::int64_t graphs_recorded();
std::int64_t graphs_replayed();
// The sets of per-thread resources (a cuBLAS handle, a recording stream and its graphs) made so far and
// held by threads now (thread_leases.h).
LeaseCounts thread_resource_counts();

}  // namespace fusedrnn::gpu::cuda
