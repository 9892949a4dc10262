"""Everything a GPU should measure for HART, in one call that prints one table (default budget 480 s).

Rows (weights are random everywhere: speed does not depend on their values):
- `train RES eager | compile | flex+compile` (RES = 256, 512, 1024 px): the worker's training step of
  `hart-0.7b` as `benchmarks/mfu.py` measures it, by calling its `mfu_run`: `train_step`
  (joint objective, bf16 autocast, fused AdamW, clip 2.0) + the EMA update, on random tokens, the
  objective wrapped by `hart.training.parallelize.parallelize` as on a worker (world size 1). The kernel choice
  is `ParallelConfig(attention="sdpa"|"flex", compile=...)`; compile = `torch.compile` per block.
  Time = mean of `--steps` steps after `--warmup` steps whose random draws they replay (steady state,
  see `mfu_run`). FLOPs are counted by `FlopCounterMode` over a real eager forward + backward (model
  FLOPs: the same count for every kernel choice); MFU = counted FLOPs / step time / the GPU's dense
  bf16 peak (`benchmarks.mfu.PEAK_BF16`, or `--peak-tflops`).
- `generate RES bB eager | compile` (512, 1024 px; batch 1 and 8): wall time of one
  `hart.transformer.generate.generate` call (text features -> all scales with KV cache and CFG 4.5 -> 8-step
  residual head -> tokenizer decode -> PIL images) after `--gen-warmup` untimed calls, mean of
  `--gen-repeats`; bf16 autocast. The model is `hart-0.7b` with HART's tokenizer net at RES's released
  scale list (the `hart-512` / `hart-1024` presets); a stand-in text encoder returns random (B, 300, 1536) features (no Qwen download: the
  transformer's cost does not depend on the feature values). Compile = `torch.compile` per block with
  the recompile limit raised to cover every scale (`hart.training.parallelize.compile_for_generation`,
  what `hart-generate --compile` does): the blocks compile once per scale in the warm-up, one compiled
  step per scale.
- `tokenizer RES encode`: `HybridTokenizer.encode` (encoder + multi-scale quantization + residual) of
  the HART tokenizer net (`hart-1024` preset with RES's scale list), bf16 autocast, images/s over
  `--tok-iters` batches after one untimed batch (`benchmarks/tokenizer.py`'s `timed`): the ceiling of
  the pre-tokenization (precompute) pipeline per GPU.
Checks, run first and printed in a table of their own (their time counts against the budget and has
not been measured on a GPU: flex compiles its kernel once per dtype; a failed check makes the exit
status 1):
- `flex = sdpa gradients, fp32 | bf16 autocast`: the parameter gradients of one forward + backward of
  a small transformer at the released 256px scale list (padded text, a kept last-scale subset) with
  FlexAttention equal those of the SDPA path, elementwise within 1e-4 (fp32) or 3e-2 (bf16), the
  tolerance of the CPU forward test. CUDA only: FlexAttention has no CPU backward.
- `op checkpointing = none, nothing recomputed`: with `activation_checkpointing_policy="op"` (SDPA
  kernels, fp32) the gradients equal those without checkpointing within 1e-5, and the backward makes
  exactly as many matmul and attention calls as without checkpointing: the policy recognises this
  device's SDPA kernel (`hart.training.parallelize.SAVED_OPS`) and recomputes none of them.
Peak GiB = `torch.cuda.max_memory_allocated` over the row's timed part. `warm-up s` = the untimed
steps/calls (compile happens there); `row s` = the whole row (build, FLOP counting, warm-up, timing).

Budget: the run stops starting rows once they would not fit in `--budget-s` (counted from the start):
a row starts only if the time left is at least its estimate (the longest row of its kind so far, or a
first guess per kind), else it prints "skipped (budget)". A row that runs out of GPU memory prints
"OOM" and the next row runs. Rows run cheapest-and-most-needed first (tokenizer, eager training,
compiled training, flex training, generation) and are printed in a fixed order.

Needs no Ray, no MLflow, no network: torch, numpy, Pillow, safetensors and PyYAML, what a stock CUDA
PyTorch image holds (the test runs `--smoke` with only these importable). pydantic, the config-file
validator, is not among them: this script and the benchmarks it calls change presets with
`dataclasses.replace` (the configs' own value checks run) instead of `configuration.loader.replace`.

`--smoke` (= `--device cpu --preset tiny` with tiny sizes, batch 2 (generation 1 and 2), one warm-up
and one timed step per row, one torch thread, torch.compile's `eager` backend) runs every row's code
on the CPU in about 30 s on two cores; flex rows print "n/a" there (FlexAttention has no backward on
the CPU). CPU figures say nothing about a GPU.

Run:  python -m benchmarks.gpu [--budget-s 480] [--only train,generate,tokenizer] [--train-batch 256=32,...]
      python -m benchmarks.gpu --smoke

Why one module of this length: GPU time is often short (a shared or rented card), so every GPU figure runs from one
prepared command; each row calls the CPU-tested code of its measurement (`benchmarks.mfu.mfu_run`,
the samplers, the tokenizer), and what stays here is each row's set-up, the budget and the table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable

STARTED = time.monotonic()  # the budget counts imports and CUDA start-up too: the whole call must fit

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import mfu as mfu_bench
from benchmarks import tokenizer as tokenizer_bench
from benchmarks import transformer as transformer_bench
from hart.config import PATCH_NUMS_256, RELEASED_SCALE_LISTS, TOKENIZER_PRESETS, transformer_config
from hart.training.parallelize import SAVED_OPS

RESOLUTIONS = (256, 512, 1024)
# The tiny preset's scale lists per nominal resolution (its tokenizer downsamples 8x: 32, 48 and 64 px):
# the CPU smoke run exercises the same code at sizes two cores finish in seconds.
TINY_SCALES = {256: (1, 2, 4), 512: (1, 2, 3, 6), 1024: (1, 2, 4, 8)}
GENERATION_RESOLUTIONS = (512, 1024)
TRAIN_MODES = ("eager", "compile", "flex+compile")
# First estimate (s) of a row of each kind on a GPU, before one has run; later rows of the kind use the
# longest one measured. Rough: the H100 rows in BENCHMARKS.md (eager hart-0.7b rows ~20 s with the model
# build and FLOP counting; compile warm-up 32-56 s); generation and flex are guesses.
FIRST_ROW_ESTIMATE_S = {"train eager": 20.0, "train compile": 60.0, "train flex+compile": 60.0,
                        "generate eager": 10.0, "generate compile": 40.0, "tokenizer": 5.0}
COLUMNS = ("row", "setting", "time", "throughput", "FLOP/step (counted)", "MFU", "peak GiB", "warm-up s", "row s")


@dataclass
class Row:
    """One line of the table: `run()` measures it and returns its cells; `status` replaces them when it
    did not run (budget, n/a) or failed (OOM, error)."""

    group: str  # "train" | "generate" | "tokenizer": the printing order
    name: str
    setting: str
    kind: str  # budget class: rows of one kind cost about the same
    run: Callable[[], dict[str, str]] | None
    status: str | None = None
    cells: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def parse_sizes(text: str) -> dict[int, int]:
    """'256=32,512=16' -> {256: 32, 512: 16}."""
    sizes = {}
    for item in text.split(","):
        resolution, _, batch = item.partition("=")
        sizes[int(resolution)] = int(batch)
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU code-path check: --device cpu --preset tiny, tiny sizes, 1 warm-up + 1 timed step "
                             "per row, torch.compile's eager backend (inductor's C++ builds take ~20 s a row)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda (cpu with --smoke)")
    parser.add_argument("--preset", help="transformer preset (default hart-0.7b; tiny with --smoke: tiny scale "
                                         "lists and the tiny tokenizer stand in for 256/512/1024 px)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget of the whole call (s): rows that would not fit print 'skipped (budget)'")
    parser.add_argument("--only", default="train,generate,tokenizer",
                        help="comma-separated row groups to run: train, generate, tokenizer")
    parser.add_argument("--train-batch",
                        help="training batch per resolution, RES=B,... (default 256=32,512=16,1024=4: eager peaks of "
                             "63-73 GiB measured on an 80 GB H100; 2 each with --smoke)")
    parser.add_argument("--steps", type=int, help="timed training steps per row (default 5; 1 with --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed training steps per row, each also counted for FLOPs; "
                                                   "the timed steps replay their draws (default 2; 1 with --smoke)")
    parser.add_argument("--gen-batch", help="generation batch sizes, comma-separated (default 1,8; 1,2 with --smoke)")
    parser.add_argument("--gen-warmup", type=int,
                        help="untimed generate calls per row (default 2; 1 with --smoke): compile happens in the first, "
                             "and on the CPU the second compiled call was slow too (4.8 s vs 0.2 s after, measured)")
    parser.add_argument("--gen-repeats", type=int, help="timed generate calls per row (default 2; 1 with --smoke)")
    parser.add_argument("--tok-batch",
                        help="tokenizer encode batch per resolution (default 256=64,512=32,1024=8; 2 each with --smoke)")
    parser.add_argument("--tok-iters", type=int, help="timed encode batches per row (default 5; 1 with --smoke)")
    parser.add_argument("--peak-tflops", type=float,
                        help="dense bf16 peak of this GPU (TFLOP/s) for MFU, where the built-in table does not know "
                             "it or is wrong for the variant (e.g. H100 PCIe: 756)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's; 1 with --smoke: on tiny tensors thread hand-offs "
                             "cost more than they give, 3x the smoke's time on a loaded 2-core machine, measured)")
    parser.add_argument("--compile-backend",
                        help="torch.compile backend of the compile rows (default inductor; eager with --smoke: graph "
                             "capture without code generation)")
    args = parser.parse_args(argv)
    # (GPU default, --smoke default) of the flags left unset
    defaults = {"device": ("cuda", "cpu"), "preset": ("hart-0.7b", "tiny"),
                "train_batch": ("256=32,512=16,1024=4", "256=2,512=2,1024=2"), "steps": (5, 1), "warmup": (2, 1),
                "gen_batch": ("1,8", "1,2"), "gen_warmup": (2, 1), "gen_repeats": (2, 1),
                "tok_batch": ("256=64,512=32,1024=8", "256=2,512=2,1024=2"), "tok_iters": (5, 1),
                "compile_backend": ("inductor", "eager"), "threads": (0, 1)}
    defaults = {name: pair[args.smoke] for name, pair in defaults.items()}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.train_batch, args.tok_batch = parse_sizes(args.train_batch), parse_sizes(args.tok_batch)
    args.gen_batch = [int(b) for b in args.gen_batch.split(",")]
    args.only = {g.strip() for g in args.only.split(",")}
    unknown = args.only - {"train", "generate", "tokenizer"}
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}")
    if min(args.steps, args.warmup, args.gen_repeats, args.tok_iters) < 1 or args.gen_warmup < 0:
        parser.error("--steps, --warmup, --gen-repeats and --tok-iters must be >= 1, --gen-warmup >= 0")
    return args


def scale_lists(args) -> dict[int, tuple[int, ...]]:
    return TINY_SCALES if args.preset == "tiny" else RELEASED_SCALE_LISTS


def dense_bf16_peak(device: torch.device, override_tflops: float | None) -> float | None:
    """FLOP/s: `--peak-tflops`, else `benchmarks.mfu`'s peak for the GPU's name."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return mfu_bench.peak_bf16(torch.cuda.get_device_name(device))


@contextlib.contextmanager
def compile_backend(backend: str):
    """`parallelize` and `apply_compile` call `module.compile()` with torch's default backend (inductor). On
    the CPU smoke run inductor's C++ builds cost ~20 s per row on two cores; another backend (eager: graph
    capture without code generation) is passed through `nn.Module.compile` for the duration."""
    if backend == "inductor":
        yield
        return
    original = torch.nn.Module.compile

    def compile_with_backend(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = compile_with_backend
    try:
        yield
    finally:
        torch.nn.Module.compile = original


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "n/a (CPU)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def format_flops(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.3g} GFLOP"


def train_row(args, resolution: int, batch: int, mode: str, device: torch.device, peak: float | None) -> dict[str, str]:
    attention = "flex" if mode == "flex+compile" else "sdpa"
    compiled = mode != "eager"
    with compile_backend(args.compile_backend):
        r = mfu_bench.mfu_run(args.preset, resolution, batch, False, compiled, device, args.steps, args.warmup,
                              attention=attention, patch_nums=scale_lists(args)[resolution])
    if r["attention"] != [attention]:  # a label must never time another kernel
        raise RuntimeError(f"the step ran with attention {r['attention']}, not {attention}")
    achieved = r["flops"] / r["step_s"]
    return {
        "time": f"{r['step_s'] * 1e3:.1f} ms/step",
        "throughput": f"{r['images'] / r['step_s']:.2f} img/s ({r['tokens'] / r['step_s']:,.0f} tok/s)",
        "FLOP/step (counted)": format_flops(r["flops"]),
        "MFU": f"{100 * achieved / peak:.1f}%" if peak else f"n/a ({achieved / 1e12:.3g} TFLOP/s, peak unknown)",
        "peak GiB": f"{r['peak_gib']:.1f}" if device.type == "cuda" else "n/a (CPU)",
        "warm-up s": f"{r['first_s']:.1f}",
    }


class RandomTextFeatures:
    """Stands in for HART's Qwen2 text encoder (the `hart.text_encoder.TextEncoder` interface): random
    features of its shape, float32 on the CPU like the real ones. The first `prompt_tokens` positions
    are valid, as for a short prompt; generation attends to all `max_length` text positions anyway."""

    def __init__(self, dim: int, max_length: int, prompt_tokens: int = 32):
        self.dim, self.max_length, self.prompt_tokens = dim, max_length, min(prompt_tokens, max_length)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(len(prompts))
        features = torch.randn(len(prompts), self.max_length, self.dim, generator=generator)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        mask[:, : self.prompt_tokens] = True
        return features, mask


def generation_row(args, resolution: int, batch: int, compiled: bool, device: torch.device) -> dict[str, str]:
    from hart.transformer.generate import generate
    from hart.training.parallelize import compile_for_generation
    from hart.tokenizer.model import HybridTokenizer
    from hart.transformer.model import HARTForT2I

    tokenizer_cfg = tokenizer_config(args, resolution)
    config = transformer_config(args.preset, tokenizer_cfg)
    torch.manual_seed(0)
    with device:  # built on the device (fast init); .to() also moves buffers made on the CPU on purpose
        model = HARTForT2I(config).to(device)
        model.init_weights()
        tokenizer = HybridTokenizer(tokenizer_cfg).to(device)
    model.eval()
    tokenizer.eval()
    if compiled:  # one compiled step per scale (the recompile limit raised to cover them)
        with compile_backend(args.compile_backend):
            compile_for_generation(model, len(config.patch_nums), device)
    encoder = RandomTextFeatures(config.context_dim, config.context_token)
    prompts = [f"prompt {i}" for i in range(batch)]
    dtype = torch.bfloat16 if device.type == "cuda" else None  # CPU: fp32, as the other benchmarks' CPU paths

    def call(seed: int) -> float:
        transformer_bench.sync(device)
        started = time.perf_counter()
        samples = generate(model, tokenizer, encoder, prompts, seed=seed, autocast_dtype=dtype)
        transformer_bench.sync(device)
        assert len(samples) == batch
        return time.perf_counter() - started

    warm = sum(call(seed) for seed in range(args.gen_warmup))
    reset_peak(device)
    times = [call(args.gen_warmup + i) for i in range(args.gen_repeats)]
    latency = sum(times) / len(times)
    return {"time": f"{latency:.3f} s/call", "throughput": f"{batch / latency:.2f} img/s", "FLOP/step (counted)": "-",
            "MFU": "-", "peak GiB": peak_gib(device), "warm-up s": f"{warm:.1f}"}


def tokenizer_config(args, resolution: int):
    if args.preset == "tiny":
        return replace(TOKENIZER_PRESETS["tiny"], patch_nums=scale_lists(args)[resolution])
    return tokenizer_bench.build_config("hart-1024", resolution)  # HART's net with RES's released scale list


def tokenizer_row(args, resolution: int, batch: int, device: torch.device) -> dict[str, str]:
    from hart.tokenizer.model import HybridTokenizer

    config = tokenizer_config(args, resolution)
    side = config.patch_nums[-1] * config.downsample_factor()
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(config).to(device).eval()
    images = (torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def encode():
        with torch.inference_mode(), autocast:
            tokenizer.encode(images)

    reset_peak(device)
    started = time.perf_counter()
    r = tokenizer_bench.timed("encode", encode, args.tok_iters, 1, device, batch)
    warm = time.perf_counter() - started - r["s_per_batch"] * args.tok_iters
    return {"time": f"{r['s_per_batch']:.3f} s/batch", "throughput": f"{r['images_per_s']:.2f} img/s",
            "FLOP/step (counted)": "-", "MFU": "-", "peak GiB": peak_gib(device), "warm-up s": f"{warm:.1f}"}


# The checks' model: the released 256px scale list at a width every device affords.
CHECK_MODEL = {"patch_nums": PATCH_NUMS_256, "context_token": 32, "depth": 2, "embed_dim": 64, "num_heads": 4}


class SavedOpCalls(TorchDispatchMode):
    """Counts the calls of `SAVED_OPS` (matmuls, fused attention kernels) made under it while `counting`."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += self.counting and func in SAVED_OPS
        return func(*args, **(kwargs or {}))


def check_gradients(device: torch.device, attention: str, precision: str = "fp32",
                    checkpointing: str | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Parameter gradients of one seeded forward + backward of the checks' transformer (CHECK_MODEL) with
    the `attention` kernel, under bf16 autocast or not, checkpointed by `checkpointing` policy or not
    (three rows: full text, and two right-padded ones; a random half of the last scale kept per row),
    and the number of matmul and attention calls (`SAVED_OPS`) the backward made."""
    from hart.training.parallelize import ParallelConfig, parallelize
    from hart.transformer.model import HARTForT2I

    config = replace(transformer_config("tiny"), **CHECK_MODEL)
    torch.manual_seed(0)
    model = HARTForT2I(config)
    model.init_weights()
    with torch.no_grad():  # non-trivial AdaLN gammas so attention reaches the logits
        for block in model.blocks:
            block.ada_lin[-1].bias.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    rows = 3
    context = torch.randn(rows, config.context_token, config.context_dim, generator=g)
    mask = torch.ones(rows, config.context_token, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 9:] = False
    inputs = torch.randn(rows, config.num_image_tokens() - 1, config.token_dim, generator=g)
    last = config.patch_nums[-1] ** 2
    keep = torch.stack([torch.randperm(last, generator=g)[: last // 2].sort().values for _ in range(rows)])
    parallelize(model, ParallelConfig(strategy="none", attention=attention, activation_checkpointing=bool(checkpointing),
                                      activation_checkpointing_policy=checkpointing or "block"), device)
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(context.to(device), mask.to(device), inputs.to(device), keep_last_Bk=keep.to(device))
    loss = logits.float().square().mean()
    with SavedOpCalls() as backward:
        loss.backward()
    grads = {name: p.grad.detach().float().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return grads, backward.calls


def op_checkpointing_check(device: torch.device) -> tuple[bool, str]:
    """Policy "op" (sdpa kernels, fp32) against no checkpointing: the same gradients, and a backward that
    recomputes none of the matmul and attention calls (their forward outputs were kept)."""
    (checkpointed, calls), (plain, plain_calls) = (check_gradients(device, "sdpa", checkpointing=policy)
                                                   for policy in ("op", None))
    passed, summary = gradients_match(checkpointed, plain, 1e-5)
    return passed and calls == plain_calls, (f"{summary}; matmul + attention calls in backward {calls} "
                                             f"(without checkpointing {plain_calls})")


def gradients_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float) -> tuple[bool, str]:
    """Whether every gradient agrees elementwise within `tolerance` (absolute and relative), and a summary."""
    if actual.keys() != expected.keys():
        return False, f"different parameters with gradients: {sorted(actual.keys() ^ expected.keys())}"
    worst, worst_name, passed = 0.0, "", True
    for name, want in expected.items():
        difference = (actual[name] - want).abs()
        passed &= bool((difference <= tolerance + tolerance * want.abs()).all())
        if difference.max().item() >= worst:
            worst, worst_name = difference.max().item(), name
    return passed, f"max abs difference {worst:.2e} ({worst_name}), tolerance {tolerance:g}"


def run_checks(device: torch.device) -> list[tuple[str, bool | None, str]]:
    """(check, passed, summary) for each check of the module docstring; passed is None where it does not
    apply, and a check that raises fails with the error as its summary (the others still run)."""
    flex_runs = device.type == "cuda"
    checks = {
        f"flex = sdpa gradients, {precision}{' autocast' if precision == 'bf16' else ''}":
            (lambda precision=precision, tolerance=tolerance: gradients_match(
                check_gradients(device, "flex", precision)[0], check_gradients(device, "sdpa", precision)[0], tolerance))
            if flex_runs else None
        for precision, tolerance in (("fp32", 1e-4), ("bf16", 3e-2))
    }
    checks["op checkpointing = none, nothing recomputed (sdpa, fp32)"] = lambda: op_checkpointing_check(device)
    results = []
    for name, check in checks.items():
        if check is None:
            results.append((name, None, f"n/a ({device.type.upper()}: flex has no backward)"))
            continue
        try:
            results.append((name, *check()))
        except Exception as exc:  # noqa: BLE001 - a broken check must not cost the other checks or the rows
            traceback.print_exc()
            results.append((name, False, f"error ({type(exc).__name__}: {exc})"))
    return results


def plan(args, device: torch.device, peak: float | None) -> list[Row]:
    """Every row, in the order they run (the table prints them by group)."""
    rows: list[Row] = []
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    if "tokenizer" in args.only:
        for res in RESOLUTIONS:
            batch = args.tok_batch[res]
            preset = "tiny" if args.preset == "tiny" else "hart-1024 net"
            rows.append(Row("tokenizer", f"tokenizer {res}px encode", f"{preset}, batch {batch}, {precision}",
                            "tokenizer", lambda res=res, batch=batch: tokenizer_row(args, res, batch, device)))
    if "train" in args.only:
        for mode in TRAIN_MODES:  # eager first: the baseline every other row is read against
            for res in RESOLUTIONS:
                batch = args.train_batch[res]
                name = f"train {res}px {mode}"
                setting = (f"{args.preset}, batch {batch}, {'flex' if mode == 'flex+compile' else 'sdpa'}"
                           f"{', compiled blocks' if mode != 'eager' else ''}, {precision}, AdamW + EMA")
                if mode == "flex+compile" and device.type != "cuda":
                    rows.append(Row("train", name, setting, f"train {mode}", None,
                                    status=f"n/a ({device.type.upper()}: flex has no backward)"))
                    continue
                rows.append(Row("train", name, setting, f"train {mode}",
                                lambda res=res, batch=batch, mode=mode: train_row(args, res, batch, mode, device, peak)))
    if "generate" in args.only:
        for compiled in (False, True):
            for res in GENERATION_RESOLUTIONS:
                for batch in args.gen_batch:
                    label = "compile" if compiled else "eager"
                    tok = "tiny" if args.preset == "tiny" else "hart-1024 net"
                    rows.append(Row("generate", f"generate {res}px b{batch} {label}",
                                    f"{args.preset} + {tok} tokenizer, CFG 4.5, 8-step head, {precision}"
                                    f"{', compiled blocks' if compiled else ''}", f"generate {label}",
                                    lambda res=res, batch=batch, compiled=compiled:
                                    generation_row(args, res, batch, compiled, device)))
    return rows


def free_memory(device: torch.device) -> None:
    """Between rows: compiled graphs keep their row's model and optimizer alive otherwise (train.py does
    the same); a caught OOM's frames are gone by the time this runs."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_rows(rows: list[Row], budget_s: float, started: float, device: torch.device,
             first_estimates: dict[str, float]) -> None:
    longest: dict[str, float] = {}
    for row in rows:
        if row.run is None:
            continue
        left = budget_s - (time.monotonic() - started)
        estimate = longest.get(row.kind, first_estimates.get(row.kind, 0.0))
        if left <= 0 or left < estimate:
            row.status = "skipped (budget)"
            print(f"{row.name}: skipped (budget: {left:.0f} s left, estimate {estimate:.0f} s)", flush=True)
            continue
        print(f"{row.name}: {row.setting} ...", flush=True)
        started = time.monotonic()
        try:
            row.cells = row.run()
        except torch.cuda.OutOfMemoryError:
            row.status = "OOM"
        except Exception as exc:  # noqa: BLE001 - one broken row must not cost the device time of the others
            traceback.print_exc()
            row.status = f"error ({type(exc).__name__})"
        row.seconds = time.monotonic() - started
        longest[row.kind] = max(longest.get(row.kind, 0.0), row.seconds)
        free_memory(device)
        print(f"{row.name}: {row.status or ', '.join(f'{k} {v}' for k, v in row.cells.items())} "
              f"[{row.seconds:.1f} s]", flush=True)


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for group in ("train", "generate", "tokenizer"):
        for row in (r for r in rows if r.group == group):
            if row.status:
                cells = [row.status] + ["-"] * (len(COLUMNS) - 4) + [f"{row.seconds:.1f}" if row.seconds else "-"]
            else:
                cells = [row.cells[c] for c in COLUMNS[2:-1]] + [f"{row.seconds:.1f}"]
            lines.append("| " + " | ".join([row.name, row.setting, *cells]) + " |")
    return "\n".join(lines)


def describe(device: torch.device, peak: float | None, args) -> str:
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.type != "cuda":
        return (f"{versions}; device: CPU ({torch.get_num_threads()} thread(s)), preset {args.preset}: a code-path check, "
                f"no figure here is a GPU figure")
    props = torch.cuda.get_device_properties(device)
    return (f"{versions}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; GPU: {props.name} "
            f"({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}), dense bf16 peak "
            f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (MFU n/a; pass --peak-tflops)'}; preset {args.preset}")


def main(argv: list[str] | None = None, started: float | None = None) -> tuple[list[Row], list[tuple]]:
    """Run the checks and the rows of `argv`'s settings and print the tables; returns the rows and the checks. The budget counts from
    `started` (time.monotonic(); default: now; the command line passes the process's start)."""
    started = time.monotonic() if started is None else started
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device on this machine (use --smoke to check the code paths on the CPU)")
    device = torch.device(args.device)
    peak = dense_bf16_peak(device, args.peak_tflops)
    print(describe(device, peak, args), flush=True)
    print(f"budget {args.budget_s:.0f} s; training: {args.warmup} warm-up + {args.steps} timed steps per row; generation: "
          f"{args.gen_warmup} warm-up + {args.gen_repeats} timed calls; tokenizer: 1 warm-up + {args.tok_iters} timed "
          f"batches; compile backend {args.compile_backend}", flush=True)
    checks = run_checks(device)
    for name, passed, summary in checks:
        print(f"check {name}: {'pass' if passed else 'n/a' if passed is None else 'FAIL'}: {summary}", flush=True)
    rows = plan(args, device, peak)
    # Without a GPU nothing is worth skipping ahead of time: the smoke rows take seconds.
    run_rows(rows, args.budget_s, started, device, FIRST_ROW_ESTIMATE_S if device.type == "cuda" else {})
    print(f"\n{describe(device, peak, args)}; total {time.monotonic() - started:.0f} s\n", flush=True)
    print(table(rows), flush=True)
    print("\n| check | result | detail |\n|---|---|---|")
    for name, passed, summary in checks:
        print(f"| {name} | {'pass' if passed else 'n/a' if passed is None else 'FAIL'} | {summary} |", flush=True)
    return rows, checks


if __name__ == "__main__":
    finished, checked = main(started=STARTED)
    failed = any(row.status and row.status.startswith("error") for row in finished) or \
        any(passed is False for _, passed, _ in checked)
    sys.exit(1 if failed else 0)
