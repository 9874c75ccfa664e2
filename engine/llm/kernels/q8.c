#include <stdint.h>
#include <stdlib.h>
/* Weight-only 8-bit linear layer (engine/llm/kernels/q8.py):
   y[t, r] = sum_g (scale[r, g] * sum_{i in g} w[r, i] * x[t, i] + low[r, g] * sum_{i in g} x[t, i]) + bias[r]
   uint8 weights in groups of `group` columns, each group affine (its own scale and low value),
   fp32 activations and accumulation. Rows are split over `threads` OpenMP threads. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 32 codes (lo: codes 0-15, hi: codes 16-31, one per byte) times x[0..31], as 8 partial sums */
static inline __m256 group32(__m128i lo, __m128i hi, const float *x) {
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x));
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), p);
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16), p);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), p);
}

static inline float hsum(__m256 acc) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* one row against one token, groups of 32 8-bit codes (32 bytes per group) */
static inline float row32(const uint8_t *w, const float *x, const float *scale, int groups) {
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++, w += 32, x += 32) {
        __m256 p = group32(_mm_loadu_si128((const __m128i *)w), _mm_loadu_si128((const __m128i *)(w + 16)), x);
        acc = _mm256_fmadd_ps(p, _mm256_set1_ps(scale[g]), acc);
    }
    return hsum(acc);
}

/* the same with 4-bit codes: 16 bytes per group, byte j = code j (low nibble) | code j+16 (high) */
static inline float row32_q4(const uint8_t *w, const float *x, const float *scale, int groups) {
    __m256 acc = _mm256_setzero_ps();
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int g = 0; g < groups; g++, w += 16, x += 32) {
        __m128i b = _mm_loadu_si128((const __m128i *)w);
        __m256 p = group32(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask), x);
        acc = _mm256_fmadd_ps(p, _mm256_set1_ps(scale[g]), acc);
    }
    return hsum(acc);
}
#define HAVE_ROW32 1
#endif

static inline float dot4(const uint8_t *w, const float *x) {  /* one group of 32, 4-bit codes */
    float sum = 0.0f;
    for (int j = 0; j < 16; j++) sum += (float)(w[j] & 15) * x[j] + (float)(w[j] >> 4) * x[j + 16];
    return sum;
}

static inline float dot8(const uint8_t *w, const float *x, int n) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (float)w[i + j] * x[i + j];
    float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) sum += (float)w[i] * x[i];
    return sum;
}

/* bits = 8: one code per byte; bits = 4: two per byte, groups of 32 only */
void q8_linear(const float *x, const uint8_t *w, const float *scale, const float *low, const float *bias,
               float *y, int tokens, int rows, int cols, int group, int bits, int threads) {
    int groups = cols / group;
    int64_t row_bytes = bits == 4 ? cols / 2 : cols;
    float *xsum = malloc(sizeof(float) * (size_t)tokens * groups);  /* per token, per group: sum of x */
    if (!xsum) return;
    for (int t = 0; t < tokens; t++)
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int i = 0; i < group; i++) s += x[(int64_t)t * cols + g * group + i];
            xsum[t * groups + g] = s;
        }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint8_t *wr = w + (int64_t)r * row_bytes;
        const float *sr = scale + (int64_t)r * groups, *lr = low + (int64_t)r * groups;
        float b = bias ? bias[r] : 0.0f;
        for (int t = 0; t < tokens; t++) {
            const float *xt = x + (int64_t)t * cols, *st = xsum + t * groups;
            float acc = 0.0f, offset = 0.0f;
            if (bits == 4) {
#ifdef HAVE_ROW32
                acc = row32_q4(wr, xt, sr, groups);
#else
                for (int g = 0; g < groups; g++) acc += sr[g] * dot4(wr + g * 16, xt + g * 32);
#endif
            } else {
#ifdef HAVE_ROW32
                if (group == 32) acc = row32(wr, xt, sr, groups); else
#endif
                for (int g = 0; g < groups; g++) acc += sr[g] * dot8(wr + g * group, xt + g * group, group);
            }
            for (int g = 0; g < groups; g++)
                offset += lr[g] * st[g];
            y[(int64_t)t * rows + r] = acc + offset + b;
        }
    }
    free(xsum);
}
