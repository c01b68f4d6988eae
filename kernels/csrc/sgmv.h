// Host-side interface of the SGMV kernels (sgmv.cuh), for the binding compiled by the host compiler.
#pragma once

#include <cstdint>

namespace lorafleet {

// Rank padded to the next power of two >= 16: one kernel instantiation per padded rank.
inline int rank_pad(int max_rank) {
  int rp = 16;
  while (rp < max_rank) rp *= 2;
  return rp;
}

// Rows per CTA for a padded rank: fewer rows for larger ranks keep the accumulators in registers.
inline int block_rows_for(int rp) { return rp <= 32 ? 16 : (rp == 64 ? 8 : 4); }

// Rows per CTA of the tensor-core kernels.
constexpr int kTcRows = 64;

struct Batch {  // what the shrink and the expand both read
  const int64_t* table;
  const int* blocks;
  int num_blocks;
  const int* sorted_rows;
  const int* ranks;  // nullptr: every slot has the full rank
  int num_rows;
  int num_slices;
  int max_rank;
  bool vec;  // 16-byte loads: rows and strides are aligned (checked by the caller)
  bool tensor_cores;  // 16-bit, sm_80+, vec, and blocks of kTcRows rows (the caller's choice)
};

template <typename T>
void launch_shrink(const Batch& b, const T* x, int64_t sx0, int K, float* buf, int splits, int k_per_split);

template <typename T>
void launch_expand(const Batch& b, T* y, int64_t sy0, const float* buf, int splits, const float* scalings,
                   int64_t max_out);

}  // namespace lorafleet
