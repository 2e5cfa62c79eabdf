// lckv-train: pretrains an LCKV (or plain Llama) model from token shards written by lckv-prepare.
// All the work is in lckv::train (csrc/lckv/train/); this file derives the flags from the option
// table, installs the SIGINT/SIGTERM handlers and prints the results.
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <exception>
#include <iostream>

#include "lckv/openmp_policy.h"
#include "lckv/train/trainer.h"

namespace {

// The run file named by --config, found before the flags are parsed so its values become the
// flags' defaults (flags given on the command line override it).
std::string find_run_file(int argc, char** argv) {
  std::string path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--config") == 0 && i + 1 < argc) path = argv[i + 1];
    else if (std::strncmp(argv[i], "--config=", 9) == 0) path = argv[i] + 9;
  }
  return path;
}

}  // namespace

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  using lckv::train::TrainOptions;
  TrainOptions o;
  std::string run_file = find_run_file(argc, argv);
  if (!run_file.empty()) {
    try {
      o = TrainOptions::from_file(run_file);
    } catch (const std::exception& e) {
      std::cerr << "lckv-train: error: " << e.what() << "\n";
      return 2;
    }
  }

  CLI::App app{
      "Pretrain an LCKV model (or a plain Llama: identity layer_types) on token shards from lckv-prepare.\n"
      "Weights and AdamW state are fp32; --dtype bf16 runs forward and backward under bf16 autocast.\n"
      "Checkpoints go to <out>/step_NNNNNN (config.json, model.safetensors, optimizer.pt,\n"
      "trainer_state.json), <out>/latest names the newest; metrics to <out>/metrics.jsonl.\n"
      "SIGINT/SIGTERM save a checkpoint after the current step and exit; --resume continues exactly.",
      "lckv-train"};
  app.add_option("--config", run_file,
                 "JSON run file whose fields (the flag names with '_' for '-', e.g. \"seq_len\") set the defaults "
                 "of every flag below");
  lckv::train::add_cli_options(app, o);
  CLI11_PARSE(app, argc, argv);

  // Outside the try: a rank that lost its peers exits from the catch without destroying the process
  // group, whose destructor could wait for collectives that never finish.
  std::unique_ptr<lckv::train::Trainer> trainer;
  try {
    lckv::train::install_stop_handlers();
    trainer = std::make_unique<lckv::train::Trainer>(o, &std::cerr);
    const lckv::train::RunResult result = trainer->run();
    if (trainer->rank() != 0) return result.stop_signal ? 128 + result.stop_signal : 0;  // rank 0 reports
    if (result.final_eval) {
      std::cout << "final validation: loss " << result.final_eval->loss << ", perplexity " << result.final_eval->ppl
                << " (step " << result.step << ", checkpoint " << result.last_checkpoint << ")\n";
    }
    if (!result.sample.empty()) {
      std::cout << "greedy continuation of \"" << o.prompt << "\":\n" << result.sample << "\n";
    }
    if (result.stop_signal) return 128 + result.stop_signal;
    return 0;
  } catch (const lckv::train::DistributedError& e) {
    std::cerr << "lckv-train: error: " << e.what() << std::endl;
    std::_Exit(1);
  } catch (const std::exception& e) {
    std::cerr << "lckv-train: error: " << e.what() << "\n";
    return 1;
  }
}
