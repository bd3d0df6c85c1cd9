// Steps a cocompile AOTInductor package (co.export("co_model.aoti.pt2")) from the zero state.
//
//   aoti_runner PACKAGE FRAMES BATCH OUTPUTS
//
// PACKAGE  the .aoti.pt2 package; its metadata names every step input with its dtype and its
//          shape, -1 on the batch axis ("cocompile.inputs": the model's inputs, "cocompile.states":
//          the states, one "name dtype d1 d2 ..." line each, in the step's argument order).
// FRAMES   raw C-order data: for each step, each model input with BATCH on its batch axis;
//          the number of steps is the file size over the bytes of one step.
// OUTPUTS  written the same way: for each step, the step's outputs (the model's outputs, then
//          the next states), so the last tensors written are the final state.
//
// The state starts at zero (the start of a clip) and each step's next states are fed back.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct TensorSpec {
  std::string name;
  c10::ScalarType dtype;
  std::vector<int64_t> shape;  // -1 on the batch axis
};

c10::ScalarType parse_dtype(const std::string& name) {
  static const std::vector<std::pair<std::string, c10::ScalarType>> dtypes = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf},
      {"bfloat16", at::kBFloat16}, {"int64", at::kLong}, {"int32", at::kInt}, {"bool", at::kBool}};
  for (const auto& [text, dtype] : dtypes) {
    if (text == name) return dtype;
  }
  throw std::runtime_error("unsupported dtype " + name);
}

// One TensorSpec per line of a metadata entry ("name dtype d1 d2 ...").
std::vector<TensorSpec> parse_specs(const std::unordered_map<std::string, std::string>& meta,
                                    const std::string& key) {
  auto found = meta.find(key);
  if (found == meta.end()) {
    throw std::runtime_error("the package has no " + key + " metadata: not written by cocompile");
  }
  std::vector<TensorSpec> specs;
  std::istringstream lines(found->second);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    TensorSpec spec;
    std::string dtype;
    words >> spec.name >> dtype;
    spec.dtype = parse_dtype(dtype);
    for (int64_t d; words >> d;) spec.shape.push_back(d);
    specs.push_back(spec);
  }
  return specs;
}

std::vector<int64_t> batched(const TensorSpec& spec, int64_t batch) {
  std::vector<int64_t> shape = spec.shape;
  for (auto& d : shape) {
    if (d == -1) d = batch;
  }
  return shape;
}

int64_t step_bytes(const std::vector<TensorSpec>& inputs, int64_t batch) {
  int64_t total = 0;
  for (const auto& spec : inputs) {
    total += c10::multiply_integers(batched(spec, batch)) * c10::elementSize(spec.dtype);
  }
  return total;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_tensor(std::ofstream& out, const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.nbytes()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " PACKAGE FRAMES BATCH OUTPUTS\n";
    return 2;
  }
  try {
    const int64_t batch = std::stoll(argv[3]);
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const auto meta = loader.get_metadata();
    const auto inputs = parse_specs(meta, "cocompile.inputs");
    const auto states = parse_specs(meta, "cocompile.states");

    const std::vector<char> frames = read_file(argv[2]);
    const int64_t per_step = step_bytes(inputs, batch);
    if (frames.empty() || frames.size() % per_step != 0) {
      throw std::runtime_error(std::string(argv[2]) + " holds " + std::to_string(frames.size()) +
                               " bytes, not a whole number of steps of " +
                               std::to_string(per_step) + " bytes for " + std::to_string(batch) +
                               " stream(s)");
    }
    const int64_t steps = static_cast<int64_t>(frames.size()) / per_step;

    std::vector<at::Tensor> state;  // the zero state: the start of a clip
    for (const auto& spec : states) {
      state.push_back(at::zeros(batched(spec, batch), at::dtype(spec.dtype)));
    }
    std::ofstream out(argv[4], std::ios::binary);
    const char* cursor = frames.data();
    for (int64_t step = 0; step < steps; ++step) {
      std::vector<at::Tensor> args;
      for (const auto& spec : inputs) {
        at::Tensor x = at::empty(batched(spec, batch), at::dtype(spec.dtype));
        std::memcpy(x.data_ptr(), cursor, x.nbytes());
        cursor += x.nbytes();
        args.push_back(x);
      }
      args.insert(args.end(), state.begin(), state.end());
      std::vector<at::Tensor> outs = loader.run(args);
      for (const auto& t : outs) write_tensor(out, t);
      // the step returns the model's outputs, then the next states in the states' order
      state.assign(outs.end() - static_cast<int64_t>(states.size()), outs.end());
    }
    std::cout << steps << " steps x " << batch << " stream(s): " << inputs.size() << " input(s), "
              << states.size() << " states; outputs and next states written to " << argv[4]
              << "\n";
  } catch (const std::exception& err) {
    std::cerr << "aoti_runner: " << err.what() << "\n";
    return 1;
  }
  return 0;
}
