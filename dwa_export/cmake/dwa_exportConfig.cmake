# find_package(dwa_export CONFIG) for the header-only C++ history, dwa/history.hpp:
#
#   find_package(dwa_export 0.1 CONFIG REQUIRED)  # -Ddwa_export_DIR=$(python -c "import dwa_export; print(dwa_export.cmake_dir())")
#   target_link_libraries(app PRIVATE dwa_export::history)
#
# The header is found from this file's folder (../include), not from an install prefix,
# so that a checkout, an editable install and an installed wheel work alike.

include(CMakeFindDependencyMacro)
find_dependency(nlohmann_json 3.10)  # the header parses and writes JSON with it; if not found, neither is dwa_export

if(NOT TARGET dwa_export::history)  # find_package(dwa_export) may run more than once in a project
  get_filename_component(_dwa_export_include "${CMAKE_CURRENT_LIST_DIR}/../include" ABSOLUTE)
  add_library(dwa_export::history INTERFACE IMPORTED)
  set_target_properties(dwa_export::history PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_dwa_export_include}"
    INTERFACE_COMPILE_FEATURES cxx_std_17  # a minimum, unlike CMAKE_CXX_STANDARD: a C++20 consumer stays C++20
    INTERFACE_LINK_LIBRARIES nlohmann_json::nlohmann_json)
  unset(_dwa_export_include)
endif()
