"""The ring's update rules, shared by the DeepSpeed engine and the single-process Reference: the
warm-up rule (``warmup``), the per-stage clip and optimizer groups (``optim``), delay-scaled
learning rates (``staleness``), stash replay, weight prediction and the look-ahead (``stash``), the
memory-bounded replay plan (``memory``) and the Reference itself (``reference``). Imports torch,
``core`` and ``models``; never DeepSpeed."""
