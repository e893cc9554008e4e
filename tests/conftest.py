import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models():
    from diffugts.config import get_preset
    from diffugts.models import build_models

    return build_models(get_preset("tiny"), seed=0)


@pytest.fixture(scope="session")
def torch_executor(tiny_models):
    from diffugts.executors.torch_executor import TorchExecutor

    return TorchExecutor(tiny_models)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    from diffugts.phantom import write_dataset

    out = tmp_path_factory.mktemp("phantoms")
    return write_dataset(out, 4, seed=7, categories=["kidney tumor", "liver cyst", "brain tumor", "lung nodule"],
                         shape=(40, 36, 32), spacing=4.0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory, tiny_models):
    """The tiny preset exported with the same weights as `torch_executor`."""
    from diffugts.export.onnx_export import export_onnx
    from diffugts.export.repository import write_repository

    out = tmp_path_factory.mktemp("repo") / "model_repository"
    export_onnx(tiny_models, out)
    return write_repository(out, tiny_models.preset, "python-ort", out)


@pytest.fixture(scope="session")
def triton_server(tiny_repository, tmp_path_factory):
    from diffugts.serve import TritonServer

    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(tiny_repository, grpc_port=0, http_port=0, metrics_port=0, log_path=log) as server:
        yield server
