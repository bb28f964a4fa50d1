/* forkpop's native CPU kernel: one variant's whole lifetime of online SGD on a chain of
 * Linear layers and element-wise activations, softmax cross-entropy at the end.
 *
 * Built on demand by workers/native.py (cc -O3 -march=native, no -ffast-math: NaN and
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

/* Train one variant for `steps` steps; its mini-batch at step t is table row off + t % nb
 * (cnt[row] real samples). `flat` holds its parameters in torch's layout (per layer weight
 * [out][in] then bias [out]) and receives the weights after learning, or, for a variant
 * stopped at step t, the weights from before step t. Per step t it writes the mean loss
 * loss_out[t] and the correct count hit_out[t] (the label's logit is the largest).
 *
 * Returns -1 when every step was taken, the step a variant was stopped at (a non-finite
 * first loss, or a later loss that is not <= exploded * max(first loss, 1e-3)), or -2 when
 * memory ran out. */
int64_t fp_train_variant(int L, const int32_t *dims, const int32_t *acts, float slope, const int32_t *has_bias,
                         float *flat, const float *xpool, const int64_t *ypool, const int64_t *table,
                         const int64_t *cnt, int32_t bsz, int64_t off, int64_t nb, int64_t steps, float lr, float mom,
                         float wd, float clip, float exploded, float *loss_out, int32_t *hit_out) {
    if (L < 1 || L > MAXL) return -2;
    int in_p[MAXL], out_p[MAXL];
    size_t w_off[MAXL], b_off[MAXL], total = 0;
    int widest = dims[0];
    for (int l = 0; l < L; l++) {
        in_p[l] = l == 0 ? dims[0] : out_p[l - 1];
        out_p[l] = pad8(dims[l + 1]);
        w_off[l] = total;
        total += (size_t)in_p[l] * out_p[l];
        b_off[l] = total;
        total += out_p[l];
        if (out_p[l] > widest) widest = out_p[l];
    }
    const int n_cls = dims[L];
    float *P = zalloc(total), *G = zalloc(total), *Mo = zalloc(total);
    float *act[MAXL + 1] = {0};
    int ok = P && G && Mo;
    act[0] = zalloc((size_t)bsz * dims[0]);
    ok = ok && act[0];
    for (int l = 0; l < L; l++) {
        act[l + 1] = zalloc((size_t)bsz * out_p[l]);
        ok = ok && act[l + 1];
    }
    float *dz = zalloc((size_t)bsz * widest), *da = zalloc((size_t)bsz * widest);
    float *wt = zalloc((size_t)widest * widest);
    ok = ok && dz && da && wt;
    int64_t death = -1;
    if (!ok) {
        death = -2;
        goto done;
    }
    /* torch layout -> transposed, padded */
    {
        const float *src = flat;
        for (int l = 0; l < L; l++) {
            int o = dims[l + 1], i = dims[l];
            float *W = P + w_off[l];
            for (int r = 0; r < o; r++)
                for (int c = 0; c < i; c++) W[(size_t)c * out_p[l] + r] = src[(size_t)r * i + c];
            src += (size_t)o * i;
            if (has_bias[l]) {
                memcpy(P + b_off[l], src, sizeof(float) * o);
                src += o;
            }
        }
    }
    float thr = INFINITY;
    for (int64_t t = 0; t < steps; t++) {
        int64_t row = off + t % nb;
        int c = (int)cnt[row];
        const int64_t *idx = table + row * bsz;
        for (int r = 0; r < c; r++) memcpy(act[0] + (size_t)r * dims[0], xpool + idx[r] * dims[0], sizeof(float) * dims[0]);
        /* forward */
        for (int l = 0; l < L; l++) {
            float *z = act[l + 1];
            const float *b = P + b_off[l];
            for (int r = 0; r < c; r++) memcpy(z + (size_t)r * out_p[l], b, sizeof(float) * out_p[l]);
            const int lda = l == 0 ? dims[0] : out_p[l - 1];
            gemm(c, out_p[l], in_p[l], act[l], lda, 1, P + w_off[l], out_p[l], z, out_p[l], 1);
            if (l < L - 1) {
                act_forward(acts[l], slope, z, c * out_p[l]);
                if (out_p[l] != dims[l + 1])
                    for (int r = 0; r < c; r++) memset(z + (size_t)r * out_p[l] + dims[l + 1], 0, sizeof(float) * (out_p[l] - dims[l + 1]));
            }
        }
        /* softmax cross-entropy, its gradient into dz (rows of out_p[L-1], padding 0) */
        const int op = out_p[L - 1];
        const float *zl = act[L];
        double loss_sum = 0.0;
        int hits = 0;
        const float inv = 1.f / (float)c;
        for (int r = 0; r < c; r++) {
            const float *z = zl + (size_t)r * op;
            int y = (int)ypool[idx[r]];
            float m = z[0];
            for (int j = 1; j < n_cls; j++) m = z[j] > m ? z[j] : m;
            float *d = dz + (size_t)r * op;
            float s = 0.f;
            for (int j = 0; j < n_cls; j++) s += d[j] = expf(z[j] - m);
            loss_sum += (double)(m + logf(s) - z[y]);
            hits += z[y] >= m;
            const float q = inv / s;
            for (int j = 0; j < n_cls; j++) d[j] *= q;
            for (int j = n_cls; j < op; j++) d[j] = 0.f;
            d[y] -= inv;
        }
        float loss = (float)(loss_sum / c);
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
        /* backward */
        for (int l = L - 1; l >= 0; l--) {
            const int ip = in_p[l], o = out_p[l];
            const float *a = act[l];
            /* weight gradient: a^T (ip x c) times dz (c x o) */
            gemm(ip, o, c, a, 1, ip, dz, o, G + w_off[l], o, 0);
            float *gb = G + b_off[l];
            if (has_bias[l]) {
                memcpy(gb, dz, sizeof(float) * o);
                for (int r = 1; r < c; r++)
                    for (int j = 0; j < o; j++) gb[j] += dz[(size_t)r * o + j];
            }
            if (l > 0) {
                /* da (c x ip) = dz (c x o) times W (o x ip), W the transposed WT */
                const float *W = P + w_off[l];
                for (int j = 0; j < o; j++)
                    for (int k = 0; k < ip; k++) wt[(size_t)j * ip + k] = W[(size_t)k * o + j];
                gemm(c, ip, o, dz, o, 1, wt, ip, da, ip, 0);
                act_backward(acts[l - 1], slope, da, act[l], c * ip);
                float *tmp = dz;
                dz = da;
                da = tmp;
            }
        }
        /* SGD: g <- coef * g + wd * p; m <- mom * m + g; p <- p - lr * m */
        float coef = 1.f;
        if (clip > 0.f) {
            double sq = 0.0;
            for (size_t i = 0; i < total; i++) sq += (double)G[i] * G[i];
            float norm = (float)sqrt(sq);
            coef = clip / (norm + 1e-6f);
            if (coef > 1.f) coef = 1.f;
        }
        for (size_t i = 0; i < total; i++) {
            float g = G[i] * coef + wd * P[i];
            Mo[i] = mom * Mo[i] + g;
            P[i] -= lr * Mo[i];
        }
    }
    /* back to torch's layout */
    {
        float *dst = flat;
        for (int l = 0; l < L; l++) {
            int o = dims[l + 1], i = dims[l];
            const float *W = P + w_off[l];
            for (int r = 0; r < o; r++)
                for (int cc = 0; cc < i; cc++) dst[(size_t)r * i + cc] = W[(size_t)cc * out_p[l] + r];
            dst += (size_t)o * i;
            if (has_bias[l]) {
                memcpy(dst, P + b_off[l], sizeof(float) * o);
                dst += o;
            }
        }
    }
done:
    free(P), free(G), free(Mo), free(dz), free(da), free(wt);
    for (int l = 0; l <= L; l++) free(act[l]);
    return death;
}
