// The subset of the Metal Shading Language that custom MLX kernels use, for a host C++ compiler
// (clang++), plus a runtime that executes a kernel launch on the CPU.
//
// Every thread of a threadgroup is a lane with its own stack (a fiber); the lanes of one
// threadgroup run concurrently, interleaved on one OS thread, and switch only when they wait
// at a synchronization point: simd_* operations (all active lanes of the simdgroup) and
// threadgroup_barrier (all active lanes of the threadgroup). Threadgroups run one after another.
// A lane that returns leaves its simdgroup and threadgroup, as on Apple GPUs.
#pragma once

#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef uint uint2 __attribute__((ext_vector_type(2)));
typedef uint uint3 __attribute__((ext_vector_type(3)));
typedef uint uint4 __attribute__((ext_vector_type(4)));
typedef int int2 __attribute__((ext_vector_type(2)));
typedef int int3 __attribute__((ext_vector_type(3)));
typedef int int4 __attribute__((ext_vector_type(4)));
typedef float float2 __attribute__((ext_vector_type(2)));
typedef float float3 __attribute__((ext_vector_type(3)));
typedef float float4 __attribute__((ext_vector_type(4)));

namespace metal_emu {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 <-> float32, round to nearest even (what Metal's conversions do).
inline uint16_t half_bits(float f) {
  uint32_t x = bits_of(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {
    return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  }
  if (a >= 0x477ff000u) {  // rounds to a value above 65504
    return sign | 0x7c00u;
  }
  if (a < 0x38800000u) {  // below 2^-14: subnormal, in units of 2^-24
    volatile float scaled = float_of(a) * 16777216.0f + 8388608.0f;
    return sign | uint16_t(bits_of(scaled) - bits_of(8388608.0f));
  }
  uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return sign | uint16_t((rounded - 0x38000000u) >> 13);
}

inline float half_value(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    float f = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (exponent == 31) {
    return float_of(sign | 0x7f800000u | (mantissa << 13));
  }
  return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t bfloat_bits(float f) {
  uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((x >> 16) | 0x40u);
  }
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace metal_emu

// half and bfloat hold their 16 bits and compute in float (Metal computes half in half).
struct half {
  uint16_t bits;
  half() = default;
  half(float f) : bits(metal_emu::half_bits(f)) {}
  operator float() const {
    return metal_emu::half_value(bits);
  }
};

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) : bits(metal_emu::bfloat_bits(f)) {}
  operator float() const {
    return metal_emu::float_of(uint32_t(bits) << 16);
  }
};

typedef half float16_t;
typedef bfloat bfloat16_t;

namespace metal_emu {

constexpr int kSimdWidth = 32;
constexpr int kMaxLanes = 1024;
constexpr size_t kStackSize = 256 * 1024;

struct Attributes {
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup, simdgroups_per_threadgroup, thread_execution_width;
  uint thread_index_in_quadgroup, thread_index_in_simdgroup, thread_index_in_threadgroup;
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threadgroups_per_grid, threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

enum Wait { kRunnable, kSimd, kThreadgroup };

struct Lane {
  void* sp;
  Attributes attributes;
  int simdgroup;
  bool done;
  Wait wait;
  uint wait_generation;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
};

struct Group {  // a simdgroup, or the threadgroup
  uint active, arrived, generation;
  uint32_t arrived_mask;
  uint32_t masks[2];  // lanes that took part in the last two operations
};

struct Runtime {
  Lane lanes[kMaxLanes];
  Group simdgroups[kMaxLanes / kSimdWidth];
  Group threadgroup;
  alignas(16) unsigned char slots[2][kMaxLanes][16];  // values exchanged by simd operations
  int current;
  void* scheduler_sp;
#if !defined(__x86_64__)
  ucontext_t scheduler_context;
#endif
  char* stacks;
  void (*body)(void**);
  void** buffers;
  sigjmp_buf crash;
};

inline Runtime& rt() {
  static Runtime runtime;
  return runtime;
}

inline const Attributes& lane() {
  return rt().lanes[rt().current].attributes;
}

#if defined(__x86_64__)
extern "C" void metal_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .globl metal_emu_switch
  .hidden metal_emu_switch
  .type metal_emu_switch, @function
metal_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size metal_emu_switch, .-metal_emu_switch
)");
#endif

__attribute__((noinline)) inline void to_scheduler() {
  Runtime& r = rt();
#if defined(__x86_64__)
  metal_emu_switch(&r.lanes[r.current].sp, r.scheduler_sp);
#else
  swapcontext(&r.lanes[r.current].context, &r.scheduler_context);
#endif
}

inline void release(Group& g) {
  g.masks[g.generation & 1] = g.arrived_mask;
  g.arrived = 0;
  g.arrived_mask = 0;
  g.generation++;
}

// Wait until every active lane of `g` arrives; returns the parity of this operation's slots.
__attribute__((noinline)) inline int synchronize(Group& g, Wait kind, int member) {
  Runtime& r = rt();
  int parity = g.generation & 1;
  g.arrived++;
  g.arrived_mask |= member >= 0 ? (1u << member) : 0u;
  if (g.arrived == g.active) {
    release(g);
  } else {
    Lane& me = r.lanes[r.current];
    me.wait = kind;
    me.wait_generation = g.generation;
    to_scheduler();
  }
  return parity;
}

inline void leave(Group& g) {
  g.active--;
  if (g.active > 0 && g.arrived == g.active) {
    release(g);
  }
}

[[noreturn]] inline void lane_main() {
  Runtime& r = rt();
  r.body(r.buffers);
  Lane& me = r.lanes[r.current];
  me.done = true;
  leave(r.simdgroups[me.simdgroup]);
  leave(r.threadgroup);
  to_scheduler();
  std::abort();  // a finished lane is never resumed
}

#if defined(__x86_64__)
extern "C" void metal_emu_lane_entry() {
  lane_main();
}
#else
inline void lane_entry_context() {
  lane_main();
}
#endif

inline void start_lane(int index) {
  Runtime& r = rt();
  // Stack tops at staggered offsets, so that they do not all fall into the same cache sets.
  char* top = r.stacks + (index + 1) * kStackSize - (index % 61) * 64;
#if defined(__x86_64__)
  // Frame popped by metal_emu_switch: six registers, then the entry as return address.
  void** sp = reinterpret_cast<void**>(top) - 2;
  sp[1] = nullptr;  // fake return address of the entry function
  sp[0] = reinterpret_cast<void*>(&metal_emu_lane_entry);
  sp -= 6;
  for (int k = 0; k < 6; ++k) {
    sp[k] = nullptr;
  }
  r.lanes[index].sp = sp;
#else
  Lane& l = r.lanes[index];
  getcontext(&l.context);
  l.context.uc_stack.ss_sp = top - kStackSize + 4096;
  l.context.uc_stack.ss_size = kStackSize - 4096;
  l.context.uc_link = nullptr;
  makecontext(&l.context, lane_entry_context, 0);
#endif
}

inline void resume(int index) {
  Runtime& r = rt();
  r.current = index;
#if defined(__x86_64__)
  metal_emu_switch(&r.scheduler_sp, r.lanes[index].sp);
#else
  swapcontext(&r.scheduler_context, &r.lanes[index].context);
#endif
}

inline bool runnable(const Lane& l) {
  Runtime& r = rt();
  if (l.done) {
    return false;
  }
  if (l.wait == kSimd) {
    return r.simdgroups[l.simdgroup].generation != l.wait_generation;
  }
  if (l.wait == kThreadgroup) {
    return r.threadgroup.generation != l.wait_generation;
  }
  return true;
}

inline uint3 make_uint3(uint x, uint y, uint z) {
  uint3 v;
  v.x = x;
  v.y = y;
  v.z = z;
  return v;
}

inline uint ceil_div(uint a, uint b) {
  return (a + b - 1) / b;
}

// Runs one threadgroup; `order` 1 runs simdgroups last to first. Returns false on a deadlock.
inline bool run_threadgroup(uint3 grid, uint3 group, uint3 position, int order) {
  Runtime& r = rt();
  uint3 size = make_uint3(
      position.x * group.x + group.x <= grid.x ? group.x : grid.x - position.x * group.x,
      position.y * group.y + group.y <= grid.y ? group.y : grid.y - position.y * group.y,
      position.z * group.z + group.z <= grid.z ? group.z : grid.z - position.z * group.z);
  int n = size.x * size.y * size.z;
  uint dispatched = group.x * group.y * group.z;
  r.threadgroup = Group{uint(n), 0, 0, 0, {0, 0}};
  for (int g = 0; g < int(ceil_div(n, kSimdWidth)); ++g) {
    uint members = g * kSimdWidth + kSimdWidth <= n ? kSimdWidth : n - g * kSimdWidth;
    r.simdgroups[g] = Group{members, 0, 0, 0, {0, 0}};
  }
  for (int index = 0; index < n; ++index) {
    uint3 local = make_uint3(index % size.x, (index / size.x) % size.y, index / (size.x * size.y));
    Attributes& a = r.lanes[index].attributes;
    a.dispatch_quadgroups_per_threadgroup = ceil_div(dispatched, 4);
    a.dispatch_simdgroups_per_threadgroup = ceil_div(dispatched, kSimdWidth);
    a.dispatch_threads_per_threadgroup = group;
    a.grid_origin = make_uint3(0, 0, 0);
    a.grid_size = grid;
    a.quadgroup_index_in_threadgroup = index / 4;
    a.quadgroups_per_threadgroup = ceil_div(n, 4);
    a.simdgroup_index_in_threadgroup = index / kSimdWidth;
    a.simdgroups_per_threadgroup = ceil_div(n, kSimdWidth);
    a.thread_execution_width = kSimdWidth;
    a.thread_index_in_quadgroup = index % 4;
    a.thread_index_in_simdgroup = index % kSimdWidth;
    a.thread_index_in_threadgroup = index;
    a.thread_position_in_grid = position * group + local;
    a.thread_position_in_threadgroup = local;
    a.threadgroup_position_in_grid = position;
    a.threadgroups_per_grid = make_uint3(
        ceil_div(grid.x, group.x), ceil_div(grid.y, group.y), ceil_div(grid.z, group.z));
    a.threads_per_grid = grid;
    a.threads_per_simdgroup = kSimdWidth;
    a.threads_per_threadgroup = size;
    Lane& l = r.lanes[index];
    l.simdgroup = index / kSimdWidth;
    l.done = false;
    l.wait = kRunnable;
    start_lane(index);
  }
  // Simdgroups (lockstep on a GPU) run one at a time, each until all its lanes wait at a
  // threadgroup barrier or return: the least fair interleaving, so a missing barrier shows.
  int n_groups = ceil_div(n, kSimdWidth), remaining = n;
  while (remaining > 0) {
    bool progressed = false;
    for (int k = 0; k < n_groups; ++k) {
      int g = order == 1 ? n_groups - 1 - k : k;
      int first = g * kSimdWidth, last = first + kSimdWidth < n ? first + kSimdWidth : n;
      for (bool ran = true; ran;) {
        ran = false;
        for (int index = first; index < last; ++index) {
          Lane& l = r.lanes[index];
          if (runnable(l)) {
            l.wait = kRunnable;
            resume(index);
            ran = progressed = true;
            remaining -= l.done;
          }
        }
      }
    }
    if (!progressed) {
      return false;
    }
  }
  return true;
}

inline void on_crash(int signal) {
  siglongjmp(rt().crash, signal);
}

// Executes body over `grid` threads in threadgroups of `group` (dispatchThreads semantics).
// Returns 0, or writes an error message and returns -1.
inline int launch(const uint* grid_xyz, const uint* group_xyz, int order,
                  void (*body)(void**), void** buffers, char* error, int error_size) {
  Runtime& r = rt();
  uint3 grid = make_uint3(grid_xyz[0], grid_xyz[1], grid_xyz[2]);
  uint3 group = make_uint3(group_xyz[0], group_xyz[1], group_xyz[2]);
  if (group.x * group.y * group.z > uint(kMaxLanes)) {
    std::snprintf(error, error_size, "threadgroup of %u threads: at most %d", group.x * group.y * group.z, kMaxLanes);
    return -1;
  }
  // The stacks of this launch's lanes, unmapped at its end: each guard page splits the mapping,
  // and every kernel library loaded keeps its own runtime (the process has ~65k mappings).
  size_t lanes_used = size_t(group.x) * group.y * group.z;
  void* memory = mmap(nullptr, lanes_used * kStackSize, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    std::snprintf(error, error_size, "cannot map the lane stacks");
    return -1;
  }
  r.stacks = static_cast<char*>(memory);
  for (size_t k = 0; k < lanes_used; ++k) {  // a guard page below each stack
    mprotect(r.stacks + k * kStackSize, 4096, PROT_NONE);
  }
  r.body = body;
  r.buffers = buffers;

  static char signal_stack[1 << 16];
  stack_t alternate = {}, previous_stack;
  alternate.ss_sp = signal_stack;
  alternate.ss_size = sizeof(signal_stack);
  sigaltstack(&alternate, &previous_stack);
  const int signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
  struct sigaction action = {}, previous[4];
  action.sa_handler = on_crash;
  action.sa_flags = SA_ONSTACK | SA_NODEFER;
  for (int k = 0; k < 4; ++k) {
    sigaction(signals[k], &action, &previous[k]);
  }
  int status = 0;
  uint3 position = make_uint3(0, 0, 0);
  int signal = sigsetjmp(r.crash, 1);
  if (signal != 0) {
    uint3 p = r.lanes[r.current].attributes.thread_position_in_grid;
    std::snprintf(error, error_size, "signal %d (%s) in the thread at grid position (%u, %u, %u)", signal,
                  signal == SIGSEGV ? "invalid memory access" : "crash", p.x, p.y, p.z);
    status = -1;
  } else {
    uint3 groups = make_uint3(ceil_div(grid.x, group.x), ceil_div(grid.y, group.y), ceil_div(grid.z, group.z));
    for (position.z = 0; position.z < groups.z && status == 0; ++position.z) {
      for (position.y = 0; position.y < groups.y && status == 0; ++position.y) {
        for (position.x = 0; position.x < groups.x && status == 0; ++position.x) {
          if (!run_threadgroup(grid, group, position, order)) {
            std::snprintf(error, error_size,
                          "deadlock in threadgroup (%u, %u, %u): lanes wait at a barrier or simd "
                          "operation that the other lanes never reach",
                          position.x, position.y, position.z);
            status = -1;
          }
        }
      }
    }
  }
  for (int k = 0; k < 4; ++k) {
    sigaction(signals[k], &previous[k], nullptr);
  }
  sigaltstack(&previous_stack, nullptr);
  munmap(r.stacks, lanes_used * kStackSize);
  r.stacks = nullptr;
  return status;
}

// Values exchanged in a simd operation: each lane's, indexed by its simdgroup lane.
template <typename T>
struct Exchange {
  int parity, base;
  uint32_t mask;
  T value(int simd_lane) const {
    T v;
    std::memcpy(&v, rt().slots[parity][base + simd_lane], sizeof(T));
    return v;
  }
};

template <typename T>
Exchange<T> exchange(T x) {
  static_assert(sizeof(T) <= 16, "simd operations on values of at most 16 bytes");
  Runtime& r = rt();
  Lane& me = r.lanes[r.current];
  Group& g = r.simdgroups[me.simdgroup];
  int member = r.current % kSimdWidth;
  std::memcpy(r.slots[g.generation & 1][r.current], &x, sizeof(T));
  int parity = synchronize(g, kSimd, member);
  return Exchange<T>{parity, me.simdgroup * kSimdWidth, g.masks[parity]};
}

// Combines the values of the lanes that took part, in lane order.
template <typename T, typename Op>
T simd_reduce(T x, T initial, Op combine) {
  auto e = exchange(x);
  T result = initial;
  for (int l = 0; l < kSimdWidth; ++l) {
    if (e.mask >> l & 1u) {
      result = combine(result, e.value(l));
    }
  }
  return result;
}

}  // namespace metal_emu

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) {
  metal_emu::synchronize(metal_emu::rt().threadgroup, metal_emu::kThreadgroup, -1);
}

inline void simdgroup_barrier(mem_flags) {
  metal_emu::exchange(0);
}

template <typename T>
T simd_sum(T x) {
  return metal_emu::simd_reduce(x, T(0), [](T a, T b) { return a + b; });  // in lane order
}

template <typename T>
T simd_max(T x) {
  return metal_emu::simd_reduce(x, x, [](T a, T b) { return a < b ? b : a; });
}

template <typename T>
T simd_min(T x) {
  return metal_emu::simd_reduce(x, x, [](T a, T b) { return b < a ? b : a; });
}

template <typename T>
T simd_shuffle(T x, ushort lane) {
  return metal_emu::exchange(x).value(lane % metal_emu::kSimdWidth);
}

template <typename T>
T simd_broadcast(T x, ushort lane) {
  return simd_shuffle(x, lane);
}

template <typename T>
T simd_shuffle_xor(T x, ushort mask) {
  return simd_shuffle(x, ushort((metal_emu::lane().thread_index_in_simdgroup ^ mask) % metal_emu::kSimdWidth));
}

template <typename T>
T simd_shuffle_down(T x, ushort delta) {
  uint me = metal_emu::lane().thread_index_in_simdgroup;
  auto e = metal_emu::exchange(x);
  return me + delta < uint(metal_emu::kSimdWidth) ? e.value(me + delta) : x;
}

template <typename T>
T simd_shuffle_up(T x, ushort delta) {
  uint me = metal_emu::lane().thread_index_in_simdgroup;
  auto e = metal_emu::exchange(x);
  return me >= delta ? e.value(me - delta) : x;
}

#ifndef INFINITY
#define INFINITY __builtin_inff()
#endif

inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float log2(float x) { return __builtin_log2f(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float fabs(float x) { return __builtin_fabsf(x); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float tanh(float x) { return __builtin_tanhf(x); }
inline float pow(float x, float y) { return __builtin_powf(x, y); }

template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}

namespace fast {  // host libm for both: no ulp bounds modelled
using namespace metal;
}
namespace precise {
using namespace metal;
}

}  // namespace metal

using namespace metal;

// Address spaces: one flat memory on the CPU. Threadgroup memory is a static, shared by the
// lanes of the one threadgroup that runs at a time (and left over from the previous one).
#define device
#define constant
#define thread
#define threadgroup static
