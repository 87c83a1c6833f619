"""The pretraining runs behind notebooks 02 and 03 and the README's main result: their definitions, and run-or-load.

Each run's results (ssl_min.main's dict: accuracies, per-epoch log, data sizes, device, commit, versions, config) are
saved as one JSON file in notebooks/results/<sweep>/<setting>/ as soon as the run finishes; a run whose file exists
is loaded, not rerun. A run interrupted midway resumes from its checkpoint in runs/sweeps/ (git-ignored).

    python notebooks/sweeps.py orthogonality full [--data-dir DIR]   # claim 1: projector width d and beta
    python notebooks/sweeps.py halved full [--data-dir DIR]          # claim 2: views x fraction of the data
    python notebooks/sweeps.py main full [--data-dir DIR]            # the README's command
    python notebooks/sweeps.py queue --data-dir DIR --seconds 540    # the most valuable missing runs that fit

Settings: `full` is the paper's setting on all of CIFAR-10 (downloaded by torchvision, or DIR with its 50,000 + 10,000
images); `smoke` is a tiny CPU run on 8 images per class that checks the code and is never a result (SSL_MIN_SMOKE=1
in the notebooks; its files go to a temporary folder). `pilot` holds results of an earlier version, read-only.
"""
import argparse
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ssl_min  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "sweeps"
FIXED_BETA = 0.0004  # the usual BarlowTwins setting for every d (the paper's "fixed" baseline)
CIFAR10 = dict(train=50_000, test=10_000)
SMOKE = dict(subset=8, epochs=2, device="cpu", probe_views=2, eval_every=1)  # applied to every run of a smoke sweep
PILOT = ("Results of an earlier version of ssl_min (NVIDIA H200, 26 Nov 2026), kept for reference: a 16,000-image "
         "CIFAR-10 subset made of the first 1,600 training files per class in sorted file order (not a random "
         "sample) and 5,000 test images, batch 512, one seed, 5 epochs (orthogonality) or 10 epochs (halved), "
         "linear probe on clean features. Not the paper's setting; no wide projector.")


def orthogonality(smoke: bool = False):
    """Claim 1 (the paper's Table 1 / Fig. 2): 2 views, batch 512, 100 epochs, the probe on clean features. Small
    projectors at beta = 5/d against the wide 8192-d projector at the usual small beta, and the small ones at that
    small beta (the failure mode). Yields (priority, name, config); lower priority numbers run first."""
    dims, wide = ((16, 32), 128) if smoke else ((64, 128, 256), 8192)
    for seed in (0, 1):
        yield 2 + 3 * seed, f"d{dims[-2]}_5_over_d_s{seed}", dict(proj_dim=dims[-2], beta=5 / dims[-2], seed=seed)
        yield 2 + 3 * seed, f"d{wide}_fixed_s{seed}", dict(proj_dim=wide, beta=FIXED_BETA, seed=seed)
    for d in dims:
        if d != dims[-2]:
            yield 4, f"d{d}_5_over_d_s0", dict(proj_dim=d, beta=5 / d, seed=0)
        yield 4, f"d{d}_fixed_s0", dict(proj_dim=d, beta=FIXED_BETA, seed=0)


def halved(smoke: bool = False):
    """Claim 2 (the paper's Fig. 5): does 4 views on 50% of the data match 2 views on 100%? As the paper's multi-view
    runs: d = 256, batch 128, 100 epochs, probe features averaged over 16 views, kNN every 5 epochs."""
    for seed in (0, 1):
        for views, fraction in ((2, 1.0), (4, 0.5)):
            yield 3 + 2 * seed, f"v{views}_data{round(100 * fraction)}_s{seed}", dict(views=views, train_fraction=fraction, seed=seed)
    for views, fraction in ((2, 0.5), (8, 0.25)):
        yield 4, f"v{views}_data{round(100 * fraction)}_s0", dict(views=views, train_fraction=fraction, seed=0)


def main_run(smoke: bool = False):
    """The README's command, `python ssl_min.py --views 4 --proj-dim 128`, with every default."""
    yield 1, "v4_d128_s0", dict(views=4, proj_dim=128)


SWEEPS = {"main": main_run, "orthogonality": orthogonality, "halved": halved}
COMMON = {  # what every run of a sweep shares, beyond ssl_min's defaults
    "main": dict(),
    "orthogonality": dict(views=2, batch_size=512, eval_every=10),
    "halved": dict(proj_dim=256, batch_size=128, probe_views=16, eval_every=5),
}


def plan(sweep: str, setting: str) -> list:
    """(priority, name, ssl_min.Config) of every run of a sweep in a setting."""
    runs = []
    for priority, name, options in SWEEPS[sweep](smoke=setting == "smoke"):
        cfg = ssl_min.Config(**{**COMMON[sweep], **options})
        if setting == "smoke":
            cfg = replace(cfg, **SMOKE, batch_size=min(cfg.batch_size, 10))
        runs.append((priority, name, cfg))
    return runs


def check_full_data(data_dir: str):
    """The full setting is all of CIFAR-10: never a part of it saved beside the rest."""
    if data_dir:
        counts = {s: sum(len(files) for _, _, files in os.walk(Path(data_dir) / s)) for s in CIFAR10}
        if counts != CIFAR10:
            raise ssl_min.UserError(f"the full setting needs all of CIFAR-10 ({CIFAR10}); {data_dir} has {counts}")


def run_one(sweep: str, setting: str, name: str, cfg, data_dir: str, folder: Path) -> dict:
    """Run one configuration and save its results in folder/<name>.json; smoke runs leave no files behind."""
    print(f"--- {sweep}/{setting}/{name}", flush=True)
    if setting == "smoke":
        with tempfile.TemporaryDirectory(prefix="ssl_min_smoke_") as tmp:
            results = ssl_min.main(replace(cfg, data_dir=data_dir, out_dir=tmp))
    else:
        out = RUNS / sweep / name  # an interrupted run resumes from its checkpoint here
        results = ssl_min.main(replace(cfg, data_dir=data_dir, out_dir=str(out)))
        shutil.rmtree(out)  # the results are saved below: the 135 MB checkpoint has done its job
    folder.mkdir(parents=True, exist_ok=True)
    ssl_min.save_json(folder / f"{name}.json", results)
    return results


def run_sweep(sweep: str, setting: str, data_dir: str = "", folder: Path | None = None, run_missing: bool = True) -> dict:
    """The results of every run of the sweep, by name: loaded, or (run_missing) run now; missing ones are left out."""
    folder = folder or RESULTS / sweep / setting
    if setting == "full" and run_missing:
        check_full_data(data_dir)
    results = {}
    for _, name, cfg in sorted(plan(sweep, setting), key=lambda run: run[0]):
        path = folder / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
        elif run_missing:
            results[name] = run_one(sweep, setting, name, cfg, data_dir, folder)
    return results


def queue(data_dir: str, seconds: float, rate: float = 40_000):
    """Run the missing full-setting runs of all sweeps, most valuable first, while each still fits in `seconds`
    (estimated at `rate` augmented views per second plus a minute for data and evaluation)."""
    check_full_data(data_dir)
    start, todo = time.time(), []
    for sweep in SWEEPS:
        todo += [(p, sweep, name, cfg) for p, name, cfg in plan(sweep, "full")
                 if not (RESULTS / sweep / "full" / f"{name}.json").exists()]
    for _, sweep, name, cfg in sorted(todo, key=lambda run: run[0]):
        views = cfg.epochs * cfg.views * round(CIFAR10["train"] * cfg.train_fraction)
        estimate = views / rate + 60
        if time.time() - start + estimate > seconds:
            print(f"--- stop: {sweep}/{name} needs about {estimate:.0f} s, {seconds - (time.time() - start):.0f} s are left")
            return
        run_one(sweep, "full", name, cfg, data_dir, RESULTS / sweep / "full")


# ---- For the notebooks -----------------------------------------------------------------------------------------------
# Runs are grouped by their configuration, never by their file names: the pilot's names (d128_5_over_d, views4_data50)
# differ from the full setting's (d128_5_over_d_s0, v4_data50_s0), and a name could lie about its config.
class Arm(NamedTuple):
    """A configuration without its seed: the runs of one arm differ only in their seed."""
    proj_dim: int
    beta: str  # "5/d" when beta * d is a whole number, else beta itself ("0.0004": FIXED_BETA)
    views: int
    fraction: float  # train_fraction: the share of the training images pretrained on


def arm_of(config: dict) -> Arm:
    d, beta = config["proj_dim"], config["beta"]
    if beta is None:  # a planned config, before ssl_min fills in its default beta
        beta = ssl_min.default_beta(d, config["loss"])
    whole = beta != FIXED_BETA and math.isclose(beta * d, round(beta * d))
    return Arm(d, f"{round(beta * d)}/d" if whole else f"{beta:g}", config["views"], config["train_fraction"])


def by_arm(results: dict) -> dict:
    """Runs grouped by arm, each arm's runs in seed order; arms sorted (by d, beta, views, fraction)."""
    arms = {}
    for r in sorted(results.values(), key=lambda r: r["config"]["seed"]):
        arms.setdefault(arm_of(r["config"]), []).append(r)
    return dict(sorted(arms.items()))


def planned_arms(sweep: str, setting: str) -> dict:
    """Arm -> number of seeds the plan gives it, in the plan's order (the pilot is measured against the full plan)."""
    arms = {}
    for _, _, cfg in plan(sweep, "smoke" if setting == "smoke" else "full"):
        arm = arm_of(asdict(cfg))
        arms[arm] = arms.get(arm, 0) + 1
    return arms


def headline(sweep: str, setting: str) -> list:
    """The arms the plan runs with several seeds: the comparison the sweep is about, in the plan's order."""
    return [arm for arm, n in planned_arms(sweep, setting).items() if n > 1]


def final(r: dict, key: str) -> float:
    """A metric after the last epoch: in the results, or (the pilot's effective rank) in the last log entry."""
    return r[key] if key in r else r["log"][-1][key]


def average(runs: list, key: str) -> float:
    """An arm's mean over seeds of a metric after the last epoch."""
    return float(np.mean([final(r, key) for r in runs]))


def series(r: dict, key: str, warm_start: bool = False):
    """(epochs, cumulative pretraining seconds, values) at the log entries that hold `key`. With warm_start the first
    epoch counts at the median epoch time: it alone pays one-off costs (CUDA start-up, cuDNN autotuning, compilation)."""
    seconds = np.array([e["time_s"] for e in r["log"]])
    if warm_start and len(seconds) > 1:
        seconds[0] = min(seconds[0], np.median(seconds[1:]))
    rows = [(e["epoch"], t, e[key]) for e, t in zip(r["log"], np.cumsum(seconds)) if key in e]
    return tuple(np.array(column) for column in zip(*rows)) if rows else (np.array([]),) * 3


def mean_curve(runs: list, key: str, warm_start: bool = False):
    """An arm's (epochs, mean cumulative seconds, values [seeds, epochs]) over the epochs all its seeds logged."""
    parts = [series(r, key, warm_start) for r in runs]
    n = min(len(p[0]) for p in parts)
    return parts[0][0][:n], np.mean([p[1][:n] for p in parts], 0), np.array([p[2][:n] for p in parts])


def is_percent(key: str) -> bool:
    return key.endswith("_acc")


def show(values, key: str) -> str:
    """An arm's values: the mean, and the seeds with their spread (max - min) when there are several."""
    v = 100 * np.asarray(values) if is_percent(key) else np.asarray(values)
    unit = "%" if is_percent(key) else ""
    if len(v) == 1:
        return f"{v[0]:.2f}{unit} (1 seed)"
    return f"{v.mean():.2f}{unit} (seeds {', '.join(f'{x:.2f}' for x in v)}; spread {np.ptp(v):.2f})"


def compare(a: list, b: list, key: str = "probe_acc", names=("A", "B")) -> str:
    """'A vs B' for two arms' runs: each arm's mean, seeds and seed spread (max - min), the difference, and whether it
    is resolved: only when both arms have 2+ seeds and the difference is larger than both spreads."""
    if not a or not b:
        absent = " and ".join(name for name, runs in zip(names, (a, b)) if not runs)
        return f"{names[0]} vs {names[1]}: {absent} has no runs in these results, so there is nothing to compare"
    x, y = ([final(r, key) for r in runs] for runs in (a, b))
    scale, unit = (100, " points") if is_percent(key) else (1, "")
    return (f"{names[0]} {show(x, key)} vs {names[1]} {show(y, key)}: difference "
            f"{scale * (np.mean(x) - np.mean(y)):+.2f}{unit}, {verdict(x, y)}")


def verdict(x, y) -> str:
    """Whether mean(x) - mean(y) is resolved: only with 2+ seeds on both sides, and larger than both seed spreads."""
    if min(len(x), len(y)) < 2:
        return "not resolved: one seed, no spread to measure the difference against"
    if abs(np.mean(x) - np.mean(y)) > max(np.ptp(x), np.ptp(y)):
        return "resolved: larger than the seed spread"
    return "not resolved: within the seed spread"


def plot_seeds(ax, arms: dict, key: str, labels: dict, colors: dict):
    """One dot per seed and a bar at the mean for each arm (an arm without runs says so): the seed spread at a glance."""
    scale, legend = (100 if is_percent(key) else 1), True  # the legend names the first arm's marks only
    for i, (arm, runs) in enumerate(arms.items()):
        values = [scale * final(r, key) for r in runs]
        if not values:
            ax.text(i, 0.5, "no runs", transform=ax.get_xaxis_transform(), ha="center", color="gray")
            continue
        ax.plot([i - 0.25, i + 0.25], [np.mean(values)] * 2, "-", color=colors[arm], lw=2,
                label="mean over seeds" if legend else None)
        ax.plot([i] * len(values), values, "o", color=colors[arm], mec="k", ms=6, label="one seed" if legend else None)
        legend = False
    ticks = [f"{labels[arm]}, {seeds(len(runs))}".replace(", ", "\n") for arm, runs in arms.items()]
    ax.set_xticks(range(len(arms)), ticks, fontsize=7)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    ax.legend(fontsize=7)


def plot_curves(ax, arms: dict, key: str, labels: dict, colors: dict, x: str = "epoch", warm_start: bool = False):
    """Each arm's mean over seeds against epochs (x="epoch") or pretraining seconds (x="time"), with the band between
    its lowest and highest seed."""
    scale = 100 if is_percent(key) else 1
    for arm, runs in arms.items():
        if not runs:
            continue  # plot_seeds names the arms without runs
        epochs, seconds, values = mean_curve(runs, key, warm_start)
        xs = epochs if x == "epoch" else seconds
        ax.plot(xs, scale * values.mean(0), "o-", ms=3, color=colors[arm], label=f"{labels[arm]} ({seeds(len(runs))})")
        if len(runs) > 1:
            ax.fill_between(xs, scale * values.min(0), scale * values.max(0), color=colors[arm], alpha=0.2, lw=0)
    ax.set_xlabel("epoch" if x == "epoch" else "cumulative pretraining time (s)")
    if x == "epoch":
        from matplotlib.ticker import MaxNLocator  # here: the command line runs without matplotlib
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.legend(fontsize=7)


def seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def setup(sweep: str):
    """The notebooks' one setup call. Settings come from environment variables: SSL_MIN_SMOKE=1 (tiny CPU runs),
    SSL_MIN_SETTING=full (run the missing full runs: needs a GPU), SSL_MIN_DATA_DIR (an image folder instead of the
    torchvision download). With none set, it shows the committed results: full if any exist, else the pilot.
    Returns (results by run name, the setting shown, a tag for the figures)."""
    data_dir = os.environ.get("SSL_MIN_DATA_DIR", "")
    if os.environ.get("SSL_MIN_SMOKE") == "1":
        setting, results = "smoke", None
        print("SMOKE RUNS: a few CPU steps on 80 images that only check the code. Every number below is meaningless "
              "as a result: these are NOT findings.", flush=True)
        with tempfile.TemporaryDirectory(prefix="ssl_min_smoke_results_") as tmp:
            results = run_sweep(sweep, "smoke", data_dir, Path(tmp))
    elif os.environ.get("SSL_MIN_SETTING") == "full":
        if not torch.cuda.is_available():
            raise RuntimeError("SSL_MIN_SETTING=full runs 100-epoch pretraining: it needs a CUDA GPU")
        setting, results = "full", run_sweep(sweep, "full", data_dir)
    else:
        setting, results = "full", run_sweep(sweep, "full", run_missing=False)
        if not results:
            setting = "pilot"
            results = {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / sweep / "pilot").glob("*.json"))}
    print(describe(sweep, setting, results))
    devices = ", ".join(sorted({r["device"] for r in results.values()})) or "no results"
    epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in results.values()}))
    tag = ("SMOKE RUN: checks the code, NOT a result" if setting == "smoke" else
           f"{setting} setting, {epochs} epochs, {devices}")
    return results, setting, tag


def describe(sweep: str, setting: str, results: dict) -> str:
    """What produced the results, read from the results themselves (runs, data sizes, epochs, seeds, devices,
    commits), and which planned arms and seeds they lack."""
    lines = [f"{sweep} sweep, setting {setting!r}: {len(results)} runs with results"]
    if setting == "smoke":
        lines.append("SMOKE: every number and plot below only checks that the code runs; none is a finding")
    if setting == "pilot":
        lines.append(PILOT)
    else:
        missing = [(name, cfg) for _, name, cfg in plan(sweep, setting) if name not in results]
        if missing:
            views = sum(c.epochs * c.views * round(CIFAR10["train"] * c.train_fraction) for _, c in missing)
            rate = inspect.signature(queue).parameters["rate"].default
            lines.append(f"missing runs ({len(missing)}): {', '.join(name for name, _ in missing)}; "
                         f"{views / 1e6:.0f} M augmented views of pretraining, about {views / rate / 60:.0f} min on one "
                         f"GPU at the {rate:,} views/s sweeps.queue assumes: python notebooks/sweeps.py {sweep} full")
    have = {arm: len(runs) for arm, runs in by_arm(results).items()}
    planned = planned_arms(sweep, setting)
    short = [f"{arm_text(arm)}: {have.get(arm, 0)} of {n} seeds" for arm, n in planned.items()
             if have.get(arm, 0) < n]
    extra = [arm_text(arm) for arm in have if arm not in planned]
    if short:
        lines.append(f"arms of the {'smoke' if setting == 'smoke' else 'full'} plan short of seeds: " + "; ".join(short))
    if extra:
        lines.append("arms not in the plan: " + "; ".join(extra))

    def values(key):
        found = sorted({str(key(r)) for r in results.values()})
        return ", ".join(found) if found else "-"

    lines += [f"device: {values(lambda r: r['device'])}; torch {values(lambda r: r['versions']['torch'])}; "
              f"commit {values(lambda r: (r.get('commit') or 'not recorded')[:12])}",
              f"data: pretraining images {values(lambda r: r.get('data', {}).get('pretrain', 'not recorded'))}, "
              f"labelled train {values(lambda r: r.get('data', {}).get('train', 'not recorded'))}, "
              f"test {values(lambda r: r.get('data', {}).get('test', 'not recorded'))}",
              f"epochs {values(lambda r: r['epochs'])}; batch {values(lambda r: r['config']['batch_size'])}; "
              f"seeds {values(lambda r: r['config']['seed'])}; probe views {values(lambda r: r['config']['probe_views'])}; "
              f"kNN every {values(lambda r: r['config']['eval_every'])} epochs (0: only after the last)",
              "effective rank: " + ("of the projector outputs of the last training batch, logged every epoch (the "
                                    "pilot's version)" if setting == "pilot" else
                                    "of the test images' embeddings, at the kNN epochs and after the last")]
    return "\n".join(lines)


def arm_text(arm: Arm) -> str:
    return f"d = {arm.proj_dim}, beta = {arm.beta}, {arm.views} views, {arm.fraction:.0%} of the data"


def caveats(sweep: str, setting: str, results: dict) -> list:
    """How these results' settings differ from the full plan's: why they cannot test the paper's claim, one line each."""
    if setting == "smoke":
        return ["SMOKE runs: a few CPU steps on 80 images; nothing here is a finding"]
    planned = [asdict(cfg) for _, _, cfg in plan(sweep, "full")]
    notes = []
    for key, what in (("epochs", "epochs"), ("batch_size", "batch"), ("probe_views", "probe views")):
        have, want = sorted({r["config"][key] for r in results.values()}), sorted({c[key] for c in planned})
        if have and have != want:
            notes.append(f"{what} {'/'.join(map(str, have))}, the full setting {'/'.join(map(str, want))}")
    if setting == "pilot":
        notes.append("the pilot's CIFAR-10 subset (see above), not all 50,000 training images")
    devices = sorted({r["device"] for r in results.values()})
    if len(devices) > 1:
        notes.append(f"runs from {len(devices)} devices ({', '.join(devices)}): their times are not comparable")
    arms = by_arm(results)
    lacking = [arm for arm, n in planned_arms(sweep, setting).items() if len(arms.get(arm, [])) < n]
    if lacking:
        notes.append(f"{len(lacking)} planned arm(s) lack seeds or runs (listed at the top)")
    return notes or ["nothing beyond the differences from the paper that the notebook lists under 'The experiment'"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("sweep", choices=[*SWEEPS, "queue"])
    parser.add_argument("setting", nargs="?", default="full", choices=("full", "smoke"))
    parser.add_argument("--data-dir", default="", help="image folder (train/<class>/, test/<class>/); default: download")
    parser.add_argument("--seconds", type=float, default=540, help="queue: the time budget")
    args = parser.parse_args()
    try:
        if args.sweep == "queue":
            queue(args.data_dir, args.seconds)
        else:
            run_sweep(args.sweep, args.setting, args.data_dir)
    except ssl_min.UserError as e:
        sys.exit(f"sweeps: {e}")
