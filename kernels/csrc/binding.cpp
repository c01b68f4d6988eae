// Python binding of the SGMV kernels: argument plumbing and dtype dispatch (kernels/cuda.py checks
// shapes, strides and alignment before calling).
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "sgmv.h"

namespace {

lorafleet::Batch make_batch(const torch::Tensor& table, const torch::Tensor& blocks,
                            const torch::Tensor& sorted_rows, const std::optional<torch::Tensor>& ranks,
                            int64_t num_rows, int64_t max_rank, bool vec, bool tensor_cores) {
  return lorafleet::Batch{table.data_ptr<int64_t>(), blocks.data_ptr<int>(), static_cast<int>(blocks.size(0)),
                          sorted_rows.data_ptr<int>(), ranks.has_value() ? ranks->data_ptr<int>() : nullptr,
                          static_cast<int>(num_rows), static_cast<int>(table.size(0)),
                          static_cast<int>(max_rank), vec, tensor_cores};
}

template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kFloat: f(float{}); break;
    default: TORCH_CHECK(false, "cuda backend: unsupported dtype ", dtype);
  }
}

}  // namespace

int64_t block_rows(int64_t max_rank, bool tensor_cores) {
  TORCH_CHECK(max_rank <= 128, "cuda backend: max_rank must be <= 128, got ", max_rank);
  return tensor_cores ? lorafleet::kTcRows : lorafleet::block_rows_for(lorafleet::rank_pad(static_cast<int>(max_rank)));
}

void shrink(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& blocks,
            const torch::Tensor& sorted_rows, const std::optional<torch::Tensor>& ranks, torch::Tensor& buf,
            int64_t k_per_split, bool vec, bool tensor_cores) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto batch = make_batch(table, blocks, sorted_rows, ranks, x.size(0), buf.size(3), vec, tensor_cores);
  dispatch(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    lorafleet::launch_shrink<T>(batch, x.data_ptr<T>(), x.stride(0), static_cast<int>(x.size(1)),
                                buf.data_ptr<float>(), static_cast<int>(buf.size(0)), static_cast<int>(k_per_split));
  });
}

void expand(torch::Tensor& y, const torch::Tensor& buf, const torch::Tensor& table, const torch::Tensor& blocks,
            const torch::Tensor& sorted_rows, const std::optional<torch::Tensor>& ranks,
            const torch::Tensor& scalings, int64_t max_out, bool vec, bool tensor_cores) {
  const c10::cuda::CUDAGuard guard(y.device());
  const auto batch = make_batch(table, blocks, sorted_rows, ranks, y.size(0), buf.size(3), vec, tensor_cores);
  dispatch(y.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    lorafleet::launch_expand<T>(batch, y.data_ptr<T>(), y.stride(0), buf.data_ptr<float>(),
                                static_cast<int>(buf.size(0)), scalings.data_ptr<float>(), max_out);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_rows", &block_rows, "rows per CTA for a max_rank (tensor cores or not)");
  m.def("shrink", &shrink, "SGMV shrink into fp32 split-k partials");
  m.def("expand", &expand, "SGMV expand of the summed split-k partials into y");
}
