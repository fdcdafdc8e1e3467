/* Fused CPU kernels of the streaming engine: each reads the stored T+1 input pieces once and does in one loop
 * what the tensor functions of hubmerge.methods do in several passes over float32 temporaries.
 *
 * They must give the same bits as those functions (tests/test_fused.py compares them), so: IEEE float32
 * arithmetic in the same operand order, no contraction into FMA, no fast-math; every conversion exact.
 * Each call handles the entries [start, end) of flat pieces; the caller splits a piece across threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { MEAN = 0, SUM = 1, MAX = 2, SIGNS_ONLY = -1 };
#define BLOCK 512
#define LOW_BUCKETS 65536

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0x1f) return from_bits(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) return from_bits(sign | to_bits((float)mantissa * 0x1p-24f)); /* exact: < 2^24 */
    return from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

/* NaN/±Inf entries that `load` met on this thread since the last hm_take_nonfinite: every kernel loads every
 * input entry, so the engine learns whether a piece holds one without a pass of its own. */
static _Thread_local int64_t nonfinite_loaded = 0;

/* entries [start, start + count) of a flat piece of `dtype`, as float32 */
static void load(const void *src, int32_t dtype, int64_t start, int64_t count, float *out) {
    int64_t nonfinite = 0;
    if (dtype == F32) {
        memcpy(out, (const float *)src + start, (size_t)count * 4);
        const uint32_t *s = (const uint32_t *)src + start;
        for (int64_t i = 0; i < count; i++) nonfinite += (s[i] & 0x7f800000u) == 0x7f800000u;
    } else if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t i = 0; i < count; i++) {
            out[i] = from_bits((uint32_t)s[i] << 16);
            nonfinite += (s[i] & 0x7f80) == 0x7f80;
        }
    } else {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t i = 0; i < count; i++) {
            out[i] = half_to_float(s[i]);
            nonfinite += (s[i] & 0x7c00) == 0x7c00;
        }
    }
    nonfinite_loaded += nonfinite;
}

int64_t hm_take_nonfinite(void) {
    int64_t taken = nonfinite_loaded;
    nonfinite_loaded = 0;
    return taken;
}

static inline float maximum(float a, float b) { /* torch.maximum: NaN wins */
    if (a != a) return a;
    if (b != b) return b;
    return a > b ? a : b;
}

/* Radix-selection histograms of |τ_t| = |θ_t − θ0| bit patterns, added into hist[t * bins + code].
 * buckets == NULL: the top 16 bits (pass A1); otherwise the low-bits code of task t's bucket: 0 below it,
 * 1 + the low 16 bits inside it, LOW_BUCKETS + 1 above it (pass A2). Neighbouring entries often share a
 * bin, so the top-bits counts go to SPREAD interleaved copies (an increment need not wait for the previous
 * one to the same counter; uint32, as one call counts one piece), and the low-bits pass counts below/above
 * its bucket without a histogram. Returns -1 when the copies cannot be allocated, else 0. */
#define SPREAD 4
#define HIGH_BINS 32768
int32_t hm_histograms(const void *base, int32_t base_dtype, const void *const *thetas,
                      const int32_t *theta_dtypes, int32_t tasks, int64_t start, int64_t end,
                      const int32_t *buckets, int64_t bins, int64_t *hist) {
    float b[BLOCK], theta[BLOCK];
    uint32_t bits[BLOCK];
    uint32_t *spread = buckets == NULL ? calloc((size_t)tasks * SPREAD * HIGH_BINS, sizeof(uint32_t)) : NULL;
    if (buckets == NULL && spread == NULL) return -1; /* 512 KiB per task */
    for (int64_t at = start; at < end; at += BLOCK) {
        int64_t count = end - at < BLOCK ? end - at : BLOCK;
        load(base, base_dtype, at, count, b);
        for (int32_t t = 0; t < tasks; t++) {
            load(thetas[t], theta_dtypes[t], at, count, theta);
            for (int64_t i = 0; i < count; i++) bits[i] = to_bits(theta[i] - b[i]) & 0x7fffffffu;
            int64_t *h = hist + (int64_t)t * bins;
            if (buckets == NULL) {
                uint32_t *copies = spread + (size_t)t * SPREAD * HIGH_BINS;
                for (int64_t i = 0; i < count; i++) copies[(i % SPREAD) * HIGH_BINS + (bits[i] >> 16)]++;
            } else {
                uint32_t low = (uint32_t)buckets[t] << 16, high = low + LOW_BUCKETS; /* buckets < 2^15 */
                int64_t below = 0, above = 0;
                for (int64_t i = 0; i < count; i++) {
                    below += bits[i] < low;
                    above += bits[i] >= high;
                }
                h[0] += below;
                h[LOW_BUCKETS + 1] += above;
                if (below + above < count) {
                    for (int64_t i = 0; i < count; i++)
                        if (bits[i] >= low && bits[i] < high) h[bits[i] - low + 1]++;
                }
            }
        }
    }
    if (spread != NULL) {
        for (int32_t t = 0; t < tasks; t++)
            for (int64_t code = 0; code < HIGH_BINS; code++)
                for (int c = 0; c < SPREAD; c++)
                    hist[(int64_t)t * bins + code] += spread[((size_t)t * SPREAD + c) * HIGH_BINS + code];
        free(spread);
    }
    return 0;
}

/* TIES: trim (|τ| >= threshold, kept as mask·τ; trim[t] == 0 keeps the task whole), elect the sign of the
 * task-order float32 sum, resolve 0 signs to `majority`, disjoint merge. Writes τ_MTL, or θ0 + α·τ_MTL with
 * `apply`, into out[i - start] (nothing with merge == SIGNS_ONLY); returns Σ of the elected signs, or
 * INT64_MIN when its buffer cannot be allocated. */
int64_t hm_ties(const void *base, int32_t base_dtype, const void *const *thetas, const int32_t *theta_dtypes,
                int32_t tasks, int64_t start, int64_t end, const float *thresholds, const uint8_t *trim,
                float majority, int32_t merge, int32_t apply, float scaling, float *out) {
    float b[BLOCK], theta[BLOCK], total[BLOCK], direction[BLOCK], summed[BLOCK], kept[BLOCK], largest[BLOCK];
    float *trimmed = malloc(sizeof(float) * BLOCK * (size_t)tasks);
    int64_t signs = 0;
    if (trimmed == NULL) return INT64_MIN;
    for (int64_t at = start; at < end; at += BLOCK) {
        int64_t count = end - at < BLOCK ? end - at : BLOCK;
        load(base, base_dtype, at, count, b);
        for (int32_t t = 0; t < tasks; t++) {
            float *tr = trimmed + (size_t)t * BLOCK, thr = thresholds[t];
            load(thetas[t], theta_dtypes[t], at, count, theta);
            if (trim[t]) {
                for (int64_t i = 0; i < count; i++) {
                    float tau = theta[i] - b[i];
                    float magnitude = from_bits(to_bits(tau) & 0x7fffffffu);
                    tr[i] = (magnitude >= thr ? 1.0f : 0.0f) * tau;
                }
            } else {
                for (int64_t i = 0; i < count; i++) tr[i] = theta[i] - b[i];
            }
            if (t == 0) {
                for (int64_t i = 0; i < count; i++) total[i] = tr[i] + 0.0f;
            } else {
                for (int64_t i = 0; i < count; i++) total[i] = total[i] + tr[i];
            }
        }
        for (int64_t i = 0; i < count; i++) {
            int32_t sign = (total[i] > 0.0f) - (total[i] < 0.0f); /* torch.sign: 0 for NaN */
            signs += sign;
            direction[i] = (sign == 0 ? majority : (float)sign) > 0.0f ? 1.0f : -1.0f;
            total[i] = sign == 0 ? majority : (float)sign; /* the resolved sign, until the merge below */
        }
        if (merge == SIGNS_ONLY) continue;
        for (int32_t t = 0; t < tasks; t++) {
            const float *tr = trimmed + (size_t)t * BLOCK;
            for (int64_t i = 0; i < count; i++) {
                float selected = (tr[i] * direction[i] > 0.0f ? 1.0f : 0.0f) * tr[i];
                if (merge == MAX) {
                    float magnitude = from_bits(to_bits(selected) & 0x7fffffffu);
                    largest[i] = t == 0 ? magnitude : maximum(largest[i], magnitude);
                } else {
                    if (merge == MEAN) kept[i] = (t == 0 ? 0.0f : kept[i]) + (selected != 0.0f ? 1.0f : 0.0f);
                    summed[i] = t == 0 ? selected + 0.0f : summed[i] + selected;
                }
            }
        }
        for (int64_t i = 0; i < count; i++) {
            float merged;
            if (merge == MAX)
                merged = largest[i] * total[i];
            else if (merge == MEAN)
                merged = summed[i] / (kept[i] < 1.0f ? 1.0f : kept[i]);
            else
                merged = summed[i];
            out[at - start + i] = apply ? b[i] + merged * scaling : merged;
        }
    }
    free(trimmed);
    return signs;
}

/* TALL masks m_t = |τ_t| > λ_t·|(θ0 + τ_MTL) − θ_t| with their statistics, and the Consensus filter.
 * tau_in: τ_MTL, or NULL for the task-order sum of the τ_t (Task Arithmetic). masks (bool, may be NULL): task
 * t's entry i at masks[t * mask_stride + i - start]. consensus_k < 0: no filter; otherwise τ_MTL is kept
 * (times 1.0, else 0.0) where at least k masks agree. out (may be NULL): the filtered τ_MTL, or θ0 + α·τ_MTL
 * with `apply`. stats, added to: how many masks contain each entry as a histogram (T + 1 counts) over the
 * entries where every τ_t is 0, the same over the others, each mask's size (T), the entries kept by the
 * consensus filter (1). At most 254 tasks (uint8 counts). */
void hm_tall(const void *base, int32_t base_dtype, const void *const *thetas, const int32_t *theta_dtypes,
             int32_t tasks, int64_t start, int64_t end, const float *tau_in, const float *lambdas,
             int32_t consensus_k, uint8_t *masks, int64_t mask_stride, int32_t apply, float scaling, float *out,
             int64_t *stats) {
    float b[BLOCK], theta[BLOCK], tau[BLOCK], mtl[BLOCK], multi[BLOCK];
    uint8_t agree[BLOCK], active[BLOCK], mask[BLOCK];
    int64_t *histogram_inactive = stats, *histogram_active = stats + tasks + 1, *kept = stats + 2 * (tasks + 1);
    for (int64_t at = start; at < end; at += BLOCK) {
        int64_t count = end - at < BLOCK ? end - at : BLOCK;
        load(base, base_dtype, at, count, b);
        if (tau_in != NULL) {
            memcpy(mtl, tau_in + (at - start), (size_t)count * 4);
        } else {
            for (int32_t t = 0; t < tasks; t++) {
                load(thetas[t], theta_dtypes[t], at, count, theta);
                for (int64_t i = 0; i < count; i++) {
                    float tau_t = theta[i] - b[i];
                    mtl[i] = t == 0 ? tau_t + 0.0f : mtl[i] + tau_t;
                }
            }
        }
        for (int64_t i = 0; i < count; i++) multi[i] = b[i] + mtl[i];
        memset(agree, 0, sizeof agree);
        memset(active, 0, sizeof active);
        for (int32_t t = 0; t < tasks; t++) {
            float lambda = lambdas[t];
            int64_t size = 0;
            load(thetas[t], theta_dtypes[t], at, count, theta);
            for (int64_t i = 0; i < count; i++) {
                tau[i] = theta[i] - b[i];
                float distance = from_bits(to_bits(multi[i] - theta[i]) & 0x7fffffffu) * lambda;
                mask[i] = from_bits(to_bits(tau[i]) & 0x7fffffffu) > distance;
                agree[i] += mask[i];
                active[i] |= tau[i] != 0.0f;
                size += mask[i];
            }
            kept[t] += size;
            if (masks != NULL) memcpy(masks + (int64_t)t * mask_stride + (at - start), mask, (size_t)count);
        }
        for (int64_t i = 0; i < count; i++) (active[i] ? histogram_active : histogram_inactive)[agree[i]]++;
        if (consensus_k >= 0) {
            int64_t filtered = 0;
            for (int64_t i = 0; i < count; i++) {
                uint8_t keep = agree[i] >= consensus_k;
                filtered += keep;
                mtl[i] = mtl[i] * (keep ? 1.0f : 0.0f);
            }
            kept[tasks] += filtered;
        }
        if (out != NULL) {
            for (int64_t i = 0; i < count; i++) out[at - start + i] = apply ? b[i] + mtl[i] * scaling : mtl[i];
        }
    }
}

/* Task Arithmetic: the task-order float32 sum of the τ_t (from +0.0), or θ0 + α·Σ τ_t with `apply`, into
 * out[i - start]. */
void hm_sum(const void *base, int32_t base_dtype, const void *const *thetas, const int32_t *theta_dtypes,
            int32_t tasks, int64_t start, int64_t end, int32_t apply, float scaling, float *out) {
    float b[BLOCK], theta[BLOCK], total[BLOCK];
    for (int64_t at = start; at < end; at += BLOCK) {
        int64_t count = end - at < BLOCK ? end - at : BLOCK;
        load(base, base_dtype, at, count, b);
        for (int32_t t = 0; t < tasks; t++) {
            load(thetas[t], theta_dtypes[t], at, count, theta);
            for (int64_t i = 0; i < count; i++) {
                float tau = theta[i] - b[i];
                total[i] = t == 0 ? tau + 0.0f : total[i] + tau;
            }
        }
        for (int64_t i = 0; i < count; i++) out[at - start + i] = apply ? b[i] + total[i] * scaling : total[i];
    }
}

/* Entries of [start, end) of a flat piece that are NaN or ±Inf: every exponent bit set. */
int64_t hm_nonfinite(const void *src, int32_t dtype, int64_t start, int64_t end) {
    int64_t count = 0;
    if (dtype == F32) {
        const uint32_t *s = (const uint32_t *)src;
        for (int64_t i = start; i < end; i++) count += (s[i] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *s = (const uint16_t *)src;
        const uint16_t exponent = dtype == BF16 ? 0x7f80 : 0x7c00;
        for (int64_t i = start; i < end; i++) count += (s[i] & exponent) == exponent;
    }
    return count;
}

/* float32 -> bfloat16 bits, rounded to nearest even as torch's vectorized cast rounds (a NaN -> 0xffff);
 * branch-free, so that loops over it vectorize */
static inline uint16_t bfloat16_bits(float f) {
    uint32_t u = to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u);
    return (uint16_t)((rounded & ~nan) | (0xffffu & nan));
}

static inline float entry(const void *src, int32_t dtype, int64_t i) {
    if (dtype == F32) return ((const float *)src)[i];
    uint16_t h = ((const uint16_t *)src)[i];
    return dtype == BF16 ? from_bits((uint32_t)h << 16) : half_to_float(h);
}

/* θ0 + τ where `keep` is all ones, θ0 where it is zero, chosen without a branch (a random mask would defeat
 * the branch predictor), rounded to `stored`, put at out[i] in `out_dtype`; a bfloat16 output is rounded
 * once, which equals rounding to `stored` first */
static inline void rebuild_entry(float b, float t, uint32_t keep, int32_t stored, void *out, int32_t out_dtype,
                                 int64_t i) {
    float v = from_bits((to_bits(b + t) & keep) | (to_bits(b) & ~keep));
    if (out_dtype == BF16)
        ((uint16_t *)out)[i] = bfloat16_bits(v);
    else
        ((float *)out)[i] = stored == BF16 ? from_bits((uint32_t)bfloat16_bits(v) << 16) : v;
}

/* spread[b][k]: all ones where bit k of byte b is set, counting from the most significant bit */
static uint32_t spread[256][8];

__attribute__((constructor)) static void fill_spread(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 8; k++) spread[b][k] = 0u - (uint32_t)((b >> (7 - k)) & 1);
}

static inline __attribute__((always_inline)) void rebuild_range(const void *restrict base, int32_t base_dtype,
                                                                const void *restrict tau, int32_t tau_dtype,
                                                                const uint8_t *restrict packed, int64_t start,
                                                                int64_t end, int32_t stored, void *restrict out,
                                                                int32_t out_dtype) {
    uint32_t keep[BLOCK]; /* the mask bits of a block as all-ones/zero words: the entry loop then vectorizes */
    for (int64_t at = start; at < end; at += BLOCK) {
        int64_t count = end - at < BLOCK ? end - at : BLOCK;
        for (int64_t i = 0; i < count; i += 8) memcpy(keep + i, spread[packed[(at + i) >> 3]], sizeof spread[0]);
        for (int64_t i = 0; i < count; i++)
            rebuild_entry(entry(base, base_dtype, at + i), entry(tau, tau_dtype, at + i), keep[i], stored, out,
                          out_dtype, at + i);
    }
}

/* Entries [start, end) of one task's tensor rebuilt from an artifact (`artifacts.rebuild`): θ0 + τ where the
 * task's mask bit is set, θ0 elsewhere, in float32; rounded to `stored` (the dtype the task's model stores
 * it in), then written to out[i] in `out_dtype`. `packed` holds the bits of the whole piece, first entry
 * in the most significant bit (numpy.packbits); `start` is a multiple of 8. `stored` and `out_dtype` are
 * F32 or BF16. One pass, a block at a time: the block's mask bits spread into words, then one loop over
 * the entries, which the compiler vectorizes; the usual dtype combinations get loops of their own. */
void hm_rebuild(const void *base, int32_t base_dtype, const void *tau, int32_t tau_dtype, const uint8_t *packed,
                int64_t start, int64_t end, int32_t stored, void *out, int32_t out_dtype) {
    if (base_dtype == F32 && tau_dtype == F32 && stored == F32 && out_dtype == F32)
        rebuild_range(base, F32, tau, F32, packed, start, end, F32, out, F32);
    else if (base_dtype == BF16 && tau_dtype == BF16 && out_dtype == BF16)
        rebuild_range(base, BF16, tau, BF16, packed, start, end, BF16, out, BF16);
    else if (base_dtype == BF16 && tau_dtype == F32 && out_dtype == BF16)
        rebuild_range(base, BF16, tau, F32, packed, start, end, BF16, out, BF16);
    else
        rebuild_range(base, base_dtype, tau, tau_dtype, packed, start, end, stored, out, out_dtype);
}
