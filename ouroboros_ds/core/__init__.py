"""The schedule as data: pure Python, imports neither torch nor DeepSpeed (nor anything else of
this package). The per-stage instruction lists of a step and their text form (``schedule``), the
partition arithmetic (``partition``), each rank's op stream under NCCL's point-to-point rules
(``nccl``), the validator (``validate``) and the simulator (``simulate``)."""
