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

# The installed libzo2 (and zo2-tune, zo2-bench: they hold zo2_core themselves, and the
# Python module) keep the RUNPATH of dependencies outside the system's library directories
# (TBB or CUDA from /opt or /usr/local, say), so hosts load them without LD_LIBRARY_PATH; a
# directory below /lib, /lib64, /usr/lib or /usr/lib64 is left to the loader's own search
# (Debian's openblas-pthread directory in a RUNPATH would override the libopenblas.so.0
# alternative the system chose).
set(_zo2_dep_libs ${OPENBLAS_LINK_LIBRARIES} ${HWLOC_LINK_LIBRARIES} ${URING_LINK_LIBRARIES} ${PCRE2_LINK_LIBRARIES}
    ${SENTENCEPIECE_LINK_LIBRARIES} ${MPI_C_LIBRARIES})
foreach(_target TBB::tbb fmt::fmt ICU::uc ZLIB::ZLIB CUDA::cudart CUDA::cublas CUDA::cublasLt CUDA::curand)
  if(TARGET ${_target})
    get_target_property(_loc ${_target} LOCATION)
    list(APPEND _zo2_dep_libs "${_loc}")
  endif()
endforeach()
set(_zo2_rpath_dirs)
foreach(_lib ${_zo2_dep_libs})
  if(NOT IS_ABSOLUTE "${_lib}")
    continue()
  endif()
  get_filename_component(_dir "${_lib}" DIRECTORY)
  if(_dir AND NOT _dir MATCHES "^/(usr/)?lib(32|64|x32)?(/|$)")
    list(APPEND _zo2_rpath_dirs "${_dir}")
  endif()
endforeach()
list(REMOVE_DUPLICATES _zo2_rpath_dirs)
foreach(_target zo2 zo2-tune zo2-bench zo2_python_module)
  if(TARGET ${_target})
    set_property(TARGET ${_target} PROPERTY INSTALL_RPATH "${_zo2_rpath_dirs}")
  endif()
endforeach()
# The Python module's build-tree copy is the one pip packages (python/setup.py): it is built
# with that RUNPATH too, and so holds no path of the build tree.
if(TARGET zo2_python_module)
  set_property(TARGET zo2_python_module PROPERTY BUILD_WITH_INSTALL_RPATH ON)
endif()

# pkg-config (meson, autotools, plain Makefiles): `pkg-config --cflags --libs zo2`.
# The prefix relative to the .pc file itself, so a prefix copied elsewhere (or installed with
# cmake --install --prefix) still names its own files.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")  # -DCMAKE_INSTALL_LIBDIR=/abs: the prefix as configured
  file(RELATIVE_PATH ZO2_PC_TO_PREFIX "${CMAKE_INSTALL_LIBDIR}/pkgconfig" "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH ZO2_PC_TO_PREFIX "/p/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/p")
endif()
string(REGEX REPLACE "/$" "" ZO2_PC_TO_PREFIX "${ZO2_PC_TO_PREFIX}")
configure_file(${CMAKE_CURRENT_LIST_DIR}/zo2.pc.in ${PROJECT_BINARY_DIR}/zo2.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/zo2.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
