// Runs an exported DWA ONNX file through the ONNX Runtime C++ API.
//
//   ort_weights MODEL.onnx < cases
//
// Each case on stdin is whitespace-separated: for loss_t1, loss_t2 and
// temperature in turn, the rank, the dims and then the float32 values
// (anything strtof reads: Python's float.hex() passes them exactly). For each
// case one JSON line goes to stdout: {"shape": [...], "weights": [...]} or
// {"error": "<ONNX Runtime's message>"}.
// The first line is {"onnxruntime": "<version>"}. tests/test_cpp.py compares
// the weights with the Python onnxruntime session and the float64 reference.
#include <onnxruntime_cxx_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace {

struct Input {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

bool read_input(std::istream& in, Input& input) {
  std::size_t rank = 0;
  if (!(in >> rank)) return false;
  input.shape.assign(rank, 0);
  std::size_t count = 1;
  for (auto& dim : input.shape) {
    in >> dim;
    count *= static_cast<std::size_t>(dim);
  }
  input.values.assign(count, 0.0f);
  for (auto& value : input.values) {
    std::string word;  // strtof reads "nan", "inf" and exact hex floats; operator>> does not
    in >> word;
    value = std::strtof(word.c_str(), nullptr);
  }
  return static_cast<bool>(in);
}

void print_number(float value) {
  if (std::isnan(value)) {
    std::printf("NaN");
  } else if (std::isinf(value)) {
    std::printf(value > 0 ? "Infinity" : "-Infinity");
  } else {
    std::printf("%.9g", static_cast<double>(value));  // 9 digits round-trip a float
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODEL.onnx < cases\n", argv[0]);
    return 2;
  }
  // Errors reach us as exceptions; FATAL keeps ONNX Runtime from also logging them.
  Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "dwa");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(1);
  Ort::Session session(env, argv[1], options);
  std::printf("{\"onnxruntime\": \"%s\"}\n", Ort::GetVersionString().c_str());

  const char* input_names[] = {"loss_t1", "loss_t2", "temperature"};
  const char* output_names[] = {"weights"};
  auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Input inputs[3];
  while (read_input(std::cin, inputs[0]) && read_input(std::cin, inputs[1]) && read_input(std::cin, inputs[2])) {
    try {
      std::vector<Ort::Value> values;
      for (auto& input : inputs) {
        values.push_back(Ort::Value::CreateTensor<float>(memory, input.values.data(), input.values.size(),
                                                         input.shape.data(), input.shape.size()));
      }
      auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names, values.data(), 3, output_names, 1);
      auto info = outputs[0].GetTensorTypeAndShapeInfo();
      const float* weights = outputs[0].GetTensorData<float>();
      std::printf("{\"shape\": [");
      auto shape = info.GetShape();
      for (std::size_t i = 0; i < shape.size(); ++i) std::printf(i ? ", %lld" : "%lld", static_cast<long long>(shape[i]));
      std::printf("], \"weights\": [");
      for (std::size_t i = 0; i < info.GetElementCount(); ++i) {
        if (i) std::printf(", ");
        print_number(weights[i]);
      }
      std::printf("]}\n");
    } catch (const Ort::Exception& error) {
      std::string message = error.what();
      for (auto& c : message) {
        if (c == '"' || c == '\\' || c == '\n') c = ' ';  // keep the JSON line valid
      }
      std::printf("{\"error\": \"%s\"}\n", message.c_str());
    }
  }
  return 0;
}
