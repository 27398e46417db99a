"""The training application behind ``train.py``: typed options and their checks (``config``),
data (``data``), Hugging Face load and export (``hf``), metrics and wandb (``runlog``), stop
agreement and watchdog (``resilience``), and the ``Trainer`` (``trainer``). May import every
library layer; nothing in the library imports it."""
