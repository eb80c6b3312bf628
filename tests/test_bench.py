"""bench: every runtime of an EXPORT_DIR in its own process, a single file, and failures.

No timing assertions: only that the numbers exist and are consistent with each other.
"""

import json

from edgetransfer.bench import find_runtimes, measure

from .conftest import run

FAST = ["--runs", "3", "--warmup", "1", "--batch-size", "2", "--threads", "1"]


def test_bench_export_dir_json(digits_export):
    res = run("bench", digits_export, *FAST, "--json", "--trust-torchscript")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    rows = d["runtimes"]
    assert list(rows) == ["eager", "torchscript", "ort-fp32", "ort-raw"]  # the files present
    assert d["baseline"] == "ort-fp32" and rows["ort-fp32"]["vs_baseline"]["speedup_p50"] == 1.0
    for r in rows.values():
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput"] > 0 and r["peak_rss_mb"] >= r["rss_before_load_mb"] > 0
    # each runtime ran in its own process: the ONNX ones never paid for importing torch
    assert rows["ort-fp32"]["peak_rss_mb"] < rows["eager"]["rss_before_load_mb"]
    assert rows["eager"]["backend"] == "eager" and rows["torchscript"]["file"] == "model.pt"


def test_bench_single_file_table(digits_export):
    res = run("bench", digits_export / "model.onnx", *FAST)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == [
        "runtime",
        "p50",
        "ms",
        "p90",
        "ms",
        "p99",
        "ms",
        "img/s@2",
        "peak",
        "MB",
        "speed-up",
    ]
    assert lines[1].startswith("ort-fp32 ") and lines[1].endswith("1.00x")
    assert lines[2].startswith("latency at batch 1 over 3 runs after 1 warm-up, threads 1")


def test_find_runtimes(digits_export, digits_run):
    assert list(find_runtimes(digits_run)) == ["eager"]
    assert find_runtimes(digits_export / "model.raw.onnx") == {
        "ort-raw": (digits_export / "model.raw.onnx", "onnx")
    }


def test_measure_in_process(digits_export):
    r = measure(digits_export / "model.raw.onnx", "onnx", runs=2, warmup=0, batch_size=3)
    assert r["backend"] == "onnxruntime" and r["throughput"] > 0


def test_bench_errors(tmp_path):
    res = run("bench", tmp_path)
    assert res.exit_code == 1
    assert res.output == (
        f"Error: {tmp_path} has no model files to benchmark (model.onnx, model.pt, "
        "model.safetensors, ...)\n"
    )
    res = run("bench", tmp_path / "nope.onnx")
    assert (
        res.exit_code == 1
        and res.output == f"Error: model {tmp_path / 'nope.onnx'} does not exist\n"
    )


def test_a_broken_runtime_fails_after_the_table(digits_export, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    res = run("bench", tmp_path / "model.onnx", *FAST)
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert lines[1].startswith("ort-fp32     failed: model.onnx is not a readable ONNX model")
    assert lines[-1].startswith(
        "Error: bench failed for ort-fp32: model.onnx is not a readable ONNX model"
    )
