// SPDX-License-Identifier: Apache-2.0
// CpuBackend's private state, shared by the translation units that implement its primitives.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "autoglm/backend/cpu_backend.hpp"

namespace autoglm {

struct CpuBackend::Impl {
  explicit Impl(int threads, std::size_t cache_limit) : arena(threads), cache_limit(cache_limit) {}
  ~Impl() {
    for (auto& [size, p] : free_blocks) std::free(p);
  }
  tbb::task_arena arena;

  // A caching pool for large buffers: a forward pass allocates the same activation sizes every
  // call, and returning them to the OS would page-fault them in again each time.
  static constexpr std::size_t kPoolMin = std::size_t{1} << 16;
  static constexpr std::size_t kPoolMax = std::size_t{1} << 28;
  std::mutex pool_mutex;
  std::unordered_map<void*, std::size_t> block_size;  // live pooled blocks
  std::multimap<std::size_t, void*> free_blocks;      // cached, by size
  std::size_t cached = 0;
  std::size_t cache_limit;
  bool bf16_compute = false;  // CpuBackendOptions::bf16_compute, where AMX-BF16 runs

  void* take(std::size_t bytes) {
    if (bytes >= kPoolMin && bytes <= kPoolMax) {
      std::lock_guard lock(pool_mutex);
      auto it = free_blocks.lower_bound(bytes);
      if (it != free_blocks.end() && it->first <= 2 * bytes) {
        void* p = it->second;
        block_size[p] = it->first;
        cached -= it->first;
        free_blocks.erase(it);
        return p;
      }
    }
    const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (p && bytes >= kPoolMin && bytes <= kPoolMax) {
      std::lock_guard lock(pool_mutex);
      block_size[p] = rounded;
    }
    return p;
  }

  void give(void* p) noexcept {
    if (!p) return;
    {
      std::lock_guard lock(pool_mutex);
      auto it = block_size.find(p);
      if (it != block_size.end()) {
        const std::size_t size = it->second;
        block_size.erase(it);
        if (cached + size <= cache_limit) {
          free_blocks.emplace(size, p);
          cached += size;
          return;
        }
      }
    }
    std::free(p);
  }

  /// f(i) for i in [0, n) on the backend's threads, chunks of at least `grain`.
  template <typename F>
  void parallel(std::int64_t n, std::int64_t grain, F&& f) {
    if (n <= 0) return;
    arena.execute([&] {
      tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, n, std::max<std::int64_t>(grain, 1)),
                        [&](const tbb::blocked_range<std::int64_t>& r) {
                          for (std::int64_t i = r.begin(); i != r.end(); ++i) f(i);
                        });
    });
  }
};

}  // namespace autoglm
