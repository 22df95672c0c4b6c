// Causal attention of DuoAttention retrieval heads over their whole paged cache, on CPU:
// decode queries and prefill chunks in one call.
//
// Torch-free: plain pointers and element strides; the launcher in paged_attention_cpu.cpp
// checks every argument and this file assumes they hold.
//
// The cache is vLLM's CPU layout for its "vec"/"vec16" kernels, which vLLM's own cache write
// (cpu_attn_reshape_and_cache) fills: per block and head one page of block_size * D keys
// stored transposed ([D][block_size]), then block_size * D values as rows ([block_size][D]).
// Transposed keys give the scores of a vector of keys from one FMA per dimension, with no
// horizontal sums; the rows of a tile (query positions x the G query heads of a KV head)
// share every key and value load.
//
// Semantics: request r's n queries (tokens query_start_loc[r]..) sit at the last n of its
// seq_len positions; the query at position p attends to keys 0..p, all of them in the cache
// (vLLM writes the step's keys before the attention runs). fp32 arithmetic with an online
// softmax. A work item is a block of queries of one request and head: its queries,
// scores and accumulators stay in L2 while the keys stream past. A decode query's long
// context is cut into parts that run in parallel (split-KV), each leaving (max, sum,
// unnormalised output) for a combine pass, so one request with few heads uses every core.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

namespace duo_cpu {

struct PagedAttentionArgs {
  const void* query;  // [num_tokens, num_kv_heads, group, head_size]
  int64_t q_token, q_head, q_group;
  const void* cache;  // [num_blocks, run_heads, block_size, 2 * head_size] pages
  int64_t c_block, c_head;
  const int64_t* heads;        // [run_heads]: run head i is the layer's KV head heads[i]
  const int32_t* block_table;  // [num_reqs, max_blocks]
  int64_t bt_row;
  const int32_t* query_start_loc;  // [num_reqs + 1]
  const int32_t* seq_lens;         // [num_reqs]
  void* out;                       // [num_tokens, num_kv_heads, group, head_size]
  int64_t o_token, o_head, o_group;
  int64_t num_reqs, run_heads, group, head_size, block_size;
  float scale;
};

// Rows (query positions x G heads) whose accumulators share each key/value register load,
// keys per softmax update, and the rows a work item holds (its queries, scores and
// accumulators, 3 x 64 KB at D = 128, stay in L2).
constexpr int kTileRows = 4;
constexpr int64_t kScoreChunk = 128;
constexpr int64_t kItemRows = 128;

// Queries: tokens [token0, token0 + positions) at positions pos0.. of request `req`, for
// run head `run_head`; keys [begin, end) (a causal row stops at its own position). `slot`
// is where a part of a split context leaves its partial result, -1 for an item that writes
// `out` itself.
struct WorkItem {
  int64_t req, run_head, token0, pos0, positions, begin, end, slot;
};

// Key vectors (of kLanes keys) scored per pass and value vectors accumulated per pass: with
// at most kTileRows rows, 2 x kTileRows accumulators stay in the 16 (AVX2) or 32 (AVX-512)
// vector registers.
constexpr int kKeyVecs = 2;
constexpr int kValueVecs = 2;

// Where an item's chunk of keys lives: its transposed keys and value rows, and the keys
// after it (later in this page or the next block's page; nullptr at the item's end).
template <typename T>
struct KeyChunk {
  const T* keys_t;
  const T* values;
  const T* next_keys_t;
  int64_t count;
};

// scores[NR][kScoreChunk] = q[NR][D] . keys of the chunk, KV key vectors per pass with loop
// bounds fixed at compile time so that the accumulators stay in registers. Lanes past
// `count` read neighbouring cache elements (inside the page: keys are followed by values)
// and are masked by the softmax.
//
// A pass reads a short piece of each of the D rows of transposed keys, a stride the
// hardware prefetcher does not follow; with `prefetch` set each pass therefore prefetches
// the keys two passes ahead (into L1) and the value rows of its own keys (into L2, read
// after the softmax), one line per dimension.
template <int NR, typename T, typename Load>
inline void score_tile(const float* q, int64_t D, int64_t BS, const KeyChunk<T>& chunk,
                       bool prefetch, const Load& load, float* scores) {
  constexpr int KV = kKeyVecs;
  constexpr int64_t kLine = 64;
  const int64_t key_vecs = (chunk.count + kLanes - 1) / kLanes;
  const int64_t row_lines = (D * static_cast<int64_t>(sizeof(T)) + kLine - 1) / kLine;
  for (int64_t kv0 = 0; kv0 < key_vecs; kv0 += KV) {
    vf s[NR][KV] = {};
    const T* column = chunk.keys_t + kv0 * kLanes;
    const int64_t ahead = (kv0 + 2 * KV) * kLanes;
    const T* keys_ahead = !prefetch                        ? nullptr
                          : ahead < chunk.count            ? chunk.keys_t + ahead
                          : chunk.next_keys_t != nullptr   ? chunk.next_keys_t + (ahead - chunk.count)
                                                           : nullptr;
    const char* value_lines = reinterpret_cast<const char*>(chunk.values + kv0 * kLanes * D);
    const int64_t pass_keys = std::min<int64_t>(KV * kLanes, chunk.count - kv0 * kLanes);
    const int64_t value_line_count = prefetch ? pass_keys * row_lines : 0;
    for (int64_t d = 0; d < D; ++d) {
      if (keys_ahead != nullptr) __builtin_prefetch(keys_ahead + d * BS, 0, 3);
      if (d < value_line_count) {
        const int64_t key = d / row_lines, line = d % row_lines;
        __builtin_prefetch(value_lines + key * D * static_cast<int64_t>(sizeof(T)) + line * kLine,
                           0, 2);
      }
      vf k[KV];
      for (int u = 0; u < KV; ++u) k[u] = load(column + d * BS + u * kLanes);
      for (int r = 0; r < NR; ++r) {
        const float qd = q[r * D + d];
        for (int u = 0; u < KV; ++u) s[r][u] += qd * k[u];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < KV; ++u) storev(scores + r * kScoreChunk + (kv0 + u) * kLanes, s[r][u]);
  }
}

// acc[NR][D] += P[NR][count] V[count][D]: VV value vectors of every row held in registers
// over the chunk's keys.
template <int NR, int VV, typename T, typename Load>
inline void accumulate_values(const T* values, const float* probabilities, int64_t count,
                              int64_t D, const Load& load, float* acc) {
  for (int64_t d0 = 0; d0 < D; d0 += VV * kLanes) {
    vf o[NR][VV];
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < VV; ++u) o[r][u] = loadv(acc + r * D + d0 + u * kLanes);
    for (int64_t c = 0; c < count; ++c) {
      vf v[VV];
      for (int u = 0; u < VV; ++u) v[u] = load(values + c * D + d0 + u * kLanes);
      for (int r = 0; r < NR; ++r) {
        const float p = probabilities[r * kScoreChunk + c];
        for (int u = 0; u < VV; ++u) o[r][u] += p * v[u];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < VV; ++u) storev(acc + r * D + d0 + u * kLanes, o[r][u]);
  }
}

// Scores then values of one tile of NR rows over a chunk.
template <int NR, typename T, typename Load>
struct Tile {
  static void scores(const float* q, int64_t D, int64_t BS, const KeyChunk<T>& chunk,
                     bool prefetch, const Load& load, float* scores) {
    score_tile<NR>(q, D, BS, chunk, prefetch, load, scores);
  }
  static void values(const KeyChunk<T>& chunk, const float* probabilities, int64_t D,
                     const Load& load, float* acc) {
    constexpr int VV = kValueVecs;
    if (D % (VV * kLanes) == 0) {
      accumulate_values<NR, VV>(chunk.values, probabilities, chunk.count, D, load, acc);
    } else {
      accumulate_values<NR, 1>(chunk.values, probabilities, chunk.count, D, load, acc);
    }
  }
};

// Calls Tile<nr>::fn(args...) for a runtime row count 1..kTileRows.
template <typename T, typename Load, typename Fn>
inline void with_tile(int64_t nr, Fn&& fn) {
  switch (nr) {
    case 1: fn(Tile<1, T, Load>{}); break;
    case 2: fn(Tile<2, T, Load>{}); break;
    case 3: fn(Tile<3, T, Load>{}); break;
    default: fn(Tile<4, T, Load>{}); break;
  }
}
static_assert(kTileRows == 4, "with_tile dispatches 1..4 rows");

// Per-thread buffers of the work items.
struct ItemBuffers {
  std::vector<float> q, acc, scores, running_max, running_sum;
  ItemBuffers(int64_t rows, int64_t head_size)
      : q(rows * head_size), acc(rows * head_size), scores(rows * kScoreChunk),
        running_max(rows), running_sum(rows) {}
};

// Online softmax of one row over a chunk whose first `visible` keys it sees (>= 1):
// probabilities replace the scores; returns the factor the row's accumulator must take.
inline float softmax_row(float* row, int64_t count, int64_t visible, float& running_max,
                         float& running_sum) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  vi lane_index;
  for (int i = 0; i < kLanes; ++i) lane_index[i] = i;
  const int64_t key_vecs = (count + kLanes - 1) / kLanes;
  vf chunk_max = vf{} + kNegInf;
  for (int64_t v = 0; v < key_vecs; ++v) {
    const vi lane = lane_index + static_cast<int32_t>(v * kLanes);
    const vf x = lane < static_cast<int32_t>(visible) ? loadv(row + v * kLanes) : vf{} + kNegInf;
    storev(row + v * kLanes, x);
    chunk_max = maxv(chunk_max, x);
  }
  const float new_max = std::max(running_max, hmax(chunk_max));
  const float rescale = exp_nonpositive(running_max - new_max);
  vf total = {};
  for (int64_t v = 0; v < key_vecs; ++v) {
    const vf p = expv_nonpositive(loadv(row + v * kLanes) - new_max);
    storev(row + v * kLanes, p);
    total += p;
  }
  running_max = new_max;
  running_sum = running_sum * rescale + hsum(total);
  return rescale;
}

// One work item. Writes `out` rows (slot < 0) or the item's partial result: per row
// [max, sum, D unnormalised outputs] at partials + slot * partial_stride.
template <typename T, typename Load, typename FromFloat>
void attend_item(const PagedAttentionArgs& a, const WorkItem& it, const Load& load,
                 const FromFloat& from_float, ItemBuffers& buf, float* partials,
                 int64_t partial_stride) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t D = a.head_size, BS = a.block_size, G = a.group, head = a.heads[it.run_head];
  const int64_t rows = it.positions * G;  // row = position index * G + g
  const T* query = static_cast<const T*>(a.query);
  const T* cache = static_cast<const T*>(a.cache);
  float* q = buf.q.data();
  float* acc = buf.acc.data();
  float* scores = buf.scores.data();
  float* running_max = buf.running_max.data();
  float* running_sum = buf.running_sum.data();
  for (int64_t row = 0; row < rows; ++row) {
    const T* src = query + (it.token0 + row / G) * a.q_token + head * a.q_head + (row % G) * a.q_group;
    for (int64_t d = 0; d < D; d += kLanes) storev(q + row * D + d, load(src + d) * a.scale);
  }
  std::fill(acc, acc + rows * D, 0.0f);
  std::fill(running_max, running_max + rows, kNegInf);
  std::fill(running_sum, running_sum + rows, 0.0f);

  const int64_t key_end = std::min(it.end, it.pos0 + it.positions);
  for (int64_t pos = it.begin; pos < key_end;) {
    const int64_t offset = pos % BS;
    KeyChunk<T> chunk{};
    chunk.count = std::min({kScoreChunk, BS - offset, key_end - pos});
    const T* page = cache + a.block_table[it.req * a.bt_row + pos / BS] * a.c_block +
                    it.run_head * a.c_head;
    chunk.keys_t = page + offset;
    chunk.values = page + BS * D + offset * D;
    if (offset + chunk.count < BS) {
      chunk.next_keys_t = chunk.keys_t + chunk.count;
    } else if (pos + chunk.count < key_end) {
      chunk.next_keys_t = cache + a.block_table[it.req * a.bt_row + pos / BS + 1] * a.c_block +
                          it.run_head * a.c_head;
    }
    for (int64_t t0 = 0; t0 < rows; t0 += kTileRows) {
      with_tile<T, Load>(std::min<int64_t>(kTileRows, rows - t0), [&](auto tile) {
        tile.scores(q + t0 * D, D, BS, chunk, t0 == 0, load, scores + t0 * kScoreChunk);
      });
    }
    for (int64_t row = 0; row < rows; ++row) {
      // Causal: the row at position p sees keys up to p.
      const int64_t visible = std::min(chunk.count, it.pos0 + row / G - pos + 1);
      float* p = scores + row * kScoreChunk;
      if (visible <= 0) {
        std::fill(p, p + chunk.count, 0.0f);
        continue;
      }
      const float rescale = softmax_row(p, chunk.count, visible, running_max[row], running_sum[row]);
      if (rescale != 1.0f) {
        float* acc_row = acc + row * D;
        for (int64_t d = 0; d < D; d += kLanes) storev(acc_row + d, loadv(acc_row + d) * rescale);
      }
    }
    for (int64_t t0 = 0; t0 < rows; t0 += kTileRows) {
      with_tile<T, Load>(std::min<int64_t>(kTileRows, rows - t0), [&](auto tile) {
        tile.values(chunk, scores + t0 * kScoreChunk, D, load, acc + t0 * D);
      });
    }
    pos += chunk.count;
  }
  if (it.slot >= 0) {
    for (int64_t row = 0; row < rows; ++row) {
      float* dst = partials + it.slot * partial_stride + row * (D + 2);
      dst[0] = running_max[row];
      dst[1] = running_sum[row];
      std::copy(acc + row * D, acc + (row + 1) * D, dst + 2);
    }
    return;
  }
  T* out = static_cast<T*>(a.out);
  for (int64_t row = 0; row < rows; ++row) {
    const float inverse = running_sum[row] > 0.0f ? 1.0f / running_sum[row] : 0.0f;
    T* dst = out + (it.token0 + row / G) * a.o_token + head * a.o_head + (row % G) * a.o_group;
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float(acc[row * D + d] * inverse);
  }
}

// The work of a step: `items`, and for each split decode query the range [first, last) of
// its parts in `items`.
struct WorkPlan {
  std::vector<WorkItem> items;
  std::vector<std::pair<int64_t, int64_t>> splits;
  int64_t partial_slots = 0;
};

// Prefill chunks in blocks of about kItemRows rows; decode queries whole, or cut into parts
// of at least `min_part` keys when there are fewer than `target_items` items.
inline WorkPlan plan_work(const PagedAttentionArgs& a, int64_t target_items, int64_t min_part) {
  WorkPlan plan;
  const int64_t block_positions = std::max<int64_t>(1, kItemRows / a.group);
  int64_t units = 0;
  for (int64_t r = 0; r < a.num_reqs; ++r) {
    const int64_t n = a.query_start_loc[r + 1] - a.query_start_loc[r];
    units += a.run_heads * ((n + block_positions - 1) / block_positions);
  }
  const int64_t wanted = std::max<int64_t>(1, (target_items + units - 1) / std::max<int64_t>(units, 1));
  for (int64_t r = 0; r < a.num_reqs; ++r) {
    const int64_t token0 = a.query_start_loc[r], n = a.query_start_loc[r + 1] - token0;
    const int64_t len = a.seq_lens[r], first = len - n;
    for (int64_t h = 0; h < a.run_heads; ++h) {
      if (n == 1) {
        const int64_t parts = std::clamp<int64_t>(len / min_part, 1, wanted);
        if (parts > 1) {
          const int64_t per_part = (len + parts - 1) / parts;
          const int64_t begin_index = static_cast<int64_t>(plan.items.size());
          for (int64_t begin = 0; begin < len; begin += per_part)
            plan.items.push_back({r, h, token0, first, 1, begin, std::min(len, begin + per_part),
                                  plan.partial_slots++});
          plan.splits.emplace_back(begin_index, static_cast<int64_t>(plan.items.size()));
          continue;
        }
      }
      for (int64_t i = 0; i < n; i += block_positions) {
        const int64_t positions = std::min(block_positions, n - i);
        plan.items.push_back({r, h, token0 + i, first + i, positions, 0, first + i + positions, -1});
      }
    }
  }
  return plan;
}

// Output rows of a split decode query from its parts' partial results: the softmax-weighted
// sum of the parts.
template <typename T, typename FromFloat>
void combine_parts(const PagedAttentionArgs& a, const WorkPlan& plan, int64_t first, int64_t last,
                   const float* partials, int64_t partial_stride, const FromFloat& from_float) {
  const int64_t D = a.head_size;
  const WorkItem& it = plan.items[first];
  T* out = static_cast<T*>(a.out);
  const int64_t head = a.heads[it.run_head];
  std::vector<float> row(D);
  for (int64_t g = 0; g < a.group; ++g) {
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t i = first; i < last; ++i)
      max = std::max(max, partials[plan.items[i].slot * partial_stride + g * (D + 2)]);
    float sum = 0.0f;
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t i = first; i < last; ++i) {
      const float* part = partials + plan.items[i].slot * partial_stride + g * (D + 2);
      const float weight = exp_nonpositive(part[0] - max);
      sum += part[1] * weight;
      for (int64_t d = 0; d < D; ++d) row[d] += part[2 + d] * weight;
    }
    const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* dst = out + it.token0 * a.o_token + head * a.o_head + g * a.o_group;
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float(row[d] * inverse);
  }
}

}  // namespace duo_cpu
