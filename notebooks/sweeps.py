"""The pretraining runs behind notebooks 02 and 03 and the README's main result: their definitions, run-or-load, a
time model for GPU sessions, and the statistics and plots the two notebooks share.

    python notebooks/sweeps.py orthogonality laptop [--data-dir DIR] # claim 1's mechanism on a CPU, under an hour
    python notebooks/sweeps.py halved laptop [--data-dir DIR]        # claim 2's mechanism on a CPU, under an hour
    python notebooks/sweeps.py orthogonality full [--data-dir DIR]   # claim 1: projector width d and beta
    python notebooks/sweeps.py halved full [--data-dir DIR]          # claim 2: views x fraction of the data
    python notebooks/sweeps.py main full [--data-dir DIR]            # the README's command
    python notebooks/sweeps.py queue [--data-dir DIR] --seconds 540  # the most valuable missing full runs that fit
    python notebooks/sweeps.py halved smoke [--data-dir DIR]         # tiny CPU runs that check the code
    python notebooks/sweeps.py table                                 # the README's results table, from the results

Settings. `full` is the paper's setting on all of CIFAR-10 (downloaded by torchvision, or DIR with train/<class>/ and
test/<class>/ holding all 50,000 + 10,000 images); it needs a CUDA GPU. `laptop` runs on a CPU: a ResNet-18 of width
16 (0.7 M weights), 300 seeded images per class of each split, 8 epochs at batch 128; it shows the mechanisms behind
the claims, not the claims as stated. `smoke` runs a few CPU steps on 8 images per class: it only checks the code, its
numbers are never results, and it saves nothing.

Results. Each finished full or laptop run is saved as notebooks/results/<sweep>/<setting>/<run>.json (ssl_min.main's
dict) and is loaded, never rerun. An interrupted run (Ctrl-C, SIGTERM) resumes from its checkpoint in
runs/sweeps/<sweep>/<setting>/<run>/ (git-ignored) when the same command runs again; that folder is deleted once the
results are saved.

Notebooks 02 and 03 take their settings from environment variables. None: show the committed results (full ones if
any exist, else the laptop ones) and run nothing. SSL_MIN_SETTING=laptop or full: run that setting's missing runs
first (full: a CUDA GPU). SSL_MIN_SMOKE=1: the smoke setting; execute the notebook without saving it, or its outputs
replace the committed ones. SSL_MIN_DATA_DIR=DIR: the image folder, as --data-dir.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

INDUCTOR = set(Path(tempfile.gettempdir()).glob("torchinductor_*"))  # before torch's import makes its cache folder
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ssl_min  # noqa: E402
from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: E402  (the files ssl_min's image folders read)

for folder in set(Path(tempfile.gettempdir()).glob("torchinductor_*")) - INDUCTOR:  # empty unless a run compiles
    with suppress(OSError):
        folder.rmdir()

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "sweeps"
FIXED_BETA = 0.0004  # the usual BarlowTwins setting for every d (the paper's "fixed" baseline)
TUNED_WIDE = 0.0008  # the authors' tuned beta at d = 8192 (beta d = 6.6): the wide reference at its best
CIFAR10 = dict(train=50_000, test=10_000)
# Applied to every run of a setting, over the sweep's own options. The laptop sizes were measured to fit an hour per
# sweep on a CPU core (notebooks/results/*/laptop/ record the times); the smoke ones only exercise the code.
LAPTOP = dict(subset=300, width=16, epochs=8, batch_size=128, eval_every=2, probe_views=1, device="cpu")
SMOKE = dict(subset=8, epochs=2, device="cpu", probe_views=2, eval_every=1)
SETTINGS = ("full", "laptop", "smoke")


# ---- The runs -------------------------------------------------------------------------------------------------------
def arms(sweep: str, setting: str) -> tuple:
    """A sweep's arms as ssl_min options: (the headline pair, the controls, the other arms)."""
    if sweep == "orthogonality" and setting == "laptop":  # the collapse contrast, then the shape of Fig. 2
        return ([dict(proj_dim=128, beta=5 / 128), dict(proj_dim=128, beta=FIXED_BETA)], [],
                [dict(proj_dim=d, beta=beta) for d in (32, 512) for beta in (5 / d, FIXED_BETA)]
                + [dict(proj_dim=2048, beta=FIXED_BETA)])  # a wide projector at the usual beta (beta d = 0.8)
    if sweep == "orthogonality":  # claim 1 (Fig. 2): 2 views, batch 512, probe on clean features
        small, wide = (16, 64) if setting == "smoke" else (128, 8192)
        return ([dict(proj_dim=small, beta=5 / small), dict(proj_dim=wide, beta=TUNED_WIDE)],
                [dict(proj_dim=small, beta=FIXED_BETA), dict(proj_dim=wide, beta=FIXED_BETA)],  # failure, under-tuned
                [dict(proj_dim=d, beta=beta) for d in (64, 256, 1024) for beta in (5 / d, FIXED_BETA)])  # Fig. 2
    # claim 2 (Fig. 5): 4 views on 50% against 2 views on 100%; the control 2 views on 50%; then 4 views on 100%,
    # 8 views on 25% and its control, 2 views on 25% (not in the laptop setting)
    data = [dict(views=v, train_fraction=f) for v, f in ((2, 1.0), (4, 0.5), (2, 0.5), (4, 1.0), (8, 0.25), (2, 0.25))]
    return data[:2], data[2:3], data[3:] if setting != "laptop" else []


def schedule(sweep: str, setting: str) -> list:
    """(priority, options) of every run, seed included. The queue runs lower priorities first, so the first results
    already test a claim: 1-4 seeds 0, then 1, of claim 1's headline pair and claim 2's; 5-6 the controls' seeds 0 and
    1; 7 the pairs' third seed; 8 the other arms; 9 the main command (it tests neither claim). Laptop: the controls
    get a third seed; smoke: 1-5 only."""
    if sweep == "main":  # `python ssl_min.py --views 4 --proj-dim 128` with every default
        return [(9, dict(views=4, proj_dim=128, seed=0))]
    head, controls, others = arms(sweep, setting)
    claim = list(COMMON).index(sweep)  # 0 or 1
    smoke = setting == "smoke"
    runs = [(1 + claim + 2 * s if s < 2 else 7, dict(a, seed=s)) for s in range(2 if smoke else 3) for a in head]
    runs += [(5 + s, dict(a, seed=s)) for s in range({"smoke": 1, "laptop": 3}.get(setting, 2)) for a in controls]
    return runs + [(8, dict(a, seed=0)) for a in ([] if smoke else others)]


COMMON = dict(orthogonality=dict(views=2, batch_size=512, eval_every=10),  # shared, beyond ssl_min's defaults
              halved=dict(proj_dim=256, batch_size=128, probe_views=16, eval_every=5), main=dict())
NAMES = {"orthogonality": "d{proj_dim}_beta{rule}_s{seed}", "halved": "v{views}_data{percent}_s{seed}",
         "main": "v{views}_d{proj_dim}_s{seed}"}


def plan(sweep: str, setting: str) -> list:
    """(priority, name, ssl_min.Config) of every run of a sweep in a setting (one of SETTINGS), beta filled in."""
    runs = []
    for priority, options in schedule(sweep, setting):
        cfg = ssl_min.Config(**{**COMMON[sweep], **options})
        cfg = replace(cfg, beta=ssl_min.default_beta(cfg.proj_dim, cfg.loss) if cfg.beta is None else cfg.beta)
        if setting == "laptop":
            cfg = replace(cfg, **LAPTOP)
        if setting == "smoke":
            cfg = replace(cfg, **SMOKE, batch_size=min(cfg.batch_size, 10))
        rule = beta_rule(cfg.proj_dim, cfg.beta).replace("/", "_over_")
        name = NAMES[sweep].format(**asdict(cfg), rule=rule, percent=round(100 * cfg.train_fraction))
        runs.append((priority, name, cfg))
    return runs


def check_full_data(data_dir: str):
    """The full setting is all of CIFAR-10, never a part of it: count the image files of data_dir's splits."""
    if data_dir:
        counts = {s: sum(Path(f).suffix.lower() in IMG_EXTENSIONS for _, _, files in os.walk(Path(data_dir) / s)
                         for f in files) for s in CIFAR10}
        if counts != CIFAR10:
            raise ssl_min.UserError(f"the full setting needs all of CIFAR-10 ({CIFAR10} images); {data_dir} has "
                                    f"{counts}: point --data-dir at a complete copy")


def read_results(path: Path) -> dict | None:
    """A saved result, or None. An empty or unreadable file is said in one line and counts as none."""
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
        if isinstance(results, dict) and {"config", "log", "probe_acc"} <= results.keys():
            return results
        problem = "not a results dict"
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        problem = f"{type(e).__name__}: {e}"
    print(f"sweeps: {path} is empty or unreadable ({problem}); it counts as missing", flush=True)
    return None


def run_one(sweep: str, setting: str, name: str, cfg, data_dir: str, folder: Path) -> dict | None:
    """Run one configuration, or recover its finished run, and save its results as folder/<name>.json. A run folder
    that cannot resume this run is said in one line, and the run is left out (None)."""
    print(f"--- {sweep}/{setting}/{name}", flush=True)
    out = RUNS / sweep / setting / name  # an interrupted run resumes from its checkpoint here
    finished = None if setting == "smoke" else read_results(out / "results.json")  # its results were not copied
    if setting == "smoke":
        with tempfile.TemporaryDirectory(prefix="ssl_min_smoke_") as tmp:
            results = ssl_min.main(replace(cfg, data_dir=data_dir, out_dir=tmp))
    elif finished is not None:
        results = finished
        free = ("data_dir", "device", "compile", "overwrite", "out_dir")  # what does not change the run
        if any(results["config"].get(k) != v for k, v in asdict(cfg).items() if k not in free):
            print(f"sweeps: {out} holds a finished run of another configuration: delete that folder to run {name}")
            return None
        print(f"recovered the finished run in {out}")
    else:
        (out / "results.json").unlink(missing_ok=True)  # an unreadable one (said above): resume and evaluate again
        existed, load = out.exists(), os.getloadavg()[0]
        try:
            results = ssl_min.main(replace(cfg, data_dir=data_dir, out_dir=str(out)))
        except ssl_min.UserError as e:
            if not existed:
                raise
            print(f"sweeps: {sweep}/{name} not run: {str(e).split(';')[0]}; delete {out} to start it afresh")
            return None
        # what else the machine ran: the 1-minute load average before and after, and the threads this run used
        results = dict(results, machine=dict(load=[load, os.getloadavg()[0]], threads=torch.get_num_threads()))
    folder.mkdir(parents=True, exist_ok=True)
    ssl_min.write_atomic(folder / f"{name}.json", results)
    if setting != "smoke":
        shutil.rmtree(out)  # only now: the results are saved, and the 135 MB checkpoint has done its job
    return results


def run_sweep(sweep: str, setting: str, data_dir: str = "", folder: Path | None = None, run_missing=True) -> dict:
    """The results of every run of the sweep, by name: loaded, or (run_missing) run now; missing ones are left out.
    Smoke results go to a temporary folder unless `folder` is given: a smoke run never writes into the repository."""
    if setting == "smoke" and folder is None:
        with tempfile.TemporaryDirectory(prefix="ssl_min_smoke_results_") as tmp:
            return run_sweep(sweep, setting, data_dir, Path(tmp), run_missing)
    folder = folder or RESULTS / sweep / setting
    if setting == "full" and run_missing:
        check_full_data(data_dir)
    results = {}
    for _, name, cfg in sorted(plan(sweep, setting), key=lambda run: run[0]):
        found = read_results(folder / f"{name}.json")
        if found is None and run_missing:
            found = run_one(sweep, setting, name, cfg, data_dir, folder)
        if found is not None:
            results[name] = found
    return results


# ---- Time: an estimate per run, for the queue ------------------------------------------------------------------------
class TimeModel(NamedTuple):
    """Seconds per optimizer step and per augmented view (forward and backward) on one GPU. The defaults fit the H200
    benchmark of an earlier version (benchmarks/results/throughput-h200-2026-11-26.json: batch 512, 2 to 8 views,
    eager); by them a step at batch 128 is mostly its fixed cost. `note` says whether runs have calibrated them."""
    step_s: float = 3.0e-3
    view_s: float = 13.5e-6
    overhead_scale: float = 1.0  # measured over estimated non-training time (start-up, evaluation)
    note: str = "uncalibrated estimate (no committed full results of this device)"


START_S = 60  # data loading, CUDA start-up and compilation (18 s on the H200): a guess
PROBE_S = 30  # the linear probe's 200 epochs: the earlier probe took 27.5 s on the H200; the current one is unmeasured


def width_cost(d: int) -> float:  # per view, against a small projector: about 1.7x at d = 8192, with the d x d terms
    return 1 + 0.7 * (d / 8192) ** 2


def overhead(cfg, model: TimeModel) -> float:
    """Start-up and evaluation: the kNN epochs and the final evaluation each extract clean features of all 60,000
    images (a forward pass, about a third of a training view), the probe probe_views more, then the probe itself."""
    evals = (cfg.epochs - 1) // cfg.eval_every if cfg.eval_every else 0
    passes = evals + 1 + (cfg.probe_views if cfg.probe_views > 1 else 0)
    return model.overhead_scale * (START_S + passes * sum(CIFAR10.values()) * model.view_s / 3 + PROBE_S)


def estimate(cfg, model: TimeModel = TimeModel()) -> float:
    """Estimated seconds of a full-setting run: its optimizer steps, their views, its overhead."""
    steps = round(CIFAR10["train"] * cfg.train_fraction) // cfg.batch_size * cfg.epochs
    per_step = model.step_s + model.view_s * width_cost(cfg.proj_dim) * cfg.batch_size * cfg.views
    return steps * per_step + overhead(cfg, model)


def calibrate(device: str) -> TimeModel:
    """The time model fitted to the committed full results from `device`: each run's median epoch time per step
    against its views per step (least squares), and its measured non-training time against the estimate."""
    rows = []
    for r in [r for r in map(read_results, sorted(RESULTS.glob("*/full/*.json"))) if r and r["device"] == device]:
        c = SimpleNamespace(**r["config"])
        epoch_s, steps = np.median([e["time_s"] for e in r["log"]]), r["data"]["pretrain"] // c.batch_size
        views = c.batch_size * c.views * width_cost(c.proj_dim)
        rows.append((views, epoch_s / steps, r["wall_time_s"] - epoch_s * c.epochs, c))
    if len({round(x) for x, *_ in rows}) < 2:
        return TimeModel()
    (step_s, view_s), *_ = np.linalg.lstsq(np.array([[1, x] for x, *_ in rows]), [y for _, y, *_ in rows], rcond=None)
    fitted = TimeModel(float(step_s), float(view_s), note="")
    scale = float(np.median([rest / overhead(c, fitted) for _, _, rest, c in rows]))
    return fitted._replace(overhead_scale=scale, note=f"estimate calibrated on {len(rows)} runs from {device}")


def queue(data_dir: str, seconds: float):
    """Run the missing full-setting runs of all sweeps in priority order, each only if its estimate fits the time
    left of `seconds`; one that does not is skipped for the next that does."""
    check_full_data(data_dir)
    deadline = time.monotonic() + seconds
    model = calibrate(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    print(f"--- time per run: {model.note}", flush=True)
    todo = [(p, sweep, name, cfg) for sweep in COMMON for p, name, cfg in plan(sweep, "full")
            if read_results(RESULTS / sweep / "full" / f"{name}.json") is None]
    for _, sweep, name, cfg in sorted(todo, key=lambda run: run[0]):
        need, left = estimate(cfg, model), deadline - time.monotonic()
        if need > left:
            print(f"--- skip {sweep}/{name}: it needs about {need:.0f} s, {left:.0f} s are left", flush=True)
            continue
        run_one(sweep, "full", name, cfg, data_dir, RESULTS / sweep / "full")


# ---- Statistics: the verdict on a difference between two arms --------------------------------------------------------
# The equivalence margin, declared before any full result: 1 point of accuracy. It is about twice the seed-to-seed
# spread expected of a CIFAR-10 linear probe (a few tenths of a point), so a few seeds can resolve it, and several times
# smaller than the gaps the claims are about (beta = 5/d against 0.0004 at small d: 5.6 to 8.8 points in a GPU pilot
# of an earlier version).
MARGIN = 0.01


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom and t >= 0: Simpson's rule on the density."""
    x = np.linspace(0, t, 2001)
    density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (
        1 + x * x / df) ** (-(df + 1) / 2)
    return 0.5 + t / 6000 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())


@lru_cache(maxsize=None)
def t_quantile(p: float, df: float) -> float:
    """The p quantile (p >= 0.5) of Student's t: bisection of t_cdf."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


class Decision(NamedTuple):
    word: str  # "matches within the margin" (+ "; the difference is nonzero"), "better", "worse", "inconclusive",
    # or "no interval" (an arm has fewer than 2 seeds)
    difference: float  # mean(x) - mean(y)
    ci90: tuple | None  # the 90% interval of the difference: inside (-margin, margin) means "matches" (TOST at 5%)
    ci95: tuple | None  # the 95% interval: excluding 0 means "better" or "worse"
    seeds: int | None  # inconclusive: the seeds per arm (up to 100) that would settle it if difference and spread held


def settle(difference: float, half90: float, half95: float, margin: float | None) -> str:
    apart = abs(difference) > half95  # the 95% interval excludes 0
    if margin is not None and abs(difference) + half90 < margin:  # the 90% interval lies inside (-margin, margin)
        return "matches within the margin" + "; the difference is nonzero" * apart
    return ("better" if difference > 0 else "worse") if apart else "inconclusive"


def decide(x, y, margin: float | None = MARGIN) -> Decision:
    """Two arms' seeds: the intervals of the difference of means (pooled standard deviation, Student's t) and the
    verdict. Without a margin there is no "matches"."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    difference = float(x.mean() - y.mean())
    if min(len(x), len(y)) < 2:
        return Decision("no interval", difference, None, None, None)
    df = len(x) + len(y) - 2
    sd = math.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / df)
    half = [t_quantile(p, df) * sd * math.sqrt(1 / len(x) + 1 / len(y)) for p in (0.95, 0.975)]
    word = settle(difference, *half, margin)
    seeds = None
    if word == "inconclusive":  # the first n seeds per arm at which the observed difference and spread would settle
        seeds = next((n for n in range(max(len(x), len(y)) + 1, 101) if settle(
            difference, *(t_quantile(p, 2 * n - 2) * sd * math.sqrt(2 / n) for p in (0.95, 0.975)), margin)
            != "inconclusive"), None)
    return Decision(word, difference, *((difference - h, difference + h) for h in half), seeds)


def word_of(d: Decision, percent: bool) -> str:
    """The verdict's word: for a measure that is not an accuracy, higher or lower rather than better or worse."""
    return d.word if percent else d.word.replace("better", "higher").replace("worse", "lower")


def verdict(x, y, percent: bool = True, margin: float | None = MARGIN) -> str:
    """The difference of two arms' seeds, its intervals, and the verdict, in words."""
    d, scale, unit = decide(x, y, margin), (100 if percent else 1), (" points" if percent else "")
    text = f"difference {scale * d.difference:+.2f}{unit}"
    if d.ci90 is None:
        return text + ", no interval: an arm has fewer than 2 seeds"
    text += ", ".join(["", *(f"{level} interval [{scale * lo:+.2f}, {scale * hi:+.2f}]"
                             for level, (lo, hi) in (("90%", d.ci90), ("95%", d.ci95)))])
    word = word_of(d, percent)
    if margin is not None:
        word = word.replace("the margin", f"the margin (±{scale * margin:.2f}{unit})")
    if d.word == "inconclusive":
        word += (f": about {d.seeds} seeds per arm would settle it if the difference and spread held" if d.seeds else
                 ": more than 100 seeds per arm would be needed if the difference and spread held")
    return f"{text}: {word}"


# ---- For the notebooks ----------------------------------------------------------------------------------------------
# Runs are grouped by their configuration, never by their file names: a name could lie about its config.
class Arm(NamedTuple):
    """A configuration without its seed: the runs of one arm differ only in their seed."""
    proj_dim: int
    beta: str  # "5/d", or beta itself ("0.0004", "0.0008")
    views: int
    fraction: float  # train_fraction: the share of the training images pretrained on


def beta_rule(d: int, beta: float) -> str:
    return "5/d" if math.isclose(beta * d, 5) else f"{beta:g}"


def arm_of(config: dict) -> Arm:
    return Arm(config["proj_dim"], beta_rule(config["proj_dim"], config["beta"]), config["views"],
               config["train_fraction"])


def by_arm(results: dict) -> dict:
    """Runs grouped by arm, each arm's runs in seed order; arms sorted (by d, beta, views, fraction)."""
    grouped = {}
    for r in sorted(results.values(), key=lambda r: r["config"]["seed"]):
        grouped.setdefault(arm_of(r["config"]), []).append(r)
    return dict(sorted(grouped.items()))


def planned_arms(sweep: str, setting: str) -> dict:
    """Arm -> number of seeds the plan gives it, in priority order."""
    planned = {}
    for _, _, cfg in sorted(plan(sweep, setting), key=lambda run: run[0]):
        arm = arm_of(asdict(cfg))
        planned[arm] = planned.get(arm, 0) + 1
    return planned


def headline(sweep: str, setting: str) -> list:
    """The two arms of the sweep's headline pair (claim 1: small, wide, or on a laptop small at 5/d and at 0.0004;
    claim 2: 2 views on 100%, 4 on 50%)."""
    return list(planned_arms(sweep, setting))[:2]


def final(r: dict, key: str) -> float:
    """A metric after the last epoch."""
    return r[key]


def average(runs: list, key: str) -> float:
    """An arm's mean over seeds of a metric after the last epoch."""
    return float(np.mean([final(r, key) for r in runs]))


def is_percent(key: str) -> bool:
    return key.endswith("_acc")


def show(values, key: str) -> str:
    """An arm's values: the mean, and the seeds when there are several."""
    v, unit = (100 * np.asarray(values), "%") if is_percent(key) else (np.asarray(values), "")
    seeds_text = "1 seed" if len(v) == 1 else f"seeds {', '.join(f'{x:.2f}' for x in v)}"
    return f"{v.mean():.2f}{unit} ({seeds_text})"


def compare(a: list, b: list, key: str = "probe_acc", names=("A", "B")) -> str:
    """'A vs B' for two arms' runs: each arm's mean and seeds, the difference with its intervals, and the verdict (the
    margin applies to accuracies only)."""
    if not a or not b:
        absent = [name for name, runs in zip(names, (a, b)) if not runs]
        return (f"{names[0]} vs {names[1]}: {' and '.join(absent)} {'has' if len(absent) == 1 else 'have'} no runs in "
                f"these results, so there is nothing to compare")
    x, y = ([final(r, key) for r in runs] for runs in (a, b))
    return (f"{names[0]} {show(x, key)} vs {names[1]} {show(y, key)}: "
            + verdict(x, y, is_percent(key), MARGIN if is_percent(key) else None))


X_AXES = {"epoch": "epoch", "time": "cumulative pretraining time (s)", "views": "augmented views seen (millions)",
          "steps": "optimizer steps (thousands)"}


def series(r: dict, key: str, x: str = "epoch", warm_start: bool = False):
    """(epochs, x, values) at the log entries that hold `key`, x one of X_AXES. With warm_start the first epoch's time
    counts at the median epoch time: it alone pays one-off costs (CUDA start-up, cuDNN autotuning, compilation)."""
    seconds = np.array([e["time_s"] for e in r["log"]])
    if warm_start and len(seconds) > 1:
        seconds[0] = min(seconds[0], np.median(seconds[1:]))
    views = np.array([e["views_per_s"] * e["time_s"] for e in r["log"]])  # views_per_s = steps * batch * V / time_s
    per_epoch = dict(epoch=np.ones(len(seconds)), time=seconds, views=views / 1e6,
                     steps=views / (r["config"]["batch_size"] * r["config"]["views"]) / 1e3)[x]
    rows = [(e["epoch"], t, e[key]) for e, t in zip(r["log"], np.cumsum(per_epoch)) if key in e]
    return tuple(np.array(column) for column in zip(*rows)) if rows else (np.array([]),) * 3


def mean_curve(runs: list, key: str, x: str = "epoch", warm_start: bool = False):
    """An arm's (epochs, mean x over seeds, values [seeds, epochs]) over the epochs all its seeds logged."""
    parts = [series(r, key, x, warm_start) for r in runs]
    n = min(len(p[0]) for p in parts)
    return parts[0][0][:n], np.mean([p[1][:n] for p in parts], 0), np.array([p[2][:n] for p in parts])


def plot_seeds(ax, arms_runs: dict, key: str, labels: dict, colors: dict):
    """One dot per seed and a bar at the mean for each arm (an arm without runs says so)."""
    scale, legend = (100 if is_percent(key) else 1), True  # the legend names the first arm's marks only
    for i, (arm, runs) in enumerate(arms_runs.items()):
        values = [scale * final(r, key) for r in runs]
        if not values:
            ax.text(i, 0.5, "no runs", transform=ax.get_xaxis_transform(), ha="center", color="gray")
            continue
        ax.plot([i - 0.25, i + 0.25], [np.mean(values)] * 2, "-", color=colors[arm], lw=2,
                label="mean over seeds" if legend else None)
        ax.plot([i] * len(values), values, "o", color=colors[arm], mec="k", ms=6, label="one seed" if legend else None)
        legend = False
    ticks = [f"{labels[arm]}, {seeds(len(runs))}".replace(", ", "\n") for arm, runs in arms_runs.items()]
    ax.set_xticks(range(len(arms_runs)), ticks, fontsize=9)
    ax.set_xlim(-0.6, len(arms_runs) - 0.4)
    ax.legend(fontsize=9)


def plot_curves(ax, arms_runs: dict, key: str, labels: dict, colors: dict, x: str = "epoch", warm_start=False):
    """Each arm's mean over seeds against x (one of X_AXES), with the band between its lowest and highest seed."""
    scale = 100 if is_percent(key) else 1
    for arm, runs in arms_runs.items():
        if not runs:
            continue  # plot_seeds names the arms without runs
        _, xs, values = mean_curve(runs, key, x, warm_start)
        ax.plot(xs, scale * values.mean(0), "o-", ms=3, color=colors[arm], label=f"{labels[arm]} ({seeds(len(runs))})")
        if len(runs) > 1:
            ax.fill_between(xs, scale * values.min(0), scale * values.max(0), color=colors[arm], alpha=0.2, lw=0)
    ax.set_xlabel(X_AXES[x])
    if x == "epoch":
        from matplotlib.ticker import MaxNLocator  # here: the command line runs without matplotlib
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.legend(fontsize=9)


def seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def shown(sweep: str) -> tuple:
    """The committed results a notebook shows by default: the full setting's if it has any, else the laptop's."""
    for setting in ("full", "laptop"):
        results = run_sweep(sweep, setting, run_missing=False)
        if results:
            return setting, results
    return "laptop", {}


def setup(sweep: str):
    """The notebooks' one setup call; the settings are environment variables (this file's docstring). Returns (results
    by run name, the setting shown, a title for the figures that names the setting)."""
    data_dir, chosen = os.environ.get("SSL_MIN_DATA_DIR", ""), os.environ.get("SSL_MIN_SETTING")
    try:
        if os.environ.get("SSL_MIN_SMOKE") == "1":
            print("SMOKE RUNS: a few CPU steps on 80 images that only check the code; no number below is a finding.")
            setting, results = "smoke", run_sweep(sweep, "smoke", data_dir)
        elif chosen in ("full", "laptop"):
            if chosen == "full" and not torch.cuda.is_available():
                raise ssl_min.UserError("SSL_MIN_SETTING=full runs 100-epoch pretraining: it needs a CUDA GPU")
            setting, results = chosen, run_sweep(sweep, chosen, data_dir)
        else:
            setting, results = shown(sweep)
    except ssl_min.UserError as e:  # ssl_min's messages name its command line; here the folder is a variable
        raise ssl_min.UserError(str(e).replace("--data-dir", "SSL_MIN_DATA_DIR")) from None
    print(describe(sweep, setting, results))
    return results, setting, title(setting, results)


def title(setting: str, results: dict) -> str:
    """The setting of a figure, for its title: a figure copied out of the notebook keeps it."""
    def values(found):
        return "/".join(f"{v:,}" if isinstance(v, int) else str(v) for v in sorted(found)) or "none"

    head = "SMOKE RUN (checks the code, NOT a result)" if setting == "smoke" else f"{setting} setting"
    width = values({r["config"].get("width", 64) for r in results.values()})
    counts = {len(runs) for runs in by_arm(results).values()}
    return (f"{head}: ResNet-18 of width {width}, {values({r['epochs'] for r in results.values()})} epochs, "
            f"{values({r['data']['train'] for r in results.values()})} labelled training images, {values(counts)} "
            f"seed{'s' * (counts != {1})} per arm, {values({r['device'] for r in results.values()})}")


SCOPE = dict(  # what the laptop setting can show, and what it cannot (describe's last lines compute why not)
    orthogonality="It can show the mechanism behind claim 1: whether a 128-d projector at the usual beta = 0.0004 "
                  "collapses (a low effective rank, a lower accuracy) where beta = 5/d does not, with 3 seeds each, "
                  "and the shape of Fig. 2 at this scale. It cannot test claim 1 as stated (d = 128 at 5/d matching "
                  "d = 8192 after 100 epochs on all of CIFAR-10): it has no 8192-d projector.",
    halved="It can show the mechanism behind claim 2: whether 4 views per image learn more per epoch than 2 views "
           "from the same images (both on 50%), and how 4 views on 50% compare with 2 views on 100% early in "
           "training, with 3 seeds each. It cannot test claim 2 as stated (a match after 100 epochs on all of "
           "CIFAR-10).")


def describe(sweep: str, setting: str, results: dict) -> str:
    """What produced the results, read from the results themselves; which planned runs they lack; and how their
    setting departs from the full plan's: why they cannot test the claim."""
    lines = [f"{sweep} sweep, {setting} setting: {len(results)} runs with results"]
    lines += {"smoke": ["SMOKE: every number and plot below only checks that the code runs"]}.get(setting, [])
    if setting == "laptop" and sweep in SCOPE:
        lines.append(SCOPE[sweep])
    missing = [cfg for _, name, cfg in plan(sweep, setting) if name not in results] if setting != "smoke" else []
    if missing and setting == "full":
        model = calibrate("NVIDIA H200")
        lines.append(f"{len(missing)} planned runs missing, about {sum(estimate(c, model) for c in missing) / 60:.0f} "
                     f"min on one H200 ({model.note}): python notebooks/sweeps.py {sweep} full, or queue")
    elif missing:
        lines.append(f"{len(missing)} planned runs missing: python notebooks/sweeps.py {sweep} {setting}")
    counts, planned = {arm: len(runs) for arm, runs in by_arm(results).items()}, planned_arms(sweep, setting)
    short = [f"{arm_text(arm)}: {counts.get(arm, 0)} of {n}" for arm, n in planned.items() if counts.get(arm, 0) < n]
    if short:
        lines.append(f"arms of the {setting} plan short of seeds: {'; '.join(short)}")
    extra = [arm_text(arm) for arm in counts if arm not in planned]
    if extra:
        lines.append("arms not in the plan: " + "; ".join(extra))

    def values(key, runs=results.values()):
        return "/".join(sorted({str(key(r)) for r in runs}, key=lambda v: (len(v), v))) or "-"

    def images(split):  # as 3,000 or 1,500/3,000
        return values(lambda r: f"{r['data'][split]:,}")

    lines.append(f"device {values(lambda r: r['device'])}; torch {values(lambda r: r['versions']['torch'])}; commit "
                 f"{values(lambda r: (r.get('commit') or 'not recorded')[:12])}; pretraining images "
                 f"{images('pretrain')}; labelled {images('train')} + {images('test')} test")
    keys = dict(width="backbone width", epochs="epochs", batch_size="batch", probe_views="probe views",
                eval_every="kNN every", seed="seeds")
    full = [dict(config=asdict(cfg)) for _, _, cfg in plan(sweep, "full")]
    shown_, want = ({what: values(lambda r: r["config"].get(key, 64), runs) for key, what in keys.items()}
                    for runs in (results.values(), full))
    settings = "; ".join(f"{what} {v}" for what, v in shown_.items())
    lines.append(settings.replace("kNN every 0;", "kNN after the last epoch only;"))
    departs = [f"{what} {v}, not {want[what]}" for what, v in shown_.items() if what != "seeds" and v != want[what]]
    departs += [f"{images('train')} labelled training images, not {CIFAR10['train']:,}"] * (
        images("train") != f"{CIFAR10['train']:,}")
    if setting == "smoke":
        departs = ["smoke runs only check the code"]
    departs += [f"{len(short)} planned arms short of seeds"] * bool(short)
    departs += ["runs from several devices: their times are not comparable"] * ("/" in values(lambda r: r["device"]))
    lines.append("These results cannot test the claim as stated: " + "; ".join(departs) if departs else
                 "These results are in the full plan's setting, with every planned seed.")
    return "\n".join(lines)


def difference(a: list, b: list, key: str = "probe_acc") -> str:
    """Two arms' runs in a few words: the means, the difference with its 90% interval, and the verdict."""
    if not a or not b:
        return "not measured yet"
    x, y = ([final(r, key) for r in runs] for runs in (a, b))
    d, scale = decide(x, y, MARGIN if is_percent(key) else None), (100 if is_percent(key) else 1)
    unit, points = ("%", " points") if is_percent(key) else ("", "")
    count = f"{seeds(len(x))} each" if len(x) == len(y) else f"{len(x)} and {len(y)} seeds"
    text = (f"{scale * np.mean(x):.1f}{unit} vs {scale * np.mean(y):.1f}{unit} ({count}), "
            f"{scale * d.difference:+.1f}{points}")
    if d.ci90 is None:
        return text + ", no interval"
    return text + f", 90% interval [{scale * d.ci90[0]:+.1f}, {scale * d.ci90[1]:+.1f}]: {word_of(d, is_percent(key))}"


def table() -> str:
    """The README's results table, computed from the committed results (`python notebooks/sweeps.py table`)."""
    full, laptop = ({sweep: by_arm(run_sweep(sweep, setting, run_missing=False)) for sweep in COMMON}
                    for setting in ("full", "laptop"))
    main_runs = next(iter(full["main"].values()), [])
    probe = (f"{average(main_runs, 'probe_acc'):.2%}, {average(main_runs, 'knn_acc'):.2%}" if main_runs else
             "not measured yet")
    small, wide = headline("orthogonality", "full")
    two, four = headline("halved", "full")
    rows = [("`python ssl_min.py --views 4 --proj-dim 128`: linear probe, kNN", probe),
            ("claim 1: d = 128 at beta = 5/d minus d = 8192 at 0.0008, linear probe",
             difference(full["orthogonality"].get(small, []), full["orthogonality"].get(wide, []))),
            ("claim 2: 4 views on 50% of the data minus 2 views on 100%, linear probe",
             difference(full["halved"].get(four, []), full["halved"].get(two, [])))]
    strong, weak = headline("orthogonality", "laptop")
    rows += [(f"laptop, collapse: d = 128 at beta = 5/d minus 0.0004, {name}",
              difference(laptop["orthogonality"].get(strong, []), laptop["orthogonality"].get(weak, []), key))
             for key, name in (("probe_acc", "linear probe"), ("erank", "effective rank"))]
    rows += [(f"laptop, views: 4 views on 50% minus {other}, linear probe",
              difference(laptop["halved"].get(four, []), laptop["halved"].get(arm, [])))
             for other, arm in (("2 views on 100%", two), ("2 views on 50% (the same images)", four._replace(views=2)))]
    return "\n".join(["| what | result |", "| --- | --- |", *(f"| {what} | {result} |" for what, result in rows)])


def run_minutes(results: dict) -> str:
    """How long one run of these results took, for the notebooks' exercises."""
    minutes = [r["wall_time_s"] / 60 for r in results.values()]
    devices = "/".join(sorted({r["device"] for r in results.values()}))
    return (f"One run of these results took {np.median(minutes):.1f} min (median; {min(minutes):.1f} to "
            f"{max(minutes):.1f}) on {devices}." if minutes else "No runs in these results.")


def arm_text(arm: Arm) -> str:
    return f"d = {arm.proj_dim}, beta = {arm.beta}, {arm.views} views, {arm.fraction:.0%} of the data"


def seconds_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite positive number of seconds, got {text!r}")
    return value


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.error = lambda message: parser.exit(2, f"sweeps: error: {message} (see --help)\n")  # one line, no usage
    parser.add_argument("sweep", choices=[*COMMON, "queue", "table"])
    parser.add_argument("setting", nargs="?", choices=SETTINGS, help="default: full")
    parser.add_argument("--data-dir", default="", help="image folder (train/<class>/, test/<class>/); default download")
    parser.add_argument("--seconds", type=seconds_type, default=540, help="queue: the time budget (default: 540)")
    args = parser.parse_args(argv)
    if args.sweep == "queue" and args.setting not in (None, "full"):
        parser.error(f"queue runs the full setting only; for {args.setting} runs name a sweep: sweeps.py halved "
                     f"{args.setting}")
    if args.sweep == "main" and args.setting == "laptop":
        parser.error("the main command has no laptop setting; the laptop sweeps are orthogonality and halved")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop, as Ctrl-C
    try:
        if args.sweep == "queue":
            queue(args.data_dir, args.seconds)
        elif args.sweep == "table":
            print(table())
        else:
            run_sweep(args.sweep, args.setting or "full", args.data_dir)
    except ssl_min.UserError as e:
        sys.exit(f"sweeps: {e}")
    except KeyboardInterrupt as e:
        print(f"sweeps: {str(e) or 'interrupted'}; finished runs are saved in {RESULTS}", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    cli()
