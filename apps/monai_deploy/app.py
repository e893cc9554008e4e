"""diffugts as a MONAI Deploy App SDK application: DICOM loader -> series selector -> diffugts
client -> DICOM SEG writer.

    python apps/monai_deploy/app.py -i DICOM_FOLDER -o OUTPUT_FOLDER

Configured by environment, as a packaged app is in its container (MAP): DIFFUGTS_PROMPT (the
target, default "lesion"), DIFFUGTS_BACKEND (triton, the default: the torch-free client against
DIFFUGTS_URL, default 127.0.0.1:8001; or torch / onnx), DIFFUGTS_PRESET (demo), DIFFUGTS_WEIGHTS.
The SDK's loader and selector find the CT / MR series (the largest first); diffugts' own reader
checks its geometry and its SEG writer (highdicom) writes `<SeriesInstanceUID>_seg.dcm`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Fragment, Operator, OperatorSpec
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

CT_OR_MR = '{"selections": [{"name": "CT or MR", "conditions": {"Modality": "(?i)^(CT|MR)$"}}]}'


@dataclass
class Segmented:
    """What the inference operator hands the writer: the series as diffugts read it, the result."""

    volume: object  # diffugts.io.Volume, with .dicom (the series' headers in slice order)
    segmentation: object  # diffugts.pipeline.Segmentation
    prompt: str


class DiffugtsSegmentOperator(Operator):
    """Input `study_selected_series_list` -> output `segmented` (the largest CT / MR series)."""

    def __init__(self, fragment: Fragment, *args, prompt: str, backend: str, preset: str,
                 url: str, weights: str | None = None, **kwargs):
        self.prompt, self.backend, self.preset, self.url, self.weights = prompt, backend, preset, url, weights
        self._executor = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("study_selected_series_list")
        spec.output("segmented")

    def executor(self):
        if self._executor is None:
            from diffugts.executors import make_executor

            self._executor = make_executor(self.backend, self.preset, self.weights, self.url)
        return self._executor

    def compute(self, op_input, op_output, context):
        from diffugts.io import read_volume
        from diffugts.pipeline import run_segmentation

        selected = [s for study in op_input.receive("study_selected_series_list") for s in study.selected_series]
        if not selected:
            raise ValueError("no CT or MR series in the input")
        series = max(selected, key=lambda s: len(s.series.get_sop_instances())).series
        with tempfile.TemporaryDirectory(prefix="diffugts-series-") as folder:
            # diffugts reads (and checks) the series from files: hand it the loader's instances
            for k, instance in enumerate(series.get_sop_instances()):
                instance.get_native_sop_instance().save_as(Path(folder) / f"{k:05d}.dcm")
            volume = read_volume(folder)
            logging.getLogger(__name__).info("segmenting %s: %s", series.SeriesInstanceUID, volume.dicom.choice)
            segmentation = run_segmentation(self.executor(), volume, self.prompt)
        op_output.emit(Segmented(volume, segmentation, self.prompt), "segmented")


class DiffugtsSegWriterOperator(Operator):
    """Input `segmented` -> `<output_folder>/<SeriesInstanceUID>_seg.dcm` (diffugts' highdicom writer)."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, identity, **kwargs):
        self.output_folder, self.identity = Path(output_folder), identity
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("segmented")

    def compute(self, op_input, op_output, context):
        from diffugts.outputs import save_outputs

        item = op_input.receive("segmented")
        written = save_outputs(self.output_folder, item.volume.dicom.series_uid, item.volume, item.segmentation,
                               item.prompt, "dicom-seg", self.identity)
        logging.getLogger(__name__).info("wrote %s", written["seg"])


class DiffugtsApp(Application):
    """DICOM study in, DICOM SEG of the open-vocabulary target out."""

    def compose(self):
        from diffugts.config import get_preset
        from diffugts.dicom_seg import algorithm_identity

        context = Application.init_app_context(self.argv)
        backend = os.environ.get("DIFFUGTS_BACKEND", "triton")
        preset = os.environ.get("DIFFUGTS_PRESET", "demo")
        weights = os.environ.get("DIFFUGTS_WEIGHTS") or None
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=Path(context.input_path),
                                         name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=CT_OR_MR, all_matched=True,
                                               sort_by_sop_instance_count=True, name="series_selector")
        segment = DiffugtsSegmentOperator(self, prompt=os.environ.get("DIFFUGTS_PROMPT", "lesion"), backend=backend,
                                          preset=preset, url=os.environ.get("DIFFUGTS_URL", "127.0.0.1:8001"),
                                          weights=weights, name="diffugts_segment")
        writer = DiffugtsSegWriterOperator(self, output_folder=Path(context.output_path),
                                           identity=algorithm_identity(get_preset(preset), weights, backend),
                                           name="diffugts_seg_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, segment, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(segment, writer, {("segmented", "segmented")})


if __name__ == "__main__":
    DiffugtsApp().run()
