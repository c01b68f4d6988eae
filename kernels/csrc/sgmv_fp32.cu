#include "sgmv.cuh"

namespace lorafleet {
LORAFLEET_INSTANTIATE(float)
}  // namespace lorafleet
