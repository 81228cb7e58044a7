// Helpers shared by the CPU kernels (torch-side; not for the CUDA sources).
#pragma once

#include <cstdlib>
#include <ctime>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace refit {
namespace cpu {

// Multiversioning: a function marked REFIT_CPU_CLONES is compiled for AVX-512,
// AVX2+FMA and baseline x86-64 and the best one is picked at load time, so one
// build runs well on any x86 machine without -march=native. GCC does not
// clone templates: mark non-template wrappers.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REFIT_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define REFIT_CPU_CLONES
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Kernels may carry a hand-written AVX-512 loop (__attribute__((target(
// "avx512f")))), called only where has_avx512() says the CPU runs it.
#define REFIT_HAVE_AVX512 1
// REFIT_CPU_AVX512=0 in the environment turns these loops off (read once), so
// that the tests also run the portable loops that machines without AVX-512
// take.
inline bool has_avx512() {
  // Asked on first use, not in a static initialiser, which may run before
  // the compiler's CPU detection.
  static const bool yes = [] {
    const char* off = std::getenv("REFIT_CPU_AVX512");
    if (off != nullptr && off[0] == '0' && off[1] == '\0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}
#endif

// The type scores of type T are compared or accumulated in: float for the
// 16- and 32-bit types (which widen to it exactly), double for double.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// A new tensor that the caller is about to overwrite in full. Large outputs
// are advised onto transparent huge pages before their first touch: faulting
// in a 180 MB gradient 4 KiB at a time costs more than computing it. (torch
// does the same for all allocations under THP_MEM_ALLOC_ENABLE=1.) The advice
// is only a hint; where it is refused nothing changes.
inline at::Tensor empty_for_overwrite(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t stop = start + out.nbytes();
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = stop & ~(kHuge - 1);
  if (out.nbytes() >= 4 * kHuge && end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// Visits every (step, user) row of an (S, B, I) problem once, calling
// fn(s, b) from several threads. The walk is step-major (all users of step s,
// then of step s+1), so every thread streams long contiguous runs of memory,
// which the prefetchers follow. Users are taken in blocks whose rows of one
// step fill about kBlockBytes, a fraction of a last-level cache: the block's
// traj[s+1] rows, read as the next states of step s, are still cached when
// step s+1 reads them as its current states, so every plane of a trajectory
// comes from memory once.
// How much single-thread work a thread task must carry before a region is
// split over threads: about 1 ms. An OpenMP region ends when every thread of
// its team has finished, and on a shared machine one of them may be
// descheduled for a whole time slice (several ms): a 200 us region split over
// two threads then takes 30x longer than on one (benchmarks/results/
// contention.md). Below that, a region runs on the calling thread; above it,
// the slice a late thread holds up is small next to the region. Each kernel
// states its work in the unit of one of these rates, measured on one thread:
constexpr int64_t kStreamBytesPerMs = int64_t(8) << 20;  // reading or writing memory, ~8 GB/s
constexpr int64_t kScoresRankedPerMs = int64_t(4) << 20;  // target_rank: one compare per score
constexpr int64_t kScoresSelectedPerMs = int64_t(1) << 20;  // topk_hits: a selection per row

// REFIT_CPU_GRAIN_SCALE (a factor in (0, 1e6], default 1) scales every task's
// work: tests set it small so that small inputs still take the threaded paths.
// Read at each call (a few tens of ns next to a region of ~1 ms or more).
inline double grain_scale() {
  const char* s = std::getenv("REFIT_CPU_GRAIN_SCALE");
  if (s == nullptr) return 1.0;
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  return (end != s && v > 0.0 && v <= 1e6) ? v : 1.0;
}

// at::parallel_for's grain: items per task for about 1 ms of work per task.
inline int64_t grain_for(int64_t work_per_item, int64_t work_per_ms) {
  const double items = grain_scale() * static_cast<double>(work_per_ms) / static_cast<double>(std::max<int64_t>(1, work_per_item));
  return std::max<int64_t>(1, static_cast<int64_t>(items));
}

// --- Regions on a shared machine ---------------------------------------------
// grain_for keeps regions under about 1 ms on one thread. A larger region is
// still split, and still waits for a thread that the OS has descheduled (a
// region of 2.7 ms took 8 ms beside two busy processes). So every split
// region is watched: each task measures the CPU time its thread spent on it,
// and when the region's wall time is well above its longest task's CPU time,
// a thread was waiting for a core (it started late, or lost its core midway).
// After two such regions in a row, the regions of the next 100 ms run on the
// calling thread alone. The
// next split region after that tries again; while they keep being held up the
// pause doubles, up to 2 s, so on a machine that stays busy the cost is one
// slow region every 2 s, and on a quiet one nothing (a region costs two clock
// reads per task).
namespace watch {
constexpr int64_t kFirstPauseNs = 100'000'000;
constexpr int64_t kLongestPauseNs = 2'000'000'000;
// Waking a sleeping thread takes up to several hundred microseconds on a virtual machine (its idle
// vCPU must be scheduled again by the host); a descheduled thread costs a time slice, several ms.
constexpr int64_t kSlackNs = 1'000'000;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}
// CPU time of the calling thread: unlike wall time, it stops while the OS has
// the thread off its core.
inline int64_t thread_cpu_ns() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
#endif
  return now_ns();
}
inline std::atomic<int64_t>& serial_until() {
  static std::atomic<int64_t> until{0};
  return until;
}
inline std::atomic<int64_t>& pause_ns() {
  static std::atomic<int64_t> pause{kFirstPauseNs};
  return pause;
}
inline std::atomic<int>& strikes() {
  static std::atomic<int> count{0};
  return count;
}

// One split region: each task reports its thread's CPU time; done() judges.
class Region {
 public:
  Region() : start_(now_ns()) {}
  void task(int64_t cpu_ns) {
    for (int64_t cur = longest_.load(); cpu_ns > cur && !longest_.compare_exchange_weak(cur, cpu_ns);) {}
  }
  void done() const {
    const int64_t now = now_ns(), wall = now - start_, longest = longest_.load();
    if (longest <= 0) return;
    if (2 * wall > 3 * longest + 2 * kSlackNs) {  // wall > 1.5 x the longest task + 1 ms
      // Two held-up regions in a row: one alone is as likely a hiccup of a quiet machine.
      if (strikes().fetch_add(1, std::memory_order_relaxed) + 1 < 2) return;
      strikes().store(0, std::memory_order_relaxed);
      const int64_t pause = pause_ns().load(std::memory_order_relaxed);
      serial_until().store(now + pause, std::memory_order_relaxed);
      pause_ns().store(std::min(2 * pause, kLongestPauseNs), std::memory_order_relaxed);
    } else {
      strikes().store(0, std::memory_order_relaxed);
      pause_ns().store(kFirstPauseNs, std::memory_order_relaxed);
    }
  }

 private:
  int64_t start_;
  std::atomic<int64_t> longest_{0};
};
}  // namespace watch

// True while regions run on the calling thread alone (see watch above).
inline bool held_up_recently() {
  return watch::now_ns() < watch::serial_until().load(std::memory_order_relaxed);
}

// at::parallel_for(begin, end, grain, fn), watched: on one thread while a
// recent region was held up by a descheduled thread, else split and timed.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const int64_t n = end - begin;
  if (n <= grain || at::get_num_threads() == 1 || at::in_parallel_region() || held_up_recently()) {
    at::parallel_for(begin, end, std::max<int64_t>(n, 1), fn);  // grain >= n: the calling thread, inline
    return;
  }
  watch::Region region;
  at::parallel_for(begin, end, grain, [&](int64_t b0, int64_t b1) {
    const int64_t t0 = watch::thread_cpu_ns();
    fn(b0, b1);
    region.task(watch::thread_cpu_ns() - t0);
  });
  region.done();
}

template <typename F>
void for_each_step_row(int64_t S, int64_t B, int64_t row_bytes, const F& fn) {
  if (S == 0 || B == 0) return;
  constexpr int64_t kBlockBytes = 4 << 20;
  row_bytes = std::max<int64_t>(1, row_bytes);
  const int64_t block = std::clamp<int64_t>(kBlockBytes / row_bytes, 1, B);
  // About 1 ms of rows per task (see grain_for), so small problems stay on one thread.
  const int64_t grain = grain_for(row_bytes, kStreamBytesPerMs);
  for (int64_t b0 = 0; b0 < B; b0 += block) {
    const int64_t nb = std::min(block, B - b0);
    parallel_for(0, S * nb, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) fn(r / nb, b0 + r % nb);
    });
  }
}

}  // namespace cpu
}  // namespace refit
