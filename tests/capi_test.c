/* The C API from C11, as a host program uses it: zo2-tune makes a tiny model, then
 * load → 5 steps → eval → save → reload the saved checkpoint → eval, and the reloaded
 * model reproduces the session's eval loss exactly (save flushed the pending update);
 * plus the seed log, the plan query and a few error cases; and the update rules as
 * session params: zo-adam with bf16 state (its state saved as optimizer_state.safetensors
 * and loaded again with resume_state, continuing exactly) and zo-sgd-cons. Compiled with
 * -std=c11 -Wall -Wextra -pedantic, so this file also checks that zo2.h is clean C.
 *
 *   zo2_capi_test <work dir>     (created if needed; removed on success)
 */
#define _POSIX_C_SOURCE 200809L
#include "zo2.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifndef ZO2_TUNE_PATH
#error "ZO2_TUNE_PATH must name the zo2-tune executable"
#endif

static int g_failures = 0;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, zo2_last_error());                                                  \
            ++g_failures;                                                                      \
        }                                                                                      \
    } while (0)

#define REQUIRE(cond)                                                                          \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, zo2_last_error());                                                  \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

enum { N_SEQ = 2, N_TOKENS = 16 };

static int64_t g_last_step = -1;

static int count_steps(int64_t step, const zo2_step_result * r, void * user_data) {
    int * calls = (int *) user_data;
    ++*calls;
    g_last_step = step;
    (void) r;
    return 0;
}

/* Whether the file at path contains text (read whole; small files only). */
static int file_contains(const char * path, const char * text) {
    FILE * f = fopen(path, "rb");
    char * buf;
    long n;
    int found;
    if (!f) return 0;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return 0;
    }
    buf = (char *) malloc((size_t) n + 1);
    if (!buf) {
        fclose(f);
        return 0;
    }
    buf[fread(buf, 1, (size_t) n, f)] = '\0';
    fclose(f);
    found = strstr(buf, text) != NULL;
    free(buf);
    return found;
}

static int file_exists(const char * path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static int count_lines(const char * path) {
    FILE * f = fopen(path, "r");
    int lines = 0, c;
    if (!f) return -1;
    while ((c = fgetc(f)) != EOF)
        if (c == '\n') ++lines;
    fclose(f);
    return lines;
}

static zo2_session_params test_params(const char * seed_log) {
    zo2_session_params sp = zo2_session_default_params();
    sp.lr = 1e-3f;
    sp.eps = 1e-3f;
    sp.seed = 42;
    sp.max_seqs = N_SEQ;
    sp.max_seq_len = N_TOKENS;
    sp.n_threads = 2;
    sp.seed_log_path = seed_log;
    return sp;
}

/* The update rules through the params' trailing fields (README "Update rules").
 * zo-adam with bf16 state: 5 steps, save (the state lands in the checkpoint as
 * optimizer_state.safetensors, the seed log names the rule), then one more step two ways —
 * in the same session, and in a session opened on the saved checkpoint with resume_state
 * and first_step 5 — gives the same loss bit for bit. zo-sgd-cons: steps, a finite g,
 * a save without a state file. */
static int rule_runs(const char * work, zo2_model * model, const zo2_batch * batch) {
    char dir[1100], log[1100], state[1200], cfg[1200];
    zo2_step_result r;
    float loss_continued = 0.0f, loss_resumed = -1.0f;
    int i;

    /* ---- zo-adam, bf16 state ---- */
    snprintf(dir, sizeof dir, "%s/adam", work);
    snprintf(log, sizeof log, "%s/adam_seed_log.jsonl", work);
    snprintf(state, sizeof state, "%s/current/optimizer_state.safetensors", dir);
    {
        zo2_session_params p = test_params(log);
        zo2_session * s = NULL;
        p.optimizer = "zo-adam";
        p.state_dtype = "bf16";
        p.lr = 1e-4f;
        REQUIRE(zo2_session_init(model, &p, &s) == 0);
        for (i = 0; i < 5; ++i) {
            memset(&r, 0, sizeof r);
            CHECK(zo2_session_step(s, batch, &r) == 0);
            CHECK(r.loss_plus > 0.0f && r.loss_minus > 0.0f && r.loss_plus != r.loss_minus);
            CHECK(r.projected_grad == r.projected_grad); /* not NaN */
        }
        CHECK(zo2_session_save(s, dir) == 0);
        CHECK(file_exists(state));
        CHECK(count_lines(log) == 1 + 5);
        CHECK(file_contains(log, "zo-adam"));
        CHECK(file_contains(log, "bf16"));
        memset(&r, 0, sizeof r);
        CHECK(zo2_session_step(s, batch, &r) == 0);
        CHECK(zo2_session_eval(s, batch, &loss_continued) == 0);
        zo2_session_free(s);
    }
    {
        zo2_model * saved = NULL;
        zo2_session_params p = test_params(NULL);
        zo2_session * s = NULL;
        p.optimizer = "zo-adam";
        p.state_dtype = "bf16";
        p.lr = 1e-4f;
        p.resume_state = 1;
        p.first_step = 5;
        REQUIRE(zo2_model_load(dir, NULL, &saved) == 0);
        REQUIRE(zo2_session_init(saved, &p, &s) == 0);
        zo2_model_free(saved);
        CHECK(zo2_session_step_index(s) == 5);
        CHECK(zo2_session_step(s, batch, &r) == 0);
        CHECK(zo2_session_eval(s, batch, &loss_resumed) == 0);
        CHECK(memcmp(&loss_resumed, &loss_continued, sizeof(float)) == 0);
        if (loss_resumed != loss_continued)
            fprintf(stderr, "adam: continued %.9g, resumed %.9g\n", (double) loss_continued, (double) loss_resumed);
        zo2_session_free(s);
    }
    /* resume_state without the file: a fresh model directory has none, and init says so. */
    {
        zo2_session_params p = test_params(NULL);
        zo2_session * s = (zo2_session *) 1;
        char model_dir[1100];
        snprintf(model_dir, sizeof model_dir, "%s/model", work);
        zo2_model * base = NULL;
        REQUIRE(zo2_model_load(model_dir, NULL, &base) == 0);
        p.optimizer = "zo-adam";
        p.resume_state = 1;
        CHECK(zo2_session_init(base, &p, &s) == ZO2_ERR_FORMAT);
        CHECK(s == NULL);
        CHECK(strstr(zo2_last_error(), "optimizer_state.safetensors") != NULL);
        zo2_model_free(base);
    }

    /* ---- zo-sgd-cons ---- */
    snprintf(dir, sizeof dir, "%s/cons", work);
    snprintf(log, sizeof log, "%s/cons_seed_log.jsonl", work);
    snprintf(state, sizeof state, "%s/current/optimizer_state.safetensors", dir);
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    {
        zo2_session_params p = test_params(log);
        zo2_session * s = NULL;
        float before = 0.0f, after = 0.0f;
        p.optimizer = "zo-sgd-cons";
        REQUIRE(zo2_session_init(model, &p, &s) == 0);
        CHECK(zo2_session_eval(s, batch, &before) == 0);
        for (i = 0; i < 5; ++i) {
            memset(&r, 0, sizeof r);
            CHECK(zo2_session_step(s, batch, &r) == 0);
            CHECK(r.loss_plus > 0.0f && r.loss_minus > 0.0f);
            CHECK(r.projected_grad == r.projected_grad);
        }
        CHECK(zo2_session_step_index(s) == 5);
        CHECK(zo2_session_eval(s, batch, &after) == 0);
        /* conservative: each step keeps the best of θ, θ − lr·g·z, θ + lr·g·z on this batch,
         * so the loss on it cannot rise (up to the rounding of a candidate's weights) */
        CHECK(after <= before * (1.0f + 1e-5f));
        CHECK(zo2_session_save(s, dir) == 0);
        CHECK(file_exists(cfg));
        CHECK(!file_exists(state)); /* no state to save */
        CHECK(count_lines(log) == 1 + 5);
        CHECK(file_contains(log, "zo-sgd-cons"));
        CHECK(file_contains(log, "\"choice\""));
        zo2_session_free(s);
    }
    return 0;
}

int main(int argc, char ** argv) {
    char work[1024], model_dir[1100], tuned_dir[1100], seed_log[1100], cmd[4096];
    snprintf(work, sizeof work, "%s", argc > 1 ? argv[1] : "zo2_capi_test_work");
    snprintf(model_dir, sizeof model_dir, "%s/model", work);
    snprintf(tuned_dir, sizeof tuned_dir, "%s/tuned", work);
    snprintf(seed_log, sizeof seed_log, "%s/seed_log.jsonl", work);

    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && '%s' init --preset opt-tiny --out '%s' --seed 1 -q",
             work, work, ZO2_TUNE_PATH, model_dir);
    REQUIRE(system(cmd) == 0);

    CHECK(strlen(zo2_version()) > 0);
    zo2_log_set_level(ZO2_LOG_WARN);

    /* ---- load → 5 steps → eval → save ---- */
    zo2_model * model = NULL;
    REQUIRE(zo2_model_load(model_dir, NULL, &model) == 0);
    REQUIRE(model != NULL);
    CHECK(zo2_model_n_vocab(model) == 512);
    CHECK(zo2_model_n_layer(model) == 2);
    CHECK(zo2_model_n_ctx(model) >= N_TOKENS);
    CHECK(zo2_model_n_params(model) > 0);

    zo2_session_params sp = test_params(seed_log);
    int calls = 0;
    sp.progress_callback = count_steps;
    sp.progress_user_data = &calls;

    zo2_plan_result plan;
    zo2_session * s0 = NULL;
    CHECK(zo2_plan(model, &sp, &plan) == 0);
    CHECK(plan.n_blocks == 2);
    CHECK(plan.n_resident + plan.n_streamed == 2);
    CHECK(plan.device_bytes > 0 && plan.device_bytes <= plan.cap_bytes);
    CHECK(plan.minimum_cap_bytes > 0 && plan.minimum_cap_bytes <= plan.device_bytes);

    /* A parallel layout's rank beside one process: half the passes per direction group, the
     * write-back sliced among the node's ranks, one shared host image. */
    {
        zo2_session_params pp = sp;
        zo2_parallel_plan_result par;
        pp.parallel = "perturbation=2,directions=2";
        pp.directions = 2;
        pp.offload = ZO2_OFFLOAD_ALL;
        CHECK(zo2_plan_parallel(model, &pp, 4, &par) == 0);
        CHECK(par.ranks == 4 && par.perturbation == 2 && par.directions == 2 && par.data == 1);
        CHECK(par.ranks_per_node == 4);
        CHECK(par.forward_share > 0.24 && par.forward_share < 0.26);
        CHECK(par.single.h2d_bytes_per_step == 2 * par.rank.h2d_bytes_per_step);
        CHECK(par.rank.d2h_bytes_per_step * 4 >= par.single.d2h_bytes_per_step);
        CHECK(par.rank.d2h_bytes_per_step < par.single.d2h_bytes_per_step);
        CHECK(par.host_bytes_per_node == par.single.host_bytes);
        pp.parallel = "data=3,tensor=2";
        CHECK(zo2_plan_parallel(model, &pp, 4, &par) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "unknown factor 'tensor'") != NULL);
        pp.parallel = "data=2";
        CHECK(zo2_session_init(model, &pp, &s0) == ZO2_ERR_INVALID_ARGUMENT); /* one process, two ranks asked */
        CHECK(strstr(zo2_last_error(), "the run has 1 rank") != NULL);
    }

    zo2_session * s = NULL;
    REQUIRE(zo2_session_init(model, &sp, &s) == 0);
    REQUIRE(s != NULL);
    CHECK(zo2_session_step_index(s) == 0);
    {
        int32_t rank = -1, size = -1;
        CHECK(zo2_session_rank(s, &rank, &size) == 0);
        CHECK(rank == 0 && size == 1);
    }

    int32_t tokens[N_SEQ * N_TOKENS];
    const int32_t n_vocab = zo2_model_n_vocab(model);
    for (int i = 0; i < N_SEQ * N_TOKENS; ++i) tokens[i] = (int32_t) ((i * 37 + 11) % n_vocab);
    const zo2_batch batch = { N_SEQ, N_TOKENS, tokens, NULL, NULL };

    float loss_before = 0.0f;
    CHECK(zo2_session_eval(s, &batch, &loss_before) == 0);
    CHECK(loss_before > 0.0f);

    for (int i = 0; i < 5; ++i) {
        zo2_step_result r;
        memset(&r, 0, sizeof r);
        CHECK(zo2_session_step(s, &batch, &r) == 0);
        CHECK(r.loss_plus > 0.0f && r.loss_minus > 0.0f);
        CHECK(r.loss_plus != r.loss_minus);
    }
    CHECK(calls == 5);
    CHECK(g_last_step == 4);
    CHECK(zo2_session_step_index(s) == 5);
    CHECK(zo2_session_set_lr(s, 5e-4f) == 0);

    float loss_session = 0.0f;
    CHECK(zo2_session_eval(s, &batch, &loss_session) == 0);
    CHECK(loss_session != loss_before); /* the steps changed the weights */
    CHECK(zo2_session_save(s, tuned_dir) == 0);
    {
        char cfg[1200];
        struct stat st;
        snprintf(cfg, sizeof cfg, "%s/config.json", tuned_dir);
        CHECK(stat(cfg, &st) == 0);
    }
    /* Seed log: a header line plus one line per step. */
    CHECK(count_lines(seed_log) == 1 + 5);

    /* ---- reload the saved checkpoint: the same loss, bit for bit ---- */
    zo2_model * tuned = NULL;
    REQUIRE(zo2_model_load(tuned_dir, NULL, &tuned) == 0);
    zo2_session_params sp2 = test_params(NULL);
    sp2.training = 0; /* evaluation only */
    zo2_session * s2 = NULL;
    REQUIRE(zo2_session_init(tuned, &sp2, &s2) == 0);
    zo2_model_free(tuned); /* the session keeps no reference to the model */
    float loss_reloaded = -1.0f;
    CHECK(zo2_session_eval(s2, &batch, &loss_reloaded) == 0);
    CHECK(memcmp(&loss_reloaded, &loss_session, sizeof(float)) == 0);
    if (loss_reloaded != loss_session)
        fprintf(stderr, "session eval %.9g, reloaded eval %.9g\n", (double) loss_session, (double) loss_reloaded);
    /* an eval-only session refuses steps, and says why */
    CHECK(zo2_session_step(s2, &batch, NULL) == ZO2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(zo2_last_error(), "evaluation only") != NULL);
    zo2_session_free(s2);

    /* ---- generation: greedy, two prompts decoded together, equals the argmax fed back ---- */
    {
        zo2_session_params gp = test_params(NULL);
        gp.training = 0;
        gp.max_seqs = 2;
        gp.max_seq_len = 16;
        gp.generate_seqs = 2;
        gp.kv_cache = "host";
        zo2_session * g = NULL;
        REQUIRE(zo2_session_init(model, &gp, &g) == 0);
        const int32_t p0[] = { 1, 7, 9, 11, 3 }, p1[] = { 1, 40 };
        const int32_t * prompts[] = { p0, p1 };
        const int32_t lens[] = { 5, 2 };
        zo2_generate_params o = zo2_generate_default_params();
        CHECK(o.greedy == 1 && o.max_new_tokens == 32 && o.top_p == 1.0f);
        o.max_new_tokens = 4;
        int32_t out[2 * 4], out_lens[2], stopped[2];
        CHECK(zo2_generate(g, prompts, lens, 2, &o, out, out_lens, stopped) == 0);
        CHECK(out_lens[0] == 4 && out_lens[1] == 4 && stopped[0] == 0 && stopped[1] == 0);
        /* prompt 1 alone, by token log-probabilities: each new token is the argmax of eval's logits */
        zo2_session_params ep = test_params(NULL);
        ep.training = 0;
        ep.max_seqs = 1;
        ep.max_seq_len = 16;
        zo2_session * e = NULL;
        REQUIRE(zo2_session_init(model, &ep, &e) == 0);
        for (int k = 0; k < 4; ++k) {
            /* the chosen token has the highest log-probability among all candidates: check
               against every other id by scoring the sequence with it appended */
            int32_t seq[16];
            int n = 0;
            for (int t = 0; t < 2; ++t) seq[n++] = p1[t];
            for (int t = 0; t < k; ++t) seq[n++] = out[4 + t];
            float lp[16], best = -1e30f;
            int32_t best_id = -1;
            for (int32_t v = 0; v < n_vocab; ++v) {
                seq[n] = v;
                const zo2_batch one = { 1, n + 1, seq, NULL, NULL };
                CHECK(zo2_session_token_logprobs(e, &one, lp) == 0);
                if (lp[n - 1] > best) { best = lp[n - 1]; best_id = v; }
            }
            CHECK(best_id == out[4 + k]);
        }
        zo2_session_free(e);
        /* a stop id ends a prompt there */
        o.stop_ids = &out[1];
        o.n_stop_ids = 1;
        int32_t out2[2 * 4], lens2[2], stopped2[2];
        CHECK(zo2_generate(g, prompts, lens, 2, &o, out2, lens2, stopped2) == 0);
        CHECK(stopped2[0] == 1 && lens2[0] <= 2 && out2[lens2[0] - 1] == out[1]);
        /* refusals name what is wrong and change nothing */
        const int32_t empty_len[] = { 5, 0 };
        CHECK(zo2_generate(g, prompts, empty_len, 2, &o, out2, lens2, NULL) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "prompt 1 is empty") != NULL);
        o.max_new_tokens = 15;
        CHECK(zo2_generate(g, prompts, lens, 2, &o, out2, lens2, NULL) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "prompt 0 has 5 tokens") != NULL);
        o.max_new_tokens = 4;
        o.greedy = 0;
        o.temperature = -1.0f;
        CHECK(zo2_generate(g, prompts, lens, 2, &o, out2, lens2, NULL) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "temperature -1") != NULL);
        o.temperature = 0.7f;
        o.seed = 3;
        CHECK(zo2_generate(g, prompts, lens, 2, &o, out2, lens2, NULL) == 0);
        zo2_session_free(g);
        /* a session opened without generate_seqs has no room to generate */
        CHECK(zo2_generate(s, prompts, lens, 2, &o, out2, lens2, NULL) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "not set up for generation") != NULL);
        zo2_session_params bad_gp = test_params(NULL);
        zo2_session * none = NULL;
        bad_gp.generate_seqs = bad_gp.max_seqs + 1;
        CHECK(zo2_session_init(model, &bad_gp, &none) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "generate_seqs") != NULL);
        bad_gp.generate_seqs = 1;
        bad_gp.kv_cache = "gpu";
        CHECK(zo2_session_init(model, &bad_gp, &none) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "kv_cache 'gpu'") != NULL);
    }

    /* ---- the update rules ---- */
    CHECK(rule_runs(work, model, &batch) == 0);

    /* ---- a few error cases ---- */
    zo2_model * bad = (zo2_model *) 1;
    CHECK(zo2_model_load(NULL, NULL, &bad) == ZO2_ERR_INVALID_ARGUMENT);
    CHECK(bad == NULL);
    CHECK(strstr(zo2_last_error(), "hf_dir") != NULL);
    {
        char missing[1200];
        snprintf(missing, sizeof missing, "%s/does-not-exist", work);
        CHECK(zo2_model_load(missing, NULL, &bad) == ZO2_ERR_IO);
        CHECK(strstr(zo2_last_error(), "does-not-exist") != NULL);
    }
    {
        int32_t bad_tokens[N_SEQ * N_TOKENS];
        memcpy(bad_tokens, tokens, sizeof bad_tokens);
        bad_tokens[5] = n_vocab; /* one past the vocabulary */
        const zo2_batch bad_batch = { N_SEQ, N_TOKENS, bad_tokens, NULL, NULL };
        CHECK(zo2_session_step(s, &bad_batch, NULL) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "outside the vocabulary") != NULL);
        CHECK(zo2_session_step_index(s) == 5); /* nothing ran */
    }
    {
        const zo2_batch too_long = { N_SEQ, N_TOKENS + 1, tokens, NULL, NULL };
        float l;
        CHECK(zo2_session_eval(s, &too_long, &l) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(strstr(zo2_last_error(), "max_seq_len") != NULL);
    }
    CHECK(zo2_session_step(NULL, &batch, NULL) == ZO2_ERR_INVALID_ARGUMENT);
    CHECK(zo2_session_step(s, NULL, NULL) == ZO2_ERR_INVALID_ARGUMENT);
    {
        zo2_session_params p = test_params(NULL);
        zo2_session * none = (zo2_session *) 1;
        p.storage_dtype = "fp13";
        CHECK(zo2_session_init(model, &p, &none) == ZO2_ERR_INVALID_ARGUMENT);
        CHECK(none == NULL);
        CHECK(strstr(zo2_last_error(), "fp13") != NULL);
    }
    /* the session still works after all those refusals */
    {
        float again = 0.0f;
        CHECK(zo2_session_eval(s, &batch, &again) == 0);
        CHECK(again == loss_session);
    }

    zo2_session_free(s);
    zo2_model_free(model);
    zo2_session_free(NULL);
    zo2_model_free(NULL);

    if (g_failures == 0) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", work);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", work);
        printf("capi_test: all checks passed\n");
        return 0;
    }
    fprintf(stderr, "capi_test: %d check(s) failed\n", g_failures);
    return 1;
}
