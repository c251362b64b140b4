// Drives dwa::History from a command script on stdin, one JSON line out per
// command, so that tests/test_cpp.py can replay the same script through the
// Python DWAHistory and compare results, states and error messages.
//
// Commands: record v1 v2 ... [weight=W] | step | discard | reset | inputs |
//           ready | state | load <json>
#include <dwa/history.hpp>

#include <iostream>
#include <sstream>
#include <string>

namespace {

std::string quote(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

template <typename T>
std::string list(const std::vector<T>& values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + dwa::detail::json_number(values[i]);
  return out + "]";
}

}  // namespace

int main() {
  dwa::History history;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream words(line);
    std::string command;
    words >> command;
    try {
      std::string result = "null";
      if (command == "record") {
        std::vector<float> losses;
        std::optional<double> weight;
        std::string word;
        while (words >> word) {
          if (word.rfind("weight=", 0) == 0)
            weight = std::stod(word.substr(7));
          else
            losses.push_back(std::stof(word));
        }
        history.record(losses, weight);
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
      } else if (command == "load") {
        history.load_state_dict(line.substr(line.find(' ') + 1));
      } else {
        std::cerr << "unknown command: " << command << "\n";
        return 2;
      }
      std::cout << "{\"ok\": " << result << "}" << std::endl;
    } catch (const dwa::LossHistoryError& error) {
      std::cout << "{\"error\": \"LossHistoryError\", \"task\": "
                << (error.task ? std::to_string(*error.task) : "null") << ", \"message\": " << quote(error.what())
                << "}" << std::endl;
    } catch (const std::invalid_argument& error) {
      std::cout << "{\"error\": \"ValueError\", \"message\": " << quote(error.what()) << "}" << std::endl;
    } catch (const std::runtime_error& error) {
      std::cout << "{\"error\": \"RuntimeError\", \"message\": " << quote(error.what()) << "}" << std::endl;
    }
  }
  return 0;
}
