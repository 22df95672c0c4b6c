// Sink+window paged DECODE attention for DuoAttention streaming heads.
//
// Torch-free CUDA: kernels and the device helpers they use. The launcher
// (argument checks, planning, dispatch) is sink_window_decode.cu.
//
// One query per request at absolute position p = seq_len - 1 attends to the
// visible keys j <= p with j < S (sink) or j > p - W (the W most recent,
// itself included). They are enumerated by a logical index i in [0, n):
//   i <  n_sink : position i                      (n_sink = min(S, seq_len))
//   i >= n_sink : position win_start + i - n_sink (win_start = max(seq_len - W, S))
// so n <= S + W whatever the context length: the work is O(S + W).
//
// Grid: x = split (a contiguous range of logical keys), y = request,
//       z = KV head * group tiles + group tile (GT query heads of that KV head).
// Block: 4 warps. A warp handles KEYS_PER_WARP keys per step, HEAD / 8 lanes per
// key, each lane owning 8 consecutive head dims (one 16-byte load per 16-bit row,
// 8 bytes for fp8). Every lane keeps an online softmax (max, sum, 8 output dims
// per query head) over the keys its lane group saw; lane groups merge by
// shuffles, warps through shared memory. With several splits, each CTA writes a
// normalised partial output and its log-sum-exp; merge_splits_kernel combines.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "duo_decode_args.h"

namespace duo {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kVec = 8;  // head dims per lane
constexpr float kLog2e = 1.4426950408889634f;

// Everything a launch needs, passed by value (about 700 bytes).
struct DecodeParams {
  const void* query;
  int64_t q_stride_req;
  int64_t q_stride_head;
  void* out;
  int64_t o_stride_req;
  int64_t o_stride_head;
  const void* caches[DUO_MAX_KV_HEADS];
  int64_t cache_block_stride;
  const int32_t* block_table;
  int64_t bt_stride;
  int max_blocks;
  const int32_t* seq_lens;
  float* part_out;  // [num_reqs * num_q_heads * num_splits, HEAD] (num_splits > 1)
  float* part_lse;  // [num_reqs * num_q_heads * num_splits], log2 domain
  int num_reqs;
  int num_kv_heads;
  int group;
  int block_size_log2;
  int sink;
  int recent;
  int num_splits;
  int keys_per_split;
  int group_tiles;
  float q_scale;  // softmax scale * k_scale * log2(e): scores come out in log2 units
  float v_scale;
};

// ---------------------------------------------------------------- helpers

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;  // exp2(-inf) = +0
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t bits) {
  __half2_raw raw;
  raw.x = static_cast<unsigned short>(bits & 0xffffu);
  raw.y = static_cast<unsigned short>(bits >> 16);
  return __half22float2(__half2(raw));
}

__device__ __forceinline__ float2 bf162_bits_to_float2(uint32_t bits) {
  // bf16 is the top half of an fp32: widening is a shift, exact.
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}

// Query / output element types.
template <typename T>
struct QType;

template <>
struct QType<__half> {
  __device__ __forceinline__ static void load8(const __half* p, float (&f)[kVec]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = half2_bits_to_float2(w[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct QType<__nv_bfloat16> {
  __device__ __forceinline__ static void load8(const __nv_bfloat16* p, float (&f)[kVec]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = bf162_bits_to_float2(w[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

// KV cache element types: storage, the raw chunk one lane loads (8 elements),
// and its widening to fp32 (before the per-tensor scale, which the kernel
// folds into the query and the output).
struct KvHalf {
  using Storage = uint16_t;
  using Raw = uint4;
  __device__ __forceinline__ static void to_float(const Raw& r, float (&f)[kVec]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = half2_bits_to_float2(w[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
};

struct KvBf16 {
  using Storage = uint16_t;
  using Raw = uint4;
  __device__ __forceinline__ static void to_float(const Raw& r, float (&f)[kVec]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = bf162_bits_to_float2(w[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
};

template <__nv_fp8_interpretation_t kInterp>
struct KvFp8 {
  using Storage = uint8_t;
  using Raw = uint2;
  __device__ __forceinline__ static void to_float(const Raw& r, float (&f)[kVec]) {
    const uint32_t w[2] = {r.x, r.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // Byte 2k of the word is element 2k (little endian), the .x lane.
        const __nv_fp8x2_storage_t pair =
            static_cast<__nv_fp8x2_storage_t>((w[i] >> (16 * j)) & 0xffffu);
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, kInterp);
        const float2 t = __half22float2(__half2(h));
        f[4 * i + 2 * j] = t.x;
        f[4 * i + 2 * j + 1] = t.y;
      }
    }
  }
};

using KvE4m3 = KvFp8<__NV_E4M3>;

template <typename Raw>
__device__ __forceinline__ Raw load_raw(const void* p) {
  return __ldg(reinterpret_cast<const Raw*>(p));
}

template <typename Raw>
__device__ __forceinline__ Raw zero_raw();
template <>
__device__ __forceinline__ uint4 zero_raw<uint4>() {
  return make_uint4(0u, 0u, 0u, 0u);
}
template <>
__device__ __forceinline__ uint2 zero_raw<uint2>() {
  return make_uint2(0u, 0u);
}

// Visible keys of one decode query (see the file comment). Host and device.
struct VisibleKeys {
  int n_sink;
  int win_start;
  int n_keys;

  __host__ __device__ __forceinline__ static VisibleKeys of(int seq_len, int sink, int recent) {
    VisibleKeys v;
    if (seq_len < 0) seq_len = 0;
    v.n_sink = sink < seq_len ? sink : seq_len;
    // j > p - W with p = seq_len - 1  <=>  j >= seq_len - W; the sink part
    // already holds positions below S.
    const int w = seq_len - recent;
    v.win_start = w > sink ? w : sink;
    const int n_win = seq_len - v.win_start;
    v.n_keys = v.n_sink + (n_win > 0 ? n_win : 0);
    return v;
  }

  __host__ __device__ __forceinline__ int position(int i) const {
    return i < n_sink ? i : win_start + (i - n_sink);
  }
};

// Steps a warp takes with all their loads issued before any is used: fewer for
// wide group tiles, which hold more accumulators.
template <int GT>
struct Unroll {
  static constexpr int value = GT >= 8 ? 2 : 4;
};

// ---------------------------------------------------------------- kernels

template <typename QT, typename KV, int HEAD, int GT>
__global__ void __launch_bounds__(kThreads)
    sink_window_decode_kernel(const DecodeParams p) {
  constexpr int kLanesPerKey = HEAD / kVec;  // 8, 16, 32
  static_assert(kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "head size");
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kKeysPerStep = kWarps * kKeysPerWarp;
  constexpr int kUnroll = Unroll<GT>::value;
  using Storage = typename KV::Storage;
  using Raw = typename KV::Raw;

  __shared__ float sm_m[kWarps][GT];
  __shared__ float sm_l[kWarps][GT];
  __shared__ float sm_acc[kWarps][GT][HEAD];

  const int split = blockIdx.x;
  const int req = blockIdx.y;
  const int kv_head = blockIdx.z / p.group_tiles;
  const int g0 = (blockIdx.z - kv_head * p.group_tiles) * GT;
  const int g_count = min(GT, p.group - g0);
  const int num_q_heads = p.num_kv_heads * p.group;
  const int q_head0 = kv_head * p.group + g0;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int sub = lane % kLanesPerKey;   // which 8 head dims this lane owns
  const int slot = lane / kLanesPerKey;  // which key of the warp step

  const int block_size = 1 << p.block_size_log2;
  int seq_len = p.seq_lens[req];
  // Never index past the block table's valid columns.
  const int64_t table_tokens = static_cast<int64_t>(p.max_blocks) * block_size;
  if (seq_len > table_tokens) seq_len = static_cast<int>(table_tokens);
  const VisibleKeys vis = VisibleKeys::of(seq_len, p.sink, p.recent);
  const int begin = split * p.keys_per_split;
  const int end = min(begin + p.keys_per_split, vis.n_keys);

  // Query slice, pre-scaled so that q . k is already in log2 units.
  float q[GT][kVec];
  const QT* query = static_cast<const QT*>(p.query) + req * p.q_stride_req + sub * kVec;
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    if (g < g_count) {
      QType<QT>::load8(query + (q_head0 + g) * p.q_stride_head, q[g]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[g][e] *= p.q_scale;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[g][e] = 0.f;
    }
  }

  float m[GT], l[GT], acc[GT][kVec];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  }

  const Storage* cache = static_cast<const Storage*>(p.caches[kv_head]);
  const int32_t* table = p.block_table + req * p.bt_stride;
  const int64_t value_offset = static_cast<int64_t>(block_size) * HEAD;

  for (int base = begin; base < end; base += kKeysPerStep * kUnroll) {
    Raw kraw[kUnroll], vraw[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + (u * kWarps + warp) * kKeysPerWarp + slot;
      valid[u] = i < end;
      if (valid[u]) {
        const int pos = vis.position(i);
        const int64_t block = table[pos >> p.block_size_log2];
        const Storage* row = cache + block * p.cache_block_stride +
                             static_cast<int64_t>(pos & (block_size - 1)) * HEAD + sub * kVec;
        kraw[u] = load_raw<Raw>(row);
        vraw[u] = load_raw<Raw>(row + value_offset);
      } else {
        kraw[u] = zero_raw<Raw>();
        vraw[u] = zero_raw<Raw>();
      }
    }

    // Scores: partial dot products over 8 dims, summed across the key's lanes.
    float s[kUnroll][GT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[kVec];
      KV::to_float(kraw[u], kf);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(q[g][e], kf[e], dot);
#pragma unroll
        for (int off = kLanesPerKey / 2; off > 0; off /= 2)
          dot += __shfl_xor_sync(0xffffffffu, dot, off);
        s[u][g] = valid[u] ? dot : -INFINITY;
      }
    }

    // Online softmax over this step's keys of the lane group.
    float ref[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][g]);
      // No key seen yet: any finite reference keeps exp2 from making NaN.
      ref[g] = mx == -INFINITY ? 0.f : mx;
      const float corr = fast_exp2(m[g] - ref[g]);
      l[g] *= corr;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= corr;
      m[g] = mx;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[kVec];
      KV::to_float(vraw[u], vf);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float pr = fast_exp2(s[u][g] - ref[g]);
        l[g] += pr;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(pr, vf[e], acc[g][e]);
      }
    }
  }

  // Merge the lane groups of the warp (same dims, different keys).
#pragma unroll
  for (int off = kLanesPerKey; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float mx = fmaxf(m[g], mo);
      const float r = mx == -INFINITY ? 0.f : mx;
      const float a = fast_exp2(m[g] - r);
      const float b = fast_exp2(mo - r);
      l[g] = l[g] * a + lo * b;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        acc[g][e] = acc[g][e] * a + ao * b;
      }
      m[g] = mx;
    }
  }

  // Merge the warps through shared memory.
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sm_acc[warp][g][sub * kVec + e] = acc[g][e];
      if (sub == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < GT * HEAD; idx += kThreads) {
    const int g = idx / HEAD;
    const int d = idx % HEAD;
    if (g >= g_count) break;  // idx only grows
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    const float r = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = fast_exp2(sm_m[w][g] - r);
      lsum = fmaf(sm_l[w][g], f, lsum);
      a = fmaf(sm_acc[w][g][d], f, a);
    }
    const float o = lsum > 0.f ? a / lsum * p.v_scale : 0.f;
    const int q_head = q_head0 + g;
    if (p.num_splits == 1) {
      QT* out = static_cast<QT*>(p.out) + req * p.o_stride_req + q_head * p.o_stride_head;
      out[d] = QType<QT>::from_float(o);
    } else {
      const int64_t row =
          (static_cast<int64_t>(req) * num_q_heads + q_head) * p.num_splits + split;
      p.part_out[row * HEAD + d] = o;
      if (d == 0) p.part_lse[row] = lsum > 0.f ? r + log2f(lsum) : -INFINITY;
    }
  }
}

// Combines the splits of one (request, query head): block = kThreads threads
// over the head dims.
template <typename QT>
__global__ void __launch_bounds__(kThreads)
    merge_splits_kernel(const DecodeParams p, int head_size) {
  const int num_q_heads = p.num_kv_heads * p.group;
  const int row = blockIdx.x;  // req * num_q_heads + q_head
  const int req = row / num_q_heads;
  const int q_head = row - req * num_q_heads;
  const float* lse = p.part_lse + static_cast<int64_t>(row) * p.num_splits;
  const float* part = p.part_out + static_cast<int64_t>(row) * p.num_splits * head_size;

  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse[s]);
  const float r = mx == -INFINITY ? 0.f : mx;
  float wsum = 0.f;
  for (int s = 0; s < p.num_splits; ++s) wsum += fast_exp2(lse[s] - r);
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;

  QT* out = static_cast<QT*>(p.out) + req * p.o_stride_req + q_head * p.o_stride_head;
  for (int d = threadIdx.x; d < head_size; d += kThreads) {
    float a = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = fast_exp2(lse[s] - r);  // 0 for empty splits
      a = fmaf(w, part[static_cast<int64_t>(s) * head_size + d], a);
    }
    out[d] = QType<QT>::from_float(a * inv);
  }
}

}  // namespace duo
