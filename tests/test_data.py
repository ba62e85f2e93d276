# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests for medcbm.data: input listing and synthetic sample inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medcbm.data import (
    InputListError,
    InputRecord,
    is_sample_path,
    list_inputs,
    make_sample_inputs,
    write_synthetic_dicom,
)
from medcbm.transforms import ImageReadError, read_image


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8), value, dtype=np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# list_inputs: folders
# --------------------------------------------------------------------------------------------------
def test_list_folder_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _png(root / "b.png")
    _png(root / "A.PNG")
    _png(root / "sub" / "c.png")
    (root / "sub" / "scan.DCM").write_bytes(b"x")  # listed even if unreadable
    (root / "vol.nii.gz").write_bytes(b"x")
    (root / "notes.txt").write_text("no")
    (root / "table.csv").write_text("image\n")
    _png(root / ".hidden" / "h.png")
    _png(root / "._b.png")
    records = list_inputs(root)
    rel = [Path(r.image).relative_to(root).as_posix() for r in records]
    assert rel == ["A.PNG", "b.png", "sub/c.png", "sub/scan.DCM", "vol.nii.gz"]
    assert all(isinstance(r, InputRecord) and r.path.is_absolute() and r.path.exists() for r in records)
    assert all(r.label is None and r.extra == {} for r in records)
    assert records[0].image == os.path.join(str(root), "A.PNG")
    assert list_inputs(str(root)) == records  # str and Path agree, order is stable


def test_list_empty_folder_and_missing_source(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    with pytest.raises(InputListError, match="no supported images") as ei:
        list_inputs(empty)
    assert str(empty) in str(ei.value)
    with pytest.raises(InputListError, match="not found"):
        list_inputs(tmp_path / "does_not_exist")
    other = tmp_path / "x.json"
    other.write_text("{}")
    with pytest.raises(InputListError):
        list_inputs(other)


def test_list_single_image(tmp_path: Path) -> None:
    f = _png(tmp_path / "one.png")
    (rec,) = list_inputs(f)
    assert rec.image == str(f) and rec.path == f.resolve()


# --------------------------------------------------------------------------------------------------
# list_inputs: CSV
# --------------------------------------------------------------------------------------------------
def test_list_csv_relative_absolute_label_extra(tmp_path: Path) -> None:
    data = tmp_path / "site"
    a = _png(data / "imgs" / "a.png")
    b = _png(tmp_path / "elsewhere" / "b.png")
    csv_path = data / "list.csv"
    csv_path.write_text(
        "\ufeffimage,label,site,age\n"  # Excel BOM
        f"imgs/a.png, Melanoma ,north,40\n"
        f"{b},,south,\n"
        "imgs/missing.png,nevus,north,33\n"
        "\n"
    )
    recs = list_inputs(csv_path)
    assert [r.image for r in recs] == ["imgs/a.png", str(b), "imgs/missing.png"]
    assert recs[0].path == a.resolve() and recs[1].path == b.resolve()
    assert recs[2].path == (data / "imgs" / "missing.png").resolve() and not recs[2].path.exists()
    assert [r.label for r in recs] == ["Melanoma", None, "nevus"]
    assert recs[0].extra == {"site": "north", "age": "40"}
    assert recs[1].extra == {"site": "south", "age": ""}
    # the missing file becomes an error when read, not when listed
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(recs[2].path)


def test_list_csv_without_label_column_and_from_other_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "d" / "x.png")
    csv_path = tmp_path / "d" / "in.csv"
    csv_path.write_text("Image\nx.png\n")  # header matched case-insensitively
    monkeypatch.chdir(tmp_path)
    (rec,) = list_inputs("d/in.csv")
    assert rec.label is None and rec.path == (tmp_path / "d" / "x.png").resolve()


@pytest.mark.parametrize(
    "content, match",
    [
        ("path,label\na.png,nevus\n", "no 'image' column"),
        ("", "empty"),
        ("image,label\n", "empty"),
        ("image,label\n,nevus\n", "row 2: empty 'image'"),
        ("image,image\na.png,b.png\n", "duplicate"),
    ],
)
def test_list_csv_errors(tmp_path: Path, content: str, match: str) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(content)
    with pytest.raises(InputListError, match=match) as ei:
        list_inputs(csv_path)
    assert ei.value.path == str(csv_path) and str(ei.value).startswith(str(csv_path))


def test_list_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(InputListError) as ei:
        list_inputs(tmp_path / "nope.csv")
    assert "nope.csv" in str(ei.value)


# --------------------------------------------------------------------------------------------------
# Synthetic samples and DICOM writer
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["dermoscopy", "cxr", "blood"])
def test_make_sample_inputs_readable_and_idempotent(tmp_path: Path, modality: str) -> None:
    paths = make_sample_inputs(modality, tmp_path / "s")
    assert 3 <= len(paths) <= 5
    assert all(p.name.startswith("sample_") and is_sample_path(p) for p in paths)
    suffixes = {p.name.split(".", 1)[1] for p in paths}
    assert "dcm" in suffixes
    for p in paths:
        arr = read_image(p)
        assert arr.dtype == np.float32 and arr.ndim == 3 and min(arr.shape[:2]) >= 64
        assert arr.min() >= 0 and arr.max() <= 1 and arr.std() > 0.05, p.name
        if modality != "cxr":
            assert arr.shape[2] == 3
    mtimes = [p.stat().st_mtime_ns for p in paths]
    contents = [p.read_bytes() for p in paths]
    again = make_sample_inputs(modality, tmp_path / "s")
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == mtimes  # reused, not rewritten
    # a damaged file is rewritten; output is deterministic across folders
    paths[0].write_bytes(b"broken")
    make_sample_inputs(modality, tmp_path / "s")
    assert paths[0].read_bytes() == contents[0]
    other = make_sample_inputs(modality, tmp_path / "t")
    assert [p.read_bytes() for p in other] == contents
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_cxr_samples_cover_dicom_variants_and_nifti(tmp_path: Path) -> None:
    paths = make_sample_inputs("cxr", tmp_path)
    names = [p.name for p in paths]
    assert any(n.endswith(".nii.gz") or n.endswith(".nii") for n in names)
    dicoms = [pydicom.dcmread(p) for p in paths if p.suffix == ".dcm"]
    photometric = {ds.PhotometricInterpretation: ds for ds in dicoms}
    assert {"MONOCHROME1", "MONOCHROME2"} <= set(photometric)
    assert photometric["MONOCHROME1"].BitsStored == 16
    for ds in dicoms:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert "ANONYMOUS" in str(ds.PatientName) and ds.PatientIdentityRemoved == "YES"
    # bone bright, lungs dark, for every CXR sample: centre column (mediastinum) brighter than lung fields
    for p in paths:
        arr = read_image(p)[..., 0]
        h, w = arr.shape
        mediastinum = arr[h // 3 : h // 2, w // 2 - 2 : w // 2 + 2].mean()
        lung = arr[h // 3 : h // 2, int(w * 0.22) : int(w * 0.3)].mean()
        assert mediastinum > lung + 0.2, p.name


def test_derm_and_blood_look_like_their_modality(tmp_path: Path) -> None:
    derm = read_image(make_sample_inputs("dermoscopy", tmp_path / "d")[0])
    h, w, _ = derm.shape
    centre = derm[h // 2 - 5 : h // 2 + 5, w // 2 - 5 : w // 2 + 5].mean(axis=(0, 1))
    skin = derm[h // 2 - 5 : h // 2 + 5, 8:14].mean(axis=(0, 1))
    assert centre.sum() < skin.sum() and centre[0] > centre[2]  # dark, brownish lesion on skin
    blood = read_image(make_sample_inputs("blood", tmp_path / "b")[0])
    corner = blood[:4, :4].mean(axis=(0, 1))
    nucleus = blood.reshape(-1, 3)[blood.sum(axis=2).reshape(-1).argmin()]
    assert corner.mean() > 0.8  # pale background
    assert nucleus[2] > nucleus[1] and nucleus[0] > nucleus[1]  # purple


def test_unknown_modality(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown modality"):
        make_sample_inputs("mri", tmp_path)


def test_write_synthetic_dicom_validates_and_is_deterministic(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    a = write_synthetic_dicom(tmp_path / "a.dcm", arr, bits=8)
    b = write_synthetic_dicom(tmp_path / "b.dcm", arr, bits=8)
    assert a.read_bytes() == b.read_bytes()
    ds = pydicom.dcmread(a)
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (3, 4, 8, 8)
    np.testing.assert_array_equal(ds.pixel_array, arr)
    with pytest.raises(ValueError):
        write_synthetic_dicom(tmp_path / "c.dcm", arr + 300, bits=8)
    with pytest.raises(ValueError):
        write_synthetic_dicom(tmp_path / "d.dcm", arr - 1, bits=8)  # negative but unsigned
    with pytest.raises(ValueError):
        write_synthetic_dicom(tmp_path / "e.dcm", arr, photometric="PALETTE COLOR")
    with pytest.raises(ValueError):
        write_synthetic_dicom(tmp_path / "f.dcm", arr, photometric="RGB", bits=8)


def test_compatibility_exports_stay() -> None:
    """Other modules import these names from medcbm.data and medcbm.transforms; the code moved to medcbm.io."""
    import medcbm.data as data
    import medcbm.io.inputs as inputs
    import medcbm.io.samples as samples
    import medcbm.transforms as transforms

    for name in (
        "InputRecord",
        "InputListError",
        "SAMPLE_MODALITIES",
        "list_inputs",
        "make_sample_inputs",
        "write_synthetic_dicom",
        "is_sample_path",
    ):
        assert name in data.__all__ and hasattr(data, name), name
    assert data.list_inputs is inputs.list_inputs and data.make_sample_inputs is samples.make_sample_inputs
    for name in (
        "SUPPORTED_SUFFIXES",
        "CHANNEL_MODES",
        "FileReasonError",
        "ImageReadError",
        "supported_suffix",
        "read_image",
        "LoadClinicalImage",
        "LoadClinicalImaged",
        "ToModalityChannels",
        "ToModalityChannelsd",
        "EncoderInput",
        "EncoderInputd",
        "preprocessing_fingerprint",
        "ClinicalImagePipeline",
    ):
        assert name in transforms.__all__ and hasattr(transforms, name), name
    assert issubclass(data.InputListError, transforms.FileReasonError)
