"""`linrec bench multiturn`: many conversations of many turns, each turn continuing from the stored state of the
previous one (the Responses API's previous_response_id), beside resending the whole conversation every turn (chat
completions, the prefix cache finding what it can), in one process.

Workload: `num_conversations` conversations of `num_turns` turns; each turn a user message of `user_len` seeded
random tokens and a reply of `output_len` greedy tokens (EOS ignored). Every conversation submits its first turn at
once, and each later turn as soon as its previous turn finished (a closed loop: the conversations stay in step).
Contenders, one engine each (same weights and limits, the prefix cache on for both, as a vLLM or SGLang user would
have it), interleaved `repeats` times after a warm-up, each round starting with the other one:
- responses: turn 1 is a plain request; turn k > 1 resumes the state turn k - 1 stored (`resume_state`) and sends
  only the new user tokens; every turn stores its end state (`store_state`);
- resend: turn k sends every token so far (each earlier turn's user and reply tokens) and the new user tokens.
Round r draws its user messages from seed + r, the same for both contenders and unlike any earlier round's, so no
round finds a state an earlier one left.

Per turn: TTFT (submit to the end of the step that returned the first token, wall clock; median over the
conversations, then over the rounds), the engine prompt (the whole conversation so far, for both contenders) and
the prefill tokens (prompt tokens actually fed: SampleDelta.num_prompt_tokens - num_cached_tokens). Targets: for
responses, the last turn's TTFT at most TARGET_TTFT_RATIO times the first turn's, and the prefill of every turn
after the first the new input + 1 (the stored last reply token was sampled but never fed: it is fed with the new
tokens). Self-checks: both contenders generate the same greedy tokens in every turn, and run the same engine
prompt lengths.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONTENDERS = ("responses", "resend")
TARGET_TTFT_RATIO = 1.2  # the issue's: responses' TTFT at the last turn <= 1.2x its first turn's
SHOWN_TURNS = (1, 2, 5, 10, 20)  # the table's rows (those a run has), then the mean over every turn
WARMUP_TURNS = 2
WARMUP_TOKENS = 2
WARMUP_SEED = 1_000_000  # far from any round's seed: the warm-up's states are never found again


@dataclass
class TurnResult:
    """One turn of one contender, over every conversation and round."""

    turn: int  # 1-based
    ttft_s: float  # median over the rounds of the median over the conversations
    ttft_runs_s: list[float]  # per round: the median over the conversations
    prompt_tokens: float  # the engine's prompt (conversation so far + new tokens), mean over conversations
    prefill_tokens: float  # prompt tokens fed (not loaded from a stored state or a prefix snapshot), mean
    prefill_tokens_min: int
    prefill_tokens_max: int


@dataclass
class ContenderResult:
    name: str  # "responses" or "resend"
    seconds: float  # median wall time of a round (every conversation, every turn)
    seconds_runs: list[float]
    turns: list[TurnResult]
    # [round][conversation][turn]: the greedy tokens of each turn
    token_ids: list[list[list[list[int]]]] = field(default_factory=list, repr=False)
    # [round][conversation][turn]: the engine prompt of each turn (tokens)
    prompt_tokens: list[list[list[int]]] = field(default_factory=list, repr=False)

    @property
    def ttft_ratio(self) -> float:
        """The last turn's TTFT over the first turn's."""
        return self.turns[-1].ttft_s / self.turns[0].ttft_s

    @property
    def mean_ttft_s(self) -> float:
        return statistics.fmean(t.ttft_s for t in self.turns)

    @property
    def mean_prefill_tokens(self) -> float:
        return statistics.fmean(t.prefill_tokens for t in self.turns)


@dataclass
class MultiturnBenchResult:
    model: str
    family: str  # the model_type linrec serves
    device: str
    dtype: str
    num_conversations: int
    num_turns: int
    user_len: int  # new user tokens per turn
    output_len: int  # reply tokens per turn
    repeats: int
    num_threads: int
    torch_version: str
    contenders: list[ContenderResult]
    num_turns_compared: int  # conversation-turns compared between the contenders (over every round)
    num_turns_equal: int  # of those, turns whose greedy tokens are equal
    prompts_equal: bool  # the engine prompt of every turn has the same length under both contenders
    # The responses engine's state store over the timed rounds (engine/state_store.py's StoreStats: saves, resumes,
    # misses, spills_to_host, ...), and its pool rows for stored states: where the conversations' states lived.
    store_stats: dict[str, int] = field(default_factory=dict)
    max_device_states: int = 0

    def by_name(self) -> dict[str, ContenderResult]:
        return {c.name: c for c in self.contenders}

    @property
    def tokens_equal(self) -> bool:
        return self.num_turns_equal == self.num_turns_compared

    def responses_prefill_exact(self) -> bool:
        """responses fed exactly the new input in turn 1, and the new input + 1 (the stored last token) after."""
        return all(
            t.prefill_tokens_min == t.prefill_tokens_max == self.user_len + (t.turn > 1)
            for t in self.by_name()["responses"].turns
        )

    def targets_met(self) -> dict[str, bool]:
        responses = self.by_name()["responses"]
        return {
            f"responses turn-{self.num_turns} / turn-1 TTFT <= {TARGET_TTFT_RATIO}x": responses.ttft_ratio
            <= TARGET_TTFT_RATIO,
            "responses prefill == new input + 1": self.responses_prefill_exact(),
        }

    def checks_passed(self) -> bool:
        return self.tokens_equal and self.prompts_equal

    def to_json(self) -> str:
        data = asdict(self)
        for contender, result in zip(data["contenders"], self.contenders, strict=True):
            contender.pop("token_ids")
            contender.pop("prompt_tokens")
            contender["ttft_ratio"] = result.ttft_ratio
            contender["mean_ttft_s"] = result.mean_ttft_s
            contender["mean_prefill_tokens"] = result.mean_prefill_tokens
        data["targets_met"] = self.targets_met()
        data["tokens_equal"] = self.tokens_equal
        data["checks_passed"] = self.checks_passed()
        return json.dumps(data, indent=2)

    def format(self) -> str:
        by = self.by_name()
        responses, resend = by["responses"], by["resend"]
        rows = [
            f"model: {self.model} ({self.family}, {self.dtype} on {self.device}), torch {self.torch_version}, "
            f"{self.num_threads} threads",
            f"workload: {self.num_conversations} conversations x {self.num_turns} turns, each {self.user_len} new "
            f"user tokens + {self.output_len} reply tokens (greedy, ignore_eos); a turn is sent when its previous "
            f"one finished; prefix cache on for both; median of {self.repeats} interleaved rounds",
            f"round seconds: responses {responses.seconds:.2f}, resend {resend.seconds:.2f}",
            "",
            f"{'turn':>5} {'prompt':>7} | {'responses':>10} {'prefill':>8} | {'resend':>10} {'prefill':>8} | "
            f"{'resend/responses':>16}",
            f"{'':>5} {'tokens':>7} | {'TTFT ms':>10} {'tokens':>8} | {'TTFT ms':>10} {'tokens':>8} | {'TTFT':>16}",
        ]
        shown = [t for t in SHOWN_TURNS if t < self.num_turns] + [self.num_turns]
        for turn in shown:
            a, b = responses.turns[turn - 1], resend.turns[turn - 1]
            rows.append(
                f"{turn:>5} {a.prompt_tokens:>7.0f} | {a.ttft_s * 1e3:>10.1f} {_tokens(a):>8} | "
                f"{b.ttft_s * 1e3:>10.1f} {_tokens(b):>8} | {b.ttft_s / a.ttft_s:>15.2f}x"
            )
        rows.append(
            f"{'mean':>5} {statistics.fmean(t.prompt_tokens for t in responses.turns):>7.0f} | "
            f"{responses.mean_ttft_s * 1e3:>10.1f} {responses.mean_prefill_tokens:>8.1f} | "
            f"{resend.mean_ttft_s * 1e3:>10.1f} {resend.mean_prefill_tokens:>8.1f} | "
            f"{resend.mean_ttft_s / responses.mean_ttft_s:>15.2f}x"
        )
        last = self.num_turns
        met = self.targets_met()
        ratio_met, prefill_met = met.values()
        rows += [
            "",
            f"responses: turn-{last} / turn-1 TTFT {responses.ttft_ratio:.2f}x (target <= {TARGET_TTFT_RATIO}x: "
            f"{'met' if ratio_met else 'NOT met'})",
            f"responses: prefill tokens = the new input ({self.user_len}) in turn 1, the new input + 1 "
            f"({self.user_len + 1}: the stored last reply token, sampled but never fed) after: "
            f"{'met' if prefill_met else 'NOT met'}",
            f"resend: turn-{last} / turn-1 TTFT {resend.ttft_ratio:.2f}x; prefill tokens turn 1 "
            f"{_tokens(resend.turns[0])}, turn {last} {_tokens(resend.turns[-1])} of a "
            f"{resend.turns[-1].prompt_tokens:.0f}-token prompt",
            f"checks: greedy tokens equal in every turn: {'yes' if self.tokens_equal else 'NO'} "
            f"({self.num_turns_equal}/{self.num_turns_compared} conversation-turns); "
            f"engine prompts equal: {'yes' if self.prompts_equal else 'NO'}",
        ]
        if self.store_stats:
            stats = self.store_stats
            rows.insert(
                3,
                f"responses' state store ({self.max_device_states} pool rows): {stats['saves']} saves, "
                f"{stats['resumes']} resumes, {stats['misses']} misses, {stats['spills_to_host']} spilled to host",
            )
        return "\n".join(rows)


def _tokens(turn: TurnResult) -> str:
    """Prefill tokens of a turn: one number when every conversation fed the same, else the mean and the range."""
    if turn.prefill_tokens_min == turn.prefill_tokens_max:
        return str(turn.prefill_tokens_min)
    return f"{turn.prefill_tokens:.0f} ({turn.prefill_tokens_min}-{turn.prefill_tokens_max})"


def make_conversations(
    num_conversations: int, num_turns: int, user_len: int, vocab_size: int, seed: int
) -> list[list[list[int]]]:
    """[conversation][turn]: user_len seeded token ids uniform in [0, vocab_size)."""
    from linrec.bench.lora import make_prompts

    flat = make_prompts(num_conversations * num_turns, user_len, vocab_size, seed)
    return [flat[c * num_turns : (c + 1) * num_turns] for c in range(num_conversations)]


@dataclass(frozen=True)
class _Run:
    """One round of one contender: [conversation][turn] each."""

    seconds: float
    ttft: list[list[float]]
    prompt_tokens: list[list[int]]
    prefill_tokens: list[list[int]]
    token_ids: list[list[list[int]]]


def converse(engine, users: list[list[list[int]]], output_len: int, contender: str, run_id: str) -> _Run:
    """Run every conversation through `engine` (an EngineCore) as `contender`: turn 1 of each at once, turn k + 1
    of a conversation submitted right after the step that finished its turn k. Request and state ids start with
    run_id (unique per round: stored states of earlier rounds are never resumed)."""
    from linrec.engine.request import EngineRequest
    from linrec.engine.sampling_params import SamplingParams

    if contender not in CONTENDERS:
        raise ValueError(f"expected a contender in {CONTENDERS}, got {contender!r}")
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    num_conversations, num_turns = len(users), len(users[0])

    def table(value):
        return [[value] * num_turns for _ in range(num_conversations)]

    ttft, prompt_tokens, prefill_tokens = table(0.0), table(0), table(0)
    token_ids: list[list[list[int]]] = [[[] for _ in range(num_turns)] for _ in range(num_conversations)]
    history: list[list[int]] = [[] for _ in range(num_conversations)]  # resend: every token so far
    submitted_at = [0.0] * num_conversations
    has_first_token = [False] * num_conversations
    turn_of: dict[str, tuple[int, int]] = {}  # request id -> (conversation, turn)

    def submit(c: int, t: int) -> None:
        request_id = f"{run_id}-c{c}-t{t}"
        turn_of[request_id] = (c, t)
        if contender == "responses":
            resume = f"{run_id}-c{c}-t{t - 1}" if t > 0 else None
            request = EngineRequest(request_id, users[c][t], params, store_state=request_id, resume_state=resume)
        else:
            request = EngineRequest(request_id, history[c] + users[c][t], params)
        has_first_token[c] = False
        submitted_at[c] = time.perf_counter()  # add_request's own work (validation, prefix lookup) counts
        engine.add_request(request)

    start = time.perf_counter()
    for c in range(num_conversations):
        submit(c, 0)
    while engine.has_unfinished():
        deltas = engine.step()
        now = time.perf_counter()
        for delta in deltas:
            c, t = turn_of[delta.request_id]
            if delta.token_ids and not has_first_token[c]:
                has_first_token[c] = True
                ttft[c][t] = now - submitted_at[c]
            token_ids[c][t].extend(delta.token_ids)
            if delta.finish_reason is None:
                continue
            if delta.finish_reason != "length" or len(token_ids[c][t]) != output_len:
                raise RuntimeError(
                    f"{contender}: conversation {c} turn {t + 1} ended with {delta.finish_reason!r} after "
                    f"{len(token_ids[c][t])} tokens, expected 'length' after {output_len}"
                )
            prompt_tokens[c][t] = delta.num_prompt_tokens
            prefill_tokens[c][t] = delta.num_prompt_tokens - delta.num_cached_tokens
            history[c] += users[c][t] + token_ids[c][t]
            if t + 1 < num_turns:
                submit(c, t + 1)
    return _Run(time.perf_counter() - start, ttft, prompt_tokens, prefill_tokens, token_ids)


def _forget(engine, run: _Run, run_id: str) -> None:
    """Delete the states a responses round stored, so that every round starts with an empty state store."""
    for c, turns in enumerate(run.token_ids):
        for t in range(len(turns)):
            engine.states.delete(f"{run_id}-c{c}-t{t}")


def run_multiturn_bench(
    model: str | None = None,
    *,
    family: str = "liger_gla",
    num_conversations: int = 16,
    num_turns: int = 20,
    user_len: int = 32,
    output_len: int = 16,
    device: str = "auto",
    kernel_backend: str = "auto",
    max_device_states: int | None = None,
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
) -> MultiturnBenchResult:
    """Run both contenders (see the module docstring) and compare.

    model: a local checkpoint (Llama/Qwen2/Mistral are served linearized as Liger-GLA); None: the seeded bench
    model of `family`, written once under the cache dir. float32 on the CPU, bfloat16 on CUDA. max_device_states:
    stored states kept in pool rows (None: EngineConfig's default), for both engines. threads: torch CPU threads
    (None keeps torch's default).
    """
    import torch

    for name, value in (
        ("num_conversations", num_conversations),
        ("num_turns", num_turns),
        ("user_len", user_len),
        ("output_len", output_len),
        ("repeats", repeats),
    ):
        if value < 1:
            raise ValueError(f"expected {name} >= 1, got {value}")
    if threads is not None and threads < 1:
        raise ValueError(f"expected threads >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _bench(
            model, family, num_conversations, num_turns, user_len, output_len, device, kernel_backend,
            max_device_states, repeats, seed,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)


def _bench(
    model, family, num_conversations, num_turns, user_len, output_len, device, kernel_backend, max_device_states,
    repeats, seed,
) -> MultiturnBenchResult:  # fmt: skip
    """run_multiturn_bench's body, under its thread setting, with its arguments checked."""
    import torch

    from linrec.bench.common import served_model_type
    from linrec.bench.lora import adapter_engine_setup
    from linrec.bench.throughput import bench_model_path
    from linrec.engine.llm import LLM

    path = Path(model) if model is not None else bench_model_path(family)
    hf_config, linearize, torch_device, dtype, _prompts, engine_args = adapter_engine_setup(
        path, device, kernel_backend, 1, 1, num_conversations, seed
    )
    engine_args["enable_prefix_caching"] = True  # for both: what a vLLM or SGLang user has on
    if max_device_states is not None:
        engine_args["max_device_states"] = max_device_states
    engines = {name: LLM(str(path), **engine_args).engine for name in CONTENDERS}
    conversation_len = num_turns * (user_len + output_len)
    max_model_len = engines["resend"].max_model_len
    if conversation_len > max_model_len:
        raise ValueError(
            f"expected num_turns * (user_len + output_len) <= the model's max_model_len {max_model_len}, got "
            f"{num_turns} * ({user_len} + {output_len}) = {conversation_len}"
        )
    vocab_size = int(hf_config["vocab_size"])

    warm = make_conversations(min(num_conversations, 2), min(num_turns, WARMUP_TURNS), user_len, vocab_size,
                              WARMUP_SEED)  # fmt: skip
    for name, engine in engines.items():
        warmed = converse(engine, warm, WARMUP_TOKENS, name, f"{name}-warmup")
        if name == "responses":
            _forget(engine, warmed, f"{name}-warmup")
    runs: dict[str, list[_Run]] = {name: [] for name in CONTENDERS}
    store = engines["responses"].states
    before = asdict(store.stats)
    for r in range(repeats):  # each round starts with the other contender
        users = make_conversations(num_conversations, num_turns, user_len, vocab_size, seed + r)
        for name in CONTENDERS[r % 2 :] + CONTENDERS[: r % 2]:
            run = converse(engines[name], users, output_len, name, f"{name}-r{r}")
            if name == "responses":
                _forget(engines[name], run, f"{name}-r{r}")
            runs[name].append(run)

    store_stats = {name: count - before[name] for name, count in asdict(store.stats).items()}
    contenders = [_summarize(name, runs[name]) for name in CONTENDERS]
    pairs = [
        (a, b)
        for run_a, run_b in zip(runs["responses"], runs["resend"], strict=True)
        for conv_a, conv_b in zip(run_a.token_ids, run_b.token_ids, strict=True)
        for a, b in zip(conv_a, conv_b, strict=True)
    ]
    return MultiturnBenchResult(
        model=str(model) if model is not None else f"bench {family} (seeded random, {path.name})",
        family=str(served_model_type(hf_config, linearize)),
        device=str(torch_device),
        dtype=dtype,
        num_conversations=num_conversations,
        num_turns=num_turns,
        user_len=user_len,
        output_len=output_len,
        repeats=repeats,
        num_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        contenders=contenders,
        num_turns_compared=len(pairs),
        num_turns_equal=sum(a == b for a, b in pairs),
        prompts_equal=all(
            a.prompt_tokens == b.prompt_tokens for a, b in zip(runs["responses"], runs["resend"], strict=True)
        ),
        store_stats=store_stats,
        max_device_states=engines["responses"].config.max_device_states,
    )


def _summarize(name: str, runs: list[_Run]) -> ContenderResult:
    """Per turn: TTFT medians (over conversations, then rounds), prompt and prefill tokens over every round."""
    num_turns = len(runs[0].ttft[0])
    turns = []
    for t in range(num_turns):
        ttft_runs = [statistics.median(conv[t] for conv in run.ttft) for run in runs]
        prefill = [conv[t] for run in runs for conv in run.prefill_tokens]
        turns.append(
            TurnResult(
                turn=t + 1,
                ttft_s=statistics.median(ttft_runs),
                ttft_runs_s=ttft_runs,
                prompt_tokens=statistics.fmean(conv[t] for run in runs for conv in run.prompt_tokens),
                prefill_tokens=statistics.fmean(prefill),
                prefill_tokens_min=min(prefill),
                prefill_tokens_max=max(prefill),
            )
        )
    return ContenderResult(
        name=name,
        seconds=statistics.median(run.seconds for run in runs),
        seconds_runs=[run.seconds for run in runs],
        turns=turns,
        token_ids=[run.token_ids for run in runs],
        prompt_tokens=[run.prompt_tokens for run in runs],
    )
