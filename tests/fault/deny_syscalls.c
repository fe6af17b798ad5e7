// deny_syscalls: runs a command with some system calls refused by the kernel, as a container's
// seccomp profile or a file system without the feature refuses them:
//
//   deny_syscalls io_uring_setup=EPERM flock=ENOSYS -- zo2-tune train ...
//
// Docker's and containerd's default seccomp profiles refuse io_uring_setup with EPERM, and so
// does kernel.io_uring_disabled; Lustre mounted without -o flock answers flock(2) with ENOSYS,
// NFS without a lock daemon with ENOLCK. The filter is inherited by every child. Exit 77 (a
// skipped test) where the kernel or the architecture has no seccomp filters.
#define _GNU_SOURCE
#include "seccomp_deny.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

struct named {
  const char* name;
  long value;
};

static const struct named calls[] = {
    {"io_uring_setup", __NR_io_uring_setup},
    {"flock", __NR_flock},
    {"fallocate", __NR_fallocate},
#ifdef __NR_symlink
    {"symlink", __NR_symlink},
#endif
    {"symlinkat", __NR_symlinkat},
    {"clone3", __NR_clone3},
};
static const struct named errnos[] = {{"EPERM", EPERM},   {"ENOSYS", ENOSYS},         {"ENOLCK", ENOLCK},
                                      {"EINVAL", EINVAL}, {"EOPNOTSUPP", EOPNOTSUPP}, {"ENOMEM", ENOMEM},
                                      {"EAGAIN", EAGAIN}};

static long lookup(const struct named* t, size_t n, const char* s, size_t len) {
  for (size_t i = 0; i < n; ++i)
    if (strlen(t[i].name) == len && strncmp(t[i].name, s, len) == 0) return t[i].value;
  return -1;
}

int main(int argc, char** argv) {
  long nrs[16];
  int errs[16];
  int n = 0, i = 1;
  for (; i < argc && strcmp(argv[i], "--") != 0; ++i) {
    const char* eq = strchr(argv[i], '=');
    const long nr = eq ? lookup(calls, sizeof calls / sizeof *calls, argv[i], (size_t)(eq - argv[i])) : -1;
    const long err = eq ? lookup(errnos, sizeof errnos / sizeof *errnos, eq + 1, strlen(eq + 1)) : -1;
    if (nr < 0 || err < 0 || n == 16) {
      fprintf(stderr, "deny_syscalls: '%s' is not CALL=ERRNO with a call and an errno this tool knows\n", argv[i]);
      return 2;
    }
    nrs[n] = nr;
    errs[n++] = (int)err;
  }
  if (i + 1 >= argc) {
    fprintf(stderr, "usage: deny_syscalls CALL=ERRNO... -- COMMAND [ARG...]\n");
    return 2;
  }
  if (zo2_deny_syscalls(nrs, errs, n) != 0) {
    fprintf(stderr, "deny_syscalls: cannot install a seccomp filter: %s\n", strerror(errno));
    return 77;
  }
  execvp(argv[i + 1], argv + i + 1);
  fprintf(stderr, "deny_syscalls: %s: %s\n", argv[i + 1], strerror(errno));
  return 127;
}
