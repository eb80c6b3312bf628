"""The new head on frozen features, fitted with numpy alone: the torch path's objective, solver
and epoch schedule (adapt's ``head`` strategy: train.fit with solver lbfgs), for a device
without PyTorch.

The objective: features standardised with the training set's statistics, a linear layer,
softmax cross-entropy averaged over every training row (every sample in every augmented view;
with class weights, the weighted mean of torch's ``cross_entropy(weight=...)``), plus
(l2/2)·|θ|² over the weight and the bias. It is convex, so the optimum does not depend on
where the solver starts. L-BFGS runs as torch.optim.LBFGS does (strong-Wolfe line search, the
same history, iteration and evaluation limits), one step of up to LBFGS_ITERATIONS iterations
per epoch; after each epoch the validation set picks the best epoch, and patience or
convergence (a step that leaves the weights unchanged) ends the fit early. The arithmetic is
float64 throughout (torch's path is float32): equal to torch's optimum within 1e-4, see
tests/test_headfit.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from edgetransfer import config
from edgetransfer.errors import DataError, EdgeTransferError

# L2 penalty of the head on standardised features (both paths); test top-1 on the digits
# transfer experiment moved by under a point between 1e-3 and 1e-1.
HEAD_L2 = 1e-3
LBFGS_HISTORY = 10  # (step, gradient change) pairs kept
LBFGS_ITERATIONS = 20  # per epoch; L-BFGS stops sooner once the gradient vanishes
# converged when no gradient entry exceeds this: further epochs would not move the weights
LBFGS_TOLERANCE = 1e-5
# torch.optim.LBFGS's defaults: a slope, step or loss change below this ends an epoch's
# iterations; at most 1.25 objective evaluations per iteration on average
LBFGS_TOLERANCE_CHANGE = 1e-9
LBFGS_MAX_EVALS = LBFGS_ITERATIONS * 5 // 4
# the strong-Wolfe line search's sufficient-decrease and curvature constants (torch's)
_C1, _C2 = 1e-4, 0.9

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class HeadData:
    """The clean features a head was fitted and validated on, one row per image in split order
    (adapt's ``head`` runs hand them out, so `--strategy auto` can re-fit heads without the
    backbone).

    Attributes:
        x_train: (N, D) float32 training features (the clean images; no augmented views).
        y_train: (N,) class indices.
        x_val: (M, D) float32 validation features.
        y_val: (M,) class indices.
        classes: number of classes C.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    classes: int


@dataclass(frozen=True)
class Standardization:
    """(x - mean) / std with the training features' statistics (train.Standardize's rule)."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64

    @classmethod
    def of(cls, x: np.ndarray) -> Standardization:
        """The statistics of `x` (N, D): mean, and the sample standard deviation, except that
        features (nearly) constant on the training set keep scale 1, so that no huge weight is
        folded into the head."""
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        std = x.std(0, ddof=1) if len(x) > 1 else np.ones_like(mean)
        std = np.where(std > 1e-3 * std.mean() + 1e-8, std, 1.0)
        return cls(mean, std)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) / self.std


def balanced_class_weights(y: np.ndarray, classes: int) -> np.ndarray:
    """--balance: each class weighted by N / (classes · its count), so every class adds the
    same total to the loss (a class without samples gets weight N / classes)."""
    counts = np.bincount(np.asarray(y), minlength=classes).astype(np.float32)
    return (counts.sum() / (classes * np.maximum(counts, 1))).astype(np.float32)


@dataclass
class HeadFit:
    """The fitted head, folded: ``x @ weight.T + bias`` on raw features gives the logits.

    Attributes:
        weight: (C, D) float32, the standardisation folded in.
        bias: (C,) float32.
        standardization: the training statistics that were folded in.
        best_epoch: the epoch whose weights these are (best validation top-1, then loss).
        val_top1: that epoch's validation top-1 (nan without validation samples).
        val_loss: its mean validation cross-entropy (unweighted).
        val_logits: its validation logits, row i for validation sample i.
        history: per epoch: epoch, train_loss, train_top1, val_loss, val_top1 (as train.fit).
        stopped_early: patience ran out or L-BFGS converged before the last epoch.
    """

    weight: np.ndarray
    bias: np.ndarray
    standardization: Standardization
    best_epoch: int
    val_top1: float
    val_loss: float
    val_logits: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The head's logits on raw features `x` (N, D)."""
        return np.asarray(x, np.float32) @ self.weight.T + self.bias


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    classes: int,
    l2: float = HEAD_L2,
    class_weights: np.ndarray | None = None,
    epochs: int = config.EPOCHS,
    patience: int = config.PATIENCE,
    tolerance_grad: float = LBFGS_TOLERANCE,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> HeadFit:
    """Fit a linear head on cached features, as the torch path does; deterministic.

    Args:
        x_train: (N, D) training features, or (V, N, D): V views of every sample, view 0 the
            clean image (its statistics standardise), the others augmented copies. Every view
            is a row of the objective.
        y_train: (N,) class indices.
        x_val: (M, D) validation features (M may be 0).
        y_val: (M,) class indices.
        classes: number of classes C.
        l2: the L2 penalty (l2/2)·|θ|² on the head in standardised space, bias included
            (HEAD_L2, the torch path's too).
        class_weights: (C,) loss weight per class (balanced_class_weights for --balance).
        epochs: at most this many L-BFGS steps of LBFGS_ITERATIONS iterations.
        patience: stop after this many epochs without a better validation result (0: never).
        tolerance_grad: converged when no gradient entry exceeds this.
        init: the starting (weight (C, D), bias (C,)) in standardised space; zeros by
            default. The optimum does not depend on it; a test starts both paths alike.

    Raises:
        DataError: features that are not finite, or shapes and labels that do not fit.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    xt, yt, xv, yv = _checked(x_train, y_train, x_val, y_val, classes)
    # One BLAS thread: the matrices are too small to share out, and on a busy 2-core machine
    # OpenBLAS's spinning threads made a 0.1 s fit take 5 s (train.fit runs torch's head on
    # one thread for the same reason).
    with threadpool_limits(1, user_api="blas"):
        return _fit(xt, yt, xv, yv, classes, l2, class_weights, epochs, patience,
                    tolerance_grad, init)  # fmt: skip


def _fit(xt, yt, xv, yv, classes, l2, class_weights, epochs, patience, tolerance_grad, init):
    views, n, dim = xt.shape
    standardization = Standardization.of(xt[0])
    xs = standardization(xt.reshape(views * n, dim))
    ys = np.tile(yt, views)
    xvs = standardization(xv)
    row_weights = None
    if class_weights is not None:
        cw = np.asarray(class_weights, np.float64)
        if cw.shape != (classes,) or not np.isfinite(cw).all() or (cw < 0).any():
            raise DataError(f"class weights must be {classes} finite numbers >= 0")
        row_weights = cw[ys]
    loss = _Loss(xs, ys, classes, row_weights, l2)
    theta = np.zeros(classes * (dim + 1))
    if init is not None:
        w0, b0 = (np.asarray(a, np.float64) for a in init)
        if w0.shape != (classes, dim) or b0.shape != (classes,):
            raise ValueError(f"init must be weight {(classes, dim)} and bias {(classes,)}")
        theta = np.concatenate([w0.ravel(), b0])
    solver = _LBFGS(tolerance_grad)
    history: list[dict[str, float]] = []
    best: tuple[float, float, int, np.ndarray, np.ndarray] | None = None
    stale, stopped_early = 0, False
    for epoch in range(1, epochs + 1):
        before = theta
        theta = solver.step(loss.value_and_grad, theta)
        converged = np.array_equal(before, theta)
        train_loss, train_top1 = loss.metrics(theta)
        if not math.isfinite(train_loss):
            raise EdgeTransferError(
                f"the head's loss became {train_loss} in epoch {epoch}; the features are "
                "probably out of range"
            )
        val_logits = _logits(xvs, theta, classes)
        val_loss, val_top1 = _val_metrics(val_logits, yv)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_top1": train_top1,
                "val_loss": val_loss,
                "val_top1": val_top1,
            }
        )
        if best is None or (val_top1, -val_loss) > (best[0], -best[1]):
            best = (val_top1, val_loss, epoch, theta, val_logits)
            stale = 0
        else:
            stale += 1
        if (patience and stale >= patience) or converged:
            stopped_early = True
            break
    assert best is not None  # epochs >= 1
    val_top1, val_loss, best_epoch, theta, val_logits = best
    weight, bias = _fold(theta, classes, standardization)
    return HeadFit(
        weight=weight,
        bias=bias,
        standardization=standardization,
        best_epoch=best_epoch,
        val_top1=val_top1,
        val_loss=val_loss,
        val_logits=val_logits.astype(np.float32),
        history=history,
        stopped_early=stopped_early,
    )


def _checked(x_train, y_train, x_val, y_val, classes: int):
    """The inputs as (V, N, D) float32, (N,) int64, (M, D) float32, (M,) int64, or a DataError
    naming what does not fit."""
    xt = np.asarray(x_train, np.float32)
    if xt.ndim == 2:
        xt = xt[None]
    if xt.ndim != 3 or 0 in xt.shape:
        raise DataError(f"training features must be (N, D) or (V, N, D), not {xt.shape}")
    xv = np.asarray(x_val, np.float32)
    if xv.ndim != 2 or (len(xv) and xv.shape[1] != xt.shape[2]):
        raise DataError(f"validation features must be (M, {xt.shape[2]}), not {xv.shape}")
    yt, yv = np.asarray(y_train), np.asarray(y_val)
    for name, y, x in (("training", yt, xt[0]), ("validation", yv, xv)):
        if y.shape != (len(x),) or (len(y) and y.dtype.kind not in "iu"):
            raise DataError(f"{name} labels must be {len(x)} class indices, not {y.shape}")
        if len(y) and not (0 <= y.min() and y.max() < classes):
            raise DataError(f"{name} labels must lie in 0..{classes - 1}")
    for name, x in (("training", xt), ("validation", xv)):
        rows = x.reshape(-1, x.shape[-1])
        bad = np.flatnonzero(~np.isfinite(rows).all(1))
        if len(bad):
            raise DataError(
                f"the {name} features of sample {bad[0] % x.shape[-2]} hold NaN or infinite "
                "values: the backbone's output is broken; check the backbone and that image"
            )
    return xt, yt.astype(np.int64), xv, yv.astype(np.int64)


class _Loss:
    """The training objective on standardised rows `x` (R, D): (weighted) mean cross-entropy
    plus (l2/2)·|θ|², θ = [weight (C·D, row-major), bias (C)] like the torch head's
    parameters."""

    def __init__(self, x, y, classes, row_weights, l2) -> None:
        self.x, self.y, self.classes, self.l2 = x, y, classes, l2
        w = np.ones(len(y)) if row_weights is None else row_weights
        self.scale = w / w.sum()  # each row's share of the mean

    def _ce(self, theta):
        """(logits, log-softmax) of every row."""
        z = _logits(self.x, theta, self.classes)
        return z, _log_softmax(z)

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective and gradient; a non-finite objective is inf with a zero gradient, which
        the line search rejects (as the torch path's closure does)."""
        z, logp = self._ce(theta)
        rows = np.arange(len(self.y))
        loss = -(self.scale * logp[rows, self.y]).sum()
        if not math.isfinite(loss):
            return math.inf, np.zeros_like(theta)
        g = np.exp(logp)
        g[rows, self.y] -= 1
        g *= self.scale[:, None]
        grad = np.concatenate([(g.T @ self.x).ravel(), g.sum(0)])
        if self.l2:
            loss += 0.5 * self.l2 * float(theta @ theta)
            grad += self.l2 * theta
        return float(loss), grad

    def metrics(self, theta: np.ndarray) -> tuple[float, float]:
        """(loss without the penalty, top-1) on the training rows."""
        z, logp = self._ce(theta)
        rows = np.arange(len(self.y))
        loss = float(-(self.scale * logp[rows, self.y]).sum())
        return loss, float((z.argmax(1) == self.y).mean())


def _logits(x: np.ndarray, theta: np.ndarray, classes: int) -> np.ndarray:
    dim = x.shape[1]
    return x @ theta[: classes * dim].reshape(classes, dim).T + theta[classes * dim :]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _val_metrics(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, top-1), unweighted as train.evaluate; nan without samples."""
    if not len(y):
        return math.nan, math.nan
    logp = _log_softmax(logits)
    loss = float(-logp[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(1) == y).mean())


def _fold(theta: np.ndarray, classes: int, s: Standardization) -> tuple[np.ndarray, np.ndarray]:
    """The head on raw features: weight / std, and bias - (weight / std) @ mean
    (train.fold)."""
    dim = len(s.mean)
    weight = theta[: classes * dim].reshape(classes, dim) / s.std
    bias = theta[classes * dim :] - weight @ s.mean
    return weight.astype(np.float32), bias.astype(np.float32)


# ------------------------------------------------------------------------------------------
# L-BFGS as torch.optim.LBFGS(lr=1, line_search_fn="strong_wolfe") runs it (after minFunc),
# on one flat float64 vector; its state carries over from one step (epoch) to the next.


class _LBFGS:
    def __init__(self, tolerance_grad: float) -> None:
        self.tolerance_grad = tolerance_grad
        self.n_iter = 0  # iterations over all steps: the very first one is steepest descent
        self.d: np.ndarray | None = None  # the last direction
        self.t = 1.0  # and step length
        self.old_dirs: list[np.ndarray] = []  # gradient changes y
        self.old_stps: list[np.ndarray] = []  # steps s
        self.ro: list[float] = []  # 1 / (y·s)
        self.h_diag = 1.0  # the initial inverse Hessian's scale
        self.prev_grad: np.ndarray | None = None
        self.prev_loss = math.nan

    def step(self, fun: Objective, x: np.ndarray) -> np.ndarray:
        """Up to LBFGS_ITERATIONS iterations from `x`; the point reached (`x` itself when the
        gradient is already within tolerance)."""
        loss, grad = fun(x)
        evals = 1
        if np.abs(grad).max() <= self.tolerance_grad:
            return x
        d, t = self.d, self.t
        for n in range(1, LBFGS_ITERATIONS + 1):
            self.n_iter += 1
            if self.n_iter == 1:
                d = -grad
                self.old_dirs, self.old_stps, self.ro, self.h_diag = [], [], [], 1.0
            else:
                d = self._direction(grad, d, t)
            self.prev_grad, self.prev_loss = grad, loss
            t = min(1.0, 1.0 / float(np.abs(grad).sum())) if self.n_iter == 1 else 1.0
            gtd = float(grad @ d)
            if gtd > -LBFGS_TOLERANCE_CHANGE:
                break
            loss, grad, t, ls_evals = _strong_wolfe(
                fun, x, t, d, loss, grad, gtd, max_ls=LBFGS_MAX_EVALS - evals
            )
            x = x + t * d
            evals += ls_evals
            if n == LBFGS_ITERATIONS or evals >= LBFGS_MAX_EVALS:
                break
            if np.abs(grad).max() <= self.tolerance_grad:
                break
            if np.abs(d * t).max() <= LBFGS_TOLERANCE_CHANGE:
                break
            if abs(loss - self.prev_loss) < LBFGS_TOLERANCE_CHANGE:
                break
        self.d, self.t = d, t
        return x

    def _direction(self, grad: np.ndarray, d: np.ndarray, t: float) -> np.ndarray:
        """Record the last (step, gradient change) pair if it has positive curvature, then
        -H·grad by the two-loop recursion."""
        y = grad - self.prev_grad
        s = d * t
        ys = float(y @ s)
        if ys > 1e-10:
            if len(self.old_dirs) == LBFGS_HISTORY:
                del self.old_dirs[0], self.old_stps[0], self.ro[0]
            self.old_dirs.append(y)
            self.old_stps.append(s)
            self.ro.append(1.0 / ys)
            self.h_diag = ys / float(y @ y)
        q = -grad
        al = [0.0] * len(self.old_dirs)
        for i in range(len(self.old_dirs) - 1, -1, -1):
            al[i] = float(self.old_stps[i] @ q) * self.ro[i]
            q = q - al[i] * self.old_dirs[i]
        r = q * self.h_diag
        for i in range(len(self.old_dirs)):
            be = float(self.old_dirs[i] @ r) * self.ro[i]
            r = r + (al[i] - be) * self.old_stps[i]
        return r


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None) -> float:
    """The minimiser of the cubic through two points with their slopes, within `bounds`
    (default: between the points); the midpoint when the cubic has none."""
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = np.float64(g1) + g2 - 3 * (np.float64(f1) - f2) / (np.float64(x1) - x2)
        d2_square = d1**2 - np.float64(g1) * g2
        if d2_square >= 0:
            d2 = np.sqrt(d2_square)
            if x1 <= x2:
                pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
            else:
                pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
            return float(min(max(pos, lo), hi))
    return (lo + hi) / 2.0


def _strong_wolfe(fun: Objective, x, t, d, f, g, gtd, max_ls):
    """A step length along `d` meeting the strong Wolfe conditions: bracket, then zoom with
    cubic interpolation (torch's _strong_wolfe). Returns (loss, grad, t, evaluations)."""
    d_norm = float(np.abs(d).max())
    f_new, g_new = fun(x + t * d)
    evals = 1
    gtd_new = float(g_new @ d)
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    done = False
    ls_iter = 0
    bracket_gtd: list[float] = []
    while ls_iter < max_ls:
        if f_new > (f + _C1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -_C2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        # extrapolate: the cubic's minimiser between 1.01·t and 10·t
        min_step, max_step = t + 0.01 * (t - t_prev), t * 10
        t_prev, t = (
            t,
            _cubic_interpolate(
                t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step)
            ),
        )
        f_prev, g_prev, gtd_prev = f_new, g_new, gtd_new
        f_new, g_new = fun(x + t * d)
        evals += 1
        gtd_new = float(g_new @ d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0.0, t], [f, f_new], [g, g_new]

    # zoom: shrink the bracket until a point meets the conditions
    insuf_progress = False
    low, high = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < LBFGS_TOLERANCE_CHANGE:
            break
        t = _cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        # a point too close to the bracket's ends makes little progress: move it 10% inside
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = fun(x + t * d)
        evals += 1
        gtd_new = float(g_new @ d)
        ls_iter += 1
        if f_new > (f + _C1 * t * gtd) or f_new >= bracket_f[low]:
            bracket[high], bracket_f[high] = t, f_new
            bracket_g[high], bracket_gtd[high] = g_new, gtd_new
            low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -_C2 * gtd:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                bracket[high], bracket_f[high] = bracket[low], bracket_f[low]
                bracket_g[high], bracket_gtd[high] = bracket_g[low], bracket_gtd[low]
            bracket[low], bracket_f[low] = t, f_new
            bracket_g[low], bracket_gtd[low] = g_new, gtd_new
    return bracket_f[low], bracket_g[low], bracket[low], evals
