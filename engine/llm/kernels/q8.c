#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* Weight-only 8-bit linear layer (engine/llm/kernels/q8.py):
   y[t, r] = sum_g (scale[r, g] * sum_{i in g} w[r, i] * x[t, i] + low[r, g] * sum_{i in g} x[t, i]) + bias[r]
   codes in groups of `group` columns, each group affine (its own scale and low value), fp32
   activations and accumulation. Rows are split over `threads` OpenMP threads. A group of 32
   codes takes 32 bytes at 8 bits; 16 at 4 bits (byte j = code j | code j+16 << 4); 20 at 5
   bits (those 16 bytes for the low four bits, then 4 bytes: bit i = code i's fifth bit), so a
   GGUF's 5-bit blocks (Q5_0, Q5_1, Q5_K) are read at their own width. */

/* `bits` as the kernels take it: the codes' width (4, 5 or 8), plus HALF when the scales and
   low values are fp16 (where a GGUF's are exactly: Q5_0, Q8_0), so that they cost 4 bytes per
   group instead of 8. Each row's are widened into a small buffer before use (row_scales). */
#define HALF 0x100

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  /* subnormal */
            exp = 113;
            while (!(man & 1024)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* row r's `groups` scales (or low values) as floats: the array itself when fp32, else widened into buf */
static inline const float *row_scales(const void *base, int half, int64_t r, int groups, float *buf) {
    if (!half) return (const float *)base + r * groups;
    const uint16_t *h = (const uint16_t *)base + r * groups;
    int g = 0;
#ifdef __F16C__
    for (; g + 8 <= groups; g += 8)
        _mm256_storeu_ps(buf + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + g))));
#endif
    for (; g < groups; g++) buf[g] = half_to_float(h[g]);
    return buf;
}

/* bytes of one group of 32 codes, and of a row */
static inline int group_bytes(int bits) { return bits == 4 ? 16 : bits == 5 ? 20 : 32; }
static inline int64_t row_bytes_of(int cols, int group, int bits) {
    return group == 32 ? (int64_t)(cols / 32) * group_bytes(bits) : cols;
}

/* code i (0..31) of a group */
static inline int code_at(const uint8_t *g, int bits, int i) {
    if (bits == 8) return g[i];
    int lo = i < 16 ? g[i] & 15 : g[i - 16] >> 4;
    return bits == 5 ? lo | (((g[16 + i / 8] >> (i % 8)) & 1) << 4) : lo;
}
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 32 codes (lo: codes 0-15, hi: codes 16-31, one per byte) times x[0..31], as 8 partial sums */
static inline __m256 group32(__m128i lo, __m128i hi, const float *x) {  /* (two chains: shorter latency) */
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x));
    __m256 q = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16));
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), p);
    q = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), q);
    return _mm256_add_ps(p, q);
}

/* 32 bits -> 32 bytes, byte i = 0x10 where bit i is set (a 5-bit group's fifth bits) */
static inline __m256i fifth_bits(const uint8_t *p) {
    uint32_t qh;
    memcpy(&qh, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(0x10));
}

/* a group's 32 codes (4, 5 or 8 bits) as bytes: lo = codes 0-15, hi = codes 16-31 */
static inline void codes_u8(const uint8_t *g, int bits, __m128i *lo, __m128i *hi) {
    if (bits == 8) {
        *lo = _mm_loadu_si128((const __m128i *)g);
        *hi = _mm_loadu_si128((const __m128i *)(g + 16));
        return;
    }
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)g);
    *lo = _mm_and_si128(b, mask);
    *hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    if (bits == 5) {
        __m256i h = fifth_bits(g + 16);
        *lo = _mm_or_si128(*lo, _mm256_castsi256_si128(h));
        *hi = _mm_or_si128(*hi, _mm256_extracti128_si256(h, 1));
    }
}

static inline float hsum(__m256 acc) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* one row against one token, groups of 32 8-bit codes (32 bytes per group) */
static inline float row32(const uint8_t *w, const float *x, const float *scale, int groups) {
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();  /* (two accumulators: groups overlap) */
    int g = 0;
    for (; g + 2 <= groups; g += 2, w += 64, x += 64) {
        __m256 p = group32(_mm_loadu_si128((const __m128i *)w), _mm_loadu_si128((const __m128i *)(w + 16)), x);
        __m256 q = group32(_mm_loadu_si128((const __m128i *)(w + 32)), _mm_loadu_si128((const __m128i *)(w + 48)), x + 32);
        acc = _mm256_fmadd_ps(p, _mm256_set1_ps(scale[g]), acc);
        acc2 = _mm256_fmadd_ps(q, _mm256_set1_ps(scale[g + 1]), acc2);
    }
    for (; g < groups; g++, w += 32, x += 32)
        acc = _mm256_fmadd_ps(group32(_mm_loadu_si128((const __m128i *)w), _mm_loadu_si128((const __m128i *)(w + 16)), x),
                              _mm256_set1_ps(scale[g]), acc);
    return hsum(_mm256_add_ps(acc, acc2));
}

/* the same with 4- or 5-bit codes (16 or 20 bytes per group) */
static inline float row32_packed(const uint8_t *w, int bits, const float *x, const float *scale, int groups) {
    __m256 acc = _mm256_setzero_ps();
    int step = group_bytes(bits);
    for (int g = 0; g < groups; g++, w += step, x += 32) {
        __m128i lo, hi;
        codes_u8(w, bits, &lo, &hi);
        acc = _mm256_fmadd_ps(group32(lo, hi, x), _mm256_set1_ps(scale[g]), acc);
    }
    return hsum(acc);
}
#define HAVE_ROW32 1
#endif

static inline float dot_packed(const uint8_t *w, int bits, const float *x) {  /* one group of 32, 4 or 5 bits */
    float sum = 0.0f;
    for (int i = 0; i < 32; i++) sum += (float)code_at(w, bits, i) * x[i];
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

/* A few tokens at once (a batched decode step): each row's codes are turned into floats once
   per NB tokens instead of once per token, and the row is read from memory once for all. */
#define NB 4
#ifdef HAVE_ROW32
static inline void codes32(const uint8_t *w, int bits, __m256 s, __m256 out[4]) {
    __m128i lo, hi;
    codes_u8(w, bits, &lo, &hi);
    out[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s);
    out[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), s);
    out[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s);
    out[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), s);
}

/* one row (groups of 32) against NB tokens of x (row stride cols): out[t] = sum_g scale_g * codes . x_t */
static inline void row_nb(const uint8_t *w, int bits, const float *x, int cols, const float *scale, int groups,
                          float out[NB], int n) {  /* (n: 4, or 2 for a batch's tail) */
    __m256 acc[NB], c[4];
    for (int t = 0; t < NB; t++) acc[t] = _mm256_setzero_ps();
    int step = group_bytes(bits);
    for (int g = 0; g < groups; g++, w += step) {
        codes32(w, bits, _mm256_set1_ps(scale[g]), c);
        for (int t = 0; t < NB; t++) {
            if (t >= n) break;
            const float *xt = x + (int64_t)t * cols + g * 32;
            acc[t] = _mm256_fmadd_ps(c[0], _mm256_loadu_ps(xt), acc[t]);
            acc[t] = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(xt + 8), acc[t]);
            acc[t] = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xt + 16), acc[t]);
            acc[t] = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xt + 24), acc[t]);
        }
    }
    for (int t = 0; t < n; t++) out[t] = hsum(acc[t]);
}
#endif

/* per token, per group: the sum of x (the low values' term); malloc'ed, the caller frees it */
static float *group_sums(const float *x, int tokens, int cols, int group) {
    int groups = cols / group;
    float *xsum = malloc(sizeof(float) * (size_t)tokens * groups);
    if (!xsum) return NULL;
    for (int t = 0; t < tokens; t++)
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int i = 0; i < group; i++) s += x[(int64_t)t * cols + g * group + i];
            xsum[t * groups + g] = s;
        }
    return xsum;
}

/* one row's dot products (scale_g * codes . x, without the low term) with n (1..NB) tokens of x */
static inline void dots(const uint8_t *wr, int bits, int group, const float *x, int cols, const float *sr, int groups,
                        int n, float out[NB]) {
#ifdef HAVE_ROW32
    if (group == 32 && n >= 2) {  /* 4 or 2 at a time; a third alone */
        row_nb(wr, bits, x, cols, sr, groups, out, n == 3 ? 2 : n);
        if (n != 3) return;
        x += 2 * (int64_t)cols, out += 2, n = 1;
    }
#endif
    for (int t = 0; t < n; t++) {
        const float *xt = x + (int64_t)t * cols;
        float acc = 0.0f;
#ifdef HAVE_ROW32
        if (group == 32) acc = bits == 8 ? row32(wr, xt, sr, groups) : row32_packed(wr, bits, xt, sr, groups); else
#endif
        if (bits != 8)
            for (int g = 0; g < groups; g++) acc += sr[g] * dot_packed(wr + g * group_bytes(bits), bits, xt + g * 32);
        else
            for (int g = 0; g < groups; g++) acc += sr[g] * dot8(wr + g * group, xt + g * group, group);
        out[t] = acc;
    }
}

/* bits = 8: one code per byte; bits = 4 or 5: groups of 32 only */
void q8_linear(const float *x, const uint8_t *w, const void *scale, const void *low, const float *bias,
               float *y, int tokens, int rows, int cols, int group, int bits, int threads) {
    int half = bits & HALF, groups = cols / group;
    bits &= 0xff;
    int64_t row_bytes = row_bytes_of(cols, group, bits);
    float *xsum = group_sums(x, tokens, cols, group);
    if (!xsum) return;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint8_t *wr = w + (int64_t)r * row_bytes;
        float bs[groups], bl[groups];
        const float *sr = row_scales(scale, half, r, groups, bs), *lr = row_scales(low, half, r, groups, bl);
        float b = bias ? bias[r] : 0.0f, out[NB];
        for (int t0 = 0; t0 < tokens; t0 += NB) {
            int n = tokens - t0 < NB ? tokens - t0 : NB;
            dots(wr, bits, group, x + (int64_t)t0 * cols, cols, sr, groups, n, out);
            for (int t = t0; t < t0 + n; t++) {
                float offset = 0.0f;
                for (int g = 0; g < groups; g++) offset += lr[g] * xsum[t * groups + g];
                y[(int64_t)t * rows + r] = out[t - t0] + offset + b;
            }
        }
    }
    free(xsum);
}

/* ---- a prompt's linear layer from the codes (q8_gemm) -----------------------------------
   Many tokens at once are compute-bound, so this is a register-blocked fp32 matmul whose
   weights are dequantized on the fly, PR rows by KB columns at a time (a panel that stays in
   L1), each panel then used for every token: y[t, r] = sum_k w[r, k] * x[t, k] + bias[r].
   The activations are read transposed (xt[k, t], tokens padded to a multiple of 8), so
   8 tokens fill one vector and each weight is broadcast: PR rows x 16 tokens per step. */
#define PR 6
#define KB 256

/* columns [k0, k0 + n) of one row (k0 and n multiples of the group) into out */
static void dequant_row(const uint8_t *w, const float *scale, const float *low, float *out, int k0, int n,
                        int group, int bits) {
    for (int g = k0 / group; g < (k0 + n) / group; g++, out += group) {
        float s = scale[g], lo = low[g];
        const uint8_t *b = bits != 8 ? w + g * group_bytes(bits) : w + (int64_t)g * group;
#ifdef HAVE_ROW32
        __m256 vs = _mm256_set1_ps(s), vl = _mm256_set1_ps(lo);
        if (bits != 8) {  /* group of 32, 4 or 5 bits */
            __m128i q[2];
            codes_u8(b, bits, &q[0], &q[1]);
            for (int h = 0; h < 2; h++)
                for (int j = 0; j < 2; j++) {
                    __m128i part = j ? _mm_srli_si128(q[h], 8) : q[h];
                    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                    _mm256_storeu_ps(out + h * 16 + j * 8, _mm256_fmadd_ps(f, vs, vl));
                }
            continue;
        }
        if (group % 8 == 0) {
            for (int j = 0; j < group; j += 8) {
                __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + j))));
                _mm256_storeu_ps(out + j, _mm256_fmadd_ps(f, vs, vl));
            }
            continue;
        }
#endif
        if (bits != 8)
            for (int j = 0; j < 32; j++) out[j] = lo + s * (float)code_at(b, bits, j);
        else
            for (int j = 0; j < group; j++) out[j] = lo + s * (float)b[j];
    }
}

/* acc[r][t] += panel[r, 0..n) . xt[0..n, t] for PR rows and 8 * nv tokens (xt's stride tp) */
static void tile(const float *panel, const float *xt, int n, int tp, int nv, float acc_out[PR][16]) {
#ifdef HAVE_ROW32
    __m256 acc[PR][2];
    for (int r = 0; r < PR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    if (nv == 2) {
        for (int k = 0; k < n; k++) {
            __m256 x0 = _mm256_loadu_ps(xt + (int64_t)k * tp), x1 = _mm256_loadu_ps(xt + (int64_t)k * tp + 8);
            for (int r = 0; r < PR; r++) {
                __m256 w = _mm256_broadcast_ss(panel + r * KB + k);
                acc[r][0] = _mm256_fmadd_ps(w, x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w, x1, acc[r][1]);
            }
        }
    } else {
        for (int k = 0; k < n; k++) {
            __m256 x0 = _mm256_loadu_ps(xt + (int64_t)k * tp);
            for (int r = 0; r < PR; r++)
                acc[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(panel + r * KB + k), x0, acc[r][0]);
        }
    }
    for (int r = 0; r < PR; r++)
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(acc_out[r] + v * 8, acc[r][v]);
#else
    for (int r = 0; r < PR; r++)
        for (int t = 0; t < 8 * nv; t++) {
            float s = 0.0f;
            for (int k = 0; k < n; k++) s += panel[r * KB + k] * xt[(int64_t)k * tp + t];
            acc_out[r][t] = s;
        }
#endif
}

/* xt: [cols, tp] (tp = tokens rounded up to 8, the padding zero); y: [tokens, rows].
   Each thread takes a run of row panels; for each KB columns, every panel of its run is
   dequantized once and used for all tokens, while those columns of xt stay in its cache. */
void q8_gemm(const float *xt, int tp, const uint8_t *w, const void *scale, const void *low, const float *bias,
             float *y, int tokens, int rows, int cols, int group, int bits, int threads) {
    int half = bits & HALF, groups = cols / group, panels = (rows + PR - 1) / PR;
    bits &= 0xff;
    int64_t row_bytes = row_bytes_of(cols, group, bits);
    if (KB % group || cols % group) return;  /* (callers check: groups of 32, or one group per row) */
    for (int t = 0; t < tokens; t++)
        for (int r = 0; r < rows; r++) y[(int64_t)t * rows + r] = bias ? bias[r] : 0.0f;
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int part = 0; part < threads; part++) {
        int first = (int)((int64_t)panels * part / threads), last = (int)((int64_t)panels * (part + 1) / threads);
        float panel[PR * KB] __attribute__((aligned(32))), acc[PR][16], bs[groups], bl[groups];
        for (int k0 = 0; k0 < cols; k0 += KB) {
            int n = cols - k0 < KB ? cols - k0 : KB;
            for (int p = first; p < last; p++) {
                int r0 = p * PR, nr = rows - r0 < PR ? rows - r0 : PR;
                for (int r = 0; r < PR; r++) {
                    if (r < nr)
                        dequant_row(w + (int64_t)(r0 + r) * row_bytes, row_scales(scale, half, r0 + r, groups, bs),
                                    row_scales(low, half, r0 + r, groups, bl), panel + r * KB, k0, n, group, bits);
                    else
                        memset(panel + r * KB, 0, sizeof(float) * n);
                }
                for (int t0 = 0; t0 < tokens; t0 += 16) {
                    int nv = tp - t0 >= 16 ? 2 : 1;
                    tile(panel, xt + (int64_t)k0 * tp + t0, n, tp, nv, acc);
                    for (int t = t0; t < tokens && t < t0 + 8 * nv; t++)
                        for (int r = 0; r < nr; r++) y[(int64_t)t * rows + r0 + r] += acc[r][t - t0];
                }
            }
        }
    }
}

/* ---- int8 activations (q8_linear_x8) -------------------------------------------------------
   For several tokens at once (a batched decode step, a prompt) the fp32 path above is bound by
   arithmetic, not memory: each code is widened to a float and multiplied. Here the activations
   are quantized per 32-group to int8 (x ~ dx * xq, as llama.cpp's Q8_0 activations), and each
   group's dot product is 32 byte multiplies in one AVX2 instruction (vpmaddubsw), summed to int32
   and scaled once: y[t, r] = sum_g scale[r, g] * dx[t, g] * (codes . xq) + low[r, g] * sum_g(x)
   (the low term from the exact fp32 sums). 8-bit codes w (0..255) are made signed (w - 128, an
   xor) so that |w'| * sign(xq) fits vpmaddubsw's 16-bit pairs; the 128 * scale goes to the low
   term. 4- and 5-bit codes (0..31) multiply as they are. */
void q8_quantize_x(const float *x, int tokens, int cols, int8_t *xq, float *dx, float *xsum) {
    int groups = cols / 32;
    for (int t = 0; t < tokens; t++)
        for (int g = 0; g < groups; g++) {
            const float *v = x + (int64_t)t * cols + g * 32;
            float amax = 0.0f, sum = 0.0f;
            for (int i = 0; i < 32; i++) { float a = fabsf(v[i]); if (a > amax) amax = a; sum += v[i]; }
            float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t *q = xq + (int64_t)t * cols + g * 32;
            for (int i = 0; i < 32; i++) q[i] = (int8_t)lrintf(v[i] * inv);
            dx[(int64_t)t * groups + g] = d;
            xsum[(int64_t)t * groups + g] = sum;
        }
}

#ifdef HAVE_ROW32
static inline __m256 dot_u8s8(__m256i u, __m256i s) {  /* 32 u8 x s8 products -> 8 float sums of 4 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

/* one group's 32 codes against 32 int8 activations: 8 int32 partial sums */
static inline __m256i x8_group(const uint8_t *w, int bits, const int8_t *x) {
    __m256i u, xv = _mm256_loadu_si256((const __m256i *)x);
    if (bits == 8) {  /* w - 128, signed: |w'| times xq with w''s sign */
        __m256i sg = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w), _mm256_set1_epi8((char)0x80));
        u = _mm256_abs_epi8(sg);
        xv = _mm256_sign_epi8(xv, sg);
    } else {  /* 0..31: multiplied as they are */
        __m128i lo, hi;
        codes_u8(w, bits, &lo, &hi);
        u = _mm256_set_m128i(hi, lo);
    }
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), _mm256_set1_epi16(1));
}

/* one row against one token: sum_g scale_g * dx_g * (codes . xq). Eight groups at a time: their
   dot products are reduced into one vector of 8 sums (a tree of hadds), then converted and
   scaled together, so the float work is per 8 groups, not per group. */
static inline float x8_row(const uint8_t *wr, int bits, int step, const int8_t *xq, const float *dx, int groups,
                           const float *sr) {
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256i p[8];
        for (int j = 0; j < 8; j++) p[j] = x8_group(wr + (int64_t)(g + j) * step, bits, xq + (g + j) * 32);
        __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
        __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(_mm256_loadu_ps(sr + g), _mm256_loadu_ps(dx + g)), acc);
    }
    for (; g < groups; g++)
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(x8_group(wr + (int64_t)g * step, bits, xq + g * 32)),
                              _mm256_set1_ps(sr[g] * dx[g]), acc);
    return hsum(acc);
}
#endif

/* xq [tokens, cols] int8, dx and xsum [tokens, groups] */
void q8_linear_x8(const int8_t *xq, const float *dx, const float *xsum, const uint8_t *w, const void *scale,
                  const void *low, const float *bias, float *y, int tokens, int rows, int cols, int bits,
                  int threads) {
    int half = bits & HALF;
    bits &= 0xff;
    int groups = cols / 32, step = group_bytes(bits);
    int64_t row_bytes = row_bytes_of(cols, 32, bits);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint8_t *wr = w + (int64_t)r * row_bytes;
        float bs[groups], bl[groups];
        const float *sr = row_scales(scale, half, r, groups, bs), *lr = row_scales(low, half, r, groups, bl);
        float b = bias ? bias[r] : 0.0f;
        for (int t = 0; t < tokens; t++) {  /* (the row's codes stay in L1 from one token to the next) */
            const int8_t *xt = xq + (int64_t)t * cols;
            const float *dt = dx + (int64_t)t * groups, *st = xsum + (int64_t)t * groups;
            float dot = 0.0f, offset = 0.0f;
#ifdef HAVE_ROW32
            dot = x8_row(wr, bits, step, xt, dt, groups, sr);
#else
            for (int g = 0; g < groups; g++) {
                int sum = 0;
                for (int i = 0; i < 32; i++)
                    sum += (code_at(wr + g * step, bits, i) - (bits == 8 ? 128 : 0)) * xt[g * 32 + i];
                dot += sr[g] * dt[g] * (float)sum;
            }
#endif
            if (bits != 8)  /* (8-bit codes were made signed: their 128 * scale goes here) */
                for (int g = 0; g < groups; g++) offset += lr[g] * st[g];
            else
                for (int g = 0; g < groups; g++) offset += (lr[g] + 128.0f * sr[g]) * st[g];
            y[(int64_t)t * rows + r] = dot + offset + b;
        }
    }
}

/* ---- one decode step for a batch of sequences (engine/llm/kernels/q8.py: Decoder) -------
   A dense Llama/Qwen2 model for B tokens, each of its own sequence (its KV slot, its position),
   every layer in C: RMSNorm, the fused q/k/v, RoPE (cos/sin given per token), the KV cache
   writes, attention of each token over its own slot's positions 0..pos (grouped-query heads),
   o, RMSNorm, the fused gate/up, SiLU, down, the residuals; then the final norm and the head.
   Every weight row is read once for the whole batch (q8_linear, NB tokens at a time); B = 1 is the plain
   matvec. The same arithmetic as engine/llm/fastpath.py's torch ops, without a Python call
   per op. */
#include <math.h>
#include <string.h>

typedef struct {
    const uint8_t *q; const void *scale, *low; const float *bias;
    int rows, cols, group, bits;  /* (bits: with HALF when the scales are fp16) */
} q8_mat;

typedef struct {
    const float *ln1, *ln2;
    q8_mat qkv, o, gate_up, down;
    float *k, *v;  /* [slots, kv_heads, capacity, head_dim] */
} q8_layer;

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter, capacity, n_layers, threads;
    int x8;  /* activations quantized per 32 to int8 (q8_linear_x8), else fp32 */
    float eps, scale;
    const q8_layer *layers;
    const float *norm;
    q8_mat head;
    float *scratch;  /* q8_scratch_floats() floats */
} q8_model;

typedef struct { int8_t *q; float *d, *sum; int on; } x8_buf;  /* a step's quantized activations */

static void linear(const q8_mat *m, const float *x, float *y, int tokens, int threads, const x8_buf *x8) {
    if (x8->on && m->group == 32) {
        q8_quantize_x(x, tokens, m->cols, x8->q, x8->d, x8->sum);
        q8_linear_x8(x8->q, x8->d, x8->sum, m->q, m->scale, m->low, m->bias, y, tokens, m->rows, m->cols, m->bits,
                     threads);
    } else
        q8_linear(x, m->q, m->scale, m->low, m->bias, y, tokens, m->rows, m->cols, m->group, m->bits, threads);
}

static void rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, int heads, int hd, const float *cos, const float *sin) {
    int half = hd / 2;
    for (int h = 0; h < heads; h++, v += hd)
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

/* scratch for up to `batch` tokens */
static long widest(int hidden, int heads, int head_dim, int inter) {
    long w = hidden > inter ? hidden : inter;
    return w > (long)heads * head_dim ? w : (long)heads * head_dim;
}

long q8_scratch_floats(int hidden, int heads, int kv_heads, int head_dim, int inter, int capacity, int batch) {
    long rows = batch, wide = widest(hidden, heads, head_dim, inter);
    return rows * ((long)hidden + (long)(heads + 2 * kv_heads) * head_dim + (long)heads * head_dim + 3L * inter)
           + (long)batch * heads * capacity + (rows * wide + 3) / 4 + 2L * rows * (wide / 32 + 1);
}

/* x: [B, hidden] embeddings (overwritten); slots, pos: each token's KV slot and position;
   cos, sin: [B, head_dim]; logits: [B, vocab]. No two tokens may share a slot. */
void q8_decode(const q8_model *m, float *x, int batch, const int *slots, const int *pos, const float *cos,
               const float *sin, float *logits) {
    int hd = m->head_dim, qd = m->heads * hd, kvd = m->kv_heads * hd, group = m->heads / m->kv_heads;
    int B = batch, rows = B, H = m->hidden, I = m->inter, QKV = qd + 2 * kvd;
    long cap = m->capacity, slot_stride = (long)m->kv_heads * cap * hd;
    float *h = m->scratch, *qkv = h + (long)rows * H, *att = qkv + (long)rows * QKV, *gu = att + (long)rows * qd,
          *act = gu + (long)rows * 2 * I, *scores = act + (long)rows * I;  /* (layout: q8_scratch_floats) */
    long wide = widest(H, m->heads, hd, I);
    float *x8q = scores + (long)B * m->heads * cap;
    float *x8d = x8q + (rows * wide + 3) / 4;
    x8_buf x8 = {(int8_t *)x8q, x8d, x8d + rows * (wide / 32 + 1), m->x8};
    for (int l = 0; l < m->n_layers; l++) {
        const q8_layer *L = m->layers + l;
        for (int b = 0; b < B; b++) rms_norm(x + (long)b * H, L->ln1, h + (long)b * H, H, m->eps);
        linear(&L->qkv, h, qkv, B, m->threads, &x8);
        for (int b = 0; b < B; b++) {
            float *q = qkv + (long)b * QKV, *k = q + qd, *v = q + qd + kvd;
            rope(q, m->heads, hd, cos + (long)b * hd, sin + (long)b * hd);
            rope(k, m->kv_heads, hd, cos + (long)b * hd, sin + (long)b * hd);
            float *ks = L->k + slots[b] * slot_stride, *vs = L->v + slots[b] * slot_stride;
            for (int kh = 0; kh < m->kv_heads; kh++) {
                memcpy(ks + (kh * cap + pos[b]) * hd, k + kh * hd, sizeof(float) * hd);
                memcpy(vs + (kh * cap + pos[b]) * hd, v + kh * hd, sizeof(float) * hd);
            }
        }
        #pragma omp parallel for num_threads(m->threads) schedule(dynamic, 1)
        for (int bh = 0; bh < B * m->heads; bh++) {
            int b = bh / m->heads, hh = bh % m->heads, p = pos[b];
            const float *qh = qkv + (long)b * QKV + hh * hd;
            const float *kc = L->k + slots[b] * slot_stride + (long)(hh / group) * cap * hd,
                        *vc = L->v + slots[b] * slot_stride + (long)(hh / group) * cap * hd;
            float *sc = scores + (long)bh * cap, *out = att + (long)b * qd + hh * hd, mx = -3.0e38f, sum = 0.0f;
            for (int t = 0; t <= p; t++) {
                float s = 0.0f;
                for (int i = 0; i < hd; i++) s += qh[i] * kc[(long)t * hd + i];
                sc[t] = s * m->scale;
                if (sc[t] > mx) mx = sc[t];
            }
            for (int t = 0; t <= p; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
            for (int i = 0; i < hd; i++) out[i] = 0.0f;
            for (int t = 0; t <= p; t++) {
                float w = sc[t] / sum;
                for (int i = 0; i < hd; i++) out[i] += w * vc[(long)t * hd + i];
            }
        }
        linear(&L->o, att, h, B, m->threads, &x8);
        for (long i = 0; i < (long)B * H; i++) x[i] += h[i];
        for (int b = 0; b < B; b++) rms_norm(x + (long)b * H, L->ln2, h + (long)b * H, H, m->eps);
        linear(&L->gate_up, h, gu, B, m->threads, &x8);
        for (int b = 0; b < B; b++)
            for (int i = 0; i < I; i++) {
                float g = gu[(long)b * 2 * I + i];
                act[(long)b * I + i] = g / (1.0f + expf(-g)) * gu[(long)b * 2 * I + I + i];
            }
        linear(&L->down, act, h, B, m->threads, &x8);
        for (long i = 0; i < (long)B * H; i++) x[i] += h[i];
    }
    for (int b = 0; b < B; b++) rms_norm(x + (long)b * H, m->norm, h + (long)b * H, H, m->eps);
    linear(&m->head, h, logits, B, m->threads, &x8);
}
