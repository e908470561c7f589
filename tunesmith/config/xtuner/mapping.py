"""Which XTuner settings feed which tunesmith config keys: the method (full / LoRA / QLoRA) inferred from the
model dict, the closest built-in recipe chosen, each setting read from where XTuner keeps it, and notes on what
tunesmith does not carry over.

The config stage cannot import `data`, so the registries the names must come from (dataset formats, prompt and
system templates) are passed in by the caller; without them names are taken as written.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

from tunesmith.config.load import validate
from tunesmith.config.overrides import set_dotted
from tunesmith.config.recipes import DATASET_PRESETS, MODEL_PRESETS, recipe_names, recipe_settings
from tunesmith.config.xtuner.evaluate import Call, ConfigModule, Opaque, Symbol, is_number
from tunesmith.config.xtuner.fields import (
    MISSING,
    Unreadable,
    as_betas,
    as_bool,
    as_dtype,
    as_float,
    as_int,
    as_limit,
    as_optimizer,
    as_optional_int,
    as_text,
    as_texts,
    describe,
    dicts_in,
    dicts_of_type,
    dig,
    first_file,
    shortened,
    symbol_name,
)
from tunesmith.config.xtuner.lookup import Candidate, Reading, SettingLookup

_DEFAULT_MODEL = "internlm_chat_7b"  # the schema's own defaults are this model's recipe
_HF_LOADERS = {"json", "csv", "parquet", "text", "arrow"}  # load_dataset(path=...) builders, not data locations


class Converter(SettingLookup):
    """Reads every tunesmith setting from an XTuner config's values, over the closest built-in recipe."""

    def __init__(self, module: ConfigModule, formats: Collection[str] | None, templates: Collection[str] | None,
                 system_templates: Collection[str] | None):
        super().__init__(module)
        self.formats, self.templates, self.system_templates = formats, templates, system_templates
        loader, dataset = self.names.get("train_dataloader"), self.names.get("train_dataset")
        seen: set[int] = set()
        self.datasets = [d for root in (dataset, loader) for d in dicts_in(root, seen)
                         if "dataset_map_fn" in d or "template_map_fn" in d]
        self.dataset = self.datasets[0] if self.datasets else {}
        self.loader = loader if isinstance(loader, dict) else {}
        hooks = dicts_of_type(self.names.get("custom_hooks"), "EvaluateChatHook")
        self.hook = hooks[0] if hooks else {}
        self.model = self.names.get("model")
        self.optim = self.names.get("optim_wrapper")

    # --- candidates of the settings that pick the recipe
    def model_path_candidates(self) -> list[Candidate | None]:
        return [self.var("pretrained_model_name_or_path"),
                self.at("model.llm.pretrained_model_name_or_path", self.model, "llm", "pretrained_model_name_or_path")]

    def format_candidates(self) -> list[Candidate | None]:
        return [self.at("train_dataset.dataset_map_fn", self.dataset, "dataset_map_fn")]

    def as_format(self, value: Any) -> str:
        name = "conversation" if value is None else symbol_name(value, "_map_fn")
        if self.formats is not None and name not in self.formats:
            shown = value.path if isinstance(value, Symbol) else shortened(value)
            raise Unreadable(f"tunesmith has no reader for {shown}: convert the data to conversation JSONL or pick "
                              "a reader from `tunesmith list-dataset-format`")
        return name

    def as_template(self, value: Any) -> str:
        name = symbol_name(value)
        if self.templates is not None and name not in self.templates:
            raise Unreadable(f"tunesmith has no prompt template {shortened(name)}; see `tunesmith list-template`")
        return name

    def method(self) -> tuple[str | None, int | None, dict[Any, Any], dict[Any, Any]]:
        """(qlora | lora | full | None when there is no model dict, quantization bits, the BitsAndBytesConfig and
        LoraConfig dicts)."""
        if not isinstance(self.model, dict):
            return None, None, {}, {}
        quant = dig(self.model, "llm", "quantization_config")
        if not isinstance(quant, dict):
            found = dicts_of_type(self.model, "BitsAndBytesConfig")
            quant = found[0] if found else {}
        lora = dig(self.model, "lora")
        if not isinstance(lora, dict):
            found = dicts_of_type([self.model, self.names.get("lora")], "LoraConfig")  # framework='huggingface' files
            lora = found[0] if found else {}
        bits = 4 if quant.get("load_in_4bit") is True else 8 if quant.get("load_in_8bit") is True else None
        if quant and bits is None:
            self.notes.append("quantization_config sets neither load_in_4bit nor load_in_8bit: read as unquantized")
        if bits is not None and not lora:
            self.notes.append("a quantized model without a LoRA dict cannot be trained: converted as QLoRA with the "
                              "recipe's LoRA settings")
        method = "qlora" if bits is not None else "lora" if lora else "full"
        return method, bits, quant, lora

    def recipe(self, model_path: str | None, method: str, data_format: str | None) -> str:
        preset = _model_preset(model_path)
        dataset = next((d.name for d in DATASET_PRESETS
                        if data_format not in (None, "conversation") and d.settings.get("data.format") == data_format),
                       "oasst1")
        names = recipe_names()
        model_name = preset or _DEFAULT_MODEL
        for m, d in ((model_name, dataset), (model_name, "oasst1"), (_DEFAULT_MODEL, "oasst1")):
            name = next((n for n in names if n.startswith(f"{m}_{method}_{d}_e")), None)
            if name:
                break
        assert name is not None  # the default model has every method with oasst1
        if preset is None and model_path:
            self.notes.append(f"{model_path} is none of the built-in models: settings the file does not give come "
                              f"from recipe {name}")
        return name

    def convert(self) -> tuple[dict[str, Any], str]:
        method, bits, quant, lora = self.method()
        if method is None:
            self.notes.append("no model = dict(...) in the file: kept the recipe's method")
        name = self.recipe(self.peek(self.model_path_candidates(), as_text), method or "qlora",
                           self.peek(self.format_candidates(), self.as_format))
        self.base = validate(recipe_settings(name), name).model_dump(mode="json")
        if method is not None:
            self.settings["method"] = method
            self.settings["quantization.bits"] = bits
            origin = {"qlora": f"model: load_in_{bits}bit quantization_config and lora", "lora": "model: lora, no "
                      "quantization_config", "full": "model: no lora, no quantization_config"}[method]
            self.read.append(Reading("method", method, origin))
        self.read_model(quant, lora)
        self.read_data()
        self.read_training()
        self.read_evaluation()
        self.extra_notes()
        data = copy.deepcopy(self.base)
        for key, value in self.settings.items():
            set_dotted(data, key, value)
        return data, name

    def read_model(self, quant: dict[Any, Any], lora: dict[Any, Any]) -> None:
        self.take("model.path", "pretrained_model_name_or_path", self.model_path_candidates(), as_text)
        if quant and self.settings.get("quantization.bits") == 4:
            self.take("quantization.quant_type", "bnb_4bit_quant_type",
                      [self.at("bnb_4bit_quant_type", quant, "bnb_4bit_quant_type")], as_text, common=False)
            self.take("quantization.double_quant", "bnb_4bit_use_double_quant",
                      [self.at("bnb_4bit_use_double_quant", quant, "bnb_4bit_use_double_quant")], as_bool,
                      common=False)
            self.take("quantization.quant_storage", "bnb_4bit_quant_storage",
                      [self.at("bnb_4bit_quant_storage", quant, "bnb_4bit_quant_storage")], as_dtype, common=False)
        if lora:
            self.take("lora.r", "lora=dict(r=...)", [self.at("lora.r", lora, "r")], as_int)
            self.take("lora.alpha", "lora=dict(lora_alpha=...)", [self.at("lora.lora_alpha", lora, "lora_alpha")],
                      as_int)
            self.take("lora.dropout", "lora=dict(lora_dropout=...)",
                      [self.at("lora.lora_dropout", lora, "lora_dropout")], as_float)
            self.take("lora.bias", "lora=dict(bias=...)", [self.at("lora.bias", lora, "bias")], as_text, common=False)
            if lora.get("target_modules") is not None:
                self.take("lora.target_modules", "lora=dict(target_modules=...)",
                          [self.at("lora.target_modules", lora, "target_modules")], as_texts, common=False)

    def read_data(self) -> None:
        source = dig(self.dataset, "dataset")
        path_candidates = [self.var("data_path")]
        if isinstance(source, dict):
            loader_path = source.get("path")
            if isinstance(loader_path, str) and loader_path not in _HF_LOADERS:
                path_candidates.append(("train_dataset.dataset.path", loader_path))
            path_candidates += [self.at("train_dataset.dataset.dataset_name", source, "dataset_name"),
                                self.at("train_dataset.dataset.data_files", source, "data_files")]
        self.take("data.path", "data_path", path_candidates, first_file)
        self.take("data.name", "data_config_name",
                  [self.var("data_config_name"), self.at("train_dataset.dataset.name", source, "name")],
                  as_text, common=False)
        self.take("data.format", "dataset_map_fn", self.format_candidates(), self.as_format)
        self.take("data.prompt_template", "prompt_template",
                  [self.var("prompt_template"),
                   self.at("train_dataset.template_map_fn.template", self.dataset, "template_map_fn", "template"),
                   self.at("EvaluateChatHook.prompt_template", self.hook, "prompt_template")],
                  self.as_template)
        self.take("data.max_length", "max_length",
                  [self.var("max_length"), self.at("train_dataset.max_length", self.dataset, "max_length")], as_int)
        self.take("data.pack_to_max_length", "pack_to_max_length",
                  [self.var("pack_to_max_length"),
                   self.at("train_dataset.pack_to_max_length", self.dataset, "pack_to_max_length")], as_bool)
        self.take("data.shuffle_before_pack", "shuffle_before_pack",
                  [self.at("train_dataset.shuffle_before_pack", self.dataset, "shuffle_before_pack")], as_bool,
                  common=False)
        self.take("data.max_dataset_length", "max_dataset_length",
                  [self.var("max_dataset_length"),
                   self.at("train_dataset.max_dataset_length", self.dataset, "max_dataset_length")],
                  as_optional_int, common=False)
        self.take("data.num_workers", "dataloader_num_workers",
                  [self.var("dataloader_num_workers"), self.at("train_dataloader.num_workers", self.loader,
                                                               "num_workers")], as_int, common=False)
        self.read_system()

    def read_system(self) -> None:
        found = [c for c in (self.var("SYSTEM"), self.at("EvaluateChatHook.system", self.hook, "system")) if c]
        if not found:
            self.notes.append(f"no SYSTEM in the file: kept the recipe default for data.system "
                              f"({self.default('data.system')!r}) / data.system_template "
                              f"({self.default('data.system_template')!r})")
            return
        origin, value = found[0]
        kept = "kept the recipe's system prompt"
        if isinstance(value, Symbol):
            name = value.leaf
            if self.system_templates is not None and name not in self.system_templates:
                self.could_not_use(origin, f"tunesmith has no system template {shortened(name)}; see "
                                   "`tunesmith list-template`", kept)
                return
            self.settings.update({"data.system": "", "data.system_template": name})
            self.read.append(Reading("data.system_template", name, origin))
        elif isinstance(value, str):
            text = value.replace("{{", "{").replace("}}", "}")  # XTuner str.format()s SYSTEM; tunesmith never does
            if text != value:
                self.notes.append(f"{origin}: doubled braces {{{{ }}}} written single, as XTuner's format() "
                                  "showed them")
            self.settings.update({"data.system": text, "data.system_template": None})
            self.read.append(Reading("data.system", text, origin))
        elif isinstance(value, (Opaque, Call)):
            self.could_not_read(origin, value, kept)
        else:
            self.could_not_use(origin, f"it is {describe(value)}", kept)

    def read_training(self) -> None:
        opt = dig(self.optim, "optimizer")
        self.take("training.batch_size", "batch_size",
                  [self.var("batch_size"), self.at("train_dataloader.batch_size", self.loader, "batch_size"),
                   self.hf("per_device_train_batch_size")], as_int)
        self.take("training.accumulative_counts", "accumulative_counts",
                  [self.var("accumulative_counts"),
                   self.at("optim_wrapper.accumulative_counts", self.optim, "accumulative_counts"),
                   self.hf("gradient_accumulation_steps")], as_int)
        lr = self.take("training.lr", "lr", [self.var("lr"), self.at("optim_wrapper.optimizer.lr", opt, "lr"),
                                             self.hf("learning_rate")], as_float)
        self.take("training.betas", "betas",
                  [self.var("betas"), self.at("optim_wrapper.optimizer.betas", opt, "betas")], as_betas, common=False)
        self.take("training.weight_decay", "weight_decay",
                  [self.var("weight_decay"), self.at("optim_wrapper.optimizer.weight_decay", opt, "weight_decay"),
                   self.hf("weight_decay")], as_float)
        self.take("training.optimizer", "optim_type",
                  [self.var("optim_type"), self.at("optim_wrapper.optimizer.type", opt, "type")], as_optimizer,
                  common=False)
        self.take("training.max_norm", "max_norm",
                  [self.var("max_norm"), self.at("optim_wrapper.clip_grad.max_norm", self.optim, "clip_grad",
                                                 "max_norm"), self.hf("max_grad_norm")], as_float)
        epochs = self.take("training.max_epochs", "max_epochs",
                           [self.var("max_epochs"), self.at("train_cfg.max_epochs", self.names.get("train_cfg"),
                                                             "max_epochs"), self.hf("num_train_epochs")], as_int)
        self.read_schedule(lr, epochs)
        checkpoint = dig(self.names.get("default_hooks"), "checkpoint")
        by_iters = isinstance(checkpoint, dict) and checkpoint.get("by_epoch") is False
        self.take("training.save_steps", "save_steps",
                  [self.var("save_steps"),
                   self.at("default_hooks.checkpoint.interval", checkpoint, "interval") if by_iters else None,
                   self.hf("save_steps")], as_limit, common=False)
        self.take("training.save_total_limit", "save_total_limit",
                  [self.var("save_total_limit"),
                   self.at("default_hooks.checkpoint.max_keep_ckpts", checkpoint, "max_keep_ckpts"),
                   self.hf("save_total_limit")], as_limit, common=False)
        seed = dig(self.names.get("randomness"), "seed")
        if seed is not None and seed is not MISSING:
            self.take("training.seed", "randomness seed", [("randomness.seed", seed)], as_int, common=False)

    def read_schedule(self, lr: Any, epochs: Any) -> None:
        """warmup_ratio from its variable or the LinearLR warm-up of param_scheduler (none: no warm-up, as 0.1.9's
        configs); min_lr_ratio from CosineAnnealingLR's eta_min."""
        scheduler = self.names.get("param_scheduler")
        candidates: list[Candidate | None] = [self.var("warmup_ratio"), self.hf("warmup_ratio")]
        if scheduler is not None and not isinstance(scheduler, Opaque):
            warmups = dicts_of_type(scheduler, "LinearLR")
            end = warmups[0].get("end") if warmups else None
            if not warmups:
                candidates.append(("param_scheduler (no LinearLR warm-up)", 0.0))
            elif is_number(end) and isinstance(epochs, int) and warmups[0].get("by_epoch", True) is True:
                candidates.append(("param_scheduler LinearLR end / max_epochs", end / epochs))
        self.take("training.warmup_ratio", "warmup_ratio", candidates, as_float)
        cosine = dicts_of_type(scheduler, "CosineAnnealingLR")
        eta_min = cosine[0].get("eta_min") if cosine else None
        if is_number(eta_min) and isinstance(lr, float) and lr > 0:
            self.take("training.min_lr_ratio", "eta_min", [("param_scheduler CosineAnnealingLR eta_min / lr",
                                                            eta_min / lr)], as_float, common=False)

    def read_evaluation(self) -> None:
        self.take("evaluation.inputs", "evaluation_inputs",
                  [self.var("evaluation_inputs"),
                   self.at("EvaluateChatHook.evaluation_inputs", self.hook, "evaluation_inputs")], as_texts)
        every = self.take("evaluation.every_n_steps", "evaluation_freq",
                          [self.var("evaluation_freq"), self.at("EvaluateChatHook.every_n_iters", self.hook,
                                                                "every_n_iters")], as_optional_int)
        counts = self.settings.get("training.accumulative_counts", self.default("training.accumulative_counts"))
        iter_saves = any(r.key == "training.save_steps" and r.value and not r.origin.startswith("training_args")
                         for r in self.read)  # HF's TrainingArguments count optimizer steps already
        if (every not in (MISSING, None) or iter_saves) and counts > 1:
            self.notes.append("XTuner counts evaluation_freq and save_steps in iterations (micro-batches), tunesmith "
                              f"in optimizer steps: the numbers are kept as written (divide by {counts}, "
                              "accumulative_counts, for XTuner's spacing)")

    def extra_notes(self) -> None:
        llm = dig(self.model, "llm")
        given = {dig(llm, "torch_dtype"), dig(llm, "quantization_config", "bnb_4bit_compute_dtype")}
        dtypes = sorted(d.path for d in given if isinstance(d, Symbol))
        if dtypes:
            self.notes.append(f"{' / '.join(dtypes)} (torch_dtype, bnb_4bit_compute_dtype) not carried over: "
                              "tunesmith's auto dtypes pick bf16 where the GPU supports it, else fp16")
        if dig(llm, "trust_remote_code") is True:
            self.notes.append("trust_remote_code=True not carried over: tunesmith loads InternLM natively; set "
                              "model.trust_remote_code: true only for a model that needs its own code")
        kind = dig(self.model, "type")
        if isinstance(kind, Symbol) and kind.leaf in {"DPO", "ORPO", "RewardModel"}:
            self.notes.append(f"the model is XTuner's {kind.leaf}, an objective a tunesmith config does not hold: "
                              "converted as supervised fine-tuning")
        if isinstance(kind, Symbol) and kind.leaf in {"LLaVAModel", "InternVL_V1_5"}:
            self.notes.append(f"the model is XTuner's multimodal {kind.leaf}: tunesmith trains language models, so "
                              "only the language model's settings were read")
        parallel = self.names.get("sequence_parallel_size")
        if is_number(parallel) and parallel > 1:
            self.notes.append(f"sequence_parallel_size {parallel} has no tunesmith equivalent: ignored")
        if len(self.datasets) > 1:
            self.notes.append(f"the file trains on {len(self.datasets)} datasets; tunesmith trains on one data.path: "
                              "only the first was converted")
        if self.inherits:
            self.notes.append("the file inherits from another config (_base_ / read_base / import *), which is not "
                              "read: settings given only there kept the recipe defaults")


def _model_preset(path: str | None) -> str | None:
    """The built-in model whose hub id is `path`, or whose folder name is `path`'s last part."""
    if not path:
        return None
    wanted = path.replace("\\", "/").rstrip("/").lower()
    for preset in MODEL_PRESETS:
        if preset.path.lower() == wanted:
            return preset.name
    tail = wanted.rsplit("/", 1)[-1]
    for preset in MODEL_PRESETS:
        if preset.path.lower().rsplit("/", 1)[-1] == tail:
            return preset.name
    return None
