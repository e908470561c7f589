"""Evaluation prompts answered during training (XTuner's EvaluateChatHook).

Before training, every `evaluation.every_n_steps` optimizer steps and at the end, each prompt of
`evaluation.inputs` is rendered with the config's template and system prompt (the data stage's renderer,
exactly as in training), answered with the config's sampling settings, printed, and written to
`work_dir/eval_outputs/step_N.txt`.

Generation runs inside `torch.random.fork_rng`, so sampling never shifts the training RNG: a resumed run
sees the same dropout masks as an uninterrupted one. Under ZeRO-3 every rank must join the forward passes,
so every rank generates; only rank 0 prints and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.data.stopwords import cut_at_stop
from tunesmith.files import write_text_atomic
from tunesmith.models.fast import eager_only


class EvaluateChat:
    def __init__(self, cfg: Any, tokenizer: Any, work_dir: Path, *, is_main: bool = True, printer=print):
        from tunesmith.data.encode import encode_prompt
        from tunesmith.data.stopwords import stop_words_for
        from tunesmith.data.templates import data_template, resolve_system

        self.cfg, self.tokenizer = cfg, tokenizer
        self.out_dir = Path(work_dir) / "eval_outputs"
        self.is_main, self.printer = is_main, printer
        template = data_template(cfg.data)
        system = resolve_system(cfg.data.system, cfg.data.system_template)
        from tunesmith.data.conversation import Turn

        self.prompts = [encode_prompt(tokenizer, template, [Turn(input=text, output="")], system=system or None)
                        for text in cfg.evaluation.inputs]
        self.stop_words = [w for w in stop_words_for(template, tokenizer) if w]
        # stop words that are one token (EOS, <|im_end|>, ...) stop through eos_token_id, which is cheap;
        # only the others need transformers' stop_strings matcher (slow to build for a large vocabulary)
        vocab = tokenizer.get_vocab()
        self.stop_ids = sorted({vocab[w] for w in self.stop_words if w in vocab}
                               | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
        self.stop_strings = [w for w in self.stop_words if w not in vocab]

    def due(self, step: int) -> bool:
        every = self.cfg.evaluation.every_n_steps
        return bool(self.prompts) and every is not None and step > 0 and step % every == 0

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int) -> list[str]:
        if not self.prompts:
            return []
        ev = self.cfg.evaluation
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        answers = []
        devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eager_only():  # compiled layers: no compile for a few prompts
            torch.manual_seed(self.cfg.training.seed)
            for ids in self.prompts:
                input_ids = torch.tensor([ids], device=device)
                kwargs: dict[str, Any] = {"max_new_tokens": ev.max_new_tokens, "use_cache": True,
                                          "attention_mask": torch.ones_like(input_ids),
                                          "pad_token_id": self.tokenizer.pad_token_id
                                          if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id}
                if ev.temperature > 0:
                    kwargs.update(do_sample=True, temperature=ev.temperature, top_p=ev.top_p, top_k=ev.top_k)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if self.stop_ids:
                    kwargs["eos_token_id"] = self.stop_ids
                if self.stop_strings:
                    kwargs.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
                out = model.generate(input_ids, **kwargs)
                text = self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=False)
                text = cut_at_stop(text, self.stop_words)  # where chat's incremental matcher stops too
                answers.append(text.strip())
        if was_training:
            model.train()
        if self.is_main:
            blocks = []
            for question, answer in zip(self.cfg.evaluation.inputs, answers, strict=True):
                blocks.append(f"### input\n{question}\n### output\n{answer}\n")
            text = f"evaluation at step {step}\n\n" + "\n".join(blocks)
            write_text_atomic(self.out_dir / f"step_{step}.txt", text)
            self.printer(text.rstrip())
        return answers
