"""FID and KID from folded statistics agree with direct computations, overall and per category (a
category's figures are those of its features alone); the reference file is reused under its protocol
and refused under another, and a file without categories loads as overall statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines.feature_statistics import FeatureStatistics, frechet_distance, kernel_distance


def features(n: int, dim: int, shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    return torch.randn(n, dim, generator=g) @ mix + shift


def folded(x: torch.Tensor, batch: int = 37, kid_cap: int = 10_000) -> FeatureStatistics:
    stats = FeatureStatistics(x.shape[1], kid_cap=kid_cap)
    for start in range(0, len(x), batch):
        stats.update(x[start : start + batch])
    return stats


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_matches_scipy_sqrtm_on_synthetic_features():
    real, fake = features(400, 16, 0.0, 0), features(300, 16, 0.3, 1)
    fid = frechet_distance(folded(real), folded(fake))
    expected = scipy_fid(real.double().numpy(), fake.double().numpy())
    assert fid == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(folded(real), folded(real)) == pytest.approx(0.0, abs=1e-6)
    assert fid > 1.0  # shifted sets are far apart: the comparison is not of two zeros


def test_kid_matches_the_unbiased_polynomial_mmd():
    real, fake = features(60, 8, 0.0, 2), features(60, 8, 0.5, 3)
    # one subset holding every sample: the estimate no longer depends on the random draw
    mean, _, size = kernel_distance(folded(real), folded(fake), subsets=1, subset_size=60)
    assert size == 60

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    k_rr, k_ff, k_rf = kernel(real.double(), real.double()), kernel(fake.double(), fake.double()), kernel(real.double(), fake.double())
    n = len(real)
    mmd = ((k_rr.sum() - k_rr.trace()) / (n * (n - 1)) + (k_ff.sum() - k_ff.trace()) / (n * (n - 1))
           - 2 * k_rf.mean())
    assert mean == pytest.approx(float(mmd), rel=1e-5)
    assert kernel_distance(folded(real), folded(fake), subsets=20, subset_size=30) == \
        kernel_distance(folded(real), folded(fake), subsets=20, subset_size=30)  # seeded subsets


def test_reference_file_is_reused_under_its_protocol_and_refused_under_another(tmp_path):
    protocol = {"feature_network": "inception-2015-12-05:abc", "image_size": 64, "resize": "tf1-bilinear-299"}
    real = features(50, 8, 0.0, 4)
    path = tmp_path / "ref.safetensors"
    folded(real).save(path, protocol)
    loaded = FeatureStatistics.load(path, dict(protocol))
    assert loaded.count == 50 and torch.equal(loaded.sum_D, folded(real).sum_D)
    fake = folded(features(40, 8, 0.2, 5))
    assert frechet_distance(loaded, fake) == frechet_distance(folded(real), fake)
    with pytest.raises(ValueError, match="another protocol.*image_size: file 64, this run 128"):
        FeatureStatistics.load(path, {**protocol, "image_size": 128})
    with pytest.raises(ValueError, match="not found"):
        FeatureStatistics.load(tmp_path / "absent.safetensors", protocol)


def test_bad_features_are_refused():
    stats = FeatureStatistics(4)
    with pytest.raises(ValueError, match=r"expected features \(N, 4\)"):
        stats.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(torch.full((2, 4), float("nan")))
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(stats, stats)


def test_kid_sample_is_drawn_across_an_ordered_set():
    """Sets arrive grouped (MJHQ's folders are per category); folded in `fold_order`, the capped KID
    sample covers every group, not the first ones."""
    from pipelines.feature_statistics import fold_order

    ids = [f"{category}/{i:04d}" for category in ("animals", "art", "food", "people") for i in range(250)]
    stats = FeatureStatistics(1, kid_cap=100)
    for i in fold_order(ids):
        stats.update(torch.tensor([[float(ids.index(i) // 250)]]))  # the feature is the category index
    counts = torch.bincount(stats.kid_sample()[:, 0].long(), minlength=4)
    assert stats.count == 1000 and counts.sum() == 100 and (counts >= 10).all(), counts
    assert fold_order(ids) == fold_order(list(reversed(ids)))  # the order depends on the ids alone


def categorised(parts: dict[str, torch.Tensor], seed: int, kid_cap: int = 10_000, batch: int = 7):
    """The categories' features folded together in a shuffled order, in batches: (statistics, the
    arrival order as (category, row) pairs)."""
    order = [(name, i) for name, x in parts.items() for i in range(len(x))]
    order = [order[j] for j in torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))]
    stats = FeatureStatistics(next(iter(parts.values())).shape[1], kid_cap=kid_cap)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        stats.update(torch.stack([parts[name][i] for name, i in chunk]), [name for name, _ in chunk])
    return stats, order


def test_per_category_figures_are_those_of_the_category_alone_on_both_sides(tmp_path):
    """A category's FID and KID, reference read back from its file, equal the figures of that category's
    features folded alone on both sides (and FID equals scipy's on them)."""
    real = {"animals": features(70, 8, 0.0, 10), "food": features(50, 8, 0.4, 11), "people": features(3, 8, 0.1, 16)}
    fake = {"animals": features(40, 8, 0.2, 12), "food": features(60, 8, 0.1, 13), "logo": features(30, 8, 0.0, 14)}
    ref, ref_order = categorised(real, seed=0)
    path = tmp_path / "ref.safetensors"
    protocol = {"feature_network": "net", "image_size": 64, "feature_resize": "tf1-bilinear-299"}
    ref.save(path, protocol)
    loaded = FeatureStatistics.load(path, protocol)
    gen, gen_order = categorised(fake, seed=1)
    assert sorted(loaded.by_category) == ["animals", "food", "people"] and sorted(gen.by_category) == sorted(fake)
    assert {n: loaded.category(n).count for n in loaded.by_category} == {"animals": 70, "food": 50, "people": 3}
    for name in ("animals", "food"):
        real_c, fake_c = loaded.category(name), gen.category(name)
        # each category's features alone, in the order they arrived in
        direct_real = folded(torch.stack([real[name][i] for n, i in ref_order if n == name]))
        direct_fake = folded(torch.stack([fake[name][i] for n, i in gen_order if n == name]))
        fid = frechet_distance(real_c, fake_c)
        assert fid == pytest.approx(frechet_distance(direct_real, direct_fake), rel=1e-9)
        assert fid == pytest.approx(scipy_fid(real[name].double().numpy(), fake[name].double().numpy()), rel=1e-6)
        assert real_c.count == len(real[name]) and fake_c.count == len(fake[name])
        assert torch.equal(real_c.kid_sample(), direct_real.kid_sample())
        assert torch.equal(fake_c.kid_sample(), direct_fake.kid_sample())
        # the same KID sample rows in the same order as the direct folds: the seeded KID is the same figure
        assert kernel_distance(real_c, fake_c, subsets=10, subset_size=30) == \
            kernel_distance(direct_real, direct_fake, subsets=10, subset_size=30)
    assert frechet_distance(loaded, gen) == frechet_distance(ref, gen)  # the overall figure, read back
    with pytest.raises(ValueError, match="no statistics of category 'logo'"):
        loaded.category("logo")


def test_categories_leave_the_overall_statistics_as_they_were():
    parts = {"a": features(30, 6, 0.0, 20), "b": features(25, 6, 1.0, 21)}
    with_categories, order = categorised(parts, seed=2, kid_cap=20)
    rows = torch.stack([parts[name][i] for name, i in order])
    without = folded(rows, batch=7, kid_cap=20)
    assert torch.equal(with_categories.sum_D, without.sum_D) and torch.equal(with_categories.outer_DD, without.outer_DD)
    assert torch.equal(with_categories.kid_sample(), without.kid_sample()) and with_categories.count == without.count
    # a capped KID sample: each category's sample is its rows among the set's first kid_cap
    sampled = [name for name, _ in order[:20]]
    assert {n: with_categories.category(n).sampled for n in parts} == {n: sampled.count(n) for n in parts}
    assert with_categories.category("a").count == 30
    with pytest.raises(ValueError, match="2 categories for 3 feature rows"):
        without.update(rows[:3], ["a", "b"])


def test_a_reference_file_without_categories_loads_as_overall_only(tmp_path):
    """A file with the overall tensors and metadata only (the layout of files made from a flat folder or
    shards without categories) loads, with no per-category statistics."""
    from safetensors.torch import save_file

    x = features(40, 8, 0.0, 30)
    stats = folded(x)
    protocol = {"feature_network": "net", "image_size": 64, "feature_resize": "tf1-bilinear-299"}
    path = tmp_path / "old.safetensors"
    save_file({"sum": stats.sum_D, "outer": stats.outer_DD, "count": torch.tensor(stats.count),
               "kid_sample": stats.kid_sample().contiguous()}, str(path),
              metadata={"protocol": json.dumps(protocol, sort_keys=True), "info": "{}"})
    loaded = FeatureStatistics.load(path, protocol)
    assert loaded.by_category == {} and loaded.count == 40 and torch.equal(loaded.outer_DD, stats.outer_DD)
    fake = folded(features(30, 8, 0.3, 31))
    assert frechet_distance(loaded, fake) == frechet_distance(stats, fake)
    folded(x).save(tmp_path / "flat.safetensors", protocol)  # no categories folded: the same tensors
    from safetensors import safe_open

    with safe_open(str(tmp_path / "flat.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["count", "kid_sample", "outer", "sum"] and "categories" not in f.metadata()
