"""Throughput of ssl_min's batched augmentation against the usual per-sample DataLoader pipeline, of the training step
fed by each (on CUDA also compiled), of the lean linear probe against an autograd reference, and a per-phase profile
of the step: all measured in this one run on one device. How to run it and what each row measures: benchmarks/README.md.
"""
import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ssl_min  # noqa: E402

PREFETCH = 2  # the DataLoader's default prefetch_factor; a wave is workers x PREFETCH batches
USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SETTINGS = dict(  # train_waves: the least waves of a window of the usual pipeline's training rows (augmentation: 10)
    full=dict(batch=512, aug_views=(2, 4), train_views=(4,), repeats=3, warmup=3, aug_calls=48, train_calls=24,
              train_waves=10, probe=(50_000, 10_000, 512, 1), profile_steps=5),
    quick=dict(batch=64, aug_views=(2, 4), train_views=(2, 4), repeats=3, warmup=1, aug_calls=30, train_calls=2,
               train_waves=0, probe=(4096, 1024, 512, 3), profile_steps=2),
    smoke=dict(batch=8, aug_views=(2,), train_views=(2,), repeats=2, warmup=1, aug_calls=2, train_calls=1,
               train_waves=0, probe=(512, 256, 32, 1), profile_steps=1),
)  # probe: (train samples, test samples, dimensions, repeats)


def header(device: torch.device) -> dict:
    """ssl_min.provenance (commit, device, versions) with the CPU, CUDA, cuDNN, torch's threads, date, command, load."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    info = ssl_min.provenance(device)
    info["versions"].update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return dict(info, cpu=dict(model=model, cores=os.cpu_count(), usable_cores=USABLE_CORES),
                threads=dict(torch_intra_op=torch.get_num_threads(), torch_interop=torch.get_num_interop_threads()),
                date=datetime.now().isoformat(timespec="seconds"), command=" ".join(["python", *sys.argv]),
                load_average_start=os.getloadavg())


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    sync(device)
    tic = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - tic


def measure(step: str, pipeline: str, views: int, fn, device, s: dict, calls: int, drain=lambda: None) -> dict:
    """A row: views/s of `repeats` windows of `calls` calls of fn, after `warmup` calls and then drain()."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(s["warmup"]):
        fn()
    drain()
    times = [seconds(lambda: [fn() for _ in range(calls)], device) for _ in range(s["repeats"])]
    rates = [calls * s["batch"] * views / t for t in times]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"  {step:12s} {pipeline:34s} V={views}  {statistics.median(rates):11,.0f} views/s", flush=True)
    return dict(step=step, pipeline=pipeline, views=views, batch=s["batch"], calls=calls, windows_s=times,
                views_per_s=statistics.median(rates), views_per_s_min=min(rates), views_per_s_max=max(rates),
                peak_mem_gib=peak)


def ssl_min_views(images: torch.Tensor, views: int, batch: int):
    """ssl_min's pipeline, as ssl_min.pretrain runs it: slices of a random order of the images, augmented."""
    generator = torch.Generator(images.device).manual_seed(0)
    while True:
        order = torch.randperm(len(images), generator=generator, device=images.device)
        for at in range(0, len(images) - batch + 1, batch):
            yield ssl_min.augment(images[order[at:at + batch]], views, generator)


class MultiViewCIFAR(torch.utils.data.Dataset):
    """As torchvision.datasets.CIFAR10 with solo-learn's and lightly's multi-view transform: V transformed copies."""

    def __init__(self, images: torch.Tensor, views: int):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # uint8 [N, H, W, 3]
        self.views = views
        self.transform = T.Compose([
            T.RandomResizedCrop(self.images.shape[1], scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4)], p=0.8), T.RandomGrayscale(0.2),
            T.PILToTensor()])  # uint8: a quarter of float32's bytes through the workers' queue

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])
        return torch.stack([self.transform(image) for _ in range(self.views)])  # uint8 [V, 3, H, W]


class UsualPipeline:
    """The usual pipeline: calling it returns the next batch's views on the device; counts the seconds it waited."""

    def __init__(self, images: torch.Tensor, views: int, batch: int, device: torch.device, workers: int):
        self.device = device
        self.wave = workers * PREFETCH
        self.waited = 0.0
        dataset = MultiViewCIFAR(images, views)
        endless = torch.utils.data.RandomSampler(dataset, num_samples=2**40,  # epoch after epoch, one iterator
                                                 generator=torch.Generator().manual_seed(0))
        self.batches = iter(torch.utils.data.DataLoader(
            dataset, batch, sampler=endless, drop_last=True, num_workers=workers, prefetch_factor=PREFETCH,
            pin_memory=device.type == "cuda"))  # the DataLoader sets one torch thread in each worker

    def __call__(self) -> torch.Tensor:
        tic = time.perf_counter()
        x = next(self.batches)  # uint8 [B, V, 3, H, W]
        self.waited += time.perf_counter() - tic
        return x.to(self.device, non_blocking=True).transpose(0, 1).contiguous().float().div_(255)

    def drain(self):  # take the batches made ahead during the warm-up: the timed ones are made while timed
        for _ in range(self.wave):
            self()
        self.waited = 0.0


class Trainer:
    """ssl_min.build's network and Adam at ssl_min's defaults; calling it runs one ssl_min.train_step."""

    def __init__(self, images: torch.Tensor, views: int, batch: int, device: torch.device, compile=False):
        self.cfg = ssl_min.Config(views=views, batch_size=batch)
        self.beta = ssl_min.default_beta(self.cfg.proj_dim, self.cfg.loss)
        self.net, self.optimizer, self.scaler = ssl_min.build(self.cfg, images, device)
        if compile:
            self.net.compile()

    def __call__(self, views: torch.Tensor, model=None) -> torch.Tensor:
        return ssl_min.train_step(model or self.net, self.optimizer, self.scaler, views, self.beta, self.cfg.loss)


def rows_for_views(images, cpu_images, views: int, device, s: dict, workers: int) -> list:
    """For one V: ssl_min's rows (on CUDA also the compiled step), timed before the DataLoader's workers exist, then
    the usual pipeline's."""
    ssl = ssl_min_views(images, views, s["batch"])
    steps = ["augmentation"] * (views in s["aug_views"]) + ["train"] * (views in s["train_views"])
    trainer = Trainer(images, views, s["batch"], device) if "train" in steps else None
    feed = dict(augmentation=lambda next_views: next_views, train=lambda next_views: lambda: trainer(next_views()))
    calls = dict(augmentation=s["aug_calls"], train=s["train_calls"])
    ssl_rows = [measure(name, "ssl_min", views, feed[name](lambda: next(ssl)), device, s, calls[name])
                for name in steps]
    rows = []
    if device.type == "cuda" and trainer is not None:  # compiled, as main runs it there (on a CPU: minutes)
        compiled = Trainer(images, views, s["batch"], device, compile=True)
        with torch.compiler.config.patch(force_disable_caches=True):  # a cold compile, as a user's first run has it
            first_call_s = seconds(lambda: compiled(next(ssl)), device)
        row = measure("train", "ssl_min, compiled", views, lambda: compiled(next(ssl)), device, s, s["train_calls"])
        rows.append(dict(row, first_call_s=first_call_s, vs_eager=row["views_per_s"] / ssl_rows[-1]["views_per_s"]))
    usual = UsualPipeline(cpu_images, views, s["batch"], device, workers)
    for name, ssl_row in zip(steps, ssl_rows):
        waves = 10 if name == "augmentation" else s["train_waves"]
        row = measure(name, f"usual ({workers} workers)", views, feed[name](usual), device, s,
                      max(calls[name], waves * usual.wave), usual.drain)
        row.update(waves=row["calls"] / usual.wave, input_wait_share=usual.waited / sum(row["windows_s"]))
        ssl_row["ratio"] = ssl_row["views_per_s"] / row["views_per_s"]
        rows += [row, ssl_row]
    usual.batches._shutdown_workers()  # the workers would otherwise live until the iterator is collected
    return rows


def reference_probe(train_f, train_y, test_f, test_y, classes: int, epochs: int = 200, seed: int = 0) -> float:
    """ssl_min.linear_probe written with autograd: nn.Linear from zero, cross-entropy with label smoothing 0.1,
    torch.optim.Adam (lr 1e-3, weight decay 1e-6), batch 512 in the same seeded order, the same standardization."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x, x_test = (train_f - mean) / std, (test_f - mean) / std
    linear = nn.Linear(x.shape[1], classes).to(x.device)
    for parameter in linear.parameters():
        nn.init.zeros_(parameter)
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


def probe_rows(s: dict, device) -> list:
    """Both probes on 10 overlapping Gaussian classes, shifted and scaled per dimension (the standardization acts)."""
    train, test, dim, repeats = s["probe"]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(10, (train + test,), generator=g)
    f = 0.12 * (512 / dim) ** 0.5 * torch.randn(10, dim, generator=g)[y] + torch.randn(train + test, dim, generator=g)
    f = (f * (torch.rand(dim, generator=g) * 3 + 0.1) + torch.randn(dim, generator=g) * 5).to(device)
    y = y.to(device)
    rows = []
    for name, probe in ("lean (ssl_min.linear_probe)", ssl_min.linear_probe), ("reference (autograd)", reference_probe):
        accuracy = []
        times = [seconds(lambda: accuracy.append(probe(f[:train], y[:train], f[train:], y[train:], 10)), device)
                 for _ in range(repeats)]
        rows.append(dict(probe=name, seconds=statistics.median(times), seconds_min=min(times), seconds_max=max(times),
                         accuracy=accuracy[-1], test_samples=test,
                         problem=f"synthetic: {train:,} + {test:,} samples, {dim}-d, 10 classes, 200 epochs"))
        print(f"  linear probe {name:34s} {rows[-1]['seconds']:.3f} s, accuracy {accuracy[-1]:.4%}", flush=True)
    rows[0]["ratio"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def profile(images, device, s: dict) -> dict:
    """ms per step of each phase of ssl_min's default step (compiled on CUDA), the device synchronized at each phase's
    end so that its time includes its device work."""
    views, steps, cuda = s["train_views"][0], s["profile_steps"], device.type == "cuda"
    trainer, ssl = Trainer(images, views, s["batch"], device, compile=cuda), ssl_min_views(images, views, s["batch"])
    phases, now = {}, [None, 0.0]  # seconds per phase; the phase under way and its start

    def mark(phase=None):  # end the phase under way, start `phase`
        sync(device)
        tic = time.perf_counter()
        if now[0]:
            phases[now[0]] = phases.get(now[0], 0.0) + tic - now[1]
        now[:] = phase, tic

    def model(x):  # the network as ssl_min.train_step calls it, marked outside what is compiled
        mark("forward")
        z = trainer.net(x)
        mark("loss")  # the loss, zero_grad and the loss's own backward
        z.register_hook(lambda grad: mark("backward"))
        return z

    for _ in range(s["warmup"] + 1):  # the first step compiles where the step is compiled
        trainer(next(ssl))
    trainer.optimizer.register_step_pre_hook(lambda *_: mark("optimizer step"))
    trainer.optimizer.register_step_post_hook(lambda *_: mark())
    for _ in range(steps):
        mark("augmentation")
        trainer(next(ssl), model)
    total = sum(phases.values())
    result = dict(views=views, batch=s["batch"], steps=steps, compile=cuda,
                  phases=[dict(phase=p, ms_per_step=t * 1e3 / steps, share=t / total) for p, t in phases.items()])
    print(f"  profile, V={views}, batch {s['batch']}, {'compiled' if cuda else 'eager'}: " + ", ".join(
        f"{p['phase']} {p['ms_per_step']:.1f} ms ({p['share']:.0%})" for p in result["phases"]), flush=True)
    return result


def ratios(rows: list, probe: list) -> list:
    lines = [f"{r['step']}, V={r['views']}: ssl_min / usual = {r['ratio']:.2f}x" for r in rows if "ratio" in r]
    lines += [f"compiled / eager = {r['vs_eager']:.2f}x (the first call {r['first_call_s']:.0f} s)" for r in rows
              if "vs_eager" in r]
    return lines + [f"linear probe ({probe[0]['problem']}): reference / lean = {probe[0]['ratio']:.2f}x; accuracy "
                    f"lean {probe[0]['accuracy']:.4%}, reference {probe[1]['accuracy']:.4%}"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", dest="mode", action="store_const", const="quick", default="full",
                        help="batch 64, V = 2 and 4, a smaller probe: minutes on a few CPU cores")
    parser.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                        help="tiny sizes: seconds, to check that every code path runs (its numbers mean nothing)")
    parser.add_argument("--data-dir", default="", help="image folder with train/<class>/* (default: random images)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of this process (default 1)")
    parser.add_argument("--workers", type=int, default=USABLE_CORES, help="the usual pipeline's DataLoader workers")
    parser.add_argument("--views", type=int, nargs="+", help="V for every row (default: the setting's)")
    parser.add_argument("--json", default="", help="write every number to this JSON file")
    args = parser.parse_args(argv)
    device, s = torch.device(args.device), dict(SETTINGS[args.mode])
    if args.views:
        s.update(aug_views=args.views, train_views=args.views)
    torch.set_num_threads(args.threads)
    start, h = time.perf_counter(), header(device)
    print(json.dumps(h), flush=True)
    if args.data_dir:
        cpu_images, source = ssl_min.read_image_folder(Path(args.data_dir) / "train")[0], args.data_dir
    else:
        cpu_images = torch.randint(0, 256, (max(1024, 4 * s["batch"]), 3, 32, 32), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))
        source = "random uint8"
    images, rows = cpu_images.to(device), []
    for views in sorted(set(s["aug_views"]) | set(s["train_views"])):
        rows += rows_for_views(images, cpu_images, views, device, s, args.workers)
    probe = probe_rows(s, device)
    result = dict(header=h, settings=dict(s, mode=args.mode, workers=args.workers, prefetch_factor=PREFETCH),
                  images=dict(count=len(images), shape=list(images.shape[1:]), source=source), rows=rows,
                  probe=probe, profile=profile(images, device, s), ratios=ratios(rows, probe))
    h.update(load_average_end=os.getloadavg(), wall_s=time.perf_counter() - start)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        ssl_min.write_atomic(Path(args.json), result)
    smoke = "  (--smoke: these numbers only show that every code path ran)" * (args.mode == "smoke")
    print("Ratios measured in this run" + smoke + ":\n" + "\n".join("- " + x for x in result["ratios"]))
    return result


if __name__ == "__main__":
    main()
