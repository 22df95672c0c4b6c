// torch binding of the CPU paged attention kernel (paged_attention_cpu.h): argument checks
// that name the broken rule, dtype dispatch, the work spread over torch's threads, schema and
// Meta impl.
//
// Op (namespace vllm_duo_cpu; writes `out` in place, returns nothing):
//   paged_attention(query[T, H, G, D], cache[NB, R, BS, 2 * D], heads[R] i64,
//       block_table[N, MB] i32, query_start_loc[N + 1] i32, seq_lens[N] i32, scale,
//       out[T, H, G, D])
// H = the layer's KV heads, R = the run's heads (run head i is layer head heads[i]). `cache`
// holds vLLM's CPU pages of the R heads (keys transposed, then value rows; see the header),
// written by vLLM's cpu_attn_reshape_and_cache.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "paged_attention_cpu.h"
#include "torch_checks.h"

namespace {

constexpr const char* kOp = "vllm_duo_cpu.paged_attention";
// A context part shorter than this costs more in set-up and combine than it gains.
constexpr int64_t kMinPart = 512;

void paged_attention(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& heads,
                     const at::Tensor& block_table, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, double scale, const at::Tensor& out) {
  const char* op = kOp;
  duo_cpu::check_rows(op, "query", query, 4);
  duo_cpu::check_rows(op, "out", out, 4);
  TORCH_CHECK(query.scalar_type() == out.scalar_type() && out.sizes() == query.sizes(), op,
              ": out must have the query's shape ", query.sizes(), " and dtype ",
              query.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type());
  const int64_t layer_heads = query.size(1), group = query.size(2), head_size = query.size(3);
  duo_cpu::check_head_size(op, head_size);
  duo_cpu::check_rows(op, "cache", cache, 4);
  TORCH_CHECK(cache.scalar_type() == query.scalar_type(), op, ": cache dtype ",
              cache.scalar_type(), " must match the query's ", query.scalar_type());
  const int64_t run_heads = cache.size(1), block_size = cache.size(2);
  TORCH_CHECK(cache.size(3) == 2 * head_size && cache.stride(2) == 2 * head_size, op,
              ": cache must be [num_blocks, run_heads, block_size, 2 * head_size=",
              2 * head_size, "] with contiguous pages, got shape ", cache.sizes(), " strides ",
              cache.strides());
  TORCH_CHECK(block_size % 16 == 0, op, ": block_size ", block_size,
              " must be a multiple of 16 (vLLM's CPU kernels use 16 or multiples of 32)");
  duo_cpu::check_heads(op, heads, run_heads, layer_heads);
  TORCH_CHECK(block_table.dim() == 2, op, ": block_table must be [num_reqs, max_blocks], got ",
              block_table.sizes());
  const int64_t num_reqs = block_table.size(0), max_blocks = block_table.size(1);
  duo_cpu::check_index(op, "block_table", block_table, at::kInt, {num_reqs, max_blocks});
  duo_cpu::check_index(op, "seq_lens", seq_lens, at::kInt, {num_reqs});
  duo_cpu::check_index(op, "query_start_loc", query_start_loc, at::kInt, {num_reqs + 1});
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[num_reqs] <= query.size(0), op,
              ": query_start_loc must start at 0 and end at most at num_tokens=", query.size(0),
              ", got ", qsl[0], " .. ", qsl[num_reqs]);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t num_blocks = cache.size(0);
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t n = qsl[r + 1] - qsl[r];
    TORCH_CHECK(n >= 0 && n <= lens[r], op, ": request ", r, " has ", n,
                " queries but seq_lens[", r, "] = ", lens[r],
                " (queries are the last seq_len positions)");
    TORCH_CHECK(lens[r] <= max_blocks * block_size, op, ": seq_lens[", r, "] = ", lens[r],
                " must be at most ", max_blocks * block_size, " (its block table's capacity)");
    if (n == 0) continue;
    for (int64_t b = 0; b < (lens[r] + block_size - 1) / block_size; ++b) {
      const int32_t block = table[r * max_blocks + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, op, ": block_table[", r, ", ", b, "] = ",
                  block, " is outside the cache (0..", num_blocks - 1, ")");
    }
  }

  duo_cpu::PagedAttentionArgs a{};
  a.query = query.data_ptr();
  a.q_token = query.stride(0), a.q_head = query.stride(1), a.q_group = query.stride(2);
  a.cache = cache.data_ptr();
  a.c_block = cache.stride(0), a.c_head = cache.stride(1);
  a.heads = heads.data_ptr<int64_t>();
  a.block_table = table, a.bt_row = max_blocks;
  a.query_start_loc = qsl, a.seq_lens = lens;
  a.out = out.data_ptr();
  a.o_token = out.stride(0), a.o_head = out.stride(1), a.o_group = out.stride(2);
  a.num_reqs = num_reqs, a.run_heads = run_heads, a.group = group, a.head_size = head_size;
  a.block_size = block_size, a.scale = static_cast<float>(scale);

  // Four items per thread balance parts of unequal cost without many combines.
  const int64_t threads = at::get_num_threads();
  const duo_cpu::WorkPlan plan = duo_cpu::plan_work(a, 4 * threads, kMinPart);
  const int64_t num_items = static_cast<int64_t>(plan.items.size());
  const int64_t partial_stride = group * (head_size + 2);
  std::vector<float> partials(plan.partial_slots * partial_stride);
  // Longest items first, handed out one at a time: a causal prefill's items grow with their
  // position, and a static split would leave one thread with the long tail.
  std::vector<int64_t> order(num_items);
  for (int64_t i = 0; i < num_items; ++i) order[i] = i;
  auto cost = [&](int64_t i) {
    const auto& it = plan.items[i];
    return (std::min(it.end, it.pos0 + it.positions) - it.begin) * it.positions;
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return cost(x) > cost(y); });
  std::atomic<int64_t> next{0};
  // An item holds positions x G rows: up to kItemRows, or G when one position exceeds it.
  const int64_t rows = std::max<int64_t>(duo_cpu::kItemRows, group);

  duo_cpu::dispatch_float(op, query.scalar_type(), [&](auto tag, auto to_float, auto from_float) {
    using T = decltype(tag);
    auto load = [&] {
      if constexpr (std::is_same_v<T, float>) {
        return [](const float* p) { return duo_cpu::loadv(p); };
      } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        return [](const c10::BFloat16* p) {
          return duo_cpu::load_bf16(reinterpret_cast<const uint16_t*>(p));
        };
      } else {
        return [to_float](const T* p) {
          float lanes[duo_cpu::kLanes];
          for (int i = 0; i < duo_cpu::kLanes; ++i) lanes[i] = to_float(p[i]);
          return duo_cpu::loadv(lanes);
        };
      }
    }();
    using Load = decltype(load);
    at::parallel_for(0, std::min(threads, num_items), 1, [&](int64_t, int64_t) {
      duo_cpu::ItemBuffers buffers(rows, head_size);
      for (int64_t i = next++; i < num_items; i = next++) {
        duo_cpu::attend_item<T, Load>(a, plan.items[order[i]], load, from_float, buffers,
                                      partials.data(), partial_stride);
      }
    });
    const int64_t splits = static_cast<int64_t>(plan.splits.size());
    at::parallel_for(0, splits, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s)
        duo_cpu::combine_parts<T>(a, plan, plan.splits[s].first, plan.splits[s].second,
                                  partials.data(), partial_stride, from_float);
    });
  });
}

void paged_attention_meta(const at::Tensor& query, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                          const at::Tensor& out) {
  TORCH_CHECK(out.sizes() == query.sizes(), kOp, ": out must have the query's shape");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_duo_cpu, m) {
  m.def(
      "paged_attention(Tensor query, Tensor cache, Tensor heads, Tensor block_table, "
      "Tensor query_start_loc, Tensor seq_lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_duo_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }

TORCH_LIBRARY_IMPL(vllm_duo_cpu, Meta, m) {
  m.impl("paged_attention", &paged_attention_meta);
}
