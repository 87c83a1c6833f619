"""Throughput of ssl_min's batched on-device augmentation against the usual per-sample DataLoader pipeline, the cost
of the training step's options (torch.compile, fused Adam) and of the linear probe, and a per-phase profile.

    python benchmarks/throughput.py --data-dir DIR --markdown --json out.json   # GPU: the full setting (or --views 4)
    python benchmarks/throughput.py --quick --data-dir DIR --markdown           # CPU: a small setting (~3 min, 2 cores)
    python benchmarks/throughput.py --smoke                                     # seconds: every code path, no result
    python benchmarks/throughput.py --profile [--quick] [--compile]             # per-phase breakdown of the step

Every number is measured in this process, on one device (cuda if available, else cpu), and every JSON and table
carries what produced it: the git commit, the CPU model and cores, the torch, CUDA and cuDNN versions, the thread
settings and the load average. torch's intra-op threads are set explicitly (--threads, default 1: on a loaded CPU
ssl_min's augmentation swings 20x with 2 threads). Each row reports the median and the spread (min-max) of
`repeats` timed windows after a warm-up. Both input pipelines deliver the same thing: V augmented views of a batch of
B images as float [V, B, 3, H, W] in [0, 1] on the device, which the network standardizes (its first operation).

- ssl_min: the uint8 images sit on the device; a batch is a slice of a random order and `ssl_min.augment`.
- usual: a CIFAR-10-style Dataset (uint8 HWC images, PIL per sample, as torchvision.datasets.CIFAR10) applying
  per-sample torchvision transforms V times per image (RandomResizedCrop, flip, ColorJitter with p 0.8, grayscale
  with p 0.2), as solo-learn and lightly feed multi-view SSL, tuned as their users would: the workers return uint8
  (PILToTensor), one thread each; one thread in the main process; pinned memory on CUDA; the conversion to float on
  the device. A "wave" is workers x prefetch_factor (2) batches. The queue the workers filled during the warm-up is
  drained, then every timed window spans at least 10 waves (shorter windows overstate it by up to 25%), except the
  training rows of --quick and --smoke, where a CPU step takes seconds and the main process barely waits for its
  input: each row says how many waves it spans and what share of the time it waited. Its per-worker rate is one
  worker's work (the transforms and the collation of whole batches) timed alone in this process; "workers to match"
  is ssl_min's rate divided by it.

Rows: augmentation alone, and a full training step (ssl_min.train_step: forward, loss, backward, Adam; bf16 autocast
on CUDA) fed by each pipeline. On CUDA (or with --extras) the step with fused Adam, and under net.compile() (ssl_min's
default on CUDA; with its compile time) with either Adam. Then the linear probe, ssl_min's lean one against a
reference written with autograd (nn.Linear, cross-entropy with label smoothing 0.1, torch.optim.Adam, the same
standardization, data order and zero start): in the full setting on the features of 60,000 images (--data-dir's
train/ and test/, else random) from a random ResNet-18, in --quick and --smoke on a synthetic problem. The ratios
are printed at the end: measurements, not assertions. The full setting takes an estimated 8 minutes on a GPU with
16 CPU cores, mostly the usual pipeline's 10-wave windows at V = 8.
"""
import argparse
import bisect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ssl_min  # noqa: E402

EPOCH_IMAGES = 50_000  # CIFAR-10's training set
TRAIN_FLOP_PER_VIEW = 3.3e9  # ResNet-18 at 32 px with the CIFAR stem: ~0.56 GFLOP forward, x3 for forward + backward
PREFETCH = 2  # the DataLoader's default prefetch_factor
MIN_WAVES = 10

# full: sized for a GPU (an estimated 8 min with 16 CPU cores); quick: minutes on 2 CPU cores; smoke: seconds (tests).
SETTINGS = dict(
    full=dict(batch=512, aug_views=(2, 4, 8), train_views=(4,), repeats=3, warmup=3, aug_batches=48, train_steps=24,
              train_min_waves=MIN_WAVES, worker_images=512, probe=dict(train=50_000, test=10_000), probe_repeats=1,
              profile_steps=5, random_images=EPOCH_IMAGES),
    quick=dict(batch=64, aug_views=(2, 4), train_views=(2, 4), repeats=3, warmup=1, aug_batches=30, train_steps=2,
               train_min_waves=0, worker_images=256, probe=dict(train=4096, test=1024, dim=512), probe_repeats=3,
               profile_steps=2, random_images=EPOCH_IMAGES),
    smoke=dict(batch=8, aug_views=(2,), train_views=(2,), repeats=3, warmup=1, aug_batches=3, train_steps=1,
               train_min_waves=0, worker_images=16, probe=dict(train=512, test=256, dim=32), probe_repeats=1,
               profile_steps=1, random_images=1024),
)


# ==== What produced the numbers ======================================================================================
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(device: torch.device, workers: int) -> dict:
    """The commit, device, versions and thread settings of this run (ssl_min.provenance, plus the CPU and threads)."""
    info = ssl_min.provenance(device)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info.update(cpu=dict(model=cpu_model(), cores=os.cpu_count(), usable_cores=usable))
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    info["versions"].update(cuda=torch.version.cuda, cudnn=cudnn)
    info["threads"] = dict(torch_intra_op=torch.get_num_threads(), torch_interop=torch.get_num_interop_threads(),
                           dataloader_workers=workers, dataloader_worker_threads=1,
                           env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ})
    info.update(load_average_start=list(os.getloadavg()), date=datetime.now().isoformat(timespec="seconds"),
                command=shlex.join(["python", *sys.argv]))
    return info


def caption(h: dict) -> str:
    """One line with the header's facts, printed above every table."""
    v, t = h["versions"], h["threads"]
    cuda = f"CUDA {v['cuda']}, cuDNN {v['cudnn']}" if v.get("cudnn") else f"CUDA {v['cuda'] or 'none'} (not used)"
    load = "/".join(f"{x:.1f}" for x in h["load_average_start"])
    if "load_average_end" in h:
        load += " -> " + "/".join(f"{x:.1f}" for x in h["load_average_end"])
    return (f"{h['date'][:10]}, commit {h['commit']}, {h['device']}; CPU {h['cpu']['model']} "
            f"({h['cpu']['cores']} cores, {h['cpu']['usable_cores']} usable); torch {v['torch']}, {cuda}; "
            f"threads: intra-op {t['torch_intra_op']}, inter-op {t['torch_interop']}, "
            f"DataLoader {t['dataloader_workers']} workers x "
            f"{t['dataloader_worker_threads']} thread; load average (1/5/15 min) {load}"
            + (f"; {h['wall_s']:.0f} s in all" if "wall_s" in h else ""))


# ==== Timing =========================================================================================================
def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_windows(fn, device, warmup: int, repeats: int, calls: int, drain=lambda: None) -> list:
    """Seconds of `repeats` windows of `calls` calls of fn each, after `warmup` calls and then drain()."""
    for _ in range(warmup):
        fn()
    drain()
    times = []
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    return times


class OtherLoad:
    """Cores kept busy by other processes (and the hypervisor's steal) while a row was measured: the machine's busy
    CPU time from /proc/stat less this process's and its DataLoader workers'. None where there is no /proc."""

    def __init__(self, pids=lambda: ()):
        self.pids, self.start = pids, self.snapshot(pids)

    @staticmethod
    def snapshot(pids):
        try:
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait; steal counts as taken by others
            ours = {}
            for pid in (os.getpid(), *pids()):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ours[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            return None
        return time.perf_counter(), busy, ours

    def cores(self):
        end = self.snapshot(self.pids)
        if self.start is None or end is None:
            return None
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, end
        ours = sum(v - ours0.get(pid, 0) for pid, v in ours1.items())
        return max(0.0, (busy1 - busy0 - ours) / os.sysconf("SC_CLK_TCK") / (t1 - t0))


def spread(values: list) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


# ==== The two input pipelines: each a callable returning the next float views [V, B, 3, H, W] on the device ==========
class SslMinBatches:
    """ssl_min's pipeline, as ssl_min.pretrain: slices of a random order of the uint8 images on the device,
    augmented."""

    def __init__(self, images: torch.Tensor, views: int, batch: int):
        self.images, self.views, self.batch = images, views, batch
        self.generator = torch.Generator(images.device).manual_seed(0)
        self.order, self.at = None, len(images)

    def __call__(self):
        if self.at + self.batch > len(self.images):
            self.at = 0
            self.order = torch.randperm(len(self.images), generator=self.generator, device=self.images.device)
        idx, self.at = self.order[self.at:self.at + self.batch], self.at + self.batch
        return ssl_min.augment(self.images[idx], self.views, self.generator)


class MultiViewCIFAR(torch.utils.data.Dataset):
    """As torchvision.datasets.CIFAR10 with solo-learn's / lightly's multi-view transform: V transformed copies."""

    def __init__(self, images, views: int):
        self.images, self.views = images, views  # uint8 numpy [N, H, W, 3]
        self.transform = T.Compose([
            T.RandomResizedCrop(images.shape[1], scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            T.PILToTensor(),  # uint8: a quarter of float32's bytes through the worker queue
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])
        return torch.stack([self.transform(image) for _ in range(self.views)])  # uint8 [V, 3, H, W]


def one_thread(_):
    torch.set_num_threads(1)  # what the DataLoader sets in its workers, made explicit


class UsualPipeline:
    """The usual pipeline over uint8 CPU images [N, 3, H, W]; counts the seconds spent waiting for the workers."""

    def __init__(self, images: torch.Tensor, views: int, batch: int, device: torch.device, workers: int):
        self.dataset = MultiViewCIFAR(images.permute(0, 2, 3, 1).contiguous().numpy(), views)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, prefetch_factor=PREFETCH,
            persistent_workers=True, pin_memory=device.type == "cuda", worker_init_fn=one_thread,
            generator=torch.Generator().manual_seed(0))
        self.device, self.wave, self.iterator, self.waited = device, workers * PREFETCH, None, 0.0

    def __call__(self):
        tic = time.perf_counter()
        batch = next(self.iterator, None) if self.iterator else None
        if batch is None:  # a new epoch (the persistent workers start on it)
            self.iterator = iter(self.loader)
            batch = next(self.iterator)
        self.waited += time.perf_counter() - tic
        x = batch.to(self.device, non_blocking=True)  # uint8 [B, V, 3, H, W]
        return x.transpose(0, 1).contiguous().float().div_(255)  # on the device: view-major float in [0, 1]

    def drain(self):
        """Take the batches the workers prepared ahead during the warm-up: the timed ones are made while timed."""
        for _ in range(self.wave):
            self()
        self.waited = 0.0

    def pids(self) -> list:
        return [w.pid for w in getattr(self.iterator, "_workers", [])]

    def close(self):
        if self.iterator is not None:
            self.iterator._shutdown_workers()  # persistent workers would otherwise live until the loader is collected
        self.iterator = None


def per_worker_views_per_s(pipeline: UsualPipeline, images: int, repeats: int) -> list:
    """One worker's work, alone in this process: transform and collate whole batches of `images` images."""
    batch, views = pipeline.loader.batch_size, pipeline.dataset.views
    order = torch.randperm(len(pipeline.dataset), generator=torch.Generator().manual_seed(1))
    chunks = order[:max(images, batch)].split(batch)

    def work():
        for chunk in chunks:
            torch.utils.data.default_collate([pipeline.dataset[i] for i in chunk.tolist()])
    work()  # warm-up
    return [sum(map(len, chunks)) * views / t for t in timed_windows(work, torch.device("cpu"), 0, repeats, 1)]


# ==== The training step, as ssl_min.main builds it ===================================================================
class Trainer:
    """SSLNet + Adam as in ssl_min.main (channels_last and cuDNN autotuning on CUDA, net.compile() with compile=True);
    calling it runs ssl_min.train_step on a batch of views."""

    def __init__(self, images: torch.Tensor, views: int, batch: int, device: torch.device, compile: bool = False):
        self.cfg = ssl_min.check_config(ssl_min.Config(views=views, batch_size=batch, device=str(device),
                                                       compile=compile))
        torch.manual_seed(self.cfg.seed)
        self.net = ssl_min.SSLNet(self.cfg.proj_dim, *ssl_min.pixel_stats(images)).to(device)
        if device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        if self.cfg.compile:
            self.net.compile()
        self.use_adam(fused=None)

    def use_adam(self, fused):
        self.fused = fused
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                          fused=fused)

    def __call__(self, views: torch.Tensor, model=None, optimizer=None) -> torch.Tensor:
        model = self.net if model is None else model
        optimizer = self.optimizer if optimizer is None else optimizer
        return ssl_min.train_step(model, optimizer, views, self.cfg.beta, self.cfg.loss)


# ==== Throughput rows ================================================================================================
def measure(step: str, pipeline: str, views: int, batch: int, fn, device, s: dict, calls: int, drain=lambda: None,
            pids=lambda: ()) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    others = OtherLoad(pids)
    times = timed_windows(fn, device, s["warmup"], s["repeats"], calls, drain)
    rate = spread([calls * batch * views / t for t in times])
    row = dict(step=step, pipeline=pipeline, views=views, batch=batch, calls=calls, views_per_s=rate["median"],
               views_per_s_min=rate["min"], views_per_s_max=rate["max"], windows_s=times,
               epoch_s=EPOCH_IMAGES * views / rate["median"],
               tflops=TRAIN_FLOP_PER_VIEW * rate["median"] / 1e12 if step == "train" else None,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
               other_cores_busy=others.cores())
    print(f"  {step:13s} {pipeline:36s} V={views}  {rate['median']:11,.0f} views/s  "
          f"({rate['min']:,.0f}-{rate['max']:,.0f})", flush=True)
    return row


def usual_row(step: str, usual: UsualPipeline, fn, views, batch, device, s, min_waves: int, per_worker: dict,
              workers: int) -> dict:
    calls = max(s["train_steps"] if step == "train" else 1, math.ceil(min_waves * usual.wave))
    row = measure(step, f"usual ({workers} workers)", views, batch, fn, device, s, calls, usual.drain, usual.pids)
    waited = usual.waited / sum(row["windows_s"])
    efficiency = row["views_per_s"] / (workers * per_worker["median"])
    row.update(waves=calls / usual.wave, input_wait_share=waited, per_worker_views_per_s=per_worker["median"],
               per_worker_min=per_worker["min"], per_worker_max=per_worker["max"], worker_efficiency=efficiency)
    row["note"] = f"waits for input {waited:.0%} of the time; " + (
        f"{efficiency:.0%} of {workers} x one worker's rate" if waited > 0.5 else "the step sets the pace")
    return row


def rows_for_views(images, cpu_images, views: int, device, s: dict, workers: int, trainers: dict) -> list:
    """ssl_min's rows (timed first, before the DataLoader's workers exist), then the usual pipeline's, for one V."""
    batch, rows = s["batch"], []
    ssl = SslMinBatches(images, views, batch)
    train, aug = views in s["train_views"], views in s["aug_views"]
    if aug:
        rows.append(measure("augmentation", "ssl_min", views, batch, ssl, device, s, s["aug_batches"]))
    if train:
        trainers[views] = trainer = Trainer(images, views, batch, device)
        rows.append(measure("train", "ssl_min", views, batch, lambda: trainer(ssl()), device, s, s["train_steps"]))
    usual = UsualPipeline(cpu_images, views, batch, device, workers)
    per_worker = spread(per_worker_views_per_s(usual, s["worker_images"], s["repeats"]))
    try:
        for ssl_row in rows[:]:
            train_step = ssl_row["step"] == "train"
            fn = (lambda: trainer(usual())) if train_step else usual
            row = usual_row(ssl_row["step"], usual, fn, views, batch, device, s,
                            s["train_min_waves"] if train_step else MIN_WAVES, per_worker, workers)
            ssl_row.update(ratio=ssl_row["views_per_s"] / row["views_per_s"],
                           workers_to_match=ssl_row["views_per_s"] / per_worker["median"])
            rows.insert(rows.index(ssl_row), row)
    finally:
        usual.close()
    return rows


def extra_rows(images, views: int, device, s: dict, eager: Trainer, eager_row: dict, usual: dict) -> list:
    """The step with fused Adam, and under net.compile() (first call timed) with either Adam, as rows beside eager."""
    ssl, rows = SslMinBatches(images, views, s["batch"]), []

    def row(trainer: Trainer, name: str, base: dict) -> dict:
        r = measure("train", name, views, s["batch"], lambda: trainer(ssl()), device, s, s["train_steps"])
        r.update(ratio=r["views_per_s"] / usual["views_per_s"], vs=base["pipeline"],
                 vs_ratio=r["views_per_s"] / base["views_per_s"])
        r["note"] = f"{r['vs_ratio']:.2f}x {base['pipeline']}"
        rows.append(r)
        return r

    eager.use_adam(fused=True)
    row(eager, "ssl_min, fused Adam", eager_row)
    compiled = Trainer(images, views, s["batch"], device, compile=True)
    sync(device)
    tic = time.perf_counter()
    with torch.compiler.config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dynamo_pgo force disabled")  # it says what we asked for
        compiled(ssl())  # a cold compile, as a user's first run has it
    sync(device)
    compile_s = time.perf_counter() - tic
    r = row(compiled, "ssl_min + net.compile()", eager_row)
    saved = eager_row["epoch_s"] - r["epoch_s"]  # seconds a CIFAR-10 epoch saves
    r.update(compile_s=compile_s, break_even_epochs=compile_s / saved if saved > 0 else None)
    r["note"] += f"; first call (cold compile) {compile_s:.0f} s" + (
        f", repaid after {r['break_even_epochs']:.1f} epochs" if saved > 0 else ", never repaid")
    compiled.use_adam(fused=True)
    row(compiled, "ssl_min + net.compile(), fused Adam", r)
    return rows


# ==== The linear probe: ssl_min's lean one against the reference written with autograd ===============================
def reference_probe(train_f, train_y, test_f, test_y, classes: int, epochs: int = 200, seed: int = 0) -> float:
    """The textbook probe that ssl_min.linear_probe computes by hand: nn.Linear from zero, F.cross_entropy with label
    smoothing 0.1, torch.optim.Adam (lr 1e-3, weight decay 1e-6), batch 512 in the same seeded order, features
    standardized with the training mean and std + 1e-6."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x, x_test = (train_f - mean) / std, (test_f - mean) / std
    linear = nn.Linear(x.shape[1], classes).to(x.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-6)
    generator = torch.Generator(x.device).manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator, device=x.device).split(512):
            loss = F.cross_entropy(linear(x[idx]), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (linear(x_test).argmax(1) == test_y).float().mean().item()


def synthetic_features(train: int, test: int, dim: int, classes: int = 10, seed: int = 0):
    """Gaussian classes in `dim` dimensions, overlapping (a probe reaches about 75%), shifted and scaled per dimension
    so that the standardization matters."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.12 * math.sqrt(512 / dim) * torch.randn(classes, dim, generator=g)
    scale, shift = torch.rand(dim, generator=g) * 3 + 0.1, torch.randn(dim, generator=g) * 5
    y = torch.randint(classes, (train + test,), generator=g)
    f = (centres[y] + torch.randn(train + test, dim, generator=g)) * scale + shift
    return f[:train], y[:train], f[train:], y[train:]


def probe_problem(s: dict, device, data: dict):
    """Features, labels and classes for the probe rows, the seconds the features took (None if synthetic), and what
    the problem is."""
    p = s["probe"]
    if "dim" in p:
        return (*(t.to(device) for t in synthetic_features(p["train"], p["test"], p["dim"])), 10, None,
                f"synthetic: {p['train']} + {p['test']} samples, {p['dim']}-d, 10 classes")
    if "test" in data:  # the image folder's train/ and test/ splits and labels
        train, train_y, test, test_y, source = data["train"], data["train_labels"], data["test"], data["test_labels"], \
            f"images of {data['source']}"
    else:
        g = torch.Generator().manual_seed(1)
        train = data["train"][:p["train"]]
        test = torch.randint(0, 256, (p["test"], *train.shape[1:]), generator=g, dtype=torch.uint8)
        train_y, test_y = (torch.randint(data["classes"], (len(t),), generator=g) for t in (train, test))
        source = "images with random labels" if "train_labels" in data else "random images and labels"
    train, test, train_y, test_y = (t.to(device) for t in (train, test, train_y, test_y))
    torch.manual_seed(0)
    backbone = ssl_min.ResNet18(*ssl_min.pixel_stats(train)).to(device).eval()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    ssl_min.features(backbone, train[:1024])  # warm-up (cuDNN autotuning)
    sync(device)
    tic = time.perf_counter()
    train_f, test_f = ssl_min.features(backbone, train), ssl_min.features(backbone, test)
    sync(device)
    return (train_f, train_y, test_f, test_y, data["classes"], time.perf_counter() - tic,
            f"features of {len(train)} + {len(test)} {source} from a random ResNet-18, 200 epochs")


def probe_rows(s: dict, device, data: dict) -> list:
    train_f, train_y, test_f, test_y, classes, features_s, problem = probe_problem(s, device, data)
    rows = []
    probes = ("lean (ssl_min.linear_probe)", ssl_min.linear_probe), ("reference (autograd)", reference_probe)
    for name, probe in probes:
        times, accuracy = [], None
        for _ in range(s["probe_repeats"]):
            sync(device)
            tic = time.perf_counter()
            accuracy = probe(train_f, train_y, test_f, test_y, classes)
            sync(device)
            times.append(time.perf_counter() - tic)
        t = spread(times)
        rows.append(dict(step="linear probe", pipeline=name, problem=problem, seconds=t["median"], seconds_min=t["min"],
                         seconds_max=t["max"], features_s=features_s, accuracy=accuracy,
                         total_s=t["median"] + (features_s or 0)))
        print(f"  linear probe  {name:36s} {t['median']:.3f} s ({t['min']:.3f}-{t['max']:.3f}), "
              f"accuracy {accuracy:.4%}", flush=True)
    lean, ref = rows
    lean.update(ratio=ref["seconds"] / lean["seconds"], total_ratio=ref["total_s"] / lean["total_s"],
                same_accuracy=lean["accuracy"] == ref["accuracy"])
    return rows


# ==== The profile: a few training steps under torch.profiler, split into phases ======================================
PHASES = ("augmentation", "forward", "loss", "backward", "optimizer step", "other")
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # the profiler's activity types of device work


def mark(phase: str):
    with record_function(f"phase: {phase}"):  # an empty range: its start is the phase's start on the profiler's clock
        pass


class MarkedOptimizer:
    """The optimizer as ssl_min.train_step uses it (zero_grad then step), marking the backward and the update."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_grad(self, set_to_none=True):
        mark("optimizer step")
        self.optimizer.zero_grad(set_to_none=set_to_none)
        mark("backward")

    def step(self):
        mark("optimizer step")
        self.optimizer.step()
        mark("other")


def phase_breakdown(events, steps: int) -> list:
    """Wall milliseconds per step between the phase marks, and device milliseconds per step, each kernel counted in
    the phase in which the CPU operation that launched it started (the backward's launches come from the autograd
    engine's threads, inside the backward phase); device work linked to no operation is counted as "unattributed"."""
    marks = sorted((e.time_range.start, e.name.split(": ", 1)[1]) for e in events
                   if e.name.startswith("phase: ") and e.device_type == DeviceType.CPU)
    starts = [t for t, _ in marks]
    names = [name if name in PHASES else "other" for _, name in marks]  # "end" closes the last step
    wall, device = dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES + ("unattributed",), 0.0)
    for name, t, t_next in zip(names, starts, starts[1:]):
        wall[name] += t_next - t
    for e in events:
        if e.device_type == DeviceType.CPU and getattr(e, "kernels", None):
            i = max(0, bisect.bisect_right(starts, e.time_range.start) - 1)  # the last mark before it
            device[names[i]] += sum(k.duration for k in e.kernels)
    total = sum(e.time_range.elapsed_us() for e in events if e.activity_type in DEVICE_WORK)
    device["unattributed"] = max(0.0, total - sum(device.values()))
    wall_total, on_device = sum(wall.values()) or 1, total > 0
    return [dict(phase=p, cpu_ms=wall[p] / 1e3 / steps if p in wall else None,
                 cpu_share=wall[p] / wall_total if p in wall else None,
                 device_ms=device[p] / 1e3 / steps if on_device else None,
                 device_share=device[p] / total if on_device else None)
            for p in device if p in wall or on_device]


def profile(images, device, s: dict, compile: bool) -> dict:
    views, batch = s["train_views"][0], s["batch"]
    trainer, ssl = Trainer(images, views, batch, device, compile), SslMinBatches(images, views, batch)
    optimizer = MarkedOptimizer(trainer.optimizer)

    def model(x):
        mark("forward")
        z = trainer.net(x)
        mark("loss")
        return z

    def step():
        mark("augmentation")
        trainer(ssl(), model, optimizer)
    for _ in range(s["warmup"] + compile):  # with compile, the first step compiles
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(s["profile_steps"]):
            step()
        sync(device)
        mark("end")
    phases = phase_breakdown(prof.events(), s["profile_steps"])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = prof.key_averages().table(sort_by=sort, row_limit=12)
    return dict(views=views, batch=batch, steps=s["profile_steps"], compile=trainer.cfg.compile, phases=phases,
                top_ops=top)


# ==== Report =========================================================================================================
def fmt(value, spec: str) -> str:
    return "" if value is None else spec.format(value)


def workers_text(n) -> str:
    return "" if n is None else f"{n:.1f}" if n >= 0.05 else "<0.1"


THROUGHPUT_COLUMNS = [
    ("step", lambda r: r["step"]), ("input pipeline", lambda r: r["pipeline"]), ("V", lambda r: str(r["views"])),
    ("batch", lambda r: str(r["batch"])), ("views/s", lambda r: f"{r['views_per_s']:,.0f}"),
    ("min-max", lambda r: f"{r['views_per_s_min']:,.0f}-{r['views_per_s_max']:,.0f}"),
    ("s/epoch", lambda r: f"{r['epoch_s']:.1f}"), ("TFLOP/s", lambda r: fmt(r["tflops"], "{:.2f}")),
    ("peak GiB", lambda r: fmt(r["peak_mem_gib"], "{:.2f}")), ("waves", lambda r: fmt(r.get("waves"), "{:.3g}")),
    ("per worker", lambda r: fmt(r.get("per_worker_views_per_s"), "{:,.0f}")),
    ("ssl_min/usual", lambda r: fmt(r.get("ratio"), "{:.1f}x")),
    ("workers to match", lambda r: workers_text(r.get("workers_to_match"))),
    ("other load", lambda r: fmt(r["other_cores_busy"], "{:.2f}")), ("note", lambda r: r.get("note", "")),
]
PROBE_COLUMNS = [
    ("probe", lambda r: r["pipeline"]), ("seconds", lambda r: f"{r['seconds']:.3f}"),
    ("min-max", lambda r: f"{r['seconds_min']:.3f}-{r['seconds_max']:.3f}"),
    ("+ features s", lambda r: fmt(r["features_s"], "{:.1f}")), ("accuracy", lambda r: f"{r['accuracy']:.2%}"),
    ("reference/lean", lambda r: fmt(r.get("ratio"), "{:.1f}x")), ("problem", lambda r: r["problem"]),
]
PROFILE_COLUMNS = [
    ("phase", lambda r: r["phase"]), ("CPU ms/step", lambda r: fmt(r["cpu_ms"], "{:.1f}")),
    ("CPU share", lambda r: fmt(r["cpu_share"], "{:.1%}")), ("GPU ms/step", lambda r: fmt(r["device_ms"], "{:.2f}")),
    ("GPU share", lambda r: fmt(r["device_share"], "{:.1%}")),
]


TEXT_COLUMNS = ("step", "input pipeline", "note", "probe", "problem", "phase")


def table(rows: list, columns: list, markdown: bool) -> str:
    """A text or markdown table; columns empty in every row are left out; text columns left-aligned."""
    cells = [[get(r) for _, get in columns] for r in rows]
    keep = [i for i in range(len(columns)) if any(c[i] for c in cells)]
    head, cells = [columns[i][0] for i in keep], [[c[i] for i in keep] for c in cells]
    left = [name in TEXT_COLUMNS for name in head]
    if markdown:
        rule = "|" + "|".join("---" if lj else "---:" for lj in left) + "|"
        return "\n".join(["| " + " | ".join(head) + " |", rule] + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    lines = ["  ".join(x.ljust(w) if lj else x.rjust(w) for x, w, lj in zip(line, widths, left)).rstrip()
             for line in [head, *cells]]
    return "\n".join([lines[0], "-" * max(map(len, lines)), *lines[1:]])


def ratios(result: dict) -> list:
    """The speed goals as ratios measured in this run."""
    lines = []
    for r in result["rows"]:
        if "workers_to_match" in r and r["pipeline"] == "ssl_min":
            lines.append(f"{r['step']}, V={r['views']}: ssl_min / usual = {r['ratio']:.2f}x; the usual pipeline would "
                         f"need {workers_text(r['workers_to_match'])} workers to match ssl_min's "
                         f"{r['views_per_s']:,.0f} views/s")
        elif "vs_ratio" in r:
            lines.append(f"train, V={r['views']}: {r['pipeline']} / {r['vs']} = {r['vs_ratio']:.2f}x" +
                         (f" (compile {r['compile_s']:.0f} s)" if "compile_s" in r else ""))
    if result.get("probe"):
        lean, ref = result["probe"]
        goal = "the >= 5x goal is for the 60k-image probe on a GPU" if lean["features_s"] is None else \
            f"goal >= 5x: {'met' if lean['ratio'] >= 5 else 'NOT met'}"
        lines.append(f"linear probe ({lean['problem']}): reference / lean = {lean['ratio']:.1f}x ({goal})"
                     + (f", with the features {lean['total_ratio']:.1f}x" if lean["features_s"] else "")
                     + f"; accuracy lean {lean['accuracy']:.4%} vs reference {ref['accuracy']:.4%} "
                       f"({'identical' if lean['same_accuracy'] else 'differ'})")
    return lines


def load_images(data_dir: str, s: dict, test: bool) -> dict:
    """uint8 images [N, 3, H, W] and labels on the CPU: DIR/train/<class>/* (and DIR/test/, if asked for and there)
    if given, else random images."""
    if not data_dir:
        return dict(train=torch.randint(0, 256, (s["random_images"], 3, 32, 32), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(0)), classes=10, source="random uint8")
    train, train_labels, classes = ssl_min.read_image_folder(Path(data_dir) / "train")
    data = dict(train=train, train_labels=train_labels, classes=len(classes), source=data_dir)
    if test and (Path(data_dir) / "test").is_dir():
        data["test"], data["test_labels"], _ = ssl_min.read_image_folder(Path(data_dir) / "test")
    return data


def run(args, device: torch.device, s: dict) -> dict:
    start = time.perf_counter()
    h = header(device, args.workers)
    print(caption(h), flush=True)
    data = load_images(args.data_dir, s, test="dim" not in s["probe"] and not args.profile)
    cpu_images = data["train"]
    if len(cpu_images) < s["batch"] * max(1, args.workers * PREFETCH):
        raise ssl_min.UserError(f"{len(cpu_images)} images are too few for batch {s['batch']} and "
                                f"{args.workers} workers")
    images = cpu_images.to(device)
    result = dict(header=h, settings=dict(s, mode=args.mode, workers=args.workers, prefetch_factor=PREFETCH,
                                          min_waves=MIN_WAVES, extras=args.extras or device.type == "cuda"),
                  images=dict(count=len(images), shape=list(images.shape[1:]), source=data["source"]))
    print(f"{len(images)} images {tuple(images.shape[1:])} from {result['images']['source']}; settings {s}", flush=True)
    if args.profile:
        result["profile"] = profile(images, device, s, args.compile)
    else:
        rows, trainers = [], {}
        for views in sorted(set(s["aug_views"]) | set(s["train_views"])):
            rows += rows_for_views(images, cpu_images, views, device, s, args.workers, trainers)
        order = {"augmentation": 0, "train": 1}
        rows.sort(key=lambda r: (order[r["step"]], r["views"]))
        if result["settings"]["extras"]:
            views = 4 if 4 in trainers else min(trainers)
            usual, eager = [r for r in rows if r["step"] == "train" and r["views"] == views]
            rows += extra_rows(images, views, device, s, trainers[views], eager, usual)
        result["rows"] = rows
        result["probe"] = probe_rows(s, device, data)
        result["ratios"] = ratios(result)
    h.update(load_average_end=list(os.getloadavg()), wall_s=time.perf_counter() - start)
    return result


def report(result: dict, markdown: bool) -> str:
    out = [caption(result["header"])]
    if "profile" in result:
        p = result["profile"]
        out += [f"Training step, V={p['views']}, batch {p['batch']}, {p['steps']} step(s) under torch.profiler "
                f"({'compiled' if p['compile'] else 'eager'}):", table(p["phases"], PROFILE_COLUMNS, markdown)]
        if not markdown:
            out += ["Top operations:", p["top_ops"]]
        return "\n\n".join(out)
    out += [table(result["rows"], THROUGHPUT_COLUMNS, markdown), table(result["probe"], PROBE_COLUMNS, markdown),
            "Ratios measured in this run:\n" + "\n".join("- " + line for line in result["ratios"])]
    return "\n\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="batch 64, V = 2 and 4, a synthetic probe: minutes on a few CPU cores")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="tiny sizes: seconds, to check that every code path runs (its numbers mean nothing)")
    parser.set_defaults(mode="full")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table: a few training steps under torch.profiler, split into phases")
    parser.add_argument("--compile", action="store_true",
                        help="with --profile: the step under net.compile() (ssl_min's default on CUDA)")
    parser.add_argument("--data-dir", default="", help="image folder with train/<class>/* (and test/<class>/* for the "
                                                       "full probe); default: random uint8 images")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of this process (default 1)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="DataLoader workers of the usual pipeline (default: usable cores)")
    parser.add_argument("--views", default="", help="comma-separated V for every row (default: the setting's)")
    parser.add_argument("--extras", action="store_true", help="on a CPU too: the fused Adam and net.compile() rows")
    parser.add_argument("--json", default="", help="write every number to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the tables in markdown")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.workers < 1:
        parser.error("--threads and --workers must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no usable CUDA GPU")
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    s = dict(SETTINGS[args.mode])
    if args.views:
        try:
            s["aug_views"] = s["train_views"] = tuple(sorted({int(v) for v in args.views.split(",")}))
        except ValueError:
            s["aug_views"] = ()
        if not s["aug_views"] or min(s["aug_views"]) < 2:
            parser.error(f"--views takes comma-separated whole numbers >= 2, got {args.views!r}")
    try:
        result = run(args, device, s)
    except ssl_min.UserError as e:
        sys.exit(f"throughput: error: {e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + report(result, args.markdown))
    return result


if __name__ == "__main__":
    main()
