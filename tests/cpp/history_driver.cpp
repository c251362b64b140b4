// Drives dwa::History from a command script on stdin, one JSON line out per
// command, so that tests/test_cpp.py can replay the same script through the
// Python DWAHistory and NumpyDWAHistory and compare results, states and error kinds.
//
//   history_driver [float64] [tasks=a,b,c] [nan=error|warn|ignore]
//                                            float64: dwa::History64; tasks: named tasks;
//                                            nan: the NanStrategy (kError by default)
//   history_driver loader                    states on stdin, each "<byte count>\n<bytes>", loaded into a
//                                            fresh dwa::History, else a fresh dwa::History64; prints
//                                            {"ok": <state>, "inputs": ...} or {"error": message}
//
// Commands: record v1 .. vK [weight=W]       one row of K losses
//           rows R v1 .. v(R*K) [weight=W]   R rows
//           roww R w1 .. wR v1 .. v(R*K)     R rows, one weight each
//           step [T]                         step(), or step(T) with a temperature for the log
//           logw T w1 .. wK                  log_weights(T, weights)
//           discard | reset | inputs | ready | state | log | load <json>
// Numbers are read with strtod (nan, inf and hex floats too); inputs() are written with
// "inf", "-inf" and "nan" as strings. Out, per command:
//   {"ok": result}, with "warned": true after a step() that wrote to std::cerr (NanStrategy::kWarn),
//   or {"error": kind, "message": ...} with kind
//   LossHistoryError (and "task": t or null), ValueError (std::invalid_argument),
//   RuntimeError (std::runtime_error), or DomainError (std::domain_error: state_dict()
//   of an epoch whose sums are not finite, which Python's json can write and strict JSON cannot).
// A malformed script exits with status 2.
#include <dwa/history.hpp>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Json = nlohmann::json;

struct BadScript : std::exception {};

double read_number(const std::string& word) {
  char* end = nullptr;
  const double value = std::strtod(word.c_str(), &end);
  if (word.empty() || *end != '\0') throw BadScript();
  return value;
}

std::size_t read_count(const std::string& word) {
  const double value = read_number(word);
  if (!(value >= 1 && value < 1e9)) throw BadScript();
  return static_cast<std::size_t>(value);
}

std::string dump(const Json& value) {  // ASCII: a line holds no U+2028, which Python's splitlines() splits at
  return value.dump(-1, ' ', true, Json::error_handler_t::replace);
}

// inputs() as JSON; a float beyond the float range is inf there, written as the string "inf"
// (nlohmann writes null for it).
template <typename Scalar>
Json inputs(const dwa::BasicHistory<Scalar>& history) {
  const auto numbers = [](const std::vector<Scalar>& values) {
    Json out = Json::array();
    for (const Scalar value : values)
      out.push_back(std::isfinite(value) ? Json(value) : Json(std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf"));
    return out;
  };
  const auto [loss_t1, loss_t2] = history.inputs();
  return Json::array({numbers(loss_t1), numbers(loss_t2)});
}

Json log(const std::vector<dwa::LogEntry>& entries) {  // as Python's history.log has it
  Json out = Json::array();
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const dwa::LogEntry& entry = entries[i];
    out.push_back({{"epoch", i},
                   {"averages", entry.averages},
                   {"batches", entry.batches},
                   {"weight", entry.weight},
                   {"temperature", entry.temperature ? Json(*entry.temperature) : Json()},
                   {"weights", entry.weights ? Json(*entry.weights) : Json()},
                   {"nonfinite_rows", entry.nonfinite_rows}});
  }
  return out;
}

// Holds what std::cerr gets while it lives (what step() writes under NanStrategy::kWarn).
class CerrCapture {
 public:
  CerrCapture() : previous_(std::cerr.rdbuf(captured_.rdbuf())) {}
  ~CerrCapture() { std::cerr.rdbuf(previous_); }
  CerrCapture(const CerrCapture&) = delete;
  CerrCapture& operator=(const CerrCapture&) = delete;
  std::string text() const { return captured_.str(); }

 private:
  std::ostringstream captured_;
  std::streambuf* previous_;
};

template <typename Scalar>
Json run(dwa::BasicHistory<Scalar>& history, const std::string& line, bool& warned) {
  std::istringstream stream(line);
  std::string command;
  stream >> command;
  std::vector<std::string> words;
  for (std::string word; stream >> word;) words.push_back(word);

  if (command == "record" || command == "rows" || command == "roww") {
    std::size_t rows = 1, first = 0;
    if (command != "record") rows = read_count(words.at(0)), first = 1;
    std::vector<double> row_weights;
    for (; command == "roww" && row_weights.size() < rows; ++first) row_weights.push_back(read_number(words.at(first)));
    std::optional<double> weight;
    std::vector<Scalar> values;
    for (std::size_t i = first; i < words.size(); ++i) {
      if (words[i].rfind("weight=", 0) == 0)
        weight = read_number(words[i].substr(7));
      else
        values.push_back(dwa::detail::narrow<Scalar>(read_number(words[i])));
    }
    if (values.size() % rows) throw BadScript();
    if (command == "roww")
      history.record(values.data(), rows, values.size() / rows, row_weights.data());
    else
      history.record(values.data(), rows, values.size() / rows, weight);
  } else if (command == "step") {
    if (words.size() > 1) throw BadScript();
    const CerrCapture capture;
    history.step(words.empty() ? std::nullopt : std::optional<double>(read_number(words[0])));
    warned = !capture.text().empty();
  } else if (command == "logw") {
    std::vector<double> weights;
    for (std::size_t i = 1; i < words.size(); ++i) weights.push_back(read_number(words[i]));
    history.log_weights(read_number(words.at(0)), weights);
  } else if (command == "discard") {
    history.discard_epoch();
  } else if (command == "reset") {
    history.reset();
  } else if (command == "inputs") {
    return inputs(history);
  } else if (command == "ready") {
    return history.ready();
  } else if (command == "state") {
    return Json::parse(history.state_dict());
  } else if (command == "log") {
    return log(history.log());
  } else if (command == "load") {
    history.load_state_dict(line.substr(line.find(' ') + 1));
  } else {
    throw BadScript();
  }
  return nullptr;
}

template <typename Scalar>
int drive(dwa::BasicHistory<Scalar> history) {
  for (std::string line; std::getline(std::cin, line);) {
    Json out;
    try {
      bool warned = false;
      out = {{"ok", run(history, line, warned)}};
      if (warned) out["warned"] = true;
    } catch (const dwa::LossHistoryError& error) {
      out = {{"error", "LossHistoryError"}, {"task", error.task ? Json(*error.task) : Json()}, {"message", error.what()}};
    } catch (const std::domain_error& error) {
      out = {{"error", "DomainError"}, {"message", error.what()}};
    } catch (const std::invalid_argument& error) {
      out = {{"error", "ValueError"}, {"message", error.what()}};
    } catch (const std::runtime_error& error) {
      out = {{"error", "RuntimeError"}, {"message", error.what()}};
    } catch (const std::exception&) {  // BadScript, std::out_of_range from words.at()
      std::cerr << "bad command: " << line << "\n";
      return 2;
    }
    std::cout << dump(out) << std::endl;
  }
  return 0;
}

// Loads one state text into a fresh history, float first, then double.
Json load(const std::string& text) {
  std::string first_error;
  const auto attempt = [&](auto history) -> std::optional<Json> {
    try {
      history.load_state_dict(text);
    } catch (const std::invalid_argument& error) {
      if (first_error.empty()) first_error = error.what();
      return std::nullopt;
    }
    return Json{{"ok", Json::parse(history.state_dict())}, {"inputs", history.num_tasks() ? inputs(history) : Json()}};
  };
  if (auto out = attempt(dwa::History())) return *out;
  if (auto out = attempt(dwa::History64())) return *out;
  return {{"error", first_error}};
}

int loader() {
  for (std::string header; std::getline(std::cin, header);) {
    std::string text(static_cast<std::size_t>(std::stoull(header)), '\0');  // a bad header: exit 2 in main()
    std::cin.read(text.data(), static_cast<std::streamsize>(text.size()));
    std::cout << dump(load(text)) << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "loader") return loader();
    bool float64 = false;
    std::vector<std::string> tasks;
    dwa::NanStrategy nan = dwa::NanStrategy::kError;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "float64") {
        float64 = true;
      } else if (arg == "nan=error" || arg == "nan=warn" || arg == "nan=ignore") {
        nan = arg == "nan=error" ? dwa::NanStrategy::kError
              : arg == "nan=warn" ? dwa::NanStrategy::kWarn
                                  : dwa::NanStrategy::kIgnore;
      } else if (arg.rfind("tasks=", 0) == 0) {
        std::stringstream names(arg.substr(6));
        for (std::string name; std::getline(names, name, ',');) tasks.push_back(name);
      } else {
        throw BadScript();
      }
    }
    if (float64) return tasks.empty() ? drive(dwa::History64(0, nan)) : drive(dwa::History64(tasks, nan));
    return tasks.empty() ? drive(dwa::History(0, nan)) : drive(dwa::History(tasks, nan));
  } catch (const std::exception& error) {
    std::cerr << "history_driver: " << error.what() << "\n";
    return 2;
  }
}
