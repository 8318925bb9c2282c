// SPDX-License-Identifier: Apache-2.0
// CpuBackend's private state, shared by the translation units that implement its primitives.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "autoglm/backend/cpu_backend.hpp"

namespace autoglm {

struct CpuBackend::Impl {
  Impl(int threads, std::size_t cache_limit, bool huge_pages)
      : arena(threads), cache_limit(cache_limit), huge_pages(huge_pages) {}
  ~Impl() {
    for (auto& [size, p] : free_blocks) release(p);
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
  bool bf16_compute = false;  // CpuBackendOptions::bf16_compute, where AMX- or AVX512-BF16 runs
  bool bf16_amx = false;      // bf16_compute on AMX tiles (else AVX512_BF16 dot products)

  // CpuBackendOptions::huge_pages: buffers of kHugeMin bytes or more are their own 2 MiB-aligned
  // mappings, advised for transparent huge pages. Streaming gigabytes of expert weights through
  // 4 KiB pages costs a page walk every 64 cache lines, which the kernels' prefetches wait on.
  static constexpr std::size_t kHugePage = std::size_t{2} << 20;
  static constexpr std::size_t kHugeMin = std::size_t{16} << 20;
  bool huge_pages = true;
  std::unordered_map<void*, std::size_t> mapped;  // live and cached mappings, by length

  void* allocate_new(std::size_t bytes) {
    if (bytes > std::numeric_limits<std::size_t>::max() / 2) return nullptr;  // no wrap below
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge_pages && bytes >= kHugeMin) {
      // The trimmed ends must be whole pages, whatever the kernel's page size (4 KiB to 64 KiB).
      const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
      const std::size_t len = (bytes + page - 1) / page * page;
      void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (raw != MAP_FAILED) {
        auto* base = static_cast<char*>(raw);
        auto* p = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(base) + kHugePage - 1) /
                                          kHugePage * kHugePage);
        if (p > base) munmap(base, static_cast<std::size_t>(p - base));
        if (base + len + kHugePage > p + len)
          munmap(p + len, static_cast<std::size_t>(base + len + kHugePage - (p + len)));
        madvise(p, len, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
        try {
          std::lock_guard lock(pool_mutex);
          mapped[p] = len;
        } catch (...) {
          munmap(p, len);
          throw;
        }
        return p;
      }
      // No mapping to be had (map count or address-space limits): the heap may still serve.
    }
#endif
    const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + 63) / 64 * 64;
    return std::aligned_alloc(64, rounded);
  }

  // Returns a buffer of allocate_new to the system.
  void release(void* p) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    {
      std::lock_guard lock(pool_mutex);
      auto it = mapped.find(p);
      if (it != mapped.end()) {
        munmap(p, it->second);
        mapped.erase(it);
        return;
      }
    }
#endif
    std::free(p);
  }

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
    void* p = allocate_new(bytes);
    if (p && bytes >= kPoolMin && bytes <= kPoolMax) {
      std::lock_guard lock(pool_mutex);
      block_size[p] = (bytes + 63) / 64 * 64;
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
    release(p);
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
