// An LD_PRELOAD shim that makes a file system look small, empty of numbers or broken to
// statvfs, for the free-space tests (tests/fault/room.sh, Note [Room for a save] in
// runtime/file_util.h). A statvfs (statvfs64, fstatvfs, fstatvfs64) of a path containing
// ZO2_STATVFS_MATCH — as given, or after realpath — answers, by ZO2_STATVFS_MODE:
//   "free" (the default)  the real answer with ZO2_STATVFS_FREE bytes available (f_bavail ×
//                         f_frsize; f_bfree the same, f_blocks more)
//   "zero"                every field 0, as some FUSE and network file systems answer
//   "fail"                -1 with errno ENOSYS
// With ZO2_STATVFS_WHEN set, only while that path exists (a run's step directory: the saves
// after it see the small file system). Anything else goes to libc.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

static int matches_path(const char* path) {
  const char* m = getenv("ZO2_STATVFS_MATCH");
  if (!m || !*m || !path) return 0;
  const char* when = getenv("ZO2_STATVFS_WHEN");
  struct stat st;
  if (when && *when && stat(when, &st) != 0) return 0;
  if (strstr(path, m)) return 1;
  char resolved[PATH_MAX];
  return realpath(path, resolved) && strstr(resolved, m);
}

static int matches_fd(int fd) {
  char link[64], path[PATH_MAX];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, path, sizeof path - 1);
  if (n <= 0) return 0;
  path[n] = '\0';
  return matches_path(path);
}

static const char* mode(void) {
  const char* m = getenv("ZO2_STATVFS_MODE");
  return m && *m ? m : "free";
}

// Rewrites a real answer as the mode says. The two structs have the same fields.
#define FAKE(st)                                                          \
  do {                                                                    \
    if (strcmp(mode(), "zero") == 0) {                                    \
      memset((st), 0, sizeof *(st));                                      \
    } else {                                                              \
      const char* f = getenv("ZO2_STATVFS_FREE");                         \
      const unsigned long long bytes = f ? strtoull(f, NULL, 10) : 0;     \
      (st)->f_frsize = 4096;                                              \
      (st)->f_bsize = 4096;                                               \
      (st)->f_bavail = bytes / 4096;                                      \
      (st)->f_bfree = bytes / 4096;                                       \
      (st)->f_blocks = bytes / 4096 + 1000000;                            \
    }                                                                     \
  } while (0)

#define FAILS() (strcmp(mode(), "fail") == 0 ? (errno = ENOSYS, 1) : 0)

typedef int (*statvfs_fn)(const char*, struct statvfs*);
typedef int (*statvfs64_fn)(const char*, struct statvfs64*);
typedef int (*fstatvfs_fn)(int, struct statvfs*);
typedef int (*fstatvfs64_fn)(int, struct statvfs64*);
#define REAL(name) static name##_fn real_##name; if (!real_##name) real_##name = (name##_fn)dlsym(RTLD_NEXT, #name)

int statvfs(const char* path, struct statvfs* st) {
  REAL(statvfs);
  if (!matches_path(path)) return real_statvfs(path, st);
  if (FAILS()) return -1;
  const int r = real_statvfs(path, st);
  if (r == 0) FAKE(st);
  return r;
}

int statvfs64(const char* path, struct statvfs64* st) {
  REAL(statvfs64);
  if (!matches_path(path)) return real_statvfs64(path, st);
  if (FAILS()) return -1;
  const int r = real_statvfs64(path, st);
  if (r == 0) FAKE(st);
  return r;
}

int fstatvfs(int fd, struct statvfs* st) {
  REAL(fstatvfs);
  if (!matches_fd(fd)) return real_fstatvfs(fd, st);
  if (FAILS()) return -1;
  const int r = real_fstatvfs(fd, st);
  if (r == 0) FAKE(st);
  return r;
}

int fstatvfs64(int fd, struct statvfs64* st) {
  REAL(fstatvfs64);
  if (!matches_fd(fd)) return real_fstatvfs64(fd, st);
  if (FAILS()) return -1;
  const int r = real_fstatvfs64(fd, st);
  if (r == 0) FAKE(st);
  return r;
}
