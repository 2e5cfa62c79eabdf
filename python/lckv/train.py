"""python -m lckv.train: lckv-train from Python — the same C++ trainer (lckv::train::Trainer).

The run file, the flags (derived from the C++ option table, `_C.train_option_fields()`), the
checkpoints, resume, metrics records and the sample after training are lckv-train's, because this
module only drives the C++ trainer. What Python users may replace:

* the optimizer: `Trainer(options, optimizer=lambda model: torch.optim.SGD(model.parameters(), 0.1))`
  (any torch.optim optimizer, adapted by TorchOptimizer; its state_dict is the checkpoint's
  optimizer.pt, so such a run resumes only with the same kind of optimizer);
* a per-step callback: `trainer.run(callback)` calls `callback(stats)` after every step with
  lckv.train.StepStats (step, loss, lr, grad_norm, seconds).

Users who write their own loop use lckv.LCKVForCausalLM directly (examples/own_training_loop.py),
also under torch.nn.parallel.DistributedDataParallel.

Data parallelism is the C++ trainer's: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) each rank runs batch_size / WORLD_SIZE rows and rank 0 alone logs and checkpoints:

    torchrun --nproc-per-node 2 -m lckv.train --config run.json [--shard-optimizer]

    python -m lckv.train --config run.json [--max-steps 100 --lr 3e-4 ...]
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from . import _C
from .model import LCKVForCausalLM

TrainOptions = _C.TrainOptions
StepStats = _C.StepStats
EvalStats = _C.EvalStats
RunResult = _C.RunResult


class TorchOptimizer:
    """Adapts a torch.optim optimizer to the C++ trainer's optimizer seam."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer

    def kind(self) -> str:
        cls = type(self.optimizer)
        return f"python:{cls.__module__}.{cls.__qualname__}"

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def save(self, path: str) -> None:  # into the checkpoint's temporary directory: published atomically with it
        torch.save(self.optimizer.state_dict(), path)

    def load(self, path: str, device: str) -> None:
        self.optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))


class Trainer:
    """The C++ trainer. `options`: a TrainOptions, a dict of run-file fields, or a run file path.
    `optimizer`: None (lckv-train's fused AdamW) or a callable model -> torch.optim.Optimizer."""

    def __init__(self, options: Union[TrainOptions, dict, str, Path], *,
                 optimizer: Optional[Callable[[LCKVForCausalLM], torch.optim.Optimizer]] = None, log: bool = True):
        if isinstance(options, (str, Path)):
            options = TrainOptions.from_file(str(options))
        elif isinstance(options, dict):
            options = TrainOptions.from_json(json.dumps(options), "run options")
        elif not isinstance(options, TrainOptions):
            raise TypeError(f"options must be a TrainOptions, a dict or a run file path, got {type(options).__name__}")
        make = None
        if optimizer is not None:
            def make(cpp_model):
                opt = optimizer(LCKVForCausalLM._wrap(cpp_model))
                return opt if isinstance(opt, TorchOptimizer) else TorchOptimizer(opt)
        self._cpp = _C.Trainer(options, log, make)
        self.model = LCKVForCausalLM._wrap(self._cpp._cpp_model)  # the trainer's own parameters

    def run(self, callback: Optional[Callable[[StepStats], None]] = None) -> RunResult:
        return self._cpp.run(callback) if callback is not None else self._cpp.run()

    def train_step(self) -> StepStats:
        return self._cpp.train_step()

    def evaluate(self) -> EvalStats:
        return self._cpp.evaluate()

    def save_checkpoint(self) -> str:
        return self._cpp.save_checkpoint()

    @property
    def step(self) -> int:
        return self._cpp.step

    @property
    def total_steps(self) -> int:
        return self._cpp.total_steps

    @property
    def options(self) -> TrainOptions:
        return self._cpp.options

    @property
    def rank(self) -> int:
        return self._cpp.rank

    @property
    def world_size(self) -> int:
        return self._cpp.world_size


_PARSERS = {"int": int, "float": float, "string": str}


def parse_options(argv: Optional[List[str]] = None) -> TrainOptions:
    """The run's options as lckv-train reads them: defaults < run file (--config) < flags, checked
    by the C++ code (TrainError names the file and field)."""
    parser = argparse.ArgumentParser(prog="python -m lckv.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON run file whose fields (the flag names with '_' for '-') set the defaults")
    fields = _C.train_option_fields()
    for f in fields:
        default = json.loads(f["default"])
        help_text = f"{f['help']} (default: {default!r})"
        if f["kind"] == "bool":
            parser.add_argument(f["flag"], dest=f["name"], action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f["kind"] == "list":
            parser.add_argument(f["flag"], dest=f["name"], type=lambda s: [x for x in s.split(",") if x], default=None,
                                help=help_text)
        else:
            parser.add_argument(f["flag"], dest=f["name"], type=_PARSERS[f["kind"]], default=None, help=help_text)
    args = parser.parse_args(argv)
    options = TrainOptions.from_file(args.config) if args.config else TrainOptions()
    flags = {f["name"]: getattr(args, f["name"]) for f in fields if getattr(args, f["name"]) is not None}
    if flags:  # flags over the run file, type- and range-checked by the C++ table like the file's fields
        merged = {**json.loads(options.to_json()), **flags}
        options = TrainOptions.from_json(json.dumps(merged), "command-line flags")
    options.validate()
    return options


def main(argv: Optional[List[str]] = None) -> int:
    trainer = None  # kept alive past an error: see below
    try:
        options = parse_options(argv)
        _C.install_stop_handlers()
        trainer = Trainer(options)
        result = trainer.run()
    except _C.DistributedError as e:
        # The other ranks are gone or hung: exit without destroying the process group, whose
        # destructor could wait for collectives that never finish.
        print(f"python -m lckv.train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except (_C.TrainError, _C.ConfigError, _C.CheckpointError, _C.FileError, RuntimeError, OSError, ValueError) as e:
        print(f"python -m lckv.train: error: {e}", file=sys.stderr)
        return 1
    if trainer.rank != 0:  # rank 0 reports
        return 128 + result.stop_signal if result.stop_signal else 0
    if result.final_eval is not None:
        e = result.final_eval
        print(f"final validation: loss {e.loss}, perplexity {e.ppl} (step {result.step}, "
              f"checkpoint {result.last_checkpoint})")
    if result.sample:
        print(f'greedy continuation of "{options.prompt}":\n{result.sample}')
    return 128 + result.stop_signal if result.stop_signal else 0


if __name__ == "__main__":
    sys.exit(main())
