// dwa/history.hpp: the DWA loss history for C++ trainers; header-only, C++17, needs
// nlohmann/json >= 3.10 (Debian/Ubuntu: nlohmann-json3-dev; CMake: find_package(nlohmann_json 3.10),
// link nlohmann_json::nlohmann_json). Folder: python -c "import dwa_export; print(dwa_export.include_dir())"
//
// The rules and the checkpoints (state format version 4; versions 2 and 3 load too) of
// dwa_export.DWAHistory and NumpyDWAHistory: checkpoints move between C++, Python and NumPy.
//
//     dwa::History history;                       // float losses and inputs(); dwa::History64: double
//     history.record(losses_of_this_batch);       // std::vector<float> of K losses
//     history.step();                             // once per epoch; throws dwa::LossHistoryError
//     auto [loss_t1, loss_t2] = history.inputs(); // feed the kernel (ones during the warm-up)
//
// Epoch average: L_k = sum_r w_r * l_rk / sum_r w_r over this epoch's rows, summed in double
// whatever Scalar is. A row counts once without a weight; one row may take a number weight
// (e.g. the batch size for batch-mean losses); several rows may take one weight each. step()
// rejects an average that is NaN or infinite, zero, or of another sign than the previous
// epoch's. A call that throws changes nothing. For bit parity with Python on targets with
// fused multiply-add, compile with -ffp-contract=off (GCC's default with -std=c++17, not gnu++17).
//
// NaN and infinite losses (nan_strategy in Python): a row of weight 0 is left out under every
// strategy, whatever its losses (a mask: 0 * inf would be NaN). Then, for a row of K losses
// holding a NaN or an infinity (e.g. a batch that overflowed under mixed precision):
//   NanStrategy::kError (the default): summed like any row, so step() throws LossHistoryError;
//   NanStrategy::kIgnore: left out of the epoch (all K losses and its weight) and counted;
//   NanStrategy::kWarn: as kIgnore, and step() then writes one line saying how many to std::cerr
//     (C++ has no warnings; redirect std::cerr.rdbuf() to catch it, or use kIgnore).
// LogEntry::nonfinite_rows holds the count. step() throws when every row with a weight was left out.
//
//     dwa::History history(0, dwa::NanStrategy::kIgnore);  // K from the first record()
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iostream>
#include <limits>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if NLOHMANN_JSON_VERSION_MAJOR < 3 || (NLOHMANN_JSON_VERSION_MAJOR == 3 && NLOHMANN_JSON_VERSION_MINOR < 10)
#error "dwa/history.hpp needs nlohmann/json 3.10 or newer"
#endif

namespace dwa {

// What a row of K losses holding a NaN or an infinity does; see the top of this file.
enum class NanStrategy { kError, kWarn, kIgnore };

// An epoch that DWA cannot use, thrown by step(); nothing was changed.
class LossHistoryError : public std::invalid_argument {
 public:
  LossHistoryError(const std::string& message, std::optional<std::size_t> bad_task, std::vector<double> epoch_average,
                   std::optional<std::vector<double>> previous_average)
      : std::invalid_argument(message),
        task(bad_task),
        average(std::move(epoch_average)),
        previous(std::move(previous_average)) {}
  std::optional<std::size_t> task;              // the first bad task; empty for a problem with the weights
  std::vector<double> average;                  // this epoch's averages (its sums for a weight problem)
  std::optional<std::vector<double>> previous;  // the previous epoch's averages, if any
};

// One entry of the per-epoch log: what a successful step() averaged, and the
// temperature and weights computed from it (step(temperature), log_weights()).
struct LogEntry {
  std::int64_t batches = 0;
  double weight = 0.0;  // of the rows kept
  std::vector<double> averages;
  std::optional<double> temperature;
  std::optional<std::vector<double>> weights;
  std::int64_t nonfinite_rows = 0;  // rows left out for a NaN or infinite loss (kWarn, kIgnore)
};

constexpr std::int64_t kMaxTasks = std::int64_t{1} << 20;
constexpr std::int64_t kMaxWorldSize = std::int64_t{1} << 24;
constexpr std::int64_t kMaxCount = std::int64_t{1} << 53;
constexpr int kStateVersion = 4;

namespace detail {

using Json = nlohmann::json;

// Messages are built by appending, never with "literal" + std::string (g++ 12
// reports a false -Wrestrict there at -O3).
inline std::string show(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return Json(value).dump();  // the shortest text that reads back as the same double
}
inline bool shallow(const Json& value, int depth = 0) {  // dump() recurses: never on a deep value
  if (!value.is_structured()) return true;
  if (depth == 3) return false;
  return std::all_of(value.begin(), value.end(), [depth](const Json& item) { return shallow(item, depth + 1); });
}
inline std::string show(const Json& value) {  // a value from a state, cut short
  if (!shallow(value))
    return std::string(value.is_array() ? "a list of " : "an object of ").append(std::to_string(value.size())).append(" items");
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > 80) text.replace(77, std::string::npos, "...");
  return text;
}
inline std::string show(const std::vector<double>& values) {
  std::string text = "[";
  for (const double value : values) text.append(text.size() > 1 ? ", " : "").append(show(value));
  return text.append("]");
}
inline void append(std::string& out, const char* part) { out += part; }
inline void append(std::string& out, const std::string& part) { out += part; }
template <typename T>
void append(std::string& out, const T& part) {
  if constexpr (std::is_integral_v<T>) {
    out += std::to_string(part);
  } else {
    out += show(part);
  }
}
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

// double -> Scalar as IEEE rounding does it (torch's .to(), NumPy's astype):
// +-inf beyond the float range, where a plain static_cast is undefined behaviour.
template <typename Scalar>
Scalar narrow(double value) {
  if constexpr (std::is_same_v<Scalar, double>) {
    return value;
  } else {
    constexpr float kMax = std::numeric_limits<float>::max();
    const double magnitude = std::fabs(value);
    if (!(magnitude > static_cast<double>(kMax))) return static_cast<float>(value);  // NaN too
    // From kMax plus half its ulp (a tie, rounded to even) on: inf.
    const float rounded = magnitude >= static_cast<double>(kMax) + 0x1p103 ? std::numeric_limits<float>::infinity() : kMax;
    return value > 0 ? rounded : -rounded;
  }
}

// What makes `average` unusable after `previous` (step()'s rule), if anything.
struct Problem {
  std::size_t task;
  std::string reason;
};
// `nonfinite` says how a NaN or infinite average came about.
inline std::optional<Problem> bad_average(const std::vector<double>& average, const std::vector<double>* previous,
                                          const char* nonfinite = "a NaN or infinite loss was recorded") {
  for (std::size_t k = 0; k < average.size(); ++k) {
    if (!std::isfinite(average[k])) return Problem{k, cat("is ", average[k], ": ", nonfinite)};
    if (average[k] == 0.0) return Problem{k, "is 0: DWA divides by it; offset the loss away from zero"};
    if (previous && (average[k] > 0.0) != ((*previous)[k] > 0.0))
      return Problem{k, cat("changed sign from ", (*previous)[k], " to ", average[k], ": DWA needs one sign per task")};
  }
  return std::nullopt;
}

inline void check_temperature(double temperature) {
  if (!(std::isfinite(temperature) && temperature > 0.0))
    throw std::invalid_argument(cat("the temperature must be finite and > 0, got ", temperature));
}

// Distinct, non-empty UTF-8 strings (nlohmann refuses to write other strings).
inline bool valid_names(const std::vector<std::string>& names) {
  for (const auto& name : names) {
    try {
      if (name.empty()) return false;
      (void)Json(name).dump();
    } catch (const Json::type_error&) {
      return false;
    }
  }
  return std::set<std::string>(names.begin(), names.end()).size() == names.size();
}

// The running epoch: what was recorded since the last step().
struct Epoch {
  std::int64_t batches = 0;         // record() calls
  std::int64_t rows = 0;            // the rows of K losses in them
  std::int64_t nonfinite_rows = 0;  // of those, left out for a NaN or infinite loss
  double weight = 0.0;              // the weight sum of the rows kept
  std::vector<double> sums;         // their weighted loss sums
};

// ------------------------------------------------------------------ reading a state

struct State {
  std::size_t num_tasks = 0;  // 0: not known
  std::optional<std::vector<std::string>> tasks;
  std::string dtype = "float32";
  std::vector<std::vector<double>> averages;
  std::optional<std::int64_t> rank;  // the running epoch's; empty: the whole group's
  std::int64_t world_size = 1;
  Epoch epoch;  // batches == 0: none
  std::vector<LogEntry> log;
};

[[noreturn]] inline void bad_state(const std::string& field, const Json& value, const std::string& expected) {
  throw std::invalid_argument(cat("DWA history state: ", field, " is ", value, "; expected ", expected));
}

inline Json parse_json(const std::string& text) {
  try {
    return Json::parse(text);
  } catch (const Json::exception& error) {
    throw std::invalid_argument(cat("DWA history state: not strict JSON: ", error.what()));
  }
}

// An integer (not 2.0, not a boolean) from low to high.
inline std::int64_t count(const Json& value, const std::string& field, std::int64_t low, std::int64_t high) {
  const bool fits = value.is_number_unsigned() ? value.get<std::uint64_t>() <= static_cast<std::uint64_t>(high)
                                               : value.is_number_integer();
  const std::int64_t number = fits ? value.get<std::int64_t>() : low - 1;
  if (number < low || number > high) bad_state(field, value, cat("an integer from ", low, " to ", high));
  return number;
}

inline double number(const Json& value, const std::string& field, const std::string& expected) {
  if (!value.is_number()) bad_state(field, value, expected);  // booleans are not numbers
  return value.get<double>();
}

// A finite number > 0, or >= 0 with zero_too.
inline double finite(const Json& value, const std::string& field, bool zero_too = false) {
  const char* expected = zero_too ? "a finite number >= 0" : "a finite number > 0";
  const double out = number(value, field, expected);
  if (!std::isfinite(out) || out < 0.0 || (out == 0.0 && !zero_too)) bad_state(field, value, expected);
  return out;
}

inline std::vector<double> numbers(const Json& value, std::size_t k, const std::string& field) {
  const std::string expected = cat("a list of ", k, " numbers");
  if (!value.is_array() || value.size() != k) bad_state(field, value, expected);
  std::vector<double> out;
  for (const Json& item : value) out.push_back(number(item, field, expected));
  return out;
}

inline std::string dtype(const Json& value, const std::string& field) {
  if (value != "float32" && value != "float64") bad_state(field, value, "\"float32\" or \"float64\"");
  return value.get<std::string>();
}

inline void need_tasks(std::size_t num_tasks, const std::string& field, const Json& value) {
  if (num_tasks == 0) bad_state(field, value, "nothing while 'num_tasks' is null");
}

inline void check_keys(const Json& object, const std::vector<std::string>& keys, const std::string& field) {
  bool exact = object.is_object() && object.size() == keys.size();
  for (const auto& key : keys) exact = exact && object.contains(key);
  if (!exact) bad_state(field, object, cat("an object with exactly the keys ", Json(keys)));
}

inline void check_chain(const std::vector<std::vector<double>>& chain, const std::string& field) {
  for (std::size_t i = 0; i < chain.size(); ++i)
    if (const auto problem = bad_average(chain[i], i ? &chain[i - 1] : nullptr))
      throw std::invalid_argument(cat("DWA history state: ", field, "[", i, "], task ", problem->task, ": the average ",
                                      problem->reason));
}

// Version 3 counted no rows: its running epoch reads as one row per batch, none left out.
// Version 2 also held the dtype third.
inline void parse_partial(const Json& partial, int version, State& out) {
  if (partial.is_null()) return;
  const char* layout = version == 2   ? "null or [rank, world_size, dtype, batches, weight, sums]"
                       : version == 3 ? "null or [rank, world_size, batches, weight, sums]"
                                      : "null or [rank, world_size, batches, rows, nonfinite_rows, weight, sums]";
  if (!partial.is_array() || partial.size() != (version == 2 ? 6u : version == 3 ? 5u : 7u))
    bad_state("'partial'", partial, layout);
  out.world_size = count(partial[1], "the world_size in 'partial'", 1, kMaxWorldSize);
  if (!partial[0].is_null()) {
    if (out.world_size == 1) bad_state("the rank in 'partial'", partial[0], "null with world_size 1");
    out.rank = count(partial[0], "the rank in 'partial'", 0, out.world_size - 1);
  }
  std::size_t at = 2;
  if (version == 2) out.dtype = dtype(partial[at++], "the dtype in 'partial'");
  out.epoch.batches = out.epoch.rows = count(partial[at++], "the batch count in 'partial'", 1, kMaxCount);
  if (version == 4) {
    out.epoch.rows = count(partial[at++], "the row count in 'partial'", 0, kMaxCount);
    out.epoch.nonfinite_rows = count(partial[at++], "the nonfinite_rows in 'partial'", 0, out.epoch.rows);
  }
  out.epoch.weight = number(partial[at], "the weight in 'partial'", "a number >= 0") + 0.0;  // -0.0 is 0.0
  if (out.epoch.weight < 0.0) bad_state("the weight in 'partial'", partial[at], "a number >= 0");
  need_tasks(out.num_tasks, "'partial'", partial);
  out.epoch.sums = numbers(partial[at + 1], out.num_tasks, "the sums in 'partial'");
}

// Version 3 had no nonfinite_rows (0 each), version 2 no temperatures and weights either.
inline void parse_log(const Json& log, int version, State& out) {
  std::vector<std::string> keys = {"batches", "weight", "averages"};
  if (version >= 3) keys.insert(keys.end(), {"temperature", "weights"});
  if (version == 4) keys.emplace_back("nonfinite_rows");
  check_keys(log, keys, "'log'");
  const std::size_t n = log["batches"].is_array() ? log["batches"].size() : 0;
  for (const auto& key : keys)
    if (!log[key].is_array() || log[key].size() != n) bad_state("'log'", log, "lists of one length");
  if (n > 0) need_tasks(out.num_tasks, "'log'", log);
  std::vector<std::vector<double>> chain;
  for (std::size_t i = 0; i < n; ++i) {
    const auto field = [i](const char* column) { return cat("log ", column, "[", i, "]"); };
    LogEntry entry;
    entry.batches = count(log["batches"][i], field("batches"), 1, kMaxCount);
    entry.weight = finite(log["weight"][i], field("weight"));
    entry.averages = numbers(log["averages"][i], out.num_tasks, field("averages"));
    chain.push_back(entry.averages);
    if (version >= 3 && !log["temperature"][i].is_null())
      entry.temperature = finite(log["temperature"][i], field("temperature"));
    if (version >= 3 && !log["weights"][i].is_null()) {
      entry.weights = numbers(log["weights"][i], out.num_tasks, field("weights"));
      for (const Json& weight : log["weights"][i]) finite(weight, field("weights"), /*zero_too=*/true);
    }
    if (version == 4) entry.nonfinite_rows = count(log["nonfinite_rows"][i], field("nonfinite_rows"), 0, kMaxCount);
    out.log.push_back(std::move(entry));
  }
  check_chain(chain, "log averages");
}

// Validates a whole state, version 2, 3 or 4, changing nothing.
inline State parse_state(const Json& state) {
  if (!state.is_object()) bad_state("the state", state, "a JSON object");
  const Json& format = state.contains("format") ? state["format"] : Json();
  if (format != "dwa_export.history") bad_state("'format'", format, "\"dwa_export.history\"");
  const Json& field = state.contains("version") ? state["version"] : Json();
  if (!field.is_number_integer() || (field != 2 && field != 3 && field != 4))
    bad_state("'version'", field, "2, 3 or 4: this release reads state format versions 2 to 4");
  const int version = field.get<int>();
  const bool v2 = version == 2;
  std::vector<std::string> keys = {"format", "version", "num_tasks", "tasks", "averages", "partial", "log"};
  if (!v2) keys.push_back("dtype");
  check_keys(state, keys, "the state");

  State out;
  if (!state["num_tasks"].is_null())
    out.num_tasks = static_cast<std::size_t>(count(state["num_tasks"], "'num_tasks'", 1, kMaxTasks));
  const Json& tasks = state["tasks"];
  if (!tasks.is_null()) {
    const char* expected = "null or a list of num_tasks distinct non-empty strings";
    if (!tasks.is_array() || tasks.size() != out.num_tasks) bad_state("'tasks'", tasks, expected);
    std::vector<std::string> names;
    for (const Json& name : tasks) names.push_back(name.is_string() ? name.get<std::string>() : "");
    if (!valid_names(names)) bad_state("'tasks'", tasks, expected);
    out.tasks = std::move(names);
  }
  if (!v2) out.dtype = dtype(state["dtype"], "'dtype'");
  const Json& averages = state["averages"];
  if (!averages.is_array() || averages.size() > 2) bad_state("'averages'", averages, "a list of at most 2 averages");
  if (!averages.empty()) need_tasks(out.num_tasks, "'averages'", averages);
  for (const Json& average : averages) out.averages.push_back(numbers(average, out.num_tasks, "'averages'"));
  check_chain(out.averages, "averages");
  parse_partial(state["partial"], version, out);
  parse_log(state["log"], version, out);
  return out;
}

}  // namespace detail

// The DWA loss history. Scalar is the type of the losses record() takes and of
// inputs() (float: "float32", double: "float64"); sums are double either way.
template <typename Scalar>
class BasicHistory {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "Scalar must be float or double");

 public:
  // num_tasks: K, or 0 to let the first record() fix it. nan_strategy: see the top of this file.
  explicit BasicHistory(std::int64_t num_tasks = 0, NanStrategy nan_strategy = NanStrategy::kError)
      : nan_strategy_(nan_strategy) {
    if (num_tasks < 0 || num_tasks > kMaxTasks)
      throw std::invalid_argument(detail::cat("num_tasks must be from 0 (learn K from the first record()) to ",
                                              kMaxTasks, ", got ", num_tasks));
    fixed_num_tasks_ = num_tasks_ = static_cast<std::size_t>(num_tasks);
  }
  // Named tasks (fixes K); saved in checkpoints, which must then have the same names.
  explicit BasicHistory(std::vector<std::string> tasks, NanStrategy nan_strategy = NanStrategy::kError)
      : nan_strategy_(nan_strategy) {
    if (tasks.empty() || tasks.size() > static_cast<std::size_t>(kMaxTasks) || !detail::valid_names(tasks))
      throw std::invalid_argument(detail::cat("task names must be 1 to ", kMaxTasks,
                                              " distinct non-empty UTF-8 strings, got ", detail::Json(tasks)));
    fixed_num_tasks_ = num_tasks_ = tasks.size();
    fixed_tasks_ = tasks_ = std::move(tasks);
  }

  static constexpr const char* dtype() { return std::is_same_v<Scalar, float> ? "float32" : "float64"; }

  std::size_t num_tasks() const { return num_tasks_; }  // K, or 0 while unknown
  const std::optional<std::vector<std::string>>& tasks() const { return tasks_; }
  bool ready() const { return averages_.size() == 2; }  // past the warm-up
  const std::vector<std::vector<double>>& averages() const { return averages_; }  // at most 2, oldest first
  const std::vector<LogEntry>& log() const { return log_; }  // one entry per step() since the last reset()
  NanStrategy nan_strategy() const { return nan_strategy_; }

  // Adds one batch: `rows` rows of `num_tasks` losses (row-major). A number
  // weight weighs a single row (e.g. the batch size); without one, rows count once each.
  void record(const Scalar* losses, std::size_t rows, std::size_t num_tasks, std::optional<double> weight = std::nullopt) {
    if (weight && !(std::isfinite(*weight) && *weight >= 0.0))
      throw std::invalid_argument(detail::cat("weight must be finite and >= 0 (e.g. the batch size), got ", *weight));
    if (weight && rows > 1)
      throw std::invalid_argument(detail::cat("weight=", *weight, " is one number for ", rows,
                                              " rows, which is ambiguous: rows count once each without a weight; "
                                              "pass one weight per row for other weights"));
    add(losses, rows, num_tasks, weight ? &*weight : nullptr);
  }

  // Adds `rows` rows of `num_tasks` losses with one weight per row (each finite and >= 0).
  void record(const Scalar* losses, std::size_t rows, std::size_t num_tasks, const double* row_weights) {
    for (std::size_t r = 0; r < rows; ++r)
      if (!(std::isfinite(row_weights[r]) && row_weights[r] >= 0.0))
        throw std::invalid_argument(
            detail::cat("every row weight must be finite and >= 0, got ", row_weights[r], " at row ", r));
    add(losses, rows, num_tasks, row_weights);
  }

  // Adds one batch of K losses.
  void record(const std::vector<Scalar>& losses, std::optional<double> weight = std::nullopt) {
    record(losses.data(), 1, losses.size(), weight);
  }

  // Closes the epoch: averages what was recorded and rolls the history; a no-op
  // when nothing was recorded, and drops zero-weight rows alone without an entry.
  // `temperature` (DWA's, if any) goes into the log entry. Throws LossHistoryError,
  // changing nothing; under NanStrategy::kWarn writes a line to std::cerr when rows were left out.
  void step(std::optional<double> temperature = std::nullopt) {
    if (temperature) detail::check_temperature(*temperature);
    if (epoch_.batches == 0) return;
    const std::vector<double>* previous = averages_.empty() ? nullptr : &averages_.back();
    const auto fail = [&](const std::string& message, std::optional<std::size_t> task, std::vector<double> values) {
      throw LossHistoryError(detail::cat(message, ". Nothing was changed: call discard_epoch() to drop this epoch's "
                                                  "batches, or reset() to restart the warm-up"),
                             task, std::move(values), previous ? std::optional(*previous) : std::nullopt);
    };
    if (!(std::isfinite(epoch_.weight) && epoch_.weight >= 0.0))
      fail(detail::cat("the batch weights of this epoch sum to ", epoch_.weight, ", not a finite number >= 0"),
           std::nullopt, epoch_.sums);
    if (epoch_.weight == 0.0 && epoch_.nonfinite_rows > 0)
      fail(detail::cat("every row of this epoch's losses that had a weight held a NaN or infinite loss (",
                       epoch_.nonfinite_rows, " of ", epoch_.rows, " rows; the others had weight 0), so there is "
                       "no epoch average"),
           std::nullopt, epoch_.sums);
    if (epoch_.weight == 0.0) return discard_epoch();
    std::vector<double> average(epoch_.sums.size());
    for (std::size_t k = 0; k < average.size(); ++k) average[k] = epoch_.sums[k] / epoch_.weight;
    if (const auto problem = detail::bad_average(average, previous, nonfinite_cause().c_str()))
      fail(detail::cat("the epoch-average loss of task ", problem->task, " ", problem->reason, " (all tasks: ",
                       average, ")"),
           problem->task, average);
    log_.push_back({epoch_.batches, epoch_.weight, average, temperature, std::nullopt, epoch_.nonfinite_rows});
    averages_.push_back(std::move(average));
    if (averages_.size() > 2) averages_.erase(averages_.begin());
    if (nan_strategy_ == NanStrategy::kWarn && epoch_.nonfinite_rows > 0)
      std::cerr << detail::cat("dwa::History::step(): ", epoch_.nonfinite_rows, " of this epoch's ", epoch_.rows,
                               " rows of K losses held a NaN or infinite loss and were left out of its average "
                               "(NanStrategy::kWarn; kIgnore leaves them out without this line)\n");
    discard_epoch();
  }

  // Stores the temperature and the K weights computed from the last step's
  // averages in the last log entry (for `dwa-export plot`).
  void log_weights(double temperature, const std::vector<double>& weights) {
    if (log_.empty()) throw std::runtime_error("log_weights(): the log is empty; call it after a successful step()");
    detail::check_temperature(temperature);
    bool valid = weights.size() == num_tasks_;
    for (const double weight : weights) valid = valid && std::isfinite(weight) && weight >= 0.0;
    if (!valid)
      throw std::invalid_argument(
          detail::cat("log_weights(): weights must be ", num_tasks_, " finite numbers >= 0, got ", weights));
    log_.back().temperature = temperature;
    log_.back().weights = weights;
  }

  // Drops what was recorded since the last step(); the history stays.
  void discard_epoch() {
    std::fill(epoch_.sums.begin(), epoch_.sums.end(), 0.0);
    epoch_.weight = 0.0;
    epoch_.batches = epoch_.rows = epoch_.nonfinite_rows = 0;
  }

  // Forgets everything: the history, the log, this epoch and a K (or names) not given to the constructor.
  void reset() {
    num_tasks_ = fixed_num_tasks_;
    tasks_ = fixed_tasks_;
    averages_.clear();
    log_.clear();
    epoch_ = detail::Epoch{};
  }

  // (L(t-1), L(t-2)) for the kernel; all ones (exactly uniform weights) during the warm-up.
  std::pair<std::vector<Scalar>, std::vector<Scalar>> inputs() const {
    if (num_tasks_ == 0)
      throw std::runtime_error("the number of tasks is not known yet: record() a batch first, or give the "
                               "constructor num_tasks or task names");
    if (!ready()) return {std::vector<Scalar>(num_tasks_, Scalar(1)), std::vector<Scalar>(num_tasks_, Scalar(1))};
    const auto cast = [](const std::vector<double>& values) {
      std::vector<Scalar> out;
      for (const double value : values) out.push_back(detail::narrow<Scalar>(value));
      return out;
    };
    return {cast(averages_[1]), cast(averages_[0])};
  }

  // The whole state, mid-epoch included, as JSON (state format version 4).
  // Throws std::domain_error if this epoch's sums or weight are not finite,
  // which strict JSON cannot hold: step() rejects such an epoch; discard_epoch() drops it.
  std::string state_dict() const {
    using Out = detail::Json;  // keys sorted (ordered_json would cost every includer a second instantiation)
    Out partial;
    if (epoch_.batches > 0) {
      bool finite = std::isfinite(epoch_.weight);
      for (const double sum : epoch_.sums) finite = finite && std::isfinite(sum);
      if (!finite)
        throw std::domain_error(detail::cat("state_dict(): this epoch's weight (", epoch_.weight, ") or sums (",
                                            epoch_.sums, ") are not finite, which JSON cannot hold; step() "
                                            "rejects this epoch: call discard_epoch() first"));
      partial = Out::array(
          {nullptr, 1, epoch_.batches, epoch_.rows, epoch_.nonfinite_rows, epoch_.weight, epoch_.sums});
    }
    Out log = {{"batches", Out::array()},     {"weight", Out::array()},  {"averages", Out::array()},
               {"temperature", Out::array()}, {"weights", Out::array()}, {"nonfinite_rows", Out::array()}};
    for (const LogEntry& entry : log_) {
      log["batches"].push_back(entry.batches);
      log["weight"].push_back(entry.weight);
      log["averages"].push_back(entry.averages);
      log["temperature"].push_back(entry.temperature ? Out(*entry.temperature) : Out());
      log["weights"].push_back(entry.weights ? Out(*entry.weights) : Out());
      log["nonfinite_rows"].push_back(entry.nonfinite_rows);
    }
    return Out{{"format", "dwa_export.history"}, {"version", kStateVersion},
               {"num_tasks", num_tasks_ ? Out(num_tasks_) : Out()}, {"tasks", tasks_ ? Out(*tasks_) : Out()},
               {"dtype", dtype()}, {"averages", averages_}, {"partial", std::move(partial)}, {"log", std::move(log)}}
        .dump();
  }

  // Restores a state_dict() from C++, Python or NumPy (version 2, 3 or 4). Throws
  // std::invalid_argument naming the field, the value and what was expected,
  // changing nothing, if the state is malformed or does not fit this history.
  void load_state_dict(const std::string& text) {
    detail::State state = detail::parse_state(detail::parse_json(text));
    if (fixed_num_tasks_ && state.num_tasks != fixed_num_tasks_)
      throw std::invalid_argument(detail::cat("the state holds ", state.num_tasks, " tasks (0: unknown) but this "
                                              "history was created with num_tasks=", fixed_num_tasks_));
    if (fixed_tasks_ && state.tasks && *state.tasks != *fixed_tasks_)
      throw std::invalid_argument(detail::cat("the state's task names ", detail::Json(*state.tasks),
                                              " differ from this history's ", detail::Json(*fixed_tasks_)));
    if (state.rank)
      throw std::invalid_argument(detail::cat(
          "the state holds only rank ", *state.rank, "'s part of the running epoch of ", state.world_size,
          " processes, which cannot be resumed exactly on 1 process: resume on ", state.world_size,
          " processes, or save after consolidate_state_dict() or at an epoch boundary, or set 'partial' to null "
          "to resume without that epoch's earlier batches"));
    if constexpr (std::is_same_v<Scalar, float>) {
      if (state.dtype == "float64")
        throw std::invalid_argument("the state holds float64 inputs (float64 losses were recorded): load it into "
                                    "dwa::History64 (dwa::BasicHistory<double>)");
    }
    // Validated in full: nothing below can fail (but for memory).
    num_tasks_ = state.num_tasks;
    tasks_ = state.tasks ? std::move(state.tasks) : fixed_tasks_;
    averages_ = std::move(state.averages);
    log_ = std::move(state.log);
    epoch_ = std::move(state.epoch);
  }

 private:
  // Raises unless `rows` rows of `num_tasks` losses fit this history; changes nothing.
  void check_batch(std::size_t rows, std::size_t num_tasks) const {
    if (num_tasks == 0 || rows == 0)
      throw std::invalid_argument(detail::cat("losses must be rows of K >= 1 losses, at least one row; got ", rows,
                                              " rows of ", num_tasks));
    if (num_tasks_ != 0 && num_tasks != num_tasks_)
      throw std::invalid_argument(detail::cat(
          "losses have ", num_tasks, " tasks but this history has K=", num_tasks_,
          fixed_num_tasks_ ? " (given to its constructor)" : "; call reset() first to start again with another K"));
    if (num_tasks > static_cast<std::size_t>(kMaxTasks))
      throw std::invalid_argument(detail::cat("losses have ", num_tasks, " tasks, more than ", kMaxTasks));
  }

  // sums[k] += sum_r loss[r][k] * w_r, weight += sum_r w_r, in double, over the rows kept; w_r = 1
  // without weights (exact: the same sums). A row is left out when w_r is 0 (a mask, not a product:
  // 0 * inf is NaN) and, but under kError, when one of its losses is NaN or infinite (counted).
  // Each product is its own statement, never fused into the add.
  void add(const Scalar* losses, std::size_t rows, std::size_t num_tasks, const double* row_weights) {
    check_batch(rows, num_tasks);
    num_tasks_ = num_tasks;
    if (epoch_.sums.size() != num_tasks) epoch_.sums.assign(num_tasks, 0.0);
    std::vector<double> batch(num_tasks, 0.0);  // this batch's sums, added to the epoch's as a whole
    double total = 0.0;
    std::int64_t left_out = 0;
    for (std::size_t r = 0; r < rows; ++r) {
      const Scalar* row = losses + r * num_tasks;
      const double weight = row_weights ? row_weights[r] : 1.0;
      if (weight == 0.0) continue;
      if (nan_strategy_ != NanStrategy::kError &&
          !std::all_of(row, row + num_tasks, [](Scalar loss) { return std::isfinite(loss); })) {
        ++left_out;
        continue;
      }
      total += weight;
      for (std::size_t k = 0; k < num_tasks; ++k) {
        const double product = static_cast<double>(row[k]) * weight;
        batch[k] += product;
      }
    }
    for (std::size_t k = 0; k < num_tasks; ++k) epoch_.sums[k] += batch[k];
    epoch_.weight += total;
    epoch_.rows += static_cast<std::int64_t>(rows);
    epoch_.nonfinite_rows += left_out;
    ++epoch_.batches;
  }

  // How an average came to be NaN or infinite, for step()'s message. |sum| <= weight * the
  // largest finite loss, so the double sums can overflow only when that product is beyond them.
  std::string nonfinite_cause() const {
    constexpr double kLargestLoss = static_cast<double>(std::numeric_limits<Scalar>::max());
    constexpr double kLargestSum = std::numeric_limits<double>::max();
    const std::string overflow = detail::cat("the running sum overflowed (losses up to ", kLargestLoss,
                                             " in sums up to ", kLargestSum, ")");
    if (nan_strategy_ != NanStrategy::kError) return detail::cat(overflow, "; scale that task's loss down");
    std::string cause = "a NaN or infinite loss was recorded this epoch";
    if (epoch_.weight * kLargestLoss > kLargestSum) cause.append(", or ").append(overflow);
    return cause.append(". NanStrategy::kWarn (or kIgnore) leaves each row of K losses with a NaN or infinity "
                        "out of the epoch, e.g. a batch that overflowed under mixed precision");
  }

  NanStrategy nan_strategy_ = NanStrategy::kError;
  std::size_t fixed_num_tasks_ = 0;
  std::optional<std::vector<std::string>> fixed_tasks_;
  std::size_t num_tasks_ = 0;
  std::optional<std::vector<std::string>> tasks_;
  std::vector<std::vector<double>> averages_;
  std::vector<LogEntry> log_;
  detail::Epoch epoch_;
};

using History = BasicHistory<float>;
using History64 = BasicHistory<double>;

}  // namespace dwa
