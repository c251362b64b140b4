// dwa/history.hpp: the DWA loss history for C++ trainers (header-only, C++17).
//
// The same rules as dwa_export.DWAHistory in Python: record() per batch,
// step() once per epoch, validation with the same messages, warm-up, the
// per-epoch log, and the same checkpoint format (the JSON of
// DWAHistory.state_dict(), written as Python's json.dumps writes it, so
// checkpoints move between Python, NumPy and C++). Find this header with
//     python -c "import dwa_export; print(dwa_export.include_dir())"
//
//     dwa::History history;                       // float sums, like DWAHistory for float32 losses
//     history.record(losses_of_this_batch);       // std::vector<float> of K losses
//     history.step();                             // once per epoch; throws dwa::LossHistoryError
//     auto [loss_t1, loss_t2] = history.inputs(); // feed the kernel (ones during warm-up)
//
// Epoch average: L_k = sum_r w_r * l_rk / sum_r w_r over the rows r recorded this
// epoch. Sample weighting, one rule: every row of K losses has one weight. One
// row (a [K] batch) may take a number, e.g. the batch size for batch-mean
// losses; several rows (per-sample losses) count once each, or take one weight
// per row; a single number for several rows is refused as ambiguous.
// step() rolls L(t-2) <- L(t-1) <- L and rejects an average that is NaN or
// infinite, zero, or of another sign than the previous epoch's, leaving the
// history and the running sums exactly as they were.
//
// Checkpoint format, version 2 (version 1 still loads; see dwa_export/_history_core.py):
//   {"format": "dwa_export.history", "version": 2,
//    "num_tasks": K or null, "tasks": [K names] or null,
//    "averages": [[K numbers], ...] (0-2, oldest first),
//    "partial": null or [rank or null, world_size, "float32" | "float64", batches, weight, [K sums]],
//    "log": {"batches": [ints], "weight": [numbers], "averages": [[K numbers], ...]}}
// A C++ history is one process: it writes rank null and world_size 1, and
// refuses a running epoch that belongs to one rank of several processes.

#pragma once

#include <dwa/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace dwa {

// An epoch that DWA cannot use; thrown by step(). Nothing was changed.
class LossHistoryError : public std::invalid_argument {
 public:
  LossHistoryError(const std::string& message, std::optional<std::size_t> task, std::vector<double> average,
                   std::optional<std::vector<double>> previous)
      : std::invalid_argument(message), task(task), average(std::move(average)), previous(std::move(previous)) {}
  std::optional<std::size_t> task;  // empty for a problem with the batch weights
  std::vector<double> average;
  std::optional<std::vector<double>> previous;
};

// One entry of the per-epoch log: what a successful step() averaged.
struct LogEntry {
  std::int64_t batches;
  double weight;
  std::vector<double> averages;
};

constexpr std::int64_t kMaxTasks = std::int64_t{1} << 20;
constexpr std::int64_t kMaxWorldSize = std::int64_t{1} << 24;
constexpr std::int64_t kMaxCount = std::int64_t{1} << 53;

namespace detail {

using json::Value;
using Kind = json::Value::Kind;

// Python's format(value, ".6g").
inline std::string g6(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.6g", value);
  return buffer;
}

inline std::string format_list(const std::vector<double>& values) {
  std::string text = "[";
  for (std::size_t i = 0; i < values.size(); ++i) text += (i ? ", " : "") + g6(values[i]);
  return text + "]";
}

// Python's repr() of a list of strings.
inline std::string names_repr(const std::vector<std::string>& names) {
  std::string text = "[";
  for (std::size_t i = 0; i < names.size(); ++i) text += (i ? ", " : "") + json::detail::str_repr(names[i]);
  return text + "]";
}

// The message form of a value from a state: repr(), or a summary of a long one
// (dwa_export._history_core._short).
inline std::string shorten(const std::string& text, Kind kind, std::size_t size) {
  if (text.size() <= 120) return text;
  if (kind == Kind::Array) return "a list of " + std::to_string(size) + " items";
  if (kind == Kind::Object) return "a dict of " + std::to_string(size) + " items";
  return text.substr(0, 120) + "...";
}

inline std::string short_repr(const Value& value) {
  return shorten(json::repr(value), value.kind, value.kind == Kind::Object ? value.members.size() : value.items.size());
}

inline std::string short_names(const std::vector<std::string>& names) {
  return shorten(names_repr(names), Kind::Array, names.size());
}

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
      throw LossHistoryError(head + " is " + json::float_repr(value) + " (all tasks: " + format_list(average) +
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

inline std::string num_tasks_message(const std::string& got) {
  return "num_tasks must be a positive int (the number K of task losses, at most " + std::to_string(kMaxTasks) +
         "), got " + got;
}

// Task names: distinct, non-empty UTF-8 strings, one per task (check_tasks in Python).
inline void check_tasks(const std::vector<std::string>& names, std::optional<std::size_t> num_tasks) {
  for (const auto& name : names)
    if (name.empty() || !json::is_utf8(name))
      throw std::invalid_argument("each task name must be a non-empty string, got " +
                                  shorten(json::detail::str_repr(name), Kind::String, 0) + " in " +
                                  short_names(names));
  if (std::set<std::string>(names.begin(), names.end()).size() != names.size())
    throw std::invalid_argument("task names must be distinct, got " + short_names(names));
  if (names.empty() || static_cast<std::int64_t>(names.size()) > kMaxTasks)
    throw std::invalid_argument(num_tasks_message(std::to_string(names.size())));
  if (num_tasks && *num_tasks != names.size())
    throw std::invalid_argument("num_tasks=" + std::to_string(*num_tasks) + " but " + std::to_string(names.size()) +
                                " task names were given: " + short_names(names));
}

// A running epoch as saved: dwa_export._history_core.Partial.
struct Partial {
  std::optional<std::int64_t> rank;  // empty: the whole group's running epoch
  std::int64_t world_size = 1;
  std::string dtype;
  std::int64_t batches = 0;
  double weight = 0.0;
  std::vector<double> sums;
};

struct ParsedState {
  std::size_t num_tasks = 0;
  std::optional<std::vector<std::string>> tasks;
  std::vector<std::vector<double>> averages;
  std::optional<Partial> partial;
  std::vector<LogEntry> log;
};

inline double to_float(const Value& value, const std::string& what) {
  const std::optional<double> number = value.as_double();
  if (!number) bad_state(what + " holds " + short_repr(value) + ", which is beyond the float range");
  return *number;
}

inline std::vector<double> float_list(const Value& value, std::size_t length, const std::string& what,
                                      bool finite = true) {
  bool ok = value.kind == Kind::Array && value.items.size() == length;
  for (std::size_t i = 0; ok && i < value.items.size(); ++i) ok = value.items[i].is_number();
  if (!ok) bad_state(what + " must be a list of " + std::to_string(length) + " numbers, got " + short_repr(value));
  std::vector<double> out;
  out.reserve(length);
  for (const auto& item : value.items) out.push_back(to_float(item, what));
  if (finite && !std::all_of(out.begin(), out.end(), [](double v) { return std::isfinite(v); }))
    bad_state(what + " must hold finite numbers, got " + format_list(out));
  return out;
}

inline std::int64_t count(const Value& value, const std::string& what, std::int64_t low = 0,
                          std::int64_t high = kMaxCount) {
  const std::optional<std::int64_t> number = value.as_int64();
  if (!number || *number < low || *number > high)
    bad_state(what + " must be an int from " + std::to_string(low) + " to " + std::to_string(high) + ", got " +
              short_repr(value));
  return *number;
}

inline void check_averages(const std::vector<std::vector<double>>& averages, const std::string& what) {
  for (std::size_t i = 0; i < averages.size(); ++i) {
    try {
      check_epoch_average(averages[i], i ? &averages[i - 1] : nullptr);
    } catch (const LossHistoryError& error) {
      bad_state(what + " " + std::to_string(i) + ": " + error.what());
    }
  }
}

inline std::optional<std::size_t> parse_num_tasks(const Value& value) {
  if (value.is_null()) return std::nullopt;
  const std::optional<std::int64_t> number = value.as_int64();
  if (!number || *number < 1 || *number > kMaxTasks)
    bad_state("'num_tasks' must be None or an int from 1 to " + std::to_string(kMaxTasks) + ", got " +
              short_repr(value));
  return static_cast<std::size_t>(*number);
}

// double -> Scalar as an IEEE cast rounds (what torch's .to() and NumPy's astype do):
// beyond the float range the result is +-inf, where a plain static_cast would be
// undefined behaviour.
template <typename Scalar>
Scalar narrow(double value) {
  if constexpr (std::is_same_v<Scalar, double>) {
    return value;
  } else {
    constexpr double kMax = static_cast<double>(std::numeric_limits<float>::max());
    constexpr double kHalfUlp = 0x1p103;  // half the spacing of floats at the top: ties round to inf
    if (std::isfinite(value) && std::fabs(value) > kMax) {
      const float magnitude = std::fabs(value) < kMax + kHalfUlp ? std::numeric_limits<float>::max()
                                                                  : std::numeric_limits<float>::infinity();
      return value > 0 ? magnitude : -magnitude;
    }
    return static_cast<float>(value);
  }
}

inline bool float32_exact(const std::vector<double>& values) {
  for (double v : values)
    if (!std::isnan(v) && static_cast<double>(narrow<float>(v)) != v) return false;
  return true;
}

inline std::optional<Partial> parse_partial(const Value& value, std::optional<std::size_t> num_tasks) {
  if (value.is_null()) return std::nullopt;
  if (value.kind != Kind::Array || value.items.size() != 6)
    bad_state("'partial' must be None or [rank, world_size, dtype, batches, weight, sums], got " + short_repr(value));
  const auto& item = value.items;
  Partial partial;
  partial.world_size = count(item[1], "the world_size in 'partial'", 1, kMaxWorldSize);
  if (!item[0].is_null()) {
    if (partial.world_size == 1)
      bad_state("the rank in 'partial' must be None for a single process (world_size 1), got " + short_repr(item[0]));
    partial.rank = count(item[0], "the rank in 'partial'", 0, partial.world_size - 1);
  }
  if (item[2].kind != Kind::String || (item[2].text != "float32" && item[2].text != "float64"))
    bad_state("the dtype in 'partial' must be one of ['float32', 'float64'], got " + short_repr(item[2]));
  partial.dtype = item[2].text;
  partial.batches = count(item[3], "the batch count in 'partial'", 1);
  if (!item[4].is_number()) bad_state("the weight in 'partial' must be a number, got " + short_repr(item[4]));
  partial.weight = to_float(item[4], "the weight in 'partial'") + 0.0;  // canonical: -0.0 is 0.0
  if (partial.weight < 0.0)
    bad_state("the weight in 'partial' must be >= 0 (or NaN/inf after an invalid per-row weight), got " +
              short_repr(item[4]));
  if (!num_tasks) bad_state("'partial' is set but 'num_tasks' is None");
  partial.sums = float_list(item[5], *num_tasks, "the sums in 'partial'", /*finite=*/false);
  if (partial.dtype == "float32" && !float32_exact(partial.sums))
    bad_state("the sums in 'partial' must be float32 values for dtype 'float32', got " + format_list(partial.sums));
  return partial;
}

inline std::vector<LogEntry> parse_log(const Value& value, std::optional<std::size_t> num_tasks) {
  const Value* batches = value.find("batches");
  const Value* weights = value.find("weight");
  const Value* averages = value.find("averages");
  if (value.kind != Kind::Object || value.members.size() != 3 || !batches || !weights || !averages)
    bad_state("'log' must be a dict with keys ['batches', 'weight', 'averages'], got " + short_repr(value));
  if (batches->kind != Kind::Array || weights->kind != Kind::Array || averages->kind != Kind::Array ||
      batches->items.size() != weights->items.size() || batches->items.size() != averages->items.size())
    bad_state("the columns of 'log' must be lists of one length, got " + short_repr(value));
  if (!batches->items.empty() && !num_tasks) bad_state("'log' is not empty but 'num_tasks' is None");
  std::vector<LogEntry> log;
  std::vector<std::vector<double>> log_averages;
  for (std::size_t i = 0; i < batches->items.size(); ++i) {
    const std::string index = "[" + std::to_string(i) + "]";
    LogEntry entry;
    entry.batches = count(batches->items[i], "log batches" + index, 1);
    const Value& weight = weights->items[i];
    if (!weight.is_number()) bad_state("log weight" + index + " must be a finite number > 0, got " + short_repr(weight));
    entry.weight = to_float(weight, "log weight");
    if (!(std::isfinite(entry.weight) && entry.weight > 0))
      bad_state("log weight" + index + " must be a finite number > 0, got " + short_repr(weight));
    entry.averages = float_list(averages->items[i], *num_tasks, "log averages" + index);
    log_averages.push_back(entry.averages);
    log.push_back(std::move(entry));
  }
  check_averages(log_averages, "log averages");
  return log;
}

// Raises unless `state` has exactly `keys`, listing both sides sorted, as Python does.
inline void check_keys(const Value& state, const std::vector<std::string>& keys, const std::string& suffix = "") {
  std::vector<std::string> missing, unexpected;
  for (const auto& key : keys)
    if (!state.find(key)) missing.push_back(key);
  for (const auto& member : state.members)
    if (std::find(keys.begin(), keys.end(), member.first) == keys.end()) unexpected.push_back(member.first);
  std::sort(missing.begin(), missing.end());
  std::sort(unexpected.begin(), unexpected.end());
  if (!missing.empty() || !unexpected.empty())
    bad_state("missing keys " + names_repr(missing) + ", unexpected keys " + names_repr(unexpected) + suffix);
}

// Version 1 (dwa_export 0.1) -> 2; see _migrate_v1 in dwa_export/_history_core.py.
inline Value migrate_v1(const Value& state, std::optional<Partial>& legacy) {
  check_keys(state,
             {"format", "version", "num_tasks", "averages", "dtype", "epoch_sum", "epoch_weight", "epoch_tensor_weight"},
             " (version 1)");
  const std::optional<std::size_t> num_tasks = parse_num_tasks(*state.find("num_tasks"));
  const Value& dtype = *state.find("dtype");
  if (!dtype.is_null() && (dtype.kind != Kind::String || (dtype.text != "float32" && dtype.text != "float64")))
    bad_state("'dtype' must be None or one of ['float32', 'float64'], got " + short_repr(dtype));
  const Value& weight = *state.find("epoch_weight");
  const Value& tensor_weight = *state.find("epoch_tensor_weight");
  if (!weight.is_number() || !(to_float(weight, "'epoch_weight'") >= 0.0))
    bad_state("'epoch_weight' must be a number >= 0, got " + short_repr(weight));
  if (!tensor_weight.is_null() && !tensor_weight.is_number())
    bad_state("'epoch_tensor_weight' must be a number or None, got " + short_repr(tensor_weight));
  const double total = to_float(weight, "'epoch_weight'") +
                       (tensor_weight.is_null() ? 0.0 : to_float(tensor_weight, "'epoch_tensor_weight'"));
  const Value& epoch_sum = *state.find("epoch_sum");
  if (!epoch_sum.is_null() && (total != 0.0 || !tensor_weight.is_null())) {
    Value as_partial = Value::array({Value(), Value::from_int(1), *state.find("dtype"), Value::from_int(1),
                                     Value::from_double(total), epoch_sum});
    legacy = parse_partial(as_partial, num_tasks);
  } else if (epoch_sum.is_null() && total != 0.0) {
    bad_state("a non-zero epoch weight without an 'epoch_sum'");
  }
  return Value::object({{"format", *state.find("format")},
                        {"version", Value::from_int(2)},
                        {"num_tasks", *state.find("num_tasks")},
                        {"tasks", Value()},
                        {"averages", *state.find("averages")},
                        {"partial", Value()},
                        {"log", Value::object({{"batches", Value::array()},
                                               {"weight", Value::array()},
                                               {"averages", Value::array()}})}});
}

// Validates a state completely against the format (parse_state in Python); changes nothing.
inline ParsedState parse_state(const Value& input, std::size_t fixed_num_tasks,
                               const std::optional<std::vector<std::string>>& fixed_tasks) {
  static const char* kKinds[] = {"NoneType", "bool", "int", "float", "str", "list", "dict"};
  if (input.kind != Kind::Object)
    bad_state(std::string("expected a dict from state_dict(), got ") + kKinds[static_cast<int>(input.kind)]);
  const Value* format = input.find("format");
  if (!format || format->kind != Kind::String || format->text != "dwa_export.history")
    bad_state("'format' is " + (format ? short_repr(*format) : "None") + ", expected 'dwa_export.history'");
  const Value* version = input.find("version");
  const std::optional<std::int64_t> version_number = version ? version->as_int64() : std::nullopt;
  if (!version_number || (*version_number != 1 && *version_number != 2))
    bad_state("'version' is " + (version ? short_repr(*version) : "None") +
              "; this dwa_export reads versions 1 and 2");
  std::optional<Partial> legacy;
  Value migrated;
  const Value* state_ptr = &input;
  if (*version_number == 1) {
    migrated = migrate_v1(input, legacy);
    state_ptr = &migrated;
  }
  const Value& state = *state_ptr;
  check_keys(state, {"format", "version", "num_tasks", "tasks", "averages", "partial", "log"});

  ParsedState out;
  const std::optional<std::size_t> num_tasks = parse_num_tasks(*state.find("num_tasks"));
  if (fixed_num_tasks && num_tasks != fixed_num_tasks)
    throw std::invalid_argument("the checkpoint holds K=" + (num_tasks ? std::to_string(*num_tasks) : "None") +
                                " tasks but this history was created with num_tasks=" +
                                std::to_string(fixed_num_tasks));
  out.num_tasks = num_tasks.value_or(0);

  const Value& tasks = *state.find("tasks");
  if (!tasks.is_null()) {
    bool strings = tasks.kind == Kind::Array;
    for (std::size_t i = 0; strings && i < tasks.items.size(); ++i) strings = tasks.items[i].kind == Kind::String;
    if (tasks.kind != Kind::Array || !num_tasks)
      bad_state("'tasks' must be None or a list of num_tasks names, got " + short_repr(tasks));
    std::vector<std::string> names;
    for (const auto& item : tasks.items) {
      if (item.kind != Kind::String)
        bad_state("'tasks': each task name must be a non-empty string, got " + short_repr(item) + " in " +
                  short_repr(tasks));
      names.push_back(item.text);
    }
    try {
      check_tasks(names, num_tasks);
    } catch (const std::invalid_argument& error) {
      bad_state(std::string("'tasks': ") + error.what());
    }
    if (fixed_tasks && names != *fixed_tasks)
      throw std::invalid_argument("the checkpoint's task names " + short_names(names) + " differ from this history's " +
                                  short_names(*fixed_tasks));
    out.tasks = std::move(names);
  }

  const Value& averages = *state.find("averages");
  if (averages.kind != Kind::Array || averages.items.size() > 2)
    bad_state("'averages' must be a list of at most 2 epoch averages, got " + short_repr(averages));
  if (!averages.items.empty() && !num_tasks) bad_state("'averages' is not empty but 'num_tasks' is None");
  for (const auto& item : averages.items) out.averages.push_back(float_list(item, *num_tasks, "each entry of 'averages'"));
  check_averages(out.averages, "stored average");

  out.partial = legacy ? legacy : parse_partial(*state.find("partial"), num_tasks);
  out.log = parse_log(*state.find("log"), num_tasks);
  return out;
}

}  // namespace detail

// The DWA loss history; Scalar is the accumulator, record() and inputs() type
// (float: "float32" sums, double: "float64").
template <typename Scalar>
class BasicHistory {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "Scalar must be float or double");

 public:
  // num_tasks: K, or 0 to let the first record() fix it.
  explicit BasicHistory(std::int64_t num_tasks = 0) {
    if (num_tasks < 0 || num_tasks > kMaxTasks)
      throw std::invalid_argument(detail::num_tasks_message(std::to_string(num_tasks)));
    fixed_num_tasks_ = static_cast<std::size_t>(num_tasks);
    num_tasks_ = fixed_num_tasks_;
  }
  // Named tasks (fixes K); saved in and checked by checkpoints.
  explicit BasicHistory(std::vector<std::string> tasks) {
    detail::check_tasks(tasks, std::nullopt);
    fixed_num_tasks_ = num_tasks_ = tasks.size();
    tasks_ = std::move(tasks);
  }

  static constexpr const char* dtype() { return std::is_same_v<Scalar, float> ? "float32" : "float64"; }

  // K, or 0 while unknown.
  std::size_t num_tasks() const { return num_tasks_; }
  const std::optional<std::vector<std::string>>& tasks() const { return tasks_; }
  // Whether two epoch averages exist (the weights are past the warm-up).
  bool ready() const { return averages_.size() == 2; }
  // The stored epoch averages, oldest first (at most two).
  const std::vector<std::vector<double>>& averages() const { return averages_; }
  // One entry per successful step() since the start or the last reset().
  const std::vector<LogEntry>& log() const { return log_; }

  // Adds one batch: `rows` rows of `num_tasks` losses each (row-major). `weight`
  // weighs a single row (e.g. the batch size for batch-mean losses); several
  // rows count once each. Checks everything before changing anything.
  void record(const Scalar* losses, std::size_t rows, std::size_t num_tasks, std::optional<double> weight = std::nullopt) {
    check_shape(rows, num_tasks);
    if (weight && !(std::isfinite(*weight) && *weight >= 0.0))
      throw std::invalid_argument("weight must be finite and >= 0 (e.g. the batch size), got " +
                                  json::float_repr(*weight));
    if (weight && rows > 1)
      throw std::invalid_argument(
          "weight=" + json::float_repr(*weight) +
          " is one number, but the losses have rows of K losses (per-sample losses). Each row already counts "
          "once, so without a weight the epoch average is sample-weighted; for other per-row weights pass a "
          "tensor/array with one weight per row (the losses' shape without the last dimension). A single number "
          "weighs a [K] batch, e.g. batch-mean losses with weight=batch_size.");
    check_num_tasks(num_tasks);
    std::vector<Scalar>& sum = accumulator(num_tasks);
    std::vector<Scalar> rows_sum(losses, losses + num_tasks);
    for (std::size_t r = 1; r < rows; ++r)
      for (std::size_t k = 0; k < num_tasks; ++k) rows_sum[k] += losses[r * num_tasks + k];
    if (weight) {
      const auto alpha = detail::narrow<Scalar>(*weight);
      for (std::size_t k = 0; k < num_tasks; ++k) sum[k] += alpha * rows_sum[k];
      weight_ += *weight;
    } else {
      for (std::size_t k = 0; k < num_tasks; ++k) sum[k] += rows_sum[k];
      weight_ += static_cast<double>(rows);
    }
    ++batches_;
  }

  // Adds `rows` rows of `num_tasks` losses with one weight per row (each finite and >= 0).
  void record(const Scalar* losses, std::size_t rows, std::size_t num_tasks, const double* row_weights) {
    check_shape(rows, num_tasks);
    for (std::size_t r = 0; r < rows; ++r)
      if (!(std::isfinite(row_weights[r]) && row_weights[r] >= 0.0))
        throw std::invalid_argument("every weight must be finite and >= 0, got " + json::float_repr(row_weights[r]) +
                                    " at row " + std::to_string(r));
    check_num_tasks(num_tasks);
    std::vector<Scalar>& sum = accumulator(num_tasks);
    std::vector<Scalar> weighted(num_tasks, Scalar(0));
    double total = 0.0;
    for (std::size_t r = 0; r < rows; ++r) {
      const auto w = detail::narrow<Scalar>(row_weights[r]);
      for (std::size_t k = 0; k < num_tasks; ++k) weighted[k] += losses[r * num_tasks + k] * w;
      total += row_weights[r];
    }
    for (std::size_t k = 0; k < num_tasks; ++k) sum[k] += weighted[k];
    weight_ += total;
    ++batches_;
  }

  // Adds one batch of K losses.
  void record(const std::vector<Scalar>& losses, std::optional<double> weight = std::nullopt) {
    record(losses.data(), 1, losses.size(), weight);
  }

  // Closes the epoch: averages what was recorded and rolls the history. A no-op
  // when nothing with a weight was recorded. Throws LossHistoryError, changing nothing.
  void step() {
    if (!sum_) return;
    if (weight_ == 0.0) return discard_epoch();
    std::vector<double> sums(sum_->begin(), sum_->end());
    const std::vector<double>* previous = averages_.empty() ? nullptr : &averages_.back();
    if (!(std::isfinite(weight_) && weight_ > 0.0))
      throw LossHistoryError("the batch weights recorded this epoch sum to " + json::float_repr(weight_) +
                                 "; every weight must be finite and >= 0 (a per-row weight tensor/array held a "
                                 "negative, NaN or infinite value, or the sum overflowed). " +
                                 detail::remedy(),
                             std::nullopt, sums, previous ? std::optional(*previous) : std::nullopt);
    std::vector<double> average(sums.size());
    for (std::size_t k = 0; k < sums.size(); ++k) average[k] = sums[k] / weight_;
    detail::check_epoch_average(average, previous);
    log_.push_back({batches_, weight_, average});
    averages_.push_back(std::move(average));
    if (averages_.size() > 2) averages_.erase(averages_.begin());
    discard_epoch();
  }

  // Drops what was recorded since the last step(); the history stays.
  void discard_epoch() {
    if (sum_) std::fill(sum_->begin(), sum_->end(), Scalar(0));
    weight_ = 0.0;
    batches_ = 0;
  }

  // Forgets everything: history, log, this epoch's batches, and a K learned from data.
  void reset() {
    num_tasks_ = fixed_num_tasks_;
    averages_.clear();
    log_.clear();
    sum_.reset();
    weight_ = 0.0;
    batches_ = 0;
  }

  // (L(t-1), L(t-2)) for the kernel; all ones (exactly uniform weights) during warm-up.
  std::pair<std::vector<Scalar>, std::vector<Scalar>> inputs() const {
    if (num_tasks_ == 0)
      throw std::runtime_error(
          "the number of tasks is not known yet: record() a batch first, or pass num_tasks=K (or tasks=names) to "
          "the constructor");
    if (!ready()) return {std::vector<Scalar>(num_tasks_, Scalar(1)), std::vector<Scalar>(num_tasks_, Scalar(1))};
    const auto cast = [](const std::vector<double>& values) {
      std::vector<Scalar> out;
      for (double v : values) out.push_back(detail::narrow<Scalar>(v));
      return out;
    };
    return {cast(averages_[1]), cast(averages_[0])};
  }

  // The whole state, mid-epoch included, as JSON: the text json.dumps writes for
  // DWAHistory.state_dict() of the same history.
  std::string state_dict() const {
    using json::Value;
    const auto numbers = [](const auto& values) {
      std::vector<Value> items;
      for (const auto v : values) items.push_back(Value::from_double(static_cast<double>(v)));
      return Value::array(std::move(items));
    };
    std::vector<Value> averages, log_batches, log_weight, log_averages;
    for (const auto& average : averages_) averages.push_back(numbers(average));
    for (const auto& entry : log_) {
      log_batches.push_back(Value::from_int(entry.batches));
      log_weight.push_back(Value::from_double(entry.weight));
      log_averages.push_back(numbers(entry.averages));
    }
    Value tasks;
    if (tasks_) {
      std::vector<Value> names;
      for (const auto& name : *tasks_) names.push_back(Value::from_string(name));
      tasks = Value::array(std::move(names));
    }
    Value partial;
    if (sum_ && batches_ > 0)
      partial = Value::array({Value(), Value::from_int(1), Value::from_string(dtype()), Value::from_int(batches_),
                              Value::from_double(weight_), numbers(*sum_)});
    return json::dump(Value::object({
        {"format", Value::from_string("dwa_export.history")},
        {"version", Value::from_int(2)},
        {"num_tasks", num_tasks_ ? Value::from_uint(num_tasks_) : Value()},
        {"tasks", std::move(tasks)},
        {"averages", Value::array(std::move(averages))},
        {"partial", std::move(partial)},
        {"log", Value::object({{"batches", Value::array(std::move(log_batches))},
                               {"weight", Value::array(std::move(log_weight))},
                               {"averages", Value::array(std::move(log_averages))}})},
    }));
  }

  // Restores a state_dict() (from C++, Python or NumPy; version 1 or 2); throws
  // std::invalid_argument naming the field, the value and what was expected,
  // changing nothing, if it is malformed or does not fit this history.
  void load_state_dict(const std::string& text) {
    json::Options options;
    options.prefix = "malformed DWA history state_dict: ";
    const detail::ParsedState state = detail::parse_state(json::parse(text, options), fixed_num_tasks_, tasks_);
    std::optional<std::vector<Scalar>> sum;
    if (state.partial) {
      const detail::Partial& partial = *state.partial;
      if (partial.rank)
        throw std::invalid_argument(
            "this checkpoint was saved mid-epoch by rank " + std::to_string(*partial.rank) + " of " +
            std::to_string(partial.world_size) +
            " processes and holds only that rank's part of the running epoch, so it cannot be resumed exactly on 1 "
            "process(es). Resume on " +
            std::to_string(partial.world_size) +
            " processes (each loading its own state), or save mid-epoch checkpoints after consolidate_state_dict() "
            "(exact on any number of processes), or at an epoch boundary. To resume anyway without this epoch's "
            "earlier batches, set the history state's 'partial' to None before loading.");
      if (partial.dtype != dtype())
        throw std::invalid_argument("the checkpoint accumulates in " + partial.dtype + " but this history in " +
                                    dtype() + "; use dwa::BasicHistory<" +
                                    (partial.dtype == "float64" ? "double" : "float") + "> to resume it exactly");
      sum.emplace();
      for (double v : partial.sums) sum->push_back(detail::narrow<Scalar>(v));  // exact: validated
    } else if (state.num_tasks) {
      sum.emplace(state.num_tasks, Scalar(0));
    }
    // Everything validated: assign.
    num_tasks_ = state.num_tasks;
    if (state.tasks) tasks_ = state.tasks;
    averages_ = state.averages;
    log_ = state.log;
    sum_ = std::move(sum);
    weight_ = state.partial ? state.partial->weight : 0.0;
    batches_ = state.partial ? state.partial->batches : 0;
  }

 private:
  static void check_shape(std::size_t rows, std::size_t num_tasks) {
    if (num_tasks == 0 || rows == 0)
      throw std::invalid_argument("losses must have shape [..., K] with K >= 1 and at least one row, got " +
                                  std::to_string(rows) + " rows of " + std::to_string(num_tasks));
  }

  // Raises if num_tasks is not this history's K; changes nothing.
  void check_num_tasks(std::size_t num_tasks) const {
    if (num_tasks_ != 0 && num_tasks != num_tasks_) {
      const std::string fix = fixed_num_tasks_
                                  ? "this history was created with num_tasks=" + std::to_string(fixed_num_tasks_) +
                                        "; create a new one"
                                  : "call reset() first to start a new history with a different K";
      throw std::invalid_argument("losses have " + std::to_string(num_tasks) +
                                  " tasks in their last dimension but this history has K=" +
                                  std::to_string(num_tasks_) + "; " + fix);
    }
    if (static_cast<std::int64_t>(num_tasks) > kMaxTasks)
      throw std::invalid_argument(detail::num_tasks_message(std::to_string(num_tasks)));
  }

  // The running sums, fixing K on first use (after every check has passed).
  std::vector<Scalar>& accumulator(std::size_t num_tasks) {
    num_tasks_ = num_tasks;
    if (!sum_) sum_.emplace(num_tasks, Scalar(0));
    return *sum_;
  }

  std::size_t fixed_num_tasks_ = 0;
  std::size_t num_tasks_ = 0;
  std::optional<std::vector<std::string>> tasks_;
  std::vector<std::vector<double>> averages_;
  std::vector<LogEntry> log_;
  std::optional<std::vector<Scalar>> sum_;
  double weight_ = 0.0;
  std::int64_t batches_ = 0;
};

using History = BasicHistory<float>;
using History64 = BasicHistory<double>;

}  // namespace dwa
