"""HTML reports with pictures: `evaluate --report DIR` and the RUN_DIR/report.html adapt writes.

Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, so no GUI backend or
global figure state is involved. matplotlib is the optional extra `report`.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
from numpy.typing import ArrayLike

from edgetransfer import __version__, config
from edgetransfer.data import load_image, pillow_warnings_off, run_data_dir
from edgetransfer.errors import DataError, EdgeTransferError
from edgetransfer.evaluate import run_validation
from edgetransfer.fileio import atomic_write_text, output_dir
from edgetransfer.manifest import read_manifest

REPORT_INDEX = "index.html"
RUN_REPORT = "report.html"
RUN_REPORT_FILES = "report"  # the run report's pictures, beside report.html
MISTAKES = config.MISTAKES
THUMB = 128  # thumbnail's longer side in pixels
INSTALL_HINT = "pip install 'edgetransfer[report]'"


class ReportUnavailable(EdgeTransferError):
    """matplotlib (the `report` extra) is not installed."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportUnavailable(f"the HTML report needs matplotlib: {INSTALL_HINT}") from None


# Average width of a tick-label character at matplotlib's default 10 pt, in inches: margins
# are set from it instead of by a layout engine (constrained layout draws every figure twice,
# which tripled the plotting time).
CHAR_IN = 0.085


def _figure(width: float, height: float, left: float, right: float, bottom: float, top: float):
    """A Figure of width x height inches whose subplots leave these margins (inches) free."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height
    )
    return fig


TICK_CHARS = 40  # a longer class name is shortened on the plot (the tables show it whole)


def _tick_text(label: str) -> str:
    return label if len(label) <= TICK_CHARS else label[: TICK_CHARS - 1] + "\u2026"


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path) -> None:
    """Confusion matrix as a PNG: colour is the row share (recall), text the count.

    Class names are drawn as plain text (parse_math off): a class called ``$\\foo$`` must not
    be parsed as matplotlib math markup, which fails on unknown commands.
    """
    labels = [_tick_text(lb) for lb in labels]
    c = len(labels)
    size = min(3 + 0.4 * c, 14)  # the matrix itself
    ticks = c <= 40  # beyond that, tick labels and counts are unreadable anyway
    label = CHAR_IN * max(map(len, labels)) if ticks else CHAR_IN * 3
    left, bottom = 0.55 + label, 0.55 + 0.72 * label  # x labels are turned 45 degrees
    right, top = 1.1, 0.4  # the colour bar and its label; the title
    fig = _figure(size + left + right, size + bottom + top, left, right, bottom, top)
    ax = fig.add_subplot()
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    bar.set_ticks([0, 0.5, 1])
    if ticks:
        ax.set_xticks(
            range(c), labels, rotation=45, ha="right", rotation_mode="anchor", parse_math=False
        )
        ax.set_yticks(range(c), labels, parse_math=False)
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    color = "white" if share[i, j] > 0.6 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({int(cm.sum())} images)")
    fig.savefig(path)


def plot_history(history: list[dict], path: Path, best_epoch: int | None = None) -> None:
    """Training and validation loss and top-1 per epoch, the kept epoch marked."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 3.8, left=0.6, right=0.2, bottom=0.55, top=0.35)
    fig.subplots_adjust(wspace=0.22)
    epochs = [r["epoch"] for r in history]
    for k, (key, title) in enumerate((("loss", "Loss"), ("top1", "Top-1 accuracy"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for split, style in (("train", "-"), ("val", "-")):
            values = [r.get(f"{split}_{key}") for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", markersize=3, label=split)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label="kept epoch")
        # Few ticks: laying out tick labels is most of matplotlib's time here (-25% CPU).
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        if key == "top1":
            ax.set_ylim(0, 1.02)
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
        else:
            ax.yaxis.set_major_locator(MaxNLocator(5))
            # short labels in the fixed margin: 2.5 and "1e-4" above, not 0.00025
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 4))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path)


def save_thumbnail(src: str | os.PathLike, dst: Path, size: int = THUMB) -> None:
    """A PNG thumbnail; small images are enlarged without smoothing so their pixels stay visible.
    Runs in threads: Pillow's warnings are silenced by the caller (data.pillow_warnings_off)."""
    from PIL import Image

    # a large JPEG decodes at a fraction of its size
    img = load_image(src, draft=(size, size), quiet=False)
    scale = size / max(img.size)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)
    img.save(dst, format="PNG")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.summary td { padding: 2px 12px 2px 0; }
table.metrics { border-collapse: collapse; }
table.metrics th, table.metrics td { padding: 4px 10px; border-bottom: 1px solid #eee; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
.low { color: #b00020; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 150px; font-size: 0.8em; }
figure img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated;
             background: #f4f4f4; border: 2px solid #b00020; }
figcaption { overflow-wrap: anywhere; } .file { color: #555; word-break: break-all; }
.note { color: #666; }
"""


def _src(rel: str) -> str:
    return html.escape(quote(rel), quote=True)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n"
        f'<p class="note">Written by edgetransfer {_e(__version__)}.</p>\n</body>\n</html>\n'
    )


def _summary(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><td>{_e(k)}</td><td><b>{_e(v)}</b></td></tr>" for k, v in rows)
    return f'<table class="summary">{cells}</table>'


def baseline_verdict(baseline: dict) -> tuple[bool, str]:
    """Whether the source model helped, and the one sentence saying so, from a manifest's
    ``baseline`` section (adapt --baseline). A tie counts as not helping."""
    gain = baseline["gain_points"]
    adapted, scratch = baseline["pretrained_val_top1"], baseline["scratch_val_top1"]
    n = baseline["val_images"]
    compared = (
        f"{adapted:.1%} adapted vs {scratch:.1%} from scratch, same architecture, split, "
        f"epochs, batch size and seed; {n} validation images, one image = {100 / n:.1f} points"
    )
    if gain > 0:
        return True, f"the source model helps by {gain:+.1f} points ({compared})"
    return False, (
        f"warning: the source model does not help here ({gain:+.1f} points: {compared}); "
        "training from scratch does as well: try another --strategy or source model"
    )


def _baseline_section(baseline: dict) -> list[str]:
    helps, sentence = baseline_verdict(baseline)
    seconds = baseline.get("seconds", {})
    rows = [
        ("adapted (source weights)", f"{baseline['pretrained_val_top1']:.1%}"),
        ("from scratch (random weights)", f"{baseline['scratch_val_top1']:.1%}"),
        ("difference", f"{baseline['gain_points']:+.1f} points"),
        (
            "scratch recipe",
            f"--strategy {baseline['strategy']}, lr {baseline['lr']:g}, augment "
            f"{baseline['augment']}, best epoch {baseline['best_epoch']} of {baseline['epochs']}",
        ),
    ]
    if seconds:
        rows.append(
            ("time", f"{seconds['pretrained']:.1f} s adapted, {seconds['scratch']:.1f} s scratch")
        )
    css = "" if helps else ' class="low"'
    return [
        "<h2>Against training from scratch</h2>",
        f"<p{css}>{_e(sentence[0].upper() + sentence[1:])}.</p>",
        _summary(rows),
    ]


def _class_table(result) -> str:
    head = "<tr><th>class</th><th>images</th><th>precision</th><th>recall</th><th>F1</th></tr>"
    rows = []
    for label, m in result.metrics.per_class.items():
        cells = []
        for v in (m.precision, m.recall, m.f1):
            low = " low" if m.support and v < 0.8 else ""
            cells.append(f'<td class="num{low}">{v:.1%}</td>')
        rows.append(
            f'<tr><td>{_e(label)}</td><td class="num">{m.support}</td>{"".join(cells)}</tr>'
        )
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


class _Thumbnails:
    """Thumbnails of the most confident mistakes, made by threads while the plots are drawn:
    Pillow releases the GIL to decode and resize, matplotlib holds it to draw."""

    def __init__(self, result, folder: Path, mistakes: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.wrong = result.mistakes(mistakes)
        self.names = [f"mistakes/{i:03d}.png" for i in range(len(self.wrong))]
        self.pool = self.jobs = None
        # Pillow's warnings are silenced once, here, until close(): threads cannot each change
        # the process-wide warning filters (data.pillow_warnings_off).
        self.quiet = contextlib.ExitStack()
        if self.wrong:
            (folder / "mistakes").mkdir(exist_ok=True)
            self.quiet.enter_context(pillow_warnings_off())
            self.pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), "thumbnail")
            self.jobs = [
                self.pool.submit(save_thumbnail, m.path, folder / name)
                for m, name in zip(self.wrong, self.names, strict=True)
            ]

    def done(self) -> list[tuple[object, str]]:
        """(mistake, picture name) of the thumbnails made; a file that changed since it was
        evaluated is left out."""
        if self.pool is None:
            return []
        made = []
        try:
            for m, name, job in zip(self.wrong, self.names, self.jobs, strict=True):
                try:
                    job.result()
                except DataError:
                    continue
                made.append((m, name))
        finally:
            self.close()
        return made

    def close(self) -> None:
        """Wait for the running thumbnails and drop the queued ones (done, or an error), then
        restore the warning filters. Called by the thread that made this object."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.quiet.close()

    def __enter__(self) -> _Thumbnails:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _eval_sections(result, folder: Path, prefix: str, thumbs: _Thumbnails) -> list[str]:
    """Confusion matrix, per-class table and mistake thumbnails; pictures go into `folder`,
    referenced as `prefix` + name from the HTML file."""
    plot_confusion(result.metrics.confusion, result.metrics.labels, folder / "confusion.png")
    out = [
        "<h2>Confusion matrix</h2>",
        f'<img class="plot" src="{_src(prefix + "confusion.png")}" '
        'alt="confusion matrix: rows are the true class, columns the prediction">',
        "<h2>Per class</h2>",
        _class_table(result),
    ]
    total_wrong = int((result.probs.argmax(1) != result.truth).sum())
    out.append(f"<h2>Most confident mistakes ({len(thumbs.wrong)} of {total_wrong})</h2>")
    made = thumbs.done()
    if not thumbs.wrong:
        out.append('<p class="note">No mistakes.</p>')
    else:
        figs = [
            f'<figure><img src="{_src(prefix + name)}" alt="{_e(Path(m.path).name)}">'
            f"<figcaption><b>{_e(m.pred)}</b> {m.prob:.0%}, true <b>{_e(m.true)}</b><br>"
            f'<span class="file">{_e(_short(m.path))}</span></figcaption></figure>'
            for m, name in made
        ]
        out.append(f'<div class="grid">{"".join(figs)}</div>')
    if result.skipped:
        items = "".join(f"<li>{_e(p)}: {_e(r)}</li>" for p, r in result.skipped)
        out.append(f"<h2>Unreadable images ({len(result.skipped)})</h2><ul>{items}</ul>")
    return out


def _short(path: str) -> str:
    """class-folder/file name: enough to find the image, short enough for a caption."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _prob(p: float | None) -> str:
    """A probability to 3 places; a dash in a manifest from before it was recorded."""
    return "–" if p is None else f"{p:.3f}"


def _share(p: float | None) -> str:
    """A share as a percentage; a dash where there is none (a trainer's re-split score)."""
    return "–" if p is None else f"{p:.1%}"


def _auto_section(auto: dict) -> list[str]:
    """The comparison `--strategy auto` recorded in the manifest (adapt.auto)."""
    head = (
        "<tr><th>candidate</th><th>validation top-1</th><th>images right</th>"
        "<th>mean true-class probability</th><th>re-split top-1</th><th>schedule</th>"
        "<th>seconds</th></tr>"
    )
    rows = []
    for r in auto.get("candidates", []):
        # "candidate" names a head's --features; manifests from before it name the strategy only
        candidate = r.get("candidate", r.get("strategy"))
        name = _e(candidate or "?")
        if candidate == auto.get("winner"):
            name = f"<b>{name}</b>"
        if "skipped" in r:
            rows.append(f'<tr><td>{name}</td><td colspan="6">{_e(r["skipped"])}</td></tr>')
            continue
        rows.append(
            f'<tr><td>{name}</td><td class="num">{r["val_top1"]:.1%}</td>'
            f'<td class="num">{r["val_correct"]} of {r["val_images"]}</td>'
            f'<td class="num">{_prob(r.get("val_true_prob"))}</td>'
            f'<td class="num">{_share(r.get("resplit_top1"))}</td>'
            f"<td>{_e(r['schedule'])} ({r['epochs']} epochs)</td>"
            f'<td class="num">{r["seconds"]:.1f}</td></tr>'
        )
    budget = auto.get("budget_s")
    limit = f"a budget of {budget:g} s" if budget is not None else "no time budget"
    # each part's own pick when the two met (alone, a part's pick is the run's); manifests
    # from before the re-splits have neither part
    parts = [
        f"<p>Of {what}: {_e(auto[part]['pick'])}.</p>"
        for part, what in (("heads", "the heads"), ("trainers", "the strategies that train"))
        if "heads" in auto and "trainers" in auto
    ]
    return [
        "<h2>Strategy chosen by --strategy auto</h2>",
        f"<p>Picked {_e(auto.get('pick', '?'))}.</p>",
        *parts,
        f'<table class="metrics">{head}{"".join(rows)}</table>',
        f'<p class="note">Compared in {auto.get("seconds", 0):.0f} s with {limit}: the heads '
        "on re-splits of the training and validation images, the strategies that train on the "
        "validation images; the winner then trained with the full schedule (the results "
        "above).</p>",
    ]


def _metric_rows(result) -> list[tuple[str, object]]:
    m = result.metrics
    return [
        (
            "images",
            f"{m.images}" + (f" ({len(result.skipped)} unreadable)" if result.skipped else ""),
        ),
        ("top-1", f"{m.top1:.1%}"),
        (f"top-{m.top5_k}", f"{m.top5:.1%}"),
        ("macro F1", f"{m.macro_f1:.1%}"),
    ]


def write_eval_report(
    result, out: str | os.PathLike, *, force: bool = False, mistakes: int = MISTAKES
) -> Path:
    """Write an evaluation report folder: index.html, confusion.png, mistakes/, metrics.json.

    Args:
        result: an evaluate.EvalResult.
        out: the folder; an existing one is replaced only with `force`, and only on success.

    Returns:
        The path of index.html.
    """
    require_matplotlib()
    # never the evaluated model or data folder, nor a folder holding them
    with output_dir(out, force, (result.model, result.data_dir)) as tmp:
        with _Thumbnails(result, tmp, mistakes) as thumbs:
            sections = _eval_sections(result, tmp, "", thumbs)
        body = [
            _summary(
                [
                    ("model", result.model),
                    ("data", f"{result.data_dir} (split: {result.split})"),
                    *_metric_rows(result),
                ]
            ),
            *sections,
        ]
        title = f"Evaluation of {Path(result.model).name or result.model}"
        atomic_write_text(tmp / REPORT_INDEX, _page(title, body))
        atomic_write_text(
            tmp / "metrics.json", json.dumps(result.to_dict(mistakes), indent=2) + "\n"
        )
    return Path(out) / REPORT_INDEX


def write_run_report(
    run_dir: str | os.PathLike,
    *,
    model=None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
    mistakes: int = MISTAKES,
    val_logits: ArrayLike | None = None,
    bad: Sequence[tuple[os.PathLike, str]] = (),
) -> Path:
    """Write RUN_DIR/report.html (pictures in RUN_DIR/report/): training curves from
    history.json, and confusion matrix, per-class table and mistakes on the validation split.

    Args:
        run_dir: a RUN_DIR with edgetransfer.json and history.json (model.safetensors too,
            unless `model` or `val_logits` is given).
        model: the eager Classifier already in memory; loaded from run_dir when None.
        data_dir: the data the run was adapted on [default: the one recorded in run.json]. When
            it is gone, the report has the curves only.
        progress: show a progress bar while the validation images run.
        val_logits: the kept epoch's logits on the readable validation images, in split order
            (train.TrainResult.val_logits): adapt has them already, so the model does not run
            again. Ignored (the model runs) when they do not match the split.
        bad: the files adapt could not read, (path, reason); those in the validation split are
            listed as unreadable, as evaluate lists them.

    Returns:
        The path of report.html.

    Raises:
        ReportUnavailable: matplotlib is not installed (nothing is written).
    """
    require_matplotlib()
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    try:
        history = json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        history = []
    data_dir = Path(data_dir) if data_dir is not None else run_data_dir(run_dir)
    best = manifest.adapt.get("best_epoch")
    rows: list[tuple[str, object]] = [
        ("model", f"{manifest.arch}, {len(manifest.labels)} classes"),
        ("strategy", manifest.adapt.get("strategy", "?")),
        *(
            [("features", f"{manifest.adapt['features']}: {', '.join(manifest.adapt['taps'])}")]
            if manifest.adapt.get("features")
            else []
        ),
        (
            "images",
            f"{manifest.data.get('train', '?')} train / {manifest.data.get('val', '?')} validation",
        ),
    ]
    if best is not None:
        rows.append(("kept epoch", f"{best} of {manifest.adapt.get('epochs', len(history))}"))
    with output_dir(run_dir / RUN_REPORT_FILES, force=True) as tmp:
        result = thumbs = None
        if data_dir is not None and data_dir.is_dir():
            result = run_validation(
                run_dir,
                manifest,
                data_dir,
                model=model,
                val_logits=val_logits,
                bad=bad,
                progress=progress,
            )
            thumbs = _Thumbnails(result, tmp, mistakes)  # decoding while the curves are drawn
        body = _auto_section(manifest.adapt["auto"]) if "auto" in manifest.adapt else []
        with thumbs or contextlib.nullcontext():
            if history:
                plot_history(history, tmp / "curves.png", best)
                body += [
                    "<h2>Training curves</h2>",
                    f'<img class="plot" src="{_src(RUN_REPORT_FILES + "/curves.png")}" '
                    'alt="loss and top-1 per epoch">',
                ]
            if result is not None:
                rows += [(f"validation {k}", v) for k, v in _metric_rows(result)]
                body += _eval_sections(result, tmp, RUN_REPORT_FILES + "/", thumbs)
            else:
                body.append(
                    '<p class="note">The data folder of this run is gone: no validation '
                    "results. Run <code>edgetransfer evaluate RUN_DIR DATA_DIR --split val "
                    "--report DIR</code> for them.</p>"
                )
        # Not run_dir.name: adapt calls this on its temp folder before renaming it.
        where = f" on {data_dir.name}" if data_dir is not None else ""
        if manifest.baseline:
            body = _baseline_section(manifest.baseline) + body
        page = _page(f"Adaptation report: {manifest.arch}{where}", [_summary(rows), *body])
    atomic_write_text(run_dir / RUN_REPORT, page)
    return run_dir / RUN_REPORT
