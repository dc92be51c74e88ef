r"""Detections on your own images: any checkpoint, files or folders of images, pictures of the results.

Usage:
  detr-predict --checkpoint CKPT IMAGES_OR_DIRS... --output_dir OUT [--threshold 0.7] [--batch_size N]
  (or python predict.py ... in the repository)

CKPT is what `detr-eval` takes (a train.py workdir, a `detr-port import` directory, an official or
Hugging Face `.pth` / `.safetensors` file, a transformers `save_pretrained` directory) or an
official name (`detr-r50`, ...: downloaded once, checked against its hash). A folder contributes its
JPEG / PNG / BMP / GIF files, sorted. OUT gets detections.json (COCO results, one per detection:
image_id, file_name, category_id, category_name, bbox [x, y, w, h] in pixels, score) and one
annotated JPEG per image; with --attention, the official DETR notebook's attention pictures in
OUT/attention/ (Deformable DETR: its weighted sampling points, `inference.Predictor.attention`); with
--panoptic (a panoptic checkpoint), each image's panoptic segments as a picture in OUT/panoptic/ and
their list in OUT/panoptic.json.
The images/s at the end include reading and preprocessing.

A missing file, an unreadable image, a bad checkpoint or a missing package ends the command with
one line on stderr and exit status 1.
"""

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from detr_jax import entry, system

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def image_files(inputs: Sequence[str]) -> list[str]:
  """The image paths of `inputs`: files as given, folders' image files (by extension, sorted).

  Raises:
    FileNotFoundError: an input that does not exist, or no image at all.
  """
  paths = []
  for given in inputs:
    if os.path.isdir(given):
      paths.extend(sorted(os.path.join(given, name) for name in os.listdir(given)
                          if name.lower().endswith(IMAGE_EXTENSIONS)))
    elif os.path.isfile(given):
      paths.append(given)
    else:
      raise FileNotFoundError(f"No image file or folder {given!r}.")
  if not paths:
    raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}.")
  return paths


def _image_id(path: str, index: int) -> int:
  """COCO's id for COCO file names (000000000139.jpg -> 139), else the input's position."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return int(stem) if stem.isdigit() else index


def _picture_names(paths: Sequence[str]) -> list[str]:
  """One JPEG name per input, the file's stem, prefixed by its position where stems repeat."""
  stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
  return [f"{stem}.jpg" if stems.count(stem) == 1 else f"{index:05d}_{stem}.jpg" for index, stem in enumerate(stems)]


def _checkpoint(name_or_path: str, dilation: bool, **kwargs):
  from detr_jax import inference, pretrained
  if not os.path.exists(name_or_path) and name_or_path in pretrained.names():
    return inference.Predictor.from_pretrained(name_or_path, **kwargs)
  return inference.Predictor.from_checkpoint(name_or_path, dilation=dilation, **kwargs)


def _write_attention_pictures(maps: dict, image, directory: str, picture_name: str) -> None:
  from detr_jax import visualize
  os.makedirs(directory, exist_ok=True)
  decoder, encoder = visualize.attention_pictures(image, maps)
  stem = os.path.splitext(picture_name)[0]
  decoder.save(os.path.join(directory, f"{stem}_decoder.jpg"), quality=90)
  encoder.save(os.path.join(directory, f"{stem}_encoder.jpg"), quality=90)


def predict_images(checkpoint: str, inputs: Sequence[str], output_dir: str, threshold: Optional[float] = None,
                   batch_size: Optional[int] = None, dilation: bool = False, attention: bool = False,
                   panoptic: bool = False) -> list[dict]:
  """Runs the checkpoint on the images of `inputs`, writes OUT/detections.json and the pictures, prints a summary.

  With `attention`, also OUT/attention/<stem>_decoder.jpg and <stem>_encoder.jpg per image
  (`visualize.attention_pictures`). With `panoptic`, also OUT/panoptic/<stem>.png (`visualize.draw_panoptic`)
  and OUT/panoptic.json: [{"file_name", "segments_info": [{"id", "category_id", "label", "isthing", "area"}]}].
  With either, each image runs alone (`inference.Predictor.inspect`): one forward pass gives its
  detections and its pictures.

  Returns:
    the COCO results written to detections.json.
  """
  import tqdm
  from PIL import Image
  from detr_jax import visualize
  with entry.user_errors("--batch_size"):
    paths = image_files(inputs)
    predictor = _checkpoint(checkpoint, dilation, threshold=threshold, batch_size=batch_size)
    if panoptic and not predictor.masks:   # before anything is written
      raise ValueError(f"--panoptic needs a panoptic checkpoint (a mask head, e.g. detr-r50-panoptic); {checkpoint} "
                       "has none.")
    os.makedirs(output_dir, exist_ok=True)
    results, segments = [], []
    start = time.perf_counter()
    bar = tqdm.tqdm(total=len(paths), desc="Predicting", unit="image")
    if attention or panoptic:   # one forward pass per image gives its detections and its pictures
      inspected = (predictor.inspect(path, attention=attention, panoptic=panoptic) for path in paths)
    else:
      inspected = ({"detections": detections} for detections in predictor.predict_iter(paths))
    for index, (path, picture_name, result) in enumerate(zip(paths, _picture_names(paths), inspected)):
      image_id, detections = _image_id(path, index), result["detections"]
      for detection in detections:
        x0, y0, x1, y1 = detection["box"]
        results.append({"image_id": image_id, "file_name": path, "category_id": detection["category_id"],
                        "category_name": detection["label"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": detection["score"]})
      with Image.open(path) as image:
        visualize.draw_detections(image, detections).save(os.path.join(output_dir, picture_name), quality=90)
        if attention:
          _write_attention_pictures(result, image, os.path.join(output_dir, "attention"), picture_name)
        if panoptic:
          segmented = result["panoptic"]
          os.makedirs(os.path.join(output_dir, "panoptic"), exist_ok=True)
          visualize.draw_panoptic(image, segmented).save(
              os.path.join(output_dir, "panoptic", os.path.splitext(picture_name)[0] + ".png"))
          segments.append({"file_name": path, "segments_info": segmented["segments"]})
      bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
  with open(os.path.join(output_dir, "detections.json"), "w") as f:
    json.dump(results, f)
  if panoptic:
    with open(os.path.join(output_dir, "panoptic.json"), "w") as f:
      json.dump(segments, f)
  print(f"{len(paths)} images in {seconds:.1f} s ({len(paths) / seconds:.2f} images/s), {len(results)} detections "
        f"with score >= {predictor.threshold}: {os.path.join(output_dir, 'detections.json')}; pictures in {output_dir}")
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The `detr-predict` command; returns 0, exits with 1 on a user mistake and 2 on a usage error."""
  parser = argparse.ArgumentParser(prog="detr-predict", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="checkpoint path or official name (detr-r50, ...)")
  parser.add_argument("inputs", nargs="+", help="image files and folders")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--threshold", type=float, default=None,
                      help="minimum score (default 0.7 for DETR, 0.3 for Deformable DETR)")
  parser.add_argument("--batch_size", type=int, default=None, help="images per step (default one per device)")
  parser.add_argument("--dilation", action="store_true", help="a .pth checkpoint is DC5")
  parser.add_argument("--attention", action="store_true",
                      help="also write the decoder and encoder attention pictures to OUT/attention/")
  parser.add_argument("--panoptic", action="store_true",
                      help="also write panoptic segments (a panoptic checkpoint) to OUT/panoptic/ and OUT/panoptic.json")
  args = parser.parse_args(argv)
  if system.jax_backend_will_be_cpu():
    system.retain_freed_host_memory()
  system.import_tensorflow_quietly()
  system.quiet_library_logs()
  predict_images(args.checkpoint, args.inputs, args.output_dir, args.threshold, args.batch_size, args.dilation,
                 args.attention, args.panoptic)
  return 0


def run() -> None:
  sys.exit(main())
