"""Throughput of ssl_min's batched on-device augmentation versus the usual per-sample DataLoader pipeline.

    python benchmarks/throughput.py                                   # GPU: the full table (about 3 minutes on an H200)
    python benchmarks/throughput.py --quick                           # CPU: a small setting (under 2 minutes on 2 idle cores)
    python benchmarks/throughput.py --data-dir path/to/cifar10 --markdown --json throughput.json

Every row runs in this process on the same device (cuda if available, else cpu) and reports the median of several
timed repeats after a warm-up. The two input pipelines deliver the same thing, V augmented views of a batch of B
images of 32 px, view-major, on the device:

- ssl_min: the uint8 dataset sits on the device; a batch is a random index and `ssl_min.augment`.
- usual: a CIFAR-10-style Dataset (uint8 HWC numpy images, PIL per sample, as torchvision.datasets.CIFAR10) with
  per-sample torchvision transforms (RandomResizedCrop, flip, ColorJitter with p 0.8, grayscale with p 0.2,
  ToTensor, Normalize; the classic transforms on PIL, which are faster here than transforms.v2), called V times per
  image, in a DataLoader with os.cpu_count() persistent workers (--workers; pinned memory on CUDA), followed by the
  copy to the device. This is how solo-learn and lightly feed multi-view SSL.

Rows: augmentation alone; a full training step (augmentation + ResNet-18 + projector forward and backward in bf16
autocast + Adam, as ssl_min.main) fed by either pipeline; on CUDA also that step under torch.compile, and the
linear probe (features of 60,000 images + 200 epochs). Without --data-dir the images are random uint8; with it,
the images of DIR/train/<class>/*.png.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ssl_min  # noqa: E402

EPOCH_IMAGES = 50_000  # CIFAR-10's training set
TRAIN_FLOP_PER_VIEW = 3.3e9  # ResNet-18 at 32 px with the CIFAR stem: ~0.56 GFLOP forward, x3 for forward + backward


def settings(quick: bool, cuda: bool, workers: int) -> dict:
    """How much to measure: the full setting is sized for a GPU (an augmentation repeat spans more than the 2 x 16
    batches that 16 workers prepare ahead), --quick for a few CPU cores."""
    if quick:
        return dict(batch=64, views=(2, 4), repeats=3, aug_batches=30, train_steps=1, warmup=1, extras=False, workers=workers)
    return dict(batch=512, views=(2, 4, 8), repeats=3, aug_batches=48, train_steps=24, warmup=3, extras=cuda, workers=workers)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, warmup: int, repeats: int, calls: int, drain=lambda: None) -> float:
    """Median over `repeats` of the wall time of `calls` calls of fn, divided by `calls`, after `warmup` calls and
    then `drain()`, which empties the DataLoader's queue so that the timed batches are made while timing."""
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
        times.append((time.perf_counter() - tic) / calls)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# The two input pipelines: each is a function that returns the next batch of views [V * B, 3, 32, 32] on the device
# ---------------------------------------------------------------------------------------------------------------
def ssl_min_batches(images: torch.Tensor, views: int, batch: int):
    """ssl_min's pipeline: random indices into the uint8 images on the device, then the batched augmentation."""
    generator = torch.Generator(images.device).manual_seed(0)

    def next_batch():
        idx = torch.randint(len(images), (batch,), generator=generator, device=images.device)
        return ssl_min.augment(images[idx], views, generator).flatten(0, 1)
    return next_batch


class MultiViewCIFAR(torch.utils.data.Dataset):
    """As torchvision.datasets.CIFAR10 with solo-learn's / lightly's multi-view transform: V transformed copies."""

    def __init__(self, images, transform, views: int):
        self.images, self.transform, self.views = images, transform, views  # images: uint8 numpy [N, 32, 32, 3]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])
        return [self.transform(image) for _ in range(self.views)]


def usual_transform(mean, std):
    return T.Compose([
        T.RandomResizedCrop(32, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
        T.ToTensor(),
        T.Normalize(mean.tolist(), std.tolist()),
    ])


def loader_batches(images: torch.Tensor, views: int, batch: int, device: torch.device, workers: int):
    """The usual pipeline over uint8 CPU images [N, 3, H, W], and how many batches its workers prepare ahead."""
    dataset = MultiViewCIFAR(images.permute(0, 2, 3, 1).contiguous().numpy(), usual_transform(*ssl_min.pixel_stats(images)), views)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=True, pin_memory=device.type == "cuda", prefetch_factor=2,
                                         generator=torch.Generator().manual_seed(0))

    def forever():
        while True:
            yield from loader
    it = forever()

    def next_batch():
        return torch.cat([v.to(device, non_blocking=True) for v in next(it)])  # view-major, as ssl_min.augment
    return next_batch, 2 * workers


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------
def training_step(images: torch.Tensor, views: int, batch: int, device: torch.device, compile: bool = False):
    """ssl_min's training step (ssl_min.new_run and train_step) on a batch of views [V * B, 3, 32, 32]."""
    cfg = ssl_min.resolve(ssl_min.Config(views=views, batch_size=batch, device=device.type, compile=compile))
    run = ssl_min.new_run(cfg, images)
    return lambda x: ssl_min.train_step(run, x)


def measure_row(step: str, pipeline: str, views: int, batch: int, fn, device, s: dict, calls: int, drain=lambda: None) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    views_per_s = batch * views / seconds_per_call(fn, device, s["warmup"], s["repeats"], calls, drain)
    row = dict(step=step, pipeline=pipeline, views=views, batch=batch, views_per_s=views_per_s,
               epoch_s=EPOCH_IMAGES * views / views_per_s,
               tflops=TRAIN_FLOP_PER_VIEW * views_per_s / 1e12 if step != "augmentation" else None,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    print(f"  {step:14s} {pipeline:24s} V={views}  {views_per_s:10,.0f} views/s", flush=True)
    return row


def pair_rows(step: str, images, cpu_images, views, batch, device, s: dict, train: bool) -> list:
    """The usual pipeline's row and ssl_min's, which carries the ratio, for one step and V. ssl_min is timed first,
    before the DataLoader's workers exist (they start at the first batch asked for and end with this function)."""
    usual, backlog = loader_batches(cpu_images, views, batch, device, s["workers"])
    ssl = ssl_min_batches(images, views, batch)
    if train:
        step_fn = training_step(images, views, batch, device)
        ssl_fn, usual_fn = (lambda: step_fn(ssl())), (lambda: step_fn(usual()))
        calls = s["train_steps"]
    else:
        ssl_fn, usual_fn, calls = ssl, usual, s["aug_batches"]

    def drain():  # the batches the workers prepared ahead during the warm-up
        for _ in range(backlog):
            usual()
    ssl_row = measure_row(step, "ssl_min", views, batch, ssl_fn, device, s, calls)
    usual_row = measure_row(step, f"usual ({s['workers']} workers)", views, batch, usual_fn, device, s, calls, drain)
    ssl_row["ratio"] = ssl_row["views_per_s"] / usual_row["views_per_s"]
    return [usual_row, ssl_row]


def compiled_row(images, views, batch, device, s: dict, usual: dict, eager: dict) -> dict:
    """ssl_min's step with the model under torch.compile (as ssl_min --compile): first-call time and steady speed."""
    step_fn, ssl = training_step(images, views, batch, device, compile=True), ssl_min_batches(images, views, batch)
    sync(device)
    tic = time.perf_counter()
    step_fn(ssl())
    sync(device)
    compile_s = time.perf_counter() - tic
    row = measure_row("train", "ssl_min + torch.compile", views, batch, lambda: step_fn(ssl()), device, s, s["train_steps"])
    row.update(compile_s=compile_s, ratio=row["views_per_s"] / usual["views_per_s"], vs_eager=row["views_per_s"] / eager["views_per_s"])
    row["note"] = f"{row['vs_eager']:.2f}x eager ssl_min; first call (compile) {compile_s:.0f} s"
    return row


def probe_row(device) -> dict:
    """ssl_min.features of 50,000 + 10,000 random images, then ssl_min.linear_probe (200 epochs) on them."""
    g = torch.Generator(device).manual_seed(0)
    train, test = (torch.randint(0, 256, (n, 3, 32, 32), generator=g, device=device, dtype=torch.uint8) for n in (50_000, 10_000))
    train_y, test_y = (torch.randint(0, 10, (n,), generator=g, device=device) for n in (50_000, 10_000))
    backbone = ssl_min.ResNet18(*ssl_min.pixel_stats(train)).to(device).to(memory_format=torch.channels_last)
    sync(device)
    tic = time.perf_counter()
    ssl_min.linear_probe(ssl_min.features(backbone, train), train_y, ssl_min.features(backbone, test), test_y)
    sync(device)
    seconds = time.perf_counter() - tic
    print(f"  linear probe {seconds:.1f} s", flush=True)
    return dict(step="linear probe", pipeline="ssl_min", seconds=seconds, note=f"{seconds:.1f} s (target < 30 s)")


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
COLUMNS = [("step", "step", "{}"), ("input pipeline", "pipeline", "{}"), ("V", "views", "{}"), ("batch", "batch", "{}"),
           ("views/s", "views_per_s", "{:,.0f}"), ("s/epoch", "epoch_s", "{:.1f}"), ("TFLOP/s", "tflops", "{:.2f}"),
           ("peak GiB", "peak_mem_gib", "{:.2f}"), ("ssl_min/usual", "ratio", "{:.1f}x"), ("note", "note", "{}")]


def cells(row: dict) -> list:
    na = "n/a" if "views_per_s" in row else ""  # peak memory and TFLOP/s are n/a on CPU and for augmentation alone
    return [fmt.format(row[key]) if row.get(key) is not None else (na if key in ("tflops", "peak_mem_gib") else "")
            for _, key, fmt in COLUMNS]


def text_table(rows: list) -> str:
    table = [[name for name, _, _ in COLUMNS]] + [cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 or i == len(widths) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    return "\n".join([lines[0], "-" * len(max(lines, key=len)), *lines[1:]])


def markdown_table(rows: list) -> str:
    header = [name for name, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 or i == len(header) - 1 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells(r)) + " |" for r in rows])


def header(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return dict(device=name, torch=torch.__version__, torchvision=torchvision.__version__, python=platform.python_version(),
                date=datetime.now().isoformat(timespec="seconds"), command=shlex.join(["python", *sys.argv]))


def load_images(data_dir: str) -> torch.Tensor:
    """uint8 [N, 3, 32, 32] on the CPU: DIR/train/<class>/* if given, else 50,000 random images."""
    if data_dir:
        return ssl_min.read_image_folder(Path(data_dir) / "train")[0]
    return torch.randint(0, 256, (EPOCH_IMAGES, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info, s = header(device), settings(args.quick, device.type == "cuda", args.workers)
    for key, value in info.items():
        print(f"{key:12s} {value}")
    cpu_images = load_images(args.data_dir)
    images = cpu_images.to(device)
    print(f"{len(images)} images of {tuple(images.shape[1:])} from {args.data_dir or 'random uint8'}; settings {s}", flush=True)
    rows = []
    for train in (False, True):
        for views in s["views"]:
            rows += pair_rows("train" if train else "augmentation", images, cpu_images, views, s["batch"], device, s, train)
    if s["extras"]:
        usual, eager = [r for r in rows if r["step"] == "train" and r["views"] == 4]
        rows += [compiled_row(images, 4, s["batch"], device, s, usual, eager), probe_row(device)]
    return dict(header=info, settings=s, images=dict(count=len(images), source=args.data_dir or "random"), rows=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64, V = 2 and 4, few repeats, no compile or probe rows (minutes on a CPU)")
    parser.add_argument("--data-dir", default="", help="image folder with train/<class>/*.png (default: random uint8 images)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the usual pipeline")
    parser.add_argument("--json", default="", help="write every number to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print the table in markdown")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except ssl_min.UserError as e:
        sys.exit(f"throughput: error: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + text_table(result["rows"]))
    if args.markdown:
        print("\n" + markdown_table(result["rows"]))


if __name__ == "__main__":
    main()
