// What et_onnx, et_torchscript and et_executorch share: the command line, the manifest, image
// decoding and preprocessing, top-k JSON lines and the golden self-test. Each program only loads
// its model and plugs a "run a batch" function into et::Model.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace et {

constexpr int kExitOk = 0;
constexpr int kExitMismatch = 1;  // the self-test found logits outside the tolerance
constexpr int kExitBadInput = 2;  // usage, missing or unreadable files, unusable models

// Anything the user handed us that we cannot use: printed as one line, exit code 2.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A malformed command line: the message is followed by the usage line.
struct UsageError : InputError {
  using InputError::InputError;
};

// The "preprocessing" section of the manifest (edgetransfer.json, schema 1).
struct Preprocessing {
  int height = 0, width = 0;  // input_size is [height, width]
  int resize = 0;             // the shorter side after resizing
  std::array<float, 3> mean{}, std{};
  bool bicubic = false;  // interpolation: Pillow's bicubic, else its bilinear
};

struct Manifest {
  std::string arch;
  std::vector<std::string> labels;
  Preprocessing pre;
  std::string input_name, output_name;  // "io" section
};

// Parses the manifest JSON; `source` names where it came from, for error messages.
Manifest parse_manifest(const std::string& json, const std::string& source);
// One line describing what the model declares (for stderr).
std::string describe(const Manifest& m);

// 8-bit RGB pixels, row-major HWC.
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

// Decodes a JPEG or PNG to RGB with libjpeg-turbo/libpng, as Pillow does (the same pixels);
// transparency is composited onto white, as the Python side does. Refuses, from the header,
// images over 64,000,000 pixels or 1000:1, and anything but a regular file.
Image load_image(const std::string& path);
// Resizes the shorter side to p.resize (Pillow's antialiased bilinear or bicubic) and centre-crops;
// only the crop is computed, so memory and time follow the crop, not the resized image.
Image resize_crop(const Image& img, const Preprocessing& p);
// Scales to [0, 1], subtracts mean, divides by std; writes 3*H*W floats, CHW.
void normalize(const Image& img, const Preprocessing& p, float* out);

// A loaded model: a batch of n inputs in, n * labels.size() logits out (row-major).
struct Model {
  Manifest manifest;
  // Raw-pixel models take uint8 NHWC RGB at input_size; the others normalised float NCHW.
  bool takes_pixels = false;
  std::function<std::vector<float>(std::vector<float>& x, int64_t n)> run_normalized;
  std::function<std::vector<float>(std::vector<uint8_t>& pixels, int64_t n)> run_pixels;
};

struct Options {
  std::string model;
  std::vector<std::string> images;
  int topk = 5;
  int threads = 0;     // --threads N: the runtime's intra-op threads; 0 = its default
  std::string golden;  // --selftest GOLDEN_DIR
  bool help = false;
};

// Parses argv[1:]; checks that the model and every image exist and look like JPEG/PNG files,
// so bad paths fail before the (slow) model load. Throws InputError.
Options parse_args(int argc, char** argv);

// Prints one JSON line per image on stdout: {"path", "topk": [{"label", "prob"}], "logits"}.
int classify(const Model& model, const Options& opt);
// Compares logits with golden/ (from NN.input.bin and from NN.png through our preprocessing).
int selftest(const Model& model, const std::string& golden_dir);

// Text from files, runtimes and argv made safe for one terminal line: control characters
// (newlines, escape sequences) and bytes that are not UTF-8 become '?', and it is cut short.
std::string printable(const std::string& s, size_t max_size = 1000);

// The length of the well-formed UTF-8 sequence at s[i] (1-4), 0 when there is none.
size_t utf8_char(const std::string& s, size_t i);

// The first line of an exception message (libtorch and ORT errors run to many lines).
std::string first_line(const std::string& s);

// What each program's main() does around loading and running a model: the usage line when
// there are no arguments, parse_args, --help, then `body`; an InputError or any other
// std::exception it throws becomes one line on stderr (an InputError whole, anything else its
// first line), prefixed with `name`, and exit code 2.
// `body` turns its library's errors into InputError (for a prefix such as "onnxruntime: ").
int run_main(int argc, char** argv, const char* name, const char* usage, const char* help,
             const std::function<int(const Options&)>& body);

}  // namespace et
