# SPDX-License-Identifier: Apache-2.0
# Installs the build tree into a fresh prefix, then configures, builds and runs the consumer
# project of tests/package against it with find_package(autoglm CONFIG REQUIRED).
# Inputs: BUILD_DIR, SOURCE_DIR, WORK_DIR, GENERATOR, SANITIZE.
file(REMOVE_RECURSE "${WORK_DIR}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix"
                RESULT_VARIABLE rc OUTPUT_QUIET)
if(rc)
  message(FATAL_ERROR "install failed: ${rc}")
endif()
set(flags "")
if(SANITIZE)
  set(flags "-DCMAKE_CXX_FLAGS=-fsanitize=${SANITIZE}" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=${SANITIZE}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/package" -B "${WORK_DIR}/build"
                        -G "${GENERATOR}" "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix" ${flags}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "consumer configure failed: ${rc}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${WORK_DIR}/build" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "consumer build failed: ${rc}")
endif()
execute_process(COMMAND "${WORK_DIR}/build/consumer" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "consumer run failed: ${rc}")
endif()
# ---- CUDA backend: the CUDA consumer exists when the package has autoglm::cuda ---------------
if(EXISTS "${WORK_DIR}/build/consumer_cuda")
  execute_process(COMMAND "${WORK_DIR}/build/consumer_cuda" RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "CUDA consumer run failed: ${rc}")
  endif()
endif()
