"""Shared fixtures: synthetic image folders, and one adapted + exported digits model per session."""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetransfer.cli import cli
from edgetransfer.demo import sample_data, source_model

DIGITS = sample_data()
SOURCE = source_model()


@contextmanager
def made_once(tmp_path_factory, name: str):
    """Yield (folder, fill): one folder for all xdist workers of this run. The first worker to
    get here has fill=True and writes it; the others wait on the lock, then get fill=False and
    read what it wrote. So an expensive session fixture (ExecuTorch lowering, an int8 search)
    is made once per run, not once per worker (pytest-xdist's documented pattern)."""
    from filelock import FileLock  # a torch dependency

    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is popen-gwN inside the run's own folder
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / f"once-{name}", root / f"once-{name}.done"
    with FileLock(str(root / f"once-{name}.lock")):
        fill = not done.exists()
        if fill:  # a worker that failed to fill it left it incomplete: start again
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        yield folder, fill
        if fill:
            done.touch()


def run(*args, **kw):
    """The CLI in process: paths and numbers become strings, bytes (odd file names) stay bytes."""
    return CliRunner().invoke(cli, [a if isinstance(a, bytes) else str(a) for a in args], **kw)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory) -> Path:
    """The shipped digits source model as a bundle (simple_cnn: 128 features, 5 source classes),
    for the device path's tests (test_bundle.py, test_et_learn.py)."""
    out = tmp_path_factory.mktemp("bundle") / "digits.backbone.onnx"
    res = run("backbone", "simple_cnn", "--weights", SOURCE, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def patch_everywhere(monkeypatch, target: str, replacement) -> None:
    """Replace `target` ("edgetransfer.data.scan") in its module and in every edgetransfer
    module that imported it by name, so the code under test meets the replacement wherever it
    calls from; monkeypatch restores them all."""
    import edgetransfer

    for info in pkgutil.iter_modules(edgetransfer.__path__):
        if info.name != "__main__":
            importlib.import_module(f"edgetransfer.{info.name}")
    module, _, name = target.rpartition(".")
    original = getattr(sys.modules[module], name)
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("edgetransfer") and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, replacement)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Feature cache in a temp folder: tests never touch ~/.cache."""
    os.environ["EDGETRANSFER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_images(root: Path, per_class: int = 8, size=(40, 30), classes=COLORS, seed=0) -> Path:
    """Write a folder-per-class dataset of noisy coloured images (easy to tell apart)."""
    rng = np.random.default_rng(seed)
    for name, rgb in classes.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
            arr = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:02d}.png")
    return root


@pytest.fixture
def colors(tmp_path) -> Path:
    return make_images(tmp_path / "colors")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """The shipped source model adapted to the sample digits 5-9 (a trained model)."""
    from edgetransfer.adapt import AdaptConfig, adapt

    out = tmp_path_factory.mktemp("digits") / "run"
    adapt(AdaptConfig(data_dir=DIGITS, out=out, arch="simple_cnn", weights=str(SOURCE)))
    return out


@pytest.fixture(scope="session")
def digits_export(digits_run, tmp_path_factory) -> Path:
    from edgetransfer.export import ExportConfig, export

    out = tmp_path_factory.mktemp("digits_export") / "export"
    export(ExportConfig(run_dir=digits_run, out=out))
    return out


@pytest.fixture(scope="session")
def pte_export(digits_run, tmp_path_factory):
    """(EXPORT_DIR with model.onnx, model.pte and golden/, export's output): lowering to XNNPACK
    takes ~20 s, so test_executorch.py and the C++ tests share this one."""
    with made_once(tmp_path_factory, "pte") as (folder, fill):
        out = folder / "export"
        if fill:
            res = run("export", digits_run, "--onnx", "--executorch", "--out", out)
            assert res.exit_code == 0, res.output
            (folder / "output.txt").write_text(res.output)
        return out, (folder / "output.txt").read_text()


@pytest.fixture(scope="session")
def perturbed_export(pte_export, tmp_path_factory):
    """A copy of the export whose model.pte comes from the model with one weight changed, and
    batches 1..4 (so a batch of 5 runs in pieces)."""
    import torch

    from edgetransfer.pte import export_pte
    from edgetransfer.runs import load_run

    out, _ = pte_export
    with made_once(tmp_path_factory, "pte_broken") as (folder, fill):
        broken = folder / "export"
        if fill:
            shutil.copytree(out, broken)
            model, manifest = load_run(broken)
            with torch.no_grad():
                weight = next(p for n, p in model.named_parameters() if n.endswith("weight"))
                weight.view(-1)[0] += 0.5
            assert export_pte(model, manifest, broken / "model.pte", 4, [])["batch"] == [1, 4]
        return broken


def digits_config(out, **kw):
    """AdaptConfig for the shipped source model on the sample digits (3 epochs, no cache, no
    report.html: its plots cost ~0.5 s a run and test_report.py tests them)."""
    from edgetransfer.adapt import AdaptConfig

    base = dict(
        data_dir=DIGITS,
        out=out,
        arch="simple_cnn",
        weights=str(SOURCE),
        epochs=3,
        batch_size=16,
        use_cache=False,
        report=False,
    )
    base.update(kw)
    return AdaptConfig(**base)


def backbone(arch="simple_cnn"):
    """(spec, features) of a freshly built `arch` with a 5-class head split off."""
    from edgetransfer.backbones import get_arch, split

    spec = get_arch(arch)
    features, _ = split(spec, spec.build(5))
    return spec, features
