"""A real tritonserver on free loopback ports: the client loop, BLS and ONNX Runtime agree
with the torch reference; endpoints, validation on the server side, torch-free client, failures."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from diffugts.client.transports import TritonError
from diffugts.client.triton_executor import BlsClient, TritonExecutor
from diffugts.executors.onnx_executor import OnnxExecutor
from diffugts.io import read_volume
from diffugts.metrics import dice
from diffugts.phantom import write_dataset
from diffugts.pipeline import LoopOptions, run_segmentation, segment_volume
from diffugts.prompts import build_prompt_set

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """Volumes no other test used: other seed, categories, shapes and spacing."""
    out = tmp_path_factory.mktemp("unseen")
    write_dataset(out, 3, seed=99, categories=["pancreas tumor", "liver metastasis", "spleen lesion"],
                  shape=(44, 40, 30), spacing=3.5)
    return [read_volume(p) for p in sorted((out / "imagesTs").glob("*.nii.gz"))], \
        ["pancreas tumor", "liver metastasis", "spleen lesion"]


@pytest.fixture(scope="module")
def reference(torch_executor, unseen):
    volumes, prompts = unseen
    return [segment_volume(torch_executor, v, p) for v, p in zip(volumes, prompts)]


def relative(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def test_stage_outputs_match_torch(triton_server, torch_executor, rng):
    remote = TritonExecutor(triton_server.grpc_url)
    prompts = build_prompt_set("kidney tumor", "CT")
    image = rng.random((1, 1, 32, 32, 32), dtype=np.float32)
    ours, ref = remote.encode(image, prompts), torch_executor.encode(image, prompts)
    assert relative(ours.latent, ref.latent) < 1e-3
    assert relative(ours.anomaly, ref.anomaly) < 1e-3
    cached = remote.encode(image, prompts)  # second call: cached embeddings, vae_encoder_aova only
    np.testing.assert_allclose(cached.latent, ours.latent, rtol=1e-6)
    crop = rng.standard_normal((1, 4, 4, 8, 4)).astype(np.float32)
    a, b = remote.unet(crop, 300.0), torch_executor.unet(crop, 300.0)
    assert relative(a.prediction, b.prediction) < 1e-3 and relative(a.attention, b.attention) < 1e-3
    # an inpainting step asks for the prediction alone (the attention is 1 MB a step at the demo size)
    asked, infer = [], remote.transport.infer
    remote.transport.infer = lambda model, inputs, outputs: asked.append(outputs) or infer(model, inputs, outputs)
    step = remote.unet(crop, 300.0, attention=False)
    assert asked == [["prediction"]] and step.attention is None
    np.testing.assert_array_equal(step.prediction, a.prediction)
    remote.close()


@pytest.mark.parametrize("backend", ["triton", "triton-shm", "triton-bls", "onnx"])
def test_masks_agree_with_torch(backend, triton_server, tiny_repository, unseen, reference):
    if backend == "onnx":
        executor = OnnxExecutor.from_repository(tiny_repository)
    elif backend == "triton-bls":
        executor = BlsClient(triton_server.grpc_url)
    else:
        executor = TritonExecutor(triton_server.grpc_url, shared_memory=backend == "triton-shm")
    volumes, prompts = unseen
    for volume, prompt, ref in zip(volumes, prompts, reference):
        seg = run_segmentation(executor, volume, prompt)
        assert seg.mask.shape == volume.array.shape
        assert ref.mask.any()  # a non-trivial comparison
        assert dice(seg.mask, ref.mask) >= 0.99
        assert relative(seg.anomaly, ref.anomaly) < 1e-3
        assert seg.timings["total"] > 0 and "inpaint" in seg.timings
        assert seg.notices == ref.notices
    if hasattr(executor, "close"):
        executor.close()


def test_health_metrics_and_statistics(triton_server):
    base = f"http://{triton_server.host}:{triton_server.http_port}"
    assert urllib.request.urlopen(f"{base}/v2/health/ready").status == 200
    assert urllib.request.urlopen(f"{base}/v2/models/unet/ready").status == 200
    TritonExecutor(triton_server.grpc_url).unet(np.zeros((1, 4, 8, 8, 8), np.float32), 10.0)
    metrics = urllib.request.urlopen(f"http://{triton_server.host}:{triton_server.metrics_port}/metrics").read().decode()
    assert "nv_inference_request_success" in metrics
    # the statistics API needs a token (tests/test_server_security.py); Prometheus has the counts
    unet = [line for line in metrics.splitlines() if line.startswith('nv_inference_count{model="unet"')]
    assert unet and float(unet[0].split()[-1]) >= 1


def test_server_validates_inputs(triton_server, rng):
    remote = TritonExecutor(triton_server.grpc_url)
    image = rng.random((1, 1, 32, 32, 32), dtype=np.float32)
    image[0, 0, 1, 2, 3] = np.nan
    with pytest.raises(TritonError, match="NaN or Inf"):
        remote.transport.infer("vae_encoder_aova", {
            "image": image, "prompt_embeddings": np.zeros((1, 6, 16), np.float32),
            "abnormal": np.zeros((1, 6), np.float32)}, ["latent"])
    with pytest.raises(TritonError, match="empty prompt"):
        remote.transport.infer("text_tokenizer", {"prompts": np.array([[b"  "]], dtype=np.object_)}, ["input_ids"])
    bls = BlsClient(triton_server.grpc_url)
    volume = rng.random((20, 20, 20), dtype=np.float32)
    with pytest.raises(TritonError, match="NaN or Inf"):
        bls.transport.infer("diffugts_pipeline", {
            "volume": np.where(volume > 0.5, np.inf, volume).astype(np.float32), "affine": np.eye(4),
            "prompt": np.array([b"liver tumor"], dtype=np.object_), "modality": np.array([b"CT"], dtype=np.object_),
            "seed": np.array([0], np.int64), "crop": np.array([True])}, ["mask"])
    remote.close()


def test_client_runs_where_torch_cannot_be_imported(triton_server, phantom_dir, tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from diffugts.cli import main\n"
            f"rc = main(['segment', {str(phantom_dir / 'imagesTs' / 'case_002.nii.gz')!r}, '--prompt', 'brain tumor',"
            f" '--out', {str(tmp_path)!r}, '--backend', 'triton', '--url', {triton_server.grpc_url!r}])\n"
            "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "case_002_mask.nii.gz").is_file()
    timings = json.loads((tmp_path / "case_002_timings.json").read_text())
    assert timings["backend"] == "triton" and timings["seconds"]["inpaint"] >= 0
    # the tiny preset never skips inpainting; the brain prompt is kept to the phantom's brain
    (notice,) = timings["notices"]
    assert notice.startswith("the maps were restricted to the brain found in this scan")


def test_the_in_server_loop_reports_where_it_skipped_inpainting(tiny_repository, torch_executor, unseen, tmp_path):
    """The notice is made by the loop in the server and travels back with the mask (BLS)."""
    import copy
    import shutil

    from diffugts.export.repository import pipeline_config
    from diffugts.serve import TritonServer

    gated = torch_executor.preset.with_(anomaly_threshold=-1.0, inpaint_max_fraction=0.5)  # every voxel flagged
    repository = shutil.copytree(tiny_repository, tmp_path / "model_repository")
    (repository / "diffugts_pipeline" / "config.pbtxt").write_text(pipeline_config(gated))
    volume = unseen[0][0]
    eager_executor = copy.copy(torch_executor)  # the same networks, the loop settings of `gated`
    eager_executor.preset = gated
    eager = segment_volume(eager_executor, volume, "pancreas tumor")
    assert len(eager.notices) == 1 and "flagged more than 50%" in eager.notices[0]
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0, log_path=tmp_path / "gate.log") as server:
        client = BlsClient(server.grpc_url)
        served = client.segment_volume(volume, "pancreas tumor")
        client.close()
    assert served.notices == eager.notices
    assert dice(served.mask, eager.mask) >= 0.99 or not (served.mask.any() or eager.mask.any())


def test_the_in_server_loop_restricts_to_the_organ_unless_asked_not_to(triton_server, torch_executor):
    """The BLS model's optional 'organ' input: left out or true, the lungs; false, the whole scan."""
    from diffugts.corpus import _phantoms
    from diffugts.io import Volume

    (ct,) = _phantoms(n=1)
    volume = Volume(ct.image, ct.affine, ct.id)
    client = BlsClient(triton_server.grpc_url)
    assert client.takes_organ
    for organ in (True, False):
        eager = segment_volume(torch_executor, volume, "lung nodule", "CT", LoopOptions(organ=organ))
        served = client.segment_volume(volume, "lung nodule", "CT", LoopOptions(organ=organ))
        assert relative(served.anomaly, eager.anomaly) < 1e-3, organ
        assert dice(served.mask, eager.mask) >= 0.99 or not (served.mask.any() or eager.mask.any())
    restricted = client.segment_volume(volume, "lung nodule", "CT")
    whole = client.segment_volume(volume, "lung nodule", "CT", LoopOptions(organ=False))
    assert (restricted.anomaly == 0).sum() > (whole.anomaly == 0).sum()  # zero away from the lungs
    client.takes_organ = False  # a client that never sends the input: the server's default, restricted
    left_out = client.segment_volume(volume, "lung nodule", "CT")
    np.testing.assert_array_equal(left_out.anomaly, restricted.anomaly)
    # the same client believing the server predates the input says that it could not restrict
    assert left_out.notices[-1].startswith("caution: this server's pipeline model was exported before the organ restriction")
    client.close()


def test_the_in_server_loop_keeps_every_component_when_asked(tiny_repository, torch_executor, tmp_path):
    """The BLS model's optional 'all_components' input reaches the loop: served with a preset that
    keeps one component, the default mask is the eager one-component mask and the option's is the
    eager every-component mask, and they differ; a client that finds no such input refuses the
    option rather than return a mask that keeps fewer."""
    import copy
    import shutil

    from diffugts.corpus import _phantoms
    from diffugts.export.repository import pipeline_config
    from diffugts.io import Volume
    from diffugts.serve import TritonServer

    (ct,) = _phantoms(n=1)
    volume = Volume(ct.image, ct.affine, ct.id)
    probability = segment_volume(torch_executor, volume, "kidney tumor", "CT").probability
    threshold = float(np.quantile(probability, 0.97))  # random weights: several blobs above it
    one = torch_executor.preset.with_(top_k_components=1, min_component_mm3=0.0, mask_threshold=threshold)
    repository = shutil.copytree(tiny_repository, tmp_path / "model_repository")
    (repository / "diffugts_pipeline" / "config.pbtxt").write_text(pipeline_config(one))
    eager_executor = copy.copy(torch_executor)  # the same networks, the loop settings of `one`
    eager_executor.preset = one
    every = LoopOptions(all_components=True)
    eager = {keep_all: segment_volume(eager_executor, volume, "kidney tumor", "CT", LoopOptions(all_components=keep_all))
             for keep_all in (False, True)}
    assert eager[True].mask.sum() > eager[False].mask.sum() > 0  # a component was dropped, then kept
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0, log_path=tmp_path / "all.log") as server:
        client = BlsClient(server.grpc_url)
        assert client.takes_all_components
        for keep_all in (False, True):
            served = client.segment_volume(volume, "kidney tumor", "CT", LoopOptions(all_components=keep_all))
            assert dice(served.mask, eager[keep_all].mask) >= 0.99 and served.notices == eager[keep_all].notices
        client.takes_all_components = False
        with pytest.raises(TritonError, match="exported before all_components"):
            client.segment_volume(volume, "kidney tumor", "CT", every)
        client.close()


def test_killed_server_gives_a_clear_error_not_a_hang(tiny_repository, unseen, tmp_path):
    from diffugts.serve import TritonServer

    server = TritonServer(tiny_repository, grpc_port=0, http_port=0, metrics_port=0,
                          log_path=tmp_path / "doomed.log").start()
    client = BlsClient(server.grpc_url)
    volume = unseen[0][0]
    threading.Timer(0.5, lambda: os.killpg(server.process.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(TritonError, match="unreachable or stopped"):
        for _ in range(20):  # keeps the server busy until it dies
            client.segment_volume(volume, "pancreas tumor", options=LoopOptions())
    assert time.monotonic() - start < 60
    server.stop()


def test_serve_command_binds_loopback_and_stops_on_sigterm(tiny_repository, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "diffugts", "serve", "--repository", str(tiny_repository),
                             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
                             "--log", str(tmp_path / "serve.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "tritonserver ready: grpc 127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("grpc 127.0.0.1:")[1].split()[0])
        assert port > 0
        urllib.request.urlopen(line.split("metrics ")[1].split()[0]).read()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "tritonserver stopped" in out
    assert (tmp_path / "serve.log").read_text()
