"""The peer's side of an encoder kernel census: one PyTorch forward + mean
pool (sdpa, bf16) of a random-weight embedding model written by
`scripts/peers.py --prepare-only`, under torch.profiler, GPU time summed by
kernel name, for comparison with `scripts/profile/ncu-kernels.sh ...
--suite embeddings-profile --embed-names NAME --profile-shape BxS`.

    python3 scripts/profile/encoder_kernels.py --name all-MiniLM-L6-v2 --shape 128x512
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModel


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", default="all-MiniLM-L6-v2")
    ap.add_argument("--shape", default="128x512")
    ap.add_argument("--embed-models", default=".dev/bench-models")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    args = ap.parse_args()
    b, s = (int(v) for v in args.shape.split("x"))
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    model = AutoModel.from_pretrained(os.path.join(args.embed_models, args.name),
                                      dtype=dtype).cuda().eval()
    x = ((torch.arange(b * s) * 2654435761) % 2600).reshape(b, s).cuda()
    mask = torch.ones_like(x)

    def run():
        with torch.no_grad():
            h = model(input_ids=x, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"{args.name} b{b} s{s} {args.dtype} (PyTorch sdpa): {total / 1e3:.2f} ms GPU time")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:args.top]:
        print(f"{e.device_time_total / 1e3:9.3f} {100 * e.device_time_total / total:5.1f}% {e.count:6d}  {e.key[:90]}")


if __name__ == "__main__":
    main()
