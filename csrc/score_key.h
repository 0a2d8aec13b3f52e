// Order-preserving 32-bit keys for fp32 selection scores, shared by the CPU and CUDA kernels so every backend
// breaks ties identically: key(a) > key(b) exactly when a > b, -0 and +0 map to one key, and every NaN maps
// to the largest key (torch.sort also ranks NaN above +inf).
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define CROSSDIFF_HD __host__ __device__ __forceinline__
#else
#define CROSSDIFF_HD inline
#endif

namespace crossdiff {

CROSSDIFF_HD uint32_t score_key(float s) {
  // -0 + +0 = +0 under round-to-nearest: the two zeros share a key. Callers must hand in the rounded product
  // f * w, never let the compiler contract that multiply with this add into one FMA (which keeps the sign of an
  // underflowed negative product): the CPU build passes -ffp-contract=off, the CUDA kernels multiply with
  // __fmul_rn. (A float compare-select here instead made CPU batch_topk 5x slower, measured at B=2048, F=16384:
  // GCC then no longer vectorises the key computation.)
  s += 0.0f;
  uint32_t u;
  std::memcpy(&u, &s, sizeof(u));
  // Positive floats: set the sign bit; negative floats: flip every bit. Branch-free so scans vectorise.
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;
  return s != s ? 0xFFFFFFFFu : (u ^ flip);
}

// What a selection ranks of an entry f: f itself, or ReLU(f) when the selection reads the encoder's
// pre-activations (relu = true). ReLU as torch.relu computes it: a negative becomes 0 and NaN stays NaN, so a
// selection over pre-activations with relu ranks exactly what one over the encoder's ReLU output ranks, and the
// encoder's separate ReLU pass over f is not needed.
CROSSDIFF_HD float selection_input(float f, bool relu) { return relu && f < 0.0f ? 0.0f : f; }

// Latent ids are int32 unless F needs more (the data layout).
inline bool latent_index_is_int32(int64_t n_latents) {
  return n_latents <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

}  // namespace crossdiff
