"""Benchmark the HART transformer: training throughput and generation latency.

What it measures (wall clock, after warm-up steps that are not counted):
- training: one `t2i_losses` forward + backward (+ AdamW step) on random tokens, with the
  HART recipe (last-scale subsampling, self-sampled diffusion targets, diffusion_batch_mul).
  Reported as processed sequence tokens/s (text prefix + kept image tokens) and image tokens/s.
- generation: `sample` (all scales with KV cache, CFG, 8-step diffusion head) for a
  batch, plus the tokenizer decode, as latency per batch.
- segment attention: forward + backward of `hart.layers.attention.segmented_attention` against the
  same per-segment SDPA calls over plain slices (whose backward zero-fills a full-size gradient
  per segment), alternated call by call; reported as the median of the paired time ratios.
CPU part: a small 256px preset (10 scales) in fp32. GPU part (skipped, with a message, when
no CUDA device is present): `hart-0.7b` at 512px and 1024px in bf16 autocast with peak
memory and MFU (model FLOPs: 6 x matmul params x tokens + block-causal attention, over the
device's dense bf16 peak). Weights are random: speed does not depend on their values.

Usage: python -m benchmarks.transformer [--skip-cpu] [--skip-gpu] [--steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.mfu import peak_bf16
from hart.layers.attention import segmented_attention
from hart.config import RELEASED_SCALE_LISTS, TRANSFORMER_PRESETS, TokenizerConfig
from hart.transformer.generate import sample
from hart.tokenizer.quantizer import MultiScaleQuantizer
from hart.transformer.objective import t2i_losses
from hart.tokenizer.model import HybridTokenizer
from hart.transformer.model import HARTForT2I

# Dense bf16 tensor-core peaks (FLOP/s) for MFU.

SMALL_256 = replace(
    TRANSFORMER_PRESETS["tiny"], patch_nums=RELEASED_SCALE_LISTS[256], context_token=77, context_dim=384, depth=4,
    embed_dim=256, num_heads=4, vocab_size=4096, token_dim=32, diff_width=256, diff_depth=2, diffusion_batch_mul=4,
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(config, B, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = [torch.randint(0, config.vocab_size, (B, pn * pn), generator=g).to(device) for pn in config.patch_nums]
    H = config.patch_nums[-1]
    residual = (torch.randn(B, config.token_dim, H, H, generator=g) * 0.1).to(device)
    context = torch.randn(B, config.context_token, config.context_dim, generator=g).to(device)
    mask = torch.ones(B, config.context_token, dtype=torch.bool, device=device)
    mask[:, config.context_token // 2 :] = False
    return tokens, residual, context, mask


def attention_flops(config, num_kept_last):
    """Forward FLOPs of QK^T and AV per sample under the block-causal mask (all layers)."""
    segments = [config.context_token, *config.grid.token_counts[1:-1], num_kept_last]
    total, seen = 0, 0
    for q in segments:  # each segment attends to every key up to its own end
        seen += q
        total += 4 * q * seen * config.embed_dim
    return total * config.depth


def bench_training(config, B, device, steps, dtype=None):
    torch.manual_seed(0)
    model = HARTForT2I(config).to(device)
    model.init_weights()
    model.train()
    tok_cfg = TokenizerConfig(vocab_size=config.vocab_size, z_channels=config.token_dim, patch_nums=config.patch_nums)
    quantizer = MultiScaleQuantizer(tok_cfg).to(device).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens, residual, context, mask = make_inputs(config, B, device)
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)

    def step():
        with autocast:
            out = t2i_losses(model, quantizer, context, mask, tokens, residual, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return out

    for _ in range(2):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kept, start = [], time.perf_counter()
    for i in range(steps):
        out = step()
        kept.append(int(out["num_kept_last"]))
        print(f"  step {i + 1}/{steps} loss {float(out['loss'].detach()):.3f}", flush=True)
    sync(device)
    elapsed = (time.perf_counter() - start) / steps
    k = sum(kept) / len(kept)
    img_tokens = B * (config.num_image_tokens() - config.patch_nums[-1] ** 2 + k)
    seq_tokens = img_tokens + B * config.context_token
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("diffloss."))
    flops = 6 * matmul_params * seq_tokens + 3 * B * attention_flops(config, int(k))
    result = {"step_s": elapsed, "seq_tok_s": seq_tokens / elapsed, "img_tok_s": img_tokens / elapsed, "flops": flops / elapsed}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def bench_generation(config, tok_cfg, B, device, repeats, dtype=None):
    torch.manual_seed(0)
    model = HARTForT2I(config).to(device).eval()
    model.init_weights()
    tokenizer = HybridTokenizer(tok_cfg).to(device).eval()
    _, _, context, mask = make_inputs(config, B, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    times_sample, times_decode = [], []
    for i in range(repeats + 1):
        generator = torch.Generator(device=device).manual_seed(i)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            f_hat = sample(model, tokenizer.quantize, context, mask, generator=generator).f_hat_BCvHH
            sync(device)
            t1 = time.perf_counter()
            tokenizer.decode_latent(f_hat.float())
        sync(device)
        t2 = time.perf_counter()
        if i > 0:  # first run is warm-up
            times_sample.append(t1 - t0)
            times_decode.append(t2 - t1)
    return {"sample_s": sum(times_sample) / repeats, "decode_s": sum(times_decode) / repeats}


def sliced_attention(q_BHLd, k_BHLd, v_BHLd, ends, scale):
    """The baseline: segmented attention written with plain slices (the implementation before `_Prefixes`)."""
    outs, start = [], 0
    for end in ends:
        outs.append(F.scaled_dot_product_attention(
            q_BHLd[:, :, start:end], k_BHLd[:, :, :end], v_BHLd[:, :, :end], scale=scale))
        start = end
    return torch.cat(outs, dim=2)


def bench_segment_attention(config, B, device, repeats=30, autocast_dtype=None):
    """Median ms of forward + backward for each implementation, and the median of paired ratios.

    With `autocast_dtype` the call runs under autocast with q and k in fp32 and v in that dtype, as
    a model with `attn_l2_norm` (hart-0.7b) hands them over; without it everything is fp32.
    """
    ends, end = [config.context_token], config.context_token
    for pn in config.patch_nums:
        end += pn * pn
        ends.append(end)
    shape = (B, config.num_heads, end, config.embed_dim // config.num_heads)
    q, k = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    v = torch.randn(shape, device=device, dtype=autocast_dtype or torch.float32, requires_grad=True)
    grad = torch.randn(shape, device=device, dtype=autocast_dtype or torch.float32)

    def timed(attend):
        sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = attend(q, k, v, ends, 0.125)
        out.backward(grad)
        sync(device)
        return time.perf_counter() - started

    for attend in (segmented_attention, sliced_attention):
        timed(attend)  # warm-up
    times = {"segmented": [], "sliced": []}
    for i in range(repeats):
        order = ("segmented", "sliced") if i % 2 else ("sliced", "segmented")
        for name in order:
            times[name].append(timed(segmented_attention if name == "segmented" else sliced_attention))
    ratios = [a / b for a, b in zip(times["segmented"], times["sliced"])]
    return {"segments": len(ends), "tokens": end, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
            "ratio": statistics.median(ratios)}


def run_cpu(args):
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    config = SMALL_256
    n_params = sum(p.numel() for p in HARTForT2I(config).parameters())
    print(f"[cpu] small 256px preset: depth {config.depth}, width {config.embed_dim}, {len(config.patch_nums)} scales, "
          f"{n_params / 1e6:.1f}M params, {config.context_token} text tokens, fp32, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    train = bench_training(config, args.batch, device, args.steps)
    print(f"[cpu] training (fwd+bwd+AdamW), batch {args.batch}: {train['step_s']:.3f} s/step, "
          f"{train['seq_tok_s']:.0f} seq tokens/s, {train['img_tok_s']:.0f} image tokens/s, "
          f"{train['flops'] / 1e9:.1f} GFLOP/s achieved")
    tok_cfg = TokenizerConfig(ch=32, patch_nums=RELEASED_SCALE_LISTS[256])  # small conv widths: this benchmark is about the transformer
    gen = bench_generation(config, tok_cfg, args.batch, device, repeats=2)
    print(f"[cpu] generation, batch {args.batch}, cfg 4.5, 10 scales + 8 diffusion steps: "
          f"{gen['sample_s']:.3f} s sampling + {gen['decode_s']:.3f} s decode (ch=32 tokenizer)")
    for autocast_dtype in (None, torch.bfloat16):
        seg = bench_segment_attention(config, args.batch, device, autocast_dtype=autocast_dtype)
        print(f"[cpu] segment attention fwd+bwd ({'bf16 autocast, q/k fp32' if autocast_dtype else 'fp32'}), batch "
              f"{args.batch}, {seg['segments']} segments, {seg['tokens']} tokens: {seg['segmented_ms']:.1f} ms vs plain "
              f"slices {seg['sliced_ms']:.1f} ms, paired ratio {seg['ratio']:.3f}")


def run_gpu(args):
    if not torch.cuda.is_available():
        print("[gpu] skipped: no CUDA device on this machine (hart-0.7b at 512/1024px bf16 needs one)")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = peak_bf16(name)
    for res, batch in ((512, args.gpu_batch), (1024, max(1, args.gpu_batch // 4))):
        patch_nums = RELEASED_SCALE_LISTS[res]
        config = replace(TRANSFORMER_PRESETS["hart-0.7b"], patch_nums=patch_nums)
        train = bench_training(config, batch, device, args.steps, dtype=torch.bfloat16)
        mfu = f"{100 * train['flops'] / peak:.1f}%" if peak else "n/a (unknown peak)"
        print(f"[gpu {name}] hart-0.7b {res}px training bf16, batch {batch}: {train['step_s']:.3f} s/step, "
              f"{train['seq_tok_s']:.0f} seq tokens/s, peak {train['peak_gib']:.1f} GiB, MFU {mfu}")
        torch.cuda.empty_cache()
        tok_cfg = TokenizerConfig(patch_nums=patch_nums)
        gen = bench_generation(config, tok_cfg, 8, device, repeats=3, dtype=torch.bfloat16)
        print(f"[gpu {name}] hart-0.7b {res}px generation bf16, batch 8: {gen['sample_s']:.3f} s sampling + "
              f"{gen['decode_s']:.3f} s decode")
        seg = bench_segment_attention(config, batch, device, autocast_dtype=torch.bfloat16)
        print(f"[gpu {name}] hart-0.7b {res}px segment attention fwd+bwd (bf16 autocast, q/k fp32), batch {batch}: "
              f"{seg['segmented_ms']:.2f} ms vs plain slices {seg['sliced_ms']:.2f} ms, paired ratio {seg['ratio']:.3f}")
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-cpu", action="store_true", help="do not run the CPU small-preset part")
    parser.add_argument("--skip-gpu", action="store_true", help="do not run the GPU hart-0.7b part")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4, help="CPU batch size (training and generation)")
    parser.add_argument("--gpu-batch", type=int, default=16, help="GPU training batch at 512px (1024px uses a quarter)")
    # 1 thread by default: on the shared 2-core CI box, thread hand-offs under load cost more than they give.
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    if not args.skip_cpu:
        run_cpu(args)
    if not args.skip_gpu:
        run_gpu(args)


if __name__ == "__main__":
    main()
