// zo2-tune merge: a LoRA adapter folded into its base — W += (alpha/r)·B·A for every adapted
// layer, in fp32 — written as a plain Hugging Face checkpoint (config.json, safetensors,
// the base's tokenizer files), as PEFT's merge_and_unload() and save_pretrained() would.
#include "api/run_dir.h"
#include "api/options.h"
#include "api/session.h"
#include "models/checkpoint.h"
#include "models/layout.h"
#include "runtime/file_util.h"
#include "runtime/dtype_convert.h"
#include "runtime/element.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "tools/cli.h"

#include <tbb/parallel_for.h>

#include <memory>
#include <optional>
#include <vector>

namespace zo2::cli {

SessionConfig session_config(const DeviceFlags& f, bool training);

namespace {

// Note [Merging into the base the adapters saw]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A LoRA run on a base stored as fp8 (or bf16/fp16) trained its adapters against the base as
// stored: each weight rounded to that dtype (fp8 with its row's scale). `eval --model RUN`
// evaluates that model (use_the_adapter_runs_storage), so merge folds the adapters into the
// same rounded weights — in fp32, rounded once more only to --save-dtype — and the merged
// checkpoint is the model that was tuned and evaluated (adversarial pass 53 left this: the
// merge used the full-precision base, another model). `--storage-dtype fp32` merges into the
// full-precision base instead. The rounding is the load's own: a weight read as fp32 and
// stored as `storage` (quantize_rows_e4m3, convert), read back as a kernel reads it
// (load_element).
void round_as_stored(const ImageLayout& layout, void* image, DType storage) {
  auto* base = static_cast<std::byte*>(image);
  for (const TensorSlot& t : layout.tensors()) {
    ZO2_CHECK(t.dtype == DType::f32);
    const DType d = slot_dtype(storage, t.ndim);
    if (d == DType::f32) continue;
    auto* w = reinterpret_cast<float*>(base + t.offset);
    const auto n = static_cast<std::size_t>(t.numel());
    if (d == DType::f8_e4m3) {
      std::vector<std::uint8_t> q(n);
      std::vector<float> scales(static_cast<std::size_t>(t.rows));
      quantize_rows_e4m3(w, t.rows, t.cols, q.data(), scales.data());
      for (std::size_t i = 0; i < n; ++i)
        w[i] = load_element(q.data(), DType::f8_e4m3, static_cast<std::int64_t>(i),
                            scales[i / static_cast<std::size_t>(t.cols)]);
    } else {
      std::vector<std::byte> narrow(n * dtype_size(d));
      convert(w, DType::f32, narrow.data(), d, n);
      convert(narrow.data(), d, w, DType::f32, n);
    }
  }
}

}  // namespace

Runner add_merge(CLI::App& app) {
  struct Opts {
    std::string model, out, save_dtype = "fp32", shard = "5G";
    bool overwrite = false;
    DeviceFlags dev;
    LoraFlags lora;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model,
                 "the base checkpoint (or the adapter / LoRA run directory alone: its adapter_config.json names the "
                 "base)")
      ->required();
  app.add_option("--out", o->out, "output directory: the merged HF checkpoint")->required();
  app.add_option("--save-dtype", o->save_dtype, "fp32, bf16, fp16")->capture_default_str();
  app.add_option("--shard-size", o->shard, "largest safetensors shard")->capture_default_str();
  app.add_flag("--overwrite", o->overwrite, "replace a checkpoint already in --out (never a training run's)");
  o->lora.add(app, /*training=*/false);
  o->dev.threads = 0;
  app.add_option("--threads", o->dev.threads, "CPU threads (0 = the cores this process may use, at most its cgroup CPU quota)")->capture_default_str();
  o->dev.storage_flag =
      app.add_option("--storage-dtype", o->dev.storage,
                     "the base as the adapters saw it: fp32, bf16, fp16 or fp8 (default: the adapter run's own storage "
                     "dtype; fp32 for a plain adapter directory); the fold itself is in fp32");  // no "=fp32": not the default
  return [o] {
    const DType save_dtype = parse_dtype_flag("--save-dtype", o->save_dtype, {DType::f32, DType::bf16, DType::f16});
    const std::uint64_t shard = parse_size_option(Opt::shard_size, o->shard, OptionSource::cli);
    SessionConfig sc = session_config(o->dev, false);
    const std::string given = o->model;
    o->lora.apply(o->model, sc);
    if (sc.peft.prefix > 0)
      fail(ErrorKind::invalid_argument,
           "{} is a prefix-tuning adapter ({} virtual tokens per layer): a prefix is extra keys and values, not a change "
           "of weights, so there is nothing to merge; use it as --adapter with eval, generate or forward",
           sc.adapter_dir.string(), sc.peft.prefix);
    if (!sc.peft.lora)
      fail(ErrorKind::invalid_argument, "merge needs an adapter: --adapter DIR, or an adapter directory as --model");
    const std::filesystem::path base = resolve_model_dir(o->model);
    for (const std::filesystem::path& src : {base, sc.adapter_dir})
      if (same_directory(o->out, src))
        fail(ErrorKind::invalid_argument, "--out {} is {}: the merged checkpoint would overwrite it", o->out,
             src.string());
    refuse_replacing_checkpoint(o->out, o->overwrite);
    // Before the base is loaded and merged (minutes for a large one): Note [Room for a save]
    // (runtime/file_util.h). The merged weights, the base's tokenizer files and config.json.
    // An --overwrite of a run directory removes the run first: checked after that, below.
    const ModelConfig base_config = ModelConfig::load(base);
    const std::uint64_t merge_other = (64 << 10) + tokenizer_files_bytes(base);
    const auto require_room = [&] {
      require_free_space(
          o->out, checkpoint_file_bytes(base_config, save_dtype, shard) + merge_other,
          "the merged checkpoint (and the base's tokenizer files)",
          "; free space there, or choose another --out on a file system with room" +
              (save_dtype == DType::f32
                   ? fmt::format(", or a narrower --save-dtype (bf16 needs {})",
                                 format_bytes(static_cast<double>(
                                     checkpoint_file_bytes(base_config, DType::bf16, shard) + merge_other)))
                   : std::string()));
    };
    const bool overwrites_run = o->overwrite && holds_run(o->out);
    if (!overwrites_run) require_room();
    sc.max_batch = 1;
    sc.max_seq = 1;
    // Note [Merging into the base the adapters saw]: the run's storage dtype unless given.
    use_the_adapter_runs_storage(o->dev, sc);
    const DType seen = sc.storage;
    sc.storage = DType::f32;  // merged in fp32, rounded once to --save-dtype
    Session session(base, sc);
    // With --threads (Note [Kernel threads], runtime/cpu/cpu_device.cpp), as the load was.
    session.device().run_host_parallel([&] {
      if (seen != DType::f32) {
        BlockStore& store = session.store();
        round_as_stored(store.globals_layout(), store.globals_image(), seen);
        tbb::parallel_for(std::int64_t{0}, store.num_blocks(),
                          [&](std::int64_t i) { round_as_stored(store.block_layout(i), store.block_image(i), seen); });
      }
      session.adapters()->merge_into(session.store());
      session.store().check_finite(save_dtype);
    });
    ensure_writable_dir(o->out);
    std::optional<RunDirLock> lock;
    if (holds_run(o->out)) {  // --overwrite of a saved run layout (see init)
      lock.emplace(o->out);
      remove_run(o->out);
      require_room();  // (its files are gone now: Note [Room for a save])
    }
    session.device().run_host_parallel([&] { session.store().save(o->out, save_dtype, shard); });
    const int n = copy_tokenizer_files(base, o->out);
    log_info("merge: {} into {} ({}), written to {} ({} tokenizer files)", sc.adapter_dir.string(), base.string(),
             sc.peft.describe(), o->out, n);
    return 0;
  };
}

}  // namespace zo2::cli
