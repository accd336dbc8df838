"""The demo end to end: SmolLM2-135M served from its Megatron conversion, real ARC/MMLU data,
gated against the committed baselines in baselines/demo/ (what `bash scripts/demo.sh` runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=3000)


@pytest.fixture(scope="module")
def demo_assets():
    from pytest_mtserve.demo.assets import ensure_demo_assets

    return ensure_demo_assets()


def test_the_demo_passes_against_its_committed_baselines(demo_assets, tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "pytest_mtserve.cli", "demo", "--", f"--mtserve-report={tmp_path / 'report.json'}"], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "mtserve benchmark gate" in result.stdout
    for benchmark in ("mmlu", "arc_challenge", "arc_easy"):
        assert f"test_regression[{benchmark}] PASSED" in result.stdout or "3 passed" in result.stdout


def test_a_perturbed_copy_of_the_demo_model_fails_the_gate(demo_assets, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    code = (
        "from pytest_mtserve.server.checkpoint_writer import write_perturbed_copy as w; import sys; "
        "w(sys.argv[1], sys.argv[2], relative_noise=1.0, seed=7)"
    )
    subprocess.run([sys.executable, "-c", f"if __name__ == '__main__':\n    {code}", str(demo_assets.checkpoint_dir), str(damaged)], check=True)
    result = run([
        sys.executable, "-m", "pytest", "--pyargs", "pytest_mtserve.suite", "-p", "no:cacheprovider",
        f"--checkpoint={damaged}", "--model-id", "demo", "--benchmarks", "arc_easy",
        "--limit-samples", "100", f"--datasets-dir={demo_assets.datasets_dir}",
        f"--baselines-dir={REPO / 'baselines'}",
    ], tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout[-4000:]
    table = result.stdout.split("mtserve benchmark gate", 1)[1]
    assert "arc_easy" in table and "fail" in table
