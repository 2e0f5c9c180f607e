# Locates Eigen (header-only) and BLAS/LAPACK.
#
# Both come from PyPI wheels by default, so that `pip install .` needs nothing from the system
# but a compiler: cmeel-eigen ships Eigen3Config.cmake under its "cmeel.prefix" folder, and
# scipy-openblas32 ships libscipy_openblas.so with an OpenBLASConfig.cmake whose symbols carry
# the prefix scipy_. A standalone C++ build finds them through the Python interpreter on PATH
# (the one scikit-build-core runs, or the venv's), unless the caller points CMake at other
# copies with Eigen3_DIR / SADDLESCAPE_OPENBLAS_DIR.

find_package(Python 3.10 COMPONENTS Interpreter)

function(_saddlescape_python_query out code)
  if(Python_Interpreter_FOUND)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c "${code}"
      OUTPUT_VARIABLE _value
      OUTPUT_STRIP_TRAILING_WHITESPACE
      ERROR_QUIET
      RESULT_VARIABLE _rc)
    if(_rc EQUAL 0 AND EXISTS "${_value}")
      set(${out} "${_value}" PARENT_SCOPE)
    endif()
  endif()
endfunction()

if(NOT Eigen3_DIR)
  _saddlescape_python_query(_cmeel_prefix
    "import importlib.metadata as m; print(m.distribution('cmeel-eigen').locate_file('cmeel.prefix'))")
  if(_cmeel_prefix)
    list(APPEND CMAKE_PREFIX_PATH "${_cmeel_prefix}")
  endif()
endif()
find_package(Eigen3 3.4 CONFIG REQUIRED)

set(SADDLESCAPE_OPENBLAS_DIR "" CACHE PATH
    "Folder holding OpenBLASConfig.cmake; empty: the scipy-openblas32 wheel's")
if(NOT SADDLESCAPE_OPENBLAS_DIR)
  _saddlescape_python_query(_openblas_dir
    "import os, scipy_openblas32 as s; print(os.path.join(s.get_lib_dir(), 'cmake', 'openblas'))")
  if(NOT _openblas_dir)
    message(FATAL_ERROR
      "saddlescape needs BLAS/LAPACK from the scipy-openblas32 wheel: "
      "`pip install scipy-openblas32`, or set SADDLESCAPE_OPENBLAS_DIR")
  endif()
  # Not cached: pip's isolated build environments live in temporary folders.
  set(_openblas_search "${_openblas_dir}")
else()
  set(_openblas_search "${SADDLESCAPE_OPENBLAS_DIR}")
endif()
find_package(OpenBLAS CONFIG REQUIRED PATHS "${_openblas_search}" NO_DEFAULT_PATH)
# The wheel's symbols carry the prefix scipy_; another OpenBLAS (SADDLESCAPE_OPENBLAS_DIR) is
# assumed to have plain names unless the prefix is given.
if(SADDLESCAPE_OPENBLAS_DIR)
  set(_prefix_default "")
else()
  set(_prefix_default "scipy_")
endif()
set(SADDLESCAPE_BLAS_SYMBOL_PREFIX "${_prefix_default}" CACHE STRING
    "Prefix of the BLAS/LAPACK symbols")
