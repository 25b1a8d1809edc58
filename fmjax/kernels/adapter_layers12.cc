// The spectral adapter's layers 1 and 2 on CPU, as XLA FFI custom calls (fmjax/kernels/cpu.py builds
// and registers them; fmjax/models/spectral_adapter.py says when they are used).
//
// For every pixel: the 8 taps of layer 1 at each of layer 2's window positions are read straight from
// the pixel's zero-padded band vector, layer 1 (BatchNorm already folded into its weights, bias as the
// eighth tap) and its ReLU give layer 2's [L2, 7 * 32] window matrix in a per-thread buffer, and layer 2's
// product with its bias gives the [L2, 64] output. XLA runs the same maths as a gather, two matmuls and
// a ReLU pass with layer 1's 1.4 x 1280-wide output written to and read back from memory; here it
// stays in the core's cache (benchmarks/adapter.py measures both).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_support.h"

using namespace fmjax_kernels;

namespace {

constexpr int kTaps = 8;          // layer 1's 7 taps + the constant-1 bias tap
constexpr int kKernel2 = 7;       // layer 2's kernel
constexpr int kC1 = 32;           // layer 1's channels
constexpr int kC2 = 64;           // layer 2's channels
constexpr int kWindow = kKernel2 * kC1;   // 224: one row of layer 2's window matrix
constexpr int kMaxPadded = 1024;  // padded band vector (bands + padding + the 1 and 0 columns)
constexpr int kMaxPositions = 64; // layer 2's output length (8 for 202 bands)
constexpr int64_t kPixelsPerChunk = 64;
constexpr int64_t kBackwardChunk = 32;

struct Geometry {
  int64_t pixels, bands, positions, pad_left, padded;
};

// The pixel's padded band vector around its bands (copied in per pixel): zeros, then the constant-1
// column of the bias tap and the 0 column of layer 2's padding windows.
inline void PadBands(const Geometry& g, float* xp) {
  std::fill(xp, xp + kMaxPadded, 0.0f);
  xp[g.padded] = 1.0f;
}

// Layer 1 + ReLU into `window` [positions, 224]. `xp` holds the pixel's padded band vector;
// index[(l * 7 + k) * 8 + t] is the band (or the 1 / 0 column) of tap t of window position k at
// output position l.
inline void Layer1(const float* xp, const int32_t* index, const v16 (&folded)[kTaps][2], int positions,
                   float* window) {
  for (int lk = 0; lk < positions * kKernel2; ++lk) {
    const int32_t* ix = index + lk * kTaps;
    v16 a0{}, a1{};
    for (int t = 0; t < kTaps; ++t) {
      const v16 s = broadcast(xp[ix[t]]);
      a0 += s * folded[t][0];
      a1 += s * folded[t][1];
    }
    store(window + lk * kC1, relu(a0));
    store(window + lk * kC1 + 16, relu(a1));
  }
}

// Layer 1 + ReLU into `window`, then layer 2 + bias into `out` [positions, 64].
inline void PixelForward(const float* xp, const int32_t* index, const v16 (&folded)[kTaps][2],
                         const float* w2, const v16 (&b2)[4], int positions, float* window, float* out) {
  Layer1(xp, index, folded, positions, window);
  // [positions, 224] x [224, 64], four rows at a time: 16 accumulators, 4 weight loads per k.
  int r0 = 0;
  for (; r0 + 4 <= positions; r0 += 4) {
    v16 acc[4][4];
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = b2[q];
    const float* rows = window + r0 * kWindow;
    for (int k = 0; k < kWindow; ++k) {
      const float* wk = w2 + k * kC2;
      const v16 w0 = load(wk), w1 = load(wk + 16), w2v = load(wk + 32), w3 = load(wk + 48);
      for (int r = 0; r < 4; ++r) {
        const v16 s = broadcast(rows[r * kWindow + k]);
        acc[r][0] += s * w0; acc[r][1] += s * w1; acc[r][2] += s * w2v; acc[r][3] += s * w3;
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) store(out + (r0 + r) * kC2 + 16 * q, acc[r][q]);
  }
  for (; r0 < positions; ++r0) {
    v16 acc[4] = {b2[0], b2[1], b2[2], b2[3]};
    const float* row = window + r0 * kWindow;
    for (int k = 0; k < kWindow; ++k) {
      const v16 s = broadcast(row[k]);
      for (int q = 0; q < 4; ++q) acc[q] += s * load(w2 + k * kC2 + 16 * q);
    }
    for (int q = 0; q < 4; ++q) store(out + r0 * kC2 + 16 * q, acc[q]);
  }
}

ffi::Error CheckShapes(const Geometry& g, ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> folded,
                       ffi::Buffer<ffi::F32> w2) {
  if (g.positions < 1 || g.positions > kMaxPositions || g.padded + 2 > kMaxPadded || g.pad_left < 0 ||
      g.pad_left + g.bands > g.padded)
    return ffi::Error::InvalidArgument("adapter kernel: unsupported band geometry");
  if (index.element_count() != static_cast<size_t>(g.positions * kKernel2 * kTaps) ||
      folded.element_count() != kTaps * kC1 || w2.element_count() != kWindow * kC2)
    return ffi::Error::InvalidArgument("adapter kernel: operand shapes do not match layers 7/5/32, 7/5/64");
  const int32_t* ix = index.typed_data();
  if (std::any_of(ix, ix + index.element_count(), [&](int32_t i) { return i < 0 || i > g.padded + 1; }))
    return ffi::Error::InvalidArgument("adapter kernel: tap index outside the padded band vector");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> index,
                       ffi::Buffer<ffi::F32> folded_weights, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                       int64_t pad_left, int64_t padded, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("adapter kernel: x must be [pixels, bands]");
  Geometry g{dims[0], dims[1], static_cast<int64_t>(index.element_count()) / (kKernel2 * kTaps), pad_left,
             padded};
  if (auto error = CheckShapes(g, index, folded_weights, w2); error.failure()) return error;
  if (b2.element_count() != kC2) return ffi::Error::InvalidArgument("adapter kernel: b2 must have 64 elements");
  v16 folded[kTaps][2];
  for (int t = 0; t < kTaps; ++t)
    for (int h = 0; h < 2; ++h) folded[t][h] = load(folded_weights.typed_data() + t * kC1 + 16 * h);
  v16 bias[4];
  for (int q = 0; q < 4; ++q) bias[q] = load(b2.typed_data() + 16 * q);
  const float* xs = x.typed_data();
  const int32_t* ix = index.typed_data();
  const float* w = w2.typed_data();
  float* o = out->typed_data();
  const int positions = static_cast<int>(g.positions);
  struct Scratch {
    alignas(64) float xp[kMaxPadded];
    alignas(64) float window[kMaxPositions * kWindow];
  };
  ParallelFor<Scratch>(pool, g.pixels, kPixelsPerChunk, [&](Scratch& s, int64_t begin, int64_t end) {
    PadBands(g, s.xp);
    for (int64_t p = begin; p < end; ++p) {
      std::memcpy(s.xp + g.pad_left, xs + p * g.bands, g.bands * sizeof(float));
      PixelForward(s.xp, ix, folded, w, bias, positions, s.window, o + p * positions * kC2);
    }
  }, [](Scratch&) {});
  return ffi::Error::Success();
}

// The backward of ForwardImpl, which saves nothing: for a chunk of pixels, layer 1 + ReLU again into
// the chunk's window rows, the gradient of those rows (grad_out x w2^T, masked by the ReLU), its
// product with layer 1's taps into grad_folded, and the chunk's rows^T x grad_out into grad_w2.
struct BackwardState {
  alignas(64) float xp[kMaxPadded];
  alignas(64) float windows[kBackwardChunk * kMaxPositions * kWindow];
  alignas(64) float grad_window[kMaxPositions * kWindow];
  alignas(64) float grad_w2[kWindow * kC2] = {};
  v16 grad_folded[kTaps][2] = {};
};

// grad_window [positions, 224] = grad [positions, 64] x w2t [64, 224], zero where window is.
inline void WindowGradient(const float* grad, const float* w2t, const float* window, int positions,
                           float* grad_window) {
  constexpr int kVectors = kWindow / 16;   // 14
  int r = 0;
  for (; r + 2 <= positions; r += 2) {
    v16 acc[2][kVectors] = {};
    for (int c = 0; c < kC2; ++c) {
      const v16 s0 = broadcast(grad[r * kC2 + c]), s1 = broadcast(grad[(r + 1) * kC2 + c]);
      for (int q = 0; q < kVectors; ++q) {
        const v16 w = load(w2t + c * kWindow + 16 * q);
        acc[0][q] += s0 * w;
        acc[1][q] += s1 * w;
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int q = 0; q < kVectors; ++q) {
        const int at = (r + i) * kWindow + 16 * q;
        store(grad_window + at, load(window + at) > 0 ? acc[i][q] : 0);
      }
  }
  for (; r < positions; ++r) {
    v16 acc[kVectors] = {};
    for (int c = 0; c < kC2; ++c) {
      const v16 s = broadcast(grad[r * kC2 + c]);
      for (int q = 0; q < kVectors; ++q) acc[q] += s * load(w2t + c * kWindow + 16 * q);
    }
    for (int q = 0; q < kVectors; ++q) {
      const int at = r * kWindow + 16 * q;
      store(grad_window + at, load(window + at) > 0 ? acc[q] : 0);
    }
  }
}

// grad_w2 [224, 64] += rows[n, 224]^T x grad[n, 64], four rows of grad_w2 at a time.
inline void AccumulateW2(const float* rows, const float* grad, int64_t n, float* grad_w2) {
  for (int k = 0; k < kWindow; k += 4) {
    v16 acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int q = 0; q < 4; ++q) acc[i][q] = load(grad_w2 + (k + i) * kC2 + 16 * q);
    for (int64_t j = 0; j < n; ++j) {
      const float* g = grad + j * kC2;
      const v16 g0 = load(g), g1 = load(g + 16), g2 = load(g + 32), g3 = load(g + 48);
      for (int i = 0; i < 4; ++i) {
        const v16 s = broadcast(rows[j * kWindow + k + i]);
        acc[i][0] += s * g0; acc[i][1] += s * g1; acc[i][2] += s * g2; acc[i][3] += s * g3;
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int q = 0; q < 4; ++q) store(grad_w2 + (k + i) * kC2 + 16 * q, acc[i][q]);
  }
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> index,
                        ffi::Buffer<ffi::F32> folded_weights, ffi::Buffer<ffi::F32> w2,
                        ffi::Buffer<ffi::F32> grad_out, int64_t pad_left, int64_t padded,
                        ffi::ResultBuffer<ffi::F32> grad_folded, ffi::ResultBuffer<ffi::F32> grad_w2) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("adapter kernel: x must be [pixels, bands]");
  Geometry g{dims[0], dims[1], static_cast<int64_t>(index.element_count()) / (kKernel2 * kTaps), pad_left,
             padded};
  if (auto error = CheckShapes(g, index, folded_weights, w2); error.failure()) return error;
  if (grad_out.element_count() != static_cast<size_t>(g.pixels * g.positions * kC2) ||
      grad_folded->element_count() != kTaps * kC1 || grad_w2->element_count() != kWindow * kC2)
    return ffi::Error::InvalidArgument("adapter kernel: gradient shapes do not match");
  v16 folded[kTaps][2];
  for (int t = 0; t < kTaps; ++t)
    for (int h = 0; h < 2; ++h) folded[t][h] = load(folded_weights.typed_data() + t * kC1 + 16 * h);
  std::vector<float> w2t(kC2 * kWindow);
  for (int k = 0; k < kWindow; ++k)
    for (int c = 0; c < kC2; ++c) w2t[c * kWindow + k] = w2.typed_data()[k * kC2 + c];
  float* out_folded = grad_folded->typed_data();
  float* out_w2 = grad_w2->typed_data();
  std::fill(out_folded, out_folded + kTaps * kC1, 0.0f);
  std::fill(out_w2, out_w2 + kWindow * kC2, 0.0f);
  const float* xs = x.typed_data();
  const float* grads = grad_out.typed_data();
  const int32_t* ix = index.typed_data();
  const int positions = static_cast<int>(g.positions);
  ParallelFor<BackwardState>(pool, g.pixels, kBackwardChunk, [&](BackwardState& s, int64_t begin, int64_t end) {
    PadBands(g, s.xp);
    for (int64_t p = begin; p < end; ++p) {
      std::memcpy(s.xp + g.pad_left, xs + p * g.bands, g.bands * sizeof(float));
      float* window = s.windows + (p - begin) * positions * kWindow;
      Layer1(s.xp, ix, folded, positions, window);
      WindowGradient(grads + p * positions * kC2, w2t.data(), window, positions, s.grad_window);
      v16 pixel_folded[kTaps][2] = {};   // in registers for the pixel, not in the state's memory
      for (int lk = 0; lk < positions * kKernel2; ++lk) {
        const v16 g0 = load(s.grad_window + lk * kC1), g1 = load(s.grad_window + lk * kC1 + 16);
        const int32_t* tap = ix + lk * kTaps;
        for (int t = 0; t < kTaps; ++t) {
          const v16 v = broadcast(s.xp[tap[t]]);
          pixel_folded[t][0] += v * g0;
          pixel_folded[t][1] += v * g1;
        }
      }
      for (int t = 0; t < kTaps; ++t)
        for (int h = 0; h < 2; ++h) s.grad_folded[t][h] += pixel_folded[t][h];
    }
    AccumulateW2(s.windows, grads + begin * positions * kC2, (end - begin) * positions, s.grad_w2);
  }, [&](BackwardState& s) {
    for (int i = 0; i < kWindow * kC2; ++i) out_w2[i] += s.grad_w2[i];
    for (int t = 0; t < kTaps; ++t)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 16; ++i) out_folded[t * kC1 + 16 * h + i] += s.grad_folded[t][h][i];
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAdapterLayers12, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("padded")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAdapterLayers12Backward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("padded")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
