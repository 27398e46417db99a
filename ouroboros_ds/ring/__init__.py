"""The ring's options and its update rules, shared by the DeepSpeed engine and the single-process
Reference: the options with their defaults and every check (``config``: ``RingConfig``), the
warm-up rule (``warmup``), the per-stage clip and optimizer groups (``optim``), delay-scaled
learning rates (``staleness``), stash replay (``stash``), weight prediction and the look-ahead
(``prediction``), the memory-bounded replay plan (``memory``) with its activation counter
(``saved_bytes``), and the Reference itself (``reference``). Imports torch, ``core`` and
``models``; never DeepSpeed."""
