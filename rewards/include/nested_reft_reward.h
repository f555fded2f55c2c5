/* C ABI of nested-reft dynamic-library reward modules, version 1.
 * See rewards/src/abi.rs for the contract (ownership, threading, error reporting). */
#ifndef NESTED_REFT_REWARD_H
#define NESTED_REFT_REWARD_H

#include <stddef.h>
#include <stdint.h>

#define NESTED_REFT_REWARD_ABI_VERSION 1u
#define NR_SCORE_OK 0
#define NR_SCORE_FAILED 1

typedef struct { const uint8_t *ptr; size_t len; } nr_str;          /* UTF-8, not NUL-terminated */
typedef struct { nr_str prompt, completion, reference, metadata_json; } nr_sample;
typedef struct { double score; uint8_t *msg; size_t msg_cap; size_t msg_len; } nr_output;

uint32_t nested_reft_reward_abi_version(void);
void *nested_reft_reward_create(nr_str config_json, uint8_t *err, size_t err_cap, size_t *err_len);
int32_t nested_reft_reward_score(void *state, const nr_sample *sample, nr_output *out);
void nested_reft_reward_destroy(void *state);

#endif
