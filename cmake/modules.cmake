# One static library per layer folder (src/<layer>/*.cpp -> mxlm_<layer>), so a layer can be built and
# tested alone and a half-written file in one layer never breaks another layer's build.
function(mxlm_module name)
  cmake_parse_arguments(M "" "DIR" "DEPS" ${ARGN})
  if(NOT M_DIR)
    set(M_DIR ${name})
  endif()
  file(GLOB srcs CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/${M_DIR}/*.cpp)
  if(srcs)
    add_library(mxlm_${name} STATIC ${srcs})
    target_include_directories(mxlm_${name} PUBLIC ${PROJECT_SOURCE_DIR}/src)
    target_link_libraries(mxlm_${name} PUBLIC ${M_DEPS})
  else()
    add_library(mxlm_${name} INTERFACE)
    target_include_directories(mxlm_${name} INTERFACE ${PROJECT_SOURCE_DIR}/src)
    target_link_libraries(mxlm_${name} INTERFACE ${M_DEPS})
  endif()
endfunction()

# Tests of one layer: tests/<layer>/*.cpp -> test_<layer>, registered with ctest per test case.
function(mxlm_test_module name)
  cmake_parse_arguments(T "" "" "DEPS" ${ARGN})
  file(GLOB srcs CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/${name}/*.cpp)
  if(NOT srcs)
    return()
  endif()
  add_executable(test_${name} ${srcs})
  target_link_libraries(test_${name} PRIVATE mxlm_${name} ${T_DEPS} GTest::gtest_main GTest::gmock)
  target_compile_definitions(test_${name} PRIVATE
    MXLM_SOURCE_DIR="${PROJECT_SOURCE_DIR}" MXLM_BINARY_DIR="${PROJECT_BINARY_DIR}")
  gtest_discover_tests(test_${name} DISCOVERY_TIMEOUT 60
    PROPERTIES ENVIRONMENT "MXLM_SOURCE_DIR=${PROJECT_SOURCE_DIR};MXLM_BINARY_DIR=${PROJECT_BINARY_DIR}")
endfunction()
