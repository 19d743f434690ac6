/* The products and the attention of the C step (llama/native.c), written once and compiled once
   per instruction set: native.c includes this file once for each variant, having defined

     LLAMA_ISA     the variant's name, which KERNEL() appends to every function here
     LLAMA_TARGET  the function attribute that lets the compiler use the variant's instructions
     LLAMA_LANES   floats in a vector; 0: no vectors, only the plain C loops

   and, where LLAMA_LANES is not 0, the vector operations named vec_* below (what each does is
   written where native.c defines them). The plain C loops state the arithmetic; the vector
   loops compute the same sums in another order. Every function here is static: a variant is
   reached through its llama_kernels entry in native.c. */

#if LLAMA_LANES
/* One step of a row's sum: acc += w[k ..] x[k ..] lane by lane, over LLAMA_LANES columns (fp32,
   int8: the weights made floats), or for bf16 over 2 LLAMA_LANES (a lane holds two columns of
   the row and of x, an even one and an odd one, and gets both products). */
static inline __attribute__((always_inline)) LLAMA_TARGET vec KERNEL(step)(int kind, vec acc, const void *row,
                                                                           const void *x, int64_t k) {
    switch (kind) {
    case LLAMA_INT8: return vec_fmadd(vec_load_i8((const int8_t *)row + k), vec_load((const float *)x + k), acc);
    case LLAMA_BF16:
        return vec_dot_pairs(acc, vec_load_pairs((const uint16_t *)row + k), vec_load_pairs((const uint16_t *)x + k));
    default: return vec_fmadd(vec_load((const float *)row + k), vec_load((const float *)x + k), acc);
    }
}
#endif

#if LLAMA_LANES
/* y[b, r] for the four rows r = n .. n + 3 and the nb rows b of x from xb on (nb a constant once
   inlined: the accumulators are then registers), in one pass over the four rows: each step of a
   weight row serves nb rows of x. Each (b, r) sum has an accumulator of its own that takes the
   same steps, in the same order, then the same horizontal sum, whatever nb is: a row's result is
   the same bits at every batch size. With `prefetch`, the next four rows are asked for (a cache
   line of each, every line of the block).
   Over columns k0 .. k1 - 1 only (multiples of the step): the accumulators start from `saved` (16
   vectors, j 4 + i) where k0 is not 0 and go back there where k1 is not cols; the sums are taken
   once k1 is cols. Storing an accumulator and loading it back changes no bit, so a row's sums are
   the same whether its columns go in one piece or in several. rows4_of passes no `saved`: its
   columns go in one piece, and no saving is compiled in. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(rows4_cols)(int kind, const char *r0,
                                                                                  int64_t row_bytes, const float *scale,
                                                                                  const char *xb, int64_t x_bytes,
                                                                                  float *yb, int64_t rows, int64_t k0,
                                                                                  int64_t k1, vec *saved, int64_t n,
                                                                                  const int nb, int prefetch) {
    const int64_t size = kind == LLAMA_FP32 ? 4 : kind == LLAMA_BF16 ? 2 : 1;
    const int64_t step = kind == LLAMA_BF16 ? 2 * LLAMA_LANES : LLAMA_LANES, cols = row_bytes / size;
    vec acc[4][4];  /* nb is at most 4 */
    for (int j = 0; j < nb; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = k0 == 0 || !saved ? vec_zero() : saved[4 * j + i];
    for (int64_t k = k0; k < k1; k += step) {
        if (prefetch && k % (64 / size) == 0) LLAMA_PREFETCH_ROWS(r0 + 4 * row_bytes + k * size, row_bytes, 4);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < nb; j++)
                acc[j][i] = KERNEL(step)(kind, acc[j][i], r0 + i * row_bytes, xb + j * x_bytes, k);
    }
    if (saved && k1 < cols) {
        for (int j = 0; j < nb; j++)
            for (int i = 0; i < 4; i++) saved[4 * j + i] = acc[j][i];
        return;
    }
#ifdef vec_sums_4x4
    if (nb == 4) {  /* the same sums, 16 at once */
        vec_sums_4x4(acc, yb + n, rows, kind == LLAMA_INT8 ? scale + n : NULL);
        return;
    }
#endif
    for (int j = 0; j < nb; j++)
        for (int i = 0; i < 4; i++)
            yb[j * rows + n + i] = kind == LLAMA_INT8 ? vec_sum(acc[j][i]) * scale[n + i] : vec_sum(acc[j][i]);
}

/* A pass of nb rows of x over the four weight rows, the columns in one piece. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(rows4_of)(int kind, const char *r0,
                                                                                int64_t row_bytes, const float *scale,
                                                                                const char *xb, int64_t x_bytes,
                                                                                float *yb, int64_t rows, int64_t cols,
                                                                                int64_t n, const int nb, int prefetch) {
    KERNEL(rows4_cols)(kind, r0, row_bytes, scale, xb, x_bytes, yb, rows, 0, cols, NULL, n, nb, prefetch);
}

/* y[0, n .. n + 3] for the one row of x at batch 1, a weight row at a time: each row's sum takes
   the steps rows4_of gives it (the same bits), but the rows are read one after another, one stream
   in memory instead of four. With `prefetch`, each line of the row after is asked for as the same
   line of this one is read. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(rows1_each)(int kind, const char *r0,
                                                                                  int64_t row_bytes, const char *x,
                                                                                  float *y, int64_t cols, int64_t n,
                                                                                  int prefetch) {
    const int64_t size = kind == LLAMA_FP32 ? 4 : 2;
    const int64_t step = kind == LLAMA_BF16 ? 2 * LLAMA_LANES : LLAMA_LANES;
    for (int i = 0; i < 4; i++) {
        const char *row = r0 + i * row_bytes;
        vec acc = vec_zero();
        for (int64_t k = 0; k < cols; k += step) {
            if (prefetch && k % (64 / size) == 0) LLAMA_PREFETCH(row + row_bytes + k * size);
            acc = KERNEL(step)(kind, acc, row, x, k);
        }
        y[n + i] = vec_sum(acc);
    }
}

/* rows4_of for the nb rows of x from row b on; the first pass over the block (b = 0) prefetches the
   next one (a constant in each loop: no test of b in it). At batch 1, fp32 and bf16 read a row at a
   time (rows1_each; fp32 prefetching the next row, bf16 not), 1.09-1.26x the step of four rows at
   once on a Zen 5 with its AVX-512 and its AVX2 kernels; int8 keeps four rows, whose four
   accumulators hide the latency of its conversions and FMAs (a row at a time was 0.59x on AVX2).
   Figures in benchmarks/NOTES.md. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(rows4_pass)(int kind, const char *r0,
                                                                                  int64_t row_bytes,
                                                                                  const float *scale, const void *x,
                                                                                  float *y, int64_t b, int64_t rows,
                                                                                  int64_t cols, int64_t n,
                                                                                  const int nb, int64_t batch) {
    const int64_t x_bytes = cols * (kind == LLAMA_BF16 ? 2 : 4);
    const char *xb = (const char *)x + b * x_bytes;
    if (batch == 1 && kind != LLAMA_INT8)
        KERNEL(rows1_each)(kind, r0, row_bytes, xb, y, cols, n, kind == LLAMA_FP32);
    else if (b == 0)
        KERNEL(rows4_of)(kind, r0, row_bytes, scale, xb, x_bytes, y + b * rows, rows, cols, n, nb, 1);
    else
        KERNEL(rows4_of)(kind, r0, row_bytes, scale, xb, x_bytes, y + b * rows, rows, cols, n, nb, 0);
}
#endif

#if LLAMA_LANES
/* fp32 columns a piece in rows4_pieces: four weight rows and four rows of x of 4 KiB each take
   32 KiB, within a core's first-level cache. */
#define LLAMA_PIECE_COLS 1024

/* rows4's passes for fp32 rows longer than LLAMA_PIECE_COLS. Four weight rows and four rows of x
   of the 100M shape's w2 (2048 columns, 64 KiB) outgrow a 48 KiB first-level cache, so each pass
   read the weight rows again from the second level. Here the rows of x go in groups of eight
   passes, and a group's passes run over the columns a piece at a time, each pass's accumulators
   kept between pieces (rows4_cols): the same sums, the same bits, and every pass after the
   first reads the piece of the weight rows from the first level. Figures in benchmarks/NOTES.md. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(rows4_pieces)(const char *r0, int64_t row_bytes,
                                                                                    const float *x, float *y,
                                                                                    int64_t batch, int64_t rows,
                                                                                    int64_t cols, int64_t n) {
    const int per_pass = LLAMA_BATCH_ROWS(LLAMA_FP32);
    const int64_t x_bytes = cols * 4, group = 8 * per_pass;
    vec saved[10][16]; /* a group's passes: 8 of per_pass rows, or in the last one up to 7, one of 2 and one of 1 */
    for (int64_t b0 = 0; b0 < batch; b0 += group) {
        const int64_t end = b0 + group < batch ? b0 + group : batch;
        for (int64_t k0 = 0; k0 < cols; k0 += LLAMA_PIECE_COLS) {
            const int64_t k1 = k0 + LLAMA_PIECE_COLS < cols ? k0 + LLAMA_PIECE_COLS : cols;
            int64_t b = b0;
            int p = 0;
            for (; end - b >= per_pass; b += per_pass, p++) {
                const char *xb = (const char *)(x + b * cols);
                if (b == 0) /* the next block's piece asked for, as in rows4_pass */
                    KERNEL(rows4_cols)(LLAMA_FP32, r0, row_bytes, NULL, xb, x_bytes, y + b * rows, rows, k0, k1,
                                       saved[p], n, per_pass, 1);
                else
                    KERNEL(rows4_cols)(LLAMA_FP32, r0, row_bytes, NULL, xb, x_bytes, y + b * rows, rows, k0, k1,
                                       saved[p], n, per_pass, 0);
            }
            for (; per_pass > 2 && end - b >= 2; b += 2, p++)
                KERNEL(rows4_cols)(LLAMA_FP32, r0, row_bytes, NULL, (const char *)(x + b * cols), x_bytes,
                                   y + b * rows, rows, k0, k1, saved[p], n, 2, 0);
            for (; b < end; b++, p++)
                KERNEL(rows4_cols)(LLAMA_FP32, r0, row_bytes, NULL, (const char *)(x + b * cols), x_bytes,
                                   y + b * rows, rows, k0, k1, saved[p], n, 1, 0);
        }
    }
}
#endif

/* y[b, r] = sum_k x[b, k] w[r, k] (times scale[r] for int8) for the four rows r = n .. n + 3
   below `rows` and every b < batch; w [rows, cols] of `kind` (a constant once inlined), x fp32
   or, for bf16, bf16. The rows of x go LLAMA_BATCH_ROWS at a time through one pass over the
   weights, those left over 2 and then 1 at a time (fp32 rows longer than LLAMA_PIECE_COLS, from
   two passes on: a piece of the columns at a time, rows4_pieces). */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(rows4)(int kind, const void *w,
                                                                             const float *scale, const void *x,
                                                                             float *y, int64_t batch, int64_t rows,
                                                                             int64_t cols, int64_t n) {
    const int64_t size = kind == LLAMA_FP32 ? 4 : kind == LLAMA_BF16 ? 2 : 1, row_bytes = cols * size;
    const int bf16 = kind == LLAMA_BF16;
    const int64_t x_bytes = cols * (bf16 ? 2 : 4);
    const char *r0 = (const char *)w + n * row_bytes;
#if LLAMA_LANES
    if (n + 4 <= rows && cols % (bf16 ? 2 * LLAMA_LANES : LLAMA_LANES) == 0) {
        const int per_pass = LLAMA_BATCH_ROWS(kind);
        if (kind == LLAMA_FP32 && cols > LLAMA_PIECE_COLS && batch >= 2 * per_pass) {
            KERNEL(rows4_pieces)(r0, row_bytes, (const float *)x, y, batch, rows, cols, n);
            return;
        }
        int64_t b = 0;
        for (; batch - b >= per_pass; b += per_pass)
            KERNEL(rows4_pass)(kind, r0, row_bytes, scale, x, y, b, rows, cols, n, per_pass, batch);
        for (; per_pass > 2 && batch - b >= 2; b += 2)
            KERNEL(rows4_pass)(kind, r0, row_bytes, scale, x, y, b, rows, cols, n, 2, batch);
        for (; b < batch; b++) KERNEL(rows4_pass)(kind, r0, row_bytes, scale, x, y, b, rows, cols, n, 1, batch);
        return;
    }
#endif
    for (int64_t b = 0; b < batch; b++) {
        const void *xb = (const char *)x + b * x_bytes;
        float *yb = y + b * rows;
        for (int64_t r = n; r < n + 4 && r < rows; r++) {
            const char *row = r0 + (r - n) * row_bytes;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < cols; k++) s += weight_at(kind, row, k) * load_at(bf16, xb, k);
            yb[r] = kind == LLAMA_INT8 ? s * scale[r] : s;
        }
    }
}

/* The rows split across threads by blocks of four (one function a kind, so that each loop is
   compiled for its kind). */
static LLAMA_TARGET void KERNEL(matvec_f32)(const float *x, const float *w, float *y, int64_t batch, int64_t rows,
                                           int64_t cols) {
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < (rows + 3) / 4; blk++)
        KERNEL(rows4)(LLAMA_FP32, w, NULL, x, y, batch, rows, cols, 4 * blk);
}

static LLAMA_TARGET void KERNEL(matvec_i8)(const float *x, const int8_t *w, const float *scale, float *y,
                                          int64_t batch, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < (rows + 3) / 4; blk++)
        KERNEL(rows4)(LLAMA_INT8, w, scale, x, y, batch, rows, cols, 4 * blk);
}

/* bf16 weights and inputs (x holds values already rounded to bf16; `work` takes them as bf16),
   fp32 sums, as F.linear in bf16. */
static LLAMA_TARGET void KERNEL(matvec_bf16)(const float *x, const uint16_t *w, float *y, int64_t batch, int64_t rows,
                                            int64_t cols, float *work) {
    uint16_t *xb16 = (uint16_t *)work;
    for (int64_t i = 0; i < batch * cols; i++) xb16[i] = float_to_bf16(x[i]);
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < (rows + 3) / 4; blk++)
        KERNEL(rows4)(LLAMA_BF16, w, NULL, xb16, y, batch, rows, cols, 4 * blk);
}

/* int4 in tiles of 16 rows (the layout is described at LLAMA_INT4), times x quantized to int8 per
   group (quantize_x: xq, its step d, the group's float sum xs, and centre = -8 sum_k xq_k). With
   w = q scale + offset = (q - 8) scale + zero, per group:
   y += scale (d sum_k (q_k - 8) xq_k + 8 xs) + offset xs, the sum of q_k xq_k in integers (exact,
   in any order). Centred on q - 8, the error of xq multiplies weights of mean near 0, not of
   mean 7.5 scale (half the error of sum_k q_k xq_k on Gaussian rows, benchmarks/NOTES.md).
   The vector loops give each row of a tile its own 32-bit lane (16 / LLAMA_LANES vectors a tile):
   a lane's four bytes are its row's values at four inputs, which one u8 x s8 product of four
   (vec_dot_u4, into partial sums that vec_widen_u4 adds to the group's int32 sums every four
   chunks) takes against those four inputs of xq, broadcast; a group's scales and offsets then
   apply to the tile with a multiply-add a vector and no horizontal sums. Each input is broadcast
   once for the nt tiles, and each tile's values, split into nibbles once, serve nb rows of x.
   Tiles tile .. tile + nt - 1 and rows b .. b + nb - 1 of x (nt and nb constants once inlined:
   the arrays are then registers): y[b, n] for their rows n below `rows`. Each (row of x, tile)
   sum takes the same steps in the same order whatever nb and nt are: a row's result is the same
   bits at every batch size. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(i4_tiles)(const uint8_t *w, int64_t tile,
                                                                                const int nt, int64_t rows,
                                                                                int64_t groups, int64_t group,
                                                                                const int8_t *xqb, const float *db,
                                                                                const float *xsb, const float *cb,
                                                                                float *yb, const int nb, int prefetch) {
    const int64_t record = LLAMA_I4_RECORD(group), tile_bytes = groups * record, chunks = group / 8;
    const int64_t cols = groups * group;
#if LLAMA_LANES
    enum { per_tile = 16 / LLAMA_LANES };  /* vectors a tile */
    vec_i4_constants();
    vec acc[LLAMA_I4_ROWS][LLAMA_I4_TILES][per_tile];
    for (int j = 0; j < nb; j++)
        for (int i = 0; i < nt; i++)
            for (int h = 0; h < per_tile; h++) acc[j][i][h] = vec_zero();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *r[LLAMA_I4_TILES];
        for (int i = 0; i < nt; i++) r[i] = w + (tile + i) * tile_bytes + g * record;
        if (prefetch)
            for (int64_t line = 0; line < record; line += 64)
                for (int i = 0; i < nt; i++) LLAMA_PREFETCH(r[i] + LLAMA_I4_AHEAD * record + line);
        veci sum[LLAMA_I4_ROWS][LLAMA_I4_TILES][per_tile];
        for (int j = 0; j < nb; j++)
            for (int i = 0; i < nt; i++)
                for (int h = 0; h < per_tile; h++) sum[j][i][h] = veci_zero();
        for (int64_t c0 = 0; c0 < chunks; c0 += 4) {  /* four chunks a time in the partial sums */
            veci part[LLAMA_I4_ROWS][LLAMA_I4_TILES][per_tile];
            for (int j = 0; j < nb; j++)
                for (int i = 0; i < nt; i++)
                    for (int h = 0; h < per_tile; h++) part[j][i][h] = veci_zero();
            for (int64_t c = c0; c < c0 + 4 && c < chunks; c++) {
                veci xlo[LLAMA_I4_ROWS], xhi[LLAMA_I4_ROWS];
                for (int j = 0; j < nb; j++) {
                    int32_t four[2];
                    memcpy(four, xqb + j * cols + g * group + 8 * c, 8);
                    xlo[j] = veci_set1(four[0]);
                    xhi[j] = veci_set1(four[1]);
                }
                for (int i = 0; i < nt; i++)
                    for (int h = 0; h < per_tile; h++) {
                        const veci q = veci_load(r[i] + 64 * c + h * 4 * LLAMA_LANES);
                        const veci low = vec_low_nibbles(q), high = vec_high_nibbles(q);
                        for (int j = 0; j < nb; j++)
                            part[j][i][h] = vec_dot_u4(part[j][i][h], low, high, xlo[j], xhi[j]);
                    }
            }
            for (int j = 0; j < nb; j++)
                for (int i = 0; i < nt; i++)
                    for (int h = 0; h < per_tile; h++) sum[j][i][h] = vec_widen_u4(sum[j][i][h], part[j][i][h]);
        }
        for (int j = 0; j < nb; j++) {
            const vec d = vec_set1(db[j * groups + g]), xs = vec_set1(xsb[j * groups + g]);
            const vec centre = vec_set1(cb[j * groups + g]), xs8 = vec_set1(8 * xsb[j * groups + g]);
            for (int i = 0; i < nt; i++)
                for (int h = 0; h < per_tile; h++) {
                    const uint16_t *scale = (const uint16_t *)(r[i] + 8 * group) + h * LLAMA_LANES,
                                   *offset = scale + 16;
                    const vec centred = vec_add(vec_from_i32(sum[j][i][h]), centre); /* exact: integers */
                    acc[j][i][h] = vec_fmadd(vec_load_f16(scale), vec_fmadd(centred, d, xs8), acc[j][i][h]);
                    acc[j][i][h] = vec_fmadd(vec_load_f16(offset), xs, acc[j][i][h]);
                }
        }
    }
    for (int j = 0; j < nb; j++)
        for (int i = 0; i < nt; i++)
            for (int h = 0; h < per_tile; h++) {
                int64_t first = (tile + i) * 16 + h * LLAMA_LANES, valid = rows - first;
                if (h == 0 || valid > 0)
                    vec_store_first(yb + j * rows + first, acc[j][i][h], valid < LLAMA_LANES ? valid : LLAMA_LANES);
            }
#else
    (void)prefetch;
    for (int j = 0; j < nb; j++)
        for (int i = 0; i < nt; i++) {
            const uint8_t *t = w + (tile + i) * tile_bytes;
            float acc[16] = {0};
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *r = t + g * record;
                const uint16_t *scale = (const uint16_t *)(r + 8 * group), *offset = scale + 16;
                const int8_t *xg = xqb + j * cols + g * group;
                const float d = db[j * groups + g], xs = xsb[j * groups + g], centre = cb[j * groups + g];
                for (int l = 0; l < 16; l++) {
                    int32_t s = 0;
                    for (int64_t c = 0; c < chunks; c++)
                        for (int u = 0; u < 4; u++) {
                            uint8_t q = r[64 * c + 4 * l + u];
                            s += (q & 15) * xg[8 * c + u] + (q >> 4) * xg[8 * c + 4 + u];
                        }
                    const float centred = (float)s + centre;
                    acc[l] += half_to_float(scale[l]) * (centred * d + 8 * xs);
                    acc[l] += half_to_float(offset[l]) * xs;
                }
            }
            for (int l = 0; l < 16 && (tile + i) * 16 + l < rows; l++) yb[j * rows + (tile + i) * 16 + l] = acc[l];
        }
#endif
}

/* i4_tiles over tiles tile .. tile + nt - 1 for every row of x: LLAMA_I4_ROWS rows at a time (in
   groups of LLAMA_I4_ROWS_TILES tiles), the rows left over one at a time (nt tiles together). The
   first pass over the tiles (b = 0) prefetches. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(i4_rows)(const uint8_t *w, int64_t tile,
                                                                               const int nt, int64_t rows,
                                                                               int64_t groups, int64_t group,
                                                                               const int8_t *xq, const float *d,
                                                                               const float *xs, const float *centre,
                                                                               float *y, int64_t batch) {
    const int64_t cols = groups * group;
    int64_t b = 0;
#if LLAMA_I4_ROWS > 1
    for (; batch - b >= LLAMA_I4_ROWS; b += LLAMA_I4_ROWS)
        for (int i = 0; i < nt; i += LLAMA_I4_ROWS_TILES) {
            if (nt - i >= LLAMA_I4_ROWS_TILES)
                KERNEL(i4_tiles)(w, tile + i, LLAMA_I4_ROWS_TILES, rows, groups, group, xq + b * cols, d + b * groups,
                                 xs + b * groups, centre + b * groups, y + b * rows, LLAMA_I4_ROWS, b == 0);
            else
                for (int u = i; u < nt; u++)
                    KERNEL(i4_tiles)(w, tile + u, 1, rows, groups, group, xq + b * cols, d + b * groups,
                                     xs + b * groups, centre + b * groups, y + b * rows, LLAMA_I4_ROWS, b == 0);
        }
#endif
    for (; b < batch; b++) {
        if (nt == LLAMA_I4_TILES)
            KERNEL(i4_tiles)(w, tile, LLAMA_I4_TILES, rows, groups, group, xq + b * cols, d + b * groups,
                             xs + b * groups, centre + b * groups, y + b * rows, 1, b == 0);
        else
            KERNEL(i4_tiles)(w, tile, 1, rows, groups, group, xq + b * cols, d + b * groups, xs + b * groups,
                             centre + b * groups, y + b * rows, 1, b == 0);
    }
}

/* `work`: x quantized (quantize_x), the same in every variant. */
static LLAMA_TARGET void KERNEL(matvec_i4)(const float *x, const uint8_t *w, float *y, int64_t batch, int64_t rows,
                                          int64_t cols, int64_t group, float *work) {
    const int64_t groups = cols / group, tiles = (rows + 15) / 16, blocks = tiles / LLAMA_I4_TILES;
    float *d = work, *xs = d + batch * groups, *centre = xs + batch * groups;
    int8_t *xq = (int8_t *)(centre + batch * groups);
    quantize_x(x, batch * groups, group, xq, d, xs, centre);
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
        for (int64_t blk = 0; blk < blocks; blk++)
            KERNEL(i4_rows)(w, LLAMA_I4_TILES * blk, LLAMA_I4_TILES, rows, groups, group, xq, d, xs, centre, y, batch);
#pragma omp for schedule(static)
        for (int64_t t = LLAMA_I4_TILES * blocks; t < tiles; t++)
            KERNEL(i4_rows)(w, t, 1, rows, groups, group, xq, d, xs, centre, y, batch);
    }
}

/* y[b, :] = W x[b, :] for each of `batch` rows; `work`: llama_matmul_scratch_floats(batch, cols). */
static LLAMA_TARGET void KERNEL(matvec)(const llama_matrix *m, const float *x, float *y, int64_t batch, float *work) {
    switch (m->kind) {
    case LLAMA_INT8: KERNEL(matvec_i8)(x, (const int8_t *)m->w, m->scale, y, batch, m->rows, m->cols); break;
    case LLAMA_INT4: KERNEL(matvec_i4)(x, (const uint8_t *)m->w, y, batch, m->rows, m->cols, m->group, work); break;
    case LLAMA_BF16: KERNEL(matvec_bf16)(x, (const uint16_t *)m->w, y, batch, m->rows, m->cols, work); break;
    default: KERNEL(matvec_f32)(x, (const float *)m->w, y, batch, m->rows, m->cols);
    }
}

/* q . row over n values, the row fp32 or (bf16) bf16. */
static inline __attribute__((always_inline)) LLAMA_TARGET float KERNEL(dot)(const float *q, const void *row, int64_t n,
                                                                            int64_t bf16) {
    float s = 0.f;
    int64_t k = 0;
    const float *f = (const float *)row;
    const uint16_t *h = (const uint16_t *)row;
#if LLAMA_LANES
    vec acc = vec_zero();
    if (bf16)
        for (; k + LLAMA_LANES <= n; k += LLAMA_LANES) acc = vec_fmadd(vec_load(q + k), vec_load_bf16(h + k), acc);
    else
        for (; k + LLAMA_LANES <= n; k += LLAMA_LANES) acc = vec_fmadd(vec_load(q + k), vec_load(f + k), acc);
    s = vec_sum(acc);
#endif
    if (bf16) {
#pragma omp simd reduction(+ : s)
        for (int64_t i = k; i < n; i++) s += q[i] * bf16_to_float(h[i]);
    } else {
        for (; k < n; k++) s += q[k] * f[k];
    }
    return s;
}

/* out += p row over n values, the row fp32 or (bf16) bf16. */
static inline __attribute__((always_inline)) LLAMA_TARGET void KERNEL(add_scaled)(float *out, float p, const void *row,
                                                                                  int64_t n, int64_t bf16) {
    int64_t i = 0;
    const float *f = (const float *)row;
    const uint16_t *h = (const uint16_t *)row;
#if LLAMA_LANES
    const vec pv = vec_set1(p);
    if (bf16)
        for (; i + LLAMA_LANES <= n; i += LLAMA_LANES)
            vec_store(out + i, vec_fmadd(pv, vec_load_bf16(h + i), vec_load(out + i)));
    else
        for (; i + LLAMA_LANES <= n; i += LLAMA_LANES)
            vec_store(out + i, vec_fmadd(pv, vec_load(f + i), vec_load(out + i)));
#endif
    if (bf16) {
#pragma omp simd
        for (int64_t j = i; j < n; j++) out[j] += p * bf16_to_float(h[j]);
    } else {
#pragma omp simd
        for (int64_t j = i; j < n; j++) out[j] += p * f[j];
    }
}

/* One head's attention at one position: s[t] = scale q . k_t for the n positions t cached so
   far, softmax, out = sum_t p_t v_t. keys and values: the head's cache rows [n, head_dim] (from
   the first position on), fp32 or (bf16) bf16; s: n floats of scratch. */
static LLAMA_TARGET void KERNEL(attend)(const float *q, const void *keys, const void *values, int64_t n, int64_t hd,
                                       float scale, int64_t bf16, float *s, float *out) {
    const int64_t row_bytes = hd * (bf16 ? 2 : 4);
    float top = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        s[t] = KERNEL(dot)(q, (const char *)keys + t * row_bytes, hd, bf16) * scale;
        if (s[t] > top) top = s[t];
    }
    float total = 0.f;
    for (int64_t t = 0; t < n; t++) {
        s[t] = expf(s[t] - top);
        total += s[t];
    }
    for (int64_t i = 0; i < hd; i++) out[i] = 0.f;
    for (int64_t t = 0; t < n; t++)
        KERNEL(add_scaled)(out, s[t] / total, (const char *)values + t * row_bytes, hd, bf16);
}
