"""Final export of a training checkpoint to the official HART folder layout.

Design: runs on the driver after `TorchTrainer.fit()`, from the last checkpoint only (so it
works the same for a finished run and for a re-export of an old one):

    <out>/llm/config.json, model.safetensors, ema_model.bin   (transformer stages, family hart)
    <out>/star/model.pth, ema_model.pth                       (ar stage, family star: STAR's trainer dict)
    <out>/tokenizer/config.json, model.safetensors            (every stage)

The transformer's `llm/` folder comes from `HARTForT2I.save_pretrained` (official keys,
derived mask buffer written, `ema_model.bin` from the EMA shadow). The `tokenizer/` folder is
the frozen tokenizer the run used, or, for the tokenizer stage, the trained one (+ its
discriminator, as `disc.*` keys). Both load back with our `from_pretrained`; the official code
loads them when their configs use the values it fixes in code, and otherwise each folder holds a
note saying which fields differ (hart.reference_compat). `upload_folder` copies the result next to
the checkpoints (local or S3).
"""

from __future__ import annotations

from pathlib import Path

from hart.star.checkpoint import save_star
from hart.star.model import STARForT2I
from hart.tokenizer.discriminator import NLayerDiscriminator
from hart.tokenizer.model import HybridTokenizer
from hart.training.checkpoint import load_training_state
from hart.transformer.model import HARTForT2I
from pipelines import storage
from trainer.plan import RunPlan
from trainer.stages import load_frozen_tokenizer


def export_checkpoint(checkpoint_dir: str | Path, plan: RunPlan, out_dir: str | Path) -> Path:
    """Write llm/ (+ ema_model.bin) and tokenizer/ from a training checkpoint directory."""
    out_dir = Path(out_dir)
    state = load_training_state(checkpoint_dir)
    config, tokenizer_cfg, transformer_cfg = plan.config, plan.tokenizer, plan.transformer
    if config.stage == "tokenizer":
        tokenizer = HybridTokenizer(tokenizer_cfg)
        tokenizer.load_state_dict(state.model, strict=True)
        discriminator = None
        if "discriminator" in state.extra:
            discriminator = NLayerDiscriminator(ndf=config.objective.disc_channels)
            discriminator.load_state_dict(state.extra["discriminator"], strict=True)
        tokenizer.save_pretrained(out_dir / "tokenizer", discriminator=discriminator)
        return out_dir

    if config.model.family == "star":
        return _export_star(state, plan, out_dir)
    model = HARTForT2I(transformer_cfg)
    model.load_state_dict(state.model, strict=True)
    tokenizer = load_frozen_tokenizer(plan)  # with the run's scale list, checked against the transformer
    tokenizer.save_pretrained(out_dir / "tokenizer")
    model.save_pretrained(out_dir / "llm", ema_state=state.ema, tokenizer=tokenizer.config)
    return out_dir


def _export_star(state, plan: RunPlan, out_dir: Path) -> Path:
    """STAR's layout: the raw and the EMA weights each as a trainer-dict `.pth` (`hart.star.checkpoint`),
    beside the frozen tokenizer's folder."""
    model = STARForT2I(plan.transformer)
    load_frozen_tokenizer(plan).save_pretrained(out_dir / "tokenizer")
    for name, weights in (("model.pth", state.model), ("ema_model.pth", state.ema)):
        if weights is None:
            continue
        model.load_state_dict(weights, strict=True)
        save_star(model, out_dir / "star" / name, iteration=int(state.meta.get("step", 0)))
    return out_dir


def read_export(export: str | Path, ema: bool = True) -> dict[str, str]:
    """The model files of an export folder, as `GenerateImages` / `load_generator` take them: tokenizer/
    plus HART's llm/, or STAR's star/*.pth (ema_model.pth with `ema`, else model.pth). ValueError naming
    what is missing; an s3:// export is refused with the copy command (generation reads local files)."""
    if "://" in str(export):
        raise ValueError(f"export {export}: generation reads a local folder; copy it first, e.g. "
                         f"aws s3 cp --recursive {export} ./export")
    export = Path(export)
    star = export / "star" / ("ema_model.pth" if ema else "model.pth")
    if (export / "tokenizer").is_dir() and star.is_file():
        return {"llm": "", "star": str(star), "tokenizer": str(export / "tokenizer")}
    if not (export / "llm").is_dir() or not (export / "tokenizer").is_dir():
        raise ValueError(f"{export} is not an export folder (expected tokenizer/ and llm/, or star/{star.name}, inside)")
    return {"llm": str(export / "llm"), "tokenizer": str(export / "tokenizer")}


def upload_folder(local_dir: str | Path, uri: str, endpoint_url: str = "") -> None:
    """Copy a local folder to a local path or an s3:// prefix (one object per file)."""
    storage.copy_tree(str(Path(local_dir).resolve()), uri, endpoint_url)


__all__ = ["export_checkpoint", "read_export", "upload_folder"]
