"""ssl_min: small projectors and multiple views for efficient self-supervised pretraining, in one file.

A minimal, fast PyTorch reference implementation of A. Ghosh, K. K. Agrawal, S. Sodhani, A. M. Oberman and
B. A. Richards, "Harnessing small projectors and multiple views for efficient vision pretraining", NeurIPS 2024
(arXiv 2312.10725). BarlowTwins and VICReg learn the top eigenfunctions of the augmentation kernel; the paper rewrites
their loss (Eq. 9-10) as the invariance of each view to the mean over the views (a Monte-Carlo estimate of Eq. 8's
augmentation average) plus an orthogonality constraint of strength beta: a small projector (d = 128) matches a large
one when beta ~ 1/d, and more views per image learn faster. Read it top to bottom: the method in the paper's order,
then main (how a run saves, resumes, compiles and goes data-parallel); the run bookkeeping at the end can be skipped.

    python ssl_min.py --views 4 --proj-dim 128                      # a CUDA GPU: CIFAR-10 (downloaded), 100 epochs
    python ssl_min.py --data-dir DIR --subset 50 --epochs 2 --views 2 --batch-size 100   # a CPU check, minutes
    torchrun --nproc-per-node 4 ssl_min.py --views 4 --proj-dim 128  # several GPUs, data-parallel
"""
import argparse
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections import OrderedDict
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
from torch.distributed.nn.functional import all_gather  # differentiable: its backward pass sums the gradients
from torchvision.models.resnet import BasicBlock
from torchvision.transforms.v2.functional import rgb_to_grayscale as gray  # ITU-R 601 luma, on batches


# ==== Config ==========================================================================================================
def option(default, help, low=None, high=math.inf, choices=None):  # low to high, or one of choices
    return field(default=default, metadata=dict(help=help, low=low, high=high, choices=choices))


@dataclass
class Config:
    # The method: V views per image, a projector of width d, orthogonality strength beta (Eq. 9-10)
    views: int = option(4, "augmented views per image, V", low=2)
    proj_dim: int = option(128, "projector width d (hidden and output)", low=1)
    beta: float | None = option(None, "orthogonality strength (default: 5/d for barlow, 1/(25 d) for vicreg)", low=0)
    loss: str = option("barlow", "the Lagrangian form of the reformulated loss", choices=("barlow", "vicreg"))
    width: int = option(64, "ResNet-18's first-stage channels, 8 x width features (64: the standard network)", low=1)
    # Then the data, the paper's Adam (no schedule), the evaluation and the run
    data_dir: str = option("", "image folder with train/<class>/ and test/<class>/ (default: CIFAR-10, downloaded)")
    subset: int = option(0, "keep this many random images per class of every split (0: all), for quick runs", low=0)
    train_fraction: float = option(1.0, "seeded, class-balanced share of the training images to pretrain on", 1e-6, 1)
    epochs: int = option(100, "pretraining epochs", low=1)
    batch_size: int = option(512, "images per step, each in V views (split among torchrun's processes)", low=2)
    lr: float = option(1e-3, "Adam learning rate", low=0)
    weight_decay: float = option(1e-6, "Adam weight decay", low=0)
    probe_views: int = option(1, "views averaged per image for the probe's features: 1 clean + (n-1) augmented", low=1)
    eval_every: int = option(10, "kNN accuracy and effective rank every this many epochs (0: after the last)", low=0)
    seed: int = option(0, "seed of the initialization, the subsets, the batches and the augmentations", 0, 2 ** 32 - 1)
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N",
                         choices=("cpu", "cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))))
    out_dir: str = option("", "folder for log.jsonl, checkpoint.pt, results.json (default: runs/<data>-v<V>-d<d>-...)")
    compile: bool | None = option(None, "torch.compile the network (default: on one CUDA GPU; pays off in ~25 epochs)")
    overwrite: bool = option(False, "start again in --out-dir, replacing its run once the new run has saved an epoch")


# ==== Data: every split is one uint8 tensor [N, 3, H, W] on the device, so batches are slices, not a DataLoader ======
@dataclass
class Data:
    ssl_images: torch.Tensor  # the images SSL pretrains on (labels never used); under torchrun this process's share
    train_images: torch.Tensor  # labelled images for the kNN and the linear probe
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list
    fingerprint: str  # of all the images and labels: a checkpoint resumes only on the data it was trained on


def load_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # convert("RGB") would silently clip them to white
            raise UserError(f"--data-dir: {path} has {im.mode} pixels; convert the images to 8-bit RGB")
        return np.asarray(im.convert("RGB"))


def read_image_folder(folder: Path):
    """All images of folder/<class>/* as uint8 [N, 3, H, W], their labels, and the classes (sorted by name)."""
    dataset = torchvision.datasets.ImageFolder(folder, loader=load_rgb)
    images = [image for image, _ in dataset]
    sizes = {image.shape for image in images}
    if len(sizes) > 1:  # one line instead of numpy's "all input arrays must have the same shape"
        raise UserError(f"--data-dir: {folder} holds images of several sizes ({sorted(sizes)}); resize them to one")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(dataset.targets), dataset.classes


def download(root: Path):
    """CIFAR-10 from torchvision: train images [N, 3, H, W] (uint8), labels, test images, labels, classes."""
    new = [p for p in (root, root.parent) if not p.exists()]
    try:
        splits = [torchvision.datasets.CIFAR10(root, train=train, download=True) for train in (True, False)]
    except OSError as e:  # no internet: URLError is an OSError
        for folder in (f for f in new if f.is_dir() and not any(f.iterdir())):  # leave no empty folder behind
            folder.rmdir()
        raise UserError(f"could not download CIFAR-10 ({e}); without internet, pass --data-dir with "
                        f"train/<class>/ and test/<class>/ image folders") from None
    tensors = [(torch.from_numpy(d.data).permute(0, 3, 1, 2), torch.tensor(d.targets)) for d in splits]
    return *tensors[0], *tensors[1], splits[0].classes


def canonical(images: torch.Tensor, labels: torch.Tensor):
    """Images and labels in the order of a hash of their pixels: the download and an image folder list CIFAR-10 in
    other orders, and this makes the seeded subsets and batches the same images whichever way the data came."""
    order = np.argsort([hashlib.blake2b(x.numpy().tobytes()).hexdigest() for x in images], kind="stable")
    return images[order], labels[order]


def class_balanced(labels: torch.Tensor, seed: int, fraction: float = 1.0, per_class: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded random `fraction` (or `per_class` images) of every class (the authors': unseeded)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in labels.unique():
        members = rng.permutation(np.flatnonzero(labels.numpy() == c.item()))
        if per_class > len(members):  # taking all of a small class would silently unbalance the subset
            raise UserError(f"--subset {per_class}: class {c.item()} has only {len(members)} images")
        keep.append(members[: per_class or max(1, round(fraction * len(members)))])
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def load_data(cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> Data:
    if cfg.data_dir:
        try:
            train, train_y, classes = read_image_folder(Path(cfg.data_dir) / "train")
            test, test_y, _ = read_image_folder(Path(cfg.data_dir) / "test")
        except OSError as e:  # missing, empty or unreadable: say what the folder must hold
            raise UserError(f"--data-dir {cfg.data_dir} must hold {Path(cfg.data_dir) / 'train'}/<class>/*.png and "
                            f"{Path(cfg.data_dir) / 'test'}/<class>/*.png ({e})") from None
    else:
        train, train_y, test, test_y, classes = download(Path.home() / ".cache" / "ssl_min")
    (train, train_y), (test, test_y) = canonical(train, train_y), canonical(test, test_y)
    if cfg.subset:
        train_keep, test_keep = (class_balanced(y, cfg.seed, per_class=cfg.subset) for y in (train_y, test_y))
        train, train_y, test, test_y = train[train_keep], train_y[train_keep], test[test_keep], test_y[test_keep]
    ssl_images = train[class_balanced(train_y, cfg.seed, fraction=cfg.train_fraction)]  # labels never used
    if cfg.batch_size > len(ssl_images):  # an epoch would take no step, and the run would silently learn nothing
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {len(ssl_images)} pretraining images")
    digest = hashlib.blake2b(digest_size=16)  # resume only on this data (the pretraining images follow from it)
    for t in (train, train_y, test, test_y):
        digest.update(t.contiguous().numpy().tobytes())
    ssl_images = ssl_images[rank::world][:len(ssl_images) // world]  # torchrun: every process an equal share
    tensors = (t.contiguous().to(device) for t in (ssl_images, train, train_y, test, test_y))
    return Data(*tensors, classes, digest.hexdigest())


# ==== Multi-view augmentation: batched, every image and view draws its own parameters, on the device ==================
# torchvision's transforms draw one set of parameters per call, so on a batch every image would get the same crop.
def augment(images: torch.Tensor, views: int, generator: torch.Generator, scale=(0.08, 1.0), p_gray: float = 0.2):
    """`views` augmented views of every image: uint8 [B, 3, H, W] -> float [views, B, 3, H, W] in [0, 1]: random resized
    crop (area `scale`, aspect 3/4-4/3) and horizontal flip in one resampling, colour jitter with p 0.8 (brightness,
    contrast, saturation 0.4, in this order; hue 0 as in the authors' CIFAR code), grayscale with p `p_gray`."""
    B, _, H, W = images.shape
    n = views * B  # every view of every image draws its own parameters

    def uniform(low=0.0, high=1.0):  # one draw for every view of every image
        return low + (high - low) * torch.rand(n, generator=generator, device=images.device)

    x = images.float().div(255).repeat(views, 1, 1, 1)  # [views * B, 3, H, W], view-major
    # Crop: the area fraction and log-aspect are uniform as in torchvision; sides are clamped to the image instead
    # of torchvision's up-to-10 redraws. An affine grid maps the output square onto the crop box (flipped or not).
    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    w = (area * aspect).sqrt().clamp(max=1)  # the crop's sides, as fractions of the image's
    h = (area / aspect).sqrt().clamp(max=1)
    flip = torch.where(uniform() < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([w * flip, zero, (1 - w) * uniform(-1, 1), zero, h, (1 - h) * uniform(-1, 1)], 1).view(n, 2, 3)
    grid = F.affine_grid(theta, [n, 3, H, W], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter: a sample that skips it (p 0.2) gets the identity factors, so no branch per sample.
    jitter = uniform() < 0.8
    brightness, contrast, saturation = (torch.where(jitter, uniform(0.6, 1.4), 1.0).view(-1, 1, 1, 1) for _ in range(3))
    x = (x * brightness).clamp(0, 1)
    mean = gray(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    grayscale = gray(x)
    x = ((x - grayscale) * saturation + grayscale).clamp(0, 1)
    x = torch.where((uniform() < p_gray).view(-1, 1, 1, 1), gray(x).expand_as(x), x)
    return x.view(views, B, 3, H, W)


# ==== Model: the backbone f (ResNet-18) and the projector g; embeddings z = g(f(x)) ===================================
class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 convolution, stride 1, no max-pool), then four stages of two BasicBlocks with
    1, 2, 4, 8 x width channels (all but the first halve the resolution): 8 x width features, 512 at the standard 64."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, width: int = 64):
        super().__init__()
        self.register_buffer("mean", mean.view(1, 3, 1, 1))  # the pretraining images' statistics, kept with the weights
        self.register_buffer("std", std.view(1, 3, 1, 1))
        c = [width, width, 2 * width, 4 * width, 8 * width]  # the stem's channels, then each stage's
        layers = OrderedDict(conv1=nn.Conv2d(3, width, 3, 1, 1, bias=False), bn1=nn.BatchNorm2d(width), relu=nn.ReLU())
        for i, stride in enumerate((1, 2, 2, 2), start=1):  # torchvision's names: its ResNet-18 weights load at 64
            shortcut = None if i == 1 else nn.Sequential(  # a strided 1x1 convolution to the block's new shape
                nn.Conv2d(c[i - 1], c[i], 1, stride, bias=False), nn.BatchNorm2d(c[i]))
            layers[f"layer{i}"] = nn.Sequential(BasicBlock(c[i - 1], c[i], stride, shortcut), BasicBlock(c[i], c[i]))
        self.net = nn.Sequential(OrderedDict(**layers, avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):  # torchvision's initialization
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # x: float images in [0, 1]
        return self.net((x - self.mean) / self.std)


class SSLNet(nn.Module):
    """The backbone and the projector: Linear (no bias) - BatchNorm - ReLU - Linear, hidden width = output width = d,
    as in the paper. The last layer has no bias either: the batch standardization in the loss would remove it."""

    def __init__(self, proj_dim: int, mean: torch.Tensor, std: torch.Tensor, width: int = 64):
        super().__init__()
        self.backbone = ResNet18(mean, std, width)
        self.projector = nn.Sequential(nn.Linear(8 * width, proj_dim, bias=False), nn.BatchNorm1d(proj_dim),
                                       nn.ReLU(inplace=True), nn.Linear(proj_dim, proj_dim, bias=False))

    def forward(self, x):
        return self.projector(self.backbone(x))


# ==== The loss: each view invariant to the mean over views (Eq. 10), orthogonality of strength beta (Eq. 9) ==========
# Notation: z [V, B, d] holds the embeddings of the V views (u, v) of a batch of B images; i, j index the d dimensions.
def view_target(z: torch.Tensor) -> torch.Tensor:
    """Tz_v = mean_{u != v} z_u, the target of view v: a Monte-Carlo estimate of the mean of z over the image's
    augmentations (the forward average, the adjoint of Eq. 8's T_M; T_M z on a reversible augmentation graph). Eq. 10
    includes v in the mean: that rescales each view's invariance term by ((V-1)/V)^2 and changes no minimizer of Eq. 9
    (a change of scale of beta in a Lagrangian form). At V = 2 it is the other view, as in BarlowTwins."""
    return (z.sum(0, keepdim=True) - z) / (z.shape[0] - 1)


def barlow_loss(z: torch.Tensor, beta: float):
    """BarlowTwins' Lagrangian form of Eq. 9-10 for V views; returns (invariance, orthogonality).
    f_v is z_v standardized over the batch (mean 0, variance 1 in each dimension: the normalization (f_i, f_i) = 1);
    C_v = f_v^T Tf_v / B is the d x d cross-correlation of view v with its target, so the cost is linear in V.
        invariance    = mean_v sum_i (1 - C_v,ii)^2          (Eq. 10: each view agrees with the mean of the views)
        orthogonality = beta mean_v sum_{i != j} C_v,ij^2    (Eq. 9's constraint (f_i, f_j) = 0, as a penalty)
    At V = 2, Tf_1 = f_2 and C_2 = C_1^T: exactly the BarlowTwins loss with lambda = beta."""
    B = z.shape[1]
    f = (z - z.mean(1, keepdim=True)) / (z.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # as BatchNorm
    C = f.transpose(1, 2) @ view_target(f) / B  # [V, d, d]
    diagonal = C.diagonal(dim1=1, dim2=2)
    invariance = (1 - diagonal).pow(2).sum(1).mean()
    orthogonality = beta * (C.pow(2).sum((1, 2)) - diagonal.pow(2).sum(1)).mean()  # the off-diagonal C_ij, i != j
    return invariance, orthogonality


VICREG_LAMBDA, VICREG_MU = 25.0, 25.0  # VICReg's invariance and variance weights; covariance weight nu = lambda beta d


def vicreg_loss(z: torch.Tensor, beta: float):
    """VICReg's form, where the constraint is a variance hinge (f_i, f_i) >= 1 and a covariance penalty:
        invariance    = lambda mean ||z_v - Tz_v||^2
        orthogonality = mu mean_v,i relu(1 - std_v,i)  +  nu 2 mean_v sum_{i != j} Cov_v,ij^2 / d
    with nu = lambda beta d (the paper reads VICReg's orthogonality strength as beta = nu / (lambda d)). VICReg averages
    the variance over its branches but sums the covariance, hence 2 mean_v; beta = 1/(25 d) gives its 25/25/1."""
    B, d = z.shape[1:]
    invariance = VICREG_LAMBDA * (z - view_target(z)).pow(2).mean()
    centred = z - z.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (B - 1)  # [V, d, d]
    variance = cov.diagonal(dim1=1, dim2=2)
    off_diagonal = cov.pow(2).sum((1, 2)) - variance.pow(2).sum(1)
    nu = VICREG_LAMBDA * beta * d
    orthogonality = VICREG_MU * F.relu(1 - (variance + 1e-4).sqrt()).mean() + nu * 2 * off_diagonal.mean() / d
    return invariance, orthogonality


def ssl_loss(z: torch.Tensor, beta: float, loss: str = "barlow"):
    """The multi-view loss of embeddings z [V, B, d]; returns (total, invariance, orthogonality)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # correlations in bf16 or float16 are too coarse
    invariance, orthogonality = {"barlow": barlow_loss, "vicreg": vicreg_loss}[loss](z, beta)
    return invariance + orthogonality, invariance, orthogonality


def default_beta(d: int, loss: str) -> float:
    """barlow: 5/d, the authors' tuned beta for small projectors (README, "The method"); vicreg: its own 25/25/1."""
    return 5 / d if loss == "barlow" else 1 / (VICREG_LAMBDA * d)


def effective_rank(z: torch.Tensor) -> float:
    """RankMe: exp(entropy of the normalized singular values) of z [N, d]; d if all directions are used, 1 if one."""
    s = torch.linalg.svdvals(z.float())
    p = s[s > 0] / s.sum()
    return math.exp(-(p * p.log()).sum().item())


# ==== Training ========================================================================================================
def precision(device: torch.device) -> torch.dtype:
    """The autocast dtype of training and evaluation, decided here: bf16 where the GPU computes it natively (compute
    capability 8.0+: A100, RTX 30xx, H100), else float16 with a gradient scaler (T4, V100, RTX 20xx); float32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def build(cfg: Config, images: torch.Tensor, device: torch.device):
    """The network, initialized from cfg.seed, with the per-channel pixel mean and std (at least 1/255) of ~4096 of the
    pretraining images, its Adam, and the gradient scaler of float16 (a no-op in other precisions)."""
    torch.manual_seed(cfg.seed)  # the initialization
    pixels = images[:: max(1, len(images) // 4096)].float() / 255
    net = SSLNet(cfg.proj_dim, pixels.mean((0, 2, 3)), pixels.std((0, 2, 3)).clamp_min(1 / 255), cfg.width).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # the layout of cuDNN's fastest convolutions
        torch.backends.cudnn.benchmark = True
    float16 = precision(device) == torch.float16  # fused Adam reads the scaler's overflow flag on the GPU: no host sync
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=float16 or None)
    return net, optimizer, torch.amp.GradScaler(device.type, enabled=float16)


def train_step(model: nn.Module, optimizer, scaler: torch.amp.GradScaler, views: torch.Tensor, beta: float, loss: str):
    """One Adam step on views [V, B, 3, H, W] of a batch; returns [loss, invariance, orthogonality] on the device."""
    V, B = views.shape[:2]
    x = views.flatten(0, 1)  # view-major [V * B, 3, H, W]: one forward pass for all views
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = precision(x.device)
    with torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
        z = model(x).view(V, B, -1)
    if dist.is_initialized():  # torchrun: every process computes the whole batch's loss from all its parts [V, b, d]
        z = torch.cat(all_gather(z), 1)  # the gradients of its own part come back to each (DDP then averages)
    total, invariance, orthogonality = ssl_loss(z, beta, loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()  # float16: the loss scaled up, so that small gradients do not flush to zero
    scaler.step(optimizer)  # float16: unscales, and skips the step if a gradient overflowed
    scaler.update()  # float16: a smaller scale after an overflow, a larger one after 2000 steps without
    return torch.stack([total, invariance, orthogonality]).detach()


def pretrain(cfg: Config, net: SSLNet, model: nn.Module, optimizer, scaler, generator, data: Data, first_epoch, save):
    """Every epoch the images in a new random order; every step V views of a batch, the loss and an Adam step.
    `model` is `net` as trained (compiled, or wrapped for several processes); `save(entry)` ends every epoch."""
    batch = cfg.batch_size // (dist.get_world_size() if dist.is_initialized() else 1)  # this process's part
    steps = len(data.ssl_images) // batch  # full batches only: the loss standardizes over the batch
    for epoch in range(first_epoch, cfg.epochs + 1):
        tic = time.time()
        order = torch.randperm(len(data.ssl_images), generator=generator, device=generator.device)
        losses = torch.zeros(steps, 3, device=generator.device)  # read once per epoch: no host sync in the loop
        for step in range(steps):
            images = data.ssl_images[order[step * batch:(step + 1) * batch]]
            views = augment(images, cfg.views, generator)
            losses[step] = train_step(model, optimizer, scaler, views, cfg.beta, cfg.loss)
        finite = losses.isfinite().all(1)  # the epoch's one host sync; a bad epoch is not saved
        bad = (~finite).nonzero()  # under float16 the scaler skipped these steps: the run stops if they are most
        if len(bad) > (steps // 2 if scaler.is_enabled() else 0):
            raise UserError(f"the loss became non-finite at epoch {epoch}, step {bad[0].item() + 1} ({len(bad)} of "
                            f"{steps} steps): lower --beta or --lr; the checkpoint of the epoch before is kept")
        mean = losses[finite].mean(0).tolist()
        seconds = time.time() - tic
        entry = dict(epoch=epoch, loss=mean[0], invariance=mean[1], orthogonality=mean[2], nonfinite_steps=len(bad),
                     views_per_s=steps * cfg.batch_size * cfg.views / seconds, time_s=seconds)
        if cfg.eval_every and epoch % cfg.eval_every == 0 and epoch < cfg.epochs:
            entry.update(evaluate(net, data))  # after the last epoch, main evaluates
        save(entry)


# ==== Evaluation: frozen features, a kNN classifier, the linear probe =================================================
@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, views: int = 1, generator=None) -> torch.Tensor:
    """Features of uint8 images from a backbone in eval mode, averaged over 1 clean + (views - 1) augmented views."""
    out = []
    for batch in images.split(1024):
        x = batch.float().div(255).unsqueeze(0)
        if views > 1:  # augmented outside autocast: the crops' coordinates stay in float32
            x = torch.cat([x, augment(batch, views - 1, generator)])
        dtype = precision(x.device)  # as in training
        with torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
            out.append(backbone(x.flatten(0, 1)).float().view(views, len(batch), -1).mean(0))
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Weighted kNN on cosine similarity, k = 200 as lightly's and solo-learn's: votes weigh exp(similarity / T)."""
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
    1e-6), cross-entropy with label smoothing 0.1, batch 512, 200 epochs, from zero weights, on features standardized
    with the training statistics. The gradient is written out: no autograd graph, a few kernel launches a step."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x, x_test = (F.pad((f - mean) / std, (0, 1), value=1.0) for f in (train_f, test_f))  # a constant 1: the bias
    target = F.one_hot(train_y, classes) * 0.9 + 0.1 / classes  # label smoothing 0.1
    W = torch.zeros(classes, x.shape[1], device=x.device)
    optimizer = torch.optim.Adam([W], lr=1e-3, weight_decay=1e-6)
    generator = torch.Generator(x.device).manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator, device=x.device).split(512):
            error = torch.softmax(x[idx] @ W.T, 1).sub_(target[idx])  # d(cross-entropy)/d(logits), times the batch
            W.grad = error.T @ x[idx] / len(idx)
            optimizer.step()
    return ((x_test @ W.T).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def evaluate(net: SSLNet, data: Data, probe_views: int = 0, generator=None, seed: int = 0) -> dict:
    """kNN accuracy and effective rank of the test embeddings of clean images; the probe too where probe_views >= 1."""
    net.eval()  # BatchNorm with its running statistics
    train_f, test_f = features(net.backbone, data.train_images), features(net.backbone, data.test_images)
    result = dict(knn_acc=knn_accuracy(train_f, data.train_labels, test_f, data.test_labels, len(data.classes)),
                  erank=effective_rank(net.projector(test_f)))
    if probe_views > 1:
        train_f, test_f = (features(net.backbone, images, probe_views, generator)
                           for images in (data.train_images, data.test_images))
    if probe_views:
        result["probe_acc"] = linear_probe(train_f, data.train_labels, test_f, data.test_labels, len(data.classes),
                                           seed=seed)
    net.train()
    return result


# ==== Main: pretrain, evaluate, save; rerunning the same command resumes =============================================
def main(cfg: Config) -> dict:
    """Pretrain, evaluate, and return the results (also written to out_dir/results.json). Rerunning resumes."""
    start = time.time()
    name = Path(cfg.data_dir).resolve().name if cfg.data_dir else "cifar10"
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))  # torchrun's processes
    cfg = replace(cfg, beta=default_beta(cfg.proj_dim, cfg.loss) if cfg.beta is None else cfg.beta,
                  compile=cfg.device.startswith("cuda") and world == 1 if cfg.compile is None else cfg.compile,
                  out_dir=cfg.out_dir or f"runs/{name}-v{cfg.views}-d{cfg.proj_dim}-{cfg.loss}-s{cfg.seed}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():  # said first: later errors would mislead
        raise UserError(f"--device {cfg.device}: no CUDA GPU here; use --device cpu")
    out = Path(cfg.out_dir)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} holds a finished run (results.json); pass another --out-dir, or --overwrite")
    device = torch.device(cfg.device)
    if world > 1:  # torchrun: one process per GPU (or CPU processes), each with its share of every batch
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise UserError(f"--batch-size {cfg.batch_size} must divide among the {world} processes")
    data = load_data(cfg, device, rank, world)
    net, optimizer, scaler = build(cfg, data.ssl_images, device)
    generator = torch.Generator(device).manual_seed(cfg.seed + (rank << 32))  # batches, augmentations
    run = dict(config=asdict(cfg), data=data.fingerprint, device=device.type, processes=world)
    log = resume(out / "checkpoint.pt", run, net, optimizer, scaler, generator, rank) if not cfg.overwrite else []
    model = net
    if world > 1:  # every process computes the whole batch's loss (train_step); DDP averages the gradients
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # BatchNorm over the whole batch
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        torch.compiler.reset()  # a new graph for this run: earlier runs in this process must not fill the cache
        model.compile()
    info = provenance(device)  # before training: nothing that happens after it can cost a finished run
    dtype = str(precision(device)).removeprefix("torch.")

    def save(entry: dict):  # the end of an epoch: a synchronous, atomic checkpoint, then the log and the line
        log.append(entry)
        rng = [generator.get_state()] * world  # every process's random stream, for an exact resume
        if world > 1:
            dist.all_gather_object(rng, generator.get_state())
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "checkpoint.pt", dict(run, epoch=len(log), log=log, rng=rng, model=net.state_dict(),
                                                     optimizer=optimizer.state_dict(), scaler=scaler.state_dict()))
            write_atomic(out / "log.jsonl", "".join(json.dumps(e) + "\n" for e in log))
            (out / "results.json").unlink(missing_ok=True)  # under --overwrite: the replaced run's
        knn = f"  kNN {entry['knn_acc']:.2%}  effective rank {entry['erank']:.1f}" if "knn_acc" in entry else ""
        say(f"epoch {entry['epoch']:3d}/{cfg.epochs}  loss {entry['loss']:.3f} (invariance {entry['invariance']:.3f}, "
            f"orthogonality {entry['orthogonality']:.3f})  {entry['views_per_s']:,.0f} views/s  {entry['time_s']:.1f} s"
            f"  ~{(cfg.epochs - entry['epoch']) * entry['time_s'] / 3600:.1f} h left{knn}")

    say(f"pretraining on {len(data.ssl_images) * world} images, {cfg.views} views, d = {cfg.proj_dim}, beta = "
        f"{cfg.beta:g}, {cfg.loss}, width {cfg.width}, on {device} in {dtype}" + f", {world} processes" * (world > 1))
    try:
        pretrain(cfg, net, model, optimizer, scaler, generator, data, len(log) + 1, save)
        tic = time.time()
        probe_generator = torch.Generator(device).manual_seed(cfg.seed + 1)  # the probe's augmented views
        final = evaluate(net, data, cfg.probe_views, probe_generator, cfg.seed)
    except (KeyboardInterrupt, torch.OutOfMemoryError, MemoryError) as e:  # say what is saved, and what to do
        rerun = "without --overwrite" if cfg.overwrite else "the same command"
        saved = (f"the checkpoint after epoch {len(log)} is in {out}: rerun {rerun} to resume" if log else
                 "no epoch of this run had finished, so nothing of it is saved")
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(f"interrupted; {saved}") from None
        lower = (f"--probe-views ({cfg.probe_views})" if len(log) == cfg.epochs else
                 f"--batch-size ({cfg.batch_size}), --views ({cfg.views}) or --proj-dim ({cfg.proj_dim})")
        raise UserError(f"out of memory on {device} ({type(e).__name__}): lower {lower}; {saved}") from None
    log[-1].update(final)
    results = dict(**final, epochs=cfg.epochs, pretrain_time_s=sum(e["time_s"] for e in log),
                   eval_time_s=time.time() - tic, wall_time_s=time.time() - start,
                   data=dict(pretrain=len(data.ssl_images) * world, train=len(data.train_images),
                             test=len(data.test_images), image=list(data.train_images.shape[1:])),
                   processes=world, precision=dtype, **info, config=asdict(cfg), log=log)
    if rank == 0:
        write_atomic(out / "results.json", results)
    say(f"linear probe: {final['probe_acc']:.2%} test top-1, kNN {final['knn_acc']:.2%}, effective rank "
        f"{final['erank']:.1f}; results in {out}")
    if world > 1:
        dist.destroy_process_group()
    return results


# ==== Run bookkeeping: resume, atomic writes, provenance, the command line ============================================
class UserError(Exception):
    """A problem the user can fix, or a stop that says what is saved."""


def resume(path: Path, run: dict, net: SSLNet, optimizer, scaler, generator: torch.Generator, rank: int) -> list:
    """Load the checkpoint of an unfinished run, if there is one and it is this run; return its log."""
    if not path.exists():
        return []
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain types only: no code runs
    resumable = ("epochs", "eval_every", "probe_views", "data_dir", "device", "compile", "overwrite", "out_dir")
    differ = [k for k, v in run["config"].items() if k not in resumable and state["config"].get(k) != v]
    differ += [k for k in ("data", "device", "processes") if state[k] != run[k]]
    if differ:
        raise UserError(f"{path.parent} holds an unfinished run with another {', '.join(differ)}; rerun with its "
                        f"options and data to resume it, or pass another --out-dir (--overwrite discards it)")
    if state["epoch"] > run["config"]["epochs"]:
        raise UserError(f"{path.parent} has trained {state['epoch']} epochs, more than --epochs")
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # float16's loss scale; none from a bf16 or float32 run (or an earlier ssl_min)
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["rng"][rank])
    say(f"resuming {path.parent} after epoch {state['epoch']}")
    return state["log"]


def say(text: str):
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, process 0 speaks for all
        print(text, flush=True)


def write_atomic(path: Path, content):
    """A state dict (a .pt path), text or JSON to a temporary file renamed over `path`: never a half-written path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".pt":
            torch.save(content, tmp)
        else:  # text, or anything else as JSON
            tmp.write_text(content if isinstance(content, str) else json.dumps(content, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def provenance(device: torch.device) -> dict:
    """What produced a result: the device, the library versions and the git commit (+changes: uncommitted edits)."""
    git = ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--abbrev=40", "--dirty=+changes"]
    try:
        commit = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # no git, or a slow one
        commit = None
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return dict(device=name, commit=commit, versions=dict(python=platform.python_version(), torch=torch.__version__,
                                                          torchvision=torchvision.__version__))


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.error = lambda message: parser.exit(2, f"ssl_min: error: {message} (see --help)\n")  # one line, no usage
    for f in fields(Config):
        kind = dict(type=next(iter(get_args(f.type)), f.type), default=f.default, choices=f.metadata["choices"])
        if f.type in (bool, bool | None):
            kind = dict(action=argparse.BooleanOptionalAction, default=f.default)
        shown = "" if f.default in ("", None) or f.default is False else " (default: %(default)s)"
        parser.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"] + shown, **kind)
    cfg = Config(**vars(parser.parse_args(argv)))
    for f in fields(Config):  # the ranges: argparse says it in one line
        low, high, value = f.metadata["low"], f.metadata["high"], getattr(cfg, f.name)
        if low is not None and value is not None and not (math.isfinite(value) and low <= value <= high):
            bounds = f"at least {low}" if high == math.inf else f"from {low} to {high}"
            parser.error(f"--{f.name.replace('_', '-')} must be {bounds}, got {value}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop, as Ctrl-C: say what is saved
    try:
        main(cfg)
    except (UserError, KeyboardInterrupt) as e:  # one line: what to do, or what is kept; anything else: a traceback
        interrupted = isinstance(e, KeyboardInterrupt)
        message = str(e) or "interrupted; nothing is saved" if interrupted else f"error: {e}"
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every process gets here: one says it
            print(f"ssl_min: {message.splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(130 if interrupted else 1)


if __name__ == "__main__":
    cli()
