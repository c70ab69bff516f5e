// Torch-free CUDA entry points of the fused inner-loop update (see ../inner_update_types.h).
// The launcher that includes torch (inner_update_launcher.cpp) and the standalone self-test both call
// these, so the kernels compile with nvcc alone on machines whose torch has no CUDA headers.
#pragma once
#include <cuda_runtime.h>

#include "../inner_update_types.h"

namespace metaformer {
namespace cuda {

// Phase 1 of clipping: squared L2 norm of each chunk's gradient, in double, one value per chunk.
cudaError_t launch_chunk_sumsq(const InnerUpdateSlot* slots, const InnerUpdateChunk* chunks, int64_t n_chunks,
                               InnerUpdateDType dtype, double* partial, cudaStream_t stream);

// Per-task clip factor min(1, max_norm / (sqrt(sum of the task's partials) + eps)), written as acc_t
// (double for float64 data, float otherwise). The order of the sum is fixed, so it is deterministic.
cudaError_t launch_task_clip(const double* partial, const InnerUpdateChunk* chunks, int64_t n_chunks,
                             int64_t num_tasks, double max_norm, InnerUpdateDType dtype, void* clip,
                             cudaStream_t stream);

// Phase 2: one launch updates every chunk of every tensor. `clip` is acc_t per task or nullptr.
cudaError_t launch_inner_update(const InnerUpdateSlot* slots, const InnerUpdateChunk* chunks, int64_t n_chunks,
                                InnerUpdateDType dtype, double lr_scalar, double decay_scalar, bool has_decay,
                                const void* clip, cudaStream_t stream);

}  // namespace cuda
}  // namespace metaformer
