"""The evaluation report: `report.json` (everything), `report.md` (for people) and `report.png` (a plot).
Each file is written to a temporary name and renamed, so a report is never half-written."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunesmith.files import atomic_path, write_text_atomic


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def render_markdown(report: dict) -> str:
    models = report["models"]
    lines = ["# Evaluation report", "",
             f"- data: `{report['data']}` ({report['format']} format, {report['samples']} conversations"
             f"{', first ' + str(report['max_samples']) if report.get('max_samples') else ''})",
             f"- prompt template: `{report['prompt_template']}`",
             "- loss counts only the answer tokens (and their end-of-turn token); perplexity = exp(mean token loss)",
             ""]
    header = (
        "| metric | " + " | ".join(f"`{m['name']}`" for m in models) + (" | change |" if len(models) == 2 else " |")
    )
    lines += [header, "|---" * (len(models) + 1 + (len(models) == 2)) + "|"]
    rows = [
        ("loss (nats / token)", "loss", 4, True),
        ("perplexity", "perplexity", 3, True),
        ("answer tokens scored", "loss_tokens", 0, None),
        ("ROUGE-L F1", "rougeL", 4, False),
        ("BLEU", "bleu", 2, False),
        ("answers generated", "generated", 0, None),
        ("mean answer tokens", "mean_new_tokens", 1, None),
        ("seconds", "seconds", 1, None),
    ]
    for label, key, digits, lower_better in rows:
        values = [m.get(key) for m in models]
        if all(v is None for v in values):
            continue
        row = f"| {label} | " + " | ".join(_fmt(v, digits) for v in values)
        if len(models) == 2:
            a, b = values
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and lower_better is not None:
                delta = a - b
                better = (delta < 0) if lower_better else (delta > 0)
                row += f" | {delta:+.{digits}f} {'(better)' if better and delta else ''}".rstrip()
            else:
                row += " | "
        lines.append(row + " |")
    lines.append("")
    if len(models) == 2:
        lines += [f"`change` = `{models[0]['name']}` minus `{models[1]['name']}`.", ""]
    examples = report.get("examples") or []
    if examples:
        lines += ["## Examples", ""]
        header = "| # | prompt | reference | " + " | ".join(f"`{m['name']}`" for m in models) + " |"
        lines += [header, "|---" * (3 + len(models)) + "|"]
        for ex in examples:
            outs = " | ".join(_cell(ex["outputs"].get(m["name"], ""), 200) for m in models)
            lines.append(f"| {ex['index']} | {_cell(ex['prompt'], 200)} | {_cell(ex['reference'], 200)} | {outs} |")
        lines.append("")
    lines += ["![metrics](report.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for m in models:
        losses = [x for x in m.get("per_sample_loss", []) if x is not None and not math.isnan(x)]
        if losses:
            ax.hist(
                losses, bins=min(30, max(5, len(losses) // 3)), alpha=0.55, label=f"{m['name']} (mean {m['loss']:.3f})"
            )
    ax.set_xlabel("per-conversation answer loss (nats / token)")
    ax.set_ylabel("conversations")
    ax.set_title("held-out loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    metrics = [("perplexity", "perplexity"), ("ROUGE-L ×100", "rougeL"), ("BLEU", "bleu")]
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        values = [(m.get(key) or 0.0) * (100 if key == "rougeL" else 1) for _, key in metrics]
        xs = [i + k * width for i in range(len(metrics))]
        bars = ax.bar(xs, values, width=width, label=m["name"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(metrics))], [n for n, _ in metrics])
    ax.set_title("metrics")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    plot(report, paths["png"])
    write_text_atomic(
        paths["json"], json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False, default=lambda o: None) + "\n"
    )
    write_text_atomic(paths["md"], render_markdown(report))
    return paths
