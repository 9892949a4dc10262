"""Feature statistics of an image set, FID and KID between two sets, and the reference file.

An evaluation extracts features in many actors; each returns its features and the driver folds them
into a `FeatureStatistics`: the running sum and sum of outer products (float64: what FID needs, in
constant memory) and, for KID, the features themselves up to a cap. FID and KID are then computed
by torchmetrics (`FrechetInceptionDistance`, `KernelInceptionDistance`) from these states, with a
pass-through feature module: the formulas are the library's, not this file's.

Reference statistics of real images are computed once and saved as a safetensors file: the sums,
the count, the KID sample and, in the metadata, the protocol (feature network hash, image size,
resize rule, source). A later evaluation loads the file only when its protocol is the same: a
figure against statistics made another way is not comparable, so a mismatch is refused.

Legend: N images, D feature dimensions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

KID_SAMPLE_CAP = 10_000  # features kept for KID per set (float32: 80 MB at D = 2048)


def fold_order(ids: list[str]) -> list[str]:
    """The order sets are folded in: by a hash of each id, a fixed pseudo-random order. The FID sums do
    not depend on it; the KID sample (the first `kid_cap` features) is then a uniform draw, not the
    first categories of an id- or path-ordered set (MJHQ's folders are per category)."""
    import hashlib

    return sorted(ids, key=lambda i: (hashlib.sha256(i.encode()).hexdigest(), i))


class PassThrough(nn.Module):
    """torchmetrics' FID/KID take a feature module; the features are already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features_ND: torch.Tensor) -> torch.Tensor:
        return features_ND


class FeatureStatistics:
    """Sums for FID (float64) and a capped sample for KID, folded batch by batch."""

    def __init__(self, dim: int, kid_cap: int = KID_SAMPLE_CAP):
        self.dim, self.kid_cap = dim, kid_cap
        self.sum_D = torch.zeros(dim, dtype=torch.float64)
        self.outer_DD = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0
        self.sample: list[torch.Tensor] = []
        self.sampled = 0

    def update(self, features_ND: torch.Tensor) -> None:
        if features_ND.dim() != 2 or features_ND.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(features_ND.shape)}")
        if not torch.isfinite(features_ND).all():
            raise ValueError("non-finite features: the feature network or its input is broken")
        f64 = features_ND.double()
        self.sum_D += f64.sum(0)
        self.outer_DD += f64.T @ f64
        self.count += len(features_ND)
        keep = min(len(features_ND), self.kid_cap - self.sampled)
        if keep > 0:  # the first kid_cap features in arrival order (callers feed them in `fold_order`)
            self.sample.append(features_ND[:keep].float().clone())
            self.sampled += keep

    def kid_sample(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.dim)

    # --------------------------------------------------------------- the reference file
    def save(self, path: str | Path, protocol: dict, info: dict | None = None) -> None:
        """`protocol` must match at load; `info` (source, counts) is recorded only."""
        from safetensors.torch import save_file

        tensors = {"sum": self.sum_D, "outer": self.outer_DD, "count": torch.tensor(self.count),
                   "kid_sample": self.kid_sample().contiguous()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"protocol": json.dumps(protocol, sort_keys=True),
                                                "info": json.dumps(info or {}, sort_keys=True)})

    @staticmethod
    def read_protocol(path: str | Path) -> dict:
        """The protocol a reference file was made under (its metadata only)."""
        from safetensors import safe_open

        if not Path(path).is_file():
            raise ValueError(f"reference statistics not found: {path} (make them with `hart-evaluate reference`)")
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("protocol", "{}"))

    @staticmethod
    def check_protocol(path: str | Path, saved: dict, protocol: dict) -> None:
        """Refuse, field by field, a reference made under another protocol."""
        differs = {k: (saved.get(k), protocol.get(k)) for k in sorted(set(saved) | set(protocol))
                   if saved.get(k) != protocol.get(k)}
        if differs:
            lines = "; ".join(f"{k}: file {a!r}, this run {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"{path} was made under another protocol ({lines}): figures against it would not be "
                             f"comparable; make new reference statistics or run with its protocol")

    @classmethod
    def load(cls, path: str | Path, protocol: dict) -> "FeatureStatistics":
        """Reference statistics made under `protocol`; any other protocol is refused, field by field."""
        from safetensors import safe_open

        cls.check_protocol(path, cls.read_protocol(path), protocol)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        stats = cls(tensors["sum"].shape[0])
        stats.sum_D, stats.outer_DD, stats.count = tensors["sum"], tensors["outer"], int(tensors["count"])
        stats.sample, stats.sampled = [tensors["kid_sample"]], len(tensors["kid_sample"])
        return stats


def frechet_distance(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    """FID by torchmetrics' `FrechetInceptionDistance.compute` over the two sets' sums."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.count < 2 or fake.count < 2:
        raise ValueError(f"FID needs at least 2 images per set (real {real.count}, generated {fake.count})")
    metric = FrechetInceptionDistance(feature=PassThrough(real.dim))
    metric.real_features_sum, metric.real_features_cov_sum = real.sum_D.clone(), real.outer_DD.clone()
    metric.real_features_num_samples = torch.tensor(real.count)
    metric.fake_features_sum, metric.fake_features_cov_sum = fake.sum_D.clone(), fake.outer_DD.clone()
    metric.fake_features_num_samples = torch.tensor(fake.count)
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():  # the states were set, not updated: torchmetrics warns about that
        warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
        return float(metric.compute())


def kernel_distance(real: FeatureStatistics, fake: FeatureStatistics, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """KID (mean, std over `subsets` random subsets, the subset size used: `subset_size` or fewer when a
    set is smaller) by torchmetrics' `KernelInceptionDistance`; the subsets are drawn from a seeded RNG,
    so a rerun gives the same figure."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real_f, fake_f = real.kid_sample(), fake.kid_sample()
    size = min(subset_size, len(real_f), len(fake_f))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set (real {len(real_f)}, generated {len(fake_f)})")
    with warnings.catch_warnings():  # the buffer it warns about is the capped sample, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metric = KernelInceptionDistance(feature=PassThrough(real.dim), subsets=subsets, subset_size=size)
    metric.update(real_f, real=True)
    metric.update(fake_f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size
