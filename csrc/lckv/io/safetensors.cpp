#include "lckv/io/safetensors.h"

#include "lckv/dtype.h"
#include "lckv/files.h"

#include <c10/util/accumulate.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

namespace lckv::io {
namespace {

constexpr int kMaxHeaderDepth = 64;

// The non-float dtypes a safetensors file may hold (the float ones are lckv::kFloatDtypes).
struct DtypeName {
  const char* name;
  at::ScalarType type;
};
const DtypeName kIntegerDtypes[] = {{"I64", at::kLong}, {"I32", at::kInt}, {"I16", at::kShort},
                                    {"I8", at::kChar},  {"U8", at::kByte}, {"BOOL", at::kBool}};

const char* find_name(at::ScalarType t) {
  for (const auto& d : kFloatDtypes) {
    if (t == d.type) return d.safetensors;
  }
  for (const auto& d : kIntegerDtypes) {
    if (t == d.type) return d.name;
  }
  return nullptr;
}

at::ScalarType dtype_from_name(const std::string& path, const std::string& tensor, const std::string& name) {
  for (const auto& d : kFloatDtypes) {
    if (name == d.safetensors) return d.type;
  }
  for (const auto& d : kIntegerDtypes) {
    if (name == d.name) return d.type;
  }
  throw FormatError(path + ": tensor '" + tensor + "' has unsupported dtype '" + name + "'");
}

const char* dtype_name(at::ScalarType t) {
  if (const char* name = find_name(t)) return name;
  throw FormatError(std::string("safetensors: cannot write dtype ") + c10::toString(t));
}

}  // namespace

std::string safetensors_dtype_name(at::ScalarType t) {
  const char* name = find_name(t);
  return name ? name : c10::toString(t);
}

namespace {

// A read-only file mapped copy-on-write (MAP_PRIVATE, PROT_WRITE): tensors made from it read the
// page cache without a copy, and an in-place edit of one changes only this process's pages, never
// the file. Unmapped when the last tensor that points into it is freed.
struct FileMapping {
  void* addr = MAP_FAILED;
  std::size_t size = 0;
  ~FileMapping() {
    if (addr != MAP_FAILED) munmap(addr, size);
  }
};

// Closes a file descriptor on every path out of load_safetensors.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec)) {
    throw FormatError("cannot read safetensors file '" + path + "': not a regular file");
  }
  const Fd file{open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) throw FormatError("cannot open safetensors file '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (fstat(file.fd, &st) != 0 || st.st_size < 0) throw FormatError("cannot read safetensors file '" + path + "'");
  const auto file_size = static_cast<std::size_t>(st.st_size);
  if (file_size < 8) {  // too short to map usefully; parse_safetensors names the problem
    std::string bytes(file_size, '\0');
    if (file_size > 0 && read(file.fd, bytes.data(), file_size) != static_cast<ssize_t>(file_size)) {
      throw FormatError(path + ": could not read its " + std::to_string(file_size) + " bytes");
    }
    return parse_safetensors(path, bytes);
  }
  auto mapping = std::make_shared<FileMapping>();
  mapping->addr = mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, file.fd, 0);
  if (mapping->addr == MAP_FAILED) {
    throw FormatError("cannot map safetensors file '" + path + "' (" + std::to_string(file_size) +
                      " bytes): " + std::strerror(errno));
  }
  mapping->size = file_size;
  return parse_safetensors(path, std::string_view(static_cast<const char*>(mapping->addr), file_size), mapping);
}

std::map<std::string, at::Tensor> parse_safetensors(const std::string& path, std::string_view bytes) {
  return parse_safetensors(path, bytes, nullptr);
}

std::map<std::string, at::Tensor> parse_safetensors(const std::string& path, std::string_view bytes,
                                                    std::shared_ptr<const void> owner) {
  const uint64_t file_size = bytes.size();
  if (file_size < 8) throw FormatError(path + ": file is " + std::to_string(file_size) + " bytes, too short for a safetensors header");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > file_size - 8 || header_len > (100u << 20)) {
    throw FormatError(path + ": header length " + std::to_string(header_len) + " exceeds the file size " +
                      std::to_string(file_size) + " (truncated or not a safetensors file)");
  }
  nlohmann::json j;
  try {
    // Values nested deeper than a header needs are dropped while parsing and refused: the error
    // messages below dump() values, which recurses once per level.
    bool too_deep = false;
    j = nlohmann::json::parse(bytes.substr(8, header_len), [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
      too_deep = too_deep || depth > kMaxHeaderDepth;
      return !too_deep;
    });
    if (too_deep) throw FormatError(path + ": header nests deeper than " + std::to_string(kMaxHeaderDepth) + " levels");
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for a number such as 1e999
    throw FormatError(path + ": header is not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw FormatError(path + ": header is not a JSON object");
  const uint64_t data_size = file_size - 8 - header_len;
  const char* data = bytes.data() + 8 + header_len;

  struct Entry {
    std::string name;
    at::ScalarType type;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) throw FormatError(path + ": '__metadata__' is not a JSON object");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) throw FormatError(path + ": '__metadata__' field '" + m.key() + "' is not a string");
      }
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    if (!e.is_object()) throw FormatError(where + " has a header entry that is not a JSON object");
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!e.contains(field)) throw FormatError(where + " has no field '" + field + "'");
    }
    if (!e["dtype"].is_string()) throw FormatError(where + ": field 'dtype' is not a string");
    Entry entry{name, dtype_from_name(path, name, e["dtype"].get<std::string>()), {}, 0, 0};
    const auto& shape = e["shape"];
    if (!shape.is_array()) throw FormatError(where + ": field 'shape' is not an array");
    // Each dimension must fit int64 (torch's size type), and so must the product of the dimensions
    // with zeros counted as 1: torch computes the contiguous strides that way, also for empty tensors.
    uint64_t extent = 1;
    bool empty = false;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
        throw FormatError(where + ": field 'shape' has dimension " + d.dump(-1, ' ', true) +
                          ", expected an integer in [0, 2^63)");
      }
      const uint64_t dim = d.get<uint64_t>();
      empty = empty || dim == 0;
      if (__builtin_mul_overflow(extent, std::max<uint64_t>(dim, 1), &extent) || extent > static_cast<uint64_t>(INT64_MAX)) {
        throw FormatError(where + ": shape " + shape.dump() + " has more elements than fit in 64 bits");
      }
      entry.shape.push_back(static_cast<int64_t>(dim));
    }
    const uint64_t numel = empty ? 0 : extent;
    const auto& offsets = e["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      throw FormatError(where + ": field 'data_offsets' is " + offsets.dump(-1, ' ', true) +
                        ", expected [begin, end] with non-negative integers");
    }
    entry.begin = offsets[0].get<uint64_t>();
    entry.end = offsets[1].get<uint64_t>();
    if (entry.begin > entry.end) {
      throw FormatError(where + " has data_offsets " + offsets.dump() + " that end before they begin");
    }
    if (entry.end > data_size) {
      throw FormatError(where + " has data_offsets " + offsets.dump() + " outside the data section of " +
                        std::to_string(data_size) + " bytes (truncated file?)");
    }
    uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(c10::elementSize(entry.type)), &nbytes)) {
      throw FormatError(where + ": shape " + shape.dump() + " needs more bytes than fit in 64 bits");
    }
    if (nbytes != entry.end - entry.begin) {
      throw FormatError(where + " needs " + std::to_string(nbytes) + " bytes for its shape " + shape.dump() + " and dtype " +
                        e["dtype"].get<std::string>() + " but its data_offsets span " + std::to_string(entry.end - entry.begin));
    }
    entries.push_back(std::move(entry));
  }

  // As the format requires: the tensors tile the data section exactly, in the order of their offsets
  // (no byte is shared by two tensors, none is left over, nothing follows the last one).
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered = 0;
  const Entry* previous = nullptr;
  for (const Entry* e : by_offset) {
    if (e->begin != covered) {
      const std::string range = "[" + std::to_string(e->begin) + ", " + std::to_string(e->end) + "]";
      if (e->begin < covered) {
        throw FormatError(path + ": tensor '" + e->name + "' data_offsets " + range + " overlap those of tensor '" +
                          previous->name + "', which end at " + std::to_string(covered));
      }
      throw FormatError(path + ": tensor '" + e->name + "' data_offsets " + range + " leave the bytes [" +
                        std::to_string(covered) + ", " + std::to_string(e->begin) + ") of the data section unused" +
                        (previous ? " after tensor '" + previous->name + "'" : std::string(" before it")));
    }
    covered = e->end;
    previous = e;
  }
  if (covered != data_size) {
    throw FormatError(path + ": the data section has " + std::to_string(data_size) + " bytes but its tensors cover only " +
                      std::to_string(covered) + (previous ? " (the last is '" + previous->name + "')" : std::string()) +
                      ": trailing bytes");
  }

  std::map<std::string, at::Tensor> tensors;
  for (const auto& e : entries) {
    const char* begin = data + e.begin;
    const bool aligned = reinterpret_cast<uintptr_t>(begin) % c10::elementSize(e.type) == 0;
    if (owner && aligned && e.end > e.begin) {
      // A view of the bytes that keeps their owner (the file mapping) alive.
      tensors.emplace(e.name, at::from_blob(const_cast<char*>(begin), e.shape, [owner](void*) {},
                                            at::TensorOptions().dtype(e.type)));
      continue;
    }
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.type));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), begin, e.end - e.begin);
    tensors.emplace(e.name, t);
  }
  return tensors;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<TensorToWrite> specs;
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    specs.push_back({name, c.scalar_type(), c.sizes().vec(), [c] { return c; }});
  }
  save_safetensors(path, specs, metadata);
}

void save_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::vector<uint64_t> sizes;
  for (const TensorToWrite& t : tensors) {
    const uint64_t nbytes = c10::multiply_integers(t.shape) * c10::elementSize(t.dtype);
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    sizes.push_back(nbytes);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned, as the spec recommends
  try {
    AtomicFile out(path);
    uint8_t len_bytes[8];
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(n >> (8 * i));
    out.write(len_bytes, 8);
    out.write(h);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const TensorToWrite& spec = tensors[i];
      const at::Tensor c = spec.produce().detach().to(at::kCPU).contiguous();
      if (c.scalar_type() != spec.dtype || c.sizes() != at::IntArrayRef(spec.shape)) {
        throw FormatError(path + ": tensor '" + spec.name + "' was declared " + dtype_name(spec.dtype) + " " +
                          c10::str(at::IntArrayRef(spec.shape)) + " but produced " +
                          safetensors_dtype_name(c.scalar_type()) + " " + c10::str(c.sizes()));
      }
      out.write(c.data_ptr(), sizes[i]);
    }
    out.commit();
  } catch (const FileError& e) {
    throw FormatError(e.what());
  }
}

}  // namespace lckv::io
