"""Tests of ssl_min.py, in the file's order, then the command line, resume, processes, the sweeps, the benchmark and
the notebooks. `pytest -q -rs` runs them on the CPU; `pytest -m gpu -rs` runs the ones that check a CUDA path, on the
GPU where one is present (and on the CPU too). Tests on real images read a CIFAR-10 image folder named by
SSL_MIN_DATA_DIR (train/<class>/, test/<class>/), else torchvision's download; without either they are skipped."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image

import ssl_min

REPO = Path(__file__).resolve().parent


def load(path: Path):
    """A module of this repository that is not on the Python path, by its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweeps = load(REPO / "notebooks" / "sweeps.py")  # the notebooks' runs
throughput = load(REPO / "benchmarks" / "throughput.py")  # its autograd probe is the tests' reference too
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", "Unknown pytest.mark.gpu", pytest.PytestUnknownMarkWarning)  # no config file
gpu = pytest.mark.gpu
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here"))
DEVICES = ["cpu", CUDA]


@pytest.fixture(scope="session", autouse=True)
def clean_temp_files(tmp_path_factory):
    """Runs write checkpoints of ~50 MB: remove this session's temporary folder when the tests end."""
    yield
    shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


def small_cifar10(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """A CIFAR-10 image folder with `train` and `test` random images per class, from SSL_MIN_DATA_DIR or the
    torchvision download."""
    rng = np.random.default_rng(seed)
    source = Path(os.environ.get("SSL_MIN_DATA_DIR", "/nonexistent"))
    if (source / "train").is_dir():
        for split, n in (("train", train), ("test", test)):
            for cls in sorted(p.name for p in (source / split).iterdir()):
                files = sorted((source / split / cls).iterdir())
                (root / split / cls).mkdir(parents=True)
                for i in sorted(rng.choice(len(files), n, replace=False)):
                    (root / split / cls / files[i].name).symlink_to(files[i])
        return root
    try:
        *splits, classes = ssl_min.download(Path.home() / ".cache" / "ssl_min")
    except ssl_min.UserError as e:
        pytest.skip(f"set SSL_MIN_DATA_DIR to a CIFAR-10 image folder ({e})")
    for split, (images, labels), n in (("train", splits[:2], train), ("test", splits[2:], test)):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in sorted(rng.choice(np.flatnonzero(labels.numpy() == c), n, replace=False)):
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory):
    """50 training and 30 test images per class of the real CIFAR-10."""
    return small_cifar10(tmp_path_factory.mktemp("cifar10_small"), train=50, test=30)


def run(*args, env=None, **kw):
    return subprocess.run([sys.executable, str(REPO / "ssl_min.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=900, **kw)


def assert_one_line_error(result, *words, code=1):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def tiny(data_dir, out, **kw):
    settings = dict(data_dir=str(data_dir), subset=10, views=2, proj_dim=32, batch_size=25, epochs=2, eval_every=0,
                    device="cpu")
    return ssl_min.Config(**{**settings, **kw}, out_dir=str(out))


def png(path, size=(32, 32), mode="RGB", colour=(120, 30, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


# ---- Data ------------------------------------------------------------------------------------------------------------
def test_class_balanced_takes_a_seeded_random_share_of_every_class():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 110, 10))  # class c has 10 (c + 1) images
    half = ssl_min.class_balanced(labels, seed=0, fraction=0.5)
    assert labels[half].bincount().tolist() == [round(5 * (c + 1)) for c in range(10)]
    assert torch.equal(half, ssl_min.class_balanced(labels, seed=0, fraction=0.5))
    assert not torch.equal(half, ssl_min.class_balanced(labels, seed=1, fraction=0.5))
    first = torch.cat([torch.nonzero(labels == c)[:5 * (c + 1), 0] for c in range(10)])
    assert not torch.equal(half, first)  # random within each class, not the first images
    assert labels[ssl_min.class_balanced(labels, seed=0, per_class=3)].bincount().tolist() == [3] * 10
    with pytest.raises(ssl_min.UserError, match="--subset 11: class 0 has only 10 images"):
        ssl_min.class_balanced(labels, seed=0, per_class=11)


def test_load_data_subset_and_train_fraction(cifar_small):
    cfg = ssl_min.Config(data_dir=str(cifar_small), subset=20, train_fraction=0.5, seed=3, batch_size=20)
    data = ssl_min.load_data(cfg, torch.device("cpu"))
    assert data.train_images.shape == (200, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.train_labels.bincount().tolist() == [20] * 10 and data.test_labels.bincount().tolist() == [20] * 10
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and data.ssl_images.shape == (100, 3, 32, 32)
    matches = (data.ssl_images[:, None] == data.train_images[None]).flatten(2).all(2)  # half of every class
    assert data.train_labels[matches.float().argmax(1)].bincount().tolist() == [10] * 10
    again = ssl_min.load_data(cfg, torch.device("cpu"))
    other = ssl_min.load_data(ssl_min.Config(**{**cfg.__dict__, "seed": 4}), torch.device("cpu"))
    assert torch.equal(again.ssl_images, data.ssl_images) and not torch.equal(other.ssl_images, data.ssl_images)
    assert again.fingerprint == data.fingerprint != other.fingerprint


def test_load_data_gives_processes_disjoint_equal_shares(cifar_small):
    cfg = ssl_min.Config(data_dir=str(cifar_small), subset=11, batch_size=20)
    whole = ssl_min.load_data(cfg, torch.device("cpu")).ssl_images
    shares = [ssl_min.load_data(cfg, torch.device("cpu"), rank, 3).ssl_images.flatten(1) for rank in range(3)]
    assert [len(s) for s in shares] == [36] * 3  # 110 images: 36 each, 2 left out
    union = torch.cat(shares)
    assert len(union.unique(dim=0)) == 108 and (union[:, None] == whole.flatten(1)[None]).all(2).any(1).all()


def bad_folders(root):
    """Each case: a broken image folder and the words its one-line error must hold."""
    cases = {"missing": (root / "nope", ["nope"])}
    (root / "empty" / "train").mkdir(parents=True)
    cases["no class folders"] = (root / "empty", ["class folder"])
    for split in ("train", "test"):
        png(root / "deep16" / split / "cat" / "a.png", mode="I;16", colour=4000)
    cases["16-bit gray PNG"] = (root / "deep16", ["a.png", "I;16", "8-bit"])
    for split in ("train", "test"):
        png(root / "sizes" / split / "cat" / "a.png")
    png(root / "sizes" / "train" / "cat" / "b.png", (40, 30))
    cases["mixed sizes"] = (root / "sizes", ["several sizes", "(30, 40, 3)", "resize"])
    for split in ("train", "test"):
        png(root / "broken" / split / "cat" / "a.png")
    (root / "broken" / "train" / "cat" / "b.png").write_bytes(b"not an image")
    cases["unreadable image"] = (root / "broken", ["b.png"])
    return cases


def test_bad_data_dirs_get_one_line_and_write_nothing(tmp_path, capsys):
    for name, (folder, words) in bad_folders(tmp_path / "data").items():
        with pytest.raises(SystemExit) as exit:
            ssl_min.cli(["--data-dir", str(folder), "--batch-size", "2", "--out-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 1 and len(err) == 1 and all(w in err[0] for w in words), (name, err)
        assert not (tmp_path / "out").exists(), name


def test_no_internet_says_to_pass_data_dir_and_leaves_no_empty_folder(tmp_path):
    dead = "http://127.0.0.1:9"  # nothing listens there: the download fails at once, as offline
    proxies = {name: dead for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    result = run("--out-dir", tmp_path / "out", env={"HOME": str(tmp_path), **proxies, "no_proxy": "", "NO_PROXY": ""})
    assert_one_line_error(result, "could not download CIFAR-10", "--data-dir")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".cache").exists()


# ---- Augmentation ----------------------------------------------------------------------------------------------------
def colourful(n, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_augment_shape_range_and_seed():
    images = colourful(6)
    x = ssl_min.augment(images, 3, torch.Generator().manual_seed(3))
    assert x.shape == (3, 6, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, ssl_min.augment(images, 3, torch.Generator().manual_seed(3)))
    assert not torch.equal(x, ssl_min.augment(images, 3, torch.Generator().manual_seed(4)))


def test_augment_draws_parameters_per_sample_and_per_view():
    x = ssl_min.augment(colourful(1).expand(16, -1, -1, -1), 4, torch.Generator().manual_seed(0)).flatten(0, 1)
    assert len({tuple(v.flatten()[:64].tolist()) for v in x}) == 64  # 16 copies of one image x 4 views: all differ


@pytest.mark.parametrize("p_gray", [0.0, 0.2, 0.6])
def test_augment_grayscale_rate_follows_p_gray(p_gray):
    x = ssl_min.augment(colourful(2000, size=8), 1, torch.Generator().manual_seed(0), p_gray=p_gray)[0]
    gray = ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-6) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert abs(gray.float().mean().item() - p_gray) < 0.04


def test_hue_shift_matches_torchvision_adjust_hue():
    images = colourful(5).float() / 255
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.33])
    for image, h, ours in zip(images, shifts, ssl_min.hue_shift(images, shifts)):
        assert torch.allclose(ours, TF.adjust_hue(image, h.item()), atol=1e-5)


def ramp(n, axis):
    """Gray images that brighten along one axis (-1: left to right, -2: top to bottom)."""
    values = torch.linspace(0, 255, 32).round().to(torch.uint8)
    return (values.view(1, 1, 1, 32) if axis == -1 else values.view(1, 1, 32, 1)).expand(n, 3, 32, 32)


def test_augment_flips_half_of_the_views_left_to_right_and_none_upside_down():
    """Colour jitter and grayscale keep the order of gray levels, and a crop keeps the direction of a ramp: only a
    horizontal flip turns a left-to-right ramp around."""
    for axis, flipped_share in ((-1, (0.4, 0.6)), (-2, (0.0, 0.0))):
        steps = ssl_min.augment(ramp(500, axis), 1, torch.Generator().manual_seed(0))[0, :, 0].diff(dim=axis)
        rising, falling = (steps >= -1e-6).flatten(1).all(1), (steps <= 1e-6).flatten(1).all(1)
        share = (falling & ~rising).float().mean().item()
        assert (rising | falling).all() and flipped_share[0] <= share <= flipped_share[1], (axis, share)


def test_augment_crops_the_area_scale_asks_for():
    """On a left-to-right ramp from 0, (max - min) / max of a view is 1 when the crop spans the whole width, and less
    the narrower the crop (whatever the colour jitter's factors): it orders the crop sizes that `scale` asks for."""
    seen = {}
    for scale in ((1.0, 1.0), (0.08, 1.0), (0.1, 0.1)):
        x = ssl_min.augment(ramp(500, -1), 1, torch.Generator().manual_seed(0), scale=scale)[0, :, 0]
        seen[scale] = ((x.amax((1, 2)) - x.amin((1, 2))) / (x.amax((1, 2)) + 1e-6)).median().item()
    assert seen[(1.0, 1.0)] > 0.97 and seen[(1.0, 1.0)] - 0.1 > seen[(0.08, 1.0)] > seen[(0.1, 0.1)] + 0.1, seen


# ---- Model -----------------------------------------------------------------------------------------------------------
def test_backbone_and_projector_shapes():
    net = ssl_min.SSLNet(24, torch.full((3,), 0.5), torch.full((3,), 0.25))
    x = torch.rand(6, 3, 32, 32)
    assert net.backbone(x).shape == (6, 512) and net(x).shape == (6, 24)
    linear1, norm, relu, linear2 = net.projector
    assert linear1.bias is None and linear2.bias is None and isinstance(norm, nn.BatchNorm1d)
    assert (linear1.in_features, linear1.out_features, linear2.out_features) == (512, 24, 24)
    assert net.backbone.net.conv1.stride == (1, 1) and isinstance(net.backbone.net.maxpool, nn.Identity)


def test_pixel_stats_never_divide_by_zero():
    images = colourful(10)
    images[:, 1] = 7  # a constant channel
    mean, std = ssl_min.pixel_stats(images)
    assert torch.allclose(mean[1], torch.tensor(7 / 255)) and std[1] > 0 and std[0] > 0.2


# ---- The loss, values and gradients against independent textbook implementations ----------------------------------
def textbook_barlow(z1, z2, lambd):
    """BarlowTwins as in the official main.py: BatchNorm without affine, c = bn(z1)^T bn(z2) / B."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).double()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * (c - torch.diag(torch.diagonal(c))).pow(2).sum()


def textbook_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg as in the official code (facebookresearch/vicreg, main_vicreg.py)."""
    n, d = x.shape
    repr_loss = nn.functional.mse_loss(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    std_loss = torch.relu(1 - std_x).mean() / 2 + torch.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = lambda c: (c - torch.diag(torch.diagonal(c))).pow(2).sum() / d  # noqa: E731
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * (off(cov_x) + off(cov_y))


def pairwise_reference(z, beta):
    """The multi-view loss from pairwise cross-correlations C_uv: view v's target correlation is mean_{u != v} C_vu."""
    V, B, d = z.shape
    f = [(v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5) for v in z]
    total = 0.0
    for v in range(V):
        c = sum(f[v].T @ f[u] / B for u in range(V) if u != v) / (V - 1)
        total = total + ((1 - c.diagonal()) ** 2).sum() + beta * ((c ** 2).sum() - (c.diagonal() ** 2).sum())
    return total / V


def embeddings(V, B=64, d=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, d, generator=g, dtype=torch.float64)
    return torch.stack([base + noise * torch.randn(B, d, generator=g, dtype=torch.float64) for _ in range(V)])


def value_and_gradient(loss_fn, z):
    z = z.clone().requires_grad_()
    value = loss_fn(z)
    value.backward()
    return value.item(), z.grad


@pytest.mark.parametrize("beta", [0.0, 0.005, 1 / 16, 1.0])
def test_barlow_at_two_views_equals_textbook_barlowtwins_in_value_and_gradient(beta):
    z = embeddings(2)
    ours, ours_grad = value_and_gradient(lambda z: ssl_min.ssl_loss(z, beta)[0], z)
    reference, reference_grad = value_and_gradient(lambda z: textbook_barlow(z[0], z[1], beta), z)
    assert ours == pytest.approx(reference, rel=1e-10) and torch.allclose(ours_grad, reference_grad, rtol=1e-8)
    total, invariance, orthogonality = ssl_min.ssl_loss(z, beta)
    assert invariance.item() == pytest.approx(textbook_barlow(z[0], z[1], 0.0).item(), rel=1e-10)


@pytest.mark.parametrize("d,beta,scale", [(8, None, 1.0), (32, None, 0.3), (16, 0.01, 0.5)])
def test_vicreg_at_two_views_equals_textbook_vicreg_in_value_and_gradient(d, beta, scale):
    """beta = 1/(25 d) gives VICReg's own 25/25/1 weights; another beta maps to the covariance weight 25 beta d.
    At scale < 1 the embeddings' spread is below 1, where the variance hinge acts."""
    z = scale * embeddings(2, d=d)
    beta = beta or ssl_min.default_beta(d, "vicreg")
    ours, ours_grad = value_and_gradient(lambda z: ssl_min.ssl_loss(z, beta, "vicreg")[0], z)
    reference, reference_grad = value_and_gradient(lambda z: textbook_vicreg(z[0], z[1], cov_coeff=25 * beta * d), z)
    assert ours == pytest.approx(reference, rel=1e-10) and torch.allclose(ours_grad, reference_grad, rtol=1e-8)


@pytest.mark.parametrize("V", [3, 4, 8])
def test_multiview_loss_equals_pairwise_reference_in_value_and_gradient(V):
    z = embeddings(V, seed=V)
    ours, ours_grad = value_and_gradient(lambda z: ssl_min.ssl_loss(z, 0.05)[0], z)
    reference, reference_grad = value_and_gradient(lambda z: pairwise_reference(z, 0.05), z)
    assert ours == pytest.approx(reference, rel=1e-10) and torch.allclose(ours_grad, reference_grad, rtol=1e-8)


@pytest.mark.parametrize("V", [2, 3, 5])
def test_leave_one_out_target_rescales_eq10_by_the_square_of_v_minus_1_over_v(V):
    z = embeddings(V, seed=V)
    eq10 = (z.mean(0, keepdim=True) - z).pow(2).sum((1, 2))  # Eq. 10's invariance term, view by view
    assert torch.allclose(eq10, ((V - 1) / V) ** 2 * (ssl_min.view_target(z) - z).pow(2).sum((1, 2)), rtol=1e-12)


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
def test_multiview_loss_is_invariant_to_the_order_of_views_and_favours_identical_views(loss):
    z = embeddings(5)
    shuffled = z[torch.tensor([3, 0, 4, 1, 2])]
    assert ssl_min.ssl_loss(shuffled, 0.05, loss)[0].item() == pytest.approx(ssl_min.ssl_loss(z, 0.05, loss)[0].item())
    same, independent = embeddings(1, seed=1).expand(4, -1, -1), embeddings(4, seed=1, noise=3.0)
    assert ssl_min.ssl_loss(same, 0.05, loss)[1] < 0.01 * ssl_min.ssl_loss(independent, 0.05, loss)[1]


def test_bfloat16_embeddings_are_scored_in_float32():
    assert ssl_min.ssl_loss(embeddings(3).bfloat16(), 0.05)[0].dtype == torch.float32


def test_default_beta_is_5_over_d_and_vicreg_weights():
    assert ssl_min.default_beta(128, "barlow") == 5 / 128 and ssl_min.default_beta(64, "vicreg") == 1 / (25 * 64)


@pytest.mark.parametrize("spectrum", [[1.0], [1.0] * 32, [4.0, 2.0, 1.0, 1.0], [10.0, 1.0, 0.1]])
def test_effective_rank_is_the_exponential_entropy_of_the_spectrum(spectrum):
    q = torch.linalg.qr(torch.randn(200, 32, generator=torch.Generator().manual_seed(0)))[0]
    z = q[:, :len(spectrum)] * torch.tensor(spectrum) @ torch.linalg.qr(torch.randn(32, 32))[0][:len(spectrum)]
    p = torch.tensor(spectrum) / sum(spectrum)
    assert ssl_min.effective_rank(z) == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-4)


# ---- Training --------------------------------------------------------------------------------------------------------
def test_train_step_lowers_the_loss_on_a_fixed_batch_and_updates_every_weight():
    torch.manual_seed(0)
    images = colourful(16)
    net = ssl_min.SSLNet(16, *ssl_min.pixel_stats(images))
    before = {k: p.clone() for k, p in net.named_parameters()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    views = ssl_min.augment(images, 2, torch.Generator().manual_seed(0))
    losses = [ssl_min.train_step(net, optimizer, views, 5 / 16, "barlow") for _ in range(6)]
    assert losses[0].shape == (3,) and losses[0][0] == pytest.approx(losses[0][1:].sum().item())
    assert losses[-1][0] < 0.8 * losses[0][0]
    assert all(not torch.equal(before[k], p) for k, p in net.named_parameters())


# ---- Evaluation ------------------------------------------------------------------------------------------------------
def clusters(n, d=32, classes=4, seed=0, spread=1.0):
    centres = 3 * torch.randn(classes, d, generator=torch.Generator().manual_seed(123))  # shared by every split
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), y


def test_linear_probe_and_knn_separate_clustered_features_and_not_shuffled_labels():
    (train_f, train_y), (test_f, test_y) = clusters(400), clusters(200, seed=1)
    assert ssl_min.linear_probe(train_f, train_y, test_f, test_y, 4, epochs=50) > 0.95
    assert ssl_min.knn_accuracy(train_f, train_y, test_f, test_y, 4, k=20) > 0.95
    shuffled = train_y[torch.randperm(400, generator=torch.Generator().manual_seed(0))]
    assert ssl_min.linear_probe(train_f, shuffled, test_f, test_y, 4, epochs=50) < 0.5


def test_knn_votes_are_weighted_by_similarity():
    """Three neighbours: two of class 0 at similarity 0.6, one of class 1 at similarity 1. A majority vote says 0;
    at temperature 0.1 the weights are e^6 + e^6 < e^10, so the answer is 1 (and 0 at a high temperature)."""
    train_f = torch.tensor([[0.6, 0.8], [0.6, -0.8], [1.0, 0.0]])
    train_y, test_f, test_y = torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert ssl_min.knn_accuracy(train_f, train_y, test_f, test_y, 2, k=3) == 1.0
    assert ssl_min.knn_accuracy(train_f, train_y, test_f, test_y, 2, k=3, temperature=100.0) == 0.0


@gpu
@pytest.mark.parametrize("device", DEVICES)
def test_lean_linear_probe_gives_the_autograd_probes_accuracy(device):
    """On features of a random ResNet-18 on the GPU, and on clustered features on the CPU: the same accuracy, to one
    test image in a thousand (float rounding differs between the two orders of operations)."""
    (train_f, train_y), (test_f, test_y) = (clusters(n, d=64, classes=10, seed=s, spread=12.0) for n, s in ((3000, 0),
                                                                                                            (2000, 1)))
    train_f, train_y, test_f, test_y = (t.to(device) for t in (train_f, train_y, test_f, test_y))
    for epochs in (3, 20):
        lean = ssl_min.linear_probe(train_f, train_y, test_f, test_y, 10, epochs=epochs)
        reference = throughput.reference_probe(train_f, train_y, test_f, test_y, 10, epochs)
        assert abs(lean - reference) <= 2e-3 and 0.3 < lean < 0.9, (epochs, lean, reference)


@gpu
@pytest.mark.parametrize("device", DEVICES)
def test_multiview_probe_features_average_one_clean_and_augmented_views_in_float32(device):
    """The augmented views are made in float32 (not inside bf16 autocast), then averaged with the clean view."""
    backbone = ssl_min.ResNet18(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device).eval()
    images = colourful(4).to(device)
    three = ssl_min.features(backbone, images, 3, torch.Generator(device).manual_seed(0))
    views = ssl_min.augment(images, 2, torch.Generator(device).manual_seed(0))
    x = torch.cat([images.float().unsqueeze(0) / 255, views]).flatten(0, 1)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
        by_hand = backbone(x).float().view(3, 4, -1).mean(0)
    assert three.shape == (4, 512) and not torch.allclose(three, ssl_min.features(backbone, images), atol=1e-3)
    assert torch.allclose(three, by_hand, atol=1e-5)


# ---- The command line, end to end on real CIFAR-10 images -----------------------------------------------------------
QUICK = ["--views", "2", "--proj-dim", "64", "--batch-size", "100", "--eval-every", "1", "--device", "cpu"]


@pytest.fixture(scope="session")
def finished_run(cifar_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "e2e"
    result = run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_cli_end_to_end_writes_every_output_and_learns_more_than_an_untrained_control(finished_run, cifar_small,
                                                                                     tmp_path):
    out, result = finished_run
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and {"loss", "invariance", "orthogonality", "views_per_s", "knn_acc", "erank"} <= set(log[0])
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["beta"] == pytest.approx(5 / 64) and results["config"]["compile"] is False
    assert results["data"] == dict(pretrain=500, train=500, test=300, image=[3, 32, 32]) and results["processes"] == 1
    assert results["log"][-1]["probe_acc"] == results["probe_acc"] and 1 < results["erank"] <= 64
    assert results["device"].startswith("cpu") and results["versions"]["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?", results["commit"] or ""), results["commit"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # plain types only
    assert ckpt["epoch"] == 2 and ckpt["config"] == results["config"] and ckpt["processes"] == 1
    assert "linear probe" in result.stdout and "epoch   2/2" in result.stdout and result.stderr == ""
    # the same data, seed and steps with a learning rate of 0: what the untrained network's features give
    control = run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--lr", "0", "--out-dir", tmp_path / "control")
    assert control.returncode == 0, control.stderr
    untrained = json.loads((tmp_path / "control" / "results.json").read_text())
    losses = [[e["loss"] for e in r["log"]] for r in (results, untrained)]
    assert losses[0][1] < 0.95 * losses[0][0] and losses[1][1] > 0.98 * losses[1][0], losses  # only training lowers it
    assert losses[0][1] < 0.8 * losses[1][1] and results["probe_acc"] > untrained["probe_acc"] + 0.04


def readme_snippet(heading):
    """The first python code block after `heading` in the README."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_readme_snippet_loads_your_runs_backbone(finished_run, monkeypatch):
    out, _ = finished_run
    monkeypatch.chdir(out.parent)
    monkeypatch.syspath_prepend(str(REPO))
    namespace = {}
    exec(readme_snippet("### Using the pretrained backbone").replace("runs/cifar10-v4-d128-barlow-s0", out.name),
         namespace)
    assert namespace["features"].shape == (8, 512) and torch.isfinite(namespace["features"]).all()


def test_readme_results_say_not_measured_exactly_while_no_full_results_exist():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Results"):text.index("## Set up")]
    full = sorted((REPO / "notebooks" / "results").glob("*/full/*.json"))
    assert ("not measured yet" in table) == (not full), "update the README's results table from the results"


def test_help_shows_every_default_and_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit):
        ssl_min.cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seed of the initialization, the subsets, the batches and the augmentations (default: 0)" in text
    for argv in (["--view", "3"], ["--over"]):
        with pytest.raises(SystemExit) as exit:
            ssl_min.cli(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and "unrecognized arguments" in err and len(err.strip().splitlines()) == 1


BAD_OPTIONS = [(["--views", "1"], "at least 2"), (["--seed", "-1"], "from 0 to"), (["--lr", "inf"], "--lr"),
               (["--loss", "simclr"], "invalid choice"), (["--train-fraction", "1.5"], "to 1"),
               (["--batch-size", "1"], "at least 2"), (["--beta", "nan"], "--beta"),
               (["--epochs", "two"], "invalid int")]


@pytest.mark.parametrize("argv,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_gets_one_line_and_writes_nothing(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        ssl_min.cli([*argv, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_batch_larger_than_the_pretraining_set_is_refused(cifar_small, tmp_path):
    assert_one_line_error(run("--data-dir", cifar_small, "--subset", "5", "--batch-size", "60", "--out-dir",
                              tmp_path / "out"), "--batch-size 60", "50 pretraining images")


# ---- Saving and resuming ---------------------------------------------------------------------------------------------
def test_finished_run_is_not_replaced_without_overwrite(finished_run, cifar_small):
    out, _ = finished_run
    before = (out / "results.json").read_bytes()
    assert_one_line_error(run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--out-dir", out), "finished",
                          "--overwrite")
    assert (out / "results.json").read_bytes() == before


def copy_run(finished_run, tmp_path):
    """A copy of the finished run's folder without its results: an unfinished run after 2 epochs."""
    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    (out / "results.json").unlink()
    return out


def test_checkpoint_of_another_configuration_data_or_device_is_refused_and_kept(finished_run, cifar_small, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    for args, word in ((["--views", "3"], "views"), (["--seed", "1"], "seed")):
        assert_one_line_error(run("--data-dir", cifar_small, *QUICK, *args, "--epochs", "3", "--out-dir", out), word)
    changed = tmp_path / "changed"  # the same folder name and images, one of them edited
    shutil.copytree(cifar_small, changed, symlinks=False)
    first = sorted((changed / "train" / "airplane").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first)
    assert_one_line_error(run("--data-dir", changed, *QUICK, "--epochs", "3", "--out-dir", out), "another data")
    assert (out / "checkpoint.pt").read_bytes() == before
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**state, "device": "cuda"}, out / "checkpoint.pt")  # as saved on a GPU
    before = (out / "checkpoint.pt").read_bytes()
    assert_one_line_error(run("--data-dir", cifar_small, *QUICK, "--epochs", "3", "--out-dir", out), "another device")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resuming_with_fewer_epochs_is_refused_and_with_as_many_only_evaluates(finished_run, cifar_small, tmp_path):
    out = copy_run(finished_run, tmp_path)
    assert_one_line_error(run("--data-dir", cifar_small, *QUICK, "--epochs", "1", "--out-dir", out), "2 epochs")
    again = run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--probe-views", "2", "--out-dir", out)
    assert again.returncode == 0 and "resuming" in again.stdout and "/2  loss" not in again.stdout, again.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["probe_views"] == 2 and len(results["log"]) == 2


def interrupt_at_step(monkeypatch, step, error=KeyboardInterrupt):
    """Make ssl_min's training raise `error` at its `step`-th step from now (counting from 1)."""
    calls, real = [], ssl_min.train_step

    def train_step(*args):
        calls.append(1)
        if len(calls) == step:
            raise error()
        return real(*args)

    monkeypatch.setattr(ssl_min, "train_step", train_step)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved_an_epoch(finished_run, cifar_small, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "old"
    shutil.copytree(finished_run[0], out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_at_step(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt, match="nothing of it is saved"):
        ssl_min.main(tiny(cifar_small, out, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    interrupt_at_step(monkeypatch, 5)  # 4 steps an epoch: interrupted in the second
    with pytest.raises(KeyboardInterrupt, match="checkpoint after epoch 1 .* rerun without --overwrite to resume"):
        ssl_min.main(tiny(cifar_small, out, overwrite=True))
    assert not (out / "results.json").exists() and torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert len(ssl_min.main(tiny(cifar_small, out))["log"]) == 2  # resumed after epoch 1, not started again


def test_out_of_memory_names_what_to_lower_for_the_phase_that_ran_out(cifar_small, tmp_path, monkeypatch):
    interrupt_at_step(monkeypatch, 2, lambda: torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(ssl_min.UserError, match=r"lower --batch-size \(25\), --views \(2\) or --proj-dim \(32\); no "):
        ssl_min.main(tiny(cifar_small, tmp_path / "out"))
    monkeypatch.undo()

    def no_memory(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ssl_min, "linear_probe", no_memory)
    with pytest.raises(ssl_min.UserError, match=r"lower --probe-views \(4\); the checkpoint after epoch 2"):
        ssl_min.main(tiny(cifar_small, tmp_path / "out", probe_views=4))
    monkeypatch.undo()
    assert ssl_min.main(tiny(cifar_small, tmp_path / "out", probe_views=2))["config"]["probe_views"] == 2


def test_non_finite_loss_names_epoch_and_step_and_keeps_the_last_checkpoint(cifar_small, tmp_path, monkeypatch):
    calls, real = [], ssl_min.ssl_loss

    def poisoned(z, beta, loss="barlow"):  # fine for epoch 1 (4 steps), then NaN from epoch 2, step 2
        calls.append(1)
        total, invariance, orthogonality = real(z, beta, loss)
        return (total * float("nan") if len(calls) >= 6 else total), invariance, orthogonality

    monkeypatch.setattr(ssl_min, "ssl_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite at epoch 2, step 2: lower --beta or --lr"):
        ssl_min.main(tiny(cifar_small, tmp_path / "out"))
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point())


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ssl_min.write_atomic(path, {"epoch": 1})

    def full_disk(obj, f):
        Path(f).write_bytes(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file: No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError):
        ssl_min.write_atomic(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_slow_or_missing_git_gives_no_commit_and_no_error(monkeypatch):
    real = subprocess.run
    for error in (subprocess.TimeoutExpired("git", 10), FileNotFoundError("git")):
        def git_fails(command, *args, **kw):
            if command[0] == "git":
                raise error
            return real(command, *args, **kw)
        monkeypatch.setattr(subprocess, "run", git_fails)
        assert ssl_min.provenance(torch.device("cpu"))["commit"] is None


def test_same_seed_same_trajectory_other_seed_another(cifar_small, tmp_path):
    runs = [ssl_min.main(tiny(cifar_small, tmp_path / str(i), epochs=1, seed=s)) for i, s in enumerate((0, 0, 1))]
    losses = [[e["loss"] for e in r["log"]] for r in runs]
    assert losses[0] == losses[1] != losses[2] and runs[0]["probe_acc"] == runs[1]["probe_acc"]


@gpu
@pytest.mark.parametrize("device", DEVICES)
def test_random_generator_state_goes_through_a_checkpoint_and_gives_the_same_draws(device, tmp_path):
    generator = torch.Generator(device).manual_seed(7)
    torch.rand(5, generator=generator, device=device)
    ssl_min.write_atomic(tmp_path / "state.pt", {"rng": [generator.get_state()]})
    expected = torch.rand(5, generator=generator, device=device)
    restored = torch.Generator(device)
    restored.set_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"][0])
    assert torch.equal(torch.rand(5, generator=restored, device=device), expected)


# ---- Stops: Ctrl-C, SIGTERM and SIGKILL lose at most the current epoch; the resumed run is the same run -------------
RESUME_ARGS = ["--subset", "10", "--views", "2", "--proj-dim", "32", "--batch-size", "20", "--epochs", "2",
               "--eval-every", "1"]


def comparable(log):
    return [{k: v for k, v in e.items() if k not in ("views_per_s", "time_s")} for e in log]


@pytest.fixture(scope="module", params=DEVICES)
def uninterrupted(request, cifar_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    result = run("--data-dir", cifar_small, *RESUME_ARGS, "--device", request.param, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return request.param, json.loads((out / "results.json").read_text()), torch.load(out / "checkpoint.pt")


@gpu
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_stop_keeps_the_last_epoch_and_the_resumed_run_ends_as_the_uninterrupted_one(uninterrupted, cifar_small,
                                                                                      tmp_path, sig):
    device, whole, whole_ckpt = uninterrupted
    out, args = tmp_path / "stopped", ["--data-dir", cifar_small, *RESUME_ARGS, "--device", device]
    process = subprocess.Popen([sys.executable, str(REPO / "ssl_min.py"), *map(str, args), "--out-dir", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 600
    while not (out / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    if sig != signal.SIGKILL:
        assert process.returncode == 130 and "interrupted; the checkpoint after epoch" in err and len(
            err.strip().splitlines()) == 1, err
    resumed = run(*args, "--out-dir", out)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert comparable(results["log"]) == comparable(whole["log"]) and results["probe_acc"] == whole["probe_acc"]
    if device == "cpu":  # on the CPU every kernel is deterministic: the same weights, bit for bit
        model = torch.load(out / "checkpoint.pt")["model"]
        assert all(torch.equal(model[k], whole_ckpt["model"][k]) for k in model)


# ---- The GPU paths: compile, no host sync, out of memory -------------------------------------------------------------
@gpu
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_steps_match_eager_ones_and_evaluation_does_not_recompile(device, cifar_small, tmp_path,
                                                                            monkeypatch):
    """Inductor on CUDA (as main compiles), aot_eager on the CPU (the same graph capture, without minutes of C++)."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the compiler's files go with the test's
    data = ssl_min.load_data(ssl_min.Config(data_dir=str(cifar_small), subset=4, batch_size=20), torch.device(device))
    views = ssl_min.augment(data.ssl_images[:20], 2, torch.Generator(device).manual_seed(0))
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = ssl_min.SSLNet(32, *ssl_min.pixel_stats(data.ssl_images)).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        if compiled:
            torch.compiler.reset()
            net.compile(backend="inductor" if device == "cuda" else "aot_eager")
        losses.append(torch.stack([ssl_min.train_step(net, optimizer, views, 0.1, "barlow") for _ in range(3)]))
    graphs = counters["stats"]["unique_graphs"]
    ssl_min.evaluate(net, data)
    ssl_min.train_step(net, optimizer, views, 0.1, "barlow")
    tolerance = 2e-2 if device == "cuda" else 1e-4  # bf16 on the GPU: the fused kernels round differently
    assert torch.allclose(losses[0], losses[1], rtol=tolerance), losses
    assert counters["stats"]["unique_graphs"] == graphs


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_no_host_sync_inside_the_training_step():
    images = colourful(64).cuda()
    net = ssl_min.SSLNet(32, *ssl_min.pixel_stats(images)).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator("cuda").manual_seed(0)
    ssl_min.train_step(net, optimizer, ssl_min.augment(images, 2, generator), 0.1, "barlow")  # first step: set up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ssl_min.train_step(net, optimizer, ssl_min.augment(images, 2, generator), 0.1, "barlow")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_out_of_memory_on_the_gpu_is_one_line(cifar_small, tmp_path):
    result = run("--data-dir", cifar_small, "--views", "400", "--batch-size", "500", "--device", "cuda",
                 "--out-dir", tmp_path / "out")
    assert_one_line_error(result, "out of memory on cuda", "--batch-size (500)", "--views (400)")


# ---- Several processes (torchrun, gloo on the CPU) -------------------------------------------------------------------
DDP_WORKER = """
import sys, torch, torch.distributed as dist
import ssl_min
dist.init_process_group("gloo")
rank, views = dist.get_rank(), torch.load(sys.argv[1])
torch.manual_seed(0)
net = ssl_min.SSLNet(16, torch.full((3,), 0.5), torch.full((3,), 0.25))
model = torch.nn.parallel.DistributedDataParallel(net)
optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-6)
b, steps = views.shape[2] // 2, []
for v in views:  # each step: the weights before it, its losses, and the gradients that DDP averaged
    before = {k: w.clone() for k, w in net.state_dict().items()}
    losses = ssl_min.train_step(model, optimizer, v[:, rank * b:(rank + 1) * b], 0.3, "barlow")
    steps.append(dict(before=before, losses=losses, grads={n: p.grad.clone() for n, p in net.named_parameters()}))
if rank == 0:
    torch.save(steps, sys.argv[2])
dist.destroy_process_group()
"""


class TwoProcessStatistics(nn.Module):
    """One process computing what two CPU processes compute: the BatchNorm statistics of each process's half of the
    batch (torch's SyncBatchNorm, which makes them the whole batch's, is CUDA-only), then the whole batch's loss."""

    def __init__(self, net, views):
        super().__init__()
        self.net, self.views = net, views

    def forward(self, x):
        x = x.view(self.views, 2, -1, *x.shape[1:])
        halves = [self.net(x[:, r].flatten(0, 1)).view(self.views, x.shape[2], -1) for r in (0, 1)]
        return torch.cat(halves, 1).flatten(0, 1)


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def test_two_processes_take_the_same_steps_as_one_process_with_the_whole_batch(tmp_path):
    """Three Adam steps on 2 processes; at each, one process with the whole batch, from the same weights, gets the same
    losses and gradients (compared from the same weights: a 1e-7 change of the weights of this tiny random problem
    changes some gradients by 10%)."""
    views = torch.rand(3, 2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # 3 steps of V = 2, B = 16
    torch.save(views, tmp_path / "views.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    result = torchrun(tmp_path / "worker.py", tmp_path / "views.pt", tmp_path / "ddp.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    net = ssl_min.SSLNet(16, torch.full((3,), 0.5), torch.full((3,), 0.25))
    gradients_only = torch.optim.SGD(net.parameters(), lr=0.0)
    steps = torch.load(tmp_path / "ddp.pt")
    for v, step in zip(views, steps):
        net.load_state_dict(step["before"])
        losses = ssl_min.train_step(TwoProcessStatistics(net, 2), gradients_only, v, 0.3, "barlow")
        assert torch.allclose(step["losses"], losses, rtol=1e-5), (step["losses"], losses)
        for name, p in net.named_parameters():
            assert torch.allclose(step["grads"][name], p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max()), name
    assert not torch.equal(steps[-1]["before"]["projector.0.weight"], steps[0]["before"]["projector.0.weight"])


def test_torchrun_command_line_runs_end_to_end_writes_once_and_refuses_another_process_count(cifar_small, tmp_path):
    out, args = tmp_path / "ddp", ["--subset", "10", "--views", "2", "--proj-dim", "32", "--batch-size", "20",
                                   "--eval-every", "1"]
    result = torchrun(REPO / "ssl_min.py", "--data-dir", cifar_small, *args, "--epochs", "2", "--out-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("linear probe") == 1 and result.stdout.count("epoch   1/2") == 1, result.stdout
    assert "x 2 processes" in result.stdout and "pretraining on 100 images" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and results["data"]["pretrain"] == 100 and len(results["log"]) == 2
    assert results["config"]["compile"] is False  # compile + DDP is off by default
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["processes"] == 2 and len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0], ckpt["rng"][1])
    (out / "results.json").unlink()  # resumed by one process: refused in one line, the checkpoint kept
    assert_one_line_error(run("--data-dir", cifar_small, *args, "--epochs", "3", "--out-dir", out), "processes")


# ---- The sweeps (notebooks/sweeps.py): the verdict rule and its error rates ------------------------------------------
@pytest.mark.parametrize("p, df, value", [(0.95, 2, 2.920), (0.975, 4, 2.776), (0.975, 1, 12.706), (0.95, 10, 1.812),
                                          (0.975, 30, 2.042), (0.95, 60, 1.671), (0.975, 10_000, 1.960)])
def test_t_quantile_known_values(p, df, value):
    assert sweeps.t_quantile(p, df) == pytest.approx(value, abs=6e-4)


def rates(gap, sd, n, reps=3000, seed=0):
    """How often each verdict word comes out for Gaussian arms whose true means differ by `gap`."""
    rng = np.random.default_rng(seed)
    words = [sweeps.decide(rng.normal(gap, sd, n), rng.normal(0, sd, n)).word for _ in range(reps)]
    return {w: words.count(w) / reps for w in set(words)}


def matches(r):
    return sum(v for w, v in r.items() if w.startswith("matches"))


def apart(r):
    return sum(v for w, v in r.items() if w in ("better", "worse") or w.endswith("nonzero"))


@pytest.mark.parametrize("sd, n", [(0.002, 3), (0.005, 3), (0.004, 10)])
def test_false_matches_at_most_5_percent_when_the_gap_is_the_margin(sd, n):
    r = rates(sweeps.MARGIN, sd, n)
    assert matches(r) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 3000), r  # TOST at 90% intervals: a 5% test


@pytest.mark.parametrize("sd, n", [(0.005, 2), (0.005, 3), (0.02, 6)])
def test_false_differences_about_5_percent_when_the_gap_is_zero(sd, n):
    assert 0.03 <= apart(rates(0.0, sd, n)) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 3000)


def test_the_rule_finds_what_is_there():
    assert matches(rates(0.0, 0.002, 3, reps=500)) > 0.9  # a tight spread and no gap: matches
    assert rates(0.05, 0.005, 3, reps=500).get("better", 0) > 0.95  # a 5-point gap: better
    assert rates(-0.05, 0.005, 3, reps=500).get("worse", 0) > 0.95


def test_verdict_words_and_intervals():
    assert sweeps.decide([0.5], [0.5, 0.51]).word == "no interval"
    assert "no interval" in sweeps.verdict([0.5], [0.5, 0.51])
    both = sweeps.decide([0.505, 0.506, 0.505], [0.5, 0.501, 0.5005])
    assert both.word == "matches within the margin; the difference is nonzero"
    assert both.ci95[0] > 0 and -sweeps.MARGIN < both.ci90[0] < both.ci90[1] < sweeps.MARGIN
    text = sweeps.verdict([0.55, 0.56, 0.555], [0.50, 0.507, 0.499])
    assert text.endswith(": better") and "90% interval [" in text and "95% interval [" in text
    assert "higher" in sweeps.verdict([30, 31], [20, 21], percent=False, margin=None)
    assert sweeps.decide([30, 30.1], [30, 30.1], margin=None).word == "inconclusive"  # no margin: never "matches"
    assert "more than 100 seeds" in sweeps.verdict([0.1, 0.3], [0.1, 0.28])  # a 1-point gap in a 14-point spread


def test_inconclusive_says_how_many_seeds_would_settle_it():
    z = np.array([-1.0, 0.0, 1.0])  # sd 1
    x, y = 0.51 + 0.006 * z, 0.50 + 0.006 * z
    d = sweeps.decide(x, y)
    assert d.word == "inconclusive" and d.seeds > 3
    zn = np.linspace(-1, 1, d.seeds)
    zn /= zn.std(ddof=1)  # the same sd at n seeds
    assert sweeps.decide(0.51 + 0.006 * zn, 0.50 + 0.006 * zn).word != "inconclusive"
    zn = np.linspace(-1, 1, d.seeds - 1)
    zn /= zn.std(ddof=1)
    assert sweeps.decide(0.51 + 0.006 * zn, 0.50 + 0.006 * zn).word == "inconclusive"
    assert "seeds per arm would settle it" in sweeps.verdict(x, y)


# ---- The plan and the time model -------------------------------------------------------------------------------------
def seeds_per_arm(sweep):
    return {(a.proj_dim, a.beta, a.views, a.fraction): n for a, n in sweeps.planned_arms(sweep, "full").items()}


def test_plan_seeds_and_arms():
    orth, halved = seeds_per_arm("orthogonality"), seeds_per_arm("halved")
    assert orth[128, "5/d", 2, 1.0] == orth[8192, "0.0008", 2, 1.0] == 3  # claim 1's pair, the wide one tuned
    assert orth[128, "0.0004", 2, 1.0] == orth[8192, "0.0004", 2, 1.0] == 2  # the failure mode, the usual wide one
    assert orth[1024, "5/d", 2, 1.0] == orth[1024, "0.0004", 2, 1.0] == 1
    assert halved[256, "5/d", 4, 0.5] == halved[256, "5/d", 2, 1.0] == 3 and halved[256, "5/d", 2, 0.5] == 2
    assert {(4, 1.0), (8, 0.25), (2, 0.25)} <= {(v, f) for _, _, v, f in halved}
    names = [name for sweep in sweeps.COMMON for _, name, _ in sweeps.plan(sweep, "full")]
    assert len(names) == len(set(names))


def test_queue_order_tests_the_claims_first():
    runs = sorted(((p, sweep, cfg) for sweep in sweeps.COMMON for p, _, cfg in sweeps.plan(sweep, "full")),
                  key=lambda run: run[0])
    first = [(sweep, cfg.proj_dim, cfg.views, cfg.train_fraction, cfg.seed) for _, sweep, cfg in runs[:8]]
    assert first[:4] == [("orthogonality", 128, 2, 1.0, 0), ("orthogonality", 8192, 2, 1.0, 0),
                         ("halved", 256, 2, 1.0, 0), ("halved", 256, 4, 0.5, 0)]
    assert {s for *_, s in first[4:]} == {1}  # then seed 1 of both pairs
    assert runs[-1][1] == "main"


def test_smoke_plan_is_small_and_cpu():
    for sweep in ("orthogonality", "halved"):
        runs = sweeps.plan(sweep, "smoke")
        assert len(runs) <= 6 and all(c.device == "cpu" and c.batch_size <= 10 for _, _, c in runs)
        assert max(sweeps.planned_arms(sweep, "smoke").values()) == 2  # the verdict's interval is exercised


def test_time_model_uncalibrated():
    wanted = (("orthogonality", "d128_beta5_over_d_s0"), ("orthogonality", "d8192_beta0.0008_s0"),
              ("halved", "v4_data50_s0"))
    small, wide, halved = (cfg for sweep, name in wanted for _, n, cfg in sweeps.plan(sweep, "full") if n == name)
    model = sweeps.TimeModel()
    assert "uncalibrated" in model.note
    steps = 50_000 // 512 * 100
    training = steps * (3e-3 + 13.5e-6 * 1024)
    assert sweeps.estimate(small) == pytest.approx(training + sweeps.overhead(small, model), rel=1e-3)
    per_view = (sweeps.estimate(wide) - sweeps.overhead(wide, model) - steps * 3e-3) / (steps * 1024)
    assert per_view == pytest.approx(1.7 * 13.5e-6)  # d = 8192 about 1.7x slower per view
    assert 0 < sweeps.overhead(halved, model) < 0.5 * sweeps.estimate(halved)


def fake_results(cfg, epoch_s=1.0, wall_extra=50.0, device="NVIDIA H200"):
    pretrain = round(50_000 * cfg.train_fraction) if not cfg.subset else 8
    steps = pretrain // cfg.batch_size
    log = [dict(epoch=e, loss=1.0, invariance=0.5, orthogonality=0.5, time_s=epoch_s,
                views_per_s=steps * cfg.batch_size * cfg.views / epoch_s) for e in range(1, cfg.epochs + 1)]
    log[-1].update(knn_acc=0.4, erank=10.0)
    return dict(probe_acc=0.5, knn_acc=0.4, erank=10.0, epochs=cfg.epochs, pretrain_time_s=epoch_s * cfg.epochs,
                eval_time_s=1.0, wall_time_s=epoch_s * cfg.epochs + wall_extra,
                data=dict(pretrain=pretrain, train=50_000, test=10_000, image=[3, 32, 32]), processes=1,
                device=device, commit="abc", versions=dict(torch="2"), config=asdict(cfg), log=log)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setattr(sweeps, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sweeps, "RUNS", tmp_path / "runs")
    return tmp_path


def test_calibrate_from_committed_runs(folders):
    step_s, view_s = 2e-3, 1e-5
    for sweep, name, cfg in [("orthogonality", n, c) for _, n, c in sweeps.plan("orthogonality", "full")][:1] + \
                            [("halved", n, c) for _, n, c in sweeps.plan("halved", "full")][:2]:
        steps = round(50_000 * cfg.train_fraction) // cfg.batch_size
        epoch_s = steps * (step_s + view_s * cfg.batch_size * cfg.views * sweeps.width_cost(cfg.proj_dim))
        path = folders / "results" / sweep / "full" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fake_results(cfg, epoch_s)))
    model = sweeps.calibrate("NVIDIA H200")
    assert model.step_s == pytest.approx(step_s, rel=1e-6) and model.view_s == pytest.approx(view_s, rel=1e-6)
    assert "calibrated on 3 runs" in model.note and model.overhead_scale > 0
    assert "uncalibrated" in sweeps.calibrate("another GPU").note


# ---- The queue and the run bookkeeping, with a fake ssl_min.main -----------------------------------------------------
@pytest.fixture
def fake_main(folders, monkeypatch):
    calls = []

    def main(cfg):
        calls.append(cfg)
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = fake_results(cfg)
        ssl_min.save_json(out / "results.json", results)
        return results

    monkeypatch.setattr(ssl_min, "main", main)
    return calls


def first_run(sweep="orthogonality"):
    return min(sweeps.plan(sweep, "full"), key=lambda run: run[0])[1:]


def test_queue_skips_a_run_that_does_not_fit_and_takes_the_next(fake_main, monkeypatch, capsys):
    name, first = first_run()
    monkeypatch.setattr(sweeps, "estimate", lambda cfg, model=None: 560 if cfg == first else 100)
    sweeps.queue("", 540)
    ran = [(c.proj_dim, c.beta, c.views, c.train_fraction, c.seed) for c in fake_main]
    assert ran and (first.proj_dim, first.beta, first.views, first.train_fraction, first.seed) not in ran
    assert f"skip orthogonality/{name}" in capsys.readouterr().out
    assert (sweeps.RESULTS / "orthogonality" / "full" / "d8192_beta0.0008_s0.json").exists()


def test_results_are_saved_before_the_run_folder_is_deleted(fake_main, monkeypatch):
    name, cfg = first_run()
    deleted = []
    real = sweeps.shutil.rmtree
    monkeypatch.setattr(sweeps.shutil, "rmtree", lambda path: deleted.append(
        (sweeps.RESULTS / "orthogonality" / "full" / f"{name}.json").exists()) or real(path))
    sweeps.run_one("orthogonality", "full", name, cfg, "", sweeps.RESULTS / "orthogonality" / "full")
    assert deleted == [True] and not (sweeps.RUNS / "orthogonality" / name).exists()


def test_a_finished_run_folder_is_recovered_not_rerun(fake_main, capsys):
    name, cfg = first_run()
    out = sweeps.RUNS / "orthogonality" / name
    out.mkdir(parents=True)
    ssl_min.save_json(out / "results.json", fake_results(cfg))
    results = sweeps.run_sweep("orthogonality", "full")
    assert not any(c.seed == cfg.seed and c.proj_dim == cfg.proj_dim and c.beta == cfg.beta for c in fake_main)
    assert name in results and "recovered" in capsys.readouterr().out and not out.exists()


def test_a_finished_run_folder_of_another_config_is_not_copied(fake_main, capsys):
    name, cfg = first_run()
    out = sweeps.RUNS / "orthogonality" / name
    out.mkdir(parents=True)
    ssl_min.save_json(out / "results.json", fake_results(sweeps.replace(cfg, seed=7)))
    assert sweeps.run_one("orthogonality", "full", name, cfg, "", sweeps.RESULTS) is None
    assert f"{out} holds a finished run of another configuration" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["", "{", "[]", '{"probe_acc": 1}'])
def test_an_unreadable_result_is_one_line_and_rerun(fake_main, capsys, content):
    name, cfg = first_run()
    path = sweeps.RESULTS / "orthogonality" / "full" / f"{name}.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert name not in sweeps.run_sweep("orthogonality", "full", run_missing=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if str(path) in line]
    assert len(lines) == 1 and "counts as missing" in lines[0]
    assert name in sweeps.run_sweep("orthogonality", "full") and sweeps.read_results(path)


def test_a_stale_run_folder_is_one_line_and_the_queue_goes_on(fake_main, monkeypatch, capsys):
    name, cfg = first_run()
    stale = sweeps.RUNS / "orthogonality" / name
    stale.mkdir(parents=True)
    fake = ssl_min.main

    def main(c):
        if Path(c.out_dir) == stale:
            raise ssl_min.UserError(f"{stale} holds an unfinished run with another seed; rerun with its options and "
                                    f"data to resume it, or pass another --out-dir (--overwrite discards it)")
        return fake(c)

    monkeypatch.setattr(ssl_min, "main", main)
    sweeps.queue("", 3600)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "not run" in line)
    assert f"delete {stale}" in line and "--out-dir" not in line and "--overwrite" not in line
    assert len(fake_main) == sum(len(sweeps.plan(s, "full")) for s in sweeps.COMMON) - 1  # every other run ran


def test_smoke_runs_write_nothing_into_the_repository(fake_main):
    results = sweeps.run_sweep("main", "smoke")
    assert len(results) == 1 and not sweeps.RESULTS.exists() and not sweeps.RUNS.exists()
    assert not Path(fake_main[0].out_dir).is_relative_to(REPO)


def test_full_data_counts_image_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(sweeps, "CIFAR10", dict(train=2, test=1))
    for path in ("train/a/1.png", "train/b/2.JPG", "test/a/3.jpeg"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / path, format="PNG")
    (tmp_path / "train" / "a" / ".DS_Store").write_text("x")
    sweeps.check_full_data(str(tmp_path))
    (tmp_path / "train" / "b" / "2.JPG").unlink()
    with pytest.raises(ssl_min.UserError, match="needs all of CIFAR-10"):
        sweeps.check_full_data(str(tmp_path))  # the .DS_Store does not make up for the missing image


# ---- The command line ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["queue", "--seconds", "nan"], ["queue", "--seconds", "inf"],
                                  ["queue", "--seconds", "0"], ["queue", "--seconds", "-5"],
                                  ["queue", "--seconds", "soon"], ["queue", "smoke"]])
def test_command_line_refuses_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        sweeps.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("sweeps: error:")


def test_sigterm_stops_in_one_line_and_keeps_the_finished_runs(fake_main, monkeypatch, capsys):
    fake, count = ssl_min.main, []

    def main(cfg):
        count.append(1)
        if len(count) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return fake(cfg)

    monkeypatch.setattr(ssl_min, "main", main)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            sweeps.cli(["orthogonality"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 130 and len(err) == 1 and "interrupted" in err[0]
    assert len(list((sweeps.RESULTS / "orthogonality" / "full").glob("*.json"))) == 1


# ---- The notebooks' helpers ------------------------------------------------------------------------------------------
def test_arms_keep_the_two_wide_betas_apart():
    arms = {sweeps.arm_of(dict(proj_dim=8192, beta=b, views=2, train_fraction=1.0)).beta for b in (0.0008, 0.0004)}
    assert arms == {"0.0008", "0.0004"}
    assert sweeps.arm_of(dict(proj_dim=128, beta=5 / 128, views=2, train_fraction=1.0)).beta == "5/d"


def test_setup_reports_a_corrupt_pilot_file_in_one_line(folders, monkeypatch, capsys):
    for variable in ("SSL_MIN_SMOKE", "SSL_MIN_SETTING"):
        monkeypatch.delenv(variable, raising=False)
    pilot = folders / "results" / "halved" / "pilot"
    pilot.mkdir(parents=True)
    name, cfg = first_run("halved")
    (pilot / "good.json").write_text(json.dumps(fake_results(cfg)))
    (pilot / "bad.json").write_text("")
    results, setting, title = sweeps.setup("halved")
    out = capsys.readouterr().out
    assert list(results) == ["good"] and setting == "pilot" and "pilot setting" in title
    assert sum("bad.json" in line for line in out.splitlines()) == 1 and "cannot test the claim" in out


def test_notebook_messages_name_the_environment_variable(folders, monkeypatch):
    monkeypatch.setenv("SSL_MIN_SETTING", "full")
    monkeypatch.setenv("SSL_MIN_DATA_DIR", str(folders))
    monkeypatch.setattr(sweeps.torch.cuda, "is_available", lambda: True)
    with pytest.raises(ssl_min.UserError, match="point SSL_MIN_DATA_DIR at a complete copy"):
        sweeps.setup("halved")


def test_one_real_tiny_run(tmp_path, monkeypatch):
    """ssl_min.main itself, on 20 random images: the results hold what sweeps and the notebooks read."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for c in range(10):
            (tmp_path / split / str(c)).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / str(c) / f"{i}.png")
    cfg = ssl_min.Config(views=2, proj_dim=8, beta=5 / 8, batch_size=10, epochs=1, eval_every=0, probe_views=1,
                         device="cpu")
    results = sweeps.run_one("main", "smoke", "tiny", cfg, str(tmp_path), tmp_path / "results")
    assert sweeps.read_results(tmp_path / "results" / "tiny.json") == json.loads(json.dumps(results))
    text = sweeps.describe("main", "smoke", {"tiny": results}) + sweeps.title("smoke", {"tiny": results})
    assert "SMOKE" in text and "20 labelled training images" in text and "cannot test the claim: smoke" in text
    assert sweeps.series(results, "knn_acc", "views")[1][-1] == pytest.approx(20 * 2 / 1e6)


# ---- The benchmark (benchmarks/throughput.py --smoke) ----------------------------------------------------------------
def run_smoke(tmp_path, *options) -> dict:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--smoke", "--json", str(out),
                           *options], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    h = result["header"]
    assert h["commit"] and h["device"] and h["cpu"]["cores"] >= 1 and h["threads"]["torch_intra_op"] == 1
    assert h["versions"]["torch"] == torch.__version__ and "cudnn" in h["versions"] and h["wall_s"] > 0
    assert {(r["step"], r["pipeline"]) for r in result["rows"]} >= {("augmentation", "usual (2 workers)"), (
        "augmentation", "ssl_min"), ("train", "usual (2 workers)"), ("train", "ssl_min")}
    for r in result["rows"]:
        assert 0 < r["views_per_s_min"] <= r["views_per_s"] <= r["views_per_s_max"], r
    assert min(r["waves"] for r in result["rows"] if r["step"] == "augmentation" and "waves" in r) >= 10
    lean, reference = result["probe"]
    assert lean["seconds"] > 0 and reference["seconds"] > 0 and lean["accuracy"] > 0.3  # above chance (10%)
    # Same computation, different kernels: at most one of the test samples may be classified differently.
    assert abs(lean["accuracy"] - reference["accuracy"]) <= 1 / lean["test_samples"] + 1e-9
    phases = {p["phase"] for p in result["profile"]["phases"]}
    assert phases == {"augmentation", "forward", "loss", "backward", "optimizer step"}
    assert abs(sum(p["share"] for p in result["profile"]["phases"]) - 1) < 1e-6
    assert len(result["ratios"]) >= 3 and all(line in done.stdout for line in result["ratios"])
    return result


def test_benchmark_smoke_records_provenance_positive_rates_and_equal_probes(tmp_path):
    """benchmarks/throughput.py --smoke: every CPU code path in about 15 s on 2 cores."""
    run_smoke(tmp_path, "--device", "cpu", "--workers", "2")


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled row")
def test_benchmark_smoke_on_cuda_has_the_compiled_row(tmp_path):
    result = run_smoke(tmp_path, "--device", "cuda", "--workers", "2")
    compiled = [r for r in result["rows"] if r["pipeline"] == "ssl_min, compiled"]
    assert len(compiled) == 1 and compiled[0]["first_call_s"] > 0 and compiled[0]["vs_eager"] > 0
    assert result["profile"]["compile"] and all(r["peak_mem_gib"] > 0 for r in result["rows"])


# ---- Notebooks, executed in smoke mode -------------------------------------------------------------------------------
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_in_smoke_mode(path, request, monkeypatch):
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    monkeypatch.setenv("SSL_MIN_SMOKE", "1")
    if not path.name.startswith("01_"):  # 01 needs no data; 02 and 03 pretrain on real images
        monkeypatch.setenv("SSL_MIN_DATA_DIR", str(request.getfixturevalue("cifar_small")))
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on any error
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert path.name.startswith("01_") or "SMOKE" in text  # experiment notebooks say they ran smoke runs
