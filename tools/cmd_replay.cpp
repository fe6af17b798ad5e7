// zo2-tune replay: the tuned weights from the base checkpoint and the seed log alone
// (DESIGN.md §1): every logged update is applied by the kernels the training run used, in
// the same order, so the result is bit-identical to the run's own checkpoint.
//
// Note [A run's starting adapter]
//   An adapter run either initializes its adapters from the run seed (LoRA's B = 0 and a
//   seeded A; a prefix from a forward of seeded tokens) or starts from an adapter it loads
//   (train --adapter A, a session's adapter_dir). The seed log's header records the latter
//   ("adapter": its resolved directory, "adapter_fingerprint": the CRC-32 of its weights),
//   and replay loads it — from --adapter where it moved — refusing one that is missing or
//   whose fingerprint differs. Without the record, replay of such a run rebuilt the adapters
//   from the run seed's init and silently wrote other weights (adversarial pass 53). A log
//   from before the record has no way to say which it was: it is replayed from the init, as
//   before.
#include "api/options.h"
#include "api/run_dir.h"
#include "runtime/checksum.h"
#include "api/session.h"
#include "runtime/arena.h"
#include "runtime/file_util.h"
#include "runtime/json_file.h"
#include "runtime/log.h"
#include "tools/cli.h"
#include "zo/seed_log.h"

#include <chrono>
#include <nlohmann/json.hpp>
#include <memory>

namespace zo2::cli {

SessionConfig session_config(const DeviceFlags& f, bool training);

Runner add_replay(CLI::App& app) {
  struct Opts {
    std::string model, seed_log, out, adapter, save_dtype = "fp32", shard = "5G";
    std::int64_t until = -1;
    bool overwrite = false;
    DeviceFlags dev;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "the base checkpoint the run started from")->required();
  app.add_option("--seed-log", o->seed_log, "the run's seed_log.jsonl")->required();
  app.add_option("--out", o->out, "output directory for the rebuilt checkpoint")->required();
  app.add_option("--adapter", o->adapter,
                 "the adapter the run started from (train --adapter), where it moved: checked against the seed log's "
                 "fingerprint of it (default: the place the log records)");
  app.add_option("--until-step", o->until, "apply only the updates of steps below this one");
  app.add_option("--save-dtype", o->save_dtype, "fp32, bf16, fp16")->capture_default_str();
  app.add_option("--shard-size", o->shard, "largest safetensors shard")->capture_default_str();
  app.add_flag("--overwrite", o->overwrite, "replace a checkpoint already in --out (never a training run's)");
  o->dev.add(app);
  // Replay rounds as the run did: the seed log's storage_dtype, whatever this flag says.
  app.get_option("--storage-dtype")
      ->description("ignored: replay stores the weights as the seed log records (its storage_dtype; another value "
                    "is warned about)");
  auto* until = app.get_option("--until-step");
  auto* tile_flag = app.get_option("--tile");
  auto* save_dtype_flag = app.get_option("--save-dtype");
  auto* shard_flag = app.get_option("--shard-size");
  return [o, until, tile_flag, save_dtype_flag, shard_flag] {
    // Every flag before the seed log is read and long before the save at the end.
    const DType save_dtype = parse_dtype_flag("--save-dtype", o->save_dtype, {DType::f32, DType::bf16, DType::f16});
    const std::uint64_t shard = parse_size_option(Opt::shard_size, o->shard, OptionSource::cli);
    if (until->count() > 0) check_integer(Opt::until_step, o->until, OptionSource::cli);
    SessionConfig sc = session_config(o->dev, false);
    const SeedLog log = SeedLog::read(o->seed_log);
    // The log says how the run stored its weights; replay must round the same way.
    sc.storage = parse_dtype_flag("seed log storage_dtype", log.header.storage_dtype,
                                  {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3});
    if (o->dev.storage != "fp32" && o->dev.storage != log.header.storage_dtype)
      log_warn("--storage-dtype {} ignored: the seed log was written with {}", o->dev.storage, log.header.storage_dtype);
    if (until->count() > 0 && o->until < log.header.first_step)
      fail(ErrorKind::invalid_argument, "--until-step {}: {} starts at step {}; its replay cannot stop before it",
           o->until, o->seed_log, log.header.first_step);
    if (o->until > log.next_step())
      fail(ErrorKind::invalid_argument, "--until-step {}: {} holds steps {}..{} only", o->until, o->seed_log,
           log.header.first_step, log.next_step() - 1);
    if (same_directory(o->out, o->model))
      fail(ErrorKind::invalid_argument, "--out {} is the base model directory: the rebuilt checkpoint would overwrite it",
           o->out);
    refuse_replacing_checkpoint(o->out, o->overwrite);
    // A log that starts past step 0 (a C API or Python session that began a new log at its
    // first_step) continues from a checkpoint at that step: its weights — and the rule state
    // kept beside them — are where the replay starts. Any other --model would take the log's
    // updates to other weights, silently.
    if (const std::int64_t first = log.header.first_step; first > 0) {
      const OpenedCheckpoint ck = open_checkpoint(o->model);
      std::int64_t at = ck.step;
      if (at < 0 && ck.state.is_object() && ck.state.contains("next_step") && ck.state["next_step"].is_number_integer())
        at = ck.state["next_step"].get<std::int64_t>();
      if (at >= 0 && at != first)
        fail(ErrorKind::invalid_argument,
             "--model {} is at step {}, but {} starts at step {}: give the checkpoint the logged run started from (at "
             "step {})",
             o->model, at, o->seed_log, first, first);
      if (at < 0 && log.header.base_fingerprint.empty())
        fail(ErrorKind::invalid_argument,
             "{} starts at step {} and records no fingerprint of the checkpoint it started from, and --model {} does "
             "not say which step it is at (no zo2_state.json): give the checkpoint saved at step {}",
             o->seed_log, first, o->model, first);
      if (log.header.peft.any())
        fail(ErrorKind::invalid_argument,
             "{} starts at step {} with {} loaded from a checkpoint; replay rebuilds adapters from the run seed at step "
             "0 only: replay a log that starts at step 0",
             o->seed_log, first, log.header.peft.describe());
      if (log.header.rule.state_buffers() > 0) sc.resume_state = true;  // the state at `first`, beside the weights
      sc.first_step = first;
    }
    // The log's updates hold for the weights it started from: another --model (a moved copy
    // is fine; a tuned checkpoint, another model) gives other weights.
    if (!log.header.base_model.empty()) {
      std::error_code ec;
      const std::filesystem::path given = resolve_model_dir(o->model), logged(log.header.base_model);
      // The logged base as a model directory, when something is still there: a base moved
      // away (its copy given as --model) is the usual case, not an error (adversarial pass 58:
      // resolving the vanished path failed the replay).
      std::filesystem::path logged_dir;
      try {
        if (std::filesystem::exists(logged, ec)) logged_dir = resolve_model_dir(logged);
      } catch (const Error&) {  // an empty directory or a run without a checkpoint there now
      }
      const bool logged_model = !logged_dir.empty() && std::filesystem::exists(logged_dir / "config.json", ec);
      const bool same = same_directory(given, logged) || (logged_model && same_directory(given, logged_dir));
      if (!same && logged_model) {
        // Another shape is not a copy: the updates would land on other tensors.
        const ModelConfig a = ModelConfig::load(given), b = ModelConfig::load(logged_dir);
        if (a.family_name() != b.family_name() || a.num_layers != b.num_layers || a.hidden_size != b.hidden_size ||
            a.vocab_size != b.vocab_size)
          fail(ErrorKind::invalid_argument,
               "--model {} ({}, {} layers, hidden {}, vocabulary {}) is not the model the seed log's run tuned: {} ({}, "
               "{} layers, hidden {}, vocabulary {})",
               o->model, a.family_name(), a.num_layers, a.hidden_size, a.vocab_size, log.header.base_model,
               b.family_name(), b.num_layers, b.hidden_size, b.vocab_size);
      }
      // The log's fingerprint of its base decides (a checkpoint re-made at the same path is
      // another base; a copy elsewhere is the same); a log from before it has only the path.
      if (!log.header.base_fingerprint.empty()) {
        const std::string fp = checkpoint_fingerprint(o->model);
        if (fp != log.header.base_fingerprint)
          fail(ErrorKind::invalid_argument,
               "--model {}: its weights are not those the seed log's run started from (fingerprint {}; the log "
               "records {} of {}): the replay would rebuild other weights than the run's — give the run's base "
               "checkpoint{}",
               o->model, fp, log.header.base_fingerprint, log.header.base_model,
               log.header.first_step > 0 ? fmt::format(" (saved at step {})", log.header.first_step) : "");
      } else if (!same) {
        log_warn("--model {} is not the checkpoint the seed log's run started from ({}): unless it is a copy of it, the "
                 "replayed weights are not the run's",
                 o->model, log.header.base_model);
      }
    }
    sc.rule = log.header.rule;  // the log's update rule, its state rebuilt step by step
    sc.peft = log.header.peft;  // LoRA: the adapters start from the run seed's init, or from the logged adapter
    // A prefix starts as the keys and values of a forward of seeded tokens, which a weight-tile
    // size rounds (LLaMA-family blocks): the run's --tile, unless given (adversarial pass 71:
    // a --tile 32K prefix run replayed without it differed in 91 of its 640 first values).
    if (sc.peft.prefix > 0 && tile_flag->count() == 0 && !log.header.run_flags.empty()) {
      const nlohmann::json flags = nlohmann::json::parse(log.header.run_flags, nullptr, false);
      if (const auto t = flags.is_object() ? flags.find("tile") : flags.end();
          t != flags.end() && t->is_string() && t->get<std::string>() != o->dev.tile) {
        sc.tile = parse_tile_option(t->get<std::string>(), OptionSource::cli);
        log_info("replay: --tile {} as the run's (its prefix starts from a forward that the tiles round)",
                 t->get<std::string>());
      }
    }
    // As train refuses them: an adapter run's adapters are saved in fp32, as one file
    // (adversarial pass 71: replay took both flags and wrote what it always writes).
    check_save_dtype_option(save_dtype, save_dtype_flag->count() > 0, sc.peft, OptionSource::cli);
    check_shard_size_option(shard_flag->count() > 0, sc.peft);
    if (!o->adapter.empty() && log.header.adapter.empty())
      fail(ErrorKind::invalid_argument,
           "--adapter {}: {} records no adapter its run started from ({}): drop --adapter",
           o->adapter, o->seed_log,
           log.header.peft.any() ? "its adapters start from the run seed's init" : "it tunes every parameter");
    if (!log.header.adapter.empty()) {
      // Note [A run's starting adapter]: the run's adapters began as that adapter's weights,
      // not as the run seed's init; a replay from anything else rebuilds other weights.
      const std::filesystem::path dir = o->adapter.empty() ? log.header.adapter : o->adapter;
      const std::string where = o->adapter.empty() ? fmt::format("the adapter the run started from, {}", dir.string())
                                                   : fmt::format("--adapter {}", o->adapter);
      if (std::error_code ec; !std::filesystem::is_directory(dir, ec) ||
                              !std::filesystem::exists(resolve_model_dir(dir) / kAdapterModelFile, ec))
        fail(ErrorKind::invalid_argument,
             "{}: missing (no {}): {} starts its adapters from it (fingerprint {}); give its new place as --adapter",
             where, kAdapterModelFile, o->seed_log, log.header.adapter_fingerprint);
      if (const std::string fp = adapter_fingerprint(dir); fp != log.header.adapter_fingerprint)
        fail(ErrorKind::invalid_argument,
             "{}: not the adapter {}'s run started from (its fingerprint is {}; the log records {} of {}): the "
             "replay would rebuild other weights than the run's{}",
             where, o->seed_log, fp, log.header.adapter_fingerprint, log.header.adapter,
             o->adapter.empty() ? "; give the adapter the run started from as --adapter" : "");
      sc.adapter_dir = dir;
    }
    sc.run_seed = log.header.run_seed;
    sc.base_model = std::filesystem::absolute(o->model).string();
    if (sc.peft.any()) validate_peft(sc.peft, ModelConfig::load(resolve_model_dir(o->model)));
    sc.max_batch = 1;
    sc.max_seq = 1;
    remove_abandoned_temps(std::filesystem::absolute(o->out));  // a killed replay's scratch (Note [Temp files])
    NewOutputDir made(o->out);  // a replay refused at the save (an fp16 overflow) leaves no directory
    RunDirLock lock(o->out);
    ensure_writable_dir(o->out);
    auto session_owner = std::make_unique<Session>(o->model, sc);
    // Before the updates (hours for a long log of a large model): Note [Room for a save]
    // (runtime/file_util.h), checked again at the save.
    Session::SaveExtras room;
    room.out_option = "--out";
    room.dtype_option = "--save-dtype";
    session_owner->check_save_room(o->out, save_dtype, shard, room);
    const auto start = std::chrono::steady_clock::now();
    std::int64_t applied = 0;
    for (const SeedLogEntry& e : log.entries) {
      if (o->until >= 0 && e.step >= o->until) break;
      for (const std::string& as : e.loaded_as) {
        // Note [A resume from a rounded checkpoint] (api/run_dir.h): the run was resumed here
        // from a checkpoint saved as `as`. The same save and load, through a scratch directory
        // beside --out (removed after; one a killed replay left goes at the next replay to
        // --out), give the weights (and rule state) the resume went on from.
        const DType dt = parse_dtype_flag("loaded_as", as, {DType::bf16, DType::f16});
        const std::filesystem::path scratch = make_temp_dir(std::filesystem::absolute(o->out));
        struct Remove {
          std::filesystem::path p;
          ~Remove() {
            std::error_code ec;
            std::filesystem::remove_all(p, ec);
          }
        } remove{scratch};
        session_owner->set_next_step(e.step);
        session_owner->save(scratch, dt, shard);
        SessionConfig at = sc;
        at.first_step = e.step;
        at.resume_state = sc.rule.state_buffers() > 0;
        session_owner.reset();
        session_owner = std::make_unique<Session>(scratch, at);
        log_info("replay: step {}: the run was resumed from a checkpoint saved as {}; its weights are rounded the "
                 "same way here",
                 e.step, as);
      }
      Session& session = *session_owner;
      session.scheduler().replay_update(e.step, e.seed, e.lr, e.wd, e.gs.empty() ? std::vector<float>{e.g} : e.gs,
                                        e.choice);
      ++applied;
      if (applied % 100 == 0) log_info("replay: {} of {} updates", applied, log.entries.size());
    }
    // The checkpoint is at the step after the last update applied.
    Session& session = *session_owner;
    session.set_next_step(log.header.first_step + applied);
    Session::SaveExtras x;
    x.replace_checkpoint = o->overwrite;  // refused without it, before any work
    x.out_option = room.out_option;
    x.dtype_option = room.dtype_option;
    // Note [A run's flags in its seed log] (tools/cmd_train.cpp): the run's training flags,
    // so that `train --resume` of this checkpoint carries the run on as it was started.
    // The flags at the checkpoint's step: the header's, or the last a resume recorded at or
    // before it (SeedLogEntry::run_flags).
    std::string flags = log.header.run_flags;
    for (const SeedLogEntry& e : log.entries)
      if (e.step <= session.next_step() && !e.run_flags.empty()) flags = e.run_flags;
    x.state = flags.empty() ? nlohmann::json::object() : parse_json_text(flags, o->seed_log);
    x.state["replayed_from"] = std::filesystem::absolute(o->seed_log).string();
    // The log's prefix this checkpoint holds, so that a resume that continues the log at
    // replayed_from (or a copy of it) knows it is still that log (adversarial pass 64: a run
    // started later under the same name, with the same seed, was continued without a word).
    const std::uint64_t prefix = log.bytes_before(session.next_step());
    x.state["replayed_from_bytes"] = prefix;
    x.state["replayed_from_crc32"] = crc32_file(o->seed_log, prefix);
    x.state["base_model"] = std::filesystem::absolute(o->model).string();
    session.save(o->out, save_dtype, shard, x);
    made.keep();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    log_info("replay: applied {} updates to {} in {}, saved to {}", applied, o->model, format_duration(s), o->out);
    return 0;
  };
}

}  // namespace zo2::cli
