"""ONNX Runtime in process, over the same exported repository the server loads."""

from __future__ import annotations

from pathlib import Path

from diffugts.client.executor import RepositoryExecutor
from diffugts.client.transports import OrtTransport


class OnnxExecutor(RepositoryExecutor):
    @classmethod
    def from_repository(cls, repository: str | Path | None = None, preset_name: str = "demo",
                        weights: str | None = None, threads: int = 0) -> "OnnxExecutor":
        from diffugts.export import DEFAULT_REPOSITORY, build_repository, is_repository, read_preset

        repository = Path(repository or DEFAULT_REPOSITORY)
        if not is_repository(repository):  # exporting needs the [models] extra
            build_repository(repository, preset_name, weights)
        return cls(OrtTransport(repository, threads), read_preset(repository))
