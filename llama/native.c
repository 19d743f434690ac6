/* One decoding step of a Llama in fp32 on the CPU, in C (see llama/native.py).

   Eager PyTorch spends most of a small model's step dispatching ~25 small ops
   per layer, and its fp32 matrix-vector product reads Meta's [out, in]
   weights below the memory bandwidth. Here the whole one-token step is one
   call: the same arithmetic as Transformer.forward (RMSNorm, fused q|k|v,
   rotary, KV cache, grouped-query attention, SwiGLU, output projection), in
   fp32, with each product split across OpenMP threads by output rows.

   Built by `pip install -e .` (setup.py, optional); loaded with ctypes after
   torch, so it shares torch's OpenMP runtime (libgomp.so.1) and thread count.
   The layout it reads is Meta's: each matrix [out, in], row-major, q|k|v and
   w1|w3 stacked by rows (Transformer.prepare_for_inference(rows=True)). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LLAMA_NATIVE_ABI 1

/* Mirrored by llama/native.py's _Model (ctypes): keep the two in step. */
typedef struct {
    int64_t dim, n_layers, n_heads, n_kv_heads, head_dim, hidden, vocab, max_seq, max_batch, rope_rows;
    double eps;
    const float *tok_embeddings;  /* [vocab, dim] */
    const float *const *attention_norm;  /* per layer: [dim] */
    const float *const *wqkv;  /* [(n_heads + 2 n_kv_heads) head_dim, dim] */
    const float *const *wo;  /* [dim, n_heads head_dim] */
    const float *const *ffn_norm;  /* [dim] */
    const float *const *w13;  /* [2 hidden, dim]: w1 rows, then w3 rows */
    const float *const *w2;  /* [dim, hidden] */
    float *const *cache_k;  /* [max_batch, n_kv_heads, max_seq, head_dim] */
    float *const *cache_v;
    const float *norm;  /* [dim] */
    const float *output;  /* [vocab, dim] */
    const float *rope;  /* [2, rope_rows, head_dim]: cos, then signed sin (-sin, sin per pair) */
} llama_model;

int64_t llama_native_abi(void) { return LLAMA_NATIVE_ABI; }

static int64_t qkv_width(const llama_model *m) { return (m->n_heads + 2 * m->n_kv_heads) * m->head_dim; }

int64_t llama_scratch_floats(const llama_model *m, int64_t batch) {
    return batch * (3 * m->dim + qkv_width(m) + m->n_heads * m->head_dim + 3 * m->hidden + m->n_heads * m->max_seq);
}

static float dot(const float *a, const float *b, int64_t n) {
    float s = 0.f;
    int64_t k = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

/* y[b, n] = sum_k x[b, k] w[n, k] for b < batch; w row-major [rows, cols].
   Rows are split across threads; each thread reads its weight rows once for
   every b (four rows at a time, which fit in the first-level cache). */
static void matvec(const float *x, const float *w, float *y, int64_t batch, int64_t rows, int64_t cols) {
    int64_t blocks = (rows + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n = 4 * blk;
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * cols;
            float *yb = y + b * rows;
#ifdef __AVX512F__
            if (n + 4 <= rows && cols % 16 == 0) {
                const float *r0 = w + n * cols, *r1 = r0 + cols, *r2 = r1 + cols, *r3 = r2 + cols;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t k = 0; k < cols; k += 16) {
                    __m512 xv = _mm512_loadu_ps(xb + k);
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + k), xv, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + k), xv, a1);
                    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + k), xv, a2);
                    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r3 + k), xv, a3);
                }
                yb[n] = _mm512_reduce_add_ps(a0);
                yb[n + 1] = _mm512_reduce_add_ps(a1);
                yb[n + 2] = _mm512_reduce_add_ps(a2);
                yb[n + 3] = _mm512_reduce_add_ps(a3);
                continue;
            }
#endif
            for (int64_t r = n; r < n + 4 && r < rows; r++) {
                const float *row = w + r * cols;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t k = 0; k < cols; k++) s += row[k] * xb[k];
                yb[r] = s;
            }
        }
    }
}

/* out = x * rsqrt(mean(x^2) + eps) * weight, per row of dim. */
static void rmsnorm(const float *x, const float *weight, float *out, int64_t batch, int64_t dim, double eps) {
    for (int64_t b = 0; b < batch; b++) {
        const float *xb = x + b * dim;
        float *ob = out + b * dim;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += xb[i] * xb[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + (float)eps);
        for (int64_t i = 0; i < dim; i++) ob[i] = (xb[i] * inv) * weight[i];
    }
}

/* Rotate each pair (v[2i], v[2i+1]) of `heads` heads by the position's angles. */
static void rotate(float *v, int64_t heads, int64_t head_dim, const float *cos, const float *signed_sin) {
    for (int64_t h = 0; h < heads; h++) {
        float *p = v + h * head_dim;
        for (int64_t i = 0; i < head_dim; i += 2) {
            float a = p[i], c = p[i + 1];
            p[i] = a * cos[i] + c * signed_sin[i];
            p[i + 1] = c * cos[i + 1] + a * signed_sin[i + 1];
        }
    }
}

/* tokens: [batch], one per row, all at position pos. logits: [batch, vocab].
   Returns 0, or -1 for a token outside the vocabulary, -2 for a batch or
   position outside the cache (nothing is computed then). */
int64_t llama_decode_step(const llama_model *m, const int64_t *tokens, int64_t batch, int64_t pos, float *logits,
                          float *scratch) {
    const int64_t dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, hidden = m->hidden;
    const int64_t qw = nh * hd, kvw = nkv * hd, qkvw = qkv_width(m), seq = m->max_seq;
    if (batch < 1 || batch > m->max_batch || pos < 0 || pos >= seq || pos >= m->rope_rows) return -2;
    for (int64_t b = 0; b < batch; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return -1;

    float *x = scratch, *xn = x + batch * dim, *tmp = xn + batch * dim, *qkv = tmp + batch * dim;
    float *att = qkv + batch * qkvw, *h13 = att + batch * qw, *g = h13 + batch * 2 * hidden, *scores = g + batch * hidden;
    const float *cos = m->rope + pos * hd, *signed_sin = m->rope + (m->rope_rows + pos) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t n_rep = nh / nkv;

    for (int64_t b = 0; b < batch; b++) memcpy(x + b * dim, m->tok_embeddings + tokens[b] * dim, dim * sizeof(float));

    for (int64_t l = 0; l < m->n_layers; l++) {
        rmsnorm(x, m->attention_norm[l], xn, batch, dim, m->eps);
        matvec(xn, m->wqkv[l], qkv, batch, qkvw, dim);
        for (int64_t b = 0; b < batch; b++) {
            float *q = qkv + b * qkvw, *k = q + qw, *v = k + kvw;
            rotate(q, nh + nkv, hd, cos, signed_sin);  /* q and k are adjacent */
            for (int64_t h = 0; h < nkv; h++) {
                int64_t at = ((b * nkv + h) * seq + pos) * hd;
                memcpy(m->cache_k[l] + at, k + h * hd, hd * sizeof(float));
                memcpy(m->cache_v[l] + at, v + h * hd, hd * sizeof(float));
            }
        }
#pragma omp parallel for schedule(static)
        for (int64_t bh = 0; bh < batch * nh; bh++) {
            int64_t b = bh / nh, h = bh % nh, kvh = h / n_rep;
            const float *q = qkv + b * qkvw + h * hd;
            const float *keys = m->cache_k[l] + (b * nkv + kvh) * seq * hd;
            const float *values = m->cache_v[l] + (b * nkv + kvh) * seq * hd;
            float *s = scores + bh * seq, *out = att + b * qw + h * hd;
            float top = -INFINITY;
            for (int64_t t = 0; t <= pos; t++) {
                s[t] = dot(q, keys + t * hd, hd) * scale;
                if (s[t] > top) top = s[t];
            }
            float total = 0.f;
            for (int64_t t = 0; t <= pos; t++) {
                s[t] = expf(s[t] - top);
                total += s[t];
            }
            for (int64_t i = 0; i < hd; i++) out[i] = 0.f;
            for (int64_t t = 0; t <= pos; t++) {
                const float p = s[t] / total, *vt = values + t * hd;
#pragma omp simd
                for (int64_t i = 0; i < hd; i++) out[i] += p * vt[i];
            }
        }
        matvec(att, m->wo[l], tmp, batch, dim, qw);
        for (int64_t i = 0; i < batch * dim; i++) x[i] += tmp[i];

        rmsnorm(x, m->ffn_norm[l], xn, batch, dim, m->eps);
        matvec(xn, m->w13[l], h13, batch, 2 * hidden, dim);
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            float *gate = h13 + b * 2 * hidden, *up = gate + hidden, *out = g + b * hidden;
            for (int64_t i = 0; i < hidden; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        }
        matvec(g, m->w2[l], tmp, batch, dim, hidden);
        for (int64_t i = 0; i < batch * dim; i++) x[i] += tmp[i];
    }
    rmsnorm(x, m->norm, xn, batch, dim, m->eps);
    matvec(xn, m->output, logits, batch, m->vocab, dim);
    return 0;
}
