// et_onnx: classify images with an edgetransfer ONNX model through the ONNX Runtime C++ API.
// Labels and preprocessing come from the model's "edgetransfer" metadata. A raw-pixel model
// (uint8 NHWC input, normalisation inside the graph) gets the resized and cropped pixels.
#define ORT_API_MANUAL_INIT  // so that a too-old library is an error message, not a crash
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

const char* kUsage =
    "usage: et_onnx MODEL.onnx IMAGE... [--topk K] [--threads N]\n"
    "       et_onnx MODEL.onnx --selftest GOLDEN_DIR [--threads N]\n";

const char* kHelp =
    "Classify JPEG/PNG images with an edgetransfer ONNX model (model.onnx or model.raw.onnx).\n"
    "Prints one JSON line per image: {\"path\", \"topk\": [{\"label\", \"prob\"}], \"logits\"}.\n"
    "What the model declares goes to stderr.\n\n"
    "  --topk K               how many labels per image (default 5)\n"
    "  --threads N            ONNX Runtime's intra-op threads (default: one per core)\n"
    "  --selftest GOLDEN_DIR  compare logits with EXPORT_DIR/golden; exit 1 past tolerance\n\n"
    "Exit codes: 0 ok, 1 self-test failed, 2 bad input.\n"
    "Example: et_onnx export/model.onnx photos/cat.jpg --topk 3\n";

std::string type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "type " + std::to_string(int(t));
  }
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? "," : "") + (shape[i] < 0 ? "?" : std::to_string(shape[i]));
  return s + "]";
}

// True when `shape` (-1 = dynamic) can hold `want`.
bool fits(const std::vector<int64_t>& shape, const std::vector<int64_t>& want) {
  if (shape.size() != want.size()) return false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] >= 0 && want[i] >= 0 && shape[i] != want[i]) return false;
  }
  return true;
}

// Sequences, maps and optionals have no tensor type info (ORT hands back NULL for it).
void require_tensor(const std::string& model, const char* what, const std::string& name,
                    const Ort::TypeInfo& info) {
  const ONNXType type = info.GetONNXType();
  if (type == ONNX_TYPE_TENSOR) return;
  const char* kind = type == ONNX_TYPE_SEQUENCE   ? "a sequence"
                     : type == ONNX_TYPE_MAP      ? "a map"
                     : type == ONNX_TYPE_OPTIONAL ? "an optional"
                                                  : "not a plain tensor";
  throw et::InputError(model + ": " + what + " '" + name + "' is " + kind +
                       ", not a tensor; export the model with edgetransfer");
}

}  // namespace

int main(int argc, char** argv) {
  return et::run_main(argc, argv, "et_onnx", kUsage, kHelp, [](const et::Options& opt) {
    const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (!api) {
      throw et::InputError(std::string("libonnxruntime ") + OrtGetApiBase()->GetVersionString() +
                           " is older than the headers this was built with (API " +
                           std::to_string(ORT_API_VERSION) + ")");
    }
    Ort::InitApi(api);
    try {
      Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "et_onnx");  // failures are reported by us, once
      Ort::SessionOptions options;
      options.AddConfigEntry("session.intra_op.allow_spinning", "0");
      if (opt.threads > 0) options.SetIntraOpNumThreads(opt.threads);
      std::unique_ptr<Ort::Session> session;
      try {
        session = std::make_unique<Ort::Session>(env, opt.model.c_str(), options);
      } catch (const Ort::Exception& e) {
        throw et::InputError(opt.model + ": not a loadable ONNX model (" + et::first_line(e.what()) + ")");
      }

      Ort::AllocatorWithDefaultOptions alloc;
      const Ort::ModelMetadata meta = session->GetModelMetadata();
      const Ort::AllocatedStringPtr text = meta.LookupCustomMetadataMapAllocated("edgetransfer", alloc);
      if (!text)
        throw et::InputError(opt.model + ": carries no edgetransfer metadata; export it with edgetransfer");
      et::Model model;
      model.manifest = et::parse_manifest(text.get(), opt.model);
      const et::Manifest& m = model.manifest;

      // What the graph declares: one image input, and the logits among its outputs.
      if (session->GetInputCount() != 1) throw et::InputError(opt.model + ": expected one input");
      const std::string input = session->GetInputNameAllocated(0, alloc).get();
      const Ort::TypeInfo in_type_info = session->GetInputTypeInfo(0);  // owns what in_info views
      require_tensor(opt.model, "input", input, in_type_info);
      const auto in_info = in_type_info.GetTensorTypeAndShapeInfo();
      const ONNXTensorElementDataType in_type = in_info.GetElementType();
      const std::vector<int64_t> in_shape = in_info.GetShape();
      std::vector<std::string> outputs;
      std::string declared =
          "input '" + input + "' " + type_name(in_type) + " " + shape_str(in_shape) + "; outputs";
      for (size_t i = 0; i < session->GetOutputCount(); ++i) {
        outputs.push_back(session->GetOutputNameAllocated(i, alloc).get());
        const Ort::TypeInfo type_info = session->GetOutputTypeInfo(i);
        require_tensor(opt.model, "output", outputs.back(), type_info);
        const auto info = type_info.GetTensorTypeAndShapeInfo();
        declared += " '" + outputs.back() + "' " + type_name(info.GetElementType()) + " " +
                    shape_str(info.GetShape());
      }
      std::string output;
      for (const std::string& name : {m.output_name, std::string("logits")}) {
        if (output.empty() && std::find(outputs.begin(), outputs.end(), name) != outputs.end()) output = name;
      }
      if (output.empty() && outputs.size() == 1) output = outputs[0];
      if (output.empty()) throw et::InputError(opt.model + ": no 'logits' output among " + declared);

      const int64_t h = m.pre.height, w = m.pre.width;
      model.takes_pixels = in_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      if (model.takes_pixels
              ? !fits(in_shape, {-1, h, w, 3})
              : in_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || !fits(in_shape, {-1, 3, h, w})) {
        throw et::InputError(opt.model + ": " + declared + " does not take the manifest's " +
                             std::to_string(h) + "x" + std::to_string(w) +
                             " images (float32 NCHW or uint8 NHWC)");
      }
      std::cerr << "et_onnx: " << opt.model << ": " << et::describe(m) << "\n"
                << "et_onnx: " << declared
                << (model.takes_pixels ? " (raw pixels: normalisation in the graph)" : "") << "; onnxruntime "
                << Ort::GetVersionString() << "\n";

      const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
      auto run = [&](Ort::Value x) {
        const char* in_names[] = {input.c_str()};
        const char* out_names[] = {output.c_str()};
        std::vector<Ort::Value> y = session->Run(Ort::RunOptions{nullptr}, in_names, &x, 1, out_names, 1);
        if (y.size() != 1 || !y[0].IsTensor())
          throw et::InputError(opt.model + ": output '" + output + "' is not a tensor");
        const auto info = y[0].GetTensorTypeAndShapeInfo();
        if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
          throw et::InputError(opt.model + ": output '" + output + "' is not float32");
        }
        const float* data = y[0].GetTensorData<float>();
        return std::vector<float>(data, data + info.GetElementCount());
      };
      model.run_normalized = [&](std::vector<float>& x, int64_t n) {
        const int64_t shape[] = {n, 3, h, w};
        return run(Ort::Value::CreateTensor<float>(cpu, x.data(), x.size(), shape, 4));
      };
      model.run_pixels = [&](std::vector<uint8_t>& px, int64_t n) {
        const int64_t shape[] = {n, h, w, 3};
        return run(Ort::Value::CreateTensor<uint8_t>(cpu, px.data(), px.size(), shape, 4));
      };

      return opt.golden.empty() ? et::classify(model, opt) : et::selftest(model, opt.golden);
    } catch (const Ort::Exception& e) {
      throw et::InputError("onnxruntime: " + et::first_line(e.what()));
    }
  });
}
