"""The peer's side of a kernel census: one peft LoRA step (transformers sdpa,
bf16, r8 on q/v, AdamW) of a two-layer Qwen2.5 model under torch.profiler,
GPU time summed by kernel name, for comparison with
`scripts/profile/ncu-kernels.sh ... --suite lora-profile --dp-model SHAPE`.

    python3 scripts/profile/peft_kernels.py --shape 1.5B
"""
import argparse

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    # hidden, intermediate, heads, kv heads, batch, seq
    "0.5B": (896, 4864, 14, 2, 8, 512),
    "1.5B": (1536, 8960, 12, 2, 4, 1024),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="1.5B", choices=SHAPES)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    h, i, nh, kv, b, s = SHAPES[args.shape]
    cfg = Qwen2Config(vocab_size=151936, hidden_size=h, intermediate_size=i, num_hidden_layers=2,
                      num_attention_heads=nh, num_key_value_heads=kv, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (b, s), device="cuda")

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n, t = rows.get(e.name, (0, 0.0))
            rows[e.name] = (n + 1, t + e.device_time_total)
    total = sum(t for _, t in rows.values())
    print(f"peft {args.shape} 2-layer step: {sum(n for n, _ in rows.values())} kernels, "
          f"{total / 1e3:.2f} ms GPU time")
    for name, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{t / 1e3:8.3f} ms {100 * t / total:5.1f}% {n:5d}x  {name[:110]}")


if __name__ == "__main__":
    main()
