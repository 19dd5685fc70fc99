/* The CPU training steps' elementwise parts, each fused into one pass, the products of a layer
 * whose input is mostly zeros, and fine-tuning's backward products (sda/kernels.py builds this).
 *
 * At batch 32 the matrix products leave ~200 us of a ~1 ms pretraining step to a dozen small torch
 * ops, each a separate pass over the batch plus Python's launch cost (bench/README.md). The
 * elementwise functions are single-threaded: their data fits in L1/L2. The products split their
 * columns over OpenMP threads; built with -fopenmp in a process that has imported torch, they
 * use torch's own libgomp (the same soname, so the loader maps it once) and hence its thread pool
 * and its torch.set_num_threads. float32, row-major arrays only; the Python side checks that
 * before calling.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* glibc's vector expf/logf (libmvec, ~4 ulp), declared as such so that the loops below vectorise
 * without -ffast-math, whose finite-math assumption would hide a diverging run's inf and NaN. */
float expf(float) __attribute__((__simd__("notinbranch")));
float logf(float) __attribute__((__simd__("notinbranch")));
#endif

/* Row b of ``positions`` (batch x k) receives a uniformly random k-subset of 0..d-1: the first k
 * places of a Fisher-Yates shuffle of 0..d-1 (Durstenfeld's, stopped after k swaps), with the i-th
 * swap partner i + floor(draw * (d - i) / 2^32) from row b of ``draws`` (batch x k, uniform
 * 32-bit). Multiplying instead of rejecting skews each partner's probability by less than
 * d / 2^32 (2.4e-7 of it at d = 1000). ``scratch`` holds d int32. */
void random_subsets(const uint32_t *draws, int64_t batch, int64_t k, int64_t d, int64_t *positions,
                    int32_t *scratch) {
    for (int64_t i = 0; i < d; i++) scratch[i] = (int32_t)i;
    for (int64_t b = 0; b < batch; b++) {
        const uint32_t *u = draws + b * k;
        int64_t *out = positions + b * k;
        for (int64_t i = 0; i < k; i++) {
            int64_t j = i + (int64_t)(((uint64_t)u[i] * (uint64_t)(d - i)) >> 32);
            int32_t picked = scratch[j];
            scratch[j] = scratch[i];
            scratch[i] = picked;
            out[i] = picked;
        }
        /* Undo this row's swaps, last first, so that scratch is 0..d-1 again for the next row. */
        for (int64_t i = k - 1; i >= 0; i--) {
            int64_t j = i + (int64_t)(((uint64_t)u[i] * (uint64_t)(d - i)) >> 32);
            int32_t t = scratch[j];
            scratch[j] = scratch[i];
            scratch[i] = t;
        }
    }
}

/* out = x (batch x d) with out[b, positions[b, i]] = 0 for each of the k positions of row b.
 * Returns -1, or the flat index of the first position outside 0..d-1, having then written nothing. */
int64_t masked_copy(const float *restrict x, const int64_t *restrict positions, int64_t batch, int64_t d,
                    int64_t k, float *restrict out) {
    for (int64_t i = 0; i < batch * k; i++)
        if (positions[i] < 0 || positions[i] >= d) return i;
    memcpy(out, x, (size_t)(batch * d) * sizeof(float));
    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < k; i++) out[b * d + positions[b * k + i]] = 0.0f;
    return -1;
}

/* The summed reconstruction cross-entropy of logits a against targets x (batch x d), and its
 * gradient B dL/da = s(a) - x written over the logits, and that gradient's column sums (d).
 * Per component: max(a, 0) - x a + log(1 + exp(-|a|)), the last term as -log max(z, 1 - z) with
 * z = s(a), the same formula as sda.dae.cross_entropy_value_and_reconstruction. */
double cross_entropy_and_output_grad(float *restrict logits, const float *restrict target, int64_t batch,
                                     int64_t d, float *restrict column_sums) {
    double total = 0.0;
    memset(column_sums, 0, (size_t)d * sizeof(float));
    for (int64_t b = 0; b < batch; b++) {
        float *restrict a = logits + b * d;
        const float *restrict x = target + b * d;
        float row = 0.0f;
#pragma omp simd reduction(+ : row)
        for (int64_t i = 0; i < d; i++) {
            float ai = a[i];
            float z = 1.0f / (1.0f + expf(-ai));
            float larger = z > 1.0f - z ? z : 1.0f - z;
            row += (ai > 0.0f ? ai : 0.0f) - x[i] * ai - logf(larger);
            float grad = z - x[i];
            a[i] = grad;
            column_sums[i] += grad;
        }
        total += row;
    }
    return total;
}

/* Softmax regression's batch NLL, summed into *loss, and into *mistakes the number of rows whose
 * largest logit (the first on ties, like torch.argmax) is not the label. The logits (batch x c)
 * are replaced by B dL/dlogits = softmax - onehot(label). Returns -1, or the first row whose label
 * is outside 0..c-1, having then written nothing. */
int64_t softmax_nll_and_grad(float *restrict logits, const int64_t *restrict labels, int64_t batch, int64_t c,
                             double *loss, int64_t *mistakes) {
    for (int64_t b = 0; b < batch; b++)
        if (labels[b] < 0 || labels[b] >= c) return b;
    double total = 0.0;
    int64_t wrong = 0;
    for (int64_t b = 0; b < batch; b++) {
        float *row = logits + b * c;
        int64_t best = 0;
        for (int64_t j = 1; j < c; j++)
            if (row[j] > row[best] || (row[j] != row[j] && row[best] == row[best])) best = j;
        float largest = row[best], sum = 0.0f;
        int64_t label = labels[b];
        float label_logit = row[label];
        for (int64_t j = 0; j < c; j++) {
            row[j] = expf(row[j] - largest);
            sum += row[j];
        }
        /* -log softmax_label = log sum_j exp(a_j - max) - (a_label - max): no underflow to log 0. */
        total += (double)(logf(sum) - (label_logit - largest));
        for (int64_t j = 0; j < c; j++) row[j] /= sum;
        row[label] -= 1.0f;
        wrong += best != label;
    }
    *loss = total;
    *mistakes = wrong;
    return -1;
}

/* ---- Products with a mostly-zero input (MNIST pixels: 19% nonzero; masking zeroes more) ----
 *
 * A dense product pays for every zero of the input. With the weight stored visible-major (row k
 * holds the n weights out of input k, rows ld apart), the encoder sum_k x[b,k] W[k,:] and the
 * encoder's share of the weight update W[k,:] += alpha sum_b x[b,k] g[b,:] need only the nonzero
 * x[b,k], listed by column. Both work on 128-column strips of W, so that a strip's rows stay in L2
 * while every listed entry is applied to them, and split the strips over the threads: each output
 * element is summed by one thread in one order, whatever the number of threads. */

typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define STRIP 8 /* vectors of 16 columns per strip */
#define INLINE static inline __attribute__((always_inline))

#ifdef __AVX512F__
INLINE v16 load_first(const float *p, int64_t count) {
    return (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1u), p);
}
INLINE void store_first(float *p, v16 v, int64_t count) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << count) - 1u), (__m512)v);
}
#else
INLINE v16 load_first(const float *p, int64_t count) {
    v16 v = {0};
    for (int64_t i = 0; i < count; i++) v[i] = p[i];
    return v;
}
INLINE void store_first(float *p, v16 v, int64_t count) {
    for (int64_t i = 0; i < count; i++) p[i] = v[i];
}
#endif
/* Vector w of a strip of nv vectors whose last one holds only ``last`` columns (16: all). */
#define LOAD(p, w) ((w) == nv - 1 && last < 16 ? load_first((p) + 16 * (w), last) : *(const v16 *)((p) + 16 * (w)))
#define STORE(p, w, v) ((w) == nv - 1 && last < 16 ? store_first((p) + 16 * (w), (v), last) : (void)(*(v16 *)((p) + 16 * (w)) = (v)))

/* The nonzeros of x (batch x d) by column: column k's are entries col_start[k] .. col_start[k+1]-1
 * of (col_row, col_val), rows ascending. The scratch arrays hold batch * d + 16 entries each.
 * Returns the number of nonzeros. */
int64_t nonzeros_by_column(const float *restrict x, int64_t batch, int64_t d, int64_t *restrict col_start,
                           int32_t *restrict col_row, float *restrict col_val, int32_t *restrict scratch_col,
                           int32_t *restrict scratch_row, float *restrict scratch_val) {
    int64_t count = 0;
    for (int64_t b = 0; b < batch; b++) {
        const float *row = x + b * d;
        int64_t k = 0;
#ifdef __AVX512F__
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; k + 16 <= d; k += 16) { /* compress in registers: a compressing store is slow on AMD */
            __m512 v = _mm512_loadu_ps(row + k);
            __mmask16 nonzero = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            _mm512_storeu_ps(scratch_val + count, _mm512_maskz_compress_ps(nonzero, v));
            _mm512_storeu_si512(scratch_col + count,
                                _mm512_maskz_compress_epi32(nonzero, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)k))));
            _mm512_storeu_si512(scratch_row + count, _mm512_set1_epi32((int)b));
            count += __builtin_popcount(nonzero);
        }
#endif
        for (; k < d; k++) { /* branch-free: the zeros fall in no pattern a predictor could learn */
            scratch_col[count] = (int32_t)k;
            scratch_row[count] = (int32_t)b;
            scratch_val[count] = row[k];
            count += row[k] != 0.0f;
        }
    }
    memset(col_start, 0, (size_t)(d + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < count; s++) col_start[scratch_col[s] + 1]++;
    for (int64_t k = 0; k < d; k++) col_start[k + 1] += col_start[k];
    for (int64_t s = 0; s < count; s++) { /* stable: rows stay ascending within a column */
        int64_t at = col_start[scratch_col[s]]++;
        col_row[at] = scratch_row[s];
        col_val[at] = scratch_val[s];
    }
    memmove(col_start + 1, col_start, (size_t)d * sizeof(int64_t));
    col_start[0] = 0;
    return count;
}

/* Columns j0 .. j0 + 16 nv (the last vector ``last`` wide) of out = bias + x W. The output rows of
 * the strip (batch x 16 nv floats, 16 KB at batch 32) stay in L1; each weight row is read once. */
INLINE void times_strip(int nv, int64_t last, int64_t j0, const int64_t *restrict col_start,
                        const int32_t *restrict col_row, const float *restrict col_val, int64_t batch, int64_t d,
                        const float *restrict weight, int64_t ld, const float *restrict bias,
                        float *restrict out, int64_t ldo) {
    for (int64_t b = 0; b < batch; b++)
        for (int w = 0; w < nv; w++) STORE(out + b * ldo + j0, w, LOAD(bias + j0, w));
    for (int64_t k = 0; k < d; k++) {
        if (col_start[k] == col_start[k + 1]) continue;
        v16 row[STRIP];
        for (int w = 0; w < nv; w++) row[w] = LOAD(weight + k * ld + j0, w);
        for (int64_t s = col_start[k]; s < col_start[k + 1]; s++) {
            float *o = out + (int64_t)col_row[s] * ldo + j0;
            for (int w = 0; w < nv; w++) STORE(o, w, LOAD(o, w) + col_val[s] * row[w]);
        }
    }
}

/* Columns j0 .. j0 + 16 nv of weight[k, :] += alpha sum over column k's entries of x[b, k] g[b, :]:
 * each weight row read and written once, the strip of g (batch x 16 nv) in L1. */
INLINE void update_strip(int nv, int64_t last, int64_t j0, const int64_t *restrict col_start,
                         const int32_t *restrict col_row, const float *restrict col_val, int64_t d,
                         float *restrict weight, int64_t ld, const float *restrict g, int64_t ldg, float alpha) {
    for (int64_t k = 0; k < d; k++) {
        if (col_start[k] == col_start[k + 1]) continue;
        float *row = weight + k * ld + j0;
        v16 sum[STRIP];
        for (int w = 0; w < nv; w++) sum[w] = LOAD(row, w);
        for (int64_t s = col_start[k]; s < col_start[k + 1]; s++) {
            const float *gr = g + (int64_t)col_row[s] * ldg + j0;
            float scale = alpha * col_val[s];
            for (int w = 0; w < nv; w++) sum[w] += scale * LOAD(gr, w);
        }
        for (int w = 0; w < nv; w++) STORE(row, w, sum[w]);
    }
}

/* Calls strip(nv, last, j0) for every strip of n columns, the strips shared among the threads:
 * full strips of STRIP vectors, then one of the remaining vectors, the last of them partial. The
 * constant nv and last of each call let the compiler keep a strip's vectors in registers and drop
 * the partial-vector tests from every strip but the last. */
#define FOR_EACH_STRIP(n, strip)                                                                  \
    do {                                                                                          \
        int64_t vectors_ = ((n) + 15) / 16, full_ = (n) / (16 * STRIP);                          \
        int64_t rest_ = vectors_ - full_ * STRIP, last_ = (n) % 16 ? (n) % 16 : 16;              \
        _Pragma("omp parallel for schedule(static)") for (int64_t i_ = 0; i_ <= full_; i_++) {    \
            int64_t j0_ = i_ * 16 * STRIP;                                                        \
            if (i_ < full_) strip(STRIP, 16, j0_);                                                \
            else switch (rest_) {                                                                 \
                case 7: strip(7, last_, j0_); break;                                              \
                case 6: strip(6, last_, j0_); break;                                              \
                case 5: strip(5, last_, j0_); break;                                              \
                case 4: strip(4, last_, j0_); break;                                              \
                case 3: strip(3, last_, j0_); break;                                              \
                case 2: strip(2, last_, j0_); break;                                              \
                case 1: strip(1, last_, j0_); break;                                              \
                default: break;                                                                   \
            }                                                                                     \
        }                                                                                         \
    } while (0)

/* out (batch x n, rows ldo apart) = bias + x W, x given by nonzeros_by_column, W's row k at
 * weight + k ld. Rows on whole 64-byte lines (ld, ldo multiples of 16) save a fifth of the time. */
void sparse_times(const int64_t *restrict col_start, const int32_t *restrict col_row, const float *restrict col_val,
                  int64_t batch, int64_t d, const float *restrict weight, int64_t ld, int64_t n,
                  const float *restrict bias, float *restrict out, int64_t ldo) {
#define TIMES(nv, last, j0) times_strip(nv, last, j0, col_start, col_row, col_val, batch, d, weight, ld, bias, out, ldo)
    FOR_EACH_STRIP(n, TIMES);
#undef TIMES
}

/* W += alpha x^T g: W (d rows, row k at weight + k ld, n columns), x (batch x d) given by
 * nonzeros_by_column, g (batch x n, rows ldg apart). */
void sparse_rank_update(float *restrict weight, int64_t ld, int64_t n, int64_t d, const int64_t *restrict col_start,
                        const int32_t *restrict col_row, const float *restrict col_val, const float *restrict g,
                        int64_t ldg, float alpha) {
#define UPDATE(nv, last, j0) update_strip(nv, last, j0, col_start, col_row, col_val, d, weight, ld, g, ldg, alpha)
    FOR_EACH_STRIP(n, UPDATE);
#undef UPDATE
}

/* ---- The backward products of fine-tuning at small batches ----
 *
 * At batch 20, oneDNN computes a 1000 x 1000 layer's gradient for the layer below (g W, 100-120
 * us) and its rank-20 update (128-133 us) as two passes over W. Register tiles sized for a small
 * batch, the two sharing one pass over each 32-column strip of W, took 185-239 us for both and the
 * sigmoid's derivative where oneDNN's two products alone took 208-261 (bench/README.md). (A
 * forward kernel of the same kind, h W^T as dot products, was no faster than oneDNN's and is not
 * kept.) Every element is summed by one thread in one order. */

/* Columns j0 .. j0 + 16 nv of out[b, :] = sum_i g[b, i] W[i, :] for batch rows b0 .. b0+nb-1
 * (``last``: the width of the strip's last vector). */
INLINE void axpy_tile(int nv, int nb, int64_t last, const float *restrict g, int64_t ldg, const float *restrict w,
                      int64_t ldw, int64_t n, int64_t b0, int64_t j0, float *restrict out, int64_t ldo) {
    v16 acc[20];
    for (int t = 0; t < nv * nb; t++) acc[t] = (v16){0};
    for (int64_t i = 0; i < n; i++) {
        v16 wv[2];
        for (int w_ = 0; w_ < nv; w_++) wv[w_] = LOAD(w + i * ldw + j0, w_);
        for (int b = 0; b < nb; b++) {
            float scale = g[(b0 + b) * ldg + i];
            for (int w_ = 0; w_ < nv; w_++) acc[b * nv + w_] += scale * wv[w_];
        }
    }
    for (int b = 0; b < nb; b++)
        for (int w_ = 0; w_ < nv; w_++) STORE(out + (b0 + b) * ldo + j0, w_, acc[b * nv + w_]);
}

/* Columns j0 .. j0 + 16 (``last`` of them) of W[i, :] += alpha sum_b g[b, i] below[b, :], for all
 * n rows, batch rows b0 .. b0+nb-1 (their values of below held in registers), 4 rows at a time. */
INLINE void rank_tile(int nb, int64_t last, float *restrict w, int64_t ldw, int64_t n, const float *restrict g,
                      int64_t ldg, const float *restrict below, int64_t ldb, float alpha, int64_t b0, int64_t j0) {
    const int nv = 1;
    v16 rows[20];
    for (int b = 0; b < nb; b++) rows[b] = LOAD(below + (b0 + b) * ldb + j0, 0);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int b = 0; b < nb; b++) {
            const float *gb = g + (b0 + b) * ldg + i;
            s0 += gb[0] * rows[b];
            s1 += gb[1] * rows[b];
            s2 += gb[2] * rows[b];
            s3 += gb[3] * rows[b];
        }
        float *row = w + i * ldw + j0;
        STORE(row, 0, LOAD(row, 0) + alpha * s0);
        STORE(row + ldw, 0, LOAD(row + ldw, 0) + alpha * s1);
        STORE(row + 2 * ldw, 0, LOAD(row + 2 * ldw, 0) + alpha * s2);
        STORE(row + 3 * ldw, 0, LOAD(row + 3 * ldw, 0) + alpha * s3);
    }
    for (; i < n; i++) {
        v16 sum = {0};
        for (int b = 0; b < nb; b++) sum += g[(b0 + b) * ldg + i] * rows[b];
        STORE(w + i * ldw + j0, 0, LOAD(w + i * ldw + j0, 0) + alpha * sum);
    }
}

#define AXPY_BATCH 10 /* batch rows per tile: 10 x 2 vectors of sums in registers */
#define RANK_BATCH 20 /* batch rows whose values sit in registers during the update */

/* For W (n x k, ldw), g (batch x n, ldg) and below (batch x k, ldb): grad_below = g W with the
 * weight as it was, times below (1 - below) where ``sigmoid_below`` is nonzero (the gradient
 * through the lower layer's sigmoid), then W += alpha g^T below; each 32-column strip of W is
 * read for the first from memory and for the second from L2. */
void backward_and_update(float *restrict w, int64_t n, int64_t k, int64_t ldw, const float *restrict g, int64_t batch,
                         int64_t ldg, const float *restrict below, int64_t ldb, int64_t sigmoid_below,
                         float *restrict grad_below, int64_t ldo, float alpha) {
    int64_t strips = (k + 31) / 32;
#pragma omp parallel for schedule(static)
    for (int64_t strip = 0; strip < strips; strip++) {
        int64_t j0 = strip * 32, width = k - j0 < 32 ? k - j0 : 32;
        int64_t nv = (width + 15) / 16, last = width % 16 ? width % 16 : 16;
        for (int64_t b0 = 0; b0 < batch; b0 += AXPY_BATCH) {
            int64_t nb = batch - b0 < AXPY_BATCH ? batch - b0 : AXPY_BATCH;
#define AXPY(V, B) axpy_tile(V, B, last, g, ldg, w, ldw, n, b0, j0, grad_below, ldo)
#define AXPY_NB(V)                                                                                         \
    switch (nb) {                                                                                          \
        case 10: AXPY(V, 10); break; case 9: AXPY(V, 9); break; case 8: AXPY(V, 8); break;                 \
        case 7: AXPY(V, 7); break; case 6: AXPY(V, 6); break; case 5: AXPY(V, 5); break;                   \
        case 4: AXPY(V, 4); break; case 3: AXPY(V, 3); break; case 2: AXPY(V, 2); break;                   \
        default: AXPY(V, 1); break;                                                                        \
    }
            if (width == 32) {
                const int64_t last = 16; /* a constant: no partial-vector tests in the loop */
                AXPY_NB(2);
            } else if (nv == 2) {
                AXPY_NB(2);
            } else {
                AXPY_NB(1);
            }
#undef AXPY_NB
#undef AXPY
        }
        if (sigmoid_below)
            for (int64_t b = 0; b < batch; b++)
                for (int64_t j = j0; j < j0 + width; j++) {
                    float y = below[b * ldb + j];
                    grad_below[b * ldo + j] *= y * (1.0f - y);
                }
        for (int64_t half = 0; half < nv; half++) {
            int64_t c0 = j0 + 16 * half, half_last = half == nv - 1 ? last : 16;
            for (int64_t b0 = 0; b0 < batch; b0 += RANK_BATCH) {
                int64_t nb = batch - b0 < RANK_BATCH ? batch - b0 : RANK_BATCH;
                if (half_last == 16 && nb == 20) { /* the default batch, constants throughout */
                    rank_tile(20, 16, w, ldw, n, g, ldg, below, ldb, alpha, b0, c0);
                    continue;
                }
#define RANK(B) rank_tile(B, half_last, w, ldw, n, g, ldg, below, ldb, alpha, b0, c0)
                switch (nb) {
                    case 20: RANK(20); break; case 19: RANK(19); break; case 18: RANK(18); break;
                    case 17: RANK(17); break; case 16: RANK(16); break; case 15: RANK(15); break;
                    case 14: RANK(14); break; case 13: RANK(13); break; case 12: RANK(12); break;
                    case 11: RANK(11); break; case 10: RANK(10); break; case 9: RANK(9); break;
                    case 8: RANK(8); break; case 7: RANK(7); break; case 6: RANK(6); break;
                    case 5: RANK(5); break; case 4: RANK(4); break; case 3: RANK(3); break;
                    case 2: RANK(2); break; default: RANK(1); break;
                }
#undef RANK
            }
        }
    }
}
