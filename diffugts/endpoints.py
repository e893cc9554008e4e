"""Where a batch's volumes run: a pool of endpoints (Triton URLs, or this process), least
outstanding work first; a failing endpoint cools down (doubling) and is probed before its next
volume; one that comes back serving another model is retired.

Torch-free: imports nothing heavier than tritonclient, and that on first use.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from diffugts.client.transports import TritonError  # numpy only: tritonclient loads on first use

MAX_COOLDOWN_S = 30.0


class BatchError(ValueError):
    """The batch cannot start at all (no inputs, endpoints serving different models): one line."""


class Endpoint:
    """One place volumes run: a Triton URL, or this process (torch / ONNX Runtime).

    Remote endpoints give each worker thread its own executor (an executor holds a prompt cache
    and, with shared memory, its own regions); a local one is shared and runs one volume at a time."""

    def __init__(self, url: str, connect: Callable[[str], object], index: int, shared=None):
        self.url, self.connect, self.index = url, connect, index
        self.outstanding = 0
        self.down_until = 0.0
        self.cooldown = 0.0
        self.suspect = False  # failed before: probe readiness before the next volume
        self.retired: str | None = None  # why it takes no more work (serves another model)
        self._shared = shared
        self._shared_lock = threading.Lock()
        self._local = threading.local()
        self._created: list = []
        self._lock = threading.Lock()

    def executor(self):
        if self._shared is not None:
            return self._shared
        executor = getattr(self._local, "executor", None)
        if executor is None:
            executor = self._local.executor = self.connect(self.url)
            with self._lock:
                self._created.append(executor)
        return executor

    def run(self, fn):
        if self._shared is not None:
            with self._shared_lock:
                return fn(self._shared)
        return fn(self.executor())

    def discard(self) -> None:
        """Drop this thread's executor after a failure: the next volume connects afresh."""
        executor = getattr(self._local, "executor", None)
        self._local.executor = None
        if executor is not None:
            _close(executor)
            with self._lock:
                self._created = [e for e in self._created if e is not executor]

    def close(self) -> None:
        with self._lock:
            created, self._created = self._created, []
        for executor in created:
            _close(executor)


def _close(executor) -> None:
    try:
        executor.close()
    except Exception:  # a dead server cannot unregister anything; nothing else to release
        pass


class ModelMismatch(TritonError):
    """An endpoint that came back serving another model: it takes no more work."""


class NoEndpoint(RuntimeError):
    """No endpoint can take work: all retired, or all down for longer than the retry budget."""


class EndpointDown(RuntimeError):
    """The chosen endpoint failed its readiness probe: counts as one failed attempt."""


class EndpointPool:
    """Least outstanding work among the endpoints not cooling down after a failure.

    An endpoint that fails cools down (0.5 s, doubling to 30 s) and is probed before its next
    volume. When every endpoint has been down for longer than `give_up_s`, `acquire` stops waiting:
    the remaining volumes fail fast (and a later `--resume` picks them up)."""

    def __init__(self, endpoints: list[Endpoint], probe: Callable[[Endpoint], bool] | None = None,
                 base_cooldown_s: float = 0.5, give_up_s: float = 7.5):
        self.endpoints = endpoints
        self.probe = probe
        self.base_cooldown_s, self.give_up_s = base_cooldown_s, give_up_s
        self.all_down_since: float | None = None
        self.transports: list = []  # readiness probes, closed with the pool
        self._cond = threading.Condition()

    def _live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.retired is None]

    def acquire(self) -> Endpoint:
        with self._cond:
            while True:
                live = self._live()
                if not live:
                    raise NoEndpoint("; ".join(f"{e.url} {e.retired}" for e in self.endpoints))
                now = time.monotonic()
                ready = [e for e in live if e.down_until <= now]
                if ready:
                    chosen = min(ready, key=lambda e: (e.outstanding, e.suspect, e.index))
                    chosen.outstanding += 1
                    break
                if self.all_down_since is not None and now - self.all_down_since > self.give_up_s:
                    raise NoEndpoint(f"none of {', '.join(e.url for e in live)} has answered for "
                                     f"{now - self.all_down_since:.1f} s")
                self._cond.wait(min(e.down_until for e in live) - now)
        if chosen.suspect and self.probe is not None and not self.probe(chosen):
            self.release(chosen, failed=True)
            raise EndpointDown(f"{chosen.url} is not ready")
        return chosen

    def release(self, endpoint: Endpoint, failed: bool = False) -> None:
        with self._cond:
            endpoint.outstanding -= 1
            now = time.monotonic()
            if failed:
                if endpoint.down_until <= now:  # failures of volumes already in flight do not compound
                    endpoint.cooldown = min(max(self.base_cooldown_s, 2 * endpoint.cooldown), MAX_COOLDOWN_S)
                    endpoint.down_until = now + endpoint.cooldown
                endpoint.suspect = True
                if self.all_down_since is None and all(e.suspect for e in self._live()):
                    self.all_down_since = now
            else:
                endpoint.cooldown, endpoint.suspect = 0.0, False
                self.all_down_since = None
            self._cond.notify_all()

    def retire(self, endpoint: Endpoint, why: str) -> None:
        with self._cond:
            endpoint.retired = why
            self._cond.notify_all()

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        for transport in self.transports:
            _close(transport)


@dataclass
class ClientOptions:
    """How to reach Triton: per-call deadline, token, TLS root certificate, shared memory."""
    backend: str = "triton"
    timeout_s: float = 300.0
    token: str | None = None
    root_certificates: str | None = None
    shared_memory: bool = False


def give_up_after(retries: int, base_cooldown_s: float) -> float:
    """How long every endpoint may be down before the batch stops waiting: the cool-downs a
    volume would sit through in its `retries`."""
    return base_cooldown_s * (2 ** (retries + 1) - 1)


def triton_pool(urls: list[str], client: ClientOptions, retries: int = 3,
                base_cooldown_s: float = 0.5) -> tuple[EndpointPool, dict]:
    """Probe every endpoint once: the ready ones must serve the same model (its identity is
    returned); the others start cooling down and are probed again before they get work."""
    from diffugts.client.transports import GrpcTransport
    from diffugts.client.triton_executor import BlsClient, TritonExecutor, remote_identity

    probes = {url: GrpcTransport(url, min(client.timeout_s, 10.0), token=client.token,
                                 root_certificates=client.root_certificates) for url in urls}
    identities, unreachable = {}, []
    for url, transport in probes.items():
        if transport.is_ready():
            identities[url] = remote_identity(transport)
        else:
            unreachable.append(url)
    if not identities:
        raise BatchError(f"no endpoint is ready: {', '.join(urls)}")
    models = {json.dumps(v, sort_keys=True) for v in identities.values()}
    if len(models) > 1:
        raise BatchError("the endpoints serve different models: " + "; ".join(
            f"{url} {v['preset']} {(v['model_sha256'] or v['preset_sha256'])[:12]}" for url, v in identities.items()))
    identity = {"backend": client.backend, **next(iter(identities.values()))}

    def connect(url: str):
        if client.backend == "triton-bls":
            executor = BlsClient(url, client.timeout_s, client.token, client.root_certificates)
        else:
            executor = TritonExecutor(url, client.shared_memory, client.timeout_s, client.token,
                                      client.root_certificates)
        served = {"backend": client.backend, **remote_identity(executor.transport)}
        if served != identity:
            _close(executor)
            raise ModelMismatch(f"{url} serves another model than the batch started with")
        return executor

    endpoints = [Endpoint(url, connect, i) for i, url in enumerate(urls)]
    for endpoint in endpoints:
        if endpoint.url in unreachable:
            endpoint.suspect = True
            endpoint.cooldown = base_cooldown_s
            endpoint.down_until = time.monotonic() + base_cooldown_s

    def probe(endpoint: Endpoint) -> bool:
        return probes[endpoint.url].is_ready()

    pool = EndpointPool(endpoints, probe, base_cooldown_s, give_up_after(retries, base_cooldown_s))
    pool.transports = list(probes.values())
    return pool, identity
