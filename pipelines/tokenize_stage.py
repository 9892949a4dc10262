"""Tokenizer stage: the frozen HybridTokenizer as a Ray Data actor (`map_batches` callable class).

Design: one model per actor, built once in `__init__` (the actor pool is sized by config:
`compute.tokenizer_actors` actors with `compute.tokenizer_gpus` GPUs each on a cluster, one CPU
actor on a laptop). On CUDA the encoder runs under bf16 autocast (the nearest-code search inside
`HybridTokenizer.encode` stays fp32, so token ids do not flip); on CPU everything is fp32. Each
actor re-computes the weight hash and refuses to run if it differs from the one the driver put in
the manifest, so a checkpoint that changes under a running job can never mix two tokenizers in one
cache. Rows that are not accepted samples (rejections, shard headers) pass through with zero
tokens and never reach the model.

`load_tokenizer` and `weights_hash` are shared with the driver (manifest), the trainer (its frozen
tokenizer and online mode: one way to load a tokenizer) and the single-process benchmark loop.

Shape legend: B rows, R image side, L tokens of all scales, z latent channels, h/w latent side.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from hart.config import tokenizer_config
from hart.pixels import to_model
from hart.tokenizer.model import HybridTokenizer
from pipelines import storage
from pipelines.config import TokenizerSource


def load_tokenizer(source: TokenizerSource, endpoint_url: str = "", where: str = "tokenizer.config") -> HybridTokenizer:
    """Frozen tokenizer: the checkpoint's weights with the config's scale list, or (tests/demo) random
    weights of the config under a seed. ValueError (naming `where`, the config's field) when the config
    does not describe the checkpoint: a cache and a transformer depend on its vocabulary, latent width
    and downsampling, and a config left at its default would otherwise give a silently wrong resolution."""
    config = tokenizer_config(source.config)
    if not source.checkpoint:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            return HybridTokenizer(config).eval().requires_grad_(False)
    model = HybridTokenizer.from_pretrained(storage.local_copy(source.checkpoint, endpoint_url), patch_nums=config.patch_nums)
    said_found = {"vocab_size": (config.vocab_size, model.config.vocab_size),
                  "z_channels": (config.z_channels, model.config.z_channels),
                  "downsampling": (config.downsample_factor(), model.config.downsample_factor())}
    differ = [f"{name} {said} (checkpoint {found})" for name, (said, found) in said_found.items() if said != found]
    if differ:
        raise ValueError(f"{where} {source.config!r} does not describe the tokenizer checkpoint {source.checkpoint}: "
                         f"{', '.join(differ)}; name the checkpoint's config (e.g. its preset, such as hart-1024)")
    return model.eval().requires_grad_(False)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every state-dict entry (name, dtype, shape, raw bytes), in name order.

    The bytes are fed as a zero-copy view (no `tobytes()` copy of each tensor); the digest is the
    same as before, so existing manifests stay valid. Measured: ~15 ms for the tiny preset, i.e.
    not a start-up cost worth caching or overlapping."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def encode_images(model: HybridTokenizer, image_BRR3: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(B, R, R, 3) uint8 -> (tokens (B, L) int16, residual (B, z, h, w) float16) as numpy."""
    x_B3RR = to_model(image_BRR3, device)
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tokens, residual_BzHW = model.encode(x_B3RR)
    tokens_BL = torch.cat(tokens, dim=1).to(torch.int16)
    return tokens_BL.cpu().numpy(), residual_BzHW.to(torch.float16).cpu().numpy()


class TokenizerStage:
    """`map_batches(TokenizerStage, compute=ActorPoolStrategy(...), batch_size=...)` UDF."""

    def __init__(self, source: TokenizerSource, endpoint_url: str, expected_hash: str, torch_threads: int = 0,
                 use_gpu: bool = False):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        if use_gpu and not torch.cuda.is_available():
            raise ValueError("compute.tokenizer_gpus > 0 but this tokenizer actor sees no CUDA device")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = load_tokenizer(source, endpoint_url)
        actual = weights_hash(model)
        if actual != expected_hash:
            raise ValueError(f"tokenizer weights changed during the job: hash {actual[:12]} != manifest {expected_hash[:12]}")
        self.model = model.to(self.device)
        grid = model.config.grid
        self.num_tokens = grid.num_tokens
        self.residual_shape = grid.residual_shape(model.config.z_channels)
        self.store_residual = source.residual

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        num_rows = len(batch["row_kind"])
        tokens_BL = np.zeros((num_rows, self.num_tokens), dtype=np.int16)
        residual_BzHW = np.zeros((num_rows, *self.residual_shape), dtype=np.float16)
        accepted = np.flatnonzero((batch["row_kind"] == "sample") & (batch["status"] == "ok"))
        if len(accepted):
            tokens_BL[accepted], residual_BzHW[accepted] = encode_images(self.model, batch["image"][accepted], self.device)
        out = {name: column for name, column in batch.items() if name != "image"}  # drop pixels early
        out["tokens"] = tokens_BL
        if self.store_residual:  # token-only caches (tokenizer.residual false) never carry it downstream
            out["residual"] = residual_BzHW
        return out
