// safetensors reader and writer. Debian ships no maintained C++ safetensors library, and the
// format is small (an 8-byte header length, a JSON header, raw little-endian data), so it is
// written here against nlohmann-json, with every offset and size validated on read.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lckv::io {

struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// All tensors of a file, on CPU, in the file's dtype. The file is memory-mapped (copy-on-write) and
// the tensors are views of the mapping, so reading costs no copy and pages load as they are used:
// converting a checkpoint never holds it twice. Throws FormatError naming the file and the
// tensor or field on a truncated, corrupt or foreign file.
// The data section must be tiled exactly by the tensors in the order of their offsets (no overlap,
// gap or trailing bytes); shapes whose element or byte count overflows 64 bits are refused.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);

// The same for a file's bytes already in memory; `path` names it in errors (the fuzz target uses this).
std::map<std::string, at::Tensor> parse_safetensors(const std::string& path, std::string_view bytes);
// With an `owner` of `bytes`, tensors whose data is aligned for their dtype are views of `bytes` that
// keep `owner` alive (the others are copies); without one, every tensor is a copy.
std::map<std::string, at::Tensor> parse_safetensors(const std::string& path, std::string_view bytes,
                                                    std::shared_ptr<const void> owner);

// The format's name of a dtype ("F32", "I32", ...); torch's name for one the format lacks.
std::string safetensors_dtype_name(at::ScalarType t);

// Writes atomically (temp file + rename); tensors keep their dtype (made contiguous, moved to CPU).
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A tensor to write whose dtype and shape are known up front (for the header) and whose values are
// produced only when the writer reaches it: a file can then be written from tensors that never all
// exist at once (conversion streams a checkpoint through this, one tensor in memory at a time).
struct TensorToWrite {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  std::function<at::Tensor()> produce;  // must return a tensor of exactly that dtype and shape
};
void save_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace lckv::io
