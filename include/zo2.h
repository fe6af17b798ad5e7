// zo2 — the public C API: zeroth-order (MeZO/SPSA) fine-tuning of decoder-only language
// models (OPT, LLaMA, Qwen2/2.5, Qwen3, Mistral, Gemma 3; README "Supported models") through
// a streaming scheduler, on one small GPU or on the CPU.
//
// This is the one header a host program includes. It is plain C (C99 or later) and valid
// C++ (C++98 or later, also with -fno-exceptions -fno-rtti): opaque handles, a
// *_default_params() function for every params struct (take the defaults, then change the
// fields you need — fields may be added in later versions: a host is rebuilt against each
// release's header, and before 1.0 the library's SONAME (libzo2.so.0.2) changes with every
// release, so an older host binary is not loaded with it), *_init/*_free pairs, and integer
// status codes:
//
//   0                 success
//   ZO2_ABORTED (1)   non-fatal: a progress callback asked to stop (the call itself completed)
//   < 0               an error (ZO2_ERR_*); zo2_last_error() returns its message
//
// No C++ exception and no abort() crosses this boundary: every function catches everything,
// records the message in a thread-local buffer and returns a code. Each function states
// what survives an error. The *_free functions accept NULL.
//
// Threads: a zo2_model or zo2_session may be used from any thread, but not from two threads
// at the same time. Different sessions are independent. A session detects a call made while
// another thread is inside one on it: that call fails with ZO2_ERR_INVALID_ARGUMENT ("the
// session is in use by another thread") and changes nothing (step_index returns -1), and
// zo2_session_free then logs an error and leaks the session instead of freeing it under the
// running call (or waiting for it forever). A call on a session from a callback running
// inside a call on it (the same thread) is allowed as each callback's comment says.
//
// fork(): a session belongs to the process that created it (its worker threads exist only
// there). In a child made by fork() every call on an inherited session fails with
// ZO2_ERR_INVALID_ARGUMENT ("the session was created in process N; ... create a new session
// in the child"), and zo2_session_free releases nothing: the child's copy is leaked on
// purpose (freed with the child), since destroying it would wait for threads the child does
// not have. A zo2_model holds no threads and may be used in the child.
//
// A minimal host:
//
//   zo2_model * model = NULL;
//   if (zo2_model_load("opt-125m", NULL, &model) != 0) { puts(zo2_last_error()); return 1; }
//   zo2_session_params sp = zo2_session_default_params();
//   sp.lr = 1e-6f; sp.max_seqs = 8; sp.max_seq_len = 128;
//   zo2_session * s = NULL;
//   if (zo2_session_init(model, &sp, &s) != 0) { ... }
//   zo2_batch b = { 8, 128, tokens, NULL, NULL };
//   zo2_step_result r;
//   for (int i = 0; i < 1000; ++i) if (zo2_session_step(s, &b, &r) != 0) break;
//   zo2_session_save(s, "opt-125m-tuned");
//   zo2_session_free(s);
//   zo2_model_free(model);
#ifndef ZO2_H
#define ZO2_H

#include <stddef.h>
#include <stdint.h>

// Exported even when the library is built with hidden visibility (Linux; GCC/Clang).
#if defined(__GNUC__)
#define ZO2_API __attribute__((visibility("default")))
#else
#define ZO2_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------------------------------
// Status codes. The negative values map zo2::ErrorKind (runtime/error.h) one to one.

enum zo2_status {
    ZO2_OK                     =  0,
    ZO2_ABORTED                =  1,  // a progress callback returned nonzero (not an error)
    ZO2_ERR_INVALID_ARGUMENT   = -1,  // a bad value from the caller: NULL, size, id, string
    ZO2_ERR_IO                 = -2,  // a file could not be opened, read, written or renamed
    ZO2_ERR_FORMAT             = -3,  // a file is malformed (config.json, safetensors, ...)
    ZO2_ERR_UNSUPPORTED        = -4,  // valid input zo2 does not run (a config field, a dtype)
    ZO2_ERR_OUT_OF_MEMORY      = -5,  // the device cap (or host memory) is too small
    ZO2_ERR_DEVICE             = -6,  // a backend call failed or no such device exists
    ZO2_ERR_INTERNAL           = -7   // a bug in zo2 (an invariant did not hold)
};

// The header's version. A host that builds against more than one release tests these for
// a field or a function that a release added (#if ZO2_VERSION_MINOR >= 3 ...).
#define ZO2_VERSION_MAJOR 0
#define ZO2_VERSION_MINOR 2
#define ZO2_VERSION_PATCH 0

// "0.2.0"; the library's version, not the header's (equal to ZO2_VERSION_* for the header
// it was built with).
ZO2_API const char * zo2_version(void);

// The message of the last call on this thread that returned a nonzero code ("" if none).
// Calls that succeed leave it unchanged. The pointer is valid until the next failing call
// on the same thread; other threads' errors never change it.
ZO2_API const char * zo2_last_error(void);

// ---------------------------------------------------------------------------------------
// Logging. zo2 logs progress and warnings (e.g. a skipped non-finite update) to stderr by
// default.

enum zo2_log_level {
    ZO2_LOG_DEBUG = 0,
    ZO2_LOG_INFO  = 1,
    ZO2_LOG_WARN  = 2,
    ZO2_LOG_ERROR = 3,
    ZO2_LOG_OFF   = 4
};

// `text` is one message without a trailing newline, valid only during the call. Called
// from whichever thread logs (one call at a time: calls are serialized), which may be one of
// a session's worker threads. The callback may call zo2 functions, zo2_log_set included (it
// takes effect for the next message); what zo2 logs during the callback goes to stderr, not
// into the callback again. On a session a call is in, only set_lr and the queries work from
// it, and only on the calling thread (elsewhere the session is in use by another thread).
typedef void (*zo2_log_callback)(enum zo2_log_level level, const char * text, void * user_data);

// Process-wide: sends every message at or above the level to `callback` instead of
// stderr. NULL restores stderr.
ZO2_API void zo2_log_set(zo2_log_callback callback, void * user_data);
// Process-wide: messages below `level` are dropped (default ZO2_LOG_INFO). An out-of-range
// level is clamped.
ZO2_API void zo2_log_set_level(enum zo2_log_level level);

// ---------------------------------------------------------------------------------------
// Models

typedef struct zo2_model   zo2_model;    // opaque: an HF checkpoint's config + path (weights are read by session_init)
typedef struct zo2_session zo2_session;  // opaque: device, block store, scheduler, pending update

typedef struct zo2_model_params {
    int32_t check_weights;  // nonzero: read the safetensors headers at load time and fail there when
                            // a tensor is missing or malformed, instead of at session_init. Default 1.
} zo2_model_params;

ZO2_API zo2_model_params zo2_model_default_params(void);

// Reads <hf_dir>/config.json (and, with check_weights, the safetensors headers). No weight
// data is read: zo2_session_init streams the weights into the session's block store.
// A run directory (zo2-tune train --out) means its current checkpoint, resolved here once; while
// the run goes on training, this process holds that checkpoint (a shared flock) so the run's
// next save cannot remove it before it is read: one per run directory, the newest this
// process resolved, until the process exits.
// A relative hf_dir is made absolute here, against the working directory of this call: a
// later chdir() does not change which directory zo2_session_init reads.
// p may be NULL (defaults). On success *out owns a new model; on error *out is set to NULL
// (when out is not NULL) and nothing is allocated.
//   ZO2_ERR_INVALID_ARGUMENT  hf_dir or out is NULL, or hf_dir is empty
//   ZO2_ERR_IO                hf_dir or its config.json cannot be read
//   ZO2_ERR_FORMAT            config.json / safetensors malformed
//   ZO2_ERR_UNSUPPORTED       an architecture or config field zo2 does not run
ZO2_API int zo2_model_load(const char * hf_dir, const zo2_model_params * p, zo2_model ** out);
ZO2_API void zo2_model_free(zo2_model * m);

// Shape queries; 0 (and zo2_last_error set) when m is NULL.
ZO2_API int32_t zo2_model_n_vocab(const zo2_model * m);   // vocab_size
ZO2_API int32_t zo2_model_n_ctx(const zo2_model * m);     // max_position_embeddings
ZO2_API int32_t zo2_model_n_layer(const zo2_model * m);   // transformer blocks
ZO2_API int64_t zo2_model_n_params(const zo2_model * m);  // parameters (a tied head counted once)

// ---------------------------------------------------------------------------------------
// Sessions

enum zo2_offload_mode {
    ZO2_OFFLOAD_AUTO = 0,  // as many blocks resident as the cap allows, the rest streamed
    ZO2_OFFLOAD_ALL  = 1,  // stream every block through the window (smallest device memory)
    ZO2_OFFLOAD_NONE = 2   // every block resident (fails if the cap is too small)
};

typedef struct zo2_step_result {
    float loss_plus;       // mean token cross-entropy at θ + eps·z (nats)
    float loss_minus;      // mean token cross-entropy at θ − eps·z (nats); difference "forward": at θ
    float projected_grad;  // g = (L+ − L−) / (2·eps), forward: (L+ − L(θ)) / eps; not finite: the update is
                           // skipped (and logged)
} zo2_step_result;

// Called by zo2_session_step after each completed step. `step` is the step's 0-based
// index, `result` its losses (valid only during the call). Return 0 to go on, nonzero to
// make zo2_session_step return ZO2_ABORTED (the step is done either way). An exception out
// of a C++ host's callback counts as nonzero (ZO2_ABORTED, its message in zo2_last_error()).
// The step is complete when it runs, so the callback may call, on its session: eval,
// eval_choices, token_logprobs, save (checkpoint every N steps), set_lr, step_index,
// device_peak, rank, plan, and zo2_session_free (the session is then freed as
// zo2_session_step returns; return nonzero, and use it no more). zo2_session_step,
// step_choices and zo2_generate would wait for the running step forever: they fail with
// ZO2_ERR_INVALID_ARGUMENT and change nothing.
typedef int (*zo2_progress_callback)(int64_t step, const zo2_step_result * result, void * user_data);

typedef struct zo2_session_params {
    // ZO-SGD hyperparameters (DESIGN.md §1): θ ← θ − lr·(g·z + wd·θ).
    float    lr;                 // learning rate, finite and ≥ 0; change it per step with zo2_session_set_lr. Default 1e-6.
    float    eps;                // perturbation scale, in (0, 1]. Default 1e-3.
    float    weight_decay;       // decoupled weight decay, finite and ≥ 0 (not on biases and norm weights). Default 0.
    uint64_t seed;               // run seed; step t uses seed = Philox(seed, t). Default 0.

    // Device and memory.
    const char * device;         // "cpu", "cuda", "cuda:N" or "auto" (copied at init). Default "cpu".
    uint64_t gpu_mem_bytes;      // device memory cap in bytes; 0 = no cap: planned against the whole device
                                 // (CPU: physical RAM), the arena then keeps the plan's bytes + 256 MiB. Default 0.
    int32_t  offload;            // an enum zo2_offload_mode value. Default ZO2_OFFLOAD_AUTO.
    int32_t  window;             // device slots for streamed blocks, 1..64 (≥ 3 overlaps all three streams). Default 3.
    const char * storage_dtype;  // weights in host memory and slots: "fp32", "bf16", "fp16", "fp8". Default "fp32".
    const char * compute_dtype;  // activations and GEMMs: "fp32", "bf16", "fp16". Default "fp32".
    int32_t  n_threads;          // CPU threads for kernels, 0..65536; 0 = the cores the process may use (affinity, cgroup CPU quota). Default 0.
                                 // The session's own: its kernels (and its loading and saving) run in a TBB arena of that
                                 // many threads; the host's TBB work outside zo2's calls, and other sessions, keep theirs.
                                 // Process-wide while a CPU session lives: OpenBLAS runs 1 thread (the host's count is
                                 // restored when the last CPU session is freed).

    // Capacity: the largest batch any step/eval of this session takes (activations are
    // allocated for it at init).
    int32_t  max_seqs;           // sequences per batch, 1..2^20. Default 1.
    int32_t  max_seq_len;        // tokens per sequence; 0 = the model's max_position_embeddings. Default 0.
    int32_t  training;           // nonzero: two activation streams (±eps) for steps; 0: evaluation only
                                 // (one stream, less memory; zo2_session_step fails). Default 1.

    // Run bookkeeping.
    const char * seed_log_path;  // JSON Lines seed log, one (step, seed, g, lr) line per step, which
                                 // `zo2-tune replay` turns back into the tuned weights; NULL = none (set with
                                 // training = 0: ZO2_ERR_INVALID_ARGUMENT). Default NULL. A run saved without
                                 // one records no steps: `zo2-tune train --resume` refuses it (use it as a model).
    int32_t  seed_log_append;    // nonzero: resume — keep the existing log's entries before first_step (needs
                                 // seed_log_path: ZO2_ERR_INVALID_ARGUMENT without it). Default 0:
                                 // a new log, which never replaces an existing non-empty file (another run's
                                 // log, or a file that is no seed log): ZO2_ERR_INVALID_ARGUMENT. The session
                                 // holds the log locked (flock) until freed: a second session on the same
                                 // log, in this process or another, is ZO2_ERR_IO.
    int64_t  first_step;         // index of the first step (resume a run at this step). Default 0.

    // zo2_session_save.
    const char * save_dtype;     // dtype of the saved checkpoint: "fp32", "bf16", "fp16"; an adapter session
                                 // saves fp32 adapters, so another dtype there is ZO2_ERR_INVALID_ARGUMENT. Default "fp32".
    uint64_t save_shard_bytes;   // largest safetensors shard of a save (HF sharding above it). Default 5e9.

    // Callbacks.
    zo2_progress_callback progress_callback;  // after each step; NULL = none. Default NULL.
    void *   progress_user_data;              // passed to progress_callback. Default NULL.

    // The update rule (zo2-tune train --optimizer; README "Update rules"). Appended after the
    // fields above (source-compatible; see the top of this header for binaries). The defaults
    // are the one-direction ZO-SGD above.
    // momentum, beta1, beta2, adam_eps and state_dtype are checked whatever the optimizer (a
    // value no rule accepts is an error, not ignored); the stateful rules alone use them.
    const char * optimizer;      // "zo-sgd", "zo-sgd-sign", "zo-sgd-cons", "zo-sgd-momentum", "zo-adam". Default "zo-sgd".
    int32_t  directions;         // q random directions per step, 1..64 (each one more forward pass; lr/q each). Default 1.
    const char * difference;     // "central" (L(θ+εz) − L(θ−εz))/2ε or "forward" (L(θ+εz) − L(θ))/ε. Default "central".
    float    momentum;           // zo-sgd-momentum: momentum factor in [0, 1). Default 0.9.
    float    beta1;              // zo-adam: β1 in [0, 1). Default 0.9.
    float    beta2;              // zo-adam: β2 in [0, 1). Default 0.999.
    float    adam_eps;           // zo-adam: denominator epsilon, > 0. Default 1e-8.
    const char * state_dtype;    // momentum/Adam state beside the master weights: "fp32", "bf16", "fp8". Default "fp32".
    int32_t  resume_state;       // nonzero: load the state saved with the checkpoint (optimizer_state.safetensors),
                                 // to resume a momentum/Adam run exactly. Default 0.

    // LoRA (zo2-tune train --lora; README "LoRA"): the rule perturbs and updates adapters only; the base is
    // frozen (streamed blocks are never written back) and zo2_session_save writes the adapter in PEFT's layout.
    int32_t  lora_r;             // adapter rank, 1..4096; 0 = no LoRA (full fine-tuning). Default 0.
    float    lora_alpha;         // the update is scaled by lora_alpha / lora_r, > 0; set (not 16) with lora_r 0
                                 // or with prefix_tokens: ZO2_ERR_INVALID_ARGUMENT. Default 16.
    const char * lora_targets;   // comma-separated PEFT module names; set (not the default) with lora_r 0 or with
                                 // prefix_tokens: ZO2_ERR_INVALID_ARGUMENT. Default "q_proj,v_proj".
    const char * adapter_path;   // a PEFT adapter directory to start from or evaluate (its adapter_config.json
                                 // sets rank, alpha and targets); NULL = new adapters from seed. With it,
                                 // prefix_tokens must be 0, and lora_r, lora_alpha and lora_targets, where set (not
                                 // their defaults), must be the adapter's own (else ZO2_ERR_INVALID_ARGUMENT). Default NULL.
    int32_t  prefix_tokens;      // prefix tuning (MeZO's): P key/value rows per layer, 1..1024; 0 = none; not with
                                 // lora_r. A new prefix starts from the base's activations of P random tokens. Default 0.

    // Generation (zo2_generate; README "Generate"): room to decode this many prompts together (a training
    // session too: it decodes between steps, as eval); max_seq_len is then the positions of a prompt and its
    // new tokens. 0 = none. Default 0.
    int32_t  generate_seqs;      // 0..max_seqs
    const char * kv_cache;       // where generation keeps its KV cache: "auto" (the device when every block's cache
                                 // fits beside the minimum window), "device", "host" (pinned; two device slots),
                                 // "off" (every new token runs the whole sequence again). Default "auto".
    int32_t  prefill_chunk;      // with a KV cache: prompts run through the blocks at most this many tokens per
                                 // sequence at a time (the activations hold generate_seqs × prefill_chunk tokens);
                                 // 0 = whole prompts. Default 0. kv_cache or prefill_chunk set (not "auto", 0) with
                                 // generate_seqs 0: ZO2_ERR_INVALID_ARGUMENT.

    // Ranks (zo2-tune train --parallel; README "Many GPUs and nodes"). A session can be one rank of an MPI job:
    // every rank calls every zo2_session_* function in the same order with the same arguments — the same
    // global batch to zo2_session_step (a data-parallel rank takes its own shard), zo2_session_save
    // together (rank 0 writes the checkpoint and the seed log, the others wait for it), eval
    // and generate together. Every rank then holds the same weights. Ranks on one node share one host image of
    // the weights. A rank that hangs makes the others fail with ZO2_ERR_IO naming it after rank_timeout_s; the
    // host should then end the job (MPI_Abort), as zo2-tune does.
    const char * parallel;       // "data=D,perturbation=P,directions=Q" (product = the ranks); NULL = "data=N" under
                                 // an MPI launcher with N ranks, else one process; "single" or "none" = one process
                                 // ("" is refused: ZO2_ERR_INVALID_ARGUMENT). Default NULL.
    const void * mpi_comm;       // the communicator, as a pointer to an MPI_Comm the host owns (MPI initialized by the
                                 // host; zo2 duplicates it and never finalizes MPI); NULL = MPI_COMM_WORLD when started by
                                 // mpirun/srun (zo2 then initializes MPI and finalizes it at exit). Default NULL.
    double   rank_timeout_s;     // seconds a rank waits for another in an exchange; 0 = no limit. Default 600.
    int32_t  share_host_image;   // nonzero: ranks on one node share one host image of the weights. Default 1.
    int32_t  sliced_upload;      // nonzero: each rank of a node uploads its slice of a streamed block and the devices
                                 // exchange the rest (NCCL on CUDA; needs share_host_image). Default 0.

    // The disk tier (zo2-tune --host-mem; README "Models larger than host memory"): the streamed blocks that do not
    // fit under host_mem_bytes live in one block file in disk_dir (a local SSD), read and written with io_uring
    // (with threads, and a warning, where a container's seccomp profile or the kernel refuses io_uring).
    // One process per disk_dir (a second is refused; not on a file system that refuses file locks); one rank.
    uint64_t host_mem_bytes;     // host bytes the master weights may take; 0 = no cap (every block in RAM). Default 0.
    const char * disk_dir;       // directory of the block file; required when the blocks do not fit. Default NULL.
    int32_t  disk_lag;           // a disk block is written back once its image lags by this many updates, 1..1024
                                 // (K-fold fewer writes, K× the noise work at its uploads). Default 1.
    int32_t  disk_staging;       // pinned staging buffers between disk and device, 0..64; 0 = window + 1. Default 0.
                                 // disk_lag or disk_staging set (not 1, 0) with host_mem_bytes 0: ZO2_ERR_INVALID_ARGUMENT.

    // Sub-block streaming (zo2-tune --tile; README "Below 4 GiB of GPU memory"): streamed blocks move through the
    // device one weight tile (a row range of one matrix) at a time instead of whole, so the window needs slots of a
    // tile, not of a block. 0 = auto (whole blocks when two slots of them fit gpu_mem_bytes, else tiles), -1 = whole
    // blocks only, > 0 = tiles of at most this many bytes of storage (up to 2^48). Not with a node-shared host
    // image (share_host_image with several ranks on a node). Default 0.
    int64_t  tile_bytes;
} zo2_session_params;

ZO2_API zo2_session_params zo2_session_default_params(void);

// Opens the device, plans the placement under the cap, reads the weights into the host
// block store and uploads the resident ones. The session keeps no reference to m (it may
// be freed right after) nor to the strings in p (they are copied). p may be NULL (defaults).
// On error *out is NULL and everything allocated so far is released; m is unchanged.
//   ZO2_ERR_INVALID_ARGUMENT  m or out NULL; an unknown device/dtype/offload value; a field outside
//                             its range above (the ranges zo2-tune's flags have, api/options.cpp;
//                             the message names the field and the value): lr or weight_decay
//                             negative or not finite, eps outside (0, 1], max_seq_len above
//                             max_position_embeddings, save_shard_bytes 0, ...
//   ZO2_ERR_UNSUPPORTED       a dtype the device does not run: compute_dtype bf16/fp16 on the CPU
//                             backend (device "cpu", or "auto" without a CUDA device)
//   ZO2_ERR_OUT_OF_MEMORY     gpu_mem_bytes is below the plan's minimum (the message states it;
//                             zo2_plan reports it without allocating); host_mem_bytes is below
//                             the globals and the staging buffers the disk tier needs
//   ZO2_ERR_DEVICE            no such device (e.g. "cuda" in a CPU-only build)
//   ZO2_ERR_IO / _FORMAT      the weights cannot be read; the seed log cannot be written;
//                             config.json changed since zo2_model_load (load it again)
// The weights are read with read(2), never through a memory mapping: a weights file that
// another program truncates while this call reads it is ZO2_ERR_IO naming the file and the
// tensor (not a SIGBUS in the host). One rewritten in place at the same size goes unseen:
// replace checkpoints by writing a new file and renaming it over, as zo2 itself does.
ZO2_API int zo2_session_init(zo2_model * m, const zo2_session_params * p, zo2_session ** out);
// Waits for outstanding work and releases everything. A pending update that was not saved
// is lost (zo2_session_save first). NULL is allowed. In a fork() child of the process that
// created s it returns at once and releases nothing (the child's copy is leaked; see the top).
// Called from a progress callback (or a log callback on the calling thread) inside a call
// on s, it frees s when that call returns. Called while another thread is inside a call on s (not allowed: see the top),
// it logs an error (ZO2_LOG_ERROR, also in zo2_last_error()) and leaks s, rather than
// freeing it under that call.
ZO2_API void zo2_session_free(zo2_session * s);

// A batch of n_seq sequences of n_tokens tokens each, row-major [n_seq][n_tokens].
typedef struct zo2_batch {
    int32_t n_seq;                   // sequences, 1 ≤ n_seq ≤ the session's max_seqs
    int32_t n_tokens;                // tokens per sequence, 1 ≤ n_tokens ≤ the session's max_seq_len
    const int32_t * tokens;          // [n_seq·n_tokens] token ids in [0, vocab); required
    const int32_t * attention_mask;  // [n_seq·n_tokens] 1 = real token, 0 = padding; NULL = all ones
    const int32_t * labels;          // [n_seq·n_tokens] as transformers' labels (unshifted: labels[t] is
                                     // the target predicted from tokens ≤ t−1), −100 = no loss;
                                     // NULL = the tokens themselves where the mask is 1
} zo2_batch;

// One ZO step: both perturbed forward passes on b, g = (L+ − L−)/(2·eps); the update
// θ ← θ − lr·(g·z + wd·θ) is deferred and fused into the next pass over each block
// (DESIGN.md §1). Waits for the step's losses, appends to the seed log, then calls the
// progress callback. out may be NULL.
//   0 / ZO2_ABORTED           the step is done and counted (ZO2_ABORTED: the callback asked to stop;
//                             the session stays fully usable)
//   ZO2_ERR_INVALID_ARGUMENT  s or b or b->tokens NULL; n_seq/n_tokens out of [1, capacity]; a token,
//                             mask or label out of range; an eval-only session; a batch with nothing to
//                             predict (no target token: every label −100, or the mask 0 after each
//                             sequence's first position); a step past 2^53. Nothing was run: the
//                             session (weights, pending update, step index) is unchanged and stays usable.
//   ZO2_ERR_IO                the seed log could not be appended (a full disk; the file removed,
//                             replaced or written by another program): the step ran and counts, but
//                             its line is not in the log, so later steps and saves are refused; eval
//                             still works. Resume from the last checkpoint (its log prefix is intact).
//   other errors              a device/internal failure mid-step: the session is unusable; every later
//                             call on it fails with the same code; only zo2_session_free is safe.
ZO2_API int zo2_session_step(zo2_session * s, const zo2_batch * b, zo2_step_result * out);

// Mean token cross-entropy (nats) of the current weights on b, unperturbed. Applies the
// pending update first (as save does); the step index is unchanged. Errors: as step (an
// invalid argument, a batch with no target token included, changes nothing; a device
// failure makes the session unusable). Weights whose logits overflow (huge or non-finite
// values, or a compute dtype too narrow for them) give a loss of NaN or +inf with 0
// returned: the value is what the forward pass computed (`zo2-tune eval` refuses to report one).
ZO2_API int zo2_session_eval(zo2_session * s, const zo2_batch * b, float * out_loss);

// Per-position log-likelihoods of b under the current weights (what classification and
// multiple-choice eval need): out[i·n_tokens + t] = log p(target of position t | tokens ≤ t)
// in nats, where the target is labels[i][t+1] (or tokens[i][t+1]); 0 where there is none
// (the last position, padding, −100). out holds n_seq·n_tokens floats. Applies the pending
// update first. Errors: as zo2_session_eval, except that a batch with no target token is
// accepted (all zeros); on error out is left unspecified.
ZO2_API int zo2_session_token_logprobs(zo2_session * s, const zo2_batch * b, float * out);

// Multiple choice, MeZO's classification loss (its train_as_classification): the batch's
// sequences are groups of group_sizes[g] consecutive candidates (summing to n_seq), the
// correct one at offset group_labels[g] in its group. A candidate's score is the mean
// log-likelihood of its labelled tokens (label only the option's tokens, −100 elsewhere);
// the loss is the cross-entropy over each group's scores, averaged over the groups. The
// step/eval below are zo2_session_step/zo2_session_eval with this loss (same errors; bad
// groups — sizes not adding up to n_seq, a label outside its group, a candidate without a
// labelled token — are invalid arguments that change nothing). Per-candidate scores for
// accuracy: zo2_session_token_logprobs.
typedef struct zo2_choices {
    int32_t n_groups;               // ≥ 1
    const int32_t * group_sizes;    // [n_groups], each ≥ 1
    const int32_t * group_labels;   // [n_groups], 0 ≤ label < group size
} zo2_choices;
ZO2_API int zo2_session_step_choices(zo2_session * s, const zo2_batch * b, const zo2_choices * c,
                                     zo2_step_result * out);
ZO2_API int zo2_session_eval_choices(zo2_session * s, const zo2_batch * b, const zo2_choices * c,
                                     float * out_loss);

// Writes the current weights as an HF checkpoint (config.json + model.safetensors, sharded
// above save_shard_bytes, in save_dtype) into the run directory out_dir (created if needed),
// as one transaction: a crash at any moment leaves out_dir with its previous checkpoint or
// the new one, never a mix (README "Run directories": out_dir/current names the step
// directory; out_dir/config.json etc. are links into it, so out_dir reads as an HF
// checkpoint, and zo2_model_load(out_dir) resolves it). Its zo2_state.json records the
// step, each file's size and CRC-32 and the seed log's prefix. Flushes the pending update
// first, so the checkpoint equals the session's weights: a session loaded from it evaluates
// bit-identically (fp32).
//   ZO2_ERR_INVALID_ARGUMENT  s or out_dir NULL or empty, or out_dir is the plain checkpoint the
//                             session was loaded from (a run directory may be saved into again),
//                             or out_dir holds a training run (a seed_log.jsonl) whose seed log is
//                             not this session's, or out_dir is the run this session was loaded from
//                             and the session did not start at the step it loaded (first_step), or
//                             out_dir holds a later step of its run than the session's (a save never
//                             takes a run back)
//   ZO2_ERR_FORMAT            a weight is NaN or infinite, or beyond save_dtype's range (fp16:
//                             ±65504) (the message names the tensor); nothing is written
//   ZO2_ERR_IO                out_dir cannot be created or written, or another process is
//                             writing it (its zo2.lock is held), or its file system has less free
//                             than one more checkpoint (checked before anything is written; the
//                             message names out_dir, the free space, the bytes needed and
//                             save_dtype bf16's; a file system whose statvfs fails or reports no
//                             blocks is not checked); the session stays usable and its weights
//                             are unchanged (the flush has been applied)
ZO2_API int zo2_session_save(zo2_session * s, const char * out_dir);

// Sets the learning rate of the following steps (for schedules). ZO2_ERR_INVALID_ARGUMENT
// (nothing changed) when s is NULL or lr is negative or not finite.
ZO2_API int zo2_session_set_lr(zo2_session * s, float lr);
// The index of the next step (first_step + steps done); -1 when s is NULL.
ZO2_API int64_t zo2_session_step_index(const zo2_session * s);
// Device arena bytes in use at the peak so far; 0 when s is NULL.
ZO2_API uint64_t zo2_session_device_peak(const zo2_session * s);

// ---------------------------------------------------------------------------------------
// Generation through the streaming runtime (README "Generate"): the prompts decode
// generate_seqs at a time, left-padded, the blocks streamed once per new token for the
// whole batch, with the KV cache where kv_cache put it.

typedef struct zo2_generate_params {
    int32_t  max_new_tokens;   // tokens to generate per prompt, ≥ 1. Default 32.
    int32_t  greedy;           // nonzero: the argmax (the first of equal logits); 0: sample. Default 1.
    float    temperature;      // sampling: softmax(logits / temperature), finite and > 0. Default 1.
    float    top_p;            // sampling: nucleus mass in (0, 1]. Default 1.
    uint64_t seed;             // sampling: token k of prompt i draws Philox(seed, i, k). Default 0.
    const int32_t * stop_ids;  // a generated id in this list ends its prompt (the id is kept); NULL = none. Default NULL.
    int32_t  n_stop_ids;       // entries of stop_ids. Default 0.
    int32_t  pad_id;           // the id left padding uses (masked; any id in the vocabulary). Default 0.
    // Called on the calling thread after each decoding step (one new token for each prompt of the
    // batch running) with the tokens generated so far; return 0 to go on, nonzero to stop (e.g. the
    // host saw Ctrl-C): zo2_generate then returns ZO2_ABORTED at once, out_tokens/out_lens/out_stopped
    // unspecified, and the session stays usable (its weights unchanged). NULL = none. Appended after
    // the fields above. Default NULL. The generation is in flight while it runs: on its session it
    // may call set_lr, step_index, device_peak, rank, plan and zo2_session_free (freed as zo2_generate
    // returns; return nonzero); the other calls fail with ZO2_ERR_INVALID_ARGUMENT.
    int (*progress_callback)(int64_t new_tokens, void * user_data);
    void *   progress_user_data;  // passed to progress_callback. Default NULL.
} zo2_generate_params;

ZO2_API zo2_generate_params zo2_generate_default_params(void);

// Generates for n_prompts prompts (prompts[i]: prompt_lens[i] ≥ 1 token ids, the tokenizer's
// special prefix included as the host wants it) with a session opened with generate_seqs > 0. out_tokens holds n_prompts·max_new_tokens ids: prompt i's new tokens at
// [i·max_new_tokens, i·max_new_tokens + out_lens[i]) (a stop id included); out_stopped[i]
// (may be NULL) is 1 when a stop id ended it, else 0. Applies the pending update first.
//   ZO2_ERR_INVALID_ARGUMENT  s, prompts, prompt_lens, out_tokens or out_lens NULL; n_prompts < 1; a
//                             session without generate_seqs; an empty prompt, an id outside the
//                             vocabulary, or a prompt too long for max_seq_len with max_new_tokens (the
//                             message names the prompt, 0-based); a field of p out of range. Nothing was
//                             run; the session is unchanged.
//   ZO2_ABORTED               p->progress_callback returned nonzero (or threw): not an error; the
//                             outputs are unspecified; the session is unchanged and usable.
//   other errors              a device failure mid-generation: the session is unusable (as zo2_session_step).
ZO2_API int zo2_generate(zo2_session * s, const int32_t * const * prompts, const int32_t * prompt_lens,
                         int32_t n_prompts, const zo2_generate_params * p, int32_t * out_tokens, int32_t * out_lens,
                         int32_t * out_stopped);

// ---------------------------------------------------------------------------------------
// Planning (DESIGN.md §6): the placement of blocks under a device memory cap.

typedef struct zo2_plan_result {
    uint64_t cap_bytes;             // the cap planned for (bytes)
    uint64_t device_bytes;          // predicted device arena peak (bytes)
    uint64_t minimum_cap_bytes;     // the smallest cap this model and params run under (all streamed)
    int64_t  n_blocks;              // transformer blocks
    int64_t  n_resident;            // blocks kept on the device (updated in place, never transferred)
    int64_t  n_streamed;            // blocks streamed through the window each step
    int32_t  window;                // device slots allocated for streamed blocks (0 when none stream)
    uint64_t block_bytes;           // one block image in the storage dtype (bytes)
    uint64_t globals_bytes;         // embeddings, final norm, head (always resident; bytes)
    uint64_t h2d_bytes_per_step;    // host→device traffic per step (bytes)
    uint64_t d2h_bytes_per_step;    // device→host traffic per step (bytes)
    double   predicted_transfer_s;  // transfer-bound step time (seconds)
    uint64_t host_bytes;            // host memory of the master weights: globals + every block image (bytes)
                                    // (+ the KV caches when generation keeps them on the host); with a disk
                                    // tier, the RAM tier only (its blocks and the staging buffers)
    int64_t  n_disk_blocks;         // streamed blocks on the disk tier (host_mem_bytes); 0 = none
    uint64_t disk_file_bytes;       // the block file (two images a block)
    uint64_t disk_read_bytes_per_step;
    uint64_t disk_write_bytes_per_step;  // divided by disk_lag
    double   predicted_disk_s;      // disk-bound step time at 2 GB/s read, 1.5 GB/s write (seconds)
    int32_t  tile_slots;            // sub-block streaming (tile_bytes): device slots of one weight tile; 0 = whole blocks
    uint64_t tile_slot_bytes;       // one tile slot (a tile of the largest matrix with its state rows)
    int64_t  tiles_per_block;       // weight tiles one block streams in
} zo2_plan_result;

// Plans a session of m with p without opening the device or allocating anything.
// gpu_mem_bytes = 0 means the physical RAM for "cpu"; for a CUDA device it must be given.
// On ZO2_ERR_OUT_OF_MEMORY (the cap is too small) out->minimum_cap_bytes and out->n_blocks
// are still filled (the other fields are 0), so a host can retry with a larger cap.
//   ZO2_ERR_INVALID_ARGUMENT  m, p or out NULL; an unknown device/dtype/offload value; bad capacity
ZO2_API int zo2_plan(const zo2_model * m, const zo2_session_params * p, zo2_plan_result * out);

// One rank of a parallel layout (p->parallel, which must be set): its placement in `rank` (device_bytes is one
// GPU's peak; h2d/d2h its own traffic, the write-back its slice of a shared image) beside the same run in one
// process, and what a node holds. Like zo2_plan, opens nothing.
typedef struct zo2_parallel_plan_result {
    int32_t  ranks, data, perturbation, directions;
    int32_t  ranks_per_node;        // as asked (capped at ranks)
    double   forward_share;         // a rank's forward work / one process's
    uint64_t host_bytes_per_node;   // master weights held per node (one shared image, or one per rank)
    zo2_plan_result rank;           // one rank
    zo2_plan_result single;         // one process
} zo2_parallel_plan_result;
//   ZO2_ERR_INVALID_ARGUMENT  as zo2_plan; p->parallel NULL or malformed (the message names the part); the
//                             factors do not fit the rule or the batch; ranks_per_node < 1
ZO2_API int zo2_plan_parallel(const zo2_model * m, const zo2_session_params * p, int32_t ranks_per_node,
                              zo2_parallel_plan_result * out);
// This session's rank and the number of ranks (0 and 1 for one process). Either pointer may be NULL.
ZO2_API int zo2_session_rank(const zo2_session * s, int32_t * rank, int32_t * size);
// The placement a session actually runs with (device_bytes = the planned peak).
ZO2_API int zo2_session_plan(const zo2_session * s, zo2_plan_result * out);

#ifdef __cplusplus
}
#endif

#endif  // ZO2_H
