"""Stage executors: one small interface, implementations for torch, ONNX Runtime, OpenVINO and Triton."""

from .base import Denoised, Encoded, StageExecutor

__all__ = ["Denoised", "Encoded", "StageExecutor", "make_executor"]


def make_executor(backend: str, preset_name: str = "tiny", weights: str | None = None,
                  url: str | None = None, repository: str | None = None, shared_memory: bool = False):
    """Build the executor for a backend name; heavy imports happen only for the chosen one."""
    if backend == "torch":
        from .torch_executor import TorchExecutor

        return TorchExecutor.from_preset(preset_name, weights)
    if backend == "onnx":
        from .onnx_executor import OnnxExecutor

        return OnnxExecutor.from_repository(repository, preset_name, weights)
    if backend == "openvino":
        from .openvino_executor import OpenVinoExecutor

        return OpenVinoExecutor.from_repository(repository, preset_name, weights)
    if backend == "triton":
        from diffugts.client.triton_executor import TritonExecutor

        return TritonExecutor(url or "127.0.0.1:8001", shared_memory=shared_memory)
    if backend == "triton-bls":
        from diffugts.client.triton_executor import BlsClient

        return BlsClient(url or "127.0.0.1:8001")
    raise ValueError(f"unknown backend {backend!r}: torch, onnx, openvino, triton or triton-bls")
