// Matrix-vector products for decoding on CPU, as XLA FFI custom calls: XLA:CPU writes a converted copy of
// the weight (float32) and reads it back, which bounds a product of a few rows; these read the weight once.
//
// GptossMxfp4Matvec: y[a, o] = sum_i x[a, i] * W[e[a]][o, i], W packed as the checkpoints store it:
// [E, O, I / 32, 16] bytes (two FP4 e2m1 codes a byte, low nibble first) and [E, O, I / 32] e8m0 scales.
// Each assignment a reads only its expert e[a], straight from the packed bytes.
//
// GptossBf16Matvec: y[r, o] = sum_i x[r, i] * W[i, o] for a few rows r (<= 16) of float32 x and a bfloat16
// W stored [in, out], each thread streaming the rows of W for its tile of outputs.
//
// Built at first use by gptoss_jax/model/cpu_kernels.py (g++ -O3 -march=native -fopenmp).

#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Twice the e2m1 values, so they are small integers: 0, 0.5, 1, 1.5, 2, 3, 4, 6 -> 0, 1, 2, 3, 4, 6, 8, 12.
constexpr int8_t kTwiceFp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// 2 ** (s - 127) / 2 for an e8m0 byte s (the / 2 undoes kTwiceFp4's doubling); 255 is NaN.
float HalfScale(uint8_t s) { return s == 255 ? NAN : std::ldexp(1.0f, static_cast<int>(s) - 128); }

// One output row: sum over the row's blocks of scale * (x . block).
float Row(const float* x, const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const float* half_scale) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b, x += 32) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * b));
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(bytes, low4));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
    const __m128i w0 = _mm_unpacklo_epi8(lo, hi);  // weights 0..15 in order: lo0 hi0 lo1 hi1 ...
    const __m128i w1 = _mm_unpackhi_epi8(lo, hi);  // weights 16..31
    __m256 block = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w0)), _mm256_loadu_ps(x));
    block = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w0, 8))), _mm256_loadu_ps(x + 8), block);
    block = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w1)), _mm256_loadu_ps(x + 16), block);
    block = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w1, 8))), _mm256_loadu_ps(x + 24), block);
    acc = _mm256_fmadd_ps(block, _mm256_set1_ps(half_scale[scales[b]]), acc);
  }
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
#else
  float acc = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b, x += 32) {
    float block = 0.0f;
    for (int j = 0; j < 16; ++j) {
      const uint8_t byte = blocks[16 * b + j];
      block += kTwiceFp4[byte & 0x0F] * x[2 * j] + kTwiceFp4[byte >> 4] * x[2 * j + 1];
    }
    acc += block * half_scale[scales[b]];
  }
  return acc;
#endif
}

ffi::Error Mxfp4Matvec(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> experts, ffi::Buffer<ffi::U8> blocks,
                  ffi::Buffer<ffi::U8> scales, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || bd.size() != 4 || bd[3] != 16 || xd[1] != 32 * bd[2] || experts.element_count() != xd[0] ||
      sd.size() != 3 || sd[0] != bd[0] || sd[1] != bd[1] || sd[2] != bd[2]) {
    return ffi::Error::InvalidArgument(
        "mxfp4_matvec: want x [A, I], experts [A], blocks [E, O, I / 32, 16], scales [E, O, I / 32]");
  }
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != bd[1]) {
    return ffi::Error::InvalidArgument("mxfp4_matvec: want the output [A, O]");
  }
  const int64_t A = xd[0], I = xd[1], E = bd[0], O = bd[1], NB = bd[2];
  float half_scale[256];
  for (int s = 0; s < 256; ++s) half_scale[s] = HalfScale(static_cast<uint8_t>(s));
  const float* xp = x.typed_data();
  const int32_t* ep = experts.typed_data();
  const uint8_t* bp = blocks.typed_data();
  const uint8_t* sp = scales.typed_data();
  float* yp = y->typed_data();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t a = 0; a < A; ++a) {
    for (int64_t o = 0; o < O; ++o) {
      // an index out of range is clamped, as XLA's gather on the other path does: the same function everywhere
      const int64_t e = ep[a] < 0 ? 0 : (ep[a] >= E ? E - 1 : ep[a]);
      const int64_t row = e * O + o;
      yp[a * O + o] = Row(xp + a * I, bp + row * NB * 16, sp + row * NB, NB, half_scale);
    }
  }
  return ffi::Error::Success();
}

// Outputs per work item: 512 (1 KB of a row of W). Small enough that the rows' sums, four converted rows of W
// and the rows of W being read stay in a 32 KB L1 cache, and that a layer's few thousand outputs split evenly
// over the threads (with 4,096 a work item, a 2,880-output product ran on one thread and a 5,120-output one
// split 4,096 / 1,024: 4-5 GiB/s on AMD EPYC, where one thread of this loop reads 8-10).
constexpr int64_t kMaxRows = 16, kTile = 512, kUnroll = 4;
// Weights of fewer elements run on the calling thread, not worth waking the others for.
constexpr int64_t kThreadedMin = int64_t{1} << 22;

inline float Bf16ToFloat(uint16_t v) {  // bfloat16 -> float32: the upper half of the float's bits
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

// Rows x[0..R) against outputs [o0, o0 + n) of W: kUnroll rows of W converted at a time, each row's sums
// read and written once per kUnroll of them.
void Bf16Tile(const float* x, int64_t R, int64_t I, const uint16_t* w, int64_t O, int64_t o0, int64_t n, float* y) {
  static thread_local float acc[kMaxRows][kTile], wf[kUnroll][kTile];
  for (int64_t r = 0; r < R; ++r) std::memset(acc[r], 0, n * sizeof(float));
  int64_t i = 0;
  if (R == 1) {  // decoding: W's rows converted as they are read, nothing stored between
    float* a = acc[0];
    for (; i + kUnroll <= I; i += kUnroll) {
      const uint16_t* w0 = w + i * O + o0;
      const uint16_t *w1 = w0 + O, *w2 = w1 + O, *w3 = w2 + O;
      const float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      for (int64_t j = 0; j < n; ++j) {
        a[j] += x0 * Bf16ToFloat(w0[j]) + x1 * Bf16ToFloat(w1[j]) + x2 * Bf16ToFloat(w2[j]) + x3 * Bf16ToFloat(w3[j]);
      }
    }
  }
  for (; i + kUnroll <= I; i += kUnroll) {
    for (int64_t k = 0; k < kUnroll; ++k) {
      const uint16_t* wr = w + (i + k) * O + o0;
      for (int64_t j = 0; j < n; ++j) wf[k][j] = Bf16ToFloat(wr[j]);
    }
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * I + i;
      const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];
      float* a = acc[r];
      for (int64_t j = 0; j < n; ++j) a[j] += x0 * wf[0][j] + x1 * wf[1][j] + x2 * wf[2][j] + x3 * wf[3][j];
    }
  }
  for (; i < I; ++i) {  // the rows of W left over
    const uint16_t* wr = w + i * O + o0;
    for (int64_t j = 0; j < n; ++j) wf[0][j] = Bf16ToFloat(wr[j]);
    for (int64_t r = 0; r < R; ++r) {
      const float xv = x[r * I + i];
      float* a = acc[r];
      for (int64_t j = 0; j < n; ++j) a[j] += xv * wf[0][j];
    }
  }
  for (int64_t r = 0; r < R; ++r) std::memcpy(y + r * O + o0, acc[r], n * sizeof(float));
}

ffi::Error Bf16Matvec(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] > kMaxRows) {
    return ffi::Error::InvalidArgument("bf16_matvec: want x [R <= 16, I], w [I, O]");
  }
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("bf16_matvec: want the output [R, O]");
  }
  const int64_t R = xd[0], I = xd[1], O = wd[1], tiles = (O + kTile - 1) / kTile;
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* yp = y->typed_data();
#pragma omp parallel for schedule(static) if (I * O >= kThreadedMin)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t o0 = t * kTile;
    Bf16Tile(xp, R, I, wp, O, o0, O - o0 < kTile ? O - o0 : kTile, yp);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16Matvec, Bf16Matvec,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [R, I]
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // w [I, O]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [R, O]

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Matvec, Mxfp4Matvec,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [A, I]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // experts [A]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // blocks [E, O, I / 32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // scales [E, O, I / 32]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [A, O]
