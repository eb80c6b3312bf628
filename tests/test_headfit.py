"""The numpy head solver against the torch path (adapt._train_head through train.fit with
solver lbfgs) on the same features: same optimum, same epochs, same early stop."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgetransfer import adapt, headfit, train
from edgetransfer.data import Sample
from edgetransfer.errors import DataError
from edgetransfer.headfit import Standardization, balanced_class_weights, fit_head

RTOL = 1e-4  # relative distance between the two heads, |ΔW, Δb| / |W, b| (the target)


def _features(n=150, d=48, classes=4, m=60, views=1, spread=0.35, seed=0, skew=False,
              mix=0.0):  # fmt: skip
    """Gaussian clusters, scaled and shifted per dimension as raw backbone features are; with
    `views`, noisy copies of every training vector; with `skew`, unequal class sizes; with
    `mix` (0..1), correlated dimensions (an ill-conditioned problem: several epochs)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (classes, d))
    p = np.arange(1, classes + 1) ** 2 if skew else np.ones(classes)
    y = rng.choice(classes, n, p=p / p.sum())
    yv = rng.integers(0, classes, m)
    x = centres[y] + rng.normal(0, 1, (n, d))
    xv = centres[yv] + rng.normal(0, 1, (m, d))
    if mix:
        mixing = rng.normal(0, 1, (d, d)) * mix ** np.arange(d)[:, None]
        x, xv = x @ mixing, xv @ mixing
    scale, shift = rng.uniform(0.2, 5, d), rng.normal(0, 3, d)
    x, xv = x * scale + shift, xv * scale + shift
    if views > 1:
        x = np.stack([x] + [x + rng.normal(0, 0.5, x.shape) * scale for _ in range(views - 1)])
    return x.astype(np.float32), y, xv.astype(np.float32), yv


def _torch_head(monkeypatch, x, y, xv, yv, classes, *, balance=False, epochs=30, patience=10,
                dtype=torch.float32, loss=None):  # fmt: skip
    """adapt's own `head` training on these features: (folded weight, bias, TrainResult, the
    head's initial (weight, bias)). View 0 is the clean one; the augmented views come through
    a stand-in for the feature extractor."""
    views = x.shape[0] if x.ndim == 3 else 1
    clean = x[0] if views > 1 else x
    train_s = [Sample(Path(f"t{i}"), int(c), "train") for i, c in enumerate(y)]
    val_s = [Sample(Path(f"v{i}"), int(c), "val") for i, c in enumerate(yv)]
    by_path = {s.path: torch.from_numpy(v).to(dtype) for s, v in zip(train_s, clean, strict=True)}
    by_path |= {s.path: torch.from_numpy(v).to(dtype) for s, v in zip(val_s, xv, strict=True)}

    def extract(features, samples, pre, *, view, **kw):
        return SimpleNamespace(vectors=torch.from_numpy(x[view]).to(dtype), bad=[])

    monkeypatch.setattr(adapt, "extract", extract)
    cfg = adapt.AdaptConfig(data_dir=Path("."), out=Path("run"), views=views, balance=balance)
    tcfg = train.TrainConfig(
        epochs=epochs, patience=patience, solver="lbfgs", weight_decay=adapt.HEAD_L2
    )
    run = SimpleNamespace(
        tcfg=tcfg, train_s=train_s, val_s=val_s, clean=by_path, augment="light",
        teacher_logits=None,
    )  # fmt: skip
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[-1], classes).to(dtype)
    init = tuple(p.detach().double().numpy().copy() for p in head.parameters())
    built = SimpleNamespace(head=head, features=None, pre=None, backbone_id="test")
    result, _ = adapt._train_head(  # (the training result, the features it fitted on)
        cfg,
        built,
        run,
        loss or adapt._base_loss(cfg, run, classes),
        dict(cfg=tcfg, checkpoint=None, resume=False, progress=False, on_step=None),
        lambda name: contextlib.nullcontext(),
    )
    return head.weight.detach().double().numpy(), head.bias.detach().double().numpy(), result, init


def _distance(fit, weight, bias) -> float:
    a = np.c_[fit.weight, fit.bias].astype(np.float64)
    b = np.c_[weight, bias]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _weighted_ce(weights: np.ndarray | None, dtype=torch.float64):
    """adapt._base_loss in another dtype (its class weights are float32)."""
    w = None if weights is None else torch.from_numpy(weights).to(dtype)
    return lambda logits, y, idx: torch.nn.functional.cross_entropy(logits, y, weight=w)


def _assert_same_run(got, ref, rtol):
    assert [h["epoch"] for h in got.history] == [h["epoch"] for h in ref.history]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(
            [h[key] for h in got.history], [h[key] for h in ref.history], rtol=rtol
        )
    for key in ("train_top1", "val_top1"):
        assert [h[key] for h in got.history] == [h[key] for h in ref.history]
    assert (got.best_epoch, got.stopped_early) == (ref.best_epoch, ref.stopped_early)
    assert got.val_top1 == ref.val_top1


CASES = {
    "plain": dict(),
    "balance": dict(balance=True, skew=True),
    "views": dict(views=3),
    # correlated features: several epochs, and validation top-1 peaks at epoch 3
    "patience": dict(patience=3, n=300, d=32, spread=0.3, mix=0.8),
}


@pytest.mark.parametrize("name", CASES)
def test_same_start_same_steps_as_the_torch_path(monkeypatch, name):
    """In float64 and from torch's initial head, the numpy path takes the torch path's L-BFGS
    steps: the same history epoch by epoch, the same best epoch and early stop (patience or
    convergence), the same head."""
    case = dict(CASES[name])
    balance, patience = case.pop("balance", False), case.pop("patience", 10)
    x, y, xv, yv = _features(**case)
    weights = balanced_class_weights(y, 4) if balance else None
    w, b, ref, init = _torch_head(monkeypatch, x, y, xv, yv, 4, patience=patience,
                                  dtype=torch.float64, loss=_weighted_ce(weights))  # fmt: skip
    got = fit_head(x, y, xv, yv, classes=4, l2=adapt.HEAD_L2, class_weights=weights,
                   patience=patience, init=init)  # fmt: skip
    assert len(ref.history) > 1  # several epochs: the schedule is compared, not one step
    _assert_same_run(got, ref, rtol=1e-6)
    assert _distance(got, w, b) < 1e-6  # the folded head is float32
    np.testing.assert_allclose(got.val_logits, ref.val_logits.numpy(), rtol=1e-5, atol=1e-5)
    if name == "patience":  # stopped by patience, not by convergence
        assert got.stopped_early and len(got.history) == got.best_epoch + 3


@pytest.mark.parametrize("name", ["plain", "balance", "views"])
def test_as_the_full_install_runs_it(monkeypatch, name):
    """The torch path as adapt runs it (float32, adapt's own --balance weights): on these
    well-conditioned features the same epochs and a head within RTOL. (On ill-conditioned
    ones float32 rounding alone moves L-BFGS's path by more; the optimum test holds there.)"""
    case = dict(CASES[name])
    balance = case.pop("balance", False)
    x, y, xv, yv = _features(**case)
    w, b, ref, init = _torch_head(monkeypatch, x, y, xv, yv, 4, balance=balance)
    got = fit_head(
        x, y, xv, yv, classes=4, l2=adapt.HEAD_L2, init=init,
        class_weights=balanced_class_weights(y, 4) if balance else None,
    )  # fmt: skip
    _assert_same_run(got, ref, rtol=1e-4)
    assert _distance(got, w, b) < RTOL


def _tight(monkeypatch) -> dict:
    """Both paths solve to a gradient of 1e-10 in one long epoch. At the shipped tolerance
    (no gradient entry above 1e-5, and l2 = 1e-3) the optimum is only pinned to about
    1e-5 / 1e-3 in its flattest directions: two torch runs from different random heads end
    ~1e-3 apart, so the optimum is compared here."""
    for mod in (train, headfit):
        monkeypatch.setattr(mod, "LBFGS_ITERATIONS", 3000)
        monkeypatch.setattr(mod, "LBFGS_MAX_EVALS", 4000)
        monkeypatch.setattr(mod, "LBFGS_TOLERANCE", 1e-10)
        monkeypatch.setattr(mod, "LBFGS_TOLERANCE_CHANGE", 1e-30)
    return dict(epochs=1, patience=0, tolerance_grad=1e-10)


@pytest.mark.parametrize("name", ["balance", "views"])
def test_the_same_optimum_from_any_start(monkeypatch, name):
    """numpy from a zero head, torch from its random one: the same optimum within RTOL and the
    same validation top-1. A wrong penalty or unweighted classes miss it."""
    tight = _tight(monkeypatch)
    case = dict(CASES[name])
    balance = case.pop("balance", False)
    x, y, xv, yv = _features(**case)
    weights = balanced_class_weights(y, 4) if balance else None
    w, b, ref, _ = _torch_head(monkeypatch, x, y, xv, yv, 4, dtype=torch.float64,
                               loss=_weighted_ce(weights), epochs=1, patience=0)  # fmt: skip
    got = fit_head(x, y, xv, yv, classes=4, l2=adapt.HEAD_L2, class_weights=weights, **tight)
    assert _distance(got, w, b) < RTOL
    assert got.val_top1 == ref.val_top1
    wrong_l2 = fit_head(x, y, xv, yv, classes=4, l2=1.1 * adapt.HEAD_L2,
                        class_weights=weights, **tight)  # fmt: skip
    assert _distance(wrong_l2, w, b) > 10 * RTOL
    if balance:
        unweighted = fit_head(x, y, xv, yv, classes=4, l2=adapt.HEAD_L2, **tight)
        assert _distance(unweighted, w, b) > 10 * RTOL


def test_standardization_is_train_standardize():
    x = np.random.default_rng(0).normal(3, 2, (30, 6)).astype(np.float32)
    x[:, 2] = 5.0  # a dead feature keeps scale 1
    ours, theirs = Standardization.of(x), train.Standardize(torch.from_numpy(x))
    np.testing.assert_allclose(ours.mean, theirs.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.std, theirs.std.numpy(), rtol=1e-6)
    assert ours.std[2] == 1.0


def test_deterministic_and_folded():
    x, y, xv, yv = _features(views=2)
    a, b = (fit_head(x, y, xv, yv, classes=4, l2=1e-3) for _ in range(2))
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert a.history == b.history
    # the folded head on raw features gives the logits of the standardised one
    np.testing.assert_allclose(a.logits(xv), a.val_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["train", "view", "val"])
def test_non_finite_features_are_one_line(where):
    x, y, xv, yv = _features(views=2)
    (x[0] if where == "train" else x[1] if where == "view" else xv)[7, 3] = np.nan
    with pytest.raises(DataError) as e:
        fit_head(x, y, xv, yv, classes=4, l2=1e-3)
    msg = str(e.value)
    assert "\n" not in msg and "sample 7" in msg and "NaN or infinite" in msg
    assert ("validation" in msg) == (where == "val")


def test_bad_labels_and_shapes_are_one_line():
    x, y, xv, yv = _features()
    with pytest.raises(DataError, match="labels must lie in 0..3"):
        fit_head(x, y + 1, xv, yv, classes=4, l2=1e-3)
    with pytest.raises(DataError, match="validation features must be"):
        fit_head(x, y, xv[:, :5], yv, classes=4, l2=1e-3)
    with pytest.raises(DataError, match="class weights"):
        fit_head(x, y, xv, yv, classes=4, l2=1e-3, class_weights=np.ones(3))


@pytest.fixture(scope="module")
def demo_features():
    """The shipped source model's features of the sample digits, adapt's train/val split."""
    from edgetransfer.backbones import get_arch, load_source, split
    from edgetransfer.data import scan
    from edgetransfer.features import extract

    from .conftest import DIGITS, SOURCE

    spec = get_arch("simple_cnn")
    source = load_source("simple_cnn", str(SOURCE))
    features, _ = split(spec, source.model)
    features.eval()
    data = scan(DIGITS)
    out = []
    for name in ("train", "val"):
        samples = data.split(name)
        vectors = extract(features, samples, source.preprocessing or spec.preprocessing,
                          backbone_id="headfit-test", use_cache=False).vectors  # fmt: skip
        out += [vectors.numpy(), np.array([s.label for s in samples])]
    return out


def test_demo_features_same_top1_and_optimum(monkeypatch, demo_features):
    """On real features (the demo's): at the shipped settings numpy (zero start) and the torch
    path (its random start) give the same validation top-1; solved tightly, the same head."""
    x, y, xv, yv = demo_features
    classes = int(y.max()) + 1
    _, _, ref, _ = _torch_head(monkeypatch, x, y, xv, yv, classes)
    got = fit_head(x, y, xv, yv, classes=classes, l2=adapt.HEAD_L2)
    assert got.val_top1 == ref.val_top1
    tight = _tight(monkeypatch)
    w, b, _, _ = _torch_head(monkeypatch, x, y, xv, yv, classes, dtype=torch.float64,
                             loss=_weighted_ce(None), epochs=1, patience=0)  # fmt: skip
    got = fit_head(x, y, xv, yv, classes=classes, l2=adapt.HEAD_L2, **tight)
    assert _distance(got, w, b) < RTOL


def test_a_restart_is_a_resume(tmp_path):
    """The numpy path writes no checkpoint: the fit is a pure function of the cached features,
    so a new process (what --resume starts) reaches the uninterrupted run's head bit for bit."""
    import subprocess
    import sys

    x, y, xv, yv = _features(views=2)
    np.savez(tmp_path / "f.npz", x=x, y=y, xv=xv, yv=yv)
    code = (
        "import sys, numpy as np; from edgetransfer.headfit import fit_head\n"
        "f = np.load(sys.argv[1])\n"
        "h = fit_head(f['x'], f['y'], f['xv'], f['yv'], classes=4, l2=1e-3)\n"
        "np.savez(sys.argv[2], w=h.weight, b=h.bias)\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, tmp_path / "f.npz", tmp_path / "h.npz"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert out.stdout.strip() == "[]"  # and no torch on the way
    here = fit_head(x, y, xv, yv, classes=4, l2=1e-3)
    there = np.load(tmp_path / "h.npz")
    assert np.array_equal(here.weight, there["w"]) and np.array_equal(here.bias, there["b"])
