"""python -m lckv.train: train the C++ model from Python with torch.optim.AdamW.

It reads the same run file and flags as lckv-train (the fields of lckv::train::TrainOptions,
flags with '-' for '_'; flags override the run file) and the same lckv-prepare directory,
and uses lckv-train's pieces where they define the run: option checking, the learning-rate
schedule, the weight-decay groups, the data loaders and the loss. The initial weights are the
C++ trainer's for the same seed. Differences: the optimizer is torch.optim.AdamW, one process
(no data parallelism), and checkpoints hold the model only (config.json + model.safetensors,
loadable by lckv-generate and from_pretrained), so `resume` is not supported.

    python -m lckv.train --config run.json [--max-steps 100 --lr 3e-4 ...]
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import _C
from .config import LCKVConfig
from .model import LCKVForCausalLM


def parse_options(argv: Optional[List[str]] = None) -> Dict:
    """The run's options: defaults < run file (--config) < flags, checked by lckv-train's code."""
    defaults = json.loads(_C.train_options("{}", False))
    parser = argparse.ArgumentParser(prog="python -m lckv.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON run file with lckv-train's option fields; flags override it")
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=key, type=type(value), default=None, help=f"(default: {value!r})")
    args = parser.parse_args(argv)
    fields = {}
    if args.config:
        try:
            fields = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise _C.TrainError(f"run file '{args.config}': {e}") from None
        if not isinstance(fields, dict):
            raise _C.TrainError(f"run file '{args.config}': expected a JSON object of options")
    fields.update({k: getattr(args, k) for k in defaults if getattr(args, k) is not None})
    options = json.loads(_C.train_options(json.dumps(fields), True))
    if options["resume"]:
        raise _C.TrainError("option resume: python -m lckv.train does not resume runs; use lckv-train --resume")
    return options


class PythonTrainer:
    def __init__(self, options: Dict, log=sys.stdout):
        self.o = options
        self.options_json = json.dumps(options)
        self.log = log
        self.device = torch.device(options["device"])
        torch.set_num_threads(options["threads"])
        self.data = _C.read_prepared(options["data"])
        if not self.data["train_shards"]:
            raise _C.TrainError(f"'{options['data']}/meta.json' lists no training shards")
        config = LCKVConfig.from_json_file(options["model_config"])
        config.vocab_size = self.data["vocab_size"]
        if options["seq_len"] > config.max_position_embeddings:
            raise _C.TrainError(
                f"option seq_len {options['seq_len']} exceeds max_position_embeddings "
                f"{config.max_position_embeddings} of {options['model_config']}"
            )
        seq_len, batch = options["seq_len"], options["batch_size"]
        self.train_loader = _C.TrainLoader(self.data["train_shards"], seq_len, batch, options["seed"])
        self.val_loader = _C.SequentialLoader(self.data["val_shards"], seq_len, batch) if self.data["val_shards"] else None
        self.tokens_per_step = seq_len * batch * options["grad_accum"]
        self.total_steps = (
            math.ceil(options["max_tokens"] / self.tokens_per_step) if options["max_tokens"] > 0 else options["max_steps"]
        )
        # The C++ trainer's order: seed, build, initialise. Same seed, same initial weights.
        torch.manual_seed(options["seed"])
        self.model = LCKVForCausalLM(config).to(self.device)
        decay, no_decay = self.model.cpp_module._weight_decay_groups()
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for _, p in decay], "weight_decay": options["weight_decay"]},
                {"params": [p for _, p in no_decay], "weight_decay": 0.0},
            ],
            lr=options["lr"],
            betas=(options["beta1"], options["beta2"]),
            eps=options["adam_eps"],
        )
        self.bf16 = options["dtype"] == "bf16"
        self.step = 0
        self.out = Path(options["out"])
        self.metrics_path = Path(options["metrics"] or self.out / "metrics.jsonl")

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        seq_len = self.o["seq_len"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(tokens[:, :seq_len]).logits
            return _C.lm_loss(logits, tokens[:, 1 : seq_len + 1])

    def train_step(self) -> Dict:
        t0 = time.perf_counter()
        lr = _C.learning_rate(self.options_json, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.o["grad_accum"]
        loss_sum = 0.0
        for _ in range(accum):
            loss = self._loss(self.train_loader.next())
            value = loss.item()
            if not math.isfinite(value):
                raise _C.TrainError(f"step {self.step + 1}: the training loss is {value}; stopping without applying this step")
            (loss / accum).backward()
            loss_sum += value
        clip = self.o["grad_clip"] if self.o["grad_clip"] > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), clip).item()
        if not math.isfinite(grad_norm):
            raise _C.TrainError(f"step {self.step + 1}: the gradient norm is {grad_norm}; stopping without applying this step")
        self.optimizer.step()
        self.step += 1
        return {"type": "train", "step": self.step, "loss": loss_sum / accum, "lr": lr, "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t0, "tokens": self.step * self.tokens_per_step}

    @torch.no_grad()
    def evaluate(self) -> Dict:
        """Mean next-token loss over the validation split, summed as lckv-train sums it."""
        self.model.eval()
        self.val_loader.reset()
        loss_sum, tokens, batches = 0.0, 0, 0
        while (batch := self.val_loader.next()) is not None:
            if self.o["eval_batches"] > 0 and batches == self.o["eval_batches"]:
                break
            n = batch.shape[0] * self.o["seq_len"]
            loss_sum += self._loss(batch).item() * float(n)
            tokens += n
            batches += 1
        self.model.train()
        loss = loss_sum / tokens
        return {"type": "eval", "step": self.step, "val_loss": loss, "val_ppl": math.exp(loss), "tokens": tokens}

    def save_checkpoint(self) -> Path:
        """<out>/step_NNNNNN (config.json + fp32 model.safetensors), written to a temporary
        directory and renamed into place; keeps the newest keep_checkpoints."""
        final = self.out / f"step_{self.step:06d}"
        tmp = self.out / f".tmp_step_{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, dtype=torch.float32)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = sorted(self.out.glob("step_[0-9]*"))
        for old in steps[: max(0, len(steps) - self.o["keep_checkpoints"])]:
            shutil.rmtree(old)
        return final

    def _record(self, record: Dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self) -> Dict:
        if (self.out / "latest").exists():
            raise _C.TrainError(f"'{self.out}' already holds an lckv-train run; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train.json").write_text(json.dumps(self.o, indent=2))
        self.metrics_path.unlink(missing_ok=True)
        print(f"python -m lckv.train: {self.model!r}, {self.total_steps} steps of {self.tokens_per_step} tokens",
              file=self.log)
        last_eval = None
        for _ in range(self.total_steps):
            s = self.train_step()
            if self.step % self.o["log_every"] == 0 or self.step == self.total_steps:
                self._record(s)
                print(f"step {s['step']}/{self.total_steps} loss {s['loss']:.4f} lr {s['lr']:.2e} "
                      f"grad_norm {s['grad_norm']:.3f} {self.tokens_per_step / s['seconds']:.0f} tok/s", file=self.log)
            if self.val_loader and self.o["eval_every"] > 0 and self.step % self.o["eval_every"] == 0:
                last_eval = self.evaluate()
                self._record(last_eval)
            if self.o["save_every"] > 0 and self.step % self.o["save_every"] == 0:
                self.save_checkpoint()
        if self.val_loader and (last_eval is None or last_eval["step"] != self.step):
            last_eval = self.evaluate()
            self._record(last_eval)
        if last_eval:
            print(f"validation: loss {last_eval['val_loss']:.4f} ppl {last_eval['val_ppl']:.2f}", file=self.log)
        saved = self.o["save_every"] > 0 and self.step % self.o["save_every"] == 0
        checkpoint = self.out / f"step_{self.step:06d}" if saved else self.save_checkpoint()
        print(f"checkpoint: {checkpoint}", file=self.log)
        return {"step": self.step, "final_eval": last_eval, "checkpoint": str(checkpoint)}


def main(argv: Optional[List[str]] = None) -> int:
    try:
        PythonTrainer(parse_options(argv)).run()
    except (_C.TrainError, _C.ConfigError, _C.CheckpointError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
