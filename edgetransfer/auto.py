"""`adapt --strategy auto`: the head first (cheap), on each feature choice the architecture
offers (config.AUTO_FEATURES, unless --features names one), then, within a time budget, the
strategies that train more on a short schedule; the winner trains fully into RUN_DIR, with the
comparison in the manifest's ``adapt.auto``.

The heads are scored on re-splits of the training and validation images (their features are
cached, so a head is refitted in milliseconds): one small validation split often favours the
worse features. The strategies that train are compared on the validation images, image by
image. Candidates level on images right are told apart by their mean probability of the true
class; a genuine tie goes to the cheaper (the penultimate head before the stages one). The best
head and the best trainer then meet on their estimates of top-1 on new images.

Every candidate is an ordinary adapt run with the same DATA_DIR, --val-fraction and --seed, so
all are judged on the same validation images (the split runs.run_split rebuilds; the data
fingerprints are checked to be equal).
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetransfer import config
from edgetransfer.adapt import AdaptConfig, AdaptResult, adapt, inputs
from edgetransfer.backbones import ArchSpec, feature_taps, get_arch
from edgetransfer.data import scan, softmax
from edgetransfer.errors import ArchError, DataError, EdgeTransferError
from edgetransfer.evaluate import EvalResult, evaluate
from edgetransfer.fileio import check_can_write
from edgetransfer.headfit import HeadData, balanced_class_weights, fit_head
from edgetransfer.train import Interrupted

AUTO = config.AUTO
CANDIDATES = config.AUTO_CANDIDATES
RESPLITS = config.AUTO_RESPLITS
# A training step costs about three forward passes (forward, then backward at about twice
# that): a candidate's epoch is estimated from the head's feature extraction, one forward pass
# per image, until a measured epoch replaces the estimate.
BACKWARD_FACTOR = 3
# A paired difference within this many standard errors is noise: in images right, an
# uncertain pick; in mean true-class probability between candidates level on images right, a
# genuine tie (the cheaper is kept).
CLEAR_SE = 2
UNCERTAIN = "uncertain; more validation images would tell them apart"


@dataclass(frozen=True)
class AutoConfig:
    """How `--strategy auto` compares.

    Attributes:
        budget: seconds for the comparison (the winner's full training comes after it); a
            candidate expected to overrun what is left is not tried, and one whose first epoch
            shows it would overrun is stopped. None: every candidate is tried. The head is
            always fitted.
        short_epochs: epochs of the candidates that train the backbone (at most --epochs).
        candidates: strategies compared, cheapest first (ties go to the earlier one).
        head_features: what the head is compared on, one candidate each (in this order, right after
            one another), those the architecture offers; a run whose --features is not the
            default compares its head on that one only (the CLI passes the one given).
        clock: seconds, monotonic (tests pass a fake one).
    """

    budget: float | None = config.AUTO_BUDGET
    short_epochs: int = config.AUTO_EPOCHS
    candidates: tuple[str, ...] = CANDIDATES
    head_features: tuple[str, ...] = config.AUTO_FEATURES
    clock: Callable[[], float] = time.perf_counter


@dataclass(frozen=True)
class Candidate:
    """One run auto compares: a strategy, and what the head sees (`--features`)."""

    strategy: str
    features: str = config.FEATURE

    @property
    def name(self) -> str:
        """How rows, the pick and the manifest's winner name it: the strategy, and for a head
        on other than the penultimate features, its --features."""
        if self.strategy == "head" and self.features != config.FEATURE:
            return f"head --features {self.features}"
        return self.strategy

    @property
    def is_head(self) -> bool:
        return self.strategy == "head"


def candidates(cfg: AdaptConfig, auto: AutoConfig) -> list[Candidate]:
    """What `auto` compares for `cfg`, cheapest first: the head on each of auto.head_features the
    architecture offers (only cfg.features when that is not the default), then the others.
    The strategies that train take cfg.features (adapt refuses all but the default)."""
    spec = get_arch(cfg.arch)
    kinds = auto.head_features if cfg.features == config.FEATURE else (cfg.features,)
    out = []
    for strategy in auto.candidates:
        if strategy != "head":
            out.append(Candidate(strategy, cfg.features))
            continue
        # the one asked for stays a candidate (adapt's error is then the run's)
        offered = [k for k in kinds if k == cfg.features or _offers(spec, k)]
        out += [Candidate("head", k) for k in offered]
    return out


def _offers(spec: ArchSpec, kind: str) -> bool:
    try:
        feature_taps(spec, kind)
    except ArchError:
        return False
    return True


class _OverBudget(Exception):
    """A candidate's first epoch shows it would not finish within the budget."""


def adapt_auto(cfg: AdaptConfig, auto: AutoConfig | None = None) -> AdaptResult:
    """Compare the candidates on `cfg`'s split, then adapt with the winner into `cfg.out`.

    `cfg.strategy` is ignored; every other option applies to each candidate that uses it
    (``--augment`` without ``--views`` leaves the head unaugmented, as for ``head``).
    """
    auto = auto or AutoConfig()
    _check(auto)
    check_can_write(cfg.out, cfg.force, inputs(cfg))  # before minutes of comparison
    start = auto.clock()
    dataset = scan(cfg.data_dir, cfg.val_fraction, cfg.seed)  # adapt's split; for estimates
    if not dataset.split("val"):
        raise DataError(
            f"--strategy auto compares the candidates on validation images and {cfg.data_dir} "
            "leaves none; raise --val-fraction or add a val/ folder"
        )
    steps = _Steps.of(cfg, len(dataset.split("train")), len(dataset.split("val")))
    cands = candidates(cfg, auto)
    rows: list[dict] = []
    scores: dict[str, Scores] = {}
    head_data: dict[str, HeadData] = {}
    fingerprints = set()
    with tempfile.TemporaryDirectory(prefix="edgetransfer-auto-") as tmp:
        for i, cand in enumerate(cands):
            left = None if auto.budget is None else auto.budget - (auto.clock() - start)
            estimate = _estimate(rows, auto, steps)
            # a head is always fitted: one backbone pass (or the cache) and L-BFGS
            if not cand.is_head and rows and left is not None and estimate and estimate[0] > left:
                rows.append(
                    {
                        **_names(cand),
                        "skipped": f"not tried: about {estimate[0]:.0f} s on the short "
                        f"schedule ({estimate[1]}), {max(left, 0):.0f} s of the budget left",
                        "seconds": 0.0,
                    }
                )
                continue
            out = Path(tmp) / f"{i}-{cand.strategy}-{cand.features}"
            row, fingerprint, score, data = _try(
                cfg, auto, cand, i == 0, out, left if rows else None, steps
            )
            rows.append(row)
            if fingerprint:
                fingerprints.add(fingerprint)
            if score is not None:
                scores[cand.name] = score
            if data is not None:
                head_data[cand.name] = data
    if len(fingerprints) > 1:
        raise DataError(f"{cfg.data_dir} changed while --strategy auto compared; run it again")
    heads = _heads(rows, head_data, cfg) if head_data else None
    info = _verdict(rows, scores, heads, auto, auto.clock() - start)
    winner = next(c for c in cands if c.name == info["winner"])
    final = dataclasses.replace(_candidate_config(cfg, winner, cfg.epochs), auto=info, out=cfg.out)
    return adapt(final)


def _names(cand: Candidate) -> dict:
    """A comparison row's first fields: the candidate's name, strategy and features."""
    return {"candidate": cand.name, "strategy": cand.strategy, "features": cand.features}


def _check(auto: AutoConfig) -> None:
    """The comparison's own settings; the candidates' options are adapt's to check."""
    unknown = [c for c in auto.candidates if c not in CANDIDATES]
    if unknown or not auto.candidates:
        raise EdgeTransferError(
            f"--strategy auto compares some of: {', '.join(CANDIDATES)} (got "
            f"{', '.join(auto.candidates) or 'none'})"
        )
    unknown = [f for f in auto.head_features if f not in config.FEATURES]
    if unknown or not auto.head_features:
        raise EdgeTransferError(
            f"--strategy auto compares the head on some of: {', '.join(config.FEATURES)} (got "
            f"{', '.join(auto.head_features) or 'none'})"
        )
    if auto.budget is not None and auto.budget <= 0:
        raise EdgeTransferError(f"--budget must be a positive number of seconds, not {auto.budget}")
    if auto.short_epochs < 1:
        raise EdgeTransferError("the short schedule of --strategy auto needs at least 1 epoch")


def _candidate_config(cfg: AdaptConfig, cand: Candidate, epochs: int) -> AdaptConfig:
    """`cfg` for one candidate: its strategy, features and epochs; the head without --views
    keeps no augmentation (a preset needs cached views)."""
    augment = cfg.augment if not cand.is_head or cfg.views > 1 else None
    return dataclasses.replace(
        cfg,
        strategy=cand.strategy,
        features=cand.features,
        epochs=epochs,
        augment=augment,
        auto=None,
    )


def _try(
    cfg: AdaptConfig,
    auto: AutoConfig,
    cand: Candidate,
    first: bool,
    out: Path,
    left: float | None,
    steps: _Steps,
) -> tuple[dict, str | None, Scores | None, HeadData | None]:
    """Run one candidate into `out`: its comparison row, its data fingerprint, its scores
    on the validation images and a head's features (None when it was not run to the end).
    `first`: nothing was tried before it, so its error is the run's."""
    names = _names(cand)
    if cand.is_head and cfg.lwf:
        reason = "not tried: --lwf protects a backbone that trains"
        return {**names, "skipped": reason, "seconds": 0.0}, None, None, None
    epochs = cfg.epochs if cand.is_head else min(auto.short_epochs, cfg.epochs)
    watch = _Watch(auto.clock, left if not cand.is_head else None, steps, epochs)
    run_cfg = dataclasses.replace(
        _candidate_config(cfg, cand, epochs),
        out=out,
        force=True,
        resume=False,
        report=False,
        on_step=watch.on_step,
        on_phase=watch.on_phase,
    )
    try:
        res = adapt(run_cfg)
    except Interrupted as e:
        raise Interrupted(
            f"{signal.Signals(e.exit_code - 128).name}: stopped while --strategy auto compared "
            "strategies; nothing was written",
            e.exit_code - 128,
        ) from None
    except EdgeTransferError as e:
        if first:
            raise  # nothing to compare with: the error is the run's
        # e.g. bias on a backbone without biases (efficientnet_lite0), or a diverging loss
        row = {**names, "skipped": f"not usable: {e}"}
        return {**row, "seconds": _round(watch.seconds())}, None, None, None
    except _OverBudget as e:
        row = {**names, "skipped": str(e), "seconds": _round(watch.seconds())}
        return {**row, "step_seconds": _round(watch.step_seconds)}, None, None, None
    m = res.manifest
    # the saved (best-epoch) model image by image: what the pick compares, paired
    score = Scores.of(evaluate(res.run_dir, cfg.data_dir, split="val"))
    row = {
        **names,
        "schedule": "full" if epochs == cfg.epochs else "short",
        "epochs": epochs,
        "epochs_run": m.adapt["epochs_run"],
        "val_top1": round(score.top1, 6),
        "val_correct": score.correct_count,
        "val_images": score.n,
        "val_true_prob": round(score.mean_prob, 4),
        "seconds": _round(watch.seconds()),
    }
    if watch.step_seconds is not None and not cand.is_head:  # an L-BFGS step tells nothing
        row["step_seconds"] = _round(watch.step_seconds)
    if cand.is_head:  # one forward pass per image: the first estimate of the others' time
        row["extract_seconds"] = _round(res.timings.get("images", 0.0))
        row["train_images"] = int(m.data["train"])
    return row, m.data["fingerprint"], score, res.head_data


@dataclass(frozen=True)
class Scores:
    """A candidate on the validation images, image by image in split order (every candidate
    sees the same images, so two are compared pair by pair)."""

    correct: np.ndarray  # [N] bool: its top-1 is the true class
    prob: np.ndarray  # [N] its probability of the true class

    @classmethod
    def of(cls, result: EvalResult) -> Scores:
        """From the candidate's evaluation on the validation split."""
        rows = np.arange(len(result.truth))
        return cls(result.probs.argmax(1) == result.truth, result.probs[rows, result.truth])

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def correct_count(self) -> int:
        return int(self.correct.sum())

    @property
    def top1(self) -> float:
        return self.correct_count / max(self.n, 1)

    @property
    def mean_prob(self) -> float:
        return float(self.prob.mean()) if self.n else 0.0


@dataclass(frozen=True)
class _Steps:
    """A candidate's work in optimizer steps, for projecting its time from one step."""

    per_epoch: int  # optimizer steps per epoch
    val_steps: float  # the validation pass of one epoch, in optimizer-step equivalents

    @classmethod
    def of(cls, cfg: AdaptConfig, train: int, val: int) -> _Steps:
        micro = math.ceil(train / cfg.batch_size)
        steps = max(1, math.ceil(micro / cfg.accumulate))
        # a validation batch is a forward pass: about 1/BACKWARD_FACTOR of a training batch
        return cls(steps, math.ceil(val / cfg.batch_size) / (cfg.accumulate * BACKWARD_FACTOR))

    def seconds(self, per_step: float, epochs: int) -> float:
        return per_step * epochs * (self.per_epoch + self.val_steps)


class _Watch:
    """adapt's on_phase/on_step for a candidate: times it early and stops it when the whole run
    would overrun the budget left.

    With three or more steps an epoch, the second step is timed (the first carries one-off
    set-up; both are full batches); with fewer, a step may be a short remainder batch, so the
    first epoch with its validation pass is timed instead.
    """

    def __init__(
        self, clock: Callable[[], float], left: float | None, steps: _Steps, epochs: int
    ) -> None:
        self.clock, self.left, self.steps, self.epochs = clock, left, steps, epochs
        self.start = clock()
        self.marks: list[float] = []
        self.step_seconds: float | None = None
        self.count = 0

    def seconds(self) -> float:
        return self.clock() - self.start

    def on_phase(self, name: str) -> None:
        if name == "fit":
            self.marks = [self.clock()]

    def on_step(self, epoch: int, step: int) -> None:
        if self.step_seconds is not None:
            return
        now = self.clock()
        self.count += 1
        if self.steps.per_epoch >= 3:
            self.marks.append(now)
            if self.count < 2:
                return
            self.step_seconds = now - self.marks[-2]
            what = "2 steps"
        elif epoch >= 2:  # the first step of epoch 2: epoch 1 and its validation are done
            epoch_seconds = now - (self.marks[0] if self.marks else self.start)
            self.step_seconds = epoch_seconds / (self.steps.per_epoch + self.steps.val_steps)
            what = "its first epoch"
        else:
            return
        done = now - self.start
        need = done + self.steps.seconds(self.step_seconds, self.epochs) - self._timed()
        if self.left is not None and need > self.left:
            raise _OverBudget(
                f"stopped after {what}: about {need:.0f} s on the short schedule, "
                f"{self.left:.0f} s of the budget left"
            )

    def _timed(self) -> float:
        """The projected seconds of the work already done (counted in `done`)."""
        if self.steps.per_epoch >= 3:
            return 2 * self.step_seconds
        return self.steps.seconds(self.step_seconds, 1)


def _estimate(rows: list[dict], auto: AutoConfig, steps: _Steps) -> tuple[float, str] | None:
    """Seconds the next backbone-training candidate should take on the short schedule, and
    what the estimate comes from: the step time of the last one measured, else the head's
    feature extraction (one forward pass per image; near zero when the cache had them, and
    then the candidate's own first steps decide). The first head's: on the penultimate
    features, the whole backbone, as the strategies that train run it."""
    measured = [r for r in rows if r.get("step_seconds")]
    if measured:
        r = measured[-1]
        return steps.seconds(r["step_seconds"], auto.short_epochs), f"as {r['candidate']}'s steps"
    head = next((r for r in rows if "extract_seconds" in r), None)
    if head is None:
        return None
    images = head["train_images"] + head["val_images"]
    per_image = head["extract_seconds"] / images
    per_step = per_image * BACKWARD_FACTOR * head["train_images"] / steps.per_epoch
    return steps.seconds(per_step, auto.short_epochs), "from the head's feature extraction"


def resplit(data: HeadData, cfg: AdaptConfig, splits: int = RESPLITS) -> tuple[Scores, int]:
    """A head on `data` judged on `splits` random re-splits of its training and validation
    images: each fits a head on as many images of each class as the run trains on, drawn from
    that class's training and validation images, and scores it on the rest. The scores are
    every held-out prediction, split after split, and the number of distinct images held out
    at least once; the splits depend on the labels and --seed alone, so heads on other features
    of the same images are scored pair by pair.

    Each fit keeps its best epoch by its held-out images, as the run's head does by its
    validation images, with the run's --epochs, --patience and --balance; the head is the
    numpy L-BFGS fit (headfit.py, the torch path's optimum) on the clean features only (no
    --views, no --teacher)."""
    x = np.concatenate([data.x_train, data.x_val])
    y = np.concatenate([data.y_train, data.y_val])
    by_class = [np.flatnonzero(y == c).tolist() for c in range(data.classes)]
    fit_counts = np.bincount(data.y_train, minlength=data.classes).tolist()
    weights = balanced_class_weights(data.y_train, data.classes) if cfg.balance else None
    correct, prob, seen = [], [], set()
    for split in range(splits):
        rng = random.Random(f"auto-resplit/{cfg.seed}/{split}")
        fit_rows = sorted(
            i for rows, n in zip(by_class, fit_counts, strict=True) for i in rng.sample(rows, n)
        )
        held = np.setdiff1d(np.arange(len(y)), fit_rows)
        seen.update(held.tolist())
        head = fit_head(
            x[fit_rows],
            y[fit_rows],
            x[held],
            y[held],
            classes=data.classes,
            class_weights=weights,
            epochs=cfg.epochs,
            patience=cfg.patience,
        )
        p = softmax(head.val_logits.astype(np.float64))  # its held-out images' logits
        correct.append(p.argmax(1) == y[held])
        prob.append(p[np.arange(len(held)), y[held]])
    return Scores(np.concatenate(correct), np.concatenate(prob)), len(seen)


def _heads(rows: list[dict], head_data: dict[str, HeadData], cfg: AdaptConfig) -> dict:
    """The manifest's ``adapt.auto.heads``: every head tried, scored on re-splits of the
    training and validation images (`resplit`) rather than on the one validation split, and the
    best of them, chosen as `pick` chooses. Their rows gain resplit_top1 and resplit_true_prob;
    the winner's re-split top-1 is what it brings to the comparison with the strategies that
    train (`_verdict`)."""
    names = list(head_data)  # in the order they ran: cheapest first
    scored = {name: resplit(head_data[name], cfg) for name in names}
    scores = {name: s for name, (s, _) in scored.items()}
    for r in rows:
        if r["candidate"] in scores:
            r["resplit_top1"] = round(scores[r["candidate"]].top1, 6)
            r["resplit_true_prob"] = round(scores[r["candidate"]].mean_prob, 4)
    # the paired rule over every re-split prediction: an image recurs in several splits, so the
    # paired standard error of the probabilities is on the small side (ties are rarer)
    winner = pick([(name, scores[name]) for name in names])
    a, data = scores[winner], head_data[winner]
    images, fit = len(data.y_train) + len(data.y_val), len(data.y_train)
    how = (
        f"over {RESPLITS} random re-splits of the {images} training and validation images, each "
        f"fitting the head on {fit} of them as this run does"
    )
    info = {
        "winner": winner,
        "top1": round(a.top1, 6),
        # exact, for the comparison with a trainer: the predictions right and made, and the
        # distinct images held out at least once (what its standard error counts)
        "right": a.correct_count,
        "predictions": a.n,
        "held_out_images": scored[winner][1],
        "splits": RESPLITS,
        "images": images,
        "fit_images": fit,
    }
    if len(names) == 1:
        info["pick"] = f"{winner}: the only head, {a.top1:.1%} of held-out images right {how}"
        return info
    second = max(
        ((n, s) for n, s in scores.items() if n != winner),
        key=lambda c: (c[1].correct_count, c[1].mean_prob),
    )[0]
    b = scores[second]
    per_split = [s.correct.reshape(RESPLITS, -1).mean(1) for s in (a, b)]
    ahead = int((per_split[0] > per_split[1]).sum())
    behind = int((per_split[0] < per_split[1]).sum())
    level = (a.correct_count, a.mean_prob) <= (b.correct_count, b.mean_prob)
    info.update(
        runner_up=second,
        ahead_splits=ahead,
        behind_splits=behind,
        pick=(
            f"{winner} {'ties with' if level else 'over'} {second}: {a.top1:.1%} vs {b.top1:.1%} "
            f"of held-out images right (mean true-class probability {a.mean_prob:.3f} vs "
            f"{b.mean_prob:.3f}) {how}; ahead in {ahead}, behind in {behind} of the {RESPLITS}"
            + ("; the cheaper is kept" if level else "")
        ),
    )
    return info


def _verdict(
    rows: list[dict],
    scores: dict[str, Scores],
    heads: dict | None,
    auto: AutoConfig,
    seconds: float,
) -> dict:
    """The manifest's ``adapt.auto``: the rows, the winner and how sure the pick is.

    The heads (`heads`, from `_heads`: scored on re-splits) and the strategies that train
    (``trainers``: pair by pair on the validation images, `_trainers`) each put forward their
    best; the final pick is between those two, by their estimate of top-1 on new images: the
    head's over the re-splits, the trainer's on the validation images (the only one it has: its
    full schedule is too dear to repeat). A tie goes to the head, the cheaper.
    """
    tried = [r for r in rows if r["candidate"] in scores]
    if not tried:
        why = "; ".join(f"{r['candidate']}: {r['skipped']}" for r in rows)
        raise EdgeTransferError(f"--strategy auto has no candidate left ({why})")
    trainers = [r["candidate"] for r in tried if r["strategy"] != "head"]
    info: dict = {
        "candidates": rows,
        "short_epochs": auto.short_epochs,
        "budget_s": auto.budget,
        "seconds": _round(seconds),
    }
    if trainers:
        info["trainers"] = _trainers([(name, scores[name]) for name in trainers])
    if heads:
        info["heads"] = heads
    if heads and trainers:
        trainer = info["trainers"]["winner"]
        schedule = next(r["schedule"] for r in tried if r["candidate"] == trainer)
        info.update(_head_or_trainer(heads, trainer, schedule, scores))
    else:
        best = heads or info["trainers"]
        info.update(winner=best["winner"], pick=best["pick"])
    return info


def _trainers(cands: list[tuple[str, Scores]]) -> dict:
    """The manifest's ``adapt.auto.trainers``: the strategies that train compared on the same
    validation images, pair by pair (`pick`), and how sure that pick is against the runner-up."""
    winner = pick(cands)
    scores = dict(cands)
    if len(cands) == 1:
        return {"winner": winner, "pick": f"{winner}: the only strategy that trains that was tried"}
    # the runner-up: the best of the rest, by images right, then mean true-class probability
    rest = [(name, s) for name, s in cands if name != winner]
    second = max(rest, key=lambda c: (c[1].correct_count, c[1].mean_prob))[0]
    a, b = scores[winner], scores[second]
    d = paired(a, b)
    info = {
        "winner": winner,
        "runner_up": second,
        "margin_images": d["margin_images"],
        "se_images": d["se_images"],
        "disagree_images": d["disagree_images"],
        "prob_margin": d["prob_margin"],
        "prob_se": d["prob_se"],
    }
    n, right = a.n, a.correct_count
    prob = (
        f"mean probability of the true class {a.mean_prob:.3f} vs {b.mean_prob:.3f} "
        f"(paired standard error {d['prob_se']:.3f})"
    )
    if d["margin_images"] == 0:
        ahead = d["prob_margin"] > CLEAR_SE * d["prob_se"]
        info["pick"] = (
            f"{winner}: level with {second} at {right} of {n} validation images, ahead in {prob}"
            f", beyond {CLEAR_SE} standard errors"
            if ahead
            else f"{winner}: ties with {second} at {right} of {n} validation images and, within "
            f"{CLEAR_SE} standard errors, in {prob}; the cheaper is kept"
        )
    else:
        clear = d["margin_images"] > CLEAR_SE * d["se_images"]
        info["pick"] = (
            f"{winner}: {d['margin_images']} of {n} validation images more than {second} (they "
            f"disagree on {d['disagree_images']}: a paired standard error of "
            f"{d['se_images']:.1f} images), "
            + (
                f"beyond {CLEAR_SE} standard errors"
                if clear
                else f"within {CLEAR_SE} standard errors: {UNCERTAIN}"
            )
        )
    return info


def _head_or_trainer(heads: dict, trainer: str, schedule: str, scores: dict[str, Scores]) -> dict:
    """The final pick: the best head (its re-split top-1) against the best trainer (its
    validation top-1), with the standard error of the difference of two independent
    proportions, Agresti and Caffo's (one image right and one wrong added to each, so 40 of 40
    is not taken for certain); the head's counted on the distinct images its re-splits held
    out, not its repeated predictions."""
    head, h = heads["winner"], heads["right"] / heads["predictions"]
    t, n_head = scores[trainer], heads["held_out_images"]
    se = math.sqrt(
        sum(
            p * (1 - p) / (n + 2)
            for p, n in (
                ((t.correct_count + 1) / (t.n + 2), t.n),
                ((h * n_head + 1) / (n_head + 2), n_head),
            )
        )
    )
    margin = t.top1 - h  # the trainer's lead
    # in whole counts: a level score is level (rounding must not hand it to the trainer)
    ahead = t.correct_count * heads["predictions"] > heads["right"] * t.n
    winner, second = (trainer, head) if ahead else (head, trainer)
    clear = abs(margin) > CLEAR_SE * se
    sure = f"beyond {CLEAR_SE} standard errors" if clear else f"within {CLEAR_SE}: {UNCERTAIN}"
    scores_text = (
        f"{trainer} {t.top1:.1%} of {t.n} validation images right ({schedule} schedule), "
        f"{head} {h:.1%} over re-splits"
    )
    what = "above" if winner == trainer else "not below"
    return {
        "winner": winner,
        "runner_up": second,
        "top1_margin": round(abs(margin), 6),
        "top1_se": round(se, 6),
        "pick": (
            f"{winner}: estimated top-1 on new images {what} {second}'s ({scores_text}: a "
            f"difference of {100 * abs(margin):.1f} points, standard error {100 * se:.1f}, "
            f"{sure})"
        ),
    }


def pick(candidates: list[tuple[str, Scores]]) -> str:
    """The winner of `candidates` (cheapest first, scored on the same images).

    Top-1 on a few images moves in whole images, so candidates often tie; the true-class
    probability of every image is the finer measure. Among those with the most images right,
    the cheapest whose mean true-class probability is not clearly (CLEAR_SE paired standard
    errors) below the highest wins: a genuine tie goes to the cheaper.
    """
    most = max(s.correct_count for _, s in candidates)
    level = [(name, s) for name, s in candidates if s.correct_count == most]
    top = max(level, key=lambda c: c[1].mean_prob)[1]  # the first of equals: the cheaper
    for name, s in level:
        d = paired(top, s)
        if d["prob_margin"] <= CLEAR_SE * d["prob_se"]:
            return name
    raise AssertionError("unreachable: the top candidate is not below itself")


def paired(a: Scores, b: Scores) -> dict:
    """`a` against `b` on the same images: the difference in images right with its standard
    error (McNemar's: the square root of the images where exactly one is right), and the
    difference in mean true-class probability with the standard error of a paired mean."""
    if a.n != b.n:
        raise ValueError(f"candidates scored on {a.n} and {b.n} validation images")
    disagree = int((a.correct != b.correct).sum())
    diff = a.prob.astype(np.float64) - b.prob.astype(np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return {
        "margin_images": a.correct_count - b.correct_count,
        "se_images": round(math.sqrt(disagree), 2),
        "disagree_images": disagree,
        "prob_margin": round(float(diff.mean()) if len(diff) else 0.0, 4),
        "prob_se": round(se, 4),
    }


def _round(seconds: float) -> float:
    return round(seconds, 3)
