"""The thin client: the stage executor over a Triton model repository, and its transports.

Nothing here imports torch: `diffugts segment --backend triton` runs with the bare install.
"""
