"""benchmarks/run_all.py: which benchmarks run, and how their results replace the README's."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"

README = """# Title
intro
<!-- benchmark:throughput -->
old throughput table
<!-- /benchmark:throughput -->
between
<!-- benchmark:cce_gpu -->
measured on an H100
<!-- /benchmark:cce_gpu -->
end
"""


def run_all(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_ALL), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_a_benchmark_rewrites_only_its_own_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    done = run_all("--quick", "--only", "throughput", "--readme", str(readme))
    assert done.returncode == 0, done.stdout + done.stderr
    text = readme.read_text()
    assert "old throughput table" not in text
    inside = text.split("<!-- benchmark:throughput -->\n")[1].split("\n<!-- /benchmark:throughput -->")[0]
    assert inside.startswith("`python benchmarks/throughput.py --preset tiny")
    assert "(quick sizes)" in inside and "torch " in inside and "cores" in inside
    assert "| model | tokens/s (median) |" in inside  # the script's own table, as markdown
    assert "ratio leantrain / HF" in inside
    # everything outside the section is untouched
    assert text.replace(inside, "X") == README.replace("old throughput table", "X")


def test_list_names_what_cannot_run_here_and_why():
    done = run_all("--list")
    assert done.returncode == 0
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(lines) >= {"throughput", "cce", "moe", "optimizers", "checkpoint", "cce_gpu", "offload_gpu"}
    import torch

    if not torch.cuda.is_available():
        assert "skip: needs a CUDA GPU" in lines["cce_gpu"]
    assert "runs: python benchmarks/throughput.py --preset 60m" in lines["throughput"]


def test_bad_input_is_refused_without_touching_the_readme(tmp_path):
    done = run_all("--only", "nonsense", "--readme", str(tmp_path / "missing.md"))
    assert done.returncode == 2 and "unknown benchmark(s) nonsense" in done.stderr
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    done = run_all("--quick", "--only", "throughput", "--readme", str(readme))
    assert done.returncode != 0 and "benchmark:throughput" in done.stdout + done.stderr
    assert readme.read_text() == "no markers here\n"


@pytest.mark.parametrize("report, expected", [
    ("line one\nline two\n| a | b |\n|---|---|\n| 1 | 2 |\nafter",
     "line one  \nline two  \n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nafter  "),
    ("# Part 1: a layer\ntext", "**Part 1: a layer**  \ntext  "),
])
def test_reports_become_markdown(report, expected):
    sys.path.insert(0, str(RUN_ALL.parent))
    try:
        import run_all as module
    finally:
        sys.path.remove(str(RUN_ALL.parent))
    assert module.as_markdown(report) == expected.strip()
