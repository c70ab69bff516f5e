// Turns the op's tensor arguments into slots and chunks (see inner_update_types.h). Shared by the CPU
// op and the CUDA launcher so both accept exactly the same inputs.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <optional>
#include <vector>

#include "inner_update_types.h"

namespace metaformer {

struct InnerUpdatePlan {
  std::vector<InnerUpdateSlot> slots;
  std::vector<InnerUpdateChunk> chunks;
  std::vector<at::Tensor> outputs;
  std::vector<at::Tensor> keep_alive;  // contiguous copies and dtype conversions the slots point into
  int64_t num_tasks = 0;
  int64_t total_elems = 0;
  at::ScalarType dtype = at::kFloat;
  at::ScalarType acc_dtype = at::kFloat;
};

inline InnerUpdateDType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: TORCH_CHECK(false, "metaformer::inner_update: unsupported dtype ", t);
  }
}

// Index strides of a rate tensor broadcast to [T, *shape]; materialises only the broadcasts the
// strides cannot express.
inline void rate_strides(const at::Tensor& rate, const at::Tensor& grad, at::ScalarType acc, const char* name,
                         size_t index, std::vector<at::Tensor>& keep_alive, const void** ptr, int64_t* task_stride,
                         int64_t* elem_stride) {
  const int64_t gd = grad.dim();
  // the kernels read the rate through a raw pointer on the gradient's device
  TORCH_CHECK(rate.device() == grad.device(), "metaformer::inner_update: ", name, "[", index, "] is on ", rate.device(),
              " but grads[", index, "] on ", grad.device(), "; move the rates to the gradients' device");
  TORCH_CHECK(rate.dim() <= gd, "metaformer::inner_update: ", name, "[", index, "] has more dims than grads[", index, "]");
  std::vector<int64_t> rs(gd, 1);
  for (int64_t k = 0; k < rate.dim(); ++k) rs[gd - rate.dim() + k] = rate.size(k);
  for (int64_t k = 0; k < gd; ++k) {
    TORCH_CHECK(rs[k] == 1 || rs[k] == grad.size(k), "metaformer::inner_update: ", name, "[", index,
                "] does not broadcast to the gradient shape ", grad.sizes());
  }
  const int64_t numel = gd > 1 ? grad.numel() / std::max<int64_t>(grad.size(0), 1) : 1;
  bool elems_all_one = true, elems_full = true;
  for (int64_t k = 1; k < gd; ++k) {
    elems_all_one &= rs[k] == 1;
    elems_full &= rs[k] == grad.size(k);
  }
  at::Tensor r = rate.to(acc).contiguous();
  if (elems_all_one) {
    *task_stride = (rs[0] == 1) ? 0 : 1;  // one value, or one per task
    *elem_stride = 0;
  } else if (elems_full) {
    *task_stride = (rs[0] == 1) ? 0 : numel;  // shared over tasks, or full
    *elem_stride = 1;
  } else {
    r = r.reshape(rs).expand(grad.sizes()).contiguous();  // partial broadcast: materialise
    *task_stride = numel;
    *elem_stride = 1;
  }
  keep_alive.push_back(r);
  *ptr = r.data_ptr();
}

// Large CPU outputs are first touched inside the kernel; asking for transparent huge pages makes that
// one page fault per 2 MiB instead of per 4 KiB, which otherwise costs more than the update itself.
inline void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.is_cpu() || t.nbytes() < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
}

// With `in_place`, every parameter must be task-batched and contiguous, and the outputs are the
// parameters themselves (each element is read before it is written, at the same index).
inline InnerUpdatePlan make_inner_update_plan(const at::TensorList params, const at::TensorList grads,
                                              const std::optional<at::TensorList>& lr,
                                              const std::optional<at::TensorList>& decay, bool in_place = false) {
  InnerUpdatePlan plan;
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "metaformer::inner_update: ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(!lr.has_value() || lr->size() == n, "metaformer::inner_update: lr must have one tensor per parameter");
  TORCH_CHECK(!decay.has_value() || decay->size() == n,
              "metaformer::inner_update: decay must have one tensor per parameter");
  if (n == 0) return plan;
  plan.dtype = params[0].scalar_type();
  to_kernel_dtype(plan.dtype);
  plan.acc_dtype = plan.dtype == at::kDouble ? at::kDouble : at::kFloat;
  plan.num_tasks = grads[0].dim() > 0 ? grads[0].size(0) : 0;
  plan.slots.resize(n);
  plan.outputs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p0 = params[i];
    const at::Tensor& g0 = grads[i];
    TORCH_CHECK(g0.dim() >= 1 && g0.size(0) == plan.num_tasks, "metaformer::inner_update: grads[", i,
                "] must be [T, *shape] with T = ", plan.num_tasks);
    TORCH_CHECK(p0.scalar_type() == plan.dtype && g0.scalar_type() == plan.dtype, "metaformer::inner_update: params[", i,
                "] and grads[", i, "] must have dtype ", plan.dtype);
    TORCH_CHECK(p0.device() == g0.device() && g0.device() == grads[0].device(), "metaformer::inner_update: tensor ", i,
                " is on another device");
    const bool shared = p0.dim() == g0.dim() - 1 && p0.sizes() == g0.sizes().slice(1);
    TORCH_CHECK(shared || p0.sizes() == g0.sizes(), "metaformer::inner_update: params[", i, "] has shape ", p0.sizes(),
                " but grads[", i, "] has shape ", g0.sizes());
    TORCH_CHECK(!in_place || (!shared && p0.is_contiguous()), "metaformer::inner_update_: params[", i,
                "] must be task-batched and contiguous to be updated in place");
    at::Tensor p = p0.contiguous();
    at::Tensor g = g0.contiguous();
    at::Tensor out = in_place ? p0 : at::empty(g.sizes(), g.options().memory_format(at::MemoryFormat::Contiguous));
    if (!in_place) advise_huge_pages(out);
    InnerUpdateSlot& s = plan.slots[i];
    s.param = p.data_ptr();
    s.grad = g.data_ptr();
    s.out = out.data_ptr();
    s.numel = plan.num_tasks > 0 ? g.numel() / plan.num_tasks : 0;
    s.param_task_stride = shared ? 0 : s.numel;
    s.lr = nullptr;
    s.decay = nullptr;
    s.lr_task_stride = s.lr_elem_stride = s.decay_task_stride = s.decay_elem_stride = 0;
    if (lr.has_value()) {
      rate_strides((*lr)[i], g, plan.acc_dtype, "lr", i, plan.keep_alive, &s.lr, &s.lr_task_stride, &s.lr_elem_stride);
    }
    if (decay.has_value()) {
      rate_strides((*decay)[i], g, plan.acc_dtype, "decay", i, plan.keep_alive, &s.decay, &s.decay_task_stride,
                   &s.decay_elem_stride);
    }
    plan.keep_alive.push_back(p);
    plan.keep_alive.push_back(g);
    plan.outputs.push_back(out);
    for (int64_t t = 0; t < plan.num_tasks; ++t) {
      for (int64_t start = 0; start < s.numel; start += kInnerUpdateChunkElems) {
        plan.chunks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(t), start,
                               std::min(kInnerUpdateChunkElems, s.numel - start)});
      }
    }
    plan.total_elems += g.numel();
  }
  return plan;
}

}  // namespace metaformer
