/* A C reward module for the dynamic-library tests, built by the test with `cc -shared`.
 * -DABI_VERSION_OVERRIDE=N reports another ABI version; -DNO_SCORE omits the score symbol.
 * Score: the completion's length; "NAN" -> NaN, "FAIL" -> NR_SCORE_FAILED, "BADRC" -> 7. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "nested_reft_reward.h"

#ifndef ABI_VERSION_OVERRIDE
#define ABI_VERSION_OVERRIDE NESTED_REFT_REWARD_ABI_VERSION
#endif

typedef struct { double scale; } state;

static int is(nr_str s, const char *lit) {
    return s.len == strlen(lit) && memcmp(s.ptr, lit, s.len) == 0;
}

static void put(nr_output *out, const char *msg) {
    size_t n = strlen(msg);
    if (n > out->msg_cap) n = out->msg_cap;
    memcpy(out->msg, msg, n);
    out->msg_len = n;
}

uint32_t nested_reft_reward_abi_version(void) { return ABI_VERSION_OVERRIDE; }

void *nested_reft_reward_create(nr_str config, uint8_t *err, size_t err_cap, size_t *err_len) {
    if (is(config, "\"refuse\"")) {
        const char *m = "this config is refused";
        size_t n = strlen(m) < err_cap ? strlen(m) : err_cap;
        memcpy(err, m, n);
        *err_len = n;
        return NULL;
    }
    state *s = malloc(sizeof *s);
    s->scale = is(config, "2") ? 2.0 : 1.0;
    return s;
}

#ifndef NO_SCORE
int32_t nested_reft_reward_score(void *st, const nr_sample *sample, nr_output *out) {
    state *s = st;
    if (is(sample->completion, "FAIL")) { put(out, "refusing this sample"); return NR_SCORE_FAILED; }
    if (is(sample->completion, "BADRC")) return 7;
    out->score = is(sample->completion, "NAN") ? NAN : s->scale * (double)sample->completion.len;
    put(out, sample->metadata_json.len ? "with-metadata" : "");
    return NR_SCORE_OK;
}
#endif

void nested_reft_reward_destroy(void *st) { free(st); }
