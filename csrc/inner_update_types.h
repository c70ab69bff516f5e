// Plain-data description of one fused inner-loop update, shared by the CPU kernel, the CUDA kernel
// and the CUDA self-test. Torch-free on purpose: nvcc compiles the kernels on machines whose torch
// has no CUDA headers.
#pragma once
#include <cstdint>

namespace metaformer {

// One tensor of the list. Every index is `task * task_stride + elem * elem_stride`, which covers a
// rate that is shared ([*shape]: 0, 1), per task ([T, 1, ...]: 1, 0), full ([T, *shape]: numel, 1)
// or a single value (0, 0) without materialising the broadcast.
struct InnerUpdateSlot {
  const void* param;        // scalar_t, task-batched or shared
  const void* grad;         // scalar_t, [T, numel]
  void* out;                // scalar_t, [T, numel]
  const void* lr;           // acc_t or nullptr (then the scalar learning rate applies)
  const void* decay;        // acc_t or nullptr (then the scalar decay applies)
  int64_t numel;            // elements per task
  int64_t param_task_stride;
  int64_t lr_task_stride;
  int64_t lr_elem_stride;
  int64_t decay_task_stride;
  int64_t decay_elem_stride;
};

// A contiguous run of elements of one task of one tensor: the unit of parallel work on both devices.
struct InnerUpdateChunk {
  int32_t slot;
  int32_t task;
  int64_t start;
  int64_t len;
};

enum InnerUpdateDType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Elements per chunk: big enough to amortise scheduling, small enough to balance a few large tensors.
constexpr int64_t kInnerUpdateChunkElems = 32768;

// Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does (see ops/reference.py).
constexpr double kClipEps = 1e-6;

}  // namespace metaformer
