// Writing files so that a reader never sees half of one: write a temp file in the same
// directory, sync, rename over the target, sync the directory. Note [Temp files].
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

struct statvfs;

namespace zo2 {

// Note [Temp files]
// A temp file is ".<name>.tmp.<pid>-<host>.<n>.<random>" beside its target (the rename
// stays in one filesystem): <pid> and <host> (8 hex digits of a hash of the host name) say
// who writes it, <n> and <random> keep two writers of one process, or of two processes,
// apart (O_EXCL). A <name> near NAME_MAX is cut at a UTF-8 character's start so the whole
// fits. A writer killed before its rename (kill -9, a power cut) leaves its temp file: the
// next successful write of the same target removes those whose writer is gone — a pid of
// this host that no longer runs — and never a live writer's, nor one of another host
// sharing the directory (whose pids mean nothing here). Names without the "-<host>" part
// come from zo2 0.2.0 and older and count as this host's.

// Note [Writes, not mappings]
// A file is written with pwrite(2) from the caller's memory, never through a shared mapping.
// On FUSE (sshfs, s3fs, rclone, gcsfuse) a write the daemon fails after the bytes reached a
// mapping is not reported to msync or fsync: a checkpoint save reported success with its
// weights zeroed from the failed write on, and the manifest's CRC-32, computed by reading
// the file back, approved them (adversarial pass 67). pwrite returns the error at once. A
// FUSE mount with direct_io refuses shared writable mappings altogether (ENODEV): nothing
// could be saved there. And the writer computes each piece's CRC-32 from memory as it
// writes it: written() is the CRC-32 of the bytes zo2 meant the file to hold, which a run
// directory's manifest records (api/run_dir.cpp), so a file the file system damaged later
// is caught by the next loader that checks it.

// What a committed AtomicFile wrote: its size and the CRC-32 of its bytes, from memory.
struct WrittenFile {
  std::uint64_t bytes = 0;
  std::uint32_t crc32 = 0;
};

class AtomicFile {
 public:
  // Creates the temp file; throws Error(invalid_argument) when target has no file name,
  // Error(io) naming the target and its directory when the temp cannot be created.
  explicit AtomicFile(const std::filesystem::path& target);
  ~AtomicFile();  // an uncommitted temp is removed
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  // Reserves the file's blocks (fallocate), so that a full disk is an error before gigabytes
  // are written. A file system without fallocate skips it. Optional.
  void reserve(std::uint64_t size);
  // Writes `bytes` at `offset` with pwrite(2) (Note [Writes, not mappings]); several threads
  // may write disjoint ranges at once. A write error (EIO, ENOSPC, EFBIG) is Error(io) naming
  // the target, here and now.
  void write_at(std::span<const std::byte> bytes, std::uint64_t offset);
  // Appends bytes after those of the previous write() calls.
  void write(std::string_view bytes);
  // Syncs, checks that the file holds as many bytes as were written, renames over the
  // target, syncs the directory, then removes the temp files of this target's killed
  // writers. Throws Error(io) naming the target.
  void commit();
  // After commit: the size and CRC-32 of what was written, when the writes covered the file
  // from byte 0 with neither hole nor overlap; nullopt otherwise or before commit.
  std::optional<WrittenFile> written() const { return written_; }

  const std::filesystem::path& temp_path() const { return tmp_; }

 private:
  [[noreturn]] void io_fail(const char* op, int e);

  struct Piece {
    std::uint64_t offset, bytes;
    std::uint32_t crc32;
  };
  std::filesystem::path target_, tmp_;
  int fd_ = -1;
  std::mutex pieces_mu_;
  std::vector<Piece> pieces_;  // what write_at wrote, for written()
  std::uint64_t append_at_ = 0;  // write()'s next offset
  std::optional<WrittenFile> written_;
  bool committed_ = false;
};

// Records, while it lives, what each AtomicFile this process commits into `dir` wrote
// (AtomicFile::written), by file name: a run directory's save takes the CRC-32s of its
// checkpoint's files from here (Note [Writes, not mappings]).
class WrittenFileLog {
 public:
  explicit WrittenFileLog(const std::filesystem::path& dir);
  ~WrittenFileLog();
  WrittenFileLog(const WrittenFileLog&) = delete;
  WrittenFileLog& operator=(const WrittenFileLog&) = delete;
  std::optional<WrittenFile> find(const std::string& name) const;

  // Called by AtomicFile::commit.
  static void record(const std::filesystem::path& target, const WrittenFile& w);

 private:
  std::uint64_t dev_ = 0, ino_ = 0;  // the directory's identity (-1, -1: it could not be stat'ed)
  bool valid_ = false;
  std::map<std::string, WrittenFile> files_;  // guarded by the log's global mutex
};

// Note [The standard descriptors]
//   A host (a daemon) may run with descriptor 0, 1 or 2 closed. The next file opened takes
//   the lowest free number: a seed log opened as descriptor 2 received zo2's own warnings,
//   which then found the log "changed by another program" and refused every later step and
//   save (adversarial pass 65). Before zo2 opens a file it keeps (a seed log, a lock, a
//   checkpoint's files, a session's), any of the three that is closed is opened on
//   /dev/null, as OpenSSH's sanitise_stdfd does: what was written there was lost anyway.
void keep_standard_fds_open() noexcept;

// Opens (O_CREAT when `flags` has it) a file zo2 keeps in a directory it writes — a lock file,
// a block file — as the plain file of that name, never through a symbolic link planted there
// (O_NOFOLLOW: a link named zo2.lock would have zo2 empty the file it points at and write its
// pid into it; adversarial pass 52), and refuses anything but a regular file. Returns the
// descriptor (O_CLOEXEC); throws Error(io) naming the path and what is there.
int open_own_file(const std::filesystem::path& path, int flags, unsigned mode = 0666);

// Note [File systems without locks]
// zo2 refuses a second writer with flock(2) locks: of a run directory (zo2.lock), a seed
// log, a disk tier's directory, a JSON log, and the shared locks readers hold on a step
// directory (Note [Readers of a live run]). Some file systems refuse locks altogether:
// Lustre mounted without -o flock answers ENOSYS, NFS without a lock daemon ENOLCK, some
// FUSE and network file systems EOPNOTSUPP or EINVAL. Failing there would keep zo2 off the
// cluster file systems its users train on (adversarial pass 61: before, `train` stopped at
// "zo2.lock: cannot lock: Function not implemented"). So a refused lock is a warning, once
// per file system, naming the file and what is then not guarded, and the work goes on
// unlocked, as HDF5's "ignore disabled file locks" does. Only EWOULDBLOCK — another open
// file holds the lock — is a conflict. Within one process, the run directory's registry
// still refuses a second writer there.
enum class FileLock { held, busy, unsupported };
// flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB). `path` and `guards` (what the lock
// would have refused, e.g. "a second writer of this run directory") go into the warning.
FileLock try_lock_file(int fd, bool exclusive, const std::filesystem::path& path, std::string_view guards);

// Reads dst.size() bytes at `offset` of the open file `fd` (pread, EINTR retried, in pieces
// the kernel takes). Returns the bytes read: fewer when the file ends first (another program
// truncated it, say), which the caller turns into its own error. A read error is an
// Error(io) naming `path`. Reading rather than mapping is what keeps a file truncated under a
// reader an error instead of the SIGBUS a mapping raises (Note [No mapped reads]).
std::size_t pread_full(int fd, std::span<std::byte> dst, std::uint64_t offset, const std::string& path);

// A new, empty directory named as a temp file of `target` (Note [Temp files]) beside it: a
// scratch that the next remove_abandoned_temps(target) removes, whole, once its writer is
// gone (a kill -9 in between). The caller removes it when done. Throws Error(io).
std::filesystem::path make_temp_dir(const std::filesystem::path& target);

// Note [Room for a save]
// ~~~~~~~~~~~~~~~~~~~~~~
// A checkpoint is refused before its first byte when the file system it goes to cannot hold
// it: a 175B run whose --out had too little room learned it at its first save, hours in,
// from an ENOSPC mid-write. The free space is statvfs's f_bavail × f_frsize, what an
// unprivileged writer may still use (f_bfree counts root's reserve too). Two answers are no
// answer, and never a refusal: statvfs failing (ENOSYS, EACCES, a vanished mount), and a
// file system reporting no blocks at all (f_blocks == 0: some FUSE backends, object-store
// mounts among them, and some network file systems fill every field with 0) — free_bytes()
// says nullopt there, and the write itself reports a full disk as before.
// What needs room is one new checkpoint: the previous one stays until the new one is
// published (Note [Run directory] in api/run_dir.h), and it is on the disk already, so free
// space counts it. The callers: publish_checkpoint before each save (every save: train's,
// replay's, zo2_session_save's and Python's), Session::check_save_room (train before its
// first step, replay before its updates), init and merge before they write, and
// write_safetensors_sharded for any other writer. Sizes: checkpoint_file_bytes
// (models/layout.h), Session::save_room (api/session.h), bounds a little above what is
// written (a bound below would let a save start that cannot finish). No flag overrides the
// refusal: a run saves at least once (at its end), and a save that does not fit fails on
// ENOSPC anyway, only later; space is freed before the run, not promised for during it.

// The bytes an unprivileged writer may still put on the file system holding `path` (its
// nearest existing ancestor when `path` is not there yet), or nullopt when that cannot be
// known (Note [Room for a save]).
std::optional<std::uint64_t> free_bytes(const std::filesystem::path& path);

// For tests of Note [Room for a save]: free_bytes asks `statvfs` (0, or -1 with errno set)
// instead of statvfs(3). Empty: statvfs(3).
void set_statvfs_for_testing(std::function<int(const char* path, struct statvfs* st)> statvfs);

// Error(io) when the file system holding `path` has fewer than `bytes` free (Note [Room for a
// save]): "<path>: not enough free space for <what>: it needs N, but the file system there
// has M free<ways_out>". Nothing when free_bytes(path) is nullopt.
void require_free_space(const std::filesystem::path& path, std::uint64_t bytes, std::string_view what,
                        std::string_view ways_out);

// Throws Error(io) naming the path; on failure the old file (if any) is untouched.
void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

// When `name` (a directory entry's file name) is the temp file of a writer that is gone,
// the file name it was writing (cut as the temp name cut it); else nullopt.
std::optional<std::string> abandoned_temp_target(std::string_view name);

// Removes, from target's directory, the temp files (and make_temp_dir directories) of
// target's writers that are gone.
// Best effort: failures are logged at debug level.
void remove_abandoned_temps(const std::filesystem::path& target) noexcept;

}  // namespace zo2
