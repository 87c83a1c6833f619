"""The pretraining sweeps behind notebooks 02 and 03, one ssl_min.main run per configuration.

Each run's results (config, per-epoch log, probe and kNN accuracy, wall time, device) are saved as one small JSON
file as soon as the run finishes, and a run whose file exists is skipped: a sweep resumes after an interruption,
re-plotting is instant, and a sweep can be assembled from several short GPU sessions.

    python notebooks/sweeps.py orthogonality full                    # CIFAR-10 (downloaded), about an hour on an H100
    python notebooks/sweeps.py halved full
    python notebooks/sweeps.py halved short --data-dir path/to/cifar10_subset   # fits a 15-minute GPU session

Settings: `full` is the notebooks' experiment on all of CIFAR-10; `short` runs few epochs on a CIFAR-10 subset
folder (the committed short results used the first 1,600 training and 500 test images per class, in sorted file
order, on an NVIDIA H200); `smoke` is a tiny CPU run (SSL_MIN_SMOKE=1 in the notebooks) that checks the code and is
never a result.
"""
import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ssl_min  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR = Path(os.environ.get("SSL_MIN_CIFAR10", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
SETTINGS = {
    "full": dict(dataset="cifar10", batch_size=512),
    "short": dict(batch_size=512),
    "smoke": dict(batch_size=20, device="cpu"),
}
EPOCHS = {  # (orthogonality sweep, halved-data sweep)
    "full": (50, 100),
    "short": (5, 10),
    "smoke": (1, 2),
}
FIXED_BETA = 0.0004  # the usual BarlowTwins setting for every d (the paper's "fixed" baseline)
DATA = {  # what each setting's data is (a results file records only the data folder's path)
    "full": "CIFAR-10 (50,000 training and 10,000 test images), downloaded by torchvision or the folder in data_dir",
    "short": "a CIFAR-10 subset image folder, smoke_data(train=1600, test=500): the first 1,600 training images per "
             "class in sorted file order (16,000) and the first 500 test images per class (5,000)",
    "smoke": "smoke_data(): the first 8 training and 5 test images per class of the CIFAR-10 image folder (80 and 50)",
}


def orthogonality(setting: str):
    """Projector width d with a fixed small beta and with beta = 5/d (the paper's Table 1 / Fig. 2)."""
    dims = (32, 128) if setting == "smoke" else (64, 128, 256, 512, 1024, 2048)
    epochs = EPOCHS[setting][0]
    for d in dims:
        for rule, beta in (("fixed", FIXED_BETA), ("5_over_d", 5 / d)):
            yield f"d{d}_{rule}", ssl_min.Config(views=2, proj_dim=d, beta=beta, epochs=epochs, eval_every=0)


def halved(setting: str):
    """Views x fraction of the pretraining data (the paper's Fig. 5): does 4 views on 50% match 2 views on 100%?"""
    epochs = EPOCHS[setting][1]
    for views, fraction in ((2, 1.0), (4, 0.5), (2, 0.5), (8, 0.25)):
        yield f"views{views}_data{round(100 * fraction)}", ssl_min.Config(
            views=views, train_fraction=fraction, proj_dim=256, epochs=epochs, eval_every=max(1, epochs // 10))


SWEEPS = {"orthogonality": orthogonality, "halved": halved}


def results_dir(sweep: str, setting: str) -> Path:
    """Where a sweep's results live: notebooks/results/<sweep>/<setting>/, or a temporary folder for smoke runs."""
    if setting == "smoke":
        return Path(tempfile.mkdtemp(prefix=f"ssl_min_{sweep}_smoke_"))
    return RESULTS / sweep / setting


def smoke_data(source: Path = CIFAR, train: int = 8, test: int = 5, root: Path | None = None) -> str:
    """A tiny class-balanced image folder of links to the real CIFAR-10 files (in root, or a new temporary folder)."""
    if not (source / "train").is_dir():
        raise FileNotFoundError(f"smoke runs need the CIFAR-10 image folder at {source} (or set SSL_MIN_CIFAR10)")
    root = root or Path(tempfile.mkdtemp(prefix="ssl_min_smoke_data_"))
    for split, n in (("train", train), ("test", test)):
        for cls in sorted(p.name for p in (source / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((source / split / cls).iterdir())[:n]:
                (root / split / cls / f.name).symlink_to(f)
    return str(root)


def describe(sweep: str, setting: str, results: dict, folder: Path) -> str:
    """What produced a sweep's results, from the results files themselves: the setting, how many of the planned runs
    have results, the devices, library versions, data and epochs. Smoke runs say loudly that they are no findings."""
    planned = [name for name, _ in SWEEPS[sweep](setting)]
    missing = [name for name in planned if name not in results]
    lines = []
    if setting == "smoke":
        bar = "!" * 100
        lines += [bar, "SMOKE RUNS: a few CPU steps on 80 images that only check that the code runs.",
                  "Every number and plot below is meaningless as a result. These are NOT findings.", bar]
    shown = folder.relative_to(RESULTS.parents[1]) if folder.is_relative_to(RESULTS.parents[1]) else folder
    lines.append(f"{sweep} sweep, setting {setting!r}: {len(results)} of {len(planned)} runs have results in {shown}")
    if missing:
        how = "in this notebook on a GPU" if setting != "smoke" else "here"
        lines.append(f"missing ({len(missing)}): {', '.join(missing)}; run them {how} or with "
                     f"`python notebooks/sweeps.py {sweep} {setting}" + (" --data-dir DIR`" if setting != "full" else "`"))
    if not results:
        lines.append("No results exist yet: there is nothing to plot.")
        return "\n".join(lines)

    def count(key):  # the value all runs share, or each value with its number of runs
        values = [key(r) for r in results.values()]
        distinct = sorted(set(values), key=str)
        if len(distinct) == 1:
            return str(distinct[0])
        return ", ".join(f"{v} ({values.count(v)} run{'s' * (values.count(v) > 1)})" for v in distinct)

    def config(key):
        return count(lambda r: r["config"][key])

    data_dir = count(lambda r: r["config"]["data_dir"] or r["config"]["dataset"] + " (torchvision download)")
    lines += [
        f"device: {count(lambda r: r['device'])}; torch {count(lambda r: r['versions']['torch'])}",
        f"data: {DATA[setting]}",
        (f"  config: data_dir {data_dir}; subset {config('subset')} (0 = every image); "
         f"train_fraction (share of the training images pretrained on) {config('train_fraction')}"),
        (f"pretraining: {count(lambda r: r['epochs'])} epochs, batch {config('batch_size')} images, "
         f"seed {config('seed')}, ResNet-18, Adam lr {config('lr')}"),
    ]
    return "\n".join(lines)


def run_sweep(sweep: str, setting: str, data_dir: str = "", folder: Path | None = None, run_missing: bool = True) -> dict:
    """Run every configuration of the sweep that has no results file yet (or, with run_missing=False, only list
    it); return the results that exist, by run name."""
    folder = folder or results_dir(sweep, setting)
    results = {}
    for name, cfg in SWEEPS[sweep](setting):
        path = folder / f"{name}.json"
        if not path.exists() and not run_missing:
            print(f"--- {sweep}/{setting}/{name}: no results yet (not run here)")
            continue
        if not path.exists():
            cfg = replace(cfg, **SETTINGS[setting], data_dir=data_dir, overwrite=True,
                          out_dir=str(Path(tempfile.gettempdir()) / "ssl_min_runs" / sweep / setting / name))
            print(f"--- {sweep}/{setting}/{name}", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            ssl_min.save_json(path, ssl_min.main(cfg))
        results[name] = json.loads(path.read_text())
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", choices=SWEEPS)
    parser.add_argument("setting", choices=SETTINGS)
    parser.add_argument("--data-dir", default="", help="image folder (train/<class>/, test/<class>/); required for short")
    args = parser.parse_args()
    if args.setting != "full" and not args.data_dir:
        parser.error(f"the {args.setting} setting needs --data-dir")
    try:
        run_sweep(args.sweep, args.setting, args.data_dir)
    except ssl_min.UserError as e:
        sys.exit(f"sweeps: {e}")
