// zo2-tune init: a random-initialized HF checkpoint of a preset shape, written in parallel
// straight from the generator into the (sharded) safetensors files, so even the 175B shape
// needs no second copy in memory.
#include "api/options.h"
#include "api/run_dir.h"
#include "models/init.h"
#include "models/layout.h"
#include "models/presets.h"
#include "models/safetensors.h"
#include "models/tokenizer.h"
#include "runtime/arena.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/thread.h"
#include "runtime/log.h"
#include "tools/cli.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <fstream>
#include <memory>
#include <optional>
#include <mutex>
#include <thread>

namespace zo2::cli {

Runner add_init(CLI::App& app) {
  struct Opts {
    std::string preset, out, dtype = "fp32", shard = "5G", tokenizer;
    std::uint64_t seed = 0;
    bool list = false, overwrite = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--preset", o->preset, "model shape (see --list)");
  app.add_option("--out", o->out, "output directory");
  app.add_option("--seed", o->seed, "init seed")->capture_default_str()->transform(seed_value());
  app.add_option("--dtype", o->dtype, "fp32, bf16 or fp16")->capture_default_str();
  app.add_option("--shard-size", o->shard, "largest safetensors shard (HF sharding above it)")->capture_default_str();
  app.add_option("--tokenizer", o->tokenizer,
                 "copy this directory's tokenizer files into the checkpoint (its special-token ids go to config.json)");
  app.add_flag("--list", o->list, "list the presets and exit");
  app.add_flag("--overwrite", o->overwrite,
               "replace a checkpoint already in --out (without it, a directory holding config.json or model weights is "
               "refused)");
  return [o] {
    if (o->list) {
      for (const auto& p : presets())
        fmt::print("{:<16} {:>9.3f}B params  {}\n", p.name, static_cast<double>(p.config.total_params()) / 1e9,
                   p.description);
      return 0;
    }
    if (o->preset.empty() || o->out.empty())
      fail(ErrorKind::invalid_argument, "init needs --preset NAME and --out DIR (or --list)");
    const Preset& preset = find_preset(o->preset);
    const DType dt = parse_dtype_flag("--dtype", o->dtype, {DType::f32, DType::bf16, DType::f16});
    const std::uint64_t shard = parse_size_option(Opt::shard_size, o->shard, OptionSource::cli);
    ModelConfig c = preset.config;
    std::unique_ptr<Tokenizer> tok;
    if (!o->tokenizer.empty()) {
      tok = Tokenizer::from_dir(o->tokenizer);
      if (const std::string why = tokenizer_misfit(*tok, c.vocab_size); !why.empty())
        fail(ErrorKind::invalid_argument, "--tokenizer {} does not fit the {} preset: {}", o->tokenizer, preset.name,
             why);
      if (tok->bos_id()) c.bos_token_id = *tok->bos_id();
      if (tok->eos_id()) c.eos_token_id = *tok->eos_id();
      if (tok->pad_id()) c.pad_token_id = *tok->pad_id();
    }
    // Never a user's model replaced unasked: a fine-tuned or downloaded checkpoint at --out
    // (a typo away from a fresh directory) would be lost to random weights.
    refuse_replacing_checkpoint(o->out, o->overwrite);
    // The space first, so a refusal leaves no directory behind (OPT-175B is 650 GiB): Note
    // [Room for a save] (runtime/file_util.h). An --overwrite's old files still count (a bound).
    // (config.json and the --tokenizer files it copies count too.)
    const std::uint64_t other = (64 << 10) + (o->tokenizer.empty() ? 0 : tokenizer_files_bytes(o->tokenizer));
    require_free_space(o->out, checkpoint_file_bytes(c, dt, shard) + other,
                       fmt::format("the {} checkpoint{}", preset.name, o->tokenizer.empty() ? "" : " and its tokenizer files"),
                       dt == DType::f32 ? fmt::format("; free space there, or choose another --out on a file system "
                                                      "with room, or a narrower --dtype (bf16 needs {})",
                                                      format_bytes(static_cast<double>(
                                                          checkpoint_file_bytes(c, DType::bf16, shard) + other)))
                                        : std::string("; free space there, or choose another --out on a file "
                                                      "system with room"));
    // A directory this init creates goes again if the init fails (a full disk, ulimit -f): what
    // is in it is this init's half-written checkpoint.
    struct RemoveIfFailed {
      std::filesystem::path dir;
      int uncaught = std::uncaught_exceptions();
      ~RemoveIfFailed() {
        if (dir.empty() || std::uncaught_exceptions() == uncaught) return;
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
      }
    } remove_if_failed;
    if (std::error_code ec; !std::filesystem::exists(o->out, ec) && !ec) remove_if_failed.dir = o->out;
    ensure_writable_dir(o->out);
    // --overwrite of a saved run layout (current → step-N): its weights would still be what
    // --model DIR opens, beside the new plain files. Removed under the directory's lock (a
    // plain checkpoint takes none: no zo2.lock beside its files).
    std::optional<RunDirLock> lock;
    if (holds_run(o->out)) {
      lock.emplace(o->out);
      remove_run(o->out);
    }

    std::vector<TensorToWrite> tensors;
    std::uint64_t total = 0;
    auto done = std::make_shared<std::atomic<std::uint64_t>>(0);
    for (const NamedShape& t : checkpoint_tensors(c)) {
      std::int64_t numel = 1;
      for (auto d : t.shape) numel *= d;
      const int ndim = static_cast<int>(t.shape.size());
      const std::string name = t.name;
      const std::uint64_t seed = o->seed;
      const float norm = init_norm_value(c);
      total += static_cast<std::uint64_t>(numel) * dtype_size(dt);
      tensors.push_back({name, dt, t.shape, nullptr, [=](std::span<std::byte> out, std::uint64_t offset) {
                           const std::size_t size = dtype_size(dt);
                           fill_init_range(name, ndim, static_cast<std::int64_t>(offset / size),
                                           static_cast<std::int64_t>(out.size() / size), seed, dt, out, norm);
                           done->fetch_add(out.size());
                         }});
    }
    // Progress for large models, from a side thread.
    std::mutex m;
    std::condition_variable cv;
    bool finished = false;
    std::thread progress;
    const auto start = std::chrono::steady_clock::now();
    if (total > (std::uint64_t{1} << 30)) {
      progress = start_thread("init's progress thread", [&] {
        std::unique_lock lock(m);
        while (!cv.wait_for(lock, std::chrono::seconds(2), [&] { return finished; })) {
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          const double frac = static_cast<double>(done->load()) / static_cast<double>(total);
          log_info("init {}: {:.1f}% of {} written, {:.2f} GB/s, ETA {}", preset.name, 100 * frac,
                   format_bytes(static_cast<double>(total)), static_cast<double>(done->load()) / s / 1e9,
                   format_duration(frac > 0 ? s / frac - s : -1));
        }
      });
    }
    auto stop_progress = [&] {
      {
        std::lock_guard lock(m);
        finished = true;
      }
      cv.notify_all();
      if (progress.joinable()) progress.join();
    };
    try {
      write_safetensors_sharded(o->out, tensors, shard, {{"format", "pt"}});
    } catch (...) {
      stop_progress();
      throw;
    }
    stop_progress();
    ModelConfig cfg = c;
    cfg.torch_dtype = dt == DType::f32 ? "float32" : dt == DType::bf16 ? "bfloat16" : "float16";
    nlohmann::json j = cfg.to_json();
    j["dtype"] = cfg.torch_dtype;
    j["transformers_version"] = "4.46.0";
    write_file_atomic(std::filesystem::path(o->out) / "config.json", j.dump(2) + "\n");
    if (tok) {
      const int n = copy_tokenizer_files(o->tokenizer, o->out);
      log_info("init: copied {} tokenizer files ({}, {} ids) from {}", n, tok->kind(), tok->vocab_size(), o->tokenizer);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    log_info("init: wrote {} ({} parameters, {}) to {} in {}", preset.name, c.total_params(),
             format_bytes(static_cast<double>(total)), o->out, format_duration(s));
    return 0;
  };
}

}  // namespace zo2::cli
