// SPDX-License-Identifier: Apache-2.0
// Umbrella header: the whole public API.
#pragma once

#include "autoglm/backend/backend.hpp"
#include "autoglm/backend/cpu_backend.hpp"
#include "autoglm/core/dtype.hpp"
#include "autoglm/core/error.hpp"
#include "autoglm/core/tensor.hpp"
#include "autoglm/moe/aggregator.hpp"
#include "autoglm/moe/decoder.hpp"
#include "autoglm/moe/encoder.hpp"
#include "autoglm/moe/expert.hpp"
#include "autoglm/moe/gate.hpp"
#include "autoglm/moe/layer.hpp"
#include "autoglm/moe/pipeline.hpp"
#include "autoglm/moe/registry.hpp"
#include "autoglm/moe/routing.hpp"
#include "autoglm/version.hpp"
