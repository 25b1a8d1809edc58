// The spectral adapter's layer 3 on CPU, with the BatchNorm (bn_4) and ReLU before it, as XLA FFI
// custom calls (fmjax/kernels/cpu.py builds and registers them; fmjax/models/spectral_adapter.py says
// when they are used).
//
// bn_4's batch statistics need every pixel's layer-2 output, so the caller computes them and hands
// over the per-channel multiplier and offset they give. For every pixel, the kernel normalises its
// [L2, 64] layer-2 output, applies the ReLU into a zero-padded [L2 + 2, 64] buffer, where each of
// layer 3's windows (5 positions, stride 3) is a contiguous 320-float row, and multiplies those rows
// by layer 3's [320, 128] kernel. XLA builds the windows as a copy in memory (and the backward adds
// their gradients back in another pass); here they are read in place from the core's cache.

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_support.h"

using namespace fmjax_kernels;

namespace {

constexpr int kC2 = 64;            // layer 2's channels (layer 3's input)
constexpr int kKernel3 = 5;
constexpr int kStride3 = 3;        // padding 1: window o covers padded rows 3o .. 3o + 4
constexpr int kC3 = 128;
constexpr int kWindow3 = kKernel3 * kC2;   // 320
constexpr int kMaxPositions = 64;  // layer 2's output length (8 for 202 bands)
constexpr int64_t kChunk = 32;     // pixels per task
constexpr int kMaxRows = kChunk * kMaxPositions;

struct Shape3 {
  int64_t pixels, positions2, positions3;
};

// relu(h2 * multiplier + offset) for `pixels` pixels into their padded buffers [(L2 + 2) * 64]: a zero
// row, the L2 normalised rows, a zero row.
inline void NormalisedRows(const float* h2, const v16 (&multiplier)[4], const v16 (&offset)[4], int positions2,
                           int64_t pixels, float* padded) {
  const int stride = (positions2 + 2) * kC2;
  for (int64_t p = 0; p < pixels; ++p) {
    float* a = padded + p * stride;
    std::memset(a, 0, kC2 * sizeof(float));
    std::memset(a + (positions2 + 1) * kC2, 0, kC2 * sizeof(float));
    for (int l = 0; l < positions2; ++l)
      for (int q = 0; q < 4; ++q)
        store(a + (l + 1) * kC2 + 16 * q, relu(load(h2 + (p * positions2 + l) * kC2 + 16 * q) * multiplier[q] + offset[q]));
  }
}

// out[r] = rows[r] (320 floats each, anywhere) x w3 [320, 128] + b3, four rows and 64 columns at a time.
inline void Layer3Rows(const float* const* rows, int n, const float* w3, const float* b3, float* out) {
  for (int r0 = 0; r0 < n; r0 += 4) {
    const int m = std::min(4, n - r0);
    for (int half = 0; half < 2; ++half) {
      const int col = 64 * half;
      v16 acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int q = 0; q < 4; ++q) acc[i][q] = load(b3 + col + 16 * q);
      if (m == 4) {
        const float *a0 = rows[r0], *a1 = rows[r0 + 1], *a2 = rows[r0 + 2], *a3 = rows[r0 + 3];
        for (int k = 0; k < kWindow3; ++k) {
          const float* wk = w3 + k * kC3 + col;
          const v16 w0 = load(wk), w1 = load(wk + 16), w2 = load(wk + 32), w3v = load(wk + 48);
          const v16 s[4] = {broadcast(a0[k]), broadcast(a1[k]), broadcast(a2[k]), broadcast(a3[k])};
          for (int i = 0; i < 4; ++i) {
            acc[i][0] += s[i] * w0; acc[i][1] += s[i] * w1; acc[i][2] += s[i] * w2; acc[i][3] += s[i] * w3v;
          }
        }
      } else {
        for (int k = 0; k < kWindow3; ++k) {
          const float* wk = w3 + k * kC3 + col;
          for (int i = 0; i < m; ++i) {
            const v16 s = broadcast(rows[r0 + i][k]);
            for (int q = 0; q < 4; ++q) acc[i][q] += s * load(wk + 16 * q);
          }
        }
      }
      for (int i = 0; i < m; ++i)
        for (int q = 0; q < 4; ++q) store(out + (r0 + i) * kC3 + col + 16 * q, acc[i][q]);
    }
  }
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32> h2, ffi::Buffer<ffi::F32> multiplier, ffi::Buffer<ffi::F32> offset,
                       ffi::Buffer<ffi::F32> w3, Shape3* shape) {
  const auto dims = h2.dimensions();
  if (dims.size() != 3 || dims[2] != kC2 || dims[1] < 3 || dims[1] > kMaxPositions)
    return ffi::Error::InvalidArgument("adapter layer-3 kernel: h2 must be [pixels, L2 in 3..64, 64]");
  if (multiplier.element_count() != kC2 || offset.element_count() != kC2 || w3.element_count() != kWindow3 * kC3)
    return ffi::Error::InvalidArgument("adapter layer-3 kernel: operand shapes do not match layer 5/3/128");
  *shape = Shape3{dims[0], dims[1], (dims[1] + 2 - kKernel3) / kStride3 + 1};
  return ffi::Error::Success();
}

void LoadChannels(const float* values, v16 (&out)[4]) {
  for (int q = 0; q < 4; ++q) out[q] = load(values + 16 * q);
}

struct ForwardState {
  alignas(64) float padded[kChunk * (kMaxPositions + 2) * kC2];
  const float* rows[kMaxRows];
};

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h2, ffi::Buffer<ffi::F32> multiplier,
                       ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> b3,
                       ffi::ResultBuffer<ffi::F32> h3) {
  Shape3 shape;
  if (auto error = CheckShapes(h2, multiplier, offset, w3, &shape); error.failure()) return error;
  if (b3.element_count() != kC3 || h3->element_count() != static_cast<size_t>(shape.pixels * shape.positions3 * kC3))
    return ffi::Error::InvalidArgument("adapter layer-3 kernel: b3 or output shape does not match");
  v16 mult[4], off[4];
  LoadChannels(multiplier.typed_data(), mult);
  LoadChannels(offset.typed_data(), off);
  const int l2 = static_cast<int>(shape.positions2), l3 = static_cast<int>(shape.positions3);
  const float* in = h2.typed_data();
  float* out = h3->typed_data();
  ParallelFor<ForwardState>(pool, shape.pixels, kChunk, [&](ForwardState& s, int64_t begin, int64_t end) {
    NormalisedRows(in + begin * l2 * kC2, mult, off, l2, end - begin, s.padded);
    int n = 0;
    for (int64_t p = 0; p < end - begin; ++p)
      for (int o = 0; o < l3; ++o) s.rows[n++] = s.padded + p * (l2 + 2) * kC2 + kStride3 * o * kC2;
    Layer3Rows(s.rows, n, w3.typed_data(), b3.typed_data(), out + begin * l3 * kC3);
  }, [](ForwardState&) {});
  return ffi::Error::Success();
}

// The backward for h2, bn_4's multiplier and offset, and w3, from grad_h3 [pixels, L3, 128]:
// the windows' gradient (grad_h3 x w3^T) is added into each pixel's padded rows in cache, masked by
// the ReLU, and turned into the gradients of the normalisation's inputs.
struct BackwardState {
  alignas(64) float padded[kChunk * (kMaxPositions + 2) * kC2];
  alignas(64) float grad_padded[(kMaxPositions + 2) * kC2];
  alignas(64) float grad_windows[2][kWindow3];
  alignas(64) float grad_w3[kWindow3 * kC3] = {};
  v16 grad_multiplier[4] = {}, grad_offset[4] = {};
};

// grad_rows[i] [320] = grad[i] [128] x w3t [128, 320] for n <= 2 rows, 10 vectors of both rows at a time.
inline void WindowGradients(const float* const* grad, int n, const float* w3t, float (*grad_rows)[kWindow3]) {
  constexpr int kVectors = kWindow3 / 16 / 2;   // 10 per half
  for (int half = 0; half < 2; ++half) {
    const int col = half * kWindow3 / 2;
    v16 acc[2][kVectors] = {};
    for (int c = 0; c < kC3; ++c) {
      const v16 s0 = broadcast(grad[0][c]), s1 = broadcast(grad[n - 1][c]);
      for (int q = 0; q < kVectors; ++q) {
        const v16 w = load(w3t + c * kWindow3 + col + 16 * q);
        acc[0][q] += s0 * w;
        acc[1][q] += s1 * w;
      }
    }
    for (int i = 0; i < n; ++i)
      for (int q = 0; q < kVectors; ++q) store(grad_rows[i] + col + 16 * q, acc[i][q]);
  }
}

// grad_w3 [320, 128] += rows[j]^T x grad[j] over n rows, two rows of grad_w3 (eight vectors each) at a time.
inline void AccumulateW3(const float* const* rows, const float* grad, int n, float* grad_w3) {
  for (int k = 0; k < kWindow3; k += 2) {
    v16 acc[2][8];
    for (int i = 0; i < 2; ++i)
      for (int q = 0; q < 8; ++q) acc[i][q] = load(grad_w3 + (k + i) * kC3 + 16 * q);
    for (int j = 0; j < n; ++j) {
      const float* g = grad + j * kC3;
      const v16 s0 = broadcast(rows[j][k]), s1 = broadcast(rows[j][k + 1]);
      for (int q = 0; q < 8; ++q) {
        const v16 gq = load(g + 16 * q);
        acc[0][q] += s0 * gq;
        acc[1][q] += s1 * gq;
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int q = 0; q < 8; ++q) store(grad_w3 + (k + i) * kC3 + 16 * q, acc[i][q]);
  }
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h2, ffi::Buffer<ffi::F32> multiplier,
                        ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> grad_h3,
                        ffi::ResultBuffer<ffi::F32> grad_h2, ffi::ResultBuffer<ffi::F32> grad_multiplier,
                        ffi::ResultBuffer<ffi::F32> grad_offset, ffi::ResultBuffer<ffi::F32> grad_w3) {
  Shape3 shape;
  if (auto error = CheckShapes(h2, multiplier, offset, w3, &shape); error.failure()) return error;
  if (grad_h3.element_count() != static_cast<size_t>(shape.pixels * shape.positions3 * kC3) ||
      grad_h2->element_count() != h2.element_count() || grad_multiplier->element_count() != kC2 ||
      grad_offset->element_count() != kC2 || grad_w3->element_count() != kWindow3 * kC3)
    return ffi::Error::InvalidArgument("adapter layer-3 kernel: gradient shapes do not match");
  v16 mult[4], off[4];
  LoadChannels(multiplier.typed_data(), mult);
  LoadChannels(offset.typed_data(), off);
  std::vector<float> w3t(kC3 * kWindow3);
  for (int k = 0; k < kWindow3; ++k)
    for (int c = 0; c < kC3; ++c) w3t[c * kWindow3 + k] = w3.typed_data()[k * kC3 + c];
  const int l2 = static_cast<int>(shape.positions2), l3 = static_cast<int>(shape.positions3);
  const int stride = (l2 + 2) * kC2;
  const float* in = h2.typed_data();
  const float* grads = grad_h3.typed_data();
  float* out_h2 = grad_h2->typed_data();
  float* out_mult = grad_multiplier->typed_data();
  float* out_off = grad_offset->typed_data();
  float* out_w3 = grad_w3->typed_data();
  std::fill(out_mult, out_mult + kC2, 0.0f);
  std::fill(out_off, out_off + kC2, 0.0f);
  std::fill(out_w3, out_w3 + kWindow3 * kC3, 0.0f);
  ParallelFor<BackwardState>(pool, shape.pixels, kChunk, [&](BackwardState& s, int64_t begin, int64_t end) {
    NormalisedRows(in + begin * l2 * kC2, mult, off, l2, end - begin, s.padded);
    const float* rows[kMaxRows];
    int n = 0;
    for (int64_t p = 0; p < end - begin; ++p)
      for (int o = 0; o < l3; ++o) rows[n++] = s.padded + p * stride + kStride3 * o * kC2;
    AccumulateW3(rows, grads + begin * l3 * kC3, n, s.grad_w3);
    for (int64_t p = begin; p < end; ++p) {
      std::fill(s.grad_padded, s.grad_padded + stride, 0.0f);
      for (int o = 0; o < l3; o += 2) {   // windows overlap: each one's gradient is added into the rows
        const int n = std::min(2, l3 - o);
        const float* g[2] = {grads + (p * l3 + o) * kC3, grads + (p * l3 + o + n - 1) * kC3};
        WindowGradients(g, n, w3t.data(), s.grad_windows);
        for (int i = 0; i < n; ++i) {
          float* target = s.grad_padded + kStride3 * (o + i) * kC2;
          for (int q = 0; q < kWindow3 / 16; ++q) store(target + 16 * q, load(target + 16 * q) + load(s.grad_windows[i] + 16 * q));
        }
      }
      const float* a = s.padded + (p - begin) * stride;
      for (int l = 0; l < l2; ++l)
        for (int q = 0; q < 4; ++q) {
          const int at = (l + 1) * kC2 + 16 * q;
          const v16 g = load(a + at) > 0 ? load(s.grad_padded + at) : 0;   // through the ReLU
          const v16 x = load(in + (p * l2 + l) * kC2 + 16 * q);
          s.grad_offset[q] += g;
          s.grad_multiplier[q] += g * x;
          store(out_h2 + (p * l2 + l) * kC2 + 16 * q, g * mult[q]);
        }
    }
  }, [&](BackwardState& s) {
    for (int i = 0; i < kWindow3 * kC3; ++i) out_w3[i] += s.grad_w3[i];
    for (int q = 0; q < 4; ++q)
      for (int i = 0; i < 16; ++i) {
        out_mult[16 * q + i] += s.grad_multiplier[q][i];
        out_off[16 * q + i] += s.grad_offset[q][i];
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAdapterLayer3, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAdapterLayer3Backward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
