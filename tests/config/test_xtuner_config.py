"""XTuner Python configs: `convert xtuner-config` reads them by parsing (never running them) into a full tunesmith
config; `train x.py` refuses them in one line that says how to convert. The CLI cases run the real command line
in this process (the CLI's own `main`), as tests/cli/test_bad_inputs.py does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tunesmith.cli.main import main
from tunesmith.config import build_recipe, load_config
from tunesmith.config.load import validate
from tunesmith.config.xtuner import convert_xtuner_config, read_xtuner_config
from tunesmith.data.readers import format_names
from tunesmith.data.templates import system_template_names, template_names

NAMES = {"formats": format_names(), "templates": template_names(), "system_templates": system_template_names()}

# internlm_chat_7b_qlora_oasst1_e3 as XTuner 0.1.x writes it (`xtuner copy-cfg`), PART 1 to PART 5
XTUNER_QLORA_OASST1 = """\
# Copyright (c) OpenMMLab. All rights reserved.
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import (AutoModelForCausalLM, AutoTokenizer,
                          BitsAndBytesConfig)

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import oasst1_map_fn, template_map_fn_factory
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'internlm/internlm-chat-7b'
use_varlen_attn = False

# Data
data_path = 'timdettmers/openassistant-guanaco'
prompt_template = PROMPT_TEMPLATE.internlm_chat
max_length = 2048
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 1  # per_device
accumulative_counts = 16
dataloader_num_workers = 0
max_epochs = 3
optim_type = AdamW
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.03

# Save
save_steps = 500
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = ''
evaluation_inputs = [
    '请给我介绍五个上海的景点', 'Please tell me five scenic spots in Shanghai'
]

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.float16,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type='nf4')),
    lora=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        bias='none',
        task_type='CAUSAL_LM'))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path=data_path),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=oasst1_map_fn,
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(
        type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16')

param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True)
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template)
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
"""


def write(tmp_path: Path, text: str, name: str = "xtuner_cfg.py") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def convert(tmp_path: Path, text: str, **names):
    """(validated config, notes) of an XTuner config text, checked against the registries unless told."""
    data, notes = convert_xtuner_config(write(tmp_path, text), **(names or NAMES))
    return validate(data, "converted"), notes


# --- what is read ---------------------------------------------------------------------------------------


def test_the_tutorial_qlora_config_is_read_in_full(tmp_path):
    cfg, notes = convert(tmp_path, XTUNER_QLORA_OASST1)
    assert cfg.method == "qlora" and cfg.quantization.bits == 4
    assert (cfg.quantization.quant_type, cfg.quantization.double_quant) == ("nf4", True)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (64, 16, 0.1, "none")
    assert cfg.model.path == "internlm/internlm-chat-7b"
    d = cfg.data
    assert (d.path, d.format, d.prompt_template) == ("timdettmers/openassistant-guanaco", "oasst1", "internlm_chat")
    assert (d.max_length, d.pack_to_max_length, d.system, d.system_template) == (2048, True, "", None)
    t = cfg.training
    assert (t.batch_size, t.accumulative_counts, t.lr, t.max_epochs) == (1, 16, 2e-4, 3)
    assert (t.betas, t.weight_decay, t.max_norm, t.warmup_ratio, t.optimizer) == (
        (0.9, 0.999), 0.0, 1.0, 0.03, "adamw")
    assert (t.save_steps, t.save_total_limit) == (500, 2)
    assert cfg.evaluation.inputs == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    assert cfg.evaluation.every_n_steps == 500
    # it is XTuner's own recipe: the built-in one, plus the iter checkpoints the 0.1.23 file asks for
    recipe = build_recipe("internlm_chat_7b_qlora_oasst1_e3")
    recipe.training.save_steps = 500
    assert cfg == recipe
    assert not [n for n in notes if "kept the recipe default" in n], notes
    assert any("trust_remote_code" in n for n in notes) and any("torch.float16" in n for n in notes)


def test_an_xtuner_0_1_9_schedule_and_paged_optimizer(tmp_path):
    text = (XTUNER_QLORA_OASST1.replace("from torch.optim import AdamW", "from bitsandbytes.optim import "
                                        "PagedAdamW32bit").replace("optim_type = AdamW", "optim_type = PagedAdamW32bit")
            .replace("warmup_ratio = 0.03\n", ""))
    schedule = text[text.index("param_scheduler = ["):text.index("train_cfg =")]
    text = text.replace(schedule, "param_scheduler = dict(type=CosineAnnealingLR, eta_min=2e-5, by_epoch=True,\n"
                                  "                       T_max=max_epochs, convert_to_iter_based=True)\n\n")
    cfg, _ = convert(tmp_path, text)
    # 0.1.9 had no warm-up: its LinearLR-less schedule says so
    assert cfg.training.warmup_ratio == 0.0
    assert cfg.training.optimizer == "paged_adamw_32bit"
    assert cfg.training.min_lr_ratio == pytest.approx(0.1)


def test_arithmetic_and_names_between_settings_resolve(tmp_path):
    text = """
from xtuner.utils import PROMPT_TEMPLATE as PT, SYSTEM_TEMPLATE
from xtuner.dataset.map_fns import alpaca_map_fn
base_lr = 1e-4
lr = base_lr * 2
max_epochs = 1 + 2
max_length = int(4096 / 2)
batch_size, accumulative_counts = 2, 4
sequence_parallel_size = 2
accumulative_counts *= sequence_parallel_size
QUESTIONS = ['first question']
evaluation_inputs = QUESTIONS + ['second ' + 'question']
evaluation_freq = 50 * 2
weight_decay = 0
weight_decay = 0.01  # the last assignment wins, as when Python runs the file
common = dict(max_length=max_length, pack_to_max_length=False)
train_dataset = dict(dataset=dict(path='tatsu-lab/alpaca'), dataset_map_fn=alpaca_map_fn, **common)
SYSTEM = SYSTEM_TEMPLATE.alpaca
prompt_template = PT['llama2_chat']
pretrained_model_name_or_path = 'meta-llama/Llama-2-7b-hf'
"""
    cfg, notes = convert(tmp_path, text)
    t = cfg.training
    assert (t.lr, t.max_epochs, t.batch_size, t.accumulative_counts, t.weight_decay) == (2e-4, 3, 2, 8, 0.01)
    assert (cfg.data.max_length, cfg.data.pack_to_max_length) == (2048, False)  # the last from train_dataset
    assert cfg.evaluation.inputs == ["first question", "second question"] and cfg.evaluation.every_n_steps == 100
    assert (cfg.data.system_template, cfg.data.system) == ("alpaca", "")
    assert (cfg.data.prompt_template, cfg.data.format, cfg.data.path) == ("llama2_chat", "alpaca", "tatsu-lab/alpaca")
    assert any("sequence_parallel_size 2" in n for n in notes)
    assert any("no model = dict" in n for n in notes)


LORA = "lora=dict(type=LoraConfig, r=16, lora_alpha=32, lora_dropout=0.05, target_modules=['q_proj', 'v_proj'])"


@pytest.mark.parametrize("model,method,bits", [
    (f"dict(llm=dict(quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True)), {LORA})", "qlora", 4),
    (f"dict(llm=dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True)), {LORA})", "qlora", 8),
    (f"dict(type=SupervisedFinetune, llm=dict(type=AutoModelForCausalLM.from_pretrained), {LORA})", "lora", None),
    ("dict(type=SupervisedFinetune, llm=dict(type=AutoModelForCausalLM.from_pretrained))", "full", None),
], ids=["qlora-4bit", "qlora-8bit", "lora", "full"])
def test_the_method_is_inferred_from_the_model_dict(tmp_path, model, method, bits):
    text = ("from peft import LoraConfig\nfrom transformers import BitsAndBytesConfig\n"
            f"pretrained_model_name_or_path = 'internlm/internlm-chat-7b'\nmodel = {model}\n")
    cfg, _ = convert(tmp_path, text)
    assert (cfg.method, cfg.quantization.bits) == (method, bits)
    if method != "full":
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (
            16, 32, 0.05, ["q_proj", "v_proj"])
    else:
        assert cfg.training.lr == 2e-5  # no lr in the file: XTuner's full fine-tuning recipe


def test_the_tutorial_medqa_json_data(tmp_path):
    text = XTUNER_QLORA_OASST1.replace(
        "data_path = 'timdettmers/openassistant-guanaco'", "data_path = './MedQA2019-structured-train.jsonl'").replace(
        "dataset=dict(type=load_dataset, path=data_path)",
        "dataset=dict(type=load_dataset, path='json', data_files=dict(train=data_path))").replace(
        "dataset_map_fn=oasst1_map_fn", "dataset_map_fn=None").replace(
        "SYSTEM = ''", "SYSTEM = 'You are a doctor. Answer in {{JSON}}.'")
    cfg, notes = convert(tmp_path, text)
    assert (cfg.data.path, cfg.data.format) == ("./MedQA2019-structured-train.jsonl", "conversation")
    # XTuner str.format()s SYSTEM in its evaluation hook, so the doubled braces meant single ones
    assert (cfg.data.system, cfg.data.system_template) == ("You are a doctor. Answer in {JSON}.", None)
    assert any("doubled braces" in n for n in notes)


# --- what is not read -------------------------------------------------------------------------------------


def test_missing_and_unreadable_settings_keep_the_recipe_default_with_a_note(tmp_path):
    text = """
import os
pretrained_model_name_or_path = 'internlm/internlm-chat-7b'
lr = get_lr()
data_path = os.path.join(os.environ['HOME'], 'data.json')
evaluation_inputs = [f'question {i}' for i in range(3)]
"""
    cfg, notes = convert(tmp_path, text)
    recipe = build_recipe("internlm_chat_7b_qlora_oasst1_e3")
    assert cfg.training.lr == recipe.training.lr and cfg.data.path == recipe.data.path
    assert cfg.training.max_epochs == recipe.training.max_epochs
    assert cfg.evaluation.inputs == recipe.evaluation.inputs
    text_of_notes = "\n".join(notes)
    assert "could not read lr = get_lr() without running the file: kept the recipe default for training.lr" in (
        text_of_notes)
    assert "kept the recipe default for data.path" in text_of_notes
    assert "kept the recipe default for evaluation.inputs" in text_of_notes
    assert "no max_epochs in the file: kept the recipe default for training.max_epochs (3)" in text_of_notes
    assert "no SYSTEM in the file" in text_of_notes


def test_unknown_names_and_refused_values_fall_back_to_the_recipe(tmp_path):
    text = XTUNER_QLORA_OASST1.replace("dataset_map_fn=oasst1_map_fn", "dataset_map_fn=no_such_map_fn").replace(
        "PROMPT_TEMPLATE.internlm_chat", "PROMPT_TEMPLATE.no_such_template").replace(
        "max_length = 2048", "max_length = 8").replace("SYSTEM = ''", "SYSTEM = SYSTEM_TEMPLATE.no_such_system")
    cfg, notes = convert(tmp_path, text)
    assert (cfg.data.format, cfg.data.prompt_template, cfg.data.max_length) == ("oasst1", "internlm_chat", 2048)
    text_of_notes = "\n".join(notes)
    assert "no reader for no_such_map_fn" in text_of_notes and "no prompt template 'no_such_template'" in text_of_notes
    assert "no system template 'no_such_system'" in text_of_notes
    assert "max_length gives data.max_length = 8, which tunesmith refuses" in text_of_notes
    # without the registries the names are taken as written
    cfg, _ = convert(tmp_path, text, formats=None)
    assert cfg.data.format == "no_such" and cfg.data.prompt_template == "no_such_template"


def test_the_file_is_never_run(tmp_path):
    marks = [tmp_path / f"ran_{i}" for i in range(8)]
    text = f"""
import os
import subprocess
os.system('touch {marks[0]}')
open({str(marks[1])!r}, 'w').write('x')
subprocess.run(['touch', {str(marks[2])!r}])
lr = __import__('os').system('touch {marks[3]}')
max_epochs = [open({str(marks[4])!r}, 'w') for _ in range(1)][0]
exec("open({str(marks[5])!r}, 'w')")
batch_size = eval("open({str(marks[6])!r}, 'w') and 1")
with open({str(marks[7])!r}, 'w') as f:
    f.write('x')
class Config:
    os.system('touch {marks[0]}')
big = 'x' * 10 ** 9
huge = 10 ** 10 ** 10
pretrained_model_name_or_path = 'internlm/internlm-chat-7b'
"""
    cfg, notes = convert(tmp_path, text)
    assert not [m.name for m in marks if m.exists()]
    assert cfg.model.path == "internlm/internlm-chat-7b" and cfg.training.lr == 2e-4
    assert any(n.startswith("could not read lr = __import__('os')") for n in notes)


def test_xtuners_minus_one_limits_mean_none(tmp_path):
    text = XTUNER_QLORA_OASST1.replace("save_steps = 500", "save_steps = -1").replace(
        "save_total_limit = 2 ", "save_total_limit = -1 ")
    cfg, _ = convert(tmp_path, text)
    assert (cfg.training.save_steps, cfg.training.save_total_limit) == (None, None)


DEEP = "a0 = []\n" + "".join(f"a{i + 1} = [a{i}]\n" for i in range(3000)) + "model = dict(llm=a3000)\n"


@pytest.mark.parametrize("text,message", [
    ("import os\nprint('hello')\n", "none of an XTuner config's settings"),
    (DEEP, "nested too deeply"),
], ids=["no-settings", "too-deep"])
def test_a_python_file_that_is_no_xtuner_config_is_refused(tmp_path, text, message):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match=message):
        read_xtuner_config(write(tmp_path, text), **NAMES)


# --- the command line -----------------------------------------------------------------------------------


def run_cli(command: str, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.delenv("TUNESMITH_DEBUG", raising=False)
    try:
        main(shlex.split(command))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.mark.parametrize("command", ["train", "check-custom-dataset", "log-dataset"])
def test_commands_given_a_python_config_say_how_to_convert_it(tmp_path, capsys, monkeypatch, command):
    src = write(tmp_path, XTUNER_QLORA_OASST1, "internlm_chat_7b_qlora_oasst1_e3_copy.py")
    code, _, err = run_cli(f"{command} {src}", capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "XTuner Python config" in err and "never runs" in err
    assert f"tunesmith convert xtuner-config {src} {src.with_suffix('.yaml')}" in err
    assert f"tunesmith train {src.with_suffix('.yaml')}" in err and "tunesmith copy-cfg" in err
    assert [p.name for p in tmp_path.iterdir()] == [src.name]


def test_convert_xtuner_config_end_to_end(tmp_path, capsys, monkeypatch):
    src = write(tmp_path, XTUNER_QLORA_OASST1, "internlm_chat_7b_qlora_oasst1_e3_copy.py")
    out = tmp_path / "converted.yaml"
    code, stdout, err = run_cli(f"convert xtuner-config {src} {out}", capsys, monkeypatch)
    assert code == 0, err
    assert "built-in recipe internlm_chat_7b_qlora_oasst1_e3" in stdout
    assert re.search(r"training\.lr\s+0\.0002\s+<- lr", stdout)
    assert re.search(r"data\.format\s+'oasst1'\s+<- train_dataset\.dataset_map_fn", stdout)
    assert "notes:" in stdout and "trust_remote_code" in stdout and f"next: tunesmith train {out}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no temporary left behind

    text = out.read_text(encoding="utf-8")
    assert text.startswith(f"# converted from the XTuner config {src.name}")
    cfg, stem = load_config(str(out))
    assert stem == "converted" and cfg.model.path == "internlm/internlm-chat-7b" and cfg.training.save_steps == 500
    assert cfg == validate(yaml.safe_load(text), str(out))
    # overrides work on it as on any config
    cfg, _ = load_config(str(out), ["data.path=./openassistant-guanaco"])
    assert cfg.data.path == "./openassistant-guanaco"

    # an existing OUT is kept unless --overwrite
    code, _, err = run_cli(f"convert xtuner-config {src} {out}", capsys, monkeypatch)
    assert code == 2 and "already exists" in err and "--overwrite" in err and out.read_text() == text
    code, _, err = run_cli(f"convert xtuner-config {src} {out} --overwrite", capsys, monkeypatch)
    assert code == 0, err


BAD = [
    ("convert xtuner-config {dir}/missing.py {dir}/out.yaml", "does not exist"),
    ("convert xtuner-config {config.yaml} {dir}/out.yaml", "not a Python file"),
    ("convert xtuner-config {broken.py} {dir}/out.yaml", "line 2"),
    ("convert xtuner-config {nothing.py} {dir}/out.yaml", "none of an XTuner config's settings"),
    ("convert xtuner-config {good.py} {dir}/out.json", "must end in .yaml"),
    ("convert xtuner-config {good.py} {taken.yaml}", "already exists"),
    ("convert xtuner-config {good.py} {blocker}/out.yaml", "is a file, not a folder"),
    ("convert xtuner-config {dir} {dir}/out.yaml", "is a folder"),
]


@pytest.mark.parametrize("command,expected", BAD, ids=[c.split(" ", 2)[2] for c, _ in BAD])
def test_convert_xtuner_config_bad_input(tmp_path, capsys, monkeypatch, command, expected):
    files = {"dir": tmp_path, "good.py": write(tmp_path, XTUNER_QLORA_OASST1, "good.py"),
             "broken.py": write(tmp_path, "lr = 2e-4\nmodel = dict(\n", "broken.py"),
             "nothing.py": write(tmp_path, "import os\n", "nothing.py"),
             "config.yaml": write(tmp_path, "method: lora\n", "config.yaml"),
             "taken.yaml": write(tmp_path, "method: lora\n", "taken.yaml"),
             "blocker": write(tmp_path, "a file where a folder should be", "blocker")}
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    code, _, err = run_cli(re.sub(r"\{([\w.]+)\}", lambda m: str(files[m.group(1)]), command), capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("error: ") and expected in err, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before, "something was written"


def test_convert_xtuner_config_help_has_an_example(capsys, monkeypatch):
    code, stdout, _ = run_cli("convert xtuner-config --help", capsys, monkeypatch)
    assert code == 0 and "never run" in stdout
    assert "tunesmith convert xtuner-config ./internlm_chat_7b_qlora_oasst1_e3_copy.py" in stdout
