/* Training kernels for the CPU, float32 (lifecycle/training/kernels.py): causal self-attention and SwiGLU, forward
   and backward.

   Attention: softmax(q k^T * scale, causal) v per (batch, head), with grouped-query heads (a kv head serves heads /
   kv_heads query heads). Forward saves each row's log-sum-exp; backward recomputes the probabilities from it
   (FlashAttention's recomputation), so nothing of size T x T outlives a call. Unlike a flash kernel it takes a block
   of query rows against all the keys it can see at once (a row block's scores fit in cache up to long sequences), so
   its softmax needs no running rescale, and each 8-row tile stops at its own diagonal: the causal half is skipped to
   within 16 keys. Every product is a register-blocked tile (8 rows x 32 columns, or 4 keys x 64 dims for the
   transposed products of backward) over contiguous 16-float vectors; the work is split between OpenMP threads by
   (batch, head) in forward and by (batch, kv head) in backward, so no two threads write the same gradient. Requires
   head_dim a multiple of 16 and each row's head_dim floats contiguous (the Python side checks and falls back).

   SwiGLU: silu(gate) * up in one pass, and both gradients in one pass that recomputes the sigmoid (nothing saved
   beyond the inputs). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

static inline v16 splat(float x) { return (v16){0} + x; }
static inline v16 larger(v16 a, v16 b) { /* lane-wise max (a NaN lane in a is kept) */
    i32x16 take = ~(a <= b);
    return (v16)(((i32x16)a & take) | ((i32x16)b & ~take));
}

#define ROWS 64 /* query rows per block: their scores (ROWS x T floats) are the block's working set */
#define TILE 8  /* query rows per register tile */

/* C[m][c] (+)= sum_k a(m, k) B[k][c] for M rows of C and NV * 16 columns, the sums in registers over all k.
   Plain (T = 0): a(m, k) = A[m][k] and C is written. Transposed (T = 1): a(m, k) = A[k][m] (backward's Pᵀ dO and
   dSᵀ Q, m a key and k a query row) and C is accumulated into. */
static inline __attribute__((always_inline)) void tile(int M, int NV, int T, const float *A, int64_t lda,
                                                       const float *B, int64_t ldb, int64_t K, float *C, int64_t ldc) {
    v16 acc[TILE][4];
    for (int m = 0; m < M; m++)
        for (int v = 0; v < NV; v++) acc[m][v] = T ? load16(C + m * ldc + 16 * v) : (v16){0};
    for (int64_t k = 0; k < K; k++) {
        v16 b[4];
        for (int v = 0; v < NV; v++) b[v] = load16(B + k * ldb + 16 * v);
        for (int m = 0; m < M; m++) {
            v16 a = splat(T ? A[k * lda + m] : A[m * lda + k]);
            for (int v = 0; v < NV; v++) acc[m][v] += a * b[v];
        }
    }
    for (int m = 0; m < M; m++)
        for (int v = 0; v < NV; v++) store16(C + m * ldc + 16 * v, acc[m][v]);
}

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, int64_t, float *, int64_t);
#define TILE_FN(M, NV, T)                                                                                          \
    static void tile_##M##_##NV##_##T(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t K, float *C, \
                                      int64_t ldc) { tile(M, NV, T, A, lda, B, ldb, K, C, ldc); }
/* plain: up to 8 rows x 32 columns; transposed: up to 4 keys x 64 dims (16 accumulators either way) */
TILE_FN(1, 1, 0) TILE_FN(2, 1, 0) TILE_FN(3, 1, 0) TILE_FN(4, 1, 0) TILE_FN(5, 1, 0) TILE_FN(6, 1, 0)
TILE_FN(7, 1, 0) TILE_FN(8, 1, 0) TILE_FN(1, 2, 0) TILE_FN(2, 2, 0) TILE_FN(3, 2, 0) TILE_FN(4, 2, 0)
TILE_FN(5, 2, 0) TILE_FN(6, 2, 0) TILE_FN(7, 2, 0) TILE_FN(8, 2, 0)
TILE_FN(1, 1, 1) TILE_FN(2, 1, 1) TILE_FN(3, 1, 1) TILE_FN(4, 1, 1) TILE_FN(1, 2, 1) TILE_FN(2, 2, 1)
TILE_FN(3, 2, 1) TILE_FN(4, 2, 1) TILE_FN(1, 3, 1) TILE_FN(2, 3, 1) TILE_FN(3, 3, 1) TILE_FN(4, 3, 1)
TILE_FN(1, 4, 1) TILE_FN(2, 4, 1) TILE_FN(3, 4, 1) TILE_FN(4, 4, 1)
static const tile_fn nn_table[2][TILE + 1] = {
    {0, tile_1_1_0, tile_2_1_0, tile_3_1_0, tile_4_1_0, tile_5_1_0, tile_6_1_0, tile_7_1_0, tile_8_1_0},
    {0, tile_1_2_0, tile_2_2_0, tile_3_2_0, tile_4_2_0, tile_5_2_0, tile_6_2_0, tile_7_2_0, tile_8_2_0}};
static const tile_fn tn_table[5][5] = {{0},
                                       {0, tile_1_1_1, tile_2_1_1, tile_3_1_1, tile_4_1_1},
                                       {0, tile_1_2_1, tile_2_2_1, tile_3_2_1, tile_4_2_1},
                                       {0, tile_1_3_1, tile_2_3_1, tile_3_3_1, tile_4_3_1},
                                       {0, tile_1_4_1, tile_2_4_1, tile_3_4_1, tile_4_4_1}};

/* C[R x N] = A[R x K] B[K x N], N a multiple of 16 (R <= TILE) */
static void nn(int R, const float *A, int64_t lda, const float *B, int64_t ldb, int64_t K, int64_t N, float *C,
               int64_t ldc) {
    int64_t c = 0;
    for (; c + 32 <= N; c += 32) nn_table[1][R](A, lda, B + c, ldb, K, C + c, ldc);
    if (c < N) nn_table[0][R](A, lda, B + c, ldb, K, C + c, ldc);
}

/* C[j][:D] += sum_{r >= first(j)} A[r][j] B[r][:D] for keys j < n, where row r (query i0 + r) sees key j only from
   r = j - i0 on: each 4-key tile starts at its first seeing row */
static void tn(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t rows, int64_t i0, int64_t n, int D,
               float *C, int64_t ldc) {
    for (int64_t j = 0; j < n; j += 4) {
        int J = n - j < 4 ? (int)(n - j) : 4;
        int64_t r0 = j - i0 > 0 ? j - i0 : 0;
        if (r0 >= rows) break;
        for (int d = 0; d < D; d += 64) {
            int NV = (D - d) / 16 < 4 ? (D - d) / 16 : 4;
            tn_table[NV][J](A + r0 * lda + j, lda, B + r0 * ldb + d, ldb, rows - r0, C + j * ldc + d, ldc);
        }
    }
}

/* the keys row tile [r, r + R) of a block starting at query i0 must score: up to its last row's diagonal, in 16s */
static inline int64_t keys_for(int64_t i0, int r, int R) { return (i0 + r + R + 15) / 16 * 16; }

/* scores[r][0..n16) = q_r . K^T for a row block, tile by tile, each tile only up to its own diagonal (rounded up) */
static void scores(const float *q, int64_t ldq, const float *KT, int64_t ldk, int D, int64_t i0, int rows, float *S,
                   int64_t lds) {
    for (int r = 0; r < rows; r += TILE) {
        int R = rows - r < TILE ? rows - r : TILE;
        nn(R, q + r * ldq, ldq, KT, ldk, D, keys_for(i0, r, R), S + r * lds, lds);
    }
}

/* the transpose of x's first n rows (row stride ld) into out (D x ldo), zero-padded to ldo columns */
static void transpose(const float *x, int64_t ld, int64_t n, int D, float *out, int64_t ldo) {
    for (int d = 0; d < D; d++) {
        float *o = out + d * ldo;
        for (int64_t t = 0; t < n; t++) o[t] = x[t * ld + d];
        for (int64_t t = n; t < ldo; t++) o[t] = 0.f;
    }
}

typedef struct {
    int64_t b, h, t; /* element strides of a (batch, head, position, dim) tensor; dim's stride is 1 */
} Strides;

static inline Strides strides(const int64_t *s) { return (Strides){s[0], s[1], s[2]}; }

static inline const float *at(const float *x, Strides s, int64_t b, int64_t h) { return x + b * s.b + h * s.h; }

static int64_t padded(int64_t T) { return (T + 15) / 16 * 16; }

/* out, lse = attention(q, k, v) for one (batch, head) */
static void forward_head(const float *q, Strides sq, const float *k, Strides sk, const float *v, Strides sv, float *o,
                         Strides so, float *lse, int64_t T, int D, float scale, float *KT, float *S) {
    int64_t T16 = padded(T);
    transpose(k, sk.t, T, D, KT, T16);
    for (int64_t i0 = 0; i0 < T; i0 += ROWS) {
        int rows = T - i0 < ROWS ? (int)(T - i0) : ROWS;
        scores(q + i0 * sq.t, sq.t, KT, T16, D, i0, rows, S, T16);
        for (int r = 0; r < rows; r++) {
            int rt = r / TILE * TILE; /* the tile's first row: P @ V reads its rows up to the tile's last key */
            int64_t i = i0 + r, n = i0 + rt + (rows - rt < TILE ? rows - rt : TILE);
            /* row i's keys 0..i in whole 16-float vectors (the scores reach that far), the ones past i at -inf;
               maxima and sums kept per lane so the loops vectorize, then reduced across the 16 lanes */
            int64_t w = (i + 16) / 16 * 16;
            float *s = S + r * T16, lane[16], top = -INFINITY, sum = 0.f;
            for (int64_t j = i + 1; j < w; j++) s[j] = -INFINITY;
            v16 most = splat(-INFINITY);
            for (int64_t j = 0; j < w; j += 16) {
                v16 x = load16(s + j) * scale;
                store16(s + j, x);
                most = larger(x, most);
            }
            for (int l = 0; l < 16; l++) top = most[l] > top ? most[l] : top;
            for (int l = 0; l < 16; l++) lane[l] = 0.f;
            for (int64_t j = 0; j < w; j += 16)
                for (int l = 0; l < 16; l++) {
                    s[j + l] = exp_(s[j + l] - top); /* 0 past i */
                    lane[l] += s[j + l];
                }
            for (int l = 0; l < 16; l++) sum += lane[l];
            float inv = 1.f / sum;
            for (int64_t j = 0; j < w; j++) s[j] *= inv;
            for (int64_t j = w; j < n; j++) s[j] = 0.f;
            lse[i] = top + logf(sum);
        }
        for (int r = 0; r < rows; r += TILE) {
            int R = rows - r < TILE ? rows - r : TILE;
            int64_t n = i0 + r + R; /* keys the tile's last row sees */
            nn(R, S + r * T16, T16, v, sv.t, n, D, o + (i0 + r) * so.t, so.t);
        }
    }
}

int lc_attention_forward(int64_t B, int64_t H, int64_t HKV, int64_t T, int D, float scale, const float *q,
                         const int64_t *sq, const float *k, const int64_t *sk, const float *v, const int64_t *sv,
                         float *o, const int64_t *so, float *lse, int nthreads) {
    if (D % 16 || D <= 0 || H % HKV) return 1;
    Strides Q = strides(sq), K = strides(sk), V = strides(sv), O = strides(so);
    int64_t T16 = padded(T), group = H / HKV;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *KT = malloc(sizeof(float) * (D * T16 + ROWS * T16));
        if (!KT) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < B * H; task++) {
            if (!KT) continue;
            int64_t b = task / H, h = task % H, g = h / group;
            forward_head(at(q, Q, b, h), Q, at(k, K, b, g), K, at(v, V, b, g), V, (float *)at(o, O, b, h), O,
                         lse + (b * H + h) * T, T, D, scale, KT, KT + D * T16);
        }
        free(KT);
    }
    return failed;
}

/* dq, dk, dv of one (batch, kv head) and its group of query heads; dk and dv are accumulated (zeroed by the caller) */
static void backward_head(int64_t b, int64_t g, int64_t group, const float *q, Strides sq, const float *k, Strides sk,
                          const float *v, Strides sv, const float *o, Strides so, const float *dout, Strides sd,
                          const float *lse, float *dq, Strides sdq, float *dk, Strides sdk, float *dv, Strides sdv,
                          int64_t H, int64_t T, int D, float scale, float *work) {
    int64_t T16 = padded(T);
    float *KT = work, *VT = KT + D * T16, *P = VT + D * T16, *dS = P + ROWS * T16, *delta = dS + ROWS * T16;
    const float *kh = at(k, sk, b, g), *vh = at(v, sv, b, g);
    float *dkh = (float *)at(dk, sdk, b, g), *dvh = (float *)at(dv, sdv, b, g);
    transpose(kh, sk.t, T, D, KT, T16);
    transpose(vh, sv.t, T, D, VT, T16);
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
        const float *qh = at(q, sq, b, h), *oh = at(o, so, b, h), *dh = at(dout, sd, b, h);
        const float *lh = lse + (b * H + h) * T;
        float *dqh = (float *)at(dq, sdq, b, h);
        for (int64_t i = 0; i < T; i++) { /* delta_i = dO_i . O_i */
            float s = 0.f;
            for (int d = 0; d < D; d++) s += dh[i * sd.t + d] * oh[i * so.t + d];
            delta[i] = s;
        }
        for (int64_t i0 = 0; i0 < T; i0 += ROWS) {
            int rows = T - i0 < ROWS ? (int)(T - i0) : ROWS;
            int64_t n = i0 + rows;
            scores(qh + i0 * sq.t, sq.t, KT, T16, D, i0, rows, P, T16);
            scores(dh + i0 * sd.t, sd.t, VT, T16, D, i0, rows, dS, T16); /* dP = dO V^T */
            for (int r = 0; r < rows; r++) {
                int64_t i = i0 + r;
                float *p = P + r * T16, *ds = dS + r * T16, l = lh[i], di = delta[i];
                for (int64_t j = 0; j <= i; j++) {
                    p[j] = exp_(p[j] * scale - l);
                    ds[j] = p[j] * (ds[j] - di) * scale;
                }
                for (int64_t j = i + 1; j < n; j++) p[j] = ds[j] = 0.f;
            }
            tn(P, T16, dh + i0 * sd.t, sd.t, rows, i0, n, D, dvh, sdv.t);  /* dV += P^T dO */
            tn(dS, T16, qh + i0 * sq.t, sq.t, rows, i0, n, D, dkh, sdk.t); /* dK += dS^T Q */
            for (int r = 0; r < rows; r += TILE) {                          /* dQ = dS K */
                int R = rows - r < TILE ? rows - r : TILE;
                nn(R, dS + r * T16, T16, kh, sk.t, i0 + r + R, D, dqh + (i0 + r) * sdq.t, sdq.t);
            }
        }
    }
}

int lc_attention_backward(int64_t B, int64_t H, int64_t HKV, int64_t T, int D, float scale, const float *q,
                          const int64_t *sq, const float *k, const int64_t *sk, const float *v, const int64_t *sv,
                          const float *o, const int64_t *so, const float *dout, const int64_t *sd, const float *lse,
                          float *dq, const int64_t *sdq, float *dk, const int64_t *sdk, float *dv, const int64_t *sdv,
                          int nthreads) {
    if (D % 16 || D <= 0 || H % HKV) return 1;
    Strides Q = strides(sq), K = strides(sk), V = strides(sv), O = strides(so), Dd = strides(sd), DQ = strides(sdq),
            DK = strides(sdk), DV = strides(sdv);
    int64_t T16 = padded(T);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *work = malloc(sizeof(float) * (2 * D * T16 + 2 * ROWS * T16 + T16));
        if (!work) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < B * HKV; task++) {
            if (!work) continue;
            int64_t b = task / HKV, g = task % HKV;
            for (int64_t t = 0; t < T; t++) { /* this task's own dk, dv rows: zeroed here, accumulated below */
                memset((float *)at(dk, DK, b, g) + t * DK.t, 0, sizeof(float) * D);
                memset((float *)at(dv, DV, b, g) + t * DV.t, 0, sizeof(float) * D);
            }
            backward_head(b, g, H / HKV, q, Q, k, K, v, V, o, O, dout, Dd, lse, dq, DQ, dk, DK, dv, DV, H, T, D,
                          scale, work);
        }
        free(work);
    }
    return failed;
}

/* out = silu(gate) * up over n contiguous floats */
void lc_swiglu_forward(const float *gate, const float *up, float *out, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < n; b += 4096) {
        int64_t e = b + 4096 < n ? b + 4096 : n;
        for (int64_t i = b; i < e; i++) out[i] = gate[i] / (1.f + exp_(-gate[i])) * up[i];
    }
}

/* d gate = grad * up * silu'(gate), d up = grad * silu(gate); silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x) */
void lc_swiglu_backward(const float *grad, const float *gate, const float *up, float *d_gate, float *d_up, int64_t n,
                        int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < n; b += 4096) {
        int64_t e = b + 4096 < n ? b + 4096 : n;
        for (int64_t i = b; i < e; i++) {
            float x = gate[i], s = 1.f / (1.f + exp_(-x));
            d_up[i] = grad[i] * x * s;
            d_gate[i] = grad[i] * up[i] * s * (1.f + x * (1.f - s));
        }
    }
}
