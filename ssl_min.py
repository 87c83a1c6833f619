"""ssl_min: small projectors and multiple views for efficient self-supervised pretraining, in one file.

A minimal, fast PyTorch reference implementation of A. Ghosh, K. K. Agrawal, S. Sodhani, A. M. Oberman and
B. A. Richards, "Harnessing small projectors and multiple views for efficient vision pretraining", NeurIPS 2024
(arXiv 2312.10725). The paper shows that BarlowTwins and VICReg learn the top eigenfunctions of the augmentation
kernel, and rewrites their loss (Eq. 9-10) as the invariance of each view to the mean over the views (a Monte-Carlo
estimate of the augmentation-averaging operator T_M) plus an orthogonality constraint of strength beta. Consequences:
a small projector (d = 128) matches a large one when beta ~ 1/d, and more views per image (V = 4, 8) learn faster,
so that 4 views on half of the data match 2 views on all of it.

The file reads top to bottom: config, data, multi-view augmentation, ResNet-18, projector, loss, training, probe.

    pip install -r requirements.txt
    python ssl_min.py --views 4 --proj-dim 128             # GPU: CIFAR-10 (downloaded), 100 epochs
    python ssl_min.py --data-dir path/to/cifar10 --subset 50 --epochs 2 --views 2 --batch-size 100   # CPU, minutes

`--data-dir` takes an image folder, `train/<class>/*.png` and `test/<class>/*.png`. Rerunning a command resumes its
run from `--out-dir`; `python ssl_min.py --help` lists every option.
"""
import argparse
import json
import math
import os
import platform
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    dataset: str = opt("cifar10", "cifar10, cifar100 or stl10 (downloaded by torchvision; STL-10 pretrains on its unlabeled split)")
    data_dir: str = opt("", "image folder with train/<class>/ and test/<class>/ to use instead of a download")
    subset: int = opt(0, "keep only this many images per class of every split (0: all), for quick CPU runs")
    train_fraction: float = opt(1.0, "seeded, class-balanced fraction of the training images used for pretraining")
    views: int = opt(4, "augmented views per image, V >= 2")
    proj_dim: int = opt(128, "projector width d (hidden and output)")
    beta: float | None = opt(None, "orthogonality strength; default 5/d for barlow (paper's tuned beta*d ~ 5), 1/(25 d) for vicreg (VICReg's 25/25/1 weights)")
    loss: str = opt("barlow", "barlow or vicreg: the two Lagrangian forms of the reformulated loss (Eq. 9-10)")
    epochs: int = opt(100, "pretraining epochs")
    batch_size: int = opt(512, "images per step (each seen in V views)")
    lr: float = opt(1e-3, "Adam learning rate (the paper's)")
    weight_decay: float = opt(1e-6, "Adam weight decay (the paper's)")
    probe_views: int = opt(1, "views averaged per image for probe features: 1 clean + (n-1) augmented (the paper's multi-view runs used 16)")
    eval_every: int = opt(10, "kNN accuracy every this many epochs (and after the last; 0: only after the last)")
    seed: int = opt(0, "seed for the initialization, the subsets, the batches and the augmentations")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    out_dir: str = opt("", "where config.json, log.jsonl, results.json and checkpoint.pt go (default runs/<dataset>-v<views>-d<d>-<loss>-s<seed>)")
    compile: bool = opt(False, "torch.compile the training step (18 s once, then 1.3x faster on an H200: pays off after ~25 epochs)")
    overwrite: bool = opt(False, "replace a finished or different run in --out-dir instead of refusing")


DATASETS = ("cifar10", "cifar100", "stl10")
LOSSES = ("barlow", "vicreg")
RESUMABLE = ("epochs", "eval_every", "device", "compile", "overwrite")  # may change when a run is resumed


class UserError(Exception):
    """A problem the user can fix: the command line prints it as one line, without a traceback."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def resolve(cfg: Config) -> Config:
    """Check every option before anything is read or written, and fill in the defaults that depend on others."""
    checks = [
        (cfg.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}"),
        (cfg.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}"),
        (cfg.views >= 2, f"--views must be at least 2 (each view is compared with the others), got {cfg.views}"),
        (cfg.proj_dim >= 1, f"--proj-dim must be at least 1, got {cfg.proj_dim}"),
        (cfg.beta is None or 0 <= cfg.beta < math.inf, f"--beta must be a finite number >= 0, got {cfg.beta}"),
        (0 < cfg.train_fraction <= 1, f"--train-fraction must be in (0, 1], got {cfg.train_fraction}"),
        (cfg.batch_size >= 2, f"--batch-size must be at least 2 (batch statistics need two samples), got {cfg.batch_size}"),
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.subset >= 0, f"--subset must be >= 0 (0 keeps every image), got {cfg.subset}"),
        (cfg.probe_views >= 1, f"--probe-views must be at least 1, got {cfg.probe_views}"),
        (cfg.eval_every >= 0, f"--eval-every must be >= 0, got {cfg.eval_every}"),
        (0 < cfg.lr < math.inf, f"--lr must be a finite number > 0, got {cfg.lr}"),
        (0 <= cfg.weight_decay < math.inf, f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device), f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} usable CUDA GPU(s); use --device cpu")
    beta = cfg.beta if cfg.beta is not None else (5 / cfg.proj_dim if cfg.loss == "barlow" else 1 / (25 * cfg.proj_dim))
    name = Path(cfg.data_dir).name if cfg.data_dir else cfg.dataset
    out_dir = cfg.out_dir or f"runs/{name}-v{cfg.views}-d{cfg.proj_dim}-{cfg.loss}-s{cfg.seed}"
    return replace(cfg, device=device, beta=beta, out_dir=out_dir)


# --- Data: every split is one uint8 tensor [N, 3, H, W] on the device, so batches are slices, not a DataLoader. ------
@dataclass
class Data:
    pretrain: torch.Tensor  # the images SSL pretrains on (no labels used)
    train: torch.Tensor  # labeled images for the kNN and the linear probe
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor


def read_image_folder(folder: Path):
    """All images of folder/<class>/* as uint8 [N, 3, H, W] and labels, classes sorted by name (ImageFolder order)."""
    if not folder.is_dir():
        raise UserError(f"--data-dir: {folder} is missing; expected {folder.parent}/train/<class>/ and {folder.parent}/test/<class>/")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"--data-dir: {folder} has no class folders; put its images in {folder}/<class>/")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted(p for p in (folder / name).iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise UserError(f"--data-dir: cannot read {path} as an image ({e}); remove or convert it") from None
            if images and image.shape != images[0].shape:
                raise UserError(f"--data-dir: {path} is {image.shape[1]}x{image.shape[0]} px but the first image is "
                                f"{images[0].shape[1]}x{images[0].shape[0]}; resize all images to one size first")
            images.append(image)
            labels.append(label)
    if not images:
        raise UserError(f"--data-dir: the class folders of {folder} hold no images")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels), classes


def download(cfg: Config, root: Path):
    """The splits of a torchvision dataset as uint8 tensors [N, 3, H, W] and labels (None for STL-10's unlabeled)."""
    try:
        if cfg.dataset == "stl10":
            splits = {s: torchvision.datasets.STL10(root, split=s, download=True) for s in ("unlabeled", "train", "test")}
            data = {s: (torch.from_numpy(d.data), torch.from_numpy(d.labels).long()) for s, d in splits.items()}
            return data["unlabeled"][0], data["train"], data["test"], splits["train"].classes
        kind = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        splits = {s: kind(root, train=s == "train", download=True) for s in ("train", "test")}
        data = {s: (torch.from_numpy(d.data).permute(0, 3, 1, 2), torch.tensor(d.targets)) for s, d in splits.items()}
        return None, data["train"], data["test"], splits["train"].classes
    except (OSError, RuntimeError) as e:  # no internet: URLError is an OSError
        raise UserError(f"could not download {cfg.dataset} to {root} ({type(e).__name__}); without internet, pass "
                        f"--data-dir with train/<class>/ and test/<class>/ image folders") from None


def class_balanced(labels: torch.Tensor, seed: int, fraction: float = 1.0, per_class: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded random `fraction` (or `per_class` images) of every class (the authors' were unseeded)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in labels.unique():
        members = rng.permutation(np.flatnonzero(labels.numpy() == c.item()))
        keep.append(members[: per_class or max(1, round(fraction * len(members)))])
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def load_data(cfg: Config, device: torch.device) -> Data:
    if cfg.data_dir:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise UserError(f"--data-dir {root} does not exist; give a folder with train/<class>/ and test/<class>/")
        (train, train_y, classes), (test, test_y, test_classes) = (read_image_folder(root / s) for s in ("train", "test"))
        unlabeled = None
        if test_classes != classes:
            raise UserError(f"--data-dir: train/ and test/ have different class folders ({classes} vs {test_classes})")
    else:
        unlabeled, (train, train_y), (test, test_y), classes = download(cfg, Path.home() / ".cache" / "ssl_min")
    if cfg.subset:
        train, train_y = train[(i := class_balanced(train_y, cfg.seed, per_class=cfg.subset))], train_y[i]
        test, test_y = test[(i := class_balanced(test_y, cfg.seed, per_class=cfg.subset))], test_y[i]
    if unlabeled is None:  # pretrain on the labeled training images, without their labels
        unlabeled = train[class_balanced(train_y, cfg.seed, fraction=cfg.train_fraction)]
    else:  # STL-10's unlabeled split has no classes to balance: a seeded random part of it
        keep = round(cfg.train_fraction * (cfg.subset * len(classes) if cfg.subset else len(unlabeled)))
        unlabeled = unlabeled[torch.randperm(len(unlabeled), generator=torch.Generator().manual_seed(cfg.seed))[:keep]]
    on = lambda t: t.contiguous().to(device)  # noqa: E731
    return Data(on(unlabeled), on(train), on(train_y), on(test), on(test_y))


# --- Multi-view augmentation: batched, every image and view draws its own parameters, on the device. -----------------
# torchvision's v2 transforms draw one set of parameters per call, so on a batch every image would get the same crop.
def gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # ITU-R 601, as torchvision


def hue_shift(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of images x [n, 3, H, W] in [0, 1] by h [n] turns, in HSV space as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    top, bottom = x.aminmax(dim=1)[::-1]
    delta = top - bottom  # HSV value * saturation
    # Hue in sixths of a turn: which channel is the largest picks the sector, the other two the place in it.
    sector = torch.where(top == r, g - b, torch.where(top == g, b - r + 2 * delta, r - g + 4 * delta))
    hue = sector / delta.clamp_min(1e-8) + 6 * h.view(-1, 1, 1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue.unsqueeze(1)) % 6
    return top.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)  # HSV -> RGB


def augment(images: torch.Tensor, views: int, generator: torch.Generator, size: int | None = None,
            scale=(0.08, 1.0), p_gray: float = 0.2) -> torch.Tensor:
    """`views` augmented views of every image: uint8 [B, 3, H, W] -> float [views, B, 3, size, size] in [0, 1].

    Random resized crop (area `scale`, aspect 3/4-4/3) and horizontal flip in one resampling, colour jitter with
    p 0.8 (brightness, contrast, saturation 0.4, hue 0.1, in this fixed order), grayscale with p `p_gray`.
    """
    B, _, H, W = images.shape
    n, size, dev = views * B, size or H, images.device
    u = lambda lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)  # noqa: E731
    x = images.float().div(255).repeat(views, 1, 1, 1)  # [views * B, 3, H, W], view-major
    # Crop: the area fraction and log-aspect are uniform as in torchvision; sides are clamped to the image instead
    # of torchvision's up-to-10 redraws. An affine grid maps the output square onto the crop box (flipped or not).
    area, aspect = u(*scale), torch.exp(u(math.log(3 / 4), math.log(4 / 3)))
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of the sides
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = w * torch.where(u() < 0.5, -1.0, 1.0)
    theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = (1 - w) * u(-1, 1), h, (1 - h) * u(-1, 1)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter: a sample that skips it (p 0.2) gets the identity factors, so no branch per sample.
    jitter = u() < 0.8
    b, c, s = (torch.where(jitter, u(0.6, 1.4), 1.0).view(-1, 1, 1, 1) for _ in range(3))
    x = (x * b).clamp(0, 1)
    mean = gray(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    x = ((x - (y := gray(x))) * s + y).clamp(0, 1)
    x = hue_shift(x, torch.where(jitter, u(-0.1, 0.1), 0.0))
    x = torch.where((u() < p_gray).view(-1, 1, 1, 1), gray(x).expand_as(x), x)
    return x.view(views, B, 3, size, size)


def aug_recipe(cfg: Config) -> dict:
    """The paper's augmentation settings: STL-10 uses 64 px crops of area 0.2-1 and grayscale with p 0.1."""
    return dict(size=64, scale=(0.2, 1.0), p_gray=0.1) if cfg.dataset == "stl10" and not cfg.data_dir else {}


# --- Backbone and projector ------------------------------------------------------------------------------------------
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


def projector(d: int) -> nn.Sequential:
    """Linear (no bias) - BatchNorm - ReLU - Linear, hidden width = output width = d, as in the paper. The last
    layer has no bias either: the batch standardization in the loss would remove it."""
    return nn.Sequential(nn.Linear(512, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, d, bias=False))


# --- The reformulated loss (Eq. 9-10), for any number of views -------------------------------------------------------
def ssl_loss(z: torch.Tensor, beta: float, loss: str = "barlow"):
    """The multi-view SSL loss of embeddings z [V, B, d]; returns (total, invariance, orthogonality).

    Eq. 9 asks each feature f_i to be invariant to the augmentation-averaging operator, ||T_M f_i - f_i||^2, subject
    to orthonormality (f_i, f_j) = delta_ij. For view v, the mean of the *other* views, Tf_v = mean_{u != v} f_u, is an
    unbiased Monte-Carlo estimate of T_M f (Eq. 10; including f_v itself would bias it). The cross-correlation
    C_v = f_v^T Tf_v / B is then d x d, so the cost is linear in V.

    barlow, the Lagrangian form: with f the batch-standardized embeddings (the normalization of the constraint),
        L = mean_v [ sum_i (1 - C_v,ii)^2 + beta * sum_{i != j} C_v,ij^2 ].
    At V = 2, Tf_1 = f_2 and C_2 = C_1^T: exactly the BarlowTwins loss with lambda = beta.
    vicreg: invariance 25 * ||z_v - Tz_v||^2 (mean), variance hinge 25 * relu(1 - std), covariance weight
    nu = 25 * beta * d (the paper's reading beta = nu / (d * 25)); beta = 1/(25 d) gives VICReg's 25/25/1 exactly at V = 2.
    """
    V, B, d = z.shape
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # correlations in bf16 are too coarse
    if loss == "barlow":
        f = (z - z.mean(1, keepdim=True)) / (z.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # as BatchNorm
        Tf = (f.sum(0, keepdim=True) - f) / (V - 1)
        C = f.transpose(1, 2) @ Tf / B  # [V, d, d]
        on = C.diagonal(dim1=1, dim2=2)
        invariance = (1 - on).pow(2).sum(1).mean()
        orthogonality = beta * (C.pow(2).sum((1, 2)) - on.pow(2).sum(1)).mean()
    elif loss == "vicreg":
        Tz = (z.sum(0, keepdim=True) - z) / (V - 1)
        invariance = 25 * (z - Tz).pow(2).mean()
        zc = z - z.mean(1, keepdim=True)
        cov = zc.transpose(1, 2) @ zc / (B - 1)  # [V, d, d]
        var = cov.diagonal(dim1=1, dim2=2)
        off = cov.pow(2).sum((1, 2)) - var.pow(2).sum(1)
        # VICReg averages the variance term over its two branches but sums the covariance term: 2 * mean over views.
        orthogonality = 25 * F.relu(1 - (var + 1e-4).sqrt()).mean() + 25 * beta * d * 2 * off.mean() / d
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return invariance + orthogonality, invariance, orthogonality


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy of the normalized singular values) of z [N, d] (RankMe): d when all directions are used,
    1 under complete dimensional collapse."""
    s = torch.linalg.svdvals(z.float())
    p = s[s > 0] / s.sum()
    return math.exp(-(p * p.log()).sum().item())


# --- Training --------------------------------------------------------------------------------------------------------
def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class StopRequest:
    """Ctrl-C and SIGTERM ask the loop to stop at the next step boundary, where a consistent checkpoint can be written."""

    def __enter__(self):
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, lambda *_: setattr(self, "requested", True))
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def write_atomic(path: Path, write):
    """Write through a temporary file and a rename, so a crash or a full disk never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e}); the previous version is kept", code=1) from None


def save_json(path: Path, obj):
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def open_run(cfg: Config):
    """The checkpoint to resume from (or None), after refusing to touch a finished, different or corrupt run."""
    out = Path(cfg.out_dir)
    if cfg.overwrite:
        for stale in ("results.json", "checkpoint.pt", "log.jsonl"):
            (out / stale).unlink(missing_ok=True)
        return None
    if (out / "results.json").exists():
        raise UserError(f"{out} already holds a finished run (results.json); pass --overwrite to replace it, "
                        f"or another --out-dir")
    if not (out / "checkpoint.pt").exists():
        if (out / "log.jsonl").exists():
            raise UserError(f"{out} holds the log of another run but no checkpoint; pass --overwrite or another --out-dir")
        return None
    try:
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception as e:  # a truncated or foreign file: say so and leave it alone
        raise UserError(f"cannot read {out / 'checkpoint.pt'} ({type(e).__name__}); it is left as is: "
                        f"pass --overwrite or another --out-dir") from None
    differ = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]
    if differ:
        what = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} vs {getattr(cfg, k)}" for k in differ)
        raise UserError(f"{out} holds a run with another configuration ({what}); pass --overwrite or another --out-dir")
    if state["epoch"] > cfg.epochs:
        raise UserError(f"{out} has already trained {state['epoch']} epochs, more than --epochs {cfg.epochs}")
    return state


@dataclass
class Run:
    """Everything a checkpoint holds, and the network to call. perm, hist and step locate a run stopped inside an epoch."""
    cfg: Config
    backbone: nn.Module
    projector: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    log: list
    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch
    perm: torch.Tensor | None = None  # the current epoch's order of images
    hist: torch.Tensor | None = None  # the current epoch's [steps, 3] losses so far
    forward: nn.Module | None = None  # backbone then projector, compiled with --compile (not saved: the weights are)

    def save(self):
        state = dict(config=asdict(self.cfg), epoch=self.epoch, step=self.step, log=self.log, perm=self.perm, hist=self.hist,
                     backbone=self.backbone.state_dict(), projector=self.projector.state_dict(),
                     optimizer=self.optimizer.state_dict(), rng=self.generator.get_state())
        write_atomic(Path(self.cfg.out_dir) / "checkpoint.pt", lambda p: torch.save(state, p))

    def load(self, state: dict):
        self.backbone.load_state_dict(state["backbone"])
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"])
        self.log, self.epoch, self.step = state["log"], state["epoch"], state["step"]
        self.perm, self.hist = (t.to(self.generator.device) if t is not None else None for t in (state["perm"], state["hist"]))


def pixel_stats(images: torch.Tensor):
    """Per-channel mean and std of uint8 images [N, 3, H, W], from a spread sample of at most ~4096 of them."""
    pixels = images[:: max(1, len(images) // 4096)].float() / 255
    return pixels.mean((0, 2, 3)), pixels.std((0, 2, 3))


def new_run(cfg: Config, images: torch.Tensor) -> Run:
    """A fresh network and optimizer for pretraining on uint8 images [N, 3, H, W], on their device."""
    torch.manual_seed(cfg.seed)
    device = images.device
    backbone = ResNet18(*pixel_stats(images)).to(device)
    proj = projector(cfg.proj_dim).to(device)
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.Adam([*backbone.parameters(), *proj.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    forward = torch.compile(nn.Sequential(backbone, proj)) if cfg.compile else nn.Sequential(backbone, proj)
    return Run(cfg, backbone, proj, optimizer, torch.Generator(device).manual_seed(cfg.seed), log=[], forward=forward)


def check_finite(run: Run, upto: int):
    """Called every 10 steps (one device sync), so a diverged run stops within 10 steps of the first bad one."""
    bad = (~torch.isfinite(run.hist[:upto, 0])).nonzero()
    if len(bad):
        raise UserError(f"the loss became non-finite at epoch {run.epoch + 1}, step {bad[0].item() + 1}: lower --beta "
                        f"({run.cfg.beta:g}) or --lr ({run.cfg.lr:g}); the last good checkpoint is kept in "
                        f"{run.cfg.out_dir}", code=1)


def train_step(run: Run, x: torch.Tensor):
    """One Adam step on views x [V * B, 3, H, W] (view-major); returns the [loss, invariance, orthogonality] and z."""
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        z = run.forward(x).view(run.cfg.views, -1, run.cfg.proj_dim)
    loss, invariance, orthogonality = ssl_loss(z, run.cfg.beta, run.cfg.loss)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return torch.stack([loss, invariance, orthogonality]).detach(), z


def pretrain(run: Run, data: Data):
    """The training loop: batches of V views of B images, the loss, Adam; a log line and a checkpoint per epoch."""
    cfg, device, out = run.cfg, data.pretrain.device, Path(run.cfg.out_dir)
    V, B, recipe = cfg.views, cfg.batch_size, aug_recipe(cfg)
    steps = len(data.pretrain) // B  # full batches only: the loss standardizes over the batch
    with StopRequest() as stop:
        while run.epoch < cfg.epochs:
            if run.perm is None:
                run.perm = torch.randperm(len(data.pretrain), generator=run.generator, device=device)
                run.hist, run.step = torch.zeros(steps, 3, device=device), 0
            first, tic = run.step, time.time()
            for run.step in range(first, steps):
                if stop.requested:
                    check_finite(run, run.step)
                    run.save()
                    raise UserError(f"interrupted at epoch {run.epoch + 1}, step {run.step}; checkpoint saved in "
                                    f"{out}: rerun the same command to resume", code=130)
                images = data.pretrain[run.perm[run.step * B:(run.step + 1) * B]]
                x = augment(images, V, run.generator, **recipe).flatten(0, 1)  # view-major: [V * B, 3, H, W]
                run.hist[run.step], z = train_step(run, x)
                if run.step % 10 == 9:
                    check_finite(run, run.step + 1)
            check_finite(run, steps)
            seconds, mean = time.time() - tic, run.hist.mean(0).tolist()
            entry = dict(epoch=run.epoch + 1, loss=mean[0], invariance=mean[1], orthogonality=mean[2],
                         erank=effective_rank(z[0].detach()), views_per_s=(steps - first) * B * V / seconds, time_s=seconds)
            if run.epoch + 1 == cfg.epochs or (cfg.eval_every and (run.epoch + 1) % cfg.eval_every == 0):
                entry["knn_acc"] = knn_accuracy(features(run.backbone, data.train), data.train_labels,
                                                features(run.backbone, data.test), data.test_labels)
            run.log.append(entry)
            print(f"epoch {entry['epoch']:3d}/{cfg.epochs}  loss {mean[0]:9.3f} (invariance {mean[1]:8.3f}, "
                  f"orthogonality {mean[2]:8.3f})  erank {entry['erank']:6.1f}  {entry['views_per_s']:8,.0f} views/s"
                  f"  {seconds:6.1f} s" + (f"  kNN {entry['knn_acc']:.2%}" if "knn_acc" in entry else ""), flush=True)
            run.epoch, run.step, run.perm, run.hist = run.epoch + 1, 0, None, None
            run.save()
            write_atomic(out / "log.jsonl", lambda p: p.write_text("".join(json.dumps(e) + "\n" for e in run.log)))


# --- Evaluation: frozen features of clean images, a kNN classifier and the linear probe ------------------------------
@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, views: int = 1, generator=None, recipe=None) -> torch.Tensor:
    """Backbone features of uint8 images, averaged over 1 clean + (views - 1) augmented views."""
    was_training, out = backbone.training, []
    backbone.eval()
    for batch in images.split(1024):
        with autocast(batch.device):
            f = backbone(batch.float() / 255).float()
            if views > 1:
                x = augment(batch, views - 1, generator, **{**(recipe or {}), "size": batch.shape[-1]})
                f = (f + backbone(x.flatten(0, 1)).float().view(views - 1, len(batch), -1).sum(0)) / views
        out.append(f)
    backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 200, temperature: float = 0.1) -> float:
    """Weighted kNN on cosine similarity (k = 200, as lightly's and solo-learn's benchmarks)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for f, y in zip(test_f.split(1024), test_y.split(1024)):
        sim, idx = (f @ train_f.T).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(f), int(train_y.max()) + 1, device=f.device).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == y).sum().item()
    return correct / len(test_y)


def linear_probe(train_f, train_y, test_f, test_y, epochs: int = 200, batch_size: int = 512, seed: int = 0) -> float:
    """Test top-1 accuracy of a linear classifier on frozen features: Adam (lr 1e-3, wd 1e-6), cross-entropy with
    label smoothing 0.1, batch 512, 200 epochs, as the paper. Features are standardized with the training statistics
    first (a linear map, so the probe's capacity is unchanged; it only conditions the optimization)."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    clf = nn.Linear(train_f.shape[1], int(train_y.max()) + 1).to(train_f.device)
    nn.init.zeros_(clf.weight)  # a convex problem: a zero start keeps the probe deterministic
    nn.init.zeros_(clf.bias)
    optimizer = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-6)
    generator = torch.Generator(train_f.device).manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_f), generator=generator, device=train_f.device).split(batch_size):
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (clf(test_f).argmax(1) == test_y).float().mean().item()


def main(cfg: Config) -> dict:
    """Pretrain, evaluate, and return the results dict (also written to out_dir/results.json)."""
    start, cfg = time.time(), resolve(cfg)
    device, out = torch.device(cfg.device), Path(cfg.out_dir)
    data = load_data(cfg, device)
    if cfg.batch_size > len(data.pretrain):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(data.pretrain)} pretraining images; "
                        f"lower it or use more data")
    state, run = open_run(cfg), new_run(cfg, data.pretrain)
    if state:
        run.load(state)
        print(f"resuming {out} at epoch {run.epoch + 1}, step {run.step}")
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "config.json", asdict(cfg))
    print(f"pretraining on {len(data.pretrain)} images, {cfg.views} views, d = {cfg.proj_dim}, beta = {cfg.beta:g}, "
          f"{cfg.loss}, on {device}")
    pretrain(run, data)

    tic, generator = time.time(), torch.Generator(device).manual_seed(cfg.seed + 1)
    train_f, test_f = (features(run.backbone, images, cfg.probe_views, generator, aug_recipe(cfg)) for images in (data.train, data.test))
    probe_acc = linear_probe(train_f, data.train_labels, test_f, data.test_labels, seed=cfg.seed)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    results = dict(probe_acc=probe_acc, knn_acc=run.log[-1]["knn_acc"], epochs=cfg.epochs,
                   pretrain_time_s=sum(e["time_s"] for e in run.log), probe_time_s=time.time() - tic,
                   wall_time_s=time.time() - start, device=device_name,
                   versions=dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__),
                   config=asdict(cfg), log=run.log)
    save_json(out / "results.json", results)
    print(f"linear probe: {probe_acc:.2%} test top-1 (kNN {results['knn_acc']:.2%}); results in {out}")
    return results


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"ssl_min: error: {message} (see --help)\n")


def cli(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"] + ("" if f.default in ("", None, False) else " (default: %(default)s)")
        kind = dict(action="store_true") if f.type is bool else dict(type=next(iter(get_args(f.type)), f.type), default=f.default)
        parser.add_argument(flag, help=help, **kind)
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        main(cfg)
    except UserError as e:
        print(f"ssl_min: {'error: ' if e.code == 2 else ''}{e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("ssl_min: interrupted; the epochs already done are saved: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
