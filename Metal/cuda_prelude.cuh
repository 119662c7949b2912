// The Metal names the decode-step kernels use, for MLX's CUDA backend (mx.fast.cuda_kernel), so
// that one kernel source runs on both: a simdgroup is a warp, a threadgroup a block, threadgroup
// memory shared memory. Launched with threadgroup (32, NSG, 1): threadIdx.x is the lane.
typedef unsigned int uint;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#define DEVICE_FN __device__
#define threadgroup __shared__
#define thread_index_in_simdgroup (threadIdx.x)
#define simdgroup_index_in_threadgroup (threadIdx.y)
#define threadgroup_position_in_grid (blockIdx)

struct mem_flags {
  static constexpr int mem_threadgroup = 0;
};
__device__ inline void threadgroup_barrier(int) { __syncthreads(); }
__device__ inline void simdgroup_barrier(int) { __syncwarp(); }

__device__ inline float simd_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}
__device__ inline float simd_broadcast(float x, int lane) { return __shfl_sync(0xffffffff, x, lane); }
__device__ inline float simd_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

namespace metal {
__device__ inline float exp(float x) { return expf(x); }
__device__ inline float log(float x) { return logf(x); }
__device__ inline float fabs(float x) { return fabsf(x); }
}  // namespace metal
