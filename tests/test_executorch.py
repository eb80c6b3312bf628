"""ExecuTorch: export --executorch writes a checked model.pte that carries its manifest; verify,
predict, evaluate and info know it; a perturbed or damaged .pte is caught."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetransfer import config
from edgetransfer.bench import find_runtimes, measure
from edgetransfer.errors import ExportError, InputError
from edgetransfer.golden import check_golden, load_golden
from edgetransfer.manifest import PTE_MANIFEST_METHOD, read_manifest
from edgetransfer.pte import export_pte
from edgetransfer.ptefile import read_pte
from edgetransfer.runs import load_run
from edgetransfer.runtime import OnnxClassifier, PteClassifier, PteProgram

from .conftest import DIGITS, run

BENCH_FAST = ["--runs", "3", "--warmup", "1", "--batch-size", "2", "--threads", "1"]


def test_export_writes_a_delegated_pte_and_reports_it(pte_export):
    out, output = pte_export
    assert (out / "model.pte").is_file() and (out / "model.onnx").is_file()
    report = json.loads((out / "export.json").read_text())
    et = report["executorch"]
    assert et["batch"] == [1, config.PTE_MAX_BATCH] and et["dynamic_batch"]
    # simple_cnn: every conv/relu/pool/linear in XNNPACK; only the flatten's view stays out
    assert et["outside_ops"] == ["aten.view_copy.default"] and et["outside_nodes"] == 1
    assert et["delegated_nodes"] >= 8 and et["delegated_share"] >= 0.8
    assert len(report["artifacts"]["pte"]["sha256"]) == 64
    assert report["notes"] == []
    assert (
        "model.pte: XNNPACK runs 9 of 10 nodes (aten.view_copy.default outside); batch 1..16"
        in output.splitlines()
    )


def test_manifest_travels_inside_the_pte(pte_export):
    out, _ = pte_export
    pte, onnx_m = read_manifest(out / "model.pte"), read_manifest(out / "model.onnx")
    assert pte.versions.pop("executorch") == "1.5.1"
    assert pte.to_dict() == onnx_m.to_dict()
    # the flatbuffer reader and the runtime read the same constant method
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(out / "model.pte")
    (text,) = program.load_method(PTE_MANIFEST_METHOD).execute([])
    assert read_pte(out / "model.pte").methods[PTE_MANIFEST_METHOD] == [text]


def test_batch_bound_is_the_documented_one(pte_export):
    """The delegate takes every batch up to --pte-max-batch (the lowering used to plan 15 for
    16), and a larger one only in pieces."""
    out, _ = pte_export
    program = PteProgram(out / "model.pte", "model.pte")
    high = config.PTE_MAX_BATCH
    assert (program.min_batch, program.max_batch) == (1, high)
    assert read_pte(out / "model.pte").inputs[0].shape == [high, 3, 32, 32]
    x = torch.randn(high + 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert program.method.execute([x[:high]])[0].shape == (high, 5)
    with pytest.raises(RuntimeError):
        program.method.execute([x])
    with pytest.raises(InputError, match="model.pte: an empty batch has no answers"):
        program.run(np.zeros((0, 3, 32, 32), np.float32))
    # PteClassifier runs 37 images as 16 + 16 + 5 and answers like onnxruntime
    batch = np.random.default_rng(0).standard_normal((37, 3, 32, 32), dtype=np.float32)
    got = PteClassifier(out / "model.pte").logits(batch)
    want = OnnxClassifier(out / "model.onnx").logits(batch)
    np.testing.assert_allclose(got, want, rtol=config.RTOL, atol=config.ATOL)


def test_a_loaded_program_outlives_its_bytes(pte_export):
    """The forward method lives in the program's memory: PteProgram keeps the program, so
    running it after the bytes it was loaded from are gone does not crash (a subprocess: a
    use-after-free is a segfault)."""
    out, _ = pte_export
    code = (
        "import gc, sys\n"
        "import numpy as np\n"
        "from edgetransfer.runtime import PteProgram\n"
        "programs = [PteProgram(open(sys.argv[1], 'rb').read(), 'model.pte') for _ in range(2)]\n"
        "gc.collect()\n"
        "x = np.zeros((2, 3, 32, 32), np.float32)\n"
        "for _ in range(20):\n"
        "    for p in programs:\n"
        "        assert p.run(x)[0].shape == (2, 5)\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out / "model.pte")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-500:]


def test_verify_runs_the_pte(pte_export):
    out, _ = pte_export
    res = run("verify", out, "--data", DIGITS)
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.output.splitlines() if ln.startswith("executorch"))
    assert row.split()[-1] == "ok"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and "executorch" in parity["runtimes"]


def test_predict_and_evaluate_on_pte_match_onnx(pte_export):
    out, _ = pte_export

    def top1(model):
        res = run("predict", model, DIGITS, "--json", "-q", "--topk", "1")
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
        return {r["path"]: r["topk"][0]["label"] for r in rows}

    pte, onnx_top1 = top1(out / "model.pte"), top1(out / "model.onnx")
    assert len(pte) == 200 and pte == onnx_top1
    res = run("evaluate", out / "model.pte", DIGITS, "--split", "val", "--json")
    assert res.exit_code == 0, res.output
    ours = json.loads(res.output[res.output.index("{") :])
    res = run("evaluate", out / "model.onnx", DIGITS, "--split", "val", "--json")
    assert ours["top1"] == json.loads(res.output[res.output.index("{") :])["top1"]


def test_info_describes_the_pte(pte_export):
    out, _ = pte_export
    res = run("info", out / "model.pte")
    assert res.exit_code == 0, res.output
    assert "input  input    float32  ['N', 3, 32, 32]" in res.output
    assert "output logits   float32  ['N', 5]" in res.output
    assert "batch  1..16" in res.output
    assert "XNNPACK runs 2 delegate call(s)" in res.output
    res = run("info", out, "--json")
    files = {f["file"]: f for f in json.loads(res.output)["files"]}
    pte = files["model.pte"]
    assert pte["batch"] == [1, 16] and 0 < pte["delegated_share"] <= 1 and len(pte["sha256"]) == 64


def test_perturbed_pte_fails_verify(perturbed_export):
    """A .pte exported from the model with one weight changed is caught by verify (exit 1),
    while model.onnx still passes."""
    broken = perturbed_export
    res = run("verify", broken, "--data", DIGITS)
    assert res.exit_code == 1
    rows = {ln.split()[0]: ln for ln in res.output.splitlines() if ln[:1].isalpha()}
    assert rows["onnxruntime"].endswith("ok") and not rows["executorch"].endswith("ok")
    assert "executorch" in res.output.splitlines()[-1]


def test_fixed_batch_when_the_dynamic_one_fails(pte_export, tmp_path, monkeypatch):
    """When the dynamic batch fails, model.pte gets a fixed batch of 1, said in a note, and
    the runtime feeds it one image at a time."""
    from edgetransfer import pte

    out, _ = pte_export
    model, manifest = load_run(out)
    real = pte._lower

    def no_dynamic(model, manifest, shape, low, high):
        if high > low:
            raise ExportError("torch.export failed: data-dependent batch")
        return real(model, manifest, shape, low, high)

    monkeypatch.setattr(pte, "_lower", no_dynamic)
    notes: list[str] = []
    report = export_pte(model, manifest, tmp_path / "model.pte", 16, notes)
    assert report["batch"] == [1, 1] and not report["dynamic_batch"]
    assert notes == [
        "model.pte has a fixed batch of 1: batch 1..16: torch.export failed: data-dependent batch"
    ]
    batch = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(
        PteClassifier(tmp_path / "model.pte").logits(batch),
        OnnxClassifier(out / "model.onnx").logits(batch),
        rtol=config.RTOL,
        atol=config.ATOL,
    )


def _damaged(out, tmp_path):
    data = (out / "model.pte").read_bytes()
    return {
        "garbage": b"not a program" * 10,
        "cut in the program": data[:3000],
        "cut in the weights": data[:-5000],
    }


@pytest.mark.parametrize(
    "kind, message",
    [
        ("garbage", "is not an ExecuTorch program (no ET12 identifier)"),
        ("cut in the program", "is not a readable ExecuTorch program (damaged .pte)"),
        ("cut in the weights", "is not a loadable ExecuTorch program: "),
    ],
)
def test_damaged_pte_is_a_one_line_error(pte_export, tmp_path, kind, message):
    out, _ = pte_export
    bad = tmp_path / "model.pte"
    bad.write_bytes(_damaged(out, tmp_path)[kind])
    res = run("predict", bad, DIGITS / "five")
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: model.pte {message}"), res.output
    assert "Traceback" not in res.output and res.output.count("\n") == 1
    folder = tmp_path / "export"
    shutil.copytree(out, folder)
    shutil.copyfile(bad, folder / "model.pte")
    res = run("verify", folder, "--data", DIGITS)
    assert res.exit_code == 1 and res.output.startswith("Error: model.pte "), res.output
    assert "Traceback" not in res.output


def test_pte_runs_on_the_cpu_only(pte_export):
    out, _ = pte_export
    res = run("predict", out / "model.pte", DIGITS / "five", "--provider", "cuda")
    assert res.exit_code == 1
    assert res.output == (
        "Error: --provider cuda applies to ONNX models; .pte model runs on ExecuTorch "
        "(CPU, XNNPACK)\n"
    )


def test_info_on_garbage_pte_is_one_line(tmp_path):
    bad = tmp_path / "x.pte"
    bad.write_bytes(b"\x00" * 64)
    res = run("info", bad)
    assert res.exit_code == 1
    assert res.output == (
        "Error: x.pte is not an ExecuTorch program (no ET12 identifier); export one with "
        "`edgetransfer export RUN --executorch`\n"
    )


def test_flatbuffer_reader_survives_damage(pte_export, tmp_path):
    """Random byte changes in the program part give a ManifestError or a reading, never
    another exception (IndexError, struct.error, a hang)."""
    from edgetransfer.errors import ManifestError

    out, _ = pte_export
    data = bytearray((out / "model.pte").read_bytes())
    size = int.from_bytes(data[16:24], "little")
    rng = random.Random(0)
    path = tmp_path / "m.pte"
    for _ in range(300):
        mutated = bytearray(data[:size])
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(8, size)] = rng.randrange(256)
        path.write_bytes(bytes(mutated))
        try:
            read_pte(path)
        except ManifestError:
            pass


def test_without_the_extra_export_names_it(digits_run, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name)
    )
    res = run("export", digits_run, "--executorch", "--out", tmp_path / "e")
    assert res.exit_code == 1
    assert res.output == (
        "Error: --executorch needs ExecuTorch; pip install 'edgetransfer[executorch]'\n"
    )
    assert not (tmp_path / "e").exists()


def test_golden_vectors_pass_on_the_pte_and_catch_a_perturbed_one(pte_export, perturbed_export):
    """golden/ is a self-test for model.pte as for model.onnx: the exported program meets the
    golden tolerance on every case; the one with a changed weight misses it."""
    out, _ = pte_export
    assert len(load_golden(out / "golden")[1]) == 5
    assert check_golden(OnnxClassifier(out / "model.onnx"), out / "golden") == []
    assert check_golden(PteClassifier(out / "model.pte"), out / "golden") == []
    misses = check_golden(PteClassifier(perturbed_export / "model.pte"), out / "golden")
    assert misses and all("over the tolerance" in m for m in misses)


def test_golden_check_counts_nan_and_top1(pte_export, tmp_path):
    """A runtime answering NaN fails; so do logits within the tolerance but of another top-1."""
    out, _ = pte_export
    golden = tmp_path / "golden"
    shutil.copytree(out / "golden", golden)
    _, cases = load_golden(golden)

    class Replay:  # answers the given logits, case by case
        def __init__(self, answers):
            self.answers = iter(answers)

        def logits(self, batch):
            return next(self.answers)

    expected = [y for _, _, y in cases]
    assert check_golden(Replay(expected), golden) == []
    nan = check_golden(Replay([np.full_like(y, np.nan) for y in expected]), golden)
    assert len(nan) == 5 and "case 00: max |diff| nan over the tolerance" in nan
    # case 00 becomes a near tie: 1e-5 apart is within the tolerance, the top-1 is not
    near = np.zeros_like(expected[0])
    near[0, :2] = [1.0, 1.0 - 1e-5]
    near.astype("<f4").tofile(golden / "00.logits.bin")
    swapped = near.copy()
    swapped[0, :2] = [1.0 - 1e-5, 1.0]
    assert check_golden(Replay([swapped, *expected[1:]]), golden) == [
        "case 00: top-1 1, expected 0"
    ]


def test_bench_measures_the_pte(pte_export):
    """bench on an EXPORT_DIR with model.pte adds an executorch row, each in its own process;
    on the .pte alone, that row only."""
    out, _ = pte_export
    res = run("bench", out, *BENCH_FAST, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["runtimes"]
    assert list(rows) == ["eager", "ort-fp32", "executorch"]
    et = rows["executorch"]
    assert et["backend"] == "executorch" and et["file"] == "model.pte"
    assert 0 < et["p50_ms"] <= et["p90_ms"] <= et["p99_ms"] and et["throughput"] > 0
    assert et["peak_rss_mb"] >= et["rss_before_load_mb"] > 0
    assert et["vs_baseline"]["speedup_p50"] > 0
    # the file on its own is that row alone (measuring it again would only repeat the above)
    assert find_runtimes(out / "model.pte") == {"executorch": (out / "model.pte", "executorch")}


def test_bench_sets_the_runtime_threadpool(pte_export):
    """--threads reaches the ExecuTorch threadpool that XNNPACK runs on."""
    from executorch.extension.pybindings import portable_lib

    out, _ = pte_export
    before = portable_lib._threadpool_get_thread_count()
    try:
        for threads in (1, 2):
            row = measure(
                out / "model.pte", "executorch", runs=2, warmup=1, batch_size=2, threads=threads
            )
            assert row["backend"] == "executorch"
            assert portable_lib._threadpool_get_thread_count() == threads
    finally:
        portable_lib._unsafe_reset_threadpool(before)
