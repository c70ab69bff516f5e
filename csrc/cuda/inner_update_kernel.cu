// CUDA kernels of the fused inner-loop update over a chunk table (multi-tensor apply): one block per
// chunk, so a whole list of tensors and tasks is one launch. Explicit _rn intrinsics keep the rounding
// of `decay * p - lr * (clip * g)` identical to the PyTorch reference (no contraction into FMA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "inner_update_kernel.cuh"

namespace metaformer {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store(scalar_t* o, acc_t v) {
  *o = from_acc<scalar_t>(v);
}
template <>
__device__ __forceinline__ void store<double, double>(double* o, double v) {
  *o = v;
}

template <typename scalar_t, typename acc_t>
__global__ void inner_update_kernel(const InnerUpdateSlot* __restrict__ slots, const InnerUpdateChunk* __restrict__ chunks,
                                    acc_t lr_scalar, acc_t decay_scalar, bool has_decay, const acc_t* __restrict__ clip) {
  const InnerUpdateChunk c = chunks[blockIdx.x];
  const InnerUpdateSlot s = slots[c.slot];
  const scalar_t* p = static_cast<const scalar_t*>(s.param) + c.task * s.param_task_stride + c.start;
  const scalar_t* g = static_cast<const scalar_t*>(s.grad) + c.task * s.numel + c.start;
  scalar_t* o = static_cast<scalar_t*>(s.out) + c.task * s.numel + c.start;
  const acc_t* lr = s.lr ? static_cast<const acc_t*>(s.lr) + c.task * s.lr_task_stride + c.start * s.lr_elem_stride : nullptr;
  const acc_t* decay =
      s.decay ? static_cast<const acc_t*>(s.decay) + c.task * s.decay_task_stride + c.start * s.decay_elem_stride : nullptr;
  const bool use_decay = has_decay || decay != nullptr;
  const acc_t cf = clip ? clip[c.task] : acc_t(1);
  for (int64_t k = threadIdx.x; k < c.len; k += blockDim.x) {
    acc_t u = mul_rn(to_acc(g[k]), cf);
    u = mul_rn(u, lr ? lr[k * s.lr_elem_stride] : lr_scalar);
    acc_t b = to_acc(p[k]);
    if (use_decay) b = mul_rn(b, decay ? decay[k * s.decay_elem_stride] : decay_scalar);
    store<scalar_t, acc_t>(o + k, sub_rn(b, u));
  }
}

template <typename scalar_t>
__global__ void chunk_sumsq_kernel(const InnerUpdateSlot* __restrict__ slots, const InnerUpdateChunk* __restrict__ chunks,
                                   double* __restrict__ partial) {
  __shared__ double buf[kThreads];
  const InnerUpdateChunk c = chunks[blockIdx.x];
  const InnerUpdateSlot s = slots[c.slot];
  const scalar_t* g = static_cast<const scalar_t*>(s.grad) + c.task * s.numel + c.start;
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < c.len; k += blockDim.x) {
    const double v = static_cast<double>(to_acc(g[k]));
    acc += v * v;
  }
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = buf[0];
}

// One block per task walks the whole chunk table in a fixed order: deterministic, and cheap because
// the table is small (a few chunks per tensor and task).
template <typename acc_t>
__global__ void task_clip_kernel(const double* __restrict__ partial, const InnerUpdateChunk* __restrict__ chunks,
                                 int64_t n_chunks, double max_norm, acc_t* __restrict__ clip) {
  __shared__ double buf[kThreads];
  const int task = blockIdx.x;
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < n_chunks; k += blockDim.x) {
    if (chunks[k].task == task) acc += partial[k];
  }
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t norm = static_cast<acc_t>(sqrt(buf[0]));
    const acc_t factor = static_cast<acc_t>(max_norm) / (norm + static_cast<acc_t>(kClipEps));
    clip[task] = !(factor >= acc_t(1)) ? factor : acc_t(1);  // a NaN norm keeps its NaN (as the reference)
  }
}

}  // namespace

cudaError_t launch_chunk_sumsq(const InnerUpdateSlot* slots, const InnerUpdateChunk* chunks, int64_t n_chunks,
                               InnerUpdateDType dtype, double* partial, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n_chunks));
  switch (dtype) {
    case kFloat32: chunk_sumsq_kernel<float><<<grid, kThreads, 0, stream>>>(slots, chunks, partial); break;
    case kFloat64: chunk_sumsq_kernel<double><<<grid, kThreads, 0, stream>>>(slots, chunks, partial); break;
    case kBFloat16: chunk_sumsq_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(slots, chunks, partial); break;
    case kFloat16: chunk_sumsq_kernel<__half><<<grid, kThreads, 0, stream>>>(slots, chunks, partial); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_task_clip(const double* partial, const InnerUpdateChunk* chunks, int64_t n_chunks,
                             int64_t num_tasks, double max_norm, InnerUpdateDType dtype, void* clip,
                             cudaStream_t stream) {
  if (num_tasks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_tasks));
  if (dtype == kFloat64) {
    task_clip_kernel<double><<<grid, kThreads, 0, stream>>>(partial, chunks, n_chunks, max_norm, static_cast<double*>(clip));
  } else {
    task_clip_kernel<float><<<grid, kThreads, 0, stream>>>(partial, chunks, n_chunks, max_norm, static_cast<float*>(clip));
  }
  return cudaGetLastError();
}

cudaError_t launch_inner_update(const InnerUpdateSlot* slots, const InnerUpdateChunk* chunks, int64_t n_chunks,
                                InnerUpdateDType dtype, double lr_scalar, double decay_scalar, bool has_decay,
                                const void* clip, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n_chunks));
  const float lr_f = static_cast<float>(lr_scalar), decay_f = static_cast<float>(decay_scalar);
  const float* clip_f = static_cast<const float*>(clip);
  switch (dtype) {
    case kFloat32:
      inner_update_kernel<float, float><<<grid, kThreads, 0, stream>>>(slots, chunks, lr_f, decay_f, has_decay, clip_f);
      break;
    case kFloat64:
      inner_update_kernel<double, double><<<grid, kThreads, 0, stream>>>(slots, chunks, lr_scalar, decay_scalar, has_decay,
                                                                         static_cast<const double*>(clip));
      break;
    case kBFloat16:
      inner_update_kernel<__nv_bfloat16, float><<<grid, kThreads, 0, stream>>>(slots, chunks, lr_f, decay_f, has_decay, clip_f);
      break;
    case kFloat16:
      inner_update_kernel<__half, float><<<grid, kThreads, 0, stream>>>(slots, chunks, lr_f, decay_f, has_decay, clip_f);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace metaformer
