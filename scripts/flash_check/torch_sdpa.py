"""Times PyTorch's scaled_dot_product_attention forward and backward at the
shapes flash_check benchmarks, for comparison on the same card (run on the
GPU machine: python3 torch_sdpa.py). Backends: flash (FlashAttention-2 in
PyTorch), cuDNN, and math (materialises the [b, h, s, t] scores: what the
composed path does). GQA goes through enable_gqa where the backend takes it,
else K/V are expanded to the query heads before timing (noted in the line).
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [
    # label, b, hq, hkv, s, d, causal
    ("b8 hq14 hkv2 s512 d64 causal", 8, 14, 2, 512, 64, True),
    ("b8 hq14 hkv2 s512 d64 full", 8, 14, 2, 512, 64, False),
    ("b4 hq32 hkv8 s2048 d128 causal", 4, 32, 8, 2048, 128, True),
]
BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH)]


def timed(fn, iters=50, warm=10):
    for _ in range(warm):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run(label, b, hq, hkv, s, d, causal, name, backend):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, hq, s, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=dt, requires_grad=True)
    note = "enable_gqa"
    with sdpa_kernel(backend):
        def call(q, k, v, gqa):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        try:
            out = call(q, k, v, True)
            kk, vv, gqa = k, v, True
        except RuntimeError:
            # Expanded outside the timed region: PyTorch's kernel at hq heads.
            kk = k.detach().repeat_interleave(hq // hkv, 1).requires_grad_()
            vv = v.detach().repeat_interleave(hq // hkv, 1).requires_grad_()
            gqa, note = False, "K/V expanded"
            out = call(q, kk, vv, False)
        grad = torch.randn_like(out)
        fwd = timed(lambda: call(q, kk, vv, gqa))
        bwd = timed(lambda: torch.autograd.grad(out, (q, kk, vv), grad, retain_graph=True))
    frac = 0.5 if causal else 1.0
    flops = 4.0 * b * hq * s * s * d * frac
    print(f"TORCH {label:<32} {name:<6} fwd {fwd:.4f} ms ({flops / fwd / 1e9:.0f} TFLOP/s)  "
          f"bwd {bwd:.4f} ms ({2.5 * flops / bwd / 1e9:.0f} TFLOP/s)  [{note}]")


def main():
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for shape in SHAPES:
        for name, backend in BACKENDS:
            try:
                run(*shape, name, backend)
            except Exception as e:  # a backend that refuses the shape
                print(f"TORCH {shape[0]:<32} {name:<6} unavailable: {str(e).splitlines()[0][:100]}")


if __name__ == "__main__":
    main()
