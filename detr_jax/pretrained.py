"""The official checkpoints by name: downloaded once into a cache and checked against their hash.

The DETR files are those of the model zoo in facebookresearch/detr's README, served from
https://dl.fbaipublicfiles.com/detr/. As in torch.hub's `check_hash`, the part of a file's name
after its last "-" is the start (8 or more hex digits) of the file's sha256. The Deformable DETR
files (fundamentalvision/Deformable-DETR README) are on a file-sharing site without a direct link
or a hash: they are named here so that `download` can say which file to fetch by hand.

The cache is `$DETR_JAX_CACHE`, else ~/.cache/detr_jax. `$DETR_JAX_PRETRAINED_URL` replaces the
base URL of the DETR files: a mirror, or a local server for a machine without internet access.
"""

import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Mapping, Optional

import tqdm

DETR_URL = "https://dl.fbaipublicfiles.com/detr/"
DEFORMABLE_README = "https://github.com/fundamentalvision/Deformable-DETR#main-results"
TIMEOUT_S = 60   # per socket operation, not for the whole download


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One released checkpoint file.

  Attributes:
    file: the file name; where `base_url` is set, the part after its last "-" starts its sha256.
    dilation: whether the backbone is dilated (DC5), which the checkpoint's keys do not tell.
    base_url: the URL of the directory that serves `file`, or None where there is no direct download.
    description: the model in a few words.
  """

  file: str
  dilation: bool
  base_url: Optional[str]
  description: str

  @property
  def sha256_prefix(self) -> str:
    """The start of the file's sha256: its name after the last "-" (torch.hub's `check_hash`)."""
    return self.file.rsplit("-", 1)[-1].removesuffix(".pth")


REGISTRY = {
    "detr-r50": Checkpoint("detr-r50-e632da11.pth", False, DETR_URL, "DETR R50, COCO boxes"),
    "detr-r50-dc5": Checkpoint("detr-r50-dc5-f0fb7ef5.pth", True, DETR_URL, "DETR R50-DC5, COCO boxes"),
    "detr-r101": Checkpoint("detr-r101-2c7b67e5.pth", False, DETR_URL, "DETR R101, COCO boxes"),
    "detr-r101-dc5": Checkpoint("detr-r101-dc5-a2e86def.pth", True, DETR_URL, "DETR R101-DC5, COCO boxes"),
    "detr-r50-panoptic": Checkpoint("detr-r50-panoptic-00ce5173.pth", False, DETR_URL, "DETR R50, COCO panoptic"),
    "detr-r50-dc5-panoptic": Checkpoint("detr-r50-dc5-panoptic-da08f1b1.pth", True, DETR_URL,
                                        "DETR R50-DC5, COCO panoptic"),
    "detr-r101-panoptic": Checkpoint("detr-r101-panoptic-40021d53.pth", False, DETR_URL, "DETR R101, COCO panoptic"),
    "deformable-detr": Checkpoint("r50_deformable_detr-checkpoint.pth", False, None, "Deformable DETR R50"),
    "deformable-detr-single-scale": Checkpoint("r50_deformable_detr_single_scale-checkpoint.pth", False, None,
                                               "Deformable DETR R50, single scale"),
    "deformable-detr-single-scale-dc5": Checkpoint("r50_deformable_detr_single_scale_dc5-checkpoint.pth", True,
                                                   None, "Deformable DETR R50-DC5, single scale"),
    "deformable-detr-refine": Checkpoint("r50_deformable_detr_plus_iterative_bbox_refinement-checkpoint.pth", False,
                                         None, "Deformable DETR R50, iterative box refinement"),
    "deformable-detr-two-stage": Checkpoint(
        "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage-checkpoint.pth", False, None,
        "Deformable DETR R50, iterative box refinement, two-stage"),
}


def names() -> list[str]:
  """The registry's names, sorted."""
  return sorted(REGISTRY)


def describe() -> str:
  """One line per registry entry: its name, description and file."""
  return "\n".join(f"{name}: {REGISTRY[name].description} ({REGISTRY[name].file})" for name in names())


def download(name: str, cache_dir: Optional[str] = None, base_url: Optional[str] = None,
             registry: Optional[Mapping[str, Checkpoint]] = None) -> tuple[str, bool]:
  """The local path of checkpoint `name`, downloaded into the cache unless it is there already.

  Args:
    name: a registry name, e.g. "detr-r50".
    cache_dir: default `$DETR_JAX_CACHE`, else ~/.cache/detr_jax.
    base_url: replaces the entry's base URL; default `$DETR_JAX_PRETRAINED_URL`, else the entry's.
    registry: {name: Checkpoint}; default `REGISTRY`.
  Returns:
    (path, dilation): the `.pth` file, for `porting.load_pytorch_checkpoint(path, dilation)`.
  Raises:
    ValueError (one line each): an unknown name (the known ones listed); an entry without a direct
      download (which file to fetch by hand); no connection to the host, or an HTTP error; a download
      shorter than its Content-Length; a file whose sha256 does not start with the name's prefix.
      A failed or interrupted download leaves nothing in the cache.
  """
  registry = REGISTRY if registry is None else registry
  if name not in registry:
    raise ValueError(f"Unknown pretrained model {name!r}; known: {', '.join(sorted(registry))}.")
  entry = registry[name]
  if entry.base_url is None:
    raise ValueError(f"{name!r} has no direct download (its file is on a file-sharing site, without a hash): "
                     f"fetch {entry.file} by hand from the links in {DEFORMABLE_README} and pass its local path "
                     f"instead (e.g. --checkpoint PATH).")
  cache_dir = cache_dir or os.environ.get("DETR_JAX_CACHE") or os.path.expanduser("~/.cache/detr_jax")
  path = os.path.join(cache_dir, entry.file)
  if not os.path.isfile(path):
    base_url = base_url or os.environ.get("DETR_JAX_PRETRAINED_URL") or entry.base_url
    os.makedirs(cache_dir, exist_ok=True)
    _fetch(f"{base_url.rstrip('/')}/{entry.file}", path, entry.sha256_prefix)
  return path, entry.dilation


def _fetch(url: str, path: str, sha256_prefix: str) -> None:
  """Streams `url` into a temporary file beside `path`, checks its length and hash, then renames it."""
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
      length = response.headers.get("Content-Length")
      expected = int(length) if length else None
      digest, received = hashlib.sha256(), 0
      with tqdm.tqdm(total=expected, unit="B", unit_scale=True, desc=os.path.basename(path), file=sys.stderr) as bar:
        # A connection closed early ends the reads without an error: the length check below catches it.
        while chunk := response.read(1 << 20):
          out.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
    if expected is not None and received != expected:
      raise ValueError(f"The download of {url} stopped after {received} of {expected} bytes; "
                       f"the partial file was deleted: retry.")
    if not digest.hexdigest().startswith(sha256_prefix):
      raise ValueError(f"{url} has sha256 {digest.hexdigest()}, not the expected prefix {sha256_prefix}: "
                       f"the file was deleted; retry, or check the mirror ($DETR_JAX_PRETRAINED_URL).")
    os.replace(tmp_path, path)
  except urllib.error.HTTPError as error:
    raise ValueError(f"{url} answered HTTP {error.code} {error.reason}: is the file on that server "
                     f"(the base URL, $DETR_JAX_PRETRAINED_URL)?") from error
  except (urllib.error.URLError, OSError) as error:
    raise ValueError(f"Could not download {url} ({getattr(error, 'reason', error)}): `download` needs network "
                     f"access to that host; or download the file by hand and pass its local path.") from error
  finally:
    # Also after KeyboardInterrupt: nothing partial may stay in the cache.
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
