"""Export for deployment: every artifact, the exporter choice, the guard, every architecture."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetransfer import export as export_mod
from edgetransfer.backbones import ARCHS
from edgetransfer.cli import cli
from edgetransfer.errors import DataError, ExportError
from edgetransfer.export import ExportConfig, export
from edgetransfer.info import describe
from edgetransfer.manifest import ARTIFACTS, read_manifest
from edgetransfer.parity import MAX_TOP1_DROP, PROBS_ATOL
from edgetransfer.verify import verify

from .conftest import DIGITS, made_once, make_images

BUNDLE_RUN = ("head", "bundle")  # only in folders of runs adapted on a bundle (test_bundle.py)


@pytest.fixture(scope="session")
def full_export(digits_run, tmp_path_factory):
    """(EXPORT_DIR with every artifact but .pte, the result's report and notes as export.json
    has them): made once per run, whichever worker comes first."""
    with made_once(tmp_path_factory, "full_export") as (folder, fill):
        out = folder / "export"
        if fill:
            cfg = dict(pt2=True, int8=True, fp16=True, optimize=True)
            export(ExportConfig(run_dir=digits_run, out=out, **cfg))
        report = json.loads((out / "export.json").read_text())
        return out, SimpleNamespace(report=report, notes=report["notes"])


def test_every_artifact_is_written_and_carries_the_manifest(full_export):
    out, res = full_export
    for kind, name in ARTIFACTS.items():
        if kind in ("pte", "pte_int8"):  # lowering is slow: test_executorch/test_int8 have theirs
            continue
        if kind in BUNDLE_RUN:
            assert not (out / name).exists(), name
            continue
        assert (out / name).is_file(), name
        m = read_manifest(out / name)
        assert m.labels == ["eight", "five", "nine", "seven", "six"]
    assert read_manifest(out / "model.raw.onnx").io["input"] == "image"
    report = json.loads((out / "export.json").read_text())
    assert report["exporter"] == "dynamo"
    assert set(report["artifacts"]) == set(ARTIFACTS) - {"weights", "pte", "pte_int8", *BUNDLE_RUN}
    assert len(report["artifacts"]["int8"]["sha256"]) == 64


def test_guard_measures_and_recommends(full_export):
    out, res = full_export
    guard = res.report["guard"]
    assert set(guard["artifacts"]) == {"fp32", "optimized", "int8", "fp16"}
    for row in guard["artifacts"].values():
        assert 0 <= row["top1"] <= 1 and row["latency_ms_p50"] > 0
    rec = guard["artifacts"][guard["recommended"]]
    assert rec["ok"] and rec["top1_drop"] <= 0.01
    assert any(n.startswith(f"recommended: {rec['file']}") for n in res.notes)
    assert describe(out)["recommended"] == rec["file"]


def test_guard_times_the_variants_round_robin():
    """Every variant runs once per round, so load that comes and goes hits them alike."""
    import numpy as np

    from edgetransfer.quantize import LATENCY_WARMUP, latency_ms

    calls = []

    def fake(name):
        def run(x):
            assert x.shape == (1, 3)
            calls.append(name)

        return run

    out = latency_ms({"fp32": fake("a"), "int8": fake("b")}, np.zeros((1, 3)), runs=4)
    assert set(out) == {"fp32", "int8"} and all(p50 <= p90 for p50, p90 in out.values())
    assert calls == ["a", "b"] * (LATENCY_WARMUP + 4)


def test_verify_checks_every_runtime(full_export):
    out, res = full_export
    report = verify(out, DIGITS, write=False, trust_torchscript=True)
    rows = {r.runtime: r for r in report.runtimes}
    assert set(rows) == {"torchscript", "pt2", "onnxruntime", "raw", "optimized", "fp16", "int8"}
    for name in ("torchscript", "pt2", "onnxruntime", "raw", "optimized", "fp16"):
        assert rows[name].passed, (name, report.table())
    assert rows["raw"].probs_max_abs <= PROBS_ATOL
    # int8 is judged by accuracy, consistently with the export guard
    guard_drop = res.report["guard"]["artifacts"]["int8"]["top1_drop"]
    assert rows["int8"].top1_drop == pytest.approx(guard_drop)
    # the bound export used, at least one image on 40 (parity.allowed_drop)
    assert rows["int8"].allowed_drop == pytest.approx(max(MAX_TOP1_DROP, 1 / 40))
    assert rows["int8"].passed == (guard_drop <= rows["int8"].allowed_drop + 1e-9)
    assert sum(rows["int8"].flips.values()) == round((1 - rows["int8"].top1_agreement) * 40)


def test_perturbed_raw_model_fails_verify(digits_export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(digits_export, broken)
    model = onnx.load(str(broken / "model.raw.onnx"))
    for t in model.graph.initializer:  # the folded normalisation constants
        if t.name.endswith("shift") or "shift" in t.name:
            arr = onnx.numpy_helper.to_array(t) + np.float32(0.01)
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
            break
    else:
        pytest.fail("no shift constant in the raw model")
    onnx.save(model, str(broken / "model.raw.onnx"))
    report = verify(broken, DIGITS, write=False)
    assert [r.runtime for r in report.runtimes if not r.passed] == ["raw"]


def test_auto_exporter_falls_back(digits_run, tmp_path, monkeypatch):
    real = export_mod.export_onnx

    def dynamo_breaks(model, manifest, example, path, exporter, opset=None):
        if exporter == "dynamo":
            raise ExportError("simulated dynamo failure")
        return real(model, manifest, example, path, exporter, opset)

    monkeypatch.setattr(export_mod, "export_onnx", dynamo_breaks)
    res = export(ExportConfig(run_dir=digits_run, out=tmp_path / "e", raw=False, torchscript=False))
    assert res.report["exporter"] == "torchscript"
    assert any(
        "used the torchscript exporter; dynamo: simulated dynamo failure" in n for n in res.notes
    )
    with pytest.raises(ExportError, match="ONNX export of simple_cnn failed: dynamo: simulated"):
        export(ExportConfig(run_dir=digits_run, out=tmp_path / "f", exporter="dynamo"))


def test_int8_needs_data(digits_run, tmp_path):
    (tmp_path / "run").mkdir()
    for f in digits_run.iterdir():
        if f.is_file() and f.name != "run.json":
            shutil.copy(f, tmp_path / "run" / f.name)
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--int8"])
    assert res.exit_code == 1
    assert res.output == (
        "Error: --int8/--fp16 need images for calibration and the accuracy "
        "check; pass --data DATA_DIR\n"
    )


def test_export_cli_flags_select_artifacts(digits_run, tmp_path):
    res = CliRunner().invoke(
        cli, ["export", str(digits_run), "--pt2", "--out", str(tmp_path / "e"), "--golden", "0"]
    )
    assert res.exit_code == 0, res.output
    names = {p.name for p in (tmp_path / "e").iterdir()}
    assert "model.pt2" in names and "model.onnx" not in names and "golden" not in names


# Listed by hand on purpose: registering an architecture without adding it here fails the
# meta-test below. Per architecture: the input size (large backbones at a small one), the ONNX
# exporter and whether a TorchScript artifact is made. The default architecture, resnet18 and
# the two small ones take the default path (the dynamo exporter, checked to be the one used,
# and a TorchScript trace). mobilenet_v3_large and efficientnet_b0 take a cheaper one (a third
# of the time): the TorchScript ONNX exporter (auto's fallback, itself tested by
# test_auto_exporter_falls_back) and no TorchScript trace, whose check costs them ~15 s of JIT
# compilation; their ONNX models (fp32 and raw) are still verified against eager.
TESTED_ARCHS = {
    "mobilenet_v3_small": (64, "auto", True),
    "mobilenet_v3_large": (64, "torchscript", False),
    "resnet18": (64, "auto", True),
    "efficientnet_b0": (64, "torchscript", False),
    "simple_cnn": (32, "auto", True),
    "tiny_test": (32, "auto", True),
}


@pytest.fixture(scope="module")
def arch_data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("archdata") / "d", per_class=6, size=(70, 60))


@pytest.mark.parametrize("arch", sorted(TESTED_ARCHS))
def test_every_architecture_exports_and_verifies(arch, arch_data, tmp_path):
    """Each registered architecture, head trained, through export and verify."""
    from edgetransfer.adapt import DEFAULT_ARCH, AdaptConfig, adapt

    size, exporter, torchscript = TESTED_ARCHS[arch]
    if arch == DEFAULT_ARCH:
        assert (exporter, torchscript) == ("auto", True)  # the default goes the default way
    adapt(
        AdaptConfig(
            data_dir=arch_data,
            out=tmp_path / "run",
            arch=arch,
            weights="none",
            epochs=5,
            image_size=size,
            use_cache=False,
            report=False,  # its plots are the same for every architecture (test_report.py)
        )
    )
    res = export(
        ExportConfig(
            run_dir=tmp_path / "run",
            out=tmp_path / "exp",
            exporter=exporter,
            torchscript=torchscript,
        )
    )
    assert res.report["exporter"] == ("dynamo" if exporter == "auto" else exporter), res.notes
    report = verify(tmp_path / "exp", arch_data, write=False, trust_torchscript=True)
    assert report.passed, report.table()
    runtimes = {"onnxruntime", "raw"} | ({"torchscript"} if torchscript else set())
    assert {r.runtime for r in report.runtimes} == runtimes


# Covered by their own test at full size, with real weights (too slow to repeat here).
TESTED_ELSEWHERE = {"efficientnet_lite0": "test_efficientnet_lite.py"}


def test_meta_every_registered_arch_is_covered():
    assert set(TESTED_ARCHS) | set(TESTED_ELSEWHERE) == set(ARCHS)


def test_int8_alone_keeps_its_fp32_baseline(digits_run, tmp_path):
    res = export(
        ExportConfig(
            run_dir=digits_run,
            out=tmp_path / "e",
            onnx=False,
            torchscript=False,
            raw=False,
            int8=True,
            golden=0,
        )
    )
    rec = res.report["guard"]["artifacts"][res.report["guard"]["recommended"]]["file"]
    assert (tmp_path / "e" / rec).is_file()
    assert (tmp_path / "e" / "model.onnx").is_file() and (
        tmp_path / "e" / "model.int8.onnx"
    ).is_file()


def test_optimize_alone(digits_run, tmp_path):
    res = CliRunner().invoke(
        cli, ["export", str(digits_run), "--optimize", "--out", str(tmp_path / "e")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e" / "model.opt.onnx").is_file()


def test_export_data_with_other_classes_maps_by_name(digits_run, tmp_path):
    sub = tmp_path / "sub"
    for name in ("six", "nine"):  # a folder with two of the five classes, in another order
        shutil.copytree(DIGITS / name, sub / name)
    # model.raw.onnx and model.pt do not depend on --data: not made here
    cfg = dict(run_dir=digits_run, out=tmp_path / "e", raw=False, torchscript=False)
    res = export(ExportConfig(**cfg, data_dir=sub, int8=True))
    index = json.loads((tmp_path / "e" / "golden" / "golden.json").read_text())
    assert {c["label"] for c in index["cases"]} <= {"six", "nine"}
    assert res.report["guard"]["artifacts"]["fp32"]["top1"] >= 0.8
    bad = tmp_path / "bad"
    shutil.copytree(DIGITS / "six", bad / "six")
    (bad / "cat").mkdir()
    shutil.copy(next((DIGITS / "six").iterdir()), bad / "cat" / "x.png")
    with pytest.raises(DataError, match="--data has classes the model does not know: cat"):
        export(ExportConfig(run_dir=digits_run, out=tmp_path / "f", data_dir=bad))
