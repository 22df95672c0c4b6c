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
  std::vector<float> keys_t(D * kKeyChunk), value_rows(kKeyChunk * D);
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

    // Row j of the cache (or, for the chunk's own positions, of the step's K/V); nullptr
    // when its block id is out of range.
    auto locate = [&](int64_t j, const T* cache, int64_t s_block, int64_t s_slot,
                      int64_t s_head, const T* step, int64_t s_token,
                      int64_t s_step_head) -> const T* {
      if (j >= first) return step + (chunk_start + j - first) * s_token + head * s_step_head;
      const int64_t block = a.block_table[tile.req * a.bt_row + j / a.block_size];
      if (block < 0 || block >= a.num_blocks) return nullptr;
      return cache + block * s_block + (j % a.block_size) * s_slot + run_head * s_head;
    };

    // Keys any query of the tile sees: the sinks, then the union of the tile's windows.
    const int64_t sink_end = std::min(a.sink, pos1 + 1);
    const int64_t window_start = std::max(a.sink, pos0 - a.recent + 1);
    const int64_t ranges[2][2] = {{0, sink_end}, {window_start, pos1 + 1}};
    for (const auto& range : ranges) {
      for (int64_t j0 = range[0]; j0 < range[1]; j0 += kKeyChunk) {
        const int64_t count = std::min(kKeyChunk, range[1] - j0);
        // Keys of the chunk transposed, [D][kKeyChunk], zero past `count`: the score
        // loop then runs over keys, contiguous, with no horizontal sums.
        for (int64_t c = 0; c < kKeyChunk; ++c) {
          const T* k = c < count ? locate(j0 + c, keys, a.k_block, a.k_slot, a.k_head,
                                          new_keys, a.nk_token, a.nk_head)
                                 : nullptr;
          present[c] = k != nullptr;
          if (c < count && k == nullptr) ok = false;
          for (int64_t d = 0; d < D; ++d)
            keys_t[d * kKeyChunk + c] = k != nullptr ? to_float(k[d]) : 0.0f;
        }
        for (int64_t row = 0; row < rows; ++row) {
          const float* qrow = q.data() + row * D;
          float dots[kKeyChunk] = {};
          for (int64_t d = 0; d < D; ++d) {
            const float qd = qrow[d];
            const float* kt = keys_t.data() + d * kKeyChunk;
#pragma omp simd
            for (int64_t c = 0; c < kKeyChunk; ++c) dots[c] += qd * kt[c];
          }
          const int64_t pos = pos0 + row / G;
          float* s = scores.data() + row * kKeyChunk;
          for (int64_t c = 0; c < kKeyChunk; ++c) {
            const int64_t j = j0 + c;
            const bool visible =
                present[c] && j <= pos && (j < a.sink || j > pos - a.recent);
            s[c] = visible ? dots[c] : kNegInf;
          }
        }
        for (int64_t row = 0; row < rows; ++row) {
          float* s = scores.data() + row * kKeyChunk;
          float chunk_max = running_max[row];
          for (int64_t c = 0; c < kKeyChunk; ++c) chunk_max = std::max(chunk_max, s[c]);
          if (chunk_max == kNegInf) {
            std::fill(s, s + kKeyChunk, 0.0f);
            continue;
          }
          const float rescale = exp_nonpositive(running_max[row] - chunk_max);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < kKeyChunk; ++c) {
            s[c] = exp_nonpositive(s[c] - chunk_max);
            sum += s[c];
          }
          running_max[row] = chunk_max;
          running_sum[row] = running_sum[row] * rescale + sum;
          if (rescale != 1.0f) {
            float* acc_row = acc.data() + row * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc_row[d] *= rescale;
          }
        }
        for (int64_t c = 0; c < count; ++c) {
          const T* v = present[c] ? locate(j0 + c, values, a.v_block, a.v_slot, a.v_head,
                                           new_values, a.nv_token, a.nv_head)
                                  : nullptr;
          float* vrow = value_rows.data() + c * D;
          if (v == nullptr) {
            std::fill(vrow, vrow + D, 0.0f);
            continue;
          }
          to_float_row(v, vrow, D, to_float);
        }
        // acc += P V, in 16-wide column blocks that stay in a register over the keys.
        constexpr int64_t kCols = 16;
        for (int64_t row = 0; row < rows; ++row) {
          const float* p = scores.data() + row * kKeyChunk;
          float* acc_row = acc.data() + row * D;
          for (int64_t d0 = 0; d0 < D; d0 += kCols) {
            float block[kCols];
#pragma omp simd
            for (int64_t dd = 0; dd < kCols; ++dd) block[dd] = acc_row[d0 + dd];
            for (int64_t c = 0; c < count; ++c) {
              const float weight = p[c];
              const float* vrow = value_rows.data() + c * D + d0;
#pragma omp simd
              for (int64_t dd = 0; dd < kCols; ++dd) block[dd] += weight * vrow[dd];
            }
#pragma omp simd
            for (int64_t dd = 0; dd < kCols; ++dd) acc_row[d0 + dd] = block[dd];
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
