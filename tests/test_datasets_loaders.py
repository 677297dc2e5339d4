"""File-based loaders on small files written in the exact public formats: FETAL_PLANES_DB, African planes, CSV."""

import pytest
import torch
from mtdisent_plugins.datasets import _imageio
from mtdisent_plugins.datasets.csv_images import csv_images, folder_images
from mtdisent_plugins.datasets.fetal_planes import african_fetal_planes, fetal_planes_db
from PIL import Image

import mtdisent as md
from mtdisent import ComponentError, DataError
from mtdisent.testing import check_dataset

SIZE = (24, 32)
PLANES = ["Fetal brain", "Fetal abdomen", "Other", "Fetal femur"]
MACHINES = ["Voluson E6", "Aloka", "Other"]
MODES = ["L", "RGB", "RGBA", "I;16"]
FILL = {"L": 100, "RGB": (200, 10, 10), "RGBA": (10, 200, 10, 255), "I;16": 30000}


def write_image(path, mode, size, value=None):
    img = Image.new(mode, size, FILL[mode] if value is None else value)
    # a gradient in one corner so images are not constant
    for x in range(min(8, size[0])):
        img.putpixel((x, 0), 0 if mode in ("L", "I;16") else (0,) * len(img.getbands()))
    img.save(path)


@pytest.fixture
def fpdb(tmp_path):
    """FETAL_PLANES_DB layout: ';' CSV with a trailing space in 'Train ', Images/<Image_name>.png, mixed modes."""
    root = tmp_path / "FETAL_PLANES_ZENODO"
    (root / "Images").mkdir(parents=True)
    lines = ["Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "]
    k = 0
    for p in range(1, 17):
        for j in range(3):
            name = f"Patient{p:05d}_Plane{j + 1}_1_of_1"
            plane = PLANES[(p + j) % len(PLANES)]
            brain = "Trans-thalamic" if plane == "Fetal brain" else "Not A Brain"
            lines.append(f"{name};{p};{plane};{brain};Op. {1 + p % 3};{MACHINES[(2 * p + j) % 3]};{int(p <= 11)}")
            mode = MODES[k % len(MODES)]
            write_image(root / "Images" / f"{name}.png", mode, (40 + p, 30 + j))
            k += 1
    (root / "FETAL_PLANES_DB_data.csv").write_text("\n".join(lines) + "\n")
    return root


def rows_of(root):
    text = (root / "FETAL_PLANES_DB_data.csv").read_text().splitlines()
    header = [c.strip() for c in text[0].split(";")]
    return [dict(zip(header, line.split(";"), strict=True)) for line in text[1:]]


# ----------------------------------------------------------------------------------------------------
# FETAL_PLANES_DB
# ----------------------------------------------------------------------------------------------------
def test_fetal_planes_db_public_format(fpdb):
    source = fetal_planes_db(str(fpdb), image_size=SIZE)
    assert list(source) == ["train", "val", "test"]
    assert source.input_shape == (1, *SIZE)
    assert [t.name for t in source.tasks] == ["plane", "us_machine"]
    # classes counted from the file and sorted (no hard-coded list: 'Maternal cervix' is absent here)
    assert source.tasks[0].classes == sorted(PLANES)
    assert source.tasks[1].classes == sorted(MACHINES)
    rows = rows_of(fpdb)
    n_train = sum(r["Train"].strip() == "1" for r in rows)
    assert len(source["train"]) + len(source["val"]) == n_train
    assert len(source["test"]) == len(rows) - n_train
    check_dataset(source)
    x, labels = source["test"][0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(correction=0)) - 1) < 1e-3
    # labels match the CSV row of the file
    ds = source["train"]
    row = next(r for r in rows if r["Image_name"] == ds.paths[3].stem)
    assert ds[3][1] == {
        "plane": source.tasks[0].classes.index(row["Plane"]),
        "us_machine": source.tasks[1].classes.index(row["US_Machine"]),
    }
    model = md.build_model(md.Experiment(tasks=source.tasks, input_shape=source.input_shape, head={"hidden": [4]}))
    feats, labels = md.evaluation.collect_features(model, ds, batch_size=3)
    assert feats["plane"].shape[0] == len(ds) and labels["plane"].dtype == torch.long
    assert labels["plane"][3] == ds[3][1]["plane"]


def test_fetal_planes_db_val_split_is_patient_disjoint(fpdb):
    source = fetal_planes_db(fpdb, image_size=SIZE, val_fraction=0.3, seed=3)
    train, val, test = (set(source[s].groups) for s in ("train", "val", "test"))
    assert val and not (train & val) and not (test & (train | val))
    assert test == {str(p) for p in range(12, 17)}
    n = len(source["train"]) + len(source["val"])
    assert len(source["val"]) >= 0.3 * n
    again = fetal_planes_db(fpdb, image_size=SIZE, val_fraction=0.3, seed=3)
    assert set(again["val"].groups) == val
    assert "val" not in fetal_planes_db(fpdb, image_size=SIZE, val_fraction=0.0)


def test_fetal_planes_db_holdout_only_in_unseen(fpdb):
    cell = {"Plane": "Fetal brain", "US_Machine": "Aloka"}
    source = fetal_planes_db(fpdb, tasks=["plane", "us_machine"], image_size=SIZE, holdout=[cell])
    plane, machine = source.tasks[0].classes.index("Fetal brain"), source.tasks[1].classes.index("Aloka")
    for name in ("train", "val", "test"):
        labels = source[name].labels
        assert not ((labels["plane"] == plane) & (labels["us_machine"] == machine)).any(), name
    unseen = source["unseen"]
    assert ((unseen.labels["plane"] == plane) & (unseen.labels["us_machine"] == machine)).all()
    rows = rows_of(fpdb)
    held = [r for r in rows if r["Plane"] == "Fetal brain" and r["US_Machine"] == "Aloka"]
    assert len(unseen) == len(held) > 0
    assert {r["Train"].strip() for r in held} == {"0", "1"}  # collected from train and test alike
    assert sum(len(source[s]) for s in source) == len(rows)
    assert source.factors["holdout"] == [cell]


def test_fetal_planes_db_other_task_columns(fpdb):
    source = fetal_planes_db(fpdb, tasks=["Brain_plane", "Operator", "Plane"], image_size=SIZE)
    assert [t.name for t in source.tasks] == ["brain_plane", "operator", "plane"]
    assert source.tasks[1].classes == ["Op. 1", "Op. 2", "Op. 3"]


def test_fetal_planes_db_unknown_column_suggests(fpdb):
    with pytest.raises(DataError, match=r"no task column 'US_Machin'.*Did you mean 'US_Machine'"):
        fetal_planes_db(fpdb, tasks=["Plane", "US_Machin"], image_size=SIZE)
    with pytest.raises(DataError, match="cannot be a task"):
        fetal_planes_db(fpdb, tasks=["Patient_num"], image_size=SIZE)
    with pytest.raises(DataError, match=r"'Fetal brian' never occurs in column 'Plane'.*Did you mean 'Fetal brain'"):
        fetal_planes_db(fpdb, image_size=SIZE, holdout=[{"Plane": "Fetal brian"}])
    with pytest.raises(DataError, match="FETAL_PLANES_DB_data.csv not found"):
        fetal_planes_db(fpdb / "Images", image_size=SIZE)
    with pytest.raises(ComponentError, match="on_missing"):
        fetal_planes_db(fpdb, image_size=SIZE, on_missing="ignore")


def test_fetal_planes_db_missing_file_error_names_it(fpdb):
    victim = fpdb / "Images" / "Patient00005_Plane2_1_of_1.png"
    victim.unlink()
    line = 1 + next(i for i, r in enumerate(rows_of(fpdb), start=1) if r["Image_name"] == victim.stem)
    with pytest.raises(DataError, match=rf"Patient00005_Plane2_1_of_1\.png.*FETAL_PLANES_DB_data\.csv line {line}"):
        fetal_planes_db(fpdb, image_size=SIZE)
    source = fetal_planes_db(fpdb, image_size=SIZE, on_missing="skip")
    assert source.factors["skipped"] == 1
    assert len(source.skipped) == 1 and source.skipped[0]["path"].endswith(victim.name)
    assert sum(len(source[s]) for s in source) == len(rows_of(fpdb)) - 1


def test_fetal_planes_db_unreadable_file_named_on_read(fpdb):
    victim = fpdb / "Images" / "Patient00002_Plane1_1_of_1.png"
    victim.write_bytes(b"not a png at all")
    source = fetal_planes_db(fpdb, image_size=SIZE, val_fraction=0.0)
    ds = source["train"]
    i = [p.name for p in ds.paths].index(victim.name)
    with pytest.raises(DataError, match=r"cannot read image .*Patient00002_Plane1_1_of_1\.png.*line \d+"):
        ds[i]


def test_fetal_planes_db_max_samples_and_cache(fpdb):
    source = fetal_planes_db(fpdb, image_size=SIZE, max_samples=20, cache=True, seed=1)
    assert sum(len(source[s]) for s in source) == 20
    ds = source["train"]
    first = ds[0][0]
    assert torch.allclose(ds[0][0], first, atol=1e-2)  # the second read comes from the float16 cache


def test_image_modes_are_read_as_grayscale(tmp_path):
    cases = {
        "L": (Image.new("L", (10, 8), 51), 51 / 255),
        "RGB": (Image.new("RGB", (10, 8), (255, 0, 0)), 0.299),
        "RGBA": (Image.new("RGBA", (10, 8), (255, 255, 255, 128)), 128 / 255),  # composited on black
        "I;16": (Image.new("I;16", (10, 8), 65535), 1.0),
        "P": (Image.new("RGB", (10, 8), (0, 0, 255)).convert("P"), 0.114),
    }
    for mode, (img, expected) in cases.items():
        path = tmp_path / f"{mode.replace(';', '_')}.png"
        img.save(path)
        x = _imageio.read_image(path, (6, 5))
        assert x.shape == (1, 6, 5), mode
        assert abs(float(x.mean()) - expected) < 0.01, (mode, float(x.mean()), expected)
        rgb = _imageio.read_image(path, (6, 5), channels=3)
        assert rgb.shape == (3, 6, 5)
    # 16-bit values keep their precision through resizing
    ramp = Image.new("I;16", (4, 1))
    for i, v in enumerate([0, 1000, 2000, 3000]):
        ramp.putpixel((i, 0), v)
    ramp.save(tmp_path / "ramp.png")
    x = _imageio.read_image(tmp_path / "ramp.png", (1, 4))
    assert torch.allclose(x[0, 0] * 65535, torch.tensor([0.0, 1000, 2000, 3000]), atol=1.0)


# ----------------------------------------------------------------------------------------------------
# African fetal planes
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(params=[",", ";"])
def african(tmp_path, request):
    sep = request.param
    root = tmp_path / "Zenodo_dataset"
    centres = {"Algeria": "DZA", "Egypt": "EGY", "Malawi": "MWI"}
    planes = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"]
    lines = [sep.join(["Patient_num", "Filename", "Plane", "Train", "Center"])]
    k = 0
    for centre, code in centres.items():
        (root / centre).mkdir(parents=True)
        for p in range(1, 6):  # patient numbers restart in every centre
            for j in range(4):
                name = f"patient{p:03d}_{code}_plane{j}"
                lines.append(sep.join([str(p), name, planes[j], str(int(p <= 3)), centre]))
                write_image(root / centre / f"{name}.png", MODES[k % 4], (30, 26))
                k += 1
    (root / "African_planes_database.csv").write_text("\n".join(lines) + "\n")
    return root


def test_african_fetal_planes(african):
    source = african_fetal_planes(str(african), image_size=SIZE, val_fraction=0.25, seed=0)
    assert [t.name for t in source.tasks] == ["plane", "center"]
    assert source.tasks[1].classes == ["Algeria", "Egypt", "Malawi"]
    train, val, test = (set(source[s].groups) for s in ("train", "val", "test"))
    assert all(isinstance(g, tuple) and len(g) == 2 for g in train)  # (Center, Patient_num)
    assert val and not (train & val) and not (test & (train | val))
    # patient 1 of Algeria and patient 1 of Egypt are different patients
    assert len(train | val) == 9 and len(test) == 6
    assert sum(len(source[s]) for s in source) == 60
    check_dataset(source)


def test_african_fetal_planes_missing_and_holdout(african):
    (african / "Egypt" / "patient002_EGY_plane1.png").unlink()
    with pytest.raises(DataError, match=r"Egypt/patient002_EGY_plane1\.png.*African_planes_database\.csv line \d+"):
        african_fetal_planes(african, image_size=SIZE)
    source = african_fetal_planes(
        african, image_size=SIZE, on_missing="skip", holdout=[{"Plane": "Fetal brain", "Center": "Malawi"}]
    )
    assert source.factors["skipped"] == 1
    unseen = source["unseen"]
    assert len(unseen) == 5 and {g[0] for g in unseen.groups} == {"Malawi"}


# ----------------------------------------------------------------------------------------------------
# generic CSV and folders
# ----------------------------------------------------------------------------------------------------
def test_csv_images_split_column_and_unlabelled(tmp_path):
    (tmp_path / "img").mkdir()
    lines = ["file,grade,site,fold"]
    for i in range(30):
        write_image(tmp_path / "img" / f"{i}.png", "RGB", (20, 20))
        grade = "" if i % 7 == 0 else str([2, 10, 1][i % 3])
        fold = ["training", "validation", "test"][0 if i < 18 else (1 if i < 24 else 2)]
        lines.append(f"img/{i},{grade},{'ab'[i % 2]},{fold}")
    csv = tmp_path / "table.csv"
    csv.write_text("\n".join(lines) + "\n")
    source = csv_images(
        str(csv), "file", ["grade", "site"], split_column="fold", image_suffix=".png", image_size=SIZE, channels=3
    )
    assert list(source) == ["train", "val", "test"]
    assert [len(source[s]) for s in source] == [18, 6, 6]
    assert source.tasks[0].classes == ["1", "2", "10"]  # integers sorted numerically
    assert source.input_shape == (3, *SIZE)
    grades = torch.cat([source[s].labels["grade"] for s in source])
    assert int((grades == -1).sum()) == 5  # empty cells are unlabelled
    check_dataset(source)
    with pytest.raises(DataError, match=r"no label column 'grad'.*Did you mean 'grade'"):
        csv_images(str(csv), "file", ["grad"])


def test_csv_images_random_group_split(tmp_path):
    lines = ["path;label;patient"]
    for i in range(40):
        write_image(tmp_path / f"{i}.png", "L", (16, 16))
        lines.append(f"{i}.png;{'yes' if i % 2 else 'no'};{i // 4}")
    csv = tmp_path / "t.csv"
    csv.write_text("\n".join(lines) + "\n")
    source = csv_images(
        str(csv), "path", ["label"], group_column="patient", val_fraction=0.2, test_fraction=0.2, image_size=SIZE
    )
    groups = {s: set(source[s].groups) for s in source}
    assert set(source) == {"train", "val", "test"}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert sum(len(source[s]) for s in source) == 40
    assert 8 <= len(source["test"]) <= 12 and 8 <= len(source["val"]) <= 12
    with pytest.raises(ComponentError, match="val_fraction"):
        csv_images(str(csv), "path", ["label"], val_fraction=1.5)


def test_folder_images(tmp_path):
    for machine in ("aloka", "voluson"):
        for cls in ("cat", "dog"):
            (tmp_path / machine / cls).mkdir(parents=True)
            for i in range(5):
                write_image(tmp_path / machine / cls / f"{i}.png", "L", (12, 12))
    (tmp_path / "aloka" / "cat" / ".hidden.png").write_bytes(b"x")
    source = folder_images(
        str(tmp_path),
        tasks=["machine", "animal"],
        image_size=SIZE,
        val_fraction=0.2,
        test_fraction=0.2,
        holdout=[{"machine": "aloka", "animal": "dog"}],
    )
    assert [t.name for t in source.tasks] == ["machine", "animal"]
    assert source.tasks[1].classes == ["cat", "dog"]
    assert sum(len(source[s]) for s in source) == 20 and len(source["unseen"]) == 5
    check_dataset(source)
    single = folder_images(str(tmp_path / "voluson"), image_size=SIZE)
    assert single.tasks[0].name == "label" and len(single["train"]) + len(single["val"]) + len(single["test"]) == 10


def test_table_reader_strips_and_reports(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("\ufeff a ; b ;c \n1; 2 ;3\n\n4;5;6;7\n")
    with pytest.raises(DataError, match=r"x\.csv line 4: 4 cells but the header has 3 columns"):
        _imageio.read_table(csv)
    csv.write_text(" a ; b ;c \n1; 2 ;3\n4;5;6\n")
    table = _imageio.read_table(csv)
    assert table.columns == ["a", "b", "c"] and table.rows[0] == {"a": "1", "b": "2", "c": "3"}
    assert table.delimiter == ";" and table.lines == [2, 3]
