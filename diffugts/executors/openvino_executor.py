"""OpenVINO in process, over the same exported repository the server loads (`--backend openvino`)."""

from __future__ import annotations

from pathlib import Path

from diffugts.client.executor import RepositoryExecutor
from diffugts.client.transports import OpenVinoTransport

from .onnx_executor import built_repository


class OpenVinoExecutor(RepositoryExecutor):
    @classmethod
    def from_repository(cls, repository: str | Path | None = None, preset_name: str = "demo",
                        weights: str | None = None, threads: int = 0,
                        precision: dict[str, str] | None = None) -> "OpenVinoExecutor":
        """`precision`: stage -> "int8" to run a quantized stage; None: as the stage configs say."""
        from diffugts.export import read_preset

        repository = built_repository(repository, preset_name, weights)
        return cls(OpenVinoTransport(repository, threads, precision), read_preset(repository))
