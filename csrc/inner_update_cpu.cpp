// CPU kernel of metaformer::inner_update and the op's registration (TORCH_LIBRARY namespace `metaformer`).
// One parallel pass over a chunk table that spans every tensor and task of the list; with clipping, a
// first pass computes per-task squared norms from fixed chunks so the result does not depend on the
// thread count. Compiled with -ffp-contract=off so `decay * p - lr * g` rounds exactly like the
// pure-PyTorch reference (no fused multiply-add).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>

#include "inner_update_plan.h"

namespace metaformer {
namespace {

template <typename acc_t>
struct Rate {
  const acc_t* base;  // nullptr: constant `value`
  acc_t value;
};

// Resolves a rate for one chunk: a pointer to step through (elem stride 1) or a constant.
template <typename acc_t>
inline Rate<acc_t> chunk_rate(const void* ptr, int64_t task_stride, int64_t elem_stride, double scalar,
                              const InnerUpdateChunk& c) {
  if (ptr == nullptr) return {nullptr, static_cast<acc_t>(scalar)};
  const acc_t* r = static_cast<const acc_t*>(ptr) + c.task * task_stride;
  if (elem_stride == 0) return {nullptr, r[0]};
  return {r + c.start, acc_t(0)};
}

// The inner loop, specialised so that the compiler vectorises each combination. `o` may be `p` (the
// in-place op): iteration k reads and writes index k only, which is what `ivdep` promises the compiler.
template <typename scalar_t, typename acc_t, bool LR_VEC, bool DECAY_VEC, bool HAS_DECAY>
void update_run(const scalar_t* p, const scalar_t* g, scalar_t* o, Rate<acc_t> lr, Rate<acc_t> decay, acc_t clip,
                int64_t n) {
#pragma GCC ivdep
  for (int64_t k = 0; k < n; ++k) {
    acc_t u = static_cast<acc_t>(g[k]) * clip;
    u = u * (LR_VEC ? lr.base[k] : lr.value);
    acc_t b = static_cast<acc_t>(p[k]);
    if (HAS_DECAY) b = b * (DECAY_VEC ? decay.base[k] : decay.value);
    o[k] = static_cast<scalar_t>(b - u);
  }
}

template <typename scalar_t, typename acc_t>
void update_chunk(const InnerUpdateSlot& s, const InnerUpdateChunk& c, double lr_scalar, double decay_scalar,
                  bool has_decay, acc_t clip) {
  const scalar_t* p = static_cast<const scalar_t*>(s.param) + c.task * s.param_task_stride + c.start;
  const scalar_t* g = static_cast<const scalar_t*>(s.grad) + c.task * s.numel + c.start;
  scalar_t* o = static_cast<scalar_t*>(s.out) + c.task * s.numel + c.start;
  Rate<acc_t> lr = chunk_rate<acc_t>(s.lr, s.lr_task_stride, s.lr_elem_stride, lr_scalar, c);
  Rate<acc_t> decay = chunk_rate<acc_t>(s.decay, s.decay_task_stride, s.decay_elem_stride, decay_scalar, c);
  const bool lr_vec = lr.base != nullptr;
  const bool decay_vec = decay.base != nullptr;
  has_decay = has_decay || s.decay != nullptr;
  if (!has_decay) {
    if (lr_vec) update_run<scalar_t, acc_t, true, false, false>(p, g, o, lr, decay, clip, c.len);
    else update_run<scalar_t, acc_t, false, false, false>(p, g, o, lr, decay, clip, c.len);
  } else if (decay_vec) {
    if (lr_vec) update_run<scalar_t, acc_t, true, true, true>(p, g, o, lr, decay, clip, c.len);
    else update_run<scalar_t, acc_t, false, true, true>(p, g, o, lr, decay, clip, c.len);
  } else {
    if (lr_vec) update_run<scalar_t, acc_t, true, false, true>(p, g, o, lr, decay, clip, c.len);
    else update_run<scalar_t, acc_t, false, false, true>(p, g, o, lr, decay, clip, c.len);
  }
}

template <typename scalar_t>
double chunk_sumsq(const InnerUpdateSlot& s, const InnerUpdateChunk& c) {
  const scalar_t* g = static_cast<const scalar_t*>(s.grad) + c.task * s.numel + c.start;
  double acc = 0.0;
  for (int64_t k = 0; k < c.len; ++k) {
    const double v = static_cast<double>(g[k]);
    acc += v * v;
  }
  return acc;
}

// Small lists run on the calling thread: waking the pool costs more than the work.
constexpr int64_t kSerialElems = 1 << 15;

int64_t chunk_grain(const InnerUpdatePlan& plan) {
  return plan.total_elems < kSerialElems ? static_cast<int64_t>(plan.chunks.size()) + 1 : 1;
}

template <typename scalar_t, typename acc_t>
void run_plan(const InnerUpdatePlan& plan, double lr_scalar, double decay_scalar, std::optional<double> max_grad_norm) {
  const int64_t n_chunks = static_cast<int64_t>(plan.chunks.size());
  const int64_t grain = chunk_grain(plan);
  std::vector<acc_t> clip(static_cast<size_t>(plan.num_tasks), acc_t(1));
  if (max_grad_norm.has_value()) {
    std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
    at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const InnerUpdateChunk& c = plan.chunks[k];
        partial[k] = chunk_sumsq<scalar_t>(plan.slots[c.slot], c);
      }
    });
    std::vector<double> sumsq(static_cast<size_t>(plan.num_tasks), 0.0);
    for (int64_t k = 0; k < n_chunks; ++k) sumsq[plan.chunks[k].task] += partial[k];
    for (int64_t t = 0; t < plan.num_tasks; ++t) {
      const acc_t norm = static_cast<acc_t>(std::sqrt(sumsq[t]));
      const acc_t factor = static_cast<acc_t>(*max_grad_norm) / (norm + static_cast<acc_t>(kClipEps));
      clip[t] = !(factor >= acc_t(1)) ? factor : acc_t(1);  // a NaN norm keeps its NaN (as the reference)
    }
  }
  const bool has_decay = decay_scalar != 1.0;
  at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const InnerUpdateChunk& c = plan.chunks[k];
      update_chunk<scalar_t, acc_t>(plan.slots[c.slot], c, lr_scalar, decay_scalar, has_decay, clip[c.task]);
    }
  });
}

std::vector<at::Tensor> run_cpu(at::TensorList params, at::TensorList grads, const std::optional<at::TensorList>& lr,
                                double lr_scalar, const std::optional<at::TensorList>& decay, double decay_scalar,
                                std::optional<double> max_grad_norm, bool in_place) {
  InnerUpdatePlan plan = make_inner_update_plan(params, grads, lr, decay, in_place);
  if (plan.slots.empty()) return {};
  switch (plan.dtype) {
    case at::kFloat: run_plan<float, float>(plan, lr_scalar, decay_scalar, max_grad_norm); break;
    case at::kDouble: run_plan<double, double>(plan, lr_scalar, decay_scalar, max_grad_norm); break;
    case at::kBFloat16: run_plan<c10::BFloat16, float>(plan, lr_scalar, decay_scalar, max_grad_norm); break;
    case at::kHalf: run_plan<c10::Half, float>(plan, lr_scalar, decay_scalar, max_grad_norm); break;
    default: TORCH_CHECK(false, "metaformer::inner_update: unsupported dtype ", plan.dtype);
  }
  return plan.outputs;
}

std::vector<at::Tensor> inner_update_cpu(at::TensorList params, at::TensorList grads,
                                         std::optional<at::TensorList> lr, double lr_scalar,
                                         std::optional<at::TensorList> decay, double decay_scalar,
                                         std::optional<double> max_grad_norm) {
  return run_cpu(params, grads, lr, lr_scalar, decay, decay_scalar, max_grad_norm, /*in_place=*/false);
}

void inner_update_inplace_cpu(at::TensorList params, at::TensorList grads, std::optional<at::TensorList> lr,
                              double lr_scalar, std::optional<at::TensorList> decay, double decay_scalar,
                              std::optional<double> max_grad_norm) {
  run_cpu(params, grads, lr, lr_scalar, decay, decay_scalar, max_grad_norm, /*in_place=*/true);
}

}  // namespace

bool built_with_cuda() {
#ifdef METAFORMER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// How many threads at::parallel_for really used on a wide range: 1 means the build lost OpenMP
// (at::parallel_for is inlined into this library and silently runs serially without -fopenmp).
int64_t parallel_threads_used() {
  std::atomic<int64_t> seen_mask{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    seen_mask.fetch_or(int64_t(1) << (at::get_thread_num() % 63));
  });
  return __builtin_popcountll(static_cast<unsigned long long>(seen_mask.load()));
}

}  // namespace metaformer

TORCH_LIBRARY(metaformer, m) {
  m.def(
      "inner_update(Tensor[] params, Tensor[] grads, Tensor[]? lr, float lr_scalar, Tensor[]? decay, "
      "float decay_scalar, float? max_grad_norm) -> Tensor[]");
  m.def(
      "inner_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[]? lr, float lr_scalar, Tensor[]? decay, "
      "float decay_scalar, float? max_grad_norm) -> ()");
}

TORCH_LIBRARY_IMPL(metaformer, CPU, m) {
  m.impl("inner_update", &metaformer::inner_update_cpu);
  m.impl("inner_update_", &metaformer::inner_update_inplace_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metaformer C++/CUDA ops; the ops themselves are registered with TORCH_LIBRARY (torch.ops.metaformer)";
  m.def("built_with_cuda", &metaformer::built_with_cuda, "Whether the CUDA kernels were compiled into this build");
  m.def("parallel_threads_used", &metaformer::parallel_threads_used,
        "Threads that at::parallel_for used inside this extension (1 if it was built without OpenMP)");
}
