// LayerNorm forward and backward CUDA kernels (no torch dependency; interface in layer_norm.h).
//
// One block normalizes one row. Accesses are 16 bytes wide when the row length and the pointers
// allow it. Statistics are fp32: the mean first, then the centred variance (two reductions, no
// cancellation), then the output; the row is read once from memory and re-read from L1/L2.
#include "layer_norm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace megalm {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements moved in one access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* row, int64_t i, float (&out)[VEC]) {
  const Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(row)[i];
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(p.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* row, int64_t i, const float (&in)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.v[k] = from_float<T>(in[k]);
  reinterpret_cast<Pack<T, VEC>*>(row)[i] = p;
}

// Sums each of v[0..N) over the block; every thread gets the totals. scratch: N * kWarp floats.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[k * kWarp + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float t = lane < warps ? scratch[k * kWarp + lane] : 0.f;
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      t += __shfl_xor_sync(0xffffffffu, t, offset);
    v[k] = t;
  }
}

// h = x, or x + residual rounded to T (what eager torch normalizes), as fp32; written to h_out
// when h_out is given.
template <typename T, int VEC>
__device__ __forceinline__ void load_h(const T* x, const T* residual, T* h_out, int64_t i,
                                       float (&h)[VEC]) {
  load<T, VEC>(x, i, h);
  if (residual == nullptr) return;
  float r[VEC];
  load<T, VEC>(residual, i, r);
#pragma unroll
  for (int k = 0; k < VEC; ++k) h[k] = to_float(from_float<T>(h[k] + r[k]));
  if (h_out != nullptr) store<T, VEC>(h_out, i, h);
}

template <typename T, int VEC>
__global__ void layer_norm_forward_kernel(LayerNormForwardArgs a) {
  __shared__ float scratch[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t offset = row * a.cols;
  const T* x = static_cast<const T*>(a.x) + offset;
  const T* residual = a.residual ? static_cast<const T*>(a.residual) + offset : nullptr;
  T* h_out = a.h_out ? static_cast<T*>(a.h_out) + offset : nullptr;
  T* y = static_cast<T*>(a.y) + offset;
  const int64_t packs = a.cols / VEC;
  float h[VEC];

  float sum[1] = {0.f};
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    load_h<T, VEC>(x, residual, h_out, i, h);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[0] += h[k];
  }
  block_sum(sum, scratch);
  const float mean = sum[0] / a.cols;

  float squares[1] = {0.f};
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    load_h<T, VEC>(x, residual, nullptr, i, h);
#pragma unroll
    for (int k = 0; k < VEC; ++k) squares[0] += (h[k] - mean) * (h[k] - mean);
  }
  block_sum(squares, scratch);
  const float rstd = rsqrtf(squares[0] / a.cols + a.eps);

  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    load_h<T, VEC>(x, residual, nullptr, i, h);
    float out[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t col = i * VEC + k;
      out[k] = (h[k] - mean) * rstd * a.weight[col] + (a.bias ? a.bias[col] : 0.f);
    }
    store<T, VEC>(y, i, out);
  }
  if (threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// dx = rstd · (w·dy − x̂·mean(x̂·w·dy) − mean(w·dy)) [+ dh]; block b takes rows b, b + parts, ...
// and adds dy·x̂ and dy into its own rows of dw_part / db_part.
template <typename T, int VEC>
__global__ void layer_norm_backward_kernel(LayerNormBackwardArgs a) {
  __shared__ float scratch[2 * kWarp];
  const int64_t packs = a.cols / VEC;
  float* dw = a.dw_part + blockIdx.x * a.cols;
  float* db = a.db_part ? a.db_part + blockIdx.x * a.cols : nullptr;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t offset = row * a.cols;
    const T* x = static_cast<const T*>(a.x) + offset;
    const T* dy = static_cast<const T*>(a.dy) + offset;
    const T* dh = a.dh ? static_cast<const T*>(a.dh) + offset : nullptr;
    T* dx = static_cast<T*>(a.dx) + offset;
    const float mean = a.mean[row];
    const float rstd = a.rstd[row];
    float xv[VEC], g[VEC];

    float sums[2] = {0.f, 0.f};  // Σ x̂·w·dy, Σ w·dy
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      load<T, VEC>(x, i, xv);
      load<T, VEC>(dy, i, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float wdy = a.weight[i * VEC + k] * g[k];
        sums[0] += (xv[k] - mean) * rstd * wdy;
        sums[1] += wdy;
      }
    }
    block_sum(sums, scratch);
    const float c_xw = sums[0] / a.cols;
    const float c_w = sums[1] / a.cols;

    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      load<T, VEC>(x, i, xv);
      load<T, VEC>(dy, i, g);
      float extra[VEC] = {};
      if (dh != nullptr) load<T, VEC>(dh, i, extra);
      float out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t col = i * VEC + k;
        const float x_hat = (xv[k] - mean) * rstd;
        out[k] = (a.weight[col] * g[k] - x_hat * c_xw - c_w) * rstd + extra[k];
        // Column `col` always falls to this same thread, so its partial sums need no sync.
        dw[col] += g[k] * x_hat;
        if (db != nullptr) db[col] += g[k];
      }
      store<T, VEC>(dx, i, out);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// About four packs per thread, whole warps, at most kMaxThreads.
int threads_for(int64_t packs) {
  int64_t t = ((packs + 3) / 4 + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(t < kWarp ? kWarp : (t > kMaxThreads ? kMaxThreads : t));
}

template <typename T>
cudaError_t launch_forward(const LayerNormForwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool wide = a.cols % kVec == 0 && aligned16(a.x) && aligned16(a.y) &&
                    (a.residual == nullptr || (aligned16(a.residual) && aligned16(a.h_out)));
  const int threads = threads_for(wide ? a.cols / kVec : a.cols);
  if (wide) {
    layer_norm_forward_kernel<T, kVec><<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(a);
  } else {
    layer_norm_forward_kernel<T, 1><<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const LayerNormBackwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool wide = a.cols % kVec == 0 && aligned16(a.x) && aligned16(a.dy) &&
                    aligned16(a.dx) && (a.dh == nullptr || aligned16(a.dh));
  const int threads = threads_for(wide ? a.cols / kVec : a.cols);
  if (wide) {
    layer_norm_backward_kernel<T, kVec><<<a.parts, threads, 0, stream>>>(a);
  } else {
    layer_norm_backward_kernel<T, 1><<<a.parts, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t layer_norm_forward(const LayerNormForwardArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return launch_forward<float>(args, stream);
    case DType::kFloat16: return launch_forward<__half>(args, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_backward(const LayerNormBackwardArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return launch_backward<float>(args, stream);
    case DType::kFloat16: return launch_backward<__half>(args, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace megalm
