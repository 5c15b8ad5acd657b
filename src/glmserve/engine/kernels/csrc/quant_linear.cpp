// Weight-only int4 / int8 linear layers on x86 CPUs with 8-bit activations (llama.cpp's scheme):
// each activation row is quantized per block of 32 to int8 (scale d = max|x| / 127), and the dot
// products of a block run as integer multiply-adds (AVX-512 VNNI vpdpbusd, AVX-VNNI, AVX2 maddubs,
// or plain C++), so the arithmetic of a 4-bit weight costs less than streaming it from memory.
//
// Weights (kernels/native_linear.py packs them):
//   int4: nibbles uint8 [N, K/2] in GGUF's block order: 16 bytes per block of 32 columns, byte j
//         holding column j (low nibble) and column 16 + j (high nibble), so a Q4_0 / Q4_1 file's
//         blocks are kept as they are. w = q * scale + min per group of G columns (G a multiple
//         of 32); scales / mins [N, K/G] float16 or float32; no mins: min = -8 * scale (Q4_0).
//   int8: q int8 [N, K], w = q * scale per group of G columns (G = K: per output channel; 32: Q8_0).
// Per block b of 32 columns:  sum w[k] x[k] ~= ws_b * d_b * sum q[k] xq[k] + wm_b * (d_b * sum xq[k]).
//
// For int4, the activations are laid out to match one vector of nibbles: V blocks at a time (4 for
// 512-bit registers, 2 for 256-bit, 1 for plain C++) as the V blocks' columns 0-15, then their
// columns 16-31, so the low and high nibbles of a block multiply into the same int32 lanes.
// Activation rows are taken up to 8 at a time, so each weight is loaded once for all of them; for
// one or two rows, 4 or 2 output rows go together instead (independent accumulation chains).
//
// ISA paths are compiled side by side (GCC target regions) and chosen at run time; `isa` forces
// one for tests. Ops: torch.ops.glmserve.{int4_linear, int8_linear, int4_dequantize,
// int8_dequantize, cpu_isas}.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace glmserve {

constexpr int64_t kBlock = 32;  // activation block, and the unit of weight groups
constexpr int kMaxRows = 8;  // activation rows per pass over the weights
// Weights are streamed once per step, mostly from beyond the caches: ask for them this far ahead
// (rows of a layer are contiguous, so this runs ahead across rows too), into L2: requests into L1
// would hold its few line-fill buffers and cap a core's reads below what memory delivers.
#ifndef GLMSERVE_PREFETCH
#define GLMSERVE_PREFETCH 8192
#endif
constexpr int64_t kPrefetchBytes = GLMSERVE_PREFETCH;

enum Isa : int64_t { kAuto = 0, kRef = 1, kAvx2 = 2, kAvxVnni = 3, kAvx512Vnni = 4 };

// Output rows taken together for R activation rows: enough independent accumulators to hide the
// latency of a fused multiply-add chain (4 cycles), few enough to stay in registers.
template <int R>
constexpr int kOutRows = R == 1 ? 4 : R == 2 ? 2 : 1;

// Activations of up to kMaxRows rows, quantized per block of 32.
struct Acts {
  const int8_t* q;  // [rows, K]
  const float* d;   // [rows, K/32]: block scale
  const float* s;   // [rows, K/32]: d * sum of the block's q
  int64_t k;
  int64_t nb;  // K / 32
};

// Where a weight's group scales and mins are: float16 or float32 [N, K/G]; no mins: min =
// min_from_scale * scale (-8 for Q4_0, 0 for int8).
struct ScaleSource {
  const void* scale;
  const void* min;
  bool is_half;
  int64_t num_groups;    // K / G
  int64_t group_blocks;  // G / 32
  float min_from_scale;
  int64_t rows;  // N
};

// One output row's scale and min per group of `gb` blocks of 32 columns, in float32 (block b's
// are scale[b / gb]). One scale for the whole row (per-channel int8) is kept as `uniform`.
struct RowScales {
  std::vector<float> scale, min;
  int64_t gb = 1;
  bool is_uniform = false;
  float uniform = 0.0f;
  // 8 floats of slack: expanding a row's last groups may write one whole vector past them.
  explicit RowScales(int64_t nb = 0) : scale(nb + 8), min(nb + 8) {}
  float scale_of(int64_t b) const { return scale[b / gb]; }
  float min_of(int64_t b) const { return min[b / gb]; }
};

static inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

static inline void expand_group(const ScaleSource& src, int64_t n, int64_t g, float* scale, float* min) {
  const int64_t i = n * src.num_groups + g;
  *scale = src.is_half ? half_to_float(static_cast<const uint16_t*>(src.scale)[i]) : static_cast<const float*>(src.scale)[i];
  if (src.min == nullptr) {
    *min = src.min_from_scale * *scale;
  } else {
    *min = src.is_half ? half_to_float(static_cast<const uint16_t*>(src.min)[i]) : static_cast<const float*>(src.min)[i];
  }
}

// ---------------------------------------------------------------- activations

template <typename T>
static void to_float_row(const T* src, int64_t k, float* dst) {
  for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<float>(src[i]);
}

// x [M, K] -> int8 per block of 32, blocks interleaved `v` at a time (see the top of this file).
static void quantize_rows(const at::Tensor& x, int64_t v, std::vector<int8_t>& q, std::vector<float>& d,
                          std::vector<float>& s) {
  const int64_t m = x.size(0), k = x.size(1), nb = k / kBlock;
  q.resize(m * k);
  d.resize(m * nb);
  s.resize(m * nb);
  static thread_local std::vector<float> row;
  row.resize(k);
  for (int64_t r = 0; r < m; ++r) {
    switch (x.scalar_type()) {
      case at::kFloat: to_float_row(x.data_ptr<float>() + r * k, k, row.data()); break;
      case at::kBFloat16: to_float_row(x.data_ptr<c10::BFloat16>() + r * k, k, row.data()); break;
      case at::kHalf: to_float_row(x.data_ptr<c10::Half>() + r * k, k, row.data()); break;
      default: TORCH_CHECK(false, "glmserve: x must be float32, bfloat16 or float16");
    }
    const int64_t whole = nb / v * v;  // blocks in whole chunks of v; the rest in natural order
    for (int64_t b = 0; b < nb; ++b) {
      const float* values = row.data() + b * kBlock;
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(values[i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      const int64_t span = b < whole ? v : 1, first = b < whole ? b / v * v : b, i0 = b - first;
      int8_t* chunk = q.data() + r * k + first * kBlock;
      int sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        const int value = static_cast<int>(std::nearbyint(values[i] * inv));
        chunk[i < 16 ? i0 * 16 + i : span * 16 + i0 * 16 + (i - 16)] = static_cast<int8_t>(value);
        sum += value;
      }
      d[r * nb + b] = amax / 127.0f;
      s[r * nb + b] = d[r * nb + b] * static_cast<float>(sum);
    }
  }
}

// ---------------------------------------------------------------- plain C++

namespace ref {

static inline int int4_at(const uint8_t* row, int64_t col) {
  const uint8_t byte = row[col / kBlock * 16 + col % 16];
  return col % kBlock < 16 ? (byte & 0xF) : (byte >> 4);
}

static void expand_groups(const ScaleSource& src, int64_t n, float* scale, float* min) {
  for (int64_t g = 0; g < src.num_groups; ++g) expand_group(src, n, g, scale + g, min + g);
}

template <int R, int NB>
static void int4_rows(const uint8_t* w, int64_t row_bytes, const RowScales* rs, const Acts& a, float* out) {
  for (int i = 0; i < NB; ++i) {
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.q + r * a.k;
      float acc = 0.0f;
      for (int64_t b = 0; b < a.nb; ++b) {
        int isum = 0;
        for (int64_t j = 0; j < kBlock; ++j) isum += int4_at(w + i * row_bytes, b * kBlock + j) * xq[b * kBlock + j];
        acc += rs[i].scale_of(b) * a.d[r * a.nb + b] * isum + rs[i].min_of(b) * a.s[r * a.nb + b];
      }
      out[i * R + r] = acc;
    }
  }
}

template <int R, int NB>
static void int8_rows(const int8_t* w, int64_t row_bytes, const RowScales* rs, const Acts& a, float* out) {
  for (int i = 0; i < NB; ++i) {
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.q + r * a.k;
      float acc = 0.0f;
      for (int64_t b = 0; b < a.nb; ++b) {
        int isum = 0;
        for (int64_t j = 0; j < kBlock; ++j) isum += w[i * row_bytes + b * kBlock + j] * xq[b * kBlock + j];
        acc += (rs[i].is_uniform ? rs[i].uniform : rs[i].scale_of(b)) * a.d[r * a.nb + b] * isum;
      }
      out[i * R + r] = acc;
    }
  }
}

static void int4_dequantize_row(const uint8_t* w, const RowScales& rs, int64_t k, float* out) {
  for (int64_t col = 0; col < k; ++col) out[col] = int4_at(w, col) * rs.scale_of(col / kBlock) + rs.min_of(col / kBlock);
}

}  // namespace ref

}  // namespace glmserve

// ---------------------------------------------------------------- 256-bit paths
// The same code twice: AVX2 (maddubs + madd) and AVX-VNNI (vpdpbusd on ymm).

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace glmserve::avx2 {
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
  // u <= 128 (int4: 15; int8: |w|) times s in -127..127: each pair of products fits in int16.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#include "quant_linear_ymm.inc"
}  // namespace glmserve::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace glmserve::avxvnni {
static inline __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s); }
#include "quant_linear_ymm.inc"
}  // namespace glmserve::avxvnni
#pragma GCC pop_options

// ---------------------------------------------------------------- 512-bit path

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
namespace glmserve::avx512 {

static inline __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }

static inline float hsum256(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

static inline float hsum128(__m128 x) {
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// 16 lanes -> 8 (the two halves added).
static inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// The sums of four 8-lane vectors, as one 4-lane vector.
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128-bit half
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// The values of blocks 4g..4g+3 (or 2g, 2g+1) from per-group values, gb blocks per group.
static inline __m128 quad_of(const float* v, int64_t g, int64_t gb) {
  if (gb == 1) return _mm_loadu_ps(v + 4 * g);
  if (gb == 2) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(v + 2 * g)));
    return _mm_unpacklo_ps(two, two);
  }
  if (gb % 4 == 0) return _mm_set1_ps(v[4 * g / gb]);
  return _mm_setr_ps(v[4 * g / gb], v[(4 * g + 1) / gb], v[(4 * g + 2) / gb], v[(4 * g + 3) / gb]);
}

static inline __m128 pair_of(const float* v, int64_t p, int64_t gb) {
  if (gb == 1) return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(v + 2 * p)));
  if (gb % 2 == 0) return _mm_set1_ps(v[2 * p / gb]);
  return _mm_setr_ps(v[2 * p / gb], v[(2 * p + 1) / gb], 0.0f, 0.0f);
}

// NB output rows against R activation rows, four blocks (64 bytes of nibbles per row) at a time:
// int32 lanes 4b..4b+3 gather block b's low and high nibbles; the last K % 128 columns a block
// at a time.
template <int R, int NB>
static void int4_rows(const uint8_t* w, int64_t row_bytes, const RowScales* rs, const Acts& a, float* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i pick = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[NB][R];
  __m128 acc_min[NB][R];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) {
      acc[i][r] = _mm512_setzero_ps();
      acc_min[i][r] = _mm_setzero_ps();
    }
  for (int64_t g = 0; g < a.nb / 4; ++g) {
    __m512i lo[NB], hi[NB];
    __m128 ws[NB], wm[NB];
    for (int i = 0; i < NB; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + i * row_bytes + g * 64 + kPrefetchBytes), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(w + i * row_bytes + g * 64);
      lo[i] = _mm512_and_si512(v, low4);
      hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      ws[i] = quad_of(rs[i].scale.data(), g, rs[i].gb);
      wm[i] = quad_of(rs[i].min.data(), g, rs[i].gb);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.q + r * a.k + g * 128;
      const __m512i x_lo = _mm512_loadu_si512(xq), x_hi = _mm512_loadu_si512(xq + 64);
      const __m128 d = _mm_loadu_ps(a.d + r * a.nb + 4 * g), s = _mm_loadu_ps(a.s + r * a.nb + 4 * g);
      for (int i = 0; i < NB; ++i) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[i], x_lo), hi[i], x_hi);
        const __m512 scale = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_mul_ps(ws[i], d)));
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[i][r]);
        acc_min[i][r] = _mm_fmadd_ps(wm[i], s, acc_min[i][r]);
      }
    }
  }
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t b = a.nb / 4 * 4; b < a.nb; ++b) {  // the last 1-3 blocks, activations in natural order
    for (int i = 0; i < NB; ++i) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i * row_bytes + b * 16));
      const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + r * a.k + b * kBlock));
        const __m512 p = _mm512_zextps256_ps512(_mm256_cvtepi32_ps(dot_u8s8(u, x)));
        acc[i][r] = _mm512_fmadd_ps(p, _mm512_set1_ps(rs[i].scale_of(b) * a.d[r * a.nb + b]), acc[i][r]);
        acc_min[i][r] = _mm_add_ss(acc_min[i][r], _mm_set_ss(rs[i].min_of(b) * a.s[r * a.nb + b]));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (NB == 4) {  // four rows' sums at once: halve, then horizontal adds
      const __m128 sums = hsum4(fold(acc[0][r]), fold(acc[1][r]), fold(acc[2][r]), fold(acc[3][r]));
      const __m128 mins = _mm_hadd_ps(_mm_hadd_ps(acc_min[0][r], acc_min[1][r]), _mm_hadd_ps(acc_min[2][r], acc_min[3][r]));
      alignas(16) float total[4];
      _mm_store_ps(total, _mm_add_ps(sums, mins));
      for (int i = 0; i < 4; ++i) out[i * R + r] = total[i];
    } else {  // the same sums in the same order, one row at a time: a row's result never
              // depends on which rows share its step
      for (int i = 0; i < NB; ++i) {
        const __m256 a = fold(acc[i][r]);
        const __m128 m = _mm_hadd_ps(_mm_hadd_ps(acc_min[i][r], acc_min[i][r]), _mm_hadd_ps(acc_min[i][r], acc_min[i][r]));
        out[i * R + r] = _mm_cvtss_f32(_mm_add_ps(hsum4(a, a, a, a), m));
      }
    }
  }
}

// int8: 64 columns (two blocks) at a time; |w| times x with w's sign, as vpdpbusd wants u8 x s8.
template <int R, int NB>
static void int8_rows(const int8_t* w, int64_t row_bytes, const RowScales* rs, const Acts& a, float* out) {
  const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[NB][R];
  __m256 acc_tail[NB][R];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) {
      acc[i][r] = _mm512_setzero_ps();
      acc_tail[i][r] = _mm256_setzero_ps();
    }
  const int64_t pairs = a.nb / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i u[NB];
    __mmask64 negative[NB];
    __m128 ws[NB];
    for (int i = 0; i < NB; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + i * row_bytes + p * 64 + kPrefetchBytes), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(w + i * row_bytes + p * 64);
      u[i] = _mm512_abs_epi8(v);
      negative[i] = _mm512_movepi8_mask(v);
      ws[i] = rs[i].is_uniform ? _mm_set1_ps(1.0f)  // the row's one scale is applied at the end
                               : pair_of(rs[i].scale.data(), p, rs[i].gb);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_loadu_si512(a.q + r * a.k + p * 64);
      const __m128 d = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a.d + r * a.nb + 2 * p)));
      for (int i = 0; i < NB; ++i) {
        const __m512i xs = _mm512_mask_sub_epi8(x, negative[i], _mm512_setzero_si512(), x);
        const __m512i prod = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[i], xs);
        const __m512 scale = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_mul_ps(ws[i], d)));
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(prod), scale, acc[i][r]);
      }
    }
  }
  if (a.nb % 2) {  // an odd last block
    const int64_t b = a.nb - 1;
    for (int i = 0; i < NB; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * row_bytes + b * kBlock));
      const __m256i u = _mm256_abs_epi8(v);
      const float ws = rs[i].is_uniform ? 1.0f : rs[i].scale_of(b);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + r * a.k + b * kBlock));
        const __m256 prod = _mm256_cvtepi32_ps(dot_u8s8(u, _mm256_sign_epi8(x, v)));
        acc_tail[i][r] = _mm256_fmadd_ps(prod, _mm256_set1_ps(ws * a.d[r * a.nb + b]), acc_tail[i][r]);
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    const float row_scale = rs[i].is_uniform ? rs[i].uniform : 1.0f;
    for (int r = 0; r < R; ++r) out[i * R + r] = (_mm512_reduce_add_ps(acc[i][r]) + hsum256(acc_tail[i][r])) * row_scale;
  }
}

}  // namespace glmserve::avx512
#pragma GCC pop_options

// ---------------------------------------------------------------- dispatch and ops

namespace glmserve {

static std::vector<int64_t> supported_isas() {
  std::vector<int64_t> isas = {kRef};
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2) isas.push_back(kAvx2);
  if (avx2 && __builtin_cpu_supports("avxvnni")) isas.push_back(kAvxVnni);
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    isas.push_back(kAvx512Vnni);
  }
  return isas;
}

static int64_t resolve_isa(int64_t isa) {
  static const std::vector<int64_t> isas = supported_isas();
  if (isa == kAuto) return isas.back();
  TORCH_CHECK(std::find(isas.begin(), isas.end(), isa) != isas.end(), "glmserve: ISA ", isa,
              " is not supported by this CPU");
  return isa;
}

static void expand_on(int64_t isa, const ScaleSource& src, int64_t n, RowScales& rs, bool may_be_uniform) {
  if (may_be_uniform && src.num_groups == 1) {
    float unused;
    expand_group(src, n, 0, &rs.uniform, &unused);
    rs.is_uniform = true;
    return;
  }
  rs.is_uniform = false;  // the buffers are reused across layers
  rs.gb = src.group_blocks;
  if (isa >= kAvx2) {
    avx2::expand_groups(src, n, rs.scale.data(), rs.min.data());
  } else {
    ref::expand_groups(src, n, rs.scale.data(), rs.min.data());
  }
}

// NB output rows against R (1..8) activation rows on the chosen ISA.
template <bool kInt4, int R, int NB>
static void rows_on(int64_t isa, const void* w, int64_t row_bytes, const RowScales* rs, const Acts& a, float* out) {
  const auto* w4 = static_cast<const uint8_t*>(w);
  const auto* w8 = static_cast<const int8_t*>(w);
  if (isa == kAvx512Vnni) {
    if constexpr (kInt4) avx512::int4_rows<R, NB>(w4, row_bytes, rs, a, out); else avx512::int8_rows<R, NB>(w8, row_bytes, rs, a, out);
  } else if (isa == kAvxVnni) {
    if constexpr (kInt4) avxvnni::int4_rows<R, NB>(w4, row_bytes, rs, a, out); else avxvnni::int8_rows<R, NB>(w8, row_bytes, rs, a, out);
  } else if (isa == kAvx2) {
    if constexpr (kInt4) avx2::int4_rows<R, NB>(w4, row_bytes, rs, a, out); else avx2::int8_rows<R, NB>(w8, row_bytes, rs, a, out);
  } else {
    if constexpr (kInt4) ref::int4_rows<R, NB>(w4, row_bytes, rs, a, out); else ref::int8_rows<R, NB>(w8, row_bytes, rs, a, out);
  }
}

// Where results go: [M, N] in x's dtype.
struct Out {
  void* data;
  at::ScalarType dtype;
  int64_t n;
  void put(int64_t row, int64_t col, float value) const {
    const int64_t i = row * n + col;
    switch (dtype) {
      case at::kBFloat16: static_cast<c10::BFloat16*>(data)[i] = c10::BFloat16(value); break;
      case at::kHalf: static_cast<c10::Half*>(data)[i] = c10::Half(value); break;
      default: static_cast<float*>(data)[i] = value;
    }
  }
};

// Output rows [begin, end) against R activation rows: kOutRows<R> at a time, then one by one.
template <bool kInt4, int R>
static void output_rows(int64_t isa, const uint8_t* w, int64_t row_bytes, const ScaleSource& src, int64_t begin,
                        int64_t end, const Acts& a, std::vector<RowScales>& rs, const Out& out, int64_t r0) {
  constexpr int NB = kOutRows<R>;
  float part[NB * R];
  int64_t j = begin;
  for (; j + NB <= end; j += NB) {
    for (int i = 0; i < NB; ++i) expand_on(isa, src, j + i, rs[i], !kInt4);
    rows_on<kInt4, R, NB>(isa, w + j * row_bytes, row_bytes, rs.data(), a, part);
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) out.put(r0 + r, j + i, part[i * R + r]);
  }
  for (; j < end; ++j) {
    expand_on(isa, src, j, rs[0], !kInt4);
    rows_on<kInt4, R, 1>(isa, w + j * row_bytes, row_bytes, rs.data(), a, part);
    for (int r = 0; r < R; ++r) out.put(r0 + r, j, part[r]);
  }
}

template <bool kInt4>
static void output_rows_for(int64_t rows, int64_t isa, const uint8_t* w, int64_t row_bytes, const ScaleSource& src,
                            int64_t begin, int64_t end, const Acts& a, std::vector<RowScales>& rs, const Out& out,
                            int64_t r0) {
  switch (rows) {
    case 1: output_rows<kInt4, 1>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
    case 2: output_rows<kInt4, 2>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
    case 3: output_rows<kInt4, 3>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
    case 4: output_rows<kInt4, 4>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
    case 5: output_rows<kInt4, 5>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
    case 6: output_rows<kInt4, 6>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
    case 7: output_rows<kInt4, 7>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
    default: output_rows<kInt4, 8>(isa, w, row_bytes, src, begin, end, a, rs, out, r0); break;
  }
}

static ScaleSource scale_source(const at::Tensor& scales, const c10::optional<at::Tensor>& mins, int64_t n,
                                int64_t k, int64_t group_size, float min_from_scale) {
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0 && k % group_size == 0, "glmserve: bad group size ", group_size);
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat,
              "glmserve: scales must be float16 or float32");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == n && scales.size(1) == k / group_size,
              "glmserve: scales must be contiguous [N, K / group_size]");
  if (mins.has_value()) {
    TORCH_CHECK(mins->scalar_type() == scales.scalar_type() && mins->is_contiguous() && mins->sizes() == scales.sizes(),
                "glmserve: mins must be like scales");
  }
  return ScaleSource{scales.data_ptr(), mins.has_value() ? mins->data_ptr() : nullptr,
                     scales.scalar_type() == at::kHalf, k / group_size, group_size / kBlock, min_from_scale, n};
}

// Output rows per task: enough weight bytes to be worth a thread (small layers run on one).
static int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(4, (128 << 10) / std::max<int64_t>(1, row_bytes)); }

template <bool kInt4>
static at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& mins, int64_t group_size, int64_t isa_in) {
  const int64_t n = w.size(0), kw = kInt4 ? w.size(1) * 2 : w.size(1), row_bytes = w.size(1);
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "glmserve: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == kw && kw % kBlock == 0,
              "glmserve: x must be [M, K] as the weight, K a multiple of 32");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), nb = kw / kBlock;
  const int64_t isa = resolve_isa(isa_in);
  const ScaleSource src = scale_source(scales, mins, n, kw, group_size, kInt4 ? -8.0f : 0.0f);
  // Reused by this (calling) thread; the workers below see them through plain pointers only.
  static thread_local std::vector<int8_t> xq;
  static thread_local std::vector<float> xd, xs;
  const int64_t interleave = !kInt4 || isa == kRef ? 1 : isa == kAvx512Vnni ? 4 : 2;
  quantize_rows(x, interleave, xq, xd, xs);
  const int8_t* xq_data = xq.data();
  const float* xd_data = xd.data();
  const float* xs_data = xs.data();
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "glmserve: x must be float32, bfloat16 or float16");
  at::Tensor out = at::empty({m, n}, x.options());
  const Out out_rows{out.data_ptr(), out.scalar_type(), n};
  const auto* w_data = static_cast<const uint8_t*>(w.data_ptr());
  at::parallel_for(0, n, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    thread_local std::vector<RowScales> rs;  // the workers live on: allocated once per thread
    if (rs.size() < 4 || static_cast<int64_t>(rs[0].scale.size()) < nb + 8) rs.assign(4, RowScales(nb));
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m - r0);
      const Acts a{xq_data + r0 * kw, xd_data + r0 * nb, xs_data + r0 * nb, kw, nb};
      output_rows_for<kInt4>(rows, isa, w_data, row_bytes, src, begin, end, a, rs, out_rows, r0);
    }
  });
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& mins, int64_t group_size, int64_t isa) {
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.is_contiguous() && nibbles.dim() == 2,
              "glmserve: nibbles must be contiguous uint8 [N, K / 2]");
  return linear<true>(x, nibbles, scales, mins, group_size, isa);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t group_size,
                       int64_t isa) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2, "glmserve: q must be contiguous int8 [N, K]");
  return linear<false>(x, q, scales, c10::nullopt, group_size, isa);
}

static void store_row(const float* row, int64_t k, at::Tensor& out, int64_t i, int64_t isa) {
  switch (out.scalar_type()) {
    case at::kFloat: std::memcpy(out.data_ptr<float>() + i * k, row, k * sizeof(float)); break;
    case at::kBFloat16: {
      c10::BFloat16* dst = out.data_ptr<c10::BFloat16>() + i * k;
      if (isa >= kAvx2) {
        avx2::to_bf16_row(row, k, reinterpret_cast<uint16_t*>(dst));
      } else {
        for (int64_t c = 0; c < k; ++c) dst[c] = c10::BFloat16(row[c]);
      }
      break;
    }
    case at::kHalf: {
      c10::Half* dst = out.data_ptr<c10::Half>() + i * k;
      for (int64_t c = 0; c < k; ++c) dst[c] = c10::Half(row[c]);
      break;
    }
    default: TORCH_CHECK(false, "glmserve: dequantize into float32, bfloat16 or float16");
  }
}

static void check_out(const at::Tensor& out, int64_t row0, int64_t n, int64_t kw) {
  TORCH_CHECK(out.dim() == 2 && out.size(1) <= kw && out.size(1) % kBlock == 0 && out.is_contiguous() && row0 >= 0 &&
                  row0 + out.size(0) <= n,
              "glmserve: out must be contiguous [rows, K] within the weight");
}

// Rows [row0, row0 + out.size(0)) of the weight, its first out.size(1) columns, dequantized into
// `out`: steps with many rows run a dense GEMM on one bounded slice at a time.
void int4_dequantize(const at::Tensor& nibbles, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                     int64_t group_size, int64_t row0, at::Tensor& out) {
  const int64_t kw = nibbles.size(1) * 2, nb = kw / kBlock, k = out.size(1);
  check_out(out, row0, nibbles.size(0), kw);
  const int64_t isa = resolve_isa(kAuto);
  const ScaleSource src = scale_source(scales, mins, nibbles.size(0), kw, group_size, -8.0f);
  at::parallel_for(0, out.size(0), grain_rows(kw / 2), [&](int64_t begin, int64_t end) {
    RowScales rs(nb);
    std::vector<float> row(kw);
    for (int64_t i = begin; i < end; ++i) {
      expand_on(isa, src, row0 + i, rs, false);
      const uint8_t* w = nibbles.data_ptr<uint8_t>() + (row0 + i) * (kw / 2);
      if (isa >= kAvx2) avx2::int4_dequantize_row(w, rs, kw, row.data()); else ref::int4_dequantize_row(w, rs, kw, row.data());
      store_row(row.data(), k, out, i, isa);
    }
  });
}

void int8_dequantize(const at::Tensor& q, const at::Tensor& scales, int64_t group_size, int64_t row0, at::Tensor& out) {
  const int64_t k = q.size(1), nb = k / kBlock;
  check_out(out, row0, q.size(0), k);
  TORCH_CHECK(out.size(1) == k, "glmserve: out must have the weight's columns");
  const int64_t isa = resolve_isa(kAuto);
  const ScaleSource src = scale_source(scales, c10::nullopt, q.size(0), k, group_size, 0.0f);
  at::parallel_for(0, out.size(0), grain_rows(k), [&](int64_t begin, int64_t end) {
    RowScales rs(nb);
    std::vector<float> row(k);
    for (int64_t i = begin; i < end; ++i) {
      expand_on(isa, src, row0 + i, rs, false);
      const int8_t* w = q.data_ptr<int8_t>() + (row0 + i) * k;
      for (int64_t c = 0; c < k; ++c) row[c] = w[c] * rs.scale_of(c / kBlock);
      store_row(row.data(), k, out, i, isa);
    }
  });
}

std::vector<int64_t> cpu_isas() { return supported_isas(); }

}  // namespace glmserve

TORCH_LIBRARY(glmserve, m) {
  m.def("int4_linear(Tensor x, Tensor nibbles, Tensor scales, Tensor? mins, int group_size, int isa=0) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scales, int group_size, int isa=0) -> Tensor");
  m.def("int4_dequantize(Tensor nibbles, Tensor scales, Tensor? mins, int group_size, int row0, Tensor(a!) out) -> ()");
  m.def("int8_dequantize(Tensor q, Tensor scales, int group_size, int row0, Tensor(a!) out) -> ()");
  m.def("cpu_isas() -> int[]");
}

TORCH_LIBRARY_IMPL(glmserve, CPU, m) {
  m.impl("int4_linear", &glmserve::int4_linear);
  m.impl("int8_linear", &glmserve::int8_linear);
  m.impl("int4_dequantize", &glmserve::int4_dequantize);
  m.impl("int8_dequantize", &glmserve::int8_dequantize);
}

TORCH_LIBRARY_IMPL(glmserve, CompositeExplicitAutograd, m) { m.impl("cpu_isas", &glmserve::cpu_isas); }
