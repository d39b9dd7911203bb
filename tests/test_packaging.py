"""A regular (non-editable) install works from any directory: the wheel carries the configs.

The wheel is built from a copy of the checkout and installed with ``pip --target`` into a
temporary folder; the commands run from another folder with only that install on the path
before the environment's dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level folders the wheel does not need (and the checkout's own build output).
NOT_SHIPPED = {".git", ".venv", "logs", "data", "build", "dist", "notebooks", "tests", "docs"}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    top_level = lambda folder, names: NOT_SHIPPED & set(names) if folder == str(REPO) else []  # noqa: E731
    shutil.copytree(REPO, source, ignore=top_level)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    run([*pip, "-w", str(root / "dist"), str(source)], cwd=root)
    (path,) = (root / "dist").glob("limoe_torch-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """The install folder and an environment that imports limoe from it."""
    site = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
    run([*pip, str(wheel)], cwd=site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    return site, env


def test_the_wheel_carries_every_config(wheel):
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("limoe/conf/")}
    configs = {
        f"limoe/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")
    }
    assert configs and configs <= shipped


def test_create_model_from_another_directory(installed, tmp_path):
    site, env = installed
    code = (
        "import limoe, limoe.conf; "
        "print(limoe.__file__); print(limoe.conf.__file__); "
        "print(type(limoe.create_model('limoe')).__name__); "
        "model, _, preprocess = limoe.create_model_and_transforms('clip'); "
        "print(type(model).__name__, limoe.get_tokenizer('clip').context_length)"
    )
    out = run([sys.executable, "-c", code], cwd=tmp_path, env=env).stdout.split()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site))
    assert out[2:] == ["LIMoE", "CLIP", "16"]


def test_limoe_train_from_another_directory(installed, tmp_path):
    site, env = installed
    overrides = ["experiment=smoke", "trainer.max_steps=2", "data.train_size=128",
                 "data.val_size=32", "data.test_size=32", "data.novel_size=32",
                 f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    run([str(site / "bin" / "limoe-train"), *overrides], cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


CHECKOUT_ONLY = (
    "import sys\n"
    "sys.meta_path = [f for f in sys.meta_path if 'editable' not in f.__module__]\n"
    f"sys.path.insert(0, {str(REPO)!r})\n"
)


def test_a_checkout_on_pythonpath_finds_its_configs(tmp_path):
    """Without an install (a machine with its own torch runs the checkout from PYTHONPATH),
    the compose API, the listings and the Hydra apps read the ``conf/`` beside the package.
    The editable install's finder is taken off the import path first, so only the checkout
    can provide the package."""
    code = CHECKOUT_ONLY + (
        "from limoe.config import CONFIG_DIR, INSTALLED, config_options\n"
        "from limoe.train import compose\n"
        "print(INSTALLED, CONFIG_DIR, ','.join(config_options('router')),"
        " compose(['model=dense']).model.moe_layers)\n"
    )
    out = run([sys.executable, "-c", code], cwd=tmp_path).stdout.split()
    assert out == ["False", str(REPO / "conf"), "expert_choice,modality,soft,topk", "[]"]
    app = CHECKOUT_ONLY + (
        "sys.argv = ['limoe-train', '--cfg', 'job', 'model=multiway']\n"
        "from limoe import cli\n"
        "cli.train()\n"
    )
    shown = run([sys.executable, "-c", app], cwd=tmp_path).stdout
    assert "_target_: limoe.moe.ModalityRouter" in shown


def test_the_sdist_and_wheel_a_release_would_upload_pass_twine_check(tmp_path):
    """``python -m build`` makes the sdist, then the wheel from it (so the sdist holds all the
    wheel needs, the configs included); ``twine check`` passes both. The distribution is
    ``limoe-torch`` (``limoe`` on the index is another project); the import stays ``limoe``."""
    source = tmp_path / "source"
    top_level = lambda folder, names: NOT_SHIPPED & set(names) if folder == str(REPO) else []  # noqa: E731
    shutil.copytree(REPO, source, ignore=top_level)
    out = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        cwd=tmp_path)  # fmt: skip
    sdist, wheel = sorted(out.glob("limoe_torch-*.tar.gz")), sorted(out.glob("limoe_torch-*.whl"))
    assert len(sdist) == 1 and len(wheel) == 1, sorted(p.name for p in out.iterdir())
    run([sys.executable, "-m", "twine", "check", "--strict", str(sdist[0]), str(wheel[0])],
        cwd=tmp_path)  # fmt: skip
    names = zipfile.ZipFile(wheel[0]).namelist()
    assert "limoe/conf/model/limoe.yaml" in names and "limoe/conf/router/topk.yaml" in names
    assert any(n.endswith(".dist-info/METADATA") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "Name: limoe-torch" in zipfile.ZipFile(wheel[0]).read(metadata).decode()
