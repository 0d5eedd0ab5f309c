// Row-wise float32 loops used on each logits tile while it sits in L2: the
// head (scale, bias, softcap) with the row max, the softmax partial sums, and
// the logits gradient. AVX2+FMA intrinsics when the compiler targets them (the
// loader adds -mavx2 -mfma only on CPUs that have them), a scalar loop
// otherwise. Which columns take the vector path depends only on the tile
// width, never on the thread, so results do not depend on the schedule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GRAO_AVX2 1
#else
#define GRAO_AVX2 0
#endif

namespace grao {

// Arguments of exp below this are flushed to exactly 0 (e^-87.3 ~ 1e-38,
// negligible in any sum): a -inf logit (a masked vocabulary entry) has
// probability exactly 0, and the clamped argument stays finite, so
// p * log p terms give 0, never 0 * -inf.
constexpr float kExpLo = -87.33654f;

// exp(x) for x <= 0 (0 below kExpLo), NaN propagating.
static inline float exp_nonpos(float x) { return x < kExpLo ? 0.0f : std::exp(x); }

#if GRAO_AVX2
// exp for x <= 0: Cephes expf, x = n ln2 + r with |r| <= ln2/2, degree-5
// polynomial for e^r, 2^n through the exponent bits; about 1 ulp. ``x`` must
// already be clamped to >= kExpLo (see clamp_lo).
static inline __m256 exp256_core(__m256 x) {
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  // ln2 split in two so that fx * ln2 is exact to float precision.
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// max(x, kExpLo); NaN stays NaN (max_ps returns its second operand on NaN).
static inline __m256 clamp_lo(__m256 x) { return _mm256_max_ps(_mm256_set1_ps(kExpLo), x); }

// exp(x) given xc = clamp_lo(x): exactly 0 where x < kExpLo.
static inline __m256 exp256_flushed(__m256 x, __m256 xc) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
  return _mm256_andnot_ps(under, exp256_core(xc));
}

// tanh, Eigen's float rational approximation (odd degree-13 over even
// degree-6) on [-7.9, 7.9], saturating outside (|error| < 3e-7 there, a few
// ulp inside).
static inline __m256 tanh256(__m256 x) {
  const __m256 lim = _mm256_set1_ps(7.90531110763549805f);
  x = _mm256_min_ps(lim, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), x));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.76076847742355e-16f);
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(2.00018790482477e-13f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-8.60467152213735e-11f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(5.12229709037114e-08f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(1.48572235717979e-05f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(6.37261928875436e-04f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(4.89352455891786e-03f));
  p = _mm256_mul_ps(x, p);
  __m256 q = _mm256_set1_ps(1.19825839466702e-06f);
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(1.18534705686654e-04f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(2.26843463243900e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(4.89352518554385e-03f));
  return _mm256_div_ps(p, q);
}

static inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// The head on one row of raw products, in place:
//   z[j] = cap_out * tanh(z[j] * mul + bias_scaled[j])   (cap_out > 0: softcap)
//   z[j] = z[j] * mul + bias_scaled[j]                   (otherwise)
// bias_scaled = bias * mul (may be null). Returns max_j z[j] (-inf when every
// entry is masked by a -inf bias).
static inline float head_max(float* z, int64_t n, float mul, const float* bias_scaled, float cap_out) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if GRAO_AVX2
  const __m256 vmul = _mm256_set1_ps(mul), vcap = _mm256_set1_ps(cap_out);
  __m256 vm = _mm256_set1_ps(m);
  if (cap_out > 0.0f || bias_scaled || mul != 1.0f) {
    for (; j + 8 <= n; j += 8) {
      __m256 a = _mm256_loadu_ps(z + j);
      a = bias_scaled ? _mm256_fmadd_ps(a, vmul, _mm256_loadu_ps(bias_scaled + j)) : _mm256_mul_ps(a, vmul);
      if (cap_out > 0.0f) a = _mm256_mul_ps(vcap, tanh256(a));
      _mm256_storeu_ps(z + j, a);
      vm = _mm256_max_ps(vm, a);
    }
  } else {
    for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(z + j));
  }
  m = hmax256(vm);
#endif
  for (; j < n; ++j) {
    float v = bias_scaled ? std::fma(z[j], mul, bias_scaled[j]) : z[j] * mul;
    if (cap_out > 0.0f) v = cap_out * std::tanh(v);
    z[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

// Softmax partial sums of one row shifted by ``shift``: returns
// s = sum_j exp(z[j] - shift) and, when q is not null, sets
// *q = sum_j exp(z[j] - shift) (z[j] - shift) (for the entropy).
static inline float exp_sums(const float* z, int64_t n, float shift, float* q) {
  int64_t j = 0;
  float s = 0.0f, sq = 0.0f;
#if GRAO_AVX2
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 qa0 = _mm256_setzero_ps(), qa1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(z + j), vs);
    const __m256 x1 = _mm256_sub_ps(_mm256_loadu_ps(z + j + 8), vs);
    const __m256 c0 = clamp_lo(x0), c1 = clamp_lo(x1);
    const __m256 e0 = exp256_flushed(x0, c0), e1 = exp256_flushed(x1, c1);
    acc0 = _mm256_add_ps(acc0, e0);
    acc1 = _mm256_add_ps(acc1, e1);
    if (q) {
      qa0 = _mm256_fmadd_ps(e0, c0, qa0);
      qa1 = _mm256_fmadd_ps(e1, c1, qa1);
    }
  }
  s = hsum256(_mm256_add_ps(acc0, acc1));
  sq = hsum256(_mm256_add_ps(qa0, qa1));
#endif
  for (; j < n; ++j) {
    const float x = z[j] - shift, xc = std::max(x, kExpLo);
    const float e = exp_nonpos(x);
    s += e;
    sq += e * xc;
  }
  if (q) *q = sq;
  return s;
}

// The logits gradient of one row, in place over its logits z (before the
// one-hot term, which the caller adds at the target):
//   d = z[j] - lse,  p = exp(d)
//   z[j] = p * (a + b * d) * slope,   slope = 1 - (z[j] * inv_cap)^2 (CAP) or 1
// with a = -k (coef + ent_coef ent), b = -k ent_coef (ENT; b = 0 otherwise),
// k = logit_scale / temperature: the chain rule of the backend contract.
// d is clamped at kExpLo where p is 0, so a masked entry gives 0.
template <bool ENT, bool CAP>
static inline void dlogits(float* z, int64_t n, float lse, float a, float b, float inv_cap) {
  int64_t j = 0;
#if GRAO_AVX2
  const __m256 vl = _mm256_set1_ps(lse), va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  const __m256 vic = _mm256_set1_ps(inv_cap), one = _mm256_set1_ps(1.0f);
  for (; j + 8 <= n; j += 8) {
    const __m256 zz = _mm256_loadu_ps(z + j);
    const __m256 x = _mm256_sub_ps(zz, vl), xc = clamp_lo(x);
    __m256 g = exp256_flushed(x, xc);
    g = ENT ? _mm256_mul_ps(g, _mm256_fmadd_ps(vb, xc, va)) : _mm256_mul_ps(g, va);
    if (CAP) {
      const __m256 t = _mm256_mul_ps(zz, vic);
      g = _mm256_mul_ps(g, _mm256_fnmadd_ps(t, t, one));
    }
    _mm256_storeu_ps(z + j, g);
  }
#endif
  for (; j < n; ++j) {
    const float x = z[j] - lse, xc = std::max(x, kExpLo);
    float g = exp_nonpos(x) * (ENT ? std::fma(b, xc, a) : a);
    if (CAP) {
      const float t = z[j] * inv_cap;
      g *= 1.0f - t * t;
    }
    z[j] = g;
  }
}

// acc[j] += z[j].
static inline void add_into(float* acc, const float* z, int64_t n) {
  int64_t j = 0;
#if GRAO_AVX2
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), _mm256_loadu_ps(z + j)));
#endif
  for (; j < n; ++j) acc[j] += z[j];
}

}  // namespace grao
