"""The `linrec` command line: subcommands end to end, lazy imports, and one-line errors without tracebacks."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import linrec
from linrec import cli
from linrec.cli import common, serve
from linrec.engine.config import EngineConfig, parse_state_memory


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """The subprocess environment, with a private cache so nothing touches the user's."""
    return {**os.environ, "LINREC_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path / "cache"))


def _linrec(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the installed console script when it sits beside this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / "linrec"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "linrec.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=120)


def test_version_and_help_import_no_torch(env: dict[str, str]) -> None:
    result = _linrec("--version", env=env)
    assert result.returncode == 0 and result.stdout.strip() == f"linrec {linrec.__version__}"
    for argv in ([], ["--help"], ["serve", "--help"], ["bench", "--help"], ["bench", "throughput", "--help"]):
        result = _linrec(*argv, env=env)
        assert result.returncode == (2 if not argv else 0) and "usage: linrec" in result.stdout + result.stderr
    # Parsing, and the help of every subcommand, loads none of the heavy packages (a fast `linrec --help`).
    probe = (
        "import sys, contextlib, io\n"
        "from linrec import cli\n"
        "for argv in ([], ['--help'], ['serve', '--help'], ['generate', '--help'], ['info', '--help'],\n"
        "             ['bench', '--help'], ['bench', 'throughput', '--help'], ['bench', 'serve', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        cli.main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]", "building the parser must not import torch (slow `linrec --help`)"


def test_errors_are_one_line_without_traceback(tmp_path: Path, env: dict[str, str]) -> None:
    missing = _linrec("convert", "--to", "liger-gla", str(tmp_path / "no_such_model"), str(tmp_path / "out"), env=env)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("linrec: error:") and "no_such_model" in lines[0]

    usage = _linrec("demo-model", str(tmp_path / "d"), "--family", "gpt2", env=env)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr and "invalid choice: 'gpt2'" in usage.stderr


def test_demo_model_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "gla-demo"
    assert cli.main(["demo-model", str(dst), "--family", "gla"]) == 0
    assert json.loads((dst / "config.json").read_text())["model_type"] == "gla"
    assert cli.main(["info", "--model", str(dst), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "GLAForCausalLM" in out and "bfloat16" in out and "bytes (constant in context length)" in out

    # the same directory again: refused, the model already there untouched
    before = (dst / "model.safetensors").read_bytes()
    assert cli.main(["demo-model", str(dst)]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert (dst / "model.safetensors").read_bytes() == before


def test_info_defaults_to_the_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    from linrec.models.demo import DEFAULT_MODEL_DIR

    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "LigerGLAForCausalLM" in out and str(DEFAULT_MODEL_DIR) in out


def test_convert_end_to_end(tmp_path: Path, env: dict[str, str]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from linrec.models.loader import load_model
    from linrec.models.tokenizer import DEMO_VOCAB_SIZE, write_byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=DEMO_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    src, dst = tmp_path / "llama", tmp_path / "liger"
    LlamaForCausalLM(config).save_pretrained(str(src), safe_serialization=True)
    write_byte_tokenizer(src)

    result = _linrec("convert", "--to", "liger-gla", str(src), str(dst), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((dst / "config.json").read_text())["model_type"] == "liger_gla"
    assert load_model(dst).config.hidden_size == 32
    again = _linrec("convert", "--to", "liger-gla", str(src), str(dst), env=env)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr


def test_model_flags_map_onto_engine_config(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    argv = ["--model", "m", "--dtype", "bfloat16", "--device", "cpu", "--kernel-backend", "torch"]
    args = parser.parse_args([*argv, "--linearize", "liger-gla", "--merge-lora", "adapter"])
    kwargs = common.config_kwargs(args, common.MODEL_FIELDS)
    assert kwargs == {
        "model": "m",
        "dtype": "bfloat16",
        "device": "cpu",
        "kernel_backend": "torch",
        "linearize": "liger-gla",
        "merge_lora": "adapter",
    }
    assert EngineConfig(**kwargs).merge_lora == "adapter"

    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--dtype", "float64"])
    assert e.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_every_config_field_is_a_flag_with_the_configs_default_and_choices() -> None:
    from linrec.server.config import ServerConfig

    parser = cli.build_parser()
    args = parser.parse_args(["serve"])
    assert EngineConfig(**common.config_kwargs(args, common.MODEL_FIELDS + common.ENGINE_FIELDS)) == EngineConfig()
    assert ServerConfig(**common.config_kwargs(args, serve.SERVER_FIELDS)) == ServerConfig()
    assert set(common.MODEL_FIELDS + common.ENGINE_FIELDS) == {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(serve.SERVER_FIELDS) == {f.name for f in dataclasses.fields(ServerConfig)}
    actions = {a.dest: a for a in _subparser(parser, "serve")._actions}
    for config_cls in (EngineConfig, ServerConfig):
        for field in dataclasses.fields(config_cls):
            action, flag = actions[field.name], field.name.replace("_", "-")
            assert action.option_strings == ([f"--{flag}", f"--no-{flag}"] if field.type == "bool" else [f"--{flag}"])
            assert field.metadata["help"] and action.default == field.default
            assert action.choices == field.metadata.get("choices"), field.name


def test_bench_engine_flags_follow_engine_config_but_throughput_max_num_seqs() -> None:
    from linrec.bench.throughput import THROUGHPUT_MAX_NUM_SEQS, run_throughput

    parser = cli.build_parser()
    config = EngineConfig()
    for kind in ("prefix", "fairness"):
        args = parser.parse_args(["bench", kind])
        assert (args.max_num_seqs, args.max_num_batched_tokens) == (config.max_num_seqs, config.max_num_batched_tokens)
        assert (args.device, args.kernel_backend) == (config.device, config.kernel_backend)
    for kind in ("throughput", "decode"):
        args = parser.parse_args(["bench", kind])
        assert (args.dtype, args.device, args.kernel_backend) == (config.dtype, config.device, config.kernel_backend)
    # A deliberate difference, said in the help and in docs/benchmarks.md: throughput comes from wide batches.
    args = parser.parse_args(["bench", "throughput"])
    assert args.max_num_seqs == THROUGHPUT_MAX_NUM_SEQS == 256 != config.max_num_seqs
    assert inspect.signature(run_throughput).parameters["max_num_seqs"].default == THROUGHPUT_MAX_NUM_SEQS
    help_text = _subparser(_subparser(parser, "bench"), "throughput").format_help()
    assert "not EngineConfig's 64" in " ".join(help_text.split())
    assert parser.parse_args(["bench", "decode", "--enforce-eager"]).enforce_eager is True


def test_generate_prints_each_sample(tmp_path: Path, env: dict[str, str]) -> None:
    demo = tmp_path / "demo"
    assert _linrec("demo-model", str(demo), env=env).returncode == 0
    proc = _linrec(
        "generate", "--model", str(demo), "--prompt", "Hi", "--prompt", "Yo", "--n", "2", "--max-tokens", "5",
        "--ignore-eos", "--temperature", "1", "--sample-seed", "1", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    headers = [line for line in proc.stdout.splitlines() if line.startswith("--- prompt")]
    assert len(headers) == 4 and all("finish_reason=length, 5 tokens" in h for h in headers)


def test_engine_flags_map_onto_engine_config(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    common.add_engine_args(parser)
    args = parser.parse_args(["--max-num-seqs", "8", "--state-memory", "2GiB", "--no-enable-prefix-caching"])
    config = common.engine_config_from_args(args)
    assert (config.max_num_seqs, config.state_memory, config.enable_prefix_caching) == (8, 2 * 2**30, False)
    assert parse_state_memory("0.25") == 0.25 and parse_state_memory("1000") == 1000
    assert parse_state_memory("0.5GiB") == 2**29 and parse_state_memory("1KiB") == 1024
    for bad in ("lots", "inf", "nan", "1e400GiB", "-infMiB"):  # 'inf' was an OverflowError traceback
        with pytest.raises(ValueError, match="fraction"):
            parse_state_memory(bad)
        with pytest.raises(SystemExit) as e:
            parser.parse_args([f"--state-memory={bad}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (
            f"argument --state-memory: expected a fraction in (0, 1] or a byte count such as 2GiB, got {bad!r}" in err
        )


def test_serve_flags_map_onto_server_config(capsys: pytest.CaptureFixture[str]) -> None:
    from linrec.server.config import ServerConfig

    parser = cli.build_parser()

    def config(*flags: str) -> ServerConfig:
        args = parser.parse_args(["serve", *flags])
        return ServerConfig(**common.config_kwargs(args, serve.SERVER_FIELDS))

    assert config() == ServerConfig()  # the flags' defaults are the config's
    limited = config("--max-request-body-bytes", "1MiB", "--metrics-require-api-key", "--api-key", "k")
    assert (limited.max_request_body_bytes, limited.metrics_require_api_key) == (2**20, True)
    assert config("--max-request-body-bytes", "4096").max_request_body_bytes == 4096
    with pytest.raises(ValueError, match="log_level"):
        ServerConfig(log_level="trace")
    for bad in ("0", "0.5", "1.5", "-1", "inf", "lots"):  # '1.5' was taken as 1 byte
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["serve", "--max-request-body-bytes", bad])
        assert info.value.code == 2
        assert "--max-request-body-bytes" in capsys.readouterr().err


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[name]


def test_router_writes_routers_that_generate_serves_with_auto(tmp_path, capsys):
    model, router = tmp_path / "m", tmp_path / "r"
    assert cli.main(["demo-model", str(model), "--family", "mamba2"]) == 0
    assert cli.main(["router", str(model), str(router), "--seed", "2"]) == 0
    config = json.loads((router / "router_config.json").read_text())
    assert config["format"] == "linrec_router" and config["num_layers"] == 2
    capsys.readouterr()
    argv = ["generate", "--model", str(model), "--router", str(router), "--prompt", "hi", "--max-tokens", "3"]
    assert cli.main([*argv, "--layer-route", "auto", "--device", "cpu"]) == 0
    assert "layer route [" in capsys.readouterr().out
    assert cli.main([*argv, "--layer-route", "1,0", "--device", "cpu"]) == 0
    assert "layer route [1, 0]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main([*argv, "--layer-route", "1,x"])
    assert "expected 'auto' or comma-separated counts" in capsys.readouterr().err
    assert cli.main(["router", str(tmp_path / "none"), str(tmp_path / "r2")]) != 0
