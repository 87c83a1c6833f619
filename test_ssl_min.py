"""Tests for ssl_min, in the order of ssl_min.py. Run: pytest -q -rs

Tests on real images use a small class-balanced folder built from the CIFAR-10 image folder in $SSL_MIN_CIFAR10 or
../shared/data/cifar10, or else from CIFAR-10 downloaded by torchvision to ~/.cache/ssl_min (as ssl_min.py does);
they skip, saying why, when neither is available. Everything runs on the CPU; the temporary files are removed.
"""
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image

import ssl_min

REPO = Path(__file__).resolve().parent
CIFAR = Path(os.environ.get("SSL_MIN_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def clean_temp_files(tmp_path_factory):
    """A full run writes ~1 GB of checkpoints: remove this session's temporary folder when the tests end."""
    yield
    shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


def small_cifar10(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """A CIFAR-10 image folder with `train` and `test` random images per class: links to the real image folder, or
    PNG files written from the torchvision download."""
    rng = np.random.default_rng(seed)
    if (CIFAR / "train").is_dir():
        for split, n in (("train", train), ("test", test)):
            for cls in sorted(p.name for p in (CIFAR / split).iterdir()):
                files = sorted((CIFAR / split / cls).iterdir())
                (root / split / cls).mkdir(parents=True)
                for i in sorted(rng.choice(len(files), n, replace=False)):
                    (root / split / cls / files[i].name).symlink_to(files[i])
        return root
    import torchvision
    try:
        splits = {s: torchvision.datasets.CIFAR10(Path.home() / ".cache" / "ssl_min", train=s == "train", download=True)
                  for s in ("train", "test")}
    except Exception as e:
        pytest.skip(f"no CIFAR-10 image folder at {CIFAR} (or $SSL_MIN_CIFAR10), and no download ({type(e).__name__})")
    for split, n in (("train", train), ("test", test)):
        data, labels = splits[split].data, np.array(splits[split].targets)
        for c, cls in enumerate(splits[split].classes):
            (root / split / cls).mkdir(parents=True)
            for i in sorted(rng.choice(np.flatnonzero(labels == c), n, replace=False)):
                Image.fromarray(data[i]).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory):
    """50 training and 30 test images per class of the real CIFAR-10."""
    return small_cifar10(tmp_path_factory.mktemp("cifar10_small"), train=50, test=30)


def run(*args, env=None, **kw):
    return subprocess.run([sys.executable, str(REPO / "ssl_min.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=900, **kw)


def assert_one_line_error(result, *words, code=2):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def tiny(cifar_small, out, **kw):
    settings = dict(data_dir=str(cifar_small), subset=10, views=2, proj_dim=32, batch_size=25, epochs=2, eval_every=0)
    return ssl_min.Config(**{**settings, **kw}, out_dir=str(out))


def png(path, size=(32, 32), mode="RGB", colour=(120, 30, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_class_balanced_takes_a_seeded_random_share_of_every_class():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 110, 10))  # class c has 10 (c + 1) images
    half = ssl_min.class_balanced(labels, seed=0, fraction=0.5)
    assert labels[half].bincount().tolist() == [round(5 * (c + 1)) for c in range(10)]
    assert torch.equal(half, ssl_min.class_balanced(labels, seed=0, fraction=0.5))
    assert not torch.equal(half, ssl_min.class_balanced(labels, seed=1, fraction=0.5))
    first = torch.cat([torch.nonzero(labels == c)[:5 * (c + 1), 0] for c in range(10)])
    assert not torch.equal(half, first)  # random within each class, not the first images
    three = ssl_min.class_balanced(labels, seed=0, per_class=3)
    assert labels[three].bincount().tolist() == [3] * 10


def test_load_data_subset_and_train_fraction(cifar_small):
    cfg = ssl_min.Config(data_dir=str(cifar_small), subset=20, train_fraction=0.5, seed=3, batch_size=20)
    data = ssl_min.load_data(cfg, torch.device("cpu"))
    assert data.train_images.shape == (200, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.train_labels.bincount().tolist() == [20] * 10 and data.test_labels.bincount().tolist() == [20] * 10
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and data.ssl_images.shape == (100, 3, 32, 32)
    # the pretraining images are half of every class of the training images
    matches = (data.ssl_images[:, None] == data.train_images[None]).flatten(2).all(2)
    assert data.train_labels[matches.float().argmax(1)].bincount().tolist() == [10] * 10
    again = ssl_min.load_data(cfg, torch.device("cpu"))
    other = ssl_min.load_data(ssl_min.Config(data_dir=str(cifar_small), subset=20, train_fraction=0.5, seed=4, batch_size=20),
                              torch.device("cpu"))
    assert torch.equal(again.ssl_images, data.ssl_images) and not torch.equal(other.ssl_images, data.ssl_images)


def test_load_data_gives_processes_disjoint_equal_shares(cifar_small):
    cfg = ssl_min.Config(data_dir=str(cifar_small), subset=11, batch_size=20)
    whole = ssl_min.load_data(cfg, torch.device("cpu")).ssl_images
    shares = [ssl_min.load_data(cfg, torch.device("cpu"), rank, 3).ssl_images.flatten(1) for rank in range(3)]
    assert [len(s) for s in shares] == [36] * 3  # 110 images: 36 each, 2 left out
    union = torch.cat(shares)
    assert len(union.unique(dim=0)) == 108 and (union[:, None] == whole.flatten(1)[None]).all(2).any(1).all()


def bad_folders(root):
    """Each case: a broken image folder and words its error must name."""
    cases = {"missing": (root / "nope", ["does not exist"])}
    png(root / "file.png")
    cases["a file"] = (root / "file.png", ["is a file"])
    (root / "empty").mkdir(parents=True)
    cases["empty"] = (root / "empty", ["train", "missing"])
    png(root / "flat" / "train" / "a.png")
    cases["no class folders"] = (root / "flat", ["no class folders"])
    png(root / "notest" / "train" / "cat" / "a.png")
    cases["no test split"] = (root / "notest", ["test", "missing"])
    for split in ("train", "test"):
        png(root / "junk" / split / "cat" / "a.png")
    (root / "junk" / "train" / "cat" / "notes.txt").write_text("not an image")
    cases["non-image file"] = (root / "junk", ["notes.txt", "cannot read"])
    for split in ("train", "test"):
        png(root / "sizes" / split / "cat" / "a.png")
    png(root / "sizes" / "train" / "cat" / "b.png", (40, 30))
    cases["mixed sizes"] = (root / "sizes", ["b.png", "40x30", "resize"])
    png(root / "splits" / "train" / "cat" / "a.png", (8, 8))
    png(root / "splits" / "test" / "cat" / "a.png")
    cases["train 8 px, test 32 px"] = (root / "splits", ["differ", "[3, 8, 8]", "[3, 32, 32]"])
    png(root / "classes" / "train" / "cat" / "a.png")
    png(root / "classes" / "test" / "dog" / "a.png")
    cases["different classes"] = (root / "classes", ["differ", "cat", "dog"])
    for split in ("train", "test"):
        png(root / "emptyclass" / split / "cat" / "a.png")
        png(root / "emptyclass" / split / "dog" / "deeper" / "a.png")
    cases["class with images only in a subfolder"] = (root / "emptyclass", ["class dog", "holds no images", "subfolders"])
    for split in ("train", "test"):
        png(root / "deep16" / split / "cat" / "a.png", mode="I;16", colour=4000)
    cases["16-bit gray PNG"] = (root / "deep16", ["a.png", "I;16", "8-bit"])
    for split in ("train", "test"):
        png(root / "bomb" / split / "cat" / "a.png")
    bomb = Image.new("1", (14000, 14000))  # 190 megapixels in a small file: PIL refuses to decode it
    bomb.save(root / "bomb" / "train" / "cat" / "b.png")
    cases["decompression bomb"] = (root / "bomb", ["b.png", "cannot read"])
    for split in ("train", "test"):
        png(root / "constant" / split / "cat" / "a.png")
        png(root / "constant" / split / "cat" / "b.png")
    cases["constant images"] = (root / "constant", ["constant colour"])
    return cases


def test_bad_data_dirs_get_one_clear_line_and_write_nothing(tmp_path, capsys):
    for name, (folder, words) in bad_folders(tmp_path / "data").items():
        with pytest.raises(SystemExit) as exit:
            ssl_min.cli(["--data-dir", str(folder), "--batch-size", "2", "--out-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1, (name, err)
        assert all(w in err[0] for w in words), (name, err)
        assert "--data-dir" in err[0] or name == "constant images", (name, err)
        assert not (tmp_path / "out").exists(), name


def test_subset_larger_than_a_class_is_refused_naming_the_class(cifar_small, capsys, tmp_path):
    with pytest.raises(SystemExit):
        ssl_min.cli(["--data-dir", str(cifar_small), "--subset", "40", "--out-dir", str(tmp_path / "out")])
    assert "--subset 40: class airplane of the test split has only 30 images" in capsys.readouterr().err


def test_no_internet_and_no_data_says_to_pass_data_dir_and_leaves_no_cache(tmp_path):
    dead = "http://127.0.0.1:9"  # nothing listens there: the download fails at once, as offline
    result = run("--out-dir", tmp_path / "out", env={"HOME": str(tmp_path), "http_proxy": dead, "https_proxy": dead,
                                                     "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "no_proxy": "", "NO_PROXY": ""})
    assert_one_line_error(result, "could not download cifar10", "--data-dir")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".cache" / "ssl_min").exists()


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------
def colourful(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_augment_shape_dtype_and_range():
    x = ssl_min.augment(colourful(6, 40), 3, torch.Generator().manual_seed(0), size=32)
    assert x.shape == (3, 6, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.05


def test_augment_draws_parameters_per_sample_and_per_view():
    image = colourful(1)
    x = ssl_min.augment(image.expand(16, -1, -1, -1), 4, torch.Generator().manual_seed(0)).flatten(0, 1)
    distinct = {tuple(v.flatten()[:64].tolist()) for v in x}
    assert len(distinct) == 64  # 16 copies of one image x 4 views: all different


def test_augment_is_seeded():
    images = colourful(8)
    a = ssl_min.augment(images, 2, torch.Generator().manual_seed(3))
    b = ssl_min.augment(images, 2, torch.Generator().manual_seed(3))
    c = ssl_min.augment(images, 2, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_grayscale_rate():
    x = ssl_min.augment(colourful(2000, size=8), 1, torch.Generator().manual_seed(0), p_gray=0.2)[0]
    gray = ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-6) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert 0.16 < gray.float().mean().item() < 0.24


def test_hue_shift_matches_torchvision_adjust_hue():
    images = colourful(5).float() / 255
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.33])
    ours = ssl_min.hue_shift(images, shifts)
    for image, h, mine in zip(images, shifts, ours):
        assert torch.allclose(mine, TF.adjust_hue(image, h.item()), atol=1e-5)


def ramp(n, axis):
    """Gray images that brighten along one axis (-1: left to right, -2: top to bottom)."""
    values = torch.linspace(0, 255, 32).round().to(torch.uint8)
    return (values.view(1, 1, 1, 32) if axis == -1 else values.view(1, 1, 32, 1)).expand(n, 3, 32, 32)


def test_augment_flips_half_of_the_views_left_to_right_and_none_upside_down():
    """Colour jitter and grayscale keep the order of gray levels, and a crop keeps the direction of a ramp: only a
    horizontal flip turns a left-to-right ramp around."""
    for axis, flipped_share in ((-1, (0.4, 0.6)), (-2, (0.0, 0.0))):
        x = ssl_min.augment(ramp(500, axis), 1, torch.Generator().manual_seed(0))[0, :, 0]  # [500, 32, 32]
        steps = x.diff(dim=axis)
        rising, falling = (steps >= -1e-6).flatten(1).all(1), (steps <= 1e-6).flatten(1).all(1)
        assert (rising | falling).all()
        share = (falling & ~rising).float().mean().item()
        assert flipped_share[0] <= share <= flipped_share[1], (axis, share)


def test_augment_crops_part_of_the_image():
    x = ssl_min.augment(ramp(500, -1), 1, torch.Generator().manual_seed(0))[0, :, 0]
    spread = (x.amax((1, 2)) - x.amin((1, 2))) / (x.amax() - x.amin())
    assert spread.median() < 0.8 and spread.max() > 0.9  # most crops see part of the ramp, some nearly all


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# The loss, against independent textbook implementations
# ---------------------------------------------------------------------------------------------------------------
def textbook_barlow(z1, z2, lambd):
    """BarlowTwins as in the official main.py: BatchNorm without affine, c = bn(z1)^T bn(z2) / B."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).double()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + lambd * off_diag


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


def loop_reference(z, beta):
    """The multi-view loss written view by view: each view against the mean of the other views."""
    V, B, d = z.shape
    f = [(v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5) for v in z]
    total = 0.0
    for i in range(V):
        mean_others = sum(f[j] for j in range(V) if j != i) / (V - 1)
        c = f[i].T @ mean_others / B
        total = total + ((1 - c.diagonal()) ** 2).sum() + beta * (c ** 2).sum() - beta * (c.diagonal() ** 2).sum()
    return total / V


def embeddings(V, B=64, d=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, d, generator=g, dtype=torch.float64)
    return torch.stack([base + noise * torch.randn(B, d, generator=g, dtype=torch.float64) for _ in range(V)])


@pytest.mark.parametrize("beta", [0.0, 0.005, 1 / 16, 1.0])
def test_barlow_at_two_views_equals_textbook_barlowtwins(beta):
    z = embeddings(2)
    total, invariance, orthogonality = ssl_min.ssl_loss(z, beta)
    assert total.item() == pytest.approx(textbook_barlow(z[0], z[1], beta).item(), rel=1e-10)
    assert (invariance + orthogonality).item() == pytest.approx(total.item(), rel=1e-12)
    assert invariance.item() == pytest.approx(textbook_barlow(z[0], z[1], 0.0).item(), rel=1e-10)


@pytest.mark.parametrize("d", [8, 32])
def test_vicreg_at_two_views_equals_textbook_vicreg(d):
    z = embeddings(2, d=d)
    default = ssl_min.ssl_loss(z, ssl_min.default_beta(d, "vicreg"), "vicreg")[0]  # VICReg's own 25/25/1 weights
    assert default.item() == pytest.approx(textbook_vicreg(z[0], z[1]).item(), rel=1e-10)
    beta = 0.01  # another orthogonality strength maps to the covariance weight nu = 25 * beta * d
    other = ssl_min.ssl_loss(z, beta, "vicreg")[0]
    assert other.item() == pytest.approx(textbook_vicreg(z[0], z[1], cov_coeff=25 * beta * d).item(), rel=1e-10)


@pytest.mark.parametrize("V", [2, 3, 4, 8])
def test_multiview_loss_equals_view_by_view_reference(V):
    z = embeddings(V, seed=V)
    assert ssl_min.ssl_loss(z, 0.05)[0].item() == pytest.approx(loop_reference(z, 0.05).item(), rel=1e-10)


@pytest.mark.parametrize("V", [2, 3, 5])
def test_leave_one_out_target_rescales_eq10_by_the_square_of_v_minus_1_over_v(V):
    z = embeddings(V, seed=V)
    mean_all = z.mean(0, keepdim=True)
    eq10 = (mean_all - z).pow(2).sum((1, 2))  # Eq. 10's invariance term, view by view
    leave_one_out = (ssl_min.view_target(z) - z).pow(2).sum((1, 2))
    assert torch.allclose(eq10, ((V - 1) / V) ** 2 * leave_one_out, rtol=1e-12)


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
def test_multiview_loss_is_invariant_to_the_order_of_views(loss):
    z = embeddings(5)
    shuffled = z[torch.tensor([3, 0, 4, 1, 2])]
    assert ssl_min.ssl_loss(shuffled, 0.05, loss)[0].item() == pytest.approx(ssl_min.ssl_loss(z, 0.05, loss)[0].item(), rel=1e-12)


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
@pytest.mark.parametrize("V", [2, 4, 8])
def test_identical_views_cost_less_than_independent_views(loss, V):
    same = embeddings(1, seed=1).expand(V, -1, -1)
    independent = embeddings(V, seed=1, noise=3.0)
    assert ssl_min.ssl_loss(same, 0.05, loss)[1] < 0.01 * ssl_min.ssl_loss(independent, 0.05, loss)[1]
    assert ssl_min.ssl_loss(same, 0.05, loss)[0] < ssl_min.ssl_loss(independent, 0.05, loss)[0]


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
def test_gradients_reach_every_view(loss):
    z = embeddings(4).requires_grad_()
    ssl_min.ssl_loss(z, 0.05, loss)[0].backward()
    assert all(z.grad[v].abs().sum() > 0 for v in range(4))


def test_bfloat16_embeddings_are_scored_in_float32():
    z = embeddings(3).float()
    assert ssl_min.ssl_loss(z.bfloat16(), 0.05)[0].dtype == torch.float32


def test_default_beta_is_5_over_d_and_vicreg_weights():
    assert ssl_min.default_beta(128, "barlow") == 5 / 128 and ssl_min.default_beta(64, "vicreg") == 1 / (25 * 64)


def test_effective_rank_counts_used_directions():
    assert ssl_min.effective_rank(torch.randn(200, 1) @ torch.randn(1, 32)) == pytest.approx(1.0, abs=1e-3)
    assert ssl_min.effective_rank(torch.eye(32)) == pytest.approx(32.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    images = colourful(16)
    net = ssl_min.SSLNet(16, *ssl_min.pixel_stats(images))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    views = ssl_min.augment(images, 2, torch.Generator().manual_seed(0))
    losses = [ssl_min.train_step(net, optimizer, views, 5 / 16, "barlow") for _ in range(6)]
    assert all(loss.shape == (3,) for loss in losses) and losses[0][0] == pytest.approx(losses[0][1:].sum().item())
    assert losses[-1][0] < 0.8 * losses[0][0]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def clusters(n, d=32, classes=4, seed=0, spread=1.0):
    centres = 3 * torch.randn(classes, d, generator=torch.Generator().manual_seed(123))  # shared by every split
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def test_linear_probe_and_knn_separate_clustered_features():
    (train_f, train_y), (test_f, test_y) = clusters(400), clusters(200, seed=1)
    assert ssl_min.linear_probe(train_f, train_y, test_f, test_y, 4, epochs=50) > 0.95
    assert ssl_min.knn_accuracy(train_f, train_y, test_f, test_y, 4, k=20) > 0.95
    shuffled = train_y[torch.randperm(400, generator=torch.Generator().manual_seed(0))]
    assert ssl_min.linear_probe(train_f, shuffled, test_f, test_y, 4, epochs=50) < 0.5  # no signal, no accuracy


def autograd_probe(train_f, train_y, test_f, test_y, epochs, seed=0):
    """The probe as the paper and ssl_min's earlier version wrote it: nn.Linear, F.cross_entropy, torch.optim.Adam."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    clf = nn.Linear(train_f.shape[1], int(train_y.max()) + 1)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    optimizer = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-6)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_f), generator=generator).split(512):
            loss = nn.functional.cross_entropy(clf(train_f[idx]), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (clf(test_f).argmax(1) == test_y).float().mean().item()


def test_lean_linear_probe_gives_the_autograd_probes_accuracy():
    (train_f, train_y), (test_f, test_y) = clusters(3000, d=64, classes=10, spread=12.0), \
        clusters(2000, d=64, classes=10, seed=1, spread=12.0)
    for epochs in (3, 20):
        lean = ssl_min.linear_probe(train_f, train_y, test_f, test_y, 10, epochs=epochs)
        reference = autograd_probe(train_f, train_y, test_f, test_y, epochs)
        assert lean == reference and 0.3 < lean < 0.9, (epochs, lean, reference)


def test_multiview_probe_features_average_one_clean_and_augmented_views():
    backbone = ssl_min.ResNet18(torch.full((3,), 0.5), torch.full((3,), 0.25)).eval()
    images = colourful(4)
    clean = ssl_min.features(backbone, images)
    three = ssl_min.features(backbone, images, 3, torch.Generator().manual_seed(0))
    views = ssl_min.augment(images, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_hand = (backbone(images.float() / 255) + backbone(views[0]) + backbone(views[1])) / 3
    assert three.shape == clean.shape == (4, 512) and not torch.allclose(three, clean)
    assert torch.allclose(three, by_hand, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The command line, end to end on real CIFAR-10 images
# ---------------------------------------------------------------------------------------------------------------
QUICK = ["--views", "2", "--proj-dim", "64", "--batch-size", "100", "--eval-every", "1"]


@pytest.fixture(scope="session")
def finished_run(cifar_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "e2e"
    result = run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_cli_end_to_end_writes_every_output_and_beats_chance(finished_run):
    out, result = finished_run
    config = json.loads((out / "config.json").read_text())
    assert config["views"] == 2 and config["beta"] == pytest.approx(5 / 64) and config["compile"] is False
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and {"loss", "invariance", "orthogonality", "views_per_s", "knn_acc", "erank"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(log[0]["invariance"] + log[0]["orthogonality"], rel=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["probe_acc"] > 0.2 and results["knn_acc"] > 0.15  # chance is 0.1 on 300 test images
    assert results["data"] == dict(pretrain=500, train=500, test=300, image=[3, 32, 32]) and results["processes"] == 1
    assert results["log"][-1]["probe_acc"] == results["probe_acc"] and 1 < results["erank"] <= 64
    assert results["device"].startswith("cpu") and results["versions"]["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?", results["commit"] or ""), results["commit"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # plain types only
    assert ckpt["epoch"] == 2 and ckpt["config"] == config
    assert "linear probe" in result.stdout and "epoch   2/2" in result.stdout and result.stderr == ""


def readme_snippet(heading):
    """The first python code block after `heading` in the README."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_readme_snippet_loads_the_pretrained_backbone(finished_run, monkeypatch):
    out, _ = finished_run
    monkeypatch.chdir(out.parent)
    monkeypatch.syspath_prepend(str(REPO))
    namespace = {}
    exec(readme_snippet("## Using the pretrained backbone").replace("runs/cifar10-v4-d128-barlow-s0", out.name), namespace)
    assert namespace["features"].shape == (8, 512) and torch.isfinite(namespace["features"]).all()


def test_help_shows_every_default_and_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit):
        ssl_min.cli(["--help"])
    text = capsys.readouterr().out
    assert "seed of the initialization, the subsets, the batches and the augmentations (default: 0)" in " ".join(text.split())
    for argv in (["--view", "3"], ["--over"]):
        with pytest.raises(SystemExit) as exit:
            ssl_min.cli(argv)
        assert exit.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_finished_run_is_not_clobbered(finished_run, cifar_small):
    out, _ = finished_run
    before = (out / "results.json").read_bytes()
    assert_one_line_error(run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--out-dir", out), "finished", "--overwrite")
    assert (out / "results.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# Robustness: bad options, checkpoints, --overwrite, paths, locks, resources
# ---------------------------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    (["--views", "1"], "--views"), (["--proj-dim", "0"], "--proj-dim"), (["--beta", "-0.1"], "--beta"),
    (["--beta", "nan"], "--beta"), (["--train-fraction", "0"], "--train-fraction"),
    (["--train-fraction", "1.5"], "--train-fraction"), (["--batch-size", "1"], "--batch-size"), (["--epochs", "0"], "--epochs"),
    (["--dataset", "imagenet"], "--dataset"), (["--loss", "simclr"], "--loss"), (["--device", "tpu"], "--device"),
    (["--views", "four"], "--views"), (["--lr", "0"], "--lr"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 70)], "--seed"), (["--subset", "-2"], "--subset"),
]


@pytest.mark.parametrize("argv,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_gets_one_line_and_writes_nothing(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        ssl_min.cli([*argv, "--out-dir", str(tmp_path / "out")])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ssl_min.cli(["--device", "cuda", "--out-dir", str(tmp_path / "out")])
    assert "--device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_batch_larger_than_the_pretraining_set_runs_no_step_and_is_refused(cifar_small, tmp_path):
    result = run("--data-dir", cifar_small, "--train-fraction", "0.1", "--batch-size", "64", "--out-dir", tmp_path / "out")
    assert_one_line_error(result, "--batch-size 64", "50 pretraining images")
    assert not (tmp_path / "out").exists()


def copy_run(finished_run, tmp_path, files=("config.json", "log.jsonl", "checkpoint.pt")):
    out = tmp_path / "copy"
    out.mkdir(parents=True)
    for name in files:
        shutil.copy(finished_run[0] / name, out / name)
    return out


def test_checkpoint_of_another_configuration_is_refused_and_kept(finished_run, cifar_small, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    result = run("--data-dir", cifar_small, *QUICK, "--epochs", "3", "--beta", "0.5", "--out-dir", out)
    assert_one_line_error(result, "another configuration", "--beta", "rerun with its options")
    assert (out / "checkpoint.pt").read_bytes() == before


def damaged(state):
    """Checkpoints that unpickle safely but are not ssl_min's: each must be refused untouched."""
    yield "truncated", None
    yield "missing field", {k: v for k, v in state.items() if k != "optimizer"}
    yield "wrong type", {**state, "epoch": "2"}
    yield "log too short", {**state, "log": state["log"][:1]}
    yield "wrong shape", {**state, "model": {**state["model"], "projector.3.weight": torch.zeros(3, 3)}}
    optimizer = {**state["optimizer"], "state": {k: {**v, "exp_avg": torch.zeros(2)} for k, v in state["optimizer"]["state"].items()}}
    yield "optimizer state of another shape", {**state, "optimizer": optimizer}
    yield "pickled code", "pickle"


def test_damaged_or_foreign_checkpoints_are_refused_in_one_line_and_kept(finished_run, cifar_small, tmp_path):
    state = torch.load(finished_run[0] / "checkpoint.pt", weights_only=True)
    for name, bad in damaged(state):
        out = copy_run(finished_run, tmp_path / name.replace(" ", "_"))
        if bad is None:
            (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:5000])
        elif bad == "pickle":
            import pickle
            (out / "checkpoint.pt").write_bytes(pickle.dumps(print))  # a code reference: weights_only refuses it
        else:
            torch.save(bad, out / "checkpoint.pt")
        before = (out / "checkpoint.pt").read_bytes()
        result = run("--data-dir", cifar_small, *QUICK, "--epochs", "3", "--out-dir", out)
        assert_one_line_error(result, "cannot resume", "left as is")
        assert (out / "checkpoint.pt").read_bytes() == before, name


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved_an_epoch(finished_run, cifar_small, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path, ("config.json", "log.jsonl", "checkpoint.pt", "results.json"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for argv in (["--seed", str(2 ** 70)], ["--subset", "1000"], ["--batch-size", "5000"]):  # each fails to start
        with pytest.raises(SystemExit):
            ssl_min.cli(["--data-dir", str(cifar_small), *QUICK, "--epochs", "1", "--overwrite", *argv, "--out-dir", str(out)])
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, argv
    replaced = ssl_min.main(tiny(cifar_small, out, epochs=1, beta=0.5, overwrite=True))
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["beta"] == 0.5 and saved["log"] == replaced["log"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["beta"] == 0.5


def test_paths_written_another_way_resume_and_a_moved_run_resumes(cifar_small, tmp_path):
    ssl_min.main(tiny(cifar_small, tmp_path / "a", epochs=1))
    (tmp_path / "a" / "results.json").unlink()  # as if the run had stopped after its first epoch
    shutil.move(tmp_path / "a", tmp_path / "b")  # a moved run folder, and the data folder written with a trailing /
    result = run("--data-dir", f"{cifar_small}/", "--subset", "10", "--views", "2", "--proj-dim", "32", "--batch-size",
                 "25", "--epochs", "2", "--eval-every", "0", "--out-dir", f"{tmp_path / 'b'}/")
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr


def test_resuming_with_fewer_epochs_than_done_is_refused_and_with_as_many_only_evaluates(cifar_small, tmp_path):
    ssl_min.main(tiny(cifar_small, tmp_path / "out", epochs=2))
    (tmp_path / "out" / "results.json").unlink()
    with pytest.raises(ssl_min.UserError, match="already trained 2 epochs, more than --epochs 1"):
        ssl_min.main(tiny(cifar_small, tmp_path / "out", epochs=1))
    weights = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["model"]
    again = ssl_min.main(tiny(cifar_small, tmp_path / "out", epochs=2))
    assert again["epochs"] == 2 and len(again["log"]) == 2 and "knn_acc" in again["log"][-1]
    after = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_unusable_out_dirs_get_one_line(where, cifar_small, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):
            pytest.skip("this user can write to a read-only folder (root)")
    with pytest.raises(SystemExit) as exit:
        ssl_min.cli(["--data-dir", str(cifar_small), *QUICK, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and "--out-dir" in err[0], err


def test_read_only_out_dir_is_refused_even_for_root(cifar_small, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    with pytest.raises(SystemExit):
        ssl_min.cli(["--data-dir", str(cifar_small), *QUICK, "--out-dir", str(tmp_path / "ro")])
    assert "--out-dir" in capsys.readouterr().err and not (tmp_path / "ro").exists()


def test_a_folder_in_use_by_another_run_is_refused(cifar_small, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    lock = os.open(out, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running ssl_min holds it
    try:
        assert_one_line_error(run("--data-dir", cifar_small, *QUICK, "--out-dir", out), "in use", code=1)
    finally:
        os.close(lock)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("PytorchStreamWriter failed")])
@pytest.mark.parametrize("content", ["text", {"state": torch.zeros(3)}], ids=["text", "state dict"])
def test_failed_write_keeps_the_previous_file_and_leaves_no_partial_one(error, content, tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"good")

    def disk_full(self_or_obj, path_or_text, *args, **kwargs):
        path = self_or_obj if isinstance(self_or_obj, Path) else Path(path_or_text)
        path.write_bytes(b"half")
        raise error

    monkeypatch.setattr(Path, "write_text", disk_full)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ssl_min.UserError, match="previous version is kept"):
        ssl_min.write_atomic(target, content)
    assert target.read_bytes() == b"good" and list(tmp_path.iterdir()) == [target]


def test_failed_write_on_a_read_only_file_system_is_one_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # the cleanup fails too
    with pytest.raises(ssl_min.UserError, match="Read-only file system"):
        ssl_min.write_atomic(tmp_path / "config.json", "{}")


def test_out_of_memory_names_the_options_to_lower(cifar_small, tmp_path):
    result = run("--data-dir", cifar_small, *QUICK, "--proj-dim", "1000000", "--out-dir", tmp_path / "out")
    assert_one_line_error(result, "out of memory", "--batch-size", "--views", "--proj-dim", "nothing is saved", code=1)


def test_non_finite_loss_names_epoch_and_step_and_what_is_saved(cifar_small, tmp_path, monkeypatch):
    calls, real = [], ssl_min.ssl_loss

    def poisoned(z, beta, loss="barlow"):  # fine for epoch 1 (4 steps), then NaN from epoch 2, step 2
        calls.append(1)
        total, inv, orth = real(z, beta, loss)
        return (total * float("nan"), inv, orth) if len(calls) >= 6 else (total, inv, orth)

    monkeypatch.setattr(ssl_min, "ssl_loss", poisoned)
    with pytest.raises(ssl_min.UserError, match=r"non-finite at epoch 2, step 2: lower --beta or --lr; the checkpoint "
                                                r"after epoch 1 is in") as error:
        ssl_min.main(tiny(cifar_small, tmp_path / "out"))
    assert error.value.code == 1
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not (tmp_path / "out" / "results.json").exists()
    calls.extend([1] * 10)  # NaN from the first step: nothing is saved, and the message says so
    with pytest.raises(ssl_min.UserError, match="non-finite at epoch 1, step 1.*nothing is saved"):
        ssl_min.main(tiny(cifar_small, tmp_path / "other"))


def test_same_seed_same_trajectory_other_seed_another(cifar_small, tmp_path):
    runs = [ssl_min.main(tiny(cifar_small, tmp_path / str(i), epochs=1, seed=s)) for i, s in enumerate((0, 0, 1))]
    losses = [[e["loss"] for e in r["log"]] for r in runs]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert runs[0]["probe_acc"] == runs[1]["probe_acc"]


# ---------------------------------------------------------------------------------------------------------------
# Signals and exact resume
# ---------------------------------------------------------------------------------------------------------------
RESUME_ARGS = ["--subset", "20", "--views", "2", "--proj-dim", "32", "--batch-size", "20", "--epochs", "2", "--eval-every", "1"]


def comparable(log):
    return [{k: v for k, v in e.items() if k not in ("views_per_s", "time_s")} for e in log]


@pytest.fixture(scope="module")
def uninterrupted(cifar_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run("--data-dir", cifar_small, *RESUME_ARGS, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_stops_keeps_the_last_epoch_and_resumes_exactly(uninterrupted, cifar_small, tmp_path, sig):
    args, out = ["--data-dir", cifar_small, *RESUME_ARGS], tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "ssl_min.py"), *map(str, args), "--out-dir", str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "log.jsonl").exists() and process.poll() is None:  # let epoch 1 be saved, stop inside epoch 2
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + sig, stderr
    assert stderr.strip() == f"ssl_min: stopped by {sig.name}; the checkpoint after epoch 1 is in {out}: rerun the " \
                             f"same command to resume"
    assert not (out / "results.json").exists()
    resumed = run(*args, "--out-dir", out)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (uninterrupted, out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))
    assert comparable(a["log"]) == comparable(b["log"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (uninterrupted, out))
    assert ra["probe_acc"] == rb["probe_acc"] and comparable(ra["log"]) == comparable(rb["log"])


@pytest.mark.parametrize("phase", ["load_data", "linear_probe"])
def test_a_stop_outside_the_training_loop_says_what_is_saved(phase, cifar_small, tmp_path, capsys, monkeypatch):
    def stopped(*args, **kwargs):
        raise ssl_min.Stop(signal.SIGTERM)  # what the handler raises when SIGTERM arrives here

    monkeypatch.setattr(ssl_min, phase, stopped)
    argv = ["--data-dir", str(cifar_small), "--subset", "10", *QUICK, "--epochs", "1", "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit:
        ssl_min.cli(argv)
    assert exit.value.code == 128 + signal.SIGTERM
    expected = "nothing is saved" if phase == "load_data" else "the checkpoint after epoch 1 is in"
    assert expected in capsys.readouterr().err and not (tmp_path / "out" / "results.json").exists()
    for sig in ssl_min.STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def test_a_closed_output_saves_the_epoch_first(cifar_small, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(REPO / "ssl_min.py"), "--data-dir", str(cifar_small), *RESUME_ARGS,
                                "--out-dir", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()  # the first line, as `| head -1`, then the pipe is closed
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=600) == 141, stderr
    assert stderr.strip() == f"ssl_min: the output was closed; the checkpoint after epoch 1 is in {out}: rerun the " \
                             f"same command to resume"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on the CPU)
# ---------------------------------------------------------------------------------------------------------------
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
    batch (torch's SyncBatchNorm, which makes them the whole batch's, is CUDA-only), then the loss of the whole batch."""

    def __init__(self, net, views):
        super().__init__()
        self.net, self.views = net, views

    def forward(self, x):
        x = x.view(self.views, 2, -1, *x.shape[1:])
        return torch.cat([self.net(x[:, r].flatten(0, 1)).view(self.views, x.shape[2], -1) for r in (0, 1)], 1).flatten(0, 1)


def torchrun(*args, **kw):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, **kw)


def test_two_processes_take_the_same_steps_as_one_process_with_the_whole_batch(tmp_path):
    """Three Adam steps on 2 processes; at each, one process with the whole batch, from the same weights, gets the same
    losses and gradients. (From the second step on, a 1e-7 change of the weights changes some gradients of this tiny
    random problem by 10%: the steps are compared from the same weights, not as two separate trajectories.)"""
    views = torch.rand(3, 2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # 3 steps of V = 2, B = 16
    torch.save(views, tmp_path / "views.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    result = torchrun(tmp_path / "worker.py", tmp_path / "views.pt", tmp_path / "ddp.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    net = ssl_min.SSLNet(16, torch.full((3,), 0.5), torch.full((3,), 0.25))
    gradients_only = torch.optim.SGD(net.parameters(), lr=0.0)
    for v, step in zip(views, torch.load(tmp_path / "ddp.pt")):
        net.load_state_dict(step["before"])
        losses = ssl_min.train_step(TwoProcessStatistics(net, 2), gradients_only, v, 0.3, "barlow")
        assert torch.allclose(step["losses"], losses, rtol=1e-5), (step["losses"], losses)
        for name, p in net.named_parameters():
            assert torch.allclose(step["grads"][name], p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max()), name
    assert not torch.equal(step["before"]["projector.0.weight"], torch.load(tmp_path / "ddp.pt")[0]["before"]["projector.0.weight"])


def test_torchrun_command_line_runs_end_to_end_and_writes_once(cifar_small, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun(REPO / "ssl_min.py", "--data-dir", cifar_small, "--subset", "10", "--views", "2", "--proj-dim", "32",
                      "--batch-size", "20", "--epochs", "2", "--eval-every", "1", "--out-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("linear probe") == 1 and result.stdout.count("epoch   1/2") == 1, result.stdout
    assert "x 2 processes" in result.stdout and "pretraining on 100 images" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and results["data"]["pretrain"] == 100 and len(results["log"]) == 2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0], ckpt["rng"][1])
    (out / "results.json").unlink()  # resumed by one process: refused in one line, the checkpoint kept
    assert_one_line_error(run("--data-dir", cifar_small, "--subset", "10", "--views", "2", "--proj-dim", "32",
                              "--batch-size", "20", "--epochs", "3", "--out-dir", out), "2 processes")


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
def test_benchmark_smoke_mode_records_its_provenance_and_positive_rates(tmp_path):
    """benchmarks/throughput.py --smoke runs every CPU code path on tiny sizes (~10 s on 2 cores), then --profile."""
    bench, out = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--smoke"], tmp_path / "bench.json"
    done = subprocess.run(bench + ["--json", str(out), "--markdown"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    h = result["header"]
    assert h["commit"] and h["cpu"]["model"] and h["cpu"]["cores"] >= 1
    assert h["versions"]["torch"] == torch.__version__ and "cuda" in h["versions"]
    assert h["threads"]["torch_intra_op"] == 1 and h["threads"]["dataloader_workers"] >= 1
    assert {(r["step"], r["pipeline"].split()[0]) for r in result["rows"]} >= {
        ("augmentation", "usual"), ("augmentation", "ssl_min"), ("train", "usual"), ("train", "ssl_min")}
    for r in result["rows"]:
        assert 0 < r["views_per_s_min"] <= r["views_per_s"] <= r["views_per_s_max"], r
    usual = [r for r in result["rows"] if r["pipeline"].startswith("usual")]
    assert all(r["per_worker_views_per_s"] > 0 for r in usual)
    assert min(r["waves"] for r in usual if r["step"] == "augmentation") >= 10
    lean, reference = result["probe"]
    assert lean["seconds"] > 0 and reference["seconds"] > 0 and lean["ratio"] > 0
    assert abs(lean["accuracy"] - reference["accuracy"]) <= 1 / 256 and lean["accuracy"] > 0.3  # same result, > chance
    assert "| step | input pipeline |" in done.stdout and h["commit"] in done.stdout

    done = subprocess.run(bench + ["--profile", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    phases = {p["phase"]: p for p in json.loads(out.read_text())["profile"]["phases"]}
    assert {"augmentation", "forward", "loss", "backward", "optimizer step"} <= set(phases)
    assert abs(sum(p["cpu_share"] for p in phases.values() if p["cpu_share"] is not None) - 1) < 1e-6
    assert phases["forward"]["cpu_ms"] > 0 and phases["backward"]["cpu_ms"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Notebooks, executed in smoke mode
# ---------------------------------------------------------------------------------------------------------------
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
