/* The C API side of the Python binding's bit-for-bit test (python/tests/test_session.py)
 * and of the step-overhead bench (python/bench/step_overhead.py).
 *
 *   zo2_py_capi_ref MODEL TOKENS.bin N_SEQ N_TOKENS STEPS LR EPS SEED [TIMED_STEPS]
 *
 * TOKENS.bin holds N_SEQ*N_TOKENS little-endian int32 ids. Runs STEPS zo2_session_step
 * calls on that batch (CPU, fp32, the session's defaults otherwise) and prints one line per
 * step with the three floats' bit patterns in hex (loss_plus loss_minus projected_grad),
 * then "eval <bits>" and "logprobs <bits>..." of the final weights. With TIMED_STEPS, it
 * then runs that many more steps and prints "mean_step_s <seconds>" (CLOCK_MONOTONIC). */
#include <zo2.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static int die(const char * what) {
    fprintf(stderr, "zo2_py_capi_ref: %s: %s\n", what, zo2_last_error());
    return 1;
}

int main(int argc, char ** argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: %s MODEL TOKENS.bin N_SEQ N_TOKENS STEPS LR EPS SEED [TIMED_STEPS]\n", argv[0]);
        return 2;
    }
    const int n_seq = atoi(argv[3]), n_tokens = atoi(argv[4]), steps = atoi(argv[5]);
    const int timed = argc > 9 ? atoi(argv[9]) : 0;
    const size_t n = (size_t)n_seq * (size_t)n_tokens;
    int32_t * tokens = malloc(n * sizeof *tokens);
    float * lp = malloc(n * sizeof *lp);
    FILE * f = fopen(argv[2], "rb");
    if (!tokens || !lp || !f || fread(tokens, sizeof *tokens, n, f) != n) {
        fprintf(stderr, "zo2_py_capi_ref: cannot read %zu ids from %s\n", n, argv[2]);
        return 1;
    }
    fclose(f);
    zo2_model * model = NULL;
    if (zo2_model_load(argv[1], NULL, &model) != 0) return die("zo2_model_load");
    zo2_session_params sp = zo2_session_default_params();
    sp.lr = strtof(argv[6], NULL);
    sp.eps = strtof(argv[7], NULL);
    sp.seed = strtoull(argv[8], NULL, 10);
    sp.max_seqs = n_seq;
    sp.max_seq_len = n_tokens;
    zo2_session * s = NULL;
    if (zo2_session_init(model, &sp, &s) != 0) return die("zo2_session_init");
    zo2_batch b = {n_seq, n_tokens, tokens, NULL, NULL};
    for (int i = 0; i < steps; ++i) {
        zo2_step_result r;
        if (zo2_session_step(s, &b, &r) != 0) return die("zo2_session_step");
        printf("%08x %08x %08x\n", bits(r.loss_plus), bits(r.loss_minus), bits(r.projected_grad));
    }
    float loss = 0;
    if (zo2_session_eval(s, &b, &loss) != 0) return die("zo2_session_eval");
    printf("eval %08x\n", bits(loss));
    if (zo2_session_token_logprobs(s, &b, lp) != 0) return die("zo2_session_token_logprobs");
    printf("logprobs");
    for (size_t i = 0; i < n; ++i) printf(" %08x", bits(lp[i]));
    printf("\n");
    if (timed > 0) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int i = 0; i < timed; ++i) {
            zo2_step_result r;
            if (zo2_session_step(s, &b, &r) != 0) return die("zo2_session_step");
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("mean_step_s %.9f\n", ((double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec)) / timed);
    }
    zo2_session_free(s);
    zo2_model_free(model);
    free(tokens);
    free(lp);
    return 0;
}
