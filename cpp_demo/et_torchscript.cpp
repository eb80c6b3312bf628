// et_torchscript: classify images with an edgetransfer TorchScript model (model.pt) in libtorch.
// Labels and preprocessing come from the model's extra file edgetransfer.json.
#include <ATen/Parallel.h>
#include <torch/script.h>
#include <torch/version.h>

#include <iostream>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

const char* kUsage =
    "usage: et_torchscript MODEL.pt IMAGE... [--topk K] [--threads N]\n"
    "       et_torchscript MODEL.pt --selftest GOLDEN_DIR [--threads N]\n";

const char* kHelp =
    "Classify JPEG/PNG images with an edgetransfer TorchScript model (model.pt).\n"
    "Prints one JSON line per image: {\"path\", \"topk\": [{\"label\", \"prob\"}], \"logits\"}.\n"
    "What the model declares goes to stderr.\n\n"
    "  --topk K               how many labels per image (default 5)\n"
    "  --threads N            libtorch's intra-op threads (default: one per core)\n"
    "  --selftest GOLDEN_DIR  compare logits with EXPORT_DIR/golden; exit 1 past tolerance\n\n"
    "TorchScript files are code: loading one runs what is inside it. Load only model.pt files\n"
    "you exported yourself or otherwise trust.\n\n"
    "Exit codes: 0 ok, 1 self-test failed, 2 bad input.\n"
    "Example: et_torchscript export/model.pt photos/cat.jpg --topk 3\n";

}  // namespace

int main(int argc, char** argv) {
  return et::run_main(argc, argv, "et_torchscript", kUsage, kHelp, [](const et::Options& opt) {
    if (opt.threads > 0) at::set_num_threads(opt.threads);
    try {
      torch::jit::Module module;
      torch::jit::ExtraFilesMap extra{{"edgetransfer.json", ""}};
      try {
        module = torch::jit::load(opt.model, torch::kCPU, extra);
      } catch (const c10::Error& e) {
        throw et::InputError(opt.model + ": not a loadable TorchScript file (" +
                             et::first_line(e.what_without_backtrace()) + ")");
      }
      if (extra["edgetransfer.json"].empty()) {
        throw et::InputError(opt.model +
                             ": carries no edgetransfer.json extra file; export it with edgetransfer");
      }
      module.eval();
      et::Model model;
      model.manifest = et::parse_manifest(extra["edgetransfer.json"], opt.model);
      const int64_t h = model.manifest.pre.height, w = model.manifest.pre.width;
      std::cerr << "et_torchscript: " << opt.model << ": " << et::describe(model.manifest) << "\n"
                << "et_torchscript: forward(float32 [batch,3," << h << "," << w << "]) -> logits; libtorch "
                << TORCH_VERSION << "\n";

      model.run_normalized = [&](std::vector<float>& x, int64_t n) {
        torch::InferenceMode guard;
        const torch::IValue out = module.forward({torch::from_blob(x.data(), {n, 3, h, w}, torch::kFloat32)});
        if (!out.isTensor()) throw et::InputError(opt.model + ": forward() did not return a tensor");
        const torch::Tensor y = out.toTensor().to(torch::kCPU, torch::kFloat32).contiguous();
        return std::vector<float>(y.data_ptr<float>(), y.data_ptr<float>() + y.numel());
      };

      return opt.golden.empty() ? et::classify(model, opt) : et::selftest(model, opt.golden);
    } catch (const c10::Error& e) {
      throw et::InputError("libtorch: " + et::first_line(e.what_without_backtrace()));
    }
  });
}
