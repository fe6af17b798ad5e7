/* A C host program that is one rank of an MPI job (tests/mpi/ranks.sh runs it under mpirun):
 * every rank opens the same model with params.parallel set, steps on the same global batches,
 * saves together (rank 0 writes), and reports its rank. zo2 initializes MPI itself (mpi_comm
 * NULL: the launcher's world). With "single" it runs as one process, for comparison.
 *
 *   zo2_capi_ranks <model dir> <out dir> <layout or "single"> <steps>
 */
#include "zo2.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N_SEQ = 4, N_TOKENS = 12 };

int main(int argc, char ** argv) {
    zo2_model * model = NULL;
    zo2_session * s = NULL;
    zo2_session_params p = zo2_session_default_params();
    int32_t tokens[N_SEQ * N_TOKENS];
    int32_t rank = -1, size = 0;
    int steps, i, t;
    zo2_step_result r;
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL OUT LAYOUT STEPS\n", argv[0]);
        return 2;
    }
    steps = atoi(argv[4]);
    if (zo2_model_load(argv[1], NULL, &model) != 0) {
        fprintf(stderr, "load: %s\n", zo2_last_error());
        return 1;
    }
    p.lr = 1e-3f;
    p.seed = 5;
    p.max_seqs = N_SEQ;
    p.max_seq_len = N_TOKENS;
    p.n_threads = 1;
    p.offload = ZO2_OFFLOAD_ALL;
    p.window = 2;
    if (strcmp(argv[3], "single") != 0) p.parallel = argv[3];
    if (getenv("ZO2_CAPI_SLICED")) p.sliced_upload = 1;
    if (zo2_session_init(model, &p, &s) != 0) {
        fprintf(stderr, "session: %s\n", zo2_last_error());
        return 1;
    }
    if (zo2_session_rank(s, &rank, &size) != 0) return 1;
    for (t = 0; t < steps; ++t) {
        const zo2_batch b = {N_SEQ, N_TOKENS, tokens, NULL, NULL};
        for (i = 0; i < N_SEQ * N_TOKENS; ++i) tokens[i] = (int32_t) ((i * 7 + t * 13 + i * i) % 50);
        if (zo2_session_step(s, &b, &r) != 0) {
            fprintf(stderr, "rank %d step %d: %s\n", (int) rank, t, zo2_last_error());
            return 1;
        }
    }
    if (zo2_session_save(s, argv[2]) != 0) {
        fprintf(stderr, "rank %d save: %s\n", (int) rank, zo2_last_error());
        return 1;
    }
    printf("rank %d of %d: %d steps, last loss %.6f\n", (int) rank, (int) size, steps, (double) r.loss_plus);
    zo2_session_free(s);
    zo2_model_free(model);
    return 0;
}
