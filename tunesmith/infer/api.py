"""Python API: load a model (and an adapter) and chat in a few lines.

    from tunesmith.infer import Chat

    chat = Chat("builtin:smollm2-135m-instruct", prompt_template="auto", temperature=0)
    print(chat.ask("What is the capital of France?"))
    chat.ask("And of Italy?", stream=True)      # prints as it goes
    chat.reset()
"""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.errors import TunesmithError
from tunesmith.infer.generate import Generator
from tunesmith.infer.sampling import SamplingConfig
from tunesmith.infer.session import ChatSession


def _torch_dtype(name: str | None, device: str):
    from tunesmith.models.quantize import pick_dtype

    return pick_dtype(name, device, what="--torch-dtype")


def _check_bits(bits: int | None) -> None:
    if bits is not None:
        from tunesmith.models.quantize import require_bitsandbytes

        require_bitsandbytes(bits)


def load_for_chat(
    model: str,
    *,
    adapter: str | None = None,
    bits: int | None = None,
    torch_dtype: str | None = "auto",
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
    device: str | None = None,
):
    """Load (model, tokenizer) for inference. An adapter is merged into unquantized weights (faster decoding);
    on a 4/8-bit base it stays a separate LoRA layer."""
    import torch

    from tunesmith import models

    _check_bits(bits)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _torch_dtype(torch_dtype, device)
    path = models.resolve_model_path(model)
    tokenizer = models.load_tokenizer(path, trust_remote_code=trust_remote_code)
    device_map = ("auto" if offload_folder else {"": 0}) if device == "cuda" else None
    llm = models.load_model(path, dtype=dtype, bits=bits, device_map=device_map,
                            trust_remote_code=trust_remote_code, offload_folder=offload_folder)
    if adapter:
        llm = _attach_adapter(llm, adapter, merge=merge_adapter and not bits)
    llm.eval()
    return llm, tokenizer


def _attach_adapter(llm, adapter: str, *, merge: bool):
    from pathlib import Path

    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise TunesmithError(
            f"--adapter {adapter}: no adapter_config.json there",
            "pass the folder written by `tunesmith convert pth_to_hf` (a PEFT adapter)",
        )
    try:
        peft_model = PeftModel.from_pretrained(llm, str(folder))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise TunesmithError(
            f"--adapter {adapter} does not fit this model: {str(exc).splitlines()[0][:200]}",
            "use the base model the adapter was trained on",
        ) from None
    return peft_model.merge_and_unload() if merge else peft_model


class Chat:
    """A model, a template and a conversation. Keyword arguments are the `tunesmith chat` flags."""

    def __init__(
        self,
        model: str = "builtin:smollm2-135m-instruct",
        *,
        adapter: str | None = None,
        prompt_template: str | None = None,
        system: str = "",
        system_template: str | None = None,
        bot_name: str = "BOT",
        bits: int | None = None,
        torch_dtype: str | None = "auto",
        stop_words: tuple[str, ...] = (),
        max_new_tokens: int = 2048,
        temperature: float = 0.1,
        top_k: int = 40,
        top_p: float = 0.75,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        trust_remote_code: bool = False,
        offload_folder: str | None = None,
        mode: str = "auto",
        loaded=None,
    ):
        from tunesmith.data.templates import resolve_system
        from tunesmith.infer.trained_prompt import choose_prompt

        if system and system_template:
            raise TunesmithError("give either --system or --system-template, not both")
        template, system_text = choose_prompt(adapter, prompt_template,
                                              resolve_system(system, system_template, bot_name=bot_name))
        self.model, self.tokenizer = loaded or load_for_chat(
            model, adapter=adapter, bits=bits, torch_dtype=torch_dtype, offload_folder=offload_folder,
            trust_remote_code=trust_remote_code,
        )
        self.generator = Generator(self.model, self.tokenizer, mode=mode)
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        self.session = ChatSession(
            self.generator, template, system=system_text,
            bot_name=bot_name, sampling=self.sampling, stop_words=stop_words,
        )

    def ask(self, text: str, stream: bool | Callable[[str], None] = False) -> str:
        """The reply to `text`; `stream=True` prints it as it is generated (or pass a callback)."""
        if stream is True:
            def on_text(piece: str) -> None:
                print(piece, end="", flush=True)
        else:
            on_text = stream or None
        result = self.session.ask(text, on_text=on_text)
        if stream is True:
            print(flush=True)
        self.last_result = result
        return result.text

    def reset(self) -> None:
        self.session.reset()
