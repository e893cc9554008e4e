"""Batch serving against real tritonservers on loopback: inputs of every kind, a server killed
with SIGKILL mid-batch (two endpoints, and the only one), --resume, token and TLS."""

import json
import os
import signal
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.batch import run_batch
from diffugts.batch_inputs import collect_inputs
from diffugts.cli import main
from diffugts.endpoints import ClientOptions, Endpoint, EndpointDown, EndpointPool, NoEndpoint, triton_pool
from diffugts.phantom import write_dataset
from diffugts.serve import TritonServer
from diffugts.server_security import ServerSecurity

from certificates import self_signed  # tests/certificates.py

PROMPTS = ["kidney tumor", "liver cyst", "brain tumor", "lung nodule"]


def segment(capsys, *argv):
    code = main(["segment", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, err


def manifest(out):
    return json.loads((out / "run.json").read_text())


def statuses(out):
    return {v["key"]: v["status"] for v in manifest(out)["volumes"]}


def masks(out, keys):
    return {k: np.asarray(nib.load(out / f"{k}_mask.nii.gz").dataobj) for k in keys}


def assert_same_masks(out, reference):
    for key, mask in masks(out, reference).items():
        np.testing.assert_array_equal(mask, reference[key], err_msg=key)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging or partial files left


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four volumes of 2 x 2 x 1 tiny-preset windows each, so that a kill can land mid-volume."""
    out = tmp_path_factory.mktemp("batch_in")
    return write_dataset(out, 4, seed=11, categories=PROMPTS, shape=(40, 36, 32), spacing=4.0)


@pytest.fixture(scope="module")
def reference(triton_server, dataset, tmp_path_factory, ):
    """An uninterrupted run of the MSD dataset.json over one server."""
    out = tmp_path_factory.mktemp("reference")
    code = main(["segment", str(dataset / "dataset.json"), "--out", str(out), "--backend", "triton",
                 "--url", triton_server.grpc_url, "--workers", "2"])
    assert code == 0
    entries = manifest(out)["volumes"]
    cases = json.loads((dataset / "dataset.json").read_text())["test"]
    assert [(e["prompt"], e["modality"], e["status"]) for e in entries] == [
        (c["prompt"], c["modality"], "done") for c in cases]
    keys = [e["key"] for e in entries]
    assert keys == ["case_000", "case_001", "case_002", "case_003"]
    result = masks(out, keys)
    assert sum(int(m.sum()) > 0 for m in result.values()) >= 2  # a comparison with something in it
    return result


def start_server(repository, log, extra_args=()):
    return TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0, log_path=log,
                        extra_args=extra_args).start()


def kill_on_window(server, endpoint_url, window):
    """on_window hook: SIGKILL `server` (its process group) just before its `window`-th window."""
    seen = {"n": 0, "killed": False}
    lock = threading.Lock()

    def hook(item, endpoint):
        with lock:
            if endpoint.url != endpoint_url or seen["killed"]:
                return
            seen["n"] += 1
            if seen["n"] == window:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
                seen["killed"] = True
    return hook, seen


def test_csv_manifest_with_bad_rows(triton_server, dataset, reference, tmp_path, capsys):
    csv = tmp_path / "cases.csv"
    image = dataset / "imagesTs" / "case_001.nii.gz"
    cases = json.loads((dataset / "dataset.json").read_text())["test"]
    csv.write_text("path,prompt,modality\n"
                   f"{image},{cases[1]['prompt']},{cases[1]['modality']}\n"
                   "missing.nii.gz,liver cyst,CT\n"
                   f"{image},liver cyst,PET\n"
                   f"{image},liver cyst,CT,extra\n"
                   f"{dataset / 'imagesTs' / 'case_002.nii.gz'},,\n")
    out = tmp_path / "out"
    code, err = segment(capsys, csv, "--out", out, "--backend", "triton", "--url", triton_server.grpc_url)
    assert code == 1 and "Traceback" not in err
    entries = manifest(out)["volumes"]
    assert [e["status"] for e in entries] == ["done", "failed", "failed", "failed", "failed"]
    errors = [e["error"] for e in entries[1:]]
    assert "missing.nii.gz: no such file or folder" in errors[0]
    assert f"{csv} line 4: modality 'PET' is not CT or MR" == errors[1]
    assert f"{csv} line 5: expected `path,prompt,modality`, got 4 fields" == errors[2]
    assert f"{csv} line 6: no prompt" in errors[3]
    for message in errors:
        assert "\n" not in message and f"diffugts: error: {message}\n" in err
    np.testing.assert_array_equal(masks(out, ["case_001"])["case_001"], reference["case_001"])
    assert "1 done, 0 skipped, 4 failed" in err


def test_one_of_two_servers_killed_mid_batch(triton_server, tiny_repository, dataset, reference, tmp_path):
    doomed = start_server(tiny_repository, tmp_path / "doomed.log")
    try:
        pool, model = triton_pool([doomed.grpc_url, triton_server.grpc_url], ClientOptions(), retries=3,
                                  base_cooldown_s=0.2)
        hook, seen = kill_on_window(doomed, doomed.grpc_url, 2)  # the doomed server's first volume, mid-way
        items = collect_inputs([str(dataset / "dataset.json")])
        start = time.monotonic()
        result = run_batch(items, tmp_path / "out", pool, model, workers=2, retries=3, on_window=hook)
        pool.close()
    finally:
        doomed.stop()
    assert seen["killed"] and time.monotonic() - start < 120
    assert result.exit_code == 0 and result.count("done") == 4
    retried = [v for v in result.volumes if v["attempts"] > 1]
    assert retried and all(v["endpoint"] == triton_server.grpc_url for v in retried)
    assert statuses(tmp_path / "out") == dict.fromkeys(reference, "done")
    assert_same_masks(tmp_path / "out", reference)


def test_only_server_killed_restarted_and_resumed(tiny_repository, dataset, reference, tmp_path, capsys):
    out = tmp_path / "out"
    server = start_server(tiny_repository, tmp_path / "first.log")
    try:
        pool, model = triton_pool([server.grpc_url], ClientOptions(), retries=1, base_cooldown_s=0.2)
        hook, seen = kill_on_window(server, server.grpc_url, 6)  # the second volume's second window
        result = run_batch(collect_inputs([str(dataset / "dataset.json")]), out, pool, model, workers=1,
                           retries=1, on_window=hook)
        pool.close()
    finally:
        server.stop()
    assert seen["killed"] and result.exit_code == 1
    assert statuses(out) == {"case_000": "done", "case_001": "failed", "case_002": "failed", "case_003": "failed"}
    assert all(v["error"] and "\n" not in v["error"] for v in manifest(out)["volumes"][1:])
    first_mask = (out / "case_000_mask.nii.gz").stat().st_mtime_ns

    server = start_server(tiny_repository, tmp_path / "second.log")  # restarted (new ports)
    try:
        url = server.grpc_url
        code, err = segment(capsys, dataset / "dataset.json", "--out", out, "--backend", "triton", "--url", url,
                            "--resume")
        assert code == 0, err
        assert statuses(out) == {"case_000": "skipped", "case_001": "done", "case_002": "done", "case_003": "done"}
        assert (out / "case_000_mask.nii.gz").stat().st_mtime_ns == first_mask  # not written twice
        assert_same_masks(out, reference)

        # a changed input is redone, the rest skipped
        changed = dataset.parent / "changed"
        changed.mkdir()
        for f in (dataset / "imagesTs").iterdir():
            os.link(f, changed / f.name)
        source = nib.load(changed / "case_002.nii.gz")
        data = np.asarray(source.dataobj).copy()
        data[0, 0, 0] += 1
        (changed / "case_002.nii.gz").unlink()
        nib.save(nib.Nifti1Image(data, source.affine, source.header), changed / "case_002.nii.gz")
        old_checksum = manifest(out)["volumes"][2]["checksum"]
        cases = json.loads((dataset / "dataset.json").read_text())["test"]
        rows = "".join(f"{changed / os.path.basename(c['image'])},{c['prompt']},{c['modality']}\n" for c in cases)
        (tmp_path / "changed.csv").write_text(rows)
        code, err = segment(capsys, tmp_path / "changed.csv", "--out", out, "--backend", "triton", "--url", url,
                            "--resume")
        assert code == 0, err
        assert statuses(out) == {"case_000": "skipped", "case_001": "skipped", "case_002": "done",
                                 "case_003": "skipped"}
        assert manifest(out)["volumes"][2]["checksum"] != old_checksum

        # another model (its identity in run.json no longer matches) is redone
        data = manifest(out)
        data["model"]["model_sha256"] = "0" * 64
        (out / "run.json").write_text(json.dumps(data))
        code, err = segment(capsys, tmp_path / "changed.csv", "--out", out, "--backend", "triton", "--url", url,
                            "--resume", "--workers", "2")
        assert code == 0 and statuses(out) == dict.fromkeys(reference, "done")
    finally:
        server.stop()




def test_token_and_tls(tiny_repository, dataset, reference, tmp_path, capsys):
    cert, key = self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o600)
    # the server half of issue 15: `diffugts serve --token-file --tls-cert --tls-key` sets these
    security = ServerSecurity.from_files(token, cert, key, create=False)
    server = TritonServer(tiny_repository, grpc_port=0, http_port=0, metrics_port=0, log_path=tmp_path / "tls.log",
                          security=security)
    server.start()
    try:
        image = dataset / "imagesTs" / "case_000.nii.gz"
        common = [image, "--prompt", "kidney tumor", "--backend", "triton", "--url", server.grpc_url]
        code, err = segment(capsys, *common, "--out", tmp_path / "a", "--tls-ca", cert)
        assert code == 2 and "needs the diffugts token" in err and len(err.strip().splitlines()) == 1
        wrong = tmp_path / "wrong"
        wrong.write_text("guess")
        code, err = segment(capsys, *common, "--out", tmp_path / "a", "--tls-ca", cert, "--token-file", wrong)
        assert code == 2 and "needs the diffugts token" in err
        code, err = segment(capsys, *common, "--out", tmp_path / "a", "--token-file", token)  # plaintext to TLS
        assert code == 2 and "no endpoint is ready" in err
        assert not (tmp_path / "a").exists()
        code, err = segment(capsys, *common, "--out", tmp_path / "ok", "--token-file", token, "--tls-ca", cert,
                            "--backend", "triton-bls")
        assert code == 0, err
        code, err = segment(capsys, *common, "--out", tmp_path / "ok", "--token-file", token, "--tls-ca", cert)
        assert code == 0, err
        np.testing.assert_array_equal(masks(tmp_path / "ok", ["case_000"])["case_000"], reference["case_000"])
    finally:
        server.stop()


def write_series(folder, array):
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)).astype(np.int16))
    image.SetSpacing((4.0, 4.0, 4.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(parents=True)
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1." + str(abs(hash(str(folder))) % 10**8))
        sl.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))))
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)


def test_inputs_from_folders_globs_and_manifests(dataset, tmp_path):
    from diffugts.io import read_volume

    write_series(tmp_path / "scans" / "patient1" / "series", np.zeros((8, 8, 4)))
    write_series(tmp_path / "scans" / "patient2" / "series", np.ones((8, 8, 4)))
    for f in (tmp_path / "scans" / "patient2" / "series").iterdir():
        f.rename(f.with_suffix(""))  # DICOM files without a suffix are found by their preamble
    (tmp_path / "scans" / "notes.txt").write_text("not a scan")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "scans" / "case_000.nii.gz")
    items = collect_inputs([str(tmp_path / "scans"), str(dataset / "imagesTs" / "case_00[01].nii.gz"),
                            str(dataset / "imagesTs" / "case_000.nii.gz"), str(tmp_path / "nowhere" / "*.nrrd"),
                            str(tmp_path / "absent.nii.gz")], prompt="liver tumor")
    assert [i.key for i in items] == ["case_000", "series", "series_2", "case_000_2", "case_001", "*", "absent"]
    assert [i.error is None for i in items] == [True] * 5 + [False, False]
    assert items[5].error.endswith("*.nrrd: no file matches")
    assert items[6].error.endswith("absent.nii.gz: no such file or folder")
    assert read_volume(items[2].input).array.max() == 1  # the suffix-less series
    # the same file named twice (a glob and a path) runs once, with the batch's prompt
    assert sum(i.input.endswith("imagesTs/case_000.nii.gz") for i in items) == 1
    assert {i.prompt for i in items[:5]} == {"liver tumor"}
    # dataset.json by file or by folder; entries carry their prompts; a bare prompt is refused
    by_file = collect_inputs([str(dataset / "dataset.json")], prompt="ignored for entries with one")
    by_folder = collect_inputs([str(dataset)])
    assert [(i.input, i.prompt, i.modality) for i in by_file] == [(i.input, i.prompt, i.modality) for i in by_folder]
    assert [i.prompt for i in by_folder] == [c["prompt"] for c in json.loads((dataset / "dataset.json").read_text())["test"]]
    assert collect_inputs([str(tmp_path / "scans" / "case_000.nii.gz")], prompt="  ")[0].error.endswith("prompt is empty: give an open-vocabulary target such as 'kidney tumor'")
    msd = tmp_path / "msd" / "dataset.json"
    msd.parent.mkdir()
    msd.write_text(json.dumps({"modality": {"0": "MRI"}, "test": ["./imagesTs/a.nii.gz", {"image": ""}, 7]}))
    entries = collect_inputs([str(msd)], prompt="liver tumor")
    assert entries[0].modality == "MR" and entries[0].input.endswith("imagesTs/a.nii.gz")
    assert [e.error for e in entries[1:]] == [f"{msd} test[1]: entry has no 'image' path",
                                             f"{msd} test[2]: entry has no 'image' path"]
    # the Decathlon's Brain: four MR channels; an entry may name its channel, the same image twice
    # with two channels runs twice
    msd.write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                               "test": ["./imagesTs/b.nii.gz", {"image": "./imagesTs/b.nii.gz", "channel": 2},
                                        {"image": "./imagesTs/c.nii.gz", "channel": "T2w"}]}))
    entries = collect_inputs([str(msd)], prompt="brain tumor")
    assert [(e.modality, e.channel, e.key) for e in entries] == [("MR", None, "b"), ("MR", 2, "b_2"), ("MR", None, "c")]
    assert entries[2].error == f"{msd} test[2]: 'channel' must be a channel index (0, 1, ...), not 'T2w'"
    msd.write_text(json.dumps({"modality": {"0": "CT", "1": "PET"}, "test": ["./imagesTs/d.nii.gz"]}))
    assert collect_inputs([str(msd)], prompt="lung tumor")[0].modality is None  # mixed channels: guessed per scan


def test_pool_prefers_least_outstanding_and_gives_up_when_all_are_down():
    a, b = Endpoint("a", None, 0), Endpoint("b", None, 1)
    ready = {"a": True, "b": True}
    pool = EndpointPool([a, b], probe=lambda e: ready[e.url], base_cooldown_s=0.05, give_up_s=0.3)
    assert [pool.acquire().url for _ in range(3)] == ["a", "b", "a"]
    pool.release(a)
    pool.release(a, failed=True)  # a cools down: b gets the work even with more outstanding
    assert pool.acquire() is b
    pool.release(b)
    pool.release(b)
    ready["a"] = False
    time.sleep(0.06)
    assert pool.acquire() is b  # a is out of cool-down but b has less work and is not suspect
    pool.release(b, failed=True)  # now both are down
    ready["b"] = False
    start = time.monotonic()
    with pytest.raises(NoEndpoint, match="has answered for"):
        for _ in range(100):  # a and b are probed and fail until the give-up time has passed
            with pytest.raises(EndpointDown):
                pool.acquire()
    assert 0.25 < time.monotonic() - start < 2.0
