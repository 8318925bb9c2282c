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

Tensor::Tensor(Backend& backend, TensorView view, std::shared_ptr<const void> keep_alive)
    : backend_(&backend) {
  AUTOGLM_CHECK(keep_alive != nullptr, invalid_argument, "Tensor",
                "an aliasing tensor needs an owner to keep its memory alive");
  AUTOGLM_CHECK(view.device == backend.device(), device, "Tensor",
                "view is on another device than backend {}", backend.name());
  AUTOGLM_CHECK(view.data != nullptr || view.numel() == 0, invalid_argument, "Tensor",
                "view {} has no buffer", view.shape.str());
  AUTOGLM_CHECK(view.layout == Layout::row_major || view.rank() >= 2, invalid_argument, "Tensor",
                "panel32 needs rank >= 2, got {}", view.shape.str());
  // Aliasing shared_ptr: shares keep_alive's ownership and points at the viewed bytes (or at
  // the owner for an empty view without a pointer, so defined() stays true).
  void* p = view.data ? view.data : const_cast<void*>(keep_alive.get());
  storage_ = std::shared_ptr<void>(std::const_pointer_cast<void>(std::move(keep_alive)), p);
  view_ = view;
}

}  // namespace autoglm
