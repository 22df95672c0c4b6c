// Argument checks and dtype dispatch shared by the CPU ops' torch bindings: every failed
// check names the op, the argument and the rule it broke.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace duo_cpu {

inline void check_rows(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.dim() == dims, op, ": ", name, " must have ", dims, " dims, got shape ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.size(-1) == 0 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last (head_size) dim, got strides ", t.strides());
}

inline void check_index(const char* op, const char* name, const at::Tensor& t, at::ScalarType type,
                 at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == type, op, ": ", name, " must be ", type, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_heads(const char* op, const at::Tensor& heads, int64_t run_heads, int64_t layer_heads) {
  check_index(op, "heads", heads, at::kLong, {run_heads});
  const int64_t* h = heads.data_ptr<int64_t>();
  for (int64_t i = 0; i < run_heads; ++i)
    TORCH_CHECK(h[i] >= 0 && h[i] < layer_heads, op, ": heads[", i, "] = ", h[i],
                " is not a KV head of the layer (0..", layer_heads - 1, ")");
}

// The ops' loops step through rows a vector (16 fp32 lanes with AVX-512) at a time.
inline void check_head_size(const char* op, int64_t head_size) {
  TORCH_CHECK(head_size % 16 == 0, op, ": head_size ", head_size,
              " must be a multiple of 16 (as every head size vLLM's CPU backend serves)");
}

// Calls fn(tag, to_float, from_float) for the tensor dtype: float32, bfloat16 or float16.
template <typename Fn>
inline void dispatch_float(const char* op, at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat:
      fn(float{}, [](float x) { return x; }, [](float x) { return x; });
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{}, [](c10::BFloat16 x) { return static_cast<float>(x); },
         [](float x) { return c10::BFloat16(x); });
      break;
    case at::kHalf:
      fn(c10::Half{}, [](c10::Half x) { return static_cast<float>(x); },
         [](float x) { return c10::Half(x); });
      break;
    default:
      TORCH_CHECK(false, op, ": dtype ", type, " is not supported: float32, bfloat16 or float16");
  }
}

}  // namespace duo_cpu
