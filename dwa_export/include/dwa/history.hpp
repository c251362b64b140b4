// dwa/history.hpp: the DWA loss history for C++ trainers (header-only, C++17).
//
// The same rules as dwa_export.DWAHistory in Python: record() per batch,
// step() once per epoch, validation with the same messages, warm-up, and the
// same checkpoint format (the JSON of DWAHistory.state_dict(), so checkpoints
// move between Python and C++). Find this header with
//     python -c "import dwa_export; print(dwa_export.include_dir())"
//
//     dwa::History history;                       // float sums, like DWAHistory for float32 losses
//     history.record(losses_of_this_batch);       // std::vector<float> of K losses
//     history.step();                             // once per epoch; throws dwa::LossHistoryError
//     auto [loss_t1, loss_t2] = history.inputs(); // feed the kernel (ones during warm-up)
//
// Epoch average: L_k = sum_b w_b * l_bk / sum_b w_b (w_b = 1 unless a weight is
// given). step() rolls L(t-2) <- L(t-1) <- L and rejects an average that is NaN
// or infinite, zero, or of another sign than the previous epoch's, leaving the
// history and the running sums exactly as they were.
//
// Checkpoint format (state_dict() / load_state_dict(), JSON):
//   {"format": "dwa_export.history", "version": 1,
//    "num_tasks": K or null,           "averages": [[K numbers], ...] (0-2, oldest first),
//    "dtype": "float32" | "float64" | null (accumulator), "epoch_sum": [K numbers] or null,
//    "epoch_weight": number, "epoch_tensor_weight": number or null}
// Numbers are written so that they read back exactly; NaN and Infinity are
// written as Python's json module does.

#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace dwa {

// An epoch average that DWA cannot use; thrown by step(). Nothing was changed.
class LossHistoryError : public std::invalid_argument {
 public:
  LossHistoryError(const std::string& message, std::optional<std::size_t> task, std::vector<double> average,
                   std::optional<std::vector<double>> previous)
      : std::invalid_argument(message), task(task), average(std::move(average)), previous(std::move(previous)) {}
  std::optional<std::size_t> task;  // empty for a problem with the batch weights
  std::vector<double> average;
  std::optional<std::vector<double>> previous;
};

namespace detail {

// Python's repr(float): shortest round-trip digits, scientific below 1e-4 and from 1e16.
inline std::string py_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const double magnitude = std::fabs(value);
  const bool scientific = magnitude != 0.0 && (magnitude < 1e-4 || magnitude >= 1e16);
  auto result = std::to_chars(buffer, buffer + sizeof buffer, value,
                              scientific ? std::chars_format::scientific : std::chars_format::fixed);
  std::string text(buffer, result.ptr);
  if (!scientific && text.find('.') == std::string::npos) text += ".0";
  return text;
}

// Python's format(value, ".6g").
inline std::string g6(double value) {
  if (std::isnan(value)) return "nan";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.6g", value);
  return buffer;
}

inline std::string format_list(const std::vector<double>& values) {
  std::string text = "[";
  for (std::size_t i = 0; i < values.size(); ++i) text += (i ? ", " : "") + g6(values[i]);
  return text + "]";
}

inline std::string json_number(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  return py_repr(value);
}

// A JSON value; enough for the checkpoint format.
struct Json {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  bool integer = false;  // a number written without '.', 'e' or 'E'
  std::string text;      // the string, or the number's source text
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;

  const Json* find(const std::string& key) const {
    for (const auto& member : members)
      if (member.first == key) return &member.second;
    return nullptr;
  }
  // Python-like rendering for error messages.
  std::string repr() const {
    switch (kind) {
      case Kind::Null: return "None";
      case Kind::Bool: return boolean ? "True" : "False";
      case Kind::Number: return integer ? text : py_repr(number);
      case Kind::String: return "'" + text + "'";
      case Kind::Array: {
        std::string out = "[";
        for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i].repr();
        return out + "]";
      }
      case Kind::Object: {
        std::string out = "{";
        for (std::size_t i = 0; i < members.size(); ++i)
          out += (i ? ", '" : "'") + members[i].first + "': " + members[i].second.repr();
        return out + "}";
      }
    }
    return "";
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  Json parse() {
    Json value = parse_value();
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("malformed DWA history state_dict: not valid JSON (" + what + " at offset " +
                                std::to_string(pos_) + ")");
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' || text_[pos_] == '\t'))
      ++pos_;
  }
  bool consume(const char* word) {
    const std::string token(word);
    if (text_.compare(pos_, token.size(), token) == 0) {
      pos_ += token.size();
      return true;
    }
    return false;
  }
  Json parse_value() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    Json value;
    const char c = text_[pos_];
    if (c == '{') {
      value.kind = Json::Kind::Object;
      ++pos_;
      skip_space();
      if (pos_ < text_.size() && text_[pos_] == '}') return ++pos_, value;
      while (true) {
        skip_space();
        Json key = parse_value();
        if (key.kind != Json::Kind::String) fail("expected a string key");
        skip_space();
        if (!consume(":")) fail("expected ':'");
        value.members.emplace_back(key.text, parse_value());
        skip_space();
        if (consume(",")) continue;
        if (consume("}")) return value;
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      value.kind = Json::Kind::Array;
      ++pos_;
      skip_space();
      if (pos_ < text_.size() && text_[pos_] == ']') return ++pos_, value;
      while (true) {
        value.items.push_back(parse_value());
        skip_space();
        if (consume(",")) continue;
        if (consume("]")) return value;
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      value.kind = Json::Kind::String;
      ++pos_;
      while (pos_ < text_.size() && text_[pos_] != '"') {
        if (text_[pos_] == '\\') {
          if (++pos_ >= text_.size()) fail("bad escape");
        }
        value.text += text_[pos_++];
      }
      if (pos_ >= text_.size()) fail("unterminated string");
      ++pos_;
      return value;
    }
    if (consume("null")) return value;
    if (consume("true") || consume("false")) {
      value.kind = Json::Kind::Bool;
      value.boolean = text_[pos_ - 1] == 'e' && text_[pos_ - 2] == 'u';  // "true", not "false"
      return value;
    }
    value.kind = Json::Kind::Number;
    // Python's json module writes these for non-finite floats.
    for (const auto& [word, number] : {std::pair{"NaN", NAN}, {"Infinity", INFINITY}, {"-Infinity", -INFINITY}}) {
      if (consume(word)) {
        value.number = number;
        return value;
      }
    }
    const std::size_t start = pos_;
    while (pos_ < text_.size() && std::string("+-0123456789.eE").find(text_[pos_]) != std::string::npos) ++pos_;
    value.text = text_.substr(start, pos_ - start);
    if (value.text.empty()) fail("unexpected character");
    value.integer = value.text.find_first_of(".eE") == std::string::npos;
    const char* first = text_.data() + start;
    const auto result = std::from_chars(first, text_.data() + pos_, value.number);
    if (result.ec != std::errc() || result.ptr != text_.data() + pos_) fail("bad number");
    return value;
  }

  const std::string& text_;
  std::size_t pos_ = 0;
};

inline const std::string& remedy() {
  static const std::string text =
      "The epoch was not added to the history and nothing was lost: call discard_epoch() to drop this epoch's "
      "batches, or reset() to restart the warm-up.";
  return text;
}

inline void check_epoch_average(const std::vector<double>& average, const std::vector<double>* previous) {
  const auto prev = previous ? std::optional<std::vector<double>>(*previous) : std::nullopt;
  for (std::size_t task = 0; task < average.size(); ++task) {
    const double value = average[task];
    const std::string head = "epoch-average loss of task " + std::to_string(task);
    if (!std::isfinite(value))
      throw LossHistoryError(head + " is " + py_repr(value) + " (all tasks: " + format_list(average) +
                                 "): a NaN or infinite loss was recorded this epoch. " + remedy(),
                             task, average, prev);
    if (value == 0.0)
      throw LossHistoryError(head + " is 0.0 (all tasks: " + format_list(average) +
                                 "): DWA divides by it to get next epoch's rate L(t-1)/L(t-2). Offset that task's "
                                 "loss so that it stays away from zero. " +
                                 remedy(),
                             task, average, prev);
    if (previous && ((value > 0.0) != ((*previous)[task] > 0.0)))
      throw LossHistoryError(head + " changed sign from " + g6((*previous)[task]) + " to " + g6(value) +
                                 " (all tasks: " + format_list(average) +
                                 "): the rate L(t-1)/L(t-2) would be negative, which DWA cannot read as a rate of "
                                 "decrease. Offset that task's loss so that it keeps one sign. " +
                                 remedy(),
                             task, average, prev);
  }
}

[[noreturn]] inline void bad_state(const std::string& message) {
  throw std::invalid_argument("malformed DWA history state_dict: " + message);
}

}  // namespace detail

// The DWA loss history; Scalar is the accumulator and inputs() type (float or double).
template <typename Scalar>
class BasicHistory {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "Scalar must be float or double");

 public:
  // num_tasks: K, or 0 to let the first record() fix it.
  explicit BasicHistory(std::int64_t num_tasks = 0) {
    if (num_tasks < 0)
      throw std::invalid_argument("num_tasks must be a positive int (the number K of task losses), got " +
                                  std::to_string(num_tasks));
    fixed_num_tasks_ = static_cast<std::size_t>(num_tasks);
    num_tasks_ = fixed_num_tasks_;
  }

  static constexpr const char* dtype() { return std::is_same_v<Scalar, float> ? "float32" : "float64"; }

  // K, or 0 while unknown.
  std::size_t num_tasks() const { return num_tasks_; }
  // Whether two epoch averages exist (the weights are past the warm-up).
  bool ready() const { return averages_.size() == 2; }
  // The stored epoch averages, oldest first (at most two).
  const std::vector<std::vector<double>>& averages() const { return averages_; }

  // Adds one batch: `rows` rows of `num_tasks` losses each (row-major), every
  // row with weight `weight` (e.g. the batch size; 1 if not given).
  void record(const Scalar* losses, std::size_t rows, std::size_t num_tasks, std::optional<double> weight = std::nullopt) {
    if (num_tasks == 0 || rows == 0)
      throw std::invalid_argument("losses must have shape [..., K] with K >= 1 and at least one row, got " +
                                  std::to_string(rows) + " rows of " + std::to_string(num_tasks));
    check_num_tasks(num_tasks);
    if (weight && !(std::isfinite(*weight) && *weight >= 0.0))
      throw std::invalid_argument("weight must be finite and >= 0 (e.g. the batch size), got " + detail::py_repr(*weight));
    if (!sum_) sum_.emplace(num_tasks, Scalar(0));
    std::vector<Scalar>& sum = *sum_;
    std::vector<Scalar> rows_sum(losses, losses + num_tasks);
    for (std::size_t r = 1; r < rows; ++r)
      for (std::size_t k = 0; k < num_tasks; ++k) rows_sum[k] += losses[r * num_tasks + k];
    if (weight) {
      const auto alpha = static_cast<Scalar>(*weight);
      for (std::size_t k = 0; k < num_tasks; ++k) sum[k] += alpha * rows_sum[k];
      weight_ += *weight * static_cast<double>(rows);
    } else {
      for (std::size_t k = 0; k < num_tasks; ++k) sum[k] += rows_sum[k];
      weight_ += static_cast<double>(rows);
    }
  }

  // Adds one batch of K losses.
  void record(const std::vector<Scalar>& losses, std::optional<double> weight = std::nullopt) {
    record(losses.data(), 1, losses.size(), weight);
  }

  // Closes the epoch: averages what was recorded and rolls the history. A no-op
  // when nothing was recorded. Throws LossHistoryError, changing nothing.
  void step() {
    if (!sum_) return;
    if (weight_ == 0.0) return discard_epoch();
    std::vector<double> sums(sum_->begin(), sum_->end());
    const std::vector<double>* previous = averages_.empty() ? nullptr : &averages_.back();
    if (!(std::isfinite(weight_) && weight_ > 0.0))
      throw LossHistoryError("the batch weights recorded this epoch sum to " + detail::py_repr(weight_) +
                                 "; they must be finite and >= 0. " + detail::remedy(),
                             std::nullopt, sums, previous ? std::optional(*previous) : std::nullopt);
    std::vector<double> average(sums.size());
    for (std::size_t k = 0; k < sums.size(); ++k) average[k] = sums[k] / weight_;
    detail::check_epoch_average(average, previous);
    averages_.push_back(std::move(average));
    if (averages_.size() > 2) averages_.erase(averages_.begin());
    discard_epoch();
  }

  // Drops what was recorded since the last step(); the history stays.
  void discard_epoch() {
    if (sum_) std::fill(sum_->begin(), sum_->end(), Scalar(0));
    weight_ = 0.0;
  }

  // Forgets everything: history, this epoch's batches, and a K learned from data.
  void reset() {
    num_tasks_ = fixed_num_tasks_;
    averages_.clear();
    sum_.reset();
    weight_ = 0.0;
  }

  // (L(t-1), L(t-2)) for the kernel; all ones (exactly uniform weights) during warm-up.
  std::pair<std::vector<Scalar>, std::vector<Scalar>> inputs() const {
    if (num_tasks_ == 0)
      throw std::runtime_error(
          "the number of tasks is not known yet: record() a batch first, or pass num_tasks=K to the constructor");
    if (!ready()) return {std::vector<Scalar>(num_tasks_, Scalar(1)), std::vector<Scalar>(num_tasks_, Scalar(1))};
    return {std::vector<Scalar>(averages_[1].begin(), averages_[1].end()),
            std::vector<Scalar>(averages_[0].begin(), averages_[0].end())};
  }

  // The whole state, mid-epoch included, as JSON (the format of DWAHistory.state_dict()).
  std::string state_dict() const {
    auto list = [](const auto& values) {
      std::string out = "[";
      for (std::size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + detail::json_number(values[i]);
      return out + "]";
    };
    std::string averages = "[";
    for (std::size_t i = 0; i < averages_.size(); ++i) averages += (i ? ", " : "") + list(averages_[i]);
    averages += "]";
    std::ostringstream out;
    out << "{\"format\": \"dwa_export.history\", \"version\": 1, \"num_tasks\": "
        << (num_tasks_ ? std::to_string(num_tasks_) : "null") << ", \"averages\": " << averages
        << ", \"dtype\": " << (sum_ ? std::string("\"") + dtype() + "\"" : "null")
        << ", \"epoch_sum\": " << (sum_ ? list(*sum_) : "null") << ", \"epoch_weight\": " << detail::json_number(weight_)
        << ", \"epoch_tensor_weight\": null}";
    return out.str();
  }

  // Restores a state_dict() (from C++ or Python); throws std::invalid_argument,
  // changing nothing, if it is malformed or does not fit this history.
  void load_state_dict(const std::string& json) {
    using detail::bad_state;
    using Kind = detail::Json::Kind;
    const detail::Json state = detail::JsonParser(json).parse();
    if (state.kind != Kind::Object) bad_state("expected a dict from state_dict(), got " + state.repr());
    const auto field = [&](const char* key) -> const detail::Json* { return state.find(key); };
    const auto repr_of = [&](const char* key) { return field(key) ? field(key)->repr() : std::string("None"); };
    if (!field("format") || field("format")->kind != Kind::String || field("format")->text != "dwa_export.history")
      bad_state("'format' is " + repr_of("format") + ", expected 'dwa_export.history'");
    if (!field("version") || field("version")->kind != Kind::Number || !field("version")->integer ||
        field("version")->number != 1)
      bad_state("'version' is " + repr_of("version") + "; this dwa_export reads version 1");
    static const char* keys[] = {"format", "version", "num_tasks", "averages", "dtype", "epoch_sum", "epoch_weight",
                                 "epoch_tensor_weight"};
    for (const char* key : keys)
      if (!field(key)) bad_state(std::string("missing key '") + key + "'");
    if (state.members.size() != std::size(keys)) bad_state("unexpected keys besides the 8 of the format");

    const detail::Json& k = *field("num_tasks");
    std::size_t num_tasks = 0;
    if (k.kind != Kind::Null) {
      if (k.kind != Kind::Number || !k.integer || k.number < 1)
        bad_state("num_tasks must be a positive int (the number K of task losses), got " + k.repr());
      num_tasks = static_cast<std::size_t>(k.number);
    }
    if (fixed_num_tasks_ && num_tasks != fixed_num_tasks_)
      throw std::invalid_argument("the checkpoint holds K=" + (num_tasks ? std::to_string(num_tasks) : "None") +
                                  " tasks but this history was created with num_tasks=" +
                                  std::to_string(fixed_num_tasks_));
    const auto numbers = [&](const detail::Json& value, const std::string& what) {
      if (value.kind != Kind::Array || value.items.size() != num_tasks)
        bad_state(what + " must be a list of " + std::to_string(num_tasks) + " numbers, got " + value.repr());
      std::vector<double> out;
      for (const auto& item : value.items) {
        if (item.kind != Kind::Number)
          bad_state(what + " must be a list of " + std::to_string(num_tasks) + " numbers, got " + value.repr());
        out.push_back(item.number);
      }
      return out;
    };

    const detail::Json& stored = *field("averages");
    if (stored.kind != Kind::Array || stored.items.size() > 2)
      bad_state("'averages' must be a list of at most 2 epoch averages, got " + stored.repr());
    if (!stored.items.empty() && !num_tasks) bad_state("'averages' is not empty but 'num_tasks' is None");
    std::vector<std::vector<double>> averages;
    for (std::size_t i = 0; i < stored.items.size(); ++i) {
      averages.push_back(numbers(stored.items[i], "each entry of 'averages'"));
      try {
        detail::check_epoch_average(averages.back(), i ? &averages[i - 1] : nullptr);
      } catch (const LossHistoryError& error) {
        bad_state("stored average " + std::to_string(i) + ": " + error.what());
      }
    }

    std::optional<std::vector<Scalar>> sum;
    const detail::Json& epoch_sum = *field("epoch_sum");
    const detail::Json& dtype_field = *field("dtype");
    if (epoch_sum.kind != Kind::Null) {
      if (!num_tasks) bad_state("'epoch_sum' is set but 'num_tasks' is None");
      const std::vector<double> values = numbers(epoch_sum, "'epoch_sum'");
      if (dtype_field.kind != Kind::String)
        bad_state("'dtype' must name the accumulator dtype when 'epoch_sum' is set, got " + dtype_field.repr());
      if (dtype_field.text != dtype())
        throw std::invalid_argument("the checkpoint accumulates in " + dtype_field.text + " but this history in " +
                                    dtype() + "; use dwa::BasicHistory<" +
                                    (dtype_field.text == "float64" ? "double" : "float") + "> to resume it exactly");
      sum.emplace(values.begin(), values.end());
    } else if (dtype_field.kind != Kind::Null && dtype_field.kind != Kind::String) {
      bad_state("'dtype' must be a string or None, got " + dtype_field.repr());
    }
    const detail::Json& w = *field("epoch_weight");
    if (w.kind != Kind::Number || !(w.number >= 0.0)) bad_state("'epoch_weight' must be a number >= 0, got " + w.repr());
    const detail::Json& tw = *field("epoch_tensor_weight");
    if (tw.kind != Kind::Null && tw.kind != Kind::Number)
      bad_state("'epoch_tensor_weight' must be a number or None, got " + tw.repr());
    const double tensor_weight = tw.kind == Kind::Number ? tw.number : 0.0;
    if (!sum && (w.number != 0.0 || tensor_weight != 0.0)) bad_state("a non-zero epoch weight without an 'epoch_sum'");

    // Everything validated: assign.
    num_tasks_ = num_tasks;
    averages_ = std::move(averages);
    sum_ = std::move(sum);
    weight_ = w.number + tensor_weight;
  }

 private:
  void check_num_tasks(std::size_t num_tasks) {
    if (num_tasks_ == 0) {
      num_tasks_ = num_tasks;
    } else if (num_tasks != num_tasks_) {
      const std::string fix = fixed_num_tasks_
                                  ? "this history was created with num_tasks=" + std::to_string(fixed_num_tasks_) +
                                        "; create a new one"
                                  : "call reset() first to start a new history with a different K";
      throw std::invalid_argument("losses have " + std::to_string(num_tasks) +
                                  " tasks in their last dimension but this history has K=" +
                                  std::to_string(num_tasks_) + "; " + fix);
    }
  }

  std::size_t fixed_num_tasks_ = 0;
  std::size_t num_tasks_ = 0;
  std::vector<std::vector<double>> averages_;
  std::optional<std::vector<Scalar>> sum_;
  double weight_ = 0.0;
};

using History = BasicHistory<float>;
using History64 = BasicHistory<double>;

}  // namespace dwa
