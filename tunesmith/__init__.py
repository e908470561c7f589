"""tunesmith: fine-tune large language models with an XTuner-style workflow."""

__version__ = "0.1.0"

from tunesmith.errors import TunesmithError

__all__ = ["TunesmithError", "__version__"]
