#!/usr/bin/env python3
"""The peers' side of the benchmark table: PyTorch / transformers / peft /
sentence-transformers-style code on the same shapes, dtypes and kinds of
weights (random, real shapes) as examples/bench_compare.rs. Each row: warm-up
excluded, torch.cuda.synchronize() before every clock read, median of
repeats. Output: one JSON object per row on stdout.

usage: python3 scripts/peers.py --device cuda [--suite all|generation|kernels] [--quick]
"""
import argparse
import sys
import json
import statistics
import time

import os
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
    variants = [("eager", "dynamic"), ("eager", "static"), ("sdpa", "dynamic"), ("sdpa", "static")]
    # PEERS_GENERATION=sdpa:static,sdpa:dynamic runs only those (a GPU call's time is short).
    only = os.environ.get("PEERS_GENERATION")
    if only:
        variants = [v for v in variants if ":".join(v) in only.split(",")]
    for attn, cache in variants:
        model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn, dtype=DT[dtype]).to(args.device).eval()
        impl = f"transformers {attn}" + (" static-cache" if cache == "static" else "")
        try:
            with torch.no_grad():
                if cache == "dynamic":
                    for p in args.prompts or ([32] if args.quick else [128, 1024]):
                        x = ids(1, p, cfg.vocab_size, args.device)
                        secs = timed(args.device, args.repeats, lambda: model(input_ids=x, use_cache=True))
                        emit(impl, "generation", "prefill", f"b1 prompt{p}", dtype, p / secs, "tok/s")
                new = args.new_tokens or (16 if args.quick else 256)
                for b, p in args.decode or [(1, 32), (8, 32)]:
                    x = ids(b, p, cfg.vocab_size, args.device)
                    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                    if cache == "static":
                        kw["cache_implementation"] = "static"
                    secs = timed(args.device, min(args.repeats, 3), lambda: model.generate(x, **kw))
                    emit(impl, "generation", "decode", f"b{b} prompt{p} new{new}", dtype, b * new / secs, "tok/s")
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


BERT_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)
BERT_LARGE = dict(BERT_BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096)
EMBED_MODELS = {
    # name: (fixture folder whose pooling files are reused, real tokenizer
    # in .dev/bench-tokenizers (make_bench_inputs.py), config). BGE and E5
    # are BERT with the bert-base-uncased vocabulary, as MiniLM: its
    # tokenizer serves them; BGE pools the CLS token, E5 the mean.
    "all-MiniLM-L6-v2": ("embed-tiny-minilm", "all-MiniLM-L6-v2", dict(BERT_BASE, hidden_size=384,
                         num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)),
    "all-mpnet-base-v2": ("embed-tiny-mpnet", "all-mpnet-base-v2", dict(BERT_BASE, model_type="mpnet",
                          vocab_size=30527, max_position_embeddings=514)),
    "bge-base-en-v1.5": ("embed-tiny-bge", "all-MiniLM-L6-v2", BERT_BASE),
    "bge-large-en-v1.5": ("embed-tiny-bge", "all-MiniLM-L6-v2", BERT_LARGE),
    "e5-base-v2": ("embed-tiny-e5", "all-MiniLM-L6-v2", BERT_BASE),
    "e5-large-v2": ("embed-tiny-e5", "all-MiniLM-L6-v2", BERT_LARGE),
}
# The models with encode and single-query latency rows; the others have
# forward+pool rows only.
FULL_ROWS = ("all-MiniLM-L6-v2", "all-mpnet-base-v2")
# max_seq_length of the real models' sentence_bert_config.json (the corpus
# rows truncate there, as the real models do).
REAL_MAX_SEQ = {"all-MiniLM-L6-v2": 256, "all-mpnet-base-v2": 384, "bge-base-en-v1.5": 512,
                "bge-large-en-v1.5": 512, "e5-base-v2": 512, "e5-large-v2": 512}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Retrieval-augmented generation grounds answers in documents.",
    "Rust gives memory safety without a garbage collector, and Candle brings tensors to it.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Sentence embeddings map text to vectors so that similar meanings land close together.",
    "A short one.",
    "GPU kernels must be synchronized before a clock is read, or the numbers mean nothing.",
    "Mean pooling averages token vectors where the attention mask is one.",
]


def prepare_embedding_models(root, names=None, tokenizers=".dev/bench-tokenizers"):
    """Random-weight sentence-transformers folders with the real models'
    shapes, which both sides of the benchmark load: same weights on both
    sides. Tokenizer files: the real ones where `tokenizers` has them
    (scripts/make_bench_inputs.py), else the tiny fixtures'."""
    import os
    import shutil
    from transformers import AutoConfig, AutoModel
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
    for name in names or EMBED_MODELS:
        fixture, tok, cfg = EMBED_MODELS[name]
        out = os.path.join(root, name)
        src = os.path.join(fixtures, fixture)
        if not os.path.exists(os.path.join(out, "model.safetensors")):
            torch.manual_seed(0)
            cfg = dict(cfg)
            kind = cfg.pop("model_type")
            config = AutoConfig.for_model(kind, **cfg)
            AutoModel.from_config(config).save_pretrained(out)
            for f in ["modules.json", "config_sentence_transformers.json"]:
                if os.path.exists(os.path.join(src, f)):
                    shutil.copy(os.path.join(src, f), out)
            for d in ["1_Pooling", "2_Normalize"]:
                if os.path.isdir(os.path.join(src, d)):
                    shutil.copytree(os.path.join(src, d), os.path.join(out, d), dirs_exist_ok=True)
            pc = os.path.join(out, "1_Pooling", "config.json")
            with open(pc) as f:
                p = json.load(f)
            p["embedding_dimension"] = cfg["hidden_size"]
            with open(pc, "w") as f:
                json.dump(p, f)
        real = os.path.join(tokenizers, tok)
        tok_src = real if os.path.exists(os.path.join(real, "tokenizer.json")) else src
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]:
            if os.path.exists(os.path.join(tok_src, f)):
                shutil.copy(os.path.join(tok_src, f), out)
        with open(os.path.join(out, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": 512, "do_lower_case": False}, f)
        tc = os.path.join(out, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                t = json.load(f)
            t["model_max_length"] = 512
            with open(tc, "w") as f:
                json.dump(t, f)


def bench_embeddings(args):
    import os
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel
    root = args.embed_models
    prepare_embedding_models(root, embed_names(args))
    dtypes = ["f32", "bf16"] if args.device.startswith("cuda") else ["f32"]
    if args.dtype:
        dtypes = [args.dtype]
    shapes = [(1, 128), (32, 128)] if args.quick else [(1, 128), (32, 128), (512, 128), (128, 512)]
    for name in embed_names(args):
        path = os.path.join(root, name)
        cls = EMBED_MODELS[name][0] == "embed-tiny-bge"
        for dtype in dtypes:
            model = AutoModel.from_pretrained(path, dtype=DT[dtype]).to(args.device).eval()
            for b, s in shapes:
                if not args.device.startswith("cuda") and b * s > 32 * 128:
                    continue
                x = ids(b, s, 2600, args.device)
                x[:, 0] = 0 if "mpnet" in name else 101
                mask = torch.ones_like(x)

                def run():
                    h = model(input_ids=x, attention_mask=mask).last_hidden_state
                    if cls:
                        e = h[:, 0]
                    else:
                        m = mask.unsqueeze(-1).to(h.dtype)
                        e = (h * m).sum(1) / m.sum(1)
                    return torch.nn.functional.normalize(e.float(), dim=-1)
                with torch.no_grad():
                    secs = timed(args.device, args.repeats, run)
                emit("pytorch (sentence-transformers-style)", "embeddings", f"{name} forward+pool",
                     f"b{b} s{s}", dtype, b / secs, "docs/s")
            del model
            if name not in FULL_ROWS:
                continue
            st = SentenceTransformer(path, device=args.device, model_kwargs={"dtype": DT[dtype]})
            texts = (TEXTS * 64)[:512]
            secs = timed(args.device, args.repeats, lambda: st.encode(texts, batch_size=32))
            emit("sentence-transformers", "embeddings", f"{name} encode (tokenize+embed)", "512 texts b32",
                 dtype, len(texts) / secs, "docs/s")
            # A search query at a time: tokenize, embed, the vector on the host.
            queries = 50 if args.quick else 500
            st.encode(TEXTS[:1])
            each = []
            for q in (TEXTS * (queries // len(TEXTS) + 1))[:queries]:
                start = time.perf_counter()
                st.encode([q])
                each.append(time.perf_counter() - start)
            each.sort()
            for label, p in (("p50", 0.5), ("p99", 0.99)):
                emit("sentence-transformers", "embeddings", f"{name} single-query encode latency {label}",
                     f"{queries} queries, one at a time", dtype, each[round((len(each) - 1) * p)] * 1e3, "ms")
            del st


def embed_names(args):
    names = args.embed_names.split(",") if args.embed_names else list(EMBED_MODELS)
    unknown = [n for n in names if n not in EMBED_MODELS]
    if unknown:
        raise SystemExit(f"unknown --embed-names {unknown} (known: {', '.join(EMBED_MODELS)})")
    return names


CORPUS_BATCHES = [32, 128, 512]


def bench_embeddings_corpus(args):
    """`SentenceTransformer.encode` of the real-text set (tokenization,
    its length sort, batches, the vectors on the host), for each dtype and
    batch size; then the best batch per dtype."""
    import os
    from sentence_transformers import SentenceTransformer
    prepare_embedding_models(args.embed_models, embed_names(args))
    with open(args.texts, encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    dtypes = ["f32", "f16", "bf16"] if args.device.startswith("cuda") else ["f32"]
    if args.dtype:
        dtypes = [args.dtype]
    batches = CORPUS_BATCHES[:1] if args.quick else CORPUS_BATCHES
    names = [n for n in embed_names(args) if n in REAL_MAX_SEQ]
    for name in names:
        row = f"{name} encode {len(texts)} real texts"
        for dtype in dtypes:
            st = SentenceTransformer(os.path.join(args.embed_models, name), device=args.device,
                                     model_kwargs={"dtype": DT[dtype]})
            st.max_seq_length = REAL_MAX_SEQ[name]
            best = 0.0
            for bs in batches:
                secs = timed(args.device, args.repeats, lambda: st.encode(texts, batch_size=bs))
                best = max(best, len(texts) / secs)
                emit("sentence-transformers", "embeddings", row, f"b{bs}", dtype, len(texts) / secs, "docs/s")
            emit("sentence-transformers", "embeddings", row, "best batch", dtype, best, "docs/s")
            del st


def with_peak_memory(device, fn):
    """Polls torch.cuda.mem_get_info (the whole device, as our side polls
    cuMemGetInfo) every 2 ms while fn runs; returns (result, peak bytes)."""
    import threading
    if not device.startswith("cuda"):
        return fn(), 0
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            free, total = torch.cuda.mem_get_info()
            peak[0] = max(peak[0], total - free)
            time.sleep(0.002)
    t = threading.Thread(target=poll)
    t.start()
    try:
        out = fn()
        torch.cuda.synchronize()
    finally:
        stop.set()
        t.join()
    return out, peak[0]


def qwen15b(quick):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=4 if quick else 28, num_attention_heads=12,
                       num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True)


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (model, batch, seq, rank, all seven modules, gradient checkpointing, attention):
# examples/bench_compare.rs's lora_rows has the same shapes.
# The first three are ours' first three (`--lora-rows 3` runs the same rows).
LORA_ROWS = [
    ("0.5B", 8, 512, 8, False, False, "sdpa"),
    ("0.5B", 8, 512, 16, True, False, "sdpa"),
    ("1.5B", 4, 1024, 8, False, False, "sdpa"),
    ("0.5B", 8, 512, 8, False, True, "sdpa"),
    ("0.5B", 8, 512, 8, False, False, "eager"),
]
LORA_ROWS_QUICK = [("0.5B", 2, 64, 8, False, False, "sdpa")]


def bench_lora(args):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "f32")
    rows = LORA_ROWS_QUICK if args.quick else LORA_ROWS
    for (name, b, s, r, all7, ckpt, attn) in rows[: args.lora_rows]:
        cfg = qwen15b(args.quick) if name == "1.5B" else qwen05b(args.quick)

        def run():
            torch.manual_seed(0)
            model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn, dtype=DT[dtype]).to(args.device)
            if ckpt:
                model.gradient_checkpointing_enable()
                model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                     target_modules=ALL7 if all7 else ["q_proj", "v_proj"]))
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            x = ids(b, s, cfg.vocab_size, args.device)

            def step():
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            out = timed(args.device, args.repeats, step)
            del model, opt
            return out
        secs, peak = with_peak_memory(args.device, run)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        shape = f"{name} b{b} s{s} r{r} {'all7' if all7 else 'q,v'}" + (" ckpt" if ckpt else "")
        impl = f"peft (transformers {attn})"
        emit(impl, "lora", "train step (fwd+bwd+AdamW)", shape, dtype, b * s / secs, "tok/s")
        if peak:
            emit(impl, "lora", "peak device memory", shape, dtype, peak / 2**20, "MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--suite", default="all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per decode row")
    ap.add_argument("--prompts", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="prompt lengths of the prefill rows, e.g. 128,1024")
    ap.add_argument("--decode", type=lambda v: [tuple(int(y) for y in x.split("x")) for x in v.split(",")],
                    default=None, help="decode rows as BATCHxPROMPT, e.g. 1x32,8x32 (the default)")
    ap.add_argument("--embed-models", default=".dev/bench-models",
                    help="where the random-weight embedding models are written (shared with ours)")
    ap.add_argument("--prepare-only", action="store_true", help="only write the embedding models")
    ap.add_argument("--embed-names", default=None,
                    help="comma-separated embedding models (default: all of EMBED_MODELS)")
    ap.add_argument("--texts", default=".dev/bench-texts.jsonl",
                    help="the embeddings-corpus suite's texts (scripts/make_bench_inputs.py)")
    ap.add_argument("--lora-rows", type=int, default=None, help="only the first N LoRA rows")
    ap.add_argument("--composed-backward", action="store_true",
                    help="(ours only: LoRA rows also through Candle's op-by-op backward)")
    args = ap.parse_args()
    if args.device == "cpu":
        # Every core, as Candle's CPU path uses (rayon and gemm take them
        # all); torch's default is the physical cores. Reported per row.
        import os
        torch.set_num_threads(os.cpu_count())
        print(f"# torch threads: {torch.get_num_threads()}", file=sys.stderr)
    if args.prepare_only:
        prepare_embedding_models(args.embed_models, embed_names(args))
        return
    if args.suite in ("all", "embeddings"):
        bench_embeddings(args)
    if args.suite == "embeddings-corpus":
        bench_embeddings_corpus(args)
    if args.suite in ("all", "kernels"):
        bench_kernels(args)
    if args.suite in ("all", "lora"):
        bench_lora(args)
    if args.suite in ("all", "generation"):
        bench_generation(args)


if __name__ == "__main__":
    main()
