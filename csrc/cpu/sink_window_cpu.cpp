// torch binding of the CPU sink+window kernels (sink_window_cpu.h): argument checks that
// name the broken rule, dtype dispatch, at::parallel_for over the work, schemas and Meta
// impls (shape-only, so FakeTensor / torch.compile can trace the ops).
//
// Ops (namespace vllm_duo_cpu; both write in place and return nothing):
//   sink_window_attention(query[T, H, G, D], key_cache[NB, BS, R, D], value_cache,
//       heads[R] i64, block_table[N, B] i32, query_start_loc[N+1] i32, seq_lens[N] i32,
//       new_keys[T, H, D], new_values[T, H, D], sink, recent, scale, out[T, H, G, D],
//       kv_cache_dtype="auto", k_scale=1.0, v_scale=1.0)
//   store_kv(new_keys[T, H, D], new_values, heads[R] i64, slot_mapping[T] i64,
//       key_cache[NB, BS, R, D], value_cache, min_slot, kv_cache_dtype="auto", k_scale=1.0,
//       v_scale=1.0)
// H = the layer's KV heads, R = the run's heads (run head i is layer head heads[i]).
// kv_cache_dtype is vLLM's --kv-cache-dtype: "auto" (caches in the query's dtype) or
// "fp8" / "fp8_e4m3" / "fp8_e5m2" (uint8 caches, a byte b stands for fp8(b) * k/v_scale).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "sink_window_cpu.h"
#include "torch_checks.h"

namespace {

using duo_cpu::check_head_size;
using duo_cpu::check_heads;
using duo_cpu::check_index;
using duo_cpu::check_rows;
using duo_cpu::dispatch_float;

constexpr const char* kAttention = "vllm_duo_cpu.sink_window_attention";
constexpr const char* kStore = "vllm_duo_cpu.store_kv";

// The fp8 format of vLLM's --kv-cache-dtype value; nullptr for "auto".
const duo_cpu::Fp8Spec* fp8_spec(const char* op, c10::string_view kv_cache_dtype) {
  if (kv_cache_dtype == "auto") return nullptr;
  if (kv_cache_dtype == "fp8" || kv_cache_dtype == "fp8_e4m3") return &duo_cpu::kFp8E4m3;
  if (kv_cache_dtype == "fp8_e5m2") return &duo_cpu::kFp8E5m2;
  TORCH_CHECK(false, op, ": kv_cache_dtype '", kv_cache_dtype,
              "' is not supported: auto, fp8, fp8_e4m3 or fp8_e5m2");
}

void check_scale(const char* op, const char* name, double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, op, ": ", name,
              " must be a finite number > 0, got ", scale);
}

void check_cache(const char* op, const char* name, const at::Tensor& cache, const at::Tensor& like,
                 int64_t run_heads, int64_t head_size, bool fp8) {
  check_rows(op, name, cache, 4);
  if (fp8) {
    TORCH_CHECK(cache.scalar_type() == at::kByte, op, ": ", name, " dtype ",
                cache.scalar_type(), " must be uint8 for an fp8 kv_cache_dtype (vLLM's fp8 "
                "caches hold bytes)");
  } else {
    TORCH_CHECK(cache.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ",
                cache.scalar_type(), " must match the query's ", like.scalar_type(),
                " with kv_cache_dtype 'auto'");
  }
  TORCH_CHECK(cache.size(2) == run_heads && cache.size(3) == head_size, op, ": ", name,
              " must be [num_blocks, block_size, run_heads=", run_heads,
              ", head_size=", head_size, "], got ", cache.sizes());
}

void sink_window_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& heads,
                           const at::Tensor& block_table, const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens, const at::Tensor& new_keys,
                           const at::Tensor& new_values, int64_t sink, int64_t recent,
                           double scale, const at::Tensor& out, c10::string_view kv_cache_dtype,
                           double k_scale, double v_scale) {
  const char* op = kAttention;
  const duo_cpu::Fp8Spec* fp8 = fp8_spec(op, kv_cache_dtype);
  check_scale(op, "k_scale", k_scale);
  check_scale(op, "v_scale", v_scale);
  check_rows(op, "query", query, 4);
  const int64_t num_tokens = query.size(0), layer_heads = query.size(1), group = query.size(2),
                head_size = query.size(3), run_heads = key_cache.size(2);
  TORCH_CHECK(query.scalar_type() == out.scalar_type() && out.sizes() == query.sizes(), op,
              ": out must have the query's shape ", query.sizes(), " and dtype ",
              query.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type());
  check_rows(op, "out", out, 4);
  check_head_size(op, head_size);
  check_cache(op, "key_cache", key_cache, query, run_heads, head_size, fp8 != nullptr);
  check_cache(op, "value_cache", value_cache, query, run_heads, head_size, fp8 != nullptr);
  TORCH_CHECK(value_cache.size(0) == key_cache.size(0) && value_cache.size(1) == key_cache.size(1),
              op, ": value_cache ", value_cache.sizes(), " must match key_cache ",
              key_cache.sizes());
  check_heads(op, heads, run_heads, layer_heads);
  for (const auto& [name, t] : {std::pair{"new_keys", new_keys}, {"new_values", new_values}}) {
    check_rows(op, name, t, 3);
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, ": ", name, " dtype must be the "
                "query's ", query.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.size(0) == num_tokens && t.size(1) == layer_heads && t.size(2) == head_size,
                op, ": ", name, " must be [num_tokens, num_kv_heads, head_size] = [",
                num_tokens, ", ", layer_heads, ", ", head_size, "], got ", t.sizes());
  }
  TORCH_CHECK(block_table.dim() == 2, op, ": block_table must be [num_reqs, max_blocks], got ",
              block_table.sizes());
  const int64_t num_reqs = block_table.size(0);
  check_index(op, "block_table", block_table, at::kInt, {num_reqs, block_table.size(1)});
  check_index(op, "query_start_loc", query_start_loc, at::kInt, {num_reqs + 1});
  check_index(op, "seq_lens", seq_lens, at::kInt, {num_reqs});
  TORCH_CHECK(sink >= 0 && recent >= 1, op, ": need sink >= 0 and recent >= 1, got sink=",
              sink, ", recent=", recent);
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[num_reqs] <= num_tokens, op,
              ": query_start_loc must start at 0 and end at most at num_tokens=", num_tokens);
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t n = qsl[r + 1] - qsl[r];
    TORCH_CHECK(n >= 0 && n <= lens[r], op, ": request ", r, " has ", n,
                " queries but seq_len ", lens[r], " (queries are the last seq_len positions)");
    TORCH_CHECK(lens[r] - n <= block_table.size(1) * key_cache.size(1), op, ": request ", r,
                " reads ", lens[r] - n, " cached positions but its block table holds ",
                block_table.size(1) * key_cache.size(1));
  }

  duo_cpu::SinkWindowArgs a{};
  a.query = query.data_ptr();
  a.q_token = query.stride(0), a.q_head = query.stride(1), a.q_group = query.stride(2);
  a.key_cache = key_cache.data_ptr();
  a.k_block = key_cache.stride(0), a.k_slot = key_cache.stride(1), a.k_head = key_cache.stride(2);
  a.value_cache = value_cache.data_ptr();
  a.v_block = value_cache.stride(0), a.v_slot = value_cache.stride(1);
  a.v_head = value_cache.stride(2);
  a.new_keys = new_keys.data_ptr();
  a.nk_token = new_keys.stride(0), a.nk_head = new_keys.stride(1);
  a.new_values = new_values.data_ptr();
  a.nv_token = new_values.stride(0), a.nv_head = new_values.stride(1);
  a.heads = heads.data_ptr<int64_t>();
  a.block_table = block_table.data_ptr<int32_t>();
  a.bt_row = block_table.stride(0), a.max_blocks = block_table.size(1);
  a.num_blocks = key_cache.size(0);
  a.query_start_loc = qsl, a.seq_lens = lens;
  a.out = out.data_ptr();
  a.o_token = out.stride(0), a.o_head = out.stride(1), a.o_group = out.stride(2);
  a.num_reqs = num_reqs, a.num_tokens = qsl[num_reqs], a.run_heads = run_heads;
  a.group = group, a.head_size = head_size, a.block_size = key_cache.size(1);
  a.sink = sink, a.recent = recent, a.scale = static_cast<float>(scale);

  std::atomic<bool> ok{true};
  const std::vector<duo_cpu::QueryTile> tiles = duo_cpu::query_tiles(a);
  const int64_t items = static_cast<int64_t>(tiles.size()) * run_heads;
  const float k_scale_f = static_cast<float>(k_scale), v_scale_f = static_cast<float>(v_scale);
  dispatch_float(op, query.scalar_type(), [&](auto tag, auto to_float, auto from_float) {
    using T = decltype(tag);
    using ToFloat = decltype(to_float);
    using FromFloat = decltype(from_float);
    if (fp8 == nullptr) {
      const duo_cpu::PlainIo<T, ToFloat, FromFloat> io{to_float, from_float};
      at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        if (!duo_cpu::sink_window_tiles<T>(a, tiles, begin, end, io)) ok = false;
      });
      return;
    }
    // The step's keys/values of the run heads, quantised once here rather than at every
    // read (a prefill chunk's keys are read by every tile whose window covers them).
    const int64_t step_tokens = a.num_tokens;
    std::vector<uint8_t> step(2 * step_tokens * run_heads * head_size);
    uint8_t* step_keys = step.data();
    uint8_t* step_values = step_keys + step_tokens * run_heads * head_size;
    // The reciprocals the store multiplies by (vLLM's CPU backend rounds 1 / scale to
    // float32 first).
    const float k_inverse = 1.0f / k_scale_f, v_inverse = 1.0f / v_scale_f;
    at::parallel_for(0, step_tokens, 16, [&](int64_t begin, int64_t end) {
      duo_cpu::quantize_step<T>(a, *fp8, k_inverse, v_inverse, step_keys, step_values, begin,
                                end, to_float);
    });
    duo_cpu::SinkWindowArgs quantised = a;
    quantised.new_keys = step_keys, quantised.new_values = step_values;
    quantised.nk_token = quantised.nv_token = run_heads * head_size;
    quantised.nk_head = quantised.nv_head = head_size;
    quantised.step_by_run_head = true;
    auto attend = [&](const auto& io) {
      at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        if (!duo_cpu::sink_window_tiles<T>(quantised, tiles, begin, end, io)) ok = false;
      });
    };
    if (fp8->e4m3) {
      attend(duo_cpu::Fp8Io<T, ToFloat, FromFloat, true>{to_float, from_float, k_scale_f,
                                                          v_scale_f});
    } else {
      attend(duo_cpu::Fp8Io<T, ToFloat, FromFloat, false>{to_float, from_float, k_scale_f,
                                                           v_scale_f});
    }
  });
  TORCH_CHECK(ok.load(), op, ": a block table entry of a visible position is outside the cache "
              "(0..", a.num_blocks - 1, ")");
}

void store_kv(const at::Tensor& new_keys, const at::Tensor& new_values, const at::Tensor& heads,
              const at::Tensor& slot_mapping, const at::Tensor& key_cache,
              const at::Tensor& value_cache, int64_t min_slot, c10::string_view kv_cache_dtype,
              double k_scale, double v_scale) {
  const char* op = kStore;
  const duo_cpu::Fp8Spec* fp8 = fp8_spec(op, kv_cache_dtype);
  check_scale(op, "k_scale", k_scale);
  check_scale(op, "v_scale", v_scale);
  check_rows(op, "new_keys", new_keys, 3);
  check_rows(op, "new_values", new_values, 3);
  TORCH_CHECK(new_values.sizes() == new_keys.sizes() &&
                  new_values.scalar_type() == new_keys.scalar_type(),
              op, ": new_values must match new_keys ", new_keys.sizes(), " ",
              new_keys.scalar_type());
  const int64_t num_tokens = new_keys.size(0), layer_heads = new_keys.size(1),
                head_size = new_keys.size(2), run_heads = key_cache.size(2);
  check_cache(op, "key_cache", key_cache, new_keys, run_heads, head_size, fp8 != nullptr);
  check_cache(op, "value_cache", value_cache, new_keys, run_heads, head_size, fp8 != nullptr);
  check_heads(op, heads, run_heads, layer_heads);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) >= num_tokens, op,
              ": slot_mapping must be [>= num_tokens=", num_tokens, "], got ",
              slot_mapping.sizes());
  check_index(op, "slot_mapping", slot_mapping, at::kLong, {slot_mapping.size(0)});

  duo_cpu::StoreArgs a{};
  a.new_keys = new_keys.data_ptr();
  a.nk_token = new_keys.stride(0), a.nk_head = new_keys.stride(1);
  a.new_values = new_values.data_ptr();
  a.nv_token = new_values.stride(0), a.nv_head = new_values.stride(1);
  a.heads = heads.data_ptr<int64_t>();
  a.slots = slot_mapping.data_ptr<int64_t>();
  a.key_cache = key_cache.data_ptr();
  a.k_block = key_cache.stride(0), a.k_slot = key_cache.stride(1), a.k_head = key_cache.stride(2);
  a.value_cache = value_cache.data_ptr();
  a.v_block = value_cache.stride(0), a.v_slot = value_cache.stride(1);
  a.v_head = value_cache.stride(2);
  a.num_tokens = num_tokens, a.run_heads = run_heads, a.head_size = head_size;
  a.block_size = key_cache.size(1), a.num_blocks = key_cache.size(0), a.min_slot = min_slot;
  std::atomic<bool> ok{true};
  if (fp8 == nullptr) {
    const int64_t element_size = new_keys.element_size();
    at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
      if (!duo_cpu::store_rows(a, element_size, begin, end)) ok = false;
    });
  } else {
    const float k_inverse = 1.0f / static_cast<float>(k_scale);
    const float v_inverse = 1.0f / static_cast<float>(v_scale);
    dispatch_float(op, new_keys.scalar_type(), [&](auto tag, auto to_float, auto) {
      using T = decltype(tag);
      at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
        if (!duo_cpu::store_rows_fp8<T>(a, *fp8, k_inverse, v_inverse, begin, end, to_float))
          ok = false;
      });
    });
  }
  TORCH_CHECK(ok.load(), op, ": a slot lies past the cache's ", a.num_blocks, " blocks");
}

// Meta: shapes only; the CPU impl checks values.
void sink_window_attention_meta(const at::Tensor& query, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t, double, const at::Tensor& out, c10::string_view,
                                double, double) {
  TORCH_CHECK(out.sizes() == query.sizes(), kAttention, ": out must have the query's shape");
}

void store_kv_meta(const at::Tensor& new_keys, const at::Tensor& new_values, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                   c10::string_view, double, double) {
  TORCH_CHECK(new_values.sizes() == new_keys.sizes(), kStore, ": new_values must match new_keys");
}

}  // namespace

TORCH_LIBRARY(vllm_duo_cpu, m) {
  m.def(
      "sink_window_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor heads, "
      "Tensor block_table, Tensor query_start_loc, Tensor seq_lens, Tensor new_keys, "
      "Tensor new_values, int sink, int recent, float scale, Tensor(a!) out, "
      "str kv_cache_dtype=\"auto\", float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def(
      "store_kv(Tensor new_keys, Tensor new_values, Tensor heads, Tensor slot_mapping, "
      "Tensor(a!) key_cache, Tensor(b!) value_cache, int min_slot, "
      "str kv_cache_dtype=\"auto\", float k_scale=1.0, float v_scale=1.0) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_duo_cpu, CPU, m) {
  m.impl("sink_window_attention", &sink_window_attention);
  m.impl("store_kv", &store_kv);
}

TORCH_LIBRARY_IMPL(vllm_duo_cpu, Meta, m) {
  m.impl("sink_window_attention", &sink_window_attention_meta);
  m.impl("store_kv", &store_kv_meta);
}
