#!/usr/bin/env python3
"""The peers' side of the benchmark table: PyTorch / transformers / peft /
sentence-transformers-style code on the same shapes, dtypes and kinds of
weights (random, real shapes) as examples/bench_compare.rs. Each row: warm-up
excluded, torch.cuda.synchronize() before every clock read, median of
repeats. Output: one JSON object per row on stdout.

usage: python3 scripts/peers.py --device cuda [--suite all|generation|kernels] [--quick]
"""
import argparse
import json
import statistics
import time

import torch


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device, repeats, fn):
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def emit(impl, job, row, shape, dtype, value, unit):
    print(json.dumps({"impl": impl, "job": job, "row": row, "shape": shape, "dtype": dtype,
                      "value": value, "unit": unit}), flush=True)


DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def qwen05b(quick):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=4 if quick else 24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True)


def ids(b, s, vocab, device):
    k = torch.arange(b * s, dtype=torch.int64)
    return ((k * 2654435761) % vocab).reshape(b, s).to(device)


def bench_generation(args):
    from transformers import Qwen2ForCausalLM
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "f32")
    cfg = qwen05b(args.quick)
    torch.manual_seed(0)
    for attn, cache in [("eager", "dynamic"), ("eager", "static"), ("sdpa", "dynamic")]:
        model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn, dtype=DT[dtype]).to(args.device).eval()
        impl = f"transformers {attn}" + (" static-cache" if cache == "static" else "")
        try:
            with torch.no_grad():
                if cache == "dynamic":
                    for p in ([32] if args.quick else [128, 1024]):
                        x = ids(1, p, cfg.vocab_size, args.device)
                        secs = timed(args.device, args.repeats, lambda: model(input_ids=x, use_cache=True))
                        emit(impl, "generation", "prefill", f"b1 prompt{p}", dtype, p / secs, "tok/s")
                new = 16 if args.quick else 256
                for b in [1, 8]:
                    x = ids(b, 32, cfg.vocab_size, args.device)
                    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                    if cache == "static":
                        kw["cache_implementation"] = "static"
                    secs = timed(args.device, min(args.repeats, 3), lambda: model.generate(x, **kw))
                    emit(impl, "generation", "decode", f"b{b} prompt32 new{new}", dtype, b * new / secs, "tok/s")
        except Exception as e:  # a peer variant that does not run is reported, not fatal
            emit(impl, "generation", "error", str(e)[:120], dtype, float("nan"), "")
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def bench_kernels(args):
    dtype = "bf16" if args.device.startswith("cuda") else "f32"
    x = torch.randn(8, 512, 896, device=args.device).to(DT[dtype])
    w = (1 + 0.1 * torch.randn(896, device=args.device)).to(DT[dtype])

    def rms(x):  # transformers' Qwen2RMSNorm.forward
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    n = 50
    with torch.no_grad():
        secs = timed(args.device, args.repeats, lambda: [rms(x) for _ in range(n)])
    emit("pytorch eager", "kernels", "rms_norm fwd", "8x512x896", dtype, secs / n * 1e6, "us")
    xg = x.clone().requires_grad_(True)

    def fb():
        for _ in range(n // 5):
            rms(xg).sum().backward()
    secs = timed(args.device, args.repeats, fb)
    emit("pytorch eager", "kernels", "rms_norm fwd+bwd", "8x512x896", dtype, secs / (n // 5) * 1e6, "us")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--suite", default="all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    if args.suite in ("all", "kernels"):
        bench_kernels(args)
    if args.suite in ("all", "generation"):
        bench_generation(args)


if __name__ == "__main__":
    main()
