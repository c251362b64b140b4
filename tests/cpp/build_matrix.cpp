// Compiled (-c, never run) by tests/test_cpp.py under each compiler, standard
// library, C++ standard and optimisation level of its build matrix, with
// -Wall -Wextra -Wshadow -Wpedantic -Wconversion -Wsign-conversion -Werror: every
// member of dwa::History and dwa::History64 is instantiated and called.
#include <dwa/history.hpp>

template class dwa::BasicHistory<float>;
template class dwa::BasicHistory<double>;

namespace {

template <typename History, typename Scalar>
double use(History history, const std::string& text) {
  const Scalar losses[] = {Scalar(1), Scalar(2), Scalar(3), Scalar(4)};
  const double row_weights[] = {1.0, 2.0};
  history.record({Scalar(1), Scalar(2)});
  history.record(std::vector<Scalar>{Scalar(1), Scalar(2)}, 3.0);
  history.record(losses, 2, 2);
  history.record(losses, 1, 2, 0.5);
  history.record(losses, 2, 2, row_weights);
  history.step();
  history.step(2.0);
  history.log_weights(2.0, {1.0, 1.0});
  const auto [loss_t1, loss_t2] = history.inputs();
  double total = static_cast<double>(loss_t1[0] + loss_t2[1]);
  for (const dwa::LogEntry& entry : history.log())
    total += entry.weight + static_cast<double>(entry.batches) + entry.averages[0] + entry.temperature.value_or(0.0) +
             (entry.weights ? (*entry.weights)[0] : 0.0);
  for (const auto& average : history.averages()) total += average[1];
  const std::string state = history.state_dict();
  History copy(static_cast<std::int64_t>(history.num_tasks()));
  copy.load_state_dict(state);
  copy.load_state_dict(text);
  copy.discard_epoch();
  copy.reset();
  try {
    copy.step();
  } catch (const dwa::LossHistoryError& error) {
    total += static_cast<double>(error.task.value_or(0)) + error.average[0] + (error.previous ? 1.0 : 0.0);
  }
  return total + (copy.ready() ? 1.0 : 0.0) + (copy.tasks() ? 1.0 : 0.0) + static_cast<double>(state.size()) +
         (History::dtype()[0] == 'f' ? 1.0 : 0.0);
}

}  // namespace

double build_matrix(const std::string& text) {
  return use<dwa::History, float>(dwa::History(), text) +
         use<dwa::History64, double>(dwa::History64(std::vector<std::string>{"a", "b"}), text) +
         static_cast<double>(dwa::detail::narrow<float>(1e300));
}
