"""ssl_min: small projectors and multiple views for efficient self-supervised pretraining, in one file.

A minimal, fast PyTorch reference implementation of A. Ghosh, K. K. Agrawal, S. Sodhani, A. M. Oberman and
B. A. Richards, "Harnessing small projectors and multiple views for efficient vision pretraining", NeurIPS 2024
(arXiv 2312.10725). BarlowTwins and VICReg learn the top eigenfunctions of the augmentation kernel; the paper rewrites
their loss (Eq. 9-10) as the invariance of each view to the mean over the views (a Monte-Carlo estimate of the
augmentation-averaging operator T_M) plus an orthogonality constraint of strength beta. Hence a small projector
(d = 128) matches a large one when beta ~ 1/d, and more views per image learn faster.

Read it top to bottom: config, data, augmentation, model, loss, training, evaluation, main. The last section, run
bookkeeping (option checks, checkpoints and resume, processes, signals, the command line), can be skipped.

    python ssl_min.py --views 4 --proj-dim 128                      # a CUDA GPU: CIFAR-10 (downloaded), 100 epochs
    python ssl_min.py --data-dir DIR --subset 50 --epochs 2 --views 2 --batch-size 100   # a CPU check, minutes
    torchrun --nproc-per-node 4 ssl_min.py --views 4 --proj-dim 128  # several GPUs, data-parallel
"""
import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

try:
    import fcntl  # locks --out-dir; absent on Windows, where runs go unlocked
except ImportError:
    fcntl = None


# ==== Config ==========================================================================================================
def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # The method: V views per image, a projector of width d, orthogonality strength beta (Eq. 9-10)
    views: int = option(4, "augmented views per image, V >= 2")
    proj_dim: int = option(128, "projector width d (hidden and output)")
    beta: float | None = option(None, "orthogonality strength (default: 5/d for barlow, 1/(25 d) for vicreg)")
    loss: str = option("barlow", "barlow or vicreg: the two Lagrangian forms of the reformulated loss")
    # Data
    dataset: str = option("cifar10", "cifar10, cifar100 or stl10 via torchvision (STL-10 pretrains on 'unlabeled')")
    data_dir: str = option("", "image folder with train/<class>/ and test/<class>/ to use instead of a download")
    subset: int = option(0, "keep this many random images per class of every split (0: all), for quick runs")
    train_fraction: float = option(1.0, "seeded, class-balanced fraction of the training images to pretrain on")
    # Optimization: the paper's Adam, no schedule
    epochs: int = option(100, "pretraining epochs")
    batch_size: int = option(512, "images per step, each in V views (split across processes under torchrun)")
    lr: float = option(1e-3, "Adam learning rate")
    weight_decay: float = option(1e-6, "Adam weight decay")
    # Evaluation
    probe_views: int = option(1, "views averaged per image for the probe's features: 1 clean + (n-1) augmented")
    eval_every: int = option(10, "kNN accuracy and effective rank every this many epochs (0: only after the last)")
    # The run
    seed: int = option(0, "seed of the initialization, the subsets, the batches and the augmentations")
    device: str = option("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    out_dir: str = option("", "folder for config.json, log.jsonl, checkpoint.pt, results.json "
                              "(default: runs/<data>-v<V>-d<d>-<loss>-s<seed>)")
    compile: bool | None = option(None, "torch.compile the network (default: on CUDA, where it pays off after "
                                        "~25 epochs)")
    overwrite: bool = option(False, "replace the run in --out-dir (once the new run has saved an epoch)")


# ==== Data: every split is one uint8 tensor [N, 3, H, W] on the device, so batches are slices, not a DataLoader ======
@dataclass
class Data:
    ssl_images: torch.Tensor  # the images SSL pretrains on (labels never used); under torchrun this process's share
    train_images: torch.Tensor  # labelled images for the kNN and the linear probe
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list


def read_image_folder(folder: Path):
    """All images of folder/<class>/* as uint8 [N, 3, H, W] and labels, classes sorted by name (ImageFolder order)."""
    if not folder.is_dir():
        raise UserError(f"--data-dir: {folder} is missing; expected train/<class>/ and test/<class>/ beside it")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"--data-dir: {folder} has no class folders; put its images in {folder}/<class>/")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"--data-dir: class {name} in {folder} holds no images (subfolders are not read)")
        for path in files:
            try:
                with Image.open(path) as im:
                    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # convert("RGB") would clip them to white
                        raise ValueError(f"{im.mode} pixels: convert it to 8-bit RGB")
                    image = np.asarray(im.convert("RGB"))
            except Exception as e:  # PIL raises many kinds: OSError, ValueError, DecompressionBombError, ...
                raise UserError(f"--data-dir: cannot read {path} as an image ({e}); remove or convert it") from None
            if images and image.shape != images[0].shape:
                raise UserError(f"--data-dir: {path} is {image.shape[1]}x{image.shape[0]} px but the first image is "
                                f"{images[0].shape[1]}x{images[0].shape[0]}; resize all images to one size first")
            images.append(image)
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels), classes


def download(cfg: Config, root: Path):
    """The splits of a torchvision dataset as uint8 tensors [N, 3, H, W] and labels (None for STL-10's unlabeled)."""
    created = not root.exists()
    try:
        if cfg.dataset == "stl10":
            splits = {s: torchvision.datasets.STL10(root, s, download=True) for s in ("unlabeled", "train", "test")}
            data = {s: (torch.from_numpy(d.data), torch.from_numpy(d.labels).long()) for s, d in splits.items()}
            return data["unlabeled"][0], data["train"], data["test"], splits["train"].classes
        kind = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        splits = {s: kind(root, train=s == "train", download=True) for s in ("train", "test")}
        data = {s: (torch.from_numpy(d.data).permute(0, 3, 1, 2), torch.tensor(d.targets)) for s, d in splits.items()}
        return None, data["train"], data["test"], splits["train"].classes
    except (OSError, RuntimeError) as e:  # no internet: URLError is an OSError
        if created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        raise UserError(f"could not download {cfg.dataset} to {root} ({type(e).__name__}); without internet, pass "
                        f"--data-dir with train/<class>/ and test/<class>/ image folders") from None


def class_balanced(labels: torch.Tensor, seed: int, fraction: float = 1.0, per_class: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded random `fraction` (or `per_class` images) of every class (the authors': unseeded)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in labels.unique():
        members = rng.permutation(np.flatnonzero(labels.numpy() == c.item()))
        keep.append(members[: per_class or max(1, round(fraction * len(members)))])
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def take_subset(images, labels, classes, cfg: Config, split: str):
    """--subset random images of every class of one split."""
    counts = labels.bincount(minlength=len(classes))
    if cfg.subset > counts.min():
        raise UserError(f"--subset {cfg.subset}: class {classes[counts.argmin()]} of the {split} split has only "
                        f"{counts.min()} images")
    keep = class_balanced(labels, cfg.seed, per_class=cfg.subset)
    return images[keep], labels[keep]


def load_data(cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> Data:
    if cfg.data_dir:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise UserError(f"--data-dir {root} {'is a file' if root.exists() else 'does not exist'}; give a folder "
                            f"with train/<class>/ and test/<class>/")
        train, train_y, classes = read_image_folder(root / "train")
        test, test_y, test_classes = read_image_folder(root / "test")
        if test_classes != classes or test.shape[1:] != train.shape[1:]:
            raise UserError(f"--data-dir: train/ and test/ differ in their class folders or image sizes ({classes}, "
                            f"{list(train.shape[1:])} vs {test_classes}, {list(test.shape[1:])})")
        unlabeled = None
    else:
        unlabeled, (train, train_y), (test, test_y), classes = download(cfg, Path.home() / ".cache" / "ssl_min")
    if cfg.subset:
        train, train_y = take_subset(train, train_y, classes, cfg, "train")
        test, test_y = take_subset(test, test_y, classes, cfg, "test")
    if unlabeled is None:  # pretrain on the labelled training images, without their labels
        ssl_images = train[class_balanced(train_y, cfg.seed, fraction=cfg.train_fraction)]
    else:  # STL-10's unlabeled split has no classes to balance: a seeded random part of it
        keep = round(cfg.train_fraction * (cfg.subset * len(classes) if cfg.subset else len(unlabeled)))
        ssl_images = unlabeled[torch.randperm(len(unlabeled), generator=torch.Generator().manual_seed(cfg.seed))[:keep]]
    if torch.equal(ssl_images.amin((0, 2, 3)), ssl_images.amax((0, 2, 3))):
        raise UserError("the pretraining images are all of one constant colour: there is nothing to learn from them")
    if cfg.batch_size > len(ssl_images):
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {len(ssl_images)} pretraining images")
    ssl_images = ssl_images[rank::world][:len(ssl_images) // world]  # torchrun: every process an equal share
    return Data(*(t.contiguous().to(device) for t in (ssl_images, train, train_y, test, test_y)), classes)


# ==== Multi-view augmentation: batched, every image and view draws its own parameters, on the device ==================
# torchvision's transforms draw one set of parameters per call, so on a batch every image would get the same crop.
def gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # ITU-R 601, as torchvision


def hue_shift(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of images x [n, 3, H, W] in [0, 1] by h [n] turns, in HSV space as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    top, bottom = x.amax(1), x.amin(1)
    delta = top - bottom  # HSV value * saturation
    # Hue in sixths of a turn: which channel is the largest picks the sector, the other two the place in it.
    sector = torch.where(top == r, g - b, torch.where(top == g, b - r + 2 * delta, r - g + 4 * delta))
    hue = sector / delta.clamp_min(1e-8) + 6 * h.view(-1, 1, 1)
    k = torch.stack([(hue + 5) % 6, (hue + 3) % 6, (hue + 1) % 6], 1)  # HSV -> RGB, channel by channel
    return top.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def augment(images: torch.Tensor, views: int, generator: torch.Generator, size: int | None = None,
            scale=(0.08, 1.0), p_gray: float = 0.2) -> torch.Tensor:
    """`views` augmented views of every image: uint8 [B, 3, H, W] -> float [views, B, 3, size, size] in [0, 1].

    Random resized crop (area `scale`, aspect 3/4-4/3) and horizontal flip in one resampling, colour jitter with
    p 0.8 (brightness, contrast, saturation 0.4, hue 0.1, in this fixed order), grayscale with p `p_gray`.
    """
    B, _, H, W = images.shape
    n = views * B  # every view of every image draws its own parameters
    size = size or H
    device = images.device

    def uniform(low=0.0, high=1.0):  # one draw for every view of every image
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    x = images.float().div(255).repeat(views, 1, 1, 1)  # [views * B, 3, H, W], view-major
    # Crop: the area fraction and log-aspect are uniform as in torchvision; sides are clamped to the image instead
    # of torchvision's up-to-10 redraws. An affine grid maps the output square onto the crop box (flipped or not).
    area, aspect = uniform(*scale), torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of the sides
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = w * torch.where(uniform() < 0.5, -1.0, 1.0)
    theta[:, 0, 2] = (1 - w) * uniform(-1, 1)
    theta[:, 1, 1] = h
    theta[:, 1, 2] = (1 - h) * uniform(-1, 1)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter: a sample that skips it (p 0.2) gets the identity factors, so no branch per sample.
    jitter = uniform() < 0.8
    brightness, contrast, saturation = (torch.where(jitter, uniform(0.6, 1.4), 1.0).view(-1, 1, 1, 1) for _ in range(3))
    x = (x * brightness).clamp(0, 1)
    mean = gray(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    grayscale = gray(x)
    x = ((x - grayscale) * saturation + grayscale).clamp(0, 1)
    x = hue_shift(x, torch.where(jitter, uniform(-0.1, 0.1), 0.0))
    x = torch.where((uniform() < p_gray).view(-1, 1, 1, 1), gray(x).expand_as(x), x)
    return x.view(views, B, 3, size, size)


def aug_recipe(cfg: Config) -> dict:
    """The paper's augmentation settings: STL-10 uses 64 px crops of area 0.2-1 and grayscale with p 0.1."""
    return dict(size=64, scale=(0.2, 1.0), p_gray=0.1) if cfg.dataset == "stl10" and not cfg.data_dir else {}


# ==== Model: the backbone f (ResNet-18) and the projector g; embeddings z = g(f(x)) ===================================
class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 convolution, stride 1, no max-pool); 512-d features after average pooling."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, 3, 1, 1))  # the pretraining images' statistics, kept with the weights
        self.register_buffer("std", std.view(1, 3, 1, 1))
        self.net = torchvision.models.resnet18()
        self.net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.net.maxpool, self.net.fc = nn.Identity(), nn.Identity()

    def forward(self, x):  # x: float images in [0, 1]
        return self.net((x - self.mean) / self.std)


class SSLNet(nn.Module):
    """The backbone and the projector: Linear (no bias) - BatchNorm - ReLU - Linear, hidden width = output width = d,
    as in the paper. The last layer has no bias either: the batch standardization in the loss would remove it."""

    def __init__(self, proj_dim: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.backbone = ResNet18(mean, std)
        self.projector = nn.Sequential(nn.Linear(512, proj_dim, bias=False), nn.BatchNorm1d(proj_dim),
                                       nn.ReLU(inplace=True), nn.Linear(proj_dim, proj_dim, bias=False))

    def forward(self, x):
        return self.projector(self.backbone(x))


def pixel_stats(images: torch.Tensor):
    """Per-channel mean and std of uint8 images [N, 3, H, W], from a spread sample of at most ~4096 of them."""
    pixels = images[:: max(1, len(images) // 4096)].float() / 255
    return pixels.mean((0, 2, 3)), pixels.std((0, 2, 3)).clamp_min(1 / 255)  # a constant channel must not divide by 0


# ==== The loss: each view invariant to the mean over views (Eq. 10), orthogonality of strength beta (Eq. 9) ==========
# Notation: z [V, B, d] holds the embeddings of the V views (u, v) of a batch of B images; i, j index the d dimensions.
def view_target(z: torch.Tensor) -> torch.Tensor:
    """Tz_v = mean_{u != v} z_u for every view v: the Monte-Carlo estimate of T_M z (Eq. 8) that view v is pulled to.

    Eq. 10 takes the mean over all V views, v included. Leaving v out rescales Eq. 10's invariance term by ((V-1)/V)^2
    per view (mean_all - z_v = (V-1)/V (Tz_v - z_v)): under Eq. 9's hard constraint that changes no minimizer; in a
    Lagrangian form it is a change of scale of beta. It is not a bias fix. It is the form chosen here because at V = 2
    the target of a view is the other view, exactly BarlowTwins' cross-correlation, and because the expected
    correlation of a view with its target does not depend on V, so beta keeps its meaning as V changes.
    """
    return (z.sum(0, keepdim=True) - z) / (z.shape[0] - 1)


def off_diagonal(C: torch.Tensor) -> torch.Tensor:
    return C - torch.diag_embed(C.diagonal(dim1=-2, dim2=-1))


def barlow_loss(z: torch.Tensor, beta: float):
    """BarlowTwins' Lagrangian form of Eq. 9-10 for V views; returns (invariance, orthogonality).

    f_v is z_v standardized over the batch (mean 0, variance 1 in each dimension: the normalization (f_i, f_i) = 1);
    C_v = f_v^T Tf_v / B is the d x d cross-correlation of view v with its target, so the cost is linear in V.
        invariance    = mean_v sum_i (1 - C_v,ii)^2          (Eq. 10: each view agrees with the mean of the views)
        orthogonality = beta mean_v sum_{i != j} C_v,ij^2    (Eq. 9's constraint (f_i, f_j) = 0, as a penalty)
    At V = 2, Tf_1 = f_2 and C_2 = C_1^T: exactly the BarlowTwins loss with lambda = beta.
    """
    B = z.shape[1]
    f = (z - z.mean(1, keepdim=True)) / (z.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # as BatchNorm
    C = f.transpose(1, 2) @ view_target(f) / B  # [V, d, d]
    invariance = (1 - C.diagonal(dim1=1, dim2=2)).pow(2).sum(1).mean()
    orthogonality = beta * off_diagonal(C).pow(2).sum((1, 2)).mean()
    return invariance, orthogonality


VICREG_LAMBDA, VICREG_MU = 25.0, 25.0  # VICReg's invariance and variance weights; covariance weight nu = lambda beta d


def vicreg_loss(z: torch.Tensor, beta: float):
    """VICReg's form, where the constraint is a variance hinge (f_i, f_i) >= 1 and a covariance penalty:
        invariance    = lambda mean ||z_v - Tz_v||^2
        orthogonality = mu mean_v,i relu(1 - std_v,i)  +  nu 2 mean_v sum_{i != j} Cov_v,ij^2 / d
    with nu = lambda beta d (the paper reads VICReg's orthogonality strength as beta = nu / (lambda d)). VICReg averages
    the variance over its two branches but sums the covariance, hence 2 mean_v. At V = 2, beta = 1/(25 d) gives
    VICReg's own weights 25/25/1.
    """
    B, d = z.shape[1:]
    invariance = VICREG_LAMBDA * (z - view_target(z)).pow(2).mean()
    centred = z - z.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (B - 1)  # [V, d, d]
    std = (cov.diagonal(dim1=1, dim2=2) + 1e-4).sqrt()
    nu = VICREG_LAMBDA * beta * d
    orthogonality = VICREG_MU * F.relu(1 - std).mean() + nu * 2 * off_diagonal(cov).pow(2).sum((1, 2)).mean() / d
    return invariance, orthogonality


def ssl_loss(z: torch.Tensor, beta: float, loss: str = "barlow"):
    """The multi-view loss of embeddings z [V, B, d]; returns (total, invariance, orthogonality)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # correlations in bf16 are too coarse
    invariance, orthogonality = {"barlow": barlow_loss, "vicreg": vicreg_loss}[loss](z, beta)
    return invariance + orthogonality, invariance, orthogonality


def default_beta(d: int, loss: str) -> float:
    """barlow: 5/d. The authors' tuned BarlowTwins beta on CIFAR-10 (2 views; their run scripts) has beta * d = 2.6 at
    d = 64, 5.1 at d = 128 to 512, 1.5 to 3.1 at d = 768 to 4096 and 6.1 to 6.6 at d = 6144 and 8192: about 5 for the
    small projectors this file is for, within a factor of 3.5 everywhere. For 4 and 8 views they halved beta, in their
    own multi-view loss (see view_target); that beta keeps its value as V changes here is a design intent, not yet a
    measurement. vicreg: 1/(25 d), VICReg's own 25/25/1 weights."""
    return 5 / d if loss == "barlow" else 1 / (VICREG_LAMBDA * d)


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy of the normalized singular values) of z [N, d] (RankMe): d when all directions are used,
    1 under complete dimensional collapse."""
    s = torch.linalg.svdvals(z.float())
    p = s[s > 0] / s.sum()
    return math.exp(-(p * p.log()).sum().item())


# ==== Training ========================================================================================================
def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, views: torch.Tensor, beta: float, loss: str):
    """One Adam step on views [V, B, 3, H, W] of a batch; returns [loss, invariance, orthogonality] on the device."""
    V, B = views.shape[:2]
    x = views.flatten(0, 1)  # view-major [V * B, 3, H, W]: one forward pass for all views
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        z = model(x).view(V, B, -1)
    if dist.is_initialized():  # torchrun: the loss sees the whole batch, every process's part (see GatherViews)
        z = GatherViews.apply(z)
    total, invariance, orthogonality = ssl_loss(z, beta, loss)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return torch.stack([total, invariance, orthogonality]).detach()


def pretrain(cfg: Config, net: SSLNet, model: nn.Module, optimizer, generator: torch.Generator, data: Data, run):
    """Every epoch the images in a new random order; every step V views of a batch, the loss and an Adam step.
    `model` is `net` as trained: compiled, and under torchrun wrapped for several processes."""
    batch = cfg.batch_size // run.world
    steps = len(data.ssl_images) // batch  # full batches only: the loss standardizes over the batch
    recipe = aug_recipe(cfg)
    for epoch in range(run.epochs_done + 1, cfg.epochs + 1):
        tic = time.time()
        order = torch.randperm(len(data.ssl_images), generator=generator, device=generator.device)
        losses = torch.zeros(steps, 3, device=generator.device)  # read once per epoch: no host sync in the loop
        for step in range(steps):
            images = data.ssl_images[order[step * batch:(step + 1) * batch]]
            views = augment(images, cfg.views, generator, **recipe)
            losses[step] = train_step(model, optimizer, views, cfg.beta, cfg.loss)
        check_finite(losses, epoch)
        mean = losses.mean(0).tolist()
        seconds = time.time() - tic
        entry = dict(epoch=epoch, loss=mean[0], invariance=mean[1], orthogonality=mean[2],
                     views_per_s=steps * cfg.batch_size * cfg.views / seconds, time_s=seconds)
        if cfg.eval_every and epoch % cfg.eval_every == 0 and epoch < cfg.epochs and run.rank == 0:
            entry.update(evaluate(net, data))  # after the last epoch, main evaluates
        run.save(entry, net, optimizer, generator)  # the checkpoint, log.jsonl and the epoch's line


# ==== Evaluation: frozen features, a kNN classifier, the linear probe =================================================
@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, views: int = 1, generator=None, recipe=None) -> torch.Tensor:
    """Features of uint8 images from a backbone in eval mode, averaged over 1 clean + (views - 1) augmented views."""
    out = []
    for batch in images.split(1024):
        with autocast(batch.device):
            f = backbone(batch.float() / 255).float()
            if views > 1:
                x = augment(batch, views - 1, generator, **{**(recipe or {}), "size": batch.shape[-1]})
                f = (f + backbone(x.flatten(0, 1)).float().view(views - 1, len(batch), -1).sum(0)) / views
        out.append(f)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Weighted kNN on cosine similarity (k = 200, as lightly's and solo-learn's benchmarks)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = torch.zeros((), device=test_f.device)  # counted on the device: one host sync at the end
    for f, y in zip(test_f.split(1024), test_y.split(1024)):
        sim, idx = (f @ train_f.T).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(f), classes, device=f.device).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == y).sum()
    return correct.item() / len(test_y)


@torch.no_grad()
def linear_probe(train_f, train_y, test_f, test_y, classes: int, epochs: int = 200, seed: int = 0) -> float:
    """Test top-1 accuracy of a linear classifier on frozen features, as in the paper: Adam (lr 1e-3, weight decay
    1e-6), cross-entropy with label smoothing 0.1, batch 512, 200 epochs; from zero weights (the problem is convex).
    Features are standardized with the training statistics (a linear map: same capacity, better conditioned).
    The gradient and the Adam update are written out: a step of this small problem costs its kernel launches, about
    12 here against ~50 for nn.Linear + F.cross_entropy + torch.optim.Adam, which compute the same."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x, x_test = (F.pad((f - mean) / std, (0, 1), value=1.0) for f in (train_f, test_f))  # a constant 1: the bias
    target = F.one_hot(train_y, classes) * 0.9 + 0.1 / classes  # label smoothing 0.1
    W = torch.zeros(classes, x.shape[1], device=x.device)
    m, v = torch.zeros_like(W), torch.zeros_like(W)  # Adam's moments
    generator = torch.Generator(x.device).manual_seed(seed)
    t = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator, device=x.device).split(512):
            t += 1
            error = torch.softmax(x[idx] @ W.T, 1).sub_(target[idx])  # d(cross-entropy)/d(logits), times the batch
            grad = torch.addmm(W, error.T, x[idx], beta=1e-6, alpha=1 / len(idx))  # with the weight decay, as Adam
            m.lerp_(grad, 0.1)  # Adam: beta1 0.9, beta2 0.999, eps 1e-8, lr 1e-3, with bias corrections
            v.mul_(0.999).addcmul_(grad, grad, value=0.001)
            W.addcdiv_(m, (v.sqrt() / math.sqrt(1 - 0.999 ** t)).add_(1e-8), value=-1e-3 / (1 - 0.9 ** t))
    return ((x_test @ W.T).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def evaluate(net: SSLNet, data: Data, probe_views: int = 0, generator=None, recipe=None, seed: int = 0) -> dict:
    """kNN accuracy and the effective rank of the test embeddings, from features of clean images; with probe_views
    >= 1 the linear probe too, on features averaged over probe_views views (reusing the clean ones when it is 1)."""
    net.eval()  # BatchNorm with its running statistics
    train_f, test_f = features(net.backbone, data.train_images), features(net.backbone, data.test_images)
    result = dict(knn_acc=knn_accuracy(train_f, data.train_labels, test_f, data.test_labels, len(data.classes)),
                  erank=effective_rank(net.projector(test_f)))
    if probe_views > 1:
        train_f, test_f = (features(net.backbone, images, probe_views, generator, recipe)
                           for images in (data.train_images, data.test_images))
    if probe_views:
        result["probe_acc"] = linear_probe(train_f, data.train_labels, test_f, data.test_labels, len(data.classes),
                                           seed=seed)
    net.train()
    return result


# ==== Main ============================================================================================================
def main(cfg: Config) -> dict:
    """Pretrain, evaluate, and return the results (also written to out_dir/results.json). Rerunning resumes."""
    start = time.time()
    cfg = check_config(cfg)
    with Run(cfg) as run:  # the run folder and the processes: see "Run bookkeeping"
        data = load_data(cfg, run.device, run.rank, run.world)
        torch.manual_seed(cfg.seed)  # the initialization
        net = SSLNet(cfg.proj_dim, *pixel_stats(data.ssl_images)).to(run.device)
        if run.device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)  # the layout of cuDNN's fastest convolutions
            torch.backends.cudnn.benchmark = True
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator(run.device).manual_seed(cfg.seed + (run.rank << 32))  # batches, augmentations
        model = run.resume(net, optimizer, generator)  # from the checkpoint of an unfinished run, if any
        run.say(f"pretraining on {len(data.ssl_images) * run.world} images, {cfg.views} views, d = {cfg.proj_dim}, "
                f"beta = {cfg.beta:g}, {cfg.loss}, on {run.device}" + f" x {run.world} processes" * (run.world > 1))
        pretrain(cfg, net, model, optimizer, generator, data, run)
        if run.rank:
            return {}
        tic = time.time()
        generator = torch.Generator(run.device).manual_seed(cfg.seed + 1)  # the probe's augmented views
        final = evaluate(net, data, cfg.probe_views, generator, aug_recipe(cfg), cfg.seed)
        run.log[-1].update(final)
        results = dict(**final, epochs=cfg.epochs, pretrain_time_s=sum(e["time_s"] for e in run.log),
                       eval_time_s=time.time() - tic, wall_time_s=time.time() - start,
                       data=dict(pretrain=len(data.ssl_images) * run.world, train=len(data.train_images),
                                 test=len(data.test_images), image=list(data.train_images.shape[1:])),
                       processes=run.world, **provenance(run.device), config=asdict(cfg), log=run.log)
        run.finish(results)
        run.say(f"linear probe: {final['probe_acc']:.2%} test top-1, kNN {final['knn_acc']:.2%}, effective rank "
                f"{final['erank']:.1f}; results in {run.out}")
        return results


# ======================================================================================================================
# Run bookkeeping: option checks, the run folder (lock, checkpoints, resume), several processes, signals, the command
# line. None of it is the method: a reader of the paper can stop here.
# ======================================================================================================================
class UserError(Exception):
    """A problem the user can fix: the command line prints it as one line, without a traceback."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


class Stop(BaseException):
    """Raised by the SIGINT, SIGTERM and SIGHUP handlers; a BaseException, as KeyboardInterrupt: nothing swallows it."""


def stop(signum, frame):
    for sig in STOP_SIGNALS:  # one clean stop: a second signal must not cut short the checkpoint being written
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signum)


STOP_SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s]
LIMITS = dict(views=2, proj_dim=1, batch_size=2, epochs=1, subset=0, probe_views=1, eval_every=0, seed=0)
CHOICES = dict(dataset=("cifar10", "cifar100", "stl10"), loss=("barlow", "vicreg"))
RESUMABLE = ("epochs", "eval_every", "device", "compile", "overwrite", "out_dir")  # may change when a run resumes


def check_config(cfg: Config) -> Config:
    """Check every option before anything is read or written, and fill in the defaults that depend on others."""
    for name, low in LIMITS.items():
        if not low <= getattr(cfg, name) < 2 ** 32:
            raise UserError(f"--{name.replace('_', '-')} must be a whole number from {low} to {2 ** 32 - 1}, got "
                            f"{getattr(cfg, name)}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    for ok, message in [
        (cfg.beta is None or 0 <= cfg.beta < math.inf, f"--beta must be a finite number >= 0, got {cfg.beta}"),
        (0 < cfg.train_fraction <= 1, f"--train-fraction must be in (0, 1], got {cfg.train_fraction}"),
        (0 < cfg.lr < math.inf, f"--lr must be a finite number > 0, got {cfg.lr}"),
        (0 <= cfg.weight_decay < math.inf, f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device), f"--device must be auto, cpu, cuda or cuda:N, got "
                                                            f"{cfg.device!r}"),
    ]:
        if not ok:
            raise UserError(message)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} usable CUDA GPUs; "
                        f"use --device cpu")
    if cfg.device == "auto" and device == "cpu" and Path("/proc/driver/nvidia/version").exists():
        print(f"ssl_min: warning: this PyTorch (CUDA {torch.version.cuda}) cannot use this machine's NVIDIA driver: "
              f"running on the CPU, where the default run takes days; install a matching PyTorch (README)",
              file=sys.stderr)
    name = Path(cfg.data_dir).resolve().name if cfg.data_dir else cfg.dataset
    return replace(cfg, device=device, beta=default_beta(cfg.proj_dim, cfg.loss) if cfg.beta is None else cfg.beta,
                   compile=device.startswith("cuda") if cfg.compile is None else cfg.compile,
                   out_dir=cfg.out_dir or f"runs/{name}-v{cfg.views}-d{cfg.proj_dim}-{cfg.loss}-s{cfg.seed}")


def check_finite(losses: torch.Tensor, epoch: int):
    bad = (~losses.isfinite().all(1)).nonzero()  # once per epoch: the training loop's one host sync
    if len(bad):
        raise UserError(f"the loss became non-finite at epoch {epoch}, step {bad[0].item() + 1}: lower --beta or --lr",
                        1)


def write_atomic(path: Path, content):
    """Write text, or a state dict with torch.save, through a temporary file and a rename: a crash or a full disk
    never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            torch.save(content, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only file system holds no partial file either
        raise UserError(f"could not write {path} ({str(e).splitlines()[0]}); the previous version is kept", 1) from None


def save_json(path: Path, obj):
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def cpu_copy(obj):
    """A copy of a nested state dict on the CPU, which the later steps do not change while it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    return [cpu_copy(v) for v in obj] if isinstance(obj, list) else obj


def provenance(device: torch.device) -> dict:
    """What produced a result: the device, the library versions and the git commit (+changes: uncommitted edits)."""
    git = ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--abbrev=40", "--dirty=+changes"]
    try:
        commit = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:  # no git
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return dict(device=name, commit=commit, versions=dict(python=platform.python_version(), torch=torch.__version__,
                                                          torchvision=torchvision.__version__))


class GatherViews(torch.autograd.Function):
    """torchrun: every process's embeddings [V, b, d] -> [V, processes * b, d], so that the standardization and the
    correlations are those of the whole batch. Every process computes the same loss from them; the backward pass sums
    their gradients and returns each process its own part (DDP then averages the weights' gradients)."""

    @staticmethod
    def forward(ctx, z):
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size(), 1)[dist.get_rank()]


class Run:
    """The run folder and the processes. On entering: join torchrun's processes, lock --out-dir, read the checkpoint
    of an unfinished run. After every epoch: checkpoint, config.json and log.jsonl, written in the background by
    process 0, the only one that writes or prints. On leaving: wait for the writes; say in one line what is saved."""

    def __init__(self, cfg: Config):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device(cfg.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.log = []  # one entry per epoch trained, as in the checkpoint
        self.saved = 0  # the epochs in the checkpoint on disk
        self.state = None  # the checkpoint read, until resume() loads it
        self.lock = None  # a file descriptor of --out-dir, locked
        self.created = False  # whether this run created --out-dir
        self.writer, self.pending = ThreadPoolExecutor(1), None  # the thread that writes checkpoints, and its job

    def __enter__(self):
        try:
            if self.world > 1:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                if self.cfg.batch_size % self.world:
                    raise UserError(f"--batch-size {self.cfg.batch_size} must divide among the {self.world} processes")
            if self.rank == 0:
                self.take_folder()
            if (self.out / "checkpoint.pt").exists() and not self.cfg.overwrite:
                self.state = read_checkpoint(self.out / "checkpoint.pt", self.cfg)
                self.saved = self.state["epoch"]
            return self
        except BaseException:
            self.__exit__(None, None, None)  # give back what was taken
            raise

    @property
    def epochs_done(self) -> int:
        return len(self.log)

    def take_folder(self):
        """Create and lock --out-dir; refuse one that is in use, or holds a finished run."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out-dir {self.out} is a file; pass a folder")
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if not os.access(self.out, os.W_OK):
                raise PermissionError(13, "not writable")
            if fcntl:
                self.lock = os.open(self.out, os.O_RDONLY)
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{self.out} is in use by another ssl_min run; wait for it, or pass another --out-dir",
                            1) from None
        except OSError as e:
            raise UserError(f"--out-dir {self.out}: {e.strerror}; pass another --out-dir") from None
        if (self.out / "results.json").exists() and not self.cfg.overwrite:
            raise UserError(f"{self.out} already holds a finished run (results.json); pass another --out-dir, or "
                            f"--overwrite to replace it")

    def resume(self, net: SSLNet, optimizer, generator) -> nn.Module:
        """Load the checkpoint, if any. Return the model to train: net, compiled with --compile, and under torchrun
        in DistributedDataParallel, with SyncBatchNorm on CUDA (where torch has it; CPU processes keep their own)."""
        if self.state:
            try:
                net.load_state_dict(self.state["model"])
                optimizer.load_state_dict(self.state["optimizer"])
                for p in net.parameters():
                    assert all(s.shape == p.shape for s in optimizer.state[p].values() if s.dim()), "optimizer state"
                generator.set_state(self.state["rng"][self.rank])
                self.log = list(self.state["log"])
                assert len(self.log) == self.state["epoch"] and all(isinstance(e, dict) for e in self.log), "log"
            except Exception as e:
                raise UserError(f"cannot resume from {self.out / 'checkpoint.pt'} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]}); it is left as is: pass another --out-dir, or "
                                f"--overwrite to replace it") from None
            self.state = None
            self.say(f"resuming {self.out} after epoch {self.epochs_done}")
        model = net
        if self.world > 1:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            devices = [self.device] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=devices)
        if self.cfg.compile:
            model.compile()
        return model

    def save(self, entry: dict, net: SSLNet, optimizer, generator):
        """End of an epoch: give the checkpoint to the writer thread (after the last one is written), print the line."""
        self.log.append(entry)
        rng = [generator.get_state()]  # every process's random stream, for an exact resume
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, generator.get_state())
        if self.rank:
            return
        state = cpu_copy(dict(config=asdict(self.cfg), epoch=self.epochs_done, log=self.log, world_size=self.world,
                              model=net.state_dict(), optimizer=optimizer.state_dict(), rng=rng))
        self.wait()
        self.pending = self.writer.submit(self.write, state)
        knn = f"  kNN {entry['knn_acc']:.2%}  effective rank {entry['erank']:.1f}" if "knn_acc" in entry else ""
        self.say(f"epoch {entry['epoch']:3d}/{self.cfg.epochs}  loss {entry['loss']:9.3f} (invariance "
                 f"{entry['invariance']:8.3f}, orthogonality {entry['orthogonality']:8.3f})  "
                 f"{entry['views_per_s']:8,.0f} views/s  {entry['time_s']:6.1f} s{knn}")

    def write(self, state: dict):
        write_atomic(self.out / "checkpoint.pt", state)
        self.saved = state["epoch"]
        if self.cfg.overwrite:  # the replaced run's results go with its checkpoint
            (self.out / "results.json").unlink(missing_ok=True)
        save_json(self.out / "config.json", state["config"])
        write_atomic(self.out / "log.jsonl", "".join(json.dumps(entry) + "\n" for entry in state["log"]))

    def wait(self):
        """Wait for the checkpoint being written; raise its error, if any."""
        pending, self.pending = self.pending, None
        if pending:
            pending.result()

    def finish(self, results: dict):
        self.wait()
        save_json(self.out / "results.json", results)

    def say(self, text: str):
        if self.rank == 0:
            print(text, flush=True)

    def __exit__(self, kind, error, traceback):
        try:
            self.wait()
        finally:
            self.writer.shutdown()
            if self.lock is not None:
                os.close(self.lock)  # releases the lock
            if self.created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()  # nothing was written: leave no trace
            if dist.is_initialized():
                dist.destroy_process_group()
        if isinstance(error, Stop):
            message, code = f"stopped by {signal.Signals(error.args[0]).name}", 128 + error.args[0]
        elif isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error):
            message, code = (f"out of memory on {self.device}: lower --batch-size ({self.cfg.batch_size}), --views "
                             f"({self.cfg.views}) or --proj-dim ({self.cfg.proj_dim}), or use smaller images"), 1
        elif isinstance(error, BrokenPipeError):
            message, code = "the output was closed", 128 + 13
        elif isinstance(error, UserError) and error.code == 1:  # the run had started: a non-finite loss, a failed write
            message, code = str(error), 1
        else:
            return False
        if self.saved:
            saved = f"the checkpoint after epoch {self.saved} is in {self.out}: rerun the same command to resume"
        elif (self.out / "checkpoint.pt").exists():
            saved = f"no epoch of this run had finished, and {self.out} still holds the run it was to replace"
        else:
            saved = "no epoch had finished, so nothing is saved"
        raise UserError(f"{message}; {saved}", code) from None


def read_checkpoint(path: Path, cfg: Config) -> dict:
    """The state saved in the checkpoint of an unfinished run, after checking that it is one of this configuration."""
    try:
        with warnings.catch_warnings():  # torch warns about some foreign files before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # plain types only: no code runs
        saved, epoch, world = dict(state["config"]), state["epoch"], state["world_size"]
        assert isinstance(epoch, int) and isinstance(world, int), "epoch"
    except Exception as e:  # a truncated or foreign file: say so, and leave it alone
        raise UserError(f"cannot resume from {path} ({type(e).__name__}); it is left as is: pass another --out-dir, "
                        f"or --overwrite to replace it") from None
    differ = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]
    if "data_dir" in differ and saved["data_dir"] and Path(saved["data_dir"]).resolve() == Path(cfg.data_dir).resolve():
        differ.remove("data_dir")  # the same folder, written another way
    if differ or world != int(os.environ.get("WORLD_SIZE", 1)):
        what = ", ".join([f"--{k.replace('_', '-')} {saved.get(k)} vs {getattr(cfg, k)}" for k in differ] +
                         [f"{world} processes"] * (world != int(os.environ.get("WORLD_SIZE", 1))))
        raise UserError(f"{path.parent} holds an unfinished run of another configuration ({what}); rerun with its "
                        f"options to resume it, or pass another --out-dir (--overwrite discards it)")
    if epoch > cfg.epochs:
        raise UserError(f"{path.parent} has already trained {epoch} epochs, more than --epochs {cfg.epochs}")
    return state


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.error = lambda message: parser.exit(2, f"ssl_min: error: {message} (see --help)\n")  # one line, no usage
    for f in fields(Config):
        kind = dict(type=next(iter(get_args(f.type)), f.type), default=f.default)
        if f.type is bool:
            kind = dict(action="store_true")
        elif f.type == bool | None:
            kind = dict(action=argparse.BooleanOptionalAction, default=None)
        shown = "" if f.default in ("", None) or f.default is False else " (default: %(default)s)"
        parser.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"] + shown, **kind)
    cfg = Config(**vars(parser.parse_args(argv)))
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        main(cfg)
        return
    except UserError as e:
        message, code = str(e), e.code
    except Stop as e:  # before the run had started
        message, code = f"stopped by {signal.Signals(e.args[0]).name}; nothing is saved", 128 + e.args[0]
    try:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets here: one says it
            print(f"ssl_min: {'error: ' if code == 2 else ''}{message}", file=sys.stderr, flush=True)
    except OSError:
        pass  # the terminal is gone (SIGHUP)
    if code == 128 + 13:  # stdout is a closed pipe: what Python flushes at exit goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


if __name__ == "__main__":
    cli()
