# Whether the Python package can be built here: Python 3 with its headers and pybind11's
# CMake package (Debian: python3-dev, python3-pybind11). Sets _zo2_python_default.
# Debian's /usr/bin/python3 is preferred over another python3 on PATH (pyenv, conda): it
# is the one python3-pybind11, python3-pytest and python3-numpy install into.
set(_zo2_python_default OFF)
if(ZO2_SANITIZE OR ZO2_TSAN OR ZO2_FUZZ)
  return()
endif()
if(NOT DEFINED Python3_EXECUTABLE AND EXISTS /usr/bin/python3)
  set(Python3_EXECUTABLE /usr/bin/python3 CACHE FILEPATH "Python interpreter for the zo2 package")
endif()
find_package(Python3 QUIET COMPONENTS Interpreter Development.Module)
if(NOT Python3_FOUND)
  return()
endif()
if(NOT pybind11_DIR)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c "import pybind11; print(pybind11.get_cmake_dir())"
                  OUTPUT_VARIABLE _zo2_pybind11_dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_zo2_pybind11_dir)
    set(pybind11_DIR ${_zo2_pybind11_dir} CACHE PATH "pybind11's CMake package")
  endif()
endif()
find_package(pybind11 CONFIG QUIET)
if(pybind11_FOUND)
  set(_zo2_python_default ON)
endif()
