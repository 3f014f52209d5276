"""Compiling for GPUs and TPUs that are not here (the `aot` extra): named compile-only targets
(`targets`), the kernel's compile matrix (`kernel_matrix`) and the GPU target configs (`gpu_specs/`).

A tool beside the trainer, not part of it: no trainer module imports this package. `--mode=check
--config.target=...` reaches it through the preflight, which hands the target's devices to `setup`.
"""
