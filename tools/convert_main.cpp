// lckv-convert: a checkpoint (a Hugging Face Llama directory, any LCKV checkpoint, a run directory or
// its `latest`) into an LCKV model of another layer_types, with the K/V projections of the new KV
// layers initialised by --kv-init (lckv::io::convert_checkpoint; docs/design.md §5). The source is
// memory-mapped and the output streamed tensor by tensor, so a 1.1B conversion needs about one copy
// of the checkpoint in memory.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <iostream>

#include "lckv/dtype.h"
#include "lckv/io/convert.h"
#include "lckv/openmp_policy.h"

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-convert: convert a Llama or LCKV checkpoint into an LCKV model of the given layer_types"};
  std::string source, out, layer_types, kv_init = "average", dtype;
  int forward_passes = 0, backward_passes = 0;
  int64_t sliding_window = 0;
  uint64_t seed = 0;
  bool overwrite = false, to_hf = false;
  app.add_option("source", source, "Checkpoint directory (config.json + model.safetensors or a sharded index), a run "
                                   "directory of lckv-train or its latest")->required();
  app.add_option("out", out, "Output checkpoint directory (written atomically)")->required();
  app.add_option("--layer-types", layer_types, "layer_types of the converted model, one entry per source layer "
                                               "(e.g. 0_6_6_6_6_6_6_7; default: the source's)");
  app.add_option("--forward-passes", forward_passes, "forward_passes (m) of the converted model (default: the source's)")
      ->check(CLI::Range(0, lckv::kMaxPasses));
  app.add_option("--backward-passes", backward_passes, "backward_passes (b) of the converted model (default: the source's)")
      ->check(CLI::Range(1, lckv::kMaxPasses));
  app.add_option("--sliding-window", sliding_window, "sliding_window of the converted model (default: the source's)")
      ->check(CLI::PositiveNumber);
  app.add_option("--kv-init", kv_init, "K/V projections of the new KV layers: average (the mean over the layers that "
                                       "attend to each, the reference's), copy (the layer's own) or random")
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of --kv-init random")->capture_default_str();
  app.add_option("--dtype", dtype, "Weights dtype of the output: fp32, bf16, fp16, fp64 (default: the source's "
                                   "torch_dtype)");
  app.add_flag("--overwrite", overwrite, "Replace an existing output directory");
  app.add_flag("--to-hf", to_hf, "Write the Hugging Face export format (save_pretrained) instead of streaming the "
                                 "tensors (holds the converted model in memory)");
  CLI11_PARSE(app, argc, argv);
  try {
    lckv::io::ConvertOptions options;
    if (!layer_types.empty()) options.layer_types = layer_types;
    if (app.count("--forward-passes")) options.forward_passes = forward_passes;
    if (app.count("--backward-passes")) options.backward_passes = backward_passes;
    if (app.count("--sliding-window")) options.sliding_window = sliding_window;
    options.kv_init = lckv::io::parse_kv_init(kv_init);
    options.seed = seed;
    std::optional<torch::ScalarType> out_dtype;
    if (!dtype.empty()) out_dtype = lckv::parse_float_dtype(dtype, "--dtype");
    const auto start = std::chrono::steady_clock::now();
    const lckv::LCKVConfig c = lckv::io::convert_checkpoint(source, out, options, out_dtype, overwrite, to_hf);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cerr << "lckv-convert: wrote " << out << " (layer_types " << lckv::format_layer_types(c.layer_types) << ", "
              << c.kv_layers().size() << " of " << c.num_hidden_layers << " layers compute KV, kv-init " << kv_init
              << ") in " << seconds << " s\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-convert: " << e.what() << "\n";
    return 1;
  }
}
