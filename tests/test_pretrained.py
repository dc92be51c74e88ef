"""Checkpoints by name (`detr_jax.pretrained`), served by a local HTTP server: nothing here touches the internet."""

import hashlib
import http.server
import os
import re
import socket
import threading
import types

import flax
import jax
import numpy as np
import pytest

from detr_jax import entry, porting, pretrained
from detr_jax.models import detr


@pytest.fixture
def server():
  """A local HTTP server of `files` ({name: bytes}) that records each request path; `extra_length`
  bytes are announced in Content-Length beyond those sent, before the connection closes."""
  state = types.SimpleNamespace(files={}, requests=[], extra_length=0)

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      state.requests.append(self.path)
      body = state.files.get(self.path.lstrip("/"))
      if body is None:
        self.send_error(404)
        return
      self.send_response(200)
      self.send_header("Content-Length", str(len(body) + state.extra_length))
      self.end_headers()
      try:
        self.wfile.write(body)
      except ConnectionError:   # the client stopped reading (test_an_interrupt_leaves_nothing)
        pass

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  state.url = f"http://127.0.0.1:{httpd.server_port}/"
  yield state
  httpd.shutdown()
  httpd.server_close()
  thread.join()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """(file name, bytes, variables) of a tiny DETR's official `.pth`, named with its sha256 prefix
  as the release files are."""
  model = detr.DETR(backbone_depth=18, hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                    num_queries=4, num_classes=3)
  variables = detr.init_variables(model, jax.random.PRNGKey(0))
  path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
  porting.save_pytorch_checkpoint(porting.to_pytorch_state_dict(variables), str(path))
  data = path.read_bytes()
  return f"tiny-detr-{hashlib.sha256(data).hexdigest()[:8]}.pth", data, variables


def _registry(file, url):
  return {"tiny": pretrained.Checkpoint(file, True, url, "a tiny DETR")}


def _flat(variables):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))


def test_download_checks_the_hash_and_then_uses_the_cache(server, tiny_checkpoint, tmp_path):
  file, data, variables = tiny_checkpoint
  server.files[file] = data
  path, dilation = pretrained.download("tiny", cache_dir=str(tmp_path), registry=_registry(file, server.url))
  assert (path, dilation) == (str(tmp_path / file), True)
  assert os.listdir(tmp_path) == [file]
  assert open(path, "rb").read() == data
  _, loaded = porting.load_pytorch_checkpoint(path)
  expected, found = _flat(variables), _flat(loaded)
  assert sorted(found) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(found[key], expected[key], err_msg="/".join(key))
  assert server.requests == [f"/{file}"]
  assert pretrained.download("tiny", cache_dir=str(tmp_path), registry=_registry(file, server.url)) == (path, True)
  assert server.requests == [f"/{file}"]


def test_base_url_and_environment_override_the_entry(server, tiny_checkpoint, tmp_path, monkeypatch):
  file, data, _ = tiny_checkpoint
  server.files[file] = data
  registry = _registry(file, "http://127.0.0.1:1/unused/")
  monkeypatch.setenv("DETR_JAX_CACHE", str(tmp_path / "env-cache"))
  monkeypatch.setenv("DETR_JAX_PRETRAINED_URL", server.url)
  assert pretrained.download("tiny", registry=registry)[0] == str(tmp_path / "env-cache" / file)
  assert pretrained.download("tiny", cache_dir=str(tmp_path / "arg"), base_url=server.url, registry=registry)[0] == (
      str(tmp_path / "arg" / file))
  assert len(server.requests) == 2


def test_a_hash_mismatch_is_refused_and_deleted(server, tiny_checkpoint, tmp_path):
  _, data, _ = tiny_checkpoint
  server.files["tiny-detr-0badc0de.pth"] = data
  with pytest.raises(ValueError, match="expected prefix 0badc0de") as error:
    pretrained.download("tiny", cache_dir=str(tmp_path), registry=_registry("tiny-detr-0badc0de.pth", server.url))
  assert hashlib.sha256(data).hexdigest() in str(error.value) and "\n" not in str(error.value)
  assert entry._raised_by_this_package(error.value)   # the commands print it as one `error:` line
  assert os.listdir(tmp_path) == []


def test_an_interrupt_leaves_nothing(server, tiny_checkpoint, tmp_path, monkeypatch):
  file, data, _ = tiny_checkpoint
  server.files[file] = data

  def interrupt(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(pretrained.tqdm.tqdm, "update", interrupt)
  with pytest.raises(KeyboardInterrupt):
    pretrained.download("tiny", cache_dir=str(tmp_path), registry=_registry(file, server.url))
  assert os.listdir(tmp_path) == []


def test_an_interrupted_download_is_refused_and_deleted(server, tiny_checkpoint, tmp_path):
  file, data, _ = tiny_checkpoint
  server.files[file] = data[:1000]
  server.extra_length = 500
  with pytest.raises(ValueError, match=re.escape(f"{server.url}{file} stopped after 1000 of 1500 bytes")):
    pretrained.download("tiny", cache_dir=str(tmp_path), registry=_registry(file, server.url))
  assert os.listdir(tmp_path) == []


def test_unknown_and_deformable_names_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="Unknown pretrained model 'detr-r51'; known: ") as error:
    pretrained.download("detr-r51", cache_dir=str(tmp_path))
  assert all(name in str(error.value) for name in pretrained.names())
  with pytest.raises(ValueError, match="no direct download.*r50_deformable_detr_single_scale-checkpoint.pth"
                                       ".*fundamentalvision/Deformable-DETR.*local path"):
    pretrained.download("deformable-detr-single-scale", cache_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_no_server_names_the_url_and_leaves_nothing(tiny_checkpoint, tmp_path):
  file, _, _ = tiny_checkpoint
  with socket.socket() as unused:   # bound and not listening: connections are refused
    unused.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{unused.getsockname()[1]}/"
    with pytest.raises(ValueError, match=re.escape(f"{url}{file}") + ".*needs network access.*local path") as error:
      pretrained.download("tiny", cache_dir=str(tmp_path), registry=_registry(file, url))
  assert entry._raised_by_this_package(error.value)
  assert os.listdir(tmp_path) == []


def test_a_file_missing_on_the_server_is_an_error(server, tmp_path):
  with pytest.raises(ValueError, match="HTTP 404"):
    pretrained.download("tiny", cache_dir=str(tmp_path), registry=_registry("tiny-detr-01234567.pth", server.url))
  assert os.listdir(tmp_path) == []


def test_the_registry_holds_the_official_release_files(tmp_path):
  """Every DETR name resolves to its release file (taken from a filled cache: no download)."""
  assert pretrained.names() == sorted(pretrained.REGISTRY) and len(pretrained.names()) == 12
  for name in pretrained.names():
    entry = pretrained.REGISTRY[name]
    assert entry.dilation == ("dc5" in name), name
    if name.startswith("detr-"):
      assert entry.base_url == "https://dl.fbaipublicfiles.com/detr/", name
      assert re.fullmatch(rf"{name}-[0-9a-f]{{8}}\.pth", entry.file), name
      assert re.fullmatch("[0-9a-f]{8}", entry.sha256_prefix), name
      (tmp_path / entry.file).touch()
      assert pretrained.download(name, cache_dir=str(tmp_path)) == (str(tmp_path / entry.file), entry.dilation)
    else:
      assert entry.base_url is None and re.fullmatch(r"r50_deformable_detr\w*-checkpoint\.pth", entry.file), name
  assert len(pretrained.describe().splitlines()) == 12
