"""Build the shipped source model and target sample data from scikit-learn's handwritten digits.

Source task: digits 0-4 -> models/digits04_simple_cnn.safetensors (+ its card).
Target sample: digits 5-9, PER_CLASS images each -> edgetransfer/sample_data/digits59/<label>/.
The remaining 5-9 images are the held-out target pool (see `target_pool`), never shipped.

    pip install -e '.[tools]' && python tools/make_digits.py
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SOURCE_LABELS = ["zero", "one", "two", "three", "four"]
TARGET_LABELS = ["five", "six", "seven", "eight", "nine"]
MODEL = ROOT / "models" / "digits04_simple_cnn.safetensors"
SAMPLE = ROOT / "edgetransfer" / "sample_data" / "digits59"
SOURCE_SAMPLE = ROOT / "edgetransfer" / "sample_data" / "digits04"
PER_CLASS = 40
SOURCE_PER_CLASS = 20
SEED = 0


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 sklearn digit (0..16) as a 32x32 8-bit grayscale image, white ink on black."""
    small = Image.fromarray((pixels.reshape(8, 8) * (255 / 16)).round().astype(np.uint8), "L")
    return small.resize((32, 32), Image.BILINEAR)


def load_digits_split():
    """(images, digit) for all 1797 digits, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(SEED).permutation(len(d.target))
    return [digit_image(d.data[i]) for i in order], [int(d.target[i]) for i in order]


def target_pool(exclude_shipped: bool = True):
    """Held-out 5-9 images: those not shipped in sample_data (label index 0..4 = five..nine)."""
    images, digits = load_digits_split()
    seen: dict[int, int] = {}
    out = []
    for img, dg in zip(images, digits, strict=True):
        if dg < 5:
            continue
        seen[dg] = seen.get(dg, 0) + 1
        if exclude_shipped and seen[dg] <= PER_CLASS:
            continue
        out.append((img, dg - 5))
    return out


def source_data():
    images, digits = load_digits_split()
    return [(img, dg) for img, dg in zip(images, digits, strict=True) if dg < 5]


def write_sample() -> int:
    images, digits = load_digits_split()
    count: dict[int, int] = {}
    for img, dg in zip(images, digits, strict=True):
        if dg < 5 or count.get(dg, 0) >= PER_CLASS:
            continue
        count[dg] = count.get(dg, 0) + 1
        folder = SAMPLE / TARGET_LABELS[dg - 5]
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=True)
        (folder / f"{count[dg]:03d}.png").write_bytes(buf.getvalue())
    return sum(count.values())


def write_source_sample() -> int:
    """Held-out source-task images (never trained on), for measuring source retention."""
    data = source_data()
    held_out = data[: len(data) // 5]  # the same split train_source holds out
    count: dict[int, int] = {}
    for img, dg in held_out:
        if count.get(dg, 0) >= SOURCE_PER_CLASS:
            continue
        count[dg] = count.get(dg, 0) + 1
        folder = SOURCE_SAMPLE / SOURCE_LABELS[dg]
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=True)
        (folder / f"{count[dg]:03d}.png").write_bytes(buf.getvalue())
    return sum(count.values())


def train_source(epochs: int) -> dict:
    import torch
    from safetensors.torch import save

    from edgetransfer.backbones import SMALL, SimpleCNN
    from edgetransfer.data import eval_transform, to_rgb
    from edgetransfer.manifest import METADATA_KEY, Manifest, versions

    torch.manual_seed(SEED)
    tf = eval_transform(SMALL)
    data = source_data()
    x = torch.stack([tf(to_rgb(img)) for img, _ in data])
    y = torch.tensor([dg for _, dg in data])
    n_test = len(y) // 5
    xt, yt, xtr, ytr = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    model = SimpleCNN(num_classes=len(SOURCE_LABELS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(32):
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        print(f"epoch {epoch + 1}: held-out top1 {acc:.4f}", file=sys.stderr)
    manifest = Manifest(
        arch="simple_cnn",
        labels=SOURCE_LABELS,
        preprocessing=SMALL,
        source={"weights": "none", "dataset": "scikit-learn load_digits, digits 0-4"},
        adapt={"strategy": "scratch", "epochs": epochs, "batch_size": 32, "seed": SEED},
        data={"train": len(ytr), "test": n_test},
        metrics={"test_top1": round(acc, 4)},
        versions=versions(),
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    MODEL.parent.mkdir(exist_ok=True)
    MODEL.write_bytes(save(state, metadata={METADATA_KEY: manifest.to_json()}))
    return {"train": len(ytr), "test": n_test, "acc": acc, "epochs": epochs}


CARD = """# digits04_simple_cnn — the shipped source model

- **Architecture**: `simple_cnn` (two 3x3 conv + max-pool stages, then two linear layers), 32x32 RGB
  input, normalised with mean 0.5 / std 0.5.
- **Task**: handwritten digits 0-4 (labels: {labels}).
- **Data**: scikit-learn's `load_digits` (UCI optical handwritten digits, 8x8, 16 grey levels),
  upscaled bilinearly to 32x32, white ink on black. Digits 0-4 only: {train} training images,
  {test} held out (a fixed shuffle with seed {seed}).
- **Held-out top-1**: {acc:.2%} on the {test} held-out images.
- **sha256**: `{sha}`
- **Size**: {size} bytes (safetensors; the manifest with labels and preprocessing is in the header).
- **Made by**: `pip install -e '.[tools]' && python tools/make_digits.py`
  ({epochs} epochs, Adam 1e-3, batch 32, CPU, deterministic).

The target sample data (`edgetransfer/sample_data/digits59/`, digits 5-9, {per} images per
class) comes from the same source and was never seen by this model. The source sample
(`edgetransfer/sample_data/digits04/`, 20 images per class) is taken from the held-out part, for
measuring that adaptation does not hurt the source task (`adapt --source-data`).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--sample-only", action="store_true", help="only rewrite the sample data")
    args = ap.parse_args()
    print(f"sample images: {write_sample()} in {SAMPLE}")
    print(f"source sample images: {write_source_sample()} in {SOURCE_SAMPLE}")
    if args.sample_only:
        return
    info = train_source(args.epochs)
    data = MODEL.read_bytes()
    card = CARD.format(
        labels=", ".join(SOURCE_LABELS),
        seed=SEED,
        sha=hashlib.sha256(data).hexdigest(),
        size=len(data),
        per=PER_CLASS,
        **info,
    )
    MODEL.with_suffix(".md").write_text(card)
    print(f"wrote {MODEL} (held-out top1 {info['acc']:.4f})")


if __name__ == "__main__":
    main()
