// Writing files so that a reader never sees half of one: write a temp file in the same
// directory, sync, rename over the target, sync the directory. Note [Temp files].
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>

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

class AtomicFile {
 public:
  // Creates the temp file; throws Error(invalid_argument) when target has no file name,
  // Error(io) naming the target and its directory when the temp cannot be created.
  explicit AtomicFile(const std::filesystem::path& target);
  ~AtomicFile();  // an uncommitted temp is removed
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  // Sizes the file (blocks reserved, so a full disk is an error here rather than a SIGBUS
  // while writing) and maps it writable. size > 0; at most once.
  std::span<std::byte> map(std::uint64_t size);
  // Appends bytes with write(2) (for a file not mapped).
  void write(std::string_view bytes);
  // Syncs, renames over the target, syncs the directory, then removes the temp files of
  // this target's killed writers. Throws Error(io) naming the target.
  void commit();

  const std::filesystem::path& temp_path() const { return tmp_; }

 private:
  [[noreturn]] void io_fail(const char* op, int e);

  std::filesystem::path target_, tmp_;
  int fd_ = -1;
  void* map_ = nullptr;
  std::uint64_t size_ = 0;
  bool committed_ = false;
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
