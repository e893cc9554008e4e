"""ONNX Runtime in process, over the same exported repository the server loads."""

from __future__ import annotations

from pathlib import Path

from diffugts.client.executor import RepositoryExecutor
from diffugts.client.transports import LocalTransport, OrtTransport


def built_repository(repository: str | Path | None, preset_name: str, weights: str | None) -> Path:
    """The repository, exported first if it is not there (exporting needs the [models] extra)."""
    from diffugts.export import DEFAULT_REPOSITORY, build_repository, is_repository

    repository = Path(repository or DEFAULT_REPOSITORY)
    if not is_repository(repository):
        build_repository(repository, preset_name, weights)
    return repository


class OnnxExecutor(RepositoryExecutor):
    @classmethod
    def from_repository(cls, repository: str | Path | None = None, preset_name: str = "demo",
                        weights: str | None = None, threads: int = 0) -> "OnnxExecutor":
        from diffugts.export import read_preset

        repository = built_repository(repository, preset_name, weights)
        return cls(OrtTransport(repository, threads), read_preset(repository))


class ExportedRuntimeExecutor(RepositoryExecutor):
    """Each stage in the runtime (and precision) its config names: what the server runs, in process."""

    @classmethod
    def from_repository(cls, repository: str | Path | None = None, preset_name: str = "demo",
                        weights: str | None = None, threads: int = 0) -> "ExportedRuntimeExecutor":
        from diffugts.export import read_preset

        repository = built_repository(repository, preset_name, weights)
        return cls(LocalTransport(repository, threads, engine=None), read_preset(repository))
