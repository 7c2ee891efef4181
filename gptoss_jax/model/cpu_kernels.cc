// Matrix-vector products for decoding on CPU, as XLA FFI custom calls: XLA:CPU writes a converted copy of
// the weight (float32) and reads it back, which bounds a product of a few rows; these read the weight once.
//
// GptossMxfp4Matvec: y[a, o] = sum_i x[a, i] * W[e[a]][o, i], W packed as the checkpoints store it:
// [E, O, I / 32, 16] bytes (two FP4 e2m1 codes a byte, low nibble first) and [E, O, I / 32] e8m0 scales.
// Each assignment a reads only its expert e[a], straight from the packed bytes; the assignments of one expert
// share each read of its rows. Three builds: AVX-512 (with VNNI: two blocks a step), AVX2, and plain C++ for
// other CPUs; the first two multiply a bfloat16 model's activations as 16-bit integers (QuantizeBlocks).
//
// GptossBf16Matvec: y_j[r, o] = sum_i x[r, i] * W_j[i, o] for a few rows r (<= 16) of float32 x and any
// number of bfloat16 weights W_j stored [in, out], each thread streaming its own contiguous stretch of every
// W_j's rows.
//
// Built at first use by gptoss_jax/model/cpu_kernels.py (g++ -O3 -march=native -fopenmp).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GPTOSS_AVX512 1  // the integer rows two blocks at a time, with 16-bit dot products (vpdpwssd)
#endif

namespace ffi = xla::ffi;

namespace {

// Twice the e2m1 values, so they are small integers: 0, 0.5, 1, 1.5, 2, 3, 4, 6 -> 0, 1, 2, 3, 4, 6, 8, 12.
constexpr int8_t kTwiceFp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// 2 ** (s - 127) / 2 for an e8m0 byte s (the / 2 undoes kTwiceFp4's doubling); 255 is NaN.
float HalfScale(uint8_t s) { return s == 255 ? NAN : std::ldexp(1.0f, static_cast<int>(s) - 128); }

// The MXFP4 rows ask for their packed bytes this far ahead of the block they multiply: the arithmetic keeps a
// core too busy for the hardware prefetchers alone to hold the bandwidth (AMD EPYC, 4 experts' gate-and-up
// products on 2 cores: 16.4-17.9 GiB/s without, 19.8-21.3 with 2 KiB, a C++ copy of the loop).
constexpr int64_t kPrefetchBytes = 2048;
inline void Prefetch(const uint8_t* p) { __builtin_prefetch(p + kPrefetchBytes); }

#if defined(__AVX2__) && defined(__FMA__)
inline float HorizontalSum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// One row of W against N inputs that chose its expert: out[k] = sum over the row's blocks of scale * (x_k .
// block), in float32: each block's codes widened to float32 once for all N.
template <int N>
void FloatRows(const float* const* x, const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks,
               const float* half_scale, float* const* out) {
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[N];
  for (int k = 0; k < N; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    if ((b & 3) == 0) Prefetch(blocks + 16 * b);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * b));
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(bytes, low4));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
    const __m128i w0 = _mm_unpacklo_epi8(lo, hi), w1 = _mm_unpackhi_epi8(lo, hi);  // the codes in order
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w0));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w0, 8)));
    const __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w1));
    const __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w1, 8)));
    const __m256 s = _mm256_set1_ps(half_scale[scales[b]]);
    for (int k = 0; k < N; ++k) {
      const float* xb = x[k] + 32 * b;
      __m256 block = _mm256_mul_ps(f0, _mm256_loadu_ps(xb));
      block = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xb + 8), block);
      block = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xb + 16), block);
      block = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xb + 24), block);
      acc[k] = _mm256_fmadd_ps(block, s, acc[k]);
    }
  }
  for (int k = 0; k < N; ++k) *out[k] = HorizontalSum(acc[k]);
}
#else
// One row of W against N inputs that chose its expert: out[k] = sum over the row's blocks of scale * (x_k .
// block), in float32.
template <int N>
void FloatRows(const float* const* x, const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks,
               const float* half_scale, float* const* out) {
  for (int k = 0; k < N; ++k) {
    float acc = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
      if (k == 0 && (b & 3) == 0) Prefetch(blocks + 16 * b);
      const float* xb = x[k] + 32 * b;
      float block = 0.0f;
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = blocks[16 * b + j];
        block += kTwiceFp4[byte & 0x0F] * xb[2 * j] + kTwiceFp4[byte >> 4] * xb[2 * j + 1];
      }
      acc += block * half_scale[scales[b]];
    }
    *out[k] = acc;
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kIntegerRows = true;
// Where block b's 16 even inputs (the codes' low nibbles) and 16 odd ones (the high nibbles) sit in q: blocks go
// in pairs, the pair's evens then its odds ([even 2p, even 2p+1, odd 2p, odd 2p+1], so that AVX-512 reads a
// pair's evens or odds in one load); a last unpaired block holds its evens, then its odds.
inline int64_t EvenAt(int64_t b) { return 32 * b - 16 * (b & 1); }
inline int64_t OddAt(int64_t b, int64_t n_blocks) { return EvenAt(b) + ((b ^ 1) < n_blocks ? 32 : 16); }

// For a bfloat16 model's activations (`rounded`), with AVX2 or AVX-512, each block of 32 inputs x is rounded to 16-bit
// integers q with a power-of-two scale 2^(e - 15), 2^e just above the block's largest |x|, so its products
// with the codes are integer multiply-adds (two instructions a block; widening every code to float32 took nine
// and bound the kernel at 10-12 GiB/s on AMD EPYC, 16-19 with integers). Each input's rounding error is at
// most 2^(e - 16): a bfloat16 activation within a factor 128 of its block's largest is exact, and no error
// exceeds 1/128 of the bfloat16 rounding of that largest (whose step is 2^(e - 8)). q is laid out as EvenAt and
// OddAt say. A block with a NaN or infinity gets a NaN scale, so its rows are NaN, as the float sums would be.
void QuantizeBlocks(const float* x, int64_t n_blocks, int16_t* q, float* scale) {
  for (int64_t b = 0; b < n_blocks; ++b, x += 32) {
    float m = 0.0f;
    bool finite = true;
    for (int j = 0; j < 32; ++j) {
      const float a = std::fabs(x[j]);
      finite = finite && std::isfinite(a);
      m = a > m ? a : m;
    }
    int e = 0;
    std::frexp(m, &e);  // m < 2^e (0 for m = 0)
    const double inv = std::ldexp(1.0, 15 - e);
    scale[b] = finite ? std::ldexp(1.0f, e - 15) : NAN;
    int16_t *even = q + EvenAt(b), *odd = q + OddAt(b, n_blocks);
    for (int j = 0; j < 32; ++j) {
      const long v = finite ? std::lrint(x[j] * inv) : 0;
      (j % 2 ? odd : even)[j / 2] = static_cast<int16_t>(v > 32767 ? 32767 : (v < -32767 ? -32767 : v));
    }
  }
}

// One block's integer sums q . codes, 8 lanes (the 32 products in pairs, then in twos): its codes decoded
// from the 16 packed bytes, its evens and odds from q.
inline __m256i BlockSums(__m128i bytes, const int16_t* even, const int16_t* odd) {
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256i lo = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(table, _mm_and_si128(bytes, low4)));
  const __m256i hi = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), low4)));
  return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even))),
                          _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd))));
}

#ifdef GPTOSS_AVX512
// 8 blocks' scales, each 2^(s - 128) (HalfScale) times its input's scale: the e8m0 bytes made float32 bits.
inline __m256 EightScales(const uint8_t* scales, const float* x_scale) {
  const __m256i s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales)));
  __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(s, _mm256_set1_epi32(1)), 23);  // 2^(s - 128) for s in 1..254
  bits = _mm256_mask_mov_epi32(bits, _mm256_cmpeq_epi32_mask(s, _mm256_setzero_si256()),
                               _mm256_set1_epi32(0x00200000));  // 2^-128, a subnormal
  bits = _mm256_mask_mov_epi32(bits, _mm256_cmpeq_epi32_mask(s, _mm256_set1_epi32(255)),
                               _mm256_set1_epi32(0x7FC00000));  // NaN
  return _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_loadu_ps(x_scale));
}

// One row of W against N inputs that chose its expert, two blocks a step: the pair's 64 codes decoded once
// (16-bit lanes, evens and odds), each input's pair of blocks in two 16-bit dot products (16 sums: 8 a block),
// scaled by its blocks' scales and added to float sums; the blocks 8 at a time with their scales in one vector,
// the pairs after them with scales computed one by one, a last unpaired block as AVX2 does it.
template <int N>
void Rows(const int16_t* const* q, const float* const* x_scale, const uint8_t* blocks, const uint8_t* scales,
          int64_t n_blocks, const float* half_scale, float* const* out) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4)));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc0[N], acc1[N];  // two chains each: even and odd pairs
  for (int k = 0; k < N; ++k) acc0[k] = acc1[k] = _mm512_setzero_ps();
  // the first n pairs of the 8 blocks from b0, their scales sc[k] (lane j: block b0 + j)
  auto pairs = [&](int64_t b0, int n, const __m256* sc) {
    for (int p = 0; p < n; ++p) {
      const int64_t b = b0 + 2 * p;
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks + 16 * b));
      const __m512i even = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(table, _mm256_and_si256(bytes, low4)));
      const __m512i odd =
          _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4)));
      const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(2 * p), halves);  // lanes 0-7: block b, 8-15: b + 1
      for (int k = 0; k < N; ++k) {
        const int16_t* qb = q[k] + EvenAt(b);
        __m512i sums = _mm512_dpwssd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(qb));
        sums = _mm512_dpwssd_epi32(sums, odd, _mm512_loadu_si512(qb + 32));
        const __m512 s = _mm512_permutexvar_ps(lanes, _mm512_zextps256_ps512(sc[k]));
        if (p & 1) {
          acc1[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, acc1[k]);
        } else {
          acc0[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, acc0[k]);
        }
      }
    }
  };
  __m256 sc[N];
  int64_t b0 = 0;
  for (; b0 + 8 <= n_blocks; b0 += 8) {
    Prefetch(blocks + 16 * b0);
    Prefetch(blocks + 16 * b0 + 64);
    for (int k = 0; k < N; ++k) sc[k] = EightScales(scales + b0, x_scale[k] + b0);
    pairs(b0, 4, sc);
  }
  if (b0 < n_blocks) {  // under 8 blocks left
    alignas(32) float left[N][8];
    for (int k = 0; k < N; ++k) {
      for (int64_t b = b0; b < n_blocks; ++b) left[k][b - b0] = half_scale[scales[b]] * x_scale[k][b];
      sc[k] = _mm256_load_ps(left[k]);
    }
    pairs(b0, static_cast<int>(n_blocks - b0) / 2, sc);
  }
  float last[N] = {};
  if (n_blocks & 1) {  // the last block, unpaired
    const int64_t b = n_blocks - 1;
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * b));
    for (int k = 0; k < N; ++k) {
      const __m256i sums = BlockSums(bytes, q[k] + EvenAt(b), q[k] + OddAt(b, n_blocks));
      last[k] = HorizontalSum(_mm256_cvtepi32_ps(sums)) * (half_scale[scales[b]] * x_scale[k][b]);
    }
  }
  for (int k = 0; k < N; ++k) *out[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[k], acc1[k])) + last[k];
}
#else
// One row of W against N inputs that chose its expert: out[k] = sum over the row's blocks of (the block's
// scale * input k's scale) * (q_k . codes); each block's codes decoded once for all N, the blocks in pairs.
template <int N>
void Rows(const int16_t* const* q, const float* const* x_scale, const uint8_t* blocks, const uint8_t* scales,
          int64_t n_blocks, const float* half_scale, float* const* out) {
  __m256 acc0[N], acc1[N];  // two chains each: even and odd blocks
  for (int k = 0; k < N; ++k) acc0[k] = acc1[k] = _mm256_setzero_ps();
  // block b into acc, its evens and odds at these offsets in q
  auto block = [&](int64_t b, int64_t even, int64_t odd, __m256* acc) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * b));
    const float w_scale = half_scale[scales[b]];
    for (int k = 0; k < N; ++k) {
      const __m256 sums = _mm256_cvtepi32_ps(BlockSums(bytes, q[k] + even, q[k] + odd));
      acc[k] = _mm256_fmadd_ps(sums, _mm256_set1_ps(w_scale * x_scale[k][b]), acc[k]);
    }
  };
  int64_t b = 0;  // the offsets below are EvenAt and OddAt's, for a pair and for a last unpaired block
  for (; b + 2 <= n_blocks; b += 2) {
    if ((b & 3) == 0) Prefetch(blocks + 16 * b);
    block(b, 32 * b, 32 * b + 32, acc0);
    block(b + 1, 32 * b + 16, 32 * b + 48, acc1);
  }
  if (b < n_blocks) block(b, 32 * b, 32 * b + 16, acc0);  // the last block, unpaired
  for (int k = 0; k < N; ++k) *out[k] = HorizontalSum(_mm256_add_ps(acc0[k], acc1[k]));
}
#endif
#else
constexpr bool kIntegerRows = false;
void QuantizeBlocks(const float*, int64_t, int16_t*, float*) {}
template <int N>
void Rows(const int16_t* const*, const float* const*, const uint8_t*, const uint8_t*, int64_t, const float*,
          float* const*) {}
#endif

// Inputs per decoded row: up to this many assignments of an expert share each block's decoding.
constexpr int kGroup = 4;

// f(std::integral_constant<int, n>) for a group of n = 1..kGroup inputs: the row functions' N at compile time.
template <typename F>
void WithGroupSize(int n, F f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, kGroup>{});
  }
}
// Rows of W per work item.
constexpr int64_t kRowTile = 64;

ffi::Error Mxfp4Matvec(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> experts, ffi::Buffer<ffi::U8> blocks,
                       ffi::Buffer<ffi::U8> scales, int32_t rounded, ffi::ResultBuffer<ffi::F32> y) {
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
  if (A == 0 || E == 0) return ffi::Error::Success();
  float half_scale[256];
  for (int s = 0; s < 256; ++s) half_scale[s] = HalfScale(static_cast<uint8_t>(s));
  const float* xp = x.typed_data();
  const int32_t* ep = experts.typed_data();
  const uint8_t* bp = blocks.typed_data();
  const uint8_t* sp = scales.typed_data();
  float* yp = y->typed_data();
  // rounded inputs: 16-bit integers per block (with AVX2, for bfloat16 activations); else float32
  const bool integer = kIntegerRows && rounded;
  static thread_local std::vector<int16_t> q;  // the calling thread's, reused between calls
  static thread_local std::vector<float> q_scale;
  if (integer) {
    q.resize(static_cast<size_t>(A * I));
    q_scale.resize(static_cast<size_t>(A * NB));
    for (int64_t a = 0; a < A; ++a) QuantizeBlocks(xp + a * I, NB, q.data() + a * I, q_scale.data() + a * NB);
  }
  const int16_t* const qp = q.data();  // the threads' own `q` would be theirs, not this one
  const float* const qsp = q_scale.data();
  // The assignments grouped by expert (an index out of range clamped, as XLA's gather on the other path does):
  // each expert's rows are read once per call however many assignments chose it (prefill, evaluation)
  std::vector<int64_t> start(E + 1, 0), order(A);
  auto expert = [&](int64_t a) { return ep[a] < 0 ? int64_t{0} : (ep[a] >= E ? E - 1 : int64_t{ep[a]}); };
  for (int64_t a = 0; a < A; ++a) ++start[expert(a) + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t a = 0; a < A; ++a) order[next[expert(a)]++] = a;
  std::vector<int64_t> items;  // (expert, tile of rows) with assignments, as e * tiles + tile
  const int64_t tiles = (O + kRowTile - 1) / kRowTile;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; start[e + 1] > start[e] && t < tiles; ++t) items.push_back(e * tiles + t);
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic)
  for (int64_t i = 0; i < n_items; ++i) {
    const int64_t e = items[i] / tiles, o0 = (items[i] % tiles) * kRowTile, o1 = o0 + kRowTile < O ? o0 + kRowTile : O;
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t row = e * O + o;
      for (int64_t k0 = start[e]; k0 < start[e + 1]; k0 += kGroup) {
        const int n = start[e + 1] - k0 < kGroup ? static_cast<int>(start[e + 1] - k0) : kGroup;
        const int16_t* qs[kGroup];
        const float* xs[kGroup];
        const float* q_scales[kGroup];
        float* outs[kGroup];
        for (int k = 0; k < n; ++k) {
          const int64_t a = order[k0 + k];
          qs[k] = qp + a * I;
          q_scales[k] = qsp + a * NB;
          xs[k] = xp + a * I;
          outs[k] = yp + a * O + o;
        }
        const uint8_t *rb = bp + row * NB * 16, *rs = sp + row * NB;
        WithGroupSize(n, [&](auto size) {
          if (integer) {
            Rows<size()>(qs, q_scales, rb, rs, NB, half_scale, outs);
          } else {
            FloatRows<size()>(xs, rb, rs, NB, half_scale, outs);
          }
        });
      }
    }
  }
  return ffi::Error::Success();
}

// Columns per pass for R rows: kSums / R, so that the rows' sums (1 MiB) stay in a core's L2 cache while the
// thread's rows of W stream past them. Work is split over W's rows (the inner dimension), not its columns: each
// thread reads one contiguous stretch of W, which the prefetchers follow at the bandwidth (measured on AMD EPYC:
// the 201,088-wide unembedding 23-33 ms against 40-77 ms for work items of 512-8,192 columns, each of which
// jumps a whole row of W, a new page, every 1-16 KB); the threads' partial sums are added at the end.
constexpr int64_t kMaxRows = 16, kSums = int64_t{1} << 18, kTile = 512, kUnroll = 4;
// Weights of fewer elements run on the calling thread, not worth waking the others for.
constexpr int64_t kThreadedMin = int64_t{1} << 20;

inline float Bf16ToFloat(uint16_t v) {  // bfloat16 -> float32: the upper half of the float's bits
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

// acc[r * ld + j] += sum over W's rows [i0, i1) of x[r, i] * W[i, o0 + j], for j < n.
void Bf16Block(const float* x, int64_t R, int64_t I, int64_t i0, int64_t i1, const uint16_t* w, int64_t O,
               int64_t o0, int64_t n, float* acc, int64_t ld) {
  int64_t i = i0;
  if (R == 1) {  // decoding: W's rows converted as they are read, nothing stored between
    for (; i + kUnroll <= i1; i += kUnroll) {
      const uint16_t* w0 = w + i * O + o0;
      const uint16_t *w1 = w0 + O, *w2 = w1 + O, *w3 = w2 + O;
      const float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      for (int64_t j = 0; j < n; ++j) {
        acc[j] += x0 * Bf16ToFloat(w0[j]) + x1 * Bf16ToFloat(w1[j]) + x2 * Bf16ToFloat(w2[j]) + x3 * Bf16ToFloat(w3[j]);
      }
    }
  }
  static thread_local float wf[kUnroll][kTile];  // kUnroll rows of W converted, a tile of columns at a time
  for (; i + kUnroll <= i1; i += kUnroll) {
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      const int64_t m = n - t0 < kTile ? n - t0 : kTile;
      for (int64_t k = 0; k < kUnroll; ++k) {
        const uint16_t* wr = w + (i + k) * O + o0 + t0;
        for (int64_t j = 0; j < m; ++j) wf[k][j] = Bf16ToFloat(wr[j]);
      }
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * I + i;
        const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];
        float* a = acc + r * ld + t0;
        for (int64_t j = 0; j < m; ++j) a[j] += x0 * wf[0][j] + x1 * wf[1][j] + x2 * wf[2][j] + x3 * wf[3][j];
      }
    }
  }
  for (; i < i1; ++i) {  // the rows of W left over
    const uint16_t* wr = w + i * O + o0;
    for (int64_t r = 0; r < R; ++r) {
      const float xv = x[r * I + i];
      float* a = acc + r * ld;
      for (int64_t j = 0; j < n; ++j) a[j] += xv * Bf16ToFloat(wr[j]);
    }
  }
}

// One of the products sharing x: W [I, O] and its output y [R, O].
struct Product {
  const uint16_t* w;
  int64_t O;
  float* y;
};

// y_j [R, O_j] = x [R, I] @ W_j [I, O_j] for each product j: thread t of T sums every W_j's rows
// [I t / T, I (t + 1) / T) into y_j (t = 0) or its own partial [R, O_j], a pass of kSums / R columns at a time;
// after a barrier the threads add the partials to the outputs, each a slice of them. Products sharing x share
// one start of the threads (decoding's q, k and v: k's and v's 2.9 MB each ran at 7 GiB/s alone).
void Bf16Products(const float* x, int64_t R, int64_t I, const std::vector<Product>& products) {
  int64_t weights = 0, outputs = 0;
  for (const Product& p : products) weights += I * p.O, outputs += R * p.O;
  const int threads = weights >= kThreadedMin ? omp_get_max_threads() : 1;
  static thread_local std::vector<float> partials;  // the calling thread's, reused between calls
  partials.resize(static_cast<size_t>((threads - 1) * outputs));
  float* const part = partials.data();  // the threads' own `partials` would be theirs, not this one
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t i0 = I * t / T, i1 = I * (t + 1) / T;
    int64_t at = 0;  // where product p's outputs start among all (thread t's partials: the same order)
    for (const Product& p : products) {
      float* out = t == 0 ? p.y : part + (t - 1) * outputs + at;
      const int64_t C = p.O < kSums / R ? p.O : kSums / R;
      for (int64_t o0 = 0; o0 < p.O; o0 += C) {
        const int64_t n = p.O - o0 < C ? p.O - o0 : C;
        for (int64_t r = 0; r < R; ++r) std::memset(out + r * p.O + o0, 0, n * sizeof(float));
        Bf16Block(x, R, I, i0, i1, p.w, p.O, o0, n, out + o0, p.O);
      }
      at += R * p.O;
    }
    if (T > 1) {
#pragma omp barrier
      const int64_t k0 = outputs * t / T, k1 = outputs * (t + 1) / T;  // this thread's slice of all outputs
      at = 0;
      for (const Product& p : products) {
        const int64_t size = R * p.O, lo = k0 > at ? k0 : at, hi = k1 < at + size ? k1 : at + size;
        for (int64_t k = lo; k < hi; ++k) {
          float sum = p.y[k - at];
          for (int u = 1; u < T; ++u) sum += part[(u - 1) * outputs + k];
          p.y[k - at] = sum;
        }
        at += size;
      }
    }
  }
}

// x [R, I] against any number of bfloat16 weights W_j [I, O_j], one output [R, O_j] each.
ffi::Error Bf16Matvec(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[0] > kMaxRows || ws.size() == 0 || ws.size() != ys.size()) {
    return ffi::Error::InvalidArgument("bf16_matvec: want x [R <= 16, I], weights [I, O_j], one output each");
  }
  std::vector<Product> products;
  for (size_t j = 0; j < ws.size(); ++j) {
    const auto w = ws.get<ffi::Buffer<ffi::BF16>>(j);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("bf16_matvec: want bfloat16 weights and float32 outputs");
    }
    const auto wd = w->dimensions(), yd = (*y)->dimensions();
    if (wd.size() != 2 || wd[0] != xd[1]) {
      return ffi::Error::InvalidArgument("bf16_matvec: want x [R <= 16, I], weights [I, O_j], one output each");
    }
    if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[1]) {
      return ffi::Error::InvalidArgument("bf16_matvec: want the outputs [R, O_j]");
    }
    if (wd[1] > 0) {
      products.push_back({reinterpret_cast<const uint16_t*>(w->untyped_data()), wd[1], (*y)->typed_data()});
    }
  }
  if (xd[0] > 0 && !products.empty()) Bf16Products(x.typed_data(), xd[0], xd[1], products);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16Matvec, Bf16Matvec,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, I]
                                  .RemainingArgs()               // weights W_j [I, O_j]
                                  .RemainingRets());             // outputs y_j [R, O_j]

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Matvec, Mxfp4Matvec,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [A, I]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // experts [A]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // blocks [E, O, I / 32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // scales [E, O, I / 32]
                                  .Attr<int32_t>("rounded")        // x holds bfloat16 values
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [A, O]
