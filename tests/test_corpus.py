"""The training corpus of real anatomy: built from what is installed, checked against its own files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from diffugts import corpus
from diffugts.cli import main
from diffugts.sdists import default_sdist

INSTALLED = {
    "nilearn-mni152": importlib.util.find_spec("nilearn") is not None,
    "mricron-colin27": (corpus.MRICRON_TEMPLATES / "ch2.nii.gz").exists(),
    "invesalius-cranium": corpus.INVESALIUS_CRANIUM.exists(),
    "totalsegmentator": default_sdist("totalsegmentator").is_file(),
}
needs = {name: pytest.mark.skipif(not ok, reason=f"{name} not installed (make corpus-sources)")
         for name, ok in INSTALLED.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every source, three phantoms: one build shared by the tests below (~40 s on 2 cores)."""
    out = tmp_path_factory.mktemp("corpus")
    path = corpus.build_corpus(out, n_phantoms=3)
    return out, json.loads(path.read_text()), {c["id"]: c for c in corpus.load_corpus(out)}


def test_dataset_json_matches_the_files(built):
    out, manifest, cases = built
    assert manifest["name"] == "diffugts-anatomy"
    assert manifest["numTraining"] == len(manifest["training"]) == len(cases)
    for name, ok in INSTALLED.items():
        assert (name in manifest["sources"]) == ok, name
    for source in manifest["sources"].values():
        assert source["licence"] and source["citation"] and source["package"]
    ids = [e["id"] for e in manifest["training"]]
    assert len(set(ids)) == len(ids)
    for sub in ("images", "labels", "organs"):
        assert sorted(p.name for p in (out / sub).iterdir()) == sorted(f"{i}.nii.gz" for i in ids)
    for entry in manifest["training"]:
        assert entry["image"] == f"./images/{entry['id']}.nii.gz"
        assert entry["modality"] in ("CT", "MR") and entry["region"] in ("head", "body")
        assert entry["source"] in manifest["sources"]
        image, labels, organs = (nib.load(str(out / entry[k])) for k in ("image", "labels", "organs"))
        assert image.get_data_dtype() == np.float32
        assert labels.get_data_dtype() == np.int16 and organs.get_data_dtype() == np.uint8
        assert image.shape == labels.shape == organs.shape == tuple(entry["shape"])
        np.testing.assert_allclose(labels.affine, image.affine)
        np.testing.assert_allclose(organs.affine, image.affine)
        present = set(np.unique(np.asanyarray(organs.dataobj)).tolist()) - {0}
        assert present and present <= {int(k) for k in entry["organ_names"]}, entry["id"]
        named = {int(k) for k in manifest["labels"]}
        assert set(np.unique(np.asanyarray(labels.dataobj)).tolist()) <= named, entry["id"]
    kinds = {(e["source"], e["modality"], e["region"]) for e in manifest["training"]}
    assert {("phantom", "CT", "body"), ("phantom", "MR", "body"), ("phantom", "MR", "head")} <= kinds
    assert ("pydicom-data", "MR", "head") in kinds


def test_load_corpus_returns_arrays(built):
    out, manifest, cases = built
    for entry in manifest["training"]:
        case = cases[entry["id"]]
        assert case["image"].dtype == np.float32 and case["labels"].dtype == np.int16 and case["organs"].dtype == np.uint8
        assert case["affine"].shape == (4, 4)
        for key in ("modality", "region", "organ_names", "source"):
            assert case[key] == entry[key]
    with pytest.raises(FileNotFoundError, match="diffugts corpus --out"):
        corpus.load_corpus(out / "nowhere")


def test_labels_partition_the_head_and_organs_lie_inside(built):
    _, manifest, cases = built
    for entry in manifest["training"]:
        case = cases[entry["id"]]
        inside = case["labels"] > 0
        # background only outside: no enclosed pocket of label 0
        assert np.array_equal(ndimage.binary_fill_holes(inside), inside), entry["id"]
        assert np.all(inside[case["organs"] > 0]), entry["id"]
        if (~inside).any():  # air outside is darker than what is inside
            image = case["image"]
            if entry["modality"] == "CT":
                assert np.percentile(image[~inside], 99) <= -900, entry["id"]
            else:
                assert image[~inside].mean() < 0.2 * image[inside].mean(), entry["id"]
        # the crop keeps a margin of background around the head but not much more
        if entry["source"] != "pydicom-data":
            idx = np.argwhere(inside)
            assert np.all(idx.min(0) <= 4) and np.all(np.array(inside.shape) - 1 - idx.max(0) <= 4), entry["id"]


def test_affines_are_ras_with_the_sources_spacing(built):
    _, manifest, cases = built
    expected = {"nilearn-mni152": (1.0, 1.0, 1.0), "mricron-colin27": (1.0, 1.0, 1.0),
                "invesalius-cranium": (0.957031, 0.957031, 1.5), "phantom": (1.5, 1.5, 1.5),
                "pydicom-data": (1.2, 1.2, 1.2), "totalsegmentator": (3.0, 3.0, 3.0)}
    for entry in manifest["training"]:
        affine = cases[entry["id"]]["affine"]
        assert nib.aff2axcodes(affine) == ("R", "A", "S"), entry["id"]
        np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), expected[entry["source"]], atol=1e-4)
        np.testing.assert_allclose(entry["spacing"], expected[entry["source"]], atol=1e-4)


@needs["invesalius-cranium"]
def test_head_ct_reads_in_hu_with_the_skull_bright(built):
    _, _, cases = built
    ct = cases["invesalius_cranium_ct"]
    hu, labels, brain = ct["image"], ct["labels"], ct["organs"] > 0
    assert hu.min() == -1024 and hu.max() > 1500
    assert np.median(hu[labels == corpus.BONE]) > 300
    assert 15 < np.median(hu[brain]) < 50  # brain parenchyma
    voxel_ml = np.prod(np.sqrt((ct["affine"][:3, :3] ** 2).sum(0))) / 1000
    assert 1000 < brain.sum() * voxel_ml < 1700  # an adult brain, not the scalp or a fragment
    # the skull is above the brain's lowest point and wraps it: bone lies above the brain's top
    top = np.argwhere(brain)[:, 2].max()
    assert (labels[:, :, top + 1:] == corpus.BONE).any()
    # the head rests on nothing: outside the head is air
    assert np.all(hu[labels == 0] == -1024)


@needs["mricron-colin27"]
def test_colin27_carries_the_atlases(built):
    _, _, cases = built
    labels = cases["colin27_ch2"]["labels"]
    regions = np.unique(labels)
    aal = regions[(regions > corpus.ATLAS_OFFSETS["aal"]) & (regions < corpus.ATLAS_OFFSETS["harvard_oxford"])]
    jhu = regions[regions > corpus.ATLAS_OFFSETS["jhu"]]
    assert len(aal) > 100 and len(jhu) > 30
    for tissue in (corpus.CSF, corpus.GREY_MATTER, corpus.WHITE_MATTER, corpus.BONE, corpus.SOFT_TISSUE, corpus.FAT):
        assert (labels == tissue).sum() > 1000, tissue
    # brain in the middle of the head, the skull and scalp around it
    brain = cases["colin27_ch2"]["organs"] > 0
    assert 1000 < brain.sum() / 1000 < 1900  # ml at 1 mm
    better = cases["colin27_ch2better"]["labels"]
    assert (better > corpus.ATLAS_OFFSETS["harvard_oxford"]).sum() > 100_000


@needs["nilearn-mni152"]
def test_mni152_uses_the_tissue_maps(built):
    _, _, cases = built
    labels = cases["mni152_t1"]["labels"]
    for tissue in (corpus.CSF, corpus.GREY_MATTER, corpus.WHITE_MATTER):
        assert (labels == tissue).sum() > 10_000
    assert np.array_equal(labels > 0, cases["mni152_t1"]["organs"] > 0)  # skull-stripped: head = brain


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_build_is_deterministic(tmp_path):
    for name in ("a", "b"):
        corpus.build_corpus(tmp_path / name, sources=["phantom", "pydicom-data"], n_phantoms=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # a rebuild with fewer sources into the same folder leaves no unlisted volume behind
    corpus.build_corpus(tmp_path / "a", sources=["pydicom-data"])
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == ["pydicom_emri_small.nii.gz"]


def test_missing_source_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "MRICRON_TEMPLATES", tmp_path / "no-mricron")
    with pytest.warns(UserWarning, match="skipping mricron-colin27: .*mricron-data"):
        path = corpus.build_corpus(tmp_path / "c", sources=["mricron-colin27", "pydicom-data"])
    manifest = json.loads(path.read_text())
    assert list(manifest["sources"]) == ["pydicom-data"] and "mricron-colin27" in manifest["skipped"]
    assert [e["source"] for e in manifest["training"]] == ["pydicom-data"]
    # the command line: one warning line, a corpus all the same
    assert main(["corpus", "--out", str(tmp_path / "d"), "--sources", "mricron-colin27,pydicom-data"]) == 0
    err = capsys.readouterr().err
    assert sum("warning: corpus: skipping mricron-colin27" in line for line in err.splitlines()) == 1
    assert (tmp_path / "d" / "images" / "pydicom_emri_small.nii.gz").exists()


def test_unknown_source_is_one_line_error(tmp_path, capsys):
    assert main(["corpus", "--out", str(tmp_path / "e"), "--sources", "colin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffugts: error: unknown corpus sources ['colin']; known: " + ", ".join(corpus.BUILDERS)]
    assert not (tmp_path / "e").exists()


def test_phantom_bodies_are_in_ras(built):
    """Liver on the patient's right, spleen on the left, spine behind, lungs on top (world mm)."""
    _, manifest, cases = built
    body = next(cases[e["id"]] for e in manifest["training"] if e["source"] == "phantom" and e["region"] == "body")
    ids = {name: int(k) for k, name in body["organ_names"].items()}

    def centre(mask):
        return body["affine"][:3, :3] @ np.argwhere(mask).mean(0) + body["affine"][:3, 3]

    liver, spleen, lung = (centre(body["organs"] == ids[n]) for n in ("liver", "spleen", "lung"))
    spine = centre(body["labels"] == corpus.BONE)
    assert liver[0] > 0 > spleen[0]
    assert spine[1] < liver[1]
    assert lung[2] > liver[2]


@needs["totalsegmentator"]
def test_real_bodies_put_organs_where_totalsegmentator_maps_them(built, tmp_path):
    """The example CT and MR: organ maps equal to the files' own classes, in RAS, in HU for CT."""
    from diffugts.corpus_body import FILES, ORGANS, STRUCTURES
    from diffugts.sdists import checked_sdist, extract

    _, _, cases = built
    files = extract(checked_sdist("totalsegmentator"), [f for pair in FILES.values() for f in pair], tmp_path)
    for modality in ("CT", "MR"):
        body = cases[f"totalsegmentator_{modality.lower()}_abdomen"]
        classes = np.asanyarray(nib.as_closest_canonical(nib.load(str(files[FILES[modality][1]]))).dataobj)
        ids = {name: int(k) for k, name in body["organ_names"].items()}
        for organ, indices in ORGANS[modality].items():
            expected = int(np.isin(classes, indices).sum())
            assert int((body["labels"] == corpus.PHANTOM_ORGAN_LABELS[organ]).sum()) == expected, (modality, organ)
            if organ in ids:
                assert int((body["organs"] == ids[organ]).sum()) == expected, (modality, organ)
        # the MR slab grazes the lung (a few voxels): no lesion could go there, so it is not offered
        assert ("lung" in ids) == (modality == "CT")
        offset = corpus.BODY_OFFSET + (0 if modality == "CT" else 100)
        stomach = next(i for i, name in STRUCTURES[modality].items() if name == "stomach")
        assert int((body["labels"] == offset + stomach).sum()) == int((classes == stomach).sum()) > 0

        def centre(mask):
            return body["affine"][:3, :3] @ np.argwhere(mask).mean(0) + body["affine"][:3, 3]

        liver, spleen = centre(body["organs"] == ids["liver"]), centre(body["organs"] == ids["spleen"])
        assert liver[0] > spleen[0]  # the liver on the patient's right
        if modality == "CT":
            image = body["image"]
            assert np.median(image[body["organs"] == ids["liver"]]) == pytest.approx(50, abs=40)
            assert np.median(image[body["labels"] == corpus.BONE]) > 100  # vertebrae and ribs, marrow included
