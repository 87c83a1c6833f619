"""Tests of ssl_min.py in the file's order, then its command line, saving and resuming, and several processes (the
sweeps' and notebooks' tests are in notebooks/, the benchmark's in benchmarks/). `pytest -q -rs` runs them all on the
CPU; `pytest -m gpu -rs` runs those of a CUDA path, on the GPU where there is one (and on the CPU). Tests on real
images read the CIFAR-10 image folder named by SSL_MIN_DATA_DIR (train/<class>/, test/<class>/), else torchvision's
download; without either they are skipped."""
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import ssl_min

REPO = Path(__file__).resolve().parent


def load(path: Path):
    """A module of this repository that is not on the Python path, by its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = load(REPO / "benchmarks" / "throughput.py")  # its autograd probe is the lean probe's reference
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", "Unknown pytest.mark.gpu", pytest.PytestUnknownMarkWarning)  # no config file
gpu = pytest.mark.gpu
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here"))
DEVICES = ["cpu", CUDA]
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # train_step at float32: the scaler passes the step through


@pytest.fixture(scope="session", autouse=True)
def clean_temp_files(tmp_path_factory):
    """Runs write checkpoints of ~50 MB: remove this session's temporary folder when the tests end."""
    yield
    shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """An image folder of 50 training and 30 test images per class of the real CIFAR-10, drawn at random from
    SSL_MIN_DATA_DIR or the download."""
    root = tmp_path_factory.mktemp("cifar10_small")
    rng = np.random.default_rng(0)
    source = Path(os.environ.get("SSL_MIN_DATA_DIR", "/nonexistent"))
    if (source / "train").is_dir():
        for split, n in (("train", 50), ("test", 30)):
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
    for split, (images, labels), n in (("train", splits[:2], 50), ("test", splits[2:], 30)):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in sorted(rng.choice(np.flatnonzero(labels.numpy() == c), n, replace=False)):
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / split / cls / f"{i}.png")
    return root


def run(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "ssl_min.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=900)


def assert_one_line_error(result, *words, code=1):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def cli_error(argv, capsys) -> tuple:
    """ssl_min's command line in this process: its exit code and the lines it wrote to stderr."""
    with pytest.raises(SystemExit) as stop:
        ssl_min.cli(list(map(str, argv)))
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def tiny(data_dir, out, **kw) -> ssl_min.Config:
    settings = dict(data_dir=str(data_dir), subset=10, views=2, proj_dim=32, batch_size=25, epochs=2, eval_every=0,
                    device="cpu", out_dir=str(out))
    return ssl_min.Config(**{**settings, **kw})


def png(path, size=(32, 32), mode="RGB", colour=(120, 30, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


# ---- Data ------------------------------------------------------------------------------------------------------------
def test_class_balanced_takes_a_seeded_random_share_of_every_class():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 110, 10))  # class c has 10 (c + 1) images
    half = ssl_min.class_balanced(labels, seed=0, fraction=0.5)
    assert labels[half].bincount().tolist() == [5 * (c + 1) for c in range(10)]
    assert torch.equal(half, ssl_min.class_balanced(labels, seed=0, fraction=0.5))
    assert not torch.equal(half, ssl_min.class_balanced(labels, seed=1, fraction=0.5))
    first = torch.cat([torch.nonzero(labels == c)[:5 * (c + 1), 0] for c in range(10)])
    assert not torch.equal(half, first)  # random within each class, not the first images
    assert labels[ssl_min.class_balanced(labels, seed=0, per_class=3)].bincount().tolist() == [3] * 10
    with pytest.raises(ssl_min.UserError, match="--subset 11: class 0 has only 10 images"):
        ssl_min.class_balanced(labels, seed=0, per_class=11)


def test_load_data_subset_train_fraction_and_process_shares(cifar_small):
    cfg = ssl_min.Config(data_dir=str(cifar_small), subset=20, train_fraction=0.5, seed=3, batch_size=20)
    data = ssl_min.load_data(cfg, torch.device("cpu"))
    assert data.train_images.shape == (200, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.train_labels.bincount().tolist() == [20] * 10 and data.test_labels.bincount().tolist() == [20] * 10
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and data.ssl_images.shape == (100, 3, 32, 32)
    matches = (data.ssl_images[:, None] == data.train_images[None]).flatten(2).all(2)  # half of every class
    assert data.train_labels[matches.float().argmax(1)].bincount().tolist() == [10] * 10
    other = ssl_min.load_data(replace(cfg, seed=4), torch.device("cpu"))
    assert torch.equal(ssl_min.load_data(cfg, torch.device("cpu")).ssl_images, data.ssl_images)
    assert not torch.equal(other.ssl_images, data.ssl_images) and data.fingerprint != other.fingerprint
    # torchrun: 3 processes get disjoint equal shares of the 100 images (33 each, 1 left out)
    shares = torch.cat([ssl_min.load_data(cfg, torch.device("cpu"), r, 3).ssl_images.flatten(1) for r in range(3)])
    assert len(shares) == 99 and len(shares.unique(dim=0)) == 99
    assert (shares[:, None] == data.ssl_images.flatten(1)[None]).all(2).any(1).all()


def test_the_same_images_listed_in_another_order_give_the_same_data(cifar_small, tmp_path):
    """The download and an image folder list CIFAR-10 in other orders: the seeded subsets must not depend on it."""
    for split in ("train", "test"):  # the same files under names that sort the other way round
        for folder in (cifar_small / split).iterdir():
            files = sorted(folder.iterdir())
            (tmp_path / split / folder.name).mkdir(parents=True)
            for i, f in enumerate(files):
                (tmp_path / split / folder.name / f"{len(files) - i:04d}.png").symlink_to(f.resolve())
    cfg = ssl_min.Config(data_dir=str(cifar_small), subset=20, train_fraction=0.5, batch_size=20)
    data, again = (ssl_min.load_data(replace(cfg, data_dir=str(folder)), torch.device("cpu"))
                   for folder in (cifar_small, tmp_path))
    for name in ("ssl_images", "train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(data, name), getattr(again, name)), name
    assert data.fingerprint == again.fingerprint


def bad_folders(root):
    """Each case: a broken image folder and the words its one-line error must hold."""
    layout = [f"{folder}/<class>/*.png" for folder in (root / "nope" / "train", root / "nope" / "test")]
    cases = {"missing": (root / "nope", ["No such file", *layout])}  # what the folder must hold
    (root / "empty" / "train").mkdir(parents=True)
    cases["no class folders"] = (root / "empty", ["class folder", "train/<class>/*.png"])
    for split in ("train", "test"):
        png(root / "deep16" / split / "cat" / "a.png", mode="I;16", colour=4000)
        png(root / "sizes" / split / "cat" / "a.png")
        png(root / "broken" / split / "cat" / "a.png")
    cases["16-bit gray PNG"] = (root / "deep16", ["a.png", "I;16", "8-bit"])
    png(root / "sizes" / "train" / "cat" / "b.png", (40, 30))
    cases["mixed sizes"] = (root / "sizes", ["several sizes", "(30, 40, 3)", "resize"])
    (root / "broken" / "train" / "cat" / "b.png").write_bytes(b"not an image")
    cases["unreadable image"] = (root / "broken", ["b.png", "test/<class>/*.png"])
    return cases


def test_bad_data_dirs_get_one_line_and_write_nothing(tmp_path, capsys):
    for name, (folder, words) in bad_folders(tmp_path / "data").items():
        code, err = cli_error(["--data-dir", folder, "--batch-size", "2", "--out-dir", tmp_path / "out"], capsys)
        assert code == 1 and len(err) == 1 and all(w in err[0] for w in words), (name, err)
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


def test_augment_is_seeded_and_draws_parameters_per_image_and_per_view():
    images = colourful(1).expand(16, -1, -1, -1)  # 16 copies of one image
    x = ssl_min.augment(images, 4, torch.Generator().manual_seed(3))
    assert x.shape == (4, 16, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, ssl_min.augment(images, 4, torch.Generator().manual_seed(3)))
    assert len({tuple(v.flatten()[:64].tolist()) for v in x.flatten(0, 1)}) == 64  # all 64 views differ


@pytest.mark.parametrize("p_gray", [0.0, 0.2, 0.6])
def test_augment_grayscale_rate_follows_p_gray(p_gray):
    x = ssl_min.augment(colourful(2000, size=8), 1, torch.Generator().manual_seed(0), p_gray=p_gray)[0]
    gray = ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-6) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert abs(gray.float().mean().item() - p_gray) < 0.04


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
def test_backbone_at_width_64_is_torchvisions_resnet18_with_the_cifar_stem_and_width_scales_it():
    reference = torchvision.models.resnet18()  # the CIFAR stem: a 3x3 convolution of stride 1, no max-pool; no fc
    reference.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    reference.maxpool, reference.fc = nn.Identity(), nn.Identity()
    backbone = ssl_min.ResNet18(torch.full((3,), 0.5), torch.full((3,), 0.25))
    assert {k: v.shape for k, v in backbone.net.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}  # the same layers, names and shapes: 11.2 M weights
    reference.load_state_dict(backbone.net.state_dict())
    x = torch.rand(6, 3, 32, 32)
    assert torch.allclose(backbone.eval()(x), reference.eval()((x - 0.5) / 0.25), atol=1e-5)
    narrow = ssl_min.SSLNet(24, torch.full((3,), 0.5), torch.full((3,), 0.25), width=16)
    assert narrow.backbone(x).shape == (6, 128) and narrow(x).shape == (6, 24)
    counts = [sum(p.numel() for p in net.parameters()) for net in (reference, narrow.backbone)]
    assert counts[0] == 11_168_832 and abs(16 * counts[1] / counts[0] - 1) < 0.01  # convolutions scale as width^2
    linear1, norm, relu, linear2 = narrow.projector
    assert linear1.bias is None and linear2.bias is None and isinstance(norm, nn.BatchNorm1d)
    assert (linear1.in_features, linear1.out_features, linear2.out_features) == (128, 24, 24)


def test_build_normalizes_by_the_pretraining_images_statistics_and_seeds_the_initialization():
    images = colourful(10)
    images[:, 1] = 7  # a constant channel must not divide by zero
    net, _, scaler = ssl_min.build(ssl_min.Config(proj_dim=8, width=8), images, torch.device("cpu"))
    mean, std = net.backbone.mean.flatten(), net.backbone.std.flatten()
    assert torch.allclose(mean[1], torch.tensor(7 / 255)) and std[1] > 0 and std[0] > 0.2 and not scaler.is_enabled()
    again, _, _ = ssl_min.build(ssl_min.Config(proj_dim=8, width=8), images, torch.device("cpu"))
    other, _, _ = ssl_min.build(ssl_min.Config(proj_dim=8, width=8, seed=1), images, torch.device("cpu"))
    weights = [n.backbone.net.conv1.weight for n in (net, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


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


def assert_same_value_and_gradient(loss, reference, z):
    """loss(z) and reference(z) agree in value and in their gradient with respect to z."""
    values, gradients = [], []
    for fn in (loss, reference):
        leaf = z.clone().requires_grad_()
        value = fn(leaf)
        value.backward()
        values.append(value.item())
        gradients.append(leaf.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-10) and torch.allclose(*gradients, rtol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 0.005, 1 / 16, 1.0])
def test_barlow_at_two_views_equals_textbook_barlowtwins_in_value_and_gradient(beta):
    z = embeddings(2)
    assert_same_value_and_gradient(lambda z: ssl_min.ssl_loss(z, beta)[0], lambda z: textbook_barlow(*z, beta), z)
    invariance = ssl_min.ssl_loss(z, beta)[1]
    assert invariance.item() == pytest.approx(textbook_barlow(z[0], z[1], 0.0).item(), rel=1e-10)


@pytest.mark.parametrize("d,beta,scale", [(8, None, 1.0), (32, None, 0.3), (16, 0.01, 0.5)])
def test_vicreg_at_two_views_equals_textbook_vicreg_in_value_and_gradient(d, beta, scale):
    """beta = 1/(25 d) gives VICReg's own 25/25/1 weights; another beta maps to the covariance weight 25 beta d.
    At scale < 1 the embeddings' spread is below 1, where the variance hinge acts."""
    beta = beta or ssl_min.default_beta(d, "vicreg")
    assert_same_value_and_gradient(lambda z: ssl_min.ssl_loss(z, beta, "vicreg")[0],
                                   lambda z: textbook_vicreg(*z, cov_coeff=25 * beta * d), scale * embeddings(2, d=d))


@pytest.mark.parametrize("V", [3, 4, 8])
def test_multiview_loss_equals_pairwise_reference_in_value_and_gradient(V):
    assert_same_value_and_gradient(lambda z: ssl_min.ssl_loss(z, 0.05)[0], lambda z: pairwise_reference(z, 0.05),
                                   embeddings(V, seed=V))


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
    assert ssl_min.ssl_loss(z.bfloat16(), 0.05, loss)[0].dtype == torch.float32  # bf16 correlations are too coarse


@pytest.mark.parametrize("spectrum", [[1.0], [1.0] * 32, [4.0, 2.0, 1.0, 1.0], [10.0, 1.0, 0.1]])
def test_effective_rank_is_the_exponential_entropy_of_the_spectrum(spectrum):
    q = torch.linalg.qr(torch.randn(200, 32, generator=torch.Generator().manual_seed(0)))[0]
    z = q[:, :len(spectrum)] * torch.tensor(spectrum) @ torch.linalg.qr(torch.randn(32, 32))[0][:len(spectrum)]
    p = torch.tensor(spectrum) / sum(spectrum)
    assert ssl_min.effective_rank(z) == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-4)


# ---- Training --------------------------------------------------------------------------------------------------------
def test_train_step_lowers_the_loss_on_a_fixed_batch_and_updates_every_weight():
    images = colourful(16)
    net, optimizer, scaler = ssl_min.build(ssl_min.Config(proj_dim=16), images, torch.device("cpu"))
    before = {k: p.clone() for k, p in net.named_parameters()}
    views = ssl_min.augment(images, 2, torch.Generator().manual_seed(0))
    losses = [ssl_min.train_step(net, optimizer, scaler, views, 5 / 16, "barlow") for _ in range(6)]
    assert losses[0].shape == (3,) and losses[0][0] == pytest.approx(losses[0][1:].sum().item())
    assert losses[-1][0] < 0.8 * losses[0][0]
    assert all(not torch.equal(before[k], p) for k, p in net.named_parameters())
    frozen = torch.optim.SGD(net.parameters(), lr=0.0)  # the same step twice: the same gradient, not the sum of two
    ssl_min.train_step(net, frozen, NO_SCALER, views, 5 / 16, "barlow")
    first = [p.grad.clone() for p in net.parameters()]
    ssl_min.train_step(net, frozen, NO_SCALER, views, 5 / 16, "barlow")
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(first, net.parameters()))


@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
                         ids=["V100", "T4", "A100", "H100"])
def test_precision_is_bf16_where_the_gpu_has_it_float16_before_and_float32_on_the_cpu(capability, dtype, monkeypatch):
    assert ssl_min.precision(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)  # no GPU needed
    assert ssl_min.precision(torch.device("cuda")) == ssl_min.precision(torch.device("cuda:1")) == dtype


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_precision_on_this_gpu_agrees_with_torchs_own_bf16_check():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert ssl_min.precision(torch.device("cuda")) == (torch.bfloat16 if native else torch.float16)


def float16_on_the_cpu(monkeypatch):
    """The rule's choice on a T4, made on the CPU (whose autocast runs float16 too): a GradScaler and fused Adam."""
    monkeypatch.setattr(ssl_min, "precision", lambda device: torch.float16)


def test_a_float16_step_runs_in_float16_is_scaled_and_an_overflowing_one_is_skipped(monkeypatch):
    float16_on_the_cpu(monkeypatch)
    images = colourful(16)
    net, optimizer, scaler = ssl_min.build(ssl_min.Config(proj_dim=16, width=8), images, torch.device("cpu"))
    assert scaler.is_enabled() and optimizer.defaults["fused"]
    dtypes = []
    net.projector.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    views = ssl_min.augment(images, 2, torch.Generator().manual_seed(0))
    losses = [ssl_min.train_step(net, optimizer, scaler, views, 5 / 16, "barlow") for _ in range(24)]
    assert dtypes[0] == torch.float16 and all(loss.dtype == torch.float32 for loss in losses)  # the loss in float32
    assert scaler.get_scale() < 2 ** 16 and losses[-1][0] < 0.8 * losses[0][0]  # skips at first, then learns
    before, scale, real = {k: p.clone() for k, p in net.named_parameters()}, scaler.get_scale(), ssl_min.ssl_loss
    monkeypatch.setattr(ssl_min, "ssl_loss", lambda z, beta, loss: [t * float("inf") for t in real(z, beta, loss)])
    assert not ssl_min.train_step(net, optimizer, scaler, views, 5 / 16, "barlow").isfinite().all()
    assert scaler.get_scale() == scale / 2 and all(torch.equal(before[k], p) for k, p in net.named_parameters())


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
    """The same accuracy as the benchmark's autograd probe, to two test samples in a thousand (float rounding differs
    between the two orders of operations), early and late in training."""
    (train_f, train_y), (test_f, test_y) = (clusters(n, 64, 10, s, spread=12.0) for n, s in ((3000, 0), (2000, 1)))
    train_f, train_y, test_f, test_y = (t.to(device) for t in (train_f, train_y, test_f, test_y))
    for epochs in (3, 20):
        lean = ssl_min.linear_probe(train_f, train_y, test_f, test_y, 10, epochs=epochs)
        reference = throughput.reference_probe(train_f, train_y, test_f, test_y, 10, epochs)
        assert abs(lean - reference) <= 2e-3 and 0.3 < lean < 0.9, (epochs, lean, reference)


@gpu
@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_averages_one_clean_and_augmented_views_in_float32_and_leaves_the_net_training(device):
    """The probe's augmented views are made in float32 (not inside bf16 autocast), then averaged with the clean view;
    evaluate() puts the network back in training mode."""
    backbone = ssl_min.ResNet18(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device).eval()
    images = colourful(4).to(device)
    three = ssl_min.features(backbone, images, 3, torch.Generator(device).manual_seed(0))
    views = ssl_min.augment(images, 2, torch.Generator(device).manual_seed(0))
    x = torch.cat([images.float().unsqueeze(0) / 255, views]).flatten(0, 1)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
        by_hand = backbone(x).float().view(3, 4, -1).mean(0)
    assert three.shape == (4, 512) and not torch.allclose(three, ssl_min.features(backbone, images), atol=1e-3)
    assert torch.allclose(three, by_hand, atol=1e-5)
    labels = torch.arange(4) % 2
    data = ssl_min.Data(images, images, labels.to(device), images, labels.to(device), ["a", "b"], "")
    net = ssl_min.SSLNet(8, torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device)
    result = ssl_min.evaluate(net, data, 2, torch.Generator(device).manual_seed(0))
    assert net.training and set(result) == {"knn_acc", "erank", "probe_acc"}


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


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        ssl_min.cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(ssl_min.Config):
        if f.default not in ("", None) and f.default is not False:
            assert f"{f.metadata['help']} (default: {f.default})" in text, f.name


BAD_OPTIONS = [(["--views", "1"], "at least 2"), (["--seed", "-1"], "from 0 to"), (["--lr", "inf"], "--lr"),
               (["--loss", "simclr"], "invalid choice"), (["--train-fraction", "1.5"], "to 1"),
               (["--batch-size", "1"], "at least 2"), (["--beta", "nan"], "--beta"),
               (["--epochs", "two"], "invalid int"), (["--view", "3"], "unrecognized"), (["--over"], "unrecognized"),
               (["--device", "gpu"], "invalid choice"), (["--device", "cuda:99"], "invalid choice"),
               (["--width", "0"], "at least 1")]


@pytest.mark.parametrize("argv,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_gets_one_line_and_writes_nothing(argv, words, tmp_path, capsys):
    code, err = cli_error([*argv, "--out-dir", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_cuda_without_a_gpu_says_so_first(tmp_path, capsys):
    code, err = cli_error(["--device", "cuda", "--data-dir", tmp_path / "none", "--out-dir", tmp_path / "out"], capsys)
    assert code == 1 and err == ["ssl_min: error: --device cuda: no CUDA GPU here; use --device cpu"]


def test_an_unexpected_error_keeps_its_traceback(cifar_small, tmp_path, monkeypatch):
    """A bug (here in the augmentation), or PyTorch failing on some GPU: not cut to one line, so it can be reported."""
    monkeypatch.setattr(ssl_min, "augment", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ssl_min.cli(["--data-dir", str(cifar_small), "--subset", "5", "--batch-size", "25", "--device", "cpu",
                     "--out-dir", str(tmp_path / "out")])


def test_batch_larger_than_the_pretraining_set_is_refused(cifar_small, tmp_path, capsys):
    code, err = cli_error(["--data-dir", cifar_small, "--subset", "5", "--batch-size", "60", "--out-dir",
                           tmp_path / "out"], capsys)
    assert code == 1 and err == ["ssl_min: error: --batch-size 60 is more than the 50 pretraining images"]


# ---- Saving and resuming ---------------------------------------------------------------------------------------------
def test_a_run_folder_resumes_only_its_own_unfinished_run_and_a_refusal_keeps_it(finished_run, cifar_small, tmp_path,
                                                                                 capsys):
    finished, _ = finished_run
    files = {p.name: p.read_bytes() for p in finished.iterdir()}
    code, err = cli_error(["--data-dir", cifar_small, *QUICK, "--epochs", "2", "--out-dir", finished], capsys)
    assert code == 1 and len(err) == 1 and "finished run" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == files
    out = tmp_path / "unfinished"  # the finished run without its results: a run stopped after 2 epochs
    shutil.copytree(finished, out)
    (out / "results.json").unlink()
    changed = tmp_path / "changed"  # the same folder name and images, one of them edited
    shutil.copytree(cifar_small, changed)
    first = sorted((changed / "train" / "airplane").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for options, words in ((["--views", "3"], "another views"), (["--seed", "1"], "another seed"),
                           (["--width", "32"], "another width"),
                           (["--data-dir", changed], "another data"), (["--epochs", "1"], "trained 2 epochs"),
                           ("cuda", "another device")):
        if options == "cuda":
            torch.save({**state, "device": "cuda"}, out / "checkpoint.pt")  # as saved on a GPU
            options = []
        before = (out / "checkpoint.pt").read_bytes()
        code, err = cli_error(["--data-dir", cifar_small, *QUICK, "--epochs", "3", "--out-dir", out, *options], capsys)
        assert code == 1 and len(err) == 1 and words in err[0], (options, err)
        assert (out / "checkpoint.pt").read_bytes() == before
    torch.save(state, out / "checkpoint.pt")  # resumed with as many epochs: only evaluated, with other probe views
    results = ssl_min.main(ssl_min.Config(**{**state["config"], "out_dir": str(out), "probe_views": 2}))
    printed = capsys.readouterr().out
    assert "resuming" in printed and "/2  loss" not in printed and results["config"]["probe_views"] == 2
    assert len(results["log"]) == 2 and results["log"][0] == state["log"][0]


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
    with pytest.raises(ssl_min.UserError, match=r"non-finite at epoch 2, step 2 \(3 of 4 steps\): lower --beta or"):
        ssl_min.main(tiny(cifar_small, tmp_path / "out"))
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point())


def overflow_at(steps, monkeypatch):
    """ssl_min's loss made infinite at these steps (1 to 4) of every 4 steps, counted from this process's first."""
    calls, real = [], ssl_min.ssl_loss

    def overflowing(z, beta, loss="barlow"):
        calls.append(1)
        total, invariance, orthogonality = real(z, beta, loss)
        return (total * float("inf") if (len(calls) - 1) % 4 + 1 in steps else total), invariance, orthogonality

    monkeypatch.setattr(ssl_min, "ssl_loss", overflowing)


def test_float16_skips_an_overflowing_step_keeps_its_scale_in_the_checkpoint_and_resumes_exactly(cifar_small,
                                                                                                 tmp_path, monkeypatch):
    float16_on_the_cpu(monkeypatch)
    overflow_at({3}, monkeypatch)  # step 3 of each epoch of 4 steps
    whole = ssl_min.main(tiny(cifar_small, tmp_path / "whole", width=8))
    assert whole["precision"] == "float16" and [e["nonfinite_steps"] for e in whole["log"]] == [1, 1]
    assert all(math.isfinite(e["loss"]) for e in whole["log"]) and math.isfinite(whole["probe_acc"])
    saved = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert saved["scaler"]["scale"] <= 2 ** 15  # lowered by the skipped steps, and kept for a resume
    monkeypatch.undo()  # the same run stopped in its second epoch, then resumed
    float16_on_the_cpu(monkeypatch)
    overflow_at({3}, monkeypatch)
    interrupt_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        ssl_min.main(tiny(cifar_small, tmp_path / "stopped", width=8))
    monkeypatch.undo()
    float16_on_the_cpu(monkeypatch)
    overflow_at({3}, monkeypatch)  # the resumed process's step 3 is the run's epoch 2, step 3
    resumed = ssl_min.main(tiny(cifar_small, tmp_path / "stopped", width=8))
    ckpt = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert comparable(resumed["log"]) == comparable(whole["log"]) and ckpt["scaler"] == saved["scaler"]
    assert all(torch.equal(ckpt["model"][k], saved["model"][k]) for k in saved["model"])
    monkeypatch.undo()
    float16_on_the_cpu(monkeypatch)
    overflow_at({1, 2, 3}, monkeypatch)  # 3 of every 4 steps: diverged, not the scaler's business
    with pytest.raises(ssl_min.UserError, match=r"non-finite at epoch 1, step 1 \(3 of 4 steps\): lower --beta"):
        ssl_min.main(tiny(cifar_small, tmp_path / "diverged", width=8))


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


@pytest.mark.parametrize("error", [subprocess.TimeoutExpired("git", 10), FileNotFoundError("git")])
def test_a_slow_or_missing_git_gives_no_commit_and_no_error(monkeypatch, error):
    real = subprocess.run

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


# ---- Stops: Ctrl-C, SIGTERM and SIGKILL lose at most the current epoch; the resumed run is the same run -------------
RESUME_ARGS = ["--subset", "10", "--views", "2", "--proj-dim", "32", "--batch-size", "20", "--epochs", "2",
               "--eval-every", "1"]


def catch_ctrl_c():
    """In the run's process: Ctrl-C's signal handled, as in a terminal, even where these tests run in the background
    (a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               preexec_fn=catch_ctrl_c)
    deadline = time.time() + 600
    while not (out / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    if sig != signal.SIGKILL:
        assert process.returncode == 130 and len(err.strip().splitlines()) == 1, err
        assert "interrupted; the checkpoint after epoch 1" in err and "rerun the same command" in err, err
    resumed = run(*args, "--out-dir", out)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["precision"] == str(ssl_min.precision(torch.device(device))).removeprefix("torch.")
    if device == "cuda":  # cuDNN's autotuned kernels differ in the last bits from run to run
        for a, b in zip(results["log"], whole["log"]):
            assert a["epoch"] == b["epoch"] and a["loss"] == pytest.approx(b["loss"], rel=0.05), (a, b)
        return
    assert comparable(results["log"]) == comparable(whole["log"]) and results["probe_acc"] == whole["probe_acc"]
    model = torch.load(out / "checkpoint.pt")["model"]  # on the CPU every kernel is deterministic: bit for bit
    assert all(torch.equal(model[k], whole_ckpt["model"][k]) for k in model)


# ---- The GPU paths: compile, no host sync, out of memory -------------------------------------------------------------
@gpu
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_steps_match_eager_ones_and_evaluation_does_not_recompile(device, cifar_small, tmp_path,
                                                                            monkeypatch):
    """Inductor on CUDA (as main compiles), aot_eager on the CPU (the same graph capture, without minutes of C++)."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the compiler's files go with the test's
    cfg = ssl_min.Config(data_dir=str(cifar_small), subset=4, batch_size=20, proj_dim=32, device=device)
    data = ssl_min.load_data(cfg, torch.device(device))
    views = ssl_min.augment(data.ssl_images[:20], 2, torch.Generator(device).manual_seed(0))
    losses = []
    for compiled in (False, True):
        net, optimizer, scaler = ssl_min.build(cfg, data.ssl_images, torch.device(device))
        if compiled:
            torch.compiler.reset()
            net.compile(backend="inductor" if device == "cuda" else "aot_eager")
        losses.append(torch.stack([ssl_min.train_step(net, optimizer, scaler, views, 0.1, "barlow")
                                   for _ in range(3)]))
    graphs = counters["stats"]["unique_graphs"]
    ssl_min.evaluate(net, data)
    ssl_min.train_step(net, optimizer, scaler, views, 0.1, "barlow")
    tolerance = 2e-2 if device == "cuda" else 1e-4  # bf16 on the GPU: the fused kernels round differently
    assert torch.allclose(losses[0], losses[1], rtol=tolerance), losses
    assert counters["stats"]["unique_graphs"] == graphs


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_no_host_sync_inside_the_training_step():
    images = colourful(64).cuda()
    net, optimizer, scaler = ssl_min.build(ssl_min.Config(proj_dim=32), images, images.device)
    generator = torch.Generator("cuda").manual_seed(0)
    ssl_min.train_step(net, optimizer, scaler, ssl_min.augment(images, 2, generator), 0.1, "barlow")  # set up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ssl_min.train_step(net, optimizer, scaler, ssl_min.augment(images, 2, generator), 0.1, "barlow")
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
scaler = torch.amp.GradScaler("cpu", enabled=False)
b, steps = views.shape[2] // 2, []
for v in views:  # each step: the weights before it, its losses, and the gradients that DDP averaged
    before = {k: w.clone() for k, w in net.state_dict().items()}
    losses = ssl_min.train_step(model, optimizer, scaler, v[:, rank * b:(rank + 1) * b], 0.3, "barlow")
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
        losses = ssl_min.train_step(TwoProcessStatistics(net, 2), gradients_only, NO_SCALER, v, 0.3, "barlow")
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
    assert ", 2 processes" in result.stdout and "pretraining on 100 images" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and results["data"]["pretrain"] == 100 and len(results["log"]) == 2
    assert results["config"]["compile"] is False  # compile + DDP is off by default
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["processes"] == 2 and len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0], ckpt["rng"][1])
    (out / "results.json").unlink()  # resumed by one process: refused in one line, the checkpoint kept
    assert_one_line_error(run("--data-dir", cifar_small, *args, "--epochs", "3", "--out-dir", out), "processes")
