"""Plain LoRA prints nothing from bitsandbytes: peft imports it whenever it is installed, and on an AVX512-BF16 CPU
its import logs that an optional hub kernel could not be fetched (models/quantize.py drops that one message)."""

from __future__ import annotations

import logging
import subprocess
import sys

from tests.timeouts import TIMEOUT
from tunesmith.models.quantize import KERNELS_HUB_NOTICE

LORA_SCRIPT = """
import sys
from tunesmith.config import TrainConfig
from tunesmith.models import load_model, prepare_for_training

model = prepare_for_training(load_model(sys.argv[1], dtype="fp32"), TrainConfig(method="lora"))
print("lora layers", sum("lora_A" in n for n, _ in model.named_parameters()))
"""


def test_lora_setup_prints_no_kernels_notice(tiny_llama):
    """In a fresh interpreter, the way `tunesmith train` reaches peft (on CPUs without AVX512-BF16 bitsandbytes
    never says it; the next test covers the filter itself there)."""
    run = subprocess.run([sys.executable, "-c", LORA_SCRIPT, str(tiny_llama)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "lora layers 14" in run.stdout
    assert "gemm_4bit_forward" not in run.stderr and "kernels-community" not in run.stderr, run.stderr[-2000:]


def test_only_that_notice_is_dropped(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the logger bitsandbytes writes it to
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning(KERNELS_HUB_NOTICE + ": %s. Please make sure you already `pip install kernels`", "No module")
        log.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
