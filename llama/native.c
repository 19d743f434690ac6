/* One decoding step of a Llama on the CPU, in C (see llama/native.py): fp32 or bf16
   activations, with fp32, bf16, int8 or int4 weights.

   Eager PyTorch spends most of a small model's step dispatching ~25 small ops
   per layer, and its fp32 matrix-vector product reads Meta's [out, in]
   weights below the memory bandwidth. Here the whole one-token step is one
   call: the same arithmetic as Transformer.forward (RMSNorm, fused q|k|v,
   rotary, KV cache, grouped-query attention, SwiGLU, output projection), summed
   in fp32, with each product split across OpenMP threads by output rows.

   Built by `pip install -e .` (setup.py, optional); loaded with ctypes after
   torch, so it shares torch's OpenMP runtime (libgomp.so.1) and thread count.
   The layout it reads is Meta's: each matrix [out, in], row-major, q|k|v and
   w1|w3 stacked by rows (Transformer.prepare_for_inference(rows=True)).

   One build runs on every x86-64 CPU: the products and the attention (llama/native_kernels.h)
   are compiled once per instruction set, each with the target attribute of its own, and
   the fastest set the CPU can run is chosen when the library is loaded (llama_native_use
   picks another). The rest of the step is plain C for the baseline instruction set. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LLAMA_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#define LLAMA_NATIVE_ABI 12

/* Ask for the next block of rows while this one is summed: without it the compressed products
   waited on memory (each row is short, and the hardware prefetcher follows few streams); with it
   int8 and bf16 read about twice as fast, fp32 at the 15M shape ~1.08x (benchmarks/NOTES.md). A hint: never faults, even past
   the end of the matrix. `next` is the first row after this block, `rows_ahead` rows of `stride`. */
#define LLAMA_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3) /* prefetcht0 on x86 */
#define LLAMA_PREFETCH_ROWS(next, stride, rows_ahead)                                                   \
    do {                                                                                             \
        for (int64_t ahead_ = 0; ahead_ < (rows_ahead); ahead_++)                                    \
            LLAMA_PREFETCH((const char *)(next) + ahead_ * (stride));                                \
    } while (0)

/* One weight matrix [rows, cols] (Meta's [out, in]) as stored. Mirrored by llama/native.py's _Matrix.
   FP32: w float [rows, cols].
   INT8: w int8 [rows, cols]; scale float [rows]: w = q * scale[row] (per output channel, symmetric).
   INT4: w uint8 records, in tiles of 16 rows (the last tile padded with zero rows): for each tile,
         for each group of `group` inputs (a multiple of 8), one record of group * 8 + 64 bytes:
         group / 8 chunks of 64 bytes of values (in chunk c, byte 4 j + u: row j's value at the
         group's input 8 c + u in the low nibble, at 8 c + 4 + u in the high one), then the 16
         rows' scales and their offsets = zero - 8 scale, as fp16:
         w = (q - 8) * scale + zero = q * scale + offset. scale unused.
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
    return batch * (3 * m->dim + qkv_width(m) + m->n_heads * m->head_dim + 3 * m->hidden) +
           llama_matmul_scratch_floats(batch, widest);
}

/* w[n, k] of a matrix of `kind` (fp32, int8 or bf16) as a float; `row` = &w[n, 0]. */
static inline float weight_at(int kind, const void *row, int64_t k) {
    switch (kind) {
    case LLAMA_INT8: return (float)((const int8_t *)row)[k];
    case LLAMA_BF16: return bf16_to_float(((const uint16_t *)row)[k]);
    default: return ((const float *)row)[k];
    }
}

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

/* x [groups, group] quantized as int4 products take it, a group at a time: its step
   d = max |x| / 127, xq = x / d rounded to the nearest integer (ties to even; -127 .. 127), its
   sum xs in fp32, in order, and -8 times the sum of its xq (a float, exactly: an integer below
   2^24), which centres the products on q - 8 (LLAMA_INT4). A group holding a NaN or an infinity
   gets d = NaN, so that what it is multiplied into is NaN, as with x unquantized. Plain C for the
   baseline instruction set (never inlined into a variant, where the compiler could contract or
   reorder it): every variant quantizes x to the same bits. */
static __attribute__((noinline)) void quantize_x(const float *x, int64_t groups, int64_t group, int8_t *xq, float *d,
                                                 float *xs, float *centre) {
    const float round = 12582912.f; /* 1.5 2^23: v + round - round is v rounded, ties to even, for |v| < 2^22 */
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + g * group;
        float top = 0.f, sum = 0.f;
        int finite = 1;
        for (int64_t k = 0; k < group; k++) {
            const float a = fabsf(xg[k]);
            finite &= a <= 3.4028235e38f;
            top = a > top ? a : top;
            sum += xg[k];
        }
        const float inverse = top > 0.f && finite ? 127.f / top : 0.f;
        int32_t total = 0;
        for (int64_t k = 0; k < group; k++) {
            const int32_t v = (int32_t)((xg[k] * inverse + round) - round);
            xq[g * group + k] = (int8_t)v;
            total += v;
        }
        d[g] = finite ? top / 127.f : NAN;
        xs[g] = sum;
        centre[g] = (float)(-8 * total);
    }
}

/* Records read ahead of the group being summed. */
#define LLAMA_I4_AHEAD 4

/* The kernel variants. Each is llama/native_kernels.h compiled with its own instructions
   (KERNEL(matvec) is matvec_portable, matvec_avx2, ...). */
#define KERNEL(name) LLAMA_JOIN(name, LLAMA_ISA)
#define LLAMA_JOIN(name, isa) LLAMA_JOIN_(name, isa)
#define LLAMA_JOIN_(name, isa) name##_##isa

/* Plain C: what the compiler makes of the loops for the baseline instruction set. */
#define LLAMA_ISA portable
#define LLAMA_TARGET
#define LLAMA_LANES 0
#define LLAMA_I4_TILES 4
#define LLAMA_I4_ROWS 1
#include "native_kernels.h"
#undef LLAMA_ISA
#undef LLAMA_TARGET
#undef LLAMA_LANES
#undef LLAMA_I4_TILES
#undef LLAMA_I4_ROWS

#ifdef LLAMA_X86
/* AVX2 with FMA and F16C: 8 floats a vector. */
#define LLAMA_AVX2 __attribute__((target("avx2,fma,f16c")))

static inline LLAMA_AVX2 float sum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* acc + the products of the even and of the odd bf16 of each lane of w and x (a bf16 is the high
   half of its float: the even one, in the low half of the lane, is the lane shifted left 16; the
   odd one is the lane with its low half cleared). */
static inline LLAMA_AVX2 __m256 dot_pairs_avx2(__m256 acc, __m256i w, __m256i x) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)),
                          acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w, high)),
                           _mm256_castsi256_ps(_mm256_and_si256(x, high)), acc);
}

/* The first n (1 to 8) lanes of v to p. */
static inline LLAMA_AVX2 void store_first_avx2(float *p, __m256 v, int64_t n) {
    if (n == 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                            v);
}

#define LLAMA_ISA avx2
#define LLAMA_TARGET LLAMA_AVX2
#define LLAMA_LANES 8
#define LLAMA_I4_TILES 4
/* Rows of x a pass over four weight rows (native_kernels.h, rows4): fp32 and int8 three (12
   accumulators of the 16 registers), bf16 two (its products take two more registers a row of x
   and a weight row); the fastest measured (benchmarks/NOTES.md). */
#define LLAMA_BATCH_ROWS(kind) ((kind) == LLAMA_BF16 ? 2 : 3)
/* int4: two rows of x a pass over one tile (a tile is two vectors here); on a Zen 5 running these
   kernels, 1.3x-1.5x one row over four tiles from 4 rows of x on, the same at one row; with the
   integer products too, where 3 x 1 was as fast and 2 x 2 and one row a pass slower (benchmarks/NOTES.md;
   not measured on an AVX2-only CPU). */
#define LLAMA_I4_ROWS 2
#define LLAMA_I4_ROWS_TILES 1
#define vec __m256
#define veci __m256i
#define vec_zero() _mm256_setzero_ps()
#define vec_set1(f) _mm256_set1_ps(f)
#define vec_load(p) _mm256_loadu_ps(p)
#define vec_store(p, v) _mm256_storeu_ps(p, v)
#define vec_store_first(p, v, n) store_first_avx2(p, v, n)
#define vec_fmadd(a, b, c) _mm256_fmadd_ps(a, b, c) /* a b + c */
#define vec_add(a, b) _mm256_add_ps(a, b)
#define vec_sum(v) sum_avx2(v) /* of the lanes */
#define vec_load_i8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define vec_load_bf16(p) /* a bf16 is the high half of its float */                                   \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define vec_load_f16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
/* bf16 products: 16 bf16 as 8 lanes of two */
#define vec_load_pairs(p) _mm256_loadu_si256((const __m256i *)(p))
#define vec_dot_pairs(acc, w, x) dot_pairs_avx2(acc, w, x)
#define vec_mul(a, b) _mm256_mul_ps(a, b)
#define vec_from_i32(v) _mm256_cvtepi32_ps(v)
/* int4: 32 bytes (8 lanes of four), each byte two 4-bit values */
#define veci_zero() _mm256_setzero_si256()
#define veci_set1(i) _mm256_set1_epi32(i)
#define veci_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vec_i4_constants()                                                                             \
    const __m256i low4 = _mm256_set1_epi8(15);                                                        \
    const __m256i ones = _mm256_set1_epi16(1)
#define vec_low_nibbles(q) _mm256_and_si256(q, low4)
#define vec_high_nibbles(q) _mm256_and_si256(_mm256_srli_epi16(q, 4), low4)
/* part + each lane's four u8 x s8 products with lo and hi, as vpmaddubsw's sums of pairs in
   int16: a pair is at most 2 x 15 x 127 = 3810, so the eight pairs of four chunks (30480) fit;
   then vpmaddwd adds a lane's two int16 into an int32 */
#define vec_dot_u4(part, lo, hi, xlo, xhi)                                                             \
    _mm256_add_epi16(part, _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)))
#define vec_widen_u4(sum, part) _mm256_add_epi32(sum, _mm256_madd_epi16(part, ones))
#include "native_kernels.h"
#undef LLAMA_ISA
#undef LLAMA_TARGET
#undef LLAMA_LANES
#undef LLAMA_I4_TILES
#undef LLAMA_I4_ROWS
#undef LLAMA_I4_ROWS_TILES
#undef LLAMA_BATCH_ROWS
#undef vec
#undef veci
#undef vec_zero
#undef vec_set1
#undef vec_load
#undef vec_store
#undef vec_store_first
#undef vec_fmadd
#undef vec_add
#undef vec_sum
#undef vec_load_i8
#undef vec_load_bf16
#undef vec_load_f16
#undef vec_load_pairs
#undef vec_dot_pairs
#undef vec_mul
#undef vec_from_i32
#undef veci_zero
#undef veci_set1
#undef veci_load
#undef vec_i4_constants
#undef vec_low_nibbles
#undef vec_high_nibbles
#undef vec_dot_u4
#undef vec_widen_u4

/* AVX-512 (F, BW, DQ, VL: every AVX-512 CPU since Skylake-SP): 16 floats a vector. Scheduled for
   Sapphire Rapids, as -march=native built them there before: that tuning breaks vpermps's false
   dependency on its destination (a zeroing vxorps) on Golden Cove cores, which the int4 loop
   needs; on other cores a zeroing idiom costs nothing. Compiled twice: avx512bf16 differs in its
   bf16 products only, which take _mm512_dpbf16_ps (AVX512-BF16) on the same pairs. */
#define LLAMA_AVX512_ISA "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,tune=sapphirerapids"
#define LLAMA_AVX512 __attribute__((target(LLAMA_AVX512_ISA)))

/* As dot_pairs_avx2. */
static inline LLAMA_AVX512 __m512 dot_pairs_avx512(__m512 acc, __m512i w, __m512i x) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
                          acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, high)),
                           _mm512_castsi512_ps(_mm512_and_si512(x, high)), acc);
}

/* The sum of v's 16 lanes: lane i + lane i + 8, then i + 4, i + 2 and i + 1 (the tree gcc's
   _mm512_reduce_add_ps takes, written out so that sums_4x4_avx512 is held to it whatever the
   compiler). */
static inline LLAMA_AVX512 float sum_avx512(__m512 v) {
    __m256 t = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* y[j rows + i] = sum_avx512(acc[j][i]) times scale[i] (where scale is not NULL) for j, i < 4: the
   same additions, in the same tree, but 16 sums at once: each level adds the halves of two
   vectors of partial sums into one (15 additions and 30 shuffles for the 16 sums, where one at a
   time takes 4 additions and 4 shuffles each). Lane 4 j + i of the last vector is acc[j][i]'s sum. */
static inline LLAMA_AVX512 void sums_4x4_avx512(const __m512 acc[4][4], float *y, int64_t rows, const float *scale) {
    __m512 two[8], four[4], eight[2], s;
    for (int m = 0; m < 8; m++) {  /* lanes i + 8: the first 8 lanes acc[..][..] number 2 m, the last 2 m + 1 */
        const __m512 a = acc[(2 * m) % 4][(2 * m) / 4], b = acc[(2 * m + 1) % 4][(2 * m + 1) / 4];
        two[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    }
    for (int m = 0; m < 4; m++)  /* lanes i + 4: quarter q holds number 4 m + q */
        four[m] = _mm512_add_ps(_mm512_shuffle_f32x4(two[2 * m], two[2 * m + 1], 0x88),
                                _mm512_shuffle_f32x4(two[2 * m], two[2 * m + 1], 0xdd));
    for (int m = 0; m < 2; m++)  /* lanes i + 2, within each quarter */
        eight[m] = _mm512_add_ps(_mm512_shuffle_ps(four[2 * m], four[2 * m + 1], 0x44),
                                 _mm512_shuffle_ps(four[2 * m], four[2 * m + 1], 0xee));
    s = _mm512_add_ps(_mm512_shuffle_ps(eight[0], eight[1], 0x88), _mm512_shuffle_ps(eight[0], eight[1], 0xdd));
    if (scale) s = _mm512_mul_ps(s, _mm512_broadcast_f32x4(_mm_loadu_ps(scale)));
    _mm_storeu_ps(y, _mm512_extractf32x4_ps(s, 0));
    _mm_storeu_ps(y + rows, _mm512_extractf32x4_ps(s, 1));
    _mm_storeu_ps(y + 2 * rows, _mm512_extractf32x4_ps(s, 2));
    _mm_storeu_ps(y + 3 * rows, _mm512_extractf32x4_ps(s, 3));
}

#define LLAMA_LANES 16
#define LLAMA_I4_TILES 4
/* Four rows of x a pass, every kind: 16 accumulators of the 32 registers, and gcc's loops keep them
   all in registers. On a Zen 5, fp32 with five or six rows a pass took 0.94x-1.03x four's time
   at batch 4-16: within the noise, so four stays (benchmarks/NOTES.md). */
#define LLAMA_BATCH_ROWS(kind) 4
/* int4: each tile's values, split into nibbles once, serve four rows of x, over two tiles at a
   time: on a Zen 5, of 2-8 rows over 1, 2 or 4 tiles the fastest, with the float products before
   and with the integer products now (benchmarks/NOTES.md). */
#define LLAMA_I4_ROWS 4
#define LLAMA_I4_ROWS_TILES 2
#define vec __m512
#define veci __m512i
#define vec_zero() _mm512_setzero_ps()
#define vec_set1(f) _mm512_set1_ps(f)
#define vec_load(p) _mm512_loadu_ps(p)
#define vec_store(p, v) _mm512_storeu_ps(p, v)
#define vec_store_first(p, v, n) _mm512_mask_storeu_ps(p, (__mmask16)((1u << (n)) - 1u), v)
#define vec_fmadd(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vec_add(a, b) _mm512_add_ps(a, b)
#define vec_sum(v) sum_avx512(v)
#define vec_sums_4x4(acc, y, rows, scale) sums_4x4_avx512(acc, y, rows, scale)
#define vec_load_i8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define vec_load_bf16(p)                                                                                \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define vec_load_f16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define vec_load_pairs(p) _mm512_loadu_si512(p)
#define vec_mul(a, b) _mm512_mul_ps(a, b)
#define vec_from_i32(v) _mm512_cvtepi32_ps(v)
/* int4: 64 bytes (16 lanes of four), each byte two 4-bit values */
#define veci_zero() _mm512_setzero_si512()
#define veci_set1(i) _mm512_set1_epi32(i)
#define veci_load(p) _mm512_loadu_si512(p)
#define vec_i4_constants()                                                                             \
    const __m512i low4 = _mm512_set1_epi8(15);                                                        \
    const __m512i ones = _mm512_set1_epi16(1);                                                        \
    (void)ones
#define vec_low_nibbles(q) _mm512_and_si512(q, low4)
#define vec_high_nibbles(q) _mm512_and_si512(_mm512_srli_epi16(q, 4), low4)

#define LLAMA_ISA avx512
#define LLAMA_TARGET LLAMA_AVX512
#define vec_dot_pairs(acc, w, x) dot_pairs_avx512(acc, w, x)
/* as AVX2's */
#define vec_dot_u4(part, lo, hi, xlo, xhi)                                                             \
    _mm512_add_epi16(part, _mm512_add_epi16(_mm512_maddubs_epi16(lo, xlo), _mm512_maddubs_epi16(hi, xhi)))
#define vec_widen_u4(sum, part) _mm512_add_epi32(sum, _mm512_madd_epi16(part, ones))
#include "native_kernels.h"
#undef LLAMA_ISA
#undef LLAMA_TARGET
#undef vec_dot_pairs
#undef vec_dot_u4
#undef vec_widen_u4

/* The AVX-512 CPUs with BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4 and later) all have
   VNNI too, which this variant's int4 products take: vpdpbusd sums a lane's four u8 x s8 products
   into it in one instruction. */
#define LLAMA_ISA avx512bf16
#define LLAMA_TARGET __attribute__((target(LLAMA_AVX512_ISA ",avx512bf16,avx512vnni")))
#define vec_dot_pairs(acc, w, x) _mm512_dpbf16_ps(acc, (__m512bh)(w), (__m512bh)(x))
#define vec_dot_u4(part, lo, hi, xlo, xhi) _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(part, lo, xlo), hi, xhi)
#define vec_widen_u4(sum, part) _mm512_add_epi32(sum, part)
#include "native_kernels.h"

/* What this CPU (and its operating system, which must save the wider registers) can run. */
static int cpu_runs_avx2(void) {
    unsigned a, b, c, d;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __get_cpuid(1, &a, &b, &c, &d) &&
           (c & bit_F16C);
}

static int cpu_runs_avx512(void) {
    return cpu_runs_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

static int cpu_runs_avx512bf16(void) {
    return cpu_runs_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}
#endif

static int cpu_runs_anything(void) { return 1; }

typedef struct {
    const char *name;
    int (*runs_here)(void);
    void (*matvec)(const llama_matrix *m, const float *x, float *y, int64_t batch, float *work);
    void (*attend)(const float *q, const void *keys, const void *values, int64_t n, int64_t hd, float scale,
                   int64_t bf16, float *s, float *out);
} llama_kernels;

/* Fastest first. */
static const llama_kernels variants[] = {
#ifdef LLAMA_X86
    {"avx512bf16", cpu_runs_avx512bf16, matvec_avx512bf16, attend_avx512bf16},
    {"avx512", cpu_runs_avx512, matvec_avx512, attend_avx512},
    {"avx2", cpu_runs_avx2, matvec_avx2, attend_avx2},
#endif
    {"portable", cpu_runs_anything, matvec_portable, attend_portable},
};
enum { n_variants = sizeof(variants) / sizeof(variants[0]) };

static const llama_kernels *best_variant(void) {
    for (int i = 0; i < n_variants; i++)
        if (variants[i].runs_here()) return &variants[i];
    return &variants[n_variants - 1];
}

/* The variant that runs: the fastest this CPU can, until llama_native_use picks another. */
static const llama_kernels *kernels;
static char variant_names[64];

__attribute__((constructor)) static void choose_kernels(void) {
    kernels = best_variant();
    for (int i = 0; i < n_variants; i++) {
        if (i) strcat(variant_names, ",");
        strcat(variant_names, variants[i].name);
    }
}

/* The names of the variants compiled in, fastest first, comma-separated. */
const char *llama_native_variants(void) { return variant_names; }

const char *llama_native_variant(void) { return kernels->name; }

const char *llama_native_best_variant(void) { return best_variant()->name; }

/* 1 where this CPU can run the variant `name`, 0 where it cannot, -1 for a name not compiled in. */
int64_t llama_native_can_run(const char *name) {
    for (int i = 0; i < n_variants; i++)
        if (strcmp(variants[i].name, name) == 0) return variants[i].runs_here();
    return -1;
}

/* Runs the variant `name` from now on where this CPU can run it; returns llama_native_can_run(name)
   (nothing changes unless it is 1). Not while a step runs. */
int64_t llama_native_use(const char *name) {
    int64_t can = llama_native_can_run(name);
    for (int i = 0; i < n_variants && can == 1; i++)
        if (strcmp(variants[i].name, name) == 0) kernels = &variants[i];
    return can;
}

/* torch's CPU generator: an mt19937 whose state `Generator.get_state()` writes out as this
   (CPUGeneratorImplStateLegacy's start; the rest, a normal draw's cache, is left alone), each
   32-bit word of the state widened to 64 bits. A draw: if --left is 0, the state is twisted
   (left = 624, next = 0); then word `next++` is tempered and returned. */
#define LLAMA_MT_N 624
#define LLAMA_MT_M 397
typedef struct {
    uint64_t seed;
    int32_t left, seeded;
    uint64_t next;
    uint64_t state[LLAMA_MT_N];
} llama_torch_mt19937;

static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static void mt_next_state(uint32_t *s) {
    int i = 0;
    for (; i < LLAMA_MT_N - LLAMA_MT_M; i++) s[i] = s[i + LLAMA_MT_M] ^ mt_twist(s[i], s[i + 1]);
    for (; i < LLAMA_MT_N - 1; i++) s[i] = s[i + LLAMA_MT_M - LLAMA_MT_N] ^ mt_twist(s[i], s[i + 1]);
    s[LLAMA_MT_N - 1] = s[LLAMA_MT_M - 1] ^ mt_twist(s[LLAMA_MT_N - 1], s[0]);
}

/* The state (`nbytes` of get_state's bytes) moved past `outputs` 32-bit draws without making them:
   a twist every 624, nothing for the rest. Sampling skips the draws past a row's last kept token
   this way, ~9x sooner than torch's random_ makes and throws them away (llama/sampling.py checks
   it against random_ before using it). 0, or -1 for a state it does not recognise (unchanged). */
int64_t llama_mt19937_advance(void *bytes, int64_t nbytes, int64_t outputs) {
    llama_torch_mt19937 *g = bytes;
    if (nbytes < (int64_t)sizeof(*g) || outputs < 0 || g->left < 1 || g->left > LLAMA_MT_N || g->next > LLAMA_MT_N)
        return -1;
    int64_t left = g->left, next = (int64_t)g->next;
    if (outputs >= left) {
        uint32_t s[LLAMA_MT_N];
        for (int i = 0; i < LLAMA_MT_N; i++) s[i] = (uint32_t)g->state[i];
        while (outputs >= left) { /* the draw that finds --left at 0 twists, and takes word 0 */
            outputs -= left;
            mt_next_state(s);
            left = LLAMA_MT_N;
            next = 1;
        }
        for (int i = 0; i < LLAMA_MT_N; i++) g->state[i] = s[i];
    }
    g->left = (int32_t)(left - outputs);
    g->next = (uint64_t)(next + outputs);
    return 0;
}

static void matvec(const llama_matrix *m, const float *x, float *y, int64_t batch, float *work) {
    kernels->matvec(m, x, y, batch, work);
}

/* For the eager forward (prompts) of a matrix the C step reads: y [batch, rows] = x [batch, cols] W^T. */
void llama_matmul(const llama_matrix *m, const float *x, float *y, int64_t batch, float *work) {
    matvec(m, x, y, batch, work);
}

/* Rows first .. first + n - 1 of the matrix as fp32: the weights a product of many rows (a prompt)
   multiplies, made once for all its rows (llama/native.py hands them to torch's matrix product).
   int4 (first a multiple of 16): out [cols, n], the block transposed, as a tile's record holds each
   input's 16 rows in one chunk; int8: out [n, cols]. Returns 1 where out is transposed, 0 where
   not, -1 for another kind (nothing written). */
int64_t llama_dequantize(const llama_matrix *m, int64_t first, int64_t n, float *out) {
    const int64_t cols = m->cols;
    if (m->kind == LLAMA_INT4) {
        const int64_t group = m->group, groups = cols / group, record = LLAMA_I4_RECORD(group);
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < (n + 15) / 16; t++) {
            const uint8_t *tile = (const uint8_t *)m->w + (first / 16 + t) * groups * record;
            const int64_t width = n - 16 * t < 16 ? n - 16 * t : 16;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *r = tile + g * record;
                const uint16_t *scale16 = (const uint16_t *)(r + 8 * group), *offset16 = scale16 + 16;
                float s[16], o[16];
                for (int j = 0; j < 16; j++) s[j] = half_to_float(scale16[j]), o[j] = half_to_float(offset16[j]);
                for (int64_t c = 0; c < group / 8; c++)
                    for (int u = 0; u < 4; u++) {
                        float *low = out + (g * group + 8 * c + u) * n + 16 * t, *high = low + 4 * n;
                        const uint8_t *q = r + 64 * c + u;
                        for (int j = 0; j < width; j++) low[j] = (float)(q[4 * j] & 15) * s[j] + o[j];
                        for (int j = 0; j < width; j++) high[j] = (float)(q[4 * j] >> 4) * s[j] + o[j];
                    }
            }
        }
        return 1;
    }
    if (m->kind != LLAMA_INT8) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const int8_t *row = (const int8_t *)m->w + (first + i) * cols;
        const float scale = m->scale[first + i];
        float *o = out + i * cols;
        for (int64_t k = 0; k < cols; k++) o[k] = (float)row[k] * scale;
    }
    return 0;
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

/* -2 where the rows do not fit the cache as llama_forward_rows says, -1 for a token outside the
   vocabulary, else 0. one_per_cache_row: each row its own cache row, at most max_batch rows (a step
   of llama_decode_rows); else the rows of one cache row stand at rising positions (a prompt, or a
   piece of one, beside other rows). */
static int64_t check_rows(const llama_model *m, const int64_t *tokens, int64_t batch, const int64_t *positions,
                          const int64_t *cache_rows, const int64_t *logit_rows, int64_t n_logits,
                          int64_t one_per_cache_row) {
    if (batch < 1 || (one_per_cache_row && batch > m->max_batch)) return -2;
    int64_t last[m->max_batch];  /* each cache row's latest position in these rows */
    for (int64_t r = 0; r < m->max_batch; r++) last[r] = -1;
    for (int64_t b = 0; b < batch; b++) {
        if (positions[b] < 0 || positions[b] >= m->max_seq || positions[b] >= m->rope_rows) return -2;
        if (cache_rows[b] < 0 || cache_rows[b] >= m->max_batch) return -2;
        if (last[cache_rows[b]] >= (one_per_cache_row ? 0 : positions[b])) return -2;
        last[cache_rows[b]] = positions[b];
    }
    if (n_logits < 0 || n_logits > batch) return -2;
    for (int64_t i = 0; i < n_logits; i++)  /* rising row indices */
        if (logit_rows[i] < (i ? logit_rows[i - 1] + 1 : 0) || logit_rows[i] >= batch) return -2;
    for (int64_t b = 0; b < batch; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return -1;
    return 0;
}

static int64_t forward_rows(const llama_model *m, const int64_t *tokens, int64_t batch, const int64_t *positions,
                            const int64_t *cache_rows, const int64_t *logit_rows, int64_t n_logits, float *logits,
                            float *scratch);

static int64_t with_threads(const llama_model *m, const int64_t *tokens, int64_t batch, const int64_t *positions,
                            const int64_t *cache_rows, const int64_t *logit_rows, int64_t n_logits,
                            int64_t one_per_cache_row, float *logits, float *scratch, int64_t threads) {
    const int64_t status = check_rows(m, tokens, batch, positions, cache_rows, logit_rows, n_logits, one_per_cache_row);
    if (status != 0) return status;
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads > 0 ? (int)threads : before);
    const int64_t done = forward_rows(m, tokens, batch, positions, cache_rows, logit_rows, n_logits, logits, scratch);
    omp_set_num_threads(before);
    return done;
}

/* One step of `batch` rows, each on its own: row b is token tokens[b] at position positions[b], whose
   keys and values are cache row cache_rows[b] (rotated by its own position's angles, written at
   that position, attending to positions 0 .. positions[b] of that cache row). A row's logits do not
   depend on the other rows of the batch: every sum is taken over one row alone, in the same order
   whatever the batch, so they are the same bits as that row's step alone. logits: [batch, vocab].
   threads: how many OpenMP threads each product runs on (the calling thread's setting is restored
   after, so torch's own count is untouched). Returns 0, or -1 for a token outside the vocabulary,
   -2 for a batch, a position or a cache row outside the cache, or a cache row given twice (nothing
   is computed then), -3 where no memory was left for the attention's scores. */
int64_t llama_decode_rows(const llama_model *m, const int64_t *tokens, int64_t batch, const int64_t *positions,
                          const int64_t *cache_rows, float *logits, float *scratch, int64_t threads) {
    if (batch < 1 || batch > m->max_batch) return -2;  /* before the array is sized by it */
    int64_t every[batch];
    for (int64_t b = 0; b < batch; b++) every[b] = b;
    return with_threads(m, tokens, batch, positions, cache_rows, every, batch, 1, logits, scratch, threads);
}

/* llama_decode_rows, with several rows in one cache row and logits for some rows only: the prompts
   of new requests (each token a row, at positions 0, 1, ... of its cache row, or a later piece of
   a prompt) in one pass with a step of the requests in flight, so the weights are read once for
   all of them. The keys and values of every row are written before any row attends, so a prompt's
   rows attend causally among themselves. Each row is still computed on its own: its keys, values
   and logits are the same bits as in any other call that gives it the same token, position and
   cache. The rows of one cache row must stand at rising positions. logits: [n_logits, vocab], for
   the rows logit_rows[0 .. n_logits - 1] (rising indices into the rows); the last layer's products
   after attention run for those rows only. Returns as llama_decode_rows does (-2 also for
   logit_rows out of order or outside the rows). */
int64_t llama_forward_rows(const llama_model *m, const int64_t *tokens, int64_t batch, const int64_t *positions,
                           const int64_t *cache_rows, const int64_t *logit_rows, int64_t n_logits, float *logits,
                           float *scratch, int64_t threads) {
    return with_threads(m, tokens, batch, positions, cache_rows, logit_rows, n_logits, 0, logits, scratch, threads);
}

/* llama_decode_rows with every row at position pos, row b in cache row b. */
int64_t llama_decode_step(const llama_model *m, const int64_t *tokens, int64_t batch, int64_t pos, float *logits,
                          float *scratch, int64_t threads) {
    if (batch < 1 || batch > m->max_batch) return -2;  /* before the arrays are sized by it */
    int64_t positions[batch], cache_rows[batch];
    for (int64_t b = 0; b < batch; b++) positions[b] = pos, cache_rows[b] = b;
    return llama_decode_rows(m, tokens, batch, positions, cache_rows, logits, scratch, threads);
}

static int64_t forward_rows(const llama_model *m, const int64_t *tokens, int64_t batch, const int64_t *positions,
                            const int64_t *cache_rows, const int64_t *logit_rows, int64_t n_logits, float *logits,
                            float *scratch) {
    const int64_t dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, hidden = m->hidden;
    const int64_t qw = nh * hd, kvw = nkv * hd, qkvw = qkv_width(m), seq = m->max_seq, bf16 = m->bf16;

    float *x = scratch, *xn = x + batch * dim, *tmp = xn + batch * dim, *qkv = tmp + batch * dim;
    float *att = qkv + batch * qkvw, *h13 = att + batch * qw, *g = h13 + batch * 2 * hidden;
    float *work = g + batch * hidden;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t n_rep = nh / nkv, esize = bf16 ? 2 : 4; /* bytes of a cached value */
    int failed = 0;  /* a thread found no memory for its scores */

    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < dim; i++) x[b * dim + i] = load_at(bf16, m->tok_embeddings, tokens[b] * dim + i);

    for (int64_t l = 0; l < m->n_layers; l++) {
        rmsnorm(x, m->attention_norm[l], xn, batch, dim, m->eps, bf16);
        matvec(&m->wqkv[l], xn, qkv, batch, work);
        round_all(bf16, qkv, batch * qkvw);
        for (int64_t b = 0; b < batch; b++) {
            float *q = qkv + b * qkvw, *k = q + qw, *v = k + kvw;
            const float *cos = m->rope + positions[b] * hd, *signed_sin = m->rope + (m->rope_rows + positions[b]) * hd;
            rotate(q, nh + nkv, hd, cos, signed_sin, bf16);  /* q and k are adjacent */
            for (int64_t h = 0; h < nkv; h++) {
                int64_t at = ((cache_rows[b] * nkv + h) * seq + positions[b]) * hd;
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
#pragma omp parallel
        {
            /* One row's scores for one head, this thread's (on the heap: max_seq may be long). */
            float *s = malloc(seq * sizeof(float));
            if (s == NULL) failed = 1;
            /* The (row, head) pairs dealt out one at a time in turn: a row's attention costs its
               position, and a server's rows (and a prompt's tokens) sit at many; in halves, one
               thread took the short rows and waited for the other (benchmarks/NOTES.md). */
#pragma omp for schedule(static, 1)
            for (int64_t bh = 0; bh < batch * nh; bh++) {
                if (s == NULL) continue;
                int64_t b = bh / nh, h = bh % nh, kvh = h / n_rep;
                const float *q = qkv + b * qkvw + h * hd;
                const int64_t base = (cache_rows[b] * nkv + kvh) * seq * hd;
                float *out = att + b * qw + h * hd;
                const char *keys = (const char *)m->cache_k[l] + base * esize;
                const char *values = (const char *)m->cache_v[l] + base * esize;
                kernels->attend(q, keys, values, positions[b] + 1, hd, scale, bf16, s, out);
                round_all(bf16, out, hd);
            }
            free(s);
        }
        if (failed) return -3;
        if (l == m->n_layers - 1 && n_logits < batch) {
            /* Only the rows with logits go on: the others' keys and values are in the cache. Rising
               indices, so each row moves down onto a row already taken. */
            for (int64_t i = 0; i < n_logits; i++) {
                memmove(x + i * dim, x + logit_rows[i] * dim, dim * sizeof(float));
                memmove(att + i * qw, att + logit_rows[i] * qw, qw * sizeof(float));
            }
            batch = n_logits;
            if (batch == 0) return 0;
        }
        matvec(&m->wo[l], att, tmp, batch, work);
        for (int64_t i = 0; i < batch * dim; i++) x[i] = keep(bf16, x[i] + keep(bf16, tmp[i]));

        rmsnorm(x, m->ffn_norm[l], xn, batch, dim, m->eps, bf16);
        matvec(&m->w13[l], xn, h13, batch, work);
        round_all(bf16, h13, batch * 2 * hidden);
        /* Split by element, not by row of x: at batch 1 both threads take half of the row. */
#pragma omp parallel for schedule(static)
        for (int64_t bi = 0; bi < batch * hidden; bi++) {
            const int64_t b = bi / hidden, i = bi % hidden;
            const float gate = h13[b * 2 * hidden + i], up = h13[b * 2 * hidden + hidden + i];
            g[bi] = keep(bf16, keep(bf16, gate / (1.0f + expf(-gate))) * up);
        }
        matvec(&m->w2[l], g, tmp, batch, work);
        for (int64_t i = 0; i < batch * dim; i++) x[i] = keep(bf16, x[i] + keep(bf16, tmp[i]));
    }
    rmsnorm(x, m->norm, xn, batch, dim, m->eps, bf16);
    matvec(m->output, xn, logits, batch, work);
    round_all(bf16, logits, batch * m->vocab);
    return 0;
}
