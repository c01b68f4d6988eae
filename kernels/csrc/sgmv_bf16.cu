#include "sgmv.cuh"

namespace lorafleet {
LORAFLEET_INSTANTIATE(c10::BFloat16)
}  // namespace lorafleet
