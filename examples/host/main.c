/* A small host program on the zo2 C API: load an HF checkpoint, run a few zeroth-order
 * steps on synthetic tokens, evaluate, and save the tuned model.
 *
 *   zo2_host <hf model dir> <output dir> [steps]
 *
 * Every call returns a status; on a nonzero one zo2_last_error() says what went wrong. */
#include <zo2.h>

#include <stdio.h>
#include <stdlib.h>

enum { N_SEQ = 2, N_TOKENS = 16 };

static int on_step(int64_t step, const zo2_step_result * r, void * user_data) {
    (void) user_data;
    printf("step %lld: loss+ %.5f  loss- %.5f  g %+.4e\n", (long long) step, r->loss_plus, r->loss_minus,
           r->projected_grad);
    return 0; /* nonzero would stop the loop with ZO2_ABORTED */
}

static void on_log(enum zo2_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level >= ZO2_LOG_WARN) fprintf(stderr, "zo2: %s\n", text);
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <hf model dir> <output dir> [steps]\n", argv[0]);
        return 2;
    }
    const int steps = argc > 3 ? atoi(argv[3]) : 4;
    printf("zo2 %s\n", zo2_version());
    zo2_log_set(on_log, NULL);

    zo2_model * model = NULL;
    if (zo2_model_load(argv[1], NULL, &model) != 0) {
        fprintf(stderr, "load: %s\n", zo2_last_error());
        return 1;
    }

    zo2_session_params sp = zo2_session_default_params();
    sp.lr = 1e-3f;
    sp.eps = 1e-3f;
    sp.seed = 7;
    sp.max_seqs = N_SEQ;
    sp.max_seq_len = N_TOKENS;
    sp.progress_callback = on_step;

    zo2_plan_result plan;
    if (zo2_plan(model, &sp, &plan) != 0) {
        fprintf(stderr, "plan: %s\n", zo2_last_error());
        zo2_model_free(model);
        return 1;
    }
    printf("plan: %lld blocks (%lld resident, %lld streamed), %llu device bytes\n", (long long) plan.n_blocks,
           (long long) plan.n_resident, (long long) plan.n_streamed, (unsigned long long) plan.device_bytes);

    zo2_session * s = NULL;
    if (zo2_session_init(model, &sp, &s) != 0) {
        fprintf(stderr, "init: %s\n", zo2_last_error());
        zo2_model_free(model);
        return 1;
    }

    /* Synthetic tokens: a repeating pattern the model can learn. */
    const int32_t n_vocab = zo2_model_n_vocab(model);
    int32_t tokens[N_SEQ * N_TOKENS];
    for (int i = 0; i < N_SEQ * N_TOKENS; ++i) tokens[i] = (int32_t) ((i * 7 + 3) % n_vocab);
    const zo2_batch batch = { N_SEQ, N_TOKENS, tokens, NULL, NULL };

    int rc = 0;
    zo2_step_result r;
    for (int i = 0; i < steps && rc == 0; ++i) {
        rc = zo2_session_step(s, &batch, &r);
    }
    if (rc < 0) fprintf(stderr, "step: %s\n", zo2_last_error());

    float loss = 0.0f;
    if (rc >= 0 && (rc = zo2_session_eval(s, &batch, &loss)) == 0)
        printf("eval loss after %lld steps: %.6f\n", (long long) zo2_session_step_index(s), loss);
    if (rc >= 0 && (rc = zo2_session_save(s, argv[2])) == 0) printf("saved to %s\n", argv[2]);
    if (rc < 0) fprintf(stderr, "error: %s\n", zo2_last_error());

    zo2_session_free(s);
    zo2_model_free(model);
    zo2_log_set(NULL, NULL);
    return rc < 0 ? 1 : 0;
}
