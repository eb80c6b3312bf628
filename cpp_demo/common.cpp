// Shared code of the demo programs; see common.hpp.
#include "common.hpp"

#include <fcntl.h>
#include <png.h>
#include <stdio.h>  // jpeglib.h uses FILE without including it
#include <sys/stat.h>
#include <unistd.h>
// clang-format off
#include <jpeglib.h>
#include <jerror.h>  // after jpeglib.h, whose types it needs
// clang-format on

#include <algorithm>
#include <bit>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace et {

namespace {

constexpr int64_t kMaxPixels = 64'000'000;  // as edgetransfer.data.DEFAULT_MAX_PIXELS
constexpr int kMaxAspect = 1000;            // as edgetransfer.data.MAX_ASPECT
constexpr int kMaxSide = 16384;             // as edgetransfer.manifest.MAX_SIDE
// As edgetransfer.manifest.STD_RANGE and MAX_ABS_MEAN: normalised inputs stay finite and sane.
constexpr double kMinStd = 1e-4, kMaxStd = 1e4, kMaxAbsMean = 1e4;
constexpr int kBatch = 16;
constexpr int kMaxThreads = 256;  // --threads: a typo such as 1000000 must not start a million
constexpr size_t kBatchBytes = size_t(256) << 20;           // fewer images per batch for huge inputs
constexpr double kDefaultAtol = 1e-4, kDefaultRtol = 1e-3;  // edgetransfer.verify
// What hostile files may make us read or nest: far above anything edgetransfer writes.
constexpr int kMaxJsonDepth = 64;
constexpr size_t kMaxJsonBytes = size_t(1) << 20;  // edgetransfer.manifest.MAX_MANIFEST
constexpr int64_t kMaxImageBytes = int64_t(1) << 30;
constexpr size_t kMaxGoldenCases = 1000;
// Encoders write about 10 scans; each scan passes over the whole image, so a progressive JPEG of
// endless scans is a CPU bomb (900 scans of 16 Mpixels took 13 s, in Pillow too).
constexpr int kMaxJpegScans = 200;

using File = std::unique_ptr<FILE, int (*)(FILE*)>;

// Opens a regular file of at most max_bytes, checked on the open descriptor: a FIFO, a device
// such as /dev/zero or a folder is refused without blocking or reading. Returns its size.
File open_regular(const fs::path& path, int64_t max_bytes, int64_t* size = nullptr) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    throw InputError(path.string() + ": " + (errno == ENOENT ? "no such file" : std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(path.string() + ": not a regular file");
  }
  if (st.st_size > max_bytes) {
    ::close(fd);
    throw InputError(path.string() + ": " + std::to_string(st.st_size) + " bytes, more than the " +
                     std::to_string(max_bytes) + " allowed");
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  FILE* f = ::fdopen(fd, "rb");
  if (!f) {
    ::close(fd);
    throw InputError(path.string() + ": cannot open");
  }
  if (size) *size = st.st_size;
  return File(f, std::fclose);
}

std::string read_file(const fs::path& path, int64_t max_bytes) {
  int64_t size = 0;
  const File f = open_regular(path, max_bytes, &size);
  std::string bytes(size_t(size), '\0');
  if (std::fread(bytes.data(), 1, bytes.size(), f.get()) != bytes.size() || std::fgetc(f.get()) != EOF) {
    throw InputError(path.string() + ": changed size while being read");
  }
  return bytes;
}

// Parses JSON of bounded size and nesting: nlohmann's DOM copies and compares recursively, so a
// document nested 200,000 deep would overflow the stack later even though parsing is iterative.
json parse_json(const std::string& text, const std::string& source) {
  if (text.size() > kMaxJsonBytes) {
    throw InputError(source + ": " + std::to_string(text.size()) + " bytes of JSON, more than the " +
                     std::to_string(kMaxJsonBytes) + " allowed");
  }
  try {
    return json::parse(text, [&](int depth, json::parse_event_t, json&) {
      if (depth > kMaxJsonDepth) {
        throw InputError(source + ": JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
      }
      return true;
    });
  } catch (const json::exception& e) {
    throw InputError(source + ": invalid JSON (" + first_line(e.what()) + ")");
  }
}

// j[key] when j is an object holding it, else nullptr; unlike json::value() it copies nothing.
const json* member(const json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  const auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

std::string dump(const json* j) {
  return j ? j->dump(-1, ' ', false, json::error_handler_t::replace) : "none";
}

std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

// Refuses, from the header alone, images too large or too elongated to resize (as
// edgetransfer.data.load_image does): a 1x2,000,000 strip would otherwise resize to gigabytes.
void check_size(const std::string& path, int64_t w, int64_t h) {
  const std::string size = std::to_string(w) + "x" + std::to_string(h);
  if (w < 1 || h < 1) throw InputError(path + ": " + size + " has no pixels");
  if (w * h > kMaxPixels) {
    throw InputError(path + ": " + size + " exceeds " + std::to_string(kMaxPixels) + " pixels");
  }
  if (std::max(w, h) > kMaxAspect * std::min(w, h)) {
    throw InputError(path + ": " + size + " is too elongated (over " + std::to_string(kMaxAspect) + ":1)");
  }
}

// Over opaque white, in Pillow's fixed point (AlphaComposite.c, 7 bits, exact /255), as
// edgetransfer.data.to_rgb composites transparency.
uint8_t over_white(uint32_t v, uint32_t a) {
  const uint32_t t = v * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
  return uint8_t((((t >> 8) + t) >> 8) >> 7);
}

// libjpeg and libpng report a fatal error through a callback that must not return: it records
// the message and longjmps back to the decoder below, whose C++ objects all predate setjmp.
struct DecodeError {
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX] = "";
};

struct JpegErrors {
  jpeg_error_mgr mgr;
  DecodeError error;
};

[[noreturn]] void jpeg_fail(j_common_ptr cinfo) {
  auto* e = reinterpret_cast<JpegErrors*>(cinfo->err);
  e->mgr.format_message(cinfo, e->error.message);
  std::longjmp(e->error.jump, 1);
}

// Warnings are corrupt-but-decodable data, which Pillow decodes quietly too; a file that ends
// early is an error there ("image file is truncated"), so it is one here.
void jpeg_warn(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_fail(cinfo);
}

void jpeg_scans(j_common_ptr cinfo) {
  const auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->input_scan_number > kMaxJpegScans) {
    std::snprintf(reinterpret_cast<JpegErrors*>(cinfo->err)->error.message, JMSG_LENGTH_MAX,
                  "more than %d scans", kMaxJpegScans);
    std::longjmp(reinterpret_cast<JpegErrors*>(cinfo->err)->error.jump, 1);
  }
}

// The EXIF orientation (1-8) in a saved APP1 marker, 1 when it has none. Cameras store pixels as
// the sensor saw them and record how to turn them; Pillow's exif_transpose applies it in Python.
int exif_orientation(const jpeg_saved_marker_ptr markers) {
  for (auto m = markers; m; m = m->next) {
    if (m->marker != JPEG_APP0 + 1 || m->data_length < 14 || std::memcmp(m->data, "Exif\0\0", 6) != 0)
      continue;
    const uint8_t* t = m->data + 6;  // TIFF header: byte order, 42, offset of IFD0
    const size_t size = m->data_length - 6;
    const bool le = t[0] == 'I';
    auto u16 = [&](size_t o) { return le ? t[o] | t[o + 1] << 8 : t[o] << 8 | t[o + 1]; };
    auto u32 = [&](size_t o) { return size_t(le ? u16(o) | u16(o + 2) << 16 : u16(o) << 16 | u16(o + 2)); };
    if (u16(2) != 42) return 1;
    const size_t ifd = u32(4);
    for (size_t e = ifd + 2, n = 0; ifd + 2 <= size && n < size_t(u16(ifd)) && e + 12 <= size; ++n, e += 12) {
      if (u16(e) == 0x0112) return u16(e + 8) >= 1 && u16(e + 8) <= 8 ? u16(e + 8) : 1;
    }
    return 1;
  }
  return 1;
}

// Decodes with libjpeg(-turbo) at its default settings, as Pillow does, so pixels equal
// Python's. Grayscale comes out as RGB; CMYK (Adobe's inverted convention, which Pillow assumes)
// is converted with Pillow's cmyk2rgb. With header_only, stops after the size check.
Image decode_jpeg(FILE* f, const std::string& path, bool header_only, int* orientation) {
  jpeg_decompress_struct cinfo{};
  JpegErrors err{};
  jpeg_progress_mgr progress{};
  Image img;
  std::vector<uint8_t> row;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_warn;
  if (setjmp(err.error.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw InputError(path + ": not a readable JPEG image (" + err.error.message + ")");
  }
  jpeg_create_decompress(&cinfo);
  cinfo.mem->max_memory_to_use = long(2) << 30;
  progress.progress_monitor = jpeg_scans;
  cinfo.progress = &progress;
  jpeg_stdio_src(&cinfo, f);
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  check_size(path, cinfo.image_width, cinfo.image_height);
  if (header_only) {
    jpeg_destroy_decompress(&cinfo);
    return img;
  }
  *orientation = exif_orientation(cinfo.marker_list);
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  img.width = int(cinfo.output_width);
  img.height = int(cinfo.output_height);
  img.rgb.resize(size_t(img.width) * img.height * 3);
  row.resize(size_t(img.width) * cinfo.output_components);
  while (cinfo.output_scanline < cinfo.output_height) {
    uint8_t* out = &img.rgb[size_t(cinfo.output_scanline) * img.width * 3];
    JSAMPROW rows[] = {row.data()};
    jpeg_read_scanlines(&cinfo, rows, 1);
    for (int x = 0; x < img.width; ++x) {
      if (!cmyk) {
        std::copy_n(&row[size_t(x) * 3], 3, out + size_t(x) * 3);
        continue;
      }
      const int nk = row[size_t(x) * 4 + 3];  // inverted: 255 - k
      for (int c = 0; c < 3; ++c) {
        const int tmp = (255 - row[size_t(x) * 4 + c]) * nk + 128;
        out[size_t(x) * 3 + c] = uint8_t(std::clamp(nk - (((tmp >> 8) + tmp) >> 8), 0, 255));
      }
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return img;
}

[[noreturn]] void png_fail(png_structp png, png_const_charp message) {
  auto* e = static_cast<DecodeError*>(png_get_error_ptr(png));
  std::snprintf(e->message, sizeof e->message, "%s", message);
  png_longjmp(png, 1);
}

void png_warn(png_structp, png_const_charp) {}  // ancillary trouble: Pillow decodes on too

// Decodes with libpng as Pillow's to_rgb sees it: 16-bit channels keep their high byte, except
// 16-bit grayscale, stretched from its own min..max; palette transparency and alpha are
// composited onto white; a grayscale or RGB tRNS colour key is ignored.
Image decode_png(FILE* f, const std::string& path, bool header_only) {
  DecodeError err;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &err, png_fail, png_warn);
  if (!png) throw InputError(path + ": out of memory");
  png_infop info = png_create_info_struct(png);
  Image img;
  std::vector<uint8_t> buf;
  std::vector<png_bytep> rows;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw InputError(path + ": not a readable PNG image (" + err.message + ")");
  }
  if (!info) png_error(png, "out of memory");
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);  // check_size decides, with our message
  png_set_chunk_malloc_max(png, 8 << 20);            // text and ICC chunks: no inflate bombs
  png_init_io(png, f);
  png_read_info(png, info);
  const int64_t w = png_get_image_width(png, info), h = png_get_image_height(png, info);
  check_size(path, w, h);
  if (header_only) {
    png_destroy_read_struct(&png, &info, nullptr);
    return img;
  }
  const int type = png_get_color_type(png, info), depth = png_get_bit_depth(png, info);
  const bool gray16 = type == PNG_COLOR_TYPE_GRAY && depth == 16;
  if (!gray16) {
    png_set_strip_16(png);
    // Each only for its own colour type: palette_to_rgb would turn any tRNS into alpha.
    if (type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);  // with its tRNS as alpha
    if (type == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if (!(type & PNG_COLOR_MASK_COLOR)) png_set_gray_to_rgb(png);
  }
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const size_t channels = png_get_channels(png, info), stride = png_get_rowbytes(png, info);
  if (stride != size_t(w) * channels * (gray16 ? 2 : 1) || (!gray16 && channels != 3 && channels != 4)) {
    png_error(png, "unexpected pixel layout");
  }
  buf.resize(stride * size_t(h));
  for (int64_t y = 0; y < h; ++y) rows.push_back(&buf[size_t(y) * stride]);
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);

  img.width = int(w);
  img.height = int(h);
  img.rgb.resize(size_t(w) * h * 3);
  const size_t n = size_t(w) * h;
  if (gray16) {  // edgetransfer.data.to_rgb: (v - lo) * 255 / (hi - lo), rounded half to even
    std::vector<uint16_t> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = uint16_t(buf[2 * i] << 8 | buf[2 * i + 1]);
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    const double scale = *hi > *lo ? 255.0 / (*hi - *lo) : 0.0;
    for (size_t i = 0; i < n; ++i) {
      const uint8_t g = uint8_t(std::clamp(std::nearbyint((v[i] - *lo) * scale), 0.0, 255.0));
      std::fill_n(&img.rgb[i * 3], 3, g);
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      for (size_t c = 0; c < 3; ++c) {
        const uint8_t v = buf[i * channels + c];
        img.rgb[i * 3 + c] = channels == 4 ? over_white(v, buf[i * channels + 3]) : v;
      }
    }
  }
  return img;
}

// Decodes a JPEG or PNG file (by content, not name), or with header_only just checks it.
Image decode(const std::string& path, bool header_only, int* orientation = nullptr) {
  const File f = open_regular(path, kMaxImageBytes);
  uint8_t magic[8] = {};
  const size_t got = std::fread(magic, 1, sizeof magic, f.get());
  std::rewind(f.get());
  if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) {
    int unused = 1;
    return decode_jpeg(f.get(), path, header_only, orientation ? orientation : &unused);
  }
  if (got == 8 && png_sig_cmp(magic, 0, 8) == 0) return decode_png(f.get(), path, header_only);
  throw InputError(path + ": not a readable JPEG/PNG image (neither signature)");
}

// Checks a path is a JPEG/PNG of sane size from its header alone.
void check_image(const std::string& path) {
  decode(path, true);
}

// One axis of Pillow's bilinear or bicubic resampling (libImaging/Resample.c): a triangle or
// Keys cubic (a = -0.5) filter whose support widens by the scale factor when shrinking
// (antialiasing), coefficients normalised and stored in 22-bit fixed point. Matching it makes our
// pixels equal Python's, not merely close.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // per output pixel: first input index, count
  std::vector<int32_t> k;   // per output pixel: ksize weights
};

// The coefficients of outputs [first, first + count) of a resize from in_size to out_size: the
// same numbers Pillow computes for those outputs of the whole resize.
double bilinear_filter(double x) {
  x = std::abs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  x = std::abs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

Coeffs resample_coeffs(int in_size, int out_size, int first, int count, bool bicubic) {
  double (*filter)(double) = bicubic ? bicubic_filter : bilinear_filter;
  const double scale = double(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = (bicubic ? 2.0 : 1.0) * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(count) * 2);
  c.k.assign(size_t(count) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int o = 0; o < count; ++o) {
    const double center = (first + o + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    const int xmin = std::max(int(center - support + 0.5), 0);
    const int xmax = std::min(int(center + support + 0.5), in_size) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = filter((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = (ww != 0.0 ? w[x] / ww : w[x]) * (1 << kPrecisionBits);
      c.k[size_t(o) * c.ksize + x] = int32_t(v < 0 ? -0.5 + v : 0.5 + v);
    }
    c.bounds[2 * o] = xmin;
    c.bounds[2 * o + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t v) {
  if (v <= 0) return 0;
  return uint8_t(std::min(v >> kPrecisionBits, 255));
}

// One pass of Pillow's resampling along an axis, producing only the outputs `c` describes: with
// `horizontal`, from the input rows [row0, row0 + rows); vertically, input row i is in.rgb's row
// i - row0. RGB, 3 bytes a pixel.
Image resample(const Image& in, const Coeffs& c, bool horizontal, int row0, int rows) {
  const int count = int(c.bounds.size() / 2);
  const int out_w = horizontal ? count : in.width, out_h = horizontal ? rows : count;
  Image out{out_w, out_h, std::vector<uint8_t>(size_t(out_w) * out_h * 3)};
  for (int y = 0; y < out_h; ++y) {
    for (int x = 0; x < out_w; ++x) {
      const int o = horizontal ? x : y;
      const int first = c.bounds[2 * o], n = c.bounds[2 * o + 1];
      const int32_t* k = &c.k[size_t(o) * c.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        int32_t acc = 1 << (kPrecisionBits - 1);
        for (int i = 0; i < n; ++i) {
          const int sx = horizontal ? first + i : x, sy = horizontal ? row0 + y : first + i - row0;
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
  const int64_t want = int64_t(count * sizeof(float));
  int64_t size = 0;
  const File f = open_regular(path, want, &size);
  std::vector<float> out(count);
  if (size != want || std::fread(out.data(), sizeof(float), count, f.get()) != count) {
    throw InputError(path.string() + ": " + std::to_string(size) + " bytes, expected " +
                     std::to_string(want) + " (" + std::to_string(count) + " float32)");
  }
  return out;
}

// A model whose logits overflow (or a hostile one) must not print inf/NaN probabilities as if fine.
void check_finite(const std::vector<float>& logits) {
  if (!std::all_of(logits.begin(), logits.end(), [](float v) { return std::isfinite(v); })) {
    throw InputError(
        "the model returned non-finite logits (inf or NaN); its weights or preprocessing are broken");
  }
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
  check_finite(logits);
  return logits;
}

// How many images go in one batch: kBatch, fewer when one input tensor is huge.
size_t batch_size(const Preprocessing& p) {
  return std::clamp<size_t>(kBatchBytes / (size_t(3) * p.height * p.width * sizeof(float)), 1, kBatch);
}

// The length of the well-formed UTF-8 sequence at s[i], 0 when there is none (a stray or
// overlong byte, a surrogate, past U+10FFFF).
size_t utf8_length(const std::string& s, size_t i) {
  const uint8_t b = s[i];
  const size_t n = b < 0x80             ? 1
                   : (b & 0xE0) == 0xC0 ? 2
                   : (b & 0xF0) == 0xE0 ? 3
                   : (b & 0xF8) == 0xF0 ? 4
                                        : 0;
  if (n == 0 || i + n > s.size()) return 0;
  uint32_t cp = n == 1 ? b : b & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    if ((uint8_t(s[i + k]) & 0xC0) != 0x80) return 0;
    cp = cp << 6 | (uint8_t(s[i + k]) & 0x3F);
  }
  constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  return cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF) ? 0 : n;
}

}  // namespace

size_t utf8_char(const std::string& s, size_t i) { return utf8_length(s, i); }

std::string printable(const std::string& s, size_t max_size) {
  const std::string in = s.size() > max_size ? s.substr(0, max_size) + "..." : s;
  std::string out;
  for (size_t i = 0; i < in.size();) {
    const size_t n = utf8_length(in, i);
    if (n == 0 || (n == 1 && (uint8_t(in[i]) < 0x20 || in[i] == 0x7f))) {
      out += '?';
      ++i;
    } else {
      out.append(in, i, n);
      i += n;
    }
  }
  return out;
}

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
    std::cerr << name << ": " << printable(e.what()) << "\n" << usage;
  } catch (const InputError& e) {  // ours: one line once names from files are made printable
    std::cerr << name << ": " << printable(e.what()) << "\n";
  } catch (const std::bad_alloc&) {
    std::cerr << name << ": out of memory\n";
  } catch (const std::exception& e) {  // anything unexpected: its first line
    std::cerr << name << ": " << printable(first_line(e.what())) << "\n";
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
  const json j = parse_json(text, source);
  try {
    const json* schema = member(j, "schema");
    if (!schema || *schema != 1) {
      throw InputError(source + ": manifest schema " + dump(schema) +
                       " is not supported (this demo reads schema 1)");
    }
    const json* arch = member(j, "arch");
    m.arch = arch && arch->is_string() ? arch->get<std::string>() : "?";
    m.labels = j.at("labels").get<std::vector<std::string>>();
    const json& p = j.at("preprocessing");
    // Sizes as Python's int(): integral numbers kept, others truncated; only 1..kMaxSide.
    auto side = [&](const json& v) {
      const double d = v.get<double>();
      if (!(d >= 1 && d < kMaxSide + 1)) {
        throw InputError(source + ": invalid preprocessing: sizes must be 1.." + std::to_string(kMaxSide) +
                         " pixels, got " + dump(&v));
      }
      return int(d);
    };
    const json& size = p.at("input_size");
    if (!size.is_array() || size.size() != 2) throw InputError(source + ": input_size needs [height, width]");
    m.pre.height = side(size[0]);
    m.pre.width = side(size[1]);
    m.pre.resize = side(p.at("resize"));
    const auto means = p.at("mean").get<std::array<double, 3>>();
    const auto stds = p.at("std").get<std::array<double, 3>>();
    for (int c = 0; c < 3; ++c) {
      // As edgetransfer.manifest.Preprocessing.from_dict: absurd values give inf/NaN inputs.
      if (!(std::abs(means[c]) <= kMaxAbsMean && stds[c] >= kMinStd && stds[c] <= kMaxStd)) {
        throw InputError(source + ": invalid preprocessing: mean/std need 3 finite values, |mean| <= " +
                         fmt(kMaxAbsMean) + ", std in [" + fmt(kMinStd) + ", " + fmt(kMaxStd) + "]");
      }
      m.pre.mean[c] = float(means[c]);
      m.pre.std[c] = float(stds[c]);
    }
    for (const auto& [key, want] : {std::pair{"crop", "center"}, {"color", "RGB"}, {"layout", "NCHW"}}) {
      const json* got = member(p, key);
      if (got && *got != want) {
        throw InputError(source + ": preprocessing " + key + "=" + dump(got) + " is not supported (only " +
                         want + ")");
      }
    }
    const json* interpolation = member(p, "interpolation");
    if (interpolation && *interpolation != "bilinear" && *interpolation != "bicubic") {
      throw InputError(source + ": preprocessing interpolation=" + dump(interpolation) +
                       " is not supported (only bilinear or bicubic)");
    }
    m.pre.bicubic = interpolation && *interpolation == "bicubic";
    const json* io = member(j, "io");
    const json* input = io ? member(*io, "input") : nullptr;
    const json* output = io ? member(*io, "output") : nullptr;
    m.input_name = input ? input->get<std::string>() : "input";
    m.output_name = output ? output->get<std::string>() : "logits";
  } catch (const json::exception& e) {
    throw InputError(source + ": invalid edgetransfer manifest (" + first_line(e.what()) + ")");
  }
  const Preprocessing& p = m.pre;
  if (m.labels.empty()) throw InputError(source + ": the manifest has no labels");
  if (p.resize < std::max(p.height, p.width)) {
    throw InputError(source + ": invalid preprocessing: resize smaller than input_size");
  }
  return m;
}

std::string describe(const Manifest& m) {
  const Preprocessing& p = m.pre;
  std::ostringstream s;
  s << "arch " << printable(m.arch) << ", " << m.labels.size() << " labels [" << printable(join(m.labels))
    << "], input " << p.height << "x" << p.width << " (shorter side resized to " << p.resize
    << (p.bicubic ? " bicubic" : "") << ", centre crop), mean [" << p.mean[0] << ", " << p.mean[1] << ", "
    << p.mean[2] << "], std [" << p.std[0] << ", " << p.std[1] << ", " << p.std[2] << "]";
  return s.str();
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
  int orientation = 1;
  const Image img = decode(path, false, &orientation);
  return apply_orientation(img, orientation);
}

Image resize_crop(const Image& img, const Preprocessing& p) {
  check_size("image", img.width, img.height);  // bounds the resized size to resize x 1000*resize
  // Shorter side to p.resize; the longer one truncated, as edgetransfer.runtime.resized_size.
  int w = p.resize, h = p.resize;
  if (img.width <= img.height) {
    h = int(double(int64_t(p.resize) * img.height) / img.width);
  } else {
    w = int(double(int64_t(p.resize) * img.width) / img.height);
  }
  if (w < p.width || h < p.height) {
    throw InputError("image of " + std::to_string(w) + "x" + std::to_string(h) +
                     " after resize is smaller than the crop");
  }
  const int top = round_half_even((h - p.height) / 2.0), left = round_half_even((w - p.width) / 2.0);
  // Pillow resizes the whole image, horizontal pass first, then we crop. Each output pixel
  // depends only on its own coefficients, so computing just the crop (from just the input rows
  // it reads) gives the same pixels with memory and time bounded by the crop, not the resize.
  Coeffs vert;
  int row0 = top, rows = p.height;
  if (h != img.height) {
    vert = resample_coeffs(img.height, h, top, p.height, p.bicubic);
    int end = 0;
    row0 = img.height;
    for (int o = 0; o < p.height; ++o) {
      row0 = std::min(row0, vert.bounds[2 * o]);
      end = std::max(end, vert.bounds[2 * o] + vert.bounds[2 * o + 1]);
    }
    rows = std::max(end - row0, 0);
  }
  Image r;
  if (w != img.width) {
    r = resample(img, resample_coeffs(img.width, w, left, p.width, p.bicubic), true, row0, rows);
  } else {
    r = Image{p.width, rows, std::vector<uint8_t>(size_t(p.width) * rows * 3)};
    for (int y = 0; y < rows; ++y) {
      const auto row = img.rgb.begin() + (size_t(row0 + y) * img.width + left) * 3;
      std::copy(row, row + size_t(p.width) * 3, r.rgb.begin() + size_t(y) * p.width * 3);
    }
  }
  return h != img.height ? resample(r, vert, false, row0, rows) : r;
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

// A command-line value that must be an integer >= 1.
static int positive_int(const std::string& option, const std::string& v) {
  size_t used = 0;
  int n = 0;
  try {
    n = std::stoi(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || n < 1) throw UsageError(option + " needs a positive integer, got '" + v + "'");
  return n;
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
      opt.topk = positive_int("--topk", a == "--topk" ? value(a) : a.substr(7));
    } else if (a == "--threads" || a.rfind("--threads=", 0) == 0) {
      opt.threads = positive_int("--threads", a == "--threads" ? value(a) : a.substr(10));
      if (opt.threads > kMaxThreads) throw UsageError("--threads is at most " + std::to_string(kMaxThreads));
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
  const size_t batch = batch_size(model.manifest.pre);
  for (size_t start = 0; start < opt.images.size(); start += batch) {
    const size_t n = std::min<size_t>(batch, opt.images.size() - start);
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
  const json index =
      parse_json(read_file(dir / "golden.json", kMaxJsonBytes), (dir / "golden.json").string());
  const json want_input = {1, 3, m.pre.height, m.pre.width}, want_logits = {1, m.labels.size()};
  const json* dtype = member(index, "dtype");
  const json* order = member(index, "byte_order");
  const json* input_shape = member(index, "input_shape");
  const json* logits_shape = member(index, "logits_shape");
  if (!dtype || *dtype != "float32" || !order || *order != "little" || !input_shape ||
      *input_shape != want_input || !logits_shape || *logits_shape != want_logits) {
    throw InputError(golden_dir + ": golden.json declares input " + dump(input_shape) + " and logits " +
                     dump(logits_shape) + "; the model expects " + want_input.dump() + " and " +
                     want_logits.dump() + " float32 little-endian");
  }
  const json* labels = member(index, "labels");
  if (!labels || *labels != json(m.labels)) {
    std::cerr << "selftest: FAIL: golden labels " << printable(dump(labels))
              << " differ from the model's; is this the model's own golden/ folder?\n";
    return kExitMismatch;
  }
  const json* tol = member(index, "tolerance");
  const json* atol_value = tol ? member(*tol, "atol") : nullptr;
  const json* rtol_value = tol ? member(*tol, "rtol") : nullptr;
  double atol = kDefaultAtol, rtol = kDefaultRtol;
  try {
    if (atol_value) atol = atol_value->get<double>();
    if (rtol_value) rtol = rtol_value->get<double>();
  } catch (const json::exception& e) {
    throw InputError(golden_dir + ": invalid tolerance in golden.json (" + first_line(e.what()) + ")");
  }
  if (!(atol >= 0 && atol <= 1e6 && rtol >= 0 && rtol <= 1e6)) {
    throw InputError(golden_dir + ": golden.json tolerance must be finite and >= 0");
  }
  const json* cases = member(index, "cases");
  if (!cases || !cases->is_array() || cases->empty())
    throw InputError(golden_dir + ": golden.json has no cases");
  if (cases->size() > kMaxGoldenCases) {
    throw InputError(golden_dir + ": golden.json has " + std::to_string(cases->size()) +
                     " cases, more than " + std::to_string(kMaxGoldenCases));
  }

  // Every file a case names must be a plain name inside the golden folder: no absolute path,
  // no "..", no symlink leading out (a received golden/ must not make us read elsewhere).
  std::error_code ec;
  const fs::path root = fs::canonical(dir, ec);
  if (ec) throw InputError(golden_dir + ": cannot resolve (" + ec.message() + ")");
  auto inside = [&](const json& c, const char* key) {
    const std::string name = c.at(key).get<std::string>();
    const fs::path rel(name);
    const bool dotdot =
        std::any_of(rel.begin(), rel.end(), [](const fs::path& part) { return part == ".."; });
    if (name.empty() || rel.is_absolute() || dotdot || name.find('\0') != std::string::npos) {
      throw InputError(golden_dir + ": golden.json names '" + name +
                       "', not a file inside the golden folder");
    }
    const fs::path real = fs::canonical(root / rel, ec);
    if (ec) throw InputError((dir / rel).string() + ": " + ec.message());
    const fs::path up = real.lexically_relative(root);
    if (up.empty() || *up.begin() == "..") {
      throw InputError((dir / rel).string() + ": leads outside the golden folder (a symlink)");
    }
    return real;
  };

  const size_t plane = size_t(3) * m.pre.height * m.pre.width, classes = m.labels.size();
  std::vector<std::string> names;
  std::vector<float> inputs, expected;
  std::vector<Image> pngs;
  try {
    for (const auto& c : *cases) {
      names.push_back(printable(c.at("name").get<std::string>(), 100));
      const auto x = read_floats(inside(c, "input"), plane);
      const auto y = read_floats(inside(c, "logits"), classes);
      inputs.insert(inputs.end(), x.begin(), x.end());
      expected.insert(expected.end(), y.begin(), y.end());
      pngs.push_back(load_image(inside(c, "png").string()));
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
    check_finite(paths.back().logits);
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
