// Model directories in the Hugging Face layout (docs/design.md §5): config.json and model.safetensors
// (or a sharded model.safetensors.index.json) with HF Llama tensor names.
#pragma once

#include <optional>
#include <string>

#include "lckv/model/lckv_model.h"

namespace lckv::io {

// Parameters by HF name ("model.layers.3.self_attn.q_proj.weight", "lm_head.weight", ...).
std::vector<std::pair<std::string, torch::Tensor>> hf_state_dict(LCKVForCausalLM& model);

// Copies tensors into the model's parameters (converting dtype); throws FormatError naming the
// tensor and `source` when one is missing, has the wrong shape, is not a parameter of the model,
// is not a float tensor or holds NaN/inf, or is lm_head.weight while config.json ties the embeddings.
void load_state(LCKVForCausalLM& model, const std::map<std::string, torch::Tensor>& tensors, const std::string& source);

// All tensors of a checkpoint directory, single-file or sharded, each a finite float tensor. A
// sharded index's weight_map is honoured exactly: every tensor is read from the shard it names and
// a shard must hold exactly the tensors assigned to it; shard paths must stay inside `dir`.
std::map<std::string, torch::Tensor> load_directory_tensors(const std::string& dir);

// The checkpoint directory `path` names: `path` itself when it holds config.json; else, for a run
// directory, the checkpoint its `latest` names; or, for a `latest` file itself, the checkpoint it
// names. `latest` is what lckv-train writes (a file holding the checkpoint's directory name, relative
// to the run directory) or a symlink to the checkpoint. FormatError naming what was looked for otherwise.
std::string resolve_checkpoint_dir(const std::string& path);

// The checkpoint `run_dir/latest` names (a path under run_dir), or nothing when run_dir has no
// `latest`; FormatError when it names an absolute path, one with '..', or nothing readable.
std::optional<std::string> latest_in_run(const std::string& run_dir);

// Builds the model from dir/config.json and loads its weights, in `dtype`. `dir` may also be a run
// directory or its `latest` (resolve_checkpoint_dir).
LCKVForCausalLM load_pretrained(const std::string& dir, torch::ScalarType dtype = torch::kFloat);

// The file an LCKV model's config.json names in its auto_map (LCKVConfig::to_json), and its text: transformers'
// trust_remote_code=True imports it, and it imports the classes of the installed lckv package.
inline constexpr const char* kHfRemoteCodeFile = "lckv_hf.py";
inline constexpr const char* kHfRemoteCode =
    "# transformers' trust_remote_code=True loads the classes config.json's auto_map names from here; they are the\n"
    "# installed lckv package's (pip install lckv), whose C++ model runs the forward.\n"
    "from lckv.hf import LCKVLlamaConfig, LCKVLlamaForCausalLM  # noqa: F401\n";

// When dir holds a SentencePiece tokenizer.model, writes the tokenizer_config.json with which transformers'
// AutoTokenizer loads it (LlamaTokenizer, the model's own special-token pieces, BOS added as lckv-generate does);
// nothing otherwise. Call it after copying a tokenizer.model into a checkpoint directory.
void write_hf_tokenizer_config(const std::string& dir);

// Writes config.json and model.safetensors into dir (created if missing), weights in `dtype`
// (a float dtype; others are refused); for an LCKV model also lckv_hf.py, and tokenizer_config.json when dir holds a
// tokenizer.model (write_hf_tokenizer_config).
void save_pretrained(LCKVForCausalLM& model, const std::string& dir, torch::ScalarType dtype = torch::kFloat);

}  // namespace lckv::io
