#!/usr/bin/env python3
"""Your own training loop around lckv.LCKVForCausalLM, a torch.nn.Module whose forward and backward
are the C++ model: build a small LCKV from a preset, train it with torch.optim.AdamW under bf16
autocast, save it, reload it (bit-identical logits) and generate with the condensed KV cache.

    .venv/bin/python examples/own_training_loop.py                      # random token ids
    .venv/bin/python examples/own_training_loop.py --data data/kjv      # an lckv-prepare directory
"""
import argparse

import torch

import lckv

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--data", help="lckv-prepare directory (default: one fixed batch of random ids, memorised)")
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--seq-len", type=int, default=64)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", default="runs/own_loop")
args = ap.parse_args()
torch.manual_seed(0)
torch.set_num_threads(args.threads)

# The tiny LCKV w=2 preset (layer_types 0_6_6_6_6_6_6_7), narrowed so a step takes milliseconds.
cfg = lckv.LCKVConfig.preset("tiny-lckv-w2").to_dict()
cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           vocab_size=256, forward_passes=3, backward_passes=2)
if args.data:  # lckv-train's deterministic loader: int64 windows [batch, seq_len + 1]
    meta = lckv.data.read_prepared(args.data)
    cfg["vocab_size"] = meta["vocab_size"]
    loader = lckv.data.TrainLoader(meta["train_shards"], args.seq_len, args.batch_size, seed=0)
    next_batch = loader.next
else:
    fixed = torch.randint(0, cfg["vocab_size"], (args.batch_size, args.seq_len + 1))
    next_batch = lambda: fixed  # noqa: E731
model = lckv.LCKVForCausalLM(lckv.LCKVConfig.from_dict(cfg))

# AdamW as lckv-train uses it: weight decay on the matrices only.
decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=args.lr, betas=(0.9, 0.95))
model.train()
for step in range(1, args.steps + 1):
    ids = next_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 master weights, bf16 compute
        loss = model(ids, labels=ids).loss                  # labels shifted inside, as in Hugging Face
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    print(f"step {step} loss {loss.item():.4f}")

# Save (config.json + model.safetensors, HF names: lckv-generate reads it too), reload, compare.
model.eval()
model.save_pretrained(args.out)
reloaded = lckv.LCKVForCausalLM.from_pretrained(args.out).eval()
with torch.no_grad():
    diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
print(f"reloaded {args.out}: max |logit difference| {diff}")
if diff != 0:
    raise SystemExit("the reloaded model's logits differ from the saved model's")

prompt = ids[0, :8].tolist()
new = reloaded.generate([prompt], max_new_tokens=16).tokens[0]  # greedy, condensed KV cache
print("prompt", prompt, "-> generated", new)
if args.data:
    print(repr(lckv.data.Tokenizer.load(meta["tokenizer"]).decode(prompt + new)))
