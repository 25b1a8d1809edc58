// Column means and centred lag products of a [rows, columns] matrix on CPU, as an XLA FFI custom call
// (fmjax/kernels/cpu.py builds and registers it): bn_1's batch statistics in the spectral adapter
// (fmjax/models/spectral_adapter.py, `window_moments`).
//
//   mean[j]    = sum_r x[r, j] / rows
//   lags[j, d] = sum_r (x[r, j] - mean[j]) (x[r, j + d] - mean[j + d]) / rows,  0 where j + d >= columns
//
// bn_1's statistics (the mean and covariance of layer 1's 7-tap windows) follow from the input bands'
// means and their lag products up to the kernel width. In XLA ops they took the unfolded
// [pixels, 40, 7] windows and their centred copy (2 x 18 MB at batch 16 x 32 px). Here the input is
// read twice (its means, then the centred products), rows in chunks whose float sums are added into
// double ones per thread; the second pass also sums the centred values, so the result is corrected for
// the first pass's rounding (the two-pass algorithm with its correction term).

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_support.h"

using namespace fmjax_kernels;

namespace {

constexpr int64_t kRowsPerChunk = 64;    // float sums over at most this many rows, then into doubles
constexpr int64_t kMaxLags = 16;

struct MeanState {
  std::vector<double> sums;
};

struct LagState {
  std::vector<double> centred_sums;   // [columns]
  std::vector<double> products;       // [lags][columns]
  // One centred row (zero past the last column) and this chunk's float sums.
  std::vector<float> centred, sum, prod;
};

ffi::Error MomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean_out,
                       ffi::ResultBuffer<ffi::F32> lags_out, int64_t lags) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || dims[0] < 1 || dims[1] < 1)
    return ffi::Error::InvalidArgument("column moments: x must be a non-empty [rows, columns] matrix");
  if (lags < 1 || lags > kMaxLags)
    return ffi::Error::InvalidArgument("column moments: lags must be in [1, 16]");
  const int64_t rows = dims[0], columns = dims[1], padded = Padded(columns);
  if (mean_out->element_count() != columns || lags_out->element_count() != columns * lags)
    return ffi::Error::InvalidArgument("column moments: result shapes must be [columns] and [columns, lags]");
  const float* data = x.typed_data();

  // Pass 1: column sums.
  std::vector<double> sums(columns, 0.0);
  ParallelFor<MeanState>(
      pool, rows, kRowsPerChunk,
      [&](MeanState& state, int64_t begin, int64_t end) {
        if (state.sums.empty()) state.sums.assign(columns, 0.0);
        alignas(64) float acc[16];
        for (int64_t j0 = 0; j0 < columns; j0 += 16) {
          const int64_t width = std::min<int64_t>(16, columns - j0);
          v16 total{};
          for (int64_t r = begin; r < end; ++r) {
            const float* row = data + r * columns + j0;
            if (width == 16) {
              total += load(row);
            } else {
              for (int64_t i = 0; i < width; ++i) total[i] += row[i];
            }
          }
          store(acc, total);
          for (int64_t i = 0; i < width; ++i) state.sums[j0 + i] += acc[i];
        }
      },
      [&](MeanState& state) {
        for (int64_t j = 0; j < columns; ++j) sums[j] += state.sums[j];
      });
  // Padded with zeros past the last column: lags that reach past it multiply by 0.
  std::vector<float> mean(padded + kMaxLags + 16, 0.0f);
  for (int64_t j = 0; j < columns; ++j) mean[j] = static_cast<float>(sums[j] / rows);

  // Pass 2: centred sums and lag products.
  std::vector<double> centred_sums(columns, 0.0), products(lags * columns, 0.0);
  ParallelFor<LagState>(
      pool, rows, kRowsPerChunk,
      [&](LagState& state, int64_t begin, int64_t end) {
        if (state.products.empty()) {
          state.centred_sums.assign(columns, 0.0);
          state.products.assign(lags * columns, 0.0);
          state.centred.assign(padded + kMaxLags + 16, 0.0f);
        }
        state.sum.assign(padded, 0.0f);
        state.prod.assign(lags * padded, 0.0f);
        float* centred = state.centred.data();
        float* sum = state.sum.data();
        float* prod = state.prod.data();
        const int64_t whole = columns / 16 * 16;
        for (int64_t r = begin; r < end; ++r) {
          const float* row = data + r * columns;
          for (int64_t j = 0; j < whole; j += 16) store(&centred[j], load(row + j) - load(&mean[j]));
          for (int64_t j = whole; j < columns; ++j) centred[j] = row[j] - mean[j];
          for (int64_t j = 0; j < padded; j += 16) {
            const v16 c = load(&centred[j]);
            store(&sum[j], load(&sum[j]) + c);
            for (int64_t d = 0; d < lags; ++d)
              store(&prod[d * padded + j], load(&prod[d * padded + j]) + c * load(&centred[j + d]));
          }
        }
        for (int64_t j = 0; j < columns; ++j) {
          state.centred_sums[j] += sum[j];
          for (int64_t d = 0; d < lags; ++d) state.products[d * columns + j] += prod[d * padded + j];
        }
      },
      [&](LagState& state) {
        for (int64_t j = 0; j < columns; ++j) centred_sums[j] += state.centred_sums[j];
        for (int64_t i = 0; i < lags * columns; ++i) products[i] += state.products[i];
      });

  float* mean_result = mean_out->typed_data();
  float* lags_result = lags_out->typed_data();
  for (int64_t j = 0; j < columns; ++j) {
    // The centred values' own mean (the first pass's rounding) corrects the mean and the products.
    const double shift_j = centred_sums[j] / rows;
    mean_result[j] = static_cast<float>(mean[j] + shift_j);
    for (int64_t d = 0; d < lags; ++d) {
      double value = 0.0;
      if (j + d < columns)
        value = products[d * columns + j] / rows - shift_j * (centred_sums[j + d] / rows);
      lags_result[j * lags + d] = static_cast<float>(value);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxColumnMoments, MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("lags"));
