#pragma once

// A CPU stand-in for ggml-cuda's common.cuh, just enough to compile the HLWQ kernels (hlwq.cuh, hlwq-kv.cu,
// mmvq-hlwq.cu) with g++ and run them: every CUDA thread of a block is a std::thread, __syncthreads and
// __syncwarp are barriers, and warp shuffles exchange through a per-warp slot array. The kernels' own source is
// compiled unchanged, except that tests/test_cuda_emulated.py rewrites `k<<<grid, block, shmem, stream>>>(args)`
// into emu_launch(grid, block, shmem, stream, k, args). It checks indexing, arithmetic and synchronisation
// structure, not timing, coalescing or what a real GPU's memory model allows.

#include <barrier>
#include <xmmintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "ggml.h"
#define GGML_COMMON_DECL_CPP
#define GGML_COMMON_IMPL_CPP
#include "ggml-common.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define WARP_SIZE 32
#define MIN(a, b) ((a) < (b) ? (a) : (b))

typedef _Float16 half;
typedef void * cudaStream_t;

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
struct uint3 { unsigned x, y, z; };
struct float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
struct uint2 { unsigned x, y; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
struct int2 { int x, y; };
inline int2 make_int2(int x, int y) { return {x, y}; }

// PRMT: byte n of the result is byte (s >> 4n) & 7 of y:x
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t v = (uint64_t) y << 32 | x;
    uint32_t r = 0;
    for (int n = 0; n < 4; ++n) {
        r |= (uint32_t) ((v >> 8*((s >> 4*n) & 7)) & 0xFF) << 8*n;
    }
    return r;
}
// bytewise a - b, each byte modulo 256
inline uint32_t __vsub4(uint32_t a, uint32_t b) {
    uint32_t r = 0;
    for (int n = 0; n < 4; ++n) {
        r |= (uint32_t) (uint8_t) ((a >> 8*n) - (b >> 8*n)) << 8*n;
    }
    return r;
}
inline int ggml_cuda_dp4a(int a, int b, int c) {
    for (int n = 0; n < 4; ++n) {
        c += (int8_t) (a >> 8*n)*(int8_t) (b >> 8*n);
    }
    return c;
}

struct emu_block {
    explicit emu_block(int nthreads) : bar(nthreads) {
        for (int w = 0; w*WARP_SIZE < nthreads; ++w) {
            const int n = nthreads - w*WARP_SIZE < WARP_SIZE ? nthreads - w*WARP_SIZE : WARP_SIZE;
            warp_bars.emplace_back(std::make_unique<std::barrier<>>(n));
            slots.emplace_back(WARP_SIZE);
        }
    }
    std::barrier<> bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    std::vector<std::vector<uint64_t>> slots;
};

inline thread_local dim3 emu_threadIdx, emu_blockIdx, emu_blockDim, emu_gridDim;
inline thread_local emu_block * emu_current_block = nullptr;
inline thread_local int emu_tid = 0;

#define threadIdx emu_threadIdx
#define blockIdx  emu_blockIdx
#define blockDim  emu_blockDim
#define gridDim   emu_gridDim

inline void __syncthreads() { emu_current_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffff) { emu_current_block->warp_bars[emu_tid/WARP_SIZE]->arrive_and_wait(); }
inline void ggml_cuda_syncwarp() { __syncwarp(); }
inline void ggml_cuda_pdl_sync() {}

template <typename T>
inline T emu_exchange(T v, int src_lane) {
    const int w = emu_tid/WARP_SIZE;
    const int lane = emu_tid % WARP_SIZE;
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    emu_current_block->slots[w][lane] = bits;
    emu_current_block->warp_bars[w]->arrive_and_wait();
    const uint64_t other = emu_current_block->slots[w][src_lane];
    emu_current_block->warp_bars[w]->arrive_and_wait();
    T r;
    memcpy(&r, &other, sizeof(T));
    return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = WARP_SIZE) {
    (void) width;
    return emu_exchange(v, (emu_tid % WARP_SIZE) ^ lane_mask);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = WARP_SIZE) {
    const int lane = emu_tid % WARP_SIZE;
    return emu_exchange(v, (lane & ~(width - 1)) + src_lane % width);
}

template <int width = WARP_SIZE, typename T>
inline T warp_reduce_sum(T x) {
    for (int offset = width/2; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, offset, width);
    }
    return x;
}
template <int width = WARP_SIZE>
inline float warp_reduce_max(float x) {
    for (int offset = width/2; offset > 0; offset >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset, width));
    }
    return x;
}

// ggml-cuda builds with -use_fast_math, and nvcc then fuses a plain a*b + c into one rounding; the emulator is
// compiled with -mfma -ffp-contract=fast so that GCC does the same, and its threads flush denormals as -ftz does
// (emu_launch). The __f*_rn operations are never fused: the empty asm makes each result opaque to GCC.
inline float emu_rounded(float x) { asm("" : "+x"(x)); return x; }
inline float __fmul_rn(float a, float b) { return emu_rounded(a*b); }
inline float __fadd_rn(float a, float b) { return emu_rounded(a + b); }
inline float __fsub_rn(float a, float b) { return emu_rounded(a - b); }
inline float __fdiv_rn(float a, float b) { return emu_rounded(a/b); }
inline float __fsqrt_rn(float a) { return emu_rounded(sqrtf(a)); }
inline float __half2float(half h) { return (float) h; }
inline half  __float2half(float f) { return (half) f; }

template <typename T, typename S> inline T ggml_cuda_cast(S v) { return static_cast<T>(v); }
template <int nbytes, int alignment = 0> inline void ggml_cuda_memcpy_1(void * dst, const void * src) { memcpy(dst, src, nbytes); }

inline uint3 init_fastdiv_values(uint64_t d) { return {0u, 0u, (unsigned) d}; }
inline uint32_t fastdiv(uint32_t n, const uint3 d) { return n / d.z; }
inline uint32_t fastmodulo(uint32_t n, const uint3 d) { return n % d.z; }
inline uint2 fast_div_modulo(uint32_t n, const uint3 d) { return {n / d.z, n % d.z}; }

static constexpr bool ggml_cuda_type_is_hlwq(ggml_type type) {
    return type >= GGML_TYPE_HLWQ3 && type <= GGML_TYPE_HLWQ6_B;
}

struct ggml_cuda_pool {};
template <typename T>
struct ggml_cuda_pool_alloc {
    std::vector<T> data;
    explicit ggml_cuda_pool_alloc(ggml_cuda_pool &) {}
    ggml_cuda_pool_alloc(ggml_cuda_pool &, size_t n) : data(n) {}
    T * alloc(size_t n) { data.resize(n); return data.data(); }
    T * get() { return data.data(); }
};
struct ggml_backend_cuda_context {
    ggml_cuda_pool pool_;
    cudaStream_t stream() { return nullptr; }
    ggml_cuda_pool & pool() { return pool_; }
};

// one block at a time, each of its CUDA threads a std::thread; a thread that returns leaves the barriers
template <typename Kernel, typename... Args>
void emu_launch(dim3 grid, dim3 block, size_t, cudaStream_t, Kernel kernel, Args... args) {
    const int n = block.x*block.y*block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
        emu_block state(n);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; ++t) {
            threads.emplace_back([&, t] {
                _mm_setcsr(_mm_getcsr() | 0x8040); // flush-to-zero and denormals-are-zero, as -ftz=true
                emu_tid = t;
                emu_threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x*block.y));
                emu_blockIdx = dim3(bx, by, bz);
                emu_blockDim = block;
                emu_gridDim = grid;
                emu_current_block = &state;
                kernel(args...);
                state.bar.arrive_and_drop();
                state.warp_bars[t/WARP_SIZE]->arrive_and_drop();
            });
        }
        for (auto & thread : threads) {
            thread.join();
        }
    }
}
