"""Download, here, the wheels `make gpu-check` installs on the GPU machine (Python 3.12, manylinux x86_64).

    /work/main/.venv/bin/python benchmarks/gpu_wheels.py            # into .whl/, then print the sizes
    python benchmarks/gpu_wheels.py --dest /tmp/w --skip wandb      # elsewhere, leaving a package out

The GPU machine has no internet and no pip index. It comes with torch (CUDA), triton,
transformers, safetensors, tokenizers, tqdm, xxhash, pytest, einops and accelerate, and their
dependencies; everything else leantrain, its tests and its GPU benchmarks import travels as wheels
in ``.whl/`` (git-ignored), carried by the device call (``carry: [".whl"]``), within its 64 MiB.
Versions are those installed in the Python running this script (the project's venv: what CI
runs); a package not installed here is downloaded at its newest version, and said so. Where PyPI
has only a source distribution (DeepSpeed, ...) a wheel is built locally without build isolation;
only pure-Python wheels are built so (DeepSpeed with ``DS_BUILD_OPS=0`` compiles its ops on first
use), a compiled one would not match the GPU machine.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION, ABI = "3.12", "cp312"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20
"""What one device call carries: the working tree and every carried path together."""

# What the GPU machine lacks: distribution -> (the carried distributions that need it, or () for one
# leantrain itself needs; why). The closure of their Requires-Dist (Linux, Python 3.12, no extras)
# minus ON_DEVICE; tests/benchmarks/test_gpu_check.py checks it against the installed metadata.
WHEELS: dict[str, tuple[tuple[str, ...], str]] = {
    "omegaconf": ((), "trainer/config.py: every config"),
    "deepspeed": ((), "parallel/deepspeed_engine.py; imported by the test suite"),
    "zfec": ((), "checkpoint/erasure.py (the default codec)"),
    "pyeclib": ((), "checkpoint/erasure.py (ISA-L Reed-Solomon)"),
    "galore-torch": ((), "benchmarks/optimizers.py, tests/optim/test_galore_reference.py (the reference GaLore)"),
    "apollo-torch": ((), "benchmarks/optimizers.py (the APOLLO row)"),
    "bitsandbytes": ((), "galore-torch and apollo-torch import it; the 8-bit optimizers' reference"),
    "wandb": ((), "logging.wandb=true only (trainer/metrics.py imports it lazily)"),
    "hjson": (("deepspeed",), ""),
    "msgpack": (("deepspeed",), ""),
    "ninja": (("deepspeed",), "DeepSpeed's JIT op builds"),
    "py-cpuinfo": (("deepspeed",), ""),
    "pydantic": (("deepspeed", "wandb", "cwevals"), ""),
    "pydantic-core": (("pydantic",), ""),
    "annotated-types": (("pydantic",), ""),
    "typing-inspection": (("pydantic",), ""),
    "click": (("wandb",), ""),
    "platformdirs": (("wandb",), ""),
    "protobuf": (("wandb", "opentelemetry-proto", "googleapis-common-protos"), ""),
    "cwevals": (("wandb",), ""),
    "opentelemetry-api": (("wandb", "opentelemetry-sdk", "opentelemetry-semantic-conventions",
                           "opentelemetry-exporter-otlp-proto-http", "opentelemetry-exporter-http-transport"), ""),
    "opentelemetry-sdk": (("wandb", "opentelemetry-exporter-otlp-proto-http", "opentelemetry-exporter-otlp-common"),
                          ""),
    "opentelemetry-semantic-conventions": (("opentelemetry-sdk",), ""),
    "opentelemetry-exporter-otlp-proto-http": (("wandb",), ""),
    "opentelemetry-exporter-otlp-proto-common": (("opentelemetry-exporter-otlp-proto-http",), ""),
    "opentelemetry-proto": (("opentelemetry-exporter-otlp-proto-http", "opentelemetry-exporter-otlp-proto-common"),
                            ""),
    "googleapis-common-protos": (("opentelemetry-exporter-otlp-proto-http",), ""),
    "opentelemetry-exporter-http-transport": (("opentelemetry-exporter-otlp-proto-http",), ""),
    "opentelemetry-exporter-otlp-common": (("opentelemetry-exporter-otlp-proto-http",), ""),
    "distro": (("cwevals",), ""),
    "sniffio": (("cwevals",), ""),
    "httpx": (("cwevals",), ""),
    "anyio": (("cwevals", "httpx"), ""),
    "httpcore": (("httpx",), ""),
    "h11": (("httpcore",), ""),
}

# On the GPU machine already (the issue's list, torch's and transformers' dependencies): not carried.
ON_DEVICE = frozenset({
    "torch", "triton", "transformers", "safetensors", "tokenizers", "tqdm", "xxhash", "pytest", "einops",
    "accelerate", "numpy", "packaging", "psutil", "pyyaml", "requests", "typing-extensions", "filelock",
    "fsspec", "jinja2", "markupsafe", "networkx", "sympy", "mpmath", "setuptools", "huggingface-hub", "regex",
    "certifi", "charset-normalizer", "idna", "urllib3", "iniconfig", "pluggy", "pygments", "hf-xet",
})

DEFAULT_SKIP = ("wandb",)
"""Left out unless asked for: wandb is imported only with logging.wandb=true, and its wheel (a Go
binary inside, 19 MiB) with bitsandbytes' (41 MiB) would not fit the 64 MiB of one device call."""


def carried(skip: set[str]) -> list[str]:
    """The distributions of WHEELS to carry: all but ``skip`` and what only skipped ones need."""
    dropped = set(skip)
    changed = True
    while changed:  # a dependency goes when every distribution that needs it has gone
        changed = False
        for name, (needed_by, _) in WHEELS.items():
            if name not in dropped and needed_by and all(n in dropped for n in needed_by):
                dropped.add(name)
                changed = True
    return [name for name in WHEELS if name not in dropped]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pinned(name: str) -> tuple[str, bool]:
    """``name==version`` as installed here, or ``name`` (newest) and False when it is not installed."""
    try:
        return f"{name}=={metadata.version(name)}", True
    except metadata.PackageNotFoundError:
        return name, False


def download_command(spec: str, dest: Path) -> list[str]:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", ABI, "--abi", "abi3",
            "--abi", "none", *platforms, "--dest", str(dest), spec]


def install_check(wheels: list[Path]) -> str:
    """Empty if pip would install every wheel on the GPU machine's Python and platform, else pip's complaint."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--no-index",
                               "--disable-pip-version-check", "--target", tmp, "--python-version", PYTHON_VERSION,
                               "--implementation", "cp", "--abi", ABI, "--abi", "abi3", "--abi", "none", *platforms,
                               "--only-binary=:all:", *map(str, wheels)], capture_output=True, text=True)
    return "" if done.returncode == 0 else (done.stderr or done.stdout).strip()


def build_from_sdist(spec: str, dest: Path) -> Path:
    """Download the sdist of ``spec`` and build a pure-Python wheel of it into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
                        "--dest", tmp, spec], check=True)
        sdist = next(p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".zip")))
        env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed: no compiled ops, they are built on first use
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", tmp, str(sdist)], check=True, env=env)
        built = next(p for p in Path(tmp).iterdir() if p.suffix == ".whl")
        if not built.name.endswith("-none-any.whl"):
            raise SystemExit(f"{built.name}: built from source but not pure Python; it would not run on the GPU "
                             "machine (find a manylinux wheel or leave it out with --skip)")
        return Path(shutil.move(str(built), dest / built.name))


def fetch(name: str, dest: Path) -> tuple[Path, str]:
    """The wheel of ``name`` in ``dest`` and how it got there."""
    spec, installed = pinned(name)
    before = set(dest.glob("*.whl"))
    done = subprocess.run(download_command(spec, dest), capture_output=True, text=True)
    if done.returncode == 0:
        how = "downloaded"
        new = set(dest.glob("*.whl")) - before
        wheel = new.pop() if new else find_wheel(dest, name)
    else:
        how = "built from the sdist"
        wheel = build_from_sdist(spec, dest)
    if not installed:
        how += ", newest version (not installed here)"
    return wheel, how


def find_wheel(dest: Path, name: str) -> Path:
    """The wheel of ``name`` already in ``dest`` (pip download skips a file that is there)."""
    stem = canonical(name).replace("-", "_")
    for wheel in dest.glob("*.whl"):
        if canonical(wheel.name.split("-")[0]).replace("-", "_") == stem:
            return wheel
    raise FileNotFoundError(f"no wheel of {name} in {dest}")


def tracked_bytes() -> int:
    """Bytes of the working tree a device call carries besides the wheels: tracked and untracked, not ignored."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(ROOT / ".whl"), help="where the wheels go (default .whl/)")
    parser.add_argument("--skip", default=",".join(DEFAULT_SKIP),
                        help=f"comma-separated distributions to leave out (default {','.join(DEFAULT_SKIP)}; "
                             "'' carries everything)")
    parser.add_argument("--list", action="store_true", help="print what would be fetched, and why, then stop")
    args = parser.parse_args(argv)
    skip = {canonical(n) for n in args.skip.split(",") if n}
    if unknown := sorted(skip - set(WHEELS)):
        parser.error(f"--skip: unknown distribution(s) {', '.join(unknown)}; choose from {', '.join(WHEELS)}")
    chosen = carried(skip)
    if args.list:
        for name, (needed_by, why) in WHEELS.items():
            reason = "; ".join(filter(None, [why, needed_by and "needed by " + ", ".join(needed_by)]))
            print(f"{'carry' if name in chosen else 'skip':5s} {pinned(name)[0]:45s} {reason}")
        return 0
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.whl"):  # everything in dest travels: only this run's wheels may be there
        stale.unlink()
    rows = []
    for name in chosen:
        wheel, how = fetch(name, dest)
        rows.append((name, wheel, how))
        print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB, {how}", file=sys.stderr, flush=True)
    wheels = sum(w.stat().st_size for _, w, _ in rows)
    tree = tracked_bytes()
    print(f"\n| wheel | MiB | how |\n|---|---:|---|")
    for name, wheel, how in rows:
        print(f"| {wheel.name} | {wheel.stat().st_size / 2**20:.2f} | {how} |")
    print(f"\nwheels {wheels / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
          f"{(wheels + tree) / 2**20:.1f} MiB of the device call's {CARRY_LIMIT / 2**20:.0f} MiB"
          + (f"; left out: {', '.join(n for n in WHEELS if n not in chosen)}" if len(chosen) < len(WHEELS) else ""))
    if problem := install_check([w for _, w, _ in rows]):
        print(f"pip would not install these on CPython {PYTHON_VERSION} manylinux x86_64: {problem}", file=sys.stderr)
        return 1
    print(f"pip would install every one on CPython {PYTHON_VERSION} manylinux x86_64 (checked with --dry-run)")
    if wheels + tree > CARRY_LIMIT:
        print("too large for one device call: leave something out with --skip", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
