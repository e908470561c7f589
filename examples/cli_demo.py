"""Chat with a model from Python in a few lines (the seed's cli_demo.py, on tunesmith's API).

    python examples/cli_demo.py                                  # the built-in SmolLM2
    python examples/cli_demo.py ./internlm-chat-7b --adapter ./hf --template internlm_chat

An empty line or Ctrl-D (end of input) quits; RESET clears the history.
"""

import argparse
from collections.abc import Callable, Iterator

from tunesmith.infer import Chat


def messages(read: Callable[[str], str] = input) -> Iterator[str]:
    """What the user types, a line at a time, until an empty line or the end of input (Ctrl-D)."""
    while True:
        try:
            text = read(">>> ").strip()
        except EOFError:
            print()  # Ctrl-D leaves the cursor after the prompt
            return
        if not text:
            return
        yield text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--template", default="auto")
    args = parser.parse_args(argv)

    chat = Chat(args.model, adapter=args.adapter, prompt_template=args.template, temperature=0, max_new_tokens=256)
    print("Type a message (empty line or Ctrl-D to quit, RESET to clear the history).")
    for text in messages():
        if text == "RESET":
            chat.reset()
            continue
        chat.ask(text, stream=True)


if __name__ == "__main__":
    main()
