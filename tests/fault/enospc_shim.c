// An LD_PRELOAD shim that makes the disk "full" for chosen files, for the fault-injection
// tests (tests/fault/enospc.sh): writes to a file whose path contains ZO2_ENOSPC_MATCH
// succeed for ZO2_ENOSPC_AFTER bytes in total (default 0), then fail with ENOSPC — a write
// straddling the limit is cut short first, as a real full disk does — and posix_fallocate /
// fallocate on such a file spend the budget too (a writer through mmap fills what it
// reserved) and fail with ENOSPC past it.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static long long g_budget = -1;

static int matches(int fd) {
  const char* m = getenv("ZO2_ENOSPC_MATCH");
  if (!m || !*m) return 0;
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, path, sizeof path - 1);
  if (n <= 0) return 0;
  path[n] = '\0';
  if (!strstr(path, m)) return 0;
  if (g_budget < 0) {
    const char* a = getenv("ZO2_ENOSPC_AFTER");
    g_budget = a ? atoll(a) : 0;
  }
  return 1;
}

// How many of n bytes may go out; 0 means "fail with ENOSPC".
static size_t allow(size_t n) {
  if ((long long)n <= g_budget) {
    g_budget -= (long long)n;
    return n;
  }
  const size_t part = (size_t)g_budget;
  g_budget = 0;
  return part;
}

typedef ssize_t (*write_fn)(int, const void*, size_t);
typedef ssize_t (*pwrite_fn)(int, const void*, size_t, off_t);
typedef ssize_t (*writev_fn)(int, const struct iovec*, int);
typedef int (*posix_fallocate_fn)(int, off_t, off_t);
typedef int (*fallocate_fn)(int, int, off_t, off_t);
#define REAL(name) static name##_fn real_##name; if (!real_##name) real_##name = (name##_fn)dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void* buf, size_t n) {
  REAL(write);
  if (n > 0 && matches(fd)) {
    const size_t ok = allow(n);
    if (ok == 0) {
      errno = ENOSPC;
      return -1;
    }
    return real_write(fd, buf, ok);
  }
  return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
  REAL(pwrite);
  if (n > 0 && matches(fd)) {
    const size_t ok = allow(n);
    if (ok == 0) {
      errno = ENOSPC;
      return -1;
    }
    return real_pwrite(fd, buf, ok, off);
  }
  return real_pwrite(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec* iov, int cnt) {
  REAL(writev);
  if (matches(fd)) {
    size_t total = 0;
    for (int i = 0; i < cnt; ++i) total += iov[i].iov_len;
    if (total > 0 && (long long)total > g_budget) {
      // Spend what is left on the first buffers, then report the disk full.
      if (g_budget > 0 && cnt > 0) return write(fd, iov[0].iov_base, iov[0].iov_len);
      errno = ENOSPC;
      return -1;
    }
    g_budget -= (long long)total;
  }
  return real_writev(fd, iov, cnt);
}

int posix_fallocate(int fd, off_t off, off_t len) {
  REAL(posix_fallocate);
  if (matches(fd)) {
    if ((long long)len > g_budget) return ENOSPC;
    g_budget -= (long long)len;  // the bytes a writer through mmap is about to fill
  }
  return real_posix_fallocate(fd, off, len);
}

int posix_fallocate64(int fd, off_t off, off_t len) { return posix_fallocate(fd, off, len); }

int fallocate(int fd, int mode, off_t off, off_t len) {
  REAL(fallocate);
  if (matches(fd)) {
    if ((long long)len > g_budget) {
      errno = ENOSPC;
      return -1;
    }
    g_budget -= (long long)len;
  }
  return real_fallocate(fd, mode, off, len);
}
