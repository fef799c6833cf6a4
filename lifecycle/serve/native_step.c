/* One decode step of a Llama-layout model (llama, mistral, qwen2, qwen3) for every row of a batch, in C.

   lifecycle/serve/native.py compiles this file once per machine (cc -O3 -march=native -fopenmp) and calls
   lc_step through ctypes. The arithmetic is lifecycle/serve/fastpath.py's: embedding, then per layer rms norm,
   fused q/k/v, (qwen3: per-head q/k norm), rope from precomputed HF cos/sin tables, the new key/value written at
   column t of the batch's cache, attention over columns 0..t under the batch's additive mask, o, residual, rms norm,
   fused gate/up, silu(gate) * up, down, residual; final norm and the head.

   Why: at batch 1 on a small model a torch step is dozens of operator dispatches and OpenMP fork/joins per layer; here
   the whole step is one OpenMP parallel region (threads meet at a barrier between phases) and each matrix is read
   once per step by a kernel that keeps its sums in registers.

   Weights are read as (in, out) row-major matrices (fastpath stores float32 weights transposed for the same reason),
   float32 or int8 with one float scale per output column (weight-only int8: activations stay float32). Every matrix
   product sums its inputs in index order per output column, so results equal torch's to float rounding, not bit for
   bit. Vectors use GCC's vector extensions, lowered to AVX-512, AVX2 or SSE by -march=native. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int8_t i8x16u __attribute__((vector_size(16), aligned(1), may_alias));
typedef int32_t i32x16 __attribute__((vector_size(64)));

typedef struct {
    const void *w;       /* (in, ld) row-major: float, or int8 when the model is int8 */
    const float *scale;  /* int8: (out,) per output column; NULL for float */
    const float *bias;   /* (out,) or NULL */
    int64_t ld;          /* elements between rows of w */
} Lin;

typedef struct {
    const float *norm1, *norm2, *q_norm, *k_norm; /* q_norm/k_norm: qwen3's (head_dim,), else NULL */
    Lin qkv, o, gate_up, down;
} Layer;

typedef struct {
    int32_t n_layers, hidden, heads, kv_heads, head_dim, inter, vocab, int8;
    float eps, scale;
    const float *embed;
    int64_t embed_s0, embed_s1; /* element strides of the (vocab, hidden) embedding */
    const float *final_norm;
    Lin head;
    const float *cos_t, *sin_t; /* (max_pos, head_dim): HF's cos and sin with rotate_half's sign folded in */
    int64_t max_pos;
    const Layer *layers;
} Model;

#define TILE 64 /* output columns per kernel call: 4 vectors of 16 */
#define RB 4    /* rows per kernel call */

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 v) { *(v16u *)p = v; }
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16 load16_i8(const int8_t *p) {
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline v16 load16_i8(const int8_t *p) {
    union { __m256 h[2]; v16 v; } u;
    u.h[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    u.h[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    return u.v;
}
#else
static inline v16 load16_i8(const int8_t *p) {
    v16 v;
    for (int i = 0; i < 16; i++) v[i] = (float)p[i];
    return v;
}
#endif

/* out[r][k] = sum_i x[r][i] * w[i][k * 16 + lane] over one tile of 64 columns, R rows (a constant after inlining);
   the sums live in registers (locals), written out once at the end */
#define TILE_KERNEL(NAME, T, LOAD)                                                                                \
    static inline __attribute__((always_inline)) void NAME(int R, const float *restrict x, int64_t ldx,          \
                                                           const T *restrict w, int64_t ldw, int64_t in,          \
                                                           v16 out[RB][4]) {                                     \
        v16 a[RB][4];                                                                                             \
        for (int r = 0; r < RB; r++)                                                                              \
            for (int k = 0; k < 4; k++) a[r][k] = (v16){0};                                                       \
        for (int64_t i = 0; i < in; i++) {                                                                        \
            const T *row = w + i * ldw;                                                                           \
            v16 w0 = LOAD(row), w1 = LOAD(row + 16), w2 = LOAD(row + 32), w3 = LOAD(row + 48);                   \
            for (int r = 0; r < R; r++) {                                                                         \
                float xv = x[r * ldx + i];                                                                        \
                a[r][0] += xv * w0;                                                                               \
                a[r][1] += xv * w1;                                                                               \
                a[r][2] += xv * w2;                                                                               \
                a[r][3] += xv * w3;                                                                               \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < R; r++)                                                                               \
            for (int k = 0; k < 4; k++) out[r][k] = a[r][k];                                                      \
    }

TILE_KERNEL(tile_f32, float, load16)
TILE_KERNEL(tile_i8, int8_t, load16_i8)

static void tile(int int8, int R, const float *x, int64_t ldx, const Lin *L, int64_t c, int64_t in, v16 acc[RB][4]) {
    if (int8) {
        const int8_t *w = (const int8_t *)L->w + c;
        switch (R) {
            case 1: tile_i8(1, x, ldx, w, L->ld, in, acc); break;
            case 2: tile_i8(2, x, ldx, w, L->ld, in, acc); break;
            case 3: tile_i8(3, x, ldx, w, L->ld, in, acc); break;
            default: tile_i8(4, x, ldx, w, L->ld, in, acc); break;
        }
    } else {
        const float *w = (const float *)L->w + c;
        switch (R) {
            case 1: tile_f32(1, x, ldx, w, L->ld, in, acc); break;
            case 2: tile_f32(2, x, ldx, w, L->ld, in, acc); break;
            case 3: tile_f32(3, x, ldx, w, L->ld, in, acc); break;
            default: tile_f32(4, x, ldx, w, L->ld, in, acc); break;
        }
    }
}

/* One output column the slow way (the last columns when out is not a multiple of 64). */
static float column(int int8, const float *x, const Lin *L, int64_t c, int64_t in) {
    float s = 0.f;
    if (int8) {
        const int8_t *w = (const int8_t *)L->w;
        for (int64_t i = 0; i < in; i++) s += x[i] * (float)w[i * L->ld + c];
    } else {
        const float *w = (const float *)L->w;
        for (int64_t i = 0; i < in; i++) s += x[i] * w[i * L->ld + c];
    }
    return s;
}

/* This thread's share of y[r][c] (+)= x[r] . W[:, col0 + c] * scale + bias, c in [0, n), for all rows. The n columns
   are cut into tiles of 64 and the tiles dealt out to threads in contiguous runs. */
static void linear(int int8, const Lin *L, const float *x, int64_t ldx, int rows, int64_t in, int64_t col0, int64_t n,
                   float *y, int64_t ldy, int add, int tid, int nt) {
    int64_t tiles = n / TILE, per = (tiles + nt - 1) / nt;
    int64_t t0 = tid * per, t1 = t0 + per < tiles ? t0 + per : tiles;
    v16 acc[RB][4];
    for (int64_t t = t0; t < t1; t++) {
        int64_t c = col0 + t * TILE;
        for (int r0 = 0; r0 < rows; r0 += RB) {
            int R = rows - r0 < RB ? rows - r0 : RB;
            tile(int8, R, x + r0 * ldx, ldx, L, c, in, acc);
            for (int k = 0; k < 4; k++) {
                int64_t cc = c + 16 * k;
                v16 scale = L->scale ? load16(L->scale + cc) : (v16){0} + 1.f;
                v16 bias = L->bias ? load16(L->bias + cc) : (v16){0};
                for (int r = 0; r < R; r++) {
                    float *out = y + (r0 + r) * ldy + t * TILE + 16 * k;
                    v16 v = acc[r][k] * scale + bias;
                    store16(out, add ? load16(out) + v : v);
                }
            }
        }
    }
    if (tid == nt - 1)
        for (int64_t c = tiles * TILE; c < n; c++)
            for (int r = 0; r < rows; r++) {
                float v = column(int8, x + r * ldx, L, col0 + c, in);
                if (L->scale) v *= L->scale[col0 + c];
                if (L->bias) v += L->bias[col0 + c];
                float *out = y + r * ldy + c;
                *out = add ? *out + v : v;
            }
}

/* exp(x) for the softmax and silu: Cephes' single-precision polynomial, written so the loops vectorize;
   x below -87.3 (a masked column) gives 0 */
static inline float exp_(float x) {
    float z = fminf(fmaxf(x, -87.3f), 88.7f);
    float k = rintf(z * 1.44269504088896341f);
    float r = z - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    float e = p * r * r + r + 1.f;
    union { int32_t i; float f; } two = {.i = ((int32_t)k + 127) << 23};
    return x < -87.3f ? 0.f : e * two.f;
}

static void rms_norm(const float *x, const float *w, float *out, int64_t n, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* HF's rope with the sign folded into sin: x * cos + swap_halves(x) * sin, in place on one head */
static void rope(float *x, const float *cos_, const float *sin_, int hd) {
    int half = hd / 2;
    float tmp[hd];
    for (int i = 0; i < hd; i++) tmp[i] = x[i] * cos_[i] + x[i < half ? i + half : i - half] * sin_[i];
    memcpy(x, tmp, sizeof(float) * hd);
}

/* Rope, the cache write and attention for one row and one kv head (and its group of query heads). */
static void attend(const Model *m, const Layer *L, int layer_i, int r, int g, float *qkv, int64_t ld_qkv,
                   const int64_t *pos, const float *bias, int64_t cap, int64_t t, float *const *keys,
                   float *const *values, float *out, int64_t ld_out, float *scores) {
    int nq = m->heads, nkv = m->kv_heads, hd = m->head_dim, group = nq / nkv;
    const float *cos_ = m->cos_t + pos[r] * hd, *sin_ = m->sin_t + pos[r] * hd;
    float *row = qkv + r * ld_qkv;
    float *k = row + (int64_t)(nq + g) * hd, *v = row + (int64_t)(nq + nkv + g) * hd;
    if (L->k_norm) rms_norm(k, L->k_norm, k, hd, m->eps);
    rope(k, cos_, sin_, hd);
    float *K = keys[layer_i] + ((int64_t)r * nkv + g) * cap * hd;
    float *V = values[layer_i] + ((int64_t)r * nkv + g) * cap * hd;
    memcpy(K + t * hd, k, sizeof(float) * hd);
    memcpy(V + t * hd, v, sizeof(float) * hd);
    const float *mask = bias + r * cap;
    for (int h = g * group; h < (g + 1) * group; h++) {
        float *q = row + (int64_t)h * hd;
        if (L->q_norm) rms_norm(q, L->q_norm, q, hd, m->eps);
        rope(q, cos_, sin_, hd);
        float top = -INFINITY;
        for (int64_t j = 0; j <= t; j++) {
            const float *kj = K + j * hd;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < hd; i++) s += q[i] * kj[i];
            s = s * m->scale + mask[j];
            scores[j] = s;
            top = s > top ? s : top;
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j <= t; j++) {
            float e = exp_(scores[j] - top);
            scores[j] = e;
            sum += e;
        }
        float *o = out + (int64_t)r * ld_out + (int64_t)h * hd;
        for (int i = 0; i < hd; i++) o[i] = 0.f;
        for (int64_t j = 0; j <= t; j++) {
            float p = scores[j];
            if (p == 0.f) continue;
            const float *vj = V + j * hd;
#pragma omp simd
            for (int i = 0; i < hd; i++) o[i] += p * vj[i];
        }
        float inv = 1.f / sum;
#pragma omp simd
        for (int i = 0; i < hd; i++) o[i] *= inv;
    }
}

/* Column range [lo, hi) of n columns for thread tid of nt, cut at multiples of a tile */
static void share(int64_t n, int tid, int nt, int64_t *lo, int64_t *hi) {
    int64_t blocks = (n + TILE - 1) / TILE, per = (blocks + nt - 1) / nt;
    *lo = tid * per * TILE < n ? tid * per * TILE : n;
    *hi = (tid + 1) * per * TILE < n ? (tid + 1) * per * TILE : n;
}

/* Bytes of float scratch lc_step needs for `rows` rows. */
int64_t lc_work_floats(const Model *m, int rows) {
    int64_t qkv = (int64_t)(m->heads + 2 * m->kv_heads) * m->head_dim;
    return (int64_t)rows * (2 * m->hidden + qkv + (int64_t)m->heads * m->head_dim + 3 * m->inter);
}

/* Logits (rows, vocab) after feeding ids at positions; keys/values[l]: (rows, kv_heads, cap, head_dim) float32,
   written at column t; bias: (rows, cap) additive mask. Returns 0, or -1 when a position is past the rope table. */
int lc_step(const Model *m, int rows, const int64_t *ids, const int64_t *pos, const float *bias, int64_t cap,
            int64_t t, float *const *keys, float *const *values, float *logits, float *work, int nthreads) {
    for (int r = 0; r < rows; r++)
        if (pos[r] < 0 || pos[r] >= m->max_pos) return -1;
    int64_t H = m->hidden, I = m->inter, hd = m->head_dim, nq = m->heads, nkv = m->kv_heads;
    int64_t QKV = (nq + 2 * nkv) * hd, A = nq * hd;
    float *x = work, *h = x + rows * H, *qkv = h + rows * H, *att = qkv + rows * QKV, *gu = att + rows * A,
          *mid = gu + rows * 2 * I;
    int int8 = m->int8;
#pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        float *scores = malloc(sizeof(float) * (t + 1));
        for (int r = tid; r < rows; r += nt)
            for (int64_t i = 0; i < H; i++) x[r * H + i] = m->embed[ids[r] * m->embed_s0 + i * m->embed_s1];
#pragma omp barrier
        for (int l = 0; l < m->n_layers; l++) {
            const Layer *L = m->layers + l;
            for (int r = tid; r < rows; r += nt) rms_norm(x + r * H, L->norm1, h + r * H, H, m->eps);
#pragma omp barrier
            linear(int8, &L->qkv, h, H, rows, H, 0, QKV, qkv, QKV, 0, tid, nt);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t rg = 0; rg < rows * nkv; rg++)
                attend(m, L, l, (int)(rg / nkv), (int)(rg % nkv), qkv, QKV, pos, bias, cap, t, keys, values, att,
                       A, scores);
            /* the implicit barrier of omp for */
            linear(int8, &L->o, att, A, rows, A, 0, H, x, H, 1, tid, nt);
#pragma omp barrier
            for (int r = tid; r < rows; r += nt) rms_norm(x + r * H, L->norm2, h + r * H, H, m->eps);
#pragma omp barrier
            /* gate and up columns c of the fused matrix go to the same thread, so it can form silu(gate) * up */
            int64_t lo, hi;
            share(I, tid, nt, &lo, &hi);
            linear(int8, &L->gate_up, h, H, rows, H, lo, hi - lo, gu + lo, 2 * I, 0, 0, 1);
            linear(int8, &L->gate_up, h, H, rows, H, I + lo, hi - lo, gu + I + lo, 2 * I, 0, 0, 1);
            for (int r = 0; r < rows; r++) {
                const float *g = gu + r * 2 * I, *u = g + I;
                float *o = mid + r * I;
#pragma omp simd
                for (int64_t c = lo; c < hi; c++) o[c] = g[c] / (1.f + exp_(-g[c])) * u[c];
            }
#pragma omp barrier
            linear(int8, &L->down, mid, I, rows, I, 0, H, x, H, 1, tid, nt);
#pragma omp barrier
        }
        for (int r = tid; r < rows; r += nt) rms_norm(x + r * H, m->final_norm, h + r * H, H, m->eps);
#pragma omp barrier
        linear(int8, &m->head, h, H, rows, H, 0, m->vocab, logits, m->vocab, 0, tid, nt);
        free(scores);
    }
    return 0;
}
