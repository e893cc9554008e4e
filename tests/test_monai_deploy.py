"""The MONAI Deploy App SDK application (apps/monai_deploy): the SDK's DICOM loader and series
selector -> the diffugts client (tiny preset, torch) -> diffugts' DICOM SEG writer, run as a
packaged app is run (`python app.py -i IN -o OUT`, configured by environment)."""

import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from diffugts.dicom_series import write_series

# `make test-deploy` runs this in .venv-deploy (the `deploy` extra); the SDK stays out of .venv
pytest.importorskip("monai.deploy.core", reason="needs the `deploy` extra: run `make test-deploy`")
APP = Path(__file__).resolve().parents[1] / "apps" / "monai_deploy" / "app.py"


@pytest.mark.slow
def test_monai_deploy_app_writes_a_seg_of_the_largest_series(tmp_path):
    affine = np.diag([-4.0, -4.0, 4.0, 1.0])
    rng = np.random.default_rng(0)
    large = write_series(rng.normal(300, 40, (24, 20, 8)).astype(np.float32), affine, tmp_path / "in" / "a", "MR")
    write_series(rng.normal(300, 40, (24, 20, 5)).astype(np.float32), affine, tmp_path / "in" / "b", "MR")
    env = {**os.environ, "DIFFUGTS_BACKEND": "torch", "DIFFUGTS_PRESET": "tiny", "DIFFUGTS_PROMPT": "kidney tumor",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(APP), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in large]
    seg = hd.seg.segread(tmp_path / "out" / f"{source[0].SeriesInstanceUID}_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {s.SOPInstanceUID for s in source}
    description = seg.get_segment_description(1)
    assert description.segment_label == "kidney tumor"
    assert description.segmented_property_type.value == "108369006"
    assert "preset=tiny" in description.algorithm_identification[0].AlgorithmParameters
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{source[0].SeriesInstanceUID}_seg.dcm"]
