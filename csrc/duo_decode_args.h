/*
 * C ABI of the sink+window decode kernel (DuoAttention streaming heads).
 *
 * Plain C: pointers, integers, floats and dtype enums. No CUDA, no torch.
 * The launcher lives in sink_window_decode.cu; the torch binding in
 * torch_binding.cpp fills this struct from tensors.
 *
 * Shapes (all strides in ELEMENTS of the tensor's own dtype):
 *   query      [num_reqs, num_kv_heads * group, head_size]   fp16 | bf16
 *              query head h * group + g belongs to KV head h;
 *              last dim contiguous, pointer 16-byte aligned,
 *              q_stride_req / q_stride_head multiples of 8.
 *   out        same shape and dtype as query (last dim contiguous).
 *   caches[h]  one paged cache per KV head, rows view
 *              [num_blocks, 2 * block_size, head_size]: rows [0, block_size)
 *              of a block are keys, rows [block_size, 2 * block_size) values
 *              (the [num_blocks, 1, block_size, 2 * head_size] layout).
 *              Rows contiguous; cache_block_stride elements between blocks.
 *   block_table [num_reqs, >= max_blocks] int32, row stride bt_stride.
 *   seq_lens   [num_reqs] int32: tokens in the context, the decode query
 *              being the last one (absolute position seq_len - 1).
 *
 * Semantics: the query at p = seq_len - 1 attends to key positions j <= p with
 * j < sink or j > p - recent. Only those positions are read, so entries of the
 * block table outside them (null block 0 for freed blocks) are never touched.
 */
#ifndef VLLM_DUO_DECODE_ARGS_H_
#define VLLM_DUO_DECODE_ARGS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Same declaration as CUDA's driver_types.h (identical typedefs may repeat),
 * so this header needs no CUDA include. */
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

#define DUO_DECODE_ABI_VERSION 1
/* KV heads one launch can take (their cache pointers travel by value). */
#define DUO_MAX_KV_HEADS 64

typedef enum DuoDtype {
  DUO_DTYPE_FLOAT16 = 0,
  DUO_DTYPE_BFLOAT16 = 1,
  DUO_DTYPE_FP8_E4M3 = 2 /* KV cache only: 1 byte, dequant = value * scale */
} DuoDtype;

typedef enum DuoStatus {
  DUO_OK = 0,
  DUO_INVALID_ARGUMENT = 1, /* a rule was broken; err names it */
  DUO_CUDA_ERROR = 2        /* the CUDA runtime refused; err says what */
} DuoStatus;

typedef struct DuoDecodeArgs {
  const void* query;
  int64_t q_stride_req;
  int64_t q_stride_head;

  void* out;
  int64_t o_stride_req;
  int64_t o_stride_head;

  const void* caches[DUO_MAX_KV_HEADS];
  int64_t cache_block_stride; /* elements between consecutive blocks */

  const int32_t* block_table;
  int64_t bt_stride;  /* elements between rows of the block table */
  int max_blocks;     /* valid columns per row; keys beyond are never read */

  const int32_t* seq_lens;

  void* workspace;        /* fp32 scratch for split-K, see DuoDecodePlan */
  size_t workspace_bytes; /* may be 0 when the plan needs none */

  int num_reqs;
  int num_kv_heads; /* 1 .. DUO_MAX_KV_HEADS */
  int group;        /* query heads per KV head, >= 1 */
  int head_size;    /* 64, 128, 256 */
  int block_size;   /* 16, 32, 64, 128 */
  int sink;         /* S >= 0 */
  int recent;       /* W >= 1 */
  float scale;      /* softmax scale */
  float k_scale;    /* key dequant scale (1.0 for 16-bit caches) */
  float v_scale;    /* value dequant scale */
  int q_dtype;      /* DuoDtype: FLOAT16 | BFLOAT16, also the output dtype */
  int kv_dtype;     /* DuoDtype: q_dtype or FP8_E4M3 */
  int num_splits;   /* 0 = choose; else split the S+W keys into this many parts */
  int num_sms;      /* 0 = ask the current device; > 0 = plan for this many */
} DuoDecodeArgs;

typedef struct DuoDecodePlan {
  int num_splits;         /* CTAs per (request, KV head, group tile) */
  int keys_per_split;     /* visible keys each of them handles at most */
  int group_tile;         /* query heads handled together: 1, 4 or 8 */
  int group_tiles;        /* ceil(group / group_tile) */
  size_t workspace_bytes; /* scratch the launch needs (0 when num_splits == 1) */
} DuoDecodePlan;

/* Validates args and fills plan. Returns DuoStatus; on failure writes a
 * message naming the broken rule into err (err_len bytes, NUL-terminated). */
int duo_sink_window_decode_plan(const DuoDecodeArgs* args, DuoDecodePlan* plan, char* err,
                                int err_len);

/* Validates args and launches on stream (asynchronous). Returns DuoStatus. */
int duo_sink_window_decode(const DuoDecodeArgs* args, cudaStream_t stream, char* err,
                           int err_len);

/* "float16", "bfloat16", "fp8_e4m3" or "unknown". */
const char* duo_dtype_name(int dtype);

/* sizeof(DuoDecodeArgs) as compiled, for FFI callers to check their mirror. */
size_t duo_decode_args_size(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* VLLM_DUO_DECODE_ARGS_H_ */
