"""GPU placement, tested on CPUs: a local Ray with a *logical* GPU (``num_gpus=1``; Ray schedules
by resources, whatever the hardware) shows which stages ask for it and get it.

What is asserted is what the product records: the manifest's ``placement`` (decided by
``runner.plan_placement`` before any work) and, per stage, the GPU ids Ray gave the workers that
ran it (``stages.<stage>.placement.gpu_ids``, reported from inside the actors and the task). In
an actor given the logical GPU, ``device: auto`` still resolves to CPU (torch sees no CUDA), so
the stages run to the end on this machine.
"""

from __future__ import annotations


import pytest

from srdistill.config import RayConfig, load_config
from srdistill.run import runner
from srdistill.run.pipeline import run_pipeline

from conftest import copy_t91

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_gpu():
    """A local Ray of 2 CPUs and 1 logical GPU for this module (the session's ``ray_local``, if
    started, is stopped first; a later pipeline test starts its own again)."""
    runner.shutdown_ray()
    runner.init_ray(RayConfig(num_cpus=2, num_gpus=1))
    yield
    runner.shutdown_ray()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four vendored T91 images (one shard each with ``mine.images_per_shard=1``)."""
    return copy_t91(tmp_path_factory.mktemp("corpus"), 4)


def _tiny(*sets: str):
    return load_config("tiny", overrides=["embed.allow_random_init=true", "complexity.allow_random_init=true", *sets])


def _ran_with(manifest: dict, stage: str) -> dict:
    """The placement a stage ran with (recorded in its ``stages`` entry)."""
    entry = manifest["stages"][stage]
    assert entry["status"] == "done" and not entry["skipped"], entry
    return entry["placement"]


def test_synth_run_places_embed_encode_synthesize_and_evaluate_on_the_gpu(corpus, tmp_path, ray_gpu):
    # training and fine-tuning on Ray Train with use_gpu would need a real CUDA device (NCCL,
    # cuda:0): here they are kept in the driver on CPU, and their placement is checked below
    cfg = _tiny("distill=synth", "train.use_gpu=false", "finetune.use_gpu=false")
    manifest = run_pipeline(corpus, tmp_path / "run", cfg, log=lambda s: None)

    assert manifest["ray"]["mode"] == "local" and manifest["ray"]["resources"]["GPU"] == 1.0
    for stage in ("embed", "encode", "synthesize"):
        ran = _ran_with(manifest, stage)
        assert ran["on"] == "ray-data-actors" and ran["num_gpus"] == 1.0 and ran["device"] == "auto", (stage, ran)
        assert ran["gpu_ids"] == ["0"], (stage, ran)  # the actors were given the GPU
    evaluate = _ran_with(manifest, "evaluate")
    assert evaluate == {"on": "ray-task", "num_gpus": 1.0, "device": "auto", "gpu_ids": ["0"]}
    mine = _ran_with(manifest, "mine")
    assert mine["num_gpus"] == 0.0 and mine["gpu_ids"] == []  # mining is CPU work
    for stage in ("train", "finetune"):  # use_gpu false: in the driver, on CPU
        assert _ran_with(manifest, stage) == {"on": "driver", "workers": 0, "use_gpu": False, "num_gpus": 0.0,
                                              "device": "cpu"}  # fmt: skip
    assert manifest["stages"]["evaluate"]["counts"]  # the task's table came back and was written


def test_complexity_actors_get_the_gpu_and_device_cpu_asks_for_none(corpus, tmp_path, ray_gpu):
    gpu = run_pipeline(corpus, tmp_path / "gpu", _tiny("select.method=tripled"), until="complexity",
                       log=lambda s: None)  # fmt: skip
    ran = _ran_with(gpu, "complexity")
    assert ran["num_gpus"] == 1.0 and ran["gpu_ids"] == ["0"]

    cpu = run_pipeline(corpus, tmp_path / "cpu", _tiny("select.method=tripled", "complexity.device=cpu"),
                       until="complexity", log=lambda s: None)  # fmt: skip
    ran = _ran_with(cpu, "complexity")
    assert ran == {"on": "ray-data-actors", "actors": 1, "num_gpus": 0.0, "device": "cpu", "gpu_ids": []}

    embed_cpu = run_pipeline(corpus, tmp_path / "embed_cpu", _tiny("embed.device=cpu"), until="embed",
                             log=lambda s: None)  # fmt: skip
    assert _ran_with(embed_cpu, "embed")["gpu_ids"] == [] and _ran_with(embed_cpu, "embed")["num_gpus"] == 0.0


def test_device_cpu_and_gpus_zero_request_no_gpu_anywhere():
    stages = ["mine", "embed", "cluster", "complexity", "encode", "finetune", "synthesize", "train", "evaluate"]
    devices = [f"{s}.device=cpu" for s in ("embed", "complexity", "finetune", "synthesize", "train", "evaluate")]
    for cfg, gpus in ((_tiny("distill=synth", *devices), 1.0), (_tiny("distill=synth"), 0.0)):
        plan = runner.plan_placement(cfg, stages, gpus, driver_cuda=True)
        assert all(p["num_gpus"] == 0.0 for p in plan.values()), plan
        assert all(p["device"] == "cpu" for p in plan.values() if "device" in p), plan
        assert plan["train"]["on"] == plan["finetune"]["on"] == "driver"


def test_auto_uses_the_cluster_gpus_for_training_and_a_gpu_less_head_is_not_an_error():
    cfg = _tiny("distill=synth", "evaluate.device=cuda")
    plan = runner.plan_placement(cfg, ["encode", "finetune", "train", "evaluate"], 2.0, driver_cuda=False)
    # the driver (a head without GPU) has no CUDA: evaluation goes to a GPU task, training and
    # fine-tuning to one Ray Train worker with a GPU
    assert plan["evaluate"] == {"on": "ray-task", "num_gpus": 1.0, "device": "cuda"}
    assert plan["train"]["on"] == plan["finetune"]["on"] == "ray-train"
    assert plan["train"]["use_gpu"] is plan["finetune"]["use_gpu"] is True and plan["train"]["workers"] == 1
    assert plan["encode"]["num_gpus"] == 1.0
    workers = runner.plan_placement(_tiny("train.workers=2"), ["train"], 2.0, driver_cuda=True)["train"]
    assert workers == {"on": "ray-train", "workers": 2, "use_gpu": True, "num_gpus": 2.0}
    local = runner.plan_placement(_tiny(), ["train"], 1.0, driver_cuda=True)["train"]
    assert local["on"] == "driver" and local["device"] == "cuda"  # a local GPU machine trains in-process


@pytest.mark.parametrize("setting, field", [
    ("evaluate.device=cuda", "evaluate.device"), ("embed.device=cuda", "embed.device"),
    ("train.use_gpu=true", "train.use_gpu"), ("synthesize.device=cuda", "synthesize.device"),
])  # fmt: skip
def test_cuda_on_a_cluster_without_gpus_is_an_error_before_any_work(corpus, tmp_path, ray_gpu, setting, field):
    # ray.num_gpus=0: the cluster is counted as GPU-less (as a local Ray without GPUs, or --gpus 0)
    cfg = _tiny(setting, "ray.num_gpus=0", *(["distill=synth"] if "synthesize" in setting else []))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        run_pipeline(corpus, tmp_path / "run", cfg, log=lambda s: None)
    assert "has no GPUs" in str(err.value)
    assert not (tmp_path / "run" / "manifest.json").exists()  # nothing started


def test_run_task_reports_the_gpu_it_was_given(ray_gpu):
    result, ids = runner.run_task(sum, [1, 2, 3], num_gpus=1)
    assert (result, ids) == (6, ["0"])
    result, ids = runner.run_task(sum, [1, 2], num_gpus=0)
    assert (result, ids) == (3, [])


def test_cli_gpu_flags_map_to_one_config_spelling():
    from srdistill.cli.common import _ray_overrides, _training_overrides

    assert _training_overrides("train", None, 2) == ["train.workers=2", "train.use_gpu=true"]
    assert _training_overrides("finetune", 3, 0) == ["finetune.workers=3", "finetune.use_gpu=false",
                                                     "finetune.device=cpu"]  # fmt: skip
    assert _training_overrides("", None, None) == []
    assert _ray_overrides(1, "10.0.0.1:6379") == ["ray.num_gpus=1", 'ray.address="10.0.0.1:6379"']
    cfg = load_config("tiny", overrides=[*_training_overrides("train", None, 2), *_ray_overrides(0, "h:1")])
    assert (cfg.train.workers, cfg.train.use_gpu, cfg.ray.num_gpus, cfg.ray.address) == (2, True, 0, "h:1")
    assert load_config("tiny").train.use_gpu is None  # auto by default
    with pytest.raises(ValueError, match="contradicts"):
        load_config("tiny", overrides=["train.use_gpu=true", "train.device=cpu"])


def test_actor_stages_with_no_actors_run_in_the_driver_on_its_device():
    cfg = _tiny("embed.num_actors=0", "complexity.num_actors=0")
    plan = runner.plan_placement(cfg, ["embed", "complexity"], 1.0, driver_cuda=True)
    assert plan["embed"] == plan["complexity"] == {"on": "driver", "num_gpus": 0.0, "device": "cuda"}
    assert runner.plan_placement(cfg, ["embed"], 0.0)["embed"] == {"on": "driver", "num_gpus": 0.0, "device": "cpu"}
    cpu = runner.plan_placement(_tiny("embed.num_actors=0", "embed.device=cpu"), ["embed"], 1.0, driver_cuda=True)
    assert cpu["embed"]["device"] == "cpu"
    # a GPU-less driver (a KubeRay head) on a cluster with GPUs: one actor with a GPU, as training does
    head = runner.plan_placement(cfg, ["embed"], 2.0, driver_cuda=False)["embed"]
    assert head["on"] == "ray-data-actors" and head["actors"] == 1 and head["num_gpus"] == 1.0 and "note" in head
    with pytest.raises(ValueError, match=r"embed\.device.*has no GPUs"):
        runner.plan_placement(_tiny("embed.num_actors=0", "embed.device=cuda"), ["embed"], 0.0, driver_cuda=False)
