"""`python -m linrec.bench.gpu_check` (and `linrec bench gpu-check`) on the CPU: the plan, a dry run, a smoke
run of the GPU steps at tiny sizes (--allow-cpu --size small), GPU steps skipped without CUDA, a failing or
hanging step recorded while the next one runs, the per-kernel isolation after a failed kernels step, the
overall budget, and imports light enough for a GPU machine without fastapi, uvicorn, pydantic or fla."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from linrec.bench import gpu_check
from linrec.bench.gpu_check import Step, first_difference, isolation_steps, shared_prefix_prompts
from linrec.cli import main as cli_main

FORBIDDEN = ("fastapi", "uvicorn", "pydantic", "starlette", "fla")


def _loaded_after(code: str) -> set[str]:
    probe = (
        f"import sys\n{code}\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.strip().splitlines()[-1].split(","))


def test_import_and_help_load_no_server_stack_fla_or_torch():
    loaded = _loaded_after("import linrec.bench.gpu_check")
    assert not loaded & {*FORBIDDEN, "torch"}, loaded & {*FORBIDDEN, "torch"}
    code = (
        "from linrec.bench.gpu_check import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )  # fmt: skip
    loaded = _loaded_after(code)
    assert not loaded & {*FORBIDDEN, "torch"}
    proc = subprocess.run(
        [sys.executable, "-m", "linrec.bench.gpu_check", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "--budget-s" in proc.stdout


def test_cli_gpu_check_help_loads_no_server_stack():
    code = "from linrec.cli import main\ntry:\n    main(['bench', 'gpu-check', '--help'])\nexcept SystemExit:\n    pass"
    loaded = _loaded_after(code)
    assert not loaded & {"fastapi", "uvicorn", "pydantic", "fla", "torch"}


def test_plan_covers_every_check_in_the_budget():
    args = gpu_check.build_parser().parse_args([])
    args.steps = ["kernels", "equality", "pytest", "decode"]
    args.decode_families = list(gpu_check.DECODE_FAMILIES)
    args.equality_families = list(gpu_check.EQUALITY_FAMILIES)
    args.cuda = True
    steps = gpu_check.plan_steps(args)
    names = [s.name for s in steps]
    decode = [f"decode {f}" for f in gpu_check.DECODE_FAMILIES]
    assert names == ["env", "kernels", "equality", "pytest", "decode models", *decode]
    assert sum(s.timeout_s for s in steps) <= gpu_check.DEFAULT_BUDGET_S  # issue 11's 8 minutes + lolcats' 45 s
    by_name = {s.name: s for s in steps}
    assert "--continue-on-collection-errors" in by_name["pytest"].argv and "tests/server" not in by_name["pytest"].argv
    assert by_name["pytest"].needs_module == "pytest" and not by_name["env"].needs_cuda
    assert by_name["decode gla"].argv[-6:] == ["--batch-sizes", "1,8,64,256", "--output-len", "16", "--repeats", "1"]
    assert (
        set(gpu_check.EQUALITY_FAMILIES)
        == set(gpu_check.DECODE_FAMILIES)
        == {
            "liger_gla",
            "gla",
            "gated_deltanet",
            "mamba2",
            "lolcats_llama",
        }
    )


def test_dry_run_writes_the_plan(tmp_path):
    out = tmp_path / "report.md"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    report = out.read_text()
    assert "| env | passed |" in report and "torch:" in report  # env runs even in a dry run
    for name in ("kernels", "equality", "pytest", "decode models", "decode mamba2", "decode gla"):
        assert f"| {name} | planned (dry run)" in report
    assert "linrec.cli bench kernels --size 1.3b --batch-sizes 1,8,64,256 --device cuda" in report


def test_without_cuda_the_gpu_steps_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "has_cuda", lambda: False)
    out = tmp_path / "report.md"
    assert cli_main(["bench", "gpu-check", "--steps", "kernels,decode", "--out", str(out)]) == 0
    report = out.read_text()
    assert "| kernels | skipped: no CUDA |" in report and "| decode mamba2 | skipped: no CUDA |" in report
    assert "| env | passed |" in report


@pytest.mark.slow
def test_cpu_smoke_run_of_the_gpu_steps(tmp_path, monkeypatch):
    """Every GPU step's command runs as planned at tiny sizes on the CPU, and its output lands in the report,
    in processes where fastapi, uvicorn, pydantic and fla cannot be imported (as on the GPU machine)."""
    blocker = tmp_path / "no_server_stack"
    blocker.mkdir()
    blocked = ", ".join(repr(m) for m in FORBIDDEN)
    (blocker / "sitecustomize.py").write_text(f"import sys\nfor name in ({blocked},):\n    sys.modules[name] = None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "report.md"
    argv = ["--allow-cpu", "--size", "small", "--steps", "kernels,equality,decode", "--out", str(out)]
    code = gpu_check.main([*argv, "--decode-families", "mamba2,gla", "--equality-families", "mamba2"])
    report = out.read_text()
    assert code == 0, report
    for name in ("kernels", "equality", "decode models", "decode mamba2", "decode gla"):
        assert f"| {name} | passed |" in report
    assert "gla (small): " in report  # the decode models step wrote it, the decode step reused it
    assert "linrec torch (gather/scatter)" in report  # the kernels table
    assert "fla-core not importable" in report  # the blocker worked: fla peers skipped, with the reason
    assert "fastapi importable: False" in report and "pydantic importable: False" in report
    assert "PASS mamba2: each request alone == batched" in report and "all equal" in report
    assert "peer HF Mamba2ForCausalLM.generate" in report and "prefill 2 x 32 tokens" in report
    assert "peer skipped: fla.models is not importable" in report


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_or_hanging_step_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    steps = [
        Step("fails", _python("print('partial'); raise SystemExit(3)"), 30, needs_cuda=False),
        Step("hangs", _python("import time; print('started', flush=True); time.sleep(60)"), 3, needs_cuda=False),
        Step("needs pytest-nope", _python("pass"), 30, needs_cuda=False, needs_module="no_such_module_here"),
        Step("after", _python("print('still ran')"), 30, needs_cuda=False),
    ]
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args: steps)
    monkeypatch.setattr(gpu_check, "has_cuda", lambda: False)
    out = tmp_path / "report.md"
    assert gpu_check.main(["--out", str(out)]) == 1
    report = out.read_text()
    assert "| fails | failed (exit 3) |" in report and "partial" in report
    assert "| hangs | timed out after 3 s |" in report and "started" in report
    assert "| needs pytest-nope | skipped: no_such_module_here is not importable here |" in report
    assert "| after | passed |" in report and "still ran" in report


def test_the_budget_bounds_every_step(tmp_path, monkeypatch):
    steps = [Step("first", _python("import time; time.sleep(60)"), 60, needs_cuda=False)]
    steps.append(Step("second", _python("pass"), 60, needs_cuda=False))
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args: steps)
    monkeypatch.setattr(gpu_check, "has_cuda", lambda: False)
    out = tmp_path / "report.md"
    assert gpu_check.main(["--out", str(out), "--budget-s", "8"]) == 1
    report = out.read_text()
    assert "| first | timed out after 6 s |" in report
    assert "| second | skipped: out of time (the overall budget is spent) |" in report


def test_a_failed_kernels_step_runs_each_named_kernel_alone(tmp_path, monkeypatch):
    failing = Step("kernels", _python("print('error: gated_delta / fla x / batch 1: boom'); raise SystemExit(1)"), 30)
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args: [failing])
    monkeypatch.setattr(gpu_check, "has_cuda", lambda: True)
    seen = []

    def isolate(output, size, device):
        seen.append((output, size, device))
        return [Step("kernels-isolate gated_delta", _python("print('alone: clean')"), 30)]

    monkeypatch.setattr(gpu_check, "isolation_steps", isolate)
    out = tmp_path / "report.md"
    assert gpu_check.main(["--out", str(out)]) == 1
    assert "error: gated_delta" in seen[0][0] and seen[0][1:] == ("1.3b", "cuda")
    assert "| kernels-isolate gated_delta | passed |" in out.read_text()


def test_isolation_steps_name_the_failing_kernels(monkeypatch):
    monkeypatch.setattr(gpu_check, "compute_sanitizer", lambda: None)
    steps = isolation_steps(
        "...\nerror: gated_delta / fla fused_recurrent / batch 256: RuntimeError: x\n", "1.3b", "cuda"
    )
    assert [s.name for s in steps] == ["kernels-isolate gated_delta"]
    (step,) = steps
    assert step.env == {"CUDA_LAUNCH_BLOCKING": "1"}
    assert step.argv[1:] == [
        "-m",
        "linrec.cli",
        "bench",
        "kernels",
        "--size",
        "1.3b",
        "--kernels",
        "gated_delta",
        "--batch-sizes",
        "1,8",
        "--eager",
        "--repeats",
        "2",
        "--device",
        "cuda",
    ]
    assert len(isolation_steps("timed out, no error line", "1.3b", "cuda")) == len(gpu_check.KERNEL_NAMES)
    monkeypatch.setattr(gpu_check, "compute_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    (step,) = isolation_steps("error: ssd / x / batch 1: y", "1.3b", "cuda")
    assert step.argv[:3] == ["/opt/cuda/bin/compute-sanitizer", "--tool", "memcheck"]


def test_kernel_names_follow_the_bench():
    from linrec.bench.kernels import KERNEL_SHAPES

    assert gpu_check.KERNEL_NAMES == tuple(KERNEL_SHAPES["1.3b"])


def test_shared_prefix_prompts_and_first_difference():
    prompts = shared_prefix_prompts(10, 300, 512)
    assert len(prompts) == 10 and all(p[:300] == prompts[0][:300] for p in prompts)
    assert [len(p) - 300 for p in prompts] == [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert all(10 <= t < 512 for p in prompts for t in p)
    assert first_difference([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert first_difference([[1, 2], [3, 5]], [[1, 2], [3, 4]]) == "request 1, token 1: 5 != 4"
    assert first_difference([[1]], [[1, 2]]) == "request 0, token 1: end != 2"


def test_a_timed_out_step_leaves_no_process_behind(tmp_path):
    """pytest's tests start subprocesses of their own: a timeout kills the step's whole process group."""
    import os
    import time

    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('grandchild', p.pid, flush=True)\n"
        "time.sleep(60)"
    )
    step = Step("spawns", _python(code), 3, needs_cuda=False)
    result = gpu_check.run_step(step, cuda=False, deadline=time.monotonic() + 60, dry_run=False, root=tmp_path)
    assert result.status == "timed out after 3 s"
    pid = int(result.output.split("grandchild")[1].split()[0])
    for _ in range(50):  # reparented to init, which reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's subprocess {pid} outlived the timeout")
