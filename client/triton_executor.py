"""Triton over gRPC: the client loop (`TritonExecutor`) and the in-server loop (`BlsClient`)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from diffugts.config import Preset
from diffugts.io import Volume
from diffugts.notices import CAUTION
from diffugts.organ_regions import target_organ
from diffugts.pipeline import LoopOptions, Segmentation
from diffugts.prompts import build_prompt_set, normalize_target, spelt_out

from .executor import RepositoryExecutor
from .transports import GrpcTransport, TritonError

PIPELINE_MODEL = "diffugts_pipeline"


def remote_preset(transport: GrpcTransport, config=None) -> Preset:
    """The preset the pipeline model serves (from its config, read here unless given)."""
    config = transport.model_config(PIPELINE_MODEL) if config is None else config
    return Preset.from_dict(json.loads(config.parameters["preset"].string_value))


def remote_identity(transport: GrpcTransport) -> dict:
    """What the endpoint serves: the preset and the export's checksum of every stage's graph
    (older repositories carry no checksum; then the preset alone says what is served)."""
    params = transport.model_config(PIPELINE_MODEL).parameters
    preset = json.loads(params["preset"].string_value)
    checksum = params["model_sha256"].string_value if "model_sha256" in params else ""
    return {"preset": preset.get("name", ""), "model_sha256": checksum or None,
            "preset_sha256": hashlib.sha256(json.dumps(preset, sort_keys=True).encode()).hexdigest()}


class TritonExecutor(RepositoryExecutor):
    """Each stage call is one gRPC request; the loop runs here, in the client."""

    def __init__(self, url: str = "127.0.0.1:8001", shared_memory: bool = False, timeout_s: float = 300.0,
                 token: str | None = None, root_certificates: str | None = None):
        transport = GrpcTransport(url, timeout_s, token=token, root_certificates=root_certificates)
        preset = remote_preset(transport)
        transport.preset, transport.shared_memory = preset, shared_memory
        super().__init__(transport, preset)

    def close(self) -> None:
        self.transport.close()


class BlsClient:
    """One request per volume: the loop runs inside the server (the `diffugts_pipeline` model)."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout_s: float = 600.0, token: str | None = None,
                 root_certificates: str | None = None):
        self.transport = GrpcTransport(url, timeout_s, token=token, root_certificates=root_certificates)
        config = self.transport.model_config(PIPELINE_MODEL)
        self.preset = remote_preset(self.transport, config)
        # a repository exported before the loop reported notices has no such output
        self.outputs = ["mask", "anomaly", "timings"] + [o.name for o in config.output if o.name == "notices"]
        # nor an 'organ' input: such a server never restricts to the organ (as --whole-scan)
        self.takes_organ = any(i.name == "organ" for i in config.input)
        self.takes_all_components = any(i.name == "all_components" for i in config.input)

    def segment_volume(self, volume: Volume, target: str, modality: str | None = None,
                       options: LoopOptions | None = None) -> Segmentation:
        options = options or LoopOptions()
        target = normalize_target(target)  # validated here and again in the server
        inputs = {
            "volume": np.ascontiguousarray(volume.array, np.float32),
            "affine": np.asarray(volume.affine, np.float64),
            "prompt": np.array([target.encode()], dtype=np.object_),
            "modality": np.array([(modality or "").encode()], dtype=np.object_),
            "seed": np.array([options.seed], np.int64),
            "crop": np.array([options.crop], bool),
        }
        if self.takes_organ:
            inputs["organ"] = np.array([options.organ], bool)
        if options.all_components:
            if not self.takes_all_components:  # refused rather than a mask that silently keeps fewer
                raise TritonError("this server's pipeline model was exported before all_components: it would keep "
                                  "one component per lesion; re-export the repository to keep them all")
            inputs["all_components"] = np.array([True], bool)
        out = self.transport.infer(PIPELINE_MODEL, inputs, self.outputs)
        timings = json.loads(out["timings"][0])
        notices = tuple(json.loads(out["notices"][0])) if "notices" in out else ()
        if options.organ and not self.takes_organ and target_organ(spelt_out(target)):
            notices += (f"{CAUTION}this server's pipeline model was exported before the organ restriction, so the maps "
                        "cover the whole scan; re-export the repository to restrict them",)
        used = (modality or "CT").upper()
        # the BLS model returns the mask and the anomaly map only: no probability, no healthy volume
        return Segmentation(out["mask"], None, out["anomaly"], None, used, build_prompt_set(target, used), timings,
                            notices=notices, components=None)

    def close(self) -> None:
        self.transport.close()
