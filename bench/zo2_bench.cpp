// zo2-bench: how fast does model X tune under a device-memory cap of Y, and where do the
// bytes go? Sweeps presets × caps × storage dtypes × batch × sequence length with weights
// synthesized in memory (no disk), and writes one JSON object per row (JSONL) plus a
// markdown table. Works on the CPU backend with small presets (CI's smoke sweep) and on
// CUDA. Rows built with --alias-blocks share one host image for every block (shapes larger
// than host memory) and are labelled synthetic.
//
// Each row also carries the per-step breakdown of the three streams' busy time (upload,
// compute, offload; Note [Stream busy time] in runtime/device.h) and the idle time, and —
// when PyTorch is importable (--mezo-baseline) — the same step run by the minimal PyTorch
// MeZO of bench/mezo_torch.py and zo2's speedup over it. --plot draws tokens/s against the
// cap per model with bench/plot_bench.py (matplotlib).
//
// Note [Link probe]
//   The planner's transfer floor assumes 50 GB/s per direction (ANCHORS.md's H200 machine:
//   50–51 GB/s each way with both directions busy). Machines differ: the H100 machine of
//   bench/RESULTS.md moved 42–48 GB/s in upload-bound rows, and whether that was zo2 or the
//   bus could not be told. So before the sweep zo2-bench times the link itself on the
//   sweep's device (--link-probe: 1 GiB on CUDA, 64 MiB on the CPU backend, whose "copies"
//   are memcpy): a pinned host→device copy alone, device→host alone, and both at once on
//   two streams as a streamed step runs them — the best of three after a warm-up, each
//   direction timed by its own stream's events. Every row then carries `link_floor_s`, its
//   bytes per step at the both-at-once rates, and `link_floor_ratio` = that over the step:
//   1.0 means the bus was the only limit on this machine.
//
// Note [Disk probe]
//   The disk tier (DESIGN.md §12, issue 21) moves block images between pinned RAM and a
//   file under --disk-dir; its step time is bound by the disk as the streamed window's is by
//   the link. `zo2-bench --disk-probe` measures that disk instead of sweeping: through the
//   disk tier's own path (io_uring — or threads where it is refused, or --disk-io says so:
//   Note [Disk I/O without io_uring] — O_DIRECT so the page cache does not flatter a read;
//   nothing else is dropped), a file of --disk-probe-bytes written (to an fdatasync), read,
//   and half read while the other half is written (the direction done first starts over,
//   so neither runs alone), with --disk-probe-queue-depth requests of
//   --disk-probe-request bytes in flight per direction, best of 3 after an untimed pass
//   (offload/disk_file.h, probe_disk). It prints a table (and --markdown), and one JSON
//   object to --jsonl and stderr.
#include "api/options.h"
#include "api/generate.h"
#include "api/session.h"
#include "zo/parallel.h"
#include "runtime/topology.h"
#include "runtime/comm.h"
#include "models/presets.h"
#include "offload/disk_file.h"
#include "offload/disk_tier.h"
#include "runtime/arena.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "tools/cli.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace {

using json = nlohmann::json;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    // "1, 2" as "1,2": spaces around an item are the shell's quoting, not part of it.
    const auto b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    item = b == std::string::npos ? std::string() : item.substr(b, e - b + 1);
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

namespace fs = std::filesystem;

// ---- running Python (the MeZO baseline and the plot) ----

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct Command {
  int status = -1;    // the exit status; -1 when it could not run or was killed
  std::string out;    // stdout
  std::string err;    // stderr
};

// Runs `cmd` through /bin/sh, capturing stdout and stderr.
Command run_command(const std::string& cmd, const fs::path& scratch) {
  Command c;
  const fs::path err_file = scratch / "stderr.txt";
  FILE* p = popen((cmd + " 2>" + shell_quote(err_file.string())).c_str(), "r");
  if (p == nullptr) return c;
  std::array<char, 4096> buf{};
  for (std::size_t n; (n = fread(buf.data(), 1, buf.size(), p)) > 0;) c.out.append(buf.data(), n);
  const int st = pclose(p);
  c.status = st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  std::ifstream e(err_file);
  std::stringstream ss;
  ss << e.rdbuf();
  c.err = ss.str();
  return c;
}

// The last non-empty line of a program's output (its message, or its JSON).
std::string last_line(const std::string& text) {
  std::string t = text;
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r' || t.back() == ' ')) t.pop_back();
  const auto nl = t.rfind('\n');
  return nl == std::string::npos ? t : t.substr(nl + 1);
}

// A Python interpreter that imports `module`: `explicit_python` when given (--python),
// else the first of Debian's /usr/bin/python3 and the python3 on PATH that does (a pyenv or
// venv python3 on PATH often lacks the system's packages). Empty when none does; `tried`
// lists what was tried.
std::string python_with(const std::string& module, const std::string& explicit_python, const fs::path& scratch,
                        std::string& tried) {
  std::vector<std::string> candidates;
  if (!explicit_python.empty())
    candidates.push_back(explicit_python);
  else
    candidates = {"/usr/bin/python3", "python3"};
  tried.clear();
  for (const auto& py : candidates) {
    tried += (tried.empty() ? "" : ", ") + py;
    if (run_command(shell_quote(py) + " -c " + shell_quote("import " + module), scratch).status == 0) return py;
  }
  return {};
}

// $ZO2_BENCH_DIR when set (a packed build run elsewhere), else bench/ in the source tree,
// else the installed share/zo2/bench next to the executable.
fs::path script_path(const std::string& name) {
  if (const char* dir = std::getenv("ZO2_BENCH_DIR"); dir && *dir) {
    if (fs::path p = fs::path(dir) / name; fs::exists(p)) return p;
    zo2::fail(zo2::ErrorKind::io, "{}: not found in $ZO2_BENCH_DIR ({})", name, dir);
  }
  // An installed zo2-bench runs its own release's scripts (share/zo2/bench beside it), not
  // those of whatever checkout sits where it was built; a build-tree one has none there.
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    if (fs::path p = exe.parent_path().parent_path() / "share" / "zo2" / "bench" / name; fs::exists(p)) return p;
#ifdef ZO2_BENCH_SCRIPT_DIR
  if (fs::path p = fs::path(ZO2_BENCH_SCRIPT_DIR) / name; fs::exists(p)) return p;
#endif
  zo2::fail(zo2::ErrorKind::io, "{}: not found next to zo2-bench (looked in share/zo2/bench and the source tree's bench/)",
            name);
}

// ---- the PyTorch MeZO baseline (bench/mezo_torch.py) ----

struct Baseline {
  std::string python;  // empty: off
  fs::path script, scratch;
  std::string device;  // cpu or cuda[:N]
  int steps = 1, warmup = 0, threads = 0;
  std::map<std::string, json> cache;  // one run per (preset, B, T, dtype): caps and storage do not matter to it

  // The dtype the baseline holds and computes in: zo2's compute dtype (fp32 on the CPU
  // backend, which computes in fp32 whatever --compute-dtype says).
  std::string dtype_for(const std::string& compute) const { return device == "cpu" ? "fp32" : compute; }

  json run(const std::string& preset, int batch, int seq, const std::string& compute) {
    const std::string dtype = dtype_for(compute);
    const std::string key = fmt::format("{}|{}|{}|{}", preset, batch, seq, dtype);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
    const fs::path config = scratch / (preset + ".config.json");
    {
      std::ofstream f(config, std::ios::trunc);
      json c = zo2::find_preset(preset).config.to_json();
      c["_name_or_path"] = preset;
      f << c.dump(2);
      if (!f) zo2::fail(zo2::ErrorKind::io, "{}: cannot write", config.string());
    }
    std::string cmd = fmt::format("{} {} --config {} --batch-size {} --seq-len {} --dtype {} --device {} --steps {} --warmup {}",
                                  shell_quote(python), shell_quote(script.string()), shell_quote(config.string()), batch,
                                  seq, dtype, shell_quote(device), steps, warmup);
    if (threads > 0) cmd += fmt::format(" --threads {}", threads);
    const Command c = run_command(cmd, scratch);
    json r;
    try {
      if (c.status != 0) throw std::runtime_error("");
      r = json::parse(last_line(c.out));
      r["dtype"].get<std::string>();
      r["step_s"].get<double>();
    } catch (const std::exception&) {
      const std::string why = last_line(c.err.empty() ? c.out : c.err);
      r = json{{"error", fmt::format("{} failed (exit {}): {}", script.filename().string(), c.status,
                                     why.empty() ? "no output" : why)}};
    }
    cache[key] = r;
    return r;
  }
};

// ---- the link probe (Note [Link probe]) ----

struct LinkRates {
  std::size_t bytes = 0;
  double h2d = 0, d2h = 0;            // GB/s, each direction alone
  double both_h2d = 0, both_d2h = 0;  // GB/s per direction, both at once
  std::string error;                  // why there are no rates
};

LinkRates probe_link(const std::string& device, int threads, std::size_t bytes) {
  LinkRates r;
  r.bytes = bytes;
  try {
    zo2::DeviceOptions o = zo2::parse_device(device);
    o.mem_cap = 2 * bytes + (std::size_t{16} << 20);
    o.threads = threads;
    auto dev = zo2::make_device(o);
    zo2::HostBuffer src = dev->alloc_host(bytes), dst = dev->alloc_host(bytes);
    zo2::DeviceBuffer up = dev->arena().allocate(bytes, "link probe (to the device)");
    zo2::DeviceBuffer down = dev->arena().allocate(bytes, "link probe (to the host)");
    auto s_up = dev->make_stream("link probe h2d"), s_down = dev->make_stream("link probe d2h");
    auto up0 = dev->make_event(), up1 = dev->make_event(), down0 = dev->make_event(), down1 = dev->make_event();
    // Seconds each direction took (0 = not run) when `to_device` / `to_host` run together.
    auto timed = [&](bool to_device, bool to_host) {
      if (to_device) {
        s_up->record(*up0);
        s_up->copy_h2d(up.data(), src.data(), bytes);
        s_up->record(*up1);
      }
      if (to_host) {
        s_down->record(*down0);
        s_down->copy_d2h(dst.data(), down.data(), bytes);
        s_down->record(*down1);
      }
      s_up->synchronize();
      s_down->synchronize();
      return std::pair{to_device ? up1->seconds_since(*up0) : 0.0, to_host ? down1->seconds_since(*down0) : 0.0};
    };
    const double gb = static_cast<double>(bytes) / 1e9;
    auto rate = [gb](double seconds) { return seconds > 0 ? gb / seconds : 0.0; };
    timed(true, true);  // warm-up: first touch, clocks
    for (int rep = 0; rep < 3; ++rep) {
      r.h2d = std::max(r.h2d, rate(timed(true, false).first));
      r.d2h = std::max(r.d2h, rate(timed(false, true).second));
      const auto [a, b] = timed(true, true);
      // one pair: the repetition whose slower direction was fastest
      if (std::min(rate(a), rate(b)) > std::min(r.both_h2d, r.both_d2h)) {
        r.both_h2d = rate(a);
        r.both_d2h = rate(b);
      }
    }
  } catch (const std::exception& e) {  // zo2::Error, or bad_alloc for a size the host cannot pin
    r.error = e.what();
  }
  return r;
}

// One line for the log and under the table.
std::string describe(const LinkRates& link) {
  if (!link.error.empty()) return fmt::format("link probe: {}", link.error);
  // (three significant digits: an emulated link of 0.05 GB/s printed as 0.0: pass 62)
  return fmt::format("link probe ({} pinned, best of 3): to the device {:.3g} GB/s, to the host {:.3g} GB/s alone; "
                     "{:.3g} / {:.3g} GB/s both at once (link floor/step uses these)",
                     zo2::format_bytes(static_cast<double>(link.bytes)), link.h2d, link.d2h, link.both_h2d,
                     link.both_d2h);
}

// ---- the disk probe (Note [Disk probe]) ----

json disk_json(const zo2::DiskRates& d) {
  return json{{"mode", "disk-probe"},
              {"dir", d.dir.string()},
              {"filesystem", d.filesystem},
              {"direct", d.direct},
              {"io", std::string(zo2::disk_io_name(d.io))},
              {"bytes", d.bytes},
              {"request_bytes", d.request_bytes},
              {"queue_depth", d.queue_depth},
              {"write_gb_s", d.write_gb_s},
              {"read_gb_s", d.read_gb_s},
              {"both_write_gb_s", d.both_write_gb_s},
              {"both_read_gb_s", d.both_read_gb_s}};
}

std::string disk_table(const zo2::DiskRates& d) {
  std::string t = fmt::format(
      "disk probe: {} ({}, {}, {}), a {} file, {} requests, queue depth {} per direction, best of 3\n\n",
      d.dir.string(), d.filesystem, d.direct ? "O_DIRECT" : "buffered: the page cache, not the disk",
      zo2::disk_io_name(d.io),
      zo2::format_bytes(static_cast<double>(d.bytes)), zo2::format_bytes(static_cast<double>(d.request_bytes)),
      d.queue_depth);
  t += "| pattern | write GB/s | read GB/s |\n|---|---|---|\n";
  t += fmt::format("| write alone (to fdatasync) | {:.2f} | — |\n", d.write_gb_s);
  t += fmt::format("| read alone | — | {:.2f} |\n", d.read_gb_s);
  t += fmt::format("| both at once | {:.2f} | {:.2f} |\n", d.both_write_gb_s, d.both_read_gb_s);
  return t;
}

// The row's transfer floor at the probed rates (both directions at once), and its ratio to
// the step.
void add_link_floor(json& row, const LinkRates& link) {
  if (!link.error.empty() || link.both_h2d <= 0 || link.both_d2h <= 0 || !row.value("ok", false)) return;
  const double floor = std::max(row["h2d_bytes_per_step"].get<double>() / (link.both_h2d * 1e9),
                                row["d2h_bytes_per_step"].get<double>() / (link.both_d2h * 1e9));
  row["link_h2d_gb_s"] = link.both_h2d;
  row["link_d2h_gb_s"] = link.both_d2h;
  row["link_floor_s"] = floor;
  const double step = row["step_s"].get<double>();
  row["link_floor_ratio"] = step > 0 ? floor / step : 0.0;
}

// Ranks (README "Many GPUs and nodes"): under mpirun every rank runs every row as one rank
// of `g_layout`; rank 0 alone prints and writes files.
zo2::Comm* g_comm = nullptr;
zo2::ParallelLayout g_layout;
int g_directions = 1;
// The disk tier (--host-mem, README "Models larger than host memory"): every row's master
// weights capped at g_host_mem, the rest in a block file under g_disk_dir.
std::size_t g_host_mem = 0;
std::string g_disk_dir;
zo2::DiskIo g_disk_io = zo2::DiskIo::automatic;  // --disk-io
int g_disk_lag = 1, g_disk_staging = 0;
bool g_sliced = false;
std::int64_t g_tile = 0;  // Note [Sub-block streaming]: --tile auto (0) | off (−1) | bytes

struct Row {
  std::string preset, storage, compute, cap_text;
  int batch = 1, seq = 1;
  bool synthetic = false;
  std::string tuning = "full";     // full | lora (r 8, alpha 16 on q_proj,v_proj: MeZO's and ZO-Bench's)
  std::string optimizer = "zo-sgd";
};

// The row's label: the preset, and what it trains with when that is not full ZO-SGD.
std::string row_label(const Row& r) {
  std::string s = r.preset;
  if (g_directions > 1) s += fmt::format(" q={}", g_directions);
  if (g_comm) s += fmt::format(" [{} ranks: {}{}]", g_comm->size(), g_layout.spec(), g_sliced ? ", sliced" : "");
  if (r.synthetic) s += " (synthetic)";
  if (g_host_mem > 0) s += fmt::format(" host {} lag {}", zo2::format_bytes(static_cast<double>(g_host_mem)), g_disk_lag);
  if (g_tile > 0) s += fmt::format(" tiles {}", zo2::format_bytes(static_cast<double>(g_tile)));
  if (g_tile < 0) s += " whole blocks";
  if (r.tuning != "full") s += " LoRA";
  if (r.optimizer != "zo-sgd") s += " " + r.optimizer;
  return s;
}


// This process's proportional set size (/proc/self/smaps_rollup), bytes; 0 where unknown.
double pss_bytes() {
  std::ifstream f("/proc/self/smaps_rollup");
  std::string key;
  double kb = 0;
  while (f >> key) {
    if (key == "Pss:") {
      f >> kb;
      return kb * 1024;
    }
    f.ignore(1 << 20, '\n');
  }
  return 0;
}

json run_row(const Row& r, const std::string& device, const std::string& offload, int steps, int warmup, int threads,
            std::uint64_t seed) {
  const zo2::ModelConfig config = zo2::find_preset(r.preset).config;
  zo2::SessionConfig sc;
  sc.device = device;
  sc.gpu_mem = r.cap_text == "none" ? 0 : zo2::parse_byte_size(r.cap_text);
  sc.storage = *zo2::dtype_from_name(r.storage);
  sc.compute = *zo2::dtype_from_name(r.compute);
  sc.max_batch = r.batch;
  sc.max_seq = r.seq;
  sc.run_seed = seed;
  sc.threads = threads;
  sc.offload = zo2::parse_offload_mode(offload);
  sc.rule.kind = *zo2::parse_rule(r.optimizer);
  sc.rule.directions = g_directions;
  if (g_comm) {
    sc.comm = g_comm;
    sc.parallel = g_layout;
    sc.sliced_upload = g_sliced;
  }
  if (r.tuning == "lora") {
    sc.peft.lora = true;  // PeftConfig's defaults: r 8, alpha 16, q_proj and v_proj
  }
  sc.host_mem = g_host_mem;
  if (g_host_mem > 0) sc.disk_dir = g_disk_dir;
  sc.disk_file.io = g_disk_io;
  sc.disk_lag = g_disk_lag;
  sc.disk_staging = g_disk_staging;
  sc.tile = g_tile;
  json row{{"offload", offload}, {"preset", r.preset}, {"tuning", r.tuning}, {"optimizer", r.optimizer}, {"params", config.total_params()}, {"device", device},
           {"cap", r.cap_text}, {"cap_bytes", sc.gpu_mem}, {"storage", r.storage}, {"compute", r.compute},
           {"batch", r.batch}, {"seq", r.seq}, {"synthetic", r.synthetic}};
  try {
    zo2::Session s(config, sc, seed, r.synthetic);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(r.batch) * static_cast<std::size_t>(r.seq));
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>((i * 7919 + 13) % static_cast<std::size_t>(config.vocab_size));
    const zo2::HostBatch batch = zo2::make_batch(config, r.batch, r.seq, ids);
    // Warm up, drain, then time `steps` pipelined steps (losses read a step behind, as
    // zo2-tune does): B·T over the mean steady-state step.
    std::int64_t prev = -1;
    for (int t = 0; t < warmup; ++t) {
      const std::int64_t id = s.step_async(batch, 1e-7f, 1e-3f, 0.0f);
      if (prev >= 0) s.wait(prev);
      prev = id;
    }
    if (prev >= 0) s.wait(prev);
    prev = -1;
    std::size_t h2d = 0, d2h = 0, disk_read = 0, disk_write = 0;
    double upload = 0, compute = 0, offload_busy = 0, disk_read_s = 0, disk_write_s = 0;
    if (zo2::DiskTier* d = s.store().disk()) d->take_stats();  // the warm-up's I/O
    auto add = [&](const zo2::StepResult& res) {
      h2d += res.h2d_bytes;
      d2h += res.d2h_bytes;
      upload += res.upload_busy_s;
      compute += res.compute_busy_s;
      offload_busy += res.offload_busy_s;
      disk_read += res.disk_read_bytes;
      disk_write += res.disk_write_bytes;
      disk_read_s += res.disk_read_busy_s;
      disk_write_s += res.disk_write_busy_s;
    };
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < steps; ++t) {
      const std::int64_t id = s.step_async(batch, 1e-7f, 1e-3f, 0.0f);
      if (prev >= 0) add(s.wait(prev));
      prev = id;
    }
    const zo2::StepResult last_res = s.wait(prev);
    const double mean = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
    add(last_res);
    const auto& pl = s.placement();
    const double tokens = static_cast<double>(r.batch) * r.seq;
    const double n = static_cast<double>(steps);
    row["ok"] = true;
    row["threads"] = threads;
    row["step_s"] = mean;
    row["tokens_per_s"] = mean > 0 ? tokens / mean : 0;
    // The breakdown: each stream's busy seconds per step, and what no stream explains.
    upload /= n;
    compute /= n;
    offload_busy /= n;
    // The disk: seconds with a read (write) in the kernel per step, and both together.
    disk_read_s /= n;
    disk_write_s /= n;
    const double disk_s = disk_read_s + disk_write_s;
    const double busiest = std::max({upload, compute, offload_busy, disk_s});
    row["upload_s"] = upload;
    row["compute_s"] = compute;
    row["offload_s"] = offload_busy;
    row["idle_s"] = std::max(0.0, mean - busiest);
    row["compute_idle_s"] = std::max(0.0, mean - compute);
    row["compute_util"] = mean > 0 ? compute / mean : 0;
    row["bound"] = busiest == compute ? "compute" : busiest == upload ? "upload" : busiest == offload_busy ? "offload" : "disk";
    if (s.store().disk()) {
      row["host_mem_bytes"] = g_host_mem;
      row["disk_blocks"] = pl.disk_blocks;
      row["io"] = std::string(zo2::disk_io_name(s.store().disk()->io()));  // --disk-io auto: what it fell to
      row["disk_lag"] = g_disk_lag;
      row["disk_staging"] = pl.disk_staging;
      row["disk_read_s"] = disk_read_s;
      row["disk_write_s"] = disk_write_s;
      row["disk_read_bytes_per_step"] = static_cast<double>(disk_read) / n;
      row["disk_write_bytes_per_step"] = static_cast<double>(disk_write) / n;
      row["disk_read_gb_s"] = mean > 0 ? static_cast<double>(disk_read) / n / mean / 1e9 : 0;
      row["disk_write_gb_s"] = mean > 0 ? static_cast<double>(disk_write) / n / mean / 1e9 : 0;
      row["predicted_disk_s"] = pl.predicted_disk_s;
    }
    row["resident_blocks"] = pl.resident_count;
    row["streamed_blocks"] = pl.streamed;
    row["window"] = pl.window;
    if (pl.tile_slots > 0) {
      row["tile_slots"] = pl.tile_slots;
      row["tile_bytes"] = pl.tile_bytes;
      row["tiles_per_block"] = pl.block_tiles;
    }
    row["device_name"] = s.device().name();  // the GPU, or the CPU's threads and noise loop
    // The kernel switches the row ran with (only those set), so rows of one sweep run with
    // different choices stay apart.
    json kernel_env = json::object();
    for (const char* var :
         {"ZO2_CUDA_ATTENTION", "ZO2_CUDA_GEMM_EPILOGUE", "ZO2_CUDA_FP8_UPDATE", "ZO2_CPU_NOISE", "ZO2_CPU_LINK_GBPS"})
      if (const char* v = std::getenv(var); v != nullptr && *v != '\0') kernel_env[var] = v;
    row["kernel_env"] = kernel_env;
    row["device_peak_bytes"] = s.device_peak();
    row["arena_bytes"] = s.device().arena().capacity();  // the plan plus slack, at most the cap
    row["driver_used_bytes"] = s.device().driver_used_bytes();
    row["pinned_host_bytes"] = s.device().pinned_host_bytes();
    row["host_store_bytes"] = s.store().host_bytes();
    row["adapter_bytes"] = pl.adapter_bytes;
    row["state_block_bytes"] = pl.state_block_bytes;
    row["predicted_peak_bytes"] = pl.total_bytes;
    row["h2d_bytes_per_step"] = static_cast<double>(h2d) / n;
    row["d2h_bytes_per_step"] = static_cast<double>(d2h) / n;
    row["h2d_gb_s"] = mean > 0 ? static_cast<double>(h2d) / n / mean / 1e9 : 0;
    row["d2h_gb_s"] = mean > 0 ? static_cast<double>(d2h) / n / mean / 1e9 : 0;
    row["predicted_transfer_floor_s"] = pl.predicted_transfer_s;
    row["floor_ratio"] = mean > 0 ? pl.predicted_transfer_s / mean : 0;
    row["peak_within_cap"] = sc.gpu_mem == 0 || s.device_peak() <= sc.gpu_mem;
    row["directions"] = g_directions;
    if (g_comm) {
      // Host memory of the job: every rank's PSS (a page shared by k ranks counts 1/k each).
      const double mine = pss_bytes();
      double total = 0;
      for (double v : g_comm->all_gather(std::span<const double>(&mine, 1), "the ranks' memory")) total += v;
      row["ranks"] = g_comm->size();
      row["parallel"] = g_layout.spec();
      row["ranks_pss_bytes"] = total;
      row["shared_host_image"] = sc.share_host_image;
      row["upload"] = g_sliced ? "sliced" : "full";
    }
  } catch (const zo2::Error& e) {
    row["ok"] = false;
    row["error"] = e.what();
  }
  return row;
}

// Generation (api/generate.h): B prompts of r.seq tokens each decode `new_tokens` tokens
// greedily, together, through the same placement machinery; generated tokens/s counts the
// new tokens over the whole call (prefill included), after one warm-up call.
json run_generate_row(const Row& r, const std::string& device, const std::string& offload, int new_tokens,
                      const std::string& kv, int threads, std::uint64_t seed) {
  const zo2::ModelConfig config = zo2::find_preset(r.preset).config;
  zo2::SessionConfig sc;
  sc.device = device;
  sc.gpu_mem = r.cap_text == "none" ? 0 : zo2::parse_byte_size(r.cap_text);
  sc.storage = *zo2::dtype_from_name(r.storage);
  sc.compute = *zo2::dtype_from_name(r.compute);
  sc.max_batch = r.batch;
  sc.max_seq = r.seq + new_tokens;
  sc.training = false;
  sc.threads = threads;
  sc.offload = zo2::parse_offload_mode(offload);
  sc.generate.batch = r.batch;
  sc.generate.kv = zo2::parse_kv_place(kv);
  json row{{"mode", "generate"}, {"offload", offload}, {"preset", r.preset}, {"params", config.total_params()},
           {"device", device}, {"cap", r.cap_text}, {"cap_bytes", sc.gpu_mem}, {"storage", r.storage},
           {"compute", r.compute}, {"batch", r.batch}, {"prompt_tokens", r.seq}, {"new_tokens", new_tokens},
           {"kv_cache_requested", kv}, {"synthetic", r.synthetic}};
  try {
    if (r.seq + new_tokens > config.max_positions)
      zo2::fail(zo2::ErrorKind::invalid_argument, "{} prompt + {} new tokens exceed the model's {} positions", r.seq,
                new_tokens, config.max_positions);
    zo2::Session s(config, sc, seed, r.synthetic);
    std::vector<std::vector<std::int32_t>> prompts(static_cast<std::size_t>(r.batch));
    for (std::size_t b = 0; b < prompts.size(); ++b)
      for (int t = 0; t < r.seq; ++t)
        prompts[b].push_back(static_cast<std::int32_t>((b * 131 + static_cast<std::size_t>(t) * 7919 + 13) %
                                                       static_cast<std::size_t>(config.vocab_size)));
    zo2::GenerateOptions o;
    o.max_new_tokens = new_tokens;
    zo2::generate(s, prompts, o);  // warm-up
    zo2::GenerateStats st;
    zo2::generate(s, prompts, o, &st);
    const auto& pl = s.placement();
    row["ok"] = true;
    row["seconds"] = st.seconds;
    row["generated_tokens"] = st.new_tokens;
    row["tokens_per_s"] = st.seconds > 0 ? static_cast<double>(st.new_tokens) / st.seconds : 0.0;
    row["decode_steps"] = st.decode_steps;
    row["resident_blocks"] = pl.resident_count;
    row["streamed_blocks"] = pl.streamed;
    row["window"] = pl.window;
    row["kv_cache"] = pl.kv_positions == 0 ? "off" : pl.kv_on_device ? "device" : "host";
    row["device_name"] = s.device().name();
    row["device_peak_bytes"] = s.device_peak();
    row["predicted_peak_bytes"] = pl.total_bytes;
    row["peak_within_cap"] = sc.gpu_mem == 0 || s.device_peak() <= sc.gpu_mem;
  } catch (const zo2::Error& e) {
    row["ok"] = false;
    row["error"] = e.what();
  }
  return row;
}

}  // namespace

namespace {

std::string fmt_or_dash(const json& row, const char* key, const char* spec) {
  if (!row.contains(key)) return "—";
  return fmt::format(fmt::runtime(spec), row[key].get<double>());
}

constexpr const char* kTableHead =
    "| preset | cap | storage | compute | B×T | resident/streamed (window) | tok/s | s/step | upload s | compute s | "
    "offload s | idle s | bound | peak | predicted | H2D GB/s | D2H GB/s | floor s | floor/step | link floor/step | "
    "MeZO s/step | × MeZO |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
constexpr int kTableColumns = 22;
constexpr const char* kGenerateHead =
    "| preset | cap | storage | compute | prompts × prompt tokens | new tokens | resident/streamed (window) | KV cache | "
    "generated tok/s | s | peak | predicted |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n";

}  // namespace

int main(int argc, char** argv) {
  zo2::cli::open_standard_streams();  // Note [Standard streams] (tools/cli.h): before any file is opened
  CLI::App app{"zo2-bench: zo2 MeZO step throughput and memory against device-memory caps"};
  std::string presets = "opt-tiny", caps = "none", storages = "fp32", computes = "fp32", batches = "1", seqs = "64";
  std::string device = "cpu", offload = "auto", jsonl, markdown, plot, python, mezo_mode = "auto";
  std::string tile = "auto";
  std::string tunings = "full", optimizers = "zo-sgd";
  int steps = 5, warmup = 2, threads = 0;
  std::uint64_t seed = 0;
  bool alias = false, quiet = false;
  std::string link_probe = "auto";
  int generate_tokens = 0;
  std::string kv_cache = "auto";
  app.add_option("--generate", generate_tokens,
                 "generation rows instead of training steps: --batch-size prompts of --seq-len tokens each decode N new "
                 "tokens greedily (zo2-tune generate); generated tokens/s")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--kv-cache", kv_cache, "with --generate: auto, device, host, off")->capture_default_str()
      ->check(CLI::IsMember({"auto", "device", "host", "off"}));
  app.add_option("--presets", presets, "comma-separated presets (zo2-tune init --list)")->capture_default_str();
  std::string parallel;
  app.add_option("--parallel", parallel,
                 "under mpirun: each row as ranks of data=D,perturbation=P,directions=Q (default data=N)");
  std::string upload = "full";
  app.add_option("--upload", upload, "under mpirun: full or sliced uploads (README \"Many GPUs and nodes\")")
      ->capture_default_str()
      ->check(CLI::IsMember({"full", "sliced"}));
  app.add_option("--directions", g_directions, "MeZO's q directions per step (every row)")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--gpu-mem", caps, "comma-separated caps (512M, 18G, none = whole device)")->capture_default_str();
  app.add_option("--storage-dtype", storages, "comma-separated: fp32, bf16, fp16, fp8")->capture_default_str();
  app.add_option("--compute-dtype", computes, "comma-separated: fp32, bf16, fp16")->capture_default_str();
  app.add_option("--batch-size", batches, "comma-separated batch sizes")->capture_default_str();
  app.add_option("--seq-len", seqs, "comma-separated sequence lengths")->capture_default_str();
  app.add_option("--tuning", tunings,
                 "comma-separated: full (every weight) and/or lora (adapters r 8, alpha 16 on q_proj,v_proj; the base "
                 "frozen, nothing written back)")
      ->capture_default_str();
  app.add_option("--optimizer", optimizers,
                 "comma-separated update rules: zo-sgd, zo-sgd-sign, zo-sgd-cons, zo-sgd-momentum, zo-adam")
      ->capture_default_str();
  app.add_option("--device", device, "cpu, cuda, cuda:N")->capture_default_str();
  app.add_option("--tile", tile,
                 "stream blocks by weight tiles: auto (when two whole blocks do not fit the cap), off, or a tile size "
                 "such as 64M (every row)")
      ->capture_default_str();
  app.add_option("--offload", offload, "auto, all (stream every block), none")->capture_default_str()
      ->check(CLI::IsMember({"auto", "all", "none"}));
  app.add_option("--steps", steps, "measured steps per row (their mean is reported)")->capture_default_str()->check(CLI::Range(1, 1 << 30));
  app.add_option("--warmup", warmup, "steps before measuring")->capture_default_str()->check(CLI::Range(0, 1 << 30));
  app.add_option("--threads", threads, "CPU threads for zo2 and the PyTorch baseline (0 = the cores this process may use, at most its cgroup CPU quota)")
      ->capture_default_str();  // range: api/options.cpp, checked below with the device
  app.add_option("--seed", seed, "init and run seed")
      ->capture_default_str()
      ->transform(zo2::cli::seed_value());  // zo2-tune's seeds: decimal digits below 2^64
  app.add_flag("--alias-blocks", alias, "every block shares one host image (shapes beyond host memory; rows labelled synthetic)");
  app.add_option("--jsonl", jsonl, "write one JSON object per row to this file");
  app.add_option("--markdown", markdown, "write the markdown table to this file (always printed)");
  app.add_option("--plot", plot, "draw tokens/s against the cap per model into this PNG (bench/plot_bench.py, matplotlib)");
  app.add_option("--mezo-baseline", mezo_mode,
                 "run bench/mezo_torch.py (PyTorch MeZO) on each row's shape: auto = when torch is importable, on = "
                 "required, off")
      ->capture_default_str()->check(CLI::IsMember({"auto", "on", "off"}));
  app.add_option("--python", python,
                 "Python interpreter for --plot and --mezo-baseline (default: the first of /usr/bin/python3, python3 "
                 "that imports matplotlib / torch)");
  app.add_option("--link-probe", link_probe,
                 "time the host<->device copies before the sweep (Note [Link probe]): auto = 1G on CUDA, 64M on the "
                 "CPU backend; a size; off")
      ->capture_default_str();
  bool disk_probe = false;
  std::string disk_dir = ".", disk_probe_bytes = "1G", disk_probe_request = "1M";
  unsigned disk_probe_qd = 16;
  app.add_flag("--disk-probe", disk_probe,
               "measure the disk under --disk-dir instead of sweeping (Note [Disk probe]): sequential write, read and "
               "both at once through io_uring (or --disk-io) with O_DIRECT");
  std::string disk_io = "auto";
  app.add_option("--disk-io", disk_io,
                 "how the disk tier and --disk-probe move bytes: auto (io_uring, else threads where a container or the "
                 "kernel refuses it), io_uring, threads")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "io_uring", "threads"}));
  app.add_option("--disk-dir", disk_dir,
                 "with --disk-probe: a directory on the disk to measure; with --host-mem: the disk tier's directory")
      ->capture_default_str();
  std::string host_mem;
  app.add_option("--host-mem", host_mem,
                 "cap every row's master weights in host memory; the streamed blocks beyond it live in a block file "
                 "under --disk-dir (rows report the disk's busy time)");
  app.add_option("--disk-lag", g_disk_lag, "with --host-mem: write a disk block back every K updates")
      ->capture_default_str();
  app.add_option("--disk-staging", g_disk_staging, "with --host-mem: staging buffers (0 = window + 1)")
      ->capture_default_str();
  app.add_option("--disk-probe-bytes", disk_probe_bytes, "with --disk-probe: the size of the file it writes and reads")
      ->capture_default_str();
  app.add_option("--disk-probe-request", disk_probe_request,
                 "with --disk-probe: bytes per request (a multiple of 4K)")->capture_default_str();
  app.add_option("--disk-probe-queue-depth", disk_probe_qd, "with --disk-probe: requests in flight per direction")
      ->capture_default_str()->check(CLI::Range(1, 1024));
  app.add_flag("-q,--quiet", quiet, "only the table");
  zo2::cli::decimal_integer_options(app);  // Note [Decimal integers] (tools/cli.h)
  zo2::cli::non_empty_values(app);  // after, so it runs first: Note [Empty values] (tools/cli.h)
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  zo2::log_set_level(zo2::LogLevel::warn);
  fs::path scratch;
  struct RemoveScratch {  // on every way out of main
    fs::path& dir;
    ~RemoveScratch() {
      std::error_code ec;
      if (!dir.empty()) fs::remove_all(dir, ec);
    }
  } remove_scratch{scratch};
  std::string block_file_dir;  // --host-mem: the block file this sweep made
  struct RemoveBlockFile {
    std::string& dir;
    ~RemoveBlockFile() {
      if (dir.empty()) return;
      std::error_code ec;
      for (const char* f : {zo2::kDiskTierFile, zo2::kDiskTierIdentity, "zo2-blocks.lock"})
        fs::remove(fs::path(dir) / f, ec);
    }
  } remove_block_file{block_file_dir};
  int rc = 0;
  std::unique_ptr<zo2::Comm> comm;
  try {
    comm = zo2::make_comm_from_environment();
    if (comm->size() > 1) {
      g_layout = parallel.empty() ? zo2::ParallelLayout{comm->size(), 1, 1} : zo2::parse_parallel(parallel, "--parallel");
      zo2::RuleConfig rule;
      rule.directions = g_directions;
      zo2::validate_parallel(g_layout, comm->size(), rule, -1, "--parallel", parallel);
      g_comm = comm.get();
      g_sliced = upload == "sliced";
      // Note [Rank binding]: each rank its cores (and GPU) before any thread exists.
      const zo2::RankBinding b = zo2::bind_rank(comm->local_rank(), comm->local_size(),
                                                zo2::parse_device(device).kind == zo2::DeviceKind::cuda
                                                    ? zo2::cuda_pci_bus_ids()
                                                    : std::vector<std::string>{},
                                                true);
      if (threads == 0) threads = b.threads;
      if (b.gpu >= 0 && (device == "cuda" || device == "auto")) device = fmt::format("cuda:{}", b.gpu);
      if (comm->rank() != 0) {
        // Rank 0 reports; the others run the same rows silently.
        quiet = true;
        jsonl.clear();
        markdown.clear();
        plot.clear();
        mezo_mode = "off";
        link_probe = "off";
        if (!std::freopen("/dev/null", "w", stdout)) return 1;
      }
    } else if (!parallel.empty() && zo2::parse_parallel(parallel, "--parallel").size() != 1) {
      zo2::RuleConfig rule;
      rule.directions = g_directions;
      zo2::validate_parallel(zo2::parse_parallel(parallel, "--parallel"), 1, rule, -1, "--parallel", parallel);
    }
    g_tile = zo2::parse_tile_option(tile, zo2::OptionSource::cli);
    if (!host_mem.empty()) {
      g_host_mem = zo2::parse_size_option(zo2::Opt::host_mem, host_mem, zo2::OptionSource::cli);
      g_disk_dir = disk_dir;
      zo2::check_integer(zo2::Opt::disk_lag, g_disk_lag, zo2::OptionSource::cli);
      zo2::check_integer(zo2::Opt::disk_staging, g_disk_staging, zo2::OptionSource::cli);
      if (alias) zo2::fail(zo2::ErrorKind::invalid_argument, "--host-mem: rows with --alias-blocks hold one block image");
      // The rows' block file is the sweep's own: removed at the end unless it was there before.
      if (std::error_code ec; !fs::exists(fs::path(disk_dir) / zo2::kDiskTierFile, ec)) block_file_dir = disk_dir;
    }
    if (generate_tokens > 0) {
      // Generation rows decode through whole blocks in RAM: the training-only flags would be
      // ignored while the labels claimed them.
      for (const char* flag : {"--plot", "--host-mem", "--tile", "--tuning", "--optimizer", "--directions",
                               "--mezo-baseline"})
        if (app.get_option(flag)->count() > 0)
          zo2::fail(zo2::ErrorKind::invalid_argument, "{} is for training rows, not --generate", flag);
    }
    g_disk_io = zo2::parse_disk_io(disk_io);
    if (disk_probe) {
      const zo2::DiskRates d = zo2::probe_disk(disk_dir, zo2::parse_byte_size(disk_probe_bytes),
                                               zo2::parse_byte_size(disk_probe_request), disk_probe_qd,
                                               zo2::parse_disk_io(disk_io));
      const std::string table = disk_table(d);
      fmt::print("{}", table);
      if (!quiet) zo2::print_stderr("{}\n", disk_json(d).dump());
      // Each file checked once closed: a full disk shows at the flush, not at <<.
      for (const auto& [flag, file, text] : {std::tuple{"--jsonl", &jsonl, disk_json(d).dump() + "\n"},
                                             std::tuple{"--markdown", &markdown, table}}) {
        if (file->empty()) continue;
        std::ofstream f(*file, std::ios::trunc);
        errno = 0;
        f << text;
        f.close();
        if (f.fail())
          zo2::fail(zo2::ErrorKind::io, "{} {}: cannot write: {}", flag, *file, errno != 0 ? std::strerror(errno) : "a write error");
      }
      return zo2::cli::finish_stdout("zo2-bench", 0);
    }
    // Every list names at least one value (an empty one would run no rows and exit 0).
    for (const auto& [flag, list] : {std::pair{"--presets", &presets}, std::pair{"--gpu-mem", &caps},
                                     std::pair{"--storage-dtype", &storages}, std::pair{"--compute-dtype", &computes},
                                     std::pair{"--batch-size", &batches}, std::pair{"--seq-len", &seqs},
                                     std::pair{"--tuning", &tunings}, std::pair{"--optimizer", &optimizers}})
      if (split(*list).empty())
        zo2::fail(zo2::ErrorKind::invalid_argument, "{} '{}': name at least one value", flag, *list);
      else if (list->front() == ',' || list->back() == ',' || list->find(",,") != std::string::npos)
        zo2::fail(zo2::ErrorKind::invalid_argument, "{} '{}': an empty item (values are separated by single commas)",
                  flag, *list);
    // Every cap before the first row: a bad one found hours into a sweep loses its table.
    for (const auto& cap : split(caps))
      if (cap != "none") zo2::parse_size_option(zo2::Opt::gpu_mem, cap, zo2::OptionSource::cli);
    for (const auto& s : split(storages))
      if (!zo2::dtype_from_name(s)) zo2::fail(zo2::ErrorKind::invalid_argument, "--storage-dtype '{}'", s);
    for (const auto& s : split(computes)) {
      const auto dt = zo2::dtype_from_name(s);
      if (!dt) zo2::fail(zo2::ErrorKind::invalid_argument, "--compute-dtype '{}'", s);
      // zo2-tune's checks (api/options.h): bf16/fp16 compute on the CPU backend would fail
      // every row mid-step; --threads in range.
      zo2::SessionConfig probe;
      probe.device = device;
      probe.compute = *dt;
      probe.threads = threads;
      zo2::check_session_options(probe, zo2::OptionSource::cli);
    }
    for (const auto& p : split(presets)) zo2::find_preset(p);
    for (const auto& t : split(tunings))
      if (t != "full" && t != "lora") zo2::fail(zo2::ErrorKind::invalid_argument, "--tuning '{}': full or lora", t);
    for (const auto& o : split(optimizers))
      if (!zo2::parse_rule(o))
        zo2::fail(zo2::ErrorKind::invalid_argument,
                  "--optimizer '{}': zo-sgd, zo-sgd-sign, zo-sgd-cons, zo-sgd-momentum or zo-adam", o);
    // Digits only, at most 9 of them (below 2^31: the rows take int).
    // (as the other integer flags, Note [Decimal integers]: a '+' and leading zeros are fine)
    auto small_int = [](std::string v, long long lo) {
      if (!v.empty() && v.front() == '+') v.erase(0, 1);
      v.erase(0, std::min(v.find_first_not_of('0'), v.size() > 0 ? v.size() - 1 : 0));
      return !v.empty() && v.size() <= 9 && v.find_first_not_of("0123456789") == std::string::npos &&
             std::stoll(v) >= lo;
    };
    for (const auto& b : split(batches))
      if (!small_int(b, 1))
        zo2::fail(zo2::ErrorKind::invalid_argument, "--batch-size '{}': not an integer in [1, 10^9)", b);
    for (const auto& t : split(seqs))
      if (!small_int(t, 2))
        zo2::fail(zo2::ErrorKind::invalid_argument, "--seq-len '{}': not an integer in [2, 10^9)", t);
    // A length beyond a preset's positions would fail its rows one by one, hours in.
    for (const auto& p : split(presets))
      for (const auto& t : split(seqs))
        if (const auto& c = zo2::find_preset(p).config; std::stoll(t.front() == '+' ? t.substr(1) : t) > c.max_positions)
          zo2::fail(zo2::ErrorKind::invalid_argument, "--seq-len {}: preset {} has {} positions (max_position_embeddings)",
                    t, p, c.max_positions);
    std::size_t link_bytes = 0;  // --link-probe as bytes; 0 = off
    if (link_probe == "auto") {
      link_bytes = zo2::parse_device(device).kind == zo2::DeviceKind::cuda ? std::size_t{1} << 30 : std::size_t{64} << 20;
    } else if (link_probe != "off") {
      try {
        link_bytes = zo2::parse_byte_size(link_probe);
      } catch (const zo2::Error&) {
      }
      if (link_bytes == 0)
        zo2::fail(zo2::ErrorKind::invalid_argument, "--link-probe '{}': expected auto, off or a size (64M, 1G)",
                  link_probe);
      if (link_bytes < (std::size_t{1} << 20))  // below that, the copies time launch latency, not the link
        zo2::fail(zo2::ErrorKind::invalid_argument, "--link-probe {}: at least 1M (a rate needs a copy that takes time)",
                  link_probe);
    }
    if (!python.empty() && python.find('/') != std::string::npos && !fs::exists(python))
      zo2::fail(zo2::ErrorKind::invalid_argument, "--python '{}': no such file", python);
    // The output files are checked now (opened without truncating: a refusal below must not
    // empty what they held) and written once every check has passed.
    for (const auto& [flag, file] : {std::pair{"--jsonl", &jsonl}, std::pair{"--markdown", &markdown},
                                     std::pair{"--plot", &plot}}) {
      if (file->empty()) continue;
      std::error_code ec;
      const fs::path f = fs::absolute(*file, ec);
      const bool ok = fs::exists(f, ec) ? !fs::is_directory(f, ec) && ::access(f.c_str(), W_OK) == 0
                                        : ::access(f.parent_path().c_str(), W_OK) == 0;
      if (!ok) zo2::fail(zo2::ErrorKind::io, "{} {}: cannot write it: {}", flag, *file, std::strerror(errno ? errno : EISDIR));
    }
    std::ofstream jl;
    // The scratch directory (the Python probes' and baseline's files, --plot's rows) only when
    // one of them runs: a sweep that needs none does not depend on TMPDIR. Its error names it.
    auto need_scratch = [&]() -> const fs::path& {
      if (!scratch.empty()) return scratch;
      const char* tmpdir = std::getenv("TMPDIR");
      std::error_code ec;
      const fs::path base = fs::temp_directory_path(ec);
      if (ec)
        zo2::fail(zo2::ErrorKind::io, "cannot find a directory for scratch files (TMPDIR={}): {}",
                  tmpdir ? tmpdir : "(unset)", ec.message());
      const fs::path dir = base / fmt::format("zo2-bench-{}", ::getpid());
      fs::create_directories(dir, ec);
      if (ec)
        zo2::fail(zo2::ErrorKind::io, "{}: cannot create the scratch directory (TMPDIR={}): {}", dir.string(),
                  tmpdir ? tmpdir : "(unset)", ec.message());
      scratch = dir;
      return scratch;
    };

    // Find the interpreters before the sweep, which may take hours, rather than after it.
    std::string plot_python, tried;
    fs::path plot_script;
    if (!plot.empty()) {
      plot_script = script_path("plot_bench.py");
      plot_python = python_with("matplotlib", python, need_scratch(), tried);
      if (plot_python.empty())
        zo2::fail(zo2::ErrorKind::invalid_argument,
                  "--plot {}: no Python that imports matplotlib (tried {}); install it (Debian: apt-get install "
                  "python3-matplotlib) or name an interpreter with --python",
                  plot, tried);
    }
    Baseline mezo;
    mezo.device = device == "cuda" || (device == "auto" && zo2::cuda_device_count() > 0) ? "cuda:0"
                  : device == "auto"                                                      ? "cpu"
                                                                                          : device;
    mezo.steps = steps;
    mezo.warmup = warmup;
    // The same CPU threads as zo2's CPU device (torch's own default can be 1 where OpenMP
    // sees a quota): the affinity mask's CPUs, at most the cgroup's quota.
    mezo.threads = threads > 0 ? threads : zo2::default_threads();
    if (mezo_mode != "off") {
      mezo.scratch = need_scratch();
      mezo.script = script_path("mezo_torch.py");
      mezo.python = python_with("torch", python, mezo.scratch, tried);
      if (mezo.python.empty()) {
        if (mezo_mode == "on")
          zo2::fail(zo2::ErrorKind::invalid_argument,
                    "--mezo-baseline on: no Python that imports torch (tried {}); install it (Debian: apt-get install "
                    "python3-torch) or name an interpreter with --python",
                    tried);
        if (!quiet) zo2::print_stderr("zo2-bench: no PyTorch MeZO baseline: no Python that imports torch (tried {})\n", tried);
      }
    }

    if (!jsonl.empty()) {
      jl.open(jsonl, std::ios::trunc);
      if (!jl) zo2::fail(zo2::ErrorKind::io, "--jsonl {}: cannot write: {}", jsonl, std::strerror(errno));
    }
    // A row that cannot be written (a full disk) is said once; the sweep goes on (its table
    // still reaches stdout and --markdown) and exits 1 naming the file — a JSONL that silently
    // ends would pass for a whole sweep.
    std::string jsonl_error;
    auto write_row = [&](const json& row) {
      if (!jl.is_open() || !jsonl_error.empty()) return;
      errno = 0;
      jl << row.dump() << "\n" << std::flush;
      if (jl) return;
      jsonl_error = fmt::format("--jsonl {}: cannot write: {}", jsonl, errno != 0 ? std::strerror(errno) : "a write error");
      if (!quiet) zo2::print_stderr("zo2-bench: {}; the rows from here on are not in it\n", jsonl_error);
    };
    // The sweep's files once its rows are done: the JSONL closed, the table to --markdown,
    // each checked once closed (a full disk shows at the flush, not at <<); every failure
    // named in one error.
    auto finish_files = [&](const std::string& table) {
      if (jl.is_open() && jsonl_error.empty()) {
        errno = 0;
        jl.close();
        if (jl.fail())
          jsonl_error = fmt::format("--jsonl {}: cannot write: {}", jsonl, errno != 0 ? std::strerror(errno) : "a write error");
      }
      std::string errors = jsonl_error;
      if (!markdown.empty()) {
        std::ofstream md(markdown, std::ios::trunc);
        errno = 0;
        md << table;
        md.close();
        if (md.fail())
          errors += fmt::format("{}--markdown {}: cannot write: {}", errors.empty() ? "" : "; ", markdown,
                                errno != 0 ? std::strerror(errno) : "a write error");
      }
      if (!errors.empty()) zo2::fail(zo2::ErrorKind::io, "{}", errors);
    };

    LinkRates link;
    if (link_bytes > 0) {
      link = probe_link(device, threads, link_bytes);
      if (!quiet) zo2::print_stderr("zo2-bench: {}\n", describe(link));
    }

    if (generate_tokens > 0) {
      // Generation rows (run_generate_row): one table, no baselines.
      std::string table = kGenerateHead;
      int failures = 0;
      for (const auto& p : split(presets))
        for (const auto& cap : split(caps))
          for (const auto& st : split(storages))
            for (const auto& cp : split(computes))
              for (const auto& b : split(batches))
                for (const auto& t : split(seqs)) {
                  Row r{p, st, cp, cap, std::stoi(b), std::stoi(t), alias, "full", "zo-sgd"};
                  const json row = run_generate_row(r, device, offload, generate_tokens, kv_cache, threads, seed);
                  write_row(row);
                  if (!quiet) zo2::print_stderr("{}\n", row.dump());
                  if (!row["ok"].get<bool>()) {
                    ++failures;
                    table += fmt::format("| {} | {} | {} | {} | {}×{} | {} | error: {} ||||||\n", row_label(r), cap, st, cp, b,
                                         t, generate_tokens, row["error"].get<std::string>());
                    continue;
                  }
                  if (!row["peak_within_cap"].get<bool>()) ++failures;
                  table += fmt::format("| {} | {} | {} | {} | {}×{} | {} | {}/{} ({}) | {} | {:.1f} | {:.3f} | {} | {} |\n",
                                       row_label(r), cap, st, cp, b, t, generate_tokens, row["resident_blocks"].get<int>(),
                                       row["streamed_blocks"].get<int>(), row["window"].get<int>(),
                                       row["kv_cache"].get<std::string>(), row["tokens_per_s"].get<double>(),
                                       row["seconds"].get<double>(), zo2::format_bytes(row["device_peak_bytes"].get<double>()),
                                       zo2::format_bytes(row["predicted_peak_bytes"].get<double>()));
                }
      fmt::print("{}", table);
      finish_files(table);
      if (failures > 0) zo2::print_stderr("zo2-bench: {} generation row(s) failed or exceeded their cap\n", failures);
      rc = failures > 0 ? 1 : 0;
      return zo2::cli::finish_stdout("zo2-bench", rc);
    }
    std::string table = kTableHead;
    std::vector<json> rows;
    int failures = 0;
    for (const auto& p : split(presets))
      for (const auto& cap : split(caps))
        for (const auto& st : split(storages))
          for (const auto& cp : split(computes))
            for (const auto& b : split(batches))
              for (const auto& t : split(seqs))
                for (const auto& tu : split(tunings))
                  for (const auto& opt : split(optimizers)) {
                Row r{p, st, cp, cap, std::stoi(b), std::stoi(t), alias, tu, opt};
                json row = run_row(r, device, offload, steps, warmup, threads, seed);
                add_link_floor(row, link);
                if (!mezo.python.empty()) {
                  if (alias) {
                    row["mezo_error"] = "skipped: synthetic (aliased-block) rows have no PyTorch equivalent";
                  } else if (tu != "full" || opt != "zo-sgd") {
                    row["mezo_error"] = "skipped: the PyTorch MeZO baseline runs full ZO-SGD";
                  } else if (row["ok"].get<bool>()) {
                    const json m = mezo.run(p, r.batch, r.seq, cp);
                    if (m.contains("error")) {
                      row["mezo_error"] = m["error"];
                      if (mezo_mode == "on") ++failures;
                    } else {
                      row["mezo_step_s"] = m["step_s"];
                      row["mezo_tokens_per_s"] = m["tokens_per_s"];
                      row["mezo_dtype"] = m["dtype"];
                      row["mezo_threads"] = m.value("threads", 0);
                      row["mezo_torch"] = m.value("torch", "");
                      row["mezo_params"] = m.value("params", std::int64_t{0});  // = params when the shapes agree
                      if (m.contains("peak_bytes")) row["mezo_peak_bytes"] = m["peak_bytes"];
                      row["x_mezo"] = row["step_s"].get<double>() > 0
                                          ? m["step_s"].get<double>() / row["step_s"].get<double>()
                                          : 0.0;
                    }
                  }
                }
                rows.push_back(row);
                write_row(row);
                if (!quiet) zo2::print_stderr("{}\n", row.dump());
                if (!row["ok"].get<bool>()) {
                  ++failures;
                  table += fmt::format("| {} | {} | {} | {} | {}×{} | error: {} {}\n", row_label(r), cap, st, cp, b, t,
                                       row["error"].get<std::string>(), std::string(kTableColumns - 5, '|'));
                  continue;
                }
                if (!row["peak_within_cap"].get<bool>()) ++failures;
                table += fmt::format(
                    "| {} | {} | {} | {} | {}×{} | {}/{} ({}) | {:.1f} | {:.4g} | {:.3g} | {:.3g} | {:.3g} | {:.3g} | {} | {} | {} | "
                    "{:.2f} | {:.2f} | {:.3g} | {:.2f} | {} | {} | {} |\n",
                    row_label(r) + (row.contains("io") ? " io " + row["io"].get<std::string>() : std::string()),
                    cap, st, cp, b, t, row["resident_blocks"].get<int>(), row["streamed_blocks"].get<int>(),
                    // the slots: whole-block window slots, or the weight tiles' ring (pass 62: "(0)")
                    row.contains("tile_slots") ? fmt::format("{} tile slots", row["tile_slots"].get<int>())
                                               : std::to_string(row["window"].get<int>()),
                    row["tokens_per_s"].get<double>(),
                    row["step_s"].get<double>(), row["upload_s"].get<double>(), row["compute_s"].get<double>(),
                    row["offload_s"].get<double>(), row["idle_s"].get<double>(), row["bound"].get<std::string>(),
                    zo2::format_bytes(row["device_peak_bytes"].get<double>()),
                    zo2::format_bytes(row["predicted_peak_bytes"].get<double>()), row["h2d_gb_s"].get<double>(),
                    row["d2h_gb_s"].get<double>(), row["predicted_transfer_floor_s"].get<double>(),
                    row["floor_ratio"].get<double>(), fmt_or_dash(row, "link_floor_ratio", "{:.2f}"),
                    row.contains("mezo_error") ? std::string("error") : fmt_or_dash(row, "mezo_step_s", "{:.4g}"),
                    fmt_or_dash(row, "x_mezo", "{:.2f}×"));
              }
    if (link.bytes > 0) table += fmt::format("\n{}\n", describe(link));
    fmt::print("{}", table);
    finish_files(table);
    if (!plot.empty()) {
      fs::path source = jsonl;
      if (jsonl.empty()) {
        source = need_scratch() / "rows.jsonl";
        std::ofstream f(source, std::ios::trunc);
        for (const auto& row : rows) f << row.dump() << "\n";
        f.close();
        if (f.fail()) zo2::fail(zo2::ErrorKind::io, "{}: cannot write the rows for --plot: {}", source.string(), std::strerror(errno));
      }
      const Command c = run_command(fmt::format("{} {} {} {}", shell_quote(plot_python), shell_quote(plot_script.string()),
                                                shell_quote(source.string()), shell_quote(plot)),
                                    need_scratch());
      if (c.status != 0)
        zo2::fail(zo2::ErrorKind::io, "--plot {}: {} failed (exit {}): {}", plot, plot_script.string(), c.status,
                  last_line(c.err.empty() ? c.out : c.err));
      if (std::error_code ec; !fs::exists(plot, ec))
        zo2::fail(zo2::ErrorKind::io, "--plot {}: {} exited 0 but wrote no file", plot, shell_quote(plot_python));
      if (!quiet) zo2::print_stderr("zo2-bench: wrote {}\n", plot);
    }
    if (failures > 0) {
      zo2::print_stderr("zo2-bench: {} row(s) failed or exceeded their cap{}\n", failures,
                        mezo_mode == "on" ? " or failed their --mezo-baseline run" : "");
      rc = 1;
    }
  } catch (const zo2::Error& e) {
    // (print_stderr never throws: a throw in a handler would end the process in std::terminate)
    zo2::print_stderr("zo2-bench: error: {}\n", e.what());
    rc = e.kind() == zo2::ErrorKind::invalid_argument ? 2 : 1;
  } catch (const std::exception& e) {
    zo2::print_stderr("zo2-bench: error: {}\n", zo2::cli::describe_error(e));
    rc = 1;
  }
  return zo2::cli::finish_stdout("zo2-bench", rc);
}
