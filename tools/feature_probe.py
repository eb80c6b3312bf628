"""Which features of the frozen ImageNet EfficientNet-Lite0 should the head see? A linear probe
on the curve splits of transfer_experiment.py (MNIST-sample digits 5-9, 1/2/5/10 training
images per class, 3 seeds, the same 500 test images), per feature tap set and input size.

The backbone runs once per input size over the 75 reserve images (train/val of every seed are
drawn from them) and the 500 test images, with forward hooks on every tap; each (taps, shots,
seed) head is then fitted by edgetransfer.headfit (the product's head solver: standardised
features, L2, L-BFGS, best validation epoch). Taps: ``bN`` = global average pool of
``blocks.N``'s output, ``pen`` = the penultimate features (conv_head + bn2, pooled: today's
head input).

    python tools/feature_probe.py --sizes 64,112,224 --out tools/results/feature_probe.jsonl
    python tools/feature_probe.py --sizes 112,224 --taps pen,b4+b5+b6 --confirm 300 --out ...
    python tools/feature_probe.py --table tools/results/feature_probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from transfer_experiment import curve_splits  # noqa: E402

TAP_MODULES = {f"b{i}": f"blocks.{i}" for i in range(2, 7)} | {"pen": "bn2"}
TAP_SETS = (
    "pen",
    "b6",
    "b5",
    "b4",
    "b3",
    "b5+b6",
    "b4+b5+b6",
    "b3+b4+b5+b6",
    "b5+b6+pen",
    "b4+b5+b6+pen",
    "b3+b4+b5+b6+pen",
)


def taps_features(model, paths: list[Path], p) -> dict:
    """{tap: (N, C) pooled output} for every tap in TAP_MODULES, one forward pass per batch."""
    import numpy as np
    import torch

    from edgetransfer.data import eval_transform, load_image

    tf = eval_transform(p)
    got: dict[str, list] = {t: [] for t in TAP_MODULES}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, t=t: got[t].append(o.mean((2, 3)).numpy().astype(np.float32))
        )
        for t, name in TAP_MODULES.items()
    ]
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(paths), 32):
                x = torch.stack([tf(load_image(q)) for q in paths[start : start + 32]])
                model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return {t: np.concatenate(v) for t, v in got.items()}


def confirm_images(root: Path, per_class: int) -> list[Path]:
    """`per_class` more images of each class, after the curve's test images (never seen by
    the curve): the tap set and size chosen on the test images are checked again here."""
    from make_digits import TARGET_LABELS, mnist_images
    from transfer_experiment import (
        CURVE_TEST_PER_CLASS,
        TRAIN_PER_CLASS,
        VAL_PER_CLASS,
        _save_once,
    )

    first = TRAIN_PER_CLASS + VAL_PER_CLASS + CURVE_TEST_PER_CLASS
    per: dict[int, list] = {}
    for img, digit in mnist_images(range(5, 10)):
        per.setdefault(digit - 5, []).append(img)
    paths = []
    for label, imgs in per.items():
        folder = root / "confirm" / TARGET_LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs[first : first + per_class]):
            _save_once(img, folder / f"{i:04d}.png")
            paths.append(folder / f"{i:04d}.png")
    return sorted(paths)


def main() -> None:
    import numpy as np
    import torch

    from edgetransfer.backbones import load_source
    from edgetransfer.headfit import fit_head

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,112,224")
    ap.add_argument("--taps", default=",".join(TAP_SETS), help="tap sets (comma-separated)")
    ap.add_argument("--shots", default="1,2,5,10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=15, help="as the measured curve runs")
    ap.add_argument(
        "--confirm",
        type=int,
        default=0,
        metavar="N",
        help="test on N fresh images per class after the curve's test images instead",
    )
    ap.add_argument("--out", default="feature_probe.jsonl")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shots = [int(k) for k in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp()) / "curve"
    dirs, test = curve_splits(root, shots, seeds)
    classes = sorted(d.name for d in test.iterdir())
    # every train/val image of every split is one of the reserve images (class/name.png)
    where = {(q.parent.name, q.name): q for d in dirs.values() for q in sorted(d.rglob("*.png"))}
    reserve = sorted(where)
    res_paths = [where[cn] for cn in reserve]
    images = "confirm" if args.confirm else "test"
    test_paths = confirm_images(root, args.confirm) if args.confirm else sorted(test.rglob("*.png"))
    y_test = np.array([classes.index(q.parent.name) for q in test_paths])
    index = {cn: i for i, cn in enumerate(reserve)}
    source = load_source("efficientnet_lite0", "imagenet")
    base = source.spec.preprocessing
    for size in (int(s) for s in args.sizes.split(",")):
        p = base.with_size(size)
        t0 = time.perf_counter()
        f_res = taps_features(source.model, res_paths, p)
        f_test = taps_features(source.model, test_paths, p)
        secs = time.perf_counter() - t0
        print(f"size {size}: features of {len(res_paths) + len(test_paths)} images in {secs:.0f} s")
        for taps in args.taps.split(","):
            names = taps.split("+")
            xr = np.concatenate([f_res[t] for t in names], 1)
            xt = np.concatenate([f_test[t] for t in names], 1)
            for k in shots:
                accs = []
                for seed in seeds:
                    split = {}
                    for part in ("train", "val"):
                        qs = sorted((dirs[seed, k] / part).rglob("*.png"))
                        rows = [index[q.parent.name, q.name] for q in qs]
                        y = np.array([classes.index(q.parent.name) for q in qs])
                        split[part] = (xr[rows], y)
                    fit = fit_head(
                        *split["train"], *split["val"], classes=len(classes), epochs=args.epochs
                    )
                    acc = float((fit.logits(xt).argmax(1) == y_test).mean())
                    accs.append(acc)
                    rec = {"size": size, "taps": taps, "dim": xr.shape[1], "shots": k}
                    rec |= {"seed": seed, "images": images, "n_test": len(y_test)}
                    rec |= {"test_top1": acc, "val_top1": fit.val_top1}
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                print(f"  {taps:>18} ({xr.shape[1]:5d}) k={k:2d}: {100 * np.mean(accs):.1f}")
    table(args.out)


def table(path: str) -> None:
    """Mean [min-max] test top-1 over seeds: a row per (size, taps), a column per shots; one
    table per image set (the curve's test images, the fresh confirmation images)."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    shots = sorted({r["shots"] for r in recs})
    for images in sorted({r.get("images", "test") for r in recs}, reverse=True):
        mine = [r for r in recs if r.get("images", "test") == images]
        n = mine[0].get("n_test", 500)
        print(f"\n{images} images ({n}): test top-1 %, mean [min-max] over seeds\n")
        keys = sorted({(r["size"], r["taps"], r["dim"]) for r in mine}, key=lambda x: (x[0], x[2]))
        print("| size | taps | dim | " + " | ".join(f"{k}/class" for k in shots) + " |")
        print("|---:|---|---:|" + "---:|" * len(shots))
        for size, taps, dim in keys:
            cells = []
            for k in shots:
                v = [
                    100 * r["test_top1"]
                    for r in mine
                    if (r["size"], r["taps"], r["shots"]) == (size, taps, k)
                ]
                cells.append(f"{sum(v) / len(v):.1f} [{min(v):.1f}-{max(v):.1f}]" if v else "–")
            print(f"| {size} | {taps} | {dim} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        table(sys.argv[2])
    else:
        main()
