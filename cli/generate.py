"""`linrec generate`: offline completions for one or more prompts."""

from __future__ import annotations

import argparse

from linrec.cli.common import add_engine_args, add_model_args, engine_config_from_args


def add_parser(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="generate completions offline for one or more prompts",
        description="Run prompts through the engine (continuous batching over the state pool) and print the text.",
    )
    add_model_args(generate)
    add_engine_args(generate)
    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sampling.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    sampling.add_argument("--max-tokens", dest="max_tokens", type=int, default=64)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    sampling.add_argument("--top-k", dest="top_k", type=int, default=0)
    sampling.add_argument("--min-p", dest="min_p", type=float, default=0.0)
    sampling.add_argument("--n", type=int, default=1, help="samples per prompt (forked from one prefill)")
    sampling.add_argument("--stop", action="append", default=[], help="a stop string (repeat for several)")
    sampling.add_argument("--ignore-eos", dest="ignore_eos", action="store_true")
    sampling.add_argument("--sample-seed", dest="sample_seed", type=int, default=None, help="per-request seed")
    sampling.add_argument(
        "--layer-route",
        dest="layer_route",
        type=_layer_route,
        default=None,
        metavar="COUNTS|auto",
        help="per-layer counts, comma-separated (0 skip, 1 execute, 2 repeat), or auto (--router decides)",
    )
    generate.set_defaults(handler=run)


def _layer_route(text: str) -> str | tuple[int, ...]:
    if text == "auto":
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        message = f"expected 'auto' or comma-separated counts like 1,0,2, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def run(args: argparse.Namespace) -> int:
    from linrec.engine.llm import LLM
    from linrec.engine.sampling_params import SamplingParams

    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        seed=args.sample_seed,
    )
    config = engine_config_from_args(args)
    llm = LLM(progress=True, **{k: v for k, v in vars(config).items()})
    if args.chat:
        if args.layer_route is not None:
            raise ValueError("expected --layer-route without --chat (the chat helper takes no route)")
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params, layer_route=args.layer_route)
    for prompt, output in zip(args.prompt, outputs):
        for sample in output.outputs:
            header = f"--- prompt {prompt!r}" + (f" sample {sample.index}" if len(output.outputs) > 1 else "")
            route = f", layer route {list(sample.layer_route)}" if sample.layer_route is not None else ""
            print(f"{header} (finish_reason={sample.finish_reason}, {len(sample.token_ids)} tokens{route})")
            print(sample.text)
    return 0
