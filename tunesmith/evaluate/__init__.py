"""Evaluation: held-out loss and perplexity (answer tokens only), ROUGE-L / BLEU of generated answers against
references, an optional second model side by side, and a report (report.md + report.json + report.png). On
preference pairs: each model's ranking of chosen against rejected, and DPO's reward against the second model.

    from tunesmith.evaluate import EvalOptions, run_eval
    report = run_eval(EvalOptions(model="./merged", data="medqa-test.jsonl", out="eval_report"))
"""

from tunesmith.evaluate.metrics import LossResult, bleu, rouge_l, token_losses
from tunesmith.evaluate.preference import pair_metrics, reward_metrics, score_pairs
from tunesmith.evaluate.report import render_markdown, write_report
from tunesmith.evaluate.run import EvalOptions, detect_format, load_conversations, load_report, run_eval

__all__ = ["EvalOptions", "LossResult", "bleu", "detect_format", "load_conversations", "load_report",
           "pair_metrics", "render_markdown", "reward_metrics", "rouge_l", "run_eval", "score_pairs", "token_losses",
           "write_report"]
