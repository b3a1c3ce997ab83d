// LayerNorm CUDA kernels: launcher interface shared by the kernels and the torch binding.
//
// Kept free of torch headers so layer_norm_kernels.cu compiles with plain nvcc: CI without a GPU
// (or without CUDA torch) can still catch a syntax error in the kernels.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace megalm {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Row-major (rows, cols) activations of `dtype`; weight and bias are fp32 (the binding casts the
// small parameter vectors once). residual/h_out/bias may be null. mean and rstd get one fp32 per row.
struct LayerNormForwardArgs {
  const void* x;
  const void* residual;
  void* h_out;  // x + residual, rounded to dtype (only with residual)
  void* y;
  const float* weight;
  const float* bias;
  float* mean;
  float* rstd;
  int64_t rows;
  int64_t cols;
  float eps;
  DType dtype;
};

// x is the normalized input (h when a residual was added). dh (optional) is the gradient of the
// h output, added to dx. Each of `parts` blocks adds its rows' dweight/dbias terms into its own
// row of dw_part/db_part (parts × cols, zero-initialized fp32); the caller sums those rows.
struct LayerNormBackwardArgs {
  const void* dy;
  const void* x;
  const void* dh;
  const float* weight;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dw_part;
  float* db_part;  // null without bias
  int64_t rows;
  int64_t cols;
  int parts;
  DType dtype;
};

cudaError_t layer_norm_forward(const LayerNormForwardArgs& args, cudaStream_t stream);
cudaError_t layer_norm_backward(const LayerNormBackwardArgs& args, cudaStream_t stream);

}  // namespace megalm
