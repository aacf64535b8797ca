/* Block-sparse attention forward, fp32, reading the kept K/V blocks in place.
 *
 * One task per (batch item, head, query block); OpenMP hands them out dynamically. A task:
 *   1. scores S = scale * Q_blk K_sel^T, one BLAS sgemm per run of consecutive kept key blocks
 *      (the keys of a run are contiguous rows of K, so nothing is gathered or copied);
 *   2. -inf at keys past the causal diagonal and at padded keys;
 *   3. an exact softmax over the row (all kept keys of the row are in S at once), logsumexp;
 *   4. O = P V_sel, one sgemm per run accumulating into the output rows, then O /= row sums.
 * Rows with no allowed key get O = 0 and logsumexp = -inf.
 *
 * The layout comes cleaned by the caller: per query block, ascending unique key blocks, none
 * entirely above the diagonal when causal. BLAS is the Fortran `sgemm_` that PyTorch's CPU
 * library exports (its MKL), passed in as a pointer, so this file needs no headers or link flags.
 * Plain C99 (+ optional OpenMP: libgomp.so.1 by soname resolves to the copy PyTorch loaded).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

/* exp(x) for x <= 0 (x - row max), relative error ~2e-7; exactly 0 below -87 and for -inf.
 * Branch-free so that the softmax loop vectorises (libm's expf does not without -ffast-math). */
static inline float exp_nonpositive(float x) {
    const float t = (x < -87.f ? -87.f : x) * 1.44269504088896341f; /* log2(e) */
    const float i = rintf(t), f = t - i;                             /* f in [-0.5, 0.5] */
    float p = 1.535336188319500e-4f;                                 /* 2^f, Cephes exp2f */
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)i + 127) << 23};
    return x < -87.f ? 0.f : p * scale.f;
}

/* The run of consecutive kept blocks starting at entry j of a row's ascending blocks: returns its
 * length in blocks; *k0 = its first key, *c = its number of keys (the last block may be partial). */
static inline int64_t block_run(const int64_t *blocks, int64_t j, int64_t m, int64_t bs, int64_t S, int64_t *k0,
                                int64_t *c) {
    int64_t run = 1;
    while (j + run < m && blocks[j + run] == blocks[j] + run) ++run;
    *k0 = blocks[j] * bs;
    *c = S - *k0 < run * bs ? S - *k0 : run * bs;
    return run;
}

/* -inf in the scores s (rows x c, row stride ld) of keys k0.. for queries q0..: keys after the query
 * (causal) and padded keys (keep[key] == 0, keep may be NULL). */
static void mask_run(float *s, int64_t rows, int64_t c, int64_t ld, int64_t q0, int64_t k0, int causal,
                     const uint8_t *keep) {
    const int diagonal = causal && k0 + c - 1 > q0;
    if (!diagonal && !keep) return;
    for (int64_t i = 0; i < rows; ++i) {
        float *row = s + i * ld;
        for (int64_t t = 0; t < c; ++t)
            if ((diagonal && k0 + t > q0 + i) || (keep && !keep[k0 + t])) row[t] = -INFINITY;
    }
}

/* Softmax of each of `rows` rows of s (row stride ld, n entries) in place; lse[i] = logsumexp
 * (-inf for a row with no finite score, whose probabilities become 0); inv[i] = 1 / sum (0 then). */
static void softmax_rows(float *s, int64_t rows, int64_t n, int64_t ld, float *lse, float *inv) {
    for (int64_t i = 0; i < rows; ++i) {
        float *row = s + i * ld;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t t = 0; t < n; ++t) mx = row[t] > mx ? row[t] : mx;
        if (mx == -INFINITY) {
            memset(row, 0, (size_t)n * sizeof(float));
            lse[i] = -INFINITY;
            inv[i] = 0.f;
            continue;
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
            const float e = exp_nonpositive(row[t] - mx);
            row[t] = e;
            sum += e;
        }
        lse[i] = mx + logf(sum);
        inv[i] = 1.f / sum;
    }
}

/* q (B, H, L, D), k and v (B, Hkv, S, D), out (B, H, L, D), lse (B, H, L): contiguous fp32.
 * kv_idx [nq, width] / kv_cnt [nq] int64: the cleaned layout. kpm: NULL or (B, S) bytes, 1 = a
 * real key. Returns 0, or -1 when scratch memory could not be allocated (out is then incomplete). */
int sparsecc_bsa_forward_f32(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t bs,
                             const float *q, const float *k, const float *v, const int64_t *kv_idx,
                             const int64_t *kv_cnt, int64_t width, const uint8_t *kpm, float scale, int causal,
                             int threads, void *sgemm_ptr, float *out, float *lse) {
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t nq = (L + bs - 1) / bs, group = H / Hkv, tasks = B * H * nq;
    const int ld = (int)D;
    const float one = 1.f, zero = 0.f;
    int failed = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *s = malloc(sizeof(float) * (size_t)(bs * (width > 0 ? width : 1) * bs + 2 * bs));
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            if (s == NULL) {
                failed = 1;
                continue;
            }
            const int64_t qb = task % nq, bh = task / nq, bi = bh / H, h = bh % H;
            const int64_t q0 = qb * bs, rows = L - q0 < bs ? L - q0 : bs;
            const float *qp = q + (bh * L + q0) * D;
            const float *kp = k + (bi * Hkv + h / group) * S * D, *vp = v + (bi * Hkv + h / group) * S * D;
            const uint8_t *keep = kpm ? kpm + bi * S : NULL;
            const int64_t *blocks = kv_idx + qb * width, m = kv_cnt[qb];
            float *op = out + (bh * L + q0) * D, *lp = lse + bh * L + q0;
            int64_t cols = 0;
            for (int64_t j = 0; j < m; ++j) cols += S - blocks[j] * bs < bs ? S - blocks[j] * bs : bs;
            if (cols == 0) {
                memset(op, 0, (size_t)(rows * D) * sizeof(float));
                for (int64_t i = 0; i < rows; ++i) lp[i] = -INFINITY;
                continue;
            }
            float *inv = s + bs * width * bs;
            const int ldc = (int)cols, nrows = (int)rows;
            int64_t off = 0;
            for (int64_t j = 0, k0, c; j < m; off += c) { /* scores, one sgemm per run of consecutive blocks */
                j += block_run(blocks, j, m, bs, S, &k0, &c);
                const int nc = (int)c;
                /* column-major: S^T (keys x rows) = K_run (D x keys)^T Q^T (D x rows) */
                sgemm("T", "N", &nc, &nrows, &ld, &scale, kp + k0 * D, &ld, qp, &ld, &zero, s + off, &ldc);
                mask_run(s + off, rows, c, cols, q0, k0, causal, keep);
            }
            softmax_rows(s, rows, cols, cols, lp, inv);
            off = 0;
            for (int64_t j = 0, k0, c; j < m; off += c) { /* O = P V, accumulated run by run */
                j += block_run(blocks, j, m, bs, S, &k0, &c);
                const int nc = (int)c;
                /* column-major: O^T (D x rows) (+)= V_run^T (D x keys) P^T (keys x rows) */
                sgemm("N", "N", &ld, &nrows, &nc, &one, vp + k0 * D, &ld, s + off, &ldc, off ? &one : &zero, op,
                      &ld);
            }
            for (int64_t i = 0; i < rows; ++i) {
                float *row = op + i * D;
                const float w = inv[i];
                if (w == 0.f) {
                    memset(row, 0, (size_t)D * sizeof(float));
                    continue;
                }
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) row[d] *= w;
            }
        }
        free(s);
    }
    return failed ? -1 : 0;
}

/* Backward of the above, given its out and logsumexp: dq, dk, dv (contiguous fp32, zero on entry).
 * One task per (batch item, kv head): it owns that head's dk / dv rows (no races, deterministic)
 * and runs every query head of its group and every query block:
 *   S = scale Q K^T, P = exp(S - lse) (0 where masked or for a row with lse = -inf),
 *   dP = dO V^T, dS = P (dP - rowsum(dO * O)),
 *   dQ = scale dS K,  dK += scale dS^T Q,  dV += P^T dO,
 * each product one sgemm per run of consecutive kept blocks. Returns 0, or -1 when scratch
 * memory could not be allocated. */
int sparsecc_bsa_backward_f32(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t bs,
                              const float *q, const float *k, const float *v, const float *o, const float *dout,
                              const float *lse, const int64_t *kv_idx, const int64_t *kv_cnt, int64_t width,
                              const uint8_t *kpm, float scale, int causal, int threads, void *sgemm_ptr,
                              float *dq, float *dk, float *dv) {
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t nq = (L + bs - 1) / bs, group = H / Hkv, tasks = B * Hkv;
    const int ld = (int)D;
    const float one = 1.f, zero = 0.f;
    int failed = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const size_t area = (size_t)(bs * (width > 0 ? width : 1) * bs);
        float *p = malloc(sizeof(float) * (2 * area + bs)), *ds = p ? p + area : NULL, *delta = p ? p + 2 * area : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            if (p == NULL) {
                failed = 1;
                continue;
            }
            const int64_t bi = task / Hkv, kvh = task % Hkv;
            const float *kp = k + (bi * Hkv + kvh) * S * D, *vp = v + (bi * Hkv + kvh) * S * D;
            float *dkp = dk + (bi * Hkv + kvh) * S * D, *dvp = dv + (bi * Hkv + kvh) * S * D;
            const uint8_t *keep = kpm ? kpm + bi * S : NULL;
            for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
                const int64_t bh = bi * H + h;
                for (int64_t qb = 0; qb < nq; ++qb) {
                    const int64_t q0 = qb * bs, rows = L - q0 < bs ? L - q0 : bs;
                    const int64_t *blocks = kv_idx + qb * width, m = kv_cnt[qb];
                    int64_t cols = 0;
                    for (int64_t j = 0; j < m; ++j) cols += S - blocks[j] * bs < bs ? S - blocks[j] * bs : bs;
                    if (cols == 0) continue;
                    const float *qp = q + (bh * L + q0) * D, *op = o + (bh * L + q0) * D;
                    const float *dop = dout + (bh * L + q0) * D, *lp = lse + bh * L + q0;
                    float *dqp = dq + (bh * L + q0) * D;
                    const int ldc = (int)cols, nrows = (int)rows;
                    for (int64_t i = 0; i < rows; ++i) {
                        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t d = 0; d < D; ++d) acc += dop[i * D + d] * op[i * D + d];
                        delta[i] = acc;
                    }
                    int64_t off = 0;
                    for (int64_t j = 0, k0, c; j < m; off += c) { /* S and dP = dO V^T, run by run */
                        j += block_run(blocks, j, m, bs, S, &k0, &c);
                        const int nc = (int)c;
                        sgemm("T", "N", &nc, &nrows, &ld, &scale, kp + k0 * D, &ld, qp, &ld, &zero, p + off, &ldc);
                        sgemm("T", "N", &nc, &nrows, &ld, &one, vp + k0 * D, &ld, dop, &ld, &zero, ds + off, &ldc);
                        mask_run(p + off, rows, c, cols, q0, k0, causal, keep);
                    }
                    for (int64_t i = 0; i < rows; ++i) { /* P and dS, in place */
                        float *pr = p + i * cols, *dr = ds + i * cols;
                        if (lp[i] == -INFINITY) {
                            memset(pr, 0, (size_t)cols * sizeof(float));
                            memset(dr, 0, (size_t)cols * sizeof(float));
                            continue;
                        }
                        const float l = lp[i], di = delta[i];
#pragma omp simd
                        for (int64_t t = 0; t < cols; ++t) {
                            const float e = exp_nonpositive(pr[t] - l);
                            pr[t] = e;
                            dr[t] = e * (dr[t] - di);
                        }
                    }
                    off = 0;
                    for (int64_t j = 0, k0, c; j < m; off += c) { /* dQ, dK, dV, run by run */
                        j += block_run(blocks, j, m, bs, S, &k0, &c);
                        const int nc = (int)c;
                        /* dQ^T (D x rows) (+)= K_run^T (D x keys) dS^T (keys x rows) */
                        sgemm("N", "N", &ld, &nrows, &nc, &scale, kp + k0 * D, &ld, ds + off, &ldc, off ? &one : &zero,
                              dqp, &ld);
                        /* dK_run^T (D x keys) += Q^T (D x rows) dS (rows x keys) */
                        sgemm("N", "T", &ld, &nc, &nrows, &scale, qp, &ld, ds + off, &ldc, &one, dkp + k0 * D, &ld);
                        /* dV_run^T (D x keys) += dO^T (D x rows) P (rows x keys) */
                        sgemm("N", "T", &ld, &nc, &nrows, &one, dop, &ld, p + off, &ldc, &one, dvp + k0 * D, &ld);
                    }
                }
            }
        }
        free(p);
    }
    return failed ? -1 : 0;
}
