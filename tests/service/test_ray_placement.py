"""Where the replicas of `serve --engine ray` go (app/ray_engine/placement.py), without a cluster: a
cluster started by `serve` shares its CPUs among the replicas, explicit requests are kept, a request the
cluster cannot hold is one message (asked, available, the fix), and a deployment that does not run
within the deadline ends the wait with that message instead of waiting for ever. The real command on a
real cluster: tests/e2e/test_ray_cluster.py."""

from __future__ import annotations

import pytest

from app.ray_engine.placement import (
    DeploymentAsk,
    PlacementError,
    RayEngineConfig,
    deployment_asks,
    fit_cpus_per_replica,
    placement_problem,
    total_asked,
    wait_until_running,
    with_cpus_fitted,
)

SHARDS = ["shard-00", "shard-01"]


def test_a_cluster_started_here_shares_its_cpus_among_the_replicas():
    engine = with_cpus_fitted(RayEngineConfig(), cluster_cpus=2.0, shard_count=2)
    asks = deployment_asks(engine, SHARDS)
    assert [a.name for a in asks] == ["ingress", "encoder", "rebuilder", *SHARDS]
    assert engine.replica_num_cpus == pytest.approx(0.4)  # 5 replicas on 2 CPUs
    cpus, gpus = total_asked(asks)
    assert cpus <= 2.0 and gpus == 0
    assert placement_problem(asks, {"CPU": 2.0}) is None
    # a big machine: one CPU each, no more
    assert with_cpus_fitted(RayEngineConfig(), 64.0, 2).replica_num_cpus == 1.0


@pytest.mark.parametrize(("cpus", "replicas"), [(2, 3), (2, 7), (3, 7), (1, 6), (16, 35)])
def test_shares_never_add_up_to_more_than_the_cluster(cpus, replicas):
    share = fit_cpus_per_replica(cpus, replicas)
    assert 0 < share <= 1 and share * replicas <= cpus


def test_explicit_requests_are_kept_and_a_joined_cluster_defaults_to_one_cpu():
    explicit = RayEngineConfig(replica_num_cpus=1.0)
    assert with_cpus_fitted(explicit, 2.0, 2) is explicit
    assert with_cpus_fitted(RayEngineConfig(replica_num_cpus=0.0), 2.0, 2).replica_num_cpus == 0.0
    assert with_cpus_fitted(RayEngineConfig(), None, 2).replica_num_cpus == 1.0


def test_a_request_the_cluster_cannot_hold_is_one_message_with_the_fix():
    asks = deployment_asks(RayEngineConfig(replica_num_cpus=1.0, encoder_num_gpus=1), SHARDS)
    message = placement_problem(asks, {"CPU": 2.0})
    assert message is not None and "\n" not in message
    assert "they ask for 5 CPUs and 1 GPUs" in message and "shard-01 1 x 1 CPU" in message
    assert "the cluster has 2 CPUs and 0 GPUs" in message
    assert "fix: leave --replica-num-cpus out" in message


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False


def test_waiting_ends_when_running_and_fails_at_the_deadline_with_the_message():
    asks = [DeploymentAsk("ingress", 1, 1.0), DeploymentAsk("shard-00", 2, 1.0)]
    cluster = lambda: {"CPU": 2.0}  # noqa: E731
    states = iter([("DEPLOYING", ""), ("DEPLOYING", ""), ("RUNNING", "")])
    clock = FakeClock()
    assert wait_until_running(lambda: next(states), asks, cluster, 10, clock=clock, wait=clock.wait)
    clock = FakeClock()
    with pytest.raises(PlacementError) as raised:
        wait_until_running(lambda: ("DEPLOYING", ""), asks, cluster, 10, clock=clock, wait=clock.wait)
    message = str(raised.value)
    assert clock.now == pytest.approx(10.0)
    assert "not running after 10 s (DEPLOYING)" in message and "they ask for 3 CPUs" in message
    assert "the cluster has 2 CPUs" in message and "fix:" in message


def test_a_failed_deployment_says_why_and_a_signal_stops_the_wait():
    failed = ("DEPLOY_FAILED", "Deploying failed:\nTraceback ...\nValueError: v000002 has 4 shards")
    with pytest.raises(PlacementError, match="failed to start: ValueError: v000002 has 4 shards"):
        wait_until_running(lambda: failed, [], dict, 10)
    assert wait_until_running(lambda: ("DEPLOYING", ""), [], dict, 10, wait=lambda s: True) is False


def test_serve_help_says_how_cpus_are_shared():
    from app.cli import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    assert "shared equally among the replicas" in " ".join(text.split())
    assert "--shard-num-gpus" in text and "--ready-timeout-s" in text
    args = parser.parse_args(["serve", "--engine", "ray", "--shard-num-gpus", "0.5"])
    assert args.replica_num_cpus is None and args.shard_num_gpus == 0.5


def test_shards_on_gpus_are_plumbed_to_the_replicas_and_the_router(sharded_shared_indexes):
    """--shard-num-gpus: each shard replica reserves the GPU share, is told to count on "cuda" with the
    service's resident-maps budget, and the ingress resolves the counts' precision for that device (no
    GPU here: the options are checked, the device code path in tests/index/test_index.py on the CPU)."""
    pytest.importorskip("ray.serve")
    from app.ray_engine.deployments import build_application
    from app.settings import Settings

    dirs, *_ = sharded_shared_indexes
    settings = Settings(index_dir=dirs[2], device="cpu", resident_maps_bytes=2**30)
    ingress = build_application(
        settings, RayEngineConfig(replica_num_cpus=0.25, shard_num_gpus=0.5)
    )._bound_deployment
    _, _, encoder, shards, rebuilder, device = ingress.init_args
    assert device == "cuda" and len(shards) == 2
    for shard in shards:
        deployment = shard._bound_deployment
        assert deployment.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 0.5}
        assert deployment.init_args[-2:] == ("cuda", 2**30)
    assert encoder._bound_deployment.ray_actor_options["num_gpus"] == 0.0
    assert rebuilder._bound_deployment.ray_actor_options == {"num_cpus": 0.25}
    cpu_only = build_application(settings, RayEngineConfig())._bound_deployment
    assert cpu_only.init_args[-1] == "cpu"


def test_rebuilds_encode_in_the_rebuilder_on_one_node_and_on_ray_data_with_workers(tmp_path):
    pytest.importorskip("ray.serve")
    from app.ray_engine.rebuilds import ClusterShape, cluster_encoder
    from app.settings import Settings
    from index_builder.builder import BuildConfig
    from index_builder.ray_build import RayDataEncoder
    from model.extractor import FeatureExtractor

    settings = Settings(index_dir=tmp_path / "index", references=tmp_path / "refs", device="cpu")
    config = BuildConfig(settings.references, settings.index_dir, model=settings.model_options())
    extractor = FeatureExtractor.from_checkpoint("default", "cpu")
    assert cluster_encoder(extractor, config, ClusterShape(nodes=1, gpus=0)) is None
    on_gpus = cluster_encoder(extractor, config, ClusterShape(nodes=3, gpus=2))
    assert isinstance(on_gpus, RayDataEncoder) and on_gpus.spec.device == "cuda"
    assert (on_gpus.options.actors, on_gpus.options.actor_gpus) == (2, 1.0)
    on_cpus = cluster_encoder(extractor, config, ClusterShape(nodes=3, gpus=0))
    assert (on_cpus.spec.device, on_cpus.options.actors, on_cpus.options.actor_gpus) == ("cpu", 2, 0.0)
