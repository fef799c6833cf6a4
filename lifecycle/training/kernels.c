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

/* C[r][c] = sum_k A[r][k] B[k][c] for R rows and NV * 16 columns: sums in registers over all k */
static inline __attribute__((always_inline)) void nn_tile(int R, int NV, const float *A, int64_t lda, const float *B,
                                                          int64_t ldb, int64_t K, float *C, int64_t ldc) {
    v16 acc[TILE][2];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (v16){0};
    for (int64_t k = 0; k < K; k++) {
        v16 b[2];
        for (int v = 0; v < NV; v++) b[v] = load16(B + k * ldb + 16 * v);
        for (int r = 0; r < R; r++) {
            v16 a = splat(A[r * lda + k]);
            for (int v = 0; v < NV; v++) acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) store16(C + r * ldc + 16 * v, acc[r][v]);
}

#define NN(R, NV)                                                                                                  \
    static void nn_##R##_##NV(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t K, float *C,         \
                              int64_t ldc) { nn_tile(R, NV, A, lda, B, ldb, K, C, ldc); }
NN(1, 1) NN(2, 1) NN(3, 1) NN(4, 1) NN(5, 1) NN(6, 1) NN(7, 1) NN(8, 1)
NN(1, 2) NN(2, 2) NN(3, 2) NN(4, 2) NN(5, 2) NN(6, 2) NN(7, 2) NN(8, 2)
typedef void (*nn_fn)(const float *, int64_t, const float *, int64_t, int64_t, float *, int64_t);
static const nn_fn nn_table[2][TILE + 1] = {
    {0, nn_1_1, nn_2_1, nn_3_1, nn_4_1, nn_5_1, nn_6_1, nn_7_1, nn_8_1},
    {0, nn_1_2, nn_2_2, nn_3_2, nn_4_2, nn_5_2, nn_6_2, nn_7_2, nn_8_2}};

/* C[R x N] = A[R x K] B[K x N], N a multiple of 16 (R <= TILE) */
static void nn(int R, const float *A, int64_t lda, const float *B, int64_t ldb, int64_t K, int64_t N, float *C,
               int64_t ldc) {
    int64_t c = 0;
    for (; c + 32 <= N; c += 32) nn_table[1][R](A, lda, B + c, ldb, K, C + c, ldc);
    if (c < N) nn_table[0][R](A, lda, B + c, ldb, K, C + c, ldc);
}

/* C[j][d] += sum_r A[r][j] B[r][d] for J keys (j) and NV * 16 dims (d), r over R rows: the transposed product */
static inline __attribute__((always_inline)) void tn_tile(int J, int NV, const float *A, int64_t lda, const float *B,
                                                          int64_t ldb, int64_t R, float *C, int64_t ldc) {
    v16 acc[4][4];
    for (int j = 0; j < J; j++)
        for (int v = 0; v < NV; v++) acc[j][v] = load16(C + j * ldc + 16 * v);
    for (int64_t r = 0; r < R; r++) {
        v16 b[4];
        for (int v = 0; v < NV; v++) b[v] = load16(B + r * ldb + 16 * v);
        for (int j = 0; j < J; j++) {
            v16 a = splat(A[r * lda + j]);
            for (int v = 0; v < NV; v++) acc[j][v] += a * b[v];
        }
    }
    for (int j = 0; j < J; j++)
        for (int v = 0; v < NV; v++) store16(C + j * ldc + 16 * v, acc[j][v]);
}

#define TN(J, NV)                                                                                                  \
    static void tn_##J##_##NV(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t R, float *C,         \
                              int64_t ldc) { tn_tile(J, NV, A, lda, B, ldb, R, C, ldc); }
TN(1, 1) TN(2, 1) TN(3, 1) TN(4, 1) TN(1, 2) TN(2, 2) TN(3, 2) TN(4, 2)
TN(1, 3) TN(2, 3) TN(3, 3) TN(4, 3) TN(1, 4) TN(2, 4) TN(3, 4) TN(4, 4)
typedef void (*tn_fn)(const float *, int64_t, const float *, int64_t, int64_t, float *, int64_t);
static const tn_fn tn_table[5][5] = {{0}, {0, tn_1_1, tn_2_1, tn_3_1, tn_4_1}, {0, tn_1_2, tn_2_2, tn_3_2, tn_4_2},
                                     {0, tn_1_3, tn_2_3, tn_3_3, tn_4_3}, {0, tn_1_4, tn_2_4, tn_3_4, tn_4_4}};

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
    Strides Q = {sq[0], sq[1], sq[2]}, K = {sk[0], sk[1], sk[2]}, V = {sv[0], sv[1], sv[2]}, O = {so[0], so[1], so[2]};
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
    Strides Q = {sq[0], sq[1], sq[2]}, K = {sk[0], sk[1], sk[2]}, V = {sv[0], sv[1], sv[2]}, O = {so[0], so[1], so[2]};
    Strides Dd = {sd[0], sd[1], sd[2]}, DQ = {sdq[0], sdq[1], sdq[2]}, DK = {sdk[0], sdk[1], sdk[2]};
    Strides DV = {sdv[0], sdv[1], sdv[2]};
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
