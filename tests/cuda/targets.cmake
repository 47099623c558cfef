# The GPU check's targets (test_cuda, bench_cuda*): included by tests/cuda/CMakeLists.txt (scripts/gpu_check) and,
# when the CUDA backend is built, by the main test tree so that CI compiles them (CI has no GPU to run them).
set(MXLM_GPU_CHECK_DIR ${CMAKE_CURRENT_LIST_DIR})
find_package(nlohmann_json REQUIRED)
# One test binary: every test_cuda*.cpp adds its checks to the registry of gpu_check.h.
file(GLOB gpu_check_sources CONFIGURE_DEPENDS ${MXLM_GPU_CHECK_DIR}/test_cuda*.cpp)
add_executable(test_cuda ${gpu_check_sources})
target_compile_options(test_cuda PRIVATE -Wall -Wextra -Werror -Wno-restrict)
target_link_libraries(test_cuda PRIVATE mxlm_engine mxlm_model mxlm_backend_cuda nlohmann_json::nlohmann_json CUDA::cudart)

# One benchmark binary per bench/bench_cuda*.cc (each measures its own ceilings: cuda_bench_util.h).
file(GLOB gpu_bench_sources CONFIGURE_DEPENDS ${MXLM_GPU_CHECK_DIR}/../../bench/bench_cuda*.cc)
set(gpu_bench_targets "")
foreach(source ${gpu_bench_sources})
  get_filename_component(name ${source} NAME_WE)
  add_executable(${name} ${source})
  target_compile_options(${name} PRIVATE -Wall -Wextra -Werror -Wno-restrict)
  target_link_libraries(${name} PRIVATE mxlm_engine mxlm_model mxlm_backend_cuda CUDA::cudart CUDA::cublas)
  list(APPEND gpu_bench_targets ${name})
endforeach()
add_custom_target(gpu_check_all DEPENDS test_cuda ${gpu_bench_targets})
