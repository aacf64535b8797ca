/* Sparse FFN forward for few tokens (decoding): the controller, then one pass over the chosen units.
 *
 * For each token t: logits = (x_t @ c1) @ c2 + c_bias; for each block b of n units
 * u = b*n + argmax(logits[b*n:(b+1)*n]) (first maximum; a NaN counts as the maximum, like
 * torch.argmax), then
 *     a = x_t . w_in[u] + b_in[u]          (gated: g = x_t . w_gate[u] + b_gate[u])
 *     h = act(a)                           (gated: h = act(g) * a)
 *     out_t += h * w_out_t[u]              (out_t starts at b_out)
 * w_in, w_gate, w_out_t are (d_ff, d_model) row-major, so every unit is two or
 * three contiguous rows. The rows of the next blocks are prefetched while the
 * current one is computed: scattered 4 KB rows otherwise stall on DRAM latency
 * (each row starts a new page, where hardware prefetchers stop).
 * Plain C99 so any C compiler builds it in well under a second; no PyTorch headers.
 * OpenMP (optional): built with -fopenmp, the library links libgomp.so.1 by soname, which
 * resolves to the copy PyTorch already loaded, so it shares torch's thread pool and
 * torch.set_num_threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { ACT_RELU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_SILU = 3 };
enum { PREFETCH_BLOCKS = 6, MAX_LOWRANK = 256 /* the caller checks r <= this */ };

static inline float dot(const float *restrict a, const float *restrict b, int64_t d) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
    return s;
}

static inline void axpy(float h, const float *restrict w, float *restrict y, int64_t d) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) y[i] += h * w[i];
}

static inline void prefetch_row(const float *p, int64_t d) {
    for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(p + i, 0, 0);
}

static inline float activate(float a, int act) {
    switch (act) {
    case ACT_RELU: return a > 0.f ? a : 0.f;
    case ACT_GELU: return 0.5f * a * (1.f + erff(a * 0.70710678118654752f));
    case ACT_GELU_TANH: {
        const float k = 0.79788456080286536f; /* sqrt(2 / pi) */
        return 0.5f * a * (1.f + tanhf(k * (a + 0.044715f * a * a * a)));
    }
    default: return a / (1.f + expf(-a));
    }
}

static inline int64_t block_argmax(const float *l, int64_t n) {
    int64_t best = 0;
    float bv = l[0];
    for (int64_t j = 1; j < n && !isnan(bv); ++j)
        if (l[j] > bv || isnan(l[j])) { bv = l[j]; best = j; }
    return best;
}

static inline void prefetch_unit(const float *w_in, const float *w_gate, const float *w_out_t, int64_t u,
                                 int64_t d) {
    prefetch_row(w_in + u * d, d);
    if (w_gate) prefetch_row(w_gate + u * d, d);
    prefetch_row(w_out_t + u * d, d);
}

/* One token's contribution of blocks [lo, hi) to acc (d_model), which the caller zeroed. */
static void token_blocks(int64_t d_model, const float *xt, const int64_t *it, int64_t lo, int64_t hi,
                         const float *w_in, const float *b_in, const float *w_gate, const float *b_gate,
                         const float *w_out_t, int act, float *acc) {
    for (int64_t b = lo; b < hi && b < lo + PREFETCH_BLOCKS; ++b) prefetch_unit(w_in, w_gate, w_out_t, it[b], d_model);
    for (int64_t cur = lo; cur < hi; ++cur) {
        if (cur + PREFETCH_BLOCKS < hi) prefetch_unit(w_in, w_gate, w_out_t, it[cur + PREFETCH_BLOCKS], d_model);
        const int64_t u = it[cur];
        const float a = dot(xt, w_in + u * d_model, d_model) + (b_in ? b_in[u] : 0.f);
        float h;
        if (w_gate) {
            const float g = dot(xt, w_gate + u * d_model, d_model) + (b_gate ? b_gate[u] : 0.f);
            h = activate(g, act) * a;
        } else {
            h = activate(a, act);
        }
        axpy(h, w_out_t + u * d_model, acc, d_model);
    }
}

/* Controller logits of units [lo*n, hi*n) for one token: cb + z @ c2, z (r), c2 (r, d_ff). */
static void block_logits(int64_t r, int64_t d_ff, int64_t n, const float *z, const float *c2, const float *c_bias,
                         int64_t lo, int64_t hi, float *logits) {
    const int64_t u0 = lo * n, width = (hi - lo) * n;
    for (int64_t i = 0; i < width; ++i) logits[u0 + i] = c_bias ? c_bias[u0 + i] : 0.f;
    for (int64_t j = 0; j < r; ++j) axpy(z[j], c2 + j * d_ff + u0, logits + u0, width);
}

/* The whole sparse FFN for `tokens` rows of x: controller (z = x @ c1, logits = z @ c2 + c_bias),
 * arg-max per block, then the chosen units. Scratch: logits (tokens, d_ff), idx (tokens, d_ff / n)
 * int64 (receives the chosen units), z (threads, tokens, r), partial (threads, tokens, d_model).
 * Pointers that may be NULL: b_in, b_out, w_gate, b_gate, c_bias. r <= MAX_LOWRANK.
 * threads > 1 splits the work into that many OpenMP threads: x @ c1 by input rows, everything
 * else by contiguous ranges of blocks (each thread scores, picks and applies its own blocks;
 * scattered rows are latency-bound, so a second core nearly doubles their rate). Partial sums
 * are added in thread order, so results are deterministic for a given thread count. */
void sparsecc_sparse_ffn_f32(int64_t tokens, int64_t d_model, int64_t d_ff, int64_t n, int64_t r,
                             const float *x, const float *c1, const float *c2, const float *c_bias,
                             const float *w_in, const float *b_in, const float *w_gate, const float *b_gate,
                             const float *w_out_t, const float *b_out, int act, int threads, float *out,
                             float *logits, int64_t *idx, float *z, float *partial) {
    const int64_t k = d_ff / n;
    if (threads < 1) threads = 1;
    if (threads > k) threads = (int)k;
    int team = 1; /* the threads that actually ran (1 when built without OpenMP) */
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
        const int th = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int th = 0, nth = 1;
#endif
        if (th == 0) team = nth;
        /* z partial sums over this thread's input rows */
        const int64_t i0 = th * d_model / nth, i1 = (th + 1) * d_model / nth;
        for (int64_t t = 0; t < tokens; ++t) {
            float *zt = z + (th * tokens + t) * r;
            for (int64_t j = 0; j < r; ++j) zt[j] = 0.f;
            for (int64_t i = i0; i < i1; ++i) axpy(x[t * d_model + i], c1 + i * r, zt, r);
        }
#pragma omp barrier
        const int64_t lo = th * k / nth, hi = (th + 1) * k / nth;
        float zsum[MAX_LOWRANK];
        for (int64_t t = 0; t < tokens; ++t) {
            const float *zt = z + t * r;  /* thread 0's partial; the others are added below */
            for (int64_t j = 0; j < r; ++j) {
                float s = zt[j];
                for (int o = 1; o < nth; ++o) s += z[(o * tokens + t) * r + j];
                zsum[j] = s;
            }
            float *lt = logits + t * d_ff;
            int64_t *it = idx + t * k;
            block_logits(r, d_ff, n, zsum, c2, c_bias, lo, hi, lt);
            for (int64_t b = lo; b < hi; ++b) it[b] = b * n + block_argmax(lt + b * n, n);
            float *acc = partial + (th * tokens + t) * d_model;
            for (int64_t i = 0; i < d_model; ++i) acc[i] = 0.f;
            token_blocks(d_model, x + t * d_model, it, lo, hi, w_in, b_in, w_gate, b_gate, w_out_t, act, acc);
        }
    }
    for (int64_t t = 0; t < tokens; ++t) {
        float *ot = out + t * d_model;
        for (int64_t i = 0; i < d_model; ++i) ot[i] = b_out ? b_out[i] : 0.f;
        for (int o = 0; o < team; ++o) axpy(1.f, partial + (o * tokens + t) * d_model, ot, d_model);
    }
}
