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
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common.hpp"
#include "headfit.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

const char* kUsage =
    "usage: et_learn BACKBONE.onnx DATA_DIR --out EXPORT_DIR [--force] [--threads N] [--balance]\n"
    "                [--epochs N] [--patience N] [--val-fraction F] [--seed S] [--max-bad F]\n";
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
    "  --max-bad F          refuse when more than this share of images cannot be read (0.1)\n\n"
    "Progress goes to stderr. Exit codes: 0 ok, 2 bad input.\n"
    "Example: et_learn digits.backbone.onnx photos/ --out learnt/\n";

constexpr int kBatch = 32;
const char* kProvenance = "fitted on device by et_learn";

struct Args {
  std::string backbone, data, out;
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

std::vector<std::string> class_dirs(const std::string& folder) {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code e2;
    if (!hidden(name) && fs::is_directory(it->path(), e2)) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
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

int learn(const Args& a) {
  const auto start = std::chrono::steady_clock::now();
  const fs::path out = strip_slashes(a.out);
  check_can_write(out, a.force, {a.data, a.backbone});
  Dataset ds = scan(a.data, a.val_fraction, a.seed);  // before the model: bad folders fail fast
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api) throw et::InputError(std::string("libonnxruntime ") + OrtGetApiBase()->GetVersionString() + " is too old");
  Ort::InitApi(api);
  Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "et_learn");
  Ort::SessionOptions options;
  options.AddConfigEntry("session.intra_op.allow_spinning", "0");
  if (a.threads > 0) options.SetIntraOpNumThreads(a.threads);
  const std::string bundle_bytes = read_all(a.backbone);
  std::unique_ptr<Ort::Session> session;
  try {
    session = std::make_unique<Ort::Session>(env, bundle_bytes.data(), bundle_bytes.size(), options);
  } catch (const Ort::Exception& e) {
    throw et::InputError(a.backbone + ": not a loadable ONNX model (" + et::first_line(e.what()) + ")");
  }
  Ort::AllocatorWithDefaultOptions alloc;
  const Ort::ModelMetadata meta = session->GetModelMetadata();
  const Ort::AllocatedStringPtr text = meta.LookupCustomMetadataMapAllocated("edgetransfer", alloc);
  if (!text) throw et::InputError(a.backbone + ": carries no edgetransfer metadata; make it with edgetransfer backbone");
  const et::Manifest bm = et::parse_manifest(text.get(), a.backbone);
  const json bj = json::parse(text.get());
  const json* adapt = bj.contains("adapt") && bj["adapt"].is_object() ? &bj["adapt"] : nullptr;
  if (!adapt || adapt->value("kind", "") != "backbone" || !(*adapt)["feature_dim"].is_number_integer())
    throw et::InputError(a.backbone + " is a classifier, not a backbone bundle; make one with edgetransfer backbone");
  const int dim = (*adapt)["feature_dim"].get<int>();
  if (dim < 1 || dim > (1 << 20)) throw et::InputError(a.backbone + ": feature_dim " + std::to_string(dim) + " is out of range");
  const std::string input = session->GetInputNameAllocated(0, alloc).get();
  const std::string features = bm.output_name.empty() ? "features" : bm.output_name;
  std::cerr << "et_learn: " << a.backbone << ": " << et::describe(bm) << ", " << dim << " features\n";

  const size_t classes = ds.classes.size();
  std::cerr << "et_learn: " << ds.samples.size() << " images in " << classes << " classes\n";

  // features, in batches
  const et::Preprocessing& p = bm.pre;
  const size_t per = size_t(3) * p.height * p.width;
  const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<float> feats;
  std::vector<Sample> kept;
  std::vector<std::string> bad;
  std::vector<float> batch;
  size_t in_batch = 0;
  auto flush = [&]() {
    if (!in_batch) return;
    const int64_t shape[] = {int64_t(in_batch), 3, p.height, p.width};
    Ort::Value x = Ort::Value::CreateTensor<float>(cpu, batch.data(), in_batch * per, shape, 4);
    const char* in_names[] = {input.c_str()};
    const char* out_names[] = {features.c_str()};
    auto y = session->Run(Ort::RunOptions{nullptr}, in_names, &x, 1, out_names, 1);
    const auto info = y[0].GetTensorTypeAndShapeInfo();
    if (info.GetElementCount() != in_batch * size_t(dim))
      throw et::InputError(a.backbone + ": '" + features + "' is not " + std::to_string(dim) + " features per image");
    const float* f = y[0].GetTensorData<float>();
    for (size_t i = 0; i < in_batch * size_t(dim); ++i)
      if (!std::isfinite(f[i])) throw et::InputError(a.backbone + ": the backbone's features hold NaN or infinite values");
    feats.insert(feats.end(), f, f + in_batch * dim);
    in_batch = 0;
  };
  batch.resize(per * kBatch);
  const auto t_images = std::chrono::steady_clock::now();
  for (size_t i = 0; i < ds.samples.size(); ++i) {
    const Sample& s = ds.samples[i];
    try {
      et::normalize(et::resize_crop(et::load_image(s.path), p), p, &batch[in_batch * per]);
    } catch (const et::InputError& e) {
      bad.push_back(s.path + ": " + e.what());
      continue;
    }
    kept.push_back(s);
    if (++in_batch == size_t(kBatch)) flush();
    if ((i + 1) % 256 == 0) std::cerr << "et_learn: " << i + 1 << "/" << ds.samples.size() << " images\n";
  }
  flush();
  const double images_s = seconds_since(t_images);
  if (!bad.empty() && double(bad.size()) > a.max_bad * double(ds.samples.size()))
    throw et::InputError(std::to_string(bad.size()) + " of " + std::to_string(ds.samples.size()) +
                         " images could not be read (more than --max-bad): " + bad[0]);
  for (const auto& b : bad) std::cerr << "et_learn: skipped " << et::printable(b) << "\n";
  ds.samples = kept;

  std::vector<float> xt, xv;
  std::vector<int> yt, yv;
  for (size_t i = 0; i < kept.size(); ++i) {
    auto& x = kept[i].val ? xv : xt;
    x.insert(x.end(), feats.begin() + i * dim, feats.begin() + (i + 1) * dim);
    (kept[i].val ? yv : yt).push_back(kept[i].label);
  }
  std::string missing;
  for (size_t c = 0; c < classes; ++c)
    if (std::find(yt.begin(), yt.end(), int(c)) == yt.end()) missing += (missing.empty() ? "" : ", ") + ds.classes[c];
  if (!missing.empty()) throw et::InputError("no readable training images for class(es): " + missing);
  if (yv.empty()) throw et::InputError("no validation images; put at least 2 images in each class folder");

  const auto t_fit = std::chrono::steady_clock::now();
  const std::vector<float> cw = a.balance ? et::balanced_class_weights(yt, int(classes)) : std::vector<float>{};
  const et::HeadFitResult head = et::fit_head(xt, yt, xv, yv, int(classes), dim, et::kHeadL2, cw, a.epochs, a.patience);
  const double fit_s = seconds_since(t_fit);
  std::cerr << "et_learn: train " << yt.size() << " / val " << yv.size() << " images, best epoch " << head.best_epoch
            << " of " << head.epochs_run << ": val top-1 " << head.val_top1 * 100 << "%\n";

  // the run's manifest, as device._run_manifest writes it
  Sha256 bh;
  bh.update(bundle_bytes.data(), bundle_bytes.size());
  auto round6 = [](double v) { return std::round(v * 1e6) / 1e6; };
  json m;
  m["schema"] = 1;
  m["arch"] = bj["arch"];
  m["labels"] = ds.classes;
  m["preprocessing"] = bj["preprocessing"];
  m["io"] = {{"input", input}, {"output", "logits"}};
  m["source"] = bj.contains("source") ? bj["source"] : json::object();
  json ad = {{"strategy", "head"},       {"epochs", a.epochs},          {"best_epoch", head.best_epoch},
             {"epochs_run", head.epochs_run}, {"solver", "lbfgs"},     {"l2", et::kHeadL2},
             {"seed", a.seed},            {"val_fraction", a.val_fraction}, {"augment", "none"},
             {"views", 1},                {"trainable_params", classes * dim + classes},
             {"backbone", {{"bundle", fs::path(a.backbone).filename().string()}, {"sha256", bh.hexdigest()}, {"feature_dim", dim}}},
             {"provenance", kProvenance}};
  if (a.balance) ad["balance"] = "class-weighted loss";
  m["adapt"] = ad;
  m["data"] = {{"fingerprint", fingerprint(ds)}, {"classes", classes}, {"train", yt.size()}, {"val", yv.size()}, {"bad", bad.size()}};
  m["metrics"] = {{"val_top1", round6(head.val_top1)}, {"val_loss", round6(head.val_loss)}};
  m["versions"] = {{"et_learn", "1"}, {"onnxruntime", Ort::GetVersionString()}};
  const std::string manifest = m.dump(2) + "\n";

  // EXPORT_DIR, written beside and swapped in
  fs::create_directories(fs::absolute(out).parent_path());
  const fs::path tmp = out.string() + ".et_learn-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directory(tmp);
  try {
    write_file(tmp / "model.onnx", compose(bundle_bytes, features, head, manifest));
    write_file(tmp / "backbone.onnx", bundle_bytes);
    write_file(tmp / "head.safetensors", safetensors(head, manifest));
    std::string labels;
    for (const auto& c : ds.classes) labels += c + "\n";
    write_file(tmp / "labels.txt", labels);
    write_file(tmp / "edgetransfer.json", manifest);
    check_can_write(out, a.force, {a.data, a.backbone});
    swap_in(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  std::cerr << "et_learn: images " << images_s << " s, fit " << fit_s << " s, total " << seconds_since(start)
            << " s; wrote " << out.string() << "\n";
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
      return learn(a);
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
