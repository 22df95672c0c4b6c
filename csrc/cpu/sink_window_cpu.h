// Sink+window attention and the cache write of DuoAttention streaming heads on CPU.
//
// Torch-free: plain pointers and element strides, templated on the storage type and its
// conversions to/from float (the launcher in sink_window_cpu.cpp supplies them). The
// launcher checks every argument; this file assumes they hold.
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

// exp(x) for x <= 0 (scores minus their running max), vectorisable: 2^n * e^r with
// r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (relative error < 2e-7);
// below -87 the result is 0 (exp underflows float there anyway).
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const bool tiny = x < -87.0f;
  x = tiny ? -87.0f : x;
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : poly * scale;
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

// 16 fp32 lanes as a GCC/Clang vector: kept in registers (one zmm with AVX-512, split by
// the compiler on narrower ISAs). The unaligned alias type reads and writes float rows.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

inline v16 load16(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store16(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }

inline float sum16(v16 x) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[1]) + (q[2] + q[3]);
}

typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 max16(v16 a, v16 b) { return a > b ? a : b; }

inline float hmax16(v16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, x[i]);
  return m;
}

// exp of 16 lanes, each <= 0 or -inf, as exp_nonpositive below (same polynomial).
inline v16 exp16_nonpositive(v16 x) {
  const i16 tiny = x < -87.0f;
  x = max16(x, v16{} - 87.0f);
  // Round to nearest by adding and removing 1.5 * 2^23 (|x * log2e| < 2^22 here).
  const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const v16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  v16 poly = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  return reinterpret_cast<const v16&>(bits) * poly * (tiny ? 0.0f : 1.0f + v16{});
}

// Dot product of two fp32 rows of length n (a multiple of 16), two independent chains.
inline float dot_product(const float* a, const float* b, int64_t n) {
  v16 even = {}, odd = {};
  int64_t d = 0;
  for (; d + 32 <= n; d += 32) {
    even += load16(a + d) * load16(b + d);
    odd += load16(a + d + 16) * load16(b + d + 16);
  }
  if (d < n) even += load16(a + d) * load16(b + d);
  return sum16(even + odd);
}

template <typename T, typename ToFloat>
inline void to_float_row(const T* src, float* dst, int64_t n, ToFloat to_float) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]);
}

// Attention of work items [begin, end) of `tiles` x run heads (item = tile * run_heads +
// run head). Returns false if a block id read from the table is out of range (its key is
// skipped and the caller reports the error).
template <typename T, typename ToFloat, typename FromFloat>
bool sink_window_tiles(const SinkWindowArgs& a, const std::vector<QueryTile>& tiles,
                       int64_t begin, int64_t end, ToFloat to_float, FromFloat from_float) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = a.group, D = a.head_size, rows_max = kQueryTile * G;
  std::vector<float> q(rows_max * D), acc(rows_max * D), scores(rows_max * kKeyChunk);
  std::vector<float> keys_t(D * kKeyChunk), key_rows(kKeyChunk * D), value_rows(kKeyChunk * D);
  std::vector<float> running_max(rows_max), running_sum(rows_max);
  std::vector<char> present(kKeyChunk);
  const T* query = static_cast<const T*>(a.query);
  const T* keys = static_cast<const T*>(a.key_cache);
  const T* values = static_cast<const T*>(a.value_cache);
  const T* new_keys = static_cast<const T*>(a.new_keys);
  const T* new_values = static_cast<const T*>(a.new_values);
  T* out = static_cast<T*>(a.out);
  bool ok = true;

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
        for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]) * a.scale;
      }
    }
    std::fill(acc.begin(), acc.begin() + rows * D, 0.0f);
    std::fill(running_max.begin(), running_max.begin() + rows, kNegInf);
    std::fill(running_sum.begin(), running_sum.begin() + rows, 0.0f);

    // Key and value rows of positions [j0, j0 + count): from the cache through the block
    // table, or for the chunk's own positions from the step's K/V; nullptr where a block id
    // is out of range. Walks blocks incrementally: no division per key.
    const T* key_ptr[kKeyChunk];
    const T* value_ptr[kKeyChunk];
    auto locate_chunk = [&](int64_t j0, int64_t count) {
      int64_t block_index = j0 / a.block_size, offset = j0 % a.block_size;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t j = j0 + c;
        if (j >= first) {
          const int64_t row = chunk_start + j - first;
          key_ptr[c] = new_keys + row * a.nk_token + head * a.nk_head;
          value_ptr[c] = new_values + row * a.nv_token + head * a.nv_head;
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
    const i16 lane_lo = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const i16 lane_hi = lane_lo + 16;
    for (int in_window = 0; in_window < 2; ++in_window) {
      const auto& range = ranges[in_window];
      for (int64_t j0 = range[0]; j0 < range[1]; j0 += kKeyChunk) {
        const int64_t count = std::min(kKeyChunk, range[1] - j0);
        // Many rows (a prefill tile): keys transposed, [D][kKeyChunk], so the score loop
        // runs over keys, contiguous, with no horizontal sums. Few rows (decode): plain key
        // rows and one dot product per row and key, which skips the transposition.
        locate_chunk(j0, count);
        for (int64_t c = 0; c < kKeyChunk; ++c) {
          const T* k = key_ptr[c];
          present[c] = k != nullptr;
          if (c < count && k == nullptr) ok = false;
          if (transposed) {
            for (int64_t d = 0; d < D; ++d)
              keys_t[d * kKeyChunk + c] = k != nullptr ? to_float(k[d]) : 0.0f;
          } else if (k != nullptr) {
            to_float_row(k, key_rows.data() + c * D, D, to_float);
          }
        }
        i16 present_lo, present_hi;
        for (int c = 0; c < 16; ++c) {
          present_lo[c] = present[c] ? -1 : 0;
          present_hi[c] = present[c + 16] ? -1 : 0;
        }
        for (int64_t row = 0; row < rows; ++row) {
          const float* qrow = q.data() + row * D;
          float dots[kKeyChunk] = {};
          if (transposed) {
            // Keys 0-15 and 16-31, even and odd d: four independent FMA chains.
            v16 lo_even = {}, hi_even = {}, lo_odd = {}, hi_odd = {};
            for (int64_t d = 0; d < D; d += 2) {
              const float* k0 = keys_t.data() + d * kKeyChunk;
              const float* k1 = k0 + kKeyChunk;
              lo_even += qrow[d] * load16(k0);
              hi_even += qrow[d] * load16(k0 + 16);
              lo_odd += qrow[d + 1] * load16(k1);
              hi_odd += qrow[d + 1] * load16(k1 + 16);
            }
            store16(dots, lo_even + lo_odd);
            store16(dots + 16, hi_even + hi_odd);
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
          const v16 neg_inf = v16{} + kNegInf;
          v16 s0 = load16(dots), s1 = load16(dots + 16);
          s0 = (lane_lo >= lo) & (lane_lo < hi) & present_lo ? s0 : neg_inf;
          s1 = (lane_hi >= lo) & (lane_hi < hi) & present_hi ? s1 : neg_inf;
          float* out_p = scores.data() + row * kKeyChunk;
          const float chunk_max = std::max(running_max[row], hmax16(max16(s0, s1)));
          if (chunk_max == kNegInf) {
            store16(out_p, v16{});
            store16(out_p + 16, v16{});
            continue;
          }
          const float rescale = exp_nonpositive(running_max[row] - chunk_max);
          const v16 p0 = exp16_nonpositive(s0 - chunk_max), p1 = exp16_nonpositive(s1 - chunk_max);
          store16(out_p, p0);
          store16(out_p + 16, p1);
          running_max[row] = chunk_max;
          running_sum[row] = running_sum[row] * rescale + sum16(p0 + p1);
          if (rescale != 1.0f) {
            float* acc_row = acc.data() + row * D;
            for (int64_t d = 0; d < D; d += 16) store16(acc_row + d, load16(acc_row + d) * rescale);
          }
        }
        for (int64_t c = 0; c < count; ++c) {
          const T* v = present[c] ? value_ptr[c] : nullptr;
          float* vrow = value_rows.data() + c * D;
          if (v == nullptr) {
            std::fill(vrow, vrow + D, 0.0f);
            continue;
          }
          to_float_row(v, vrow, D, to_float);
        }
        // acc += P V, in 16-wide column blocks held in registers over the keys, with four
        // partial sums so consecutive keys do not wait on each other's FMA.
        constexpr int64_t kCols = 16;
        for (int64_t row = 0; row < rows; ++row) {
          const float* p = scores.data() + row * kKeyChunk;
          float* acc_row = acc.data() + row * D;
          for (int64_t d0 = 0; d0 < D; d0 += kCols) {
            v16 part0 = {}, part1 = {}, part2 = {}, part3 = {};
            const float* vcol = value_rows.data() + d0;
            int64_t c = 0;
            for (; c + 4 <= count; c += 4) {
              part0 += p[c] * load16(vcol + c * D);
              part1 += p[c + 1] * load16(vcol + (c + 1) * D);
              part2 += p[c + 2] * load16(vcol + (c + 2) * D);
              part3 += p[c + 3] * load16(vcol + (c + 3) * D);
            }
            for (; c < count; ++c) part0 += p[c] * load16(vcol + c * D);
            store16(acc_row + d0, load16(acc_row + d0) + ((part0 + part1) + (part2 + part3)));
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
        for (int64_t d = 0; d < D; ++d) dst[d] = from_float(acc_row[d] * inv);
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

// Stores tokens [begin, end); returns false if a slot lies past the cache (not stored).
inline bool store_rows(const StoreArgs& a, int64_t element_size, int64_t begin, int64_t end) {
  bool ok = true;
  const auto* nk = static_cast<const char*>(a.new_keys);
  const auto* nv = static_cast<const char*>(a.new_values);
  auto* kc = static_cast<char*>(a.key_cache);
  auto* vc = static_cast<char*>(a.value_cache);
  const int64_t bytes = a.head_size * element_size;
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
      std::memcpy(kc + (block * a.k_block + offset * a.k_slot + i * a.k_head) * element_size,
                  nk + (t * a.nk_token + head * a.nk_head) * element_size, bytes);
      std::memcpy(vc + (block * a.v_block + offset * a.v_slot + i * a.v_head) * element_size,
                  nv + (t * a.nv_token + head * a.nv_head) * element_size, bytes);
    }
  }
  return ok;
}

}  // namespace duo_cpu
