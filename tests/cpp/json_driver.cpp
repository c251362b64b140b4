// Runs texts through dwa/json.hpp for tests/test_json_cpp.py, which compares
// the results with Python's json.loads/json.dumps.
//
//   json_driver [options] FILE...   one JSON text per file (its bytes, exactly)
//   json_driver [options]           texts on stdin, each framed as
//                                   "<byte count>\n<bytes>" so any bytes survive
//
// One line out per text, flushed at once (the tests stream many texts
// through one process):
//   ok <dwa::json::dump(value)>     pure ASCII, no newline (ensure_ascii)
//   error <ParseError message>      pure ASCII: messages quote no input bytes
//   fail <message>                  anything else thrown: a bug, never expected
// Options:
//   --repr               append "\t" + dwa::json::repr(value) to ok lines
//   --numbers            for a number, append "\t<as_int64>\t<as_uint64>\t<as_double>"
//                        ("-" where nullopt; the double as json.dumps writes it)
//   --max-depth=N  --max-int-digits=N  --prefix=TEXT   set dwa::json::Options
#include <dwa/json.hpp>

#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

struct Flags {
  bool repr = false;
  bool numbers = false;
};

template <typename T>
std::string or_dash(const std::optional<T>& value) {
  if (!value) return "-";
  if constexpr (std::is_same_v<T, double>)
    return dwa::json::dump_float(*value);
  else
    return std::to_string(*value);
}

void run(const std::string& text, const dwa::json::Options& options, const Flags& flags) {
  std::string line;
  try {
    const dwa::json::Value value = dwa::json::parse(text, options);
    line = "ok " + dwa::json::dump(value);
    if (flags.repr) line += "\t" + dwa::json::repr(value);
    if (flags.numbers && value.is_number())
      line += "\t" + or_dash(value.as_int64()) + "\t" + or_dash(value.as_uint64()) + "\t" + or_dash(value.as_double());
  } catch (const dwa::json::ParseError& error) {
    line = std::string("error ") + error.what();
  } catch (const std::exception& error) {
    line = std::string("fail ") + error.what();
  }
  std::cout << line << '\n' << std::flush;
}

}  // namespace

int main(int argc, char** argv) {
  dwa::json::Options options;
  Flags flags;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const char* name) { return arg.substr(std::string(name).size()); };
    if (arg == "--repr") {
      flags.repr = true;
    } else if (arg == "--numbers") {
      flags.numbers = true;
    } else if (arg.rfind("--max-depth=", 0) == 0) {
      options.max_depth = std::stoul(value("--max-depth="));
    } else if (arg.rfind("--max-int-digits=", 0) == 0) {
      options.max_integer_digits = std::stoul(value("--max-int-digits="));
    } else if (arg.rfind("--prefix=", 0) == 0) {
      options.prefix = value("--prefix=");
    } else if (arg.rfind("--", 0) == 0) {
      std::cerr << "unknown option: " << arg << "\n";
      return 2;
    } else {
      files.push_back(arg);
    }
  }
  if (!files.empty()) {
    for (const std::string& path : files) {
      std::ifstream file(path, std::ios::binary);
      if (!file) {
        std::cerr << "cannot read " << path << "\n";
        return 2;
      }
      run(std::string(std::istreambuf_iterator<char>(file), {}), options, flags);
    }
    return 0;
  }
  std::string header;
  while (std::getline(std::cin, header)) {
    std::size_t size = 0;
    try {
      size = std::stoul(header);
    } catch (const std::exception&) {
      std::cerr << "bad record header: " << header << "\n";
      return 2;
    }
    std::string text(size, '\0');
    if (!std::cin.read(text.data(), static_cast<std::streamsize>(size))) {
      std::cerr << "truncated record\n";
      return 2;
    }
    run(text, options, flags);
  }
  return 0;
}
