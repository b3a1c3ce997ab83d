// Torch binding of the CUDA LayerNorm: checks and shapes tensors, calls the launchers in
// layer_norm_kernels.cu on the current stream, and surfaces any CUDA error as a Python exception.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <vector>

#include "layer_norm.h"

namespace {

megalm::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return megalm::DType::kFloat32;
    case at::kHalf: return megalm::DType::kFloat16;
    case at::kBFloat16: return megalm::DType::kBFloat16;
    default: TORCH_CHECK(false, "CUDA LayerNorm takes fp32/fp16/bf16, got ", t.scalar_type());
  }
}

// (rows, cols) row-major view; copies only if the input is not already laid out that way.
at::Tensor rows_of(const at::Tensor& t, int64_t cols) { return t.reshape({-1, cols}).contiguous(); }

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Returns [y, h (undefined without residual), mean, rstd]; y has x's shape, the rest are 2-D/1-D.
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                double eps) {
  TORCH_CHECK(x.is_cuda(), "CUDA LayerNorm: x must be a CUDA tensor");
  const int64_t cols = x.size(-1);
  TORCH_CHECK(weight.numel() == cols, "weight has ", weight.numel(), " elements, hidden size is ",
              cols);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = rows_of(x, cols);
  const int64_t rows = x2.size(0);
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "too many rows: ", rows);
  at::Tensor r2, h;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x in shape and dtype");
    r2 = rows_of(*residual, cols);
    h = at::empty_like(x2);
  }
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x2);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));

  megalm::LayerNormForwardArgs args{};
  args.x = x2.data_ptr();
  args.residual = r2.defined() ? r2.data_ptr() : nullptr;
  args.h_out = h.defined() ? h.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.weight = w.data_ptr<float>();
  args.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  args.mean = mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.rows = rows;
  args.cols = cols;
  args.eps = static_cast<float>(eps);
  args.dtype = dtype_of(x);
  check_cuda(megalm::layer_norm_forward(args, c10::cuda::getCurrentCUDAStream()),
             "layer_norm_forward");
  return {y.view(x.sizes()), h, mean, rstd};
}

// x2: the (rows, cols) tensor that was normalized. Returns [dx (rows, cols), dweight, dbias].
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x2,
                                 const at::Tensor& weight, const at::Tensor& mean,
                                 const at::Tensor& rstd, const c10::optional<at::Tensor>& dh,
                                 bool has_bias, int64_t parts) {
  const c10::cuda::CUDAGuard guard(x2.device());
  const int64_t rows = x2.size(0), cols = x2.size(1);
  const at::Tensor dy2 = rows_of(dy, cols);
  const at::Tensor dh2 = dh.has_value() ? rows_of(*dh, cols) : at::Tensor();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  parts = std::max<int64_t>(1, std::min(parts, rows));
  at::Tensor dx = at::empty_like(x2);
  // Each block adds into its own row: zeros to start from.
  at::Tensor dw_part = at::zeros({parts, cols}, x2.options().dtype(at::kFloat));
  at::Tensor db_part = has_bias ? at::zeros_like(dw_part) : at::Tensor();

  megalm::LayerNormBackwardArgs args{};
  args.dy = dy2.data_ptr();
  args.x = x2.data_ptr();
  args.dh = dh2.defined() ? dh2.data_ptr() : nullptr;
  args.weight = w.data_ptr<float>();
  args.mean = mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.dx = dx.data_ptr();
  args.dw_part = dw_part.data_ptr<float>();
  args.db_part = has_bias ? db_part.data_ptr<float>() : nullptr;
  args.rows = rows;
  args.cols = cols;
  args.parts = static_cast<int>(parts);
  args.dtype = dtype_of(x2);
  check_cuda(megalm::layer_norm_backward(args, c10::cuda::getCurrentCUDAStream()),
             "layer_norm_backward");
  at::Tensor dw = dw_part.sum(0).to(weight.scalar_type());
  at::Tensor db = has_bias ? db_part.sum(0).to(weight.scalar_type()) : at::Tensor();
  return {dx, dw, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "LayerNorm forward (CUDA)");
  m.def("backward", &backward, "LayerNorm backward (CUDA)");
}
