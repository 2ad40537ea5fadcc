"""kernels/toolchain.py on the CPU with fakes: version parsing on real `ptxas --version` outputs, the known-bad
conditions (fla#1262, triton#11781, fla#640) as facts in and findings out, the remedy and fallback decision,
backend resolution answering a bad toolchain with one warning line, Triton's cache dir and ptxas set through a
stand-in of triton.knobs, and the compile watch driven by hand as Triton's hook would call it."""

from __future__ import annotations

import logging
import os
import stat
import sys
import types

import pytest

from linrec.kernels import backend, toolchain
from linrec.kernels.toolchain import CompileWatch, Ptxas, Toolchain

# `ptxas --version` as the ptxas bundled with triton 3.6.0 (sm < 100) prints it; 3.9.0's for sm < 100 and >= 100.
PTXAS_12_8 = """ptxas: NVIDIA (R) Ptx optimizing assembler
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Fri_Feb_21_20:21:21_PST_2025
Cuda compilation tools, release 12.8, V12.8.93
Build cuda_12.8.r12.8/compiler.35583870_0
"""
PTXAS_12_9 = PTXAS_12_8.replace("release 12.8, V12.8.93", "release 12.9, V12.9.86")
PTXAS_13_4 = PTXAS_12_8.replace("release 12.8, V12.8.93", "release 13.4, V13.4.59")

BUNDLED_12_8 = Ptxas("/triton/bin/ptxas", (12, 8, 93), "bundled with triton")
BUNDLED_12_9 = Ptxas("/triton/bin/ptxas", (12, 9, 86), "bundled with triton")
BLACKWELL_13_4 = Ptxas("/triton/bin/ptxas-blackwell", (13, 4, 59), "ptxas-blackwell bundled with triton")
TOOLKIT_13_0 = Ptxas("/usr/local/cuda/bin/ptxas", (13, 0, 88), "/usr/local/cuda")


def hopper(triton="3.6.0", ptxas=BUNDLED_12_8, candidates=(), driver=(13, 0), capability=(9, 0)) -> Toolchain:
    return Toolchain(triton, None, True, capability, driver, ptxas, tuple(candidates))


def test_versions_parse():
    assert toolchain.parse_ptxas_version(PTXAS_12_8) == (12, 8, 93)
    assert toolchain.parse_ptxas_version(PTXAS_13_4) == (13, 4, 59)
    assert toolchain.parse_ptxas_version("Cuda compilation tools, release 12.4") == (12, 4, 0)
    assert toolchain.parse_ptxas_version("ptxas: command not found") is None
    assert toolchain.parse_version("3.6.0") == (3, 6, 0)
    assert toolchain.parse_version("3.7.0+git1a2b3c") == (3, 7, 0)
    assert toolchain.parse_version("3.9.0rc1") == (3, 9, 0)
    assert toolchain.parse_version("") == ()


def test_the_measured_h200_stack_prefills_with_torch_and_decodes_with_triton():
    """triton 3.6.0 bundles ptxas 12.8.93: both known faults apply on sm_90, and no newer ptxas is at hand. The
    faults are in tensor-core prefill kernels; the decode kernels measured right on that stack."""
    verdict = toolchain.decide(hopper())
    codes = {f.code: f for f in verdict.findings}
    assert codes["sm90-ptxas"].is_blocking
    assert "fla#1262" in codes["sm90-ptxas"].message and "triton#11781" in codes["sm90-ptxas"].message
    assert not codes["fla-hopper-backward"].is_blocking  # fla#640: backward only, never run for inference
    assert verdict.use_triton and not verdict.use_triton_prefill and verdict.ptxas_override is None
    line = verdict.log_line()
    assert "\n" not in line and "ptxas 12.8.93" in line and "prefill runs the torch chunked path" in line
    assert "decode keeps Triton" in line and "TRITON_PTXAS_PATH" in line


def test_a_newer_ptxas_on_the_machine_is_the_remedy():
    """triton 3.9.0: ptxas 12.9.86 for sm_90 (between fla#1262's two bad versions, and triton#11781's), and its own
    ptxas-blackwell 13.4 beside it."""
    verdict = toolchain.decide(hopper("3.9.0", BUNDLED_12_9, [TOOLKIT_13_0, BLACKWELL_13_4]))
    [finding] = [f for f in verdict.findings if f.is_blocking]
    assert "triton#11781" in finding.message and "fla#1262" in finding.message
    assert verdict.use_triton and verdict.ptxas_override == BLACKWELL_13_4  # 13.0.88 is too old
    assert verdict.use_triton_prefill  # the newer ptxas fixes the prefill kernels too
    assert "Triton now assembles with ptxas 13.4.59" in verdict.log_line()


def test_ptxas_13_1_and_13_2_miss_only_the_wgmma_fix():
    tc = hopper("3.9.0", Ptxas("/opt/ptxas", (13, 1, 80), "TRITON_PTXAS_PATH"))
    [finding] = [f for f in toolchain.find_findings(tc) if f.is_blocking]
    assert "triton#11781" in finding.message and "fla#1262" not in finding.message


def test_no_remedy_the_driver_cannot_load_or_the_user_did_not_choose():
    # a CUDA 12 driver cannot load what a CUDA 13 ptxas assembles: prefill on torch, decode on Triton
    for driver in ((12, 8), None):
        verdict = toolchain.decide(hopper("3.9.0", BUNDLED_12_9, [BLACKWELL_13_4], driver=driver))
        assert verdict.use_triton and not verdict.use_triton_prefill and verdict.ptxas_override is None
    # an explicit TRITON_PTXAS_PATH is never overridden: a bad one means the torch prefill
    explicit = Ptxas("/opt/ptxas", (12, 8, 93), "TRITON_PTXAS_PATH")
    verdict = toolchain.decide(hopper("3.9.0", explicit, [BLACKWELL_13_4]))
    assert not verdict.use_triton_prefill and verdict.ptxas_override is None


@pytest.mark.parametrize(
    "tc",
    [
        hopper("3.9.0", Ptxas("/opt/ptxas", (13, 3, 0), "TRITON_PTXAS_PATH")),  # a good ptxas on Hopper
        hopper("3.6.0", BUNDLED_12_8, capability=(8, 0)),  # A100: no known fault
        hopper("3.9.0", BLACKWELL_13_4, capability=(10, 0)),  # Blackwell
        Toolchain("3.6.0", None, False, None, None, None),  # ROCm (no NVIDIA capability): no ptxas
    ],
)
def test_good_toolchains_run_triton_as_they_are(tc):
    verdict = toolchain.decide(tc)
    assert verdict.use_triton and verdict.use_triton_prefill
    assert verdict.ptxas_override is None and verdict.log_line() is None


def test_a_missing_triton_or_ptxas_is_no_crash():
    missing = Toolchain(None, "ImportError: libcuda", True, None, (13, 0), None)
    verdict = toolchain.decide(missing)
    assert not verdict.use_triton and not verdict.use_triton_prefill
    assert "triton does not import (ImportError: libcuda)" in verdict.log_line()
    broken = hopper("3.9.0", Ptxas("/triton/bin/ptxas", None, "bundled with triton"), [BLACKWELL_13_4])
    verdict = toolchain.decide(broken)
    assert verdict.use_triton and verdict.ptxas_override == BLACKWELL_13_4
    assert not toolchain.decide(hopper("3.9.0", Ptxas("/x", None, "bundled with triton"))).use_triton


def _script(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_ptxas_version_is_read_with_a_timeout(tmp_path, monkeypatch):
    good = _script(tmp_path, "ptxas", f"cat <<'EOF'\n{PTXAS_12_8}EOF\n")
    assert toolchain.run_ptxas_version(good, "x").version == (12, 8, 93)
    assert toolchain.run_ptxas_version(str(tmp_path / "missing"), "x").version is None
    assert toolchain.run_ptxas_version(_script(tmp_path, "bad", "exit 3\n"), "x").version is None
    monkeypatch.setattr(toolchain, "PTXAS_TIMEOUT_S", 0.5)
    assert toolchain.run_ptxas_version(_script(tmp_path, "hang", "sleep 30\n"), "x").version is None


def test_the_ptxas_in_use_follows_triton(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir, "ptxas", f"cat <<'EOF'\n{PTXAS_12_9}EOF\n")
    _script(bin_dir, "ptxas-blackwell", f"cat <<'EOF'\n{PTXAS_13_4}EOF\n")
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    monkeypatch.delenv("TRITON_PTXAS_BLACKWELL_PATH", raising=False)
    assert toolchain._ptxas_in_use((9, 0), str(bin_dir)).version == (12, 9, 86)
    assert toolchain._ptxas_in_use((10, 0), str(bin_dir)).version == (13, 4, 59)
    explicit = _script(tmp_path, "my-ptxas", f"cat <<'EOF'\n{PTXAS_13_4}EOF\n")
    monkeypatch.setenv("TRITON_PTXAS_PATH", explicit)
    chosen = toolchain._ptxas_in_use((9, 0), str(bin_dir))
    assert chosen.version == (13, 4, 59) and chosen.is_explicit
    monkeypatch.setenv("TRITON_PTXAS_PATH", str(tmp_path / "missing"))  # triton falls back to its own
    assert toolchain._ptxas_in_use((9, 0), str(bin_dir)).source == "bundled with triton"
    found = toolchain._candidate_ptxas(str(bin_dir))
    assert any(c.source == "ptxas-blackwell bundled with triton" and c.version == (13, 4, 59) for c in found)


def test_inspect_on_the_cpu_does_not_raise():
    import torch

    tc = toolchain.inspect_toolchain(torch.device("cuda"))
    assert tc.triton_version is not None
    if not torch.cuda.is_available():
        assert tc.capability is None and toolchain.decide(tc).use_triton


@pytest.fixture
def fresh_prepare(monkeypatch):
    """prepare_triton as on a CUDA machine (not under the interpreter), with the toolchain and Triton's
    settings replaced by fakes; its per-process cache emptied before and after."""
    applied = []
    monkeypatch.setattr(toolchain.envs, "triton_interpreter", lambda: False)
    monkeypatch.setattr(toolchain, "apply_verdict", lambda verdict: applied.append(verdict))
    monkeypatch.setattr(toolchain, "install_compile_watch", lambda: None)
    toolchain._prepared.cache_clear()
    yield applied
    toolchain._prepared.cache_clear()


def test_resolve_backend_answers_a_toolchain_that_cannot_compile_with_torch_and_one_line(
    fresh_prepare, monkeypatch, caplog
):
    inspected = []
    broken = hopper("3.6.0", Ptxas("/triton/bin/ptxas", None, "bundled with triton"))
    monkeypatch.setattr(toolchain, "inspect_toolchain", lambda device: inspected.append(device) or broken)
    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="linrec.kernels.toolchain"):
        assert backend.resolve_backend("auto", "cuda") == "torch"
        assert backend.resolve_backend("triton", "cuda") == "torch"  # asked for: still the correct kernels
        assert backend.resolve_backend("auto", "cuda:0") == "torch"  # the same device, however spelled
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert len(inspected) == 1
    assert backend.resolve_backend("auto", "cpu") == "torch" and backend.resolve_backend("torch", "cuda") == "torch"


def test_the_measured_h200_stack_sends_prefill_to_torch_and_keeps_triton_decode(fresh_prepare, monkeypatch):
    """On the measured stack the triton backend keeps its decode kernels and GLA prefill takes the torch
    chunked path: the same output and states as the torch backend, and linrec's Triton chunk kernel is not
    called. (CUDA is faked for the toolchain; the tensors stay on the CPU.)"""
    import torch

    import linrec.kernels.gla as gla_ops
    from linrec.models.batch import ForwardBatch

    monkeypatch.setattr(toolchain, "inspect_toolchain", lambda device: hopper())
    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)
    assert backend.resolve_backend("auto", "cuda") == "triton"
    assert not backend.can_run_triton_prefill("cuda") and backend.can_run_triton_prefill("cpu")

    monkeypatch.setattr(gla_ops, "can_run_triton_prefill", lambda device: backend.can_run_triton_prefill("cuda"))
    monkeypatch.setattr(gla_ops, "chunk_gla_varlen", lambda *a, **k: pytest.fail("the Triton prefill ran"))
    gen = torch.Generator().manual_seed(0)
    T, H, Hk, K, V = 7, 2, 1, 8, 8
    q, k, g = (torch.randn(T, n, K, generator=gen) for n in (H, Hk, Hk))
    v = torch.randn(T, Hk, V, generator=gen)
    g = -torch.nn.functional.softplus(g)
    batch = ForwardBatch.build([3, 4], [0, 0], [1, 2], torch.device("cpu"))
    outs = {}
    for name in ("triton", "torch"):
        state = torch.randn(3, Hk, K, V, generator=torch.Generator().manual_seed(1))
        outs[name] = (gla_ops.gla_varlen(q, k, v, g, state, batch, backend=name), state)
    assert torch.equal(outs["triton"][0], outs["torch"][0]) and torch.equal(outs["triton"][1], outs["torch"][1])


def test_resolve_backend_keeps_triton_with_the_remedy(fresh_prepare, monkeypatch):
    monkeypatch.setattr(toolchain, "inspect_toolchain", lambda device: hopper("3.9.0", BUNDLED_12_9, [BLACKWELL_13_4]))
    assert backend.resolve_backend("auto", "cuda") == "triton"
    [verdict] = fresh_prepare
    assert verdict.ptxas_override == BLACKWELL_13_4


def test_resolve_backend_loads_no_torch_at_import():
    code = "import sys, linrec.kernels.backend, linrec.kernels.toolchain; print('torch' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _fake_knobs():
    return types.SimpleNamespace(
        cache=types.SimpleNamespace(dir=None), nvidia=types.SimpleNamespace(ptxas=None), runtime=None
    )


def test_triton_caches_under_linrec_unless_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path / "linrec"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    knobs = _fake_knobs()
    toolchain.apply_verdict(toolchain.Verdict((), use_triton=True, ptxas_override=BLACKWELL_13_4), knobs)
    assert knobs.cache.dir == os.path.join(str(tmp_path / "linrec"), "triton")
    assert knobs.nvidia.ptxas == BLACKWELL_13_4.path
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    knobs = _fake_knobs()
    toolchain.apply_verdict(toolchain.Verdict((), use_triton=True), knobs)
    assert knobs.cache.dir is None and knobs.nvidia.ptxas is None  # the user's cache dir stays theirs


# ---- the compile watch: Triton's hook called by hand with the data it passes ----

COMPILE = {
    "signature": {
        "q_ptr": "*bf16",
        "slot_ptr": "*i64",
        "T": "i32",
        "stride": "i32",
        "K": "constexpr",
        "N": "constexpr",
    },
    "constants": {(4,): 64, (5,): 1},
    "configs": [{(0,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]}],
}
FN = types.SimpleNamespace(module="linrec.kernels.gla.chunk", name="_chunk_kernel")


def test_the_watch_counts_and_reports_only_late_compilations(caplog):
    watch = CompileWatch()
    with caplog.at_level(logging.WARNING, logger="linrec.kernels.toolchain"):
        watch(key="k0", repr="r", fn=FN, compile=COMPILE, is_manual_warmup=False, already_compiled=False)
        with watch.warming_up():
            assert not watch.is_armed
            watch(key="k1", repr="r", fn=FN, compile=COMPILE, is_manual_warmup=False, already_compiled=False)
        assert watch.is_armed and not caplog.records
        watch(key="k2", repr="r", fn=FN, compile=COMPILE, is_manual_warmup=False, already_compiled=False)
        with watch.warming_up():  # another engine warming up in the same process: not a bug
            watch(key="k3", repr="r", fn=FN, compile=COMPILE, is_manual_warmup=False, already_compiled=False)
    assert watch.num_compilations == 4 and watch.num_late_compilations == 1
    [record] = caplog.records
    message = record.getMessage()
    assert "linrec.kernels.gla.chunk._chunk_kernel" in message and "after warm-up" in message
    assert "(q_ptr: *bf16/16, slot_ptr: *i64, T: i32, stride: i32/16, K=64, N=1)" in message


def test_the_watch_survives_odd_hook_data():
    watch = CompileWatch()
    watch(key="('*fp32', 'D')", repr="kernel[num_warps=4](...)", fn=None, compile={"nothing": 1})
    watch()  # nothing at all
    assert watch.num_compilations == 2
    assert toolchain.kernel_name(None, "kernel[num_warps=4](...)") == "kernel"
    assert "('*fp32', 'D')" in toolchain.describe_specialization({"nothing": 1}, "('*fp32', 'D')")


def test_the_installed_watch_is_found_without_importing_triton(monkeypatch):
    watch = CompileWatch()
    fake = types.SimpleNamespace(runtime=types.SimpleNamespace(jit_post_compile_hook=watch))
    monkeypatch.setitem(sys.modules, "triton.knobs", fake)
    assert toolchain.current_compile_watch() is watch
    fake.runtime.jit_post_compile_hook = None
    assert toolchain.current_compile_watch() is None
    monkeypatch.delitem(sys.modules, "triton.knobs")
    assert toolchain.current_compile_watch() is None


def test_install_keeps_the_previous_hook_and_is_idempotent():
    calls = []
    runtime = types.SimpleNamespace(jit_post_compile_hook=lambda **kwargs: calls.append(kwargs["key"]))
    watch = toolchain.install_compile_watch(runtime)
    assert runtime.jit_post_compile_hook is watch
    assert toolchain.install_compile_watch(runtime) is watch
    runtime.jit_post_compile_hook(key="k", repr="r", fn=FN, compile=COMPILE, is_manual_warmup=False)
    assert calls == ["k"] and watch.num_compilations == 1


def test_install_on_a_triton_without_the_hook_says_so_in_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="linrec.kernels.toolchain"):
        assert toolchain.install_compile_watch(types.SimpleNamespace()) is None
    [record] = caplog.records
    assert "detector unavailable on triton" in record.getMessage()


def test_the_installed_triton_has_the_hook():
    """triton 3.6 and 3.9 both have knobs.runtime.jit_post_compile_hook (checked against both wheels)."""
    from triton import knobs

    assert hasattr(knobs.runtime, "jit_post_compile_hook")
