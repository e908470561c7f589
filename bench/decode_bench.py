"""Decode speed of `tunesmith chat`'s generator against XTuner's way of generating.

Baseline (what `xtuner chat` 0.1.23 does): `model.generate` with a `TextStreamer` and a stop criterion that
decodes the whole sequence after every token and compares its tail with the stop words. Ours:
`tunesmith.infer.Generator` (plain on CPU; static KV cache + compiled CUDA-graph decode step on CUDA), with
incremental detokenisation and stop checks. Both greedy, batch 1, same prompt; the new ids are compared.

  # CPU, the built-in SmolLM2 (small N)
  python bench/decode_bench.py --model builtin:smollm2-135m-instruct --new-tokens 128
  # GPU: random InternLM-chat-7b-shaped model, bf16, 2,000 new tokens
  python bench/decode_bench.py --model-shape internlm-7b --new-tokens 2000

Prints one JSON line per run and a summary (tokens/s, time to first token, speed-up, identical output).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {
    # InternLM-chat-7b: Llama layout, 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 103168, 2048 positions
    "internlm-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=103168, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096),
}
STOP_WORDS = ["<eoa>"]
PROMPT = "<|User|>:Write a long story about a lighthouse keeper and the sea.<eoh>\n<|Bot|>:"


def word_tokenizer(vocab_size: int):
    """An offline fast tokenizer with `vocab_size` entries (ids decode to short words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.model_shape:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        shape = SHAPES[args.model_shape]
        config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        tokenizer = word_tokenizer(shape["vocab_size"])
        prompt_ids = [1] + [3 + (i * 7919) % (shape["vocab_size"] - 3) for i in range(24)]
    else:
        from tunesmith.infer.api import load_for_chat

        model, tokenizer = load_for_chat(
            args.model, torch_dtype=args.dtype if args.dtype != "bf16" or device == "cuda" else "fp32"
        )
        prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    model.eval()
    model.generation_config.eos_token_id = None  # run the full length on both sides
    return model, tokenizer, prompt_ids, device


class XtunerStop:
    """XTuner's StopWordStoppingCriteria: decode everything, strip, compare the tail."""

    def __init__(self, tokenizer, stop_words):
        self.tokenizer, self.stop_words = tokenizer, stop_words

    def __call__(self, input_ids, scores, **kwargs):
        text = self.tokenizer.decode(input_ids[0]).replace("\r", "").replace("\n", "")
        return torch.tensor([any(text.endswith(w) for w in self.stop_words)], device=input_ids.device)


def run_baseline(model, tokenizer, prompt_ids, n, device, cache=None):
    from transformers import StoppingCriteriaList, TextStreamer

    first = {}

    class Streamer(TextStreamer):
        def put(self, value):
            if "t" in first or not self.next_tokens_are_prompt:
                first.setdefault("t", time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text, stream_end=False):
            sink.write(text)

    sink = io.StringIO()
    streamer = Streamer(tokenizer, skip_prompt=True)
    ids = torch.tensor([prompt_ids], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([XtunerStop(tokenizer, STOP_WORDS)]),
        eos_token_id=None,
        pad_token_id=0,
        **({"cache_implementation": cache, "disable_compile": True} if cache else {}),
    )
    if device == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    new = out[0, len(prompt_ids) :].tolist()
    ttft = first.get("t", t0) - t0
    name = "transformers generate + TextStreamer + XTuner stop" + (f" ({cache} cache)" if cache else "")
    return {
        "impl": name,
        "new_tokens": len(new),
        "ttft_s": round(ttft, 4),
        "total_s": round(total, 3),
        "decode_tok_s": round((len(new) - 1) / max(total - ttft, 1e-9), 2),
        "ids": new,
    }


def run_ours(model, tokenizer, prompt_ids, n, device, mode):
    from tunesmith.infer.generate import Generator, SamplingConfig

    gen = Generator(model, tokenizer, mode=mode)
    gen.eos_token_ids = set()
    sampling = SamplingConfig(max_new_tokens=n, temperature=0)
    t0 = time.perf_counter()
    gen.reserve(len(prompt_ids) + n)
    warm = gen.generate(prompt_ids[:-1], SamplingConfig(max_new_tokens=64, temperature=0), stop_words=STOP_WORDS)
    warm_s = time.perf_counter() - t0
    gen.reset()
    sink = io.StringIO()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = gen.generate(prompt_ids, sampling, stop_words=STOP_WORDS, on_text=sink.write)
    total = time.perf_counter() - t0
    return {
        "impl": f"tunesmith Generator ({gen.mode})",
        "new_tokens": len(result.ids),
        "ttft_s": round(result.time_to_first_token, 4),
        "total_s": round(total, 3),
        "decode_tok_s": round(result.tokens_per_second, 2),
        "warmup_s": round(warm_s, 1),
        "warm_tokens": len(warm.ids),
        "ids": result.ids,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="random-init model of this shape instead of --model")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 2000 on CUDA, 128 on CPU")
    ap.add_argument("--dtype", default=None, help="bf16 (CUDA default) / fp16 / fp32 (CPU default)")
    ap.add_argument("--modes", default=None, help="comma list of our modes (default: compiled on CUDA, plain on CPU)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--baseline-cache",
        default=None,
        help="cache_implementation for the baseline generate (e.g. static: the same cache layout as ours)",
    )
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    n = args.new_tokens or (2000 if cuda else 128)
    model, tokenizer, prompt_ids, device = build(args)
    print(
        f"device {device}, dtype {args.dtype}, prompt {len(prompt_ids)} tokens, {n} new tokens, "
        f"torch {torch.__version__}",
        file=sys.stderr,
    )
    runs = []
    modes = (args.modes or ("compiled" if cuda else "plain")).split(",")
    for mode in modes:
        runs.append(run_ours(model, tokenizer, prompt_ids, n, device, mode))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "ids"}), flush=True)
    if not args.skip_baseline:
        base = run_baseline(model, tokenizer, prompt_ids, n, device, args.baseline_cache)
        print(json.dumps({k: v for k, v in base.items() if k != "ids"}), flush=True)
        for run in runs:
            same = run["ids"] == base["ids"]
            diverge = next((i for i, (a, b) in enumerate(zip(run["ids"], base["ids"])) if a != b), None)
            run["identical_to_baseline"] = same
            run["first_difference_at"] = diverge
            run["speedup_decode"] = round(run["decode_tok_s"] / max(base["decode_tok_s"], 1e-9), 2)
            run["speedup_total"] = round(base["total_s"] / max(run["total_s"], 1e-9), 2)
            print(
                f"{run['impl']}: {run['decode_tok_s']} tok/s vs {base['decode_tok_s']} "
                f"(x{run['speedup_decode']} decode, x{run['speedup_total']} end to end); "
                f"TTFT {run['ttft_s']}s vs {base['ttft_s']}s; identical greedy output: {same}"
                + ("" if same else f" (first difference at token {diverge})"),
                flush=True,
            )
        runs.append(base)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([{k: v for k, v in r.items() if k != "ids"} for r in runs], indent=1))


if __name__ == "__main__":
    main()
