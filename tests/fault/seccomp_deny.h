/* Refusing system calls as a container or a file system without the feature refuses them,
 * for this process and its children (a seccomp filter under no_new_privs: no privilege
 * needed). Shared by tests/fault/deny_syscalls.c (the command the scripts run zo2-tune
 * under) and the C++ tests (test::deny_syscalls). C and C++. */
#ifndef ZO2_TESTS_SECCOMP_DENY_H
#define ZO2_TESTS_SECCOMP_DENY_H

#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_clone3
#define __NR_clone3 435
#endif

#if defined(__x86_64__)
#define ZO2_SECCOMP_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ZO2_SECCOMP_ARCH AUDIT_ARCH_AARCH64
#endif

/* Makes each of the n calls nrs[i] fail with errnos[i] from now on. Returns 0, or -1 with
 * errno set where this kernel or architecture has no seccomp filters (callers skip). */
static inline int zo2_deny_syscalls(const long* nrs, const int* errnos, int n) {
#ifndef ZO2_SECCOMP_ARCH
  (void)nrs;
  (void)errnos;
  (void)n;
  errno = ENOSYS;
  return -1;
#else
  struct sock_filter prog[4 + 2 * 16 + 1];
  unsigned k = 0;
  if (n < 0 || n > 16) {
    errno = EINVAL;
    return -1;
  }
  /* Another architecture's calls (x32, 32-bit compat) pass: the numbers below are this one's. */
  prog[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
  prog[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ZO2_SECCOMP_ARCH, 1, 0);
  prog[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  prog[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
  for (int i = 0; i < n; ++i) {
    prog[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nrs[i], 0, 1);
    prog[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((unsigned)errnos[i] & SECCOMP_RET_DATA));
  }
  prog[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  struct sock_fprog fprog;
  fprog.len = (unsigned short)k;
  fprog.filter = prog;
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
  return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog) != 0 ? -1 : 0;
#endif
}

#endif
