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


# (label, key, digits, direction): "lower" / "higher" is better, "delta" a change without a verdict, None no change
CONVERSATION_ROWS = [
    ("loss (nats / token)", "loss", 4, "lower"),
    ("perplexity", "perplexity", 3, "lower"),
    ("answer tokens scored", "loss_tokens", 0, None),
    ("ROUGE-L F1", "rougeL", 4, "higher"),
    ("BLEU", "bleu", 2, "higher"),
    ("answers generated", "generated", 0, None),
    ("mean answer tokens", "mean_new_tokens", 1, None),
    ("seconds", "seconds", 1, None),
]
PAIR_ROWS = [
    ("preference accuracy", "preference_accuracy", 4, "higher"),
    ("margin (nats / token)", "margin", 4, "higher"),
    ("reward accuracy", "reward_accuracy", 4, None),
    ("reward margin (nats, beta = 1)", "reward_margin", 4, None),
    ("reward of chosen (nats, beta = 1)", "reward_chosen", 4, None),
    ("reward of rejected (nats, beta = 1)", "reward_rejected", 4, None),
    ("mean log p(chosen) (nats)", "logp_chosen", 3, "delta"),
    ("mean log p(rejected) (nats)", "logp_rejected", 3, "delta"),
    ("pairs scored", "pairs", 0, None),
    ("mean chosen tokens", "chosen_tokens", 1, None),
    ("mean rejected tokens", "rejected_tokens", 1, None),
    ("seconds", "seconds", 1, None),
]


def _pair_notes(report: dict) -> list[str]:
    lines = ["- log-probabilities count only each pair's final answer (and its end-of-turn token), as DPO / ORPO "
             "training scores them; both answers of a pair follow the same prompt",
             "- preference accuracy: share of pairs whose chosen answer has the higher mean log-probability per token "
             "under the model itself; margin: mean over pairs of chosen minus rejected mean log-probability per token"]
    reward = report.get("reward") or {}
    if reward.get("text"):
        lines.append(f"- reward: DPO's implicit reward of `{reward['policy']}` with `{reward['reference']}` as the "
                     "reference, un-scaled (beta = 1; times the training beta it is what training logs): reward "
                     "accuracy = share of pairs with (c - c_ref) > (r - r_ref), reward margin = mean of "
                     "(c - c_ref) - (r - r_ref), where c / r are the summed log-probabilities of the chosen / rejected "
                     "answer")
        if reward["text"] == "rescored":
            lines.append(f"- `{reward['reference']}` renders the pairs differently (template or system prompt), so "
                         f"for the reward it also scored `{reward['policy']}`'s rendering, as DPO's reference does")
    elif reward.get("note"):
        lines.append(f"- no reward: {reward['note']}")
    return lines


def _table(models: list[dict], rows: list) -> list[str]:
    two = len(models) == 2
    header = "| metric | " + " | ".join(f"`{m['name']}`" for m in models) + (" | change |" if two else " |")
    lines = [header, "|---" * (len(models) + 1 + two) + "|"]
    for label, key, digits, direction in rows:
        values = [m.get(key) for m in models]
        if all(v is None for v in values):
            continue
        row = f"| {label} | " + " | ".join(_fmt(v, digits) for v in values)
        if two:
            a, b = values
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and direction is not None:
                delta = a - b
                better = direction != "delta" and ((delta < 0) if direction == "lower" else (delta > 0))
                row += f" | {delta:+.{digits}f} {'(better)' if better and delta else ''}".rstrip()
            else:
                row += " | "
        lines.append(row + " |")
    return lines + [""]


def render_markdown(report: dict) -> str:
    models = report["models"]
    pairs = report.get("kind") == "pairs"
    count = f"{report['samples']} {'pairs' if pairs else 'conversations'}"
    lines = ["# Evaluation report", "",
             f"- data: `{report['data']}` ({report['format']} format, {count}"
             f"{', first ' + str(report['max_samples']) if report.get('max_samples') else ''})",
             f"- prompt template: `{report['prompt_template']}`"]
    if pairs:
        lines += _pair_notes(report)
    else:
        lines.append("- loss counts only the answer tokens (and their end-of-turn token); "
                     "perplexity = exp(mean token loss)")
    lines.append("")
    lines += _table(models, PAIR_ROWS if pairs else CONVERSATION_ROWS)
    if len(models) == 2:
        lines += [f"`change` = `{models[0]['name']}` minus `{models[1]['name']}`.", ""]
    examples = report.get("examples") or []
    if examples and pairs:
        lines += ["## Pairs", "", "margin: chosen minus rejected mean log-probability per token.", ""]
        names = [m["name"] for m in models if m["name"] in examples[0]["margins"]]
        lines += ["| # | prompt | chosen | rejected | " + " | ".join(f"margin `{n}`" for n in names) + " |",
                  "|---" * (4 + len(names)) + "|"]
        for ex in examples:
            margins = " | ".join(f"{ex['margins'][n]:+.4f}" for n in names)
            lines.append(f"| {ex['index']} | {_cell(ex['prompt'], 200)} | {_cell(ex['chosen'], 200)} | "
                         f"{_cell(ex['rejected'], 200)} | {margins} |")
        lines.append("")
    elif examples:
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
    if report.get("kind") == "pairs":
        _plot_pairs(axes, models)
    else:
        _plot_conversations(axes, models)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _bars(ax, models: list[dict], metrics: list[tuple[str, str]], scale: dict[str, float], *,
          missing_as_zero: bool = True) -> None:
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        shown = [i for i, (_, key) in enumerate(metrics) if missing_as_zero or m.get(key) is not None]
        values = [(m.get(metrics[i][1]) or 0.0) * scale.get(metrics[i][1], 1) for i in shown]
        xs = [i + k * width for i in shown]
        bars = ax.bar(xs, values, width=width, label=m["name"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(metrics))], [n for n, _ in metrics])
    ax.set_title("metrics")
    ax.legend(fontsize=8)


def _plot_conversations(axes, models: list[dict]) -> None:
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
    _bars(ax, models, metrics, {"rougeL": 100})


def _plot_pairs(axes, models: list[dict]) -> None:
    ax = axes[0]
    for m in models:
        margins = m.get("per_pair_margin") or []
        if margins:
            ax.hist(margins, bins=min(30, max(5, len(margins) // 3)), alpha=0.55,
                    label=f"{m['name']} (mean {m['margin']:+.3f})")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("per-pair margin: chosen minus rejected mean log-prob (nats / token)")
    ax.set_ylabel("pairs")
    ax.set_title("held-out preference pairs")
    ax.legend(fontsize=8)
    metrics = [("preference accuracy", "preference_accuracy")]
    if any("reward_accuracy" in m for m in models):
        metrics.append(("reward accuracy", "reward_accuracy"))
    _bars(axes[1], models, metrics, {}, missing_as_zero=False)  # the reference has no reward of its own
    axes[1].set_ylim(0, 1.1)
    axes[1].set_title("share of pairs ranked right")


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
