// Sink+window attention and the cache write of DuoAttention streaming heads on CPU.
//
// Torch-free: plain pointers and element strides, templated on the storage types and their
// conversions to/from float (the launcher in sink_window_cpu.cpp supplies them). The
// launcher checks every argument; this file assumes they hold.
//
// fp8 caches (vLLM's --kv-cache-dtype fp8/fp8_e4m3/fp8_e5m2) hold bytes with one scale per
// tensor: a byte b stands for fp8(b) * scale. The store quantises exactly as vLLM's CPU
// backend does for the retrieval heads of the same layer (quantize_fp8 below), and the
// attention reads the step's own keys/values through the same quantisation, so a streaming
// head sees the same values whether a key comes from the cache or from the step (results
// do not depend on how the scheduler cuts chunks).
//
// Semantics (DESIGN.md section 3): request r's chunk of n queries sits at the last n
// positions of its seq_len tokens; the query at position p of a streaming head attends to
// keys j <= p with j < sink or j > p - recent. Keys of the chunk itself (j >= seq_len - n)
// come from the step's new keys/values, older ones from the paged cache, whose blocks for
// chunk tokens that leave the window within the step may not exist. Work per query is
// O(sink + recent), in fp32 with an online softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec.h"

namespace duo_cpu {

// Element strides of every tensor; the last (head_size) dimension is contiguous.
struct SinkWindowArgs {
  const void* query;  // [num_tokens, num_kv_heads, group, head_size]
  int64_t q_token, q_head, q_group;
  const void* key_cache;  // [num_blocks, block_size, run_heads, head_size]
  int64_t k_block, k_slot, k_head;
  const void* value_cache;  // same shape as key_cache
  int64_t v_block, v_slot, v_head;
  const void* new_keys;  // [num_tokens, num_kv_heads, head_size]
  int64_t nk_token, nk_head;
  const void* new_values;
  int64_t nv_token, nv_head;
  bool step_by_run_head;  // new_keys/new_values are [num_tokens, run_heads, head_size]
  const int64_t* heads;  // [run_heads]: run head i is the layer's KV head heads[i]
  const int32_t* block_table;  // [num_reqs, max_blocks]
  int64_t bt_row, max_blocks, num_blocks;
  const int32_t* query_start_loc;  // [num_reqs + 1]
  const int32_t* seq_lens;         // [num_reqs]
  void* out;  // [num_tokens, num_kv_heads, group, head_size]
  int64_t o_token, o_head, o_group;
  int64_t num_reqs, num_tokens, run_heads, group, head_size, block_size, sink, recent;
  float scale;
};

// Keys scored per softmax update, and queries of one request that share their key loads:
// a tile's scores, key rows and accumulators stay in L1/L2.
constexpr int64_t kKeyChunk = 32;
constexpr int64_t kQueryTile = 16;
// From this many query rows (queries x G) on, transposing a chunk's keys pays for itself.
constexpr int64_t kTransposeRows = 16;

// ---------------------------------------------------------------------------------------
// fp8 encodings and vLLM's CPU quantisation rule.
//
// vLLM's CPU wheel ships no C++ source; the rule was determined by writing known values with
// its cpu_attn_reshape_and_cache and reading the bytes back (tests/test_fp8.py checks this
// code against that op bit for bit, and vllm_duo/kernels/fp8.py::quantize_cpu is the same
// rule in torch): v = x * (1 / scale) in float32, truncated toward zero to the fp8 grid,
// |v| beyond the largest finite value saturates to it, NaN becomes +max, and an input of
// exactly zero (either sign) is stored as +0. Subnormals: e5m2 truncates them too; e4m3
// truncates |v| + 2^-6 after rounding that sum to float32 (so a value within float32
// rounding below a subnormal grid point goes up to it).
struct Fp8Spec {
  int mantissa_bits;
  int exponent_bias;
  float max;                  // largest finite magnitude
  uint8_t max_code;           // its byte (sign bit clear)
  float subnormal_inv_step;   // 1 / (smallest subnormal): 2^(bias - 1 + mantissa_bits)
  bool e4m3;                  // e4m3fn: no infinities, only 0x7F/0xFF are NaN
};
constexpr Fp8Spec kFp8E4m3{3, 7, 448.0f, 0x7E, 512.0f, true};
constexpr Fp8Spec kFp8E5m2{2, 15, 57344.0f, 0x7B, 65536.0f, false};

inline uint8_t quantize_fp8(float x, float inverse_scale, const Fp8Spec& f) {
  const float v = x * inverse_scale;
  if (v == 0.0f) return 0;
  if (std::isnan(v)) return f.max_code;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const float a = std::fabs(v);
  if (a >= f.max) return sign | f.max_code;
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof(bits));
  const int exponent = static_cast<int>(bits >> 23) - 127;
  if (exponent < 1 - f.exponent_bias) {
    if (f.e4m3) {
      // |v| + 2^-6 lies in [2^-6, 2^-5]: its top 3 mantissa bits are the subnormal's; a
      // sum rounded up to 2^-5 is the smallest normal (byte 0x08).
      const float shifted = a + 0.015625f;
      uint32_t shifted_bits;
      std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
      if ((shifted_bits >> 23) != 127 - 6) return sign | 0x08;
      return sign | static_cast<uint8_t>((shifted_bits >> 20) & 0x7);
    }
    // A multiple of the smallest subnormal: the power-of-two scaling is exact and the
    // conversion to int truncates.
    return sign | static_cast<uint8_t>(static_cast<int>(a * f.subnormal_inv_step));
  }
  const uint32_t mantissa = (bits >> (23 - f.mantissa_bits)) & ((1u << f.mantissa_bits) - 1);
  return sign | static_cast<uint8_t>(((exponent + f.exponent_bias) << f.mantissa_bits) | mantissa);
}

// The value of fp8 byte b (before the scale), branch-free so that row loops vectorise: the
// byte's exponent and mantissa move into float32's fields; a subnormal (exponent 0) is read
// as the normal of exponent 1 minus that binade's base, which is exact. The NaN and
// infinity bytes, which the store never writes (it saturates), read as finite values.
template <int kMantissaBits, int kExponentBias>
inline float fp8_value(uint8_t b) {
  constexpr uint32_t kExponentMask = (1u << (7 - kMantissaBits)) - 1;
  const uint32_t exponent = (static_cast<uint32_t>(b) >> kMantissaBits) & kExponentMask;
  const uint32_t mantissa = b & ((1u << kMantissaBits) - 1);
  const uint32_t field = exponent == 0 ? 1u : exponent;
  const uint32_t bits = ((field + 127 - kExponentBias) << 23) | (mantissa << (23 - kMantissaBits));
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  // 2^(1 - bias), the smallest normal: what exponent field 1 adds that a subnormal lacks.
  constexpr float kSmallestNormal = 1.0f / static_cast<float>(1u << (kExponentBias - 1));
  value -= exponent == 0 ? kSmallestNormal : 0.0f;
  return (b & 0x80) ? -value : value;
}

// ---------------------------------------------------------------------------------------
// How the attention reads its inputs as float32 and writes its output. T is the model's
// element type (query, step keys/values, output); Cache the cache's.
//
// Rows of a cache in the model's dtype.
template <typename T, typename ToFloat, typename FromFloat>
struct PlainIo {
  using Cache = T;
  using Step = T;
  ToFloat to_float;
  FromFloat from_float;
  float query(T x) const { return to_float(x); }
  T output(float x) const { return from_float(x); }
  void cache_row(const T* src, float* dst, int64_t n, bool /*key*/) const {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]);
  }
  void step_row(const T* src, float* dst, int64_t n, bool key) const { cache_row(src, dst, n, key); }
};

// An fp8 cache: a byte b reads as fp8(b) * scale (one float32 rounding, as dequantising in
// float32 gives). The step's keys/values are read as the same bytes: the launcher quantises
// them once per call (quantize_step), as the store does, so they read back exactly as the
// cache would hold them.
template <typename T, typename ToFloat, typename FromFloat, bool kE4m3>
struct Fp8Io {
  using Cache = uint8_t;
  using Step = uint8_t;
  ToFloat to_float;
  FromFloat from_float;
  float key_scale, value_scale;
  float query(T x) const { return to_float(x); }
  T output(float x) const { return from_float(x); }
  void cache_row(const uint8_t* src, float* dst, int64_t n, bool key) const {
    const float scale = key ? key_scale : value_scale;
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      dst[d] = (kE4m3 ? fp8_value<3, 7>(src[d]) : fp8_value<2, 15>(src[d])) * scale;
    }
  }
  void step_row(const uint8_t* src, float* dst, int64_t n, bool key) const {
    cache_row(src, dst, n, key);
  }
};

// Tokens [begin, end) of the run heads' step keys/values (rows of T, layer head heads[i])
// into fp8 bytes [num_tokens, run_heads, head_size], quantised as the store quantises.
template <typename T, typename ToFloat>
void quantize_step(const SinkWindowArgs& a, const Fp8Spec& spec, float key_inverse_scale,
                   float value_inverse_scale, uint8_t* keys, uint8_t* values, int64_t begin,
                   int64_t end, ToFloat to_float) {
  const T* nk = static_cast<const T*>(a.new_keys);
  const T* nv = static_cast<const T*>(a.new_values);
  const int64_t D = a.head_size;
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t i = 0; i < a.run_heads; ++i) {
      const T* k = nk + t * a.nk_token + a.heads[i] * a.nk_head;
      const T* v = nv + t * a.nv_token + a.heads[i] * a.nv_head;
      uint8_t* kd = keys + (t * a.run_heads + i) * D;
      uint8_t* vd = values + (t * a.run_heads + i) * D;
      for (int64_t d = 0; d < D; ++d) {
        kd[d] = quantize_fp8(to_float(k[d]), key_inverse_scale, spec);
        vd[d] = quantize_fp8(to_float(v[d]), value_inverse_scale, spec);
      }
    }
  }
}

// One unit of work: queries [first_token, first_token + num_queries) of request `req`.
struct QueryTile {
  int64_t req, first_token, num_queries;
};

// The query tiles of a step, in token order.
inline std::vector<QueryTile> query_tiles(const SinkWindowArgs& a) {
  std::vector<QueryTile> tiles;
  for (int64_t r = 0; r < a.num_reqs; ++r) {
    for (int64_t t = a.query_start_loc[r]; t < a.query_start_loc[r + 1]; t += kQueryTile)
      tiles.push_back({r, t, std::min(kQueryTile, a.query_start_loc[r + 1] - t)});
  }
  return tiles;
}

// Lane blocks per chunk of keys.
constexpr int kChunkVecs = static_cast<int>(kKeyChunk) / kLanes;
static_assert(kKeyChunk % kLanes == 0, "a key chunk is whole lane blocks");

// Dot product of two fp32 rows of length n (a multiple of 16), two independent chains.
inline float dot_product(const float* a, const float* b, int64_t n) {
  vf even = {}, odd = {};
  int64_t d = 0;
  for (; d + 2 * kLanes <= n; d += 2 * kLanes) {
    even += loadv(a + d) * loadv(b + d);
    odd += loadv(a + d + kLanes) * loadv(b + d + kLanes);
  }
  for (; d < n; d += kLanes) even += loadv(a + d) * loadv(b + d);
  return hsum(even + odd);
}

// Attention of work items [begin, end) of `tiles` x run heads (item = tile * run_heads +
// run head). Returns false if a block id read from the table is out of range (its key is
// skipped and the caller reports the error).
template <typename T, typename Io>
bool sink_window_tiles(const SinkWindowArgs& a, const std::vector<QueryTile>& tiles,
                       int64_t begin, int64_t end, const Io& io) {
  using C = typename Io::Cache;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = a.group, D = a.head_size, rows_max = kQueryTile * G;
  std::vector<float> q(rows_max * D), acc(rows_max * D), scores(rows_max * kKeyChunk);
  std::vector<float> keys_t(D * kKeyChunk), key_rows(kKeyChunk * D), value_rows(kKeyChunk * D),
      key_row(D);
  std::vector<float> running_max(rows_max), running_sum(rows_max);
  std::vector<char> present(kKeyChunk);
  const T* query = static_cast<const T*>(a.query);
  const C* keys = static_cast<const C*>(a.key_cache);
  const C* values = static_cast<const C*>(a.value_cache);
  using S = typename Io::Step;
  const S* new_keys = static_cast<const S*>(a.new_keys);
  const S* new_values = static_cast<const S*>(a.new_values);
  T* out = static_cast<T*>(a.out);
  bool ok = true;
  vi lane_index;
  for (int i = 0; i < kLanes; ++i) lane_index[i] = i;

  for (int64_t item = begin; item < end; ++item) {
    const QueryTile& tile = tiles[item / a.run_heads];
    const int64_t run_head = item % a.run_heads, head = a.heads[run_head];
    const int64_t chunk_start = a.query_start_loc[tile.req];
    const int64_t chunk_len = a.query_start_loc[tile.req + 1] - chunk_start;
    const int64_t first = a.seq_lens[tile.req] - chunk_len;  // the chunk's first position
    const int64_t pos0 = first + (tile.first_token - chunk_start);  // the tile's first query
    const int64_t pos1 = pos0 + tile.num_queries - 1;               // and its last
    const int64_t rows = tile.num_queries * G;                       // row = query * G + g
    const bool transposed = rows >= kTransposeRows;

    for (int64_t i = 0; i < tile.num_queries; ++i) {
      for (int64_t g = 0; g < G; ++g) {
        const T* src =
            query + (tile.first_token + i) * a.q_token + head * a.q_head + g * a.q_group;
        float* dst = q.data() + (i * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = io.query(src[d]) * a.scale;
      }
    }
    std::fill(acc.begin(), acc.begin() + rows * D, 0.0f);
    std::fill(running_max.begin(), running_max.begin() + rows, kNegInf);
    std::fill(running_sum.begin(), running_sum.begin() + rows, 0.0f);

    // Key and value rows of positions [j0, j0 + count): from the cache through the block
    // table, or for the chunk's own positions from the step's K/V; nullptr where a block id
    // is out of range. Walks blocks incrementally: no division per key.
    const C* key_ptr[kKeyChunk];
    const C* value_ptr[kKeyChunk];
    auto locate_chunk = [&](int64_t j0, int64_t count) {
      int64_t block_index = j0 / a.block_size, offset = j0 % a.block_size;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t j = j0 + c;
        if (j >= first) {
          const int64_t row = chunk_start + j - first;
          const int64_t step_head = a.step_by_run_head ? run_head : head;
          key_ptr[c] = new_keys + row * a.nk_token + step_head * a.nk_head;
          value_ptr[c] = new_values + row * a.nv_token + step_head * a.nv_head;
        } else {
          const int64_t block = a.block_table[tile.req * a.bt_row + block_index];
          const bool valid = block >= 0 && block < a.num_blocks;
          key_ptr[c] = valid ? keys + block * a.k_block + offset * a.k_slot + run_head * a.k_head
                             : nullptr;
          value_ptr[c] = valid ? values + block * a.v_block + offset * a.v_slot +
                                     run_head * a.v_head
                               : nullptr;
        }
        if (++offset == a.block_size) {
          offset = 0;
          ++block_index;
        }
      }
      for (int64_t c = count; c < kKeyChunk; ++c) key_ptr[c] = value_ptr[c] = nullptr;
    };

    // Keys any query of the tile sees: the sinks, then the union of the tile's windows.
    const int64_t sink_end = std::min(a.sink, pos1 + 1);
    const int64_t window_start = std::max(a.sink, pos0 - a.recent + 1);
    const int64_t ranges[2][2] = {{0, sink_end}, {window_start, pos1 + 1}};
    for (int in_window = 0; in_window < 2; ++in_window) {
      const auto& range = ranges[in_window];
      for (int64_t j0 = range[0]; j0 < range[1]; j0 += kKeyChunk) {
        const int64_t count = std::min(kKeyChunk, range[1] - j0);
        // Many rows (a prefill tile): keys transposed, [D][kKeyChunk], so the score loop
        // runs over keys, contiguous, with no horizontal sums. Few rows (decode): plain key
        // rows and one dot product per row and key, which skips the transposition.
        locate_chunk(j0, count);
        for (int64_t c = 0; c < kKeyChunk; ++c) {
          const C* k = key_ptr[c];
          present[c] = k != nullptr;
          if (c < count && k == nullptr) ok = false;
          if (transposed) {
            if (k != nullptr) io.cache_row(k, key_row.data(), D, true);
            for (int64_t d = 0; d < D; ++d)
              keys_t[d * kKeyChunk + c] = k != nullptr ? key_row[d] : 0.0f;
          } else if (k != nullptr) {
            io.cache_row(k, key_rows.data() + c * D, D, true);
          }
        }
        vi present_mask[kChunkVecs];
        for (int v = 0; v < kChunkVecs; ++v) {
          int32_t lanes[kLanes];
          for (int i = 0; i < kLanes; ++i) lanes[i] = present[v * kLanes + i] ? -1 : 0;
          std::memcpy(&present_mask[v], lanes, sizeof(lanes));
        }
        for (int64_t row = 0; row < rows; ++row) {
          const float* qrow = q.data() + row * D;
          float dots[kKeyChunk] = {};
          if (transposed) {
            // Every lane block of the chunk's keys, even and odd d: independent FMA chains.
            vf even[kChunkVecs] = {}, odd[kChunkVecs] = {};
            for (int64_t d = 0; d < D; d += 2) {
              const float* k0 = keys_t.data() + d * kKeyChunk;
              const float* k1 = k0 + kKeyChunk;
              for (int v = 0; v < kChunkVecs; ++v) {
                even[v] += qrow[d] * loadv(k0 + v * kLanes);
                odd[v] += qrow[d + 1] * loadv(k1 + v * kLanes);
              }
            }
            for (int v = 0; v < kChunkVecs; ++v) storev(dots + v * kLanes, even[v] + odd[v]);
          } else {
            for (int64_t c = 0; c < count; ++c) {
              if (!present[c]) continue;
              dots[c] = dot_product(qrow, key_rows.data() + c * D, D);
            }
          }
          // The row's visible keys in this chunk form one interval [lo, hi): a sink
          // chunk shows keys up to the query, a window chunk its last `recent` keys.
          const int64_t pos = pos0 + row / G;
          const int32_t hi = static_cast<int32_t>(std::clamp<int64_t>(pos - j0 + 1, 0, count));
          const int32_t lo = in_window ? static_cast<int32_t>(std::clamp<int64_t>(
                                             pos - a.recent + 1 - j0, 0, kKeyChunk))
                                       : 0;
          const vf neg_inf = vf{} + kNegInf;
          vf s[kChunkVecs];
          vf block_max = neg_inf;
          for (int v = 0; v < kChunkVecs; ++v) {
            const vi lane = lane_index + v * kLanes;
            s[v] = (lane >= lo) & (lane < hi) & present_mask[v] ? loadv(dots + v * kLanes)
                                                                : neg_inf;
            block_max = maxv(block_max, s[v]);
          }
          float* out_p = scores.data() + row * kKeyChunk;
          const float chunk_max = std::max(running_max[row], hmax(block_max));
          if (chunk_max == kNegInf) {
            for (int v = 0; v < kChunkVecs; ++v) storev(out_p + v * kLanes, vf{});
            continue;
          }
          const float rescale = exp_nonpositive(running_max[row] - chunk_max);
          vf total = {};
          for (int v = 0; v < kChunkVecs; ++v) {
            const vf p = expv_nonpositive(s[v] - chunk_max);
            storev(out_p + v * kLanes, p);
            total += p;
          }
          running_max[row] = chunk_max;
          running_sum[row] = running_sum[row] * rescale + hsum(total);
          if (rescale != 1.0f) {
            float* acc_row = acc.data() + row * D;
            for (int64_t d = 0; d < D; d += kLanes)
              storev(acc_row + d, loadv(acc_row + d) * rescale);
          }
        }
        for (int64_t c = 0; c < count; ++c) {
          const C* v = present[c] ? value_ptr[c] : nullptr;
          float* vrow = value_rows.data() + c * D;
          if (v != nullptr) {
            io.cache_row(v, vrow, D, false);
          } else {
            std::fill(vrow, vrow + D, 0.0f);
          }
        }
        // acc += P V, in lane-wide column blocks held in registers over the keys, with four
        // partial sums so consecutive keys do not wait on each other's FMA.
        for (int64_t row = 0; row < rows; ++row) {
          const float* p = scores.data() + row * kKeyChunk;
          float* acc_row = acc.data() + row * D;
          for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
            vf part0 = {}, part1 = {}, part2 = {}, part3 = {};
            const float* vcol = value_rows.data() + d0;
            int64_t c = 0;
            for (; c + 4 <= count; c += 4) {
              part0 += p[c] * loadv(vcol + c * D);
              part1 += p[c + 1] * loadv(vcol + (c + 1) * D);
              part2 += p[c + 2] * loadv(vcol + (c + 2) * D);
              part3 += p[c + 3] * loadv(vcol + (c + 3) * D);
            }
            for (; c < count; ++c) part0 += p[c] * loadv(vcol + c * D);
            storev(acc_row + d0, loadv(acc_row + d0) + ((part0 + part1) + (part2 + part3)));
          }
        }
      }
    }
    for (int64_t i = 0; i < tile.num_queries; ++i) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = i * G + g;
        const float inv = running_sum[row] > 0.0f ? 1.0f / running_sum[row] : 0.0f;
        const float* acc_row = acc.data() + row * D;
        T* dst = out + (tile.first_token + i) * a.o_token + head * a.o_head + g * a.o_group;
        for (int64_t d = 0; d < D; ++d) dst[d] = io.output(acc_row[d] * inv);
      }
    }
  }
  return ok;
}

// The step's keys/values of the run's heads into their cache slots.
struct StoreArgs {
  const void* new_keys;  // [num_tokens, num_kv_heads, head_size]
  int64_t nk_token, nk_head;
  const void* new_values;
  int64_t nv_token, nv_head;
  const int64_t* heads;  // [run_heads]
  const int64_t* slots;  // [num_tokens]; slots below min_slot are not stored
  void* key_cache;       // [num_blocks, block_size, run_heads, head_size]
  int64_t k_block, k_slot, k_head;
  void* value_cache;
  int64_t v_block, v_slot, v_head;
  int64_t num_tokens, run_heads, head_size, block_size, num_blocks, min_slot;
};

// Stores tokens [begin, end) through `put(dst_key_row, dst_value_row, src_key_row,
// src_value_row)`, which copies or quantises one head's row pair; returns false if a slot
// lies past the cache (not stored).
template <typename Put>
bool store_rows(const StoreArgs& a, int64_t source_size, int64_t cache_size, int64_t begin,
                int64_t end, Put put) {
  bool ok = true;
  const auto* nk = static_cast<const char*>(a.new_keys);
  const auto* nv = static_cast<const char*>(a.new_values);
  auto* kc = static_cast<char*>(a.key_cache);
  auto* vc = static_cast<char*>(a.value_cache);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t slot = a.slots[t];
    if (slot < a.min_slot) continue;
    const int64_t block = slot / a.block_size, offset = slot % a.block_size;
    if (block >= a.num_blocks) {
      ok = false;
      continue;
    }
    for (int64_t i = 0; i < a.run_heads; ++i) {
      const int64_t head = a.heads[i];
      put(kc + (block * a.k_block + offset * a.k_slot + i * a.k_head) * cache_size,
          vc + (block * a.v_block + offset * a.v_slot + i * a.v_head) * cache_size,
          nk + (t * a.nk_token + head * a.nk_head) * source_size,
          nv + (t * a.nv_token + head * a.nv_head) * source_size);
    }
  }
  return ok;
}

// Rows in the cache's own dtype: a copy.
inline bool store_rows(const StoreArgs& a, int64_t element_size, int64_t begin, int64_t end) {
  const int64_t bytes = a.head_size * element_size;
  return store_rows(a, element_size, element_size, begin, end,
                    [bytes](char* k, char* v, const char* sk, const char* sv) {
                      std::memcpy(k, sk, bytes);
                      std::memcpy(v, sv, bytes);
                    });
}

// Rows of T into an fp8 cache, quantised as vLLM's CPU backend does.
template <typename T, typename ToFloat>
bool store_rows_fp8(const StoreArgs& a, const Fp8Spec& spec, float key_inverse_scale,
                    float value_inverse_scale, int64_t begin, int64_t end, ToFloat to_float) {
  const int64_t n = a.head_size;
  return store_rows(a, sizeof(T), 1, begin, end,
                    [&](char* k, char* v, const char* sk, const char* sv) {
                      auto* kd = reinterpret_cast<uint8_t*>(k);
                      auto* vd = reinterpret_cast<uint8_t*>(v);
                      const T* ks = reinterpret_cast<const T*>(sk);
                      const T* vs = reinterpret_cast<const T*>(sv);
                      for (int64_t d = 0; d < n; ++d) {
                        kd[d] = quantize_fp8(to_float(ks[d]), key_inverse_scale, spec);
                        vd[d] = quantize_fp8(to_float(vs[d]), value_inverse_scale, spec);
                      }
                    });
}

}  // namespace duo_cpu
