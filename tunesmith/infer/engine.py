"""The generation engine shared by `serve`, `web` and `eval`: one model + tokenizer + template behind a queue.

Every request (an OpenAI-style message list, or prompt ids) goes into one queue. A single worker thread owns
the model: it takes the first waiting request, waits `batch_window` seconds for more to arrive, and runs what
it gathered (up to `max_batch`) as one batch:

- one request: through `tunesmith.infer.Generator` (the chat generator: KV cache kept between calls, compiled
  decode on CUDA), so a lone client gets exactly what `tunesmith chat` would give;
- several: one left-padded batch through the model (`_decode_batch`): a shared prefill, then one forward per
  step for all rows, each row with its own sampling settings, seed, stop words and token budget. Rows that end
  early are not computed further (the batch shrinks), and the step stops when every row has ended.

Both paths use infer's pieces for what they have in common: the sampling processors (`sampling.process_logits`),
incremental detokenisation (`StreamDecoder`) and stop-word matching (`StopMatcher`). Greedy decoding gives the
same tokens either way (up to float rounding of padded attention).

A request's text pieces go to its `sink` as they are produced (events `("text", str)`, then
`("done", GenerationResult)` or `("error", Exception)`); setting `request.cancel` (a client went away) ends
that row at the next token with finish_reason "cancelled".

    engine = Engine.load("builtin:smollm2-135m-instruct", prompt_template="auto")
    for piece in engine.stream([{"role": "user", "content": "Hi"}], SamplingConfig(max_new_tokens=20)):
        print(piece, end="")
    engine.close()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace

import torch

from tunesmith.data.conversation import Turn
from tunesmith.data.messages import message_content, messages_to_turns, normalize_role
from tunesmith.data.render import render_prompt_text
from tunesmith.data.templates import Template
from tunesmith.errors import TunesmithError
from tunesmith.infer.generate import Generator
from tunesmith.infer.model_kind import cache_kwarg, unwrap_model
from tunesmith.infer.requests import BatchRow, EngineStats, Request
from tunesmith.infer.sampling import GenerationResult, SamplingConfig
from tunesmith.infer.session import ChatSession, resolve_template
from tunesmith.infer.stops import merge_stop_words

log = logging.getLogger(__name__)

ROLES = {"system", "developer", "user", "assistant", "tool"}


def prompt_turns(messages: Sequence[dict]) -> tuple[list[Turn], str]:
    """A request's OpenAI chat messages -> (turns, system): the training data's rule (``data.messages``), with the
    last turn the one to answer (its output empty); the first turn's system text comes back on its own."""
    if not messages:
        raise ValueError("'messages' must contain at least one message")
    normalized = []
    for i, msg in enumerate(messages):
        role = normalize_role(msg.get("role")) if isinstance(msg, dict) else None
        if role is None:
            given = msg.get("role") if isinstance(msg, dict) else msg
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {given!r}")
        normalized.append((role, message_content(msg, i), True))
    turns = messages_to_turns(normalized, to_answer=True)
    return [replace(turns[0], system=""), *turns[1:]], turns[0].system


class Engine:
    """A thread-safe generation service over one model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, prompt_template: str | Template | None = None, system: str = "",
                 bot_name: str = "BOT", stop_words: Sequence[str] = (), max_batch: int = 16,
                 batch_window: float = 0.01, batching: bool = True, generator_mode: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.generator = Generator(model, tokenizer, mode=generator_mode)
        # the session works out the template, its stop words and the single-token stop ids exactly as chat does
        probe = ChatSession(self.generator, resolve_template(prompt_template, tokenizer), system=system,
                            bot_name=bot_name, stop_words=stop_words, notice=lambda _m: None)
        self.template = probe.template
        self.system = system
        self.bot_name = bot_name
        self.stop_words = probe.stop_words
        self.stop_token_ids = probe.stop_token_ids
        self._single_token_ids = probe._single_token_ids
        self.max_positions = self.generator.max_positions
        self.max_batch = max(1, int(max_batch))
        self.batch_window = batch_window
        self.batching = batching
        self.lock = threading.RLock()  # held while the model runs (eval's loss pass takes it too)
        self.stats = EngineStats()
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model: str, *, adapter: str | None = None, prompt_template: str | None = None,
             system: str = "", bits: int | None = None, torch_dtype: str | None = "auto",
             trust_remote_code: bool = False, **kwargs) -> Engine:
        """Load a model (and adapter) as `tunesmith chat` does and start an engine on it."""
        from tunesmith.infer.api import load_for_chat
        from tunesmith.infer.trained_prompt import choose_prompt

        template, system = choose_prompt(adapter, prompt_template, system)
        llm, tokenizer = load_for_chat(model, adapter=adapter, bits=bits, torch_dtype=torch_dtype,
                                       trust_remote_code=trust_remote_code)
        return cls(llm, tokenizer, prompt_template=template, system=system, **kwargs)

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, messages: Sequence[dict], *, system: str | None = None) -> list[int]:
        """Token ids of the generation prompt for an OpenAI-style message list (the training renderer)."""
        turns, msg_system = prompt_turns(messages)
        sys_text = msg_system or (system if system is not None else self.system)
        text = render_prompt_text(self.tokenizer, self.template, turns, system=sys_text or None,
                                  bot_name=self.bot_name)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_fits(self, prompt_ids: Sequence[int]) -> None:
        if self.max_positions and len(prompt_ids) >= self.max_positions:
            raise TunesmithError(f"the prompt is {len(prompt_ids)} tokens and the model takes {self.max_positions}",
                                 "shorten the conversation")

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingConfig, sink: Callable[[str, object], None], *,
               stop: Sequence[str] = (), cancel: threading.Event | None = None) -> Request:
        if self._closed:
            raise RuntimeError("the engine is closed")
        words = merge_stop_words(self.stop_words, stop)
        req = Request(list(prompt_ids), sampling, words, self.stop_token_ids + self._single_token_ids(stop), sink,
                      cancel=cancel or threading.Event(), id=next(self._ids))
        self._queue.put(req)
        return req

    def stream(self, messages_or_ids, sampling: SamplingConfig | None = None, *, stop: Sequence[str] = (),
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply's text pieces (blocking); the generator's return value (StopIteration.value) is the
        `GenerationResult`. Closing the iterator early cancels the generation."""
        ids = self._ids_of(messages_or_ids)
        events: queue.Queue = queue.Queue()
        req = self.submit(ids, sampling or SamplingConfig(), lambda k, v: events.put((k, v)), stop=stop,
                          cancel=cancel)
        try:
            while True:
                kind, value = events.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return value
        finally:
            req.cancel.set()

    def generate(self, messages_or_ids, sampling: SamplingConfig | None = None, *,
                 stop: Sequence[str] = ()) -> GenerationResult:
        it = self.stream(messages_or_ids, sampling, stop=stop)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def generate_many(self, prompts: Sequence, sampling: SamplingConfig | None = None, *,
                      on_done: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Submit all prompts at once (they run in batches) and wait for all results, in order."""
        results: list[GenerationResult | None] = [None] * len(prompts)
        errors: list[BaseException] = []
        left = threading.Semaphore(0)

        def sink_for(i):
            def sink(kind, value):
                if kind == "done":
                    results[i] = value
                    if on_done is not None:
                        on_done(i, value)
                    left.release()
                elif kind == "error":
                    errors.append(value)
                    left.release()
            return sink

        for i, p in enumerate(prompts):
            self.submit(self._ids_of(p), sampling or SamplingConfig(), sink_for(i))
        for _ in prompts:
            left.acquire()
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

    async def astream(self, prompt_ids: Sequence[int], sampling: SamplingConfig, *, stop: Sequence[str] = (),
                      cancel: threading.Event | None = None) -> AsyncIterator[tuple[str, object]]:
        """Async events ("text", piece) ... ("done", result) for an asyncio server; cancelling the consumer
        (or leaving the loop) cancels the generation."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = self.submit(prompt_ids, sampling, lambda k, v: loop.call_soon_threadsafe(events.put_nowait, (k, v)),
                          stop=stop, cancel=cancel)
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            req.cancel.set()

    def _ids_of(self, messages_or_ids) -> list[int]:
        if isinstance(messages_or_ids, str):
            return self.prompt_ids([{"role": "user", "content": messages_or_ids}])
        items = list(messages_or_ids)
        if items and isinstance(items[0], dict):
            return self.prompt_ids(items)
        return [int(i) for i in items]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            if self.batching and self.max_batch > 1:
                deadline = time.perf_counter() + self.batch_window
                while len(batch) < self.max_batch:
                    wait = deadline - time.perf_counter()
                    try:
                        nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._queue.put(None)  # close after this batch
                        break
                    batch.append(nxt)
            batch = [r for r in batch if not self._drop_cancelled(r)]
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                with self.lock:
                    if len(batch) == 1:
                        self._run_single(batch[0])
                    else:
                        self.stats.batched_requests += len(batch)
                        self._decode_batch(batch)
            except Exception as exc:  # a bug or an out-of-memory: fail these requests, keep serving
                log.exception("generation failed")
                for r in batch:
                    r.sink("error", exc)

    def _drop_cancelled(self, req: Request) -> bool:
        if req.cancel.is_set():
            self.stats.cancelled += 1
            req.sink("done", GenerationResult([], "", "cancelled", prompt_tokens=len(req.prompt_ids)))
            return True
        return False

    def _run_single(self, req: Request) -> None:
        it = self.generator.stream(req.prompt_ids, req.sampling, stop_words=req.stop_words,
                                   stop_token_ids=req.stop_token_ids)
        cancelled = False
        for piece in it:
            if req.cancel.is_set():
                cancelled = True
                it.close()
                break
            if piece:
                req.sink("text", piece)
        if cancelled:
            self.stats.cancelled += 1
            self.generator.reset()  # the cache holds a half-read stream: start the next prompt clean
            req.sink("done", GenerationResult([], "", "cancelled", prompt_tokens=len(req.prompt_ids)))
            return
        req.sink("done", self.generator.last_result)

    @torch.inference_mode()
    def _decode_batch(self, reqs: list[Request]) -> None:
        """Left-padded batched decoding with a DynamicCache; finished rows leave the batch."""
        from transformers import DynamicCache

        model = unwrap_model(self.model)
        device = model.get_input_embeddings().weight.device
        vocab = model.get_output_embeddings().weight.shape[0]
        eos = self.generator.eos_token_ids
        rows = [BatchRow(r, self.tokenizer, eos, device, vocab, self.max_positions) for r in reqs]
        t_start = time.perf_counter()
        live = [i for i, row in enumerate(rows) if row.max_new > 0]
        for row in rows:
            if row.max_new <= 0:
                row.finish = "length"
        if live:
            pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = next(iter(self.generator.eos_token_ids), 0)
            width = max(len(rows[i].req.prompt_ids) for i in live)
            ids = torch.full((len(live), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(live), width), dtype=torch.long)
            for b, i in enumerate(live):
                p = rows[i].req.prompt_ids
                ids[b, width - len(p) :] = torch.tensor(p)
                mask[b, width - len(p) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp_(min=0)
            cache = DynamicCache(config=model.config)
            kw = cache_kwarg(model)

            def last_logits(input_ids, attention_mask, position_ids):  # prefill and every decode step
                out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1, **{kw: cache})
                return out.logits[:, -1, :].float()

            logits = last_logits(ids, mask, positions)
            next_pos = positions[:, -1:] + 1
            while True:
                for b, i in enumerate(live):
                    row = rows[i]
                    if row.req.cancel.is_set():
                        row.finish = "cancelled"
                        self.stats.cancelled += 1
                        continue
                    row.take(row.choose(logits[b : b + 1]))
                keep = [b for b, i in enumerate(live) if rows[i].finish is None]
                if not keep:
                    break
                if len(keep) < len(live):  # drop finished rows from the batch and the cache
                    sel = torch.tensor(keep, device=device)
                    cache.batch_select_indices(sel)
                    mask, next_pos = mask[sel], next_pos[sel]
                    live = [live[b] for b in keep]
                tokens_t = torch.tensor([[rows[i].ids[-1]] for i in live], device=device)
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                logits = last_logits(tokens_t, mask, next_pos)
                next_pos = next_pos + 1
        decode_s = time.perf_counter() - t_start
        for row in rows:
            if row.finish == "cancelled":
                row.req.sink(
                    "done",
                    GenerationResult(row.ids, "".join(row.parts), "cancelled", prompt_tokens=len(row.req.prompt_ids)),
                )
            else:
                row.req.sink("done", row.result(decode_s))
