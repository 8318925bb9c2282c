// SPDX-License-Identifier: Apache-2.0
#include "autoglm/core/tensor.hpp"

#include <limits>

#include "autoglm/backend/backend.hpp"

namespace autoglm {

Tensor::Tensor(Backend& backend, DType dtype, Shape shape, Layout layout) : backend_(&backend) {
  const std::int64_t n = shape.numel();
  AUTOGLM_CHECK(n >= 0 && static_cast<std::uint64_t>(n) <=
                              std::numeric_limits<std::size_t>::max() / 8,
                invalid_argument, "Tensor", "shape {} is too large", shape.str());
  AUTOGLM_CHECK(layout == Layout::row_major || shape.rank() >= 2, invalid_argument, "Tensor",
                "panel32 needs rank >= 2, got {}", shape.str());
  void* p = backend.allocate(TensorView::storage_bytes(layout, dtype, shape));
  storage_ = std::shared_ptr<void>(p, [b = &backend](void* q) { b->deallocate(q); });
  view_ = TensorView{p, dtype, backend.device(), shape, layout};
}

}  // namespace autoglm
