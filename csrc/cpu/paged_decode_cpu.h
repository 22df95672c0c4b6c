// Decode attention of DuoAttention retrieval heads over their whole paged cache, on CPU.
//
// Torch-free: plain pointers and element strides; the launcher in paged_decode_cpu.cpp
// checks every argument and this file assumes they hold.
//
// The cache is vLLM's CPU layout for its "vec"/"vec16" kernels, which vLLM's own cache write
// (cpu_attn_reshape_and_cache) fills: per block and head one page of block_size * D keys
// stored transposed ([D][block_size]), then block_size * D values as rows ([block_size][D]).
// Transposed keys let the scores of a lane's worth of keys come out of one FMA per
// dimension, with no horizontal sums; the G query heads of a KV head (GQA) share every key
// and value load.
//
// Semantics: request r has one query (token r), at the last of its seq_len positions; it
// attends to all seq_len positions, which are all in the cache (vLLM writes the step's key
// before the attention runs). fp32 arithmetic with an online softmax. Long contexts are cut
// into parts that run in parallel (split-KV), each leaving (max, sum, unnormalised output)
// for a combine pass, so one request with few heads still uses every core.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

namespace duo_cpu {

struct PagedDecodeArgs {
  const void* query;  // [>= num_reqs, num_kv_heads, group, head_size]
  int64_t q_token, q_head, q_group;
  const void* cache;  // [num_blocks, run_heads, block_size, 2 * head_size] pages
  int64_t c_block, c_head;
  const int64_t* heads;        // [run_heads]: run head i is the layer's KV head heads[i]
  const int32_t* block_table;  // [num_reqs, max_blocks]
  int64_t bt_row;
  const int32_t* seq_lens;  // [num_reqs]
  void* out;                // [>= num_reqs, num_kv_heads, group, head_size]
  int64_t o_token, o_head, o_group;
  int64_t num_reqs, run_heads, group, head_size, block_size;
  float scale;
};

// Query rows of one KV head that share each key/value load (GQA groups above this are cut
// into several row groups), and keys per softmax update.
constexpr int kMaxRows = 8;
constexpr int64_t kScoreChunk = 128;

// Rows [row0, row0 + rows) of run head `run_head` of request `req`, keys [begin, end);
// `slot` is where its partial result goes (one per item: a combine pass writes `out`).
struct DecodeItem {
  int64_t req, run_head, row0, rows, begin, end, slot;
};

// A split context's partial result per row: running max, running sum, then D floats of
// unnormalised output.
inline int64_t partial_floats(int64_t head_size) { return kMaxRows * (head_size + 2); }

// Key vectors (of kLanes keys) scored per pass and value vectors accumulated per pass:
// the accumulators of NR rows stay in the 16 (AVX2) or 32 (AVX-512) vector registers.
template <int NR>
constexpr int kKeyVecs = NR <= 4 ? 2 : 1;
template <int NR>
constexpr int kValueVecs = NR <= 4 ? 2 : 1;

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

// Loads kLanes cache elements as fp32: `Load` is load_bf16 / loadv or the launcher's
// conversion for other dtypes.
template <int NR, typename T, typename Load>
void decode_item(const PagedDecodeArgs& a, const DecodeItem& it, const Load& load, float* q,
                 float* acc, float* scores, float* partial) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int KV = kKeyVecs<NR>, VV = kValueVecs<NR>;
  const int64_t D = a.head_size, BS = a.block_size, head = a.heads[it.run_head];
  const T* query = static_cast<const T*>(a.query);
  const T* cache = static_cast<const T*>(a.cache);
  for (int r = 0; r < NR; ++r) {
    const T* src = query + it.req * a.q_token + head * a.q_head + (it.row0 + r) * a.q_group;
    for (int64_t d = 0; d < D; d += kLanes) storev(q + r * D + d, load(src + d) * a.scale);
  }
  std::fill(acc, acc + NR * D, 0.0f);
  float running_max[NR], running_sum[NR];
  std::fill(running_max, running_max + NR, kNegInf);
  std::fill(running_sum, running_sum + NR, 0.0f);
  const bool value_pairs = D % (VV * kLanes) == 0;
  vi lane_index;
  for (int i = 0; i < kLanes; ++i) lane_index[i] = i;

  for (int64_t pos = it.begin; pos < it.end;) {
    const int64_t offset = pos % BS;
    const int64_t count = std::min({kScoreChunk, BS - offset, it.end - pos});
    const int64_t block = a.block_table[it.req * a.bt_row + pos / BS];
    const T* keys_t = cache + block * a.c_block + it.run_head * a.c_head + offset;
    const T* values = cache + block * a.c_block + it.run_head * a.c_head + BS * D + offset * D;
    // Where the keys after this chunk are: later in this page or the next block's page.
    const T* next_keys_t = nullptr;
    if (offset + count < BS) {
      next_keys_t = keys_t + count;
    } else if (pos + count < it.end) {
      next_keys_t = cache + a.block_table[it.req * a.bt_row + pos / BS + 1] * a.c_block +
                    it.run_head * a.c_head;
    }
    // Scores: rows x keys, a pass of KV key vectors at a time. Lanes past `count` read
    // neighbouring cache elements (inside the page: keys are followed by values) and are
    // masked to -inf below. Loop bounds are compile-time constants so that the
    // accumulators stay in registers.
    //
    // A pass reads one short piece of each of the D rows of transposed keys, a stride the
    // hardware prefetcher does not follow; each pass therefore prefetches the keys two
    // passes ahead (into L1) and the value rows of its own keys (into L2, read after the
    // softmax), one line per dimension.
    const int64_t key_vecs = (count + kLanes - 1) / kLanes;
    constexpr int64_t kLine = 64;
    const int64_t row_lines = (D * static_cast<int64_t>(sizeof(T)) + kLine - 1) / kLine;
    for (int64_t kv0 = 0; kv0 < key_vecs; kv0 += KV) {
      vf s[NR][KV] = {};
      const T* column = keys_t + kv0 * kLanes;
      const int64_t ahead = (kv0 + 2 * KV) * kLanes;
      const T* keys_ahead = ahead < count ? keys_t + ahead
                            : next_keys_t != nullptr ? next_keys_t + (ahead - count)
                                                     : nullptr;
      const char* value_lines = reinterpret_cast<const char*>(values + kv0 * kLanes * D);
      const int64_t pass_keys = std::min<int64_t>(KV * kLanes, count - kv0 * kLanes);
      const int64_t value_line_count = pass_keys * row_lines;
      for (int64_t d = 0; d < D; ++d) {
        if (keys_ahead != nullptr) __builtin_prefetch(keys_ahead + d * BS, 0, 3);
        if (d < value_line_count) {
          const int64_t key = d / row_lines, line = d % row_lines;
          __builtin_prefetch(value_lines + key * D * static_cast<int64_t>(sizeof(T)) +
                                 line * kLine, 0, 2);
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
    // Online softmax over the chunk: probabilities replace the scores in place.
    for (int r = 0; r < NR; ++r) {
      float* row = scores + r * kScoreChunk;
      vf chunk_max = vf{} + kNegInf;
      for (int64_t v = 0; v < key_vecs; ++v) {
        const vi lane = lane_index + static_cast<int32_t>(v * kLanes);
        const vf x = lane < static_cast<int32_t>(count) ? loadv(row + v * kLanes) : vf{} + kNegInf;
        storev(row + v * kLanes, x);
        chunk_max = maxv(chunk_max, x);
      }
      const float new_max = std::max(running_max[r], hmax(chunk_max));
      const float rescale = exp_nonpositive(running_max[r] - new_max);
      vf total = {};
      for (int64_t v = 0; v < key_vecs; ++v) {
        const vf p = expv_nonpositive(loadv(row + v * kLanes) - new_max);
        storev(row + v * kLanes, p);
        total += p;
      }
      running_max[r] = new_max;
      running_sum[r] = running_sum[r] * rescale + hsum(total);
      if (rescale != 1.0f) {
        float* acc_row = acc + r * D;
        for (int64_t d = 0; d < D; d += kLanes) storev(acc_row + d, loadv(acc_row + d) * rescale);
      }
    }
    if (value_pairs) {
      accumulate_values<NR, VV>(values, scores, count, D, load, acc);
    } else {
      accumulate_values<NR, 1>(values, scores, count, D, load, acc);
    }
    pos += count;
  }
  // Partial results for the combine pass: [max, sum, D outputs] per row.
  for (int r = 0; r < NR; ++r) {
    float* dst = partial + r * (D + 2);
    dst[0] = running_max[r];
    dst[1] = running_sum[r];
    std::copy(acc + r * D, acc + (r + 1) * D, dst + 2);
  }
}

// Work items of a step: per request, run head and row group, its context cut into `parts`
// pieces of at least `min_part` keys, enough pieces for about `target_items` items in all.
inline std::vector<DecodeItem> decode_items(const PagedDecodeArgs& a, int64_t target_items,
                                            int64_t min_part) {
  const int64_t row_groups = (a.group + kMaxRows - 1) / kMaxRows;
  const int64_t units = a.num_reqs * a.run_heads * row_groups;
  const int64_t wanted = std::max<int64_t>(1, (target_items + units - 1) / std::max<int64_t>(units, 1));
  std::vector<DecodeItem> items;
  int64_t slot = 0;
  for (int64_t r = 0; r < a.num_reqs; ++r) {
    const int64_t len = a.seq_lens[r];
    const int64_t parts = std::clamp<int64_t>(len / min_part, 1, wanted);
    const int64_t per_part = (len + parts - 1) / parts;
    for (int64_t h = 0; h < a.run_heads; ++h) {
      for (int64_t g = 0; g < row_groups; ++g) {
        const int64_t row0 = g * kMaxRows, rows = std::min<int64_t>(kMaxRows, a.group - row0);
        for (int64_t p = 0; p < parts; ++p) {
          const int64_t begin = p * per_part, end = std::min(len, begin + per_part);
          if (begin < end) items.push_back({r, h, row0, rows, begin, end, slot++});
        }
      }
    }
  }
  return items;
}

// Dispatches on the item's row count (a template parameter, so accumulators live in
// registers).
template <typename T, typename Load>
void decode_rows(const PagedDecodeArgs& a, const DecodeItem& it, const Load& load, float* q,
                 float* acc, float* scores, float* partial) {
  switch (it.rows) {
#define DUO_ROWS(n) \
  case n:           \
    return decode_item<n, T>(a, it, load, q, acc, scores, partial);
    DUO_ROWS(1) DUO_ROWS(2) DUO_ROWS(3) DUO_ROWS(4) DUO_ROWS(5) DUO_ROWS(6) DUO_ROWS(7)
    DUO_ROWS(8)
#undef DUO_ROWS
  }
}

// Output rows from the partial results of the items [first, last) that share one request,
// run head and row group: softmax-weighted sum of the parts.
template <typename T, typename FromFloat>
void combine_parts(const PagedDecodeArgs& a, const std::vector<DecodeItem>& items, int64_t first,
                   int64_t last, const float* partials, const FromFloat& from_float) {
  const int64_t D = a.head_size, stride = partial_floats(D);
  const DecodeItem& it = items[first];
  T* out = static_cast<T*>(a.out);
  const int64_t head = a.heads[it.run_head];
  std::vector<float> row(D);
  for (int64_t r = 0; r < it.rows; ++r) {
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t i = first; i < last; ++i)
      max = std::max(max, partials[items[i].slot * stride + r * (D + 2)]);
    float sum = 0.0f;
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t i = first; i < last; ++i) {
      const float* part = partials + items[i].slot * stride + r * (D + 2);
      const float weight = exp_nonpositive(part[0] - max);
      sum += part[1] * weight;
      for (int64_t d = 0; d < D; ++d) row[d] += part[2 + d] * weight;
    }
    const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* dst = out + it.req * a.o_token + head * a.o_head + (it.row0 + r) * a.o_group;
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float(row[d] * inverse);
  }
}

}  // namespace duo_cpu
