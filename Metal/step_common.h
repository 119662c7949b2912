// Helpers of the decode-step kernels (liger_step.metal, lola_step.metal). Templates over the
// pointer types, so one helper reads device, constant or threadgroup memory alike. DEVICE_FN:
// nothing in Metal, __device__ for CUDA (cuda_prelude.cuh).
#ifndef DEVICE_FN
#define DEVICE_FN
#endif

// RoPE as multipliers (mlx_linear/rotary.py): x * A + partner(x) * B, A and B rows of `rot`.
template <int D, bool TRADITIONAL>
DEVICE_FN int rope_partner(int i) {
  return TRADITIONAL ? (i ^ 1) : (i < D / 2 ? i + D / 2 : i - D / 2);
}

template <int D, bool TRADITIONAL, typename X, typename Rot>
DEVICE_FN float rotated(X x, Rot rot, int row, int i) {
  return static_cast<float>(x[i]) * rot[(row * 2) * D + i] + static_cast<float>(x[rope_partner<D, TRADITIONAL>(i)]) * rot[(row * 2 + 1) * D + i];
}

// softmax over x[0..D) into out, by the lanes of one simdgroup
template <int D, typename X, typename Out>
DEVICE_FN void softmax_row(X x, Out out, uint lane) {
  float top = -INFINITY;
  for (int i = lane; i < D; i += 32) top = max(top, static_cast<float>(x[i]));
  top = simd_max(top);
  float total = 0.0f;
  for (int i = lane; i < D; i += 32) total += metal::exp(static_cast<float>(x[i]) - top);
  total = simd_sum(total);
  for (int i = lane; i < D; i += 32) out[i] = metal::exp(static_cast<float>(x[i]) - top) / total;
}

// log(sigmoid(x)) without overflow either side
DEVICE_FN inline float log_sigmoid(float x) {
  return min(x, 0.0f) - metal::log(1.0f + metal::exp(-metal::fabs(x)));
}
