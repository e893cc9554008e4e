"""Input grid <-> model grid: RAS orientation, model spacing, MAISI intensity, padding.

Composed from small named steps; `ModelGrid` remembers what was done so that `to_input_grid`
can undo it for masks and maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

from .io import Volume

CT_WINDOW = (-1000.0, 1000.0)
MR_PERCENTILE = 99.5


def guess_modality(array: np.ndarray) -> str:
    """CT volumes hold air near -1000 HU; MR intensities are non-negative."""
    return "CT" if float(np.percentile(array, 1)) < -500 else "MR"


def scale_intensity(array: np.ndarray, modality: str) -> np.ndarray:
    """MAISI: CT HU clipped to [-1000, 1000] -> [0, 1]; MR 0..99.5th percentile -> [0, 1]."""
    if modality == "CT":
        lo, hi = CT_WINDOW
    elif modality == "MR":
        lo, hi = 0.0, float(np.percentile(array, MR_PERCENTILE))
        hi = hi if hi > lo else lo + 1.0
    else:
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    # one float32 copy, then in place: clipping in input units first gives the same values as
    # clipping after scaling ((hi - lo) / (hi - lo) is exactly 1), with no float64 temporaries
    # (copying the reoriented view first, then clipping in place, measured faster than clipping
    # from the strided view into a new array)
    out = np.array(array, dtype=np.float32, order="C", copy=True)
    np.clip(out, lo, hi, out=out)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return out


def resample(array: np.ndarray, out_shape: tuple[int, ...], order: int = 1,
             box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Resample onto `out_shape` with voxel centres aligned at the corners' convention of zoom.

    `box`: only these voxels of the output grid, with the very coordinates the whole grid would
    use (scipy computes (index + shift) * zoom; the shift is made to be the box's exact start)."""
    scale = np.asarray([(i - 1) / max(o - 1, 1) for i, o in zip(array.shape, out_shape)])
    array = np.asarray(array, dtype=np.float32)
    if box is None:
        return ndimage.affine_transform(array, scale, output_shape=tuple(out_shape), order=order,
                                        mode="nearest", output=np.float32)
    start = np.asarray([b.start for b in box], dtype=np.float64)
    offset = start * scale
    for axis in range(len(box)):  # scipy divides the offset back by the scale: make that exact
        if scale[axis] == 0:
            continue
        for candidate in (offset[axis], np.nextafter(offset[axis], np.inf), np.nextafter(offset[axis], -np.inf)):
            if candidate / scale[axis] == start[axis]:
                offset[axis] = candidate
                break
    return ndimage.affine_transform(array, scale, offset=offset, output_shape=tuple(b.stop - b.start for b in box),
                                    order=order, mode="nearest", output=np.float32)


@dataclass
class ModelGrid:
    ornt: np.ndarray  # input -> RAS orientation transform
    canonical_shape: tuple[int, ...]
    resampled_shape: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]

    @property
    def unpadded(self) -> tuple[slice, ...]:
        """The resampled volume inside the padded model grid."""
        return tuple(slice(lo, lo + n) for (lo, _), n in zip(self.pad, self.resampled_shape))

    def _back(self) -> np.ndarray:
        return nio.ornt_transform(nio.axcodes2ornt("RAS"), self.ornt)

    def to_input_orientation(self, array: np.ndarray) -> np.ndarray:
        return nio.apply_orientation(array, self._back())

    def input_box(self, box: tuple[slice, ...]) -> tuple[slice, ...]:
        """A box of the canonical (RAS) grid as a box of the input grid."""
        out: list[slice] = [slice(None)] * len(box)
        for axis, (b, n) in enumerate(zip(box, self.canonical_shape)):
            target, flip = int(self._back()[axis, 0]), self._back()[axis, 1] == -1
            out[target] = slice(n - b.stop, n - b.start) if flip else slice(b.start, b.stop)
        return tuple(out)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(b.stop - b.start for b in self.input_box(tuple(slice(0, n) for n in self.canonical_shape)))

    def to_input_grid(self, array: np.ndarray, order: int = 1) -> np.ndarray:
        """Undo padding, resampling and reorientation of a model-grid map."""
        return self.to_input_orientation(resample(array[self.unpadded], self.canonical_shape, order=order))

    def box_to_input_grid(self, array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
        """The voxels of a canonical-grid box of `to_input_grid(array)`, in input orientation,
        computed alone (the values are those the whole map would have there)."""
        values = resample(array[self.unpadded], self.canonical_shape, box=box)
        return self.to_input_orientation(values)


def _canonical(volume: Volume, spacing) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """RAS-oriented array, the orientation transform, and the shape at the model spacing."""
    ornt = nio.io_orientation(volume.affine)
    canonical = nio.apply_orientation(volume.array, ornt)
    in_spacing = volume.spacing[np.argsort(ornt[:, 0])]  # spacing along RAS axes
    shape = tuple(max(int(round(n * s / t)), 1) for n, s, t in zip(canonical.shape, in_spacing, spacing))
    return canonical, ornt, shape


def _padding(shape, patch: int, multiple: int) -> tuple[tuple[int, int], ...]:
    target = [max(patch, -(-n // multiple) * multiple) for n in shape]
    return tuple(((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(shape, target))


def to_model_grid(volume: Volume, modality: str, spacing, patch: int,
                  multiple: int = 4) -> tuple[np.ndarray, ModelGrid]:
    canonical, ornt, shape = _canonical(volume, spacing)
    resampled = resample(scale_intensity(canonical, modality), shape)
    pad = _padding(shape, patch, multiple)
    grid = ModelGrid(ornt, canonical.shape, shape, pad)
    return np.pad(resampled, pad, mode="constant", constant_values=0.0), grid


def labels_to_model_grid(volume: Volume, spacing, patch: int, multiple: int = 4) -> np.ndarray:
    """An integer label map onto the same grid `to_model_grid` gives its image (nearest neighbour)."""
    canonical, _, shape = _canonical(volume, spacing)
    resampled = resample(canonical.astype(np.float32), shape, order=0)
    return np.pad(np.rint(resampled).astype(np.int16), _padding(shape, patch, multiple), mode="constant")
