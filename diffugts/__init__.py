"""diffugts: DiffuGTS zero-shot tumor segmentation as an inference service.

The package root imports nothing heavy: the loop, schedulers, I/O and the Triton client
run without torch; `diffugts.models` and `diffugts.executors.torch_executor` need `[models]`.
"""

__version__ = "0.1.0"
