"""AffinityRouter's choices (server/ray_router.py) without a Ray cluster: the router built as Serve builds it, fed
fake replicas (an id and routing stats) and pending requests, its decisions read as the replica reads them from the
call it is sent. The cluster tests (test_ray_serve.py, test_ray_serve_run.py) cover prefix and session affinity end
to end; these cover the rest."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'linrec[ray]')")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve.request_router import PendingRequest  # noqa: E402

from linrec.engine.sampling_params import SamplingParams  # noqa: E402
from linrec.server.ray_router import AffinityRouter, ReplicaRequest, Target  # noqa: E402

DEPLOYMENT = DeploymentID(name="LinrecEngine", app_name="test")
PARAMS = SamplingParams(temperature=0.0, max_tokens=1)
_ids = itertools.count()


@dataclass
class FakeReplica:
    """What AffinityRouter reads of a RunningReplica."""

    replica_id: ReplicaID
    routing_stats: dict = field(default_factory=dict)  # record_routing_stats' answer
    max_ongoing_requests: int = 1024


class FakeResult:
    """A ReplicaResult whose stream ends when the test says."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        for callback in self.callbacks:
            callback(None)


def replicas(*adapters: tuple[str, ...]) -> list[FakeReplica]:
    """One replica per argument, r0, r1, ..., each with the adapters it served lately."""
    return [
        FakeReplica(ReplicaID(f"r{i}", DEPLOYMENT), {"load": 0, "adapters": list(a), "states": []})
        for i, a in enumerate(adapters)
    ]


def request(prompt: list[int], **fields) -> ReplicaRequest:
    return ReplicaRequest(list(prompt), PARAMS, f"req-{next(_ids)}", **fields)


def pending(call) -> PendingRequest:
    internal_id = f"internal-{next(_ids)}"
    return PendingRequest(args=[call], kwargs={}, metadata=RequestMetadata(internal_id, internal_id))


def make_router(**kwargs) -> AffinityRouter:
    router = AffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kwargs)
    return router


async def choose(router: AffinityRouter, candidates: list[FakeReplica], call) -> tuple[PendingRequest, list]:
    """The router's ranking for one call: (its pending request, the ranks as lists of replica ids)."""
    pr = pending(call)
    ranks = await router.choose_replicas(candidates, pr)
    return pr, [[r.replica_id.unique_id for r in rank] for rank in ranks]


async def route(
    router: AffinityRouter, candidates: list[FakeReplica], call: ReplicaRequest, to: str | None = None
) -> tuple[str, str | None]:
    """Choose, then route the call to `to` (default: the first choice), as Serve does once the replica accepts: the
    replica and the reason it reports (EngineReplica.generate's Routed)."""
    pr, ranks = await choose(router, candidates, call)
    replica_id = to or ranks[0][0]
    router.on_request_routed(pr, ReplicaID(replica_id, DEPLOYMENT), FakeResult())
    return replica_id, call.reason_on(replica_id)


async def load(router: AffinityRouter, candidates: list[FakeReplica], counts: dict[str, int]) -> None:
    """Put `counts` running requests on the replicas (prompts nothing else shares, no adapter)."""
    for replica_id, n in counts.items():
        for _ in range(n):
            await route(router, candidates, request([]), to=replica_id)


def test_an_adapter_goes_to_the_least_loaded_replica_that_served_it() -> None:
    async def main() -> None:
        router = make_router()
        candidates = replicas((), ("a",), ("a", "b"))
        await load(router, candidates, {"r0": 0, "r1": 3, "r2": 1})
        call = request([7] * 40, lora_name="a")
        pr, ranks = await choose(router, candidates, call)
        assert ranks[0] == ["r2"] and set(ranks[1]) == {"r0", "r1"}  # r0 is idler but lacks the adapter
        router.on_request_routed(pr, ReplicaID("r2", DEPLOYMENT), FakeResult())
        assert call.reason_on("r2") == "adapter"
        # An adapter no replica served lately: the least loaded one.
        assert await route(router, candidates, request([8] * 40, lora_name="c")) == ("r0", "least_loaded")

    asyncio.run(main())


def test_a_prefix_outranks_an_adapter_and_an_adapter_outranks_load() -> None:
    async def main() -> None:
        router = make_router()
        candidates = replicas(("a",), ("a",))
        first, _ = await route(router, candidates, request([5] * 64, lora_name="a"))
        assert await route(router, candidates, request([5] * 64 + [6] * 4, lora_name="a")) == (first, "prefix")
        # The same tokens under another adapter are another prefix (the chain starts from the adapter).
        other, reason = await route(router, candidates, request([5] * 64 + [6] * 4, lora_name="b"))
        assert reason == "least_loaded" and other != first

    asyncio.run(main())


@pytest.mark.parametrize(
    ("loads", "reason"),
    [
        # r0 also runs the request that left the prefix there
        ({"r0": 70, "r1": 5}, "imbalance"),  # 66 more and 14x: the idlest, past the prefix's replica
        ({"r0": 60, "r1": 5}, "prefix"),  # 56 more: under the absolute threshold (64)
        ({"r0": 200, "r1": 135}, "prefix"),  # 66 more but 1.49x: under the relative threshold (1.5)
    ],
)
def test_a_load_imbalance_overrides_prefix_and_adapter_affinity(loads: dict[str, int], reason: str) -> None:
    async def main() -> None:
        router = make_router()
        candidates = replicas(("a",), ())
        await route(router, candidates, request([3] * 64, lora_name="a"), to="r0")
        await load(router, candidates, loads)
        routed = await route(router, candidates, request([3] * 64 + [4], lora_name="a"))
        assert routed == (("r1", "imbalance") if reason == "imbalance" else ("r0", reason))

    asyncio.run(main())


def test_the_imbalance_thresholds_are_the_routers_kwargs() -> None:
    async def main() -> None:
        router = make_router(imbalance_abs=2, imbalance_rel=1.0)
        candidates = replicas(("a",), ())
        await load(router, candidates, {"r0": 3, "r1": 0})
        assert await route(router, candidates, request([9] * 32, lora_name="a")) == ("r1", "imbalance")

    asyncio.run(main())
    for bad in ({"policy": "random"}, {"match_threshold": 0.0}, {"imbalance_abs": -1}, {"imbalance_rel": 0.5}):
        with pytest.raises(ValueError, match="expected"):
            make_router(**bad)


def test_a_session_outranks_an_imbalance() -> None:
    async def main() -> None:
        router = make_router()
        candidates = replicas((), ())
        await route(router, candidates, request([1] * 16, store_state="conv"), to="r0")
        await load(router, candidates, {"r0": 100})
        assert await route(router, candidates, request([2] * 4, resume_state="conv")) == ("r0", "session")

    asyncio.run(main())


def test_a_burst_keeps_each_group_on_one_replica_and_spreads_the_groups() -> None:
    """Serve chooses for a burst before it routes any of it: the prefix table and the load count choices, so a
    group's later requests follow its first and the second group's first goes to the idle replica."""

    async def main() -> None:
        router = make_router()
        candidates = replicas((), ())
        groups = {g: [g + 100] * 64 for g in range(2)}
        calls = [(g, request(groups[g] + [q])) for q in range(4) for g in range(2)]
        chosen = [(g, call, *(await choose(router, candidates, call))) for g, call in calls]
        first_choice = {(g, ranks[0][0]) for g, _, _, ranks in chosen}
        assert len(first_choice) == 2 and len({replica for _, replica in first_choice}) == 2, first_choice
        results = []
        for _, _, pr, ranks in chosen:
            results.append(FakeResult())
            router.on_request_routed(pr, ReplicaID(ranks[0][0], DEPLOYMENT), results[-1])
        reasons = [call.reason_on(ranks[0][0]) for _, call, _, ranks in chosen]
        assert sorted(reasons) == ["least_loaded"] * 2 + ["prefix"] * 6
        # Finished streams leave the load: an idle router balances from zero again.
        for result in results:
            result.finish()
        assert [router._load(r) for r in candidates] == [0, 0]

    asyncio.run(main())


def test_a_refused_preference_is_a_fallback_and_moves_its_load() -> None:
    async def main() -> None:
        router = make_router()
        candidates = replicas((), ())
        call = request([4] * 32)
        pr, ranks = await choose(router, candidates, call)
        preferred, other = ranks[0][0], ranks[1][0]
        router.on_request_routed(pr, ReplicaID(other, DEPLOYMENT), FakeResult())
        assert (call.reason_on(other), call.reason_on(preferred)) == ("fallback", "least_loaded")
        by_id = {r.replica_id.unique_id: r for r in candidates}
        assert (router._load(by_id[preferred]), router._load(by_id[other])) == (0, 1)

    asyncio.run(main())


def test_targeted_calls_reach_their_replica_and_do_not_count_as_load() -> None:
    async def main() -> None:
        router = make_router()
        candidates = replicas((), ())
        for _ in range(3):
            target = Target("r1")
            pr, ranks = await choose(router, candidates, target)
            assert ranks == [["r1"]]
            router.on_request_routed(pr, ReplicaID("r1", DEPLOYMENT), FakeResult())
        assert [router._load(r) for r in candidates] == [0, 0]

    asyncio.run(main())


def test_the_router_serve_unpickles_in_another_process_routes_the_callers_calls(tmp_path) -> None:
    """Serve pickles the router's module by value (RequestRouterConfig), so where the router is unpickled in another
    process than the one that deployed it (an ingress replica under `serve run`), its ReplicaRequest and Target are
    copies of the classes the caller builds calls from: it must still honour a Target and write its choice."""
    from ray import cloudpickle

    # Pickled in a subprocess: cloudpickle gives a class pickled in this process back as the class itself.
    script = (
        "import sys\n"
        "from ray.serve.config import RequestRouterConfig\n"
        "config = RequestRouterConfig(request_router_class='linrec.server.ray_router.AffinityRouter')\n"
        "sys.stdout.write(config.get_serialized_request_router_cls().hex())\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    copied = cloudpickle.loads(bytes.fromhex(out.stdout))
    assert copied is not AffinityRouter and copied.__qualname__ == AffinityRouter.__qualname__
    router = copied(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state()

    async def main() -> None:
        candidates = replicas((), ())
        for replica_id in ("r0", "r1"):
            _, ranks = await choose(router, candidates, Target(replica_id))
            assert ranks == [[replica_id]]
        call = request([4] * 32)
        pr, ranks = await choose(router, candidates, call)
        assert call.reason_on(ranks[0][0]) == "least_loaded"
        router.on_request_routed(pr, ReplicaID(ranks[0][0], DEPLOYMENT), FakeResult())
        assert await route(router, candidates, request([4] * 32 + [5])) == (ranks[0][0], "prefix")

    asyncio.run(main())


def test_power_of_two_offers_two_random_replicas() -> None:
    async def main() -> None:
        router = make_router(policy="power_of_two")
        candidates = replicas((), (), ())
        seen = set()
        for _ in range(30):
            call = request([6] * 32)
            pr, ranks = await choose(router, candidates, call)
            assert len(ranks) == 1 and len(set(ranks[0])) == 2
            seen.update(ranks[0])
            router.on_request_routed(pr, ReplicaID(ranks[0][1], DEPLOYMENT), FakeResult())
            assert call.reason_on(ranks[0][1]) == "power_of_two"  # whichever of the two Serve took
        assert seen == {"r0", "r1", "r2"}

    asyncio.run(main())


def test_a_request_chosen_twice_keeps_its_first_choice_and_every_choice_backs_off() -> None:
    """Two routing tasks may choose for one request (or Serve asks again after a refusal): the same replica and
    reason, counted once; and Serve backs off before asking again (else it re-probes the replicas at once)."""

    async def main() -> None:
        router = make_router()
        candidates = replicas((), ())
        call = request([2] * 48)
        pr, first = await choose(router, candidates, call)
        assert pr.routing_context.should_backoff
        again = await router.choose_replicas(candidates, pr)
        assert [r.replica_id.unique_id for r in again[0]] == first[0]
        assert sum(router._load(r) for r in candidates) == 1
        router.on_request_routed(pr, ReplicaID(first[0][0], DEPLOYMENT), FakeResult())
        assert call.reason_on(first[0][0]) == "least_loaded"  # not "prefix": its own prompt, entered at first choice

    asyncio.run(main())


def test_a_routing_task_without_a_request_routes_the_oldest_waiting_one() -> None:
    """Serve's routing tasks each take a request, and one that retires holding it leaves it to the others: a task
    without a request of its own adopts the oldest waiting one and hands it the replica it chose for it."""

    async def main() -> None:
        router = make_router()
        candidates = replicas((), ())
        idle = await router.choose_replicas(candidates, None)  # none waiting: a pause, then any replica
        assert len(idle) == 1 and len(idle[0]) == 2
        router._fulfill_next_pending_request(idle[0][0], None)  # hands it to nobody
        target = Target("r1")
        orphan = pending(target)
        router._pending_requests_to_fulfill.append(orphan)  # as Serve queues it (its task retired holding it)
        router._add_pending_request_to_indices(orphan)
        ranks = await router.choose_replicas(candidates, None)
        assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [["r1"]]
        router._fulfill_next_pending_request(ranks[0][0], None)
        assert orphan.future.done() and orphan.future.result().replica_id.unique_id == "r1"

    asyncio.run(main())
