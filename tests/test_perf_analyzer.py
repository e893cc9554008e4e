"""perf_analyzer in the bench: its CSV read into results rows; a clear one-line reason where it
cannot start; and (where `make perf-analyzer` installed it, as `make test` tries to) a real run
against the served tiny UNet."""

from pathlib import Path

import pytest

from diffugts.benchmarks.perf_analyzer import missing_reason, parse_csv, run_unet, summary
from diffugts.config import get_preset

# the header and a row as perf_analyzer 2.40.0 writes them (-f)
CSV = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
       "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
       "2,68.981,9,2822,9144,40,16440,498,4,22208,53323,73045,96931\n")


def test_csv_rows_become_results_rows(tmp_path):
    path = tmp_path / "pa.csv"
    path.write_text(CSV)
    (row,) = parse_csv(path)
    assert summary(row) == {"concurrency": 2, "throughput": 68.981, "p50_us": 22208.0, "p95_us": 73045.0}


def test_missing_binary_is_one_line_and_the_bench_falls_back(tmp_path):
    reason = missing_reason(tmp_path / "nothing")
    assert "make perf-analyzer" in reason and "\n" not in reason
    result = run_unet("127.0.0.1:1", get_preset("tiny"), tmp_path, (1,), tools=tmp_path / "nothing")
    assert result == {"status": "unavailable", "reason": reason}


@pytest.mark.slow
def test_perf_analyzer_against_the_served_unet(tiny_repository, tmp_path):
    from diffugts.serve import TritonServer
    from diffugts.server_security import ServerSecurity

    reason = missing_reason()
    if reason is not None:  # `make perf-analyzer` could not install it here: the bench says why
        assert "\n" not in reason
        pytest.skip(reason)
    # statistics, which perf_analyzer reads, sit behind the token (over HTTP: its -H skips gRPC)
    security = ServerSecurity.from_files(tmp_path / "token")
    with TritonServer(tiny_repository, grpc_port=0, http_port=0, metrics_port=0, log_path=tmp_path / "pa.log",
                      security=security) as server:
        refused = run_unet(server.grpc_url, get_preset("tiny"), tmp_path, (1,), measurement_ms=500, stability=100)
        assert refused["status"] == "failed"
        result = run_unet(f"{server.host}:{server.http_port}", get_preset("tiny"), tmp_path, (1, 2),
                          measurement_ms=1000, stability=100, token=security.token)
    assert result["status"] == "ok", result
    assert [r["concurrency"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:
        assert r["throughput"] > 0 and 0 < r["p50_us"] <= r["p95_us"]
    assert len(parse_csv(Path(tmp_path) / result["csv"])) == 2
