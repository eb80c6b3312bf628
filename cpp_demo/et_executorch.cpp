// et_executorch: classify images with an edgetransfer ExecuTorch program (model.pte) through
// executorch::extension::Module, XNNPACK-delegated. Labels, preprocessing and the batch range come
// from the program's constant methods, so no file travels beside it.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "common.hpp"

// The wheel ships libexecutorch_threadpool.so but not its threadpool.h: these are the two
// declarations of it that --threads needs (what executorch.extension.pybindings'
// _unsafe_reset_threadpool calls; XNNPACK runs on this pool).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

namespace rt = executorch::runtime;
using executorch::extension::module::Module;

// The constant methods edgetransfer export --executorch writes (edgetransfer.manifest
// PTE_MANIFEST_METHOD and PTE_BATCH_METHOD): the manifest JSON, and [lowest, highest] batch.
constexpr const char* kManifestMethod = "edgetransfer_manifest";
constexpr const char* kBatchMethod = "edgetransfer_batch";
constexpr int64_t kMaxBatch = 4096;  // far above any --pte-max-batch; a hostile value is refused

const char* kUsage =
    "usage: et_executorch MODEL.pte IMAGE... [--topk K] [--threads N]\n"
    "       et_executorch MODEL.pte --selftest GOLDEN_DIR [--threads N]\n";

const char* kHelp =
    "Classify JPEG/PNG images with an edgetransfer ExecuTorch program (model.pte, XNNPACK).\n"
    "Prints one JSON line per image: {\"path\", \"topk\": [{\"label\", \"prob\"}], \"logits\"}.\n"
    "What the program declares goes to stderr.\n\n"
    "  --topk K               how many labels per image (default 5)\n"
    "  --threads N            threads of ExecuTorch's pool, which XNNPACK runs on (default: one\n"
    "                         per performance core)\n"
    "  --selftest GOLDEN_DIR  compare logits with EXPORT_DIR/golden; exit 1 past tolerance\n\n"
    "A .pte holds operators, delegate data and weights, not code: loading one runs only the\n"
    "kernels and the XNNPACK delegate built into this program.\n\n"
    "Exit codes: 0 ok, 1 self-test failed, 2 bad input.\n"
    "Example: et_executorch export/model.pte photos/cat.jpg --topk 3\n";

// The runtime logs through its platform layer, to stderr by default (CPU probing on every load,
// then the reason a load or run failed). We keep its last error instead and quote it in our one
// line, as edgetransfer.runtime does in Python.
std::string g_last_log;

void keep_log(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t, const char* message,
              size_t length) {
  if (level == kError || level == kFatal) {
    g_last_log.assign(message, strnlen(message, length));
    while (!g_last_log.empty() && (g_last_log.back() == '\n' || g_last_log.back() == '\r'))
      g_last_log.pop_back();
  }
}

// An ET_CHECK that fails inside the runtime aborts the process; a hostile program must still end
// in one line and exit 2, not SIGABRT.
[[noreturn]] void refuse_abort() {
  const std::string line = "et_executorch: the ExecuTorch runtime stopped" +
                           (g_last_log.empty() ? std::string() : ": " + et::printable(g_last_log)) + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stdout);
  ::_exit(et::kExitBadInput);
}

// XNNPACK trusts the graph serialized in a program's delegate blob (ExecuTorch verifies the
// blob's flatbuffer structure, not what its numbers mean): damaged dimensions or ids there crash
// inside XNNPACK (3 SIGSEGV in 300 mutated blobs here). While the runtime runs, such a crash is
// reported as one line and exit 2 instead of a core dump; nothing is recovered.
std::string g_model;  // printable, for the handler

[[noreturn]] void report_crash(int sig) {
  const char* name = sig == SIGSEGV  ? "SIGSEGV"
                     : sig == SIGBUS ? "SIGBUS"
                     : sig == SIGFPE ? "SIGFPE"
                                     : "SIGILL";
  const char* parts[] = {"et_executorch: ", g_model.c_str(), ": ExecuTorch crashed (", name,
                         ") running this program: it is damaged or was not written by edgetransfer export\n"};
  for (const char* p : parts) {
    if (::write(STDERR_FILENO, p, std::strlen(p)) < 0) break;
  }
  ::_exit(et::kExitBadInput);
}

// Installs report_crash for the signals a memory error raises, on its own stack (a runaway
// recursion has none left); the previous handlers (AddressSanitizer's, in that build) come back
// when the guard goes.
class CrashGuard {
 public:
  explicit CrashGuard(const std::string& model) {
    g_model = et::printable(model);
    static std::vector<char> stack(1 << 16);
    stack_t ss{};
    ss.ss_sp = stack.data();
    ss.ss_size = stack.size();
    ::sigaltstack(&ss, nullptr);
    struct sigaction sa {};
    sa.sa_handler = report_crash;
    sa.sa_flags = SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) ::sigaction(kSignals[i], &sa, &previous_[i]);
  }
  ~CrashGuard() {
    for (size_t i = 0; i < kSignals.size(); ++i) ::sigaction(kSignals[i], &previous_[i], nullptr);
  }
  CrashGuard(const CrashGuard&) = delete;
  CrashGuard& operator=(const CrashGuard&) = delete;

 private:
  static constexpr std::array<int, 4> kSignals = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
  std::array<struct sigaction, 4> previous_{};
};

// "<what>: <the runtime's last error> (<error name>)": why, then the code.
std::string reason(rt::Error e) {
  char code[64];
  std::snprintf(code, sizeof code, "%s, 0x%x", rt::to_string(e), unsigned(e));
  std::string why = g_last_log.empty() ? std::string(code) : g_last_log + " (" + code + ")";
  g_last_log.clear();
  return why;
}

std::string dtype_name(executorch::aten::ScalarType t) {
  return t == executorch::aten::ScalarType::Float ? "float32" : "type " + std::to_string(int(t));
}

// The outputs of a constant method (one that takes no input), or an InputError naming it.
std::vector<rt::EValue> constant(Module& module, const std::string& path, const char* method) {
  auto out = module.execute(method);
  if (!out.ok()) {
    throw et::InputError(path + ": cannot read its " + method + " method: " + reason(out.error()));
  }
  return std::move(out.get());
}

}  // namespace

int main(int argc, char** argv) {
  rt::register_pal(
      rt::PalImpl::create(nullptr, refuse_abort, nullptr, nullptr, keep_log, nullptr, nullptr, __FILE__));
  return et::run_main(argc, argv, "et_executorch", kUsage, kHelp, [](const et::Options& opt) {
    if (opt.threads > 0) {
      executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(uint32_t(opt.threads));
    }
    // File mode reads what it needs with read(); the flatbuffer verifier checks every offset
    // before the runtime follows it (Minimal would trust a damaged file's header).
    Module module(opt.model, Module::LoadMode::File);
    if (const rt::Error e = module.load(rt::Program::Verification::InternalConsistency); e != rt::Error::Ok) {
      throw et::InputError(opt.model + ": not a loadable ExecuTorch program (" + reason(e) + ")");
    }
    const auto names = module.method_names();
    if (!names.ok() || !names->count("forward")) {
      throw et::InputError(opt.model + ": has no forward method; export it with edgetransfer");
    }
    if (!names->count(kManifestMethod)) {
      throw et::InputError(opt.model + ": carries no edgetransfer metadata; export it with edgetransfer");
    }

    et::Model model;
    const std::vector<rt::EValue> text = constant(module, opt.model, kManifestMethod);
    if (text.size() != 1 || !text[0].isString()) {
      throw et::InputError(opt.model + ": its " + kManifestMethod +
                           " method does not return the manifest text");
    }
    model.manifest = et::parse_manifest(std::string(text[0].toString()), opt.model);
    const et::Manifest& m = model.manifest;
    const int64_t h = m.pre.height, w = m.pre.width, classes = int64_t(m.labels.size());

    // forward: one float32 [batch, 3, H, W] input planned for the largest batch, and the logits
    // first among its outputs (source_logits may follow, with --keep-source-head).
    const auto meta = module.method_meta("forward");
    if (!meta.ok()) throw et::InputError(opt.model + ": cannot read forward: " + reason(meta.error()));
    const auto tag = meta->num_inputs() == 1 ? meta->input_tag(0) : rt::Result<rt::Tag>(rt::Error::NotFound);
    if (!tag.ok() || *tag != rt::Tag::Tensor) {
      throw et::InputError(opt.model + ": forward takes " + std::to_string(meta->num_inputs()) +
                           " inputs, expected one tensor");
    }
    const auto input = meta->input_tensor_meta(0);
    if (!input.ok())
      throw et::InputError(opt.model + ": cannot read forward's input: " + reason(input.error()));
    const auto sizes = input->sizes();
    if (input->scalar_type() != executorch::aten::ScalarType::Float || sizes.size() != 4 || sizes[0] < 1 ||
        sizes[1] != 3 || sizes[2] != h || sizes[3] != w) {
      std::string shape;
      for (const int32_t d : sizes) shape += (shape.empty() ? "" : ",") + std::to_string(d);
      throw et::InputError(opt.model + ": forward takes " + dtype_name(input->scalar_type()) + " [" + shape +
                           "], not the manifest's " + std::to_string(h) + "x" + std::to_string(w) +
                           " images (float32 NCHW)");
    }
    // The batch range the program declares must be the one its memory was planned for.
    int64_t low = sizes[0], high = sizes[0];
    if (names->count(kBatchMethod)) {
      const std::vector<rt::EValue> range = constant(module, opt.model, kBatchMethod);
      if (range.size() != 2 || !range[0].isInt() || !range[1].isInt()) {
        throw et::InputError(opt.model + ": its " + kBatchMethod +
                             " method does not return [lowest, highest]");
      }
      low = range[0].toInt();
      high = range[1].toInt();
      if (!(1 <= low && low <= high && high <= kMaxBatch) || high != sizes[0]) {
        throw et::InputError(opt.model + ": declares batches " + std::to_string(low) + ".." +
                             std::to_string(high) + " but forward is planned for " +
                             std::to_string(sizes[0]));
      }
    }
    const std::string batches =
        low == high ? std::to_string(low) : std::to_string(low) + ".." + std::to_string(high);
    const rt::Error loaded = [&] {
      const CrashGuard guard(opt.model);  // XNNPACK builds its runtime from the delegate blob here
      return module.load_method("forward");
    }();
    if (loaded != rt::Error::Ok) throw et::InputError(opt.model + ": cannot load forward: " + reason(loaded));
    const size_t threads = executorch::extension::threadpool::get_threadpool()->get_thread_count();
    std::cerr << "et_executorch: " << opt.model << ": " << et::describe(m) << "\n"
              << "et_executorch: forward(float32 [" << batches << ",3," << h << "," << w
              << "]) -> logits; executorch " << ET_EXECUTORCH_VERSION << ", XNNPACK on " << threads
              << (threads == 1 ? " thread\n" : " threads\n");

    // Batches past the highest run in pieces; a fixed-batch program gets its last piece padded
    // (as edgetransfer.runtime.PteProgram).
    const size_t plane = size_t(3 * h * w);
    model.run_normalized = [&, low, high](std::vector<float>& x, int64_t n) {
      std::vector<float> logits;
      for (int64_t start = 0; start < n; start += high) {
        const int64_t count = std::min(high, n - start), run = std::max(count, low);
        std::vector<float> piece(x.begin() + start * plane, x.begin() + (start + count) * plane);
        piece.resize(size_t(run) * plane, 0.0f);
        auto tensor = executorch::extension::from_blob(
            piece.data(), {int32_t(run), 3, int32_t(h), int32_t(w)}, executorch::aten::ScalarType::Float);
        const auto out = [&] {
          const CrashGuard guard(opt.model);
          return module.forward(tensor);
        }();
        if (!out.ok())
          throw et::InputError("ExecuTorch could not run " + opt.model + ": " + reason(out.error()));
        if (out->empty() || !(*out)[0].isTensor()) {
          throw et::InputError(opt.model + ": forward's first output is not a tensor");
        }
        const executorch::aten::Tensor& y = (*out)[0].toTensor();
        if (y.scalar_type() != executorch::aten::ScalarType::Float || y.dim() != 2 || y.size(0) != run ||
            y.size(1) != classes) {
          throw et::InputError(opt.model + ": forward returned logits of another shape than [" +
                               std::to_string(run) + ", " + std::to_string(classes) + "] float32");
        }
        const float* data = y.const_data_ptr<float>();
        logits.insert(logits.end(), data, data + count * classes);
      }
      return logits;
    };

    return opt.golden.empty() ? et::classify(model, opt) : et::selftest(model, opt.golden);
  });
}
