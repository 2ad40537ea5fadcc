"""`linrec bench startup`: what a user waits for before the first token, for the shipped default model and
for the random demo model it replaced (seeded random Liger-GLA weights, byte tokenizer), side by side.

Each measurement is a fresh Python process, as `linrec serve` or a script calling `LLM()` would be:
- import: importing the engine (torch, transformers' tokenizer, linrec);
- load: building the engine (`LLM(model)`: weights, tokenizer, state pool);
- first token (cold): the first chat request, one token, in that process;
- first token (warm): the same request again;
- decode: seconds per token of a `max_tokens` greedy request (EOS ignored) after its first token.
The contenders take turns for `repeats` rounds in one run; medians are reported, with each measure's ratio
default / demo. The engine settings are EngineConfig's defaults, as `linrec serve` with no flags.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONTENDERS = ("default", "random-demo")
MEASURES = ("import_s", "load_s", "first_token_cold_s", "first_token_warm_s", "decode_s_per_token")
PROMPT = "Tell me a story."


@dataclass(frozen=True)
class Contender:
    name: str
    model: str
    model_bytes: int  # the checkpoint directory on disk
    medians: dict[str, float]
    runs: list[dict[str, float]]
    sample: str  # the warm request's greedy text, for the eye


@dataclass(frozen=True)
class StartupResult:
    repeats: int
    max_tokens: int
    contenders: list[Contender]

    def ratios(self) -> dict[str, float]:
        """default / random-demo, per measure."""
        default, demo = self.contenders
        return {m: default.medians[m] / demo.medians[m] for m in MEASURES if demo.medians[m] > 0}

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "default_over_demo": self.ratios()}, indent=2)

    def format(self) -> str:
        heads = ("import", "load", "1st token cold", "1st token warm", "decode/token")
        rows = [
            f"fresh process per run, {self.repeats} rounds, medians; prompt {PROMPT!r} through the chat template, "
            f"decode over {self.max_tokens} greedy tokens",
            "",
            f"{'model':<12} {'on disk':>9} " + " ".join(f"{h:>15}" for h in heads),
        ]
        for c in self.contenders:
            cells = " ".join(
                f"{c.medians[m] * (1e3 if m == 'decode_s_per_token' else 1):>14.3f}"
                f"{'m' if m == 'decode_s_per_token' else 's'}"
                for m in MEASURES
            )
            rows.append(f"{c.name:<12} {c.model_bytes / 2**20:>7.1f}Mi {cells}")
        ratios = self.ratios()
        rows.append(
            f"{'default/demo':<12} {'':>9} " + " ".join(f"{ratios.get(m, float('nan')):>14.2f}x" for m in MEASURES)
        )
        for c in self.contenders:
            rows.append(f"{c.name} says: {c.sample!r}")
        return "\n".join(rows)


def probe(model: str, max_tokens: int) -> dict:
    """One process's measures (run in a fresh interpreter by `run_startup_bench`)."""
    start = time.perf_counter()
    from linrec.engine.llm import LLM
    from linrec.engine.sampling_params import SamplingParams

    imported = time.perf_counter()
    llm = LLM(model)
    loaded = time.perf_counter()
    messages = [{"role": "user", "content": PROMPT}]
    llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=1))
    cold = time.perf_counter()
    llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=1))
    warm = time.perf_counter()
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    done = time.perf_counter()
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "first_token_cold_s": cold - loaded,
        "first_token_warm_s": warm - cold,
        # the whole request less one warm first token, over the tokens after the first
        "decode_s_per_token": max(0.0, (done - warm) - (warm - cold)) / max(1, max_tokens - 1),
        "sample": out[0].outputs[0].text,
    }


def _probe_in_fresh_process(model: str, max_tokens: int) -> dict:
    code = (
        "import json, sys; from linrec.bench.startup import probe; "
        "print(json.dumps(probe(sys.argv[1], int(sys.argv[2]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, model, str(max_tokens)], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"startup probe of {model!r} exited with {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_startup_bench(repeats: int = 3, max_tokens: int = 32) -> StartupResult:
    from linrec.models.demo import DEFAULT_DEMO_FAMILY, default_model_path, write_demo_model

    if repeats < 1 or max_tokens < 2:
        raise ValueError(f"expected repeats >= 1 and max_tokens >= 2, got {repeats} and {max_tokens}")
    with tempfile.TemporaryDirectory(prefix="linrec-bench-startup-") as tmp:
        models = {
            "default": default_model_path(),
            "random-demo": write_demo_model(Path(tmp) / "demo", DEFAULT_DEMO_FAMILY),
        }
        runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
        for _ in range(repeats):
            for name in CONTENDERS:
                runs[name].append(_probe_in_fresh_process(str(models[name]), max_tokens))
        contenders = [
            Contender(
                name=name,
                model=str(models[name]),
                model_bytes=_dir_bytes(models[name]),
                medians={m: statistics.median(run[m] for run in runs[name]) for m in MEASURES},
                runs=[{m: run[m] for m in MEASURES} for run in runs[name]],
                sample=runs[name][-1]["sample"],
            )
            for name in CONTENDERS
        ]
    return StartupResult(repeats=repeats, max_tokens=max_tokens, contenders=contenders)
