"""Feature statistics of an image set, FID and KID between two sets, and the reference file.

An evaluation extracts features in many actors; each returns its features and the driver folds them
into a `FeatureStatistics`: the running sum and sum of outer products (float64: what FID needs, in
constant memory) and, for KID, the features themselves up to a cap. FID and KID are then computed
by torchmetrics (`FrechetInceptionDistance`, `KernelInceptionDistance`) from these states, with a
pass-through feature module: the formulas are the library's, not this file's.

Per category: features folded with their categories also add to that category's sums, and each row
of the KID sample keeps its category. `category(name)` is then one category's set: its own sums,
and as KID sample the rows of the set's KID sample in that category (the sample is a uniform draw
across categories, see `fold_order`, so each category holds about its share of it; a category's
figures are those of its images alone, computed by the same two functions).

Reference statistics of real images are computed once and saved as a safetensors file: the sums,
the count, the KID sample and, in the metadata, the protocol (feature network hash, image size,
resize rule, source). A set with categories adds, per category, the count, the sum and the upper
triangle of the outer-product sum (float64, D(D+1)/2 values: 16.8 MB at D = 2048; the matrix is
symmetric), the category of each KID sample row, and the category names in the metadata; the
overall tensors are the same as without categories, and a file without them loads as a set without
categories. A later evaluation loads the file only when its protocol is the same: a figure against
statistics made another way is not comparable, so a mismatch is refused.

Legend: N images, D feature dimensions, C categories, K KID sample rows, T = D(D+1)/2.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
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
    """Sums for FID (float64) and a capped sample for KID, folded batch by batch; with categories, the
    same per category (`category`)."""

    def __init__(self, dim: int, kid_cap: int = KID_SAMPLE_CAP):
        self.dim, self.kid_cap = dim, kid_cap
        self.sum_D = torch.zeros(dim, dtype=torch.float64)
        self.outer_DD = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0
        self.sample: list[torch.Tensor] = []
        self.sampled = 0
        self.by_category: dict[str, FeatureStatistics] = {}  # each category's sums (no sample of its own)
        self.sample_categories: list[str] = []  # the category of each KID sample row ("": none)

    def _add_sums(self, features_ND: torch.Tensor) -> None:
        f64 = features_ND.double()
        self.sum_D += f64.sum(0)
        self.outer_DD += f64.T @ f64
        self.count += len(features_ND)

    def update(self, features_ND: torch.Tensor, categories: Sequence[str] | None = None) -> None:
        """Fold a batch; `categories` (one name per row, "" for none) also folds each row into its
        category's sums."""
        if features_ND.dim() != 2 or features_ND.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(features_ND.shape)}")
        if not torch.isfinite(features_ND).all():
            raise ValueError("non-finite features: the feature network or its input is broken")
        if categories is not None and len(categories) != len(features_ND):
            raise ValueError(f"{len(categories)} categories for {len(features_ND)} feature rows")
        names = [str(c) for c in categories] if categories is not None else []
        self._add_sums(features_ND)
        keep = min(len(features_ND), self.kid_cap - self.sampled)
        if keep > 0:  # the first kid_cap features in arrival order (callers feed them in `fold_order`)
            self.sample.append(features_ND[:keep].float().clone())
            self.sampled += keep
            self.sample_categories += names[:keep] if categories is not None else [""] * keep
        for name in sorted(set(names) - {""}):
            rows = [i for i, c in enumerate(names) if c == name]
            self.by_category.setdefault(name, FeatureStatistics(self.dim, kid_cap=0))._add_sums(features_ND[rows])

    def kid_sample(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.dim)

    def category(self, name: str) -> "FeatureStatistics":
        """One category's set: its sums, and as KID sample the rows of this set's KID sample in it."""
        if name not in self.by_category:
            raise ValueError(f"no statistics of category {name!r} (categories: {sorted(self.by_category)})")
        part = FeatureStatistics(self.dim, kid_cap=self.kid_cap)
        own = self.by_category[name]
        part.sum_D, part.outer_DD, part.count = own.sum_D, own.outer_DD, own.count
        rows = [i for i, c in enumerate(self.sample_categories) if c == name]
        part.sample, part.sampled = [self.kid_sample()[rows]], len(rows)
        part.sample_categories = [name] * len(rows)
        return part

    # --------------------------------------------------------------- the reference file
    def save(self, path: str | Path, protocol: dict, info: dict | None = None) -> None:
        """`protocol` must match at load; `info` (source, counts) is recorded only."""
        from safetensors.torch import save_file

        tensors = {"sum": self.sum_D, "outer": self.outer_DD, "count": torch.tensor(self.count),
                   "kid_sample": self.kid_sample().contiguous()}
        metadata = {"protocol": json.dumps(protocol, sort_keys=True), "info": json.dumps(info or {}, sort_keys=True)}
        if self.by_category:  # names in the metadata; tensors indexed by their position (-1: none)
            names = sorted(self.by_category)
            parts = [self.by_category[n] for n in names]
            rows_T, cols_T = torch.triu_indices(self.dim, self.dim)
            index = {n: i for i, n in enumerate(names)}
            tensors["category_count"] = torch.tensor([p.count for p in parts], dtype=torch.int64)  # (C,)
            tensors["category_sum"] = torch.stack([p.sum_D for p in parts])  # (C, D)
            tensors["category_outer_triu"] = torch.stack([p.outer_DD[rows_T, cols_T] for p in parts])  # (C, T)
            tensors["kid_sample_category"] = torch.tensor([index.get(c, -1) for c in self.sample_categories],
                                                          dtype=torch.int64)  # (K,)
            metadata["categories"] = json.dumps(names)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

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
        """Reference statistics made under `protocol`; any other protocol is refused, field by field.
        A file without categories gives a set without categories (`by_category` empty)."""
        from safetensors import safe_open

        cls.check_protocol(path, cls.read_protocol(path), protocol)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            names = json.loads((f.metadata() or {}).get("categories", "[]"))
        stats = cls(tensors["sum"].shape[0])
        stats.sum_D, stats.outer_DD, stats.count = tensors["sum"], tensors["outer"], int(tensors["count"])
        stats.sample, stats.sampled = [tensors["kid_sample"]], len(tensors["kid_sample"])
        stats.sample_categories = [""] * stats.sampled
        if names:
            count_C, sum_CD = tensors["category_count"], tensors["category_sum"]
            outer_CT, category_K = tensors["category_outer_triu"], tensors["kid_sample_category"]
            rows_T, cols_T = torch.triu_indices(stats.dim, stats.dim)
            for i, name in enumerate(names):
                part = cls(stats.dim, kid_cap=0)
                part.outer_DD[rows_T, cols_T] = outer_CT[i]
                part.outer_DD += part.outer_DD.triu(1).T  # the lower triangle, mirrored
                part.sum_D, part.count = sum_CD[i], int(count_C[i])
                stats.by_category[name] = part
            stats.sample_categories = [names[i] if i >= 0 else "" for i in category_K.tolist()]
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
