// Standalone GPU self-test of the torch-free kernels: builds a chunk table by hand, runs the update with
// and without clipping and compares with a host computation of the same formula. Prints a closing line
// "selftest: N passed, M failed" and exits non-zero on failure.
//   nvcc -std=c++17 --fmad=false -arch=sm_90 -o selftest csrc/cuda/selftest.cu csrc/cuda/inner_update_kernel.cu
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "inner_update_kernel.cuh"

using metaformer::InnerUpdateChunk;
using metaformer::InnerUpdateSlot;

#define CHECK_CUDA(x)                                                             \
  do {                                                                            \
    cudaError_t err_ = (x);                                                       \
    if (err_ != cudaSuccess) {                                                    \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(err_));      \
      std::exit(2);                                                               \
    }                                                                             \
  } while (0)

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, sizeof(T) * (h.empty() ? 1 : h.size())));
  if (!h.empty()) CHECK_CUDA(cudaMemcpy(d, h.data(), sizeof(T) * h.size(), cudaMemcpyHostToDevice));
  return d;
}

// Three tensors with T tasks: a shared parameter with a per-element lr, a task-batched one with a
// per-task lr and full decay, and one larger than a chunk.
static bool run_case(int num_tasks, bool clip, bool with_decay, int* passed, int* failed) {
  std::mt19937 rng(1234 + num_tasks * 7 + clip * 3 + with_decay);
  std::normal_distribution<float> normal(0.f, 1.f);
  const std::vector<int64_t> numel = {37, 1000, metaformer::kInnerUpdateChunkElems + 513};
  const std::vector<bool> shared = {true, false, false};
  std::vector<std::vector<float>> p(3), g(3), lr(3), decay(3), out(3);
  std::vector<InnerUpdateSlot> slots(3);
  std::vector<InnerUpdateChunk> chunks;
  std::vector<void*> to_free;
  for (int i = 0; i < 3; ++i) {
    p[i].resize(shared[i] ? numel[i] : numel[i] * num_tasks);
    g[i].resize(numel[i] * num_tasks);
    for (auto& v : p[i]) v = normal(rng);
    for (auto& v : g[i]) v = normal(rng);
    InnerUpdateSlot& s = slots[i];
    s.numel = numel[i];
    s.param_task_stride = shared[i] ? 0 : numel[i];
    s.lr = nullptr;
    s.decay = nullptr;
    s.lr_task_stride = s.lr_elem_stride = s.decay_task_stride = s.decay_elem_stride = 0;
    if (i == 0) {
      lr[i].resize(numel[i]);
      for (auto& v : lr[i]) v = std::fabs(normal(rng)) * 0.1f;
      s.lr_elem_stride = 1;
    } else if (i == 1) {
      lr[i].resize(num_tasks);
      for (auto& v : lr[i]) v = std::fabs(normal(rng)) * 0.1f;
      s.lr_task_stride = 1;
    }
    if (with_decay && i == 1) {
      decay[i].resize(numel[i] * num_tasks);
      for (auto& v : decay[i]) v = 1.f - 0.01f * std::fabs(normal(rng));
      s.decay_task_stride = numel[i];
      s.decay_elem_stride = 1;
    }
    float* dp = to_device(p[i]);
    float* dg = to_device(g[i]);
    float* dout = nullptr;
    CHECK_CUDA(cudaMalloc(&dout, sizeof(float) * g[i].size()));
    s.param = dp;
    s.grad = dg;
    s.out = dout;
    to_free.insert(to_free.end(), {dp, dg, dout});
    if (!lr[i].empty()) {
      float* d = to_device(lr[i]);
      s.lr = d;
      to_free.push_back(d);
    }
    if (!decay[i].empty()) {
      float* d = to_device(decay[i]);
      s.decay = d;
      to_free.push_back(d);
    }
    for (int t = 0; t < num_tasks; ++t)
      for (int64_t st = 0; st < numel[i]; st += metaformer::kInnerUpdateChunkElems)
        chunks.push_back({i, t, st, std::min(metaformer::kInnerUpdateChunkElems, numel[i] - st)});
  }
  const float lr_scalar = 0.05f, decay_scalar = 0.99f, max_norm = 5.0f;
  InnerUpdateSlot* dslots = to_device(slots);
  InnerUpdateChunk* dchunks = to_device(chunks);
  double* dpartial = nullptr;
  float* dclip = nullptr;
  CHECK_CUDA(cudaMalloc(&dpartial, sizeof(double) * chunks.size()));
  CHECK_CUDA(cudaMalloc(&dclip, sizeof(float) * num_tasks));
  if (clip) {
    CHECK_CUDA(metaformer::cuda::launch_chunk_sumsq(dslots, dchunks, chunks.size(), metaformer::kFloat32, dpartial, 0));
    CHECK_CUDA(metaformer::cuda::launch_task_clip(dpartial, dchunks, chunks.size(), num_tasks, max_norm,
                                                   metaformer::kFloat32, dclip, 0));
  }
  CHECK_CUDA(metaformer::cuda::launch_inner_update(dslots, dchunks, chunks.size(), metaformer::kFloat32, lr_scalar,
                                                    decay_scalar, with_decay, clip ? dclip : nullptr, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> sq(num_tasks, 0.0);
  for (int i = 0; i < 3; ++i)
    for (int t = 0; t < num_tasks; ++t)
      for (int64_t e = 0; e < numel[i]; ++e) sq[t] += double(g[i][t * numel[i] + e]) * g[i][t * numel[i] + e];
  double worst = 0.0;
  for (int i = 0; i < 3; ++i) {
    out[i].resize(g[i].size());
    CHECK_CUDA(cudaMemcpy(out[i].data(), slots[i].out, sizeof(float) * g[i].size(), cudaMemcpyDeviceToHost));
    for (int t = 0; t < num_tasks; ++t) {
      const float c = clip ? std::min(1.f, max_norm / (float(std::sqrt(sq[t])) + 1e-6f)) : 1.f;
      for (int64_t e = 0; e < numel[i]; ++e) {
        const float pv = p[i][slots[i].param_task_stride * t + e];
        const float lv = i == 0 ? lr[i][e] : (i == 1 ? lr[i][t] : lr_scalar);
        float dv = 1.f;
        if (with_decay) dv = (i == 1) ? decay[i][t * numel[i] + e] : decay_scalar;
        const float expect = pv * dv - (g[i][t * numel[i] + e] * c) * lv;
        worst = std::max(worst, double(std::fabs(expect - out[i][t * numel[i] + e])));
      }
    }
  }
  for (void* ptr : to_free) cudaFree(ptr);
  cudaFree(dslots);
  cudaFree(dchunks);
  cudaFree(dpartial);
  cudaFree(dclip);
  const bool ok = worst <= (clip ? 1e-6 : 0.0);
  std::printf("case T=%d clip=%d decay=%d: max abs error %.3g %s\n", num_tasks, int(clip), int(with_decay), worst,
              ok ? "ok" : "FAILED");
  (ok ? *passed : *failed) += 1;
  return ok;
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "selftest: no CUDA device\n");
    return 2;
  }
  int passed = 0, failed = 0;
  for (int tasks : {1, 5, 32})
    for (bool clip : {false, true})
      for (bool decay : {false, true}) run_case(tasks, clip, decay, &passed, &failed);
  std::printf("selftest: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
