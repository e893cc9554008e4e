"""Authentication and transport security of `diffugts serve`: the token file, Triton's restricted
APIs over gRPC and HTTP, gRPC TLS with a certificate made here, and refusals before anything starts."""

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from diffugts.server_security import (
    GRPC_TOKEN_METADATA, TOKEN_HEADER, SecurityError, ServerSecurity, read_or_create_token, read_token)

from certificates import self_signed  # tests/certificates.py

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_token_file_is_created_private_and_then_reused(tmp_path):
    path = tmp_path / "secrets" / "token"
    old = os.umask(0)  # a permissive umask must not widen the file
    try:
        token = read_or_create_token(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40 and path.read_text().strip() == token
    assert read_or_create_token(path) == token  # an existing file is used, not replaced
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temporary left behind


def test_token_file_refusals(tmp_path):
    path = tmp_path / "token"
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(SecurityError, match="16-512 characters"):
        read_token(path)
    path.write_text("a" * 32)
    path.chmod(0o644)
    with pytest.raises(SecurityError, match="readable by every user"):
        read_token(path)
    with pytest.raises(SecurityError, match="cannot read"):
        read_token(tmp_path / "missing")
    with pytest.raises(SecurityError, match="go together"):
        ServerSecurity.from_files(tls_cert=path)


def test_triton_flags():
    open_flags = ServerSecurity().triton_flags()
    assert {"--model-control-mode=none", "--exit-on-error=true", "--strict-readiness=true"} <= set(open_flags)
    locked = [f for f in open_flags if f.startswith("--http-restricted-api=")]
    assert len(locked) == 1 and locked[0].startswith(
        "--http-restricted-api=statistics,model-repository,trace,logging:diffugts-admin=")
    assert ServerSecurity().admin_key != ServerSecurity().admin_key  # new at each start, never stored
    flags = ServerSecurity(token="t" * 20).triton_flags()
    assert "--grpc-restricted-protocol=inference,metadata,model-config,shared-memory,statistics:diffugts-token=" \
           + "t" * 20 in flags
    with pytest.raises(SecurityError, match="refusing to bind 0.0.0.0 without a token"):
        ServerSecurity().check_bind("0.0.0.0")
    ServerSecurity().check_bind("::1")
    ServerSecurity(token="t" * 20).check_bind("0.0.0.0")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7", "example.org"])
def test_serve_refuses_a_public_bind_without_token_before_anything_starts(host, tmp_path):
    repo = tmp_path / "repo"
    out = subprocess.run([sys.executable, "-m", "diffugts", "serve", "--repository", str(repo), "--host", host,
                          "--log", str(tmp_path / "serve.log")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"diffugts: error: refusing to bind {host} without a token: "
                                  "add --token-file FILE (or bind 127.0.0.1)")
    assert not repo.exists() and not (tmp_path / "serve.log").exists()  # nothing built, nothing started


# ------------------------------------------------------------ the real server: `diffugts serve` with both




@pytest.fixture(scope="module")
def served(tiny_repository, tmp_path_factory):
    """`diffugts serve --token-file (absent: created) --tls-cert --tls-key` on loopback, free ports."""
    work = tmp_path_factory.mktemp("secured")
    cert, key = self_signed(work)
    token_file = work / "auth" / "token"
    proc = subprocess.Popen([sys.executable, "-m", "diffugts", "serve", "--repository", str(tiny_repository),
                             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--log",
                             str(work / "serve.log"), "--token-file", str(token_file),
                             "--tls-cert", str(cert), "--tls-key", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "tritonserver ready: grpc 127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        assert f"token {token_file}" in line and "grpc tls" in line
        grpc_port = int(line.split("grpc 127.0.0.1:")[1].split()[0])
        http_port = int(line.split("http 127.0.0.1:")[1].split()[0])
        yield {"grpc": f"localhost:{grpc_port}", "http": f"127.0.0.1:{http_port}", "token_file": token_file,
               "token": token_file.read_text().strip(), "cert": cert}
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_serve_wrote_a_private_token_file(served):
    assert stat.S_IMODE(served["token_file"].stat().st_mode) == 0o600
    assert len(served["token"]) >= 40


def unet_inputs(module):
    latent = np.random.default_rng(5).standard_normal((1, 4, 8, 8, 8)).astype(np.float32)
    inputs = []
    for name, array in (("latent", latent), ("timestep", np.array([[300.0]], np.float32))):
        tensor = module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return latent, inputs


def test_grpc_over_tls_needs_the_token(served, tiny_repository):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from diffugts.executors.onnx_executor import OnnxExecutor

    client = grpcclient.InferenceServerClient(served["grpc"], ssl=True, root_certificates=str(served["cert"]))
    token = {GRPC_TOKEN_METADATA: served["token"]}
    wrong = {GRPC_TOKEN_METADATA: "x" * 43}
    assert client.is_server_ready()  # health stays open (probes)
    latent, inputs = unet_inputs(grpcclient)
    for headers in (None, wrong):
        with pytest.raises(InferenceServerException, match="restricted, expecting header 'triton-grpc-protocol-diffugts-token'"):
            client.infer("unet", inputs, headers=headers)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_metadata("unet", headers=headers)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_inference_statistics("unet", headers=headers)
    got = client.infer("unet", inputs, headers=token).as_numpy("prediction")
    expected = OnnxExecutor.from_repository(tiny_repository).unet(latent, 300.0).prediction
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert client.get_model_metadata("unet", headers=token).name == "unet"
    assert client.get_model_config("unet", headers=token).config.name == "unet"
    assert client.get_inference_statistics("unet", headers=token).model_stats[0].inference_stats.success.count >= 1
    # switched off for everyone, token or not
    for call in (client.get_model_repository_index, client.get_trace_settings, client.get_log_settings):
        with pytest.raises(InferenceServerException, match="expecting header 'triton-grpc-protocol-diffugts-admin'"):
            call(headers=token)
    with pytest.raises(InferenceServerException, match="expecting header 'triton-grpc-protocol-diffugts-admin'"):
        client.unload_model("unet", headers=token)
    client.close()


def test_grpc_without_tls_or_with_another_ca_cannot_connect(served, tmp_path):
    import tritonclient.grpc as grpcclient

    plain = grpcclient.InferenceServerClient(served["grpc"])
    with pytest.raises(Exception):
        plain.is_server_live(client_timeout=5)
    other_ca, _ = self_signed(tmp_path)
    stranger = grpcclient.InferenceServerClient(served["grpc"], ssl=True, root_certificates=str(other_ca))
    with pytest.raises(Exception):
        stranger.is_server_live(client_timeout=5)


def test_http_needs_the_token(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(served["http"])
    token = {TOKEN_HEADER: served["token"]}
    assert client.is_server_ready()
    _, inputs = unet_inputs(httpclient)
    for headers in (None, {TOKEN_HEADER: "y" * 43}):
        with pytest.raises(InferenceServerException, match="restricted, expecting header 'diffugts-token'"):
            client.infer("unet", inputs, headers=headers)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_metadata("unet", headers=headers)
    assert client.infer("unet", inputs, headers=token).as_numpy("prediction").shape == (1, 4, 8, 8, 8)
    assert client.get_inference_statistics("unet", headers=token)["model_stats"][0]["name"] == "unet"
    with pytest.raises(InferenceServerException, match="expecting header 'diffugts-admin'"):
        client.get_model_repository_index(headers=token)
    client.close()
    # plain HTTP as a probe sees it: health open, inference 403
    assert DIRECT.open(f"http://{served['http']}/v2/health/live").status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        DIRECT.open(f"http://{served['http']}/v2/models/unet")
    assert refused.value.code == 403


def test_without_a_token_statistics_and_repository_stay_locked(triton_server):
    """The loopback server with no token: inference and metadata open, the admin APIs refused."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.http_port}")
    for client in (grpc, http):
        assert client.get_model_metadata("unet")
        _, inputs = unet_inputs(grpcclient if client is grpc else httpclient)
        assert client.infer("unet", inputs).as_numpy("prediction").shape == (1, 4, 8, 8, 8)
        for call in (lambda: client.get_inference_statistics("unet"), client.get_model_repository_index,
                     client.get_log_settings, client.get_trace_settings):
            with pytest.raises(InferenceServerException, match="diffugts-admin"):
                call()
        client.close()
