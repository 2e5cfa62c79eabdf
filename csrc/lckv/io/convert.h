// Conversion of a checkpoint (a Hugging Face Llama or any LCKV model) into an LCKV model of another
// `layer_types` (docs/design.md §5): every tensor but the K/V projections carries over unchanged (only
// the K/V projections depend on layer_types); each layer that computes KV in the new layout gets its
// K/V projections (weights and biases) by one of the initialisations below, and layers that no longer
// compute KV lose theirs. lckv-convert, from_pretrained(layer_types=...) and lckv-train --init-from
// (through a converted directory) all use these functions.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "lckv/io/safetensors.h"
#include "lckv/model/lckv_model.h"

namespace lckv::io {

// How the K/V projections of a layer j that computes KV in the new layout are initialised. "The K/V
// layer i used" is the source K/V projection of the layer i's queries read in the source (i itself
// for a plain Llama):
//   average: the mean, over every layer i that attends to j in the new layout, of the K/V layer i
//            used (whyNLP/LCKV convert_pretrained.py: each pretrained layer contributes to the layer
//            it attends to; j itself counts only when it attends to itself);
//   copy:    j's own source K/V (the one j used when j computes none in the source);
//   random:  fresh values as init_weights draws them (normal(0, initializer_range), zero biases).
enum class KVInit { kAverage, kCopy, kRandom };
KVInit parse_kv_init(const std::string& name);  // "average" | "copy" | "random"; ConfigError otherwise
std::string to_string(KVInit init);

struct ConvertOptions {
  std::optional<std::string> layer_types;  // default: the source's
  std::optional<int> forward_passes, backward_passes;
  std::optional<int64_t> sliding_window;
  KVInit kv_init = KVInit::kAverage;
  uint64_t seed = 0;  // of kv_init random
};

// The source's config with the options applied, validated. A layer_types whose number of entries
// differs from the source's num_hidden_layers is a ConfigError naming both (and `source`).
LCKVConfig converted_config(const LCKVConfig& source, const ConvertOptions& options, const std::string& source_name);

// The converted model's tensors (HF names) in `dtype`, each produced from the source tensors only when
// asked for (a converted 1.1B checkpoint never exists in memory at once). Checks the source tensors
// against the source config (K/V projections exactly on its KV layers, with one shape; the total
// number of values the new config needs) and throws FormatError naming `source_name` and the tensor.
std::vector<TensorToWrite> convert_tensors(const LCKVConfig& source_config,
                                           const std::map<std::string, torch::Tensor>& source,
                                           const LCKVConfig& target_config, KVInit kv_init, uint64_t seed,
                                           torch::ScalarType dtype, const std::string& source_name);

// lckv-convert: `source` is a checkpoint directory, a run directory or its `latest`
// (resolve_checkpoint_dir). Writes a complete checkpoint directory `out` (config.json,
// model.safetensors, the source's tokenizer files) in `dtype` (default: the source's torch_dtype),
// atomically: assembled next to `out`, then renamed. An existing `out` is refused unless `overwrite`.
// to_hf: written by save_pretrained (the Hugging Face export format) from the converted model in
// memory instead of streamed. Returns the converted config.
LCKVConfig convert_checkpoint(const std::string& source, const std::string& out, const ConvertOptions& options,
                              std::optional<torch::ScalarType> dtype = std::nullopt, bool overwrite = false,
                              bool to_hf = false);

// The converted model in memory, in `dtype` (from_pretrained(dir, layer_types=..., kv_init=...)).
LCKVForCausalLM load_converted(const std::string& source, const ConvertOptions& options,
                               torch::ScalarType dtype = torch::kFloat);

}  // namespace lckv::io
