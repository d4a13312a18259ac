// CUDA hostile purging: kernel 1 writes D = 2·x̂·dx and counts non-zeros per sample
// (block reduction + one atomic per block), kernel 2 applies the per-sample shift.
// Launches on the current stream and never synchronises; half/bfloat16 compute in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../purge_checks.h"

namespace rsp_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // samples per launch: CUDA's limit on a grid's second dimension

template <typename scalar_t>
__global__ void purge_combine_count(const scalar_t* __restrict__ dx, const scalar_t* __restrict__ x,
                                    scalar_t* __restrict__ out, unsigned long long* __restrict__ counts, int64_t M) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.y;
  int local = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M; i += (int64_t)gridDim.x * blockDim.x) {
    const opmath_t D = opmath_t(2) * static_cast<opmath_t>(x[n * M + i]) * static_cast<opmath_t>(dx[n * M + i]);
    const scalar_t Ds = static_cast<scalar_t>(D);
    out[n * M + i] = Ds;
    local += static_cast<opmath_t>(Ds) != opmath_t(0);
  }
  __shared__ int partial[kThreads];
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0 && partial[0]) atomicAdd(counts + n, (unsigned long long)partial[0]);
}

template <typename scalar_t>
__global__ void purge_shift(scalar_t* __restrict__ out, const scalar_t* __restrict__ total,
                            const unsigned long long* __restrict__ counts, int64_t M) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.y;
  const unsigned long long c = counts[n];
  if (c == 0) return;
  const opmath_t shift = static_cast<opmath_t>(total[n]) / static_cast<opmath_t>(c);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M; i += (int64_t)gridDim.x * blockDim.x) {
    const opmath_t v = static_cast<opmath_t>(out[n * M + i]);
    if (v != opmath_t(0)) out[n * M + i] = static_cast<scalar_t>(v - shift);
  }
}

}  // namespace

at::Tensor purge_cuda(const at::Tensor& dx, const at::Tensor& x_pos, const at::Tensor& total) {
  check_purge_args(dx, x_pos, total);
  const c10::cuda::CUDAGuard guard(dx.device());
  const at::Tensor d = dx.contiguous(), x = x_pos.contiguous(), t = total.contiguous();
  at::Tensor out = at::empty_like(d, at::MemoryFormat::Contiguous);
  const int64_t N = d.size(0);
  const int64_t M = N ? d.numel() / N : 0;
  if (N == 0 || M == 0) return out;
  at::Tensor counts = at::zeros({N}, d.options().dtype(at::kLong));
  const int64_t blocks = std::min<int64_t>((M + kThreads - 1) / kThreads, 1024);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "purge_cuda", [&] {
    auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    for (int64_t n0 = 0; n0 < N; n0 += kMaxGridY) {  // one sample per grid row, at most kMaxGridY rows a launch
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min(kMaxGridY, N - n0)));
      const int64_t at = n0 * M;
      purge_combine_count<scalar_t><<<grid, kThreads, 0, stream>>>(
          d.const_data_ptr<scalar_t>() + at, x.const_data_ptr<scalar_t>() + at, out.mutable_data_ptr<scalar_t>() + at,
          counts_ptr + n0, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      purge_shift<scalar_t><<<grid, kThreads, 0, stream>>>(out.mutable_data_ptr<scalar_t>() + at,
                                                           t.const_data_ptr<scalar_t>() + n0, counts_ptr + n0, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CUDA, m) { m.impl("purge", &purge_cuda); }

}  // namespace rsp_fast
