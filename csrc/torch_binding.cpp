// torch binding of the sink+window decode kernel: schemas, a Meta impl (shape
// checks only, so FakeTensor / torch.compile / CUDA-graph capture can trace the
// ops), and a CUDA impl that fills DuoDecodeArgs and calls the C launcher.
//
// Ops (namespace vllm_duo, both write `out` in place and return nothing):
//   sink_window_decode(query[R, G, D], cache, block_table[R, B] i32, seq_lens[R] i32,
//                      sink, recent, scale, k_scale, v_scale, out[R, G, D], num_splits=0)
//   sink_window_decode_heads(query[R, H*G, D], caches (H of them), ...same...)
// cache: [num_blocks, 1, block_size, 2*D] (or its rows view [num_blocks, 2*block_size, D]);
// fp16/bf16 like the query, or fp8 e4m3 as uint8 / float8_e4m3fn.
//
// The CUDA part is compiled only with -DDUO_WITH_CUDA (set by vllm_duo/_build_cuda.py),
// so this file also passes `g++ -fsyntax-only` against the headers of a CPU torch.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "duo_decode_args.h"

#ifdef DUO_WITH_CUDA
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace vllm_duo {
namespace {

constexpr const char* kOp = "vllm_duo.sink_window_decode";

int q_dtype_of(const at::Tensor& query) {
  switch (query.scalar_type()) {
    case at::kHalf:
      return DUO_DTYPE_FLOAT16;
    case at::kBFloat16:
      return DUO_DTYPE_BFLOAT16;
    default:
      break;
  }
  TORCH_CHECK(false, kOp, ": query dtype ", query.scalar_type(),
              " is not supported: expected float16 or bfloat16");
  return -1;
}

int kv_dtype_of(const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kHalf:
      return DUO_DTYPE_FLOAT16;
    case at::kBFloat16:
      return DUO_DTYPE_BFLOAT16;
    case at::kByte:  // vLLM stores fp8 KV caches as uint8
    case at::kFloat8_e4m3fn:
      return DUO_DTYPE_FP8_E4M3;
    default:
      break;
  }
  TORCH_CHECK(false, kOp, ": cache dtype ", cache.scalar_type(),
              " is not supported: expected float16, bfloat16, or fp8 e4m3 stored as uint8 "
              "or float8_e4m3fn");
  return -1;
}

struct CacheGeometry {
  int64_t block_size;
  int64_t block_stride;  // elements
};

// [num_blocks, 1, block_size, 2*D] or the rows view [num_blocks, 2*block_size, D].
CacheGeometry cache_geometry(const at::Tensor& cache, int64_t head_size) {
  CacheGeometry g{};
  if (cache.dim() == 4) {
    TORCH_CHECK(cache.size(1) == 1 && cache.size(3) == 2 * head_size, kOp, ": cache shape ",
                cache.sizes(), " is not supported: expected [num_blocks, 1, block_size, 2*",
                head_size, "] (one KV head per cache)");
    TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == 2 * head_size, kOp,
                ": cache strides ", cache.strides(),
                " are not supported: each block must be contiguous");
    g.block_size = cache.size(2);
  } else if (cache.dim() == 3) {
    TORCH_CHECK(cache.size(2) == head_size && cache.size(1) % 2 == 0, kOp, ": cache shape ",
                cache.sizes(), " is not supported: expected [num_blocks, 2*block_size, ",
                head_size, "]");
    TORCH_CHECK(cache.stride(2) == 1 && cache.stride(1) == head_size, kOp, ": cache strides ",
                cache.strides(), " are not supported: each block must be contiguous");
    g.block_size = cache.size(1) / 2;
  } else {
    TORCH_CHECK(false, kOp, ": cache must be 4-D [num_blocks, 1, block_size, 2*head_size] "
                "(or 3-D [num_blocks, 2*block_size, head_size]), got shape ", cache.sizes());
  }
  g.block_stride = cache.stride(0);
  return g;
}

int checked_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= std::numeric_limits<int>::min() && v <= std::numeric_limits<int>::max(), kOp,
              ": ", name, "=", v, " does not fit in int32");
  return static_cast<int>(v);
}

// Every check that needs no data: the Meta impl runs exactly these, so a bad
// call fails the same way when traced and when run.
DuoDecodeArgs check_and_describe(const at::Tensor& query, at::TensorList caches,
                                 const at::Tensor& block_table, const at::Tensor& seq_lens,
                                 int64_t sink, int64_t recent, double scale, double k_scale,
                                 double v_scale, const at::Tensor& out, int64_t num_splits) {
  TORCH_CHECK(query.dim() == 3, kOp, ": query must be 3-D [num_reqs, num_heads, head_size], got ",
              query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), kOp, ": out shape ", out.sizes(),
              " must equal query shape ", query.sizes());
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), kOp, ": out dtype ", out.scalar_type(),
              " must equal query dtype ", query.scalar_type());
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, kOp,
              ": query and out need a contiguous last dim, got strides ", query.strides(), " and ",
              out.strides());
  TORCH_CHECK(!caches.empty(), kOp, ": needs at least one cache");
  TORCH_CHECK(static_cast<int64_t>(caches.size()) <= DUO_MAX_KV_HEADS, kOp, ": ",
              caches.size(), " caches is too many: expected at most ", DUO_MAX_KV_HEADS);
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt, kOp,
              ": block_table must be 2-D int32 [num_reqs, max_blocks], got ",
              block_table.scalar_type(), " ", block_table.sizes());
  TORCH_CHECK(block_table.stride(1) == 1, kOp, ": block_table rows must be contiguous, got strides ",
              block_table.strides());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt, kOp,
              ": seq_lens must be 1-D int32 [num_reqs], got ", seq_lens.scalar_type(), " ",
              seq_lens.sizes());
  TORCH_CHECK(seq_lens.stride(0) == 1 || seq_lens.size(0) <= 1, kOp,
              ": seq_lens must be contiguous");

  const int64_t num_reqs = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_size = query.size(2);
  const int64_t num_kv_heads = static_cast<int64_t>(caches.size());
  TORCH_CHECK(seq_lens.size(0) == num_reqs, kOp, ": seq_lens has ", seq_lens.size(0),
              " entries for ", num_reqs, " requests");
  TORCH_CHECK(block_table.size(0) >= num_reqs, kOp, ": block_table has ", block_table.size(0),
              " rows for ", num_reqs, " requests");
  TORCH_CHECK(num_heads >= num_kv_heads && num_heads % num_kv_heads == 0, kOp, ": ", num_heads,
              " query heads do not split evenly over ", num_kv_heads, " KV heads");

  const at::Tensor& first = caches[0];
  for (const at::Tensor& c : caches) {
    TORCH_CHECK(c.scalar_type() == first.scalar_type() && c.sizes() == first.sizes() &&
                    c.strides() == first.strides(),
                kOp, ": all caches must share dtype, shape and strides");
    TORCH_CHECK(c.device() == query.device(), kOp, ": cache on ", c.device(), " but query on ",
                query.device());
  }
  TORCH_CHECK(out.device() == query.device() && block_table.device() == query.device() &&
                  seq_lens.device() == query.device(),
              kOp, ": query, out, block_table and seq_lens must be on one device");
  const CacheGeometry geo = cache_geometry(first, head_size);

  DuoDecodeArgs a{};
  a.q_stride_req = query.stride(0);
  a.q_stride_head = query.stride(1);
  a.o_stride_req = out.stride(0);
  a.o_stride_head = out.stride(1);
  a.cache_block_stride = geo.block_stride;
  a.bt_stride = block_table.size(0) > 1 ? block_table.stride(0) : block_table.size(1);
  a.max_blocks = checked_int(block_table.size(1), "max_blocks");
  a.num_reqs = checked_int(num_reqs, "num_reqs");
  a.num_kv_heads = static_cast<int>(num_kv_heads);
  a.group = checked_int(num_heads / num_kv_heads, "group");
  a.head_size = checked_int(head_size, "head_size");
  a.block_size = checked_int(geo.block_size, "block_size");
  a.sink = checked_int(sink, "sink");
  a.recent = checked_int(recent, "recent");
  a.scale = static_cast<float>(scale);
  a.k_scale = static_cast<float>(k_scale);
  a.v_scale = static_cast<float>(v_scale);
  a.q_dtype = q_dtype_of(query);
  a.kv_dtype = kv_dtype_of(first);
  a.num_splits = checked_int(num_splits, "num_splits");

  // The launcher's shape rules (head size, block size, dtype pairs, S/W ranges...).
  DuoDecodePlan plan;
  char err[512];
  a.num_sms = 1;  // planning only validates here; the real plan asks the device
  const int status = duo_sink_window_decode_plan(&a, &plan, err, sizeof(err));
  TORCH_CHECK(status == DUO_OK, kOp, ": ", err);
  a.num_sms = 0;
  return a;
}

void decode_heads_meta(const at::Tensor& query, at::TensorList caches,
                       const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t sink,
                       int64_t recent, double scale, double k_scale, double v_scale,
                       const at::Tensor& out, int64_t num_splits) {
  (void)check_and_describe(query, caches, block_table, seq_lens, sink, recent, scale, k_scale,
                           v_scale, out, num_splits);
}

void decode_meta(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, int64_t sink, int64_t recent, double scale,
                 double k_scale, double v_scale, const at::Tensor& out, int64_t num_splits) {
  decode_heads_meta(query, at::TensorList(&cache, 1), block_table, seq_lens, sink, recent, scale,
                    k_scale, v_scale, out, num_splits);
}

#ifdef DUO_WITH_CUDA
void decode_heads_cuda(const at::Tensor& query, at::TensorList caches,
                       const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t sink,
                       int64_t recent, double scale, double k_scale, double v_scale,
                       const at::Tensor& out, int64_t num_splits) {
  DuoDecodeArgs a = check_and_describe(query, caches, block_table, seq_lens, sink, recent, scale,
                                       k_scale, v_scale, out, num_splits);
  TORCH_CHECK(query.is_cuda(), kOp, ": needs CUDA tensors, got query on ", query.device());
  const c10::cuda::CUDAGuard guard(query.device());

  a.query = query.data_ptr();
  a.out = out.data_ptr();
  for (size_t h = 0; h < caches.size(); ++h) a.caches[h] = caches[h].data_ptr();
  a.block_table = block_table.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();

  char err[512];
  DuoDecodePlan plan;
  int status = duo_sink_window_decode_plan(&a, &plan, err, sizeof(err));
  TORCH_CHECK(status == DUO_OK, kOp, ": ", err);
  at::Tensor workspace;  // from the caching allocator: graph-capture safe
  if (plan.workspace_bytes > 0) {
    const int64_t floats = static_cast<int64_t>((plan.workspace_bytes + 3) / 4);
    workspace = at::empty({floats}, query.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr();
    a.workspace_bytes = static_cast<size_t>(floats) * 4;
  }
  status = duo_sink_window_decode(&a, c10::cuda::getCurrentCUDAStream().stream(), err,
                                  sizeof(err));
  TORCH_CHECK(status == DUO_OK, kOp, ": ", err);
}

void decode_cuda(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, int64_t sink, int64_t recent, double scale,
                 double k_scale, double v_scale, const at::Tensor& out, int64_t num_splits) {
  decode_heads_cuda(query, at::TensorList(&cache, 1), block_table, seq_lens, sink, recent, scale,
                    k_scale, v_scale, out, num_splits);
}
#endif  // DUO_WITH_CUDA

}  // namespace
}  // namespace vllm_duo

TORCH_LIBRARY(vllm_duo, m) {
  m.def(
      "sink_window_decode(Tensor query, Tensor cache, Tensor block_table, Tensor seq_lens, "
      "int sink, int recent, float scale, float k_scale, float v_scale, Tensor(a!) out, "
      "int num_splits=0) -> ()");
  m.def(
      "sink_window_decode_heads(Tensor query, Tensor[] caches, Tensor block_table, "
      "Tensor seq_lens, int sink, int recent, float scale, float k_scale, float v_scale, "
      "Tensor(a!) out, int num_splits=0) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_duo, Meta, m) {
  m.impl("sink_window_decode", &vllm_duo::decode_meta);
  m.impl("sink_window_decode_heads", &vllm_duo::decode_heads_meta);
}

#ifdef DUO_WITH_CUDA
TORCH_LIBRARY_IMPL(vllm_duo, CUDA, m) {
  m.impl("sink_window_decode", &vllm_duo::decode_cuda);
  m.impl("sink_window_decode_heads", &vllm_duo::decode_heads_cuda);
}
#endif
