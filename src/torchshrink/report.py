"""The run report: ``report.json`` (all numbers), ``report.md`` (a table with ratios to the baseline)
and ``pareto.png`` (accuracy against size and against latency, one point per stage)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchshrink.errors import CorruptFileError, MissingFileError
from torchshrink.io import atomic_path, write_json_atomic, write_text_atomic
from torchshrink.tables import markdown_table

Metrics = dict[str, Any]
REPORT_FILES = {"report_json": "report.json", "report_md": "report.md", "pareto_png": "pareto.png"}

__all__ = [
    "Report",
    "batch_sizes",
    "write_report",
    "read_report",
    "format_table",
    "markdown_table",
    "REPORT_FILES",
]


@dataclass
class Report:
    """Everything a run measured; ``baseline`` is the reference every ratio is taken against."""

    torchshrink_version: str
    recipe: dict[str, Any]
    seed: int
    baseline: Metrics
    stages: list[dict[str, Any]]
    final: Metrics
    artefacts: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    quality: str = "accuracy"  # "agreement": top-1 agreement with the original model (unlabelled data);
    # "cosine": an embedding model's fidelity to the original (mean cosine, nearest-neighbour agreement)
    timing: dict[str, Any] = field(default_factory=dict)
    """The final interleaved timing pass: rounds, machine load, per row and runtime [median, q1, q3]."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ratio(base: float, value: float) -> str:
    return f"{base / value:.2f}x" if value else "-"


def _speedup(m: Metrics, base: Metrics, key: str) -> str:
    """The speed-up timed side by side with the baseline when there is one, else the plain ratio."""
    batch = key.rsplit("_", 1)[-1]
    return f"{m[f'speedup_{batch}']:.2f}x" if f"speedup_{batch}" in m else _ratio(base[key], m[key])


def _latency(m: Metrics, batch: int, runtime: str = "") -> str:
    """Median milliseconds (``runtime`` "onnx_": on ONNX Runtime), with the interquartile range of the
    timing pass when there is one; "-" when that runtime was not timed."""
    value = m.get(f"{runtime}latency_ms_b{batch}")
    if value is None:
        return "-"
    iqr = m.get(f"{runtime}latency_iqr_ms_b{batch}")
    return f"{value:.3f} ({iqr:.3f})" if iqr is not None else f"{value:.3f}"


def _speedup_onnx(m: Metrics, batch: int) -> str:
    """An ONNX artefact's speed-up over the baseline on ONNX Runtime fp32, timed in the same run."""
    value = m.get(f"speedup_onnx_fp32_b{batch}")
    return f"{value:.2f}x" if value is not None else "-"


def batch_sizes(report: Report) -> tuple[int, int]:
    """The small and large batch the run timed (older reports: 1 and 32)."""
    small, large = (report.recipe.get("measure") or {}).get("batch_sizes", (1, 32))
    return int(small), int(large)


def format_table(report: Report) -> str:
    """A Markdown table: one row for the baseline and one per stage, with ratios to the baseline."""
    base = report.baseline
    small, large = batch_sizes(report)
    quality = _QUALITY[report.quality]

    def row(name: str, kind: str, m: Metrics, seconds: str) -> list[str]:
        return [
            name, kind, quality.score(m), quality.delta(m, base), _bytes(m["size_bytes"]),
            _ratio(base["size_bytes"], m["size_bytes"]), f"{m['params']:,}", f"{m['nonzero_params']:,}",
            f"{m['macs']:,}", _ratio(base["macs"], m["macs"]), _latency(m, small), _latency(m, large), _speedup(m, base, f"latency_ms_b{large}"),
            _latency(m, large, "onnx_"), _speedup_onnx(m, large), seconds,
        ]  # fmt: skip

    rows = [row("**baseline**", "-", base, "-")]
    for stage in report.stages:
        seconds = "resumed" if stage.get("resumed") else f"{stage['seconds']:.1f}"
        if stage.get("resume") == "continued":
            seconds += " (continued)"
        name = f"{stage['name']} (branch)" if stage.get("branch") else stage["name"]
        rows.append(row(name, stage["kind"], stage["metrics"], seconds))
    header = [
        "stage", "kind", quality.label, quality.delta_header, "size", "smaller", "params", "non-zero", "MACs",
        "fewer MACs", f"latency b{small} ms (IQR)", f"latency b{large} ms (IQR)", f"faster b{large} vs given",
        f"ONNX Runtime b{large} ms (IQR)", f"faster b{large} on ONNX Runtime vs given fp32", "seconds",
    ]  # fmt: skip
    return markdown_table(header, rows)


@dataclass(frozen=True)
class Quality:
    """How a report shows its quality score: column name, unit of the differences, explanation."""

    label: str
    note: str
    percent: bool = True  # a share, shown as a percentage and its differences in points

    def score(self, m: Metrics) -> str:
        if self.percent:
            return f"{m['accuracy'] * 100:.2f}%"
        nn = f" (NN {m['nn_agreement'] * 100:.1f}%)" if "nn_agreement" in m else ""
        return f"{m['accuracy']:.4f}{nn}"

    def delta(self, m: Metrics, base: Metrics) -> str:
        change = m["accuracy"] - base["accuracy"]
        return f"{change * 100:+.2f}" if self.percent else f"{change:+.4f}"

    @property
    def delta_unit(self) -> str:
        return " points" if self.percent else ""

    @property
    def delta_header(self) -> str:
        return "Δ (pts)" if self.percent else "Δ"

    @property
    def axis(self) -> str:
        return f"test {self.label} ({'%' if self.percent else 'x 100'})"


_QUALITY = {
    "accuracy": Quality("accuracy", "Accuracy: top-1 on the test split's labels."),
    "cosine": Quality(
        "cosine",
        "Fidelity: an embedding model is compared with the original on the test split: mean cosine of "
        "the embeddings and, in brackets, nearest-neighbour agreement (the share of texts whose closest "
        "other text is the same as with the original's embeddings); the original scores 1 and 100%.",
        percent=False,
    ),
    "agreement": Quality(
        "agreement",
        "Agreement: the data has no labels, so quality is top-1 agreement with the original model on the "
        "test split (the original scores 100% by definition).",
    ),
}


def _timing_lines(report: Report) -> list[str]:
    """The timing pass in a sentence, and a warning when other work kept the machine busy."""
    timing = report.timing or {}
    if not timing:
        return []
    load = timing.get("other_load_cores")
    line = (
        f"Timing: one interleaved pass, {timing['rounds']} rounds, {timing.get('threads', '?')} thread(s), "
        f"{timing['seconds']:.1f} s; other processes "
        f"used {'an unknown share' if load is None else f'{load:.2f}'} of {timing['cores']} cores meanwhile."
    )
    lines = [line, ""]
    if timing.get("busy"):
        lines += [
            "**Warning: the machine was busy while timing.** Latencies compare within this report; "
            "time again on an idle machine before quoting them elsewhere.",
            "",
        ]
    return lines


def _markdown(report: Report) -> str:
    final, base = report.final, report.baseline
    quality = _QUALITY[report.quality]
    large = batch_sizes(report)[1]
    onnx_gain = (
        f"; {_speedup_onnx(final, large)} vs the baseline on ONNX Runtime fp32"
        if f"speedup_onnx_fp32_b{large}" in final
        else ""
    )
    lines = [
        f"# torchshrink report: {report.recipe.get('name', 'recipe')}",
        "",
        f"torchshrink {report.torchshrink_version}, seed {report.seed}, {report.seconds:.1f} s in all.",
        "",
        f"Final model: {quality.label} {quality.score(final)} ({quality.delta(final, base)}{quality.delta_unit} vs baseline), {_bytes(final['size_bytes'])} ({_ratio(base['size_bytes'], final['size_bytes'])} smaller), "
        f"batch-{large} latency {final[f'latency_ms_b{large}']:.3f} ms ({_speedup(final, base, f'latency_ms_b{large}')} "
        f"faster than the model as given, in PyTorch{onnx_gain}).",
        "",
        *_timing_lines(report),
        format_table(report),
        "",
        quality.note,
        "Baseline: the model as loaded, or the trained model as it enters the first compressing stage.",
        "Latency: after all stages, the model as given and every stage's result are timed in one",
        "interleaved pass (A B C A B C ...) on the runtime each ships on, so identical models read alike",
        "and speed-ups (over the model as given, in PyTorch) are ratios within that pass; the figure in",
        "brackets is the interquartile range. The ONNX Runtime columns time each model on ONNX Runtime",
        "too (the file a stage ships, else its float model exported for timing) against the model as",
        "given exported to ONNX Runtime fp32: what a step buys on the runtime most deployments use.",
        "Size: the file a user would ship.",
        "",
        "## Artefacts",
        "",
        *[f"- {name}: `{file}`" for name, file in report.artefacts.items()],
        "",
        # pictures a stage drew (a generator's samples): shown where the report is read
        *[f"![{name}]({file})\n" for name, file in report.artefacts.items() if str(file).endswith(".png")],
    ]
    warned = [(s["name"], w) for s in report.stages for w in (s.get("details") or {}).get("warnings", [])]
    if warned:
        lines += ["## Warnings", "", *[f"- **{name}**: {text}" for name, text in warned], ""]
    for (
        stage
    ) in report.stages:  # tables a stage made (quantization plan, packed layers, ...), as it logged them
        for key, value in (stage.get("details") or {}).items():
            if key.endswith("_table") and isinstance(value, str):
                title = key[: -len("_table")].replace("_", " ")
                lines += [f"## {stage['name']}: {title}", "", value, ""]
    return "\n".join(lines)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both axes (smaller x, higher y), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _plot_candidates(ax: Any, report: Report, key: str) -> None:
    """A search stage's candidates (held-out accuracy), grey, with their own front dotted."""
    for stage in report.stages:
        search = (stage.get("details") or {}).get("search") or {}
        candidates = search.get("candidates") or []
        if key != "size_bytes" and search.get("latency_batch") != batch_sizes(report)[1]:
            continue  # timed at another batch size than this axis
        field = "size_bytes" if key == "size_bytes" else "latency_ms"
        points = [
            (c[field] / (1000 if field == "size_bytes" else 1), c["accuracy"] * 100) for c in candidates
        ]
        if not points:
            continue
        ax.scatter(*zip(*points, strict=True), color="0.6", marker="x", zorder=2,
                   label=f"{stage['name']} candidates (held-out)")  # fmt: skip
        front = _pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="0.5", linestyle=":")


def _plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [("baseline", report.baseline)] + [(s["name"], s["metrics"]) for s in report.stages]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "size_bytes", "size of the shipped file (kB, log)"),
        (
            axes[1],
            f"latency_ms_b{batch_sizes(report)[1]}",
            f"latency, batch {batch_sizes(report)[1]} (ms, log)",
        ),
    ):
        xs = [m[key] / (1000 if key == "size_bytes" else 1) for _, m in named]
        ys = [m["accuracy"] * 100 for _, m in named]
        ax.scatter(xs, ys, color="tab:blue", zorder=3)
        ax.scatter(xs[:1], ys[:1], color="tab:red", zorder=4, label="baseline")
        for (name, _), x, y in zip(named, xs, ys, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        _plot_candidates(ax, report, key)
        front = _pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            color="tab:green",
            linestyle="--",
            label="Pareto front",
        )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(_QUALITY[report.quality].axis)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"torchshrink: {report.recipe.get('name', 'recipe')}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and pareto.png into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    report.artefacts.update(REPORT_FILES)
    paths = {key: out_dir / name for key, name in REPORT_FILES.items()}
    _plot(report, paths["pareto_png"])
    write_text_atomic(paths["report_md"], _markdown(report))
    write_json_atomic(paths["report_json"], report.to_dict())
    return paths


def read_report(path: str | Path) -> Report:
    """Load a report.json back (for ``torchshrink inspect``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "report")
    try:
        return Report(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CorruptFileError(path, f"not a torchshrink report.json: {exc}") from exc
