"""The DeepSpeed glue: the ring as a ``PipelineModule`` (``module``), its instructions
(``instructions``), the engine (``engine``), its point-to-point channel (``p2p``), the in-flight
state in checkpoints (``checkpoint``), DeepSpeed's own schedules with the same dropout keys
(``baseline``) and ``initialize`` (``launch``). Imports DeepSpeed, ``core``, ``models`` and
``ring``; not the training application or the tools."""
