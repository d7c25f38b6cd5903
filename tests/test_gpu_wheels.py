"""benchmarks.gpu_wheels: the slimmed bitsandbytes wheel keeps exactly the native libraries of one CUDA major version
(and the CPU one), says so in its version, and is a valid wheel: pip installs it and its RECORD matches its files."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from benchmarks import gpu_wheels

LIBRARIES = ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025")


def _fake_bitsandbytes(folder: Path) -> Path:
    """A wheel laid out as bitsandbytes 0.50.2's, with a tiny file for each native library."""
    wheel = folder / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    info = "bitsandbytes-0.50.2.dist-info"
    files = {"bitsandbytes/__init__.py": b"__version__ = '0.50.2'\n",
             **{f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 100 for lib in LIBRARIES},
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                              b"Tag: py3-none-manylinux_2_24_x86_64\n"}
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return wheel


def test_the_slim_wheel_keeps_one_cuda_major_and_installs(tmp_path):
    slim = gpu_wheels.slim_bitsandbytes(_fake_bitsandbytes(tmp_path), cuda_major=13)
    assert slim.name == "bitsandbytes-0.50.2+cuda13-py3-none-manylinux_2_24_x86_64.whl"
    assert [p.name for p in tmp_path.glob("*.whl")] == [slim.name], "the 43 MB original must be gone"
    with zipfile.ZipFile(slim) as zf:
        names = set(zf.namelist())
        kept = sorted(n.removeprefix("bitsandbytes/libbitsandbytes_").removesuffix(".so") for n in names
                      if n.endswith(".so"))
        assert kept == ["cpu", "cuda130", "cuda132"]
        record = dict(line.split(",", 1) for line in zf.read("bitsandbytes-0.50.2+cuda13.dist-info/RECORD")
                      .decode().splitlines())
        assert set(record) == names  # every file listed once, nothing listed that is not there
        for name in names - {"bitsandbytes-0.50.2+cuda13.dist-info/RECORD"}:
            data = zf.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert record[name] == f"sha256={digest},{len(data)}", name
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(slim)], check=True, capture_output=True, timeout=120)
    found = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('bitsandbytes'))"],
                           env={"PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "0.50.2+cuda13"
    assert sorted(p.name for p in (target / "bitsandbytes").glob("*.so")) == [
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
