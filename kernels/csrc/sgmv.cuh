// SGMV shrink and expand for CUDA GPUs, on the same batch metadata and slice table as the Triton
// backend (kernels/meta.py, kernels/launch.py), so both read the same inputs and produce the same buf.
//   shrink: buf[split, slice, row, r] = sum over this split's k of x[row, k] * A_slice[slot, r, k]
//   expand: y[row, offset_slice + n] += scaling[slot] * sum_r (sum_split buf[...]) * B_slice[slot, n, r]
// One CTA per (block of rows of one segment, split of `in` | tile of `out`, slice). Decode: CUDA-core FMAs
// with 16-byte loads, since with a few rows per slot the work is bound by moving weights, not by math.
// Prefill (16-bit, sm_80+): blocks of kTcRows rows through tensor cores (WMMA); CUDA-core FMAs there left
// every weight tile multiplied once per row (H100, one adapter, rank 64, T=4096: 1.3-1.7x slower than a
// per-adapter loop of two cuBLAS GEMMs).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "sgmv.h"

namespace lorafleet {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTableCols = 10;  // kernels/launch.py: A_PTR, A_S0, A_S1, A_S2, B_PTR, B_S0, B_S1, B_S2, OUT, OFFSET

// Loads VEC consecutive elements as floats; VEC elements are 16 bytes when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<float>(*p);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = static_cast<float>(e[v]);
  }
}

// This CTA's block of the batch metadata (kernels/meta.py, LoRAMeta.blocks): its slot (-1: an unused
// entry) and its rows, sorted_rows[first, first + n).
struct RowBlock {
  int slot, first, n;
};

__device__ __forceinline__ RowBlock row_block(const int* blocks) {
  const int* b = blocks + 3 * blockIdx.x;
  return {b[0], b[1], b[2] - b[1]};
}

// rows[m] <- the block's m-th row (0 past its end), in shared memory: visible after a __syncthreads().
template <int BM>
__device__ __forceinline__ void stage_rows(int (&rows)[BM], const int* sorted_rows, const RowBlock& blk) {
  if (threadIdx.x < BM) rows[threadIdx.x] = threadIdx.x < blk.n ? sorted_rows[blk.first + threadIdx.x] : 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Warp w owns ranks [w * RW, (w + 1) * RW); its lanes stride over k, VEC elements at a time.
template <typename T, int BM, int RW, int VEC>
__global__ void __launch_bounds__(kThreads) shrink_kernel(
    const T* __restrict__ x, int64_t sx0, const int64_t* __restrict__ table, const int* __restrict__ blocks,
    const int* __restrict__ sorted_rows, const int* __restrict__ ranks, float* __restrict__ buf,
    int num_rows, int K, int R, int k_per_split) {
  const auto [slot, first, n] = row_block(blocks);
  if (slot < 0) return;
  const int split = blockIdx.y, j = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t* slice = table + j * kTableCols;
  const T* a = reinterpret_cast<const T*>(slice[0]) + slot * slice[1];
  const int64_t sa1 = slice[2];
  const int rank = ranks != nullptr ? ranks[slot] : R;

  int rows[BM];
#pragma unroll
  for (int m = 0; m < BM; ++m) rows[m] = m < n ? sorted_rows[first + m] : 0;
  float acc[BM][RW] = {};
  const int k0 = split * k_per_split;
  const int k1 = min(K, k0 + k_per_split);
  for (int k = k0 + lane * VEC; k < k1; k += 32 * VEC) {
    float av[RW][VEC];
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      const int r = warp * RW + i;
      if (r < rank) {
        load_vec<T, VEC>(a + r * sa1 + k, av[i]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) av[i][v] = 0.f;
      }
    }
#pragma unroll
    for (int m = 0; m < BM; ++m) {
      if (m < n) {
        float xv[VEC];
        load_vec<T, VEC>(x + rows[m] * sx0 + k, xv);
#pragma unroll
        for (int i = 0; i < RW; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[m][i] += xv[v] * av[i][v];
      }
    }
  }
  float* out = buf + (static_cast<int64_t>(split) * gridDim.z + j) * num_rows * R;
#pragma unroll
  for (int m = 0; m < BM; ++m) {
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      const float v = warp_sum(acc[m][i]);
      const int r = warp * RW + i;
      if (lane == 0 && m < n && r < R) out[static_cast<int64_t>(rows[m]) * R + r] = v;
    }
  }
}

// Thread c owns one output column; the block's rows' rank vectors (split parts summed, scaled) sit in
// shared memory and are read by all threads at once (broadcast).
template <typename T, int BM, int RP, int VEC>
__global__ void __launch_bounds__(kThreads) expand_kernel(
    T* __restrict__ y, int64_t sy0, const float* __restrict__ buf, const int64_t* __restrict__ table,
    const int* __restrict__ blocks, const int* __restrict__ sorted_rows, const int* __restrict__ ranks,
    const float* __restrict__ scalings, int num_rows, int R, int splits) {
  const RowBlock blk = row_block(blocks);
  const int slot = blk.slot, n = blk.n;
  const int j = blockIdx.z;
  const int64_t* slice = table + j * kTableCols;
  const int64_t n_out = slice[8];
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (slot < 0 || static_cast<int64_t>(blockIdx.y) * kThreads >= n_out) return;
  const int rank = ranks != nullptr ? ranks[slot] : R;
  const float scale = scalings[slot];

  __shared__ float t[BM][RP];
  __shared__ int rows[BM];
  stage_rows(rows, sorted_rows, blk);
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * RP; idx += kThreads) {
    const int m = idx / RP, r = idx % RP;
    float v = 0.f;
    if (m < n && r < rank) {
      for (int s = 0; s < splits; ++s)
        v += buf[((static_cast<int64_t>(s) * gridDim.z + j) * num_rows + rows[m]) * R + r];
    }
    t[m][r] = v * scale;
  }
  __syncthreads();
  if (col >= n_out) return;

  const T* b = reinterpret_cast<const T*>(slice[4]) + slot * slice[5] + col * slice[6];
  float bv[RP];
#pragma unroll
  for (int r = 0; r < RP; r += VEC) {
    if (r < rank) {
      float chunk[VEC];
      load_vec<T, VEC>(b + r, chunk);
#pragma unroll
      for (int v = 0; v < VEC; ++v) bv[r + v] = chunk[v];
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) bv[r + v] = 0.f;
    }
  }
  T* y_col = y + slice[9] + col;
#pragma unroll
  for (int m = 0; m < BM; ++m) {
    if (m < n) {
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < RP; ++r) acc += t[m][r] * bv[r];
      T* p = y_col + rows[m] * sy0;
      *p = static_cast<T>(static_cast<float>(*p) + acc);
    }
  }
}


// --- tensor cores (prefill) -------------------------------------------------------------------------------
// Tiles are staged in shared memory (rows gathered through sorted_rows), then each warp owns some 16x16
// output fragments; the fp32 results go back through shared memory (aliasing the operand tiles) to be
// scattered to their rows.

template <typename T> struct Wmma;  // the CUDA type of a 16-bit element
template <> struct Wmma<c10::BFloat16> { using type = __nv_bfloat16; };
template <> struct Wmma<c10::Half> { using type = __half; };

constexpr int kTcK = 64;     // shrink: `in` per staged tile
constexpr int kTcPad = 8;    // 16 bytes of padding per shared row: fewer bank conflicts, ldm a multiple of 8
constexpr int kVec16 = 8;    // 16-bit elements per 16-byte vector

// The expand's columns per CTA: its shared tiles stay within 48 KB.
__host__ __device__ constexpr int tc_expand_cols(int rp) { return rp == 128 ? 64 : 128; }

// A tensor-core kernel's shared memory: the operand tiles, then, in the same bytes, the fp32 result.
template <typename Operands, typename Result>
union TcShared {
  Operands op;
  Result res;
};

// The tile t[rows][cols] <- src[row r][col c] (row stride ld, unit column stride), 16-byte vectors, zero
// where the row is past `rows_valid` or the column at or past `cols_valid`.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void stage(T (*t)[COLS + kTcPad], const T* src, int64_t ld, const int* row_index,
                                      int rows_valid, int cols_valid) {
  for (int v = threadIdx.x; v < ROWS * COLS / kVec16; v += kThreads) {
    const int r = v / (COLS / kVec16), c = v % (COLS / kVec16) * kVec16;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (r < rows_valid && c < cols_valid)
      raw = __ldg(reinterpret_cast<const uint4*>(src + (row_index ? row_index[r] : r) * ld + c));
    *reinterpret_cast<uint4*>(&t[r][c]) = raw;
  }
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) shrink_tc_kernel(
    const T* __restrict__ x, int64_t sx0, const int64_t* __restrict__ table, const int* __restrict__ blocks,
    const int* __restrict__ sorted_rows, const int* __restrict__ ranks, float* __restrict__ buf,
    int num_rows, int K, int R, int k_per_split) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using WT = typename Wmma<T>::type;
  constexpr int BM = kTcRows, FM = BM / 16, FR = RP / 16, FRAGS = (FM * FR + kWarps - 1) / kWarps;
  struct Operands { T x[BM][kTcK + kTcPad]; T a[RP][kTcK + kTcPad]; };
  struct Result { float c[BM][RP + 4]; };
  __shared__ __align__(128) TcShared<Operands, Result> smem;
  __shared__ int rows[BM];
  auto& op = smem.op;
  auto& res = smem.res;

  const RowBlock blk = row_block(blocks);
  const int slot = blk.slot, n = blk.n;
  if (slot < 0) return;
  const int split = blockIdx.y, j = blockIdx.z, warp = threadIdx.x / 32;
  const int64_t* slice = table + j * kTableCols;
  const T* a = reinterpret_cast<const T*>(slice[0]) + slot * slice[1];
  const int rank = ranks != nullptr ? ranks[slot] : R;
  stage_rows(rows, sorted_rows, blk);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FRAGS];
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) wmma::fill_fragment(acc[f], 0.f);
  const int k0 = split * k_per_split, k1 = min(K, k0 + k_per_split);
  for (int k = k0; k < k1; k += kTcK) {
    __syncthreads();  // rows written; the previous tile consumed
    stage<T, BM, kTcK>(op.x, x + k, sx0, rows, n, k1 - k);
    stage<T, RP, kTcK>(op.a, a + k, slice[2], nullptr, rank, k1 - k);
    __syncthreads();
#pragma unroll
    for (int f = 0; f < FRAGS; ++f) {
      const int id = warp + f * kWarps;
      if (id < FM * FR) {
        const int fm = id / FR, fr = id % FR;
#pragma unroll
        for (int kk = 0; kk < kTcK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> xf;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> af;  // A^T: (k, r) at a[r][k]
          wmma::load_matrix_sync(xf, reinterpret_cast<const WT*>(&op.x[fm * 16][kk]), kTcK + kTcPad);
          wmma::load_matrix_sync(af, reinterpret_cast<const WT*>(&op.a[fr * 16][kk]), kTcK + kTcPad);
          wmma::mma_sync(acc[f], xf, af, acc[f]);
        }
      }
    }
  }
  __syncthreads();  // the operand tiles are done with: the result takes their place
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) {
    const int id = warp + f * kWarps;
    if (id < FM * FR)
      wmma::store_matrix_sync(&res.c[id / FR * 16][id % FR * 16], acc[f], RP + 4, wmma::mem_row_major);
  }
  __syncthreads();
  float* out = buf + (static_cast<int64_t>(split) * gridDim.z + j) * num_rows * R;
  for (int idx = threadIdx.x; idx < n * R; idx += kThreads) {
    const int m = idx / R, r = idx % R;
    out[static_cast<int64_t>(rows[m]) * R + r] = res.c[m][r];
  }
#else
  __trap();  // the host sends only sm_80+ here
#endif
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) expand_tc_kernel(
    T* __restrict__ y, int64_t sy0, const float* __restrict__ buf, const int64_t* __restrict__ table,
    const int* __restrict__ blocks, const int* __restrict__ sorted_rows, const int* __restrict__ ranks,
    const float* __restrict__ scalings, int num_rows, int R, int splits) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using WT = typename Wmma<T>::type;
  constexpr int BM = kTcRows, BN = tc_expand_cols(RP), FM = BM / 16, FN = BN / 16;
  constexpr int FRAGS = FM * FN / kWarps;
  struct Operands { T t[BM][RP + kTcPad]; T b[BN][RP + kTcPad]; };
  struct Result { float c[BM][BN + 4]; };
  __shared__ __align__(128) TcShared<Operands, Result> smem;
  __shared__ int rows[BM];
  auto& op = smem.op;
  auto& res = smem.res;

  const RowBlock blk = row_block(blocks);
  const int slot = blk.slot, n = blk.n;
  const int j = blockIdx.z;
  const int64_t* slice = table + j * kTableCols;
  const int64_t n_out = slice[8];
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
  if (slot < 0 || col0 >= n_out) return;
  const int rank = ranks != nullptr ? ranks[slot] : R;
  const float scale = scalings[slot];
  const int warp = threadIdx.x / 32;
  stage_rows(rows, sorted_rows, blk);
  __syncthreads();

  for (int idx = threadIdx.x; idx < BM * RP; idx += kThreads) {  // the rows' rank vectors, scaled, rounded
    const int m = idx / RP, r = idx % RP;
    float v = 0.f;
    if (m < n && r < rank) {
      for (int s = 0; s < splits; ++s)
        v += buf[((static_cast<int64_t>(s) * gridDim.z + j) * num_rows + rows[m]) * R + r];
    }
    op.t[m][r] = static_cast<T>(v * scale);
  }
  const T* b = reinterpret_cast<const T*>(slice[4]) + slot * slice[5] + col0 * slice[6];
  const int cols = static_cast<int>(n_out - col0 < BN ? n_out - col0 : BN);
  stage<T, BN, RP>(op.b, b, slice[6], nullptr, cols, rank);
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FRAGS];
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) {
    const int id = warp + f * kWarps, fm = id / FN, fn = id % FN;
    wmma::fill_fragment(acc[f], 0.f);
#pragma unroll
    for (int kk = 0; kk < RP; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> tf;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> bf;  // B^T: (r, c) at b[c][r]
      wmma::load_matrix_sync(tf, reinterpret_cast<const WT*>(&op.t[fm * 16][kk]), RP + kTcPad);
      wmma::load_matrix_sync(bf, reinterpret_cast<const WT*>(&op.b[fn * 16][kk]), RP + kTcPad);
      wmma::mma_sync(acc[f], tf, bf, acc[f]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) {
    const int id = warp + f * kWarps;
    wmma::store_matrix_sync(&res.c[id / FN * 16][id % FN * 16], acc[f], BN + 4, wmma::mem_row_major);
  }
  __syncthreads();
  T* y_tile = y + slice[9] + col0;
  for (int idx = threadIdx.x; idx < n * BN; idx += kThreads) {
    const int m = idx / BN, c = idx % BN;
    if (c < cols) {
      T* p = y_tile + rows[m] * sy0 + c;
      *p = static_cast<T>(static_cast<float>(*p) + res.c[m][c]);
    }
  }
#else
  __trap();
#endif
}

// Calls f(integral_constant<BM>, integral_constant<RP>) for the padded rank (16, 32, 64 or 128).
template <typename F>
void with_rank(int rp, F&& f) {
  using std::integral_constant;
  switch (rp) {
    case 16: f(integral_constant<int, 16>{}, integral_constant<int, 16>{}); break;
    case 32: f(integral_constant<int, 16>{}, integral_constant<int, 32>{}); break;
    case 64: f(integral_constant<int, 8>{}, integral_constant<int, 64>{}); break;
    default: f(integral_constant<int, 4>{}, integral_constant<int, 128>{}); break;
  }
}

// Calls f(integral_constant<RP>) for the padded rank.
template <typename F>
void with_padded_rank(int rp, F&& f) {
  using std::integral_constant;
  switch (rp) {
    case 16: f(integral_constant<int, 16>{}); break;
    case 32: f(integral_constant<int, 32>{}); break;
    case 64: f(integral_constant<int, 64>{}); break;
    default: f(integral_constant<int, 128>{}); break;
  }
}

template <typename T>
void launch_shrink(const Batch& b, const T* x, int64_t sx0, int K, float* buf, int splits, int k_per_split) {
  const dim3 grid(b.num_blocks, splits, b.num_slices);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (sizeof(T) == 2) {
    if (b.tensor_cores) {
      with_padded_rank(rank_pad(b.max_rank), [&](auto rp) {
        shrink_tc_kernel<T, decltype(rp)::value><<<grid, kThreads, 0, stream>>>(
            x, sx0, b.table, b.blocks, b.sorted_rows, b.ranks, buf, b.num_rows, K, b.max_rank, k_per_split);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  with_rank(rank_pad(b.max_rank), [&](auto bm, auto rp) {
    constexpr int kBM = decltype(bm)::value, kRW = decltype(rp)::value / kWarps;
    constexpr int kVec = 16 / sizeof(T);
    if (b.vec)
      shrink_kernel<T, kBM, kRW, kVec><<<grid, kThreads, 0, stream>>>(
          x, sx0, b.table, b.blocks, b.sorted_rows, b.ranks, buf, b.num_rows, K, b.max_rank, k_per_split);
    else
      shrink_kernel<T, kBM, kRW, 1><<<grid, kThreads, 0, stream>>>(
          x, sx0, b.table, b.blocks, b.sorted_rows, b.ranks, buf, b.num_rows, K, b.max_rank, k_per_split);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_expand(const Batch& b, T* y, int64_t sy0, const float* buf, int splits, const float* scalings,
                   int64_t max_out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (sizeof(T) == 2) {
    if (b.tensor_cores) {
      with_padded_rank(rank_pad(b.max_rank), [&](auto rp) {
        constexpr int kRP = decltype(rp)::value, kBN = tc_expand_cols(kRP);
        const dim3 grid(b.num_blocks, (max_out + kBN - 1) / kBN, b.num_slices);
        expand_tc_kernel<T, kRP><<<grid, kThreads, 0, stream>>>(
            y, sy0, buf, b.table, b.blocks, b.sorted_rows, b.ranks, scalings, b.num_rows, b.max_rank, splits);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 grid(b.num_blocks, (max_out + kThreads - 1) / kThreads, b.num_slices);
  with_rank(rank_pad(b.max_rank), [&](auto bm, auto rp) {
    constexpr int kBM = decltype(bm)::value, kRP = decltype(rp)::value;
    constexpr int kVec = 16 / sizeof(T);
    if (b.vec)
      expand_kernel<T, kBM, kRP, kVec><<<grid, kThreads, 0, stream>>>(
          y, sy0, buf, b.table, b.blocks, b.sorted_rows, b.ranks, scalings, b.num_rows, b.max_rank, splits);
    else
      expand_kernel<T, kBM, kRP, 1><<<grid, kThreads, 0, stream>>>(
          y, sy0, buf, b.table, b.blocks, b.sorted_rows, b.ranks, scalings, b.num_rows, b.max_rank, splits);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One translation unit per dtype instantiates these, so ninja compiles them in parallel.
#define LORAFLEET_INSTANTIATE(T)                                                                       \
  template void launch_shrink<T>(const Batch&, const T*, int64_t, int, float*, int, int);               \
  template void launch_expand<T>(const Batch&, T*, int64_t, const float*, int, const float*, int64_t);

}  // namespace lorafleet
