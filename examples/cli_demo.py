"""Chat with a model from Python in a few lines (the seed's cli_demo.py, on tunesmith's API).

    python examples/cli_demo.py                                  # the built-in SmolLM2
    python examples/cli_demo.py ./internlm-chat-7b --adapter ./hf --template internlm_chat
"""

import argparse

from tunesmith.infer import Chat

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default="builtin:smollm2-135m-instruct")
parser.add_argument("--adapter", default=None)
parser.add_argument("--template", default="auto")
args = parser.parse_args()

chat = Chat(args.model, adapter=args.adapter, prompt_template=args.template, temperature=0, max_new_tokens=256)
print("Type a message (empty line or Ctrl-D to quit, RESET to clear the history).")
while (text := input(">>> ").strip()) not in ("",):
    if text == "RESET":
        chat.reset()
        continue
    chat.ask(text, stream=True)
