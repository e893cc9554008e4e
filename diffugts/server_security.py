"""Who may call the server, and over what: a shared token and gRPC TLS, with Triton's own flags.

Triton checks a header on each restricted API group (`--grpc-restricted-protocol`,
`--http-restricted-api`); an API may belong to one group only. Two groups:

  token  `diffugts-token`: inference, metadata, model-config, shared-memory, statistics
         (only when a token is set; without one, statistics joins the locked group and the rest
         stay open: such a server binds loopback only, and shared memory, which the same-host
         `--shared-memory` client and `diffugts bench` use, cannot be reached off the host anyway)
  locked `diffugts-admin`: model-repository, trace, logging, keyed with a random value made
         at each start and never written anywhere. Triton has no switch that turns an API off;
         a key nobody holds does. Clients never need these (the repository is fixed at start,
         `--model-control-mode=none`), and trace/logging settings change what the server writes.

Health stays open (probes). gRPC clients send the token as metadata
`triton-grpc-protocol-diffugts-token` (Triton's prefix for gRPC), HTTP clients as header
`diffugts-token`. Triton reads the token from its command line: on a shared host, anyone who can
list processes can read it (mount /proc with hidepid=2, or run in a container, as deploy/ does).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

TOKEN_HEADER = "diffugts-token"
GRPC_TOKEN_METADATA = f"triton-grpc-protocol-{TOKEN_HEADER}"
ADMIN_HEADER = "diffugts-admin"
GRPC_ADMIN_METADATA = f"triton-grpc-protocol-{ADMIN_HEADER}"
TOKEN_APIS = ("inference", "metadata", "model-config", "shared-memory", "statistics")
LOCKED_APIS = ("model-repository", "trace", "logging")
LOCKED_WITHOUT_TOKEN = ("statistics",)
# URL-safe characters only: the value sits inside Triton's `<apis>:<key>=<value>` flag and in headers
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,512}")


class SecurityError(ValueError):
    """A refused configuration, in one line."""


def read_token(path: str | Path) -> str:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read the token file ({exc.strerror})") from None
    if mode & stat.S_IROTH:
        raise SecurityError(f"{path}: the token file is readable by every user (chmod 600 it)")
    if not TOKEN_PATTERN.fullmatch(token):
        raise SecurityError(f"{path}: the token must be 16-512 characters of A-Z a-z 0-9 . _ ~ -")
    return token


def read_or_create_token(path: str | Path) -> str:
    """The file's token, or a new random one written with mode 0600 when the file does not exist.

    Written to a private temporary name created 0600, then hard-linked into place: the file is
    never visible half-written or with wider permissions, and an existing file is never replaced."""
    path = Path(path)
    if path.exists():
        return read_token(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made it first: use theirs
            return read_token(path)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


@dataclass
class ServerSecurity:
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    @classmethod
    def from_files(cls, token_file: str | Path | None = None, tls_cert: str | Path | None = None,
                   tls_key: str | Path | None = None, create: bool = True) -> "ServerSecurity":
        if (tls_cert is None) != (tls_key is None):
            raise SecurityError("--tls-cert and --tls-key go together")
        for path in (tls_cert, tls_key):
            if path is not None and not Path(path).is_file():
                raise SecurityError(f"{path}: no such TLS file")
        token = (read_or_create_token if create else read_token)(token_file) if token_file else None
        return cls(token, Path(tls_cert).resolve() if tls_cert else None, Path(tls_key).resolve() if tls_key else None)

    def check_bind(self, host: str) -> None:
        if self.token is None and not is_loopback(host):
            raise SecurityError(f"refusing to bind {host} without a token: add --token-file FILE "
                                "(or bind 127.0.0.1)")

    def statistics_metadata(self) -> dict[str, str]:
        """gRPC metadata that opens this server's statistics API (the token's group when there is a
        token, else the admin group it is locked in)."""
        if self.token:
            return {GRPC_TOKEN_METADATA: self.token}
        return {GRPC_ADMIN_METADATA: self.admin_key}

    def triton_flags(self) -> list[str]:
        groups = [(LOCKED_APIS, ADMIN_HEADER, self.admin_key)]
        if self.token:
            groups.append((TOKEN_APIS, TOKEN_HEADER, self.token))
        else:
            groups[0] = (LOCKED_WITHOUT_TOKEN + LOCKED_APIS, ADMIN_HEADER, self.admin_key)
        flags = ["--model-control-mode=none", "--exit-on-error=true", "--strict-readiness=true"]
        for apis, key, value in groups:
            spec = f"{','.join(apis)}:{key}={value}"
            flags += [f"--grpc-restricted-protocol={spec}", f"--http-restricted-api={spec}"]
        if self.tls_cert:
            flags += ["--grpc-use-ssl=true", f"--grpc-server-cert={self.tls_cert}",
                      f"--grpc-server-key={self.tls_key}"]
        return flags


def main(argv: list[str] | None = None) -> int:
    """Container entry point: `python -m diffugts.server_security --token-file F [--tls-cert C
    --tls-key K] -- tritonserver ARGS...` execs tritonserver with the flags above appended (one
    place decides them, for `diffugts serve` and for deploy/). A token file must exist here (a
    mounted Secret): a token made up inside a container would be known to nobody."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diffugts.server_security")
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the tritonserver command after --")
    try:
        security = ServerSecurity.from_files(args.token_file, args.tls_cert, args.tls_key, create=False)
    except SecurityError as exc:
        print(f"diffugts: error: {exc}", file=sys.stderr)
        return 2
    os.execvp(command[0], command + security.triton_flags())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
