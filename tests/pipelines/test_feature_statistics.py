"""FID and KID from folded statistics agree with direct computations; the reference file is reused
under its protocol and refused under another."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines.feature_statistics import FeatureStatistics, frechet_distance, kernel_distance


def features(n: int, dim: int, shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    return torch.randn(n, dim, generator=g) @ mix + shift


def folded(x: torch.Tensor, batch: int = 37) -> FeatureStatistics:
    stats = FeatureStatistics(x.shape[1])
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
