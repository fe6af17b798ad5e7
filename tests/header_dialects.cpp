/* include/zo2.h in C++98 with -fno-exceptions -fno-rtti (tests/CMakeLists.txt): the same
   checks as header_dialects.c (C99), compiled as C++ under a name of its own. */
#define ZO2_DIALECT_CHECK zo2_header_dialect_check_cxx
#include "header_dialects.c"
