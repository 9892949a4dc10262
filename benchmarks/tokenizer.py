"""Benchmark the hybrid tokenizer: encode and decode throughput (images/s) and peak memory.

What it measures (wall clock over --iters timed iterations, after --warmup untimed ones):
- encode: `HybridTokenizer.encode(images)` = encoder + quant_conv + multi-scale quantization
  (tokens of every scale and the continuous residual);
- decode: `HybridTokenizer.decode(tokens, residual)` = the hybrid (continuous) decode HART uses.
CPU: fp32. CUDA: bf16 autocast for the conv nets (the nearest-code search stays fp32).
Peak memory: CPU = the process's peak resident set size (getrusage ru_maxrss; includes the
model and Python), CUDA = torch.cuda.max_memory_allocated per phase.
Weights are random unless --weights is given: speed does not depend on their values.

Usage: python -m benchmarks.tokenizer [--preset var-d16-f16] [--resolution 256] [--batch-size 4]
       [--iters 3] [--warmup 1] [--threads N] [--device auto|cpu|cuda] [--weights PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from dataclasses import replace

import torch

from hart.config import RELEASED_SCALE_LISTS, TOKENIZER_PRESETS
from hart.tokenizer.model import HybridTokenizer



def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="var-d16-f16", choices=sorted(TOKENIZER_PRESETS), help="tokenizer preset")
    parser.add_argument("--resolution", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--batch-size", type=int, default=4, help="images per call")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per phase")
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch default)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if present")
    parser.add_argument("--weights", default=None, help="optional tokenizer folder or .pth to load")
    return parser.parse_args()


def build_config(preset: str, resolution: int):
    config = TOKENIZER_PRESETS[preset]
    factor = config.downsample_factor()
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not divisible by the downsampling factor {factor}")
    latent = resolution // factor
    if config.patch_nums[-1] == latent:
        return config
    released = [scales for scales in RELEASED_SCALE_LISTS.values() if scales[-1] == latent]
    if not released:
        raise ValueError(f"no released scale list ends at latent size {latent}; known: "
                         f"{sorted(scales[-1] for scales in RELEASED_SCALE_LISTS.values())}")
    return replace(config, patch_nums=released[0])


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(name, fn, iters, warmup, device, batch_size):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for i in range(iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        print(f"  {name} iter {i + 1}/{iters}: {seconds[-1]:.3f} s", flush=True)
    total = sum(seconds)
    return {"images_per_s": batch_size * iters / total, "s_per_batch": total / iters, "peak_mib": peak_memory_mib(device)}


def main() -> None:
    args = parse_args()
    if args.iters < 1 or args.batch_size < 1:
        raise ValueError("--iters and --batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    device = torch.device("cuda" if use_cuda else "cpu")
    config = build_config(args.preset, args.resolution)
    if args.weights:
        tokenizer = HybridTokenizer.from_pretrained(args.weights, patch_nums=config.patch_nums)
    else:
        torch.manual_seed(0)
        tokenizer = HybridTokenizer(config)
    tokenizer = tokenizer.to(device).eval()
    num_params = sum(p.numel() for p in tokenizer.parameters())
    images = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    where = torch.cuda.get_device_name(device) if use_cuda else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if use_cuda else "fp32"
    print(f"tokenizer {args.preset} ({num_params / 1e6:.1f}M params), {args.resolution}px, "
          f"{len(config.patch_nums)} scales, batch {args.batch_size}, {where}, {precision}", flush=True)

    state = {}

    def encode():
        with torch.inference_mode(), autocast:
            state["tokens"], state["residual"] = tokenizer.encode(images)

    def decode():
        with torch.inference_mode(), autocast:
            tokenizer.decode(state["tokens"], state["residual"])

    results = {}
    for name, fn in (("encode", encode), ("decode", decode)):
        results[name] = timed(name, fn, args.iters, args.warmup, device, args.batch_size)
    memory = "peak CUDA allocated" if use_cuda else "peak process RSS (cumulative)"
    for name, r in results.items():
        print(f"{name}: {r['images_per_s']:.3f} images/s ({r['s_per_batch']:.3f} s/batch), "
              f"{memory} {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
