# find_package(dwa_export <version> CONFIG)'s check. The version is written once, as
# __version__ in ../__init__.py, and read from there; a PEP 440 suffix (rc1, .post1) is
# dropped, as CMake versions are numbers only.
file(STRINGS "${CMAKE_CURRENT_LIST_DIR}/../__init__.py" PACKAGE_VERSION REGEX "^__version__")
string(REGEX MATCH "[0-9]+(\\.[0-9]+)*" PACKAGE_VERSION "${PACKAGE_VERSION}")

# write_basic_package_version_file()'s rules: a release serves requests for its own series
# that are not newer than itself. While the major is 0 a series is a major.minor (its
# SameMinorVersion: 0.1.3 serves 0.1 and 0.1.2, not 0.1.4 or 0.2), as a 0.x minor release
# may break the API; from 1.0 on it is the major (SameMajorVersion).
# A range (0.1...<0.3) is served when its lower end (PACKAGE_FIND_VERSION) is and the release
# lies inside it (CMake's own file also refuses a range that reaches past the series). With
# no version asked for, find_package() takes any.
string(REGEX MATCH "^0\\.[0-9]+|^[1-9][0-9]*" _dwa_export_series "${PACKAGE_VERSION}")
if(PACKAGE_FIND_VERSION_MAJOR EQUAL 0)
  set(_dwa_export_asked "0.${PACKAGE_FIND_VERSION_MINOR}")
else()
  set(_dwa_export_asked "${PACKAGE_FIND_VERSION_MAJOR}")
endif()
set(PACKAGE_VERSION_COMPATIBLE FALSE)
if(_dwa_export_asked VERSION_EQUAL _dwa_export_series AND NOT PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
endif()
if(PACKAGE_FIND_VERSION_RANGE_MAX STREQUAL "INCLUDE" AND PACKAGE_VERSION VERSION_GREATER PACKAGE_FIND_VERSION_MAX
   OR PACKAGE_FIND_VERSION_RANGE_MAX STREQUAL "EXCLUDE" AND NOT PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION_MAX)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
endif()
set(PACKAGE_VERSION_EXACT FALSE)
if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
  set(PACKAGE_VERSION_EXACT TRUE)
endif()
unset(_dwa_export_series)
unset(_dwa_export_asked)
