"""Torch eager against Triton serving the int8 repository that `diffugts bench` gated
(`bench_out/repo_int8`), on the bench's own volumes, the two interleaved run by run: the
end-to-end ratio with the stages that passed the Dice gate in int8.
`python -m diffugts.benchmarks.int8_latency [bench_out]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffugts.report import write_json

from .harness import FULL, load_cases, measure_latencies


def main(out: str = "bench_out") -> dict:
    from diffugts.client.triton_executor import TritonExecutor
    from diffugts.executors.torch_executor import TorchExecutor
    from diffugts.serve import TritonServer

    out = Path(out)
    bench = json.loads((out / "results.json").read_text())
    cases = load_cases(out / "data", FULL.volumes)
    torch_ex = TorchExecutor.from_preset(bench["preset"])
    torch_ex.preset = torch_ex.preset.with_(anomaly_threshold=bench["anomaly_threshold"])
    with TritonServer(out / "repo_int8", grpc_port=0, http_port=0, metrics_port=0,
                      log_path=out / "tritonserver_int8.log") as server:
        client = TritonExecutor(server.grpc_url)
        results = measure_latencies({"torch": torch_ex, "triton_int8": client}, cases, FULL.repeats)
        client.close()
    results["int8_stages"] = [k for k, v in bench["int8"]["stages"].items() if v["ships"]]
    results["triton_int8_over_torch"] = results["triton_int8"]["end_to_end_p50_s"] / results["torch"]["end_to_end_p50_s"]
    write_json(out / "int8_latency.json", results)
    return results


if __name__ == "__main__":
    r = main(*sys.argv[1:])
    print(f"torch p50 {r['torch']['end_to_end_p50_s']:.3f} s, Triton with int8 {', '.join(r['int8_stages'])} "
          f"p50 {r['triton_int8']['end_to_end_p50_s']:.3f} s: {r['triton_int8_over_torch']:.2f}x")
