/* Block-sparse attention, fp32 forward and backward, reading the kept K/V blocks in place.
 *
 * Registered as ops of the `sparsecc_cpu` library (built and loaded by sparsecc/ops/native.py):
 *   sparsecc_cpu::block_sparse_attention_forward  -> (out, logsumexp)
 *   sparsecc_cpu::block_sparse_attention_backward -> (dq, dk, dv)
 *   sparsecc_cpu::block_sparse_attention_info     -> a line saying how it was built
 * `sparsecc::block_sparse_attention` calls them from its CPU implementation for fp32 inputs
 * (sparsecc/ops/block_sparse_attention/cpu.py) with the layout already cleaned (clean_layout:
 * per query block ascending unique key blocks, none entirely above the diagonal when causal).
 *
 * Forward: one task per (batch item, head, query block); OpenMP hands them out dynamically. A task:
 *   1. scores S = scale * Q_blk K_sel^T, one BLAS sgemm per run of consecutive kept key blocks
 *      (the keys of a run are contiguous rows of K, so nothing is gathered or copied);
 *   2. -inf at keys past the causal diagonal and at padded keys;
 *   3. an exact softmax over the row (all kept keys of the row are in S at once), logsumexp;
 *   4. O = P V_sel, one sgemm per run accumulating into the output rows, then O /= row sums.
 * Rows with no allowed key get O = 0 and logsumexp = -inf.
 *
 * BLAS: the standard Fortran interface `sgemm_`, resolved when the library is loaded from PyTorch's
 * CPU library (which ATen itself calls for fp32 GEMMs: MKL on x86 wheels, OpenBLAS elsewhere).
 * ATen's own wrapper `at::native::cpublas::gemm` would be the natural call but libtorch does not
 * export it (only its brgemm / pack entry points are TORCH_API), and a Tensor-level call
 * (at::cpu::addmm_out on views) costs about 2 us per 64x64 block, +45 % on a 5 us block GEMM.
 * A torch built without BLAS fails the build below (#error) or the load (undefined sgemm_), and
 * the op keeps its PyTorch path. Threads: OpenMP, linked to the libgomp PyTorch loaded (same
 * soname), num_threads = at::get_num_threads().
 */
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#if !AT_BUILD_WITH_BLAS()
#error "this PyTorch build has no BLAS (AT_BUILD_WITH_BLAS() is 0); the op keeps its PyTorch path"
#endif

extern "C" void sgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                       const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                       const float *beta, float *c, const int *ldc);

namespace {

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
    const int32_t bits = ((int32_t)i + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -87.f ? 0.f : p * scale;
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
int forward_f32(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t bs, const float *q,
                const float *k, const float *v, const int64_t *kv_idx, const int64_t *kv_cnt, int64_t width,
                const uint8_t *kpm, float scale, int causal, int threads, float *out, float *lse) {
    const auto sgemm = sgemm_;
    const int64_t nq = (L + bs - 1) / bs, group = H / Hkv, tasks = B * H * nq;
    const int ld = (int)D;
    const float one = 1.f, zero = 0.f;
    int failed = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(bs * (width > 0 ? width : 1) * bs + 2 * bs));
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
int backward_f32(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t bs, const float *q,
                 const float *k, const float *v, const float *o, const float *dout, const float *lse,
                 const int64_t *kv_idx, const int64_t *kv_cnt, int64_t width, const uint8_t *kpm, float scale,
                 int causal, int threads, float *dq, float *dk, float *dv) {
    const auto sgemm = sgemm_;
    const int64_t nq = (L + bs - 1) / bs, group = H / Hkv, tasks = B * Hkv;
    const int ld = (int)D;
    const float one = 1.f, zero = 0.f;
    int failed = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const size_t area = (size_t)(bs * (width > 0 ? width : 1) * bs);
        float *p = (float *)malloc(sizeof(float) * (2 * area + bs)), *ds = p ? p + area : NULL, *delta = p ? p + 2 * area : NULL;
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

void check_layout(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &kv_indices,
                  const at::Tensor &kv_counts, const c10::optional<at::Tensor> &kpm, int64_t bs) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(),
                "sparsecc_cpu::block_sparse_attention: expected q (B, H, L, D), k and v (B, Hkv, S, D); got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                "sparsecc_cpu::block_sparse_attention: the kernel takes fp32 q, k, v; got ", q.scalar_type(),
                " (the op runs other dtypes on its PyTorch path)");
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0,
                "sparsecc_cpu::block_sparse_attention: k must be (B, Hkv, S, D) with H a multiple of Hkv");
    TORCH_CHECK(bs > 0, "sparsecc_cpu::block_sparse_attention: block_size must be positive, got ", bs);
    const int64_t nq = (q.size(2) + bs - 1) / bs;
    TORCH_CHECK(kv_indices.scalar_type() == at::kLong && kv_counts.scalar_type() == at::kLong &&
                    kv_indices.dim() == 2 && kv_indices.size(0) == nq && kv_counts.dim() == 1 &&
                    kv_counts.size(0) == nq,
                "sparsecc_cpu::block_sparse_attention: expected the cleaned int64 layout kv_indices [", nq,
                ", width] and kv_counts [", nq, "] (clean_layout); got ", kv_indices.sizes(), " ",
                kv_indices.scalar_type(), " and ", kv_counts.sizes(), " ", kv_counts.scalar_type());
    if (kpm.has_value())
        TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == q.size(0) &&
                        kpm->size(1) == k.size(2),
                    "sparsecc_cpu::block_sparse_attention: key_padding_mask must be bool (B, S)");
}

const uint8_t *kpm_ptr(const c10::optional<at::Tensor> &kpm) {
    return kpm.has_value() ? reinterpret_cast<const uint8_t *>(kpm->data_ptr<bool>()) : nullptr;
}

std::tuple<at::Tensor, at::Tensor> bsa_forward(const at::Tensor &q_, const at::Tensor &k_, const at::Tensor &v_,
                                               const at::Tensor &kv_indices_, const at::Tensor &kv_counts_,
                                               const c10::optional<at::Tensor> &kpm_, int64_t block_size,
                                               double scale, bool causal) {
    check_layout(q_, k_, v_, kv_indices_, kv_counts_, kpm_, block_size);
    const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
    const at::Tensor idx = kv_indices_.contiguous(), cnt = kv_counts_.contiguous();
    const c10::optional<at::Tensor> kpm = kpm_.has_value() ? c10::optional<at::Tensor>(kpm_->contiguous()) : kpm_;
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
    at::Tensor out = at::empty({B, H, L, D}, q.options()), lse = at::empty({B, H, L}, q.options());
    const int status = forward_f32(B, H, Hkv, L, S, D, block_size, q.data_ptr<float>(), k.data_ptr<float>(),
                                   v.data_ptr<float>(), idx.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), idx.size(1),
                                   kpm_ptr(kpm), (float)scale, causal, at::get_num_threads(), out.data_ptr<float>(),
                                   lse.data_ptr<float>());
    TORCH_CHECK(status == 0, "sparsecc_cpu::block_sparse_attention_forward: out of memory for the scratch scores");
    return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsa_backward(
    const at::Tensor &grad_out, const at::Tensor &q_, const at::Tensor &k_, const at::Tensor &v_,
    const at::Tensor &out_, const at::Tensor &lse_, const at::Tensor &kv_indices_, const at::Tensor &kv_counts_,
    const c10::optional<at::Tensor> &kpm_, int64_t block_size, double scale, bool causal) {
    check_layout(q_, k_, v_, kv_indices_, kv_counts_, kpm_, block_size);
    TORCH_CHECK(out_.sizes() == q_.sizes() && grad_out.sizes() == q_.sizes() && lse_.dim() == 3 &&
                    lse_.scalar_type() == at::kFloat && out_.scalar_type() == at::kFloat,
                "sparsecc_cpu::block_sparse_attention_backward: out and grad_out must be fp32 like q ", q_.sizes(),
                ", lse fp32 (B, H, L)");
    const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = out_.contiguous();
    const at::Tensor lse = lse_.contiguous(), dout = grad_out.to(at::kFloat).contiguous();
    const at::Tensor idx = kv_indices_.contiguous(), cnt = kv_counts_.contiguous();
    const c10::optional<at::Tensor> kpm = kpm_.has_value() ? c10::optional<at::Tensor>(kpm_->contiguous()) : kpm_;
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
    at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
    const int status = backward_f32(B, H, Hkv, L, S, D, block_size, q.data_ptr<float>(), k.data_ptr<float>(),
                                    v.data_ptr<float>(), o.data_ptr<float>(), dout.data_ptr<float>(),
                                    lse.data_ptr<float>(), idx.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(),
                                    idx.size(1), kpm_ptr(kpm), (float)scale, causal, at::get_num_threads(),
                                    dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>());
    TORCH_CHECK(status == 0, "sparsecc_cpu::block_sparse_attention_backward: out of memory for the scratch scores");
    return {dq, dk, dv};
}

std::string bsa_info() {
#ifdef _OPENMP
    const std::string threads = "openmp";
#else
    const std::string threads = "one thread (built without OpenMP)";
#endif
    return "block_sparse_attention fp32: blas=sgemm_, threads=" + threads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsecc_cpu, m) {
    m.def("block_sparse_attention_forward(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_counts, "
          "Tensor? key_padding_mask, int block_size, float scale, bool causal) -> (Tensor, Tensor)");
    m.def("block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
          "Tensor kv_indices, Tensor kv_counts, Tensor? key_padding_mask, int block_size, float scale, bool causal) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("block_sparse_attention_info() -> str", &bsa_info);
}

TORCH_LIBRARY_IMPL(sparsecc_cpu, CPU, m) {
    m.impl("block_sparse_attention_forward", &bsa_forward);
    m.impl("block_sparse_attention_backward", &bsa_backward);
}
