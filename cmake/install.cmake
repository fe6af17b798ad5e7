# Installation: the C header, the library and a CMake package (zo2::zo2).
#
#   <prefix>/include/zo2.h
#   <prefix>/lib/libzo2.so -> libzo2.so.0.2 -> libzo2.so.0.2.0
#   <prefix>/lib/cmake/zo2/{zo2Config,zo2ConfigVersion,zo2Targets,zo2Targets-<config>}.cmake
#   <prefix>/lib/pkgconfig/zo2.pc
#
# A host project then needs only:  find_package(zo2 REQUIRED)
#                                  target_link_libraries(app PRIVATE zo2::zo2)
include(CMakePackageConfigHelpers)

install(TARGETS zo2 EXPORT zo2Targets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# (The include directory reaches zo2::zo2 through the target's $<INSTALL_INTERFACE:...>.)
install(FILES ${PROJECT_SOURCE_DIR}/include/zo2.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(ZO2_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/zo2)
install(EXPORT zo2Targets NAMESPACE zo2:: FILE zo2Targets.cmake DESTINATION ${ZO2_INSTALL_CMAKEDIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/zo2Config.cmake.in
  ${PROJECT_BINARY_DIR}/zo2Config.cmake
  INSTALL_DESTINATION ${ZO2_INSTALL_CMAKEDIR}
  PATH_VARS CMAKE_INSTALL_INCLUDEDIR)
# The SONAME carries the ABI (libzo2.so.0.2 before 1.0: CMakeLists.txt), so the package
# promises the same.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(ZO2_PACKAGE_COMPATIBILITY SameMinorVersion)
else()
  set(ZO2_PACKAGE_COMPATIBILITY SameMajorVersion)
endif()
write_basic_package_version_file(${PROJECT_BINARY_DIR}/zo2ConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY ${ZO2_PACKAGE_COMPATIBILITY})
install(FILES ${PROJECT_BINARY_DIR}/zo2Config.cmake ${PROJECT_BINARY_DIR}/zo2ConfigVersion.cmake
  DESTINATION ${ZO2_INSTALL_CMAKEDIR})

# The installed libzo2 (and zo2-tune, zo2-bench: they hold zo2_core themselves) keep the
# RUNPATH of dependencies outside the system directories (e.g. TBB from a custom prefix), so
# hosts load them without LD_LIBRARY_PATH; a directory below /usr or /lib is left to the
# loader's own search (Debian's openblas-pthread directory in a RUNPATH would override the
# libopenblas.so.0 alternative the system chose).
set(_zo2_rpath_dirs)
foreach(_lib ${OPENBLAS_LINK_LIBRARIES} ${HWLOC_LINK_LIBRARIES} ${URING_LINK_LIBRARIES} ${PCRE2_LINK_LIBRARIES}
             ${SENTENCEPIECE_LINK_LIBRARIES})
  get_filename_component(_dir "${_lib}" DIRECTORY)
  if(_dir AND NOT _dir MATCHES "^/(usr/|lib)")
    list(APPEND _zo2_rpath_dirs "${_dir}")
  endif()
endforeach()
foreach(_target TBB::tbb fmt::fmt)
  get_target_property(_loc ${_target} LOCATION)
  get_filename_component(_dir "${_loc}" DIRECTORY)
  if(_dir AND NOT _dir MATCHES "^/(usr/|lib)")
    list(APPEND _zo2_rpath_dirs "${_dir}")
  endif()
endforeach()
list(REMOVE_DUPLICATES _zo2_rpath_dirs)
foreach(_target zo2 zo2-tune zo2-bench)
  if(TARGET ${_target})
    set_property(TARGET ${_target} PROPERTY INSTALL_RPATH "${_zo2_rpath_dirs}")
  endif()
endforeach()

# pkg-config (meson, autotools, plain Makefiles): `pkg-config --cflags --libs zo2`.
# The prefix relative to the .pc file itself, so a prefix copied elsewhere (or installed with
# cmake --install --prefix) still names its own files.
file(RELATIVE_PATH ZO2_PC_TO_PREFIX "/p/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/p")
string(REGEX REPLACE "/$" "" ZO2_PC_TO_PREFIX "${ZO2_PC_TO_PREFIX}")
configure_file(${CMAKE_CURRENT_LIST_DIR}/zo2.pc.in ${PROJECT_BINARY_DIR}/zo2.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/zo2.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
