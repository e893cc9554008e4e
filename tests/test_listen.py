"""`diffugts listen` end to end on loopback: pynetdicom's own SCU pushes MR series, the listener
segments them (tiny preset) and C-STOREs each SEG to a storage SCP this test starts."""

import logging
import os
import signal
import subprocess
import sys
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, SegmentationStorage, Verification

from diffugts.dicom_seg import AlgorithmIdentity
from diffugts.dicom_series import write_series
from diffugts.listen import Destination, ListenConfig, Listener, PromptRules

AFFINE = np.diag([-4.0, -4.0, 4.0, 1.0])


def mr_series(folder, depth=8, description="T1 AX BRAIN", seed=0):
    volume = np.random.default_rng(seed).normal(300, 40, (24, 20, depth)).astype(np.float32)
    return write_series(volume, AFFINE, folder, "MR", description=description)


@pytest.fixture
def destination():
    """A storage SCP standing in for a PACS: keeps every SEG it is sent."""
    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(SegmentationStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield Destination("PACS", "127.0.0.1", server.server_address[1]), received
    server.shutdown()


def push(port, files, release=True):
    """Send files as pynetdicom's SCU; returns the C-STORE statuses (and the open association)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DIFFUGTS")
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    if release:
        assoc.release()
    return statuses, assoc


def wait_for(condition, seconds=120):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_listener_segments_pushed_series_and_sends_the_seg(torch_executor, destination, tmp_path, caplog):
    dest, received = destination
    config = ListenConfig(spool=tmp_path / "spool", out=tmp_path / "segs", destination=dest,
                          prompts=PromptRules.parse(["brain=brain tumor"], "lesion"), port=0, idle_timeout=2.0)
    listener = Listener(torch_executor, config, AlgorithmIdentity("0.1.0", "tiny", "none (random init)"))
    port = listener.start()
    caplog.set_level(logging.INFO, logger="diffugts.listen")
    try:
        # 1. a partial series (a slice lost in transit): logged, nothing sent, the receiver stays up
        broken = mr_series(tmp_path / "broken", description="T2 AX ABDOMEN", seed=1)
        statuses, _ = push(port, broken[:3] + broken[4:])
        assert statuses == [0] * 7
        assert wait_for(lambda: len(listener.results) == 1)
        assert "missing slice" in listener.results[0]["error"]
        assert any("missing slice" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert (tmp_path / "spool" / "failed").is_dir() and received == []

        # 2. a good series, complete when the association is released; the rule picks the prompt
        good = mr_series(tmp_path / "good")
        assert push(port, good)[0] == [0] * 8
        assert wait_for(lambda: len(received) == 1)
        seg = hd.seg.Segmentation.from_dataset(received[0])
        source = [pydicom.dcmread(f, stop_before_pixels=True) for f in good]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
        assert {uid for _, _, uid in seg.get_source_image_uids()} == {s.SOPInstanceUID for s in source}
        assert seg.get_segment_description(1).segment_label == "brain tumor"
        assert int(seg.NumberOfFrames) == 8
        assert (tmp_path / "segs" / f"{source[0].SeriesInstanceUID}_seg.dcm").exists()

        # 3. a sender that keeps its association open: the idle timeout completes the series;
        #    no rule matches its description, so the default prompt is used
        other = mr_series(tmp_path / "other", description="SAG T1", seed=2)
        statuses, assoc = push(port, other, release=False)
        assert wait_for(lambda: len(received) == 2)
        assoc.release()
        assert hd.seg.Segmentation.from_dataset(received[1]).get_segment_description(1).segment_label == "lesion"

        # 4. not CT / MR: refused at association (no presentation context for it)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(SegmentationStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="DIFFUGTS")
        assert not assoc.is_established or SegmentationStorage not in [c.abstract_syntax for c in
                                                                      assoc.accepted_contexts]
        if assoc.is_established:
            assoc.release()
    finally:
        listener.stop()
    assert [r.get("error") is None for r in listener.results] == [False, True, True]
    # each notice is logged once: a reason to doubt the mask as a warning, what the loop did as information
    notices = [n for r in listener.results[1:] for n in r["notices"]]
    assert notices  # random weights on noise: at least the empty mask or the brain not found is said
    for notice in notices:
        levels = {r.levelno for r in caplog.records if r.getMessage().endswith(notice)}
        assert levels == {logging.WARNING if notice.startswith("caution: ") else logging.INFO}, notice
    assert not any((tmp_path / "spool").glob("1.*"))  # processed series leave the spool


def test_listen_command_answers_echo_and_stops_on_sigterm(tmp_path):
    """The real command: binds loopback, answers C-ECHO, stops cleanly on SIGTERM."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffugts", "listen", "--port", "0", "--preset", "tiny",
                             "--out", str(tmp_path / "segs"), "--spool", str(tmp_path / "spool"),
                             "--prompt", "lesion"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening as DIFFUGTS on 127.0.0.1:"), line + proc.stderr.read()
        port = int(line.strip().rsplit(":", 1)[1])
        ae = AE(ae_title="ECHO")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="DIFFUGTS")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "listener stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_listen_needs_somewhere_to_put_segs(tmp_path, capsys):
    from diffugts.cli import main

    code = main(["listen", "--port", "0", "--preset", "tiny", "--spool", str(tmp_path / "s"), "--prompt", "x"])
    assert code == 2 and "nowhere to put the SEGs" in capsys.readouterr().err
    code = main(["listen", "--port", "0", "--preset", "tiny", "--spool", str(tmp_path / "s"), "--send", "PACS"])
    assert code == 2 and "expected AE_TITLE@HOST:PORT" in capsys.readouterr().err
