// LayerNorm over the last axis of a [rows, C] matrix on CPU, forward and backward, as XLA FFI custom
// calls (fmjax/kernels/cpu.py builds and registers them): the ViTs' norm1 / norm2 / norm
// (fmjax/models/layers.py, `KernelLayerNorm`).
//
//   forward:  mean_r = sum_j x_rj / C,  rstd_r = 1 / sqrt(sum_j (x_rj - mean_r)^2 / C + eps)
//             y_rj = (x_rj - mean_r) rstd_r scale_j + bias_j
//   backward: xhat = (x - mean) rstd,  g = dy scale,
//             dx_rj = rstd_r (g_rj - mean_j g_rj - xhat_rj mean_j (g_rj xhat_rj)),
//             dscale_j = sum_r dy_rj xhat_rj,  dbias_j = sum_r dy_rj
//
// XLA runs this as several reduction and elementwise fusions per direction (row statistics, the
// normalised output, and in the backward two row means and two column sums), each a pass over the
// activations (docs/speed.md item 21). Here each direction is one pass over rows that stay in L1: the
// forward reads x once (each row's statistics two-pass from a copy in L1, with the correction term of
// the centred sum) and writes y; the backward reads x and dy and writes dx, with the column sums in
// per-group states added in group order (ParallelFor), so they are reproducible.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_support.h"

using namespace fmjax_kernels;

namespace {

constexpr int64_t kRowsPerChunk = 16;
constexpr int64_t kMaxColumns = 4096;

// One row copied into a zero-padded buffer, so that every column block is a whole vector.
struct RowBuffer {
  alignas(64) float values[kMaxColumns];
};

ffi::Error CheckShapes(int64_t rows, int64_t columns, int64_t params) {
  if (rows < 1 || columns < 1 || columns > kMaxColumns)
    return ffi::Error::InvalidArgument("layer norm: x must be a non-empty [rows, C] matrix with C <= 4096");
  if (params != columns) return ffi::Error::InvalidArgument("layer norm: scale and bias must have C elements");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd, float epsilon) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("layer norm: x must be [rows, C]");
  const int64_t rows = dims[0], columns = dims[1], padded = Padded(columns);
  if (auto error = CheckShapes(rows, columns, scale.element_count()); error.failure()) return error;
  if (bias.element_count() != columns) return ffi::Error::InvalidArgument("layer norm: bias must have C elements");
  const float* in = x.typed_data();
  float* out = y->typed_data();
  float* mean_out = mean->typed_data();
  float* rstd_out = rstd->typed_data();
  std::vector<float> scale_padded(padded, 0.0f), bias_padded(padded, 0.0f);
  std::memcpy(scale_padded.data(), scale.typed_data(), columns * sizeof(float));
  std::memcpy(bias_padded.data(), bias.typed_data(), columns * sizeof(float));
  const float* gamma = scale_padded.data();
  const float* beta = bias_padded.data();
  const float inverse_columns = 1.0f / static_cast<float>(columns);
  const int64_t whole = columns / 16 * 16;
  ParallelFor<RowBuffer>(
      pool, rows, kRowsPerChunk,
      [&](RowBuffer& buffer, int64_t begin, int64_t end) {
        float* row = buffer.values;
        for (int64_t r = begin; r < end; ++r) {
          const float* source = in + r * columns;
          std::memcpy(row, source, columns * sizeof(float));
          std::memset(row + columns, 0, (padded - columns) * sizeof(float));
          v16 sum{};
          for (int64_t j = 0; j < padded; j += 16) sum += load(row + j);
          float mu = HorizontalSum(sum) * inverse_columns;
          // The centred values' own mean corrects the first pass's rounding (as column_moments.cc).
          v16 squares{}, centred_sum{};
          for (int64_t j = 0; j < whole; j += 16) {
            const v16 centred = load(row + j) - mu;
            centred_sum += centred;
            squares += centred * centred;
          }
          float tail = 0.0f, tail_sum = 0.0f;
          for (int64_t j = whole; j < columns; ++j) {
            tail_sum += row[j] - mu;
            tail += (row[j] - mu) * (row[j] - mu);
          }
          const float shift = (HorizontalSum(centred_sum) + tail_sum) * inverse_columns;
          const float variance = (HorizontalSum(squares) + tail) * inverse_columns - shift * shift;
          mu += shift;
          const float inverse = 1.0f / std::sqrt(std::max(variance, 0.0f) + epsilon);
          mean_out[r] = mu;
          rstd_out[r] = inverse;
          float* target = out + r * columns;
          for (int64_t j = 0; j < whole; j += 16)
            store(target + j, (load(row + j) - mu) * inverse * load(gamma + j) + load(beta + j));
          for (int64_t j = whole; j < columns; ++j) target[j] = (row[j] - mu) * inverse * gamma[j] + beta[j];
        }
      },
      [](RowBuffer&) {});
  return ffi::Error::Success();
}

struct GradientState {
  std::vector<double> scale_sums, bias_sums;
  std::vector<float> scale_chunk, bias_chunk;
  alignas(64) float xhat[kMaxColumns];
  alignas(64) float g[kMaxColumns];
};

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("layer norm backward: x must be [rows, C]");
  const int64_t rows = dims[0], columns = dims[1], padded = Padded(columns);
  if (auto error = CheckShapes(rows, columns, scale.element_count()); error.failure()) return error;
  if (mean.element_count() != rows || rstd.element_count() != rows || dy.element_count() != rows * columns)
    return ffi::Error::InvalidArgument("layer norm backward: mean, rstd must be [rows] and dy like x");
  const float* in = x.typed_data();
  const float* grad = dy.typed_data();
  const float* means = mean.typed_data();
  const float* rstds = rstd.typed_data();
  float* grad_in = dx->typed_data();
  std::vector<float> scale_padded(padded, 0.0f);
  std::memcpy(scale_padded.data(), scale.typed_data(), columns * sizeof(float));
  const float* gamma = scale_padded.data();
  const float inverse_columns = 1.0f / static_cast<float>(columns);
  std::vector<double> scale_total(columns, 0.0), bias_total(columns, 0.0);
  ParallelFor<GradientState>(
      pool, rows, kRowsPerChunk,
      [&](GradientState& state, int64_t begin, int64_t end) {
        if (state.scale_sums.empty()) {
          state.scale_sums.assign(columns, 0.0);
          state.bias_sums.assign(columns, 0.0);
          state.scale_chunk.resize(padded);
          state.bias_chunk.resize(padded);
        }
        std::fill(state.scale_chunk.begin(), state.scale_chunk.end(), 0.0f);
        std::fill(state.bias_chunk.begin(), state.bias_chunk.end(), 0.0f);
        float* xhat = state.xhat;
        float* g = state.g;
        float* scale_chunk = state.scale_chunk.data();
        float* bias_chunk = state.bias_chunk.data();
        for (int64_t r = begin; r < end; ++r) {
          const float mu = means[r], inverse = rstds[r];
          const float* x_row = in + r * columns;
          const float* dy_row = grad + r * columns;
          // Zero past the last column: g and xhat contribute nothing there.
          std::memset(xhat + columns, 0, (padded - columns) * sizeof(float));
          std::memset(g + columns, 0, (padded - columns) * sizeof(float));
          for (int64_t j = 0; j < columns; ++j) {
            xhat[j] = (x_row[j] - mu) * inverse;
            g[j] = dy_row[j];
          }
          v16 g_sum{}, gx_sum{};
          for (int64_t j = 0; j < padded; j += 16) {
            const v16 dyv = load(g + j), xh = load(xhat + j);
            store(bias_chunk + j, load(bias_chunk + j) + dyv);
            store(scale_chunk + j, load(scale_chunk + j) + dyv * xh);
            const v16 gv = dyv * load(gamma + j);
            store(g + j, gv);
            g_sum += gv;
            gx_sum += gv * xh;
          }
          const float a = HorizontalSum(g_sum) * inverse_columns;
          const float b = HorizontalSum(gx_sum) * inverse_columns;
          float* target = grad_in + r * columns;
          const int64_t whole = columns / 16 * 16;
          for (int64_t j = 0; j < whole; j += 16)
            store(target + j, (load(g + j) - a - load(xhat + j) * b) * inverse);
          for (int64_t j = whole; j < columns; ++j) target[j] = (g[j] - a - xhat[j] * b) * inverse;
        }
        for (int64_t j = 0; j < columns; ++j) {
          state.scale_sums[j] += scale_chunk[j];
          state.bias_sums[j] += bias_chunk[j];
        }
      },
      [&](GradientState& state) {
        for (int64_t j = 0; j < columns; ++j) {
          scale_total[j] += state.scale_sums[j];
          bias_total[j] += state.bias_sums[j];
        }
      });
  float* scale_out = dscale->typed_data();
  float* bias_out = dbias->typed_data();
  for (int64_t j = 0; j < columns; ++j) {
    scale_out[j] = static_cast<float>(scale_total[j]);
    bias_out[j] = static_cast<float>(bias_total[j]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxLayerNorm, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxLayerNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
