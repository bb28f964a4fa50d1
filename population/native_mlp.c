/* forkpop's native CPU kernel: one variant's whole lifetime of online SGD on a chain of
 * Linear layers and element-wise activations, softmax cross-entropy at the end.
 *
 * Built on demand by population/native.py (cc -O3 -march=native, no -ffast-math: NaN and
 * infinity must stay visible) and called through ctypes, which lets go of the GIL, so
 * Python threads train variants side by side. A variant's weights, gradients, momentum and
 * activations (about 120 kB for the digits MLP) stay in the core's L2 cache for its whole
 * lifetime: the step is its matrix products plus one fused pass of the optimizer.
 *
 * Inside, a layer's weight is kept transposed, WT[in][out_p] with out_p rounded up to a
 * multiple of 8 (the padding stays 0), so that every product is C = A B with B's and C's rows
 * contiguous and vector-wide. Arithmetic is plain IEEE float (products contracted to FMA).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));

#define MAXL 16
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_TANH = 2, ACT_SIGMOID = 3, ACT_LEAKY = 4 };

static inline v8 ld(const float *p) { return *(const v8 *)p; }
static inline void st(float *p, v8 v) { *(v8 *)p = v; }
static inline v8 bc(float a) { return (v8){a, a, a, a, a, a, a, a}; }

/* C[R x 16] (+)= A[R x K] B[K x 16], for R = 1..6 known at the call (inlined and unrolled);
 * A's element (r, k) is A[r * ars + k * aks], so A may be a transposed view. */
static inline __attribute__((always_inline)) void tile16(int R, int K, const float *A, int ars, int aks,
                                                         const float *B, int ldb, float *C, int ldc, int acc) {
    v8 c[6][2];
    for (int r = 0; r < R; r++) {
        c[r][0] = acc ? ld(C + r * ldc) : bc(0.f);
        c[r][1] = acc ? ld(C + r * ldc + 8) : bc(0.f);
    }
    for (int k = 0; k < K; k++) {
        v8 b0 = ld(B + k * ldb), b1 = ld(B + k * ldb + 8);
        for (int r = 0; r < R; r++) {
            v8 a = bc(A[r * ars + k * aks]);
            c[r][0] += a * b0;
            c[r][1] += a * b1;
        }
    }
    for (int r = 0; r < R; r++) {
        st(C + r * ldc, c[r][0]);
        st(C + r * ldc + 8, c[r][1]);
    }
}

static inline __attribute__((always_inline)) void tile8(int R, int K, const float *A, int ars, int aks,
                                                        const float *B, int ldb, float *C, int ldc, int acc) {
    v8 c[6];
    for (int r = 0; r < R; r++) c[r] = acc ? ld(C + r * ldc) : bc(0.f);
    for (int k = 0; k < K; k++) {
        v8 b0 = ld(B + k * ldb);
        for (int r = 0; r < R; r++) c[r] += bc(A[r * ars + k * aks]) * b0;
    }
    for (int r = 0; r < R; r++) st(C + r * ldc, c[r]);
}

#define ROWS(R)                                                                          \
    do {                                                                                 \
        int j = 0;                                                                       \
        for (; j + 16 <= N; j += 16) tile16(R, K, A + i * ars, ars, aks, B + j, ldb, C + i * ldc + j, ldc, acc); \
        for (; j < N; j += 8) tile8(R, K, A + i * ars, ars, aks, B + j, ldb, C + i * ldc + j, ldc, acc);         \
    } while (0)

/* C[M x N] (+)= A[M x K] B[K x N]; B and C row-major, N a multiple of 8; A's element (i, k)
 * at A[i * ars + k * aks]. */
static void gemm(int M, int N, int K, const float *A, int ars, int aks, const float *B, int ldb, float *C, int ldc,
                 int acc) {
    int i = 0;
    for (; i + 6 <= M; i += 6) ROWS(6);
    switch (M - i) {
    case 5: ROWS(5); break;
    case 4: ROWS(4); break;
    case 3: ROWS(3); break;
    case 2: ROWS(2); break;
    case 1: ROWS(1); break;
    default: break;
    }
}

static inline int pad8(int n) { return (n + 7) & ~7; }

static void *zalloc(size_t n_floats) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (n_floats ? n_floats : 1) * sizeof(float)) != 0) return NULL;
    memset(p, 0, (n_floats ? n_floats : 1) * sizeof(float));
    return p;
}

static void act_forward(int act, float slope, float *a, int n) {
    switch (act) {
    case ACT_RELU: for (int i = 0; i < n; i++) a[i] = a[i] > 0.f ? a[i] : 0.f; break;
    case ACT_TANH: for (int i = 0; i < n; i++) a[i] = tanhf(a[i]); break;
    case ACT_SIGMOID: for (int i = 0; i < n; i++) a[i] = 1.f / (1.f + expf(-a[i])); break;
    case ACT_LEAKY: for (int i = 0; i < n; i++) a[i] = a[i] > 0.f ? a[i] : a[i] * slope; break;
    default: break;
    }
}

/* d <- d * act'(from the activation's output out) */
static void act_backward(int act, float slope, float *d, const float *out, int n) {
    switch (act) {
    case ACT_RELU: for (int i = 0; i < n; i++) d[i] = out[i] > 0.f ? d[i] : 0.f; break;
    case ACT_TANH: for (int i = 0; i < n; i++) d[i] *= 1.f - out[i] * out[i]; break;
    case ACT_SIGMOID: for (int i = 0; i < n; i++) d[i] *= out[i] * (1.f - out[i]); break;
    case ACT_LEAKY: for (int i = 0; i < n; i++) d[i] = out[i] > 0.f ? d[i] : d[i] * slope; break;
    default: break;
    }
}

/* One network's layout and buffers: weights P, gradients G (both in the internal layout),
 * activations of up to `rows` samples per layer, the gradient rows dz / da and a scratch for a
 * layer's weight in [out][in] order. */
typedef struct {
    int L, rows, n_cls, widest;
    int dims[MAXL + 1], acts[MAXL], bias[MAXL], in_p[MAXL], out_p[MAXL];
    float slope;
    size_t w_off[MAXL], b_off[MAXL], total;
    float *P, *G, *act[MAXL + 1], *dz, *da, *wt;
} net;

static void net_free(net *n) {
    free(n->P), free(n->G), free(n->dz), free(n->da), free(n->wt);
    for (int l = 0; l <= n->L; l++) free(n->act[l]);
}

static int net_init(net *n, int L, const int32_t *dims, const int32_t *acts, float slope, const int32_t *has_bias,
                    int rows) {
    memset(n, 0, sizeof(*n));
    if (L < 1 || L > MAXL) return 0;
    n->L = L, n->rows = rows, n->slope = slope, n->n_cls = dims[L], n->widest = dims[0];
    for (int l = 0; l <= L; l++) n->dims[l] = dims[l];
    for (int l = 0; l < L; l++) {
        n->acts[l] = l < L - 1 ? acts[l] : ACT_NONE;
        n->bias[l] = has_bias[l];
        n->in_p[l] = l == 0 ? dims[0] : n->out_p[l - 1];
        n->out_p[l] = pad8(dims[l + 1]);
        n->w_off[l] = n->total;
        n->total += (size_t)n->in_p[l] * n->out_p[l];
        n->b_off[l] = n->total;
        n->total += n->out_p[l];
        if (n->out_p[l] > n->widest) n->widest = n->out_p[l];
    }
    int ok = (n->P = zalloc(n->total)) && (n->G = zalloc(n->total));
    ok = ok && (n->act[0] = zalloc((size_t)rows * dims[0]));
    for (int l = 0; l < L; l++) ok = ok && (n->act[l + 1] = zalloc((size_t)rows * n->out_p[l]));
    ok = ok && (n->dz = zalloc((size_t)rows * n->widest)) && (n->da = zalloc((size_t)rows * n->widest));
    ok = ok && (n->wt = zalloc((size_t)n->widest * n->widest));
    if (!ok) net_free(n);
    return ok;
}

/* torch's layout (per layer weight [out][in], then bias [out]) -> the internal one, padded */
static void net_load(net *n, const float *src) {
    for (int l = 0; l < n->L; l++) {
        int o = n->dims[l + 1], i = n->dims[l];
        float *W = n->P + n->w_off[l];
        for (int r = 0; r < o; r++)
            for (int c = 0; c < i; c++) W[(size_t)c * n->out_p[l] + r] = src[(size_t)r * i + c];
        src += (size_t)o * i;
        if (n->bias[l]) {
            memcpy(n->P + n->b_off[l], src, sizeof(float) * o);
            src += o;
        }
    }
}

static void net_store(const net *n, const float *P, float *dst) {
    for (int l = 0; l < n->L; l++) {
        int o = n->dims[l + 1], i = n->dims[l];
        const float *W = P + n->w_off[l];
        for (int r = 0; r < o; r++)
            for (int c = 0; c < i; c++) dst[(size_t)r * i + c] = W[(size_t)c * n->out_p[l] + r];
        dst += (size_t)o * i;
        if (n->bias[l]) {
            memcpy(dst, P + n->b_off[l], sizeof(float) * o);
            dst += o;
        }
    }
}

/* logits of the c input rows in act[0] into act[L] (rows of out_p[L-1], padding 0) */
static void net_forward(net *n, int c) {
    for (int l = 0; l < n->L; l++) {
        float *z = n->act[l + 1];
        const int o = n->out_p[l];
        const float *b = n->P + n->b_off[l];
        for (int r = 0; r < c; r++) memcpy(z + (size_t)r * o, b, sizeof(float) * o);
        gemm(c, o, n->in_p[l], n->act[l], n->in_p[l], 1, n->P + n->w_off[l], o, z, o, 1);
        if (l < n->L - 1) {
            act_forward(n->acts[l], n->slope, z, c * o);
            if (o != n->dims[l + 1])
                for (int r = 0; r < c; r++) memset(z + (size_t)r * o + n->dims[l + 1], 0, sizeof(float) * (o - n->dims[l + 1]));
        }
    }
}

/* G <- gradient of the loss whose gradient at the logits is in dz (c rows), after net_forward */
static void net_backward(net *n, int c) {
    for (int l = n->L - 1; l >= 0; l--) {
        const int ip = n->in_p[l], o = n->out_p[l];
        const float *a = n->act[l];
        gemm(ip, o, c, a, 1, ip, n->dz, o, n->G + n->w_off[l], o, 0); /* a^T dz */
        float *gb = n->G + n->b_off[l];
        if (n->bias[l]) {
            memcpy(gb, n->dz, sizeof(float) * o);
            for (int r = 1; r < c; r++)
                for (int j = 0; j < o; j++) gb[j] += n->dz[(size_t)r * o + j];
        }
        if (l > 0) { /* da (c x ip) = dz (c x o) W (o x ip), W the transposed WT */
            const float *W = n->P + n->w_off[l];
            for (int j = 0; j < o; j++)
                for (int k = 0; k < ip; k++) n->wt[(size_t)j * ip + k] = W[(size_t)k * o + j];
            gemm(c, ip, o, n->dz, o, 1, n->wt, ip, n->da, ip, 0);
            act_backward(n->acts[l - 1], n->slope, n->da, n->act[l], c * ip);
            float *tmp = n->dz;
            n->dz = n->da;
            n->da = tmp;
        }
    }
}

static void gather_rows(net *n, const float *x, const int64_t *idx, int c) {
    const int d = n->dims[0];
    for (int r = 0; r < c; r++) memcpy(n->act[0] + (size_t)r * d, x + idx[r] * d, sizeof(float) * d);
}

/* Train one variant for `steps` steps; its mini-batch at step t is table row off + t % nb
 * (cnt[row] real samples, labels y[sample]). `flat` holds its parameters in torch's layout
 * and receives the weights after learning, or, for a variant stopped at step t, the weights
 * from before step t. Per step t it writes the mean cross-entropy loss_out[t] and the correct
 * count hit_out[t] (the label's logit is the largest). SGD as the torch path does it:
 * g <- coef * g + wd * p (coef: the clip of the global gradient norm, 1 without);
 * m <- mom * m + g; p <- p - lr * m.
 *
 * Returns -1 when every step was taken, the step a variant was stopped at (a non-finite
 * first loss, or a later loss that is not <= exploded * max(first loss, 1e-3)), or -2 when
 * memory ran out. */
int64_t fp_train_variant(int L, const int32_t *dims, const int32_t *acts, float slope, const int32_t *has_bias,
                         float *flat, const float *xpool, const int64_t *ypool, const int64_t *table,
                         const int64_t *cnt, int32_t bsz, int64_t off, int64_t nb, int64_t steps, float lr, float mom,
                         float wd, float clip, float exploded, float *loss_out, int32_t *hit_out) {
    net n;
    if (!net_init(&n, L, dims, acts, slope, has_bias, bsz)) return -2;
    float *Mo = zalloc(n.total);
    if (!Mo) {
        net_free(&n);
        return -2;
    }
    net_load(&n, flat);
    const int n_cls = n.n_cls, op = n.out_p[L - 1];
    int64_t death = -1;
    float thr = INFINITY;
    for (int64_t t = 0; t < steps; t++) {
        const int64_t row = off + t % nb;
        const int c = (int)cnt[row];
        const int64_t *idx = table + row * bsz;
        gather_rows(&n, xpool, idx, c);
        net_forward(&n, c);
        /* softmax cross-entropy; its gradient (p - onehot) / c into dz */
        const float *zl = n.act[L];
        double loss_sum = 0.0;
        int hits = 0;
        const float inv = 1.f / (float)c;
        for (int r = 0; r < c; r++) {
            const float *z = zl + (size_t)r * op;
            float *d = n.dz + (size_t)r * op;
            const int y = (int)ypool[idx[r]];
            float m = z[0];
            for (int j = 1; j < n_cls; j++) m = z[j] > m ? z[j] : m;
            float s = 0.f;
            for (int j = 0; j < n_cls; j++) s += d[j] = expf(z[j] - m);
            loss_sum += (double)(m + logf(s) - z[y]);
            hits += z[y] >= m;
            const float q = inv / s;
            for (int j = 0; j < n_cls; j++) d[j] *= q;
            for (int j = n_cls; j < op; j++) d[j] = 0.f;
            d[y] -= inv;
        }
        const float loss = (float)(loss_sum / c);
        loss_out[t] = loss;
        hit_out[t] = hits;
        if (t == 0) {
            if (!isfinite(loss)) {
                death = 0;
                break;
            }
            thr = (loss > 1e-3f ? loss : 1e-3f) * exploded;
        } else if (!(loss <= thr)) {
            death = t;
            break;
        }
        net_backward(&n, c);
        float coef = 1.f;
        if (clip > 0.f) {
            double sq = 0.0;
            for (size_t i = 0; i < n.total; i++) sq += (double)n.G[i] * n.G[i];
            coef = clip / ((float)sqrt(sq) + 1e-6f);
            if (coef > 1.f) coef = 1.f;
        }
        float *P = n.P, *G = n.G;
        for (size_t i = 0; i < n.total; i++) {
            const float g = G[i] * coef + wd * P[i];
            Mo[i] = mom * Mo[i] + g;
            P[i] -= lr * Mo[i];
        }
    }
    net_store(&n, n.P, flat);
    free(Mo);
    net_free(&n);
    return death;
}

/* Correct predictions (first index of the largest logit) on n_probe rows, bs at a time. */
static int64_t probe_hits(net *n, const float *px, const int64_t *py, int64_t n_probe) {
    int64_t hits = 0;
    const int op = n->out_p[n->L - 1], d = n->dims[0];
    for (int64_t s = 0; s < n_probe; s += n->rows) {
        const int c = (int)(n_probe - s < n->rows ? n_probe - s : n->rows);
        memcpy(n->act[0], px + s * d, sizeof(float) * (size_t)c * d);
        net_forward(n, c);
        for (int r = 0; r < c; r++) {
            const float *z = n->act[n->L] + (size_t)r * op;
            int best = 0;
            for (int j = 1; j < n->n_cls; j++)
                if (z[j] > z[best]) best = j;
            hits += best == py[s + r];
        }
    }
    return hits;
}

/* Distil soft targets into one student: `steps` Adam steps (lr, betas 0.9 / 0.999, eps 1e-8)
 * on mini-batches idx[t * bs ...] of the transfer set x (n_x rows) with targets tgt (rows of
 * n_cls probabilities), loss KL(target || softmax(z / T)) * T^2, mean over the batch; its
 * value per step into loss_out. With eval_every > 0 the student is scored on the probe at the
 * start and every eval_every steps (and at the last): `flat` receives the best-scoring
 * weights (ties to the later), else the last. Returns 0, or -2 when memory ran out. */
int64_t fp_distill(int L, const int32_t *dims, const int32_t *acts, float slope, const int32_t *has_bias, float *flat,
                   const float *x, const float *tgt, const int64_t *idx, int64_t steps, int32_t bs, float temp,
                   float lr, const float *px, const int64_t *py, int64_t n_probe, int64_t eval_every,
                   double *loss_out) {
    net n;
    if (!net_init(&n, L, dims, acts, slope, has_bias, bs)) return -2;
    float *m = zalloc(n.total), *v = zalloc(n.total), *best = zalloc(n.total);
    if (!m || !v || !best) {
        free(m), free(v), free(best);
        net_free(&n);
        return -2;
    }
    net_load(&n, flat);
    const int n_cls = n.n_cls, op = n.out_p[L - 1];
    const int keep = eval_every > 0 && n_probe > 0;
    int64_t best_hits = -1;
    if (keep) {
        best_hits = probe_hits(&n, px, py, n_probe);
        memcpy(best, n.P, sizeof(float) * n.total);
    }
    const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, inv_t = 1.f / temp, scale = temp / (float)bs;
    for (int64_t t = 1; t <= steps; t++) {
        const int64_t *ix = idx + (t - 1) * bs;
        gather_rows(&n, x, ix, bs);
        net_forward(&n, bs);
        double kl = 0.0;
        for (int r = 0; r < bs; r++) {
            const float *z = n.act[L] + (size_t)r * op, *tr = tgt + ix[r] * n_cls;
            float *d = n.dz + (size_t)r * op;
            float mx = z[0] * inv_t;
            for (int j = 1; j < n_cls; j++) mx = z[j] * inv_t > mx ? z[j] * inv_t : mx;
            float s = 0.f;
            for (int j = 0; j < n_cls; j++) s += d[j] = expf(z[j] * inv_t - mx);
            const float lse = mx + logf(s), q = 1.f / s;
            for (int j = 0; j < n_cls; j++) {
                const float logp = z[j] * inv_t - lse;
                if (tr[j] > 0.f) kl += (double)tr[j] * ((double)logf(tr[j]) - logp);
                d[j] = (d[j] * q - tr[j]) * scale;
            }
            for (int j = n_cls; j < op; j++) d[j] = 0.f;
        }
        loss_out[t - 1] = kl * temp * temp / bs;
        net_backward(&n, bs);
        const float c1 = 1.f - powf(b1, (float)t), c2 = sqrtf(1.f - powf(b2, (float)t)), step = lr / c1;
        float *P = n.P, *G = n.G;
        for (size_t i = 0; i < n.total; i++) {
            const float g = G[i];
            m[i] += (1.f - b1) * (g - m[i]);
            v[i] = b2 * v[i] + (1.f - b2) * g * g;
            P[i] -= step * m[i] / (sqrtf(v[i]) / c2 + eps);
        }
        if (keep && (t % eval_every == 0 || t == steps)) {
            const int64_t h = probe_hits(&n, px, py, n_probe);
            if (h >= best_hits) {
                best_hits = h;
                memcpy(best, n.P, sizeof(float) * n.total);
            }
        }
    }
    net_store(&n, keep ? best : n.P, flat);
    free(m), free(v), free(best);
    net_free(&n);
    return 0;
}
