// Drives dwa::History from a command script on stdin, one JSON line out per
// command, so that tests/test_cpp.py can replay the same script through the
// Python DWAHistory and NumpyDWAHistory and compare results, states and error
// messages.
//
//   history_driver [float64] [tasks=a,b,c]      float64: dwa::History64; tasks: named tasks
//   history_driver loader                       load states: each "<byte count>\n<bytes>" on stdin
//                                               into a fresh dwa::History, else dwa::History64, and print
//                                               {"ok": <state_dict()>, "inputs": ...} or {"error": message}
//
// Commands: record v1 v2 ... [weight=W]         one row of K losses
//           rows R v1 ... v(R*K) [weight=W]     R rows
//           roww R w1 ... wR v1 ... v(R*K)      R rows, one weight each
//           step | discard | reset | inputs | ready | state | log | load <json>
#include <dwa/history.hpp>

#include <iostream>
#include <sstream>
#include <string>

namespace {

std::string quote(const std::string& text) { return dwa::json::dump_string(text); }

template <typename T>
std::string list(const std::vector<T>& values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i)
    out += (i ? ", " : "") + dwa::json::dump_float(static_cast<double>(values[i]));
  return out + "]";
}

template <typename Scalar>
std::string run(dwa::BasicHistory<Scalar>& history, const std::string& line) {
  std::istringstream words(line);
  std::string command;
  words >> command;
  std::string result = "null";
  std::vector<std::string> rest;
  for (std::string word; words >> word;) rest.push_back(word);
  std::optional<double> weight;
  std::vector<Scalar> values;
  std::vector<double> row_weights;
  std::size_t rows = 1;
  std::size_t first = 0;
  if (command == "rows" || command == "roww") rows = std::stoul(rest.at(0)), first = 1;
  if (command == "roww") {
    for (std::size_t r = 0; r < rows; ++r) row_weights.push_back(std::stod(rest.at(1 + r)));
    first += rows;
  }
  const bool records = command == "record" || command == "rows" || command == "roww";
  for (std::size_t i = first; records && i < rest.size(); ++i) {
    if (rest[i].rfind("weight=", 0) == 0)
      weight = std::stod(rest[i].substr(7));
    else
      values.push_back(static_cast<Scalar>(std::stod(rest[i])));
  }
  if (command == "record" || command == "rows") {
    history.record(values.data(), rows, values.size() / rows, weight);
  } else if (command == "roww") {
    history.record(values.data(), rows, values.size() / rows, row_weights.data());
  } else if (command == "step") {
    history.step();
  } else if (command == "discard") {
    history.discard_epoch();
  } else if (command == "reset") {
    history.reset();
  } else if (command == "inputs") {
    auto [loss_t1, loss_t2] = history.inputs();
    result = "[" + list(loss_t1) + ", " + list(loss_t2) + "]";
  } else if (command == "ready") {
    result = history.ready() ? "true" : "false";
  } else if (command == "state") {
    result = history.state_dict();
  } else if (command == "log") {
    result = "[";
    for (std::size_t i = 0; i < history.log().size(); ++i) {
      const auto& entry = history.log()[i];
      result += (i ? ", " : "") + std::string("{\"epoch\": ") + std::to_string(i) + ", \"averages\": " +
                list(entry.averages) + ", \"batches\": " + std::to_string(entry.batches) +
                ", \"weight\": " + dwa::json::dump_float(entry.weight) + "}";
    }
    result += "]";
  } else if (command == "load") {
    history.load_state_dict(line.substr(line.find(' ') + 1));
  } else {
    throw std::logic_error("unknown command: " + command);
  }
  return result;
}

template <typename Scalar>
int drive(dwa::BasicHistory<Scalar> history) {
  std::string line;
  while (std::getline(std::cin, line)) {
    try {
      const std::string result = run(history, line);  // before anything is written: it may throw
      std::cout << "{\"ok\": " << result << "}" << std::endl;
    } catch (const dwa::LossHistoryError& error) {
      std::cout << "{\"error\": \"LossHistoryError\", \"task\": "
                << (error.task ? std::to_string(*error.task) : "null") << ", \"message\": " << quote(error.what())
                << "}" << std::endl;
    } catch (const std::invalid_argument& error) {
      std::cout << "{\"error\": \"ValueError\", \"message\": " << quote(error.what()) << "}" << std::endl;
    } catch (const std::logic_error& error) {
      std::cerr << error.what() << "\n";
      return 2;
    } catch (const std::runtime_error& error) {
      std::cout << "{\"error\": \"RuntimeError\", \"message\": " << quote(error.what()) << "}" << std::endl;
    }
  }
  return 0;
}

// Loads one state text into a fresh history of either accumulator type.
std::string load(const std::string& text) {
  std::string first_error;
  for (int attempt = 0; attempt < 2; ++attempt) {
    try {
      std::string inputs = "null";
      std::string state;
      const auto try_with = [&](auto history) {
        history.load_state_dict(text);
        state = history.state_dict();
        if (history.num_tasks()) {
          auto [loss_t1, loss_t2] = history.inputs();
          inputs = "[" + list(loss_t1) + ", " + list(loss_t2) + "]";
        }
      };
      if (attempt == 0)
        try_with(dwa::History());
      else
        try_with(dwa::History64());
      return "{\"ok\": " + state + ", \"inputs\": " + inputs + "}";
    } catch (const std::invalid_argument& error) {
      if (attempt == 0) first_error = error.what();
    }
  }
  return "{\"error\": " + quote(first_error) + "}";
}

int loader() {
  std::string header;
  while (std::getline(std::cin, header)) {
    std::string text(std::stoul(header), '\0');
    std::cin.read(text.data(), static_cast<std::streamsize>(text.size()));
    std::cout << load(text) << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "loader") return loader();
  bool float64 = false;
  std::vector<std::string> tasks;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "float64") {
      float64 = true;
    } else if (arg.rfind("tasks=", 0) == 0) {
      std::stringstream names(arg.substr(6));
      for (std::string name; std::getline(names, name, ',');) tasks.push_back(name);
    }
  }
  if (float64) return tasks.empty() ? drive(dwa::History64()) : drive(dwa::History64(tasks));
  return tasks.empty() ? drive(dwa::History()) : drive(dwa::History(tasks));
}
