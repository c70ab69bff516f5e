// CUDA implementation of metaformer::inner_update: builds the same plan as the CPU op, copies the slot
// and chunk tables to the device in one transfer, and launches the torch-free kernels on torch's
// current stream. Built only against a CUDA build of torch (setup.py, METAFORMER_BUILD_CUDA).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>

#include "../inner_update_plan.h"
#include "inner_update_kernel.cuh"

namespace metaformer {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "metaformer::inner_update (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> run_cuda(at::TensorList params, at::TensorList grads, const std::optional<at::TensorList>& lr,
                                 double lr_scalar, const std::optional<at::TensorList>& decay, double decay_scalar,
                                 std::optional<double> max_grad_norm, bool in_place) {
  InnerUpdatePlan plan = make_inner_update_plan(params, grads, lr, decay, in_place);
  if (plan.slots.empty() || plan.chunks.empty()) return plan.outputs;
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Slots and chunks travel together in one pinned buffer: one host-to-device copy per call.
  const size_t slot_bytes = plan.slots.size() * sizeof(InnerUpdateSlot);
  const size_t chunk_offset = (slot_bytes + 15) / 16 * 16;
  const size_t total = chunk_offset + plan.chunks.size() * sizeof(InnerUpdateChunk);
  at::Tensor host = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), plan.slots.data(), slot_bytes);
  std::memcpy(static_cast<uint8_t*>(host.data_ptr()) + chunk_offset, plan.chunks.data(),
              plan.chunks.size() * sizeof(InnerUpdateChunk));
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  const auto* slots = reinterpret_cast<const InnerUpdateSlot*>(table.data_ptr());
  const auto* chunks = reinterpret_cast<const InnerUpdateChunk*>(static_cast<uint8_t*>(table.data_ptr()) + chunk_offset);
  const int64_t n_chunks = static_cast<int64_t>(plan.chunks.size());
  const InnerUpdateDType dtype = to_kernel_dtype(plan.dtype);

  at::Tensor clip;
  if (max_grad_norm.has_value()) {
    at::Tensor partial = at::empty({n_chunks}, grads[0].options().dtype(at::kDouble));
    clip = at::empty({plan.num_tasks}, grads[0].options().dtype(plan.acc_dtype));
    check(cuda::launch_chunk_sumsq(slots, chunks, n_chunks, dtype, partial.data_ptr<double>(), stream), "norm pass");
    check(cuda::launch_task_clip(partial.data_ptr<double>(), chunks, n_chunks, plan.num_tasks, *max_grad_norm, dtype,
                                 clip.data_ptr(), stream),
          "clip pass");
  }
  check(cuda::launch_inner_update(slots, chunks, n_chunks, dtype, lr_scalar, decay_scalar, decay_scalar != 1.0,
                                  clip.defined() ? clip.data_ptr() : nullptr, stream),
        "update pass");
  // Temporaries (the plan's contiguous copies, `partial`, `clip`, `table`) are freed on this stream after
  // the launches above, so the stream-ordered caching allocator cannot reuse them too early; the pinned
  // host buffer is protected by the event torch's host allocator records for the non-blocking copy.
  return plan.outputs;
}

std::vector<at::Tensor> inner_update_cuda(at::TensorList params, at::TensorList grads,
                                          std::optional<at::TensorList> lr, double lr_scalar,
                                          std::optional<at::TensorList> decay, double decay_scalar,
                                          std::optional<double> max_grad_norm) {
  return run_cuda(params, grads, lr, lr_scalar, decay, decay_scalar, max_grad_norm, /*in_place=*/false);
}

void inner_update_inplace_cuda(at::TensorList params, at::TensorList grads, std::optional<at::TensorList> lr,
                               double lr_scalar, std::optional<at::TensorList> decay, double decay_scalar,
                               std::optional<double> max_grad_norm) {
  run_cuda(params, grads, lr, lr_scalar, decay, decay_scalar, max_grad_norm, /*in_place=*/true);
}

}  // namespace
}  // namespace metaformer

TORCH_LIBRARY_IMPL(metaformer, CUDA, m) {
  m.impl("inner_update", &metaformer::inner_update_cuda);
  m.impl("inner_update_", &metaformer::inner_update_inplace_cuda);
}
