/* The CPU training steps' elementwise parts, each fused into one pass (sda/native.py builds this).
 *
 * At batch 32 the matrix products leave ~200 us of a ~1 ms pretraining step to a dozen small torch
 * ops, each a separate pass over the batch plus Python's launch cost (bench/README.md). Every
 * function here is single-threaded: its data fits in L1/L2, and a second OpenMP runtime beside
 * torch's would fight it for the two cores. float32, row-major, contiguous arrays only; the
 * Python side checks that before calling.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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
