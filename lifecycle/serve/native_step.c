/* One decode step of a Llama-layout model (llama, mistral, qwen2, qwen3) for every row of a batch, in C.

   lifecycle/serve/native.py compiles this file once per machine (cc -O3 -march=native -fopenmp) and calls
   lc_step through ctypes. The arithmetic is lifecycle/serve/fastpath.py's: embedding, then per layer rms norm,
   fused q/k/v, (qwen3: per-head q/k norm), rope from precomputed HF cos/sin tables, the new key/value written at
   column t of the batch's cache, attention over columns 0..t under the batch's additive mask, o, residual, rms norm,
   fused gate/up, silu(gate) * up, down, residual; final norm and the head.

   Why: at batch 1 on a small model a torch step is dozens of operator dispatches and OpenMP fork/joins per layer; here
   the whole step is one OpenMP parallel region (threads meet at a barrier between phases) and each matrix is read
   once per step as contiguous streams by vectorised kernels.

   Weights are read packed in panels of 32 output columns (see product): float32, or int8 with one float scale per
   output column (weight-only int8: activations stay float32). Each output is one chain of multiply-adds over its
   inputs in index order, so results equal torch's to float rounding, not bit for bit, and a row's results are the
   same bits whatever rows share its batch and however many threads run. Vectors use GCC's vector extensions, lowered
   to AVX-512, AVX2 or SSE by -march=native. */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

typedef int8_t i8x16u __attribute__((vector_size(16), aligned(1), may_alias));

typedef struct {
    const void *w;       /* panels (ceil(n / 32), in, 32): float, or int8 when the model is int8 (see product) */
    const float *scale;  /* int8: (n,) per output column; NULL for float */
    const float *bias;   /* (n,) or NULL */
    int64_t in, n;       /* inputs and output columns */
} Lin;

typedef struct {
    const float *norm1, *norm2, *q_norm, *k_norm; /* q_norm/k_norm: qwen3's (head_dim,), else NULL */
    Lin qkv, o, gate, up, down;
} Layer;

typedef struct {
    int32_t n_layers, hidden, heads, kv_heads, head_dim, inter, vocab, int8;
    float eps, scale;
    const float *embed;
    int64_t embed_rows, embed_s0, embed_s1; /* rows and element strides of the (vocab, hidden) embedding */
    const float *final_norm;
    Lin head;
    const float *cos_t, *sin_t; /* (max_pos, head_dim): HF's cos and sin with rotate_half's sign folded in */
    int64_t max_pos;
    const Layer *layers;
} Model;


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

/* The threads of a step meet here between phases. Spins briefly, then yields the core: when the machine has more
   runnable threads than cores (a server's event loop, another process), a thread that waits by spinning holds the
   core its late sibling needs, and OpenMP's own barrier (spinning for ~300,000 rounds) then cost milliseconds. */
typedef struct {
    atomic_int arrived, phase;
} Barrier;

static void meet(Barrier *b, int nt) {
    if (nt == 1) return;
    int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == nt - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->phase, 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase; spins++) {
        if (spins >= 2000) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else __builtin_ia32_pause();
#endif
    }
}

/* Matrix products y = x @ W (* scale) (+ bias) for all rows of x at once, over weights packed in panels.

   A panel is 32 output columns of W over all its inputs: (in, 32) contiguous, so the panels of a matrix are
   (ceil(out / 32), in, 32), the last one's spare columns zero (lifecycle/serve/native.py packs them). A tile of up to
   8 rows of x walks down one panel (or a 1-4-row tile down up to 4 panels side by side) with every sum in registers
   from the first input to the last: one contiguous stream per panel, which the hardware prefetchers follow, and no
   partial sums through memory. Over the same weights in (in, out) rows, tiles walking down 32 columns are a strided
   stream the prefetchers miss, and tiles over a few rows at a time load and store their sums between blocks: 8 rows
   of a 120M Llama's 768 x 3072 matrices (DRAM-resident, 2 threads, AMD EPYC Zen 4) took 21-25 ms that way, 11-14 ms
   in panels.

   Threads split a matrix's panels, so each thread writes finished output columns (scaled, biased) and no partial
   sums are added across threads. Each output is one chain of multiply-adds over the inputs in index order, whatever
   the tile: a row's results do not depend on the rows beside it or on the thread count. */
#define PANEL 32

static inline __attribute__((always_inline)) v16 load_w(int int8, const void *w, int64_t i) {
    return int8 ? load16_i8((const int8_t *)w + i) : load16((const float *)w + i);
}

/* R rows of x times NP panels (w: the first, `stride` elements apart) over all `in` inputs: the raw sums into
   out[r][0 .. 32 * NP). R and NP are constants after inlining; R * 2 * NP <= 16 accumulators. */
static inline __attribute__((always_inline)) void panel_tile(int INT8, int R, int NP, const void *w, int64_t stride,
                                                             int64_t in, const float *x, int64_t ldx, float *out,
                                                             int64_t ldo) {
    const int size = INT8 ? 1 : 4;
    const char *base = (const char *)w;
    v16 acc[8][8];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 2 * NP; v++) acc[r][v] = (v16){0};
    for (int64_t i = 0; i < in; i++) {
        v16 wv[8];
        for (int p = 0; p < NP; p++) {
            const char *row = base + (int64_t)size * (p * stride + i * PANEL);
            /* 16 inputs ahead: the prefetchers follow the stream too, this covers their start-up at each panel */
            __builtin_prefetch(row + 16 * size * PANEL);
            if (!INT8) __builtin_prefetch(row + 16 * size * PANEL + 64);
            wv[2 * p] = load_w(INT8, row, 0);
            wv[2 * p + 1] = load_w(INT8, row, 16);
        }
        for (int r = 0; r < R; r++) {
            float xv = x[r * ldx + i];
            for (int v = 0; v < 2 * NP; v++) acc[r][v] += xv * wv[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 2 * NP; v++) store16(out + r * ldo + 16 * v, acc[r][v]);
}

#define PANEL_TILE(R, NP)                                                                                         \
    static void panel_tile_##R##_##NP(int int8, const void *w, int64_t stride, int64_t in, const float *x,        \
                                      int64_t ldx, float *out, int64_t ldo) {                                     \
        if (int8) panel_tile(1, R, NP, w, stride, in, x, ldx, out, ldo);                                          \
        else panel_tile(0, R, NP, w, stride, in, x, ldx, out, ldo);                                               \
    }
PANEL_TILE(1, 4) PANEL_TILE(2, 4) PANEL_TILE(3, 2) PANEL_TILE(4, 2)
PANEL_TILE(1, 1) PANEL_TILE(2, 1) PANEL_TILE(3, 1) PANEL_TILE(4, 1) PANEL_TILE(5, 1) PANEL_TILE(6, 1)
PANEL_TILE(7, 1) PANEL_TILE(8, 1)

typedef void (*tile_fn)(int, const void *, int64_t, int64_t, const float *, int64_t, float *, int64_t);
/* by rows: the tile over several panels (NP of them: wide_panels[R]) and over one */
static const tile_fn wide[5] = {0, panel_tile_1_4, panel_tile_2_4, panel_tile_3_2, panel_tile_4_2};
static const int wide_panels[9] = {0, 4, 4, 2, 2, 1, 1, 1, 1};
static const tile_fn single[9] = {0, panel_tile_1_1, panel_tile_2_1, panel_tile_3_1, panel_tile_4_1,
                                  panel_tile_5_1, panel_tile_6_1, panel_tile_7_1, panel_tile_8_1};

/* Panels [lo, hi) of P for thread tid of nt: contiguous runs of nearly equal length */
static void share(int64_t P, int tid, int nt, int64_t *lo, int64_t *hi) {
    *lo = P * tid / nt;
    *hi = P * (tid + 1) / nt;
}

/* The sums of R <= 8 rows of x (from row 0) and panels [p, p + np) of L, scaled and biased, into s (R, 4 * PANEL):
   s[r][c - p * PANEL] for the panels' columns c below L->n */
static void panel_block(int int8, const Lin *L, int64_t p, int np, const float *x, int64_t ldx, int R, float *s) {
    const int64_t stride = L->in * PANEL, c0 = p * PANEL;
    const int64_t c1 = (p + np) * PANEL < L->n ? (p + np) * PANEL : L->n;
    const char *w = (const char *)L->w + (int8 ? 1 : 4) * p * stride;
    if (np > 1) wide[R](int8, w, stride, L->in, x, ldx, s, 4 * PANEL); /* np > 1 only for R <= 4 */
    else single[R](int8, w, stride, L->in, x, ldx, s, 4 * PANEL);
    if (!L->scale && !L->bias) return;
    for (int r = 0; r < R; r++) {
        float *sr = s + r * 4 * PANEL - c0;
        int64_t c = c0;
        for (; c + 16 <= c1; c += 16) {
            v16 v = load16(sr + c);
            if (L->scale) v *= load16(L->scale + c);
            if (L->bias) v += load16(L->bias + c);
            store16(sr + c, v);
        }
        for (; c < c1; c++) {
            if (L->scale) sr[c] *= L->scale[c];
            if (L->bias) sr[c] += L->bias[c];
        }
    }
}

/* How many panels a tile takes at once from panel p (of this thread's [.., hi)) for `rows` rows of x */
static int panels_at_once(int rows, int64_t p, int64_t hi) {
    int np = rows <= 4 ? wide_panels[rows] : 1;
    return p + np <= hi ? np : 1;
}

static void rms_norm(const float *x, const float *w, float *out, int64_t n, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* This thread's columns of y = x @ W * scale + bias for rows [0, rows) of x; y (rows, ldy). With `up` (the mlp's
   gate/up pair, W the gate), y = silu(x @ W) * (x @ up) instead: gate column c and up column c come from the same
   panel index, so the thread that sums one has the other. Prefill-sized inputs sweep all their rows over a panel
   (then in L2) before the next. */
static void product(int int8, const Lin *L, const Lin *up, const float *x, int64_t ldx, int rows, float *y,
                    int64_t ldy, int tid, int nt) {
    int64_t lo, hi;
    share((L->n + PANEL - 1) / PANEL, tid, nt, &lo, &hi);
    float s[8 * 4 * PANEL] __attribute__((aligned(64))), u[8 * 4 * PANEL] __attribute__((aligned(64)));
    for (int64_t p = lo; p < hi;) {
        int np = panels_at_once(rows, p, hi);
        int64_t c0 = p * PANEL, c1 = (p + np) * PANEL < L->n ? (p + np) * PANEL : L->n;
        for (int r0 = 0; r0 < rows; r0 += 8) {
            int R = rows - r0 < 8 ? rows - r0 : 8;
            panel_block(int8, L, p, np, x + r0 * ldx, ldx, R, s);
            if (up) panel_block(int8, up, p, np, x + r0 * ldx, ldx, R, u);
            for (int r = 0; r < R; r++) {
                float *o = y + (r0 + r) * ldy + c0;
                const float *sr = s + r * 4 * PANEL, *ur = u + r * 4 * PANEL;
                if (!up) {
                    memcpy(o, sr, sizeof(float) * (c1 - c0));
                    continue;
                }
#pragma omp simd
                for (int64_t c = 0; c < c1 - c0; c++) o[c] = sr[c] / (1.f + exp_(-sr[c])) * ur[c];
            }
        }
        p += np;
    }
}

/* HF's rope with the sign folded into sin: x * cos + swap_halves(x) * sin, in place on one head */
static void rope(float *x, const float *cos_, const float *sin_, int hd) {
    int half = hd / 2;
    float tmp[hd];
    for (int i = 0; i < hd; i++) tmp[i] = x[i] * cos_[i] + x[i < half ? i + half : i - half] * sin_[i];
    memcpy(x, tmp, sizeof(float) * hd);
}

/* softmax(q . K[j] * scale + mask[j]) over j <= t, in place in scores; returns the sum of the exponentials */
static float softmax(float *scores, int64_t t) {
    float top = -INFINITY;
    for (int64_t j = 0; j <= t; j++) top = scores[j] > top ? scores[j] : top;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j <= t; j++) {
        float e = exp_(scores[j] - top);
        scores[j] = e;
        sum += e;
    }
    return sum;
}

static inline float lanes_sum(v16 v) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* The sums of the lanes of a[0..15], a[j]'s in lane j: a tree of 15 two-vector shuffles and adds instead of 16
   lane_sums (each a chain of 15 scalar adds), in another order of addition. 8 rows of a 120M Llama at positions
   100-250: attention 5.9-6.0 -> 5.5-5.7 ms a step. GCC before 12 has no __builtin_shufflevector: lane sums there. */
static inline v16 lanes_sums16(const v16 *a) {
#if defined(__clang__) || !defined(__GNUC__) || __GNUC__ >= 12
    v16 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++) /* 8 pairs: lanes 0-7 a partial sum of a[2k]'s lanes, 8-15 of a[2k + 1]'s */
        b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                       23) +
               __builtin_shufflevector(a[2 * k], a[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                       30, 31);
    for (int k = 0; k < 4; k++) /* 4 lanes for each of a[4k..4k + 3] */
        c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26,
                                       27) +
               __builtin_shufflevector(b[2 * k], b[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29,
                                       30, 31);
    for (int k = 0; k < 2; k++) /* 2 lanes each: a[8k], a[8k + 4], a[8k + 1], a[8k + 5], ... */
        d[k] = __builtin_shufflevector(c[2 * k], c[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28,
                                       29) +
               __builtin_shufflevector(c[2 * k], c[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15,
                                       30, 31);
    v16 e = __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
            __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    /* e holds a[0], a[8], a[4], a[12], a[1], a[9], ... */
    return __builtin_shufflevector(e, e, 0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15);
#else
    v16 sums;
    for (int j = 0; j < 16; j++) sums[j] = lanes_sum(a[j]);
    return sums;
#endif
}

/* One query head over keys/values (t + 1, HD): HD a constant after inlining (64, 128), so q and the output stay in
   registers while the cache streams past; scores 16 keys at a time */
static inline __attribute__((always_inline)) void head_attention(int HD, const float *q, const float *K,
                                                                const float *V, const float *mask, int64_t t,
                                                                float scale, float *scores, float *o) {
    v16 qv[HD / 16], acc[HD / 16];
    for (int k = 0; k < HD / 16; k++) qv[k] = load16(q + 16 * k), acc[k] = (v16){0};
    int64_t j = 0;
    for (; j + 16 <= t + 1; j += 16) {
        v16 s[16];
        for (int u = 0; u < 16; u++) {
            const float *kj = K + (j + u) * HD;
            /* the rows of one head's cache are read once, 8 keys (2-4 KB) ahead: 12% less time in attention over a
               120M Llama's cache at 100-250 positions, 8 rows (16 or 32 keys ahead: no better) */
            for (int c = 0; c < HD / 16; c++) __builtin_prefetch(kj + 8 * HD + 16 * c);
            s[u] = qv[0] * load16(kj);
            for (int k = 1; k < HD / 16; k++) s[u] += qv[k] * load16(kj + 16 * k);
        }
        store16(scores + j, lanes_sums16(s) * scale + load16(mask + j));
    }
    for (; j <= t; j++) {
        const float *kj = K + j * HD;
        v16 s = qv[0] * load16(kj);
        for (int k = 1; k < HD / 16; k++) s += qv[k] * load16(kj + 16 * k);
        scores[j] = lanes_sum(s) * scale + mask[j];
    }
    float inv = 1.f / softmax(scores, t);
    for (int64_t j = 0; j <= t; j++) {
        float p = scores[j];
        if (p == 0.f) continue; /* a masked column */
        const float *vj = V + j * HD;
        for (int c = 0; c < HD / 16; c++) __builtin_prefetch(vj + 8 * HD + 16 * c);
        for (int k = 0; k < HD / 16; k++) acc[k] += p * load16(vj + 16 * k);
    }
    for (int k = 0; k < HD / 16; k++) store16(o + 16 * k, acc[k] * inv);
}

static void head_attention_any(int hd, const float *q, const float *K, const float *V, const float *mask, int64_t t,
                               float scale, float *scores, float *o) {
    for (int64_t j = 0; j <= t; j++) {
        const float *kj = K + j * hd;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < hd; i++) s += q[i] * kj[i];
        scores[j] = s * scale + mask[j];
    }
    float inv = 1.f / softmax(scores, t);
    for (int i = 0; i < hd; i++) o[i] = 0.f;
    for (int64_t j = 0; j <= t; j++) {
        float p = scores[j];
        if (p == 0.f) continue;
        const float *vj = V + j * hd;
#pragma omp simd
        for (int i = 0; i < hd; i++) o[i] += p * vj[i];
    }
#pragma omp simd
    for (int i = 0; i < hd; i++) o[i] *= inv;
}

/* One row's kv group g after the q/k/v product: (qwen3) q/k norms, rope on its q and k heads, and its key and value
   written at column `col` of cache row `crow` */
static void prepare(const Model *m, const Layer *L, int layer_i, int r, int g, float *qkv, int64_t ld_qkv,
                    int64_t pos, int64_t crow, int64_t col, int64_t cap, float *const *keys, float *const *values) {
    int nq = m->heads, nkv = m->kv_heads, hd = m->head_dim, group = nq / nkv;
    const float *cos_ = m->cos_t + pos * hd, *sin_ = m->sin_t + pos * hd;
    float *row = qkv + r * ld_qkv;
    float *k = row + (int64_t)(nq + g) * hd, *v = row + (int64_t)(nq + nkv + g) * hd;
    if (L->k_norm) rms_norm(k, L->k_norm, k, hd, m->eps);
    rope(k, cos_, sin_, hd);
    memcpy(keys[layer_i] + ((crow * nkv + g) * cap + col) * hd, k, sizeof(float) * hd);
    memcpy(values[layer_i] + ((crow * nkv + g) * cap + col) * hd, v, sizeof(float) * hd);
    for (int h = g * group; h < (g + 1) * group; h++) {
        float *q = row + (int64_t)h * hd;
        if (L->q_norm) rms_norm(q, L->q_norm, q, hd, m->eps);
        rope(q, cos_, sin_, hd);
    }
}

/* Attention of row r's query heads of kv group g (prepared) over columns from..col of cache row crow, under that
   row's additive mask; the columns before `from` are masked padding, whose exp() is exactly 0 */
static void look(const Model *m, int layer_i, int r, int g, const float *qkv, int64_t ld_qkv, int64_t crow,
                 int64_t from, int64_t col, const float *bias, int64_t cap, float *const *keys,
                 float *const *values, float *out, int64_t ld_out, float *scores) {
    int nq = m->heads, nkv = m->kv_heads, hd = m->head_dim, group = nq / nkv;
    if (from > col) from = col;
    const float *K = keys[layer_i] + ((crow * nkv + g) * cap + from) * hd;
    const float *V = values[layer_i] + ((crow * nkv + g) * cap + from) * hd;
    const float *mask = bias + crow * cap + from;
    for (int h = g * group; h < (g + 1) * group; h++) {
        const float *q = qkv + r * ld_qkv + (int64_t)h * hd;
        float *o = out + (int64_t)r * ld_out + (int64_t)h * hd;
        if (hd == 64) head_attention(64, q, K, V, mask, col - from, m->scale, scores, o);
        else if (hd == 128) head_attention(128, q, K, V, mask, col - from, m->scale, scores, o);
        else head_attention_any(hd, q, K, V, mask, col - from, m->scale, scores, o);
    }
}

/* Masked columns at the start of each cache row (left padding: a prompt shorter than its batch's longest, or a row
   that joined later), which attention skips: mask values at or below PADDING contribute exactly 0 */
#define PADDING -1e30f
static int64_t *leading_padding(const float *bias, int64_t cache_rows, int64_t cap) {
    int64_t *first = malloc(sizeof(int64_t) * (cache_rows > 0 ? cache_rows : 1));
    for (int64_t c = 0; c < cache_rows; c++) {
        int64_t j = 0;
        while (j < cap && bias[c * cap + j] <= PADDING) j++;
        first[c] = j;
    }
    return first;
}

/* Floats of scratch forward() needs for `rows` rows and `nthreads` threads: q/k/v, attention, the gated mlp and the
   o/down output shared, the residual stream and normed rows per thread */
static int64_t scratch_floats(const Model *m, int64_t rows, int nthreads) {
    int64_t qkv = (int64_t)(m->heads + 2 * m->kv_heads) * m->head_dim;
    return rows * (qkv + (int64_t)m->heads * m->head_dim + m->inter + m->hidden) +
           (int64_t)nthreads * 2 * rows * m->hidden;
}

/* Floats of scratch lc_step needs for `rows` rows and `nthreads` threads. */
int64_t lc_work_floats(const Model *m, int rows, int nthreads) { return scratch_floats(m, rows, nthreads); }

/* Floats of scratch lc_prefill needs for `tokens` prompt tokens, `outs` of them with logits, and `nthreads` threads */
int64_t lc_prefill_floats(const Model *m, int tokens, int outs, int nthreads) {
    (void)outs; /* the logits are the caller's; the head's rows reuse the normed rows' space */
    return scratch_floats(m, tokens, nthreads);
}

/* The model over `rows` tokens: token r has id ids[r] and position pos[r], writes its key/value at column col[r] of
   cache row crow[r] and attends columns 0..col[r] of that row under its additive mask (bias: (cache_rows, cap)).
   crow and col NULL (a decode step): token r uses cache row r and column t, so each (row, kv group) writes and
   attends at once; given (a prefill: one prompt's tokens share a cache row), every key and value of a layer is
   written before any token attends. Logits (outs, vocab) for the tokens listed in out (NULL: all rows, outs ==
   rows).

   Every thread keeps its own copy of the residual stream (x) and of the normed rows, adding the o and down outputs
   (y, written by the threads that own their columns) after the barrier that ends each product: 5 barriers a layer
   (6 shared). y is written again only after the next barrier every thread passes once it has read it. */
static void forward(const Model *m, int rows, const int64_t *ids, const int64_t *pos, const int64_t *crow,
                    const int64_t *col, int64_t t, int64_t cache_rows, const float *bias, int64_t cap,
                    float *const *keys, float *const *values, int outs, const int64_t *out, float *logits, float *work,
                    int nthreads) {
    int64_t H = m->hidden, I = m->inter, nq = m->heads, nkv = m->kv_heads, hd = m->head_dim;
    int64_t QKV = (nq + 2 * nkv) * hd, A = nq * hd;
    float *qkv = work, *att = qkv + rows * QKV, *mid = att + rows * A, *y = mid + rows * I, *own = y + rows * H;
    int64_t span = t + 1;
    int shared = crow != NULL; /* crow and col are both given or both NULL */
    if (shared)
        for (int r = 0; r < rows; r++) span = col[r] + 1 > span ? col[r] + 1 : span;
    int64_t *first = leading_padding(bias, cache_rows, cap);
    int int8 = m->int8;
    Barrier b = {0, 0};
#pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        float *scores = malloc(sizeof(float) * span);
        float *x = own + (int64_t)tid * rows * 2 * H, *h = x + rows * H;
        for (int r = 0; r < rows; r++)
            for (int64_t i = 0; i < H; i++) x[r * H + i] = m->embed[ids[r] * m->embed_s0 + i * m->embed_s1];
        for (int l = 0; l < m->n_layers; l++) {
            const Layer *L = m->layers + l;
            for (int r = 0; r < rows; r++) rms_norm(x + r * H, L->norm1, h + r * H, H, m->eps);
            product(int8, &L->qkv, NULL, h, H, rows, qkv, QKV, tid, nt);
            meet(&b, nt);
            for (int64_t rg = tid; rg < rows * nkv; rg += nt) {
                int r = (int)(rg / nkv), g = (int)(rg % nkv);
                prepare(m, L, l, r, g, qkv, QKV, pos[r], shared ? crow[r] : r, shared ? col[r] : t, cap, keys, values);
                if (!shared) look(m, l, r, g, qkv, QKV, r, first[r], t, bias, cap, keys, values, att, A, scores);
            }
            if (shared) {
                meet(&b, nt);
                for (int64_t rg = tid; rg < rows * nkv; rg += nt) {
                    int r = (int)(rg / nkv), g = (int)(rg % nkv);
                    look(m, l, r, g, qkv, QKV, crow[r], first[crow[r]], col[r], bias, cap, keys, values, att, A,
                         scores);
                }
            }
            meet(&b, nt);
            product(int8, &L->o, NULL, att, A, rows, y, H, tid, nt);
            meet(&b, nt);
            for (int64_t i = 0; i < rows * H; i++) x[i] += y[i];
            for (int r = 0; r < rows; r++) rms_norm(x + r * H, L->norm2, h + r * H, H, m->eps);
            product(int8, &L->gate, &L->up, h, H, rows, mid, I, tid, nt);
            meet(&b, nt);
            product(int8, &L->down, NULL, mid, I, rows, y, H, tid, nt);
            meet(&b, nt);
            for (int64_t i = 0; i < rows * H; i++) x[i] += y[i];
        }
        for (int o = 0; o < outs; o++) rms_norm(x + (out ? out[o] : o) * H, m->final_norm, h + o * H, H, m->eps);
        product(int8, &m->head, NULL, h, H, outs, logits, m->vocab, tid, nt);
        free(scores);
    }
    free(first);
}

/* Logits (rows, vocab) after feeding ids at positions; keys/values[l]: (rows, kv_heads, cap, head_dim) float32,
   written at column t; bias: (rows, cap) additive mask; work: lc_work_floats(m, rows, nthreads) floats.
   Returns 0; -1 when a position is past the rope table, -2 for a token id outside the embedding (nothing is
   written then). */
int lc_step(const Model *m, int rows, const int64_t *ids, const int64_t *pos, const float *bias, int64_t cap,
            int64_t t, float *const *keys, float *const *values, float *logits, float *work, int nthreads) {
    for (int r = 0; r < rows; r++) {
        if (pos[r] < 0 || pos[r] >= m->max_pos) return -1;
        if (ids[r] < 0 || ids[r] >= m->embed_rows) return -2;
    }
    forward(m, rows, ids, pos, NULL, NULL, t, rows, bias, cap, keys, values, rows, NULL, logits, work, nthreads);
    return 0;
}

/* A prefill: `tokens` prompt tokens at once, token i (id ids[i], position pos[i]) writing its key and value at column
   col[i] of cache row crow[i] and attending that row's columns 0..col[i] (a prompt's tokens at increasing columns
   of its own row: causal by construction; the mask hides the row's padding). Logits (outs, vocab) of the tokens
   listed in `out`. work: lc_prefill_floats(m, tokens, outs, nthreads) floats. Returns 0, -1 / -2 as lc_step, -4 for
   a cache row or column outside the cache; nothing is written then. */
int lc_prefill(const Model *m, int tokens, const int64_t *ids, const int64_t *pos, const int64_t *crow,
               const int64_t *col, int64_t cache_rows, const float *bias, int64_t cap, float *const *keys,
               float *const *values, int outs, const int64_t *out, float *logits, float *work, int nthreads) {
    for (int i = 0; i < tokens; i++) {
        if (pos[i] < 0 || pos[i] >= m->max_pos) return -1;
        if (ids[i] < 0 || ids[i] >= m->embed_rows) return -2;
        if (crow[i] < 0 || crow[i] >= cache_rows || col[i] < 0 || col[i] >= cap) return -4;
    }
    for (int o = 0; o < outs; o++)
        if (out[o] < 0 || out[o] >= tokens) return -4;
    forward(m, tokens, ids, pos, crow, col, 0, cache_rows, bias, cap, keys, values, outs, out, logits, work,
            nthreads);
    return 0;
}

/* The largest of x[0..n) that is not NaN (-inf when none is), in one vectorised pass; *nan: whether any is NaN */
static float largest(const float *x, int64_t n, int *nan) {
    float top = -INFINITY;
    int any = 0;
#pragma omp simd reduction(max : top) reduction(| : any)
    for (int64_t j = 0; j < n; j++) {
        top = x[j] > top ? x[j] : top;
        any |= x[j] != x[j];
    }
    *nan = any;
    return top;
}

/* The index of the largest of x[0..n): the first one among equals, or the first NaN where there is one (numpy's
   argmax, which the scheduler's single steps use) */
static int64_t argmax(const float *x, int64_t n) {
    int nan;
    float top = largest(x, n, &nan);
    for (int64_t j = 0; j < n; j++)
        if (nan ? x[j] != x[j] : x[j] == top) return j;
    return 0; /* every x is -inf */
}

/* Sampling. Each draw is a pure function of (logits, settings, seed, counter): the counter is the token's index in
   its generation, so a seeded request draws the same tokens whether its steps ran one per call or several
   (lc_decode_run), and whatever shares its batch. */

/* SplitMix64's output function */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A uniform double in [0, 1) for draw `counter` of stream `seed` (53 random bits) */
double lc_uniform(uint64_t seed, uint64_t counter) {
    uint64_t z = mix64(mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15ull);
    return (double)(z >> 11) * 0x1.0p-53;
}

#define SAMPLE_BUCKETS 2048 /* the sign, 8 exponent and 3 mantissa bits of a probability in [0, 1] */

/* Floats of scratch lc_sample needs for a vocabulary of V */
int64_t lc_sample_floats(int64_t V) { return 3 * V + 1 + 2 * SAMPLE_BUCKETS; }

/* The k-th largest of x[0..n) (1 <= k <= n), x reordered: quickselect with a middle pivot */
static float kth_largest(float *x, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = x[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot) i++;
            while (x[j] < pivot) j--;
            if (i <= j) {
                float tmp = x[i];
                x[i++] = x[j];
                x[j--] = tmp;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return x[want];
    }
    return x[want];
}

static int by_weight_desc(const void *a, const void *b) {
    const float *x = a, *y = b; /* (weight, index) pairs: larger weight first, then lower index */
    if (x[0] != y[0]) return x[0] < y[0] ? 1 : -1;
    return x[1] > y[1] ? 1 : x[1] < y[1] ? -1 : 0;
}

/* The next token from one row of logits (V): softmax(logits / temperature) over the tokens that top_k (0: off; keep
   those at or above the k-th largest logit) and top_p (1: off; keep a token when the probability of the likelier
   tokens before it, in descending order, is at most top_p) keep, drawn with lc_uniform(seed, counter) by walking
   the kept tokens in index order. work: lc_sample_floats(V) floats. Returns the token, or -5 when a logit is NaN or
   +inf or every logit is -inf (nothing can be drawn). temperature must be > 0. */
int64_t lc_sample(const float *logits, int64_t V, float temperature, int64_t top_k, float top_p, uint64_t seed,
                  uint64_t counter, float *work) {
    float *p = work, *pairs = work + V; /* p: weights exp((logit - top) / T); pairs: (weight, index) of a bucket */
    double *mass = (double *)(work + (3 * V + 1) / 2 * 2); /* 8-byte aligned (work is) */
    int nan;
    float top = largest(logits, V, &nan);
    if (nan || top == INFINITY || top == -INFINITY) return -5;
    float floor_ = -INFINITY; /* logits below it are out (top_k) */
    if (top_k > 0 && top_k < V) {
        memcpy(p, logits, sizeof(float) * V);
        floor_ = kth_largest(p, V, top_k);
    }
    float inv = 1.f / temperature;
#pragma omp simd
    for (int64_t i = 0; i < V; i++) p[i] = logits[i] >= floor_ ? exp_((logits[i] - top) * inv) : 0.f;
    if (top_p < 1.f) {
        double total = 0.;
        for (int64_t i = 0; i < V; i++) total += p[i];
        /* Bucket the weights (all in [0, 1]) by their leading bits, which order them; whole buckets from the top
           are kept while the mass before them is at most top_p of the total, and only the bucket where that ends
           is sorted. */
        memset(mass, 0, sizeof(double) * SAMPLE_BUCKETS);
        for (int64_t i = 0; i < V; i++) {
            union { float f; uint32_t u; } w = {.f = p[i]};
            mass[w.u >> 20] += p[i];
        }
        double limit = (double)top_p * total, before = 0.;
        int b = SAMPLE_BUCKETS - 1;
        for (; b > 0; b--) {
            if (before + mass[b] > limit) break;
            before += mass[b];
        }
        /* bucket b: its weights in descending order, kept while the mass before each is at most the limit */
        int64_t n = 0;
        for (int64_t i = 0; i < V; i++) {
            union { float f; uint32_t u; } w = {.f = p[i]};
            if ((int)(w.u >> 20) == b) pairs[2 * n] = p[i], pairs[2 * n + 1] = (float)i, n++;
        }
        qsort(pairs, n, 2 * sizeof(float), by_weight_desc);
        float cut = -1.f;
        int64_t cut_index = -1; /* bucket b's last kept (weight, index) */
        for (int64_t j = 0; j < n && before <= limit; j++) {
            cut = pairs[2 * j], cut_index = (int64_t)pairs[2 * j + 1];
            before += pairs[2 * j];
        }
        for (int64_t i = 0; i < V; i++) {
            union { float f; uint32_t u; } w = {.f = p[i]};
            int bucket = (int)(w.u >> 20);
            if (!(bucket > b || (bucket == b && (p[i] > cut || (p[i] == cut && i <= cut_index))))) p[i] = 0.f;
        }
    }
    /* The draw: the first kept token whose running sum of weights passes lc_uniform(seed, counter) times their
       total, summed 16 at a time (the block sums in float, added up in double) so the pass over the vocabulary
       vectorizes; the block where the sum passes the target is walked token by token. */
    float *sums = pairs; /* free again: one sum per block of 16 */
    int64_t blocks = (V + 15) / 16;
    double total = 0.;
    for (int64_t k = 0; k < blocks; k++) {
        float sum = 0.f;
        for (int64_t i = 16 * k; i < 16 * k + 16 && i < V; i++) sum += p[i];
        sums[k] = sum;
        total += sum;
    }
    double target = lc_uniform(seed, counter) * total, run = 0.;
    for (int64_t k = 0; k < blocks; k++) {
        if (run + sums[k] > target) { /* sums[k] > 0: the block holds a kept token */
            int64_t last = -1;
            for (int64_t i = 16 * k; i < 16 * k + 16 && i < V; i++) {
                if (p[i] == 0.f) continue;
                run += p[i];
                last = i;
                if (run > target) return i;
            }
            return last; /* rounding: the block's own sum passed the target, its tokens one by one not quite */
        }
        run += sums[k];
    }
    for (int64_t i = V - 1; i >= 0; i--) /* rounding left the target at the very end: the last kept token */
        if (p[i] != 0.f) return i;
    return -5; /* not reached: the top logit's weight is 1 */
}

/* log_softmax(x)[token] over x[0..n): x[token] - max - log(sum of exp(x - max)), the exponentials summed 16 at a time
   in float, then in double; NaN where x holds one */
static float log_prob(const float *x, int64_t n, int64_t token) {
    int nan;
    float top = largest(x, n, &nan);
    if (nan) return NAN;
    if (top == -INFINITY || top == INFINITY) return x[token] - top; /* a degenerate row: -inf or NaN */
    double sum = 0.;
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
        float part = 0.f;
        int64_t i1 = i0 + 16 < n ? i0 + 16 : n;
#pragma omp simd reduction(+ : part)
        for (int64_t i = i0; i < i1; i++) part += exp_(x[i] - top);
        sum += part;
    }
    return (float)((double)(x[token] - top) - log(sum));
}

/* k decode steps in one call: step s feeds each row its token of step s - 1 (ids at step 0) at position pos[r] + s,
   column t + s; tokens (rows, k) gets every row's k tokens. A row with temperature[r] == 0 (or temperature NULL:
   every row) takes the argmax (numpy's rule), another draws with lc_sample(top_k[r], top_p[r], seed[r],
   counter[r] + s); a draw that fails (-5) records -1 and feeds token 0 after it, for the caller to end that row.
   The caller marks columns t..t+k-1 valid in bias. Everything is checked before anything is written: -1 when a
   position would pass the rope table, -2 for a token id outside the embedding, -3 when the head has more columns
   than the embedding has rows (a token could not be fed back). logits (rows, vocab) holds the last step's.
   logprobs (rows, k), unless NULL, gets each token's log_softmax of its step's logits (log_prob). */
int lc_decode_run(const Model *m, int rows, const int64_t *ids, const int64_t *pos, const float *bias, int64_t cap,
                  int64_t t, float *const *keys, float *const *values, float *logits, float *work, int nthreads,
                  int k, int64_t *tokens, const float *temperature, const int64_t *top_k, const float *top_p,
                  const uint64_t *seed, const int64_t *counter, float *logprobs) {
    if (m->vocab > m->embed_rows) return -3;
    for (int r = 0; r < rows; r++) {
        if (pos[r] < 0 || pos[r] + k - 1 >= m->max_pos) return -1;
        if (ids[r] < 0 || ids[r] >= m->embed_rows) return -2;
    }
    int64_t *feed = malloc(sizeof(int64_t) * 2 * rows), *at = feed + rows;
    float *draw = temperature ? malloc(sizeof(float) * lc_sample_floats(m->vocab)) : NULL;
    for (int r = 0; r < rows; r++) feed[r] = ids[r], at[r] = pos[r];
    for (int s = 0; s < k; s++) {
        lc_step(m, rows, feed, at, bias, cap, t + s, keys, values, logits, work, nthreads);
        for (int r = 0; r < rows; r++) {
            const float *row = logits + (int64_t)r * m->vocab;
            int64_t token = temperature && temperature[r] > 0.f
                                ? lc_sample(row, m->vocab, temperature[r], top_k[r], top_p[r], seed[r],
                                            (uint64_t)(counter[r] + s), draw)
                                : argmax(row, m->vocab);
            tokens[(int64_t)r * k + s] = token < 0 ? -1 : token;
            if (logprobs) logprobs[(int64_t)r * k + s] = token < 0 ? NAN : log_prob(row, m->vocab, token);
            feed[r] = token < 0 ? 0 : token;
            at[r]++;
        }
    }
    free(draw);
    free(feed);
    return 0;
}
