"""The server never trusts the client: the shared request checks, one bad request in a dynamic
batch, and a bounded fuzz run (loopback only, fixed count and time cap) against a real server."""

import http.client
import json
import secrets
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export" / "triton_models"))
from diffugts_validation import InputSpec, RequestError, check_array, input_specs  # noqa: E402

FUZZ_CASES = 500
FUZZ_SECONDS = 120.0
MODELS = ("text_tokenizer", "text_encoder", "vae_encoder_aova", "unet", "vae_decoder", "residual_head",
          "encode_aova", "score", "diffugts_pipeline")


def spec(dims, dtype=np.float32, limits=None, batched=True):
    return InputSpec("x", np.dtype(dtype), list(dims), limits or [8 if d == -1 else d for d in dims], batched)


@pytest.mark.parametrize("array, message", [
    (np.zeros((1, 4, 8), np.float64), "dtype float64, expected float32"),
    (np.zeros((1, 4), np.float32), r"shape \[1, 4\], expected \[batch\] \+ \[4, -1\]"),
    (np.zeros((1, 3, 8), np.float32), "shape"),
    (np.zeros((1, 4, 9), np.float32), "at most"),
    (np.zeros((1, 4, 0), np.float32), "empty"),
    (np.full((1, 4, 2), np.inf, np.float32), "NaN or Inf"),
    (np.zeros((9, 4, 2), np.float32), "batch 9, more than 8"),
])
def test_check_array_refuses(array, message):
    with pytest.raises(RequestError, match=message):
        check_array(spec((4, -1)), array, max_batch=8)


def test_check_array_strings_and_sound_input():
    strings = spec((-1,), np.object_)
    with pytest.raises(RequestError, match="not valid UTF-8"):
        check_array(strings, np.array([[b"ok", b"\xff\xfe"]], dtype=np.object_))
    with pytest.raises(RequestError, match="longer than"):
        check_array(strings, np.array([[b"a" * 5000]], dtype=np.object_))
    with pytest.raises(RequestError, match="holds a int"):
        check_array(strings, np.array([[3]], dtype=np.object_))
    sound = np.ones((2, 4, 8), np.float32)
    assert check_array(spec((4, -1)), sound, max_batch=8) is sound


def test_limits_come_from_the_config(tiny_repository):
    from diffugts.export.repository import MAX_PROMPTS, parse_config
    from google.protobuf.json_format import MessageToDict

    for name, expected in (("unet", {"latent": [4, 8, 8, 8], "timestep": [1]}),
                           ("text_tokenizer", {"prompts": [MAX_PROMPTS]})):
        config = MessageToDict(parse_config(tiny_repository / name / "config.pbtxt"), preserving_proto_field_name=True)
        specs = {s.name: s for s in input_specs(config)}
        assert {k: list(v.limits) for k, v in specs.items()} == expected
        assert (tiny_repository / name / "1" / "diffugts_validation.py").is_file()


# ---------------------------------------------------------------- a real server, loopback, with a token


@pytest.fixture(scope="module")
def guarded(tiny_repository, tmp_path_factory):
    from diffugts.serve import TritonServer
    from diffugts.server_security import ServerSecurity

    log = tmp_path_factory.mktemp("fuzzlog") / "tritonserver.log"
    security = ServerSecurity(token=secrets.token_urlsafe(24))
    with TritonServer(tiny_repository, grpc_port=0, http_port=0, metrics_port=0, log_path=log,
                      security=security) as server:
        yield server


def grpc_headers(server):
    return {"triton-grpc-protocol-diffugts-token": server.security.token}


def http_headers(server):
    return {"diffugts-token": server.security.token}


def grpc_inputs(arrays):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def ready(server) -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def test_one_bad_request_in_a_dynamic_batch_fails_alone(guarded, tiny_repository):
    """16 alternating sound / NaN UNet requests, sent at once: Triton batches them (the statistics
    show executions of several requests), every NaN one gets its error, every sound one its result."""
    import tritonclient.grpc as grpcclient

    from diffugts.executors.onnx_executor import OnnxExecutor

    client = grpcclient.InferenceServerClient(guarded.grpc_url)
    rng = np.random.default_rng(3)
    latents = [rng.standard_normal((1, 4, 8, 8, 8)).astype(np.float32) for _ in range(16)]
    for latent in latents[1::2]:
        latent[0, 1, 2, 3, 4] = np.nan
    results = {}
    for i, latent in enumerate(latents):
        client.async_infer("unet", grpc_inputs({"latent": latent, "timestep": np.array([[300.0]], np.float32)}),
                           lambda result, error, i=i: results.__setitem__(i, (result, error)),
                           headers=grpc_headers(guarded), client_timeout=120)
    deadline = time.monotonic() + 120
    while len(results) < len(latents) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(results) == len(latents)
    local = OnnxExecutor.from_repository(tiny_repository)
    for i, latent in enumerate(latents):
        result, error = results[i]
        if i % 2:
            assert result is None and "input latent has NaN or Inf values" in str(error)
        else:
            assert error is None, error
            expected = local.unet(latent, 300.0).prediction
            np.testing.assert_allclose(result.as_numpy("prediction"), expected, rtol=1e-4, atol=1e-5)
    stats = client.get_inference_statistics("unet", headers=grpc_headers(guarded), as_json=True)["model_stats"][0]
    assert max(int(b["batch_size"]) for b in stats["batch_stats"]) >= 2  # they did share an execute()
    client.close()
    assert ready(guarded)


@pytest.mark.parametrize("model, arrays, message", [
    ("text_tokenizer", {"prompts": np.array([[b"\xc3\x28 bad"]], dtype=np.object_)}, "not valid UTF-8"),
    ("text_tokenizer", {"prompts": np.array([[b"x"] * 65], dtype=np.object_)}, "at most"),
    ("unet", {"latent": np.zeros((1, 4, 9, 8, 8), np.float32), "timestep": np.ones((1, 1), np.float32)}, "at most"),
    ("vae_encoder_aova", {"image": np.zeros((2, 1, 32, 32, 32), np.float32),
                          "prompt_embeddings": np.zeros((1, 6, 16), np.float32),
                          "abnormal": np.zeros((1, 6), np.float32)}, "batch size"),  # Triton itself, before us
    ("vae_decoder", {"latent": np.full((1, 4, 2, 2, 2), -np.inf, np.float32)}, "NaN or Inf"),
    ("diffugts_pipeline", {"volume": np.zeros((20, 20, 20), np.float32), "affine": np.eye(4),
                           "prompt": np.array([b"liver tumor"], dtype=np.object_),
                           "modality": np.array([b"PET"], dtype=np.object_),
                           "seed": np.array([0], np.int64), "crop": np.array([True])}, "modality must be CT or MR"),
    ("diffugts_pipeline", {"volume": np.zeros((2, 2, 2049), np.float32), "affine": np.eye(4),
                           "prompt": np.array([b"liver tumor"], dtype=np.object_),
                           "modality": np.array([b"CT"], dtype=np.object_),
                           "seed": np.array([0], np.int64), "crop": np.array([True])}, "at most"),
])
def test_each_model_refuses_a_bad_request_and_stays_live(guarded, model, arrays, message):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(guarded.grpc_url)
    with pytest.raises(InferenceServerException, match=message):
        client.infer(model, grpc_inputs(arrays), headers=grpc_headers(guarded), client_timeout=60)
    assert client.is_model_ready(model, headers=grpc_headers(guarded))
    client.close()


# ---------------------------------------------------------------- fuzz

class Fuzzer:
    """Malformed requests of many kinds; each one must get an answer (or, for a body shorter than
    it claims, a closed or timed-out connection), never a crash."""

    def __init__(self, server, seed=2026):
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.server, self.rng = server, np.random.default_rng(seed)
        self.grpc = grpcclient.InferenceServerClient(server.grpc_url)
        self.http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=30)
        self.kinds = [self.wrong_model, self.wrong_names, self.wrong_dtype, self.wrong_shape, self.non_finite,
                      self.garbage_strings, self.http_wrong, self.raw_http, self.raw_grpc_bytes, self.huge_dims,
                      self.raw_tcp, self.pipeline_garbage]
        self.counts: dict[str, int] = {}

    def random_array(self, dtype=None, max_rank=6):
        dtype = dtype or self.rng.choice([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_, np.float16])
        shape = tuple(int(d) for d in self.rng.integers(1, 7, self.rng.integers(1, max_rank + 1)))
        return (self.rng.standard_normal(shape) * 100).astype(dtype)

    def send(self, model, arrays, grpc=True):
        from tritonclient.utils import InferenceServerException

        try:
            if grpc:
                self.grpc.infer(model, grpc_inputs(arrays), headers=grpc_headers(self.server), client_timeout=60)
            else:
                import tritonclient.http as httpclient
                from tritonclient.utils import np_to_triton_dtype

                inputs = []
                for name, array in arrays.items():
                    tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                    tensor.set_data_from_numpy(array, binary_data=bool(self.rng.integers(2)))
                    inputs.append(tensor)
                self.http.infer(model, inputs, headers=http_headers(self.server))
            return "answered"
        except InferenceServerException as exc:
            assert "DEADLINE" not in str(exc.status()), f"{model}: no answer in time"
            return "refused"

    def wrong_model(self):
        name = "".join(self.rng.choice(list("abcxyz_-./%0"), int(self.rng.integers(1, 40))))
        return self.send(name, {"x": self.random_array()}, grpc=bool(self.rng.integers(2)))

    def wrong_names(self):
        model = str(self.rng.choice(MODELS))
        return self.send(model, {f"in_{self.rng.integers(99)}": self.random_array()}, grpc=bool(self.rng.integers(2)))

    def wrong_dtype(self):
        model, inputs = self.sound_inputs()
        name = str(self.rng.choice(list(inputs)))
        dtype = self.rng.choice([np.float64, np.int32, np.uint8, np.float16])
        array = inputs[name]
        inputs[name] = np.ones(array.shape, dtype) if array.dtype == np.object_ else array.astype(dtype)
        return self.send(model, inputs, grpc=bool(self.rng.integers(2)))

    def wrong_shape(self):
        model, inputs = self.sound_inputs()
        name = str(self.rng.choice(list(inputs)))
        inputs[name] = self.random_array(inputs[name].dtype if inputs[name].dtype != np.object_ else np.float32)
        return self.send(model, inputs, grpc=bool(self.rng.integers(2)))

    def non_finite(self):
        model, inputs = self.sound_inputs(floats_only=True)
        array = inputs[str(self.rng.choice([k for k, v in inputs.items() if v.dtype.kind == "f"]))]
        array.reshape(-1)[self.rng.integers(array.size)] = self.rng.choice([np.nan, np.inf, -np.inf])
        return self.send(model, inputs, grpc=bool(self.rng.integers(2)))

    def garbage_strings(self):
        n = int(self.rng.integers(1, 80))
        prompts = [bytes(self.rng.integers(0, 256, int(self.rng.integers(0, 300)), dtype=np.uint8)) for _ in range(n)]
        return self.send("text_tokenizer", {"prompts": np.array([prompts], dtype=np.object_)},
                         grpc=bool(self.rng.integers(2)))

    def http_wrong(self):
        """Well-formed HTTP with wrong JSON: bad types, shapes that disagree with the data."""
        body = json.dumps({"inputs": [{"name": "latent", "datatype": str(self.rng.choice(["FP32", "INT8", "BYTES", "??"])),
                                       "shape": [int(d) for d in self.rng.integers(-2, 9, int(self.rng.integers(0, 6)))],
                                       "data": [float(v) for v in self.rng.standard_normal(int(self.rng.integers(0, 50)))]}]})
        return self.raw_http_request(f"/v2/models/{self.rng.choice(MODELS)}/infer", body.encode())

    def raw_http(self):
        """Truncated, garbage or lying bodies on the infer route."""
        base = json.dumps({"inputs": [{"name": "timestep", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}).encode()
        choice = int(self.rng.integers(4))
        extra = {}
        if choice == 0:
            body = base[: int(self.rng.integers(1, len(base)))]  # truncated JSON
        elif choice == 1:
            body = bytes(self.rng.integers(0, 256, int(self.rng.integers(1, 4000)), dtype=np.uint8))
        elif choice == 2:  # a binary-tensor header whose length lies
            body = base + bytes(int(self.rng.integers(0, 64)))
            extra = {"Inference-Header-Content-Length": str(int(self.rng.integers(0, 10**6)))}
        else:  # Content-Length larger than the body: the server waits for the rest, we hang up
            return self.raw_http_request("/v2/models/unet/infer", base, content_length=len(base) + 1000)
        return self.raw_http_request(f"/v2/models/{self.rng.choice(MODELS)}/infer", body, extra)

    def raw_http_request(self, path, body, extra=None, content_length=None):
        # a body shorter than its Content-Length leaves the server waiting: hang up after 2 s
        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=2 if content_length else 30)
        try:
            conn.putrequest("POST", path)
            headers = {"Content-Type": "application/octet-stream", **http_headers(self.server), **(extra or {})}
            headers["Content-Length"] = str(content_length if content_length is not None else len(body))
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            conn.send(body)
            response = conn.getresponse()
            response.read()
            return "answered" if response.status == 200 else "refused"
        except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException):
            return "hung up"
        finally:
            conn.close()

    def raw_grpc_bytes(self):
        """Garbage protobuf bytes on the ModelInfer method."""
        import grpc

        with grpc.insecure_channel(self.server.grpc_url) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
            body = bytes(self.rng.integers(0, 256, int(self.rng.integers(1, 3000)), dtype=np.uint8))
            try:
                call(body, timeout=30, metadata=tuple(grpc_headers(self.server).items()))
                return "answered"
            except grpc.RpcError as exc:
                assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
                return "refused"

    def huge_dims(self):
        """A well-formed ModelInfer whose declared shape is enormous and whose data is tiny."""
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        model = str(self.rng.choice(["unet", "vae_decoder", "text_tokenizer", "diffugts_pipeline"]))
        request = service_pb2.ModelInferRequest(model_name=model)
        for name in ("latent", "timestep", "prompts", "volume"):
            tensor = request.inputs.add(name=name, datatype=str(self.rng.choice(["FP32", "BYTES"])))
            tensor.shape.extend([int(d) for d in self.rng.choice([1, 4, 2**31 - 1, 2**40, 2**62], 5)])
            request.raw_input_contents.append(bytes(int(self.rng.integers(0, 256))))
        with grpc.insecure_channel(self.server.grpc_url) as channel:
            try:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    request, timeout=30, metadata=tuple(grpc_headers(self.server).items()))
                return "answered"
            except grpc.RpcError as exc:
                assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
                return "refused"

    def raw_tcp(self):
        """Bytes that are not HTTP/2 (gRPC port) or not HTTP (HTTP port)."""
        port = self.server.grpc_port if self.rng.integers(2) else self.server.http_port
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(bytes(self.rng.integers(0, 256, int(self.rng.integers(1, 5000)), dtype=np.uint8)))
            try:
                s.recv(1024)
            except (socket.timeout, ConnectionError):
                pass
        return "hung up"

    def pipeline_garbage(self):
        shape = tuple(int(d) for d in self.rng.integers(1, 24, int(self.rng.integers(1, 5))))
        volume = self.rng.standard_normal(shape).astype(np.float32)
        if self.rng.integers(2):
            volume.reshape(-1)[0] = np.nan
        inputs = {"volume": volume, "affine": self.rng.standard_normal((4, 4)) * self.rng.choice([0, 1, np.inf]),
                  "prompt": np.array([bytes(self.rng.integers(0, 256, int(self.rng.integers(0, 30)), dtype=np.uint8))],
                                     dtype=np.object_),
                  "modality": np.array([self.rng.choice([b"CT", b"MR", b"", b"\xff", b"US"])], dtype=np.object_),
                  "seed": np.array([int(self.rng.integers(-2**62, 2**62))], np.int64), "crop": np.array([True])}
        return self.send("diffugts_pipeline", inputs, grpc=bool(self.rng.integers(2)))

    def sound_inputs(self, floats_only=False):
        choices = {
            "unet": {"latent": self.rng.standard_normal((1, 4, 8, 8, 8)).astype(np.float32),
                     "timestep": np.array([[500.0]], np.float32)},
            "vae_decoder": {"latent": self.rng.standard_normal((1, 4, 2, 2, 2)).astype(np.float32)},
            "text_tokenizer": {"prompts": np.array([[b"a CT scan of a kidney"]], dtype=np.object_)},
            "text_encoder": {"input_ids": np.ones((1, 2, 64), np.int64), "attention_mask": np.ones((1, 2, 64), np.int64)},
        }
        if floats_only:
            choices = {m: a for m, a in choices.items() if any(v.dtype.kind == "f" for v in a.values())}
        model = str(self.rng.choice(list(choices)))
        return model, choices[model]

    def run(self, cases, seconds, check_every=10):
        start = time.monotonic()
        readiness = []
        done = 0
        for done in range(1, cases + 1):
            kind = self.kinds[int(self.rng.integers(len(self.kinds)))]
            outcome = kind()
            key = f"{kind.__name__}:{outcome}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if done % check_every == 0:
                readiness.append(ready(self.server))
            if time.monotonic() - start > seconds:
                break
        self.grpc.close()
        self.http.close()
        return done, readiness, time.monotonic() - start


def test_fuzz_the_server_on_loopback(guarded, tiny_repository, tmp_path):
    import tritonclient.grpc as grpcclient

    assert guarded.host == "127.0.0.1"  # loopback only
    client = grpcclient.InferenceServerClient(guarded.grpc_url)
    latent = np.random.default_rng(0).standard_normal((1, 4, 8, 8, 8)).astype(np.float32)
    probe = grpc_inputs({"latent": latent, "timestep": np.array([[300.0]], np.float32)})
    before = client.infer("unet", probe, headers=grpc_headers(guarded)).as_numpy("prediction")
    rss_before = guarded.rss_bytes()

    fuzzer = Fuzzer(guarded)
    sent, readiness, seconds = fuzzer.run(FUZZ_CASES, FUZZ_SECONDS)

    rss_after = guarded.rss_bytes()
    report = {"requests": sent, "seconds": round(seconds, 1), "outcomes": dict(sorted(fuzzer.counts.items())),
              "readiness_checks": len(readiness), "ready_every_time": all(readiness),
              "server_rss_mb_before": round(rss_before / 2**20, 1), "server_rss_mb_after": round(rss_after / 2**20, 1),
              "server_rss_growth_mb": round((rss_after - rss_before) / 2**20, 1)}
    print("fuzz report:", json.dumps(report))
    (tmp_path / "fuzz_report.json").write_text(json.dumps(report, indent=2))

    assert guarded.process.poll() is None, "tritonserver died"
    assert sent >= 40 and readiness and all(readiness)
    assert len({k.split(":")[0] for k in fuzzer.counts}) == len(fuzzer.kinds)  # every kind was sent
    always_wrong = ("wrong_model", "wrong_names", "wrong_dtype", "non_finite", "huge_dims", "raw_grpc_bytes")
    assert not [k for k in fuzzer.counts if k.split(":")[0] in always_wrong and k.endswith(":answered")]
    for model in MODELS:
        assert client.is_model_ready(model, headers=grpc_headers(guarded)), model
    after = client.infer("unet", probe, headers=grpc_headers(guarded)).as_numpy("prediction")
    np.testing.assert_array_equal(after, before)  # still serving, and the same answer
    log = Path(guarded.log_path).read_text(errors="replace")
    assert "Stub process" not in log or "unhealthy" not in log, "a backend stub crashed"
    assert rss_after > 0
    client.close()
