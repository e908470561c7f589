"""Built-in recipes, composed from model preset x method x dataset (not hundreds of copied files).

A recipe name reads `<model>_<method>_<dataset>_e<epochs>[_gpu8]`, as XTuner's config names do. The
composed result is a plain mapping that `config.load` validates into a `TrainConfig`; `copy-cfg` writes it out
in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tunesmith.config.overrides import set_dotted
from tunesmith.errors import TunesmithError, did_you_mean


@dataclass(frozen=True)
class ModelPreset:
    name: str  # recipe prefix, e.g. internlm_chat_7b
    path: str  # hub id (users point it at their local folder)
    template: str  # prompt template name
    extra: dict[str, Any] = field(default_factory=dict)  # config overrides specific to the model


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    settings: dict[str, Any]  # overrides, dotted keys
    epochs: int = 3


def _p(name: str, path: str, template: str, **extra: Any) -> ModelPreset:
    return ModelPreset(name, path, template, extra)


# XTuner 0.x families that transformers 5 runs natively (InternLM v1/v2 are mapped onto Llama on load).
MODEL_PRESETS: tuple[ModelPreset, ...] = (
    _p("internlm_7b", "internlm/internlm-7b", "default"),
    _p("internlm_chat_7b", "internlm/internlm-chat-7b", "internlm_chat"),
    _p("internlm_20b", "internlm/internlm-20b", "default"),
    _p("internlm_chat_20b", "internlm/internlm-chat-20b", "internlm_chat"),
    _p("internlm2_1_8b", "internlm/internlm2-1_8b", "default"),
    _p("internlm2_chat_1_8b", "internlm/internlm2-chat-1_8b", "internlm2_chat"),
    _p("internlm2_7b", "internlm/internlm2-7b", "default"),
    _p("internlm2_chat_7b", "internlm/internlm2-chat-7b", "internlm2_chat"),
    _p("internlm2_20b", "internlm/internlm2-20b", "default"),
    _p("internlm2_chat_20b", "internlm/internlm2-chat-20b", "internlm2_chat"),
    _p("internlm2_5_7b", "internlm/internlm2_5-7b", "default"),
    _p("internlm2_5_chat_7b", "internlm/internlm2_5-7b-chat", "internlm2_chat"),
    _p("llama2_7b", "meta-llama/Llama-2-7b-hf", "default"),
    _p("llama2_7b_chat", "meta-llama/Llama-2-7b-chat-hf", "llama2_chat"),
    _p("llama2_13b", "meta-llama/Llama-2-13b-hf", "default"),
    _p("llama2_70b", "meta-llama/Llama-2-70b-hf", "default"),
    _p("llama3_8b", "meta-llama/Meta-Llama-3-8B", "default"),
    _p("llama3_8b_instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3_chat"),
    _p("llama3_70b_instruct", "meta-llama/Meta-Llama-3-70B-Instruct", "llama3_chat"),
    _p("llama3_1_8b_instruct", "meta-llama/Llama-3.1-8B-Instruct", "llama3_chat"),
    _p("llama3_2_1b_instruct", "meta-llama/Llama-3.2-1B-Instruct", "llama3_chat"),
    _p("llama3_2_3b_instruct", "meta-llama/Llama-3.2-3B-Instruct", "llama3_chat"),
    _p("qwen1_5_0_5b_chat", "Qwen/Qwen1.5-0.5B-Chat", "qwen_chat"),
    _p("qwen1_5_1_8b_chat", "Qwen/Qwen1.5-1.8B-Chat", "qwen_chat"),
    _p("qwen1_5_7b_chat", "Qwen/Qwen1.5-7B-Chat", "qwen_chat"),
    _p("qwen1_5_14b_chat", "Qwen/Qwen1.5-14B-Chat", "qwen_chat"),
    _p("qwen2_7b_instruct", "Qwen/Qwen2-7B-Instruct", "qwen_chat"),
    _p("qwen2_5_0_5b_instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen_chat"),
    _p("qwen2_5_1_5b_instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen_chat"),
    _p("qwen2_5_7b_instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen_chat"),
    _p("qwen2_5_14b_instruct", "Qwen/Qwen2.5-14B-Instruct", "qwen_chat"),
    _p("qwen3_0_6b", "Qwen/Qwen3-0.6B", "auto"),
    _p("qwen3_4b", "Qwen/Qwen3-4B", "auto"),
    _p("qwen3_8b", "Qwen/Qwen3-8B", "auto"),
    _p("mistral_7b", "mistralai/Mistral-7B-v0.1", "default"),
    _p("mistral_7b_instruct", "mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
    _p("mixtral_8x7b_instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral"),
    _p("yi_6b", "01-ai/Yi-6B", "default"),
    _p("yi_34b", "01-ai/Yi-34B", "default"),
    _p("gemma_2b", "google/gemma-2b", "default"),
    _p("gemma_2b_it", "google/gemma-2b-it", "gemma"),
    _p("gemma_7b", "google/gemma-7b", "default"),
    _p("gemma_7b_it", "google/gemma-7b-it", "gemma"),
    _p("deepseek_coder_6_7b_instruct", "deepseek-ai/deepseek-coder-6.7b-instruct", "deepseek_coder"),
    _p("deepseek_moe_16b_chat", "deepseek-ai/deepseek-moe-16b-chat", "deepseek_moe"),
    _p("deepseek_v2_lite_chat", "deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek_v2"),
    _p("phi3_mini_4k_instruct", "microsoft/Phi-3-mini-4k-instruct", "phi3_chat"),
    _p("minicpm_2b_sft", "openbmb/MiniCPM-2B-sft-bf16", "minicpm"),
    _p("smollm2_135m_instruct", "builtin:smollm2-135m-instruct", "auto"),
)

MEDICAL_PROFESSOR = "medical_professor"

DATASET_PRESETS: tuple[DatasetPreset, ...] = (
    DatasetPreset("oasst1", {"data.path": "timdettmers/openassistant-guanaco", "data.format": "oasst1"}),
    DatasetPreset("alpaca", {"data.path": "tatsu-lab/alpaca", "data.format": "alpaca",
                             "data.system_template": "alpaca"}),
    DatasetPreset("alpaca_zh", {"data.path": "silk-road/alpaca-data-gpt4-chinese", "data.format": "alpaca_zh",
                                "data.system_template": "alpaca"}),
    DatasetPreset("code_alpaca", {"data.path": "HuggingFaceH4/CodeAlpaca_20K", "data.format": "code_alpaca",
                                  "data.system_template": "coder"}),
    DatasetPreset("medical", {"data.path": "shibing624/medical", "data.name": "finetune", "data.format": "medical",
                              "data.system_template": "medical",
                              "evaluation.inputs": ["我有家族遗传性的过敏，请问可以可以献血吗？",
                                                    "我爷爷有高血压，请问他可以喝咖啡吗？",
                                                    "我女儿今年3岁了，从昨天晚上九点开始腹泻，到现在已经八个小时了，"
                                                    "请问应该怎么办？"]},
                  epochs=1),
    # the tutorial's MedQA2019: `tunesmith data convert` + `data split` make these two files
    DatasetPreset("medqa2019", {"data.path": "./medqa-train.jsonl", "data.format": "conversation",
                                "data.system_template": MEDICAL_PROFESSOR,
                                "evaluation.inputs": ["What are the side effects of metformin?",
                                                      "How should I take amoxicillin?"]}),
    DatasetPreset("msagent_react", {"data.path": "damo/MSAgent-Bench", "data.format": "msagent_react",
                                    "data.pack_to_max_length": False, "training.batch_size": 8,
                                    "training.accumulative_counts": 1, "data.num_workers": 2,
                                    "evaluation.inputs": ["上海明天天气怎么样？"]}),
)

# Preference tuning (training.objective dpo / orpo) on pairs. max_length counts one sequence (chosen or rejected), so a
# packed row holds 2 x 1024 tokens. Learning rates: DPO's usual 5e-7 for full fine-tuning (XTuner's and TRL's
# examples) and 5e-6 for an adapter; ORPO's paper rate 8e-6 for full fine-tuning and 5e-5 for an adapter.
_ULTRAFEEDBACK = {"data.path": "HuggingFaceH4/ultrafeedback_binarized", "data.split": "train_prefs",
                  "data.format": "ultrafeedback", "data.max_length": 1024, "training.accumulative_counts": 16}
PREFERENCE_PRESETS: tuple[DatasetPreset, ...] = (
    DatasetPreset("ultrafeedback_dpo", {**_ULTRAFEEDBACK, "training.objective": "dpo"}, epochs=1),
    DatasetPreset("ultrafeedback_orpo", {**_ULTRAFEEDBACK, "training.objective": "orpo"}, epochs=1),
)
PREFERENCE_MODELS = ("internlm_chat_7b", "internlm2_chat_1_8b", "internlm2_chat_7b", "llama3_8b_instruct",
                     "qwen2_5_7b_instruct", "mistral_7b_instruct")
PREFERENCE_LR = {("dpo", "full"): 5e-7, ("dpo", "adapter"): 5e-6, ("orpo", "full"): 8e-6, ("orpo", "adapter"): 5e-5}
# the embedded model's: the 320 pairs shipped in examples/data (run from a checkout, or point data.path at them)
_SMALL_PREFERENCE = {"data.path": "examples/data/preference_pairs.jsonl", "data.format": "preference",
                     "data.max_length": 128, "data.validation": 0.1, "training.batch_size": 4,
                     "training.accumulative_counts": 2, "evaluation.every_n_steps": 10}
SMALL_PREFERENCE_PRESETS: tuple[DatasetPreset, ...] = (
    DatasetPreset("preference_dpo", {**_SMALL_PREFERENCE, "training.objective": "dpo"}, epochs=1),
    DatasetPreset("preference_orpo", {**_SMALL_PREFERENCE, "training.objective": "orpo"}, epochs=1),
)
SMALL_PREFERENCE_LR = {"dpo": 5e-4, "orpo": 5e-4}  # LoRA on 135M parameters, a few dozen steps

METHODS = ("qlora", "lora", "full")

# The embedded model gets short CPU-friendly recipes (one epoch, small batches, shorter sequences).
_SMALL_MODEL = "smollm2_135m_instruct"
_SMALL_DATASETS = ("oasst1", "medqa2019", "alpaca")
_SMALL_SETTINGS = {
    "data.max_length": 512,
    "training.accumulative_counts": 4,
    "training.lr": 1e-4,
    "evaluation.every_n_steps": 50,
    "evaluation.max_new_tokens": 64,
    "evaluation.inputs": ["What is the capital of France?", "Give me three tips for staying healthy."],
}


def _method_settings(method: str) -> dict[str, Any]:
    if method == "qlora":
        return {"method": "qlora", "quantization.bits": 4}
    if method == "lora":
        return {"method": "lora", "quantization.bits": None}
    # XTuner's full fine-tune differs from QLoRA only by no quantization / LoRA and lr 2e-5
    return {"method": "full", "quantization.bits": None, "training.lr": 2e-5}


def _recipe_settings(model: ModelPreset, method: str, dataset: DatasetPreset, epochs: int) -> dict[str, Any]:
    settings: dict[str, Any] = {"model.path": model.path, "data.prompt_template": model.template}
    settings.update(_method_settings(method))
    settings.update(dataset.settings)
    if dataset.name == "msagent_react":
        settings["data.prompt_template"] = "default"  # XTuner trains the ReAct format on the default template
    settings["training.max_epochs"] = epochs
    settings.update(model.extra)
    if model.name == _SMALL_MODEL:
        settings.update(_SMALL_SETTINGS)
        if dataset.name == "medqa2019":
            settings["evaluation.inputs"] = dataset.settings["evaluation.inputs"]
    objective = settings.get("training.objective", "sft")
    if objective != "sft":
        settings.update({k: v for k, v in dataset.settings.items() if k in _SMALL_PREFERENCE})
        kind = "full" if method == "full" else "adapter"
        settings["training.lr"] = (SMALL_PREFERENCE_LR[objective] if model.name == _SMALL_MODEL and kind == "adapter"
                                   else PREFERENCE_LR[(objective, kind)])
    return settings


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, dict[str, Any]]:
    recipes: dict[str, dict[str, Any]] = {}
    for model in MODEL_PRESETS:
        small = model.name == _SMALL_MODEL
        for method in METHODS:
            for dataset in DATASET_PRESETS:
                if small and dataset.name not in _SMALL_DATASETS:
                    continue
                epochs = 1 if small else dataset.epochs
                suffix = "_gpu8" if dataset.name == "msagent_react" else ""
                name = f"{model.name}_{method}_{dataset.name}_e{epochs}{suffix}"
                recipes[name] = _recipe_settings(model, method, dataset, epochs)
            preference = (SMALL_PREFERENCE_PRESETS if small else
                          PREFERENCE_PRESETS if model.name in PREFERENCE_MODELS else ())
            for dataset in preference:
                name = f"{model.name}_{method}_{dataset.name}_e{dataset.epochs}"
                recipes[name] = _recipe_settings(model, method, dataset, dataset.epochs)
    return recipes


def recipe_names() -> list[str]:
    return sorted(_catalogue())


def recipe_settings(name: str) -> dict[str, Any]:
    """The settings of recipe ``name`` as a plain nested mapping (``config.load`` validates them)."""
    settings = _catalogue().get(name)
    if settings is None:
        hint = did_you_mean(name, _catalogue()) or "run `tunesmith list-cfg` to see the recipes"
        raise TunesmithError(f"unknown config {name!r}", hint)
    data: dict[str, Any] = {}
    for key, value in settings.items():
        set_dotted(data, key, value)
    return data
