/* include/zo2.h in the oldest dialects it promises (C99 here; C++98 in header_dialects.cpp),
   included twice, built with -pedantic -Werror by tests/CMakeLists.txt: a build failure is
   this test failing. The version macros must exist and be integers the preprocessor reads. */
#include "zo2.h"
#include "zo2.h"

#if !defined(ZO2_VERSION_MAJOR) || !defined(ZO2_VERSION_MINOR) || !defined(ZO2_VERSION_PATCH)
#error "zo2.h defines no ZO2_VERSION_MAJOR/MINOR/PATCH"
#endif
#if ZO2_VERSION_MAJOR < 0 || ZO2_VERSION_MINOR < 0 || ZO2_VERSION_PATCH < 0
#error "ZO2_VERSION_* must be whole numbers"
#endif

#ifndef ZO2_DIALECT_CHECK
#define ZO2_DIALECT_CHECK zo2_header_dialect_check_c
#endif
int ZO2_DIALECT_CHECK(void);
int ZO2_DIALECT_CHECK(void) {
  zo2_session_params p = zo2_session_default_params();
  return (int)p.max_seqs + (int)ZO2_OK + (int)ZO2_LOG_OFF + (int)ZO2_OFFLOAD_NONE;
}
