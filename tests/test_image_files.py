"""What the Docker image is built from, checked without Docker: the weights layer's files, the served model key.

The image itself is built and run by `make image-test` (docker/image.py), which needs a Docker engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from sdworker.config import Settings
from sdworker.manifest import read_manifest


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), " ".join(rest.split())))
    return pairs


def test_the_weights_layer_copies_everything_download_py_imports(tmp_path: Path) -> None:
    """The weights are baked in a layer that holds only some of the code, so that a code change does not bake
    (and download) the model again. Those files alone must bake a model, or the image does not build."""
    app = tmp_path / "app"
    copied = []
    for instruction, args in dockerfile_instructions():
        if instruction == "RUN" and "download.py" in args:
            break
        if instruction == "COPY":
            *sources, dest = args.split()
            assert dest.endswith("/") and not dest.startswith("/"), f"COPY {args}: expected a folder under WORKDIR"
            (app / dest).mkdir(parents=True, exist_ok=True)
            for source in sources:
                if (ROOT / source).is_dir():  # COPY of a folder copies what is in it
                    shutil.copytree(
                        ROOT / source, app / dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(ROOT / source, app / dest / Path(source).name)
                copied.append(source)
    else:
        raise AssertionError("the Dockerfile has no RUN of download.py")
    assert "download.py" in copied and "sdworker/model/" in copied
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "HF_", "PYTHON"))}
    result = subprocess.run(
        [sys.executable, "download.py", "--model-id", "tiny-sd", "--model-dir", str(tmp_path / "models")],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"download.py fails with only {copied}:\n{result.stderr}"
    assert read_manifest(tmp_path / "models")["model_id"] == "tiny-sd"
    # The image bakes as root and serves as another user: every baked file must be readable by all.
    modes = {path.stat().st_mode & 0o777 for path in (tmp_path / "models").rglob("*")}
    assert (tmp_path / "models").stat().st_mode & 0o777 == 0o755 and modes == {0o755, 0o644}


def test_the_model_key_is_the_baked_models_not_build_args_envs(
    baked: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In an image MODEL_ID was a build argument: at run time the environment names build_args.env's default,
    and the deployment must still answer to the model it baked."""
    monkeypatch.delenv("MODEL_KEY", raising=False)
    default = Settings(model_id="stable-diffusion-v1-5/stable-diffusion-v1-5", model_dir=tmp_path / "nothing-baked")
    assert default.model_keys() == ["stable-diffusion-v1-5-stable-diffusion-v1-5"]
    assert Settings(model_dir=baked["tiny-sd"]).model_keys() == ["tiny-sd"]
    assert Settings(model_dir=baked["tiny-sdxl"], model_id="tiny-sd").model_keys() == ["tiny-sdxl"]
    assert Settings(model_dir=baked["tiny-sd"], model_key="a, b").model_keys() == ["a", "b"]


def test_settings_are_read_from_secret_files_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's build reads HF_TOKEN from the build secret's file; at run time Docker's secrets are files too."""
    for name in ("HF_TOKEN", "API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "HF_TOKEN").write_text("hf_from_a_file\n")
    (tmp_path / "API_KEYS").write_text("key-a,key-b")
    settings = Settings(_secrets_dir=tmp_path)
    assert settings.hf_token.get_secret_value() == "hf_from_a_file"
    assert settings.api_keys.get_secret_value() == "key-a,key-b"
    monkeypatch.setenv("API_KEYS", "key-env")
    assert Settings(_secrets_dir=tmp_path).api_keys.get_secret_value() == "key-env"
