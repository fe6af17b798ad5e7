// The disk tier (offload/disk_tier.h, DESIGN.md §12, issue 21): blocks that do not fit
// under --host-mem live in a block file and stream disk → staging → slot → staging → disk.
// A run through the disk tier must give the all-in-RAM run's bits (fp32 and bf16, any
// --disk-lag), write K-fold less with --disk-lag K, and stop with a clear error on a full
// disk while the last checkpoint stays intact.
#include "api/run_dir.h"
#include "api/session.h"
#include "zo/seed_log.h"
#include "offload/disk_tier.h"
#include "offload/planner.h"
#include "runtime/device.h"
#include "tests/reference_model.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <thread>
#include <fstream>
#include <string>
#include <vector>

namespace zo2 {
namespace {

TEST(DiskTier, ImagesRoundTripAndASecondUserOfTheDirectoryIsRefused) {
  test::TempDir tmp;
  auto device = make_device(DeviceOptions{});
  const std::size_t bytes = 10000;  // not a multiple of 4096: the padding is the tier's business
  DiskTier tier(*device, tmp.path(), {1, 3, 4}, bytes, 2);
  EXPECT_TRUE(tier.holds(3));
  EXPECT_FALSE(tier.holds(0));
  EXPECT_FALSE(tier.holds(2));
  std::vector<unsigned char> a(bytes), b(bytes), back(bytes);
  for (std::size_t i = 0; i < bytes; ++i) {
    a[i] = static_cast<unsigned char>(i * 7 + 1);
    b[i] = static_cast<unsigned char>(i * 13 + 5);
  }
  tier.write_now(3, a.data(), 0);
  tier.write_now(4, b.data(), 0);
  tier.read_now(3, back.data());
  EXPECT_EQ(back, a);
  // A second write goes to the block's other image; the newest is what a read returns.
  tier.write_now(3, b.data(), 1);
  tier.read_now(3, back.data());
  EXPECT_EQ(back, b);
  std::vector<unsigned char> part(100);
  tier.read_range(4, 5000, part.size(), part.data());
  EXPECT_EQ(0, std::memcmp(part.data(), b.data() + 5000, part.size()));
  EXPECT_NE(std::string(test::error_of([&] { tier.read_now(0, back.data()); }).what()).find("not on the disk tier"),
            std::string::npos);
  const Error e = test::error_of([&] { DiskTier second(*device, tmp.path(), {0}, bytes, 2); });
  EXPECT_EQ(e.kind(), ErrorKind::io);  // as a busy --out: exit 1
  // (this process holds it: another session of it, not another process)
  EXPECT_NE(std::string(e.what()).find("another session of this process"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find(tmp.path().string()), std::string::npos) << e.what();
}

TEST(DiskTier, AResumeKeepsTheNewestWholeImageOfItsOwnRunOnly) {
  test::TempDir tmp;
  auto device = make_device(DeviceOptions{});
  const std::size_t bytes = 6000;
  std::vector<unsigned char> a(bytes, 1), b(bytes, 2), back(bytes);
  {
    DiskTier tier(*device, tmp.path(), {0, 2}, bytes, 1, {}, DiskTierOpen{"run A\n", false});
    EXPECT_FALSE(tier.reused());
    tier.write_now(0, a.data(), 3);
    tier.write_now(0, b.data(), 4);  // block 0: images of steps 3 and 4
    tier.write_now(2, a.data(), 3);  // block 2: one image
    EXPECT_EQ(tier.image_step(0), 4);
  }
  {
    DiskTier tier(*device, tmp.path(), {0, 2}, bytes, 1, {}, DiskTierOpen{"run A\n", true});
    EXPECT_TRUE(tier.reused());
    EXPECT_EQ(tier.image_step(0), 4);
    EXPECT_EQ(tier.image_step(2), 3);
    tier.read_now(0, back.data());
    EXPECT_EQ(back, b);
  }
  // An image past the seed log's end (a log cut short by hand): the previous one is used, and
  // a block with none at or before it is rebuilt.
  {
    DiskTier tier(*device, tmp.path(), {0, 2}, bytes, 1, {}, DiskTierOpen{"run A\n", true, 3});
    EXPECT_EQ(tier.image_step(0), 3);
    tier.read_now(0, back.data());
    EXPECT_EQ(back, a);
  }
  {
    DiskTier tier(*device, tmp.path(), {0, 2}, bytes, 1, {}, DiskTierOpen{"run A\n", true, 2});
    EXPECT_EQ(tier.image_step(0), -1);
    EXPECT_EQ(tier.image_step(2), -1);
  }
  // A torn newest image (a byte of its payload changed): the previous one is used.
  {
    const std::filesystem::path file = tmp / kDiskTierFile;
    BlockFile f = BlockFile::open(file);
    const std::uint64_t at = f.payload_offset(*f.stored_step(1) == 4 ? 1 : 0) + 100;
    std::fstream io(file, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(static_cast<std::streamoff>(at));
    io.put('\x7f');
  }
  {
    DiskTier tier(*device, tmp.path(), {0, 2}, bytes, 1, {}, DiskTierOpen{"run A\n", true});
    EXPECT_EQ(tier.image_step(0), 3);
    tier.read_now(0, back.data());
    EXPECT_EQ(back, a);
  }
  // Another run's identity: the file is written anew, nothing kept.
  DiskTier other(*device, tmp.path(), {0, 2}, bytes, 1, {}, DiskTierOpen{"run B\n", true});
  EXPECT_FALSE(other.reused());
  EXPECT_EQ(other.image_step(0), -1);
}

// Note [Disk tier resume], rule 1: a write-back of an image holding step h waits until the
// seed log is durable through h − 1. The test plays the streams: it waits for the read,
// "uploads" and "offloads" by storing the counters the scheduler's streams would.
TEST(DiskTier, AWriteBackWaitsUntilTheSeedLogIsDurableThatFar) {
  test::TempDir tmp;
  auto device = make_device(DeviceOptions{});
  const std::size_t bytes = 8192;
  DiskTier tier(*device, tmp.path(), {1}, bytes, 2);
  std::vector<unsigned char> a(bytes, 3);
  tier.write_now(1, a.data(), 4);
  tier.set_durable(4);
  const DiskTier::Use u = tier.begin_use(1, /*write_back=*/true, 5);
  auto counter = [](std::uint32_t* p) { return std::atomic_ref<std::uint32_t>(*p); };
  while (counter(tier.read_counter(u.staging)).load() < u.stamp) std::this_thread::yield();
  EXPECT_EQ(u.buffer[0], std::byte{3});
  std::memset(u.buffer, 7, bytes);  // the updated image comes back from the device
  counter(tier.uploaded_counter(u.staging)).store(u.stamp);
  counter(tier.offloaded_counter(u.staging)).store(u.stamp);
  auto drained = std::async(std::launch::async, [&] { tier.drain(); });
  EXPECT_EQ(drained.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout)
      << "the image of step 5 was written before the log was durable through step 4";
  EXPECT_EQ(tier.image_step(1), 4);
  tier.set_durable(5);
  drained.get();
  EXPECT_EQ(tier.image_step(1), 5);
  std::vector<unsigned char> back(bytes);
  tier.read_now(1, back.data());
  EXPECT_EQ(back, std::vector<unsigned char>(bytes, 7));
}

TEST(DiskTierPlan, TheStreamedBlocksBeyondHostMemMoveToDiskSpreadEvenly) {
  const ModelConfig c = test::small_opt(12);
  PlanRequest r;
  r.cap = std::size_t{1} << 30;
  r.batch = 2;
  r.seq = 8;
  r.mode = OffloadMode::all;
  r.window = 2;
  r.disk_staging = 2;
  const Placement all_ram = plan_placement(c, r);
  EXPECT_EQ(all_ram.disk_blocks, 0);
  const std::size_t image = all_ram.block_bytes;
  const std::size_t globals = all_ram.host_bytes - 12 * image;
  // Room for the globals, the two staging buffers and 5 RAM blocks: 7 blocks go to disk.
  r.host_mem = globals + 7 * image;
  const Placement p = plan_placement(c, r);
  EXPECT_EQ(p.disk_blocks, 7);
  EXPECT_EQ(p.disk_staging, 2);
  EXPECT_EQ(std::count(p.on_disk.begin(), p.on_disk.end(), true), 7);
  EXPECT_EQ(p.host_bytes, globals + 7 * image);
  EXPECT_EQ(p.disk_read_bytes_per_step, 7 * image);
  EXPECT_EQ(p.disk_write_bytes_per_step, 7 * image);
  // Evenly: no three disk blocks in a row among 12 with 7 on disk.
  for (std::size_t i = 0; i + 2 < p.on_disk.size(); ++i)
    EXPECT_FALSE(p.on_disk[i] && p.on_disk[i + 1] && p.on_disk[i + 2]) << "at " << i;
  const std::string text = p.describe(c);
  EXPECT_NE(text.find("7 from disk"), std::string::npos) << text;
  EXPECT_NE(text.find("disk-bound step time"), std::string::npos) << text;
  // --disk-lag 4 divides the writes, and the link's traffic down with them: a disk block comes
  // back only when its image is written (pass 62); the RAM blocks every step.
  EXPECT_EQ(p.d2h_bytes_per_step, 12 * image);
  r.disk_lag = 4;
  const Placement lag4 = plan_placement(c, r);
  EXPECT_EQ(lag4.disk_write_bytes_per_step, 7 * image / 4);
  EXPECT_EQ(lag4.d2h_bytes_per_step, 5 * image + 7 * image / 4);
  EXPECT_EQ(lag4.h2d_bytes_per_step, p.h2d_bytes_per_step);
  // Below the globals and the staging buffers nothing can work: the error says what is needed.
  r.host_mem = globals + image;
  const Error e = test::error_of([&] { plan_placement(c, r); });
  EXPECT_EQ(e.kind(), ErrorKind::out_of_memory);
  EXPECT_NE(std::string(e.what()).find("--host-mem"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("2 staging buffers"), std::string::npos) << e.what();
}

constexpr int kBatch = 2, kSeq = 8;

struct DiskRun {
  std::vector<StepResult> steps;
  std::vector<unsigned char> weights;  // globals, then every block image
  float eval_loss = 0;
  DiskTierStats io;                    // every read and write after loading
};

class DiskTierSessions : public ::testing::Test {
 protected:
  void SetUp() override {
    config = test::small_opt(12);
    test::write_random_checkpoint(tmp / "model", config, 21);
  }
  // All streamed through two slots; with `disk`, host memory for the globals and the two
  // staging buffers plus `ram_blocks` blocks, the rest on disk.
  SessionConfig session(DType storage, bool disk, int ram_blocks, int lag, const RuleConfig& rule = {}) const {
    SessionConfig s;
    s.rule = rule;  // before the plan below: a rule's state makes the images larger
    s.offload = OffloadMode::all;
    s.window = 2;
    s.max_batch = kBatch;
    s.max_seq = kSeq;
    s.run_seed = 7;
    s.threads = 1;
    s.storage = storage;
    if (disk) {
      SessionConfig probe = s;
      const Placement p = plan_placement(config, plan_request(config, probe, DeviceKind::cpu, std::size_t{1} << 30));
      const std::size_t globals = p.host_bytes - static_cast<std::size_t>(config.num_layers) * p.block_bytes;
      s.host_mem = globals + static_cast<std::size_t>(2 + ram_blocks) * p.block_bytes;
      s.disk_staging = 2;
      s.disk_dir = tmp / fmt::format("disk-{}-{}-{}", dtype_name(storage), ram_blocks, lag);
      s.disk_lag = lag;
    }
    return s;
  }
  static std::vector<unsigned char> weights_of(Session& s) {
    s.sync();
    BlockStore& st = s.store();
    std::vector<unsigned char> w;
    auto add = [&](const void* p, std::size_t bytes) {
      const auto* b = static_cast<const unsigned char*>(p);
      w.insert(w.end(), b, b + bytes);
    };
    add(st.globals_image(), st.globals_bytes());
    std::vector<unsigned char> tmp(st.stream_bytes());
    for (std::int64_t i = 0; i < st.num_blocks(); ++i) {
      if (st.on_disk(i)) {
        st.disk()->read_now(i, tmp.data());
        add(tmp.data(), st.block_bytes());
      } else {
        add(st.block_image(i), st.block_bytes());
      }
    }
    return w;
  }
  // `steps` steps read a step behind, an eval after step `eval_after`, the weights at the end.
  DiskRun run(SessionConfig cfg, int steps, int eval_after = -1) {
    Session s(tmp / "model", cfg);
    if (cfg.host_mem > 0) {
      EXPECT_NE(s.store().disk(), nullptr);
      if (s.store().disk()) s.store().disk()->take_stats();  // forget the load's writes
    }
    const auto data = test::patterned_batches(s.config(), 3, kBatch, kSeq, 2, 5, 11);
    DiskRun r;
    std::int64_t prev = -1;
    for (int t = 0; t < steps; ++t) {
      const std::int64_t id = s.step_async(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, 0.01f);
      if (prev >= 0) r.steps.push_back(s.wait(prev));
      prev = id;
      if (t == eval_after) {
        r.steps.push_back(s.wait(prev));
        prev = -1;
        r.eval_loss = s.eval(data[0]);
      }
    }
    if (prev >= 0) r.steps.push_back(s.wait(prev));
    s.sync();  // the final flush's I/O counts; weights_of's own reads below do not
    for (const StepResult& x : r.steps) {
      r.io.read_bytes += x.disk_read_bytes;
      r.io.write_bytes += x.disk_write_bytes;
    }
    if (DiskTier* d = s.store().disk()) {
      const DiskTierStats rest = d->take_stats();
      r.io.read_bytes += rest.read_bytes;
      r.io.write_bytes += rest.write_bytes;
    }
    r.weights = weights_of(s);
    return r;
  }
  // The safetensors files (names and bytes) of a save as `dtype` after `steps` steps.
  std::string saved_after(const SessionConfig& cfg, const std::string& name, int steps, DType dtype,
                          std::uint64_t shard) {
    Session s(tmp / "model", cfg);
    const auto data = test::patterned_batches(s.config(), 3, kBatch, kSeq, 2, 5, 11);
    for (int t = 0; t < steps; ++t) s.step(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, 0.01f);
    if (cfg.host_mem > 0) {
      bool any = false;
      for (std::int64_t i = 0; i < s.store().num_blocks(); ++i) any = any || s.store().on_disk(i);
      EXPECT_TRUE(any) << "no block on disk";
    }
    s.save(tmp / name, dtype, shard);
    std::string all;
    for (const auto& f : std::filesystem::directory_iterator(tmp / name / "current")) {
      if (f.path().extension() == ".safetensors") {
        std::ifstream in(f.path(), std::ios::binary);
        all += f.path().filename().string() + std::string(std::istreambuf_iterator<char>(in), {});
      }
    }
    return all;
  }
  static void expect_same(const DiskRun& a, const DiskRun& b, const std::string& what) {
    ASSERT_EQ(a.steps.size(), b.steps.size()) << what;
    for (std::size_t i = 0; i < a.steps.size(); ++i) {
      EXPECT_EQ(a.steps[i].loss_plus, b.steps[i].loss_plus) << what << " step " << i;
      EXPECT_EQ(a.steps[i].loss_minus, b.steps[i].loss_minus) << what << " step " << i;
      EXPECT_EQ(a.steps[i].gs, b.steps[i].gs) << what << " step " << i;
    }
    EXPECT_EQ(a.eval_loss, b.eval_loss) << what;
    ASSERT_EQ(a.weights.size(), b.weights.size()) << what;
    EXPECT_TRUE(a.weights == b.weights) << what << ": the weights differ";
  }
  test::TempDir tmp;
  ModelConfig config;
};

// Both walls at once (README "Below 4 GiB of GPU memory"): blocks on disk streamed to the
// device by weight tiles — several per matrix, each applying the logged updates its lagging
// image lacks as it arrives — train to the all-in-RAM, whole-block bits.
TEST_F(DiskTierSessions, WeightTilesFromDiskImagesGiveTheAllInRamBits) {
  constexpr int kSteps = 7;
  for (const bool adam : {false, true}) {
    RuleConfig rule;
    if (adam) rule.kind = RuleKind::adam;
    SessionConfig ram_cfg = session(DType::f32, false, 0, 1, rule);
    ram_cfg.limits.weight_tile_elems = 300;  // the tiles' GEMM split, whole blocks
    const DiskRun ram = run(ram_cfg, kSteps, 3);
    for (int lag : {1, 3}) {
      SCOPED_TRACE(fmt::format("{}, --disk-lag {}", adam ? "zo-adam" : "zo-sgd", lag));
      SessionConfig cfg = session(DType::f32, true, 4, lag, rule);
      cfg.tile = 1200;  // 300 fp32 elements
      cfg.disk_dir += adam ? "-adam" : "-sgd";
      {
        Session probe(tmp / "model", cfg);
        EXPECT_GT(probe.placement().tile_slots, 0);
        EXPECT_GT(probe.placement().block_tiles, 12);
        EXPECT_EQ(probe.placement().disk_blocks, 8);
      }
      expect_same(run(cfg, kSteps, 3), ram, "tiles from disk vs whole blocks in RAM");
    }
  }
}

// The plan of a disk-tier run counts what the run allocates on the device — the projected
// gradients its lagging images may owe among them: a session capped at the plan's own
// minimum runs, and its peak is the plan's to the byte (adversarial pass 62: they were left
// out, and the run was refused "projected gradients of the lagging disk images" at that cap).
TEST_F(DiskTierSessions, ASessionAtThePlansOwnMinimumCapRunsAndPeaksWhereThePlanSaid) {
  for (int lag : {1, 64}) {
    SCOPED_TRACE(fmt::format("--disk-lag {}", lag));
    SessionConfig cfg = session(DType::f32, true, 1, lag);
    const Placement wide = plan_placement(config, plan_request(config, cfg, DeviceKind::cpu, std::size_t{1} << 30));
    ASSERT_GT(wide.disk_blocks, 0);
    cfg.gpu_mem = wide.minimum_cap;
    cfg.disk_dir += "-capped";
    Session s(tmp / "model", cfg);
    ASSERT_NE(s.store().disk(), nullptr);
    EXPECT_EQ(s.placement().total_bytes, wide.minimum_cap);
    const auto data = test::patterned_batches(s.config(), 2, kBatch, kSeq, 2, 5, 11);
    for (int t = 0; t < 3; ++t) (void)s.wait(s.step_async(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, 0.f));
    EXPECT_EQ(s.device_peak(), s.placement().total_bytes);
  }
}

TEST_F(DiskTierSessions, AModelSixTimesHostMemTrainsThroughDiskWithTheAllInRamBits) {
  constexpr int kSteps = 9;
  const DiskRun ram = run(session(DType::f32, false, 0, 1), kSteps, 4);
  for (int lag : {1, 4}) {
    SCOPED_TRACE(fmt::format("--disk-lag {}", lag));
    // Every block on disk: the host holds the globals and two staging buffers.
    SessionConfig cfg = session(DType::f32, true, 0, lag);
    {
      Session probe(tmp / "model", cfg);
      const BlockStore& st = probe.store();
      const std::size_t model = st.globals_bytes() + static_cast<std::size_t>(st.num_blocks()) * st.block_bytes();
      EXPECT_GE(model, 5 * cfg.host_mem) << "the model is not several times --host-mem";
      EXPECT_LE(st.host_bytes(), cfg.host_mem + 4096 * 4);
      EXPECT_EQ(st.disk()->blocks().size(), 12u);
    }
    const DiskRun disk = run(cfg, kSteps, 4);
    expect_same(disk, ram, fmt::format("all on disk, lag {}", lag));
    const DiskRun mixed = run(session(DType::f32, true, 5, lag), kSteps, 4);
    expect_same(mixed, ram, fmt::format("7 on disk and 5 in RAM, lag {}", lag));
  }
}

// The same on a GPU: the staging buffers registered with CUDA, the upload stream waiting on
// the read counters with cuStreamWaitValue32 and the offload stream writing its counters
// with cuStreamWriteValue32 (Note [Disk tier pipeline]); fp32 and bf16 storage.
TEST_F(DiskTierSessions, CudaThroughTheDiskEqualsRamBitForBit) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (DType storage : {DType::f32, DType::bf16}) {
    SessionConfig ram = session(storage, false, 0, 1);
    ram.device = "cuda";
    const DiskRun want = run(ram, 7, 3);
    for (int lag : {1, 3}) {
      SessionConfig disk = session(storage, true, 2, lag);
      disk.device = "cuda";
      expect_same(run(disk, 7, 3), want, fmt::format("cuda, {}, lag {}", dtype_name(storage), lag));
    }
  }
}

TEST_F(DiskTierSessions, LagKWritesKFoldLessAndReadsTheSame) {
  constexpr int kSteps = 9;
  const DiskRun k1 = run(session(DType::f32, true, 0, 1), kSteps);
  const DiskRun k4 = run(session(DType::f32, true, 0, 4), kSteps);
  expect_same(k4, k1, "lag 4 against lag 1");
  Session probe(tmp / "model", session(DType::f32, true, 0, 1));
  const std::size_t image = probe.store().stream_bytes();
  // Steps 1..8 apply a pending update (step 0 has none), and the final sync flushes step 8's:
  // lag 1 writes 12 blocks 9 times; lag 4 at steps 4 and 8 and at the flush.
  EXPECT_EQ(k1.io.write_bytes, 9 * 12 * image);
  EXPECT_EQ(k4.io.write_bytes, 3 * 12 * image);
  // Every step reads every block once, and the flush once more.
  EXPECT_EQ(k1.io.read_bytes, 10 * 12 * image);
  EXPECT_EQ(k4.io.read_bytes, k1.io.read_bytes);
}

TEST_F(DiskTierSessions, Bf16StorageAndTwoDirectionsGiveTheBitsOfLagOneAndOfRam) {
  constexpr int kSteps = 7;
  // Stochastic rounding draws from each update's own seed: applying an update late on a
  // disk block gives the bits it got on time in RAM.
  const DiskRun ram = run(session(DType::bf16, false, 0, 1), kSteps, 3);
  expect_same(run(session(DType::bf16, true, 3, 3), kSteps, 3), ram, "bf16, lag 3");
  // Two directions: two passes a step, the second reading images that still lag.
  SessionConfig two_ram = session(DType::f32, false, 0, 1);
  two_ram.rule.directions = 2;
  SessionConfig two_disk = session(DType::f32, true, 2, 4);
  two_disk.rule.directions = 2;
  expect_same(run(two_disk, kSteps, 3), run(two_ram, kSteps, 3), "two directions, lag 4");
}

TEST_F(DiskTierSessions, AFullDiskStopsTheRunWithAClearErrorAndTheLastCheckpointIntact) {
  SessionConfig cfg = session(DType::f32, true, 0, 1);
  // The load writes the 12 blocks; the 5th write-back of training finds the disk full.
  cfg.disk_file.test_fail_write_at = 12 + 4 + 12;
  const auto out = tmp / "run";
  std::vector<unsigned char> saved;
  std::string error;
  {
    Session s(tmp / "model", cfg);
    const auto data = test::patterned_batches(s.config(), 3, kBatch, kSeq, 2, 5, 11);
    try {
      for (int t = 0; t < 12; ++t) {
        s.step(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, 0.01f);
        if (t == 0) {
          s.save(out, DType::f32, std::uint64_t{1} << 30);
          saved = weights_of(s);
        }
      }
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::io);
      error = e.what();
    }
  }
  EXPECT_NE(error.find("the disk is full"), std::string::npos) << error;
  EXPECT_NE(error.find(kDiskTierFile), std::string::npos) << error;
  // The run directory still holds the checkpoint of step 1, whole.
  const OpenedCheckpoint ck = open_checkpoint(out, /*verify_checksums=*/true);
  EXPECT_EQ(ck.step, 1);
  SessionConfig plain = session(DType::f32, false, 0, 1);
  Session reopened(out, plain);
  EXPECT_TRUE(weights_of(reopened) == saved);
}

TEST_F(DiskTierSessions, ASavedCheckpointReadsTheDiskBlocksAndEqualsTheRamRunsFile) {
  const std::string ram = saved_after(session(DType::f32, false, 0, 1), "ram", 5, DType::bf16, 20000);
  // (converted and sharded: every tensor goes through a fill)
  const std::string disk = saved_after(session(DType::f32, true, 4, 4), "disk", 5, DType::bf16, 20000);
  EXPECT_FALSE(ram.empty());
  EXPECT_TRUE(ram == disk) << "the checkpoints differ";
}

// A save asks for each tensor in pieces of at most 32 MiB (models/safetensors.h): a disk
// block's fp8 matrices saved as fp32 — 34.6 MB each, their piece boundaries inside rows —
// are read and converted piece by piece (the piece's elements, its rows' scales) to the bytes
// of the all-in-RAM run's save.
TEST_F(DiskTierSessions, ASaveOfDiskBlocksInPiecesEqualsTheRamRunsFile) {
  config.hidden_size = config.word_embed_proj_dim = 36;
  config.head_dim = 9;
  config.ffn_dim = 240000;  // fc1 [240000, 36], fc2 [36, 240000]: 8.64M elements each
  config.num_layers = 3;
  std::filesystem::remove_all(tmp / "model");
  test::write_random_checkpoint(tmp / "model", config, 21);
  const std::string ram = saved_after(session(DType::f8_e4m3, false, 0, 1), "ram", 2, DType::f32, std::uint64_t{1} << 40);
  const std::string disk = saved_after(session(DType::f8_e4m3, true, 0, 1), "disk", 2, DType::f32, std::uint64_t{1} << 40);
  EXPECT_GT(ram.size(), std::size_t{100} << 20);
  EXPECT_TRUE(ram == disk) << "the checkpoints differ";
}

// Note [Disk tier resume]: a run whose process ends without a save (after its last
// checkpoint at step 2, five more steps at --disk-lag 3: the images hold steps 2..7, the log
// runs to 7) resumes from the checkpoint, the kept images and the log to the exact weights
// of the uninterrupted run, and goes on from step 7.
TEST_F(DiskTierSessions, AKilledRunResumesFromTheBlockFileAndTheSeedLogPastItsCheckpoint) {
  const auto data = test::patterned_batches(config, 3, kBatch, kSeq, 2, 5, 11);
  auto train = [&](Session& s, int from, int to) {
    for (int t = from; t < to; ++t) s.step(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, 0.01f);
  };
  RuleConfig adam;
  adam.kind = RuleKind::adam;
  struct Case {
    bool tear;
    RuleConfig rule;
  };
  for (const Case& c : {Case{false, RuleConfig{}}, Case{true, RuleConfig{}}, Case{false, adam}}) {
    SCOPED_TRACE(fmt::format("{}, {}", c.tear ? "the newest image of a block torn" : "every image whole",
                             rule_name(c.rule.kind)));
    const bool tear = c.tear;
    // The uninterrupted run, in RAM.
    std::vector<unsigned char> want;
    {
      Session s(tmp / "model", session(DType::f32, false, 0, 1, c.rule));
      train(s, 0, 10);
      want = weights_of(s);
    }
    const auto out = tmp / fmt::format("run-{}-{}", tear, rule_name(c.rule.kind));
    SessionConfig cfg = session(DType::f32, true, 2, 3, c.rule);
    cfg.disk_dir = tmp / fmt::format("blocks-{}-{}", tear, rule_name(c.rule.kind));
    cfg.seed_log = out / kRunSeedLog;
    std::filesystem::create_directories(out);
    {
      Session s(tmp / "model", cfg);
      train(s, 0, 2);
      s.save(out, DType::f32, std::uint64_t{1} << 30);
      train(s, 2, 7);
      // Killed here: no save. The images are where the lag left them.
      std::int64_t ahead = 0;
      for (std::int64_t b : s.store().disk()->blocks()) ahead += s.store().disk()->image_step(b) > 2;
      EXPECT_GT(ahead, 0) << "no image moved past the checkpoint";
    }
    if (tear) {
      // A write torn by the kill: the last image written of some block is damaged.
      BlockFile f = BlockFile::open(cfg.disk_dir / kDiskTierFile);
      std::size_t newest = 0;
      std::uint64_t best = 0;
      for (std::size_t k = 0; k < f.count(); ++k)
        if (auto st = f.stored_step(k); st && *st >= best) best = *st, newest = k;
      std::fstream io(cfg.disk_dir / kDiskTierFile, std::ios::in | std::ios::out | std::ios::binary);
      io.seekp(static_cast<std::streamoff>(f.payload_offset(newest) + 64));
      io.put('\x55');
    }
    const OpenedCheckpoint ck = open_checkpoint(out, true);
    ASSERT_EQ(ck.step, 2);
    const SeedLog log = SeedLog::read(out / kRunSeedLog);
    ASSERT_EQ(log.next_step(), 7);
    SessionConfig resume = cfg;
    resume.disk_resume = true;
    resume.seed_log_append = true;
    resume.resume_state = c.rule.state_buffers() > 0;
    for (const SeedLogEntry& e : log.entries)
      if (e.step >= 2) resume.replay.push_back(e);
    resume.first_step = 7;
    Session s(ck.dir, resume);
    EXPECT_TRUE(s.store().disk()->reused());
    EXPECT_EQ(s.next_step(), 7);
    // The kept images skipped the updates they held: fewer writes than the 5 replayed
    // updates of 10 disk blocks (plus their rewrite at load) would take.
    EXPECT_LT(s.store().disk()->take_stats().writes, 5 * 10);
    train(s, 7, 10);
    EXPECT_TRUE(weights_of(s) == want) << "the resumed run differs from the uninterrupted one";
    EXPECT_EQ(SeedLog::read(out / kRunSeedLog).next_step(), 10);
  }
}

// With a seed log, a write-back waits for the log line before it (Note [Disk tier resume]);
// zo-sgd-cons reads its losses inside step_async, and a host may enqueue steps ahead of its
// waits: neither may stall the pipeline (10 disk blocks through 2 staging buffers, so a
// step's later reads wait for its own write-backs). Each run must end, with RAM's bits.
TEST_F(DiskTierSessions, TheSeedLogOrderingNeverStallsAStepThatWaitsInsideOrRunsAhead) {
  const auto data = test::patterned_batches(config, 3, kBatch, kSeq, 2, 5, 11);
  RuleConfig cons;
  cons.kind = RuleKind::cons;
  for (const RuleConfig& rule : {cons, RuleConfig{}}) {
    SCOPED_TRACE(rule_name(rule.kind));
    const float wd = rule.kind == RuleKind::cons ? 0.0f : 0.01f;
    std::vector<unsigned char> want;
    {
      Session s(tmp / "model", session(DType::f32, false, 0, 1, rule));
      for (int t = 0; t < 6; ++t) s.step(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, wd);
      want = weights_of(s);
    }
    SessionConfig cfg = session(DType::f32, true, 2, 1, rule);
    cfg.disk_dir = tmp / fmt::format("blocks-{}", rule_name(rule.kind));
    cfg.seed_log = tmp / fmt::format("seeds-{}.jsonl", rule_name(rule.kind));
    auto result = std::async(std::launch::async, [&] {
      Session s(tmp / "model", cfg);
      // Three steps enqueued before the first wait, then waits in order.
      std::vector<std::int64_t> ids;
      for (int t = 0; t < 6; ++t) {
        ids.push_back(s.step_async(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, wd));
        if (t >= 2) s.wait(ids[static_cast<std::size_t>(t - 2)]);
      }
      s.wait(ids[4]);
      s.wait(ids[5]);
      return weights_of(s);
    });
    if (result.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
      // The stalled thread cannot be joined: end the test binary with the failure.
      std::fprintf(stderr, "%s: the run stalled (a disk write-back waiting for a log line never written)\n",
                   rule_name(rule.kind).data());
      std::_Exit(1);
    }
    EXPECT_TRUE(result.get() == want);
  }
}

TEST_F(DiskTierSessions, OptionsTheTierCannotServeAreRefusedByName) {
  SessionConfig no_dir = session(DType::f32, true, 0, 1);
  no_dir.disk_dir.clear();
  Error e = test::error_of([&] { Session s(tmp / "model", no_dir); });
  EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
  EXPECT_NE(std::string(e.what()).find("--disk-dir"), std::string::npos) << e.what();
}

// zo-adam's two state buffers live in each image after the weights and stream with their
// block (Note [Update rules]): through the disk tier too, with lagging images re-applying
// each update's state step; saved state is read from the disk blocks, and a resume with
// --resume-state writes it into them.
TEST_F(DiskTierSessions, OptimizerStateStreamsThroughTheDiskSavesAndResumes) {
  const auto data = test::patterned_batches(config, 3, kBatch, kSeq, 2, 5, 11);
  RuleConfig rule;
  rule.kind = RuleKind::adam;
  rule.state_dtype = DType::bf16;
  auto adam = [&](bool disk, int ram_blocks, int lag) { return session(DType::f32, disk, ram_blocks, lag, rule); };
  auto train = [&](Session& s, int from, int to) {
    for (int t = from; t < to; ++t) s.step(data[static_cast<std::size_t>(t) % data.size()], 1e-3f, 1e-3f, 0.01f);
  };
  auto file = [](const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  std::vector<unsigned char> want;
  {
    Session s(tmp / "model", adam(false, 0, 1));
    train(s, 0, 3);
    s.save(tmp / "ram3", DType::f32, std::uint64_t{1} << 30);
    train(s, 3, 6);
    s.save(tmp / "ram6", DType::f32, std::uint64_t{1} << 30);
    want = weights_of(s);
  }
  {
    SessionConfig c = adam(true, 2, 3);
    Session s(tmp / "model", c);
    EXPECT_GT(s.store().stream_bytes(), s.store().block_bytes());  // the images carry the state
    train(s, 0, 3);
    s.save(tmp / "disk3", DType::f32, std::uint64_t{1} << 30);
    train(s, 3, 6);
    s.save(tmp / "disk6", DType::f32, std::uint64_t{1} << 30);
    EXPECT_TRUE(weights_of(s) == want) << "zo-adam through the disk tier differs from RAM";
  }
  for (const char* step : {"3", "6"})
    EXPECT_TRUE(file(tmp / (std::string("disk") + step) / "current" / kOptimizerStateFile) ==
                file(tmp / (std::string("ram") + step) / "current" / kOptimizerStateFile))
        << "the optimizer state saved at step " << step << " differs";
  // Resume from the step-3 checkpoint with its state, through a fresh block file.
  SessionConfig c = adam(true, 2, 3);
  c.disk_dir = tmp / "disk-resumed";
  c.resume_state = true;
  c.first_step = 3;
  Session s(resolve_model_dir(tmp / "disk3"), c);
  train(s, 3, 6);
  EXPECT_TRUE(weights_of(s) == want) << "the resumed zo-adam run differs";
}

}  // namespace
}  // namespace zo2
