# The CUDA backend (cuda/): SADDLESCAPE_ENABLE_CUDA = AUTO (default), ON or OFF.
#
# AUTO builds it when a CUDA compiler, cuBLAS and cuSOLVER are all found, and otherwise says in
# one status line why it is off; ON makes a missing piece a configure error. cuBLAS and
# cuSOLVER are looked for in the CUDA toolkit, then in SADDLESCAPE_CUDA_LIBRARY_ROOT, then in
# the NVIDIA wheels (nvidia-cublas, nvidia-cusolver) importable by Python_EXECUTABLE
# (site-packages/nvidia/cuXX with include/ and lib/).
#
# Sets SADDLESCAPE_WITH_CUDA, and when ON the imported targets saddlescape_cublas and
# saddlescape_cusolver.

set(SADDLESCAPE_ENABLE_CUDA AUTO CACHE STRING "Build the CUDA backend: AUTO, ON or OFF")
set_property(CACHE SADDLESCAPE_ENABLE_CUDA PROPERTY STRINGS AUTO ON OFF)
set(SADDLESCAPE_CUDA_LIBRARY_ROOT "" CACHE PATH
    "A folder with include/ and lib/ of cuBLAS and cuSOLVER, when the CUDA toolkit lacks them")

set(SADDLESCAPE_WITH_CUDA OFF)

function(_saddlescape_cuda_off reason)
  string(TOUPPER "${SADDLESCAPE_ENABLE_CUDA}" _mode)
  if(_mode STREQUAL "ON")
    message(FATAL_ERROR "SADDLESCAPE_ENABLE_CUDA=ON, but ${reason}")
  endif()
  message(STATUS "saddlescape: CUDA backend off (${reason}); the CPU library is complete without it")
endfunction()

# Adds an imported shared library `target` for the first of `names` under `roots`.
function(_saddlescape_cuda_lib target roots)
  find_library(_lib_${target} NAMES ${ARGN} PATHS ${roots} PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
  if(_lib_${target})
    add_library(${target} SHARED IMPORTED GLOBAL)
    set_target_properties(${target} PROPERTIES IMPORTED_LOCATION "${_lib_${target}}")
  endif()
endfunction()

string(TOUPPER "${SADDLESCAPE_ENABLE_CUDA}" _saddlescape_cuda_mode)
if(NOT _saddlescape_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "SADDLESCAPE_ENABLE_CUDA must be AUTO, ON or OFF, got '${SADDLESCAPE_ENABLE_CUDA}'")
endif()

if(NOT _saddlescape_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    _saddlescape_cuda_off("no CUDA compiler (nvcc) was found")
  else()
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      # Hopper (H100/H200) machine code, plus PTX that newer GPUs compile at load time.
      set(CMAKE_CUDA_ARCHITECTURES "90-real;90-virtual")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)

    set(_roots "")
    if(SADDLESCAPE_CUDA_LIBRARY_ROOT)
      list(APPEND _roots "${SADDLESCAPE_CUDA_LIBRARY_ROOT}")
    endif()
    if(NOT Python_EXECUTABLE)
      find_package(Python 3.10 QUIET COMPONENTS Interpreter)
    endif()
    if(Python_EXECUTABLE)
      execute_process(
        COMMAND "${Python_EXECUTABLE}" -c
          "import nvidia, os; print(';'.join(os.path.join(p, 'cu${CUDAToolkit_VERSION_MAJOR}') for p in nvidia.__path__))"
        OUTPUT_VARIABLE _wheel_roots OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET
        RESULT_VARIABLE _wheel_rc)
      if(_wheel_rc EQUAL 0)
        list(APPEND _roots ${_wheel_roots})
      endif()
    endif()

    set(_major ${CUDAToolkit_VERSION_MAJOR})
    if(TARGET CUDA::cublas AND TARGET CUDA::cusolver AND EXISTS "${CUDAToolkit_INCLUDE_DIRS}/cusolverDn.h")
      add_library(saddlescape_cublas INTERFACE IMPORTED GLOBAL)
      target_link_libraries(saddlescape_cublas INTERFACE CUDA::cublas)
      add_library(saddlescape_cusolver INTERFACE IMPORTED GLOBAL)
      target_link_libraries(saddlescape_cusolver INTERFACE CUDA::cusolver)
      set(SADDLESCAPE_WITH_CUDA ON)
    else()
      find_path(_saddlescape_cusolver_include cusolverDn.h PATHS ${_roots} PATH_SUFFIXES include
                NO_DEFAULT_PATH)
      # The wheels ship only versioned names (libcublas.so.13); cuSOLVER's major version is
      # one below the toolkit's (cuSOLVER 12 belongs to CUDA 13).
      math(EXPR _solver_major "${_major} - 1")
      _saddlescape_cuda_lib(saddlescape_cublas "${_roots}" cublas libcublas.so.${_major})
      _saddlescape_cuda_lib(saddlescape_cusolver "${_roots}" cusolver libcusolver.so.${_solver_major})
      if(_saddlescape_cusolver_include AND TARGET saddlescape_cublas AND TARGET saddlescape_cusolver)
        # Expose only the cuBLAS and cuSOLVER headers: the wheels also carry a CUDA runtime's
        # headers, which must not shadow those of the nvcc in use.
        set(_headers "${CMAKE_CURRENT_BINARY_DIR}/saddlescape_cuda_headers")
        file(MAKE_DIRECTORY "${_headers}")
        file(GLOB _wanted "${_saddlescape_cusolver_include}/cublas*.h"
                          "${_saddlescape_cusolver_include}/cusolver*.h")
        foreach(_h IN LISTS _wanted)
          get_filename_component(_name "${_h}" NAME)
          file(CREATE_LINK "${_h}" "${_headers}/${_name}" SYMBOLIC)
        endforeach()
        foreach(_t saddlescape_cublas saddlescape_cusolver)
          set_target_properties(${_t} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_headers}")
        endforeach()
        get_filename_component(SADDLESCAPE_CUDA_LIBRARY_DIR "${_lib_saddlescape_cusolver}" DIRECTORY)
        set(SADDLESCAPE_WITH_CUDA ON)
      else()
        _saddlescape_cuda_off("cuBLAS/cuSOLVER for CUDA ${_major} were not found in the toolkit, in "
          "SADDLESCAPE_CUDA_LIBRARY_ROOT or in the nvidia-cublas/nvidia-cusolver wheels (looked in: ${_roots})")
      endif()
    endif()
  endif()
endif()
if(SADDLESCAPE_WITH_CUDA)
  message(STATUS "saddlescape: CUDA backend on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
endif()
