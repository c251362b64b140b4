// A tiny multi-task trainer in C++: LibTorch runs the exported DWA kernel
// (exported/dwa_weights.pt) once per epoch, and dwa::History (header-only)
// accumulates the per-batch task losses. Three regression heads share one
// hidden layer; their noise levels differ, so their losses fall at different
// rates and DWA moves the weights.
//
// Usage: dwa_trainer MODEL.pt [EPOCHS] [TEMPERATURE]
// Prints one JSON line per epoch: the weights used in it and its batch losses,
// then {"final_weights": [...]} after the last step(). Midway through epoch 3
// the history is saved with state_dict() and restored into a fresh one, as a
// resumed run would do.
//
// dwa_trainer --readme-snippet runs exported/README.md's LibTorch snippet instead,
// when the build compiled it in (CMakeLists.txt: DWA_SNIPPET_DIR); it prints the weights.
#include <dwa/history.hpp>
#include <torch/script.h>

#ifdef DWA_README_SNIPPET
#include "readme_libtorch.inc"  // defines readme_libtorch_snippet()
#endif

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace {

constexpr int64_t kTasks = 3, kInputs = 8, kHidden = 16, kBatch = 32, kBatchesPerEpoch = 6;

torch::Tensor to_tensor(const std::vector<float>& values) {
  return torch::tensor(values, torch::dtype(torch::kFloat32));
}

std::string json_list(const torch::Tensor& values) {
  const torch::Tensor flat = values.detach().to(torch::kFloat64).contiguous();
  const std::vector<double> numbers(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
  return nlohmann::json(numbers).dump();  // the shortest digits that read back as the same doubles
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--readme-snippet") {
#ifdef DWA_README_SNIPPET
    readme_libtorch_snippet();
    return 0;
#else
    std::cerr << "built without exported/README.md's snippet (configure with -DDWA_SNIPPET_DIR)\n";
    return 2;
#endif
  }
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt [EPOCHS] [TEMPERATURE]\n";
    return 2;
  }
  const int epochs = argc > 2 ? std::atoi(argv[2]) : 6;
  const float temperature = argc > 3 ? std::strtof(argv[3], nullptr) : 2.0f;
  torch::manual_seed(0);
  torch::jit::Module kernel = torch::jit::load(argv[1]);

  // Synthetic data: task k's target is a random linear map of x plus noise of scale 0.1 * 4^k.
  const torch::Tensor maps = torch::randn({kInputs, kTasks});
  const torch::Tensor noise = torch::tensor({0.1f, 0.4f, 1.6f});
  std::vector<torch::Tensor> params = {torch::randn({kInputs, kHidden}) * 0.3, torch::zeros({kHidden}),
                                       torch::randn({kHidden, kTasks}) * 0.3, torch::zeros({kTasks})};
  for (auto& p : params) p.requires_grad_(true);
  const float learning_rate = 0.05f;

  dwa::History history(kTasks);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const auto [loss_t1, loss_t2] = history.inputs();
    const torch::Tensor weights =
        kernel.forward({to_tensor(loss_t1), to_tensor(loss_t2), torch::tensor(temperature)}).toTensor();
    std::string batch_losses = "[";
    for (int batch = 0; batch < kBatchesPerEpoch; ++batch) {
      if (epoch == 3 && batch == kBatchesPerEpoch / 2) {  // checkpoint and resume mid-epoch
        const std::string checkpoint = history.state_dict();
        dwa::History resumed(kTasks);
        resumed.load_state_dict(checkpoint);
        history = resumed;
      }
      const torch::Tensor x = torch::randn({kBatch, kInputs});
      const torch::Tensor y = x.matmul(maps) + torch::randn({kBatch, kTasks}) * noise;
      const torch::Tensor hidden = torch::tanh(x.matmul(params[0]) + params[1]);
      const torch::Tensor prediction = hidden.matmul(params[2]) + params[3];
      const torch::Tensor losses = (prediction - y).pow(2).mean(0);  // [K] task losses
      const torch::Tensor loss = (weights * losses).sum();
      for (auto& p : params) p.mutable_grad() = torch::Tensor();
      loss.backward();
      {
        torch::NoGradGuard no_grad;
        for (auto& p : params) p.sub_(learning_rate * p.grad());
      }
      const torch::Tensor host = losses.detach().contiguous();
      history.record(host.data_ptr<float>(), 1, kTasks);
      batch_losses.append(batch ? ", " : "").append(json_list(host));
    }
    history.step();
    std::cout << "{\"epoch\": " << epoch << ", \"weights\": " << json_list(weights)
              << ", \"batch_losses\": " << batch_losses << "]}" << std::endl;
  }
  const auto [loss_t1, loss_t2] = history.inputs();
  const torch::Tensor final_weights =
      kernel.forward({to_tensor(loss_t1), to_tensor(loss_t2), torch::tensor(temperature)}).toTensor();
  std::cout << "{\"final_weights\": " << json_list(final_weights) << "}" << std::endl;
  return 0;
}
