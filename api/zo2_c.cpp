// The C API (include/zo2.h) over zo2::Session. Every entry point runs its body inside
// `guarded`, which turns any exception into a status code and a thread-local message, so
// nothing thrown in the C++ core crosses the boundary. Arguments a C caller can get wrong
// (NULLs, sizes, strings) are checked here, before any work starts, so an invalid argument
// never changes a session; the id/mask/label ranges are checked by make_batch.
#include "zo2.h"

#include "api/options.h"
#include "api/run_dir.h"
#include "api/generate.h"
#include "api/session.h"
#include "api/status.h"
#include "models/checkpoint.h"
#include "models/layout.h"
#include "models/safetensors.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/thread.h"

#include <cmath>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <limits>
#include <new>
#include <span>
#include <string>
#include <thread>
#include <unistd.h>

struct zo2_model {
  std::filesystem::path dir;
  zo2::ModelConfig config;
};

struct zo2_session {
  std::unique_ptr<zo2::Comm> comm;  // ranks (outlives the session)
  std::unique_ptr<zo2::Session> session;
  zo2::ModelConfig config;
  float lr = 0, eps = 0, weight_decay = 0;
  int max_seqs = 1, max_seq_len = 1;
  zo2::DType save_dtype = zo2::DType::f32;
  std::uint64_t save_shard_bytes = 0;
  zo2_progress_callback progress = nullptr;
  void* progress_user_data = nullptr;
  // Set when a failure left the scheduler in an unknown state (see zo2_session_step).
  int broken_code = 0;
  std::string broken_message;
  // The process that created the session. A child made by fork() inherits the handle but
  // not the scheduler's worker threads: there every call fails (usable) and
  // zo2_session_free leaks the session instead of waiting for threads that do not exist.
  pid_t owner_pid = getpid();
  // One call at a time (zo2.h "Threads"; Note [In use]): the thread inside a call on this
  // session, or none. The rest are touched only by that thread.
  mutable std::atomic<std::thread::id> user{};
  enum class Callback { none, step, generate };
  Callback callback = Callback::none;  // whose progress callback runs on `user` now
  bool free_pending = false;           // zo2_session_free from a callback: done when the outer call returns
};

// Note [In use]
// A session's calls are not reentrant and not thread-safe (zo2.h "Threads"). A host that
// breaks that gets an error, not a silent corruption or a hang (adversarial pass 65): every
// entry point marks the session as used by its thread for the call (InUse). A call from
// another thread meanwhile fails with ZO2_ERR_INVALID_ARGUMENT and changes nothing. A call
// from the same thread is one made by a callback that runs inside a call (the progress
// callbacks; a log callback on the calling thread): what may run there depends on what is
// in flight. A step's progress callback runs with the step done and nothing in flight, so
// eval, save and the queries work; a nested step or generation would wait for the outer
// one's scheduler forever, so it is refused. A generation's callback runs with its KV
// cache and batch live: only the queries and set_lr may run. zo2_session_free there is
// deferred to the end of the outer call (which still reads the session); freeing from
// another thread during a call cannot wait (the call may never end; the host may be that
// call's caller) nor delete (the call would read freed memory): it logs an error and leaks
// the session.

int zo2::status_of(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::invalid_argument: return ZO2_ERR_INVALID_ARGUMENT;
    case ErrorKind::io: return ZO2_ERR_IO;
    case ErrorKind::format: return ZO2_ERR_FORMAT;
    case ErrorKind::unsupported: return ZO2_ERR_UNSUPPORTED;
    case ErrorKind::out_of_memory: return ZO2_ERR_OUT_OF_MEMORY;
    case ErrorKind::device: return ZO2_ERR_DEVICE;
    case ErrorKind::aborted: return ZO2_ABORTED;
    case ErrorKind::internal: return ZO2_ERR_INTERNAL;
  }
  return ZO2_ERR_INTERNAL;
}

zo2::ExceptionStatus zo2::status_of_exception(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e)) return {ZO2_ERR_OUT_OF_MEMORY, "out of host memory"};
  if (dynamic_cast<const std::filesystem::filesystem_error*>(&e)) return {ZO2_ERR_IO, e.what()};
  if (std::optional<std::string> refused = refused_thread_message(e)) return {ZO2_ERR_OUT_OF_MEMORY, *refused};
  return {ZO2_ERR_INTERNAL, e.what()};
}

namespace {

using zo2::ErrorKind;
using zo2::status_of;
using zo2::fail;

thread_local std::string t_last_error;

void set_error(const char* fn, std::string_view message) noexcept {
  try {
    t_last_error.assign(fn);
    t_last_error.append(": ");
    t_last_error.append(message);
  } catch (...) {
    // Out of memory while formatting: keep whatever fits.
  }
}

// The layers below name zo2-tune's flags in their messages (the planner's "--offload none
// needs ..."); a C host reads the fields of its params instead (zo2.h: "the message names
// the field"). Whole flags only: "--gpu-mem" becomes "gpu_mem_bytes", "--out" stays.
std::string with_c_names(std::string m) {
  static const std::pair<std::string_view, std::string_view> kNames[] = {
      {"--gpu-mem", "gpu_mem_bytes"},       {"--host-mem", "host_mem_bytes"},
      {"--disk-dir", "disk_dir"},           {"--disk-lag", "disk_lag"},
      {"--disk-staging", "disk_staging"},   {"--offload", "offload"},
      {"--window", "window"},               {"--tile", "tile_bytes"},
      {"--kv-cache", "kv_cache"},           {"--prefill-chunk", "prefill_chunk"},
      {"--optimizer", "optimizer"},         {"--directions", "directions"},
      {"--difference", "difference"},       {"--state-dtype", "state_dtype"},
      {"--storage-dtype", "storage_dtype"}, {"--compute-dtype", "compute_dtype"},
      {"--save-dtype", "save_dtype"},       {"--shard-size", "save_shard_bytes"},
      {"--seed", "seed"},                   {"--parallel", "parallel"},
      {"--rank-timeout", "rank_timeout_s"}, {"--host-image", "share_host_image"},
      {"--upload", "sliced_upload"},        {"--threads", "n_threads"},
      {"--device", "device"},               {"--lora-r", "lora_r"},
      {"--lora-alpha", "lora_alpha"},       {"--lora-targets", "lora_targets"},
      {"--adapter", "adapter_path"},        {"--num-prefix", "prefix_tokens"},
      {"--batch-size", "max_seqs"},         {"--lr", "lr"},
      {"--eps", "eps"},                     {"--weight-decay", "weight_decay"},
  };
  auto flag_char = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'; };
  std::string out;
  out.reserve(m.size());
  for (std::size_t i = 0; i < m.size();) {
    if (m.compare(i, 2, "--") == 0 && (i == 0 || !flag_char(m[i - 1]))) {
      std::size_t end = i + 2;
      while (end < m.size() && flag_char(m[end])) ++end;
      const std::string_view flag(m.data() + i, end - i);
      const auto* hit = std::find_if(std::begin(kNames), std::end(kNames), [&](const auto& n) { return n.first == flag; });
      if (hit != std::end(kNames)) {
        out += hit->second;
        i = end;
        continue;
      }
    }
    out += m[i++];
  }
  return out;
}

// Runs body(); returns its status, or the code of what it threw with the message recorded.
// `on_error(code)` runs (noexcept context) before returning a failure, e.g. to poison a session.
template <class Body, class OnError>
int guarded(const char* fn, Body&& body, OnError&& on_error) noexcept {
  int code;
  try {
    code = body();
    return code;
  } catch (const zo2::Error& e) {
    set_error(fn, with_c_names(e.what()));
    code = status_of(e.kind());
  } catch (const std::exception& e) {
    const zo2::ExceptionStatus st = zo2::status_of_exception(e);
    set_error(fn, st.message);
    code = st.code;
  } catch (...) {
    set_error(fn, "unknown exception");
    code = ZO2_ERR_INTERNAL;
  }
  on_error(code);
  return code;
}

template <class Body>
int guarded(const char* fn, Body&& body) noexcept {
  return guarded(fn, std::forward<Body>(body), [](int) {});
}

[[noreturn]] void invalid(const std::string& message) { throw zo2::Error(ErrorKind::invalid_argument, message); }

zo2::DType parse_dtype(const char* field, const char* name, std::initializer_list<zo2::DType> allowed) {
  if (!name) invalid(fmt::format("{} is NULL", field));
  const auto dt = zo2::dtype_from_name(name);
  std::string names;
  for (zo2::DType a : allowed) names += fmt::format("{}{}", names.empty() ? "" : ", ", zo2::dtype_name(a));
  if (!dt) invalid(fmt::format("{} '{}' is not a known dtype (expected one of {})", field, name, names));
  for (zo2::DType a : allowed)
    if (*dt == a) return a;
  throw zo2::Error(ErrorKind::unsupported,
                   fmt::format("{} '{}' is not supported here (expected one of {})", field, name, names));
}

// Validates p against the model and turns it into a SessionConfig (nothing is opened). The
// ranges are api/options.cpp's, the same zo2-tune's flags are checked against.
zo2::SessionConfig session_config(const zo2::ModelConfig& model, const zo2_session_params& p) {
  using zo2::Opt;
  constexpr auto c_api = zo2::OptionSource::c_api;
  zo2::SessionConfig sc;
  if (!p.device) invalid("device is NULL");
  sc.device = p.device;
  (void)zo2::parse_device(sc.device);  // an unknown device string fails here, before any work
  sc.gpu_mem = static_cast<std::size_t>(p.gpu_mem_bytes);
  zo2::check_size(Opt::gpu_mem, p.gpu_mem_bytes, c_api);
  switch (p.offload) {
    case ZO2_OFFLOAD_AUTO: sc.offload = zo2::OffloadMode::auto_; break;
    case ZO2_OFFLOAD_ALL: sc.offload = zo2::OffloadMode::all; break;
    case ZO2_OFFLOAD_NONE: sc.offload = zo2::OffloadMode::none; break;
    default: invalid(fmt::format("offload {} is not a zo2_offload_mode (0 auto, 1 all, 2 none)", p.offload));
  }
  sc.window = p.window;
  using zo2::DType;
  sc.storage = parse_dtype("storage_dtype", p.storage_dtype, {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3});
  sc.compute = parse_dtype("compute_dtype", p.compute_dtype, {DType::f32, DType::bf16, DType::f16});
  sc.threads = p.n_threads;
  zo2::check_size(Opt::host_mem, p.host_mem_bytes, c_api);
  sc.host_mem = static_cast<std::size_t>(p.host_mem_bytes);
  if (p.disk_dir) {
    if (p.disk_dir[0] == '\0') invalid("disk_dir is empty (use NULL for none)");
    sc.disk_dir = p.disk_dir;
  }
  sc.disk_lag = p.disk_lag;
  sc.disk_staging = p.disk_staging;
  sc.tile = p.tile_bytes;
  zo2::check_session_options(sc, c_api);  // window, n_threads, the disk tier's, and the device runs the compute dtype
  // Given = not the documented default (zo2.h): disk_lag 1, disk_staging 0.
  zo2::check_disk_tier_options(sc, p.disk_lag != 1, p.disk_staging != 0, c_api);
  zo2::check_integer(Opt::batch_size, p.max_seqs, c_api);
  zo2::check_integer(Opt::max_len, p.max_seq_len, c_api);
  if (p.max_seq_len > model.max_positions)
    invalid(fmt::format("max_seq_len {} exceeds the model's max_position_embeddings ({})", p.max_seq_len,
                        model.max_positions));
  sc.max_batch = p.max_seqs;
  sc.max_seq = p.max_seq_len > 0 ? p.max_seq_len : static_cast<int>(model.max_positions);
  sc.training = p.training != 0;
  zo2::check_real(Opt::eps, p.eps, c_api);
  zo2::check_real(Opt::lr, p.lr, c_api);
  zo2::check_real(Opt::weight_decay, p.weight_decay, c_api);
  sc.run_seed = p.seed;
  if (p.seed_log_path) {
    if (p.seed_log_path[0] == '\0') invalid("seed_log_path is empty (use NULL for no seed log)");
    // An evaluation-only session logs no steps: its log would be an empty run's, which a
    // later training session on that path would find in its way.
    if (!sc.training) invalid("seed_log_path is set but training is 0: an evaluation-only session logs no steps");
    sc.seed_log = p.seed_log_path;
  }
  sc.seed_log_append = p.seed_log_append != 0;
  zo2::check_seed_log_options(sc.seed_log_append, p.seed_log_path != nullptr, c_api);
  zo2::check_integer(Opt::first_step, p.first_step, c_api);
  sc.first_step = p.first_step;
  const DType save_dtype = parse_dtype("save_dtype", p.save_dtype, {DType::f32, DType::bf16, DType::f16});
  zo2::check_size(Opt::shard_size, p.save_shard_bytes, c_api);
  // The update rule, checked by the rule's own validation (zo/rule.h) with the fields' names.
  if (!p.optimizer) invalid("optimizer is NULL");
  const auto kind = zo2::parse_rule(p.optimizer);
  if (!kind)
    invalid(fmt::format("optimizer '{}' is not one of zo-sgd, zo-sgd-sign, zo-sgd-cons, zo-sgd-momentum, zo-adam",
                        p.optimizer));
  sc.rule.kind = *kind;
  // The rules' own fields are checked whatever the optimizer: one the rule does not use holds
  // its default unless the host set it, and a value no rule accepts (beta2 5, a NaN) is a
  // mistake to say, not to ignore.
  for (const auto& [name, v] : {std::pair{"momentum", p.momentum}, std::pair{"beta1", p.beta1},
                                std::pair{"beta2", p.beta2}})
    if (!(v >= 0.0f && v < 1.0f)) invalid(fmt::format("{} {}: must lie in [0, 1) (checked for every optimizer)", name, v));
  if (!(p.adam_eps > 0.0f && std::isfinite(p.adam_eps)))
    invalid(fmt::format("adam_eps {}: must be a positive number (checked for every optimizer)", p.adam_eps));
  if (!p.difference) invalid("difference is NULL");
  const auto diff = zo2::parse_difference(p.difference);
  if (!diff) invalid(fmt::format("difference '{}' is neither central nor forward", p.difference));
  sc.rule.difference = *diff;
  sc.rule.directions = p.directions;
  sc.rule.beta1 = sc.rule.kind == zo2::RuleKind::momentum ? p.momentum : p.beta1;
  sc.rule.beta2 = p.beta2;
  sc.rule.adam_eps = p.adam_eps;
  // (checked for every optimizer too: "fp16" or a typo is a mistake whatever the rule)
  const DType state_dtype = parse_dtype("state_dtype", p.state_dtype, {DType::f32, DType::bf16, DType::f8_e4m3});
  sc.rule.state_dtype = sc.rule.state_buffers() > 0 ? state_dtype : DType::f32;
  if (sc.rule.kind == zo2::RuleKind::momentum) sc.rule.beta2 = 0.999f, sc.rule.adam_eps = 1e-8f;
  zo2::validate_rule(sc.rule, p.weight_decay, /*c_api=*/true);
  sc.resume_state = p.resume_state != 0;
  if (p.parallel) {
    // (zo/parallel.cpp reads "" as one process: zo2-tune's --parallel not given)
    if (p.parallel[0] == '\0') invalid("parallel is empty (use NULL for the default)");
    sc.parallel = zo2::parse_parallel(p.parallel, "parallel");
  }
  if (!(p.rank_timeout_s >= 0) || !std::isfinite(p.rank_timeout_s))
    invalid(fmt::format("rank_timeout_s {} must be finite and ≥ 0 (0 = no limit)", p.rank_timeout_s));
  sc.share_host_image = p.share_host_image != 0;
  sc.sliced_upload = p.sliced_upload != 0;
  // LoRA: an adapter directory decides its own shape; else lora_r > 0 asks for new adapters.
  // The combinations are checked as zo2-tune's flags are (api/options.h), "given" being a
  // field other than its documented default (lora_r 0, lora_alpha 16, lora_targets
  // "q_proj,v_proj", prefix_tokens 0).
  if (!p.lora_targets && p.lora_r != 0) invalid("lora_targets is NULL");
  zo2::AdapterOptions ask;
  ask.lora = p.lora_r != 0;
  ask.prefix = p.prefix_tokens != 0;
  ask.prefix_tokens = p.prefix_tokens;
  if (p.lora_r != 0) ask.r = p.lora_r;
  if (p.lora_alpha != 16.0f) ask.alpha = p.lora_alpha;
  if (p.lora_targets && std::string_view(p.lora_targets) != "q_proj,v_proj") ask.targets = std::string(p.lora_targets);
  if (p.adapter_path) {
    if (p.adapter_path[0] == '\0') invalid("adapter_path is empty (use NULL for none)");
    sc.adapter_dir = zo2::resolve_model_dir(p.adapter_path);
    sc.peft = zo2::AdapterStore::peft_config_of(sc.adapter_dir);
    ask.adapter = p.adapter_path;
    ask.adapter_shape = sc.peft;
  }
  zo2::check_adapter_options(ask, c_api);
  // An adapter's shape is sc.peft already (its adapter_config.json, read above).
  if (!p.adapter_path && p.prefix_tokens != 0) {
    sc.peft.prefix = p.prefix_tokens;
  } else if (!p.adapter_path && p.lora_r != 0) {
    sc.peft.lora = true;
    sc.peft.r = p.lora_r;
    sc.peft.alpha = p.lora_alpha;
    try {
      sc.peft.targets = zo2::parse_lora_targets(p.lora_targets);
    } catch (const zo2::Error& e) {
      invalid(fmt::format("lora_targets '{}': an empty module name", p.lora_targets));
    }
  }
  if (sc.peft.any() || sc.peft.prefix != 0) zo2::validate_peft(sc.peft, model, /*c_api=*/true);  // prefix < 0 too
  zo2::check_save_dtype_option(save_dtype, save_dtype != DType::f32, sc.peft, c_api);
  // Generation (zo2_generate).
  if (p.generate_seqs < 0 || p.generate_seqs > p.max_seqs)
    invalid(fmt::format("generate_seqs {}: must be in [0, max_seqs = {}]", p.generate_seqs, p.max_seqs));
  if (!p.kv_cache) invalid("kv_cache is NULL");
  try {
    sc.generate.kv = zo2::parse_kv_place(p.kv_cache);
  } catch (const zo2::Error&) {
    invalid(fmt::format("kv_cache '{}' is not one of auto, device, host, off", p.kv_cache));
  }
  sc.generate.batch = p.generate_seqs;
  if (p.prefill_chunk < 0) invalid(fmt::format("prefill_chunk {}: must be ≥ 0 (0 = whole prompts)", p.prefill_chunk));
  sc.generate.chunk = p.prefill_chunk;
  // Given = not the documented default: kv_cache "auto", prefill_chunk 0.
  zo2::check_generation_options(p.generate_seqs > 0, std::string_view(p.kv_cache) != "auto", p.kv_cache,
                                p.prefill_chunk != 0, p.prefill_chunk, c_api);
  return sc;
}

// The checks make_batch does not do: NULLs and the session's capacity.
zo2::HostBatch host_batch(const zo2_session& s, const zo2_batch* b, const zo2_choices* choices = nullptr,
                          bool choices_required = false) {
  if (!b) invalid("batch is NULL");
  if (b->n_seq <= 0 || b->n_tokens <= 0)
    invalid(fmt::format("batch n_seq and n_tokens must be positive (got n_seq {}, n_tokens {})", b->n_seq,
                        b->n_tokens));
  if (b->n_seq > s.max_seqs)
    invalid(fmt::format("batch n_seq {} exceeds the session's capacity max_seqs = {}", b->n_seq, s.max_seqs));
  if (b->n_tokens > s.max_seq_len)
    invalid(fmt::format("batch n_tokens {} exceeds the session's capacity max_seq_len = {}", b->n_tokens,
                        s.max_seq_len));
  if (!b->tokens) invalid("batch tokens is NULL");
  const std::size_t n = static_cast<std::size_t>(b->n_seq) * static_cast<std::size_t>(b->n_tokens);
  auto span_of = [n](const int32_t* p) {
    return p ? std::span<const std::int32_t>(p, n) : std::span<const std::int32_t>();
  };
  zo2::HostBatch hb = zo2::make_batch(s.config, b->n_seq, b->n_tokens, span_of(b->tokens),
                                      span_of(b->attention_mask), span_of(b->labels));
  if (choices_required) {
    if (!choices) invalid("choices is NULL");
    if (choices->n_groups <= 0) invalid(fmt::format("choices n_groups must be positive (got {})", choices->n_groups));
    if (!choices->group_sizes || !choices->group_labels) invalid("choices group_sizes or group_labels is NULL");
    const auto g = static_cast<std::size_t>(choices->n_groups);
    zo2::set_option_groups(hb, std::span<const int>(choices->group_sizes, g),
                           std::span<const int>(choices->group_labels, g));
  }
  return hb;
}

// A non-NULL session used by the process that created it (not a fork() child, whose copy
// has no worker threads).
void check_owner(const zo2_session* s) {
  if (!s) invalid("session is NULL");
  if (s->owner_pid != getpid())
    invalid(fmt::format("the session was created in process {}; this is process {}, a forked child, which cannot use "
                        "it (the session's worker threads exist only in its creator): create a new session in the "
                        "child (zo2_session_free there releases nothing)",
                        static_cast<long>(s->owner_pid), static_cast<long>(getpid())));
}

zo2_session& usable(zo2_session* s) {
  check_owner(s);
  if (s->broken_code != 0)
    throw zo2::Error(s->broken_code == ZO2_ERR_DEVICE ? ErrorKind::device : ErrorKind::internal,
                     "the session is unusable after an earlier failure: " + s->broken_message);
  return *s;
}

// What a call does, for the calls a callback inside another call on the session may make
// (Note [In use]): a query (set_lr included), an eval (or save), a step or a generation.
enum class Call { query, eval, run };

void free_session(zo2_session* s) noexcept {
  guarded("zo2_session_free", [&] {
    // Streams keep running their event items after a failure (runtime/cpu), so even a
    // poisoned session drains and is released; its destructor logs what it cannot finish.
    delete s;
    return 0;
  });
}

// Marks the session as used by this thread for the call (Note [In use]). Declared before
// `guarded` so that it outlives the error handler (poison) too.
class InUse {
 public:
  InUse() = default;
  InUse(const InUse&) = delete;
  InUse& operator=(const InUse&) = delete;
  // Throws (inside guarded) when s is NULL or a fork()'s copy, another thread is inside a
  // call on s, or this thread is and `call` may not run there.
  void enter(const zo2_session* s, Call call) {
    check_owner(s);
    const std::thread::id me = std::this_thread::get_id();
    std::thread::id held;
    if (s->user.compare_exchange_strong(held, me, std::memory_order_acquire)) {
      s_ = const_cast<zo2_session*>(s);  // (every session is made non-const by zo2_session_init)
      return;
    }
    if (held != me) invalid("the session is in use by another thread (zo2.h: one thread at a time)");
    if (s->free_pending) invalid("the session was freed (zo2_session_free from a callback)");
    using CB = zo2_session::Callback;
    if (call == Call::query) return;
    if (s->callback == CB::step && call == Call::eval) return;
    if (s->callback == CB::step)
      invalid("called from the session's progress callback, inside zo2_session_step: a step or a generation cannot "
              "start there (zo2.h: a progress callback may eval, save, set_lr, query and free the session)");
    if (s->callback == CB::generate)
      invalid("called from zo2_generate's progress callback: only set_lr, the queries (step_index, ...) and "
              "zo2_session_free may run there (zo2.h)");
    invalid("called from inside another call on this session on this thread (a log callback?): only set_lr and "
            "the queries (step_index, ...) may run there (zo2.h)");
  }
  ~InUse() {
    if (!s_) return;
    if (s_->free_pending) {
      free_session(s_);  // (the host freed it: nobody may use it now)
      return;
    }
    s_->user.store(std::thread::id(), std::memory_order_release);
  }

 private:
  zo2_session* s_ = nullptr;  // set when this call marked the session (the outermost call)
};

// Sets the session's running callback for one call of it (Note [In use]).
class InCallback {
 public:
  InCallback(zo2_session& s, zo2_session::Callback c) : s_(s), before_(s.callback) { s.callback = c; }
  InCallback(const InCallback&) = delete;
  InCallback& operator=(const InCallback&) = delete;
  ~InCallback() { s_.callback = before_; }  // (a free from the callback is deferred: s_ is still there)

 private:
  zo2_session& s_;
  zo2_session::Callback before_;
};

// A failure past argument validation (device, internal) leaves the scheduler's streams in
// an unknown state: poison the session so later calls fail instead of waiting forever.
auto poison(zo2_session* s) {
  return [s](int code) noexcept {
    if (!s || code == ZO2_ERR_INVALID_ARGUMENT || code >= 0) return;
    if (code == ZO2_ERR_DEVICE || code == ZO2_ERR_INTERNAL) {
      s->broken_code = code;
      try {
        s->broken_message = t_last_error;
      } catch (...) {
      }
    }
  };
}

void fill_plan(const zo2::Placement& pl, std::int64_t blocks, zo2_plan_result* out) {
  *out = zo2_plan_result{};
  out->cap_bytes = pl.cap;
  out->device_bytes = pl.total_bytes;
  out->minimum_cap_bytes = pl.minimum_cap;
  out->n_blocks = blocks;
  out->n_resident = pl.resident_count;
  out->n_streamed = pl.streamed;
  out->window = pl.window;
  out->block_bytes = pl.block_bytes;
  out->globals_bytes = pl.globals_bytes;
  out->h2d_bytes_per_step = pl.h2d_bytes_per_step;
  out->d2h_bytes_per_step = pl.d2h_bytes_per_step;
  out->predicted_transfer_s = pl.predicted_transfer_s;
  out->host_bytes = pl.host_bytes;
  out->n_disk_blocks = pl.disk_blocks;
  out->disk_file_bytes = pl.disk_file_bytes;
  out->disk_read_bytes_per_step = pl.disk_read_bytes_per_step;
  out->disk_write_bytes_per_step = pl.disk_write_bytes_per_step;
  out->predicted_disk_s = pl.predicted_disk_s;
  out->tile_slots = pl.tile_slots;
  out->tile_slot_bytes = pl.tile_slots > 0 ? pl.tile_bytes : 0;
  out->tiles_per_block = pl.tile_slots > 0 ? pl.block_tiles : 0;
}

// Reads the safetensors headers and checks every tensor the model needs is there, with
// its shape, as load_image will (without reading any data).
void check_weights(const std::filesystem::path& dir, const zo2::ModelConfig& c) {
  zo2::check_checkpoint_tensors(zo2::SafetensorsCheckpoint::open(dir), c, dir.string());
}

// `dir` made absolute against the working directory now, without its "." components (the
// symlinks and ".." are kept, as the OS resolves them: lexically_normal could change them).
std::filesystem::path absolute_dir(const std::filesystem::path& dir) {
  std::filesystem::path out;
  for (const auto& part : std::filesystem::absolute(dir))
    if (part != "." && !part.empty()) out /= part;
  return out;
}

std::size_t physical_ram() { return zo2::cpu_default_arena_bytes(); }  // the CPU arena without a cap

}  // namespace

// The definitions take their C linkage from the declarations in zo2.h.

// The header's ZO2_VERSION_* are written by hand: the build stops if they and project(VERSION) differ.
static_assert(ZO2_VERSION_MAJOR == ZO2_PROJECT_VERSION_MAJOR && ZO2_VERSION_MINOR == ZO2_PROJECT_VERSION_MINOR &&
                  ZO2_VERSION_PATCH == ZO2_PROJECT_VERSION_PATCH,
              "include/zo2.h's ZO2_VERSION_MAJOR/MINOR/PATCH differ from CMakeLists.txt's project(VERSION)");
const char* zo2_version(void) { return ZO2_VERSION_STRING; }

const char* zo2_last_error(void) { return t_last_error.c_str(); }

void zo2_log_set(zo2_log_callback callback, void* user_data) {
  guarded("zo2_log_set", [&] {
    if (!callback) {
      zo2::log_set_sink({});
    } else {
      zo2::log_set_sink([callback, user_data](zo2::LogLevel level, std::string_view text) {
        const std::string copy(text);  // nul-terminated for C
        callback(static_cast<zo2_log_level>(level), copy.c_str(), user_data);
      });
    }
    return 0;
  });
}

void zo2_log_set_level(enum zo2_log_level level) {
  int l = static_cast<int>(level);
  l = l < ZO2_LOG_DEBUG ? ZO2_LOG_DEBUG : l > ZO2_LOG_OFF ? ZO2_LOG_OFF : l;
  zo2::log_set_level(static_cast<zo2::LogLevel>(l));
}

zo2_model_params zo2_model_default_params(void) {
  zo2_model_params p;
  std::memset(&p, 0, sizeof p);
  p.check_weights = 1;
  return p;
}

int zo2_model_load(const char* hf_dir, const zo2_model_params* p, zo2_model** out) {
  if (out) *out = nullptr;
  return guarded("zo2_model_load", [&] {
    if (!out) invalid("out is NULL");
    if (!hf_dir) invalid("hf_dir is NULL");
    if (hf_dir[0] == '\0') invalid("hf_dir is empty");
    const zo2_model_params params = p ? *p : zo2_model_default_params();
    const std::filesystem::path dir(hf_dir);
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec))
      fail(ErrorKind::io, "{}: not a directory (expected an HF checkpoint with config.json)", dir.string());
    auto m = std::make_unique<zo2_model>();
    // A run directory: its current checkpoint, resolved once; absolute, so that a host's
    // chdir() before zo2_session_init cannot make it read another directory's weights.
    m->dir = absolute_dir(zo2::resolve_model_dir(dir));
    m->config = zo2::ModelConfig::load(m->dir);
    if (params.check_weights) check_weights(m->dir, m->config);
    *out = m.release();
    return 0;
  });
}

void zo2_model_free(zo2_model* m) { delete m; }

namespace {
template <class T, class F>
T model_query(const char* fn, const zo2_model* m, F f) {
  if (!m) {
    set_error(fn, "model is NULL");
    return 0;
  }
  return static_cast<T>(f(m->config));
}
}  // namespace

int32_t zo2_model_n_vocab(const zo2_model* m) {
  return model_query<int32_t>("zo2_model_n_vocab", m, [](const auto& c) { return c.vocab_size; });
}
int32_t zo2_model_n_ctx(const zo2_model* m) {
  return model_query<int32_t>("zo2_model_n_ctx", m, [](const auto& c) { return c.max_positions; });
}
int32_t zo2_model_n_layer(const zo2_model* m) {
  return model_query<int32_t>("zo2_model_n_layer", m, [](const auto& c) { return c.num_layers; });
}
int64_t zo2_model_n_params(const zo2_model* m) {
  return model_query<int64_t>("zo2_model_n_params", m, [](const auto& c) { return c.total_params(); });
}

zo2_session_params zo2_session_default_params(void) {
  zo2_session_params p;
  std::memset(&p, 0, sizeof p);
  p.lr = 1e-6f;
  p.eps = 1e-3f;
  p.weight_decay = 0.0f;
  p.seed = 0;
  p.device = "cpu";
  p.gpu_mem_bytes = 0;
  p.offload = ZO2_OFFLOAD_AUTO;
  p.window = 3;
  p.storage_dtype = "fp32";
  p.compute_dtype = "fp32";
  p.n_threads = 0;
  p.max_seqs = 1;
  p.max_seq_len = 0;
  p.training = 1;
  p.seed_log_path = nullptr;
  p.seed_log_append = 0;
  p.first_step = 0;
  p.save_dtype = "fp32";
  p.save_shard_bytes = 5000000000ull;
  p.progress_callback = nullptr;
  p.progress_user_data = nullptr;
  p.optimizer = "zo-sgd";
  p.directions = 1;
  p.difference = "central";
  p.momentum = 0.9f;
  p.beta1 = 0.9f;
  p.beta2 = 0.999f;
  p.adam_eps = 1e-8f;
  p.state_dtype = "fp32";
  p.resume_state = 0;
  p.lora_r = 0;
  p.lora_alpha = 16.0f;
  p.lora_targets = "q_proj,v_proj";
  p.adapter_path = nullptr;
  p.prefix_tokens = 0;
  p.generate_seqs = 0;
  p.kv_cache = "auto";
  p.prefill_chunk = 0;
  p.parallel = nullptr;
  p.mpi_comm = nullptr;
  p.rank_timeout_s = 600;
  p.share_host_image = 1;
  p.sliced_upload = 0;
  p.host_mem_bytes = 0;
  p.disk_dir = nullptr;
  p.disk_lag = 1;
  p.disk_staging = 0;
  p.tile_bytes = 0;
  return p;
}

int zo2_session_init(zo2_model* m, const zo2_session_params* p, zo2_session** out) {
  if (out) *out = nullptr;
  return guarded("zo2_session_init", [&] {
    if (!out) invalid("out is NULL");
    if (!m) invalid("model is NULL");
    const zo2_session_params params = p ? *p : zo2_session_default_params();
    zo2::SessionConfig sc = session_config(m->config, params);
    sc.base_model = std::filesystem::absolute(m->dir).string();
    auto s = std::make_unique<zo2_session>();
    s->config = m->config;
    s->lr = params.lr;
    s->eps = params.eps;
    s->weight_decay = params.weight_decay;
    s->max_seqs = sc.max_batch;
    s->max_seq_len = sc.max_seq;
    s->save_dtype = *zo2::dtype_from_name(params.save_dtype);
    s->save_shard_bytes = params.save_shard_bytes;
    s->progress = params.progress_callback;
    s->progress_user_data = params.progress_user_data;
    // Ranks: the host's communicator, or the launcher's world.
    const bool ranks = params.parallel || params.mpi_comm || zo2::launched_by_mpi();
    if (ranks && sc.training) {
      s->comm = params.mpi_comm ? zo2::make_mpi_comm_from(params.mpi_comm) : zo2::make_comm_from_environment();
      s->comm->set_timeout(params.rank_timeout_s);
      if (!params.parallel && s->comm->size() > 1) sc.parallel.data = s->comm->size();
      zo2::validate_parallel(sc.parallel, s->comm->size(), sc.rule, sc.max_batch, "parallel",
                            params.parallel ? params.parallel : "");
      sc.comm = s->comm.get();
    }
    s->session = std::make_unique<zo2::Session>(m->dir, sc);
    // The session reads the directory again: a checkpoint replaced since zo2_model_load
    // (another vocabulary) would have its batches checked against the handle's old config
    // (adversarial pass 57: ids past the new vocabulary were read out of bounds).
    const zo2::ModelConfig& now = s->session->config();
    const std::pair<const char*, std::pair<std::int64_t, std::int64_t>> fields[] = {
        {"vocab_size", {m->config.vocab_size, now.vocab_size}},
        {"hidden_size", {m->config.hidden_size, now.hidden_size}},
        {"num_hidden_layers", {m->config.num_layers, now.num_layers}},
        {"num_attention_heads", {m->config.num_heads, now.num_heads}},
        {"num_key_value_heads", {m->config.num_kv_heads, now.num_kv_heads}},
        {"head_dim", {m->config.head_dim, now.head_dim}},
        {"intermediate_size", {m->config.ffn_dim, now.ffn_dim}},
        {"max_position_embeddings", {m->config.max_positions, now.max_positions}}};
    if (m->config.family != now.family)
      zo2::fail(zo2::ErrorKind::format, "{}: config.json changed since zo2_model_load ({} → {}): load the model again",
                m->dir.string(), m->config.family_name(), now.family_name());
    for (const auto& [name, v] : fields)
      if (v.first != v.second)
        zo2::fail(zo2::ErrorKind::format,
                  "{}: config.json changed since zo2_model_load ({} {} → {}): load the model again", m->dir.string(),
                  name, v.first, v.second);
    *out = s.release();
    return 0;
  });
}

void zo2_session_free(zo2_session* s) {
  if (!s) return;
  // In a forked child the scheduler's threads do not exist: destroying it would wait for
  // them forever. The child's copy of the session is leaked on purpose (its memory goes
  // when the child exits); the creator's session is untouched.
  if (s->owner_pid != getpid()) return;
  // Note [In use]: from a callback inside a call on s, the outer call frees it as it
  // returns; during another thread's call, s is leaked with an error logged.
  const std::thread::id me = std::this_thread::get_id();
  std::thread::id held;
  if (!s->user.compare_exchange_strong(held, me, std::memory_order_acquire)) {
    if (held == me) {
      s->free_pending = true;
      return;
    }
    static constexpr const char* kLeaked =
        "the session is in use by another thread (zo2.h: one thread at a time): not freed (its memory and "
        "threads are leaked) rather than pulled from under that call";
    set_error("zo2_session_free", kLeaked);
    zo2::log(zo2::LogLevel::error, "zo2_session_free: {}", kLeaked);
    return;
  }
  free_session(s);
}

namespace {
int step_common(const char* fn, zo2_session* s, const zo2_batch* b, const zo2_choices* c, bool with_choices,
                zo2_step_result* out) {
  bool validated = false;
  InUse in_use;
  return guarded(
      fn,
      [&] {
        in_use.enter(s, Call::run);
        zo2_session& ss = usable(s);
        if (!ss.session->session_config().training)
          invalid("this session was opened for evaluation only (training = 0)");
        const zo2::HostBatch hb = host_batch(ss, b, c, with_choices);
        zo2::require_targets(hb);  // nothing to predict: invalid, the step index unchanged
        validated = true;
        const zo2::StepResult r = ss.session->step(hb, ss.lr, ss.eps, ss.weight_decay);
        zo2_step_result res{r.loss_plus, r.loss_minus, r.g};
        if (out) *out = res;
        if (!ss.progress) return 0;
        // The host's code: an exception out of a C++ host's callback is its stop request, not
        // a fault of the session (the step is done; the session stays usable).
        int stop = 0;
        const InCallback in_callback(ss, zo2_session::Callback::step);
        try {
          stop = ss.progress(r.step, &res, ss.progress_user_data);
        } catch (const std::exception& e) {
          set_error(fn, fmt::format("the progress callback threw after step {}: {}", r.step, e.what()));
          return static_cast<int>(ZO2_ABORTED);
        } catch (...) {
          set_error(fn, fmt::format("the progress callback threw after step {}", r.step));
          return static_cast<int>(ZO2_ABORTED);
        }
        if (stop != 0) {
          set_error(fn, fmt::format("the progress callback asked to stop after step {}", r.step));
          return static_cast<int>(ZO2_ABORTED);
        }
        return 0;
      },
      [&](int code) {
        if (validated) poison(s)(code);
      });
}


int eval_common(const char* fn, zo2_session* s, const zo2_batch* b, float* out_loss, float* token_logprobs,
                const zo2_choices* c = nullptr, bool with_choices = false) {
  bool validated = false;
  InUse in_use;
  return guarded(
      fn,
      [&] {
        in_use.enter(s, Call::eval);
        zo2_session& ss = usable(s);
        if (!out_loss && !token_logprobs) invalid("out is NULL");
        const zo2::HostBatch hb = host_batch(ss, b, c, with_choices);
        if (out_loss) zo2::require_targets(hb);  // a loss over no target is 0/0
        validated = true;
        zo2::EvalOptions o;
        std::vector<float> token_loss;
        if (token_logprobs) {
          token_loss.resize(static_cast<std::size_t>(hb.tokens()));
          o.token_loss = token_loss.data();
        }
        const float loss = ss.session->eval(hb, o);
        if (out_loss) *out_loss = loss;
        for (std::size_t i = 0; i < token_loss.size(); ++i) token_logprobs[i] = 0.0f - token_loss[i];
        return 0;
      },
      [&](int code) {
        if (validated) poison(s)(code);
      });
}
}  // namespace

int zo2_session_step(zo2_session* s, const zo2_batch* b, zo2_step_result* out) {
  return step_common("zo2_session_step", s, b, nullptr, false, out);
}

int zo2_session_step_choices(zo2_session* s, const zo2_batch* b, const zo2_choices* c, zo2_step_result* out) {
  return step_common("zo2_session_step_choices", s, b, c, true, out);
}

int zo2_session_eval_choices(zo2_session* s, const zo2_batch* b, const zo2_choices* c, float* out_loss) {
  if (!out_loss) {
    return guarded("zo2_session_eval_choices", [&]() -> int {
      usable(s);
      invalid("out_loss is NULL");
    });
  }
  return eval_common("zo2_session_eval_choices", s, b, out_loss, nullptr, c, true);
}

int zo2_session_eval(zo2_session* s, const zo2_batch* b, float* out_loss) {
  if (!out_loss) {
    return guarded("zo2_session_eval", [&]() -> int {
      usable(s);
      invalid("out_loss is NULL");
    });
  }
  return eval_common("zo2_session_eval", s, b, out_loss, nullptr);
}

zo2_generate_params zo2_generate_default_params(void) {
  zo2_generate_params p{};
  p.max_new_tokens = 32;
  p.greedy = 1;
  p.temperature = 1.0f;
  p.top_p = 1.0f;
  p.seed = 0;
  p.stop_ids = nullptr;
  p.n_stop_ids = 0;
  p.pad_id = 0;
  p.progress_callback = nullptr;
  p.progress_user_data = nullptr;
  return p;
}

int zo2_generate(zo2_session* s, const int32_t* const* prompts, const int32_t* prompt_lens, int32_t n_prompts,
                 const zo2_generate_params* p, int32_t* out_tokens, int32_t* out_lens, int32_t* out_stopped) {
  bool validated = false;
  InUse in_use;
  return guarded(
      "zo2_generate",
      [&] {
        in_use.enter(s, Call::run);
        zo2_session& ss = usable(s);
        if (!prompts || !prompt_lens) invalid("prompts or prompt_lens is NULL");
        if (!out_tokens || !out_lens) invalid("out_tokens or out_lens is NULL");
        if (n_prompts < 1) invalid(fmt::format("n_prompts must be at least 1 (got {})", n_prompts));
        const zo2_generate_params params = p ? *p : zo2_generate_default_params();
        zo2::GenerateOptions o;
        o.max_new_tokens = params.max_new_tokens;
        o.greedy = params.greedy != 0;
        o.temperature = params.temperature;
        o.top_p = params.top_p;
        o.seed = params.seed;
        o.pad_id = params.pad_id;
        if (params.n_stop_ids < 0 || (params.n_stop_ids > 0 && !params.stop_ids))
          invalid(fmt::format("stop_ids is NULL or n_stop_ids {} is negative", params.n_stop_ids));
        o.stop_ids.assign(params.stop_ids, params.stop_ids + params.n_stop_ids);
        if (params.progress_callback) {
          // After each decoding step (the host's code: nothing of the session is in flight);
          // nonzero, or an exception out of a C++ host's callback, stops the generation.
          o.progress = [&params, &ss](const zo2::GenerateProgress& gp) {
            int stop = 0;
            const InCallback in_callback(ss, zo2_session::Callback::generate);
            try {
              stop = params.progress_callback(gp.new_tokens, params.progress_user_data);
            } catch (const std::exception& e) {
              throw zo2::Error(ErrorKind::aborted,
                               fmt::format("the progress callback threw after {} new tokens: {}", gp.new_tokens, e.what()));
            } catch (...) {
              throw zo2::Error(ErrorKind::aborted, fmt::format("the progress callback threw after {} new tokens", gp.new_tokens));
            }
            if (stop != 0)
              throw zo2::Error(ErrorKind::aborted,
                               fmt::format("the progress callback asked to stop after {} new tokens", gp.new_tokens));
          };
        }
        std::vector<std::vector<std::int32_t>> ids(static_cast<std::size_t>(n_prompts));
        for (std::size_t i = 0; i < ids.size(); ++i) {
          if (prompt_lens[i] < 0 || (prompt_lens[i] > 0 && !prompts[i]))
            invalid(fmt::format("prompt {}: NULL or a negative length ({})", i, prompt_lens[i]));
          ids[i].assign(prompts[i], prompts[i] + prompt_lens[i]);
        }
        zo2::check_generate_request(*ss.session, ids, o, zo2::OptionSource::c_api);
        validated = true;
        const auto out = zo2::generate(*ss.session, ids, o);
        const auto stride = static_cast<std::size_t>(o.max_new_tokens);
        for (std::size_t i = 0; i < out.size(); ++i) {
          std::copy(out[i].tokens.begin(), out[i].tokens.end(), out_tokens + i * stride);
          out_lens[i] = static_cast<int32_t>(out[i].tokens.size());
          if (out_stopped) out_stopped[i] = out[i].stopped ? 1 : 0;
        }
        return 0;
      },
      [&](int code) {
        if (validated) poison(s)(code);
      });
}

int zo2_session_token_logprobs(zo2_session* s, const zo2_batch* b, float* out) {
  if (!out) {
    return guarded("zo2_session_token_logprobs", [&]() -> int {
      usable(s);
      invalid("out is NULL");
    });
  }
  return eval_common("zo2_session_token_logprobs", s, b, nullptr, out);
}

int zo2_session_save(zo2_session* s, const char* out_dir) {
  InUse in_use;
  return guarded(
      "zo2_session_save",
      [&] {
        in_use.enter(s, Call::eval);
        zo2_session& ss = usable(s);
        if (!out_dir) invalid("out_dir is NULL");
        if (out_dir[0] == '\0') invalid("out_dir is empty");
        const std::filesystem::path dir(out_dir);
        std::error_code ec;
        std::filesystem::create_directories(dir, ec);
        if (ec || !std::filesystem::is_directory(dir))
          fail(ErrorKind::io, "{}: cannot create the output directory{}{}", dir.string(), ec ? ": " : "",
               ec ? ec.message() : std::string());
        ss.session->save(dir, ss.save_dtype, ss.save_shard_bytes);
        return 0;
      },
      poison(s));
}

int zo2_session_set_lr(zo2_session* s, float lr) {
  InUse in_use;
  return guarded("zo2_session_set_lr", [&] {
    in_use.enter(s, Call::query);
    zo2_session& ss = usable(s);
    zo2::check_real(zo2::Opt::lr, lr, zo2::OptionSource::c_api);
    ss.lr = lr;
    return 0;
  });
}

int64_t zo2_session_step_index(const zo2_session* s) {
  int64_t index = -1;
  InUse in_use;
  guarded("zo2_session_step_index", [&] {
    in_use.enter(s, Call::query);
    index = s->session->next_step();
    return 0;
  });
  return index;
}

uint64_t zo2_session_device_peak(const zo2_session* s) {
  uint64_t peak = 0;
  InUse in_use;
  guarded("zo2_session_device_peak", [&] {
    in_use.enter(s, Call::query);
    peak = s->session->device_peak();
    return 0;
  });
  return peak;
}

int zo2_plan(const zo2_model* m, const zo2_session_params* p, zo2_plan_result* out) {
  return guarded("zo2_plan", [&] {
    if (!out) invalid("out is NULL");
    *out = zo2_plan_result{};
    if (!m) invalid("model is NULL");
    if (!p) invalid("params is NULL");
    const zo2::SessionConfig sc = session_config(m->config, *p);
    const zo2::DeviceOptions dev = zo2::parse_device(sc.device);
    std::size_t cap = sc.gpu_mem;
    if (cap == 0) {
      if (dev.kind != zo2::DeviceKind::cpu)
        invalid("gpu_mem_bytes is 0 (the whole device): zo2_plan opens no device, so give the cap to plan for "
                "(or use zo2_session_plan)");
      cap = physical_ram();
    }
    out->n_blocks = m->config.num_layers;
    // A preview, as `zo2-tune plan`: the blocks a disk tier would hold are placed there
    // whether or not disk_dir is given (zo2_session_init refuses a host_mem that needs one).
    const auto request = [&](std::size_t c) {
      zo2::PlanRequest r = zo2::plan_request(m->config, sc, dev.kind, c);
      r.disk_dir = true;
      return r;
    };
    try {
      fill_plan(zo2::plan_placement(m->config, request(cap)),
                m->config.num_layers, out);
    } catch (const zo2::Error& e) {
      if (e.kind() == ErrorKind::out_of_memory) {
        // Still tell the host the smallest cap that works.
        try {
          const auto big = zo2::plan_placement(
              m->config, request(std::numeric_limits<std::size_t>::max() / 4));
          out->minimum_cap_bytes = big.minimum_cap;
          // Under a cap that large no weight tiles are planned; below the whole blocks' minimum
          // (tile auto) they are, and their floor may be smaller: what the error names.
          if (big.minimum_cap > 1) {
            const auto below = zo2::plan_placement(m->config, request(big.minimum_cap - 1));
            out->minimum_cap_bytes = std::min<std::uint64_t>(out->minimum_cap_bytes, below.minimum_cap);
          }
        } catch (...) {
        }
      }
      throw;
    }
    return 0;
  });
}

int zo2_plan_parallel(const zo2_model* m, const zo2_session_params* p, int32_t ranks_per_node,
                      zo2_parallel_plan_result* out) {
  return guarded("zo2_plan_parallel", [&] {
    if (!out) invalid("out is NULL");
    *out = zo2_parallel_plan_result{};
    if (!m) invalid("model is NULL");
    if (!p) invalid("params is NULL");
    if (!p->parallel) invalid("parallel is NULL: give the layout to plan, e.g. \"data=2,perturbation=2\"");
    if (ranks_per_node < 1) invalid(fmt::format("ranks_per_node {} must be ≥ 1", ranks_per_node));
    zo2::SessionConfig sc = session_config(m->config, *p);
    if (!sc.training) invalid("training is 0: a parallel layout plans training ranks");
    zo2::validate_parallel(sc.parallel, sc.parallel.size(), sc.rule, sc.max_batch, "parallel", p->parallel);
    const zo2::DeviceOptions dev = zo2::parse_device(sc.device);
    std::size_t cap = sc.gpu_mem;
    if (cap == 0) {
      if (dev.kind != zo2::DeviceKind::cpu)
        invalid("gpu_mem_bytes is 0 (the whole device): zo2_plan_parallel opens no device, so give the cap to plan for");
      cap = physical_ram();
    }
    const zo2::ParallelPlan pp = zo2::plan_parallel(m->config, sc, dev.kind, cap, ranks_per_node);
    out->ranks = pp.layout.size();
    out->data = pp.layout.data;
    out->perturbation = pp.layout.perturbation;
    out->directions = pp.layout.directions;
    out->ranks_per_node = pp.ranks_per_node;
    out->forward_share = pp.forward_share;
    out->host_bytes_per_node = pp.host_bytes_per_node;
    fill_plan(pp.rank, m->config.num_layers, &out->rank);
    fill_plan(pp.single, m->config.num_layers, &out->single);
    return 0;
  });
}

int zo2_session_rank(const zo2_session* s, int32_t* rank, int32_t* size) {
  InUse in_use;
  return guarded("zo2_session_rank", [&] {
    in_use.enter(s, Call::query);
    if (rank) *rank = s->comm ? s->comm->rank() : 0;
    if (size) *size = s->comm ? s->comm->size() : 1;
    return 0;
  });
}

int zo2_session_plan(const zo2_session* s, zo2_plan_result* out) {
  InUse in_use;
  return guarded("zo2_session_plan", [&] {
    if (!out) invalid("out is NULL");
    in_use.enter(s, Call::query);
    fill_plan(s->session->placement(), s->config.num_layers, out);
    return 0;
  });
}

