"""Tests for ssl_min. Run: pytest -q

Tests that need real images use the CIFAR-10 image folder in ../shared/data/cifar10 (or $SSL_MIN_CIFAR10) and skip
when it is absent. Everything runs on the CPU, without internet.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF

import ssl_min

sys.path.insert(0, str(Path(__file__).resolve().parent / "notebooks"))
import sweeps  # noqa: E402  (notebooks/sweeps.py: builds the small real-image folders)

REPO = Path(__file__).resolve().parent
CIFAR = Path(os.environ.get("SSL_MIN_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))


# ---------------------------------------------------------------------------------------------------------------
# The loss against independent textbook implementations
# ---------------------------------------------------------------------------------------------------------------
def textbook_barlow(z1, z2, lambd):
    """BarlowTwins as in the official main.py: BatchNorm without affine, c = bn(z1)^T bn(z2) / B."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).double()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + lambd * off_diag


def textbook_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg as in the official code (facebookresearch/vicreg, main_vicreg.py)."""
    n, d = x.shape
    repr_loss = nn.functional.mse_loss(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    std_loss = torch.relu(1 - std_x).mean() / 2 + torch.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = lambda c: (c - torch.diag(torch.diagonal(c))).pow(2).sum() / d  # noqa: E731
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * (off(cov_x) + off(cov_y))


def loop_reference(z, beta):
    """The multi-view loss of Eq. 10 written view by view: each view against the mean of the other views."""
    V, B, d = z.shape
    f = [(v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5) for v in z]
    total = 0.0
    for i in range(V):
        mean_others = sum(f[j] for j in range(V) if j != i) / (V - 1)
        c = f[i].T @ mean_others / B
        total = total + ((1 - c.diagonal()) ** 2).sum() + beta * (c ** 2).sum() - beta * (c.diagonal() ** 2).sum()
    return total / V


def embeddings(V, B=64, d=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, d, generator=g, dtype=torch.float64)
    return torch.stack([base + noise * torch.randn(B, d, generator=g, dtype=torch.float64) for _ in range(V)])


@pytest.mark.parametrize("beta", [0.0, 0.005, 1 / 16, 1.0])
def test_barlow_at_two_views_equals_textbook_barlowtwins(beta):
    z = embeddings(2)
    total, invariance, orthogonality = ssl_min.ssl_loss(z, beta)
    assert total.item() == pytest.approx(textbook_barlow(z[0], z[1], beta).item(), rel=1e-10)
    assert (invariance + orthogonality).item() == pytest.approx(total.item(), rel=1e-12)
    assert invariance.item() == pytest.approx(textbook_barlow(z[0], z[1], 0.0).item(), rel=1e-10)


@pytest.mark.parametrize("d", [8, 32])
def test_vicreg_at_two_views_equals_textbook_vicreg(d):
    z = embeddings(2, d=d)
    default = ssl_min.ssl_loss(z, 1 / (25 * d), "vicreg")[0]  # the default beta: VICReg's own 25/25/1 weights
    assert default.item() == pytest.approx(textbook_vicreg(z[0], z[1]).item(), rel=1e-10)
    beta = 0.01  # another orthogonality strength maps to the covariance weight nu = 25 * beta * d
    other = ssl_min.ssl_loss(z, beta, "vicreg")[0]
    assert other.item() == pytest.approx(textbook_vicreg(z[0], z[1], cov_coeff=25 * beta * d).item(), rel=1e-10)


@pytest.mark.parametrize("V", [2, 3, 4, 8])
def test_multiview_loss_equals_view_by_view_reference(V):
    z = embeddings(V, seed=V)
    assert ssl_min.ssl_loss(z, 0.05)[0].item() == pytest.approx(loop_reference(z, 0.05).item(), rel=1e-10)


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
def test_multiview_loss_is_invariant_to_the_order_of_views(loss):
    z = embeddings(5)
    shuffled = z[torch.tensor([3, 0, 4, 1, 2])]
    assert ssl_min.ssl_loss(shuffled, 0.05, loss)[0].item() == pytest.approx(ssl_min.ssl_loss(z, 0.05, loss)[0].item(), rel=1e-12)


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
@pytest.mark.parametrize("V", [2, 4, 8])
def test_identical_views_cost_less_than_independent_views(loss, V):
    same = embeddings(1, seed=1).expand(V, -1, -1)
    independent = embeddings(V, seed=1, noise=3.0)
    assert ssl_min.ssl_loss(same, 0.05, loss)[1] < 0.01 * ssl_min.ssl_loss(independent, 0.05, loss)[1]
    assert ssl_min.ssl_loss(same, 0.05, loss)[0] < ssl_min.ssl_loss(independent, 0.05, loss)[0]


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
def test_gradients_reach_every_view(loss):
    z = embeddings(4).requires_grad_()
    ssl_min.ssl_loss(z, 0.05, loss)[0].backward()
    assert all(z.grad[v].abs().sum() > 0 for v in range(4))


def test_bfloat16_embeddings_are_scored_in_float32():
    z = embeddings(3).float()
    assert ssl_min.ssl_loss(z.bfloat16(), 0.05)[0].dtype == torch.float32


def test_effective_rank_counts_used_directions():
    assert ssl_min.effective_rank(torch.randn(200, 1) @ torch.randn(1, 32)) == pytest.approx(1.0, abs=1e-3)
    assert ssl_min.effective_rank(torch.eye(32)) == pytest.approx(32.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------
def colourful(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_augment_shape_dtype_and_range():
    x = ssl_min.augment(colourful(6, 40), 3, torch.Generator().manual_seed(0), size=32)
    assert x.shape == (3, 6, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.05


def test_augment_draws_parameters_per_sample_and_per_view():
    image = colourful(1)
    x = ssl_min.augment(image.expand(16, -1, -1, -1), 4, torch.Generator().manual_seed(0)).flatten(0, 1)
    distinct = {tuple(v.flatten()[:64].tolist()) for v in x}
    assert len(distinct) == 64  # 16 copies of one image x 4 views: all different


def test_augment_is_seeded():
    images = colourful(8)
    a = ssl_min.augment(images, 2, torch.Generator().manual_seed(3))
    b = ssl_min.augment(images, 2, torch.Generator().manual_seed(3))
    c = ssl_min.augment(images, 2, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_grayscale_and_flip_rates():
    images = colourful(2000, size=8)
    x = ssl_min.augment(images, 1, torch.Generator().manual_seed(0), p_gray=0.2)[0]
    gray = ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-6) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert 0.16 < gray.float().mean().item() < 0.24


def test_hue_shift_matches_torchvision_adjust_hue():
    images = colourful(5).float() / 255
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.33])
    ours = ssl_min.hue_shift(images, shifts)
    for image, h, mine in zip(images, shifts, ours):
        assert torch.allclose(mine, TF.adjust_hue(image, h.item()), atol=1e-5)


def test_augment_crops_and_flips_geometrically():
    """On a gray left-to-right ramp, colour jitter and grayscale change no order along x: every view is a
    monotone crop of the ramp, mirrored in about half of the views."""
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(500, 3, 32, 32)
    x = ssl_min.augment(ramp, 1, torch.Generator().manual_seed(0))[0, :, 0]  # [500, 32, 32], one channel
    steps = x[:, :, 1:] - x[:, :, :-1]
    rising, falling = (steps >= -1e-6).all(-1).all(-1), (steps <= 1e-6).all(-1).all(-1)
    assert (rising | falling).all()
    assert 0.4 < falling.float().mean().item() < 0.6
    assert (x.amax((1, 2)) - x.amin((1, 2))).mean() < 0.9 * (x.amax() - x.amin())  # crops see part of the ramp


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def clusters(n, d=32, classes=4, seed=0):
    centres = 3 * torch.randn(classes, d, generator=torch.Generator().manual_seed(123))  # shared by every split
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, d, generator=g), y


def test_linear_probe_and_knn_separate_clustered_features():
    (train_f, train_y), (test_f, test_y) = clusters(400), clusters(200, seed=1)
    assert ssl_min.linear_probe(train_f, train_y, test_f, test_y, epochs=50) > 0.95
    assert ssl_min.knn_accuracy(train_f, train_y, test_f, test_y, k=20) > 0.95
    shuffled = train_y[torch.randperm(400, generator=torch.Generator().manual_seed(0))]
    assert ssl_min.linear_probe(train_f, shuffled, test_f, test_y, epochs=50) < 0.5  # no signal, no accuracy


def test_multiview_probe_features_average_one_clean_and_augmented_views():
    backbone = ssl_min.ResNet18(torch.full((3,), 0.5), torch.full((3,), 0.25)).eval()
    images, seeded = colourful(4), lambda: torch.Generator().manual_seed(0)  # noqa: E731
    clean, three = ssl_min.features(backbone, images), ssl_min.features(backbone, images, 3, seeded())
    views = ssl_min.augment(images, 2, seeded())
    with torch.no_grad():
        by_hand = (backbone(images.float() / 255) + backbone(views[0]) + backbone(views[1])) / 3
    assert three.shape == clean.shape == (4, 512) and not torch.allclose(three, clean)
    assert torch.allclose(three, by_hand, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The command line, end to end on real CIFAR-10 images, and its robustness
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory):
    """A class-balanced CIFAR-10 image folder: 50 training and 30 test images per class (links to the real files)."""
    if not (CIFAR / "train").is_dir():
        pytest.skip(f"real CIFAR-10 image folder not found at {CIFAR}")
    return Path(sweeps.smoke_data(CIFAR, train=50, test=30, root=tmp_path_factory.mktemp("cifar10_small")))


def run(*args, env=None, **kw):
    return subprocess.run([sys.executable, str(REPO / "ssl_min.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=900, **kw)


def assert_one_line_error(result, *words, code=2):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


QUICK = ["--views", "2", "--proj-dim", "64", "--batch-size", "100", "--eval-every", "0"]


@pytest.fixture(scope="session")
def finished_run(cifar_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "e2e"
    result = run("--data-dir", cifar_small, *QUICK, "--epochs", "1", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_cli_end_to_end_writes_every_output_and_beats_chance(finished_run):
    out, result = finished_run
    config = json.loads((out / "config.json").read_text())
    assert config["views"] == 2 and config["beta"] == pytest.approx(5 / 64)  # the documented default rule
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"loss", "invariance", "orthogonality", "erank", "views_per_s", "knn_acc"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(log[0]["invariance"] + log[0]["orthogonality"], rel=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["probe_acc"] > 0.2 and results["knn_acc"] > 0.15  # chance is 0.1 on 300 test images
    assert results["device"].startswith("cpu") and results["versions"]["torch"] == torch.__version__
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # plain types only
    assert ckpt["epoch"] == 1 and ckpt["config"] == config
    assert "linear probe" in result.stdout and "epoch   1/1" in result.stdout


def test_finished_run_is_not_clobbered(finished_run, cifar_small):
    out, _ = finished_run
    before = (out / "results.json").read_bytes()
    assert_one_line_error(run("--data-dir", cifar_small, *QUICK, "--epochs", "1", "--out-dir", out), "finished", "--overwrite")
    assert (out / "results.json").read_bytes() == before


def copy_unfinished(finished_run, tmp_path):
    out = tmp_path / "unfinished"
    out.mkdir()
    for name in ("config.json", "log.jsonl", "checkpoint.pt"):
        (out / name).write_bytes((finished_run[0] / name).read_bytes())
    return out


def test_checkpoint_of_another_configuration_is_refused_and_kept(finished_run, cifar_small, tmp_path):
    out = copy_unfinished(finished_run, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    result = run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--beta", "0.5", "--out-dir", out)
    assert_one_line_error(result, "another configuration", "--beta")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_corrupt_checkpoint_is_refused_and_kept(finished_run, cifar_small, tmp_path):
    out = copy_unfinished(finished_run, tmp_path)
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:5000])
    before = (out / "checkpoint.pt").read_bytes()
    assert_one_line_error(run("--data-dir", cifar_small, *QUICK, "--epochs", "2", "--out-dir", out), "cannot read", "checkpoint.pt")
    assert (out / "checkpoint.pt").read_bytes() == before


BAD_OPTIONS = [
    (["--views", "1"], "--views"), (["--proj-dim", "0"], "--proj-dim"), (["--beta", "-0.1"], "--beta"),
    (["--beta", "nan"], "--beta"), (["--train-fraction", "0"], "--train-fraction"),
    (["--train-fraction", "1.5"], "--train-fraction"), (["--batch-size", "1"], "--batch-size"), (["--epochs", "0"], "--epochs"),
    (["--dataset", "imagenet"], "--dataset"), (["--loss", "simclr"], "--loss"), (["--device", "tpu"], "--device"),
    (["--views", "four"], "--views"), (["--lr", "0"], "--lr"),
]


@pytest.mark.parametrize("argv,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_gets_one_line_and_writes_nothing(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        ssl_min.cli([*argv, "--out-dir", str(tmp_path / "out")])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ssl_min.cli(["--device", "cuda", "--out-dir", str(tmp_path / "out")])
    assert "--device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_batch_larger_than_the_pretraining_set_is_refused(cifar_small, tmp_path):
    result = run("--data-dir", cifar_small, "--train-fraction", "0.1", "--batch-size", "64", "--out-dir", tmp_path / "out")
    assert_one_line_error(result, "--batch-size 64", "50 pretraining images")
    assert not (tmp_path / "out").exists()


def png(path, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    Image.new("RGB", size, (120, 30, 200)).save(path)


def bad_folders(root):
    """Each case: a broken image folder and words its error must name."""
    cases = {"missing": (root / "nope", ["does not exist"])}
    (root / "empty").mkdir(parents=True)
    cases["empty"] = (root / "empty", ["train", "missing"])
    (root / "flat" / "train").mkdir(parents=True)
    png(root / "flat" / "train" / "a.png")
    cases["no class folders"] = (root / "flat", ["no class folders"])
    png(root / "notest" / "train" / "cat" / "a.png")
    cases["no test split"] = (root / "notest", ["test", "missing"])
    for split in ("train", "test"):
        png(root / "junk" / split / "cat" / "a.png")
    (root / "junk" / "train" / "cat" / "notes.txt").write_text("not an image")
    cases["non-image file"] = (root / "junk", ["notes.txt", "cannot read"])
    for split in ("train", "test"):
        png(root / "sizes" / split / "cat" / "a.png")
    png(root / "sizes" / "train" / "cat" / "b.png", (40, 30))
    cases["mixed sizes"] = (root / "sizes", ["b.png", "40x30", "resize"])
    png(root / "classes" / "train" / "cat" / "a.png")
    png(root / "classes" / "test" / "dog" / "a.png")
    cases["different classes"] = (root / "classes", ["different class folders"])
    png(root / "noimages" / "train" / "cat" / "a.png")
    (root / "noimages" / "test" / "cat").mkdir(parents=True)
    cases["no images"] = (root / "noimages", ["hold no images"])
    return cases


def test_bad_data_dirs_get_one_clear_line(tmp_path, capsys):
    for name, (folder, words) in bad_folders(tmp_path / "data").items():
        with pytest.raises(SystemExit) as exit:
            ssl_min.cli(["--data-dir", str(folder), "--out-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1, (name, err)
        assert all(w in err[0] for w in ["--data-dir", *words]), (name, err)
        assert not (tmp_path / "out").exists()


def test_no_internet_and_no_data_says_to_pass_data_dir(tmp_path):
    dead = "http://127.0.0.1:9"  # nothing listens there: the download fails at once, as offline
    result = run("--out-dir", tmp_path / "out", env={"HOME": str(tmp_path), "http_proxy": dead, "https_proxy": dead,
                                                     "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "no_proxy": "", "NO_PROXY": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "could not download cifar10" in result.stderr and "--data-dir" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses, atomic writes, interruption and exact resume, determinism
# ---------------------------------------------------------------------------------------------------------------
def tiny(cifar_small, out, **kw):
    settings = dict(data_dir=str(cifar_small), subset=10, views=2, proj_dim=32, batch_size=25, epochs=2, eval_every=0)
    return ssl_min.Config(**{**settings, **kw}, out_dir=str(out))


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(cifar_small, tmp_path, monkeypatch):
    calls, real = [], ssl_min.ssl_loss

    def poisoned(z, beta, loss="barlow"):  # fine for epoch 1 (4 steps), then NaN from epoch 2, step 2
        calls.append(1)
        total, inv, orth = real(z, beta, loss)
        return (total * float("nan"), inv, orth) if len(calls) >= 6 else (total, inv, orth)

    monkeypatch.setattr(ssl_min, "ssl_loss", poisoned)
    with pytest.raises(ssl_min.UserError, match=r"non-finite at epoch 2, step 2: lower --beta") as error:
        ssl_min.main(tiny(cifar_small, tmp_path / "out"))
    assert error.value.code == 1
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["backbone"].values() if t.is_floating_point())
    assert not (tmp_path / "out" / "results.json").exists()


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"good")

    def disk_full(path):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ssl_min.UserError, match="No space left"):
        ssl_min.write_atomic(target, disk_full)
    assert target.read_bytes() == b"good" and list(tmp_path.iterdir()) == [target]


def test_same_seed_same_trajectory_other_seed_another(cifar_small, tmp_path):
    runs = [ssl_min.main(tiny(cifar_small, tmp_path / str(i), epochs=1, seed=s)) for i, s in enumerate((0, 0, 1))]
    losses = [[e["loss"] for e in r["log"]] for r in runs]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert runs[0]["probe_acc"] == runs[1]["probe_acc"]


def comparable(log):
    return [{k: v for k, v in e.items() if k not in ("views_per_s", "time_s")} for e in log]


RESUME_ARGS = ["--subset", "20", "--views", "2", "--proj-dim", "32", "--batch-size", "20", "--epochs", "2", "--eval-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(cifar_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run("--data-dir", cifar_small, *RESUME_ARGS, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_resumes_to_exactly_the_uninterrupted_result(uninterrupted, cifar_small, tmp_path, sig):
    args, out = ["--data-dir", cifar_small, *RESUME_ARGS], tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "ssl_min.py"), *map(str, args), "--out-dir", str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "log.jsonl").exists() and process.poll() is None:  # let epoch 1 finish, stop inside epoch 2
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130 and "interrupted at epoch 2" in stderr and "Traceback" not in stderr, stderr
    assert not (out / "results.json").exists()
    resumed = run(*args, "--out-dir", out)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (uninterrupted, out))
    for part in ("backbone", "projector"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(a["rng"], b["rng"])
    assert comparable(a["log"]) == comparable(b["log"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (uninterrupted, out))
    assert ra["probe_acc"] == rb["probe_acc"] and comparable(ra["log"]) == comparable(rb["log"])


def test_overwrite_replaces_a_finished_run(cifar_small, tmp_path):
    first = ssl_min.main(tiny(cifar_small, tmp_path / "out", epochs=1))
    second = ssl_min.main(tiny(cifar_small, tmp_path / "out", epochs=1, beta=0.5, overwrite=True))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["beta"] == 0.5 and second["log"][0]["loss"] != first["log"][0]["loss"]


# ---------------------------------------------------------------------------------------------------------------
# Notebooks, executed in smoke mode
# ---------------------------------------------------------------------------------------------------------------
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_in_smoke_mode(path, monkeypatch):
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    if not path.name.startswith("01_") and not (CIFAR / "train").is_dir():
        pytest.skip(f"smoke runs need the real CIFAR-10 image folder at {CIFAR}")
    monkeypatch.setenv("SSL_MIN_SMOKE", "1")
    monkeypatch.setenv("SSL_MIN_CIFAR10", str(CIFAR))
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on any error
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert path.name.startswith("01_") or "smoke" in text.lower()  # experiment notebooks say they ran smoke runs
