# The CUDA backend (csrc/fusedrnn/cuda), included from the top-level CMakeLists.txt after _core, or
# alone for the plugin (FUSEDRNN_CUDA_PLUGIN).
#
# 1. Its device code run on the host (emulated.cpp) is always built into _core: the tests check it
#    against the CPU backend on machines without a GPU. It needs no CUDA.
# 2. The module _cuda (cuBLAS and real kernels), by FUSEDRNN_CUDA:
#      AUTO  build it when nvcc and cuBLAS are found, else say why not and build the rest;
#      ON    build it or fail the configuration;
#      OFF   do not build it.
#    It goes into the package fusedrnn, or with FUSEDRNN_CUDA_PLUGIN set into that package alone
#    (ON implied; the plugin's name must carry nvcc's major version, e.g. fusedrnn_cuda13).
#    cuBLAS comes from the toolkit (CUDA::cublas) or the nvidia-cublas wheel of the building Python
#    (installed beforehand, and the build run with --no-build-isolation so it sees it; the plugin's
#    build-system.requires names it). The CUDA runtime is linked statically and cuBLAS found at run time
#    beside the package (the wheel's nvidia/cu13/lib; fusedrnn also loads it from that wheel wherever
#    Python finds it) or on the loader's path, so `import fusedrnn` and _core never need CUDA. Architectures: CMAKE_CUDA_ARCHITECTURES (or CUDAARCHS), by default 80 and 90.
#    FUSEDRNN_CUDA_PTXAS_VERBOSE=ON prints ptxas's register and spill report of every kernel (CI checks
#    it for spills).

if(NOT FUSEDRNN_CUDA_PLUGIN)
  add_library(fusedrnn_emulated_device STATIC ${CMAKE_CURRENT_LIST_DIR}/emulated.cpp)
  target_link_libraries(fusedrnn_emulated_device PUBLIC fusedrnn_core)
  set_target_properties(fusedrnn_emulated_device PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_compile_options(fusedrnn_emulated_device PRIVATE ${FUSEDRNN_WARNINGS})
  target_link_libraries(_core PRIVATE fusedrnn_emulated_device)

  # The module _cuda_emulated: _cuda's bindings over a runtime seam of host memory and the emulation,
  # so the tests reach the bindings and the Python layer above them without a GPU.
  pybind11_add_module(_cuda_emulated MODULE ${CMAKE_SOURCE_DIR}/csrc/bindings/cuda_module.cpp
                      ${CMAKE_SOURCE_DIR}/csrc/bindings/cuda_emulated_runtime.cpp)
  target_link_libraries(_cuda_emulated PRIVATE fusedrnn_emulated_device)
  target_link_options(_cuda_emulated PRIVATE ${FUSEDRNN_MODULE_LINK_OPTIONS})
  target_compile_definitions(_cuda_emulated PRIVATE FUSEDRNN_EMULATED_RUNTIME
    FUSEDRNN_CUDA_ARCHITECTURES="emulated" FUSEDRNN_CUDA_COMPILER_VERSION="none")
  target_compile_options(_cuda_emulated PRIVATE ${FUSEDRNN_WARNINGS})
  install(TARGETS _cuda_emulated LIBRARY DESTINATION fusedrnn)
endif()

set(FUSEDRNN_CUDA "AUTO" CACHE STRING "Build the CUDA module fusedrnn._cuda: AUTO, ON or OFF")
set_property(CACHE FUSEDRNN_CUDA PROPERTY STRINGS AUTO ON OFF)
option(FUSEDRNN_CUDA_PTXAS_VERBOSE "Print ptxas's resource report of every CUDA kernel" OFF)
string(TOUPPER "${FUSEDRNN_CUDA}" _fusedrnn_cuda_mode)
if(NOT _fusedrnn_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "FUSEDRNN_CUDA: expected AUTO, ON or OFF, got '${FUSEDRNN_CUDA}'")
endif()
set(_fusedrnn_cuda_package fusedrnn)
if(FUSEDRNN_CUDA_PLUGIN)
  set(_fusedrnn_cuda_mode ON)  # a plugin without its module would be an empty package
  set(_fusedrnn_cuda_package "${FUSEDRNN_CUDA_PLUGIN}")
endif()

# Sets FUSEDRNN_CUDA_MISSING to why the module cannot be built (empty when it can), and on success
# FUSEDRNN_CUBLAS_LIBRARY / FUSEDRNN_CUBLAS_INCLUDE.
function(fusedrnn_find_cuda)
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(FUSEDRNN_CUDA_MISSING "no CUDA compiler (nvcc) found" PARENT_SCOPE)
    return()
  endif()
  get_filename_component(_nvcc_dir "${CMAKE_CUDA_COMPILER}" DIRECTORY)
  find_package(CUDAToolkit QUIET)
  if(TARGET CUDA::cublas)
    set(FUSEDRNN_CUBLAS_LIBRARY CUDA::cublas PARENT_SCOPE)
    set(FUSEDRNN_CUBLAS_INCLUDE "" PARENT_SCOPE)
    set(FUSEDRNN_CUDA_MISSING "" PARENT_SCOPE)
    return()
  endif()
  # The nvidia-cublas wheel: headers in nvidia/cu13/include beside other toolkit headers of its own
  # version, and only the versioned libcublas.so.13, so it is linked by path. Only its cublas*.h are
  # put on the include path (through a directory of links), so nvcc keeps its own runtime headers.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import importlib.util as u; s = u.find_spec('nvidia.cu13'); print(list(s.submodule_search_locations)[0])"
    OUTPUT_VARIABLE _wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _found)
  if(NOT _found EQUAL 0 OR NOT EXISTS "${_wheel}/include/cublas_v2.h" OR NOT EXISTS "${_wheel}/lib/libcublas.so.13")
    set(FUSEDRNN_CUDA_MISSING "no cuBLAS: the toolkit has none and the nvidia-cublas wheel is not installed (pip install nvidia-cublas)" PARENT_SCOPE)
    return()
  endif()
  set(_include "${CMAKE_BINARY_DIR}/cublas_include")
  file(MAKE_DIRECTORY "${_include}")
  file(GLOB _headers "${_wheel}/include/cublas*.h")
  foreach(_header IN LISTS _headers)
    get_filename_component(_name "${_header}" NAME)
    file(CREATE_LINK "${_header}" "${_include}/${_name}" SYMBOLIC)
  endforeach()
  set(FUSEDRNN_CUBLAS_LIBRARY "${_wheel}/lib/libcublas.so.13" PARENT_SCOPE)
  set(FUSEDRNN_CUBLAS_INCLUDE "${_include}" PARENT_SCOPE)
  set(FUSEDRNN_CUDA_MISSING "" PARENT_SCOPE)
endfunction()

if(_fusedrnn_cuda_mode STREQUAL "OFF")
  message(STATUS "fusedrnn: CUDA module off (FUSEDRNN_CUDA=OFF)")
else()
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES 80 90)  # A100 and H100/H200; override with -DCMAKE_CUDA_ARCHITECTURES
  endif()
  fusedrnn_find_cuda()
  if(FUSEDRNN_CUDA_MISSING)
    if(_fusedrnn_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR "fusedrnn: FUSEDRNN_CUDA=ON but the CUDA module cannot be built: ${FUSEDRNN_CUDA_MISSING}")
    endif()
    message(STATUS "fusedrnn: CUDA module not built (${FUSEDRNN_CUDA_MISSING}); FUSEDRNN_CUDA=ON makes this an error")
  else()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    if(FUSEDRNN_CUDA_PLUGIN AND NOT FUSEDRNN_CUDA_PLUGIN MATCHES "cuda${CUDAToolkit_VERSION_MAJOR}$")
      message(FATAL_ERROR "fusedrnn: the plugin ${FUSEDRNN_CUDA_PLUGIN} cannot be built with CUDA ${CUDAToolkit_VERSION}")
    endif()
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
    add_library(fusedrnn_cuda_device STATIC ${CMAKE_CURRENT_LIST_DIR}/cuda_layer.cu)
    target_include_directories(fusedrnn_cuda_device PUBLIC ${CMAKE_SOURCE_DIR}/csrc)
    if(FUSEDRNN_CUBLAS_INCLUDE)
      target_include_directories(fusedrnn_cuda_device SYSTEM PRIVATE "${FUSEDRNN_CUBLAS_INCLUDE}")
    endif()
    target_link_libraries(fusedrnn_cuda_device PUBLIC CUDA::cudart_static "${FUSEDRNN_CUBLAS_LIBRARY}")
    target_compile_options(fusedrnn_cuda_device PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall>)
    if(FUSEDRNN_CUDA_PTXAS_VERBOSE)
      target_compile_options(fusedrnn_cuda_device PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
    endif()
    set_target_properties(fusedrnn_cuda_device PROPERTIES POSITION_INDEPENDENT_CODE ON)

    string(REPLACE ";" "," _architectures "${CMAKE_CUDA_ARCHITECTURES}")
    pybind11_add_module(_cuda MODULE csrc/bindings/cuda_module.cpp)
    target_link_libraries(_cuda PRIVATE fusedrnn_cuda_device)
    target_link_options(_cuda PRIVATE ${FUSEDRNN_MODULE_LINK_OPTIONS})
    target_compile_definitions(_cuda PRIVATE
      FUSEDRNN_CUDA_ARCHITECTURES="${_architectures}"
      FUSEDRNN_CUDA_COMPILER_VERSION="${CMAKE_CUDA_COMPILER_VERSION}")
    target_compile_options(_cuda PRIVATE ${FUSEDRNN_WARNINGS})
    # cuBLAS from the nvidia-cublas wheel beside the package in site-packages, else the loader's path.
    set_target_properties(_cuda PROPERTIES
      INSTALL_RPATH "$ORIGIN/../nvidia/cu13/lib"
      BUILD_WITH_INSTALL_RPATH OFF)
    install(TARGETS _cuda LIBRARY DESTINATION ${_fusedrnn_cuda_package})
    if(FUSEDRNN_CUDA_PLUGIN)  # the plugin's wheel is built from outside its folder: its notices go in its package
      install(FILES ${CMAKE_SOURCE_DIR}/LICENSE ${CMAKE_SOURCE_DIR}/NOTICE DESTINATION ${_fusedrnn_cuda_package})
    endif()
    message(STATUS "fusedrnn: CUDA module ${_fusedrnn_cuda_package}._cuda built for architectures "
                   "${CMAKE_CUDA_ARCHITECTURES} (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, cuBLAS ${FUSEDRNN_CUBLAS_LIBRARY})")
  endif()
endif()
