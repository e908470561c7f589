"""The one typed config: what a user edits in YAML, what `--set` overrides and what the code reads.

Defaults are XTuner 0.x's (internlm_chat_7b_qlora_oasst1_e3). Every field carries a description, which
`copy-cfg` writes next to the key as a comment. Unknown keys are errors (with a did-you-mean, see
`tunesmith.config.load`). Cross-field rules live in `TrainConfig._cross_checks` so they fail at load time,
before any model is read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Method = Literal["qlora", "lora", "full"]
Objective = Literal["sft", "dpo", "orpo"]
DType = Literal["auto", "bf16", "fp16", "fp32"]
DeepSpeedName = Literal[
    "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload"
]

XTUNER_EVALUATION_INPUTS = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """The base model: where it is and how it is loaded."""

    path: str = Field(
        "internlm/internlm-chat-7b",
        description="local folder, .gguf file, hub id, or builtin:smollm2-135m-instruct",
    )
    tokenizer_path: str | None = Field(None, description="tokenizer location when it differs from path")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model (off: unsafe)")
    dtype: DType = Field("auto", description="weights dtype: auto picks bf16 where the GPU supports it, else fp16")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="attention kernel; auto = the fastest exact one available"
    )


class QuantizationSection(Section):
    """bitsandbytes quantization of the frozen base model (QLoRA)."""

    bits: Literal[4, 8] | None = Field(
        None, description="4 = NF4 (QLoRA), 8 = LLM.int8, null = none (method qlora picks 4)"
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the quantization constants too (saves ~0.4 bit/param)")
    compute_dtype: DType = Field("auto", description="dtype of the dequantized matmuls")
    quant_storage: DType | None = Field(
        None, description="storage dtype of packed 4-bit weights; ZeRO-3 needs it equal to the compute dtype"
    )


class LoraSection(Section):
    """The LoRA adapter that methods lora and qlora train."""

    r: int = Field(64, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every Linear except the head, as XTuner) or a list of names"
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases to train")
    modules_to_save: list[str] = Field(default_factory=list, description="extra modules trained in full")


class DataSection(Section):
    """The training data: where it is, how it is read, templated, cut and packed."""

    path: str = Field(
        "timdettmers/openassistant-guanaco",
        description="local file or folder (json, jsonl, csv, parquet, txt), or a hub dataset id when online",
    )
    format: str = Field("oasst1", description="reader (XTuner's dataset_map_fn name); see list-dataset-format")
    name: str | None = Field(None, description="hub dataset config name")
    split: str = Field("train", description="hub dataset split")
    prompt_template: str = Field("internlm_chat", description="chat template name or 'auto'; see list-template")
    system: str = Field("", description="system prompt text added to every conversation without its own")
    system_template: str | None = Field(None, description="named system prompt (alternative to system)")
    model_default_system: bool = Field(
        True, description="a conversation without a system prompt gets the model's own default one when the "
        "template renders the tokenizer's chat template (as apply_chat_template does); false: no system block, "
        "as XTuner. Not with prompt_template 'auto', which always renders the tokenizer's own template")
    strict: bool = Field(
        False, description="stop at the first malformed record; by default such records are skipped and counted")
    max_length: int = Field(2048, ge=16, description="tokens per (packed) sample; preference pairs: per sequence "
                            "(chosen or rejected), and a packed row holds 2 x max_length")
    pack_to_max_length: bool = Field(True, description="pack samples into max_length sequences")
    shuffle_before_pack: bool = Field(True, description="shuffle samples before packing")
    max_dataset_length: int | None = Field(
        None, ge=1, description="use a random N of the records, as XTuner (the same N for the same training.seed)")
    num_workers: int = Field(0, ge=0, description="data-loader worker processes")
    cache_dir: str | None = Field(None, description="where tokenized datasets are cached (default: ~/.cache/tunesmith)")
    validation: float | str | None = Field(
        None, description="held-out data for the validation loss: a file (read like path, same format and "
        "template), or a fraction in (0, 1) of path's conversations, chosen with training.seed and never trained on")

    @field_validator("validation", mode="before")
    @classmethod
    def _validation_kind(cls, value: Any) -> Any:
        """A number (``--set data.validation=0.1`` arrives as text) is a held-out fraction; other text is a file."""
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return value or None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        if not 0.0 < value < 1.0:
            raise ValueError(f"data.validation as a number is the held-out fraction, between 0 and 1 (got {value})")
        return float(value)

    @model_validator(mode="after")
    def _one_system(self) -> DataSection:
        if self.system and self.system_template:
            raise ValueError("set data.system or data.system_template, not both")
        if not self.model_default_system and self.prompt_template == "auto":
            raise ValueError("data.model_default_system false needs a named prompt_template: 'auto' renders the "
                             "tokenizer's own chat template, default system prompt included")
        return self


class TrainingSection(Section):
    """Optimizer, schedule, precision, seed and checkpoints."""

    objective: Objective = Field(
        "sft", description="sft (answers), or dpo / orpo on preference pairs (data.format preference); any method")
    max_epochs: int = Field(3, ge=1, description="passes over the data")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(1, ge=1, description="samples per device per micro-batch")
    accumulative_counts: int = Field(16, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_norm: float | None = Field(1.0, description="gradient clipping norm (null: no clipping)")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of steps with linear warm-up")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a share of lr")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch) or a bitsandbytes variant"
    )
    mixed_precision: DType = Field("auto", description="auto = bf16 where supported, fp16 on older GPUs, fp32 on CPU")
    gradient_checkpointing: bool = Field(True, description="recompute activations in backward to save memory")
    seed: int = Field(0, description="random seed (data order, dropout, init)")
    deterministic: bool = Field(False, description="use deterministic kernels (slower)")
    save_steps: int | None = Field(None, ge=1, description="also save iter_N.pth every N steps")
    save_total_limit: int | None = Field(2, ge=1, description="iter_N.pth checkpoints to keep")
    save_epochs: bool = Field(True, description="save epoch_N.pth at the end of every epoch")
    save_best: bool = Field(
        False, description="also keep the checkpoint with the lowest validation loss as best.pth "
        "(needs data.validation)")
    log_interval: int = Field(10, ge=1, description="steps between log lines")


class PreferenceSection(Section):
    """DPO and ORPO (training.objective dpo / orpo) on pairs of a chosen and a rejected answer."""

    beta: float = Field(0.1, gt=0, description="DPO: how far the trained model may move from the reference "
                        "(the implicit reward is beta x the log-probability gained over the reference)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO: the share of pairs assumed mislabelled (conservative DPO); 0 = plain DPO")
    sft_weight: float = Field(
        0.0, ge=0, description="DPO: weight of the chosen answer's per-token negative log-likelihood added to the "
        "loss (RPO; TRL's rpo_alpha); 0 = none")
    orpo_lambda: float = Field(0.1, gt=0, description="ORPO: weight of the odds-ratio term beside the chosen "
                               "answer's negative log-likelihood (TRL's ORPOConfig.beta)")
    reference: Literal["auto", "adapter_off", "precomputed"] = Field(
        "auto", description="DPO's reference model: adapter_off = the model with its LoRA switched off, each step "
        "(no second copy); precomputed = its log-probabilities computed once before training and kept in the work "
        "dir; auto = adapter_off for lora / qlora, precomputed for full")
    share_prompt: bool = Field(
        True, description="hold the tokens a pair's chosen and rejected sequences begin with (system, history, "
        "prompt) once in a row and compute them once; the same losses. Needs speed.packed_attention with "
        "model.attn_implementation auto or sdpa, and is off otherwise")

    def reference_mode(self, method: str) -> str:
        """The reference actually used for ``method`` (the one home of ``auto``)."""
        if self.reference != "auto":
            return self.reference
        return "precomputed" if method == "full" else "adapter_off"


class EvaluationSection(Section):
    """Sample answers generated during training (XTuner's EvaluateChatHook)."""

    inputs: list[str] = Field(
        default_factory=lambda: list(XTUNER_EVALUATION_INPUTS),
        description="prompts answered during training to watch the model learn",
    )
    every_n_steps: int | None = Field(500, ge=1, description="answer them every N steps (null: only before/after)")
    validation_every_n_steps: int | None = Field(
        None, ge=1, description="validation loss every N steps (null: at every_n_steps); also before the first step "
        "and at the last; needs data.validation")
    max_new_tokens: int = Field(600, ge=1, description="answer length limit")
    temperature: float = Field(0.1, ge=0, description="0 = greedy")
    top_p: float = Field(
        0.75, gt=0, le=1,
        description="nucleus sampling: draw from the most likely tokens whose probabilities add up to top_p "
        "(with temperature > 0)",
    )
    top_k: int = Field(
        40, ge=0, description="draw only from the k most likely tokens (0: no limit; with temperature > 0)"
    )


    def validation_interval(self) -> int | None:
        """Steps between validation losses (besides the first and the last): the one home of that default."""
        return self.validation_every_n_steps or self.every_n_steps


Tracker = Literal["tensorboard", "wandb", "mlflow"]


class LoggingSection(Section):
    """What a run writes besides metrics.jsonl."""

    report_to: list[Tracker] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers that get the metrics each log step: any of tensorboard (work_dir/"
        "tensorboard), wandb (offline unless WANDB_MODE is set), mlflow (work_dir/mlruns unless MLFLOW_TRACKING_URI)")
    tensorboard: bool | None = Field(
        None, description="the older switch: true adds tensorboard to report_to, false takes it out (so that "
        "--set logging.tensorboard=false works on any config; null: as report_to says)")
    plot: bool = Field(True, description="draw work_dir/loss.png")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def trackers(self) -> list[str]:
        """The trackers a run writes to: report_to, with the tensorboard switch applied (the one home of the rule)."""
        names = list(dict.fromkeys(self.report_to))
        if self.tensorboard is True and "tensorboard" not in names:
            names.append("tensorboard")
        if self.tensorboard is False:
            names = [n for n in names if n != "tensorboard"]
        return names


class DistributedSection(Section):
    """Several GPUs: DDP, or DeepSpeed ZeRO with --deepspeed."""

    deepspeed: str | None = Field(
        None, description="deepspeed_zero1|zero2|zero2_offload|zero3|zero3_offload or a JSON file"
    )
    dataset_timeout_minutes: float = Field(60.0, gt=0, description="how long other ranks wait for rank 0's data")


class SpeedSection(Section):
    """Fast paths. Each is exact against the plain path (tests) and can be switched off here."""

    packed_attention: bool = Field(True, description="attention never crosses packed samples (varlen / block mask)")
    liger_kernel: Literal["auto", "on", "off"] = Field(
        "auto", description="liger-kernel RMSNorm / RoPE / SwiGLU / fused linear+CE on CUDA when installed"
    )
    chunked_loss: bool = Field(True, description="cross-entropy in chunks so full logits never materialise")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile each decoder layer; auto compiles where it pays off (the log says why or why not)",
    )
    fused_lora: bool = Field(True, description="LoRA's low-rank product and add in one matmul in the activation dtype")
    embeddings_on_host: bool = Field(
        False,
        description="keep the frozen input embedding table in host memory (LoRA / QLoRA, one GPU, no DeepSpeed): "
        "its GPU memory freed (0.8 GiB at a 100k vocabulary) for about a millisecond a step",
    )
    memory_fraction: float = Field(
        0.9, gt=0, le=1,
        description="share of the GPU a training step may fill; with gradient checkpointing the activation plan "
        "keeps as many activations as fit in it",
    )

    @field_validator("liger_kernel", "compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads ``on`` / ``off`` / ``true`` / ``false`` as booleans: take them as the switch they mean."""
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class TrainConfig(Section):
    """A whole training recipe."""

    method: Method = Field("qlora", description="qlora, lora or full fine-tuning")
    work_dir: str | None = Field(None, description="output folder (default ./work_dirs/<config name>)")
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    speed: SpeedSection = Field(default_factory=SpeedSection)

    @field_validator("method", mode="before")
    @classmethod
    def _lower_method(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def shares_prompt(self) -> bool:
        """Whether pair rows hold each pair's common start once (the one home of that rule: the data layout
        needs tunesmith's packed attention to read it)."""
        return (self.preference.share_prompt and self.speed.packed_attention
                and self.model.attn_implementation in ("auto", "sdpa"))

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        q = self.quantization
        if self.method == "qlora" and q.bits is None:
            q.bits = 4  # QLoRA means a quantized base; NF4 unless the user picked 8
        if self.method == "full" and q.bits is not None:
            raise ValueError(
                "full fine-tuning cannot train quantized weights: set quantization.bits null or use method 'qlora'"
            )
        if self.method == "lora" and q.bits is not None:
            raise ValueError("method 'lora' trains an unquantized base: set quantization.bits null or use 'qlora'")
        if self.training.save_best and self.data.validation is None:
            raise ValueError("training.save_best keeps the checkpoint with the lowest validation loss: set "
                             "data.validation (a file or a held-out fraction such as 0.05)")
        if self.evaluation.validation_every_n_steps is not None and self.data.validation is None:
            raise ValueError("evaluation.validation_every_n_steps needs data.validation (a file or a fraction)")
        ds = self.distributed.deepspeed or ""
        if self.method == "full" and self.preference.reference == "adapter_off":
            raise ValueError("preference.reference adapter_off needs an adapter (method lora or qlora); full "
                             "fine-tuning uses precomputed (or auto)")
        if (self.training.objective == "dpo" and "zero3" in ds
                and self.preference.reference_mode(self.method) == "precomputed"):
            raise ValueError("DPO's precomputed reference is not available under ZeRO-3 yet: use ZeRO-2, or "
                             "method lora / qlora with preference.reference adapter_off")
        if "zero3" in ds and q.bits is not None and q.quant_storage is None:
            raise ValueError(
                "QLoRA with ZeRO-3 needs quantization.quant_storage (e.g. bf16) so ZeRO can shard the 4-bit weights"
            )
        return self
