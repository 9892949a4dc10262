"""hart-generate's work: trained (or released) checkpoints + prompts -> PNG files, `run_generation(config)`.

Design: single-process and Ray-free (generation of a batch fits one device). The sampling settings
are a named protocol of `pipelines.eval_protocol` (`protocol`, default `hart-mjhq-1024`: HART's
released sampler with EMA weights; `shapes` / `demo` for the shapes corpus's models), changed field
by field with `overrides` and printed before generation. Prompts become the protocol's seeded groups
and each group is one `generate` call through the same code as `hart-evaluate`
(`pipelines.eval_stages.generate_group`), so the same export, prompts and protocol give the same
images in both jobs. The text encoder is `minilm` (the embedded offline default), a local folder of
a causal LM (HART uses Qwen2), or for STAR an SD-2.1 folder (its CLIP text model); nothing is
downloaded, and every model path is a local file or folder (an `s3://` one is refused with the
copy command). Files are named `<image id>-<slug>.png`, so a prompt list maps to files one to one.
The loaded model and its "prompts -> PNG bytes" step are `Generator`, which the MLflow pyfunc model
(`trainer.served_model`) holds too: its predictions are hart-generate's images, byte for byte.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.eval_protocol import PROTOCOLS, EvalPrompt, EvalProtocol, groups, protocol_with, read_prompts
from pipelines.eval_stages import generate_group, load_generator
from trainer.export import read_export


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    output: str  # folder for the PNG files
    export: str = ""  # an export folder (hart-train's <storage>/<run>/export): tokenizer/ + llm/ or star/
    llm: str = ""  # or a HART transformer folder (official llm/ layout), with `tokenizer`
    star: str = ""  # or a STAR transformer .pth (STAR's released layout), with `tokenizer`
    tokenizer: str = ""  # tokenizer folder or VAR .pth (default: the export's tokenizer/)
    text_encoder: str = "minilm"  # 'minilm', a local causal-LM folder (HART: Qwen2), or an SD-2.1 / CLIP folder (STAR)
    prompts: tuple[str, ...] = ()  # prompts given one by one (ids 000000, 000001... in this order)
    prompt_source: str = ""  # a .txt, a .jsonl, MJHQ's meta_data.json or shapes:heldout, read as hart-evaluate reads it
    protocol: str = "hart-mjhq-1024"  # named sampling settings (pipelines/eval_protocol.py)
    overrides: tuple[str, ...] = ()  # FIELD=VALUE changes of the protocol
    device: str = ""  # torch device (default: cuda if available, else cpu)
    compile: bool = False  # torch.compile each transformer block (one compiled step per scale)

    def __post_init__(self) -> None:
        models = [name for name in ("export", "llm", "star") if getattr(self, name)]
        if len(models) != 1:
            raise ValueError(f"name exactly one model: export, llm or star (got {models or 'none'})")
        if not self.export and not self.tokenizer:
            raise ValueError("llm and star need tokenizer")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}: expected one of {sorted(PROTOCOLS)}")


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def read_prompt_list(config: GenerationConfig) -> list[EvalPrompt]:
    """The given prompts (ids 000000, 000001... in the order given), then the prompt source's, as EvalPrompts."""
    given = [EvalPrompt(f"{n:06d}", text) for n, text in enumerate(config.prompts)]
    listed = read_prompts(config.prompt_source) if config.prompt_source else []
    if given and any(p.id in {g.id for g in given} for p in listed):
        raise ValueError("--prompt and --prompts give the same ids (000000...): use one of them")
    if not given and not listed:
        raise ValueError("give at least one --prompt or a --prompts source")
    return given + listed


def model_files(config: GenerationConfig, ema: bool) -> dict[str, str]:
    """The generator's files (`llm`, `star`, `tokenizer`), each a local path that exists."""
    files = read_export(config.export, ema) if config.export else {"llm": config.llm, "star": config.star}
    if config.tokenizer:
        files["tokenizer"] = config.tokenizer
    for flag, path in (("--llm", files.get("llm")), ("--star", files.get("star")), ("--tokenizer", files["tokenizer"])):
        if path and "://" in path:
            raise ValueError(f"{flag} {path}: generation reads local files; copy it first (e.g. aws s3 cp --recursive "
                             f"{path} ./{Path(path).name})")
        if path and not os.path.exists(path):
            raise ValueError(f"{flag} {path}: not found")
    return files


@dataclass(frozen=True)
class Generator:
    """A loaded generator (`load_generator`'s model, tokenizer and text encoder on `device`) with the
    protocol it was loaded under: prompts -> PNG image rows, the one path from prompts to image bytes
    that hart-generate and the served MLflow model (`trainer.served_model`) both take."""
    model: torch.nn.Module
    tokenizer: torch.nn.Module
    encoder: object
    protocol: EvalProtocol
    device: torch.device

    @classmethod
    def load(cls, config: GenerationConfig) -> Generator:
        """The generator of `config` (its model files, text encoder, protocol and overrides, device);
        prints the sampling settings. ValueError on a bad protocol, override or model path."""
        protocol = protocol_with(config.protocol, config.overrides)
        files = model_files(config, protocol.ema)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"[generate] protocol {config.protocol}{' with ' + ', '.join(config.overrides) if config.overrides else ''}: "
              f"{protocol.describe()}", flush=True)
        model, tokenizer, encoder = load_generator(files.get("llm", ""), files["tokenizer"], config.text_encoder,
                                                   protocol, device, star=files.get("star", ""), compile=config.compile)
        return cls(model, tokenizer, encoder, protocol, device)

    @torch.no_grad()  # on a generator function: around each step, so the caller's code keeps its grad mode
    def generate(self, prompts: list[EvalPrompt], protocol: EvalProtocol | None = None) -> Iterator[dict]:
        """Image rows {id, prompt, category, png} of `prompts` in order: the protocol's seeded groups
        (`groups`: group g of batch_size prompts samples with seed + g), each one `generate_group` call.
        `protocol` (default: the loaded one) may change the sampling settings, not the weights it chose."""
        protocol = protocol or self.protocol
        assert protocol.ema == self.protocol.ema, "the weights (ema) are chosen at load"
        for group in groups(prompts, protocol):
            yield from generate_group(self.model, self.tokenizer, self.encoder, group, protocol, self.device)


def run_generation(config: GenerationConfig) -> list[Path]:
    """Generate every prompt's images into `config.output`; returns the files written. ValueError on bad input."""
    prompts = read_prompt_list(config)
    generator = Generator.load(config)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for row in generator.generate(prompts):
        path = output / f"{row['id']}-{slug(row['prompt'])}.png"
        path.write_bytes(row["png"])
        written.append(path)
    return written


__all__ = ["GenerationConfig", "Generator", "run_generation", "read_prompt_list", "model_files", "slug"]
