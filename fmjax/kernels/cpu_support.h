// Shared by the CPU kernels (fmjax/kernels/*.cc): 16-float vectors and a parallel loop on XLA's
// intra-op thread pool.
//
// Vectors are GCC vector extensions of 16 floats, one AVX-512 register each; the kernels' register
// tiles (16-28 accumulators) are sized for AVX-512's 32 registers, so other CPUs keep XLA's ops.
#ifndef FMJAX_KERNELS_CPU_SUPPORT_H_
#define FMJAX_KERNELS_CPU_SUPPORT_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "the CPU kernels are tuned for AVX-512 registers; elsewhere fmjax uses its XLA formulation"
#endif

namespace fmjax_kernels {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));

// _mm512_set1_ps is one vbroadcastss (or an FMA's embedded broadcast): `v16{} + s` compiled to a
// zeroing, a scalar add on an FMA port and then the broadcast, in the kernels' innermost loops.
inline v16 broadcast(float s) { return (v16)_mm512_set1_ps(s); }
// Columns rounded up to whole vectors.
inline int64_t Padded(int64_t columns) { return (columns + 15) / 16 * 16; }
inline float HorizontalSum(v16 v) { return _mm512_reduce_add_ps((__m512)v); }
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 relu(v16 v) { return v > 0 ? v : 0; }

// Runs body(state, begin, end) over [0, total) in chunks, on the calling thread and on XLA's intra-op
// pool. The chunks form up to kGroups contiguous groups; each group gets a fresh state, and the caller
// hands the groups' states to finish(state) in group order once all are done. So a kernel's sums
// (weight gradients, moments) do not depend on which thread ran which group: the results are
// bitwise reproducible (claiming chunks one by one into per-thread states was not). Groups are
// claimed from a counter, so a pool task that starts late (the pool busy with other ops) finds
// nothing left and returns; the caller waits only for groups, never for tasks to start.
template <typename State, typename Body, typename Finish>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t chunk, const Body& body, const Finish& finish) {
  constexpr int64_t kGroups = 8;
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
    std::unique_ptr<State> states[kGroups];
  };
  const int64_t chunks = (total + chunk - 1) / chunk;
  const int64_t groups = std::min<int64_t>(kGroups, chunks);
  auto shared = std::make_shared<Shared>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), groups) - 1;
  // A late task must not touch `body` (the caller's frame may be gone): it returns as soon as the
  // counter says every group is claimed. Scratch buffers are written before they are read and
  // accumulators have member initialisers, so `new State` leaves the rest uninitialised on purpose.
  auto work = [shared, groups, chunks, chunk, total, &body]() {
    for (int64_t g = shared->next.fetch_add(1); g < groups; g = shared->next.fetch_add(1)) {
      std::unique_ptr<State> state(new State);
      for (int64_t c = g * chunks / groups; c < (g + 1) * chunks / groups; ++c)
        body(*state, c * chunk, std::min(total, (c + 1) * chunk));
      shared->states[g] = std::move(state);
      std::lock_guard<std::mutex> lock(shared->mutex);
      if (shared->done.fetch_add(1) + 1 == groups) shared->finished.notify_all();
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  {
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->finished.wait(lock, [&] { return shared->done.load() == groups; });
  }
  for (int64_t g = 0; g < groups; ++g) finish(*shared->states[g]);
}

}  // namespace fmjax_kernels

#endif  // FMJAX_KERNELS_CPU_SUPPORT_H_
