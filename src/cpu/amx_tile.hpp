// SPDX-License-Identifier: Apache-2.0
// The 64-byte operand of LDTILECFG, shared by the AMX kernels (int8 and bf16). Plain data only:
// the files that include it are built with AMX flags and must instantiate no library template.
#pragma once

#include <cstdint>

namespace autoglm::detail {

/// Palette 1 tile configuration: per tile register, bytes per row and rows.
struct alignas(64) AmxTileConfig {
  std::uint8_t palette = 1;        ///< palette 1: 8 tiles of up to 16 rows x 64 bytes
  std::uint8_t start_row = 0;      ///< restart row after an interrupted load / store
  std::uint8_t reserved[14] = {};  ///< must be zero
  std::uint16_t colsb[16] = {};    ///< bytes per row of tmm0 ... tmm7 (8 ... 15 reserved)
  std::uint8_t rows[16] = {};      ///< rows of tmm0 ... tmm7
};

}  // namespace autoglm::detail
