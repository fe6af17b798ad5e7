// The disk tier's block file (offload/disk_file.h, Note [Block file format]): images come
// back as written with the step they hold, reads and writes interleave through io_uring —
// and through the worker threads that replace it where a container refuses io_uring (Note
// [Disk I/O without io_uring]): the tests that move bytes run on both — a torn or corrupt
// image is named by its block, misaligned buffers are refused, a full disk stops a write
// with a message that names the file and says so, and a sync is ordered after the writes
// before it.
#include "offload/disk_file.h"
#include "runtime/cpu/cpu_device.h"
#include "runtime/log.h"
#include "runtime/thread.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

constexpr std::size_t kBlock = 10000;  // not a multiple of 4096: the padding is exercised

// The two queues under a block file: every test that moves bytes runs on each.
constexpr DiskIo kQueues[] = {DiskIo::io_uring, DiskIo::threads};
BlockFileOptions on(DiskIo io) {
  BlockFileOptions o;
  o.io = io;
  return o;
}

// The bytes image `index` holds in `round`.
void fill(std::span<std::byte> buf, std::size_t index, int round) {
  std::mt19937 rng(static_cast<unsigned>(index * 1000 + static_cast<std::size_t>(round)));
  for (std::size_t k = 0; k < kBlock; ++k) buf[k] = static_cast<std::byte>(rng());
}

bool holds(std::span<const std::byte> buf, std::size_t index, int round) {
  std::vector<std::byte> want(kBlock);
  fill(want, index, round);
  return std::memcmp(buf.data(), want.data(), kBlock) == 0;
}

std::span<std::byte> span_of(HostBuffer& b) { return {b.as<std::byte>(), b.bytes()}; }

// Overwrites `n` bytes at `offset` of a file (a torn or corrupted image).
void poke(const fs::path& file, std::uint64_t offset, const std::vector<char>& bytes) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f);
}
std::vector<char> peek(const fs::path& file, std::uint64_t offset, std::size_t n) {
  std::ifstream f(file, std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  std::vector<char> out(n);
  f.read(out.data(), static_cast<std::streamsize>(n));
  return out;
}

// Where image i begins, and its payload (Note [Block file format]).
std::uint64_t image_offset(const BlockFile& f, std::size_t i) { return 4096 + i * (4096 + f.padded_bytes()); }
std::uint64_t payload_offset(const BlockFile& f, std::size_t i) { return image_offset(f, i) + 4096; }

void round_trip(BlockFileOptions o) {
  test::TempDir dir;
  const std::size_t n = 24;
  o.queue_depth = 4;  // fewer than the requests a round keeps open: submits wait for room
  BlockFile f = BlockFile::create(dir / "blocks.img", n, kBlock, o);
  EXPECT_EQ(f.io(), o.io);
  EXPECT_TRUE(f.direct()) << "ext4 or tmpfs should take O_DIRECT";
  EXPECT_EQ(f.padded_bytes(), 12288u);
  std::vector<HostBuffer> wbuf, rbuf;
  for (std::size_t i = 0; i < n; ++i) {
    wbuf.push_back(host_alloc_disk_aligned(kBlock));
    rbuf.push_back(host_alloc_disk_aligned(kBlock));
  }
  // Round r writes every block with step 100·r + i; from round 1 on, the read of block i
  // (last round's image) is in flight while the writes of the blocks after it go out.
  std::uint64_t next_tag = 1;
  for (int round = 0; round < 3; ++round) {
    std::map<std::uint64_t, std::pair<BlockOp, std::size_t>> open;
    std::set<std::uint64_t> polled;
    for (std::size_t i = 0; i < n; ++i) {
      fill(span_of(wbuf[i]), i, round);
      if (round > 0) {
        f.submit_read(i, span_of(rbuf[i]), next_tag);
        open[next_tag++] = {BlockOp::read, i};
      }
      // the write of block i − 1: its read was submitted earlier and must be waited first
      if (i > 0) {
        if (round > 0) {
          for (auto it = open.begin(); it != open.end();)
            if (it->second == std::pair{BlockOp::read, i - 1}) {
              const BlockCompletion c = f.wait(it->first);
              EXPECT_EQ(c.op, BlockOp::read);
              EXPECT_EQ(c.index, i - 1);
              EXPECT_EQ(c.step, 100u * static_cast<unsigned>(round - 1) + (i - 1));
              EXPECT_TRUE(holds(span_of(rbuf[i - 1]), i - 1, round - 1)) << "block " << i - 1;
              it = open.erase(it);
            } else {
              ++it;
            }
        }
        f.submit_write(i - 1, span_of(wbuf[i - 1]), 100u * static_cast<unsigned>(round) + (i - 1), next_tag);
        open[next_tag++] = {BlockOp::write, i - 1};
      }
      for (std::uint64_t t : f.poll()) polled.insert(t);
    }
    for (auto& [tag, what] : open) {
      if (what.first != BlockOp::read) continue;
      const BlockCompletion c = f.wait(tag);
      EXPECT_EQ(c.step, 100u * static_cast<unsigned>(round - 1) + what.second);
      EXPECT_TRUE(holds(span_of(rbuf[what.second]), what.second, round - 1));
    }
    f.submit_write(n - 1, span_of(wbuf[n - 1]), 100u * static_cast<unsigned>(round) + (n - 1), next_tag);
    open[next_tag++] = {BlockOp::write, n - 1};
    for (auto& [tag, what] : open) {
      if (what.first != BlockOp::write) continue;
      const BlockCompletion c = f.wait(tag);
      EXPECT_EQ(c.op, BlockOp::write);
      EXPECT_EQ(c.index, what.second);
    }
    EXPECT_EQ(f.in_flight(), 0u);
    EXPECT_TRUE(f.poll().empty()) << "waited requests are not reported again";
  }
  f.sync();
  // Reopened: every image holds round 2's bytes and step.
  BlockFile g = BlockFile::open(dir / "blocks.img", on(o.io));
  EXPECT_EQ(g.count(), n);
  EXPECT_EQ(g.block_bytes(), kBlock);
  for (std::size_t i = 0; i < n; ++i) g.submit_read(i, span_of(rbuf[i]), 1000 + i);
  for (std::size_t i = n; i-- > 0;) {
    EXPECT_EQ(g.wait(1000 + i).step, 200 + i);
    EXPECT_TRUE(holds(span_of(rbuf[i]), i, 2)) << "block " << i;
    EXPECT_EQ(g.stored_step(i), std::optional<std::uint64_t>(200 + i));
  }
}

TEST(DiskFile, ImagesRoundTripThroughInterleavedAsyncReadsAndWrites) {
  for (DiskIo io : kQueues) {
    SCOPED_TRACE(disk_io_name(io));
    round_trip(on(io));
  }
}

// Every request handed to the kernel in pieces (header alone, then the payload in parts;
// or the header with part of the payload, then the rest): short transfers are resubmitted
// from where they stopped, across the header/payload boundary.
TEST(DiskFile, ShortTransfersAreResubmittedUntilTheImageIsWhole) {
  for (DiskIo io : kQueues)
    for (std::size_t cap : {std::size_t{4096}, std::size_t{12288}}) {
      SCOPED_TRACE(fmt::format("{}, {}", disk_io_name(io), cap));
      BlockFileOptions o = on(io);
      o.test_max_request = cap;
      round_trip(o);
    }
}

TEST(DiskFile, PollReportsEachFinishedRequestOnce) {
  for (DiskIo io : kQueues) {
  SCOPED_TRACE(disk_io_name(io));
  test::TempDir dir;
  BlockFile f = BlockFile::create(dir / "blocks.img", 8, kBlock, on(io));
  std::vector<HostBuffer> buf;
  for (std::size_t i = 0; i < 8; ++i) {
    buf.push_back(host_alloc_disk_aligned(kBlock));
    fill(span_of(buf[i]), i, 0);
    f.submit_write(i, span_of(buf[i]), i, 50 + i);
  }
  std::multiset<std::uint64_t> seen;
  while (seen.size() < 8)
    for (std::uint64_t t : f.poll()) seen.insert(t);
  for (std::uint64_t t = 50; t < 58; ++t) EXPECT_EQ(seen.count(t), 1u) << t;
  EXPECT_EQ(f.in_flight(), 0u);
  for (std::uint64_t t = 50; t < 58; ++t) EXPECT_EQ(f.wait(t).index, t - 50);
  }
}

// Note [Block file format]: a sync reaches the kernel only after the writes before it.
TEST(DiskFile, SyncFinishesAfterEveryWriteSubmittedBeforeIt) {
  for (DiskIo io : kQueues) {
  SCOPED_TRACE(disk_io_name(io));
  test::TempDir dir;
  BlockFileOptions o = on(io);
  o.queue_depth = 2;
  BlockFile f = BlockFile::create(dir / "blocks.img", 6, kBlock, o);
  std::vector<HostBuffer> buf;
  for (std::size_t i = 0; i < 6; ++i) {
    buf.push_back(host_alloc_disk_aligned(kBlock));
    f.submit_write(i, span_of(buf[i]), 7, i);
  }
  f.submit_sync(99);
  std::vector<std::uint64_t> order;
  while (order.size() < 7)
    for (std::uint64_t t : f.poll()) order.push_back(t);
  EXPECT_EQ(order.back(), 99u);
  EXPECT_EQ(f.wait(99).op, BlockOp::sync);
  // Nothing in flight: a sync starts at once.
  f.submit_sync(100);
  EXPECT_EQ(f.wait(100).op, BlockOp::sync);
  }
}

TEST(DiskFile, TornOrCorruptImageIsNamedByItsIndex) {
  test::TempDir dir;
  const fs::path path = dir / "blocks.img";
  HostBuffer buf = host_alloc_disk_aligned(kBlock);
  std::uint64_t payload1 = 0, header2 = 0, payload4 = 0;
  std::vector<char> old_payload4;
  {
    BlockFile f = BlockFile::create(path, 5, kBlock);
    for (std::size_t i = 0; i < 5; ++i) {
      if (i == 3) continue;  // never written
      fill(span_of(buf), i, 0);
      f.submit_write(i, span_of(buf), 10 + i, i);
      f.wait(i);
    }
    f.sync();
    payload1 = payload_offset(f, 1);
    header2 = image_offset(f, 2);
    payload4 = payload_offset(f, 4);
    // A write of block 4 that tore after its header: the new header (step 20) over the
    // old payload.
    old_payload4 = peek(path, payload4, f.padded_bytes());
    fill(span_of(buf), 4, 1);
    f.submit_write(4, span_of(buf), 20, 7);
    f.wait(7);
  }
  poke(path, payload4, old_payload4);
  poke(path, payload1 + 1234, {'\x5a', '\x5a', '\x5a'});  // flipped bytes inside block 1
  poke(path, header2 + 20, {'\x01'});                     // a byte of block 2's header (its step)

  BlockFile f = BlockFile::open(path);
  auto read_error = [&](std::size_t i) {
    return test::error_of([&] {
      f.submit_read(i, span_of(buf), 500 + i);
      f.wait(500 + i);
    });
  };
  f.submit_read(0, span_of(buf), 1);
  EXPECT_EQ(f.wait(1).step, 10u);
  EXPECT_TRUE(holds(span_of(buf), 0, 0));

  const Error e1 = read_error(1);
  EXPECT_EQ(e1.kind(), ErrorKind::format);
  EXPECT_NE(std::string(e1.what()).find(path.string() + ": image 1 at offset " + std::to_string(image_offset(f, 1))),
            std::string::npos)
      << e1.what();
  EXPECT_NE(std::string(e1.what()).find("CRC-32"), std::string::npos) << e1.what();
  EXPECT_NE(std::string(e1.what()).find("torn or corrupt"), std::string::npos) << e1.what();

  const Error e2 = read_error(2);
  EXPECT_EQ(e2.kind(), ErrorKind::format);
  EXPECT_NE(std::string(e2.what()).find("image 2"), std::string::npos) << e2.what();
  EXPECT_NE(std::string(e2.what()).find("header is corrupt"), std::string::npos) << e2.what();
  EXPECT_EQ(f.stored_step(2), std::nullopt);

  const Error e3 = read_error(3);
  EXPECT_NE(std::string(e3.what()).find("image 3"), std::string::npos) << e3.what();
  EXPECT_NE(std::string(e3.what()).find("never written"), std::string::npos) << e3.what();
  EXPECT_EQ(f.stored_step(3), std::nullopt);

  const Error e4 = read_error(4);
  EXPECT_NE(std::string(e4.what()).find("image 4"), std::string::npos) << e4.what();
  EXPECT_NE(std::string(e4.what()).find("(step 20)"), std::string::npos) << e4.what();
  EXPECT_NE(std::string(e4.what()).find("CRC-32"), std::string::npos) << e4.what();
  EXPECT_EQ(f.stored_step(4), std::optional<std::uint64_t>(20)) << "the header alone cannot tell a torn payload";
  EXPECT_EQ(f.in_flight(), 0u);
}

TEST(DiskFile, MisalignedOrShortBuffersAreRefused) {
  test::TempDir dir;
  BlockFile f = BlockFile::create(dir / "blocks.img", 2, kBlock);
  HostBuffer big = host_alloc_disk_aligned(kBlock + 8192);
  const std::span<std::byte> off(big.as<std::byte>() + 256, f.padded_bytes());
  for (const Error& e : {test::error_of([&] { f.submit_write(0, off, 1, 1); }),
                         test::error_of([&] { f.submit_read(0, off, 2); })}) {
    EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("not aligned to 4096 bytes"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("O_DIRECT"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("image 0"), std::string::npos) << e.what();
  }
  const Error shorter = test::error_of([&] { f.submit_read(1, std::span(big.as<std::byte>(), kBlock), 3); });
  EXPECT_NE(std::string(shorter.what()).find("less than the 12288"), std::string::npos) << shorter.what();
  const Error range = test::error_of([&] { f.submit_read(2, span_of(big), 4); });
  EXPECT_NE(std::string(range.what()).find("image 2 is out of range"), std::string::npos) << range.what();
  EXPECT_EQ(f.in_flight(), 0u);
  // A tag in use, and a write of a block being read, are refused too.
  f.submit_read(0, span_of(big), 5);
  HostBuffer other = host_alloc_disk_aligned(kBlock);
  EXPECT_NE(std::string(test::error_of([&] { f.submit_read(1, span_of(other), 5); }).what()).find("tag 5"),
            std::string::npos);
  EXPECT_NE(std::string(test::error_of([&] { f.submit_write(0, span_of(other), 1, 6); }).what()).find("in flight"),
            std::string::npos);
  EXPECT_EQ(test::error_of([&] { f.wait(5); }).kind(), ErrorKind::format);  // never written
}

TEST(DiskFile, FullDiskStopsTheWriteNamingTheFileAndTheBlock) {
  for (DiskIo io : kQueues) {
  SCOPED_TRACE(disk_io_name(io));
  test::TempDir dir;
  const fs::path path = dir / "blocks.img";
  BlockFileOptions o = on(io);
  o.test_fail_write_at = 2;  // the third write completes with ENOSPC
  BlockFile f = BlockFile::create(path, 4, kBlock, o);
  HostBuffer buf = host_alloc_disk_aligned(kBlock);
  for (std::size_t i = 0; i < 4; ++i) f.submit_write(i, span_of(buf), 3, i);
  f.submit_sync(10);
  EXPECT_EQ(f.wait(0).index, 0u);
  EXPECT_EQ(f.wait(1).index, 1u);
  const Error e = test::error_of([&] { f.wait(2); });
  EXPECT_EQ(e.kind(), ErrorKind::io);
  const std::string m = e.what();
  EXPECT_NE(m.find(path.string() + ": writing block 2"), std::string::npos) << m;
  EXPECT_NE(m.find("at offset " + std::to_string(image_offset(f, 2))), std::string::npos) << m;
  EXPECT_NE(m.find("No space left on device"), std::string::npos) << m;
  EXPECT_NE(m.find("the disk is full"), std::string::npos) << m;
  EXPECT_EQ(f.wait(3).index, 3u);
  // The sync after it fails too, naming it: nothing it covered may be taken as durable.
  const Error s = test::error_of([&] { f.wait(10); });
  EXPECT_NE(std::string(s.what()).find("not synced"), std::string::npos) << s.what();
  EXPECT_NE(std::string(s.what()).find("writing block 2"), std::string::npos) << s.what();
  // The file goes on: the next write and sync succeed.
  f.submit_write(2, span_of(buf), 4, 11);
  f.wait(11);
  f.sync();
  EXPECT_EQ(f.stored_step(2), std::optional<std::uint64_t>(4));
  }
}

// A real ENOSPC from the kernel: tmpfs refuses a reservation beyond its size at once
// (without allocating anything), so a file far larger than /dev/shm fails at create.
TEST(DiskFile, FileLargerThanTheDiskIsRefusedAtCreate) {
  struct statfs sf {};
  struct statvfs sv {};
  if (::statfs("/dev/shm", &sf) != 0 || sf.f_type != 0x01021994 || ::statvfs("/dev/shm", &sv) != 0 ||
      sv.f_blocks == 0)
    GTEST_SKIP() << "no size-limited tmpfs at /dev/shm";
  const double size = static_cast<double>(sv.f_blocks) * static_cast<double>(sv.f_frsize);
  const std::size_t block = std::size_t{1} << 30;
  const std::size_t count = static_cast<std::size_t>(4 * size / static_cast<double>(block)) + 1;
  const fs::path path = fmt::format("/dev/shm/zo2-disk-test-{}.img", ::getpid());
  const Error e = test::error_of([&] { BlockFile::create(path, count, block); });
  EXPECT_EQ(e.kind(), ErrorKind::io);
  const std::string m = e.what();
  EXPECT_NE(m.find(path.string()), std::string::npos) << m;
  EXPECT_NE(m.find("No space left on device — the disk is full"), std::string::npos) << m;
  EXPECT_NE(m.find("free there"), std::string::npos) << m;
  EXPECT_FALSE(fs::exists(path)) << "a failed create leaves no file behind";
}

TEST(DiskFile, ReadErrorNamesTheBlockAndOffset) {
  for (DiskIo io : kQueues) {
  SCOPED_TRACE(disk_io_name(io));
  test::TempDir dir;
  BlockFileOptions o = on(io);
  o.test_fail_read_at = 1;
  BlockFile f = BlockFile::create(dir / "blocks.img", 2, kBlock, o);
  HostBuffer buf = host_alloc_disk_aligned(kBlock);
  f.submit_write(1, span_of(buf), 5, 1);
  f.wait(1);
  f.submit_read(1, span_of(buf), 2);
  EXPECT_EQ(f.wait(2).step, 5u);
  f.submit_read(1, span_of(buf), 3);
  const Error e = test::error_of([&] { f.wait(3); });
  EXPECT_EQ(e.kind(), ErrorKind::io);
  EXPECT_NE(std::string(e.what()).find("reading block 1"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("Input/output error"), std::string::npos) << e.what();
  }
}

TEST(DiskFile, FallsBackToBufferedIoWithANoteWhereODirectIsRefused) {
  test::TempDir dir;
  std::vector<std::string> notes;
  std::mutex mu;
  log_set_sink([&](LogLevel, std::string_view m) {
    std::lock_guard lock(mu);
    notes.emplace_back(m);
  });
  BlockFileOptions o;
  o.test_refuse_direct = true;
  BlockFile f = BlockFile::create(dir / "blocks.img", 3, kBlock, o);
  log_set_sink({});
  EXPECT_FALSE(f.direct());
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("refuses O_DIRECT"), std::string::npos) << notes[0];
  HostBuffer w = host_alloc_disk_aligned(kBlock), r = host_alloc_disk_aligned(kBlock);
  fill(span_of(w), 2, 0);
  f.submit_write(2, span_of(w), 9, 1);
  f.wait(1);
  f.submit_read(2, span_of(r), 2);
  EXPECT_EQ(f.wait(2).step, 9u);
  EXPECT_TRUE(holds(span_of(r), 2, 0));
}

TEST(DiskFile, OpenRefusesWhatIsNotABlockFile) {
  test::TempDir dir;
  const fs::path junk = dir / "junk.img";
  std::ofstream(junk) << std::string(8192, 'x');
  const Error e = test::error_of([&] { BlockFile::open(junk); });
  EXPECT_EQ(e.kind(), ErrorKind::format);
  EXPECT_NE(std::string(e.what()).find("not a zo2 block file"), std::string::npos) << e.what();
  const fs::path cut = dir / "cut.img";
  { BlockFile::create(cut, 4, kBlock); }
  fs::resize_file(cut, 4096 + 2 * (4096 + 12288));
  const Error t = test::error_of([&] { BlockFile::open(cut); });
  EXPECT_NE(std::string(t.what()).find("truncated"), std::string::npos) << t.what();
}

TEST(DiskFile, ProbeMeasuresWriteReadAndBothAtOnce) {
  for (DiskIo io : kQueues) {
  SCOPED_TRACE(disk_io_name(io));
  test::TempDir dir;
  const DiskRates r = probe_disk(dir.path(), std::size_t{8} << 20, std::size_t{1} << 20, 4, io);
  EXPECT_EQ(r.io, io);
  EXPECT_EQ(r.bytes, std::size_t{8} << 20);
  EXPECT_EQ(r.queue_depth, 4u);
  EXPECT_GT(r.write_gb_s, 0);
  EXPECT_GT(r.read_gb_s, 0);
  EXPECT_GT(r.both_write_gb_s, 0);
  EXPECT_GT(r.both_read_gb_s, 0);
  EXPECT_FALSE(r.filesystem.empty());
  EXPECT_TRUE(fs::is_empty(dir.path())) << "the probe removes its file";
  EXPECT_EQ(test::error_of([&] { probe_disk(dir.path(), 1 << 20, 1000, 4); }).kind(), ErrorKind::invalid_argument);
  }
}

// Note [Disk I/O without io_uring]: where the kernel refuses io_uring_setup — as Docker's
// and containerd's seccomp profiles do (EPERM), or a kernel without it (ENOSYS) — the block
// file and the probe run on threads, with one warning that says why; asked for io_uring by
// name, they say why not. In a child under a seccomp filter, as in such a container.
TEST(DiskFile, WhereIoUringIsRefusedTheBlockFileAndTheProbeRunOnThreads) {
  for (const auto& [err, text] : {std::pair{EPERM, "Operation not permitted"}, std::pair{ENOSYS, "Function not implemented"}}) {
    SCOPED_TRACE(text);
    test::TempDir dir;
    const int rc = test::in_child([&, err = err, text = text] {
      if (!test::deny_syscalls({{__NR_io_uring_setup, err}})) return 77;
      std::vector<std::string> warnings;
      log_set_sink([&](LogLevel level, std::string_view m) {
        if (level == LogLevel::warn) warnings.emplace_back(m);
      });
      BlockFileOptions o;  // automatic
      o.queue_depth = 4;
      {
        BlockFile f = BlockFile::create(dir / "blocks.img", 6, kBlock, o);
        if (f.io() != DiskIo::threads) return 10;
        HostBuffer w = host_alloc_disk_aligned(kBlock), r = host_alloc_disk_aligned(kBlock);
        for (std::size_t i = 0; i < 6; ++i) {
          fill(span_of(w), i, 1);
          f.submit_write(i, span_of(w), 40 + i, i);
          f.wait(i);
        }
        f.sync();
        BlockFile g = BlockFile::open(dir / "blocks.img", o);
        for (std::size_t i = 0; i < 6; ++i) {
          g.submit_read(i, span_of(r), 100 + i);
          if (g.wait(100 + i).step != 40 + i || !holds(span_of(r), i, 1)) return 11;
        }
      }
      const DiskRates p = probe_disk(dir.path() / "", std::size_t{2} << 20, std::size_t{1} << 20, 2);
      if (p.io != DiskIo::threads || p.read_gb_s <= 0) return 12;
      // One warning for the process, naming the cause.
      if (warnings.size() != 1) return 13;
      if (warnings[0].find(text) == std::string::npos || warnings[0].find("threads instead") == std::string::npos ||
          warnings[0].find("seccomp") == std::string::npos)
        return 14;
      // Asked for by name, io_uring is an error that says why.
      o.io = DiskIo::io_uring;
      const Error e = test::error_of([&] { BlockFile::open(dir / "blocks.img", o); });
      if (e.kind() != ErrorKind::io || std::string(e.what()).find("cannot set up io_uring") == std::string::npos)
        return 15;
      return 0;
    });
    if (rc == 77) GTEST_SKIP() << "no seccomp filters here";
    EXPECT_EQ(rc, 0);
  }
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// Note [Thread limits] (runtime/thread.h): where the system refuses a thread (a pids limit,
// ulimit -u) zo2's own threads — the CPU backend's streams, the disk I/O workers — fail with
// an error naming the thread and the limits, not a bare "Resource temporarily unavailable",
// and a pool cut short by a refusal ends the threads it started (no std::terminate). In a
// child whose clone3 fails with EAGAIN, as pthread_create's does under a full pids limit.
TEST(Threads, ARefusedThreadIsAnErrorThatNamesItAndTheLimits) {
  test::TempDir dir;
  const int rc = test::in_child([&] {
    if (!test::deny_syscalls({{__NR_clone3, EAGAIN}})) return 77;
    const auto says = [](const Error& e, std::string_view what) {
      const std::string m = e.what();
      return e.kind() == ErrorKind::out_of_memory && m.find(what) != std::string::npos &&
             m.find("Resource temporarily unavailable") != std::string::npos && m.find("pids.max") != std::string::npos;
    };
    if (!says(test::error_of([&] { (void)IoQueue::open(DiskIo::threads, 4, dir / "f"); }), "a disk I/O worker thread"))
      return 10;
    // (The stream itself: a whole CPU device would first call OpenBLAS, whose own pool
    // raises SIGINT when it cannot start a thread.)
    if (!says(test::error_of([&] { cpu::CpuStream s("compute", 0, 0); }), "the CPU backend's stream 'compute'"))
      return 11;
    return 0;
  });
  if (rc == 77) GTEST_SKIP() << "no seccomp filters here";
  EXPECT_EQ(rc, 0);
}

// oneTBB's own refused worker (std::runtime_error "pthread_create has failed: …", out of the
// parallel_for that wanted it) gets the same words where zo2-tune and the C API report it.
TEST(Threads, TbbsRefusedWorkerIsReportedAsAThreadLimit) {
  const std::optional<std::string> m =
      refused_thread_message(std::runtime_error("pthread_create has failed: Resource temporarily unavailable"));
  ASSERT_TRUE(m.has_value());
  EXPECT_NE(m->find("cannot start a TBB worker thread (Resource temporarily unavailable): the process runs "),
            std::string::npos)
      << *m;
  EXPECT_NE(m->find("ulimit -u; a container's or job's pids limit, pids.max"), std::string::npos) << *m;
  EXPECT_FALSE(refused_thread_message(std::runtime_error("something else")).has_value());
  EXPECT_FALSE(refused_thread_message(std::logic_error("pthread_create has failed: no")).has_value());
  EXPECT_FALSE(
      refused_thread_message(std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again)))
          .has_value());
}

}  // namespace
}  // namespace zo2
