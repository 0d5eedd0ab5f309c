// Row-wise float32 loops used on each logits tile while it sits in L2:
// scale/bias/max, exp-and-sum, and scaling to dlogits. AVX2+FMA intrinsics
// when the compiler targets them (the loader adds -mavx2 -mfma only on CPUs
// that have them), a scalar loop otherwise.
#pragma once

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

#if GRAO_AVX2
// exp for x <= 0 (every argument here is a logit minus its row maximum or
// log-sum-exp). Cephes expf: x = n ln2 + r with |r| <= ln2/2, degree-5
// polynomial for e^r, 2^n through the exponent bits; about 1 ulp. Inputs
// below -87.3 are clamped there (e^-87.3 ~ 1e-38, negligible in any sum);
// NaN propagates because max_ps returns its second operand on NaN.
static inline __m256 exp256_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  x = _mm256_max_ps(lo, x);
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

// z[j] = z[j] * inv_t + bias_scaled[j] (bias_scaled = bias / T, may be null);
// returns max_j z[j]. fma keeps one rounding in both the vector and the tail.
static inline float scale_bias_max(float* z, int64_t n, float inv_t, const float* bias_scaled) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if GRAO_AVX2
  const __m256 vt = _mm256_set1_ps(inv_t);
  __m256 vm0 = _mm256_set1_ps(m), vm1 = vm0;
  if (bias_scaled) {
    for (; j + 16 <= n; j += 16) {
      __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(z + j), vt, _mm256_loadu_ps(bias_scaled + j));
      __m256 b = _mm256_fmadd_ps(_mm256_loadu_ps(z + j + 8), vt, _mm256_loadu_ps(bias_scaled + j + 8));
      _mm256_storeu_ps(z + j, a);
      _mm256_storeu_ps(z + j + 8, b);
      vm0 = _mm256_max_ps(vm0, a);
      vm1 = _mm256_max_ps(vm1, b);
    }
  } else if (inv_t != 1.0f) {
    for (; j + 16 <= n; j += 16) {
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(z + j), vt);
      __m256 b = _mm256_mul_ps(_mm256_loadu_ps(z + j + 8), vt);
      _mm256_storeu_ps(z + j, a);
      _mm256_storeu_ps(z + j + 8, b);
      vm0 = _mm256_max_ps(vm0, a);
      vm1 = _mm256_max_ps(vm1, b);
    }
  } else {
    for (; j + 16 <= n; j += 16) {
      vm0 = _mm256_max_ps(vm0, _mm256_loadu_ps(z + j));
      vm1 = _mm256_max_ps(vm1, _mm256_loadu_ps(z + j + 8));
    }
  }
  m = hmax256(_mm256_max_ps(vm0, vm1));
#endif
  for (; j < n; ++j) {
    float v = bias_scaled ? std::fma(z[j], inv_t, bias_scaled[j]) : z[j] * inv_t;
    z[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

// z[j] = exp(z[j] - shift) in place (when store) and returns the sum.
static inline float exp_sum(float* z, int64_t n, float shift, bool store) {
  int64_t j = 0;
  float s = 0.0f;
#if GRAO_AVX2
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    __m256 a = exp256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + j), vs));
    __m256 b = exp256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + j + 8), vs));
    if (store) {
      _mm256_storeu_ps(z + j, a);
      _mm256_storeu_ps(z + j + 8, b);
    }
    acc0 = _mm256_add_ps(acc0, a);
    acc1 = _mm256_add_ps(acc1, b);
  }
  s = hsum256(_mm256_add_ps(acc0, acc1));
#endif
  for (; j < n; ++j) {
    float e = std::exp(z[j] - shift);
    if (store) z[j] = e;
    s += e;
  }
  return s;
}

// z[j] = exp(z[j] - shift) * scale in place: dlogits straight from the logits
// when the log-sum-exp is already known.
static inline void exp_scale(float* z, int64_t n, float shift, float scale) {
  int64_t j = 0;
#if GRAO_AVX2
  const __m256 vs = _mm256_set1_ps(shift), vc = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(z + j, _mm256_mul_ps(exp256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + j), vs)), vc));
  }
#endif
  for (; j < n; ++j) z[j] = std::exp(z[j] - shift) * scale;
}

// z[j] *= scale.
static inline void scale_inplace(float* z, int64_t n, float scale) {
  int64_t j = 0;
#if GRAO_AVX2
  const __m256 vc = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(z + j, _mm256_mul_ps(_mm256_loadu_ps(z + j), vc));
#endif
  for (; j < n; ++j) z[j] *= scale;
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
