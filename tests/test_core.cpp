// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>

#include "autoglm/autoglm.hpp"

TEST_CASE("placeholder builds") { REQUIRE(autoglm::dtype_size(autoglm::DType::bf16) == 2); }
