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

#define LLAMA_NATIVE_ABI 5

/* Ask for the next block of rows while this one is summed: without it the compressed products
   waited on memory (each row is short, and the hardware prefetcher follows few streams); with it
   int8 and bf16 read about twice as fast, fp32 at the 15M shape ~1.08x (benchmarks/NOTES.md). A hint: never faults, even past
   the end of the matrix. `next` is the first row after this block, `rows_ahead` rows of `stride`. */
#ifdef __AVX512F__
#define LLAMA_PREFETCH_ROWS(next, stride, rows_ahead)                                                   \
    do {                                                                                             \
        for (int64_t ahead_ = 0; ahead_ < (rows_ahead); ahead_++)                                    \
            _mm_prefetch((const char *)(next) + ahead_ * (stride), _MM_HINT_T0);                     \
    } while (0)
#endif

/* One weight matrix [rows, cols] (Meta's [out, in]) as stored. Mirrored by llama/native.py's _Matrix.
   FP32: w float [rows, cols].
   INT8: w int8 [rows, cols]; scale float [rows]: w = q * scale[row] (per output channel, symmetric).
   INT4: w uint8 records, in tiles of 16 rows (the last tile padded with zero rows): for each tile,
         for each group of `group` inputs, one record of group * 8 + 64 bytes: group / 2 * 16 bytes
         of values (byte 16 p + j: row j's value at the group's input 2 p in the low nibble, at
         2 p + 1 in the high one), then the 16 rows' scales and their offsets = zero - 8 scale, as
         fp16: w = (q - 8) * scale + zero = q * scale + offset. scale unused.
   BF16: w bf16 [rows, cols] (as uint16); only in a bf16 model (bf16 below). */
enum { LLAMA_FP32 = 0, LLAMA_INT8 = 1, LLAMA_INT4 = 2, LLAMA_BF16 = 3 };
typedef struct {
    int64_t kind, rows, cols, group;
    const void *w;
    const float *scale;
} llama_matrix;

/* Mirrored by llama/native.py's _Model (ctypes): keep the two in step.
   bf16 0: activations, embeddings, norms and KV cache in fp32. bf16 1: all of those in bf16 (as
   uint16), every value rounded to bf16 where the eager bf16 forward stores one (after each norm,
   product, rotation, attention, SiLU and sum), computed in fp32 between. */
typedef struct {
    int64_t dim, n_layers, n_heads, n_kv_heads, head_dim, hidden, vocab, max_seq, max_batch, rope_rows, bf16;
    double eps;
    const void *tok_embeddings;  /* [vocab, dim] */
    const void *const *attention_norm;  /* per layer: [dim] */
    const llama_matrix *wqkv;  /* per layer: [(n_heads + 2 n_kv_heads) head_dim, dim] */
    const llama_matrix *wo;  /* [dim, n_heads head_dim] */
    const void *const *ffn_norm;  /* [dim] */
    const llama_matrix *w13;  /* [2 hidden, dim]: w1 rows, then w3 rows */
    const llama_matrix *w2;  /* [dim, hidden] */
    void *const *cache_k;  /* [max_batch, n_kv_heads, max_seq, head_dim] */
    void *const *cache_v;
    const void *norm;  /* [dim] */
    const llama_matrix *output;  /* [vocab, dim] */
    const float *rope;  /* [2, rope_rows, head_dim]: cos, then signed sin (-sin, sin per pair) */
} llama_model;

int64_t llama_native_abi(void) { return LLAMA_NATIVE_ABI; }

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion (NaN kept a NaN). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* v, or v rounded to bf16 in a bf16 model. */
static inline float keep(int64_t bf16, float v) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

static void round_all(int64_t bf16, float *v, int64_t n) {
    if (bf16)
        for (int64_t i = 0; i < n; i++) v[i] = keep(1, v[i]);
}

/* element i of a vector stored in fp32, or in bf16 when bf16 */
static inline float load_at(int64_t bf16, const void *p, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static int64_t qkv_width(const llama_model *m) { return (m->n_heads + 2 * m->n_kv_heads) * m->head_dim; }

/* Floats of workspace `matmul` needs for `batch` rows of x with `cols` columns. */
int64_t llama_matmul_scratch_floats(int64_t batch, int64_t cols) { return batch * (cols + cols / 2 + 1); }

int64_t llama_scratch_floats(const llama_model *m, int64_t batch) {
    int64_t widest = m->hidden > m->dim ? m->hidden : m->dim;
    if (m->n_heads * m->head_dim > widest) widest = m->n_heads * m->head_dim;
    return batch * (3 * m->dim + qkv_width(m) + m->n_heads * m->head_dim + 3 * m->hidden + m->n_heads * m->max_seq) +
           llama_matmul_scratch_floats(batch, widest);
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
static void matvec_f32(const float *x, const float *w, float *y, int64_t batch, int64_t rows, int64_t cols) {
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
                    if (b == 0) LLAMA_PREFETCH_ROWS(r3 + cols + k, cols * 4, 4);
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

static void matvec_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t batch, int64_t rows,
                      int64_t cols) {
    int64_t blocks = (rows + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n = 4 * blk;
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * cols;
            float *yb = y + b * rows;
#ifdef __AVX512F__
            if (n + 4 <= rows && cols % 16 == 0) {
                const int8_t *r0 = w + n * cols, *r1 = r0 + cols, *r2 = r1 + cols, *r3 = r2 + cols;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define LLAMA_I8(r) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((r) + k))))
                for (int64_t k = 0; k < cols; k += 16) {
                    if (b == 0 && (k & 63) == 0) LLAMA_PREFETCH_ROWS(r3 + cols + k, cols, 4);
                    __m512 xv = _mm512_loadu_ps(xb + k);
                    a0 = _mm512_fmadd_ps(LLAMA_I8(r0), xv, a0);
                    a1 = _mm512_fmadd_ps(LLAMA_I8(r1), xv, a1);
                    a2 = _mm512_fmadd_ps(LLAMA_I8(r2), xv, a2);
                    a3 = _mm512_fmadd_ps(LLAMA_I8(r3), xv, a3);
                }
#undef LLAMA_I8
                yb[n] = _mm512_reduce_add_ps(a0) * scale[n];
                yb[n + 1] = _mm512_reduce_add_ps(a1) * scale[n + 1];
                yb[n + 2] = _mm512_reduce_add_ps(a2) * scale[n + 2];
                yb[n + 3] = _mm512_reduce_add_ps(a3) * scale[n + 3];
                continue;
            }
#endif
            for (int64_t r = n; r < n + 4 && r < rows; r++) {
                const int8_t *row = w + r * cols;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t k = 0; k < cols; k++) s += (float)row[k] * xb[k];
                yb[r] = s * scale[r];
            }
        }
    }
}

/* int4 in tiles of 16 rows (the layout is described at LLAMA_INT4). Each output lane of a vector
   is one row of the tile, so a group's scale and offset apply to 16 rows with one multiply-add and
   no horizontal sums; each input is broadcast once for four tiles (64 rows), which keeps the reads
   of x low where x is long (w2); a nibble becomes a float by a table lookup (vpermps reads the low
   four bits of its index, so the low nibble needs no mask). Per group:
   y += scale * sum_k q_k x_k + offset * sum_k x_k, the sums of x taken once per group (xs). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        u = sign;
    } else {  /* subnormal: normalise */
        exp = 113;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define LLAMA_I4_RECORD(group) ((group) * 8 + 64)

/* Records read ahead of the group being summed. */
#define LLAMA_I4_AHEAD 4

#ifdef __AVX512F__
/* Tiles tile .. tile + nt - 1 for one row b of x (nt a constant 1 or 4 once inlined: the arrays
   below are then registers). */
static inline __attribute__((always_inline)) void i4_tiles_avx512(const uint8_t *w, int64_t tile, const int nt,
                                                                  int64_t rows, int64_t groups, int64_t group,
                                                                  const float *xb, const float *xsb, float *yb,
                                                                  int prefetch) {
    const int64_t record = LLAMA_I4_RECORD(group), tile_bytes = groups * record, pairs = group / 2;
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[4];
    for (int i = 0; i < nt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *r[4];
        for (int i = 0; i < nt; i++) r[i] = w + (tile + i) * tile_bytes + g * record;
        if (prefetch)
            for (int64_t line = 0; line < record; line += 64)
                for (int i = 0; i < nt; i++) _mm_prefetch((const char *)r[i] + LLAMA_I4_AHEAD * record + line, _MM_HINT_T0);
        const float *xg = xb + g * group;
        __m512 even[4], odd[4];
        for (int i = 0; i < nt; i++) even[i] = odd[i] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p++) {
            const __m512 xe = _mm512_set1_ps(xg[2 * p]), xo = _mm512_set1_ps(xg[2 * p + 1]);
            for (int i = 0; i < nt; i++) {
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(r[i] + 16 * p)));
                even[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, table), xe, even[i]);
                odd[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table), xo, odd[i]);
            }
        }
        const __m512 sum = _mm512_set1_ps(xsb[g]);
        for (int i = 0; i < nt; i++) {
            const __m256i *scale_offset = (const __m256i *)(r[i] + 8 * group);
            acc[i] = _mm512_fmadd_ps(_mm512_add_ps(even[i], odd[i]), _mm512_cvtph_ps(_mm256_loadu_si256(scale_offset)),
                                     acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(scale_offset + 1)), sum, acc[i]);
        }
    }
    for (int i = 0; i < nt; i++) {
        int64_t first = (tile + i) * 16, valid = rows - first < 16 ? rows - first : 16;
        _mm512_mask_storeu_ps(yb + first, (__mmask16)((1u << valid) - 1u), acc[i]);
    }
}
#endif

/* Tiles tile .. tile + nt - 1 (nt 1 or 4) for one row b of x: y[n] for their rows below `rows`. */
static void i4_tiles(const uint8_t *w, int64_t tile, int nt, int64_t rows, int64_t groups, int64_t group,
                     const float *xb, const float *xsb, float *yb, int prefetch) {
#ifdef __AVX512F__
    if (nt == 4)
        i4_tiles_avx512(w, tile, 4, rows, groups, group, xb, xsb, yb, prefetch);
    else
        for (int i = 0; i < nt; i++) i4_tiles_avx512(w, tile + i, 1, rows, groups, group, xb, xsb, yb, prefetch);
    return;
#endif
    const int64_t record = LLAMA_I4_RECORD(group), tile_bytes = groups * record, pairs = group / 2;
    (void)prefetch;
    for (int i = 0; i < nt; i++) {
        const uint8_t *t = w + (tile + i) * tile_bytes;
        float acc[16] = {0};
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *r = t + g * record;
            const uint16_t *scale = (const uint16_t *)(r + 8 * group), *offset = scale + 16;
            const float *xg = xb + g * group;
            for (int j = 0; j < 16; j++) {
                float s = 0.f;
                for (int64_t p = 0; p < pairs; p++) {
                    uint8_t q = r[16 * p + j];
                    s += (float)(q & 15) * xg[2 * p] + (float)(q >> 4) * xg[2 * p + 1];
                }
                acc[j] += half_to_float(scale[j]) * s + half_to_float(offset[j]) * xsb[g];
            }
        }
        for (int j = 0; j < 16 && (tile + i) * 16 + j < rows; j++) yb[(tile + i) * 16 + j] = acc[j];
    }
}

static void matvec_i4(const float *x, const uint8_t *w, float *y, int64_t batch, int64_t rows, int64_t cols,
                      int64_t group, float *work) {
    const int64_t groups = cols / group, tiles = (rows + 15) / 16, blocks = tiles / 4;
    float *xs = work;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += x[b * cols + k];
            xs[b * groups + g] = s;
        }
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
        for (int64_t blk = 0; blk < blocks; blk++)
            for (int64_t b = 0; b < batch; b++)
                i4_tiles(w, 4 * blk, 4, rows, groups, group, x + b * cols, xs + b * groups, y + b * rows, b == 0);
#pragma omp for schedule(static)
        for (int64_t t = 4 * blocks; t < tiles; t++)
            for (int64_t b = 0; b < batch; b++)
                i4_tiles(w, t, 1, rows, groups, group, x + b * cols, xs + b * groups, y + b * rows, b == 0);
    }
}

/* bf16 weights and inputs (x holds values already rounded to bf16), fp32 sums, as F.linear in bf16.
   `work` takes x as bf16. */
static void matvec_bf16(const float *x, const uint16_t *w, float *y, int64_t batch, int64_t rows, int64_t cols,
                        float *work) {
    uint16_t *xb16 = (uint16_t *)work;
    for (int64_t i = 0; i < batch * cols; i++) xb16[i] = float_to_bf16(x[i]);
    int64_t blocks = (rows + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n = 4 * blk;
        for (int64_t b = 0; b < batch; b++) {
            const uint16_t *xb = xb16 + b * cols;
            float *yb = y + b * rows;
#if defined(__AVX512BF16__)
            if (n + 4 <= rows && cols % 32 == 0) {
                const uint16_t *r0 = w + n * cols, *r1 = r0 + cols, *r2 = r1 + cols, *r3 = r2 + cols;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t k = 0; k < cols; k += 32) {
                    if (b == 0) LLAMA_PREFETCH_ROWS(r3 + cols + k, cols * 2, 4);
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + k);
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r0 + k), xv);
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r1 + k), xv);
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r2 + k), xv);
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r3 + k), xv);
                }
                yb[n] = _mm512_reduce_add_ps(a0);
                yb[n + 1] = _mm512_reduce_add_ps(a1);
                yb[n + 2] = _mm512_reduce_add_ps(a2);
                yb[n + 3] = _mm512_reduce_add_ps(a3);
                continue;
            }
#endif
            for (int64_t r = n; r < n + 4 && r < rows; r++) {
                const uint16_t *row = w + r * cols;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t k = 0; k < cols; k++) s += bf16_to_float(row[k]) * bf16_to_float(xb[k]);
                yb[r] = s;
            }
        }
    }
}

/* y[b, :] = W x[b, :] for each of `batch` rows; `work`: llama_matmul_scratch_floats(batch, cols). */
static void matvec(const llama_matrix *m, const float *x, float *y, int64_t batch, float *work) {
    switch (m->kind) {
    case LLAMA_INT8: matvec_i8(x, (const int8_t *)m->w, m->scale, y, batch, m->rows, m->cols); break;
    case LLAMA_INT4: matvec_i4(x, (const uint8_t *)m->w, y, batch, m->rows, m->cols, m->group, work); break;
    case LLAMA_BF16: matvec_bf16(x, (const uint16_t *)m->w, y, batch, m->rows, m->cols, work); break;
    default: matvec_f32(x, (const float *)m->w, y, batch, m->rows, m->cols);
    }
}

/* For the eager forward (prompts) of a matrix the C step reads: y [batch, rows] = x [batch, cols] W^T. */
void llama_matmul(const llama_matrix *m, const float *x, float *y, int64_t batch, float *work) {
    matvec(m, x, y, batch, work);
}

/* out = x * rsqrt(mean(x^2) + eps) * weight, per row of dim. */
static void rmsnorm(const float *x, const void *weight, float *out, int64_t batch, int64_t dim, double eps,
                    int64_t bf16) {
    for (int64_t b = 0; b < batch; b++) {
        const float *xb = x + b * dim;
        float *ob = out + b * dim;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += xb[i] * xb[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + (float)eps);
        for (int64_t i = 0; i < dim; i++) ob[i] = keep(bf16, keep(bf16, xb[i] * inv) * load_at(bf16, weight, i));
    }
}

/* Rotate each pair (v[2i], v[2i+1]) of `heads` heads by the position's angles. */
static void rotate(float *v, int64_t heads, int64_t head_dim, const float *cos, const float *signed_sin, int64_t bf16) {
    for (int64_t h = 0; h < heads; h++) {
        float *p = v + h * head_dim;
        for (int64_t i = 0; i < head_dim; i += 2) {
            float a = p[i], c = p[i + 1];
            p[i] = keep(bf16, a * cos[i] + c * signed_sin[i]);
            p[i + 1] = keep(bf16, c * cos[i + 1] + a * signed_sin[i + 1]);
        }
    }
}

/* tokens: [batch], one per row, all at position pos. logits: [batch, vocab].
   Returns 0, or -1 for a token outside the vocabulary, -2 for a batch or
   position outside the cache (nothing is computed then). */
int64_t llama_decode_step(const llama_model *m, const int64_t *tokens, int64_t batch, int64_t pos, float *logits,
                          float *scratch) {
    const int64_t dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, hidden = m->hidden;
    const int64_t qw = nh * hd, kvw = nkv * hd, qkvw = qkv_width(m), seq = m->max_seq, bf16 = m->bf16;
    if (batch < 1 || batch > m->max_batch || pos < 0 || pos >= seq || pos >= m->rope_rows) return -2;
    for (int64_t b = 0; b < batch; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return -1;

    float *x = scratch, *xn = x + batch * dim, *tmp = xn + batch * dim, *qkv = tmp + batch * dim;
    float *att = qkv + batch * qkvw, *h13 = att + batch * qw, *g = h13 + batch * 2 * hidden, *scores = g + batch * hidden;
    float *work = scores + batch * nh * seq;
    const float *cos = m->rope + pos * hd, *signed_sin = m->rope + (m->rope_rows + pos) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t n_rep = nh / nkv;

    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < dim; i++) x[b * dim + i] = load_at(bf16, m->tok_embeddings, tokens[b] * dim + i);

    for (int64_t l = 0; l < m->n_layers; l++) {
        rmsnorm(x, m->attention_norm[l], xn, batch, dim, m->eps, bf16);
        matvec(&m->wqkv[l], xn, qkv, batch, work);
        round_all(bf16, qkv, batch * qkvw);
        for (int64_t b = 0; b < batch; b++) {
            float *q = qkv + b * qkvw, *k = q + qw, *v = k + kvw;
            rotate(q, nh + nkv, hd, cos, signed_sin, bf16);  /* q and k are adjacent */
            for (int64_t h = 0; h < nkv; h++) {
                int64_t at = ((b * nkv + h) * seq + pos) * hd;
                if (bf16) {
                    for (int64_t i = 0; i < hd; i++) {
                        ((uint16_t *)m->cache_k[l])[at + i] = float_to_bf16(k[h * hd + i]);
                        ((uint16_t *)m->cache_v[l])[at + i] = float_to_bf16(v[h * hd + i]);
                    }
                } else {
                    memcpy((float *)m->cache_k[l] + at, k + h * hd, hd * sizeof(float));
                    memcpy((float *)m->cache_v[l] + at, v + h * hd, hd * sizeof(float));
                }
            }
        }
#pragma omp parallel for schedule(static)
        for (int64_t bh = 0; bh < batch * nh; bh++) {
            int64_t b = bh / nh, h = bh % nh, kvh = h / n_rep;
            const float *q = qkv + b * qkvw + h * hd;
            const int64_t base = (b * nkv + kvh) * seq * hd;
            float *s = scores + bh * seq, *out = att + b * qw + h * hd;
            float top = -INFINITY;
            for (int64_t t = 0; t <= pos; t++) {
                if (bf16) {
                    const uint16_t *kt = (const uint16_t *)m->cache_k[l] + base + t * hd;
                    float d = 0.f;
#pragma omp simd reduction(+ : d)
                    for (int64_t i = 0; i < hd; i++) d += q[i] * bf16_to_float(kt[i]);
                    s[t] = d * scale;
                } else {
                    s[t] = dot(q, (const float *)m->cache_k[l] + base + t * hd, hd) * scale;
                }
                if (s[t] > top) top = s[t];
            }
            float total = 0.f;
            for (int64_t t = 0; t <= pos; t++) {
                s[t] = expf(s[t] - top);
                total += s[t];
            }
            for (int64_t i = 0; i < hd; i++) out[i] = 0.f;
            for (int64_t t = 0; t <= pos; t++) {
                const float p = s[t] / total;
                if (bf16) {
                    const uint16_t *vt = (const uint16_t *)m->cache_v[l] + base + t * hd;
#pragma omp simd
                    for (int64_t i = 0; i < hd; i++) out[i] += p * bf16_to_float(vt[i]);
                } else {
                    const float *vt = (const float *)m->cache_v[l] + base + t * hd;
#pragma omp simd
                    for (int64_t i = 0; i < hd; i++) out[i] += p * vt[i];
                }
            }
            round_all(bf16, out, hd);
        }
        matvec(&m->wo[l], att, tmp, batch, work);
        for (int64_t i = 0; i < batch * dim; i++) x[i] = keep(bf16, x[i] + keep(bf16, tmp[i]));

        rmsnorm(x, m->ffn_norm[l], xn, batch, dim, m->eps, bf16);
        matvec(&m->w13[l], xn, h13, batch, work);
        round_all(bf16, h13, batch * 2 * hidden);
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            float *gate = h13 + b * 2 * hidden, *up = gate + hidden, *out = g + b * hidden;
            for (int64_t i = 0; i < hidden; i++) out[i] = keep(bf16, keep(bf16, gate[i] / (1.0f + expf(-gate[i]))) * up[i]);
        }
        matvec(&m->w2[l], g, tmp, batch, work);
        for (int64_t i = 0; i < batch * dim; i++) x[i] = keep(bf16, x[i] + keep(bf16, tmp[i]));
    }
    rmsnorm(x, m->norm, xn, batch, dim, m->eps, bf16);
    matvec(m->output, xn, logits, batch, work);
    round_all(bf16, logits, batch * m->vocab);
    return 0;
}
