"""Tools with their own command line: the benchmark (``bench``), the (G, M) speed map
(``speed_map``), DeepSpeed's schedules simulated (``rivals``), the one-GPU check (``gpu_check``),
loss curves (``plot``). They may import everything; nothing in the library imports them."""
