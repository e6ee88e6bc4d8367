"""benchmarks/gpu_check.py and gpu_wheels.py: what runs without a GPU, budgets, failures, the report, the wheel list."""

import json
import os
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import gpu_check
    import gpu_wheels
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def test_without_torch_make_gpu_check_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}  # -S: no site-packages, so a python without torch
    done = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable} -S"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cannot import torch; nothing to check" in done.stdout
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def test_without_a_cuda_device_gpu_check_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA
    assert not any(tmp_path.iterdir())


def step(name: str, code: str, budget_s: float = 30, **kwargs) -> gpu_check.Step:
    return gpu_check.Step(name, ("-c", code), budget_s, f"what {name} does", **kwargs)


def test_each_step_gets_a_result_within_its_budget_and_the_overall_one(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hangs = (f"import subprocess, sys, time, pathlib; child = subprocess.Popen([sys.executable, '-c', "
             f"'import time; time.sleep(60)']); pathlib.Path({str(pid_file)!r}).write_text(str(child.pid)); "
             f"print('started', flush=True); time.sleep(60)")
    steps = [
        step("ok", "print('| a | b |'); print('|---|---|'); print('| 1 | 2 |')"),
        step("fails", "import sys; print('partial figures', flush=True); sys.exit('boom: a kernel failed')"),
        step("missing", "print('never runs')", needs_files=("configs/no_such_config.yaml",)),
        step("hangs", hangs, budget_s=3),
        step("late", "print('never runs either')"),
    ]
    seen = []
    start = time.monotonic()
    results = gpu_check.run_steps(steps, budget_s=7, out_dir=tmp_path, on_result=seen.append)
    assert time.monotonic() - start < 6
    by_name = {r["name"]: r for r in results}
    assert seen == results and [r["name"] for r in results] == [s.name for s in steps]
    assert by_name["ok"]["status"] == "ok" and by_name["ok"]["stdout"].startswith("| a | b |")
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["returncode"] == 1
    assert "boom: a kernel failed" in by_name["fails"]["output_tail"] and "partial figures" in by_name["fails"]["output_tail"]
    assert by_name["missing"]["status"] == "skipped"
    assert by_name["missing"]["reason"] == "configs/no_such_config.yaml does not exist here"
    assert by_name["hangs"]["status"] == "timeout" and "3 s" in by_name["hangs"]["reason"]
    assert "started" in by_name["hangs"]["stdout"]
    assert by_name["late"]["status"] == "skipped" and "overall budget of 7 s" in by_name["late"]["reason"]
    # the whole process group went at the timeout, the step's own children too
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    assert "--- stderr ---\nboom: a kernel failed" in (tmp_path / "logs" / "fails.log").read_text()
    json.dumps(results)  # what results.json holds


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_a_missing_module_skips_its_step_with_the_reason():
    reason = gpu_check.why_not(step("x", "", needs_modules=("json", "no_such_module_here")))
    assert reason.startswith("needs no_such_module_here")
    assert gpu_check.why_not(step("x", "", needs_modules=("json",))) == ""


def test_throughput_report_gives_tokens_per_second_and_mfu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny", "--batch",
                           "1", "--seq-len", "16", "--steps", "1", "--repeats", "1", "--warmup", "0", "--vocab", "512",
                           "--dtype", "fp32", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = {"name": "throughput", "status": "ok", "stdout": done.stdout, "seconds": 1.0}
    figures = gpu_check.throughput_figures(result, tmp_path, device_name="NVIDIA H200")
    assert set(figures["tokens_per_s"]) == {"leantrain", "HF LlamaForCausalLM"}
    from leantrain.nn.config import ModelConfig
    from leantrain.nn.model import Transformer, resolve_model_config

    cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=512, seq_len=16)
    params = Transformer(cfg).num_params()
    assert abs(figures["parameters"] - params) <= 0.05e6  # the report rounds to 0.1M
    flops = 6 * (figures["parameters"] - 512 * cfg.dim) + 12 * cfg.n_layers * cfg.dim * 16
    assert figures["flops_per_token"] == flops and figures["bf16_peak_flops"] == 989e12
    rate = figures["tokens_per_s"]["leantrain"]
    assert figures["mfu"]["leantrain"] == pytest.approx(rate * flops / 989e12)
    result["figures"] = figures
    assert "MFU" in gpu_check.summary(result) and "ratio" in gpu_check.summary(result)
    assert gpu_check.throughput_figures(result, tmp_path, device_name="Some GPU")["mfu"]["leantrain"] is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA GH200 480GB", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)])
def test_bf16_peak_by_card_name(name, peak):
    assert gpu_check.bf16_peak(name) == peak


def test_tests_figures_read_the_junit_report(tmp_path):
    (tmp_path / "pytest.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="5">'
        '<testcase classname="tests.nn.test_cut_ce" name="test_a"/>'
        '<testcase classname="tests.nn.test_cut_ce" name="test_b"><failure message="assert 0.2 &lt; 1e-05">tb'
        '</failure></testcase></testsuite></testsuites>')
    figures = gpu_check.tests_figures({}, tmp_path)
    assert {k: figures[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == \
        {"tests": 5, "passed": 2, "failures": 1, "errors": 0, "skipped": 2}
    assert figures["problems"] == [{"test": "tests.nn.test_cut_ce::test_b", "kind": "failure",
                                    "message": "assert 0.2 < 1e-05"}]
    result = {"name": "tests", "status": "failed", "reason": "exit code 1", "figures": figures}
    assert gpu_check.summary(result) == ("exit code 1; 2 passed, 1 failed, 0 errors, 2 skipped; "
                                         "failure: tests.nn.test_cut_ce::test_b")


def test_markdown_has_one_row_a_step_and_each_benchmarks_own_report():
    machine = {"device": "NVIDIA H200", "memory_gib": 139.8, "torch": "2.11.0", "cuda": "13.0", "triton": "3.5.0",
               "python": "3.12.3", "date": "2026-12-05 10:00 UTC"}
    report = "shape line\n\n| shape | loss | time (ms) | peak extra (MB) |\n|---|---|---|---|\n| llama3 | naive | 9.5 | 6300 |"
    results = [
        {"name": "cce", "status": "ok", "seconds": 31.2, "reason": "", "command": "python benchmarks/cce_gpu.py",
         "what": "cut cross-entropy", "stdout": report,
         "figures": gpu_check.cce_figures({"stdout": report}, Path("."))},
        {"name": "fit_7b", "status": "skipped", "seconds": 0.0, "reason": "configs/galore_7b.yaml does not exist here",
         "command": "python x", "what": "7B", "stdout": ""},
        {"name": "galore_step", "status": "failed", "seconds": 2.0, "reason": "exit code 1 | pipe", "command": "c",
         "what": "w", "stdout": "| not | shown |"},
    ]
    md = gpu_check.render_markdown(machine, results, 480)
    lines = md.splitlines()
    assert lines[0].startswith("**GPU check**: NVIDIA H200 (140 GiB), torch 2.11.0, CUDA 13.0")
    assert "33 s of a 480 s budget" in lines[0]
    assert lines[2:4] == ["| step | status | s | result |", "|---|---|---:|---|"]
    assert lines[4] == "| cce | ok | 31 | naive: 9.5 ms, 6300 MB |"
    assert lines[5] == "| fit_7b | skipped | 0 | configs/galore_7b.yaml does not exist here |"
    assert lines[6] == "| galore_step | failed | 2 | exit code 1 \\| pipe |"
    assert "**cce** (`python benchmarks/cce_gpu.py`): cut cross-entropy" in md and md.rstrip().endswith("| 6300 |")
    assert "| not | shown |" not in md  # a failed step's output is in results.json, not in the table's report


def test_the_steps_environment_installs_carried_wheels_and_imports_leantrain_from_here(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "demo_carried-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("demo_carried/__init__.py", "VALUE = 42\n")
        whl.writestr("demo_carried-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-carried\nVersion: 0.1\n")
        whl.writestr("demo_carried-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                         "Tag: py3-none-any\n")
        whl.writestr("demo_carried-0.1.dist-info/RECORD", "")
    env, record = gpu_check.prepare_environment(tmp_path / "scratch", wheels)
    assert record["returncode"] == 0 and record["wheels"] == ["demo_carried-0.1-py3-none-any.whl"]
    done = subprocess.run([sys.executable, "-c", "import demo_carried, leantrain; print(demo_carried.VALUE); "
                                                 "print(leantrain.__file__)"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    value, path = done.stdout.split()
    assert value == "42" and Path(path).resolve() == ROOT / "__init__.py"
    assert Path(path).parent == tmp_path / "scratch" / "shim" / "leantrain"
    _, record = gpu_check.prepare_environment(tmp_path / "empty", tmp_path / "no_wheels")
    assert record["wheels"] == [] and "no wheels" in record["note"]


def test_without_pip_the_wheels_are_unpacked(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "demo_unpacked-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("demo_unpacked/__init__.py", "VALUE = 7\n")
    monkeypatch.setattr(gpu_check, "run_process", lambda argv, timeout, env=None: (1, "", "No module named pip"))
    env, record = gpu_check.prepare_environment(tmp_path / "scratch", wheels)
    assert record["unpacked"] and "No module named pip" in record["error"]
    done = subprocess.run([sys.executable, "-c", "import demo_unpacked; print(demo_unpacked.VALUE)"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.stdout.strip() == "7", done.stderr


def test_list_names_every_step_without_a_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--list"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    names = [line.split()[0] for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert names == ["tests", "throughput", "cce", "galore_step", "fit_7b"]
    assert sum(s.budget_s for s in gpu_check.STEPS) <= gpu_check.BUDGET_S + 30  # the last gets what is left
    assert gpu_check.BUDGET_S <= 8 * 60


def requirements(name: str) -> list[str]:
    """Requires-Dist of an installed distribution as it applies on the GPU machine (Linux, Python 3.12, no extras)."""
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    out = []
    for line in metadata.distribution(name).requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out.append(gpu_wheels.canonical(req.name))
    return out


def test_wheel_list_is_closed_over_what_the_gpu_machine_lacks():
    known = set(gpu_wheels.WHEELS) | gpu_wheels.ON_DEVICE
    checked = 0
    for name, (needed_by, _) in gpu_wheels.WHEELS.items():
        assert name == gpu_wheels.canonical(name)
        assert all(n in gpu_wheels.WHEELS for n in needed_by), name
        try:
            needs = requirements(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing to check it against
        checked += 1
        assert not set(needs) - known, f"{name} needs {sorted(set(needs) - known)}: add them to WHEELS or ON_DEVICE"
        for dependency in needs:  # each carried dependency says who needs it
            if dependency in gpu_wheels.WHEELS:
                assert name in gpu_wheels.WHEELS[dependency][0] or not gpu_wheels.WHEELS[dependency][0], (name, dependency)
    assert checked >= 10


def test_skipping_a_wheel_drops_what_only_it_needs():
    assert gpu_wheels.carried(set()) == list(gpu_wheels.WHEELS)
    default = gpu_wheels.carried(set(gpu_wheels.DEFAULT_SKIP))
    assert "wandb" not in default and "opentelemetry-proto" not in default and "protobuf" not in default
    assert {"pydantic", "pydantic-core", "deepspeed", "omegaconf", "bitsandbytes", "galore-torch"} <= set(default)
    assert "pydantic" not in gpu_wheels.carried({"wandb", "deepspeed"})
    command = gpu_wheels.download_command("zfec==1.6.0.0", Path("/tmp/w"))
    assert command[-1] == "zfec==1.6.0.0" and "--only-binary=:all:" in command and "--no-deps" in command
    assert command[command.index("--python-version") + 1] == "3.12" and "manylinux_2_28_x86_64" in command


def test_main_writes_json_and_markdown_after_every_step(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the glue only: each step is a small script
    monkeypatch.setattr(gpu_check, "machine_info", lambda: {"device": "NVIDIA H200", "memory_gib": 139.8,
                                                            "torch": "2.11.0", "cuda": "13.0"})
    monkeypatch.setattr(gpu_check.tempfile, "tempdir", str(tmp_path))  # the scratch directory
    monkeypatch.setattr(gpu_check, "STEPS", (step("tests", "print('1 passed')"), step("cce", "import sys; sys.exit(3)")))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--wheels", str(tmp_path / "none")]) == 1  # a step failed
    out = tmp_path / "gpu-check"
    saved = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in saved["steps"]] == ["tests", "cce"] and saved["budget_s"] == gpu_check.BUDGET_S
    assert [s["status"] for s in saved["steps"]] == ["ok", "failed"] and saved["machine"]["device"] == "NVIDIA H200"
    assert "no wheels" in saved["wheels"]["note"]
    md = (out / "results.md").read_text()
    assert "| tests | ok |" in md and "| cce | failed |" in md and "exit code 3" in md
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["cce.log", "tests.log"]


def test_capped_measure_caps_the_memory_and_reports_estimate_and_peak(monkeypatch, capsys):
    import torch

    from leantrain.trainer import estimate as plan

    calls = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 96 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f: calls.setdefault("fraction", f))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    steps = []
    run_steps = plan.run_steps
    monkeypatch.setattr(plan, "run_steps", lambda *a, **k: steps.append(plan.SIMULATED_STEPS) or run_steps(*a, **k))
    monkeypatch.setattr(plan, "SIMULATED_STEPS", plan.SIMULATED_STEPS)  # restored after the test
    # The glue on the CPU: a tiny quickstart stands in for the 7B config.
    gpu_check.capped_measure(24, "quickstart", ["trainer.device=cpu", "trainer.micro_batch_size=1",
                                                "trainer.global_batch_size=1", "data.seq_len=8", "data.vocab_size=512"])
    assert calls["fraction"] == 0.25 and steps[-1] == gpu_check.CAPPED_STEPS == 3
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
    result = {"stdout": line + "\n", "status": "ok", "name": "fit_7b", "reason": ""}
    figures = gpu_check.capped_figures(result, Path("."))
    assert figures["steps"] == 3 and figures["cap_gib"] == 24 and figures["measured_gib"] > 0
    assert figures["estimated_gib"] > 0 and figures["optimizer"] == "adamw"
    result["figures"] = figures
    assert gpu_check.summary(result).startswith("3 steps, peak ")


def test_install_check_refuses_a_wheel_the_gpu_machines_python_cannot_take(tmp_path):
    def wheel(tag: str) -> Path:
        path = tmp_path / f"demo-0.1-{tag}.whl"
        with zipfile.ZipFile(path, "w") as whl:
            whl.writestr("demo/__init__.py", "")
            whl.writestr("demo-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 0.1\n")
            whl.writestr("demo-0.1.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")
            whl.writestr("demo-0.1.dist-info/RECORD", "")
        return path

    assert gpu_wheels.install_check([wheel("cp312-cp312-manylinux_2_17_x86_64")]) == ""
    assert "not a supported wheel" in gpu_wheels.install_check([wheel("cp311-cp311-manylinux_2_17_x86_64")])
