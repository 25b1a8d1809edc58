// Softmax self-attention for short sequences (a ViT-S/4's 65 tokens at 32 px) on CPU, as XLA FFI
// custom calls (fmjax/kernels/cpu.py builds and registers them; fmjax/models/transformer.py says when
// they are used).
//
// XLA forms attention from batched [L, L] x [L, d] matmuls with transposes of q, k, v and the output
// around them (head-major copies), and the softmax in separate passes; at L = 65 these small products
// run far below the matmul peak. Here one task takes one (sample, head) pair: its q, k and v are read
// from the fused qkv projection [B, L, 3, heads, d] (before its bias, which the kernel adds as it
// copies them into the core's cache: XLA would add it in a pass of its own), the [L, L] weights stay
// in cache, and the output is written token-major [B, L, heads, d], ready for the output projection.
// The forward pass also returns each query's softmax statistics (its largest logit and the reciprocal
// of its sum of exponentials; a log-sum-exp in float32 would lose the weights' precision at logits of
// ~1e3), from which the backward pass evaluates the same weights again instead of saving them.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <immintrin.h>

#include "cpu_support.h"

using namespace fmjax_kernels;

namespace {

constexpr int kMaxLength = 256;    // tokens (transformer.py falls back to XLA above this)
constexpr int kMaxHeadDim = 128;   // a multiple of 16 up to this
constexpr int kMaxPadded = kMaxLength;   // L rounded up to 16

typedef int32_t v16i __attribute__((vector_size(64)));

// exp for x <= ~88 (Cephes' expf polynomial on x - n ln 2, n = round(x / ln 2)); below -87 it
// returns ~0, which is all the softmax needs for its shifted logits.
inline v16 Exp(v16 x) {
  x = x < -87.0f ? broadcast(-87.0f) : x;
  const v16 t = x * 1.44269504088896341f + 0.5f;
  v16i n = __builtin_convertvector(t, v16i);                 // truncates towards zero
  n += (__builtin_convertvector(n, v16) > t);                // -1 where that rounded up: floor
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v16 p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i scale_bits = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

// c[r, 16 v + i] = sum_k a(r, k) b[k, 16 v + i] for MR rows and NV vectors of columns, where a(r, k)
// is a[r * lda + k], or a[k * lda + r] with kTransposedA.
template <int MR, int NV, bool kTransposedA>
inline void Tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int depth) {
  v16 acc[MR][NV] = {};
  for (int k = 0; k < depth; ++k) {
    v16 row[NV];
    for (int v = 0; v < NV; ++v) row[v] = load(b + k * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const v16 x = broadcast(kTransposedA ? a[k * lda + r] : a[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += x * row[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + 16 * v, acc[r][v]);
}

// The last n < kRows rows of a block: one tile of exactly n rows (only the sizes that can occur are
// instantiated, so no tile wider than the register file is compiled).
template <int R, int NV, bool kTransposedA>
inline void TailRows(int n, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                     int depth) {
  if constexpr (R > 0) {
    if (n == R) return Tile<R, NV, kTransposedA>(a, lda, b, ldb, c, ldc, depth);
    TailRows<R - 1, NV, kTransposedA>(n, a, lda, b, ldb, c, ldc, depth);
  }
}

template <int NV, bool kTransposedA>
void Rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int rows, int depth) {
  constexpr int kRows = NV >= 5 ? 4 : NV >= 3 ? 6 : 8;   // 20-24 accumulators, 16 for one vector
  const int64_t next_a = kTransposedA ? 1 : lda;   // a's step from one row of c to the next
  int r = 0;
  for (; r + kRows <= rows; r += kRows) Tile<kRows, NV, kTransposedA>(a + r * next_a, lda, b, ldb, c + r * ldc, ldc, depth);
  TailRows<kRows - 1, NV, kTransposedA>(rows - r, a + r * next_a, lda, b, ldb, c + r * ldc, ldc, depth);
}

// c[rows, columns] = a(rows, depth) . b[depth, columns]; columns a multiple of 16.
template <bool kTransposedA = false>
void Matmul(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int rows, int columns,
            int depth) {
  int j = 0;
  for (; j + 64 <= columns; j += 64) {
    if (columns - j == 80) {   // a 65-80 token row of logits: one pass of five vectors, no 16-wide tail
      Rows<5, kTransposedA>(a, lda, b + j, ldb, c + j, ldc, rows, depth);
      return;
    }
    Rows<4, kTransposedA>(a, lda, b + j, ldb, c + j, ldc, rows, depth);
  }
  switch ((columns - j) / 16) {
    case 3: Rows<3, kTransposedA>(a, lda, b + j, ldb, c + j, ldc, rows, depth); break;
    case 2: Rows<2, kTransposedA>(a, lda, b + j, ldb, c + j, ldc, rows, depth); break;
    case 1: Rows<1, kTransposedA>(a, lda, b + j, ldb, c + j, ldc, rows, depth); break;
    default: break;
  }
}

struct Shape {
  int64_t batch, length, heads, head_dim;
  int padded;   // length rounded up to 16: the row stride of the [L, L] buffers
  int64_t qkv_row() const { return 3 * heads * head_dim; }   // one token's q|k|v
  int64_t out_row() const { return heads * head_dim; }
};

Shape ShapeOf(const ffi::Buffer<ffi::F32>& qkv) {
  const auto d = qkv.dimensions();
  Shape s{d[0], d[1], d[3], d[4], 0};
  s.padded = static_cast<int>((s.length + 15) / 16 * 16);
  return s;
}

ffi::Error Check(const ffi::Buffer<ffi::F32>& qkv, const ffi::Buffer<ffi::F32>& bias, float scale) {
  const auto d = qkv.dimensions();
  if (d.size() != 5 || d[2] != 3)
    return ffi::Error::InvalidArgument("attention kernel: qkv must be [B, L, 3, heads, d]");
  if (d[1] < 1 || d[1] > kMaxLength || d[4] % 16 || d[4] > kMaxHeadDim)
    return ffi::Error::InvalidArgument("attention kernel: needs 1 <= L <= 256 and head_dim a multiple of 16 up to 128");
  if (bias.element_count() != static_cast<size_t>(3 * d[3] * d[4]))
    return ffi::Error::InvalidArgument("attention kernel: the qkv bias must be [3, heads, d]");
  if (!(scale > 0))   // the softmax's shift takes the largest raw product as the largest logit
    return ffi::Error::InvalidArgument("attention kernel: the logits' scale must be > 0");
  return ffi::Error::Success();
}

struct alignas(64) Scratch {
  float q[kMaxLength * kMaxHeadDim];           // the pair's q with its bias: [L, d]
  float k[kMaxLength * kMaxHeadDim];           // k or v with its bias (the products that take rows)
  float kt[kMaxHeadDim * kMaxPadded];          // k or v with its bias, transposed: [d, padded]
  float weights[kMaxLength * kMaxPadded];      // the [L, L] softmax weights
  float grad[kMaxLength * kMaxPadded];         // the [L, L] gradient of the logits (backward)
};

// `length` rows of d (row stride ld) plus bias[d] -> rows[length, d].
void CopyWithBias(const float* x, int64_t ld, const float* bias, const Shape& s, float* rows) {
  for (int64_t j = 0; j < s.length; ++j)
    for (int64_t i = 0; i < s.head_dim; i += 16) store(rows + j * s.head_dim + i, load(x + j * ld + i) + load(bias + i));
}

// `length` rows of d (row stride ld) plus bias[d] -> t[d, padded], zero beyond `length`.
void TransposeWithBias(const float* x, int64_t ld, const float* bias, const Shape& s, float* t) {
  for (int64_t i = 0; i < s.head_dim; ++i) {
    float* row = t + i * s.padded;
    for (int64_t j = 0; j < s.length; ++j) row[j] = x[j * ld + i] + bias[i];
    std::fill(row + s.length, row + s.padded, 0.0f);
  }
}

// weights[i, :] = exp(scale * logits[i, :] - max_i) / sum_i for the first `length` columns, 0 beyond.
// The forward pass (known == nullptr) computes the statistics (max_i, 1 / sum_i) and writes them to
// stats[2 i], stats[2 i + 1]; the backward pass reads them from known[2 i], known[2 i + 1]. Only the
// last vector of a row has padded columns (scale > 0, so the largest logit is the largest raw
// product). Rows go in groups of R, whose independent reductions overlap.
template <int R>
inline void SoftmaxRows(float* weights, const Shape& s, float scale, const float* known, float* stats) {
  const int full = static_cast<int>(s.length / 16);
  const int vectors = s.padded / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (s.length % 16)) - 1);
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float shift[R];
  if (known) {
    for (int r = 0; r < R; ++r) shift[r] = known[2 * r];
  } else {
    __m512 m[R];
    for (int r = 0; r < R; ++r) m[r] = lowest;
    for (int v = 0; v < full; ++v)
      for (int r = 0; r < R; ++r) m[r] = _mm512_max_ps(m[r], _mm512_loadu_ps(weights + r * s.padded + 16 * v));
    if (full < vectors)
      for (int r = 0; r < R; ++r)
        m[r] = _mm512_max_ps(m[r], _mm512_mask_loadu_ps(lowest, tail, weights + r * s.padded + 16 * full));
    for (int r = 0; r < R; ++r) shift[r] = _mm512_reduce_max_ps(m[r]) * scale;
  }
  v16 total[R] = {};
  for (int v = 0; v < vectors; ++v)
    for (int r = 0; r < R; ++r) {
      float* at = weights + r * s.padded + 16 * v;
      v16 e = Exp(load(at) * scale - shift[r]);
      if (known) e *= known[2 * r + 1];
      if (v == full) e = _mm512_maskz_mov_ps(tail, e);
      total[r] += e;
      store(at, e);
    }
  if (known) return;
  v16 inverse[R];
  for (int r = 0; r < R; ++r) {
    const float sum = HorizontalSum(total[r]);
    inverse[r] = broadcast(1.0f / sum);
    stats[2 * r] = shift[r];
    stats[2 * r + 1] = 1.0f / sum;
  }
  for (int v = 0; v < vectors; ++v)
    for (int r = 0; r < R; ++r) {
      float* at = weights + r * s.padded + 16 * v;
      store(at, load(at) * inverse[r]);
    }
}

void Softmax(float* weights, const Shape& s, float scale, const float* known, float* stats) {
  for (int64_t i = 0; i < s.length;) {
    const float* row_known = known ? known + 2 * i : nullptr;
    float* row_stats = stats ? stats + 2 * i : nullptr;
    if (i + 4 <= s.length) {
      SoftmaxRows<4>(weights + i * s.padded, s, scale, row_known, row_stats);
      i += 4;
    } else {
      SoftmaxRows<1>(weights + i * s.padded, s, scale, row_known, row_stats);
      i += 1;
    }
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> stats, float scale) {
  if (auto error = Check(qkv, bias, scale); error.failure()) return error;
  const Shape s = ShapeOf(qkv);
  const float* in = qkv.typed_data();
  const float* bias_all = bias.typed_data();
  float* o = out->typed_data();
  float* l = stats->typed_data();
  struct State : Scratch {};
  ParallelFor<State>(pool, s.batch * s.heads, 1, [&](State& st, int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / s.heads, h = pair % s.heads;
      const float* q = in + b * s.length * s.qkv_row() + h * s.head_dim;
      const float* k = q + s.heads * s.head_dim;
      const float* v = k + s.heads * s.head_dim;
      const float* bq = bias_all + h * s.head_dim;
      const float* bk = bq + s.heads * s.head_dim;
      const float* bv = bk + s.heads * s.head_dim;
      CopyWithBias(q, s.qkv_row(), bq, s, st.q);
      TransposeWithBias(k, s.qkv_row(), bk, s, st.kt);
      Matmul(st.q, s.head_dim, st.kt, s.padded, st.weights, s.padded, s.length, s.padded, s.head_dim);
      Softmax(st.weights, s, scale, nullptr, l + 2 * pair * s.length);
      CopyWithBias(v, s.qkv_row(), bv, s, st.k);
      Matmul(st.weights, s.padded, st.k, s.head_dim, o + b * s.length * s.out_row() + h * s.head_dim, s.out_row(),
             s.length, s.head_dim, s.length);
    }
  }, [](State&) {});
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> grad_out,
                        ffi::ResultBuffer<ffi::F32> grad_qkv, float scale) {
  if (auto error = Check(qkv, bias, scale); error.failure()) return error;
  const Shape s = ShapeOf(qkv);
  const size_t tokens = static_cast<size_t>(s.batch * s.length * s.heads);
  if (out.element_count() != tokens * s.head_dim || grad_out.element_count() != tokens * s.head_dim ||
      stats.element_count() != 2 * tokens)
    return ffi::Error::InvalidArgument("attention kernel: output, statistics or gradient shapes do not match qkv");
  const float* in = qkv.typed_data();
  const float* bias_all = bias.typed_data();
  const float* o_all = out.typed_data();
  const float* l = stats.typed_data();
  const float* go_all = grad_out.typed_data();
  float* gin = grad_qkv->typed_data();
  struct State : Scratch {};
  ParallelFor<State>(pool, s.batch * s.heads, 1, [&](State& st, int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / s.heads, h = pair % s.heads;
      const int64_t token_offset = b * s.length * s.qkv_row() + h * s.head_dim;
      const float* q = in + token_offset;
      const float* k = q + s.heads * s.head_dim;
      const float* v = k + s.heads * s.head_dim;
      const int64_t out_offset = b * s.length * s.out_row() + h * s.head_dim;
      const float* o = o_all + out_offset;
      const float* go = go_all + out_offset;
      float* gq = gin + token_offset;
      float* gk = gq + s.heads * s.head_dim;
      float* gv = gk + s.heads * s.head_dim;
      const float* bq = bias_all + h * s.head_dim;
      const float* bk = bq + s.heads * s.head_dim;
      const float* bv = bk + s.heads * s.head_dim;
      // The weights again, from the saved statistics.
      CopyWithBias(q, s.qkv_row(), bq, s, st.q);
      TransposeWithBias(k, s.qkv_row(), bk, s, st.kt);
      Matmul(st.q, s.head_dim, st.kt, s.padded, st.weights, s.padded, s.length, s.padded, s.head_dim);
      Softmax(st.weights, s, scale, l + 2 * pair * s.length, nullptr);
      // grad[i, j] = dO_i . v_j, then the softmax's backward: P_ij (grad_ij - dO_i . O_i), times the
      // logits' scale (the gradient for the raw q . k).
      TransposeWithBias(v, s.qkv_row(), bv, s, st.kt);
      Matmul(go, s.out_row(), st.kt, s.padded, st.grad, s.padded, s.length, s.padded, s.head_dim);
      for (int64_t i = 0; i < s.length; ++i) {
        v16 dot{};
        for (int64_t d = 0; d < s.head_dim; d += 16) dot += load(go + i * s.out_row() + d) * load(o + i * s.out_row() + d);
        const float delta = HorizontalSum(dot);
        float* g = st.grad + i * s.padded;
        const float* p = st.weights + i * s.padded;
        for (int c = 0; c < s.padded; c += 16) store(g + c, load(p + c) * (load(g + c) - delta) * scale);
      }
      // dq = grad . k, dk = grad^T . q, dv = P^T . dO (the padded columns of grad and P are zero).
      CopyWithBias(k, s.qkv_row(), bk, s, st.k);
      Matmul(st.grad, s.padded, st.k, s.head_dim, gq, s.qkv_row(), s.length, s.head_dim, s.length);
      Matmul<true>(st.grad, s.padded, st.q, s.head_dim, gk, s.qkv_row(), s.length, s.head_dim, s.length);
      Matmul<true>(st.weights, s.padded, go, s.out_row(), gv, s.qkv_row(), s.length, s.head_dim, s.length);
    }
  }, [](State&) {});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAttention, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
