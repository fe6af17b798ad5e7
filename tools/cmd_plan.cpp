// zo2-tune plan: the placement and byte budget for a model under a cap, without
// allocating anything (DESIGN.md §6).
#include "api/run_dir.h"
#include "api/options.h"
#include "api/session.h"
#include "models/presets.h"
#include "offload/planner.h"
#include "runtime/arena.h"
#include "runtime/topology.h"
#include "tools/cli.h"

#include <nlohmann/json.hpp>

#include <memory>
#include <optional>

namespace zo2::cli {

Runner add_plan(CLI::App& app) {
  struct Opts {
    std::string model, preset, gpu_mem, storage = "fp32", compute = "fp32", offload = "auto";
    std::string device = "cuda";
    int batch = 1, seq = 0, window = 3;
    std::string tile = "auto";
    bool json = false, eval = false, generate = false;
    std::string kv_cache = "auto";
    int chunk = 512;
    std::string parallel, host_image = "shared";
    int ranks_per_node = 0;
    std::string host_mem;  // the disk tier
    int disk_lag = 1, disk_staging = 0;
    double disk_read = 2.0, disk_write = 1.5;  // GB/s
    RuleFlags rule;
    LoraFlags lora;
  };
  auto o = std::make_shared<Opts>();
  auto* m = app.add_option("--model", o->model, "HF checkpoint directory (only config.json is read)");
  auto* p = app.add_option("--preset", o->preset, "a preset shape instead of --model");
  m->excludes(p);
  app.add_option("--gpu-mem", o->gpu_mem, "device memory cap, e.g. 8G")->required();
  app.add_option("--batch-size", o->batch, "sequences per step")->capture_default_str();
  auto* seq = app.add_option("--seq-len", o->seq, "tokens per sequence (default: max_position_embeddings)");
  app.add_option("--storage-dtype", o->storage, "fp32, bf16, fp16, fp8")->capture_default_str();
  app.add_option("--compute-dtype", o->compute, "fp32, bf16, fp16")->capture_default_str();
  app.add_option("--offload", o->offload, "auto, all, none")->capture_default_str()->check(CLI::IsMember({"auto", "all", "none"}));
  app.add_option("--window", o->window, "device slots for streamed blocks")->capture_default_str();
  app.add_option("--tile", o->tile,
                 "stream by weight tiles: auto (when two whole blocks do not fit), off, or a tile size such as 64M")
      ->capture_default_str();
  app.add_option("--device", o->device, "cpu or cuda: which transfer bandwidth to predict with")->capture_default_str();
  app.add_flag("--eval-only", o->eval, "plan for evaluation (one activation stream)");
  app.add_flag("--generate", o->generate,
               "plan for generation (zo2-tune generate): --batch-size prompts decoded together, --seq-len positions "
               "(prompt and new tokens), the KV cache where --kv-cache puts it");
  app.add_option("--kv-cache", o->kv_cache, "with --generate: auto, device, host, off")->capture_default_str();
  app.add_option("--prefill-chunk", o->chunk, "with --generate: prompt tokens per sequence a forward holds (0 = all)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 30));
  app.add_option("--parallel", o->parallel,
                 "plan one rank of a layout: data=D,perturbation=P,directions=Q (README \"Many GPUs and nodes\")");
  app.add_option("--ranks-per-node", o->ranks_per_node, "with --parallel: ranks (GPUs) per node (default: all)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--host-image", o->host_image, "with --parallel: shared or private host image per node")
      ->capture_default_str()
      ->check(CLI::IsMember({"shared", "private"}));
  app.add_option("--host-mem", o->host_mem,
                 "host memory cap for the master weights: the streamed blocks beyond it go to the disk tier");
  app.add_option("--disk-lag", o->disk_lag, "with --host-mem: write a disk block back every K updates")
      ->capture_default_str();
  app.add_option("--disk-staging", o->disk_staging, "with --host-mem: staging buffers (0 = window + 1)")
      ->capture_default_str();
  app.add_option("--disk-read-rate", o->disk_read, "with --host-mem: the disk's read rate in GB/s (zo2-bench --disk-probe)")
      ->capture_default_str()
      ->check(finite_range(1e-3, 1e6));
  app.add_option("--disk-write-rate", o->disk_write, "with --host-mem: the disk's write rate in GB/s")
      ->capture_default_str()
      ->check(finite_range(1e-3, 1e6));
  app.add_flag("--json", o->json, "print the plan as JSON");
  o->rule.add(app);
  o->lora.add(app, /*training=*/true);
  return [o, seq, app_ptr = &app] {
    if (o->model.empty() == o->preset.empty())
      fail(ErrorKind::invalid_argument, "plan needs exactly one of --model DIR or --preset NAME");
    // The flags first, through the checks zo2-tune's other subcommands and the C API share
    // (api/options.h). --device picks the predicted bandwidth and the dtypes it computes in.
    const std::uint64_t cap = parse_size_option(Opt::gpu_mem, o->gpu_mem, OptionSource::cli);
    check_integer(Opt::batch_size, o->batch, OptionSource::cli);
    if (seq->count() > 0) check_integer(Opt::seq_len, o->seq, OptionSource::cli);
    SessionConfig sc;
    sc.device = o->device;
    sc.offload = parse_offload_mode(o->offload);
    sc.window = o->window;
    sc.tile = parse_tile_option(o->tile, OptionSource::cli);
    sc.storage = parse_dtype_flag("--storage-dtype", o->storage, {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3});
    sc.compute = parse_dtype_flag("--compute-dtype", o->compute, {DType::f32, DType::bf16, DType::f16});
    sc.host_mem = o->host_mem.empty() ? 0 : parse_size_option(Opt::host_mem, o->host_mem, OptionSource::cli);
    sc.disk_lag = o->disk_lag;
    sc.disk_staging = o->disk_staging;
    check_session_options(sc, OptionSource::cli);
    if (sc.host_mem == 0)
      for (const char* flag : {"--disk-lag", "--disk-staging", "--disk-read-rate", "--disk-write-rate"})
        if (const CLI::Option* opt = app_ptr->get_option(flag); opt->count() > 0)
          fail(ErrorKind::invalid_argument, "{} {} is for the disk tier (--host-mem SIZE), which is not set", flag,
               opt->as<std::string>());
    const ModelConfig c =
        o->model.empty() ? find_preset(o->preset).config : ModelConfig::load(resolve_model_dir(o->model));
    if (o->seq > c.max_positions)
      fail(ErrorKind::invalid_argument, "--seq-len {} exceeds the model's max_position_embeddings ({})", o->seq,
           c.max_positions);
    sc.max_batch = o->batch;
    sc.max_seq = o->seq > 0 ? o->seq : static_cast<int>(c.max_positions);
    sc.training = !o->eval && !o->generate;
    if (o->generate) {
      if (o->rule.any_given()) fail(ErrorKind::invalid_argument, "--generate plans decoding: no --optimizer flags");
      sc.generate.batch = o->batch;
      sc.generate.kv = parse_kv_place(o->kv_cache);
      sc.generate.chunk = o->chunk;
    } else if (o->kv_cache != "auto") {
      fail(ErrorKind::invalid_argument, "--kv-cache is for --generate");
    }
    if (sc.training) sc.rule = o->rule.config(0.0f);
    {
      std::string m = o->model;
      o->lora.apply(m, sc);  // LoRA: adapters resident, the base frozen (nothing written back)
      if (sc.peft.any()) validate_peft(sc.peft, c);
    }
    const DeviceKind kind = parse_device(o->device).kind;
    std::optional<ParallelPlan> pp;
    if (!o->parallel.empty()) {
      if (!sc.training) fail(ErrorKind::invalid_argument, "--parallel plans training ranks: not with --eval-only or --generate");
      sc.parallel = parse_parallel(o->parallel, "--parallel");
      validate_parallel(sc.parallel, sc.parallel.size(), sc.rule, o->batch, "--parallel", o->parallel);
      sc.share_host_image = o->host_image == "shared";
      pp = plan_parallel(c, sc, kind, cap, o->ranks_per_node > 0 ? o->ranks_per_node : sc.parallel.size());
    } else if (o->ranks_per_node > 0) {
      fail(ErrorKind::invalid_argument, "--ranks-per-node is for --parallel");
    }
    PlanRequest req = plan_request(c, sc, kind, cap);
    req.disk_dir = true;  // a preview: plan takes no --disk-dir, and places the blocks a disk tier would hold
    req.disk_read_bytes_per_s = o->disk_read * 1e9;
    req.disk_write_bytes_per_s = o->disk_write * 1e9;
    if (pp && sc.host_mem > 0) fail(ErrorKind::invalid_argument, "--host-mem: the disk tier serves one process, not --parallel");
    const Placement pl = pp ? pp->rank : plan_placement(c, req);
    if (!o->json) {
      fmt::print("model: {} ({}), {} blocks, {:.3f}B parameters, storage {}, compute {}, batch {} × {}\n",
                 o->model.empty() ? o->preset : o->model, c.family_name(), c.num_layers,
                 static_cast<double>(c.total_params()) / 1e9, dtype_name(sc.storage), dtype_name(sc.compute),
                 sc.max_batch, sc.max_seq);
      if (sc.training) fmt::print("update rule: {}; parameters: {}\n", sc.rule.describe(), sc.peft.describe());
      fmt::print("{}", pl.describe(c));
      if (pp) {
        fmt::print("{}", pp->describe());
        // Note [Rank binding]: what each local rank would get on this machine.
        const std::vector<std::string> ids = kind == DeviceKind::cuda ? cuda_pci_bus_ids() : std::vector<std::string>{};
        fmt::print("binding on this machine ({}):\n", ids.empty() ? "no CUDA device: CPU cores" : "GPUs by PCI locality");
        for (int r = 0; r < pp->ranks_per_node; ++r) fmt::print("  {}\n", bind_rank(r, pp->ranks_per_node, ids, false).describe());
      }
      return 0;
    }
    nlohmann::json j;
    j["model"] = o->model.empty() ? o->preset : o->model;
    j["params"] = c.total_params();
    j["blocks"] = c.num_layers;
    j["resident_blocks"] = pl.resident_count;
    j["streamed_blocks"] = pl.streamed;
    j["window"] = pl.window;
    if (pl.tile_slots > 0)
      j["tiles"] = {{"slots", pl.tile_slots},
                    {"tile_bytes", pl.tile_bytes},
                    {"vector_bytes", pl.vector_bytes},
                    {"tiles_per_block", pl.block_tiles},
                    {"weight_tile_elems", pl.limits.weight_tile_elems}};
    std::string map;
    for (bool b : pl.resident) map += b ? 'R' : 's';
    j["placement"] = map;
    j["cap_bytes"] = pl.cap;
    j["predicted_peak_bytes"] = pl.total_bytes;
    j["minimum_cap_bytes"] = pl.minimum_cap;
    if (pl.tile_minimum_cap > 0) j["tile_minimum_cap_bytes"] = pl.tile_minimum_cap;  // below it by weight tiles (--tile auto)
    j["globals_bytes"] = pl.globals_bytes;
    j["block_bytes"] = pl.block_bytes;
    j["state_block_bytes"] = pl.state_block_bytes;
    j["passes_per_step"] = pl.passes;
    if (sc.training) j["optimizer"] = rule_to_json(sc.rule);
    if (sc.peft.any()) j["peft"] = peft_to_json(sc.peft);
    j["adapter_bytes"] = pl.adapter_bytes;
    j["resident_bytes"] = pl.resident_bytes;
    j["slot_bytes"] = pl.slot_bytes;
    j["workspace_bytes"] = pl.workspace_bytes;
    j["batch_bytes"] = pl.batch_bytes;
    j["h2d_bytes_per_step"] = pl.h2d_bytes_per_step;
    j["d2h_bytes_per_step"] = pl.d2h_bytes_per_step;
    j["predicted_transfer_s"] = pl.predicted_transfer_s;
    j["host_bytes"] = pl.host_bytes;
    if (pl.host_mem > 0) {
      std::string tiers;
      for (std::size_t i = 0; i < pl.on_disk.size(); ++i) tiers += pl.resident[i] ? 'R' : pl.on_disk[i] ? 'd' : 's';
      j["disk"] = {{"host_mem_bytes", pl.host_mem},
                   {"disk_blocks", pl.disk_blocks},
                   {"tiers", tiers},
                   {"staging_buffers", pl.disk_staging},
                   {"disk_lag", pl.disk_lag},
                   {"file_bytes", pl.disk_file_bytes},
                   {"read_bytes_per_step", pl.disk_read_bytes_per_step},
                   {"write_bytes_per_step", pl.disk_write_bytes_per_step},
                   {"read_bytes_per_s", pl.disk_read_bytes_per_s},
                   {"write_bytes_per_s", pl.disk_write_bytes_per_s},
                   {"predicted_disk_s", pl.predicted_disk_s}};
    }
    if (pl.gen_batch > 0) {
      j["generate"] = {{"batch", pl.gen_batch},
                       {"kv_cache", pl.kv_positions == 0 ? "off" : pl.kv_on_device ? "device" : "host"},
                       {"kv_positions", pl.kv_positions},
                       {"kv_block_bytes", pl.kv_block_bytes},
                       {"kv_device_bytes", pl.kv_device_bytes},
                       {"kv_host_bytes", pl.kv_host_bytes},
                       {"logits_bytes", pl.gen_bytes}};
    }
    if (pp) {
      j["parallel"] = {{"layout", pp->layout.spec()},
                       {"ranks", pp->layout.size()},
                       {"data", pp->layout.data},
                       {"perturbation", pp->layout.perturbation},
                       {"directions", pp->layout.directions},
                       {"ranks_per_node", pp->ranks_per_node},
                       {"shared_host_image", pp->shared_image},
                       {"forward_share_per_rank", pp->forward_share},
                       {"host_bytes_per_node", pp->host_bytes_per_node},
                       {"single_process", {{"predicted_peak_bytes", pp->single.total_bytes},
                                           {"h2d_bytes_per_step", pp->single.h2d_bytes_per_step},
                                           {"d2h_bytes_per_step", pp->single.d2h_bytes_per_step},
                                           {"predicted_transfer_s", pp->single.predicted_transfer_s}}}};
    }
    fmt::print("{}\n", j.dump(2));
    return 0;
  };
}

}  // namespace zo2::cli
