#!/usr/bin/env python3
"""The data-parallel LoRA peer: PyTorch DistributedDataParallel + peft,
started by torchrun (one process per GPU), on the shapes of
`bench_compare --suite lora-dp`: Qwen2.5-0.5B (b8 x 512 per process) or
1.5B (b4 x 1024), random weights, bf16 on CUDA, r8 on q/v, AdamW,
transformers' default sdpa attention. Rank 0 prints one JSON row: the global
tokens/s, median step of --repeats after 2 warm-up steps, synchronized.

  torchrun --nproc-per-node 2 scripts/peers/ddp_lora.py --model 0.5B
  (NCCL on CUDA, gloo on the CPU: --device cpu --quick for a smoke test)
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import peers  # noqa: E402  (shapes, ids and emit shared with the one-GPU peers)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="0.5B")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for k, v in [("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                 ("NVSHMEM_DISABLE_NVLS", "1")]:
        os.environ.setdefault(k, v)
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM
    from torch.nn.parallel import DistributedDataParallel as DDP

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = peers.qwen15b(args.quick) if args.model == "1.5B" else peers.qwen05b(args.quick)
    b, s = (4, 1024) if args.model == "1.5B" else (8, 512)
    if args.quick:
        b, s = 2, 64
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    model.train()
    ddp = DDP(model, device_ids=[local] if cuda else None)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-4)
    # Each rank its own rows (as a DistributedSampler would give).
    x = peers.ids(b * world, s, cfg.vocab_size, device)[rank * b:(rank + 1) * b]

    def step():
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.repeats + 2):
        peers.sync(device)
        dist.barrier()
        t = time.perf_counter()
        step()
        peers.sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    secs = torch.tensor(statistics.median(times), device=device)
    dist.all_reduce(secs, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        peers.emit("peft + DDP (torchrun, transformers sdpa)", "lora", "data-parallel train step",
                   f"{args.model} b{b}/process s{s} r8 q,v, {world} process{'es' if world > 1 else ''}",
                   "bf16" if cuda else "f32", b * s * world / float(secs), "tok/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
