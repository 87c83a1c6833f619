"""Tests of notebooks/sweeps.py (the verdict rule and its error rates, the plan, the time model, the run bookkeeping,
the command line, the notebooks' helpers) and of the notebooks, executed in smoke mode. `pytest -q -rs` runs them with
the rest, from the repository's root."""
import json
import os
import signal
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sweeps  # notebooks/sweeps.py, imported as the notebooks import it

ssl_min = sweeps.ssl_min
REPO = Path(__file__).resolve().parent.parent
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def random_images(tmp_path_factory) -> Path:
    """An image folder of CIFAR-10's shape: 8 random 32x32 images per class in train/ and in test/."""
    root = tmp_path_factory.mktemp("random_images")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


# ---- The sweeps (notebooks/sweeps.py): the verdict rule and its error rates ------------------------------------------
@pytest.mark.parametrize("p, df, value", [(0.95, 2, 2.920), (0.975, 4, 2.776), (0.975, 1, 12.706), (0.95, 10, 1.812),
                                          (0.975, 30, 2.042), (0.95, 60, 1.671), (0.975, 10_000, 1.960)])
def test_t_quantile_known_values(p, df, value):
    assert sweeps.t_quantile(p, df) == pytest.approx(value, abs=6e-4)


def rates(gap, sd, n, reps=3000, seed=0):
    """How often each verdict word comes out for Gaussian arms whose true means differ by `gap`."""
    rng = np.random.default_rng(seed)
    words = [sweeps.decide(rng.normal(gap, sd, n), rng.normal(0, sd, n)).word for _ in range(reps)]
    return {w: words.count(w) / reps for w in set(words)}


def matches(r):
    return sum(v for w, v in r.items() if w.startswith("matches"))


FIVE_PERCENT = 0.05 + 3 * np.sqrt(0.05 * 0.95 / 3000)  # 5%, and three standard errors of a rate from 3000 draws


@pytest.mark.parametrize("sd, n", [(0.002, 3), (0.005, 3), (0.004, 10)])
def test_false_matches_at_most_5_percent_when_the_gap_is_the_margin(sd, n):
    r = rates(sweeps.MARGIN, sd, n)
    assert matches(r) <= FIVE_PERCENT, r  # TOST at 90% intervals: a 5% test


@pytest.mark.parametrize("sd, n", [(0.005, 2), (0.005, 3), (0.02, 6)])
def test_false_differences_about_5_percent_when_the_gap_is_zero(sd, n):
    r = rates(0.0, sd, n)
    assert 0.03 <= sum(v for w, v in r.items() if w in ("better", "worse") or w.endswith("nonzero")) <= FIVE_PERCENT


def test_the_rule_finds_what_is_there():
    assert matches(rates(0.0, 0.002, 3, reps=500)) > 0.9  # a tight spread and no gap: matches
    assert rates(0.05, 0.005, 3, reps=500).get("better", 0) > 0.95  # a 5-point gap: better
    assert rates(-0.05, 0.005, 3, reps=500).get("worse", 0) > 0.95


def test_verdict_words_and_intervals():
    assert sweeps.decide([0.5], [0.5, 0.51]).word == "no interval"
    assert "no interval" in sweeps.verdict([0.5], [0.5, 0.51])
    both = sweeps.decide([0.505, 0.506, 0.505], [0.5, 0.501, 0.5005])
    assert both.word == "matches within the margin; the difference is nonzero"
    assert both.ci95[0] > 0 and -sweeps.MARGIN < both.ci90[0] < both.ci90[1] < sweeps.MARGIN
    text = sweeps.verdict([0.55, 0.56, 0.555], [0.50, 0.507, 0.499])
    assert text.endswith(": better") and "90% interval [" in text and "95% interval [" in text
    assert "higher" in sweeps.verdict([30, 31], [20, 21], percent=False, margin=None)
    assert sweeps.decide([30, 30.1], [30, 30.1], margin=None).word == "inconclusive"  # no margin: never "matches"
    assert "more than 100 seeds" in sweeps.verdict([0.1, 0.3], [0.1, 0.28])  # a 1-point gap in a 14-point spread


def arms_of_spread(n, sd=0.006):
    """Two arms of n seeds, 1 point apart, each of standard deviation sd."""
    z = np.linspace(-1, 1, n)
    return 0.51 + sd * z / z.std(ddof=1), 0.50 + sd * z / z.std(ddof=1)


def test_inconclusive_says_how_many_seeds_would_settle_it():
    d = sweeps.decide(*arms_of_spread(3))
    assert d.word == "inconclusive" and d.seeds > 3
    assert "seeds per arm would settle it" in sweeps.verdict(*arms_of_spread(3))
    assert sweeps.decide(*arms_of_spread(d.seeds)).word != "inconclusive"
    assert sweeps.decide(*arms_of_spread(d.seeds - 1)).word == "inconclusive"


# ---- The plan and the time model -------------------------------------------------------------------------------------
def seeds_per_arm(sweep, setting="full"):
    return {(a.proj_dim, a.beta, a.views, a.fraction): n for a, n in sweeps.planned_arms(sweep, setting).items()}


def test_plan_seeds_arms_and_order():
    orth, halved = seeds_per_arm("orthogonality"), seeds_per_arm("halved")
    assert orth[128, "5/d", 2, 1.0] == orth[8192, "0.0008", 2, 1.0] == 3  # claim 1's pair, the wide one tuned
    assert orth[128, "0.0004", 2, 1.0] == orth[8192, "0.0004", 2, 1.0] == 2  # the failure mode, the usual wide one
    assert orth[1024, "5/d", 2, 1.0] == orth[1024, "0.0004", 2, 1.0] == 1
    assert halved[256, "5/d", 4, 0.5] == halved[256, "5/d", 2, 1.0] == 3 and halved[256, "5/d", 2, 0.5] == 2
    assert {(4, 1.0), (8, 0.25), (2, 0.25)} <= {(v, f) for _, _, v, f in halved}
    names = [name for sweep in sweeps.COMMON for _, name, _ in sweeps.plan(sweep, "full")]
    assert len(names) == len(set(names))
    runs = sorted(((p, sweep, cfg) for sweep in sweeps.COMMON for p, _, cfg in sweeps.plan(sweep, "full")),
                  key=lambda run: run[0])
    first = [(sweep, cfg.proj_dim, cfg.views, cfg.train_fraction, cfg.seed) for _, sweep, cfg in runs[:8]]
    assert first[:4] == [("orthogonality", 128, 2, 1.0, 0), ("orthogonality", 8192, 2, 1.0, 0),
                         ("halved", 256, 2, 1.0, 0), ("halved", 256, 4, 0.5, 0)]
    assert {s for *_, s in first[4:]} == {1}  # then seed 1 of both pairs
    assert runs[-1][1] == "main"  # the queue tests the claims first
    for sweep in ("orthogonality", "halved"):
        runs = sweeps.plan(sweep, "smoke")
        assert len(runs) <= 6 and all(c.device == "cpu" and c.batch_size <= 10 for _, _, c in runs)
        assert max(sweeps.planned_arms(sweep, "smoke").values()) == 2  # the verdict's interval is exercised


def test_laptop_plan_sizes_and_arms():
    """A CPU's hour per sweep: the narrow network, 300 images per class, 8 epochs; 3 seeds where a verdict is read."""
    for sweep in ("orthogonality", "halved"):
        runs = sweeps.plan(sweep, "laptop")
        assert len({name for _, name, _ in runs}) == len(runs) <= 11
        assert {(c.device, c.width, c.subset, c.epochs, c.batch_size, c.probe_views, c.eval_every, c.views > 1)
                for _, _, c in runs} == {("cpu", 16, 300, 8, 128, 1, 2, True)}
    orth, halved = seeds_per_arm("orthogonality", "laptop"), seeds_per_arm("halved", "laptop")
    assert orth == {(128, "5/d", 2, 1.0): 3, (128, "0.0004", 2, 1.0): 3, (32, "5/d", 2, 1.0): 1,
                    (32, "0.0004", 2, 1.0): 1, (512, "5/d", 2, 1.0): 1, (512, "0.0004", 2, 1.0): 1,
                    (2048, "0.0004", 2, 1.0): 1}
    assert halved == {(256, "5/d", 2, 1.0): 3, (256, "5/d", 4, 0.5): 3, (256, "5/d", 2, 0.5): 3}
    assert sweeps.headline("orthogonality", "laptop") == [sweeps.Arm(128, "5/d", 2, 1.0),
                                                         sweeps.Arm(128, "0.0004", 2, 1.0)]


COMMITTED = sorted(p for setting in ("full", "laptop") for p in (REPO / "notebooks" / "results").glob(f"*/{setting}/*"))


@pytest.mark.parametrize("path", COMMITTED, ids=[str(p.relative_to(REPO / "notebooks" / "results")) for p in COMMITTED])
def test_a_committed_result_is_a_run_of_the_plan(path):
    """A change of the plan (or of ssl_min's defaults) that leaves a committed result behind fails here: rerun it."""
    sweep, setting = path.parent.parent.name, path.parent.name
    planned = {name: cfg for _, name, cfg in sweeps.plan(sweep, setting)}
    results = sweeps.read_results(path)
    assert path.suffix == ".json" and results is not None and path.stem in planned, "not a run of the plan"
    free = ("data_dir", "device", "compile", "overwrite", "out_dir")  # what does not change the run
    config = {k: v for k, v in asdict(planned[path.stem]).items() if k not in free}
    assert {k: results["config"].get(k) for k in config} == config
    assert results["epochs"] == len(results["log"]) == config["epochs"] and results["commit"]


def test_the_readme_results_table_is_computed_from_the_committed_results():
    assert sweeps.table() in (REPO / "README.md").read_text(), "update it: python notebooks/sweeps.py table"


def test_time_model_uncalibrated():
    wanted = (("orthogonality", "d128_beta5_over_d_s0"), ("orthogonality", "d8192_beta0.0008_s0"),
              ("halved", "v4_data50_s0"))
    small, wide, halved = (cfg for sweep, name in wanted for _, n, cfg in sweeps.plan(sweep, "full") if n == name)
    model = sweeps.TimeModel()
    assert "uncalibrated" in model.note
    steps = 50_000 // 512 * 100
    training = steps * (3e-3 + 13.5e-6 * 1024)
    assert sweeps.estimate(small) == pytest.approx(training + sweeps.overhead(small, model), rel=1e-3)
    per_view = (sweeps.estimate(wide) - sweeps.overhead(wide, model) - steps * 3e-3) / (steps * 1024)
    assert per_view == pytest.approx(1.7 * 13.5e-6)  # d = 8192 about 1.7x slower per view
    assert 0 < sweeps.overhead(halved, model) < 0.5 * sweeps.estimate(halved)


def fake_results(cfg, epoch_s=1.0, wall_extra=50.0, device="NVIDIA H200"):
    pretrain = round(50_000 * cfg.train_fraction) if not cfg.subset else 8
    steps = pretrain // cfg.batch_size
    log = [dict(epoch=e, loss=1.0, invariance=0.5, orthogonality=0.5, time_s=epoch_s,
                views_per_s=steps * cfg.batch_size * cfg.views / epoch_s) for e in range(1, cfg.epochs + 1)]
    log[-1].update(knn_acc=0.4, erank=10.0)
    return dict(probe_acc=0.5, knn_acc=0.4, erank=10.0, epochs=cfg.epochs, pretrain_time_s=epoch_s * cfg.epochs,
                eval_time_s=1.0, wall_time_s=epoch_s * cfg.epochs + wall_extra,
                data=dict(pretrain=pretrain, train=50_000, test=10_000, image=[3, 32, 32]), processes=1,
                device=device, commit="abc", versions=dict(torch="2"), config=asdict(cfg), log=log)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setattr(sweeps, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sweeps, "RUNS", tmp_path / "runs")
    return tmp_path


def test_calibrate_from_committed_runs(folders):
    step_s, view_s = 2e-3, 1e-5
    for sweep, name, cfg in [("orthogonality", n, c) for _, n, c in sweeps.plan("orthogonality", "full")][:1] + \
                            [("halved", n, c) for _, n, c in sweeps.plan("halved", "full")][:2]:
        steps = round(50_000 * cfg.train_fraction) // cfg.batch_size
        epoch_s = steps * (step_s + view_s * cfg.batch_size * cfg.views * sweeps.width_cost(cfg.proj_dim))
        path = folders / "results" / sweep / "full" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fake_results(cfg, epoch_s)))
    model = sweeps.calibrate("NVIDIA H200")
    assert model.step_s == pytest.approx(step_s, rel=1e-6) and model.view_s == pytest.approx(view_s, rel=1e-6)
    assert "calibrated on 3 runs" in model.note and model.overhead_scale > 0
    assert "uncalibrated" in sweeps.calibrate("another GPU").note


# ---- The queue and the run bookkeeping, with a fake ssl_min.main -----------------------------------------------------
@pytest.fixture
def fake_main(folders, monkeypatch):
    calls = []

    def main(cfg):
        calls.append(cfg)
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = fake_results(cfg)
        (out / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(ssl_min, "main", main)
    return calls


def first_run(sweep="orthogonality"):
    return min(sweeps.plan(sweep, "full"), key=lambda run: run[0])[1:]


def test_queue_skips_a_run_that_does_not_fit_and_takes_the_next(fake_main, monkeypatch, capsys):
    name, first = first_run()
    monkeypatch.setattr(sweeps, "estimate", lambda cfg, model=None: 560 if cfg == first else 100)
    sweeps.queue("", 540)
    ran = [(c.proj_dim, c.beta, c.views, c.train_fraction, c.seed) for c in fake_main]
    assert ran and (first.proj_dim, first.beta, first.views, first.train_fraction, first.seed) not in ran
    assert f"skip orthogonality/{name}" in capsys.readouterr().out
    assert (sweeps.RESULTS / "orthogonality" / "full" / "d8192_beta0.0008_s0.json").exists()


def test_results_are_saved_before_the_run_folder_is_deleted(fake_main, monkeypatch):
    name, cfg = first_run()
    deleted = []
    real = sweeps.shutil.rmtree
    monkeypatch.setattr(sweeps.shutil, "rmtree", lambda path: deleted.append(
        (sweeps.RESULTS / "orthogonality" / "full" / f"{name}.json").exists()) or real(path))
    sweeps.run_one("orthogonality", "full", name, cfg, "", sweeps.RESULTS / "orthogonality" / "full")
    assert deleted == [True] and not (sweeps.RUNS / "orthogonality" / "full" / name).exists()


def test_a_finished_run_folder_is_recovered_not_rerun_unless_it_is_of_another_config(fake_main, capsys):
    name, cfg = first_run()
    out = sweeps.RUNS / "orthogonality" / "full" / name
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(fake_results(replace(cfg, seed=7))))
    assert sweeps.run_one("orthogonality", "full", name, cfg, "", sweeps.RESULTS) is None
    assert f"{out} holds a finished run of another configuration" in capsys.readouterr().out
    (out / "results.json").write_text(json.dumps(fake_results(cfg)))
    results = sweeps.run_sweep("orthogonality", "full")
    assert not any(c.seed == cfg.seed and c.proj_dim == cfg.proj_dim and c.beta == cfg.beta for c in fake_main)
    assert name in results and "recovered" in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize("content", ["", "{", "[]", '{"probe_acc": 1}'])
def test_an_unreadable_result_is_one_line_and_rerun(fake_main, capsys, content):
    name, cfg = first_run()
    path = sweeps.RESULTS / "orthogonality" / "full" / f"{name}.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert name not in sweeps.run_sweep("orthogonality", "full", run_missing=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if str(path) in line]
    assert len(lines) == 1 and "counts as missing" in lines[0]
    assert name in sweeps.run_sweep("orthogonality", "full") and sweeps.read_results(path)


def test_a_stale_run_folder_is_one_line_and_the_queue_goes_on(fake_main, monkeypatch, capsys):
    name, cfg = first_run()
    stale = sweeps.RUNS / "orthogonality" / "full" / name
    stale.mkdir(parents=True)
    fake = ssl_min.main

    def main(c):
        if Path(c.out_dir) == stale:
            raise ssl_min.UserError(f"{stale} holds an unfinished run with another seed; rerun with its options and "
                                    f"data to resume it, or pass another --out-dir (--overwrite discards it)")
        return fake(c)

    monkeypatch.setattr(ssl_min, "main", main)
    sweeps.queue("", 3600)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "not run" in line)
    assert f"delete {stale}" in line and "--out-dir" not in line and "--overwrite" not in line
    assert len(fake_main) == sum(len(sweeps.plan(s, "full")) for s in sweeps.COMMON) - 1  # every other run ran


def test_smoke_runs_write_nothing_into_the_repository(fake_main):
    results = sweeps.run_sweep("main", "smoke")
    assert len(results) == 1 and not sweeps.RESULTS.exists() and not sweeps.RUNS.exists()
    assert not Path(fake_main[0].out_dir).is_relative_to(REPO)


def test_full_data_counts_image_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(sweeps, "CIFAR10", dict(train=2, test=1))
    for path in ("train/a/1.png", "train/b/2.JPG", "test/a/3.jpeg"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / path, format="PNG")
    (tmp_path / "train" / "a" / ".DS_Store").write_text("x")
    sweeps.check_full_data(str(tmp_path))
    (tmp_path / "train" / "b" / "2.JPG").unlink()
    with pytest.raises(ssl_min.UserError, match="needs all of CIFAR-10"):
        sweeps.check_full_data(str(tmp_path))  # the .DS_Store does not make up for the missing image


# ---- The command line ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["queue", "--seconds", "nan"], ["queue", "--seconds", "inf"],
                                  ["queue", "--seconds", "0"], ["queue", "--seconds", "-5"],
                                  ["queue", "--seconds", "soon"], ["queue", "smoke"]])
def test_command_line_refuses_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        sweeps.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("sweeps: error:")


def test_sigterm_stops_in_one_line_and_keeps_the_finished_runs(fake_main, monkeypatch, capsys):
    fake, count = ssl_min.main, []

    def main(cfg):
        count.append(1)
        if len(count) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return fake(cfg)

    monkeypatch.setattr(ssl_min, "main", main)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            sweeps.cli(["orthogonality"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 130 and len(err) == 1 and "interrupted" in err[0]
    assert len(list((sweeps.RESULTS / "orthogonality" / "full").glob("*.json"))) == 1


# ---- The notebooks' helpers ------------------------------------------------------------------------------------------
def test_arms_keep_the_two_wide_betas_apart():
    arms = {sweeps.arm_of(dict(proj_dim=8192, beta=b, views=2, train_fraction=1.0)).beta for b in (0.0008, 0.0004)}
    assert arms == {"0.0008", "0.0004"}
    assert sweeps.arm_of(dict(proj_dim=128, beta=5 / 128, views=2, train_fraction=1.0)).beta == "5/d"


def test_notebooks_show_the_full_results_else_the_laptop_ones_and_a_corrupt_file_in_one_line(folders, monkeypatch,
                                                                                               capsys):
    for variable in ("SSL_MIN_SMOKE", "SSL_MIN_SETTING"):
        monkeypatch.delenv(variable, raising=False)
    (_, laptop_name, laptop), (_, full_name, full) = (min(sweeps.plan("halved", s), key=lambda run: run[0])
                                                      for s in ("laptop", "full"))
    folder = folders / "results" / "halved"
    (folder / "laptop").mkdir(parents=True)
    (folder / "laptop" / f"{laptop_name}.json").write_text(json.dumps(fake_results(laptop)))
    (folder / "laptop" / "v2_data50_s0.json").write_text("")  # a planned run's file, unreadable
    results, setting, title = sweeps.setup("halved")
    out = capsys.readouterr().out
    assert list(results) == [laptop_name] and setting == "laptop" and "laptop setting" in title and "width 16" in title
    assert sum("v2_data50_s0.json" in line for line in out.splitlines()) == 1 and "cannot test the claim" in out
    assert "It can show the mechanism behind claim 2" in out and "backbone width 16, not 64" in out
    (folder / "full").mkdir()
    (folder / "full" / f"{full_name}.json").write_text(json.dumps(fake_results(full)))
    results, setting, title = sweeps.setup("halved")
    assert list(results) == [full_name] and setting == "full" and "width 64" in title


def test_notebook_messages_name_the_environment_variable(folders, monkeypatch):
    monkeypatch.setenv("SSL_MIN_SETTING", "full")
    monkeypatch.setenv("SSL_MIN_DATA_DIR", str(folders))
    monkeypatch.setattr(sweeps.torch.cuda, "is_available", lambda: True)
    with pytest.raises(ssl_min.UserError, match="point SSL_MIN_DATA_DIR at a complete copy"):
        sweeps.setup("halved")


def test_one_real_tiny_run(random_images, tmp_path):
    """ssl_min.main itself, on 80 random images: the results hold what sweeps and the notebooks read."""
    cfg = ssl_min.Config(views=2, proj_dim=8, beta=5 / 8, batch_size=10, epochs=1, eval_every=0, probe_views=1,
                         device="cpu")
    results = sweeps.run_one("main", "smoke", "tiny", cfg, str(random_images), tmp_path / "results")
    assert sweeps.read_results(tmp_path / "results" / "tiny.json") == json.loads(json.dumps(results))
    text = sweeps.describe("main", "smoke", {"tiny": results}) + sweeps.title("smoke", {"tiny": results})
    assert "SMOKE" in text and "80 labelled training images" in text and "cannot test the claim as stated: smoke" in text
    assert sweeps.series(results, "knn_acc", "views")[1][-1] == pytest.approx(80 * 2 / 1e6)


# ---- Notebooks, executed in smoke mode -------------------------------------------------------------------------------
NOTEBOOKS = sorted(Path(__file__).resolve().parent.glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_in_smoke_mode(path, random_images, monkeypatch):
    """Every code path of the notebooks on tiny CPU runs (01 needs no data; 02 and 03 pretrain on random images)."""
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    monkeypatch.setenv("SSL_MIN_SMOKE", "1")
    monkeypatch.setenv("SSL_MIN_DATA_DIR", str(random_images))
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on any error
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert path.name.startswith("01_") or "SMOKE" in text  # experiment notebooks say they ran smoke runs
