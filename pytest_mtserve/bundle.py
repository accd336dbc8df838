"""``mtserve bundle``: everything an offline GPU host needs, in one compact archive.

GPU hosts often have PyTorch and CUDA but no package index. The bundle holds the
wheels the model server needs beyond a CUDA PyTorch image (``--no-deps`` downloads of a
pinned list, for one Python version and platform), this project's own wheel, and an
``install.sh`` that installs them into the target interpreter's own environment and
sidesteps the known traps:

- PyTriton must live in a real site-packages: on ``PYTHONPATH`` alone it takes itself for
  an editable install and looks for ``pytriton/tritonserver/external_libs``;
- PyTriton pins ``numpy<2`` (its serialization fails with numpy 2.x);
- FastAPI >= 0.16x imports ``opentelemetry-api``, which it does not declare.

To keep the archive small, wheels are re-zipped uncompressed (so ``xz`` sees the raw
bytes), and PyTriton's wheel loses the Python-backend stubs for other Python versions and
the bundled ``libpython3.13`` that only the 3.13 stub links against.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# The server's runtime beyond what a CUDA PyTorch image ships (torch, transformers,
# tokenizers, safetensors, httpx, anyio, h11, psutil, tqdm, pyyaml, grpcio, protobuf, aiohttp
# and its multidict/yarl/frozenlist, uvloop, ...; install.sh checks the ones the server imports).
SERVER_REQUIREMENTS = (
    "megatron-core==0.16.1",
    "nvidia-pytriton==0.7.0",
    "numpy==1.26.4",  # pytriton pins numpy<2
    "tritonclient==2.73.0",  # pytriton.client -> tritonclient.http -> geventhttpclient
    "python-rapidjson==1.25",
    "ml-dtypes==0.5.4",  # tritonclient pins <=0.5.4; newer ones fail to import under numpy 1.x
    "geventhttpclient==2.6.1",
    "gevent==26.9.0",
    "greenlet==3.3.2",
    "zope.event==6.2",
    "zope.interface==8.7",
    "brotli==1.2.1",
    "pyzmq==27.3.0",  # the Triton Python-backend stub talks to the server over ZMQ
    "sh==2.4.0",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "httptools==0.9.0",  # uvicorn's C HTTP parser, used when installed
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "opentelemetry-api==1.45.2",  # imported by fastapi, not declared by it
    "importlib-metadata==10.2.0",
    "lazy-importer==0.1.0",
    "sniffio==1.3.1",
    "gguf==0.19.0",  # the demo's GGUF -> Megatron conversion
)

# nemo-evaluator 0.2.8 + nvidia-lm-eval 26.3 and what they need beyond the image.
EVAL_REQUIREMENTS = (
    "nemo-evaluator==0.2.8",
    "nvidia-lm-eval==26.3",
    "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "evaluate==0.4.6",
    "jsonlines==4.0.0", "more-itertools==11.2.1", "numexpr==2.14.2", "pytablewriter==1.2.1",
    "dataproperty==1.1.1", "mbstrdecoder==1.1.5", "chardet==6.0.0.post1", "pathvalidate==3.3.1",
    "tabledata==1.3.5", "tcolorpy==0.1.7", "typepy==1.3.5", "nltk==3.10.4",
    "tqdm-multiprocess==0.0.11", "zstandard==0.25.0", "immutabledict==4.2.0", "structlog==26.1.0", "flask==3.1.3",
    "itsdangerous==2.2.0", "blinker==1.9.0", "waitress==3.0.2", "openai==3.57.0", "jiter==0.19.0",
    "tenacity==9.2.1", "yq==4.4.5", "xmltodict==1.0.4", "tomlkit==0.15.2", "argcomplete==3.7.2",
    "beautifulsoup4==4.13.1", "soupsieve==4.1.3", "defusedxml==0.7.1", "truststore==0.10.5",
    "httpx2==2.16.2", "httpcore2==2.16.2", "tree-sitter==0.26.1", "tree-sitter-python==0.25.0",
    "pytz==2026.6",  # lm-eval's results table imports it (pytablewriter -> typepy) without declaring it
)  # fmt: skip
# Pure-Python packages of the evaluation stack published as source only: built into
# py3-none-any wheels here, so the GPU host needs no build tools.
EVAL_SOURCE_ONLY = ("rouge-score==0.1.2", "sqlitedict==2.1.0", "word2number==1.1", "langdetect==1.0.9")

# pip matches manylinux tags exactly: list every glibc level a wheel may be tagged with.
DEFAULT_PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35)) + (
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

_PIP_TIMEOUT_S = 1800


class BundleError(RuntimeError):
    """The bundle could not be built; the message names the step and what to do."""


def build_bundle(
    output: Path,
    *,
    python_version: str = "3.12",
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
    with_eval: bool = False,
) -> Path:
    """Write the archive to ``output`` if its name ends in ``.tar.xz``, else into the folder
    ``output`` as ``mtserve-bundle-py<version>.tar.xz``; returns its path."""
    tag = python_version.replace(".", "")
    output = Path(output)
    archive = output if output.name.endswith(".tar.xz") else output / f"mtserve-bundle-py{tag}.tar.xz"
    if archive.is_dir():
        raise BundleError(f"{archive} is a folder; name the archive's own path or a folder not ending in .tar.xz")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mtserve-bundle-") as scratch:
        root = Path(scratch) / f"mtserve-bundle-py{tag}"
        downloads = Path(scratch) / "downloads"
        _download_wheels(SERVER_REQUIREMENTS, downloads / "wheels", python_version, platforms)
        _build_wheels([str(_source_tree())], downloads / "wheels", "pip wheel (this project)", isolated=False)
        if with_eval:
            _download_wheels(EVAL_REQUIREMENTS, downloads / "eval-wheels", python_version, platforms)
            _build_wheels(list(EVAL_SOURCE_ONLY), downloads / "eval-wheels", "pip wheel (source-only evaluation packages)")
        for wheel in sorted(downloads.glob("*/*.whl")):
            target = root / wheel.parent.name / wheel.name
            target.parent.mkdir(parents=True, exist_ok=True)
            _repack_uncompressed(wheel, target, keep=_pytriton_filter(python_version))
        _write_installer(root)
        partial = archive.with_name(archive.name + ".partial")  # renamed into place once complete
        try:
            with tarfile.open(partial, "w:xz", preset=6) as tar:
                tar.add(root, arcname=root.name)
            os.replace(partial, archive)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return archive


def _download_wheels(requirements: tuple[str, ...], dest: Path, python_version: str, platforms: tuple[str, ...]) -> None:
    platform_args = [arg for platform in (*platforms, "any") for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--implementation", "cp",
               "--python-version", python_version, *platform_args, "--dest", str(dest), *requirements]  # fmt: skip
    _run(command, "pip download", "check the package index is reachable and the pins exist for that Python")


def _source_tree() -> Path:
    source = Path(__file__).resolve().parent.parent
    if not (source / "pyproject.toml").is_file():
        raise BundleError(f"{source} has no pyproject.toml: run `mtserve bundle` from a source checkout of pytest-mtserve")
    return source


def _build_wheels(requirements: list[str], dest: Path, step: str, *, isolated: bool = True) -> None:
    # This project builds with the environment's own setuptools (no index needed for it).
    isolation = [] if isolated else ["--no-build-isolation"]
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
               "--disable-pip-version-check", "--quiet", "--wheel-dir", str(dest), *requirements]  # fmt: skip
    _run(command, step, "check the package index is reachable and setuptools and wheel are installed")


def _run(command: list[str], step: str, advice: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{step} took over {_PIP_TIMEOUT_S} s; {advice}") from None
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BundleError(f"{step} failed ({said}); {advice}")


def _pytriton_filter(python_version: str):
    """Which members of a wheel to keep: PyTriton keeps only the target Python's stub."""
    own_stub = f"python_backend_stubs/{python_version}/"

    def keep(wheel_name: str, member: str) -> bool:
        if not wheel_name.startswith("nvidia_pytriton-"):
            return True
        if "python_backend_stubs/" in member:
            return own_stub in member
        # auditwheel's renamed copy of libpython3.13 (libpython3-<hash>.13.so.1.0), needed
        # only by the 3.13 stub; the target Python's stub uses the host's own libpython.
        return not (member.startswith("nvidia_pytriton.libs/libpython3") and python_version != "3.13")

    return keep


def _repack_uncompressed(source: Path, target: Path, *, keep) -> None:
    """Copy a wheel with its members stored, not deflated, dropping what ``keep`` refuses.

    pip does not check RECORD hashes of a wheel it installs, but RECORD must list only
    what exists, so dropped members leave RECORD too.
    """
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        kept = [info for info in old.infolist() if keep(source.name, info.filename)]
        names = {info.filename for info in kept}
        for info in kept:
            data = old.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = _filtered_record(data, names)
            info.compress_type = zipfile.ZIP_STORED
            new.writestr(info, data)


def _filtered_record(record: bytes, names: set[str]) -> bytes:
    lines = record.decode().splitlines()
    return ("\n".join(line for line in lines if line.split(",", 1)[0] in names) + "\n").encode()


_INSTALLER = r"""#!/usr/bin/env bash
# Installs the mtserve server stack into one Python environment, offline.
#   PYTHON=/path/to/python ./install.sh      (default: python3 on PATH)
#   EVAL_PYTHON=/path/to/other/python ...    also the evaluation stack (bundles made with
#                                            --with-eval) into a second environment
# Use virtual environments that see the image's packages after their own to keep the
# host's environment untouched (docs/offline-gpu.md: where the image's python3 is itself a
# venv, --system-site-packages does not see its packages). The two stay apart because the
# server needs numpy<2 (PyTriton) while an image's pandas, pyarrow and scipy, which the
# evaluation imports, need the image's numpy 2.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
pip_install=(-m pip install --no-index --no-deps --no-compile --force-reinstall --disable-pip-version-check --quiet)

# A real site-packages (not --target / PYTHONPATH): PyTriton locates its bundled
# tritonserver from its own install location and refuses an "editable-looking" layout.
"$python" "${pip_install[@]}" "$here"/wheels/*.whl

"$python" - <<'EOF'
import importlib.util, sys
expected_from_image = ("torch", "aiohttp", "tokenizers", "jinja2", "safetensors", "httpx", "psutil")
missing = [name for name in expected_from_image if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"mtserve bundle: error: this environment lacks {', '.join(missing)}, which the bundle leaves to the "
             "image; install them (pip download them as wheels where there is a network) and run install.sh again")
import sysconfig, torch, numpy, pytriton, zmq, fastapi, opentelemetry, megatron.core, aiohttp, httptools
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: pytriton needs numpy<2"
print(f"mtserve bundle: installed into {sysconfig.get_paths()['purelib']}")
print(f"mtserve bundle: torch {torch.__version__}, numpy {numpy.__version__}, megatron-core {megatron.core.__version__}, fastapi {fastapi.__version__}")
# The server puts this first on LD_LIBRARY_PATH itself; other PyTriton programs need it too.
print(f"mtserve bundle: Triton's Python stub loads libpython from {sysconfig.get_config_var('LIBDIR')}")
EOF
echo "mtserve bundle: server ready: $python -m pytest_mtserve.server --help"

if [ -n "${EVAL_PYTHON:-}" ]; then
    if [ ! -d "$here/eval-wheels" ]; then
        echo "mtserve bundle: error: EVAL_PYTHON is set but this bundle has no evaluation stack; build one with: mtserve bundle OUT --with-eval" >&2
        exit 2
    fi
    # The evaluation keeps its environment's numpy: the server's wheels go in without theirs.
    server_wheels=()
    for wheel in "$here"/wheels/*.whl; do
        case "$(basename "$wheel")" in numpy-*|ml_dtypes-*) ;; *) server_wheels+=("$wheel") ;; esac
    done
    "$EVAL_PYTHON" "${pip_install[@]}" "${server_wheels[@]}" "$here"/eval-wheels/*.whl
    "$EVAL_PYTHON" -c 'import numpy, nemo_evaluator, lm_eval, pytest_mtserve; print(f"mtserve bundle: evaluation ready, numpy {numpy.__version__}")'
    echo "mtserve bundle: run the plugin with: $EVAL_PYTHON -m pytest --server-python $python ..."
fi
"""


def _write_installer(root: Path) -> None:
    installer = root / "install.sh"
    installer.write_text(_INSTALLER)
    installer.chmod(0o755)

