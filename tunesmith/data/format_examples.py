"""One example record per dataset format, in the shape that format's reader takes (one line of a JSONL file).

Data only: docs/formats.md shows each record and what its reader makes of it, and tests/docs feeds each one
through the real reader, so an example that stops reading (or a format without one) fails a test.
"""

from __future__ import annotations

from typing import Any

_MSAGENT_TOOL = ('{"name": "weather", "description": "Look up the weather forecast of a city", '
                 '"paths": [{"parameters": [{"name": "city", "description": "city name"}]}]}')

FORMAT_EXAMPLES: dict[str, Any] = {
    "conversation": {"conversation": [
        {"system": "You are a concise assistant.", "input": "What is the capital of France?", "output": "Paris."},
        {"input": "And of Italy?", "output": "Rome."},
    ]},
    "oasst1": {"text": "### Human: Can you name a prime number above 10?### Assistant: 11 is the smallest one."
                       "### Human: And the next?### Assistant: 13."},
    "alpaca": {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    "alpaca_zh": {"instruction_zh": "把这句话翻译成英文。", "input_zh": "早上好", "output_zh": "Good morning"},
    "code_alpaca": {"prompt": "Write a Python function that squares a number.",
                    "completion": "def square(x):\n    return x * x"},
    "medical": {"instruction": "我最近总是头痛，应该怎么办？", "input": "",
                "output": "建议先保证休息，若持续头痛请及时就医检查。"},
    "default": {"input": "What is 2 + 2?", "output": "4"},
    "openai": {"messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]},
    "sharegpt": {"conversations": [
        {"from": "human", "value": "What is the capital of France?"},
        {"from": "gpt", "value": "Paris."},
    ], "system": "You are a concise assistant."},
    "msagent_react": {"conversations": [
        {"from": "system", "value": f"You can call these tools: {_MSAGENT_TOOL}"},
        {"from": "user", "value": "What will the weather be in Shanghai tomorrow?"},
        {"from": "assistant", "value": "I should ask the weather tool.<|startofthink|>```JSON\n"
                                       '{"api_name": "weather", "parameters": {"city": "Shanghai"}}\n'
                                       "```<|endofthink|><|startofexec|>```JSON\n"
                                       '{"forecast": "sunny, 20C"}\n```<|endofexec|>'
                                       "Tomorrow Shanghai will be sunny at about 20C."},
    ]},
    "pretrain": {"text": "The Eiffel Tower was completed in 1889 for the World's Fair in Paris."},
    "arxiv": {"abstract": "We show that packing short samples into long sequences speeds up fine-tuning without "
                          "changing the loss.", "title": "Packing Without Loss"},
    "colors": {"description": "Sky blue: a light, clear blue like a summer sky.", "color": "#87ceeb"},
    "crime_kg_assistant": {"input": "盗窃罪的立案标准是什么？",
                           "output": "盗窃公私财物数额较大，或者多次盗窃、入户盗窃、携带凶器盗窃、扒窃的，"
                                     "应予立案追诉。"},
    "law_reference": {"question": "借款合同必须采用书面形式吗？",
                      "answer": "借款合同应当采用书面形式，但是自然人之间借款另有约定的除外。"},
    "openorca": {"system_prompt": "You are a helpful assistant.", "question": "Is 17 a prime number?",
                 "response": "Yes, 17 is prime."},
    "sql": {"context": "CREATE TABLE users (id INT, name TEXT)", "question": "How many users are there?",
            "answer": "SELECT COUNT(*) FROM users"},
    "stack_exchange": {"question": "How do I reverse a list in Python?", "response": "Use reversed(xs) or xs[::-1]."},
    "tiny_codes": {"prompt": "Write a Bash line that counts the files in a folder.", "response": "ls | wc -l"},
    "preference": {"prompt": "What is the capital of Norway?", "chosen": "The capital of Norway is Oslo.",
                   "rejected": "The capital of Norway is Bergen."},
    "ultrafeedback": {"prompt": "Name a primary colour.", "chosen": [
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Red is a primary colour."},
    ], "rejected": [
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Green, obviously. Look it up."},
    ], "score_chosen": 9.0, "score_rejected": 3.0},
    "hh_rlhf": {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for about nine minutes, then "
                          "cool it in cold water.",
                "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Figure it out yourself."},
    "wizardlm": {"conversations": [
        {"from": "human", "value": "Give me a synonym of happy."},
        {"from": "gpt", "value": "Joyful."},
    ]},
}
