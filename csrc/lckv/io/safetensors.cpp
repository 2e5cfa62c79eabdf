#include "lckv/io/safetensors.h"

#include <cstdio>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

namespace lckv::io {
namespace {

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
const DtypeName kDtypes[] = {{"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
                             {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
                             {"U8", at::kByte},    {"BOOL", at::kBool}};

at::ScalarType dtype_from_name(const std::string& path, const std::string& tensor, const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return d.type;
  }
  throw FormatError(path + ": tensor '" + tensor + "' has unsupported dtype '" + name + "'");
}

const char* dtype_name(at::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (t == d.type) return d.name;
  }
  throw FormatError(std::string("safetensors: cannot write dtype ") + c10::toString(t));
}

}  // namespace

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw FormatError("cannot open safetensors file '" + path + "'");
  const uint64_t file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  if (file_size < 8) throw FormatError(path + ": file is " + std::to_string(file_size) + " bytes, too short for a safetensors header");
  uint8_t len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > file_size - 8 || header_len > (100u << 20)) {
    throw FormatError(path + ": header length " + std::to_string(header_len) + " exceeds the file size " +
                      std::to_string(file_size) + " (truncated or not a safetensors file)");
  }
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const nlohmann::json::parse_error& e) {
    throw FormatError(path + ": header is not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw FormatError(path + ": header is not a JSON object");
  const uint64_t data_size = file_size - 8 - header_len;
  std::vector<char> data(data_size);
  in.read(data.data(), static_cast<std::streamsize>(data_size));
  if (static_cast<uint64_t>(in.gcount()) != data_size) throw FormatError(path + ": could not read the data section");

  std::map<std::string, at::Tensor> tensors;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const auto& e = it.value();
    try {
      const at::ScalarType type = dtype_from_name(path, name, e.at("dtype").get<std::string>());
      const std::vector<int64_t> shape = e.at("shape").get<std::vector<int64_t>>();
      const auto offsets = e.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > data_size) {
        throw FormatError(path + ": tensor '" + name + "' has data_offsets " + e.at("data_offsets").dump() +
                          " outside the data section of " + std::to_string(data_size) + " bytes (truncated file?)");
      }
      uint64_t numel = 1;
      for (int64_t d : shape) {
        if (d < 0) throw FormatError(path + ": tensor '" + name + "' has a negative dimension");
        numel *= static_cast<uint64_t>(d);
      }
      const uint64_t nbytes = numel * c10::elementSize(type);
      if (nbytes != offsets[1] - offsets[0]) {
        throw FormatError(path + ": tensor '" + name + "' needs " + std::to_string(nbytes) + " bytes for its shape but has " +
                          std::to_string(offsets[1] - offsets[0]));
      }
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(type));
      if (nbytes) std::memcpy(t.data_ptr(), data.data() + offsets[0], nbytes);
      tensors.emplace(name, t);
    } catch (const nlohmann::json::exception& ex) {
      throw FormatError(path + ": tensor '" + name + "' has a malformed header entry (" + ex.what() + ")");
    }
  }
  return tensors;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    const uint64_t nbytes = c.numel() * c.element_size();
    header[name] = {{"dtype", dtype_name(c.scalar_type())}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    contiguous.push_back(c);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned, as the spec recommends
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw FormatError("cannot write '" + tmp + "' (is the directory writable?)");
    uint8_t len_bytes[8];
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(n >> (8 * i));
    out.write(reinterpret_cast<const char*>(len_bytes), 8);
    out.write(h.data(), static_cast<std::streamsize>(h.size()));
    for (const auto& c : contiguous) {
      out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
    }
    out.flush();
    if (!out) throw FormatError("failed writing '" + tmp + "' (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw FormatError("cannot rename '" + tmp + "' to '" + path + "'");
  }
}

}  // namespace lckv::io
