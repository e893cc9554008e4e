"""`diffugts listen`: a DICOM receiver (C-STORE SCP) that segments each completed CT / MR series
and sends the DICOM SEG on (C-STORE SCU) and / or writes it to a folder.

A series is complete when the association that brought it is released, or when no instance of
it has arrived for `idle_timeout` seconds (an aborted association, a sender that keeps its
association open). One worker thread segments completed series one at a time, so the executor
is never shared between threads. A bad or partial series is logged, kept under
`<spool>/failed/`, and the receiver stays up.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("diffugts.listen")

ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
}
SUCCESS, OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED = 0x0000, 0xA700, 0x0122


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """'PACS@127.0.0.1:11113' -> Destination('PACS', '127.0.0.1', 11113)."""
        match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d+)", text.strip())
        if not match:
            raise ValueError(f"destination {text!r}: expected AE_TITLE@HOST:PORT")
        return cls(match.group(1), match.group(2), int(match.group(3)))


@dataclass
class PromptRules:
    """Series description -> prompt: the first rule whose pattern (a case-insensitive regular
    expression) is found in the description wins; otherwise the default (None: skip the series)."""

    rules: list[tuple[str, str]] = field(default_factory=list)
    default: str | None = None

    @classmethod
    def parse(cls, texts: list[str], default: str | None) -> "PromptRules":
        rules = []
        for text in texts:
            pattern, sep, prompt = text.partition("=")
            if not sep or not pattern.strip() or not prompt.strip():
                raise ValueError(f"rule {text!r}: expected PATTERN=PROMPT, e.g. 'brain=brain tumor'")
            re.compile(pattern)
            rules.append((pattern.strip(), prompt.strip()))
        return cls(rules, default)

    def prompt_for(self, description: str) -> str | None:
        for pattern, prompt in self.rules:
            if re.search(pattern, description or "", re.IGNORECASE):
                return prompt
        return self.default


@dataclass
class ListenConfig:
    spool: Path  # received instances, one folder per series
    out: Path | None = None  # SEGs written here
    destination: Destination | None = None  # and / or sent here
    prompts: PromptRules = field(default_factory=PromptRules)
    ae_title: str = "DIFFUGTS"
    host: str = "127.0.0.1"
    port: int = 11112  # 0: a free port (Listener.port says which)
    idle_timeout: float = 30.0
    output_format: str = "dicom-seg"  # or "both": NIfTI beside the SEG in `out`


class Listener:
    """The receiver, its idle watchdog and its one segmentation worker."""

    def __init__(self, executor, config: ListenConfig, identity, options=None):
        self.executor, self.config, self.identity, self.options = executor, config, identity, options
        self._lock = threading.Lock()
        self._last_seen: dict[str, float] = {}  # series UID -> time of its latest instance
        self._assoc_series: dict[int, set[str]] = {}  # association id -> series it brought
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._server = None
        self._threads: list[threading.Thread] = []
        self.results: list[dict] = []  # one per series handled (for the log and for tests)

    # -- receiving -----------------------------------------------------------------------------
    def start(self) -> int:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        if self.config.out is None and self.config.destination is None:
            raise ValueError("nowhere to put the SEGs: give an output folder and / or a destination")
        self.config.spool.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(Verification)
        for uid in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(uid)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_RELEASED, self._on_closed),
                    (evt.EVT_ABORTED, self._on_aborted)]
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        for target in (self._work, self._watch):
            thread = threading.Thread(target=target, daemon=True, name=f"diffugts-listen-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        log.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.port)
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if str(ds.SOPClassUID) not in ACCEPTED_SOP_CLASSES:
            return SOP_CLASS_NOT_SUPPORTED
        try:
            series_uid = str(ds.SeriesInstanceUID)
            folder = self.config.spool / _safe(series_uid)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{_safe(str(ds.SOPInstanceUID))}.dcm"
            partial = target.with_name("." + target.name + ".partial")
            ds.save_as(partial, enforce_file_format=True)
            partial.replace(target)
        except Exception as exc:  # a broken instance is refused, the receiver stays up
            log.error("refused an instance from %s: %s", event.assoc.requestor.ae_title, _one_line(exc))
            return OUT_OF_RESOURCES
        with self._lock:
            self._last_seen[series_uid] = time.monotonic()
            self._assoc_series.setdefault(id(event.assoc), set()).add(series_uid)
        return SUCCESS

    def _on_closed(self, event) -> None:
        with self._lock:
            done = self._assoc_series.pop(id(event.assoc), set())
            for uid in done:
                self._last_seen.pop(uid, None)
        for uid in sorted(done):
            self._queue.put(uid)

    def _on_aborted(self, event) -> None:
        with self._lock:  # what arrived stays; the idle timeout decides when it is complete
            series = self._assoc_series.pop(id(event.assoc), set())
        if series:
            log.warning("association aborted: %d series wait for the %.0f s idle timeout", len(series),
                        self.config.idle_timeout)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.config.idle_timeout / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [uid for uid, seen in self._last_seen.items() if now - seen >= self.config.idle_timeout]
                for uid in idle:
                    del self._last_seen[uid]
                    for series in self._assoc_series.values():
                        series.discard(uid)
            for uid in idle:
                log.info("series %s: no new instance for %.0f s, taking it as complete", uid, self.config.idle_timeout)
                self._queue.put(uid)

    # -- segmenting ----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            folder = self.config.spool / _safe(uid)
            try:
                result = self.process(folder)
                shutil.rmtree(folder, ignore_errors=True)
            except Exception as exc:  # bad or partial series: log it, keep it, keep listening
                result = {"series_uid": uid, "error": _one_line(exc)}
                log.error("series %s: %s (kept in %s)", uid, result["error"], self._keep_failed(folder))
            self.results.append(result)

    def _keep_failed(self, folder: Path) -> Path:
        failed = self.config.spool / "failed" / folder.name
        if failed.exists():
            shutil.rmtree(failed)
        failed.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.move(str(folder), failed)
        return failed

    def process(self, folder: Path) -> dict:
        """Segment the series in `folder`, write and / or send its SEG; raises on any problem."""
        import tempfile

        from .io import read_volume
        from .notices import is_caution
        from .outputs import save_outputs
        from .pipeline import run_segmentation

        volume = read_volume(folder)
        series = volume.dicom
        prompt = self.config.prompts.prompt_for(series.description)
        if prompt is None:
            raise ValueError(f"no prompt rule matches the series description {series.description!r} "
                             "and no default prompt is set")
        seg = run_segmentation(self.executor, volume, prompt, series.modality if series.modality in ("CT", "MR")
                               else None, self.options)
        with tempfile.TemporaryDirectory(prefix="diffugts-seg-") as tmp:
            out = self.config.out or Path(tmp)
            written = save_outputs(out, _safe(series.series_uid), volume, seg, prompt,
                                   self.config.output_format if self.config.out else "dicom-seg", self.identity)
            sent = self._send(written["seg"]) if self.config.destination else None
        result = {"series_uid": series.series_uid, "description": series.description, "prompt": prompt,
                  "slices": len(series.files), "mask_voxels": int(seg.mask.sum()),
                  "written": [str(p) for p in written.values()] if self.config.out else [], "sent_to": sent,
                  "notices": list(seg.notices)}
        log.info("series %s ('%s', %d slices): '%s' -> %d mask voxels%s%s", series.series_uid,
                 series.description, len(series.files), prompt, result["mask_voxels"],
                 f" -> {written['seg']}" if self.config.out else "", f" -> sent to {sent}" if sent else "")
        for notice in seg.notices:  # what the loop did is information; a reason to doubt the mask is a warning
            log.log(logging.WARNING if is_caution(notice) else logging.INFO, "series %s: %s",
                    series.series_uid, notice)
        return result

    def _send(self, path: Path) -> str:
        import pydicom
        from pynetdicom import AE
        from pynetdicom.sop_class import SegmentationStorage

        dest = self.config.destination
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(SegmentationStorage)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"cannot associate with {dest.ae_title}@{dest.host}:{dest.port}")
        try:
            status = assoc.send_c_store(pydicom.dcmread(path))
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code != SUCCESS:
            raise ConnectionError(f"{dest.ae_title} answered the SEG's C-STORE with status "
                                  f"{'none' if code is None else hex(code)}")
        return f"{dest.ae_title}@{dest.host}:{dest.port}"


def _safe(uid: str) -> str:
    """A UID as a file name (UIDs are digits and dots; anything else is replaced)."""
    return re.sub(r"[^0-9A-Za-z.]", "_", uid)[:128] or "unknown"


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run(args, executor, options) -> int:
    """`diffugts listen`: build the listener from parsed arguments and serve until Ctrl-C / SIGTERM."""
    import signal
    import sys

    from .dicom_seg import algorithm_identity

    logging.basicConfig(level=logging.INFO, format="%(asctime)s diffugts listen: %(message)s", stream=sys.stderr)
    try:
        config = ListenConfig(
            spool=Path(args.spool), out=Path(args.out) if args.out else None,
            destination=Destination.parse(args.send) if args.send else None,
            prompts=PromptRules.parse(args.rule or [], args.prompt), ae_title=args.ae_title, host=args.host,
            port=args.port, idle_timeout=args.idle_timeout, output_format=args.format)
        listener = Listener(executor, config, algorithm_identity(executor.preset, args.weights, args.backend), options)
        listener.start()
    except (ValueError, re.error, OSError) as exc:
        print(f"diffugts: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(f"listening as {config.ae_title} on {config.host}:{listener.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    listener.stop()
    print("listener stopped", flush=True)
    return 0
