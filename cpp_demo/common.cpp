// Shared code of the two demo programs; see common.hpp.
#include "common.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_FAILURE_USERMSG
#include <stb_image.h>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace et {

namespace {

constexpr int64_t kMaxPixels = 64'000'000;  // as edgetransfer.data.DEFAULT_MAX_PIXELS
constexpr int kBatch = 16;
constexpr double kDefaultAtol = 1e-4, kDefaultRtol = 1e-3;  // edgetransfer.verify

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path.string() + ": cannot open");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

// Checks a path is a JPEG/PNG of sane size from its header alone; returns its channel count.
int check_image(const std::string& path, int* width = nullptr, int* height = nullptr) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw InputError(path + ": no such file");
  if (!fs::is_regular_file(path, ec)) throw InputError(path + ": not a file");
  int w = 0, h = 0, comp = 0;
  if (!stbi_info(path.c_str(), &w, &h, &comp)) {
    throw InputError(path + ": not a readable JPEG/PNG image (" + stbi_failure_reason() + ")");
  }
  if (int64_t(w) * h > kMaxPixels) {
    throw InputError(path + ": " + std::to_string(w) + "x" + std::to_string(h) + " exceeds " +
                     std::to_string(kMaxPixels) + " pixels");
  }
  if (width) *width = w;
  if (height) *height = h;
  return comp;
}

// One axis of Pillow's bilinear resampling (libImaging/Resample.c): a triangle filter whose
// support widens by the scale factor when shrinking (antialiasing), coefficients normalised and
// stored in 22-bit fixed point. Matching it makes our pixels equal Python's, not merely close.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // per output pixel: first input index, count
  std::vector<int32_t> k;   // per output pixel: ksize weights
};

Coeffs bilinear_coeffs(int in_size, int out_size) {
  const double scale = double(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.k.assign(size_t(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    const int xmin = std::max(int(center - support + 0.5), 0);
    const int xmax = std::min(int(center + support + 0.5), in_size) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double t = std::abs((x + xmin - center + 0.5) * ss);
      w[x] = t < 1.0 ? 1.0 - t : 0.0;
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = (ww != 0.0 ? w[x] / ww : w[x]) * (1 << kPrecisionBits);
      c.k[size_t(xx) * c.ksize + x] = int32_t(v < 0 ? -0.5 + v : 0.5 + v);
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t v) {
  if (v <= 0) return 0;
  return uint8_t(std::min(v >> kPrecisionBits, 255));
}

// Resamples along one axis; `horizontal` picks which. RGB, 3 bytes a pixel.
Image resample(const Image& in, int out_w, int out_h, bool horizontal) {
  const Coeffs c = horizontal ? bilinear_coeffs(in.width, out_w) : bilinear_coeffs(in.height, out_h);
  Image out{out_w, out_h, std::vector<uint8_t>(size_t(out_w) * out_h * 3)};
  for (int y = 0; y < out_h; ++y) {
    for (int x = 0; x < out_w; ++x) {
      const int o = horizontal ? x : y;
      const int first = c.bounds[2 * o], count = c.bounds[2 * o + 1];
      const int32_t* k = &c.k[size_t(o) * c.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        int32_t acc = 1 << (kPrecisionBits - 1);
        for (int i = 0; i < count; ++i) {
          const int sx = horizontal ? first + i : x, sy = horizontal ? y : first + i;
          acc += int32_t(in.rgb[(size_t(sy) * in.width + sx) * 3 + ch]) * k[i];
        }
        out.rgb[(size_t(y) * out_w + x) * 3 + ch] = clip8(acc);
      }
    }
  }
  return out;
}

// Python's round(): halves go to the even neighbour (the default FP rounding mode).
int round_half_even(double v) {
  return int(std::nearbyint(v));
}

std::vector<double> softmax(const float* logits, size_t n) {
  std::vector<double> p(logits, logits + n);
  const double top = *std::max_element(p.begin(), p.end());
  double sum = 0.0;
  for (auto& v : p) sum += (v = std::exp(v - top));
  for (auto& v : p) v /= sum;
  return p;
}

size_t argmax(const float* v, size_t n) {
  return size_t(std::max_element(v, v + n) - v);
}

std::vector<float> read_floats(const fs::path& path, size_t count) {
  const std::string bytes = read_file(path);
  if (bytes.size() != count * sizeof(float)) {
    throw InputError(path.string() + ": " + std::to_string(bytes.size()) + " bytes, expected " +
                     std::to_string(count * sizeof(float)) + " (" + std::to_string(count) + " float32)");
  }
  std::vector<float> out(count);
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

// Elementwise |got - want| <= atol + rtol * |want|; returns (max abs diff, values outside).
std::pair<double, int> compare(const std::vector<float>& got, const std::vector<float>& want, double atol,
                               double rtol) {
  double max_abs = 0.0;
  int outside = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::abs(double(got[i]) - double(want[i]));
    if (!(d <= atol + rtol * std::abs(double(want[i])))) ++outside;  // NaN counts as outside
    max_abs = std::max(max_abs, std::isnan(d) ? INFINITY : d);
  }
  return {max_abs, outside};
}

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2e", v);
  return buf;
}

std::vector<float> run_images(const Model& model, const std::vector<Image>& images) {
  const Preprocessing& p = model.manifest.pre;
  const int64_t n = int64_t(images.size());
  const size_t plane = size_t(p.height) * p.width * 3;
  std::vector<float> logits;
  if (model.takes_pixels) {
    std::vector<uint8_t> px(plane * n);
    for (int64_t i = 0; i < n; ++i)
      std::copy(images[i].rgb.begin(), images[i].rgb.end(), px.begin() + i * plane);
    logits = model.run_pixels(px, n);
  } else {
    std::vector<float> x(plane * n);
    for (int64_t i = 0; i < n; ++i) normalize(images[i], p, x.data() + i * plane);
    logits = model.run_normalized(x, n);
  }
  const size_t want = size_t(n) * model.manifest.labels.size();
  if (logits.size() != want) {
    throw InputError("the model returned " + std::to_string(logits.size()) + " logits for " +
                     std::to_string(n) + " image(s); its manifest declares " +
                     std::to_string(model.manifest.labels.size()) + " labels");
  }
  return logits;
}

}  // namespace

int run_main(int argc, char** argv, const char* name, const char* usage, const char* help,
             const std::function<int(const Options&)>& body) {
  if (argc < 2) {
    std::cerr << usage;
    return kExitBadInput;
  }
  try {
    const Options opt = parse_args(argc, argv);
    if (opt.help) {
      std::cout << usage << "\n" << help;
      return kExitOk;
    }
    return body(opt);
  } catch (const UsageError& e) {
    std::cerr << name << ": " << e.what() << "\n" << usage;
  } catch (const InputError& e) {  // ours: already one line, printed whole
    std::cerr << name << ": " << e.what() << "\n";
  } catch (const std::exception& e) {  // anything unexpected: its first line
    std::cerr << name << ": " << first_line(e.what()) << "\n";
  }
  return kExitBadInput;
}

std::string first_line(const std::string& s) {
  std::string line = s.substr(0, s.find('\n'));
  const size_t sentence = line.find(". ");  // libtorch goes on with advice after the first sentence
  if (line.size() > 160 && sentence != std::string::npos) line.resize(sentence);
  return line.size() > 300 ? line.substr(0, 300) + "..." : line;
}

Manifest parse_manifest(const std::string& text, const std::string& source) {
  Manifest m;
  try {
    const json j = json::parse(text);
    if (j.value("schema", 0) != 1) {
      throw InputError(source + ": manifest schema " + j.value("schema", json()).dump() +
                       " is not supported (this demo reads schema 1)");
    }
    m.arch = j.value("arch", "?");
    m.labels = j.at("labels").get<std::vector<std::string>>();
    const json& p = j.at("preprocessing");
    const auto size = p.at("input_size").get<std::vector<int>>();
    if (size.size() != 2) throw InputError(source + ": input_size needs [height, width]");
    m.pre.height = size[0];
    m.pre.width = size[1];
    m.pre.resize = p.at("resize").get<int>();
    m.pre.mean = p.at("mean").get<std::array<float, 3>>();
    m.pre.std = p.at("std").get<std::array<float, 3>>();
    for (const auto& [key, want] :
         {std::pair{"crop", "center"}, {"interpolation", "bilinear"}, {"color", "RGB"}, {"layout", "NCHW"}}) {
      const std::string got = p.value(key, want);
      if (got != want) {
        throw InputError(source + ": preprocessing " + key + "=" + got + " is not supported (only " + want +
                         ")");
      }
    }
    const json io = j.value("io", json::object());
    m.input_name = io.value("input", "input");
    m.output_name = io.value("output", "logits");
  } catch (const json::exception& e) {
    throw InputError(source + ": invalid edgetransfer manifest (" + first_line(e.what()) + ")");
  }
  const Preprocessing& p = m.pre;
  if (m.labels.empty()) throw InputError(source + ": the manifest has no labels");
  if (p.height < 1 || p.width < 1 || p.resize < std::max(p.height, p.width) ||
      *std::min_element(p.std.begin(), p.std.end()) <= 0.0f) {
    throw InputError(source + ": invalid preprocessing (input_size, resize >= input_size, std > 0)");
  }
  return m;
}

std::string describe(const Manifest& m) {
  const Preprocessing& p = m.pre;
  std::ostringstream s;
  s << "arch " << m.arch << ", " << m.labels.size() << " labels [" << join(m.labels) << "], input "
    << p.height << "x" << p.width << " (shorter side resized to " << p.resize << ", centre crop), mean ["
    << p.mean[0] << ", " << p.mean[1] << ", " << p.mean[2] << "], std [" << p.std[0] << ", " << p.std[1]
    << ", " << p.std[2] << "]";
  return s.str();
}

// The EXIF orientation (1-8) of a JPEG, 1 when it has none. Cameras store pixels as the sensor
// saw them and record how to turn them; Pillow's exif_transpose applies it on the Python side.
int exif_orientation(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> b(1 << 16);  // APP1 comes first and is at most 64 KiB
  in.read(reinterpret_cast<char*>(b.data()), std::streamsize(b.size()));
  b.resize(size_t(in.gcount()));
  if (b.size() < 4 || b[0] != 0xFF || b[1] != 0xD8) return 1;
  for (size_t i = 2; i + 4 <= b.size() && b[i] == 0xFF && b[i + 1] != 0xDA;) {
    const size_t len = size_t(b[i + 2]) << 8 | b[i + 3];
    if (b[i + 1] == 0xE1 && len >= 16 && i + 2 + len <= b.size() &&
        std::memcmp(&b[i + 4], "Exif\0\0", 6) == 0) {
      const uint8_t* t = &b[i + 10];  // TIFF header: byte order, 42, offset of IFD0
      const size_t size = len - 8;
      const bool le = t[0] == 'I';
      auto u16 = [&](size_t o) { return le ? t[o] | t[o + 1] << 8 : t[o] << 8 | t[o + 1]; };
      auto u32 = [&](size_t o) { return size_t(le ? u16(o) | u16(o + 2) << 16 : u16(o) << 16 | u16(o + 2)); };
      if (u16(2) != 42) return 1;
      const size_t ifd = u32(4);
      for (size_t e = ifd + 2, n = 0; ifd + 2 <= size && n < size_t(u16(ifd)) && e + 12 <= size;
           ++n, e += 12) {
        if (u16(e) == 0x0112) return u16(e + 8) >= 1 && u16(e + 8) <= 8 ? u16(e + 8) : 1;
      }
      return 1;
    }
    i += 2 + len;
  }
  return 1;
}

// Turns the pixels as the EXIF orientation says (Pillow's ImageOps.exif_transpose).
Image apply_orientation(const Image& in, int orientation) {
  if (orientation <= 1) return in;
  const int w = in.width, h = in.height;
  const bool swap = orientation >= 5;
  Image out{swap ? h : w, swap ? w : h, std::vector<uint8_t>(in.rgb.size())};
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;
      // clang-format off
      switch (orientation) {
        case 2: sx = w - 1 - x; break;                  // mirror
        case 3: sx = w - 1 - x; sy = h - 1 - y; break;  // 180
        case 4: sy = h - 1 - y; break;                  // flip
        case 5: sx = y; sy = x; break;                  // transpose
        case 6: sx = y; sy = h - 1 - x; break;          // 90 clockwise
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;  // transverse
        case 8: sx = w - 1 - y; sy = x; break;          // 90 counter-clockwise
      }
      // clang-format on
      std::copy_n(&in.rgb[(size_t(sy) * w + sx) * 3], 3, &out.rgb[(size_t(y) * out.width + x) * 3]);
    }
  }
  return out;
}

Image load_image(const std::string& path) {
  int w = 0, h = 0;
  const int comp = check_image(path, &w, &h);
  const bool alpha = comp == 2 || comp == 4;
  const int channels = alpha ? 4 : 3;
  std::unique_ptr<stbi_uc, void (*)(void*)> data(stbi_load(path.c_str(), &w, &h, nullptr, channels),
                                                 stbi_image_free);
  if (!data) {
    throw InputError(path + ": not a readable JPEG/PNG image (" + stbi_failure_reason() + ")");
  }
  Image img{w, h, std::vector<uint8_t>(size_t(w) * h * 3)};
  const stbi_uc* src = data.get();
  for (size_t i = 0; i < size_t(w) * h; ++i) {
    for (int c = 0; c < 3; ++c) {
      uint32_t v = src[i * channels + c];
      if (alpha) {
        // Over opaque white, in Pillow's fixed point (AlphaComposite.c, 7 bits, exact /255).
        const uint32_t a = src[i * channels + 3];
        const uint32_t t = v * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
        v = (((t >> 8) + t) >> 8) >> 7;
      }
      img.rgb[i * 3 + c] = uint8_t(v);
    }
  }
  return apply_orientation(img, exif_orientation(path));
}

Image resize_crop(const Image& img, const Preprocessing& p) {
  // Shorter side to p.resize; the longer one truncated, as edgetransfer.runtime.resized_size.
  int w = p.resize, h = p.resize;
  if (img.width <= img.height) {
    h = int(double(int64_t(p.resize) * img.height) / img.width);
  } else {
    w = int(double(int64_t(p.resize) * img.width) / img.height);
  }
  Image r = img;
  if (w != r.width) r = resample(r, w, r.height, true);  // Pillow: horizontal pass first
  if (h != r.height) r = resample(r, w, h, false);
  if (w < p.width || h < p.height) {
    throw InputError("image of " + std::to_string(w) + "x" + std::to_string(h) +
                     " after resize is smaller than the crop");
  }
  const int top = round_half_even((h - p.height) / 2.0), left = round_half_even((w - p.width) / 2.0);
  Image out{p.width, p.height, std::vector<uint8_t>(size_t(p.width) * p.height * 3)};
  for (int y = 0; y < p.height; ++y) {
    const auto row = r.rgb.begin() + (size_t(top + y) * w + left) * 3;
    std::copy(row, row + size_t(p.width) * 3, out.rgb.begin() + size_t(y) * p.width * 3);
  }
  return out;
}

void normalize(const Image& img, const Preprocessing& p, float* out) {
  // Same float32 operations, in the same order, as edgetransfer.runtime.normalize.
  const size_t plane = size_t(img.width) * img.height;
  for (size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) {
      const float v = float(img.rgb[i * 3 + c]) / 255.0f;
      out[c * plane + i] = (v - p.mean[c]) / p.std[c];
    }
  }
}

Options parse_args(int argc, char** argv) {
  Options opt;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      if (i + 1 >= argc) throw UsageError(name + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      opt.help = true;
      return opt;
    } else if (a == "--topk" || a.rfind("--topk=", 0) == 0) {
      const std::string v = a == "--topk" ? value(a) : a.substr(7);
      size_t used = 0;
      try {
        opt.topk = std::stoi(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || opt.topk < 1)
        throw UsageError("--topk needs a positive integer, got '" + v + "'");
    } else if (a == "--selftest" || a.rfind("--selftest=", 0) == 0) {
      opt.golden = a == "--selftest" ? value(a) : a.substr(11);
    } else if (a.size() > 1 && a[0] == '-' && a != "-") {
      throw UsageError("unknown option " + a);
    } else {
      positional.push_back(a);
    }
  }
  if (positional.empty()) throw UsageError("missing MODEL");
  opt.model = positional[0];
  opt.images.assign(positional.begin() + 1, positional.end());
  if (opt.images.empty() && opt.golden.empty())
    throw UsageError("give at least one IMAGE or --selftest GOLDEN_DIR");
  std::error_code ec;
  if (!fs::is_regular_file(opt.model, ec)) throw InputError(opt.model + ": no such model file");
  if (!opt.golden.empty() && !fs::is_regular_file(fs::path(opt.golden) / "golden.json", ec)) {
    throw InputError(opt.golden + ": no golden.json there (an EXPORT_DIR/golden folder)");
  }
  for (const auto& path : opt.images) check_image(path);
  return opt;
}

int classify(const Model& model, const Options& opt) {
  const auto& labels = model.manifest.labels;
  const size_t classes = labels.size(), k = std::min<size_t>(opt.topk, classes);
  for (size_t start = 0; start < opt.images.size(); start += kBatch) {
    const size_t n = std::min<size_t>(kBatch, opt.images.size() - start);
    std::vector<Image> crops;
    for (size_t i = 0; i < n; ++i)
      crops.push_back(resize_crop(load_image(opt.images[start + i]), model.manifest.pre));
    const std::vector<float> logits = run_images(model, crops);
    for (size_t i = 0; i < n; ++i) {
      const float* row = logits.data() + i * classes;
      const std::vector<double> prob = softmax(row, classes);
      std::vector<size_t> order(classes);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return prob[a] > prob[b]; });
      nlohmann::ordered_json top = nlohmann::ordered_json::array();
      for (size_t j = 0; j < k; ++j) {
        top.push_back({{"label", labels[order[j]]}, {"prob", std::round(prob[order[j]] * 1e6) / 1e6}});
      }
      const nlohmann::ordered_json line = {
          {"path", opt.images[start + i]}, {"topk", top}, {"logits", std::vector<float>(row, row + classes)}};
      std::cout << line.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    }
    std::cout.flush();
  }
  return kExitOk;
}

int selftest(const Model& model, const std::string& golden_dir) {
  static_assert(std::endian::native == std::endian::little, "golden .bin files are little-endian");
  const fs::path dir(golden_dir);
  const Manifest& m = model.manifest;
  json index;
  try {
    index = json::parse(read_file(dir / "golden.json"));
  } catch (const json::exception& e) {
    throw InputError((dir / "golden.json").string() + ": invalid JSON (" + first_line(e.what()) + ")");
  }
  const json want_input = {1, 3, m.pre.height, m.pre.width}, want_logits = {1, m.labels.size()};
  if (index.value("dtype", "") != "float32" || index.value("byte_order", "") != "little" ||
      index.value("input_shape", json()) != want_input ||
      index.value("logits_shape", json()) != want_logits) {
    throw InputError(golden_dir + ": golden.json declares input " +
                     index.value("input_shape", json()).dump() + " and logits " +
                     index.value("logits_shape", json()).dump() + "; the model expects " + want_input.dump() +
                     " and " + want_logits.dump() + " float32 little-endian");
  }
  if (index.value("labels", json()) != json(m.labels)) {
    std::cerr << "selftest: FAIL: golden labels " << index.value("labels", json()).dump()
              << " differ from the model's; is this the model's own golden/ folder?\n";
    return kExitMismatch;
  }
  const json tol = index.value("tolerance", json::object());
  const double atol = tol.value("atol", kDefaultAtol), rtol = tol.value("rtol", kDefaultRtol);
  const json cases = index.value("cases", json::array());
  if (cases.empty()) throw InputError(golden_dir + ": golden.json has no cases");

  const size_t plane = size_t(3) * m.pre.height * m.pre.width, classes = m.labels.size();
  std::vector<std::string> names;
  std::vector<float> inputs, expected;
  std::vector<Image> pngs;
  try {
    for (const auto& c : cases) {
      names.push_back(c.at("name").get<std::string>());
      const auto x = read_floats(dir / c.at("input").get<std::string>(), plane);
      const auto y = read_floats(dir / c.at("logits").get<std::string>(), classes);
      inputs.insert(inputs.end(), x.begin(), x.end());
      expected.insert(expected.end(), y.begin(), y.end());
      pngs.push_back(load_image((dir / c.at("png").get<std::string>()).string()));
      if (pngs.back().width != m.pre.width || pngs.back().height != m.pre.height) {
        throw InputError(c.at("png").get<std::string>() + " is not at the input size " +
                         std::to_string(m.pre.width) + "x" + std::to_string(m.pre.height));
      }
    }
  } catch (const json::exception& e) {
    throw InputError(golden_dir + ": invalid case in golden.json (" + first_line(e.what()) + ")");
  }
  const int64_t n = int64_t(names.size());

  // Our normalisation of NN.png must reproduce NN.input.bin.
  std::vector<float> ours(plane * n);
  for (int64_t i = 0; i < n; ++i) normalize(pngs[i], m.pre, ours.data() + i * plane);
  const double norm_diff = compare(ours, inputs, 0.0, 0.0).first;

  // Each path runs as one batch, so the dynamic batch dimension is exercised too.
  struct Path {
    std::string name;
    std::vector<float> logits;
  };
  std::vector<Path> paths;
  if (model.takes_pixels) {
    std::cerr << "selftest: raw-pixel model: NN.input.bin does not apply, checking NN.png only\n";
  } else {
    paths.push_back({"input.bin", model.run_normalized(inputs, n)});
  }
  paths.push_back({"png", run_images(model, pngs)});

  int failed = 0;
  json summary = {{"cases", n}, {"atol", atol}, {"rtol", rtol}, {"max_abs_normalized", norm_diff}};
  for (auto& path : paths) {
    if (path.logits.size() != expected.size()) {
      throw InputError("the model returned " + std::to_string(path.logits.size()) + " logits, expected " +
                       std::to_string(expected.size()));
    }
    double worst = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const std::vector<float> got(path.logits.begin() + i * classes,
                                   path.logits.begin() + (i + 1) * classes);
      const std::vector<float> want(expected.begin() + i * classes, expected.begin() + (i + 1) * classes);
      const auto [max_abs, outside] = compare(got, want, atol, rtol);
      const bool top1 = argmax(got.data(), classes) == argmax(want.data(), classes);
      const bool ok = outside == 0 && top1;
      failed += !ok;
      worst = std::max(worst, max_abs);
      std::cerr << "selftest " << names[i] << " from " << path.name << ": max_abs " << fmt(max_abs) << ", "
                << outside << " outside, top-1 " << m.labels[argmax(got.data(), classes)]
                << (top1 ? "" : " (expected " + m.labels[argmax(want.data(), classes)] + ")")
                << (ok ? "  ok" : "  FAIL") << "\n";
    }
    summary["max_abs_" + path.name] = worst;
  }
  const bool pass = failed == 0;
  summary["failed"] = failed;
  summary["selftest"] = pass ? "pass" : "fail";
  std::cerr << "selftest: " << (pass ? "PASS" : "FAIL") << " (" << n << " cases, " << paths.size()
            << " paths, " << failed << " failed; tolerance |a-b| <= " << atol << " + " << rtol
            << "*|b|; normalisation max diff " << fmt(norm_diff) << ")\n";
  std::cout << summary.dump() << std::endl;
  return pass ? kExitOk : kExitMismatch;
}

}  // namespace et
