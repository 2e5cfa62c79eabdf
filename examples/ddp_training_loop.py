#!/usr/bin/env python3
"""Your own data-parallel loop: torch.nn.parallel.DistributedDataParallel around lckv.LCKVForCausalLM
(its forward and backward are the C++ model; DDP's reducer all-reduces its gradients as for any
nn.Module). Each rank trains on its slice of every global batch; at the end the ranks' weights are
compared with each other and (on rank 0) with one process trained on the whole batches.

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 examples/ddp_training_loop.py

Call torch.distributed.destroy_process_group() before the process ends (the `finally` below): a
process that exits with a live Gloo process group can abort in its exit handlers with "terminate
called without an active exception" (pytorch/pytorch#190489); when a rank failed, skip it, since
it waits for the other ranks.
"""
import argparse

import torch
import torch.distributed as dist

import lckv

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--global-batch", type=int, default=4)
ap.add_argument("--seq-len", type=int, default=32)
ap.add_argument("--threads", type=int, default=1)
args = ap.parse_args()

dist.init_process_group("gloo")  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
ok = False
try:
    rank, world = dist.get_rank(), dist.get_world_size()
    assert args.global_batch % world == 0, "the global batch must divide among the ranks"
    torch.set_num_threads(args.threads)
    cfg = lckv.LCKVConfig.preset("tiny-lckv-w2").to_dict()
    cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               vocab_size=128, forward_passes=2, backward_passes=2)
    def build():
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        return lckv.LCKVForCausalLM(lckv.LCKVConfig.from_dict(cfg))
    model = build()
    reference = build() if rank == 0 else None
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(1)
    rows = args.global_batch // world
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, cfg["vocab_size"], (args.global_batch, args.seq_len + 1), generator=batches)
        mine = ids[rank * rows:(rank + 1) * rows]  # this rank's slice of the global batch
        loss = ddp(mine, labels=mine).loss          # DDP averages the gradients over the ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f} (rank 0's slice)", flush=True)
        if reference is not None:  # one process, the whole batch
            if step == 1:
                ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)
            ref_loss = reference(ids, labels=ids).loss
            ref_opt.zero_grad(set_to_none=True)
            ref_loss.backward()
            ref_opt.step()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        across = max((g - flat).abs().max().item() for g in gathered)
        ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        rel = ((flat - ref).norm() / ref.norm()).item()
        print(f"ranks agree: max |difference| {across:.3g}; vs one process with the whole batch: relative {rel:.3g}")
        assert across == 0, "the ranks' weights differ"
        assert rel < 1e-5, "DDP's result differs from the whole-batch run"
    ok = True
finally:
    if ok:
        dist.destroy_process_group()
