"""templates/ and the presets must ship inside the wheel: a plain `pip install`, not only an editable one,
renders."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO


def test_wheel_renders_from_a_plain_install(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(wheels.glob("llamajobs-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    # The test environment's packages, as a plain path: its .pth files (our editable install) stay out.
    (site_packages / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    out = tmp_path / "rendered"
    result = subprocess.run([str(venv / "bin" / "llamajobs"), "render", "--size", "7b", "--out", str(out)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "torch.distributed.run" in (out / "launch.sh").read_text()
    assert json.loads((out / "spec.json").read_text())["size"] == "7b"
    # The presets ship in the wheel too: a name alone finds one.
    result = subprocess.run([str(venv / "bin" / "llamajobs"), "render", "--config", "7b-lora-fsdp", "--out",
                             str(tmp_path / "preset")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "preset" / "spec.json").read_text())["mode"] == "lora"
    where = subprocess.run([str(python), "-c", "import llamajobs; print(llamajobs.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(venv))
