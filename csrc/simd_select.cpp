// The run-time choice of the float32 plane kernel set (bn_relu_pool_avx512.h). Made once per process: every
// plane of every pass asks, and a process must not switch sets between a forward and its backward (the
// argmax codes and statistics would come from different arithmetic).
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bn_relu_pool_avx512.h"

namespace metaformer {
namespace simd {
namespace {

// The best set this CPU runs. The #if matches the one the kernel files compile their bodies under.
Kernels best_supported() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Kernels::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Kernels::avx2;
#endif
  return Kernels::generic;
}

// METAFORMER_SIMD unset, empty or "1": the best; "0" (or "generic", "none"): generic; "avx2" / "avx512": that set where the CPU has
// it. A set the CPU lacks, or an unknown value, falls back to the best set with a warning instead of failing:
// the variable is read inside the kernels, where an exception cannot reach the caller.
Kernels choose() {
  const Kernels best = best_supported();
  const char* raw = std::getenv("METAFORMER_SIMD");
  // trimmed and lower-cased: " AVX2" means avx2, and "generic" (the name cpu_kernels() reports) the generic set
  std::string env = raw == nullptr ? std::string() : std::string(raw);
  const auto first = env.find_first_not_of(" \t\n");
  env = first == std::string::npos ? std::string() : env.substr(first, env.find_last_not_of(" \t\n") - first + 1);
  std::transform(env.begin(), env.end(), env.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (env.empty() || env == "1") return best;
  if (env == "0" || env == "generic" || env == "none") return Kernels::generic;
  Kernels want;
  if (env == "avx2") {
    want = Kernels::avx2;
  } else if (env == "avx512") {
    want = Kernels::avx512;
  } else {
    std::fprintf(stderr,
                 "metaformer: METAFORMER_SIMD=%s is not one of 0 (or generic, none), 1, avx2, avx512; using the %s "
                 "kernels\n", raw, kernels_name(best));
    return best;
  }
  if (static_cast<int>(want) > static_cast<int>(best)) {
    std::fprintf(stderr, "metaformer: METAFORMER_SIMD=%s but this CPU (or build) lacks it; using the %s kernels\n",
                 raw, kernels_name(best));
    return best;
  }
  return want;
}

}  // namespace

Kernels kernels() {
  static const Kernels chosen = choose();
  return chosen;
}

const char* kernels_name(Kernels k) {
  switch (k) {
    case Kernels::avx512:
      return "avx512";
    case Kernels::avx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace simd
}  // namespace metaformer
