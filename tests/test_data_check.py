"""`python -m detr_jax.data.check` and the json-level checks of `coco.load_coco_folder` on bad COCO
folders: three real coco-mini val images copied into tmp_path, with an edited instances json."""

import copy
import json
import logging
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from detr_jax.data import check, coco, pipeline
from tests.helpers import REPO_ROOT

# 139: 426 x 640 (height x width), 20 boxes; 802: 640 x 424, 2 boxes; 5001: 480 x 640, 1 crowd box among 17.
IMAGE_IDS = (139, 802, 5001)
NAME_139 = "image 139 (000000000139.jpg)"
ARGS = ("--scale", "0.25", "--batch_size", "3")


@pytest.fixture(scope="module")
def instances(coco_mini):
  """The instances json of IMAGE_IDS, cut from coco-mini's val2017."""
  source = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
  return {"images": [image for image in source["images"] if image["id"] in IMAGE_IDS],
          "annotations": [ann for ann in source["annotations"] if ann["image_id"] in IMAGE_IDS],
          "categories": source["categories"]}


@pytest.fixture
def make_folder(coco_mini, instances, tmp_path):
  """make_folder(edit) -> a COCO folder (val2017) of IMAGE_IDS whose json is `instances` after `edit(json)`."""
  def make(edit=lambda data: None, name="data"):
    folder = tmp_path / name
    (folder / "annotations").mkdir(parents=True)
    (folder / "val2017").mkdir()
    for image in instances["images"]:
      shutil.copy(coco_mini / "val2017" / image["file_name"], folder / "val2017")
    data = copy.deepcopy(instances)
    edit(data)
    (folder / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return folder
  return make


def find(items, **fields):
  """The first json object of `items` with the given field values."""
  return next(item for item in items if all(item[k] == v for k, v in fields.items()))


def run_check(folder, capsys):
  """(exit status, stdout lines, stderr) of check.main on `folder`'s val2017."""
  status = check.main([str(folder), *ARGS])
  out, err = capsys.readouterr()
  return status, out.splitlines(), err


def assert_errors(folder, capsys, *errors) -> list:
  """Asserts that check.main on `folder` exits 1 and ends with a line "error: reason: name" per (reason, name) of
  `errors` and their count; returns the stdout lines."""
  status, out, _ = run_check(folder, capsys)
  assert status == 1
  assert out[-len(errors) - 1:] == [f"error: {reason}: {name}" for reason, name in errors] + [f"{len(errors)} error(s)"]
  return out


def test_clean_folder_has_no_errors_and_shows_progress(make_folder, capsys):
  status, out, err = run_check(make_folder(), capsys)
  assert status == 0 and out[-1] == "No errors."
  assert not [line for line in out if line.startswith("error")]
  assert "Decoding: 100%" in err and "Pipeline: 100%" in err and "3/3" in err  # tqdm's bars, on stderr


def test_missing_bbox_and_height_are_errors_named_by_id_and_file(make_folder, capsys):
  def edit(data):
    del find(data["annotations"], id=332341)["bbox"]  # of image 802
    del find(data["images"], id=5001)["height"]
  out = assert_errors(make_folder(edit), capsys,
                      (coco.ANNOTATION_WITHOUT_KEY, 'annotation 332341 of image 802 (000000000802.jpg) has no "bbox"'),
                      (coco.IMAGE_WITHOUT_KEY, 'image 5001 (000000005001.jpg) has no "height"'))
  assert coco.ANNOTATION_WITHOUT_KEY == "annotation without a required key (id, image_id, category_id, bbox)"
  assert coco.IMAGE_WITHOUT_KEY == "image without a required key (id, file_name, height, width)"
  assert out[0].endswith(": 2 images, 21 boxes kept")  # 139's 20 and 802's other box


def test_unknown_image_category_and_malformed_bbox_are_errors(make_folder, capsys):
  def edit(data):
    find(data["annotations"], id=26547)["category_id"] = 999
    find(data["annotations"], id=34646)["bbox"] = [7, 167, 149]
    find(data["annotations"], id=1123710)["image_id"] = 424242
    del find(data["annotations"], id=332341)["image_id"]
  assert_errors(make_folder(edit), capsys,
                (coco.ANNOTATION_OF_UNKNOWN_IMAGE, "annotation 1123710 (image_id 424242)"),
                (coco.ANNOTATION_WITHOUT_KEY, 'annotation 332341 has no "image_id"'),
                (coco.MALFORMED_BBOX, f"annotation 34646 of {NAME_139}, bbox [7, 167, 149]"),
                (coco.UNKNOWN_CATEGORY, f"annotation 26547 of {NAME_139}, category 999"))


def test_json_size_differing_from_the_decoded_one_is_an_error(make_folder, capsys):
  def edit(data):
    find(data["images"], id=139).update(height=100, width=100)
  folder = make_folder(edit)
  assert_errors(folder, capsys, (check.SIZE_MISMATCH, f"image 139 ({folder}/val2017/000000000139.jpg): decoded "
                                 "426x640, json 100x100 (height x width)"))


def test_image_that_passes_the_header_check_but_does_not_decode_is_an_error(make_folder, capsys):
  folder = make_folder()
  path = folder / "val2017" / "000000000802.jpg"
  path.chmod(0o644)
  path.write_bytes(b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9")  # JPEG start and end markers, no image
  assert coco.image_problem(str(path)) is None
  assert_errors(folder, capsys, (check.UNDECODABLE, f"image 802 ({path})"))


def test_pipeline_uses_the_decoded_size_not_the_json_one(make_folder):
  """With the json claiming 100 x 100 for the 426 x 640 image 139, boxes and orig_size come out as with the
  true json. Two added boxes show the clipping to the decoded image: one across the right edge (clipped
  to x = 640) and one right of it (dropped); at 100 x 100 both would be gone, and most of the others."""
  def add_boxes(data):
    data["annotations"] += [{"id": 1, "image_id": 139, "category_id": 1, "bbox": [600, 10, 100, 20]},
                            {"id": 2, "image_id": 139, "category_id": 1, "bbox": [700, 10, 50, 50]}]

  def falsify(data):
    add_boxes(data)
    find(data["images"], id=139).update(height=100, width=100)

  options = pipeline.PipelineOptions(scale=0.25, pad_multiple=32)
  batches = []
  for name, edit in (("true", add_boxes), ("falsified", falsify)):
    records = coco.load_coco_folder(str(make_folder(edit, name)), "val2017").first(1)
    assert records.sizes.tolist() == [[426, 640] if name == "true" else [100, 100]]
    batches.append(next(pipeline.eval_dataset(records, 1, options, process=(0, 1)).as_numpy_iterator()))
  true, falsified = batches
  assert falsified["orig_size"].tolist() == [[426, 640]]
  assert falsified["target_valid"].sum() == 21  # 20 + the clipped box
  for key in ("boxes", "labels", "target_valid", "orig_size", "size"):
    np.testing.assert_array_equal(falsified[key], true[key], err_msg=key)
  clipped = falsified["boxes"][0, 20]  # [600, 10, 640, 30] px as cxcywh of 640 x 426
  np.testing.assert_allclose(clipped, [620 / 640, 20 / 426, 40 / 640, 20 / 426], rtol=1e-6)


def test_degenerate_boxes_are_named_by_image_and_file_and_not_errors(make_folder, capsys):
  def edit(data):
    find(data["annotations"], id=26547)["bbox"] = [236, 142, 0, 69]
    find(data["annotations"], id=1123710)["bbox"] = [33, 289, 126, -1]
  status, out, _ = run_check(make_folder(edit), capsys)
  assert status == 0 and out[-1] == "No errors."
  assert (f"2 x {coco.DEGENERATE_BOX}: annotation 26547 of {NAME_139}, bbox [236, 142, 0, 69], "
          "annotation 1123710 of image 802 (000000000802.jpg), bbox [33, 289, 126, -1]") in out
  assert coco.DEGENERATE_BOX == "degenerate box (zero or negative width or height)"


def test_loading_logs_one_line_of_counts(make_folder, caplog):
  def edit(data):
    del find(data["annotations"], id=332341)["bbox"]
  folder = make_folder(edit)
  with caplog.at_level(logging.INFO):
    coco.load_coco_folder(str(folder), "val2017")
  assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(
      logging.WARNING, f"{folder}/val2017: skipped 1 x {coco.ANNOTATION_WITHOUT_KEY}; 1 x crowd annotation "
      f"(python -m detr_jax.data.check {folder} --split val2017 names each)")]


# User mistakes: each edits a clean folder and returns (check's arguments, its one-line error).

def _no_data_dir(folder):
  return [str(folder / "nowhere")], f"Dataset folder {str(folder / 'nowhere')!r} does not exist."


def _no_split(folder):
  (folder / "annotations" / "instances_train2017.json").write_text("{}")
  return [str(folder), "--split", "val2014"], (f"Split 'val2014' does not exist: no {folder}/annotations/"
                                               "instances_val2014.json; the splits there are train2017, val2017.")


def _not_coco(folder):
  path = folder / "annotations" / "instances_val2017.json"
  path.write_text(json.dumps({"images": [], "categories": []}))
  return [str(folder)], f'{path} is not a COCO instances file: it has no "annotations".'


def _truncated_json(folder):
  path = folder / "annotations" / "instances_val2017.json"
  path.write_text('{"images": [')
  return [str(folder)], f"{path} is not valid JSON (Expecting value: line 1 column 13 (char 12)); is the file empty " \
                        "or truncated?"


def _category_without_id(folder):
  path = folder / "annotations" / "instances_val2017.json"
  data = json.loads(path.read_text())
  del data["categories"][3]["id"]
  path.write_text(json.dumps(data))
  return [str(folder)], f'{path}: categories[3] has no "id".'


@pytest.mark.parametrize("mistake", [_no_data_dir, _no_split, _not_coco, _truncated_json, _category_without_id])
def test_user_mistakes_give_one_line_and_status_1(make_folder, capsys, mistake):
  argv, message = mistake(make_folder())
  assert check.main(argv) == 1
  assert capsys.readouterr() == ("", f"error: {message}\n")


def test_unreadable_json_gives_one_line(make_folder, capsys, monkeypatch):
  """Root reads every file, so the OSError of an unreadable file is simulated."""
  folder = make_folder()
  path = folder / "annotations" / "instances_val2017.json"

  def refuse(name, *args, **kwargs):
    raise PermissionError(13, "Permission denied", name)
  monkeypatch.setattr(coco, "open", refuse, raising=False)
  assert check.main([str(folder)]) == 1
  assert capsys.readouterr().err == f"error: {path} cannot be read (Permission denied).\n"


def test_command_line_error_has_no_traceback(tmp_path):
  """The real command: stderr is the one line, with neither a traceback nor TensorFlow's start-up log lines
  (TensorFlow is imported only once the json has loaded)."""
  run = subprocess.run([sys.executable, "-m", "detr_jax.data.check", str(tmp_path / "nowhere")], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
  assert (run.returncode, run.stdout, run.stderr) == (1, "", f"error: Dataset folder "
                                                             f"{str(tmp_path / 'nowhere')!r} does not exist.\n")
