"""The package as a user installs it: `pip install .` (not editable) into a fresh virtual environment,
then its console commands, run outside the repository."""

import json
import os
import shutil
import subprocess
import sys

from tests.helpers import REPO_ROOT

COMMANDS = {"detr-train": "--workdir", "detr-eval": "--checkpoint", "detr-port": "usage: detr-port",
            "detr-check": "data_dir", "detr-predict": "--output_dir", "detr-export": "usage: detr-export"}


def test_pip_install_gives_the_packages_and_console_commands(tmp_path):
  # A copy of what the package is built from, so that the build leaves nothing in the repository.
  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO_ROOT / name, source / name)
  for package in ("detr_jax", "configs"):
    shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True, env=env).stdout.strip()
  # The dependencies (and pip, setuptools) come from this environment, after the venv's own packages:
  # installing them would take minutes.
  with open(os.path.join(purelib, "test_environment.pth"), "w") as f:
    f.write("\n".join(path for path in sys.path if path.endswith("site-packages")))
  install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", str(source)], capture_output=True, text=True, env=env, cwd=tmp_path)
  assert install.returncode == 0, install.stderr[-3000:]

  # The installed copies are used (not the repository), and torch, transformers and
  # tensorflow-datasets are extras.
  probe = subprocess.run([python, "-c", "import configs, detr_jax, importlib.metadata, json; print(json.dumps("
                          "[detr_jax.__file__, configs.__file__, importlib.metadata.requires('detr_jax')]))"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
  assert probe.returncode == 0, probe.stderr[-3000:]
  detr_jax_file, configs_file, requires = json.loads(probe.stdout)
  assert detr_jax_file.startswith(purelib) and configs_file.startswith(purelib)
  base = [r.split(";")[0] for r in requires if "extra ==" not in r]
  assert not [r for r in base if r.split("==")[0] in ("torch", "transformers", "tensorflow-datasets", "pytest")]
  for extra, requirement in (("torch", "torch==2.13.0"), ("hf", "transformers==5.23.0"),
                             ("tfds", "tensorflow-datasets==4.9.10"), ("dev", "pytest==9.2.0")):
    assert f'{requirement}; extra == "{extra}"' in requires, (extra, requires)

  for command, expected in COMMANDS.items():
    run = subprocess.run([venv / "bin" / command, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert expected in run.stdout, (command, run.stdout[-2000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr, (command, run.stderr[-3000:])
