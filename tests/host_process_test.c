/* What a host process may be that a CLI never is (adversarial pass 65), each case in a child
 * of its own so that what it changes (descriptors, signal dispositions, the directory, the
 * umask) stays there:
 *   - standard descriptors closed (a daemon): zo2's seed log opened as descriptor 2 took
 *     zo2's own warnings and then refused every step and save as "changed by another
 *     program" (Note [The standard descriptors], runtime/file_util.h);
 *   - stderr a pipe whose reader exited, SIGPIPE at its default: a zo2 warning killed the
 *     host (runtime/error.cpp write_stderr);
 *   - a relative seed_log_path and a chdir() after: the next step said the log was removed;
 *   - umask 000: zo2_state.json and zo2.lock came out 0644 where every other file is 0666.
 *
 *   zo2_host_process_test <work dir>     (created if needed; removed on success)
 */
#define _POSIX_C_SOURCE 200809L
#include "zo2.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef ZO2_TUNE_PATH
#error "ZO2_TUNE_PATH must name the zo2-tune executable"
#endif

/* In a child stderr may be gone: failures are reported through the exit status and a
 * report file beside the work. */
static char g_report[4096];

static void report(const char* what) {
    FILE* f = fopen(g_report, "a");
    if (f) {
        fprintf(f, "%s (last error: %s)\n", what, zo2_last_error());
        fclose(f);
    }
}

#define REQUIRE(cond)                                                                \
    do {                                                                             \
        if (!(cond)) {                                                               \
            char m_[512];                                                            \
            snprintf(m_, sizeof m_, "%s:%d: REQUIRE failed: %s", __FILE__, __LINE__, #cond); \
            report(m_);                                                              \
            return 1;                                                                \
        }                                                                            \
    } while (0)

static char g_work[2048];
static char g_model[2300];

enum { kSeqs = 2, kTokens = 12, kVocab = 512 };
static int32_t g_tokens[kSeqs * kTokens];

static char* path_in_work(char* buf, size_t n, const char* name) {
    snprintf(buf, n, "%s/%s", g_work, name);
    return buf;
}

static int file_contains(const char* path, const char* needle) {
    FILE* f = fopen(path, "rb");
    if (!f) return -1;
    static char text[1 << 20];
    const size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    return strstr(text, needle) != NULL;
}

/* A session on the tiny model with its seed log at `log`, lr `lr`; `steps` steps, each
 * returning 0; then a save into `out`, returning 0. A warning is logged at step 2 when lr is
 * huge (its projected gradient is not finite). */
static int steps_and_save(const char* log, float lr, int steps, const char* out, const char* chdir_to) {
    zo2_model* m = NULL;
    REQUIRE(zo2_model_load(g_model, NULL, &m) == 0);
    zo2_session_params p = zo2_session_default_params();
    p.lr = lr;
    p.max_seqs = kSeqs;
    p.max_seq_len = kTokens;
    p.n_threads = 1;
    p.seed_log_path = log;
    zo2_session* s = NULL;
    REQUIRE(zo2_session_init(m, &p, &s) == 0);
    if (chdir_to) REQUIRE(chdir(chdir_to) == 0);
    const zo2_batch b = {kSeqs, kTokens, g_tokens, NULL, NULL};
    for (int i = 0; i < steps; ++i) {
        zo2_step_result r;
        REQUIRE(zo2_session_step(s, &b, &r) == 0);
    }
    REQUIRE(zo2_session_save(s, out) == 0);
    zo2_session_free(s);
    zo2_model_free(m);
    return 0;
}

static int closed_standard_descriptors(void) {
    char log[2300], out[2300];
    path_in_work(log, sizeof log, "closed.jsonl");
    path_in_work(out, sizeof out, "closed-run");
    close(2);  /* (with 0 closed too the log took 0 and the warnings were lost instead) */
    REQUIRE(steps_and_save(log, 1e30f, 3, out, NULL) == 0);
    REQUIRE(file_contains(log, "[warn]") == 0);      /* the warning went to /dev/null, not the log */
    REQUIRE(file_contains(log, "\"step\":2") == 1);  /* every step recorded */
    REQUIRE(fcntl(2, F_GETFD) != -1);
    return 0;
}

static int stderr_pipe_without_reader(void) {
    char log[2300], out[2300];
    path_in_work(log, sizeof log, "pipe.jsonl");
    path_in_work(out, sizeof out, "pipe-run");
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    close(fds[0]);
    REQUIRE(dup2(fds[1], 2) == 2);
    signal(SIGPIPE, SIG_DFL);
    sigset_t before, after, pending;
    sigprocmask(SIG_SETMASK, NULL, &before);
    REQUIRE(steps_and_save(log, 1e30f, 3, out, NULL) == 0);  /* a warning is written to the pipe */
    sigprocmask(SIG_SETMASK, NULL, &after);
    REQUIRE(sigismember(&before, SIGPIPE) == sigismember(&after, SIGPIPE));
    REQUIRE(sigpending(&pending) == 0 && !sigismember(&pending, SIGPIPE));
    struct sigaction sa;
    REQUIRE(sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL);  /* the host's disposition kept */
    return 0;
}

static int relative_seed_log_then_chdir(void) {
    char out[2300];
    path_in_work(out, sizeof out, "relative-run");
    REQUIRE(chdir(g_work) == 0);
    REQUIRE(steps_and_save("relative.jsonl", 1e-3f, 3, out, "/") == 0);
    char log[2300];
    REQUIRE(file_contains(path_in_work(log, sizeof log, "relative.jsonl"), "\"step\":2") == 1);
    return 0;
}

static int umask_000_gives_0666_files(void) {
    char log[2300], out[2300], f[2400];
    path_in_work(log, sizeof log, "umask.jsonl");
    path_in_work(out, sizeof out, "umask-run");
    umask(0);
    REQUIRE(steps_and_save(log, 1e-3f, 2, out, NULL) == 0);
    const char* files[] = {"zo2.lock", "current/zo2_state.json", "current/model.safetensors", "current/config.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; ++i) {
        struct stat st;
        snprintf(f, sizeof f, "%s/%s", out, files[i]);
        REQUIRE(stat(f, &st) == 0);
        if ((st.st_mode & 0777) != 0666) {
            char m[2600];
            snprintf(m, sizeof m, "%s: mode %o, not 666 under umask 000", f, (unsigned)(st.st_mode & 0777));
            report(m);
            return 1;
        }
    }
    return 0;
}

static int in_child(const char* name, int (*body)(void)) {
    const pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid == 0) _exit(body());
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        printf("ok: %s\n", name);
        return 0;
    }
    if (WIFSIGNALED(status))
        fprintf(stderr, "FAILED: %s: killed by signal %d\n", name, WTERMSIG(status));
    else
        fprintf(stderr, "FAILED: %s: exit %d\n", name, WEXITSTATUS(status));
    return 1;
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s WORK_DIR\n", argv[0]);
        return 2;
    }
    snprintf(g_work, sizeof g_work, "%s", argv[1]);
    if (g_work[0] != '/') {
        char cwd[1024];
        if (!getcwd(cwd, sizeof cwd)) return 1;
        snprintf(g_work, sizeof g_work, "%s/%s", cwd, argv[1]);
    }
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", g_work, g_work);
    if (system(cmd) != 0) return 1;
    snprintf(g_model, sizeof g_model, "%s/model", g_work);
    snprintf(g_report, sizeof g_report, "%s/report.txt", g_work);
    snprintf(cmd, sizeof cmd, "'%s' init --preset opt-tiny --out '%s' --seed 1 -q", ZO2_TUNE_PATH, g_model);
    if (system(cmd) != 0) {
        fprintf(stderr, "zo2-tune init failed\n");
        return 1;
    }
    for (int i = 0; i < kSeqs * kTokens; ++i) g_tokens[i] = (int32_t)((i * 29 + 5) % kVocab);
    int failures = 0;
    failures += in_child("closed standard descriptors", closed_standard_descriptors);
    failures += in_child("stderr a pipe without a reader", stderr_pipe_without_reader);
    failures += in_child("a relative seed log, then chdir", relative_seed_log_then_chdir);
    failures += in_child("umask 000", umask_000_gives_0666_files);
    if (failures) {
        snprintf(cmd, sizeof cmd, "cat '%s' >&2", g_report);
        if (system(cmd) != 0) fprintf(stderr, "(no report)\n");
        return 1;
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_work);
    return system(cmd) == 0 ? 0 : 1;
}
