// The small operations of a decode step on CPU, each one op instead of 2-6 aten kernels: on a small
// model a step is ~25 such kernels per layer and their dispatch costs more than their arithmetic.
// Each keeps the roundings of the aten ops it replaces (bfloat16 / float16 values are rounded where
// those ops round: elementwise in float, one rounding per op), except decode attention, which
// accumulates in float32 as SDPA's CPU kernel does, in another order.
//
//   rms_norm(x [T, K], w [K], eps) -> [T, K]             x / rms(x) * w, float32 sums, one rounding
//   add_rms_norm(x, delta, w, eps) -> (x + delta, rms_norm(x + delta))
//   silu_mul(x [T, 2F]) -> [T, F]                         silu(x[:, :F]) * x[:, F:]
//   rotary_(x [T, NH, D], cos [T, 1, R], sin [T, 1, R], interleaved)   in place, see layers/rotary.py
//   write_kv_(k_cache, v_cache [KVH, slots, D], k, v [T, KVH, D], slots [T])
//   decode_attention(q [B, H, D], k_cache, v_cache [KVH, blocks, block_size, D], block_tables [B, max_blocks],
//                    context_lens [B], scale, alibi_slopes [H]?) -> [B, H * D]
//   argmax_rows(x [N, V] float32) -> [N] int64        torch.argmax(x, -1), vectorized
//   apply_token_bitmask_(logits [N, V] float32, rows [M] int64, bitmask [M, W] int32)
//                        logits[rows[i], t] = -inf where bit t of bitmask[i] is clear (grammars)
//   lora_add_(out [T, N], x [T, K], a [S*W, K], bt [S*W, N], row_slots [T] int64, W)
//                        out[t] += bt_s^T (a_s x[t]) for row t's LoRA slot s (none where s < 0)
// Rows may be strided (views of a merged projection); the last dimension must be contiguous.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace glmserve {
namespace decode_ops {

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64, chosen once at load (GCC ifunc).
#define GLMSERVE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.stride(-1) == 1, "glmserve: ", name, " must be a CPU tensor, last dimension contiguous");
}

// Work of about this many multiply-adds is worth a second thread.
constexpr int64_t kGrainWork = 1 << 15;

int64_t grain(int64_t units, int64_t work_per_unit) {
  return std::max<int64_t>(1, std::min<int64_t>(units, kGrainWork / std::max<int64_t>(1, work_per_unit)));
}

// ---------------------------------------------------------------- element conversions
// float32 <-> the element types, as plain arithmetic on bits for bfloat16 so that the row loops
// below vectorize (c10's conversion is the same rounding, to nearest even, NaN kept a quiet NaN,
// but branches per element). float16 goes through c10.

static inline float to_float(float v) { return v; }
static inline float to_float(c10::Half v) { return static_cast<float>(v); }
static inline float to_float(c10::BFloat16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16); }

template <typename T>
static inline T from_float(float f) {
  return static_cast<T>(f);
}
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, f);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return c10::BFloat16(f != f ? static_cast<uint16_t>(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

// Rounded to T and back, as an aten op storing a T result does between two ops.
template <typename T>
static inline float rounded(float f) {
  return to_float(from_float<T>(f));
}

// ---------------------------------------------------------------- normalization and activation
// Row functions are instantiated per element type and cloned per ISA (GLMSERVE_CLONES). RMSNorm
// and rotary keep the plain scalar arithmetic (no fused multiply-adds: fp-contract=off), and the
// norm's sum of squares stays sequential: a vectorized sum (3x faster at 16 rows) moves bfloat16
// roundings enough to flip the bundled model's greedy near-ties (its answer to "What is the
// capital of France?", docs/engine.md), which these ops must not do.

template <typename T>
GLMSERVE_CLONES __attribute__((optimize("fp-contract=off"))) void rms_row(const T* x, const T* w, float eps, int64_t k, T* out) {
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    const float v = to_float(x[i]);
    sum += v * v;
  }
  const float rstd = 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) out[i] = from_float<T>(to_float(x[i]) * rstd * to_float(w[i]));
}

// s = x + delta, rounded to T as aten's add does.
template <typename T>
GLMSERVE_CLONES void add_row(const T* a, const T* b, int64_t k, T* s) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) s[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type() &&
                  w.is_contiguous(), "glmserve: rms_norm wants x [T, K] and a contiguous weight [K] of x's dtype");
  const int64_t t = x.size(0), k = x.size(1), stride = x.stride(0);
  at::Tensor out = at::empty({t, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, t, grain(t, k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_row(xp + r * stride, w.data_ptr<scalar_t>(), static_cast<float>(eps), k, op + r * k);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w,
                                                double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  TORCH_CHECK(x.dim() == 2 && delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(),
              "glmserve: add_rms_norm wants x and delta of one shape [T, K] and dtype");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type() && w.is_contiguous(),
              "glmserve: add_rms_norm wants a contiguous weight [K] of x's dtype");
  const int64_t t = x.size(0), k = x.size(1);
  at::Tensor sum = at::empty({t, k}, x.options()), out = at::empty({t, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    at::parallel_for(0, t, grain(t, 2 * k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* a = x.data_ptr<scalar_t>() + r * x.stride(0);
        const scalar_t* b = delta.data_ptr<scalar_t>() + r * delta.stride(0);
        scalar_t* s = sum.data_ptr<scalar_t>() + r * k;
        add_row(a, b, k, s);
        rms_row(s, w.data_ptr<scalar_t>(), static_cast<float>(eps), k, out.data_ptr<scalar_t>() + r * k);
      }
    });
  });
  return {sum, out};
}

// exp(x) for x <= 88 (silu's -g), vectorizable: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and
// Cephes' degree-6 polynomial (~1 ulp); far below a bfloat16's or float16's precision.
static inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  // Round to nearest even by adding and taking back 1.5 * 2^23 (|x * log2 e| < 2^22): as
  // nearbyint, without its call that would keep the loop scalar.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// o = silu(gate) * up: silu rounded to T as F.silu stores it, then the product (aten's mul).
template <typename T>
GLMSERVE_CLONES void silu_mul_row(const T* gate, const T* up, int64_t f, T* o) {
#pragma omp simd
  for (int64_t i = 0; i < f; ++i) {
    const float g = to_float(gate[i]);
    const float silu = rounded<T>(g / (1.0f + fast_exp(std::min(-g, 88.0f))));
    o[i] = from_float<T>(silu * to_float(up[i]));
  }
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "glmserve: silu_mul wants x [T, 2F]");
  const int64_t t = x.size(0), f = x.size(1) / 2;
  at::Tensor out = at::empty({t, f}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul", [&] {
    at::parallel_for(0, t, grain(t, 8 * f), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = x.data_ptr<scalar_t>() + r * x.stride(0);
        silu_mul_row(gate, gate + f, f, out.data_ptr<scalar_t>() + r * f);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- rotary embedding, KV cache

// One head's first `rot` dims rotated in place, as RotaryEmbedding.apply: x * cos (rounded, as
// aten's mul), then + swap(x) * sin (addcmul), from a float copy of the head (rot <= 512).
template <typename T>
GLMSERVE_CLONES __attribute__((optimize("fp-contract=off"))) void rotary_head(T* v, const T* c, const T* s, int64_t rot, bool interleaved) {
  float row[512];
#pragma omp simd
  for (int64_t j = 0; j < rot; ++j) row[j] = to_float(v[j]);
  if (interleaved) {  // pairs (2i, 2i + 1)
#pragma omp simd
    for (int64_t j = 0; j < rot; ++j) v[j] = from_float<T>(rounded<T>(row[j] * to_float(c[j])) + row[j ^ 1] * to_float(s[j]));
    return;
  }
  const int64_t half = rot / 2;  // pairs (i, i + rot / 2)
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) v[j] = from_float<T>(rounded<T>(row[j] * to_float(c[j])) + row[j + half] * to_float(s[j]));
#pragma omp simd
  for (int64_t j = half; j < rot; ++j) v[j] = from_float<T>(rounded<T>(row[j] * to_float(c[j])) + row[j - half] * to_float(s[j]));
}

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1, "glmserve: rotary_ wants x [T, NH, D], D contiguous");
  const int64_t t = x.size(0), nh = x.size(1), rot = cos.size(-1);
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == t * rot && sin.numel() == t * rot && rot <= x.size(2) && rot % 2 == 0 &&
                  rot <= 512,
              "glmserve: rotary_ wants contiguous cos, sin [T, 1, R] in x's dtype, R even and <= D");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    at::parallel_for(0, t * nh, grain(t * nh, 4 * rot), [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t i = u / nh, h = u % nh;
        rotary_head(x.data_ptr<scalar_t>() + i * x.stride(0) + h * x.stride(1), cos.data_ptr<scalar_t>() + i * rot,
                    sin.data_ptr<scalar_t>() + i * rot, rot, interleaved);
      }
    });
  });
}

void write_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 4,
              "glmserve: write_kv_ wants contiguous caches [KVH, blocks, block_size, D]");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(),
              "glmserve: write_kv_ wants k, v [T, KVH, D] in the cache's dtype, D contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == k.size(0),
              "glmserve: write_kv_ wants int64 slots [T]");
  const int64_t t = k.size(0), kvh = k.size(1), d = k.size(2);
  const int64_t num_slots = k_cache.size(1) * k_cache.size(2), bytes = d * k.element_size();
  TORCH_CHECK(k_cache.size(0) == kvh && k_cache.size(3) == d, "glmserve: write_kv_: k does not fit the cache");
  const int64_t* slot = slots.data_ptr<int64_t>();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < num_slots, "glmserve: write_kv_: slot out of range");
    for (int64_t h = 0; h < kvh; ++h) {
      const int64_t to = (h * num_slots + slot[i]) * bytes;
      std::memcpy(kc + to, static_cast<const char*>(k.data_ptr()) + (i * k.stride(0) + h * k.stride(1)) * k.element_size(), bytes);
      std::memcpy(vc + to, static_cast<const char*>(v.data_ptr()) + (i * v.stride(0) + h * v.stride(1)) * v.element_size(), bytes);
    }
  }
}

// ---------------------------------------------------------------- decode attention

enum Kind { kF32, kBF16, kF16 };

// n values of a cache row into float32.
static inline __attribute__((always_inline)) void to_float(const void* p, Kind kind, int64_t n, float* out) {
  if (kind == kBF16) {
    const auto* h = static_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
      std::memcpy(out + i, &bits, 4);
    }
  } else if (kind == kF32) {
    std::memcpy(out, p, n * 4);
  } else {
    const auto* h = static_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < n; ++i) out[i] = c10::detail::fp16_ieee_to_fp32_value(h[i]);
  }
}

// One sequence's G query heads against the KV head they share.
struct Unit {
  const float* q;         // [G, D], already scaled
  const char* const* k;   // per block of the sequence: its [block_size, D] keys of this head
  const char* const* v;   // the same for values
  int64_t len, block_size, g, d;
  Kind kind;
  const float* slopes;    // [G] ALiBi slopes or nullptr
};

// Any head size and CPU. scores [G, len] and row [D] are scratch; out [G, D] float32, normalized.
// (GCC sums a vectorized dot product's lanes one by one, 16 dependent adds: AVX-512 CPUs run
// attend_avx512 below for the usual head sizes.)
GLMSERVE_CLONES void attend(const Unit& u, float* scores, float* row, float* out) {
  const int64_t d = u.d, g = u.g, len = u.len, es = u.kind == kF32 ? 4 : 2;
  for (int64_t l = 0; l < len; ++l) {
    to_float(u.k[l / u.block_size] + (l % u.block_size) * d * es, u.kind, d, row);
    for (int64_t j = 0; j < g; ++j) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < d; ++i) sum += u.q[j * d + i] * row[i];
      scores[j * len + l] = sum;
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* s = scores + j * len;
    if (u.slopes != nullptr) {
      for (int64_t l = 0; l < len; ++l) s[l] += u.slopes[j] * static_cast<float>(l);
    }
    float top = s[0];
    for (int64_t l = 1; l < len; ++l) top = std::max(top, s[l]);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t l = 0; l < len; ++l) {
      s[l] = fast_exp(s[l] - top);
      total += s[l];
    }
    const float inv = 1.0f / total;
    for (int64_t l = 0; l < len; ++l) s[l] *= inv;
  }
  std::fill(out, out + g * d, 0.0f);
  for (int64_t l = 0; l < len; ++l) {
    to_float(u.v[l / u.block_size] + (l % u.block_size) * d * es, u.kind, d, row);
    for (int64_t j = 0; j < g; ++j) {
      const float p = scores[j * len + l];
      float* o = out + j * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += p * row[i];
    }
  }
}

// The same on AVX-512 for D = 16 * NV: keys and values of the sequence are widened to float32 once
// (scratch [len, D] each), a query's output accumulates in NV registers, and dot products end in
// a tree sum.
__attribute__((target("avx512f"))) static inline __m512 widen16(const void* p, Kind kind) {
  if (kind == kF32) return _mm512_loadu_ps(p);
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  if (kind == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// fast_exp on 16 lanes.
__attribute__((target("avx512f"))) static inline __m512 fast_exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// The 16 lane sums of a[0..15], as one vector (lane k: the sum of a[k]): a transpose-and-add tree,
// 45 shuffles and adds where 16 separate reductions take ~130.
__attribute__((target("avx512f"))) static inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: a[2i] lanes 0+2, a[2i+1] lanes 0+2, a[2i] 1+3, a[2i+1] 1+3
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per chunk: that chunk's sums of a[4i..4i+3]
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // Chunk sums: chunk i of the result is the total of c[i]'s four chunks.
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One pass over the keys in chunks of 16 (online softmax, as flash decoding): a chunk's keys and
// values are widened to float32 once into scratch that stays in L1 (keys, values: [16, D] each),
// each query head scores the 16 keys at once, and its running max, sum and output (out [G, D])
// are rescaled when the max grows. `scores` is unused here.
template <int NV>
__attribute__((target("avx512f"))) void attend_avx512(const Unit& u, float* /*scores*/, float* keys, float* values, float* out) {
  constexpr int64_t d = 16 * NV;
  const int64_t g = u.g, len = u.len, es = u.kind == kF32 ? 4 : 2;
  constexpr int kMaxG = 64;  // running max and sum per query head; more heads take another pass
  float top[kMaxG], total[kMaxG];
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j0 = 0; j0 < g; j0 += kMaxG) {
    const int64_t gc = std::min<int64_t>(kMaxG, g - j0);
    for (int64_t j = 0; j < gc; ++j) {
      top[j] = -std::numeric_limits<float>::infinity();
      total[j] = 0.0f;
    }
    std::fill(out + j0 * d, out + (j0 + gc) * d, 0.0f);
    int64_t block = 0, offset = 0;  // where key l0 is: block l0 / block_size, row l0 % block_size
    for (int64_t l0 = 0; l0 < len; l0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, len - l0));
      for (int k = 0; k < 16; ++k) {
        if (k < n) {
          const char* kp = u.k[block] + offset * d * es;
          const char* vp = u.v[block] + offset * d * es;
          for (int c = 0; c < NV; ++c) {
            _mm512_storeu_ps(keys + k * d + 16 * c, widen16(kp + 16 * c * es, u.kind));
            _mm512_storeu_ps(values + k * d + 16 * c, widen16(vp + 16 * c * es, u.kind));
          }
          if (++offset == u.block_size) {
            offset = 0;
            ++block;
          }
        } else {  // past the end: zero keys (scores masked below) and values (weight 0)
          for (int c = 0; c < NV; ++c) {
            _mm512_storeu_ps(keys + k * d + 16 * c, _mm512_setzero_ps());
            _mm512_storeu_ps(values + k * d + 16 * c, _mm512_setzero_ps());
          }
        }
      }
      const __mmask16 valid = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
      for (int64_t jj = 0; jj < gc; ++jj) {
        const int64_t j = j0 + jj;
        const float* qj = u.q + j * d;
        __m512 acc[16];
        for (int k = 0; k < 16; ++k) {
          acc[k] = _mm512_mul_ps(_mm512_loadu_ps(qj), _mm512_loadu_ps(keys + k * d));
          for (int c = 1; c < NV; ++c) acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * c), _mm512_loadu_ps(keys + k * d + 16 * c), acc[k]);
        }
        __m512 s = sum_lanes16(acc);
        if (u.slopes != nullptr) {  // + slope * key position
          s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(u.slopes[j]), _mm512_add_ps(_mm512_set1_ps(static_cast<float>(l0)), iota)));
        }
        const float new_top = std::max(top[jj], _mm512_mask_reduce_max_ps(valid, s));
        const float rescale = fast_exp(top[jj] - new_top);  // 0 on the first chunk (exp(-inf))
        top[jj] = new_top;
        alignas(64) float p[16];
        const __m512 e = _mm512_maskz_mov_ps(valid, fast_exp16(_mm512_sub_ps(s, _mm512_set1_ps(new_top))));
        _mm512_store_ps(p, e);
        total[jj] = total[jj] * rescale + _mm512_reduce_add_ps(e);
        float* o = out + j * d;
        __m512 oc[NV];
        for (int c = 0; c < NV; ++c) oc[c] = _mm512_mul_ps(_mm512_loadu_ps(o + 16 * c), _mm512_set1_ps(rescale));
        for (int k = 0; k < n; ++k) {
          const __m512 pk = _mm512_set1_ps(p[k]);
          for (int c = 0; c < NV; ++c) oc[c] = _mm512_fmadd_ps(pk, _mm512_loadu_ps(values + k * d + 16 * c), oc[c]);
        }
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + 16 * c, oc[c]);
      }
    }
    for (int64_t jj = 0; jj < gc; ++jj) {
      const __m512 inv = _mm512_set1_ps(1.0f / total[jj]);
      float* o = out + (j0 + jj) * d;
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(o + 16 * c), inv));
    }
  }
}

using AttendFn = void (*)(const Unit&, float* scores, float* keys, float* values, float* out);

// The AVX-512 kernel for this head size where the CPU has it, else nullptr.
AttendFn attend_kernel(int64_t d) {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  if (!has_avx512) return nullptr;
  switch (d) {
    case 32: return attend_avx512<2>;
    case 48: return attend_avx512<3>;
    case 64: return attend_avx512<4>;
    case 128: return attend_avx512<8>;
    case 80: return attend_avx512<5>;
    case 96: return attend_avx512<6>;
    case 256: return attend_avx512<16>;
    default: return nullptr;
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            const c10::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1, "glmserve: decode_attention wants q [B, H, D], D contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "glmserve: decode_attention wants contiguous caches [KVH, blocks, block_size, D] in q's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() &&
                  block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "glmserve: decode_attention wants int64 block_tables [B, max_blocks] and context_lens [B]");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "glmserve: decode_attention wants float32, bfloat16 or float16");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), kvh = k_cache.size(0), block_size = k_cache.size(2);
  const int64_t num_blocks = k_cache.size(1), max_blocks = block_tables.size(1), g = h / kvh;
  TORCH_CHECK(k_cache.size(3) == d && h % kvh == 0, "glmserve: decode_attention: q does not fit the cache");
  const float* slopes = nullptr;
  if (alibi_slopes.has_value()) {
    TORCH_CHECK(alibi_slopes->scalar_type() == at::kFloat && alibi_slopes->is_contiguous() && alibi_slopes->numel() == h,
                "glmserve: alibi_slopes must be float32 [H]");
    slopes = alibi_slopes->data_ptr<float>();
  }
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  int64_t longest = 1;
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_blocks * block_size, "glmserve: decode_attention: bad context length");
    for (int64_t j = 0; j < (lens[i] + block_size - 1) / block_size; ++j) {
      TORCH_CHECK(tables[i * max_blocks + j] >= 0 && tables[i * max_blocks + j] < num_blocks,
                  "glmserve: decode_attention: block out of range");
    }
    longest = std::max(longest, lens[i]);
  }
  const Kind kind = q.scalar_type() == at::kBFloat16 ? kBF16 : q.scalar_type() == at::kHalf ? kF16 : kF32;
  const int64_t es = q.element_size();
  const auto* k_data = static_cast<const char*>(k_cache.data_ptr());
  const auto* v_data = static_cast<const char*>(v_cache.data_ptr());
  const int64_t head_bytes = k_cache.stride(0) * es, block_bytes = k_cache.stride(1) * es;
  at::Tensor out = at::empty({b, h * d}, q.options());
  const AttendFn fast = attend_kernel(d);
  // One task: a sequence's G query heads that share one KV head.
  at::parallel_for(0, b * kvh, grain(b * kvh, 2 * longest * d * g), [&](int64_t begin, int64_t end) {
    // Scratch kept by each thread across calls (sized up, never zeroed again): a decode step
    // calls this once per layer.
    thread_local std::vector<float> qf, row, scores, acc, keys, values;
    thread_local std::vector<const char*> k_blocks, v_blocks;
    for (auto* v : {&qf, &acc}) v->resize(std::max<size_t>(v->size(), g * d));
    row.resize(std::max<size_t>(row.size(), d));
    if (fast == nullptr) scores.resize(std::max<size_t>(scores.size(), g * longest));
    if (fast != nullptr) {
      for (auto* v : {&keys, &values}) v->resize(std::max<size_t>(v->size(), 16 * d));
    }
    for (auto* v : {&k_blocks, &v_blocks}) v->resize(std::max<size_t>(v->size(), max_blocks));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kvh, kv = task % kvh, len = lens[s];
      for (int64_t j = 0; j < (len + block_size - 1) / block_size; ++j) {
        const int64_t block = tables[s * max_blocks + j];
        k_blocks[j] = k_data + kv * head_bytes + block * block_bytes;
        v_blocks[j] = v_data + kv * head_bytes + block * block_bytes;
      }
      for (int64_t j = 0; j < g; ++j) {
        to_float(static_cast<const char*>(q.data_ptr()) + (s * q.stride(0) + (kv * g + j) * q.stride(1)) * es, kind, d,
                 qf.data() + j * d);
        for (int64_t i = 0; i < d; ++i) qf[j * d + i] *= static_cast<float>(scale);
      }
      const Unit unit{qf.data(), k_blocks.data(), v_blocks.data(), len, block_size, g, d, kind,
                      slopes == nullptr ? nullptr : slopes + kv * g};
      if (fast != nullptr) {
        fast(unit, scores.data(), keys.data(), values.data(), acc.data());
      } else {
        attend(unit, scores.data(), row.data(), acc.data());
      }
      auto* o = static_cast<char*>(out.data_ptr()) + (s * h * d + kv * g * d) * es;
      for (int64_t i = 0; i < g * d; ++i) {
        switch (kind) {
          case kBF16: reinterpret_cast<c10::BFloat16*>(o)[i] = c10::BFloat16(acc[i]); break;
          case kF16: reinterpret_cast<c10::Half*>(o)[i] = c10::Half(acc[i]); break;
          default: reinterpret_cast<float*>(o)[i] = acc[i];
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------- LoRA adapters
// out[t] += bt[s*W : (s+1)*W]^T (a[s*W : (s+1)*W] x[t]) for each row t on slot s = row_slots[t] >= 0
// (layers/lora.py: a [S*W, K] and bt [S*W, N] hold every resident adapter side by side, B scaled).
// Each row reads only its own adapter's W rows of a and bt, where the GEMM form reads all S slots;
// for the few rows of a decode step this is a few microseconds against tens for two small GEMMs.

template <typename T>
GLMSERVE_CLONES float dot_row(const T* a, const T* x, int64_t k) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < k; ++i) sum += to_float(a[i]) * to_float(x[i]);
  return sum;
}

template <typename T>
GLMSERVE_CLONES void lora_out_cols(const float* h, const T* bt, int64_t width, int64_t ldb, int64_t n, T* out) {
  float acc[256];  // columns per chunk (the caller's)
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
  for (int64_t r = 0; r < width; ++r) {
    const float hr = h[r];
    const T* row = bt + r * ldb;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += hr * to_float(row[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = from_float<T>(to_float(out[j]) + acc[j]);
}

void lora_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const at::Tensor& row_slots,
               int64_t width) {
  check_rows(out, "out");
  check_rows(x, "x");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous() && row_slots.is_contiguous() && row_slots.scalar_type() == at::kLong,
              "glmserve: lora_add_ wants contiguous a, bt and int64 row_slots");
  const int64_t t = x.size(0), k = x.size(1), n = out.size(1), slots = a.size(0) / std::max<int64_t>(width, 1);
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == t && a.dim() == 2 && a.size(1) == k && bt.dim() == 2 &&
                  bt.size(0) == a.size(0) && bt.size(1) == n && a.size(0) == slots * width && row_slots.numel() == t,
              "glmserve: lora_add_ wants out [T, N], x [T, K], a [S*W, K], bt [S*W, N], row_slots [T]");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && a.scalar_type() == out.scalar_type() && bt.scalar_type() == out.scalar_type(),
              "glmserve: lora_add_ wants one dtype");
  const int64_t* slot_of = row_slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) TORCH_CHECK(slot_of[i] < slots, "glmserve: a LoRA slot is out of range");
  std::vector<float> h(t * width);
  constexpr int64_t kCols = 256;
  const int64_t chunks = (n + kCols - 1) / kCols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "lora_add_", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = bt.data_ptr<scalar_t>();
    at::parallel_for(0, t * width, grain(t * width, k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i / width, r = i % width, slot = slot_of[row];
        h[i] = slot < 0 ? 0.0f : dot_row(ap + (slot * width + r) * k, x.data_ptr<scalar_t>() + row * x.stride(0), k);
      }
    });
    at::parallel_for(0, t * chunks, grain(t * chunks, width * kCols), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i / chunks, col = (i % chunks) * kCols, slot = slot_of[row];
        if (slot < 0) continue;
        scalar_t* o = out.data_ptr<scalar_t>() + row * out.stride(0) + col;
        lora_out_cols(h.data() + row * width, bp + slot * width * n + col, width, n, std::min(kCols, n - col), o);
      }
    });
  });
}

// ---------------------------------------------------------------- sampling

// The first index of a row's maximum, as torch.argmax (a NaN counts as the maximum): aten's CPU
// argmax is a scalar loop, ~0.35 ms for 16 rows of a 49152-token vocabulary.
__attribute__((target("avx512f"))) static int64_t argmax_avx512(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i best_at = _mm512_setzero_si512(), at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 any_nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    const __mmask16 greater = _mm512_mask_cmp_ps_mask(live, v, best, _CMP_GT_OQ);  // strictly: a lane keeps its first
    any_nan |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, greater, v);
    best_at = _mm512_mask_mov_epi32(best_at, greater, at);
    at = _mm512_add_epi32(at, step);
  }
  if (any_nan) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(x[i])) return i;
  }
  const float top = _mm512_reduce_max_ps(best);
  const __mmask16 is_top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(is_top, best_at);  // the earliest among lanes holding the max
}

static int64_t argmax_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() && x.size(1) > 0 &&
                  x.size(1) < (int64_t{1} << 31),
              "glmserve: argmax_rows wants contiguous float32 [N, V], 0 < V < 2^31");
  const int64_t n = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({n}, x.options().dtype(at::kLong));
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const float* data = x.data_ptr<float>();
  int64_t* result = out.data_ptr<int64_t>();
  at::parallel_for(0, n, grain(n, v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) result[r] = has_avx512 ? argmax_avx512(data + r * v, v) : argmax_scalar(data + r * v, v);
  });
  return out;
}

// One row: words of all ones (all allowed) are skipped, words of zeros filled; what a grammar
// allows is usually either almost everything (inside a string) or a handful of tokens.
GLMSERVE_CLONES void mask_row(float* row, const uint32_t* bits, int64_t v) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t base = 0, w = 0; base < v; base += 32, ++w) {
    const uint32_t b = bits[w];
    if (b == 0xFFFFFFFFu) continue;
    const int64_t n = std::min<int64_t>(32, v - base);
    for (int64_t j = 0; j < n; ++j) {
      if (!((b >> j) & 1u)) row[base + j] = ninf;
    }
  }
}

void apply_token_bitmask_(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(),
              "glmserve: apply_token_bitmask_ wants contiguous float32 logits [N, V]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous() && bitmask.scalar_type() == at::kInt &&
                  bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.size(0) == rows.size(0) &&
                  bitmask.size(1) * 32 >= logits.size(1),
              "glmserve: apply_token_bitmask_ wants rows [M] int64 and a contiguous bitmask [M, >= V/32] int32");
  const int64_t n = logits.size(0), v = logits.size(1), m = rows.size(0), words = bitmask.size(1);
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) TORCH_CHECK(row_ids[i] >= 0 && row_ids[i] < n, "glmserve: a grammar row is out of range");
  float* data = logits.data_ptr<float>();
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  at::parallel_for(0, m, grain(m, v / 8), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) mask_row(data + row_ids[i] * v, bits + i * words, v);
  });
}

}  // namespace decode_ops
}  // namespace glmserve

TORCH_LIBRARY_FRAGMENT(glmserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, bool interleaved) -> ()");
  m.def("write_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, float scale, "
        "Tensor? alibi_slopes) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor rows, Tensor bitmask) -> ()");
  m.def("lora_add_(Tensor(a!) out, Tensor x, Tensor a, Tensor bt, Tensor row_slots, int width) -> ()");
}

TORCH_LIBRARY_IMPL(glmserve, CPU, m) {
  m.impl("rms_norm", &glmserve::decode_ops::rms_norm);
  m.impl("add_rms_norm", &glmserve::decode_ops::add_rms_norm);
  m.impl("silu_mul", &glmserve::decode_ops::silu_mul);
  m.impl("rotary_", &glmserve::decode_ops::rotary_);
  m.impl("write_kv_", &glmserve::decode_ops::write_kv_);
  m.impl("decode_attention", &glmserve::decode_ops::decode_attention);
  m.impl("argmax_rows", &glmserve::decode_ops::argmax_rows);
  m.impl("apply_token_bitmask_", &glmserve::decode_ops::apply_token_bitmask_);
  m.impl("lora_add_", &glmserve::decode_ops::lora_add_);
}
