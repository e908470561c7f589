"""The generator: prefill, then token-by-token decoding with a KV cache, sampling, incremental stops.

The same algorithm runs in four ways (`mode`):

- ``plain`` (CPU, quantized or offloaded models): a `DynamicCache` and one eager forward per token.
- ``graph`` (CUDA default): a `StaticCache`, and one eager decode step recorded as a CUDA graph and replayed
  per token (no kernel-launch overhead; recorded again in ~2 s when the cache has to grow).
- ``compiled`` (CUDA): the same static layout with the step compiled by `torch.compile` (CUDA graphs plus
  fused kernels; fastest, but about a minute of compilation per cache size). Inductor is asked to round
  intermediates as eager does (`emulate_precision_casts`), so its tokens equal the eager static path's.
- ``static``: the static layout without graphs or compiler (tests and debugging).

On CUDA the loop never waits for the GPU per token: new ids stay on the device and are copied to pinned host
memory a chunk at a time, while the next chunk is already queued; stop words and the end-of-turn token are
checked on the host one chunk behind. A stop inside a chunk cuts the answer at the exact token; the few tokens
computed past it are dropped (and overwritten in the cache).

Greedy decoding gives the same tokens as `model.generate(do_sample=False)`; sampling applies the processors in
the order transformers does (repetition penalty, temperature, top-k, top-p) with a seeded `torch.Generator`.

The cache is kept between calls: when a new prompt starts with the ids already in the cache (the chat history),
only the new ids are prefilled (kv_cache.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from tunesmith.infer.detok import StreamDecoder
from tunesmith.infer.kv_cache import PromptCache
from tunesmith.infer.model_kind import (
    cache_kwarg,
    inductor_has,
    is_offloaded,
    is_quantized,
    plain_static_layers,
    unwrap_model,
)
from tunesmith.infer.sampling import GenerationResult, SamplingConfig, process_logits
from tunesmith.infer.stops import StopHit, StopMatcher

log = logging.getLogger(__name__)

MODES = ("auto", "plain", "static", "graph", "compiled")


class Generator:
    """Decodes from one model for one conversation at a time (batch size 1).

    >>> gen = Generator(model, tokenizer)
    >>> result = gen.generate(prompt_ids, SamplingConfig(temperature=0), stop_words=["<|im_end|>"])
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mode: str = "auto",
        stop_check_every: int | None = None,
        compile_options: dict | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.device = self.model.get_input_embeddings().weight.device
        if mode == "auto":
            fast_ok = (self.device.type == "cuda" and not is_quantized(self.model)
                       and not is_offloaded(self.model) and plain_static_layers(self.model.config))
            mode = "graph" if fast_ok else "plain"
        self.mode = mode
        self.stop_check_every = stop_check_every or (16 if self.device.type == "cuda" else 1)
        self.compile_options = {"mode": "reduce-overhead", "fullgraph": False, "dynamic": False}
        if inductor_has("emulate_precision_casts"):
            # round fused intermediates to the model dtype as eager does: greedy output stays identical
            self.compile_options["options"] = {"emulate_precision_casts": True}
            self.compile_options.pop("mode")
            self.compile_options["options"]["triton.cudagraphs"] = True
        self.compile_options.update(compile_options or {})
        self._cache_kw = cache_kwarg(self.model)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.max_positions = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 0)
        self._compiled: dict[bool, Callable] = {}  # decode steps recorded / compiled over the current cache
        self.kv = PromptCache(self.model, static=mode != "plain", max_positions=self.max_positions,
                              on_new=self._compiled.clear)
        self.eos_token_ids = self._default_eos_ids()

    def _default_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is None:
                continue
            ids.update([value] if isinstance(value, int) else list(value))
        return ids

    def reset(self) -> None:
        """Forget the cached keys/values (the next prompt is prefilled from scratch)."""
        self.kv.reset()

    def reserve(self, n_tokens: int) -> None:
        """Allocate a static cache for `n_tokens` now (so the compiled step is built once for that size)."""
        self.kv.reserve(n_tokens)

    # ------------------------------------------------------------------ model calls
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.kv.cache})
        return out.logits[:, -1, :].float()

    def _decode_greedy(self, token: torch.Tensor) -> torch.Tensor:
        return self._forward(token).argmax(dim=-1, keepdim=True)

    def _step_fn(self, greedy: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = self._decode_greedy if greedy else self._forward
        if self.mode == "graph":
            if greedy not in self._compiled:
                try:
                    self._compiled[greedy] = self._capture(fn)
                except Exception as exc:  # noqa: BLE001 - a model whose forward cannot be captured
                    log.warning("CUDA graph capture failed (%s); using torch.compile", str(exc).splitlines()[0])
                    self.mode = "compiled"
                    return self._step_fn(greedy)
            return self._compiled[greedy]
        if self.mode != "compiled":
            return fn
        if greedy not in self._compiled:
            self._compiled[greedy] = torch.compile(fn, **self.compile_options)
        compiled = self._compiled[greedy]

        def step(token: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(token)

        return step

    def _capture(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Record one eager decode step on the static cache as a CUDA graph. The kernels are the eager ones,
        so the output is bit-identical to the uncompiled path, without the per-kernel launch cost."""
        static_in = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream())
        done = 0
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(static_in)
                    done += 1
        finally:
            torch.cuda.current_stream().wait_stream(side)
            self.kv.crop(done)  # the warm-up steps wrote past the prompt: move the write position back
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(static_in)

        def step(token: torch.Tensor) -> torch.Tensor:
            static_in.copy_(token.view(1, 1))
            graph.replay()
            return static_out

        return step

    # ------------------------------------------------------------------ sampling
    def _choose(self, logits, cfg: SamplingConfig, seen, rng) -> torch.Tensor:
        logits = process_logits(logits, cfg, seen)
        if cfg.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=rng)

    # ------------------------------------------------------------------ the loop
    def generate(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig | None = None,
        *,
        stop_words: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate an answer to `prompt_ids`; `on_text` receives the text as it is produced."""
        it = self.stream(prompt_ids, sampling, stop_words=stop_words, stop_token_ids=stop_token_ids)
        for piece in it:
            if on_text is not None and piece:
                on_text(piece)
        return self.last_result

    def stream(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig | None = None,
        *,
        stop_words: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
    ) -> Iterator[str]:
        """Yield text pieces as they are produced; afterwards `self.last_result` holds the `GenerationResult`."""
        cfg = sampling or SamplingConfig()
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        max_new = cfg.max_new_tokens
        if self.max_positions:
            max_new = max(0, min(max_new, self.max_positions - len(prompt)))
        stop_ids = set(self.eos_token_ids) | {int(i) for i in stop_token_ids}
        decoder = StreamDecoder(self.tokenizer, context_ids=prompt)
        matcher = StopMatcher(stop_words)
        new_ids: list[int] = []
        finish, stop_text = "length", None
        text_parts: list[str] = []
        t0 = time.perf_counter()
        ttft = 0.0
        self.last_result = GenerationResult([], "", "length", prompt_tokens=len(prompt))
        if max_new <= 0:
            return

        with torch.inference_mode():
            cached = self.kv.prepare(prompt, max_new)
            rng = None
            if not cfg.greedy:
                rng = torch.Generator(device=self.device)
                rng.manual_seed(0 if cfg.seed is None else int(cfg.seed))
            seen = None
            if cfg.repetition_penalty != 1.0:
                seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
                seen[0, torch.tensor(prompt, device=self.device).clamp_(max=self.vocab_size - 1)] = True
            pure_greedy = cfg.greedy and seen is None
            ids_in = torch.tensor([prompt[cached:]], dtype=torch.long, device=self.device)
            logits = self._forward(ids_in)
            self.kv.ids = prompt[:]
            token = self._choose(logits, cfg, seen, rng)  # [1, 1]
            step = self._step_fn(pure_greedy)

            def take(tok: int) -> str | None:
                """Handle one new id on the host: the text to show now, or None when the answer has ended."""
                nonlocal finish, stop_text
                new_ids.append(tok)
                if tok in stop_ids:
                    finish, stop_text = "stop", self.tokenizer.decode([tok])
                    return None
                piece = decoder.push(tok)
                shown = matcher.feed(piece) if piece else ""
                if isinstance(shown, StopHit):
                    finish, stop_text = "stop", shown.word
                    return None
                text_parts.append(shown)
                return shown

            # the first token is shown at once (time to first token)
            first = int(token.item())
            ttft = time.perf_counter() - t0
            t1 = time.perf_counter()
            out = take(first)
            if out is not None:
                if out:
                    yield out
                yield from self._decode_loop(token, first, step, max_new, cfg, seen, rng, take, pure_greedy)
            # what is still held back: text before a stop word, or the pending tail at an end-of-turn id / length
            if matcher.stopped is not None:
                tail = matcher.stopped.text
            else:
                shown = matcher.feed(decoder.flush()) if finish == "length" else ""
                if isinstance(shown, StopHit):  # the last bytes completed a stop word
                    finish, stop_text, tail = "stop", shown.word, shown.text
                else:
                    tail = shown + matcher.flush()
            if tail:
                text_parts.append(tail)
                yield tail
            # the last id was sampled but never run through the model: the cache holds the rest
            self.kv.ids = prompt + new_ids[:-1]
            self.kv.trim_to_ids()
        decode_s = time.perf_counter() - t1
        self.last_result = GenerationResult(
            ids=new_ids,
            text="".join(text_parts),
            finish_reason=finish,
            stop=stop_text,
            prompt_tokens=len(prompt),
            prefilled_tokens=len(prompt) - cached,
            time_to_first_token=ttft,
            decode_seconds=decode_s,
        )

    def _decode_loop(self, token, first, step, max_new, cfg, seen, rng, take, pure_greedy) -> Iterator[str]:
        device = self.device
        n_done = 1  # ids generated so far (on the device)
        if self.stop_check_every <= 1:
            # plain host loop: one id at a time
            while n_done < max_new:
                if seen is not None:
                    seen[0, token[0, 0]] = True
                nxt = step(token) if pure_greedy else self._choose(step(token), cfg, seen, rng)
                token = nxt.view(1, 1)
                n_done += 1
                out = take(int(token.item()))
                if out is None:
                    return
                if out:
                    yield out
            return

        # chunked loop: ids stay on the device; the host reads them a chunk behind (no per-token sync)
        chunk = self.stop_check_every
        cuda = device.type == "cuda"
        buf = torch.empty(max_new, dtype=torch.long, device=device)
        host = torch.empty(max_new, dtype=torch.long, pin_memory=True) if cuda else buf
        buf[0] = first
        pending: list[tuple[int, int, object]] = []
        while True:
            if n_done < max_new:
                start = n_done
                for _ in range(min(chunk, max_new - n_done)):
                    if seen is not None:
                        seen[0, buf[n_done - 1]] = True
                    cur = buf[n_done - 1 : n_done].view(1, 1)
                    nxt = step(cur) if pure_greedy else self._choose(step(cur), cfg, seen, rng)
                    buf[n_done : n_done + 1].copy_(nxt.view(1))
                    n_done += 1
                event = None
                if cuda:
                    host[start:n_done].copy_(buf[start:n_done], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                pending.append((start, n_done, event))
            if not pending:
                return
            # look at the chunk before the one just queued (or the last one when nothing more is queued)
            if len(pending) > 1 or n_done >= max_new:
                start, end, event = pending.pop(0)
                if event is not None:
                    event.synchronize()
                for tok in host[start:end].tolist():
                    out = take(tok)
                    if out is None:
                        if cuda:
                            torch.cuda.current_stream().synchronize()
                        return
                    if out:
                        yield out
