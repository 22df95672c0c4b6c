// C ABI launcher of the sink+window decode kernel: checks every argument,
// names the rule a bad one breaks, plans the split-K and dispatches to the
// template instance. Torch-free.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>

#include "duo_decode_args.h"
#include "sink_window_decode.cuh"

namespace {

// Splits: at least this many visible keys per split (one or two warp steps).
constexpr int kMinKeysPerSplit = 32;
// Aim for this many CTAs per multiprocessor when requests are few.
constexpr int kCtasPerSm = 2;

int fail(int status, char* err, int err_len, const char* fmt, ...) {
  if (err != nullptr && err_len > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, static_cast<size_t>(err_len), fmt, ap);
    va_end(ap);
  }
  return status;
}

#define DUO_REQUIRE(cond, ...)                                          \
  do {                                                                  \
    if (!(cond)) return fail(DUO_INVALID_ARGUMENT, err, err_len, __VA_ARGS__); \
  } while (0)

bool is_16bit(int dtype) { return dtype == DUO_DTYPE_FLOAT16 || dtype == DUO_DTYPE_BFLOAT16; }
bool is_fp8(int dtype) { return dtype == DUO_DTYPE_FP8_E4M3; }
int dtype_bytes(int dtype) { return is_fp8(dtype) ? 1 : 2; }

int log2_exact(int x) {
  int r = 0;
  while ((1 << r) < x) ++r;
  return (1 << r) == x ? r : -1;
}

int keys_per_step(int head_size) { return duo::kWarps * (32 / (head_size / duo::kVec)); }

int sm_count(int* out, char* err, int err_len) {
  static int cached[64] = {0};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess)
    return fail(DUO_CUDA_ERROR, err, err_len, "cudaGetDevice failed: %s", cudaGetErrorString(e));
  if (device >= 0 && device < 64 && cached[device] > 0) {
    *out = cached[device];
    return DUO_OK;
  }
  int sms = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess)
    return fail(DUO_CUDA_ERROR, err, err_len, "cudaDeviceGetAttribute(MultiProcessorCount) failed: %s",
                cudaGetErrorString(e));
  if (device >= 0 && device < 64) cached[device] = sms;
  *out = sms;
  return DUO_OK;
}

// Shape rules (no pointers): shared by plan and launch.
int check_shapes(const DuoDecodeArgs* a, char* err, int err_len) {
  DUO_REQUIRE(a != nullptr, "args is NULL");
  DUO_REQUIRE(a->head_size == 64 || a->head_size == 128 || a->head_size == 256,
              "head_size=%d is not supported: expected one of 64, 128, 256", a->head_size);
  DUO_REQUIRE(a->block_size == 16 || a->block_size == 32 || a->block_size == 64 ||
                  a->block_size == 128,
              "block_size=%d is not supported: expected one of 16, 32, 64, 128", a->block_size);
  DUO_REQUIRE(a->group >= 1, "group=%d is not supported: expected group >= 1 (query heads per KV head)",
              a->group);
  DUO_REQUIRE(a->num_kv_heads >= 1 && a->num_kv_heads <= DUO_MAX_KV_HEADS,
              "num_kv_heads=%d is not supported: expected 1 <= num_kv_heads <= %d", a->num_kv_heads,
              DUO_MAX_KV_HEADS);
  DUO_REQUIRE(static_cast<int64_t>(a->num_kv_heads) * ((a->group + 7) / 8) <= 65535,
              "num_kv_heads=%d x group=%d is too large: expected num_kv_heads * ceil(group / 8) <= 65535",
              a->num_kv_heads, a->group);
  DUO_REQUIRE(a->num_reqs >= 0 && a->num_reqs <= 65535,
              "num_reqs=%d is not supported: expected 0 <= num_reqs <= 65535", a->num_reqs);
  DUO_REQUIRE(a->sink >= 0 && a->sink <= (1 << 30),
              "sink=%d is not supported: expected 0 <= sink <= 2^30", a->sink);
  DUO_REQUIRE(a->recent >= 1 && a->recent <= (1 << 30),
              "recent=%d is not supported: expected 1 <= recent <= 2^30 (the window includes the query)",
              a->recent);
  DUO_REQUIRE(a->q_dtype == DUO_DTYPE_FLOAT16 || a->q_dtype == DUO_DTYPE_BFLOAT16,
              "q_dtype=%s is not supported: expected float16 or bfloat16", duo_dtype_name(a->q_dtype));
  DUO_REQUIRE(is_16bit(a->kv_dtype) || is_fp8(a->kv_dtype),
              "kv_dtype=%s is not supported: expected float16, bfloat16 or fp8_e4m3",
              duo_dtype_name(a->kv_dtype));
  DUO_REQUIRE(is_fp8(a->kv_dtype) || a->kv_dtype == a->q_dtype,
              "kv_dtype=%s with q_dtype=%s is not supported: a 16-bit KV cache must have the "
              "query's dtype (or use an fp8 cache)",
              duo_dtype_name(a->kv_dtype), duo_dtype_name(a->q_dtype));
  DUO_REQUIRE(std::isfinite(a->scale), "scale=%g is not supported: expected a finite number",
              static_cast<double>(a->scale));
  DUO_REQUIRE(std::isfinite(a->k_scale) && a->k_scale > 0.f,
              "k_scale=%g is not supported: expected a finite number > 0",
              static_cast<double>(a->k_scale));
  DUO_REQUIRE(std::isfinite(a->v_scale) && a->v_scale > 0.f,
              "v_scale=%g is not supported: expected a finite number > 0",
              static_cast<double>(a->v_scale));
  DUO_REQUIRE(a->num_splits >= 0, "num_splits=%d is not supported: expected 0 (choose) or >= 1",
              a->num_splits);
  DUO_REQUIRE(a->num_reqs == 0 || a->max_blocks >= 1,
              "max_blocks=%d is not supported: expected >= 1 block-table columns", a->max_blocks);
  DUO_REQUIRE(a->bt_stride >= a->max_blocks,
              "bt_stride=%lld is too small: expected bt_stride >= max_blocks=%d",
              static_cast<long long>(a->bt_stride), a->max_blocks);
  const int64_t block_rows = 2LL * a->block_size * a->head_size;
  DUO_REQUIRE(a->cache_block_stride >= block_rows,
              "cache_block_stride=%lld is too small: a block holds 2 * block_size * head_size = %lld "
              "elements",
              static_cast<long long>(a->cache_block_stride), static_cast<long long>(block_rows));
  DUO_REQUIRE(a->cache_block_stride % 16 == 0,
              "cache_block_stride=%lld is not supported: expected a multiple of 16 elements "
              "(16-byte aligned blocks)",
              static_cast<long long>(a->cache_block_stride));
  DUO_REQUIRE(a->q_stride_req % 8 == 0 && a->q_stride_head % 8 == 0,
              "query strides (%lld, %lld) are not supported: expected multiples of 8 elements "
              "(16-byte aligned rows)",
              static_cast<long long>(a->q_stride_req), static_cast<long long>(a->q_stride_head));
  return DUO_OK;
}

int make_plan(const DuoDecodeArgs* a, DuoDecodePlan* plan, char* err, int err_len) {
  int status = check_shapes(a, err, err_len);
  if (status != DUO_OK) return status;
  DUO_REQUIRE(plan != nullptr, "plan is NULL");

  // Query heads per CTA (a template parameter: 1 for MHA, else 4 or 8; G = 2, 3 pad
  // to 4, G > 8 takes several tiles). Each tile re-reads the keys, mostly from L2.
  const int gt = a->group <= 1 ? 1 : a->group <= 4 ? 4 : 8;
  const int gtiles = (a->group + gt - 1) / gt;
  const int64_t max_keys = static_cast<int64_t>(a->sink) + a->recent;  // >= 1
  const int64_t step = keys_per_step(a->head_size);

  int64_t splits = a->num_splits;
  if (splits == 0) {
    int sms = a->num_sms;
    if (sms <= 0) {
      status = sm_count(&sms, err, err_len);
      if (status != DUO_OK) return status;
    }
    const int64_t base = static_cast<int64_t>(a->num_reqs > 0 ? a->num_reqs : 1) *
                         a->num_kv_heads * gtiles;
    const int64_t want = (static_cast<int64_t>(kCtasPerSm) * sms + base - 1) / base;
    const int64_t most = (max_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
    splits = want < most ? want : most;
    if (splits < 1) splits = 1;
  }
  // Keys per split: a whole number of CTA steps, then drop splits left empty.
  int64_t per = (max_keys + splits - 1) / splits;
  per = (per + step - 1) / step * step;
  splits = (max_keys + per - 1) / per;
  DUO_REQUIRE(splits <= 65535, "num_splits=%lld is too large: expected at most 65535",
              static_cast<long long>(splits));

  plan->num_splits = static_cast<int>(splits);
  plan->keys_per_split = static_cast<int>(per);
  plan->group_tile = gt;
  plan->group_tiles = gtiles;
  plan->workspace_bytes =
      splits > 1 ? static_cast<size_t>(a->num_reqs) * a->num_kv_heads * a->group *
                       static_cast<size_t>(splits) * (a->head_size + 1) * sizeof(float)
                 : 0;
  return DUO_OK;
}

bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// ---------------------------------------------------------------- dispatch

template <typename QT, typename KV, int HEAD, int GT>
void launch(const duo::DecodeParams& p, int num_reqs, int z, cudaStream_t stream) {
  const dim3 grid(p.num_splits, num_reqs, z);
  duo::sink_window_decode_kernel<QT, KV, HEAD, GT><<<grid, duo::kThreads, 0, stream>>>(p);
}

template <typename QT, typename KV, int HEAD>
void dispatch_group(int gt, const duo::DecodeParams& p, int num_reqs, int z, cudaStream_t s) {
  switch (gt) {
    case 1: launch<QT, KV, HEAD, 1>(p, num_reqs, z, s); break;
    case 4: launch<QT, KV, HEAD, 4>(p, num_reqs, z, s); break;
    default: launch<QT, KV, HEAD, 8>(p, num_reqs, z, s); break;
  }
}

template <typename QT, typename KV>
void dispatch_head(int head, int gt, const duo::DecodeParams& p, int num_reqs, int z,
                   cudaStream_t s) {
  switch (head) {
    case 64: dispatch_group<QT, KV, 64>(gt, p, num_reqs, z, s); break;
    case 128: dispatch_group<QT, KV, 128>(gt, p, num_reqs, z, s); break;
    default: dispatch_group<QT, KV, 256>(gt, p, num_reqs, z, s); break;
  }
}

template <typename QT, typename KV16>
void dispatch_kv(int kv_dtype, int head, int gt, const duo::DecodeParams& p, int num_reqs, int z,
                 cudaStream_t s) {
  switch (kv_dtype) {
    case DUO_DTYPE_FP8_E4M3: dispatch_head<QT, duo::KvE4m3>(head, gt, p, num_reqs, z, s); break;
    default: dispatch_head<QT, KV16>(head, gt, p, num_reqs, z, s); break;
  }
}

}  // namespace

extern "C" const char* duo_dtype_name(int dtype) {
  switch (dtype) {
    case DUO_DTYPE_FLOAT16: return "float16";
    case DUO_DTYPE_BFLOAT16: return "bfloat16";
    case DUO_DTYPE_FP8_E4M3: return "fp8_e4m3";
    default: return "unknown";
  }
}

extern "C" size_t duo_decode_args_size(void) { return sizeof(DuoDecodeArgs); }

extern "C" int duo_sink_window_decode_plan(const DuoDecodeArgs* args, DuoDecodePlan* plan,
                                           char* err, int err_len) {
  if (err != nullptr && err_len > 0) err[0] = '\0';
  return make_plan(args, plan, err, err_len);
}

extern "C" int duo_sink_window_decode(const DuoDecodeArgs* a, cudaStream_t stream, char* err,
                                      int err_len) {
  if (err != nullptr && err_len > 0) err[0] = '\0';
  DuoDecodePlan plan;
  int status = make_plan(a, &plan, err, err_len);
  if (status != DUO_OK) return status;
  if (a->num_reqs == 0) return DUO_OK;

  const int kv_bytes = dtype_bytes(a->kv_dtype);
  const int kv_align = kv_bytes * duo::kVec;  // one lane's load
  DUO_REQUIRE(a->query != nullptr, "query is NULL");
  DUO_REQUIRE(a->out != nullptr, "out is NULL");
  DUO_REQUIRE(a->block_table != nullptr, "block_table is NULL");
  DUO_REQUIRE(a->seq_lens != nullptr, "seq_lens is NULL");
  DUO_REQUIRE(aligned(a->query, 16), "query must be 16-byte aligned (got address %p)", a->query);
  DUO_REQUIRE(aligned(a->out, 2), "out must be 2-byte aligned (got address %p)", a->out);
  for (int h = 0; h < a->num_kv_heads; ++h) {
    DUO_REQUIRE(a->caches[h] != nullptr, "caches[%d] is NULL (num_kv_heads=%d)", h,
                a->num_kv_heads);
    DUO_REQUIRE(aligned(a->caches[h], kv_align),
                "caches[%d] must be %d-byte aligned for kv_dtype=%s (got address %p)", h, kv_align,
                duo_dtype_name(a->kv_dtype), a->caches[h]);
  }
  if (plan.workspace_bytes > 0) {
    DUO_REQUIRE(a->workspace != nullptr,
                "workspace is NULL: this call splits the keys %d ways and needs %zu bytes "
                "(see duo_sink_window_decode_plan)",
                plan.num_splits, plan.workspace_bytes);
    DUO_REQUIRE(a->workspace_bytes >= plan.workspace_bytes,
                "workspace_bytes=%zu is too small: this call needs %zu bytes "
                "(see duo_sink_window_decode_plan)",
                a->workspace_bytes, plan.workspace_bytes);
    DUO_REQUIRE(aligned(a->workspace, 16), "workspace must be 16-byte aligned (got address %p)",
                a->workspace);
  }

  duo::DecodeParams p;
  p.query = a->query;
  p.q_stride_req = a->q_stride_req;
  p.q_stride_head = a->q_stride_head;
  p.out = a->out;
  p.o_stride_req = a->o_stride_req;
  p.o_stride_head = a->o_stride_head;
  for (int h = 0; h < DUO_MAX_KV_HEADS; ++h) p.caches[h] = h < a->num_kv_heads ? a->caches[h] : nullptr;
  p.cache_block_stride = a->cache_block_stride;
  p.block_table = a->block_table;
  p.bt_stride = a->bt_stride;
  p.max_blocks = a->max_blocks;
  p.seq_lens = a->seq_lens;
  const size_t rows = static_cast<size_t>(a->num_reqs) * a->num_kv_heads * a->group * plan.num_splits;
  p.part_out = plan.num_splits > 1 ? static_cast<float*>(a->workspace) : nullptr;
  p.part_lse = plan.num_splits > 1 ? p.part_out + rows * a->head_size : nullptr;
  p.num_reqs = a->num_reqs;
  p.num_kv_heads = a->num_kv_heads;
  p.group = a->group;
  p.block_size_log2 = log2_exact(a->block_size);
  p.sink = a->sink;
  p.recent = a->recent;
  p.num_splits = plan.num_splits;
  p.keys_per_split = plan.keys_per_split;
  p.group_tiles = plan.group_tiles;
  p.q_scale = a->scale * a->k_scale * duo::kLog2e;
  p.v_scale = a->v_scale;

  const int z = a->num_kv_heads * plan.group_tiles;
  if (a->q_dtype == DUO_DTYPE_FLOAT16) {
    dispatch_kv<__half, duo::KvHalf>(a->kv_dtype, a->head_size, plan.group_tile, p, a->num_reqs, z,
                                     stream);
  } else {
    dispatch_kv<__nv_bfloat16, duo::KvBf16>(a->kv_dtype, a->head_size, plan.group_tile, p,
                                            a->num_reqs, z, stream);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return fail(DUO_CUDA_ERROR, err, err_len, "sink_window_decode kernel launch failed: %s",
                cudaGetErrorString(e));

  if (plan.num_splits > 1) {
    const unsigned merge_blocks = static_cast<unsigned>(a->num_reqs * a->num_kv_heads * a->group);
    if (a->q_dtype == DUO_DTYPE_FLOAT16) {
      duo::merge_splits_kernel<__half><<<merge_blocks, duo::kThreads, 0, stream>>>(p, a->head_size);
    } else {
      duo::merge_splits_kernel<__nv_bfloat16>
          <<<merge_blocks, duo::kThreads, 0, stream>>>(p, a->head_size);
    }
    e = cudaGetLastError();
    if (e != cudaSuccess)
      return fail(DUO_CUDA_ERROR, err, err_len, "sink_window_decode merge launch failed: %s",
                  cudaGetErrorString(e));
  }
  return DUO_OK;
}
