"""Read an XTuner 0.x Python config without running it, and turn it into a tunesmith config.

The file is parsed with `ast`; nothing in it is executed, imported or evaluated. Its module-level assignments are
read in order as plain values (evaluate.py). Each setting is looked up in XTuner's PART 1 variables first, then in
the structures that use them (`model`, `train_dataset`, `optim_wrapper`, `custom_hooks`, ...) (lookup.py,
fields.py), and laid over the closest built-in recipe (mapping.py). What cannot be read keeps the recipe's value
and is said in the notes. convert.py checks the file, validates the result and writes the YAML.
"""

from __future__ import annotations

from tunesmith.config.xtuner.convert import (
    MAX_BYTES,
    XtunerConversion,
    convert_xtuner_config,
    convert_xtuner_file,
    read_xtuner_config,
)
from tunesmith.config.xtuner.lookup import Reading

__all__ = [
    "MAX_BYTES",
    "Reading",
    "XtunerConversion",
    "convert_xtuner_config",
    "convert_xtuner_file",
    "read_xtuner_config",
]
