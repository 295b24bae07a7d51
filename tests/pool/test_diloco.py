"""DiLoCo on a local 3-node Ray cluster: close to synchronous DP for far fewer bytes; survives a killed worker;
slower workers take fewer steps; int8 deltas stay close to fp32."""

import json
import math
import os
import signal

import pytest

from cairn.train.config import TrainConfig
from tests.train.conftest import grammar_sentences, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diloco-data")
    return (write_jsonl(tmp / "train.jsonl", [{"text": t} for t in grammar_sentences(600, 1)]),
            write_jsonl(tmp / "eval.jsonl", [{"text": t} for t in grammar_sentences(60, 2)]))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from cairn.models.init import init_model

    path = tmp_path_factory.mktemp("diloco-base")
    init_model(path, shape="tiny", seed=0, corpus=grammar_sentences(400, 99))
    return path


def run(ray_cluster, base, corpus, out, on_round=None, slowdown=None, **kw):
    from cairn.train.distributed import PoolTrainer

    args = {"recipe": "pretrain", "model": str(base), "data": [str(corpus[0])], "eval_data": [str(corpus[1])],
            "out": str(out), "seq_len": 64, "batch_size": 8, "max_steps": 40, "lr": 3e-3, "warmup_steps": 4,
            "workers": 3, "inner_steps": 10, "progress": False, "threads": 1} | kw
    logs = []
    result = PoolTrainer(TrainConfig.build(**args), log=logs.append, slowdown=slowdown, threads=1).run(on_round)
    return result, logs


def test_diloco_close_to_sync_for_far_fewer_bytes(ray_cluster, base, corpus, tmp_path):
    sync, _ = run(ray_cluster, base, corpus, tmp_path / "sync", sync="every-step")
    dil, _ = run(ray_cluster, base, corpus, tmp_path / "diloco", round_slack=0)
    assert dil["tokens"] == sync["tokens"]  # the same token budget
    assert sync["bytes_up"] >= 9.5 * dil["bytes_up"]  # 40 exchanges vs 4
    assert dil["eval_loss"] < 1.15 * sync["eval_loss"], (dil, sync)
    assert (tmp_path / "diloco" / "model.safetensors").is_file()


def test_killed_worker_is_dropped_and_replaced(ray_cluster, base, corpus, tmp_path):
    from cairn.pool import service
    from cairn.train.distributed import PoolTrainer

    killed = []

    def kill_one(m):
        if m["step"] == 1:
            trainer = holder[0]
            worker, _ = next(iter(trainer.workers.values()))
            pid = service.get(worker.call("pid"), timeout=60)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    cfg = TrainConfig.build(recipe="pretrain", model=str(base), data=[str(corpus[0])], eval_data=[str(corpus[1])],
                            out=str(tmp_path / "o"), seq_len=64, batch_size=8, max_steps=40, lr=3e-3, workers=3,
                            inner_steps=10, progress=False)
    logs = []
    holder = [PoolTrainer(cfg, log=logs.append, threads=1)]
    result = holder[0].run(kill_one)
    assert killed and result["rounds"] == 4
    assert any("dropped" in line for line in logs) and any("joined" in line for line in logs), logs


def test_slow_worker_takes_fewer_steps(ray_cluster, base, corpus, tmp_path):
    rounds = []
    # worker 0 is infinitely slow: one step per round, then it waits until the driver asks it to stop
    run(ray_cluster, base, corpus, tmp_path / "o", on_round=rounds.append, slowdown={0: math.inf}, max_steps=30)
    assert len(rounds) == 3
    for r in rounds:  # the round ends once the first worker is done: the straggler is stopped, not waited for
        steps = r["inner_steps"]
        assert steps[0] == 1 and max(steps.values()) == 10 and min(steps[1], steps[2]) >= 1, rounds


def test_int8_deltas_close_to_fp32(ray_cluster, base, corpus, tmp_path):
    fp32, _ = run(ray_cluster, base, corpus, tmp_path / "fp32", max_steps=20, round_slack=0)
    int8, _ = run(ray_cluster, base, corpus, tmp_path / "int8", max_steps=20, round_slack=0, delta_dtype="int8")
    assert int8["bytes_up"] < 0.3 * fp32["bytes_up"]
    # down: round 1 ships the weights, round 2 only their int8 change: (1 + ~0.26) / 2 of fp32's two full rounds
    assert int8["bytes_down"] < 0.7 * fp32["bytes_down"]
    assert abs(int8["eval_loss"] - fp32["eval_loss"]) < 0.05 * fp32["eval_loss"], (int8, fp32)


def test_resume_after_the_pool_stops_and_status_shows_workers(ray_cluster, base, corpus, tmp_path):
    from cairn.errors import UserError
    from cairn.pool import control

    seen, status = [], []

    def stop_after_two(m):
        seen.append(m["step"])
        status.append([t for n in control.status()["nodes"] for t in n["training"]])
        if m["step"] == 2:
            raise KeyboardInterrupt  # the whole pool goes away after round 2's checkpoint

    with pytest.raises(KeyboardInterrupt):
        run(ray_cluster, base, corpus, tmp_path / "o", on_round=stop_after_two, save_every=2, eval_every=1)
    assert (tmp_path / "o" / "checkpoints" / "step-00000002" / "extra.safetensors").is_file()
    shown = status[-1]  # published before round 2, with round 1's speeds
    assert len(shown) == 3 and all(t["tokens_per_s"] > 0 and t["round"] == 1 for t in shown), shown
    with pytest.raises(UserError, match="--resume"):
        run(ray_cluster, base, corpus, tmp_path / "o")
    resumed, logs = run(ray_cluster, base, corpus, tmp_path / "o", on_round=lambda m: seen.append(m["step"]),
                        resume=True)
    assert seen == [1, 2, 3, 4] and resumed["rounds"] == 4  # only the remaining rounds ran
    assert any("resumed from" in line and "round 2 of 4" in line for line in logs), logs
    assert not [t for n in control.status()["nodes"] for t in n["training"]]  # unpublished when done
    steps = [json.loads(line)["step"] for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # round lines written once each, across the stop
    lines = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    at_checkpoint = next(m["eval_loss"] for m in lines if m["step"] == 2 and "eval_loss" in m)
    assert resumed["eval_loss"] < at_checkpoint  # the resumed run went on from the checkpoint's weights


def test_a_joining_device_gets_a_worker_that_contributes(ray_cluster, base, corpus, tmp_path):
    from cairn.pool.service import device_resources

    cluster, _ = ray_cluster
    rounds, added = [], []

    def join_one(m):
        rounds.append(m)
        if m["step"] == 1:
            added.append(cluster.add_node(num_cpus=1, object_store_memory=80 * 10**6, node_ip_address="127.0.0.1",
                                          resources=device_resources(int(400e6), 10e9, 5e10, False)))
            cluster.wait_for_nodes()

    try:
        _, logs = run(ray_cluster, base, corpus, tmp_path / "o", on_round=join_one, workers=4, max_steps=30)
    finally:
        for node in added:
            cluster.remove_node(node)
    assert [r["workers"] for r in rounds] == [3, 4, 4], rounds
    assert any("worker 3 joined" in line for line in logs), logs
    assert all(len(r["inner_steps"]) == 4 for r in rounds[1:])


def test_lora_dpo_on_the_pool(ray_cluster, base, tmp_path):
    pairs = [{"prompt": f"Is the {a} {n} near the river?", "chosen": "yes, gladly.", "rejected": "no. I refuse."}
             for a in ("small", "big", "red") for n in ("cat", "dog", "fox")]
    data = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    result, _ = run(ray_cluster, base, (data, data), tmp_path / "o", recipe="dpo", lora_rank=4, max_steps=6,
                    inner_steps=3, batch_size=4, workers=2, lr=1e-2)
    assert result["rounds"] == 2 and result["eval_reward_margin"] > 0, result
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()
