"""The wheels the GPU acceptance run installs on a GPU machine without network, in ``.whl/`` at the repository root.

The machine it was sized for (Python 3.12, torch 2.11+cu130, transformers 5.17, accelerate 1.15, peft 0.21.0, and
pyarrow, pandas, xxhash, tokenizers 0.23.2, huggingface-hub 1.33.0) lacks trl, bitsandbytes, datasets, dill and
multiprocess (and IPython, which helpers.training needs through transformers), and has older transformers and
peft than the course pins. This downloads the course's pins of those,
with pip, for that Python and platform. The whole copy of the repository that travels there is limited to 64 MiB,
and bitsandbytes' wheel alone is 43 MB: it carries its native library for every CUDA, ROCm and XPU version. So its
copy here keeps the CPU library and those of one CUDA major version (the machine's torch is built for CUDA 13.0),
and says so in its version, ``0.50.2+cuda13`` (its Python code is unchanged; bitsandbytes loads the library of the
torch's CUDA version, else another of the same major version). lm_eval is left out: three of its dependencies are
published as source only (gpu_acceptance.py says what the run skips for it).

    python -m benchmarks.gpu_wheels                 # into .whl/ (git ignores it: .git/info/exclude has /.whl/)
    python -m benchmarks.gpu_wheels --cuda-major 12 # for a machine whose torch is built for CUDA 12
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers.profiles import REPO_ROOT

WHEELS = ("trl==1.16.0", "bitsandbytes==0.50.2", "datasets==5.2.0", "transformers==5.24.0", "peft==0.21.2",
          "tokenizers==0.23.3", "huggingface-hub==1.33.0", "dill==0.4.1", "multiprocess==0.70.19",
          # helpers.training imports transformers.utils.notebook, which imports IPython: IPython 9.18.1 and the
          # packages it needs that the machine lacks
          "ipython==9.18.1", "ipython-pygments-lexers==1.1.1", "jedi==0.20.1", "parso==0.8.7",
          "matplotlib-inline==0.2.2", "pexpect==4.9.0", "ptyprocess==0.7.0", "prompt-toolkit==3.0.53", "wcwidth==0.9.4",
          "stack-data==0.6.3", "executing==2.3.0", "asttokens==3.0.2", "pure-eval==0.2.4", "decorator==5.3.1",
          "traitlets==5.16.1")
# bitsandbytes' wheel is manylinux_2_24: that tag must be on the list, or pip finds no wheel for it.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
NATIVE = re.compile(r"bitsandbytes/libbitsandbytes_(\w+?)(\d*)\.so$")


def download(folder: Path) -> None:
    """``pip download`` of :data:`WHEELS` for CPython 3.12 on x86-64 Linux, wheels only, no dependencies."""
    platforms = [arg for name in PLATFORMS for arg in ("--platform", name)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS], check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_bitsandbytes(wheel: Path, cuda_major: int) -> Path:
    """A copy of bitsandbytes' wheel with only its CPU library and those of CUDA ``cuda_major``.x, its version
    marked ``+cuda<major>`` (file name, dist-info folder, METADATA and RECORD rewritten to match); the original
    is removed. Returns the new wheel."""
    name, version, rest = wheel.name.split("-", 2)
    local = f"{version}+cuda{cuda_major}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{local}.dist-info/"
    target = wheel.with_name(f"{name}-{local}-{rest}")
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            native = NATIVE.search(item.filename)
            if native and not (native[1] == "cpu" or (native[1] == "cuda" and native[2].startswith(str(cuda_major)))):
                continue
            if item.filename.endswith(".dist-info/RECORD"):
                continue
            data = src.read(item)
            path = item.filename.replace(old_info, new_info)
            if path.endswith(".dist-info/METADATA"):
                data = re.sub(rb"^Version: .*$", f"Version: {local}".encode(), data, count=1, flags=re.M)
            dst.writestr(path, data)
            records.append(_record_line(path, data))
        records.append(f"{new_info}RECORD,,")
        dst.writestr(f"{new_info}RECORD", "\n".join(records) + "\n")
    wheel.unlink()
    return target


def main(argv: list[str] | None = None) -> int:
    """Download the wheels into ``--dir`` and slim bitsandbytes'; prints each wheel and the total size."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_wheels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".whl", help="where the wheels go (.whl/)")
    parser.add_argument("--cuda-major", type=int, default=13, help="the CUDA major version of the GPU's torch (13)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    download(args.dir)
    for wheel in args.dir.glob("bitsandbytes-*.whl"):
        if "+" not in wheel.name:
            slim_bitsandbytes(wheel, args.cuda_major)
    wheels = sorted(args.dir.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{sum(w.stat().st_size for w in wheels) / 2**20:7.2f} MiB  in all, {len(wheels)} wheels in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
