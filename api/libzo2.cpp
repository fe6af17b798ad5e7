// libzo2.so: zo2_core linked whole (CMakeLists.txt, Note [One library, exporting only the C
// API]); its exports are the C API of include/zo2.h alone (api/zo2_c.cpp). This file only
// gives the shared library a source of its own, which CMake requires.
