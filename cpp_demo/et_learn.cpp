// et_learn: learn a new head on the device, without Python. Reads a backbone bundle (ONNX from
// `edgetransfer backbone`, its manifest in the metadata), scans DATA_DIR's class folders and
// splits them as edgetransfer.data.scan does (the same seeded shuffle: a port of Python's
// random.Random), decodes with et_onnx's preprocessing (common.cpp), runs the backbone with the
// ONNX Runtime C++ API in batches, fits the head as edgetransfer/headfit.py does (headfit.cpp)
// and writes EXPORT_DIR: model.onnx (the bundle with the head appended as a Gemm, written by
// editing the protobuf directly), backbone.onnx + head.safetensors (what `edgetransfer verify`
// checks it against), edgetransfer.json and labels.txt.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <openssl/evp.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"
#include "headfit.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

const char* kUsage =
    "usage: et_learn BACKBONE.onnx DATA_DIR --out EXPORT_DIR [--force] [--threads N] [--balance]\n"
    "                [--epochs N] [--patience N] [--val-fraction F] [--seed S] [--max-bad F]\n"
    "       et_learn --add CLASS_DIR --to EXPORT_DIR [--threads N] [--balance] [--epochs N] [--patience N]\n";
const char* kHelp =
    "Fit a new classification head on a backbone bundle (edgetransfer backbone) from DATA_DIR's\n"
    "class folders, on this machine, and write EXPORT_DIR: model.onnx for et_onnx and\n"
    "edgetransfer predict, with backbone.onnx, head.safetensors and edgetransfer.json for\n"
    "edgetransfer verify. Same split, objective and solver as edgetransfer adapt --backbone.\n\n"
    "  --out EXPORT_DIR     where to write (refused if it exists, unless --force)\n"
    "  --force              replace an EXPORT_DIR that edgetransfer or et_learn wrote\n"
    "  --threads N          ONNX Runtime's intra-op threads (default: one per core)\n"
    "  --balance            weight the loss by inverse class frequency\n"
    "  --epochs N           at most N L-BFGS epochs (default 30)\n"
    "  --patience N         stop after N epochs without a better validation result (default 10)\n"
    "  --val-fraction F     share of each class held out for validation (default 0.2)\n"
    "  --seed S             the split's seed (default 0)\n"
    "  --max-bad F          refuse when more than this share of images cannot be read (0.1)\n"
    "  --add CLASS_DIR --to EXPORT_DIR\n"
    "                       learn one more class into an EXPORT_DIR et_learn wrote, from the\n"
    "                       features it kept (learnt.safetensors): no earlier photos needed\n\n"
    "Progress goes to stderr. Exit codes: 0 ok, 2 bad input.\n"
    "Example: et_learn digits.backbone.onnx photos/ --out learnt/\n";

constexpr int kBatch = 32;
constexpr size_t kDecodeThreads = 4;  // data.MAX_DECODE_THREADS; at most one per core
const char* kProvenance = "fitted on device by et_learn";

struct Args {
  std::string backbone, data, out, add, to;
  bool force = false, balance = false;
  int threads = 0, epochs = et::kEpochs, patience = et::kPatience;
  double val_fraction = 0.2, max_bad = 0.1;
  long seed = 0;
};

long to_long(const std::string& flag, const std::string& v, long lo, long hi) {
  try {
    size_t used = 0;
    const long x = std::stol(v, &used);
    if (used == v.size() && x >= lo && x <= hi) return x;
  } catch (const std::exception&) {
  }
  throw et::UsageError(flag + " wants a whole number from " + std::to_string(lo) + " to " +
                       std::to_string(hi) + ", not '" + v + "'");
}
double to_double(const std::string& flag, const std::string& v, double lo, double hi) {
  try {
    size_t used = 0;
    const double x = std::stod(v, &used);
    if (used == v.size() && x >= lo && x < hi) return x;
  } catch (const std::exception&) {
  }
  throw et::UsageError(flag + " wants a number in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                       "), not '" + v + "'");
}

Args parse(int argc, char** argv, bool& help) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw et::UsageError(s + " needs a value");
      return argv[++i];
    };
    if (s == "--help" || s == "-h") help = true;
    else if (s == "--out") a.out = value();
    else if (s == "--add") a.add = value();
    else if (s == "--to") a.to = value();
    else if (s == "--force") a.force = true;
    else if (s == "--balance") a.balance = true;
    else if (s == "--threads") a.threads = int(to_long(s, value(), 1, 256));
    else if (s == "--epochs") a.epochs = int(to_long(s, value(), 1, 100000));
    else if (s == "--patience") a.patience = int(to_long(s, value(), 0, 100000));
    else if (s == "--seed") a.seed = to_long(s, value(), 0, 9223372036854775807L);
    else if (s == "--val-fraction") a.val_fraction = to_double(s, value(), 0.0, 1.0);
    else if (s == "--max-bad") a.max_bad = to_double(s, value(), 0.0, 1.0000001);
    else if (s.size() > 1 && s[0] == '-') throw et::UsageError("unknown option " + s);
    else pos.push_back(s);
  }
  if (help) return a;
  if (!a.add.empty() || !a.to.empty()) {
    if (a.add.empty() || a.to.empty() || !pos.empty() || !a.out.empty())
      throw et::UsageError("--add CLASS_DIR goes with --to EXPORT_DIR and nothing else to read or write");
    return a;
  }
  if (pos.size() != 2) throw et::UsageError("expected BACKBONE.onnx and DATA_DIR");
  if (a.out.empty()) throw et::UsageError("--out EXPORT_DIR is required");
  a.backbone = pos[0];
  a.data = pos[1];
  std::error_code ec;
  if (!fs::is_regular_file(a.backbone, ec))
    throw et::InputError(a.backbone + ": no such file; pass a bundle from edgetransfer backbone");
  return a;
}

// ---------------------------------------------------------------------------------------------
// Python's random.Random(seed) and shuffle(), exactly: MT19937 seeded by init_by_array with the
// seed's 32-bit words, randbelow by rejection on getrandbits(bit_length(n)).

struct PyRandom {
  std::mt19937 mt;
  explicit PyRandom(unsigned long seed) {
    std::vector<uint32_t> key;
    for (unsigned long s = seed; s; s >>= 32) key.push_back(uint32_t(s & 0xffffffffUL));
    if (key.empty()) key.push_back(0);
    init_by_array(key);
  }
  void init_by_array(const std::vector<uint32_t>& key) {
    uint32_t m[624];
    m[0] = 19650218U;
    for (int i = 1; i < 624; ++i) m[i] = 1812433253U * (m[i - 1] ^ (m[i - 1] >> 30)) + uint32_t(i);
    int i = 1, j = 0;
    const int n = int(key.size());
    for (int k = std::max(624, n); k; --k) {
      m[i] = (m[i] ^ ((m[i - 1] ^ (m[i - 1] >> 30)) * 1664525U)) + key[j] + uint32_t(j);
      ++i, ++j;
      if (i >= 624) m[0] = m[623], i = 1;
      if (j >= n) j = 0;
    }
    for (int k = 623; k; --k) {
      m[i] = (m[i] ^ ((m[i - 1] ^ (m[i - 1] >> 30)) * 1566083941U)) - uint32_t(i);
      ++i;
      if (i >= 624) m[0] = m[623], i = 1;
    }
    m[0] = 0x80000000U;
    // std::mt19937 has no init_by_array: its state is loaded through a stream
    std::string state;
    for (int k = 0; k < 624; ++k) state += std::to_string(m[k]) + " ";
    state += "624";
    std::istringstream in(state);
    in >> mt;
  }
  uint32_t randbelow(uint32_t n) {
    int k = 0;
    for (uint32_t v = n; v; v >>= 1) ++k;
    uint32_t r = uint32_t(mt()) >> (32 - k);
    while (r >= n) r = uint32_t(mt()) >> (32 - k);
    return r;
  }
  template <class T>
  void shuffle(std::vector<T>& x) {
    for (size_t i = x.size() - 1; i >= 1 && x.size() > 1; --i) std::swap(x[i], x[randbelow(uint32_t(i + 1))]);
  }
};

// ---------------------------------------------------------------------------------------------
// DATA_DIR as edgetransfer.data.scan reads it

struct Sample {
  std::string path;  // as Python's str(Path): root / class / ...
  int label;
  bool val;
};

const std::set<std::string> kImageExts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"};

bool hidden(const std::string& name) {
  return name.empty() || name[0] == '.' || name[0] == '_' || name == "Thumbs.db" ||
         name == "desktop.ini" || name == "__MACOSX" ||
         (name.size() >= 12 && name.compare(name.size() - 12, 12, "_checkpoints") == 0);
}

bool sniff(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  unsigned char h[32] = {0};
  f.read(reinterpret_cast<char*>(h), 32);
  const std::streamsize n = f.gcount();
  auto starts = [&](const char* sig, size_t len) { return size_t(n) >= len && std::memcmp(h, sig, len) == 0; };
  if (starts("\xff\xd8\xff", 3) || starts("\x89PNG\r\n\x1a\n", 8) || starts("GIF87a", 6) ||
      starts("GIF89a", 6) || starts("II*\0", 4) || starts("MM\0*", 4))
    return true;
  if (n >= 12 && std::memcmp(h, "RIFF", 4) == 0 && std::memcmp(h + 8, "WEBP", 4) == 0) return true;
  if (n >= 18 && h[0] == 'B' && h[1] == 'M') {
    const uint32_t size = h[14] | h[15] << 8 | h[16] << 16 | uint32_t(h[17]) << 24;
    return size == 12 || size == 40 || size == 52 || size == 56 || size == 64 || size == 108 || size == 124;
  }
  return false;
}

std::string lower_suffix(const std::string& name) {
  const size_t dot = name.rfind('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == name.size()) return "";
  std::string s = name.substr(dot);
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string join(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

// data.list_images: recursive, folders before their sub-folders, sorted by name, hidden skipped,
// a folder reached twice skipped.
std::vector<std::string> list_images(const std::string& folder) {
  std::vector<std::string> out, stack = {folder};
  std::set<std::pair<dev_t, ino_t>> seen;
  while (!stack.empty()) {
    const std::string d = stack.back();
    stack.pop_back();
    struct stat st {};
    if (::stat(d.c_str(), &st) != 0) {
      std::cerr << "et_learn: cannot read folder " << et::printable(d) << "; skipped\n";
      continue;
    }
    if (!seen.insert({st.st_dev, st.st_ino}).second) continue;
    std::vector<std::string> names;
    std::error_code ec;
    for (fs::directory_iterator it(d, ec), end; !ec && it != end; it.increment(ec))
      names.push_back(it->path().filename().string());
    std::sort(names.begin(), names.end());
    std::vector<std::string> subdirs;
    for (const std::string& name : names) {
      if (hidden(name)) continue;
      const std::string p = join(d, name);
      struct stat e {};
      const bool ok = ::stat(p.c_str(), &e) == 0;
      if (ok && S_ISDIR(e.st_mode)) subdirs.push_back(p);
      else if (kImageExts.count(lower_suffix(name)) || (ok && S_ISREG(e.st_mode) && sniff(p))) out.push_back(p);
    }
    stack.insert(stack.end(), subdirs.rbegin(), subdirs.rend());
  }
  return out;
}

void check_labels(const std::vector<std::string>& names);

std::vector<std::string> class_dirs(const std::string& folder) {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code e2;
    if (!hidden(name) && fs::is_directory(it->path(), e2)) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  check_labels(names);  // the rules every manifest's labels follow, before any work is done
  return names;
}

// manifest.label_problem: why a class folder's name cannot be a label (empty when it can):
// not UTF-8, longer than 256 characters, or holding a control character (C0, DEL, C1, line
// separators, bidi controls).
std::string label_problem(const std::string& label) {
  size_t chars = 0;
  for (size_t i = 0; i < label.size(); ++chars) {
    const size_t n = et::utf8_char(label, i);
    if (!n) return "is not valid UTF-8";
    uint32_t cp = n == 1 ? uint8_t(label[i]) : uint8_t(label[i]) & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) cp = cp << 6 | (uint8_t(label[i + k]) & 0x3F);
    if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029 ||
        (cp >= 0x202A && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069)) {
      char hexcp[8];
      std::snprintf(hexcp, sizeof hexcp, "%04X", unsigned(cp));
      return std::string("contains the control character U+") + hexcp;
    }
    i += n;
  }
  if (chars > 256) return "is " + std::to_string(chars) + " characters long (at most 256)";
  return "";
}

void check_labels(const std::vector<std::string>& names) {
  for (const auto& name : names) {
    const std::string problem = label_problem(name);
    if (!problem.empty()) throw et::InputError("class folder '" + name + "' " + problem + "; rename it");
  }
}

struct Dataset {
  std::string root;
  std::vector<std::string> classes;
  std::vector<Sample> samples;
};

std::vector<Sample> collect(const std::string& folder, const std::vector<std::string>& classes,
                            const std::string& root) {
  if (classes.empty()) {
    if (!list_images(folder).empty())
      throw et::InputError(root + " has images but no class folders; " + folder + "/CLASS/*.jpg expected");
    throw et::InputError("data folder " + root + " is empty; put one sub-folder of images per class in it");
  }
  if (classes.size() < 2)
    throw et::InputError(root + " has only one class (" + classes[0] + "); at least 2 class folders needed");
  std::vector<Sample> out;
  std::string empty;
  for (size_t i = 0; i < classes.size(); ++i) {
    const auto found = list_images(join(folder, classes[i]));
    if (found.empty()) empty += (empty.empty() ? "" : ", ") + classes[i];
    for (const auto& p : found) out.push_back({p, int(i), false});
  }
  if (!empty.empty())
    throw et::InputError("class folder(s) with no images: " + empty +
                         "; add images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) or remove the folder");
  return out;
}

// data._split: per class (in label order) sorted by path, shuffled by one shared Random(seed);
// round(n * val_fraction) (ties to even, as Python's round) go to validation, at least 1, at
// most n - 1.
std::vector<Sample> split(const std::vector<Sample>& samples, double val_fraction, long seed, size_t classes) {
  PyRandom rng(static_cast<unsigned long>(seed));
  std::vector<Sample> out;
  for (size_t label = 0; label < classes; ++label) {
    std::vector<Sample> items;
    for (const auto& s : samples)
      if (s.label == int(label)) items.push_back(s);
    if (items.empty()) continue;
    std::sort(items.begin(), items.end(), [](const Sample& a, const Sample& b) { return a.path < b.path; });
    rng.shuffle(items);
    long n_val = 0;
    if (val_fraction > 0) {
      const long r = long(std::nearbyint(double(items.size()) * val_fraction));
      n_val = std::min(long(items.size()) - 1, std::max(1L, r));
    }
    for (size_t i = 0; i < items.size(); ++i) out.push_back({items[i].path, items[i].label, long(i) < n_val});
  }
  return out;
}

std::string strip_slashes(std::string s) {
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

Dataset scan(const std::string& given, double val_fraction, long seed) {
  const std::string hint = "pass a folder with one sub-folder of images per class";
  const std::string root = strip_slashes(given);
  std::error_code ec;
  if (!fs::exists(root, ec)) throw et::InputError("data folder " + root + " does not exist; " + hint);
  if (!fs::is_directory(root, ec)) throw et::InputError(root + " is not a folder; " + hint);
  Dataset ds{root, {}, {}};
  const std::string train = join(root, "train"), val = join(root, "val");
  if (fs::is_directory(train, ec)) {
    ds.classes = class_dirs(train);
    ds.samples = collect(train, ds.classes, root);
    if (fs::is_directory(val, ec)) {
      for (const auto& c : class_dirs(val))
        if (std::find(ds.classes.begin(), ds.classes.end(), c) == ds.classes.end())
          throw et::InputError("val/ has classes that train/ lacks: " + c + "; add them to train/ or remove them from val/");
      for (size_t i = 0; i < ds.classes.size(); ++i)
        if (fs::is_directory(join(val, ds.classes[i]), ec))
          for (const auto& p : list_images(join(val, ds.classes[i]))) ds.samples.push_back({p, int(i), true});
    } else {
      ds.samples = split(ds.samples, val_fraction, seed, ds.classes.size());
    }
  } else {
    ds.classes = class_dirs(root);
    ds.samples = split(collect(root, ds.classes, root), val_fraction, seed, ds.classes.size());
  }
  return ds;
}

// ---------------------------------------------------------------------------------------------
// hashing, files

std::string hex(const unsigned char* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) s += digits[p[i] >> 4], s += digits[p[i] & 15];
  return s;
}

struct Sha256 {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  Sha256() { EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr); }
  ~Sha256() { EVP_MD_CTX_free(ctx); }
  void update(const void* p, size_t n) { EVP_DigestUpdate(ctx, p, n); }
  std::string hexdigest() {
    unsigned char md[32];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx, md, &len);
    return hex(md, len);
  }
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw et::InputError(path + ": cannot read it");
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_file(const fs::path& path, const std::string& bytes) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    f.flush();
    if (!f) throw et::InputError(path.string() + ": cannot write it (disk full or no permission?)");
  }
  fs::rename(tmp, path);
}

// data.Dataset.fingerprint: sha256 of the (relative path, class, split, size) lines, by path
std::string fingerprint(const Dataset& ds) {
  std::vector<const Sample*> order;
  for (const auto& s : ds.samples) order.push_back(&s);
  std::sort(order.begin(), order.end(), [](const Sample* a, const Sample* b) { return a->path < b->path; });
  Sha256 h;
  for (const Sample* s : order) {
    std::string rel = s->path.substr(ds.root.size() + (ds.root.back() == '/' ? 0 : 1));
    std::error_code ec;
    const auto size = fs::file_size(s->path, ec);
    const std::string line = rel + "\t" + ds.classes[s->label] + "\t" + (s->val ? "val" : "train") + "\t" +
                             (ec ? std::string("-1") : std::to_string(size)) + "\n";
    h.update(line.data(), line.size());
  }
  return h.hexdigest();
}

// ---------------------------------------------------------------------------------------------
// ONNX protobuf, edited on the wire: the bundle's ModelProto with its graph outputs and metadata
// replaced, and the head (Gemm + two initializers) appended to the graph.

struct Wire {
  std::string out;
  void varint(uint64_t v) {
    while (v >= 0x80) out += char((v & 0x7f) | 0x80), v >>= 7;
    out += char(v);
  }
  void tag(int field, int type) { varint(uint64_t(field) << 3 | uint64_t(type)); }
  void bytes(int field, const std::string& s) {
    tag(field, 2);
    varint(s.size());
    out += s;
  }
  void int64(int field, int64_t v) {
    tag(field, 0);
    varint(uint64_t(v));
  }
};

struct Field {
  int number, type;
  size_t start, end;       // the whole field, tag included
  size_t value, value_end;  // a length-delimited field's payload
};

uint64_t read_varint(const std::string& s, size_t& i) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (i >= s.size()) throw et::InputError("the bundle is not a valid ONNX file (truncated)");
    const unsigned char b = s[i++];
    v |= uint64_t(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
  }
  throw et::InputError("the bundle is not a valid ONNX file (bad varint)");
}

std::vector<Field> fields(const std::string& s, size_t begin, size_t end) {
  std::vector<Field> out;
  size_t i = begin;
  while (i < end) {
    Field f{};
    f.start = i;
    const uint64_t key = read_varint(s, i);
    f.number = int(key >> 3), f.type = int(key & 7);
    switch (f.type) {
      case 0: read_varint(s, i); break;
      case 1: i += 8; break;
      case 5: i += 4; break;
      case 2: {
        const uint64_t len = read_varint(s, i);
        if (len > end - i) throw et::InputError("the bundle is not a valid ONNX file (bad length)");
        f.value = i, f.value_end = i + len;
        i += len;
        break;
      }
      default: throw et::InputError("the bundle is not a valid ONNX file (wire type " + std::to_string(f.type) + ")");
    }
    if (i > end) throw et::InputError("the bundle is not a valid ONNX file (truncated)");
    f.end = i;
    out.push_back(f);
  }
  return out;
}

std::string tensor_proto(const std::string& name, const std::vector<int64_t>& dims, const std::vector<float>& v) {
  Wire t;
  for (int64_t d : dims) t.int64(1, d);
  t.int64(2, 1);  // FLOAT
  t.bytes(8, name);
  t.bytes(9, std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
  return t.out;
}

std::string value_info(const std::string& name, int classes) {
  Wire batch, cls, shape, tensor, type, vi;
  batch.bytes(2, "batch");
  cls.int64(1, classes);
  shape.bytes(1, batch.out);
  shape.bytes(1, cls.out);
  tensor.int64(1, 1);  // FLOAT
  tensor.bytes(2, shape.out);
  type.bytes(1, tensor.out);
  vi.bytes(1, name);
  vi.bytes(2, type.out);
  return vi.out;
}

std::string compose(const std::string& bundle, const std::string& features, const et::HeadFitResult& head,
                    const std::string& manifest_json) {
  const std::string h = "edgetransfer_head";
  Wire graph;
  bool have_graph = false;
  Wire model;
  for (const Field& f : fields(bundle, 0, bundle.size())) {
    if (f.number == 14) continue;  // metadata_props: ours replace the bundle's
    if (f.number == 2 && f.type == 2) {
      model.bytes(2, "edgetransfer");  // producer_name
      continue;
    }
    if (f.number != 7 || f.type != 2) {
      model.out.append(bundle, f.start, f.end - f.start);
      continue;
    }
    have_graph = true;
    for (const Field& g : fields(bundle, f.value, f.value_end))
      if (g.number != 12) graph.out.append(bundle, g.start, g.end - g.start);  // outputs replaced
  }
  if (!have_graph) throw et::InputError("the bundle holds no ONNX graph");
  Wire attr, node;
  attr.bytes(1, "transB");
  attr.int64(3, 1);
  attr.int64(20, 2);  // AttributeProto.INT
  node.bytes(1, features);
  node.bytes(1, h + ".weight");
  node.bytes(1, h + ".bias");
  node.bytes(2, "logits");
  node.bytes(3, h + ".gemm");
  node.bytes(4, "Gemm");
  node.bytes(5, attr.out);
  graph.bytes(1, node.out);
  graph.bytes(5, tensor_proto(h + ".weight", {head.classes, head.dim}, head.weight));
  graph.bytes(5, tensor_proto(h + ".bias", {head.classes}, head.bias));
  graph.bytes(12, value_info("logits", head.classes));
  model.bytes(7, graph.out);
  Wire entry;
  entry.bytes(1, "edgetransfer");
  entry.bytes(2, manifest_json);
  model.bytes(14, entry.out);
  return model.out;
}

// safetensors: 8-byte little-endian header size, JSON header (padded to 8), the data
std::string safetensors(const et::HeadFitResult& head, const std::string& manifest_json) {
  const size_t wbytes = head.weight.size() * 4, bbytes = head.bias.size() * 4;
  json hdr;
  hdr["__metadata__"] = {{"edgetransfer", manifest_json}};
  hdr["head.bias"] = {{"dtype", "F32"}, {"shape", {head.classes}}, {"data_offsets", {0, bbytes}}};
  hdr["head.weight"] = {{"dtype", "F32"}, {"shape", {head.classes, head.dim}}, {"data_offsets", {bbytes, bbytes + wbytes}}};
  std::string text = hdr.dump();
  while (text.size() % 8) text += ' ';
  std::string out(8, '\0');
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = char((n >> (8 * i)) & 0xff);
  out += text;
  out.append(reinterpret_cast<const char*>(head.bias.data()), bbytes);
  out.append(reinterpret_cast<const char*>(head.weight.data()), wbytes);
  return out;
}

// ---------------------------------------------------------------------------------------------
// the output folder: fileio.check_can_write's rules, written beside it and swapped in

const std::set<std::string> kIgnorable = {".edgetransfer", ".DS_Store", "Thumbs.db", "desktop.ini"};

bool inside(const fs::path& a, const fs::path& b) {  // a == b or a contains b
  auto ai = a.begin(), bi = b.begin();
  for (; ai != a.end() && !ai->empty(); ++ai, ++bi)
    if (bi == b.end() || *ai != *bi) return false;
  return true;
}

void check_can_write(const fs::path& out, bool force, const std::vector<std::string>& inputs) {
  std::error_code ec;
  const fs::path o = fs::weakly_canonical(fs::absolute(out), ec);
  for (const auto& in : inputs) {
    const fs::path i = fs::weakly_canonical(fs::absolute(in), ec);
    if (inside(o, i))
      throw et::InputError(out.string() + " is (or holds) the input " + in + "; choose another --out");
  }
  if (!fs::exists(out, ec)) return;
  if (!fs::is_directory(out, ec)) {
    if (!force) throw et::InputError(out.string() + " already exists; pass --force to replace it");
    throw et::InputError(out.string() + " exists and is not a folder; choose another --out");
  }
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(out, ec)) names.insert(e.path().filename().string());
  bool only_litter = true;
  for (const auto& n : names) only_litter &= kIgnorable.count(n) > 0;
  if (only_litter) return;
  if (!force) throw et::InputError(out.string() + " already exists; pass --force to replace it");
  if (!names.count("edgetransfer.json") && !names.count(".edgetransfer"))
    throw et::InputError(out.string() + " was not written by edgetransfer (no edgetransfer.json or .edgetransfer in it); "
                         "choose a new output folder");
}

// What a killed run left beside `out`: its old folder renamed aside (put back when `out` is
// missing, as fileio.output_dir does) and its temp folder (removed); only a dead process's.
void remove_stale(const fs::path& out) {
  std::error_code ec;
  const fs::path dir = fs::absolute(out).parent_path();
  const std::string name = out.filename().string();
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    for (const std::string tag : {".old-", ".et_learn-"}) {
      if (n.rfind(name + tag, 0) != 0) continue;
      const std::string pid = n.substr(name.size() + tag.size());
      if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos || pid.size() > 9) continue;
      if (::kill(pid_t(std::stol(pid)), 0) == 0 || errno != ESRCH) continue;  // still running
      std::error_code e2;
      if (tag == ".old-" && !fs::exists(dir / name, e2)) fs::rename(e.path(), dir / name, e2);
      else fs::remove_all(e.path(), e2);
    }
  }
}

void swap_in(const fs::path& tmp, const fs::path& out) {
  std::error_code ec;
  if (fs::exists(out, ec)) {
    const fs::path old = out.string() + ".old-" + std::to_string(::getpid());
    fs::rename(out, old);
    fs::rename(tmp, out);
    fs::remove_all(old, ec);
  } else {
    fs::rename(tmp, out);
  }
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The bundle, opened: its bytes (copied into EXPORT_DIR and hashed), session and manifest.
struct Backbone {
  std::string path, bytes, sha256, input, features;
  std::unique_ptr<Ort::Session> session;
  json bj;  // its manifest
  et::Manifest bm;
  int dim = 0;
};

Backbone open_backbone(const std::string& path, int threads, Ort::Env& env) {
  Backbone b;
  b.path = path;
  b.bytes = read_all(path);
  Ort::SessionOptions options;
  options.AddConfigEntry("session.intra_op.allow_spinning", "0");
  if (threads > 0) options.SetIntraOpNumThreads(threads);
  try {
    b.session = std::make_unique<Ort::Session>(env, b.bytes.data(), b.bytes.size(), options);
  } catch (const Ort::Exception& e) {
    throw et::InputError(path + ": not a loadable ONNX model (" + et::first_line(e.what()) + ")");
  }
  Ort::AllocatorWithDefaultOptions alloc;
  const Ort::ModelMetadata meta = b.session->GetModelMetadata();
  const Ort::AllocatedStringPtr text = meta.LookupCustomMetadataMapAllocated("edgetransfer", alloc);
  if (!text) throw et::InputError(path + ": carries no edgetransfer metadata; make it with edgetransfer backbone");
  b.bm = et::parse_manifest(text.get(), path);
  b.bj = json::parse(text.get());
  const json* adapt = b.bj.contains("adapt") && b.bj["adapt"].is_object() ? &b.bj["adapt"] : nullptr;
  if (!adapt || adapt->value("kind", "") != "backbone" || !adapt->contains("feature_dim") ||
      !(*adapt)["feature_dim"].is_number_integer())
    throw et::InputError(path + " is a classifier, not a backbone bundle; make one with edgetransfer backbone");
  b.dim = (*adapt)["feature_dim"].get<int>();
  if (b.dim < 1 || b.dim > (1 << 20)) throw et::InputError(path + ": feature_dim " + std::to_string(b.dim) + " is out of range");
  b.input = b.session->GetInputNameAllocated(0, alloc).get();
  b.features = b.bm.output_name.empty() ? "features" : b.bm.output_name;
  Sha256 h;
  h.update(b.bytes.data(), b.bytes.size());
  b.sha256 = h.hexdigest();
  std::cerr << "et_learn: " << path << ": " << et::describe(b.bm) << ", " << b.dim << " features\n";
  return b;
}

// The bundle's features of `samples`, in batches; unreadable images are dropped from `samples`
// and listed in `bad`.
std::vector<float> extract(Backbone& b, std::vector<Sample>& samples, std::vector<std::string>& bad) {
  const et::Preprocessing& p = b.bm.pre;
  const size_t per = size_t(3) * p.height * p.width, dim = size_t(b.dim);
  const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<float> feats, batch(per * kBatch);
  std::vector<Sample> kept;
  size_t in_batch = 0;
  auto flush = [&]() {
    if (!in_batch) return;
    const int64_t shape[] = {int64_t(in_batch), 3, p.height, p.width};
    Ort::Value x = Ort::Value::CreateTensor<float>(cpu, batch.data(), in_batch * per, shape, 4);
    const char* in_names[] = {b.input.c_str()};
    const char* out_names[] = {b.features.c_str()};
    auto y = b.session->Run(Ort::RunOptions{nullptr}, in_names, &x, 1, out_names, 1);
    const auto info = y[0].GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || info.GetElementCount() != in_batch * dim)
      throw et::InputError(b.path + ": '" + b.features + "' is not " + std::to_string(dim) + " float32 features per image");
    const float* f = y[0].GetTensorData<float>();
    for (size_t i = 0; i < in_batch * dim; ++i)
      if (!std::isfinite(f[i])) throw et::InputError(b.path + ": the backbone's features hold NaN or infinite values");
    feats.insert(feats.end(), f, f + in_batch * dim);
    in_batch = 0;
  };
  // kBatch images at a time are decoded by `threads` threads into their own slots of a
  // staging buffer (decoding and resizing share nothing), then packed in order
  const size_t threads = std::max<size_t>(1, std::min<size_t>(kDecodeThreads, std::thread::hardware_concurrency()));
  std::vector<float> staged(per * kBatch);
  std::vector<std::string> errors(kBatch);
  for (size_t first = 0; first < samples.size(); first += kBatch) {
    const size_t count = std::min<size_t>(kBatch, samples.size() - first);
    auto decode = [&](size_t worker) {
      for (size_t j = worker; j < count; j += threads) {
        errors[j].clear();
        try {
          const et::Image img = et::load_image(samples[first + j].path);
          et::normalize(et::resize_crop(img, p), p, &staged[j * per]);
        } catch (const std::exception& e) {  // InputError, or bad_alloc on a huge image
          errors[j] = e.what();
          if (errors[j].empty()) errors[j] = "cannot decode";
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < std::min(threads, count); ++w) pool.emplace_back(decode, w);
    decode(0);
    for (auto& t : pool) t.join();
    for (size_t j = 0; j < count; ++j) {
      if (!errors[j].empty()) {
        const std::string& path = samples[first + j].path;  // the decoder's messages name it
        bad.push_back(errors[j].rfind(path, 0) == 0 ? errors[j] : path + ": " + errors[j]);
        continue;
      }
      std::copy_n(&staged[j * per], per, &batch[in_batch * per]);
      kept.push_back(samples[first + j]);
      if (++in_batch == size_t(kBatch)) flush();
    }
    if ((first / kBatch + 1) % 8 == 0)
      std::cerr << "et_learn: " << first + count << "/" << samples.size() << " images\n";
  }
  flush();
  samples = kept;
  return feats;
}

void check_bad(const std::vector<std::string>& bad, size_t total, double max_bad) {
  if (!bad.empty() && double(bad.size()) > max_bad * double(total))
    throw et::InputError(std::to_string(bad.size()) + " of " + std::to_string(total) +
                         " images could not be read (more than --max-bad): " + bad[0]);
  for (const auto& b : bad) std::cerr << "et_learn: skipped " << et::printable(b) << "\n";
}

// The training and validation rows the fit sees; kept beside the model (learnt.safetensors) so
// that --add learns a class without the earlier photos.
struct Rows {
  std::vector<float> xt, xv;
  std::vector<int> yt, yv;
  void add(const std::vector<float>& feats, const std::vector<Sample>& samples, int dim) {
    for (size_t i = 0; i < samples.size(); ++i) {
      auto& x = samples[i].val ? xv : xt;
      x.insert(x.end(), feats.begin() + i * dim, feats.begin() + (i + 1) * dim);
      (samples[i].val ? yv : yt).push_back(samples[i].label);
    }
  }
};

const char* kLearntName = "learnt.safetensors";
const char* kLearntFormat = "edgetransfer-learnt-features-1";

std::string rows_file(const Rows& r, int dim) {
  struct T {
    const char* name;
    const char* dtype;
    std::vector<int64_t> shape;
    const void* data;
    size_t bytes;
  };
  const int64_t n = int64_t(r.yt.size()), m = int64_t(r.yv.size());
  const std::vector<T> ts = {
      {"train.features", "F32", {n, dim}, r.xt.data(), r.xt.size() * 4},
      {"train.labels", "I32", {n}, r.yt.data(), r.yt.size() * 4},
      {"val.features", "F32", {m, dim}, r.xv.data(), r.xv.size() * 4},
      {"val.labels", "I32", {m}, r.yv.data(), r.yv.size() * 4},
  };
  json hdr;
  hdr["__metadata__"] = {{"format", kLearntFormat}};
  size_t off = 0;
  for (const T& t : ts) {
    hdr[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes}}};
    off += t.bytes;
  }
  std::string text = hdr.dump();
  while (text.size() % 8) text += ' ';
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char((uint64_t(text.size()) >> (8 * i)) & 0xff);
  out += text;
  for (const T& t : ts) out.append(static_cast<const char*>(t.data), t.bytes);
  return out;
}

Rows read_rows(const fs::path& path, int dim, int classes) {
  const std::string bad = path.string() + " is not the features et_learn keeps; learn from scratch";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw et::InputError(path.parent_path().string() + " has no " + kLearntName + " (not written by et_learn?); learn from scratch");
  const std::string s = read_all(path.string());
  if (s.size() < 8) throw et::InputError(bad);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(static_cast<unsigned char>(s[i])) << (8 * i);
  if (n > s.size() - 8) throw et::InputError(bad);
  json hdr;
  try {
    hdr = json::parse(s.substr(8, n));
  } catch (const json::exception&) {
    throw et::InputError(bad);
  }
  const size_t base = 8 + n;
  auto tensor = [&](const char* name, const char* dtype, size_t rank) -> std::pair<const char*, std::vector<int64_t>> {
    try {
      const json& t = hdr.at(name);
      const auto shape = t.at("shape").get<std::vector<int64_t>>();
      const auto off = t.at("data_offsets").get<std::vector<uint64_t>>();
      uint64_t count = 1;
      for (int64_t d : shape) {
        if (d < 0 || d > (int64_t(1) << 40)) throw et::InputError(bad);
        count *= uint64_t(d);
      }
      if (t.at("dtype") != dtype || shape.size() != rank || off.size() != 2 || off[1] < off[0] ||
          off[1] - off[0] != count * 4 || off[1] > s.size() - base)
        throw et::InputError(bad);
      return {s.data() + base + off[0], shape};
    } catch (const json::exception&) {
      throw et::InputError(bad);
    }
  };
  if (!hdr.contains("__metadata__") || hdr["__metadata__"].value("format", "") != kLearntFormat) throw et::InputError(bad);
  Rows r;
  for (const bool val : {false, true}) {
    const auto [fx, sx] = tensor(val ? "val.features" : "train.features", "F32", 2);
    const auto [fy, sy] = tensor(val ? "val.labels" : "train.labels", "I32", 1);
    if (sx[1] != dim || sx[0] != sy[0]) throw et::InputError(bad);
    auto& x = val ? r.xv : r.xt;
    auto& y = val ? r.yv : r.yt;
    x.resize(size_t(sx[0]) * dim);
    y.resize(size_t(sy[0]));
    std::memcpy(x.data(), fx, x.size() * 4);
    std::memcpy(y.data(), fy, y.size() * 4);
    for (int v : y)
      if (v < 0 || v >= classes) throw et::InputError(bad);
  }
  return r;
}

et::HeadFitResult fit(const Args& a, const Rows& r, const std::vector<std::string>& classes, int dim) {
  std::string missing;
  for (size_t c = 0; c < classes.size(); ++c)
    if (std::find(r.yt.begin(), r.yt.end(), int(c)) == r.yt.end()) missing += (missing.empty() ? "" : ", ") + classes[c];
  if (!missing.empty()) throw et::InputError("no readable training images for class(es): " + missing);
  if (r.yv.empty()) throw et::InputError("no validation images; put at least 2 images in each class folder");
  const int c = int(classes.size());
  const std::vector<float> cw = a.balance ? et::balanced_class_weights(r.yt, c) : std::vector<float>{};
  et::HeadFitResult head = et::fit_head(r.xt, r.yt, r.xv, r.yv, c, dim, et::kHeadL2, cw, a.epochs, a.patience);
  std::cerr << "et_learn: train " << r.yt.size() << " / val " << r.yv.size() << " images, best epoch " << head.best_epoch
            << " of " << head.epochs_run << ": val top-1 " << head.val_top1 * 100 << "%\n";
  return head;
}

// adapt and metrics of the manifest, as device._run_manifest writes them
void record_fit(json& m, const Args& a, const Backbone& b, const et::HeadFitResult& head, size_t classes) {
  auto round6 = [](double v) { return std::round(v * 1e6) / 1e6; };
  json& ad = m["adapt"];
  ad["strategy"] = "head";
  ad["epochs"] = a.epochs;
  ad["best_epoch"] = head.best_epoch;
  ad["epochs_run"] = head.epochs_run;
  ad["solver"] = "lbfgs";
  ad["l2"] = et::kHeadL2;
  ad["seed"] = a.seed;
  ad["val_fraction"] = a.val_fraction;
  ad["augment"] = "none";
  ad["views"] = 1;
  ad["trainable_params"] = classes * b.dim + classes;
  ad["backbone"] = {{"bundle", fs::path(b.path).filename().string()}, {"sha256", b.sha256}, {"feature_dim", b.dim}};
  ad["provenance"] = kProvenance;
  if (a.balance) ad["balance"] = "class-weighted loss";
  else ad.erase("balance");
  m["metrics"] = {{"val_top1", round6(head.val_top1)}, {"val_loss", round6(head.val_loss)}};
  m["versions"] = {{"et_learn", "1"}, {"onnxruntime", Ort::GetVersionString()}};
}

// EXPORT_DIR, written beside `out` and swapped in
void write_export(const fs::path& out, bool force, const std::vector<std::string>& inputs, const Backbone& b,
                  const et::HeadFitResult& head, const json& m, const Rows& rows) {
  const std::string manifest = m.dump(2) + "\n";
  fs::create_directories(fs::absolute(out).parent_path());
  const fs::path tmp = out.string() + ".et_learn-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directory(tmp);
  try {
    write_file(tmp / "model.onnx", compose(b.bytes, b.features, head, manifest));
    write_file(tmp / "backbone.onnx", b.bytes);
    write_file(tmp / "head.safetensors", safetensors(head, manifest));
    write_file(tmp / kLearntName, rows_file(rows, b.dim));
    std::string labels;
    for (const auto& c : m["labels"]) labels += c.get<std::string>() + "\n";
    write_file(tmp / "labels.txt", labels);
    write_file(tmp / "edgetransfer.json", manifest);
    check_can_write(out, force, inputs);
    swap_in(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

int learn(const Args& a, Ort::Env& env) {
  const auto start = std::chrono::steady_clock::now();
  const fs::path out = strip_slashes(a.out);
  remove_stale(out);
  check_can_write(out, a.force, {a.data, a.backbone});
  Dataset ds = scan(a.data, a.val_fraction, a.seed);  // before the model: bad folders fail fast
  Backbone b = open_backbone(a.backbone, a.threads, env);
  std::cerr << "et_learn: " << ds.samples.size() << " images in " << ds.classes.size() << " classes\n";
  const auto t_images = std::chrono::steady_clock::now();
  std::vector<std::string> bad;
  const size_t total = ds.samples.size();
  const std::vector<float> feats = extract(b, ds.samples, bad);
  check_bad(bad, total, a.max_bad);
  const double images_s = seconds_since(t_images);
  Rows rows;
  rows.add(feats, ds.samples, b.dim);
  const auto t_fit = std::chrono::steady_clock::now();
  const et::HeadFitResult head = fit(a, rows, ds.classes, b.dim);
  const double fit_s = seconds_since(t_fit);
  json m;
  m["schema"] = 1;
  m["arch"] = b.bj["arch"];
  m["labels"] = ds.classes;
  m["preprocessing"] = b.bj["preprocessing"];
  m["io"] = {{"input", b.input}, {"output", "logits"}};
  m["source"] = b.bj.contains("source") ? b.bj["source"] : json::object();
  m["adapt"] = json::object();
  record_fit(m, a, b, head, ds.classes.size());
  m["data"] = {{"fingerprint", fingerprint(ds)}, {"classes", ds.classes.size()}, {"train", rows.yt.size()},
               {"val", rows.yv.size()}, {"bad", bad.size()}};
  write_export(out, a.force, {a.data, a.backbone}, b, head, m, rows);
  std::cerr << "et_learn: images " << images_s << " s, fit " << fit_s << " s, total " << seconds_since(start)
            << " s; wrote " << out.string() << "\n";
  return et::kExitOk;
}

// --add CLASS_DIR --to EXPORT_DIR: the kept features plus the new class's, fitted afresh
// (the new class split on its own as data._split splits a class, with the run's seed).
int add_class(Args a, Ort::Env& env) {
  const fs::path to = strip_slashes(a.to);
  const std::string cls_dir = strip_slashes(a.add);
  std::error_code ec;
  if (fs::exists(fs::absolute(to).parent_path(), ec)) remove_stale(to);
  if (!fs::is_regular_file(to / "edgetransfer.json", ec))
    throw et::InputError(to.string() + " has no edgetransfer.json; pass an EXPORT_DIR written by et_learn");
  json m;
  try {
    m = json::parse(read_all((to / "edgetransfer.json").string()));
  } catch (const json::exception&) {
    throw et::InputError((to / "edgetransfer.json").string() + " is not valid JSON");
  }
  if (!m.contains("adapt") || !m["adapt"].is_object() || m["adapt"].value("provenance", "") != kProvenance ||
      !m.contains("labels") || !m["labels"].is_array())
    throw et::InputError(to.string() + " was not written by et_learn; learn from scratch with et_learn BACKBONE DATA_DIR");
  if (!fs::is_directory(cls_dir, ec)) throw et::InputError("class folder " + cls_dir + " does not exist or is not a folder");
  const std::string name = fs::path(cls_dir).filename().string();
  auto labels = m["labels"].get<std::vector<std::string>>();
  if (hidden(name)) throw et::InputError("class folder " + name + " has a hidden name; rename it");
  check_labels({name});
  if (std::find(labels.begin(), labels.end(), name) != labels.end())
    throw et::InputError(to.string() + " already knows class " + name + "; learn from scratch to change a class");
  a.seed = m["adapt"].value("seed", 0L);
  a.val_fraction = m["adapt"].value("val_fraction", 0.2);
  a.backbone = (to / "backbone.onnx").string();
  Backbone b = open_backbone(a.backbone, a.threads, env);
  const json& was = m["adapt"].contains("backbone") ? m["adapt"]["backbone"] : json();
  if (!was.is_object() || b.sha256 != was.value("sha256", ""))
    throw et::InputError(a.backbone + " is not the bundle " + to.string() + " was fitted on (its sha256 differs)");
  Rows rows = read_rows(to / kLearntName, b.dim, int(labels.size()));
  std::vector<Sample> found;
  for (const auto& p : list_images(cls_dir)) found.push_back({p, int(labels.size()), false});
  if (found.size() < 2) throw et::InputError("class folder " + cls_dir + " needs at least 2 images (one to validate)");
  std::vector<Sample> samples = split(found, a.val_fraction, a.seed, labels.size() + 1);
  std::vector<std::string> bad;
  const std::vector<float> feats = extract(b, samples, bad);
  check_bad(bad, found.size(), a.max_bad);
  rows.add(feats, samples, b.dim);
  labels.push_back(name);
  const et::HeadFitResult head = fit(a, rows, labels, b.dim);
  m["labels"] = labels;
  record_fit(m, a, b, head, labels.size());
  json& d = m["data"];
  d.erase("fingerprint");  // the data is no longer one folder
  d["classes"] = labels.size();
  d["train"] = rows.yt.size();
  d["val"] = rows.yv.size();
  d["bad"] = d.value("bad", 0) + bad.size();
  if (!d.contains("added")) d["added"] = json::array();
  d["added"].push_back(name);
  write_export(to, true, {cls_dir}, b, head, m, rows);
  std::cerr << "et_learn: added class " << name << " to " << to.string() << "\n";
  return et::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return et::kExitBadInput;
  }
  try {
    bool help = false;
    const Args a = parse(argc, argv, help);
    if (help) {
      std::cout << kUsage << "\n" << kHelp;
      return et::kExitOk;
    }
    try {
      const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
      if (!api) throw et::InputError(std::string("libonnxruntime ") + OrtGetApiBase()->GetVersionString() + " is too old");
      Ort::InitApi(api);
      Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "et_learn");
      return a.add.empty() ? learn(a, env) : add_class(a, env);
    } catch (const Ort::Exception& e) {
      throw et::InputError("onnxruntime: " + et::first_line(e.what()));
    } catch (const fs::filesystem_error& e) {
      throw et::InputError(e.path1().string() + ": " + e.code().message());
    }
  } catch (const et::UsageError& e) {
    std::cerr << "et_learn: " << et::printable(e.what()) << "\n" << kUsage;
  } catch (const et::InputError& e) {
    std::cerr << "et_learn: " << et::printable(e.what()) << "\n";
  } catch (const std::bad_alloc&) {
    std::cerr << "et_learn: out of memory\n";
  } catch (const std::exception& e) {
    std::cerr << "et_learn: " << et::printable(et::first_line(e.what())) << "\n";
  }
  return et::kExitBadInput;
}
