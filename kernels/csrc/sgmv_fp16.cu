#include "sgmv.cuh"

namespace lorafleet {
LORAFLEET_INSTANTIATE(c10::Half)
}  // namespace lorafleet
