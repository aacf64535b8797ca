/* Sparse FFN forward for few tokens (decoding): the controller, then one pass over the chosen units.
 *
 * Registered as ops of the `sparsecc_cpu` library (built and loaded by sparsecc/ops/native.py):
 *   sparsecc_cpu::sparse_ffn_decode -> out (tokens, d_model)
 *   sparsecc_cpu::sparse_ffn_activations -> the activation names it implements
 *   sparsecc_cpu::sparse_ffn_info   -> a line saying how it was built
 * `sparsecc::sparse_ffn` calls it from its CPU implementation for fp32, few tokens
 * (sparsecc/ops/sparse_ffn/cpu.py).
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
 * act: every entry of sparsecc/ops/activations.py (relu, gelu, gelu_tanh, silu, quick_gelu, relu2).
 * OpenMP (optional): built with -fopenmp, the library links libgomp.so.1 by soname, which
 * resolves to the copy PyTorch already loaded, so it shares torch's thread pool and
 * torch.set_num_threads. No BLAS: every product is a dot or an axpy over one row.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum { ACT_RELU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_SILU = 3, ACT_QUICK_GELU = 4, ACT_RELU2 = 5 };
/* the names of sparsecc/ops/activations.py, in enum order */
const char *const ACTIVATION_NAMES[] = {"relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "relu2"};
constexpr int N_ACTIVATIONS = 6;
enum { PREFETCH_BLOCKS = 6, MAX_LOWRANK = 256 /* larger controllers take the PyTorch path */ };
/* chosen units x d_model below which one thread is faster (scattered rows are latency-bound) */
constexpr int64_t PARALLEL_MIN = 1 << 16;

static inline float dot(const float *__restrict__ a, const float *__restrict__ b, int64_t d) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
    return s;
}

static inline void axpy(float h, const float *__restrict__ w, float *__restrict__ y, int64_t d) {
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
    case ACT_SILU: return a / (1.f + expf(-a));
    case ACT_QUICK_GELU: return a / (1.f + expf(-1.702f * a));
    default: { /* ACT_RELU2 */
        const float r = a > 0.f ? a : 0.f;
        return r * r;
    }
    }
}

static inline int64_t block_argmax(const float *l, int64_t n) {
    int64_t best = 0;
    float bv = l[0];
    for (int64_t j = 1; j < n && !std::isnan(bv); ++j)
        if (l[j] > bv || std::isnan(l[j])) { bv = l[j]; best = j; }
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
void sparse_ffn_f32(int64_t tokens, int64_t d_model, int64_t d_ff, int64_t n, int64_t r,
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

int activation_code(const std::string &name) {
    for (int i = 0; i < N_ACTIVATIONS; ++i)
        if (name == ACTIVATION_NAMES[i]) return i;
    std::string known;
    for (int i = 0; i < N_ACTIVATIONS; ++i) known += std::string(i ? ", " : "") + ACTIVATION_NAMES[i];
    TORCH_CHECK(false, "sparsecc_cpu::sparse_ffn_decode: activation '", name, "' is not supported; expected one of ",
                known);
    return -1;
}

const float *ptr(const at::Tensor &t) { return t.data_ptr<float>(); }

const float *opt_ptr(const c10::optional<at::Tensor> &t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

c10::optional<at::Tensor> opt_contiguous(const c10::optional<at::Tensor> &t, const char *name, int64_t size) {
    if (!t.has_value()) return t;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == size,
                "sparsecc_cpu::sparse_ffn_decode: ", name, " must be fp32 of shape (", size, "), got ",
                t->scalar_type(), " ", t->sizes());
    return t->contiguous();
}

/* x (tokens, d_model); c1 (d_model, r); c2 (r, d_ff); w_in, w_gate, w_out_t (d_ff, d_model); all fp32. */
at::Tensor sparse_ffn_decode(const at::Tensor &x_, const at::Tensor &c1_, const at::Tensor &c2_,
                             const c10::optional<at::Tensor> &c_bias_, const at::Tensor &w_in_,
                             const c10::optional<at::Tensor> &b_in_, const c10::optional<at::Tensor> &w_gate_,
                             const c10::optional<at::Tensor> &b_gate_, const at::Tensor &w_out_t_,
                             const c10::optional<at::Tensor> &b_out_, int64_t n, c10::string_view activation) {
    const int act = activation_code(std::string(activation));
    TORCH_CHECK(x_.dim() == 2 && w_in_.dim() == 2 && c1_.dim() == 2 && c2_.dim() == 2,
                "sparsecc_cpu::sparse_ffn_decode: expected x (tokens, d_model), 2-D weights");
    const int64_t tokens = x_.size(0), d_model = x_.size(1), d_ff = w_in_.size(0), r = c1_.size(1);
    TORCH_CHECK(w_in_.size(1) == d_model && w_out_t_.sizes() == w_in_.sizes() && c1_.size(0) == d_model &&
                    c2_.size(0) == r && c2_.size(1) == d_ff && n >= 1 && d_ff % n == 0,
                "sparsecc_cpu::sparse_ffn_decode: shapes do not fit: x ", x_.sizes(), ", w_in ", w_in_.sizes(),
                ", w_out_t ", w_out_t_.sizes(), ", c1 ", c1_.sizes(), ", c2 ", c2_.sizes(), ", n ", n);
    TORCH_CHECK(r <= MAX_LOWRANK, "sparsecc_cpu::sparse_ffn_decode: d_lowrank ", r, " > ", (int)MAX_LOWRANK);
    TORCH_CHECK(!w_gate_.has_value() || w_gate_->sizes() == w_in_.sizes(),
                "sparsecc_cpu::sparse_ffn_decode: w_gate must have w_in's shape");
    for (const at::Tensor *t : {&x_, &c1_, &c2_, &w_in_, &w_out_t_})
        TORCH_CHECK(t->scalar_type() == at::kFloat, "sparsecc_cpu::sparse_ffn_decode: the kernel takes fp32, got ",
                    t->scalar_type(), " (the op runs other dtypes on its PyTorch path)");
    const at::Tensor x = x_.contiguous(), c1 = c1_.contiguous(), c2 = c2_.contiguous(), w_in = w_in_.contiguous();
    const at::Tensor w_out_t = w_out_t_.contiguous();
    c10::optional<at::Tensor> w_gate = w_gate_;
    if (w_gate.has_value()) {
        TORCH_CHECK(w_gate->scalar_type() == at::kFloat, "sparsecc_cpu::sparse_ffn_decode: w_gate must be fp32");
        w_gate = w_gate->contiguous();
    }
    const auto c_bias = opt_contiguous(c_bias_, "c_bias", d_ff), b_in = opt_contiguous(b_in_, "b_in", d_ff);
    const auto b_gate = opt_contiguous(b_gate_, "b_gate", d_ff), b_out = opt_contiguous(b_out_, "b_out", d_model);
    const int threads = (d_ff / n) * d_model >= PARALLEL_MIN ? at::get_num_threads() : 1;
    at::Tensor out = at::empty({tokens, d_model}, x.options());
    /* scratch, uninitialised (the kernel writes every entry before reading it) */
    std::unique_ptr<float[]> logits(new float[tokens * d_ff]), z(new float[threads * tokens * r]);
    std::unique_ptr<float[]> partial(new float[threads * tokens * d_model]);
    std::unique_ptr<int64_t[]> idx(new int64_t[tokens * (d_ff / n)]);
    sparse_ffn_f32(tokens, d_model, d_ff, n, r, ptr(x), ptr(c1), ptr(c2), opt_ptr(c_bias), ptr(w_in), opt_ptr(b_in),
                   opt_ptr(w_gate), opt_ptr(b_gate), ptr(w_out_t), opt_ptr(b_out), act, threads,
                   out.data_ptr<float>(), logits.get(), idx.get(), z.get(), partial.get());
    return out;
}

std::vector<std::string> sparse_ffn_activations() {
    return std::vector<std::string>(ACTIVATION_NAMES, ACTIVATION_NAMES + N_ACTIVATIONS);
}

std::string sparse_ffn_info() {
    std::string names;
    for (int i = 0; i < N_ACTIVATIONS; ++i) names += std::string(i ? "," : "") + ACTIVATION_NAMES[i];
#ifdef _OPENMP
    const std::string threads = "openmp";
#else
    const std::string threads = "one thread (built without OpenMP)";
#endif
    return "sparse_ffn fp32 decode: activations=" + names + ", max_lowrank=" + std::to_string((int)MAX_LOWRANK) +
           ", threads=" + threads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsecc_cpu, m) {
    m.def("sparse_ffn_decode(Tensor x, Tensor c1, Tensor c2, Tensor? c_bias, Tensor w_in, Tensor? b_in, "
          "Tensor? w_gate, Tensor? b_gate, Tensor w_out_t, Tensor? b_out, int n, str activation) -> Tensor");
    m.def("sparse_ffn_activations() -> str[]", &sparse_ffn_activations);
    m.def("sparse_ffn_info() -> str", &sparse_ffn_info);
}

TORCH_LIBRARY_IMPL(sparsecc_cpu, CPU, m) { m.impl("sparse_ffn_decode", &sparse_ffn_decode); }
