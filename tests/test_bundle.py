"""The offline bundle's wheel handling and CLI (no network: pip is stubbed where needed)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path


from pytest_mtserve import bundle, cli


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in members.items())
        archive.writestr("pkg-1.0.dist-info/RECORD", record + "pkg-1.0.dist-info/RECORD,,\n")
    return path


def _repack(tmp_path: Path, name: str, members: dict[str, bytes], python_version: str = "3.12") -> zipfile.ZipFile:
    source = _wheel(tmp_path / name, members)
    target = tmp_path / "out" / name
    target.parent.mkdir()
    bundle._repack_uncompressed(source, target, keep=bundle._pytriton_filter(python_version))
    return zipfile.ZipFile(target)


def test_pytriton_keeps_only_the_target_pythons_stub_and_no_foreign_libpython(tmp_path):
    members = {
        "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub": b"stub312",
        "pytriton/tritonserver/python_backend_stubs/3.13/triton_python_backend_stub": b"stub313",
        "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0": b"libpython",
        "nvidia_pytriton.libs/libtritonserver-717102f0.so": b"server",
    }
    with _repack(tmp_path, "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl", members) as repacked:
        names = set(repacked.namelist())
        record = repacked.read("pkg-1.0.dist-info/RECORD").decode()
        assert all(info.compress_type == zipfile.ZIP_STORED for info in repacked.infolist())
    assert "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub" in names
    assert "nvidia_pytriton.libs/libtritonserver-717102f0.so" in names
    assert not any("3.13" in name for name in names)
    assert "3.13" not in record and "libtritonserver" in record  # RECORD lists exactly what is there


def test_other_wheels_are_copied_whole(tmp_path):
    members = {"pkg/__init__.py": b"x = 1\n", "pkg/python_backend_stubs/3.9/f": b"kept: not pytriton"}
    with _repack(tmp_path, "pkg-1.0-py3-none-any.whl", members) as repacked:
        assert {"pkg/__init__.py", "pkg/python_backend_stubs/3.9/f"} <= set(repacked.namelist())
        assert repacked.read("pkg/__init__.py") == b"x = 1\n"


def test_the_pins_name_each_package_once():
    names = [requirement.split("==")[0].lower() for requirement in bundle.SERVER_REQUIREMENTS + bundle.EVAL_REQUIREMENTS + bundle.EVAL_SOURCE_ONLY]
    assert len(names) == len(set(names)), "two versions of one package would stop the whole install"
    assert "numpy==1.26.4" in bundle.SERVER_REQUIREMENTS  # pytriton needs numpy<2


def test_installer_installs_into_the_interpreters_own_site_packages(tmp_path):
    bundle._write_installer(tmp_path)
    text = (tmp_path / "install.sh").read_text()
    pip_command = text[text.index('-m pip install') :].split("\n\n", 1)[0]
    assert "--no-index" in pip_command and "--target" not in pip_command
    assert subprocess.run(["bash", "-n", str(tmp_path / "install.sh")]).returncode == 0


def test_cli_reports_a_failed_download_as_one_line(tmp_path, monkeypatch, capsys):
    def refuse(command, step, advice):
        raise bundle.BundleError(f"{step} failed (no index); {advice}")

    monkeypatch.setattr(bundle, "_run", refuse)
    assert cli.main(["bundle", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mtserve bundle: error: pip download failed") and "\n" not in error


def test_the_archive_goes_where_out_names_it(tmp_path, monkeypatch):
    def download(requirements, dest: Path, *args) -> None:  # no index here: one small wheel
        dest.mkdir(parents=True, exist_ok=True)
        _wheel(dest / "pkg-1.0-py3-none-any.whl", {"pkg/__init__.py": b""})

    monkeypatch.setattr(bundle, "_download_wheels", download)
    monkeypatch.setattr(bundle, "_build_wheels", lambda *args, **kwargs: None)
    named = bundle.build_bundle(tmp_path / "gpu" / "offline.tar.xz")
    into_folder = bundle.build_bundle(tmp_path / "bundles", python_version="3.11")
    assert named == tmp_path / "gpu" / "offline.tar.xz" and named.is_file()
    assert into_folder == tmp_path / "bundles" / "mtserve-bundle-py311.tar.xz" and into_folder.is_file()
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == ["mtserve-bundle-py311.tar.xz", "offline.tar.xz"]


def test_an_archive_path_that_is_a_folder_is_refused_before_any_download(tmp_path, capsys):
    (tmp_path / "taken.tar.xz").mkdir()
    assert cli.main(["bundle", str(tmp_path / "taken.tar.xz")]) == 2
    assert "taken.tar.xz is a folder; name the archive's own path" in capsys.readouterr().err
