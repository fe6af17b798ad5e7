# Installation: the C header, the library and a CMake package (zo2::zo2).
#
#   <prefix>/include/zo2.h
#   <prefix>/lib/libzo2.so -> libzo2.so.0.2 -> libzo2.so.0.2.0
#   <prefix>/lib/cmake/zo2/{zo2Config,zo2ConfigVersion,zo2Targets,zo2Targets-<config>}.cmake
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

# The installed libzo2 keeps the RUNPATH of dependencies outside the system directories
# (e.g. TBB from a custom prefix), so hosts load it without LD_LIBRARY_PATH.
set_property(TARGET zo2 PROPERTY INSTALL_RPATH_USE_LINK_PATH ON)
# An installed zo2-tune (and zo2-bench) finds the installed libzo2 beside it, wherever the prefix is.
foreach(tool zo2-tune zo2-bench)
  if(TARGET ${tool})
    set_property(TARGET ${tool} PROPERTY INSTALL_RPATH "$ORIGIN/../${CMAKE_INSTALL_LIBDIR}")
  endif()
endforeach()
