"""`cairn pool ...` and `cairn serve --pool` as a user runs them: subprocesses, their PIDs, 127.0.0.1 only."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest

from tests.serverproc import ServerProcess, free_port
from tests.pool.conftest import loopback_only


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    if not loopback_only():
        pytest.skip("pool tests run only in a loopback-only network namespace (scripts/test.sh as root)")
    home = tmp_path_factory.mktemp("cairn-home")
    ray_tmp = tempfile.mkdtemp(prefix="cr", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    (Path(ray_tmp) / "ray").mkdir()
    env = dict(os.environ, CAIRN_HOME=str(home), HOME=str(home), RAY_TMPDIR=ray_tmp)
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(k, None)

    def cairn(*args, extra_env=None):
        return subprocess.run([sys.executable, "-m", "cairn", *map(str, args)], capture_output=True, text=True,
                              env=env | (extra_env or {}), timeout=300)

    port = free_port()
    r = cairn("pool", "start", "--port", port, "--no-device", "--num-cpus", 1)
    assert r.returncode == 0, r.stderr
    token = cairn("pool", "token").stdout.strip()
    assert len(token) == 64 and token not in r.stdout + r.stderr  # said where it is, not printed
    token_file = home / "pool" / "token"
    assert str(token_file) in r.stdout
    assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.parent.stat().st_mode & 0o777 == 0o700
    address = f"127.0.0.1:{port}"
    try:
        yield cairn, address, token, env
    finally:
        cairn("pool", "stop")
        shutil.rmtree(ray_tmp, ignore_errors=True)


CHOICE = Path(__file__).resolve().parents[2] / "examples" / "eval" / "choice.jsonl"


def test_join_needs_the_right_token(pool):
    cairn, address, token, _ = pool
    r = cairn("pool", "join", address, "--memory", "15MB", "--num-cpus", 1)
    assert r.returncode == 2 and "needs its token" in r.stderr
    r = cairn("pool", "join", address, "--token", "0" * 64, "--memory", "15MB", "--num-cpus", 1)
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr


def test_serve_across_the_pool_then_lose_and_regain_capacity(pool, model_factory, tiny_model):
    cairn, address, token, env = pool
    model = model_factory("llama", shape="small")  # ~24 MB with 4 x 256 KV cache: two 15 MB nodes needed
    names = []
    for _ in range(2):
        r = cairn("pool", "join", address, "--token", token, "--memory", "15MB", "--num-cpus", 1)
        assert r.returncode == 0, r.stderr
        names.append(r.stdout.split(" as ")[1].split(":")[0])
    st = json.loads(cairn("pool", "status", "--json").stdout)
    devices = [n["device"] for n in st["nodes"] if n["alive"] and n["device"]]
    assert sorted(d["memory_bytes"] for d in devices) == [15 * 10**6, 15 * 10**6]

    from cairn.config import EngineConfig, SamplingParams
    from cairn.engine.api import LLM

    with LLM(model, EngineConfig(max_seqs=4, max_context=256)) as local:
        want = local.submit("The river", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).result()

    server = ServerProcess([model], "--pool", address, "--served-name", "m", "--max-concurrency", "4",
                           "--max-context", "256", env=env | {"CAIRN_POOL_TOKEN": token}, timeout=180)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="m", prompt="The river", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == want.text
        st = json.loads(cairn("pool", "status", "--json").stdout)
        layers = sorted(run["layers"] for n in st["nodes"] for run in n["running"] if run["model"] == "m")
        assert len(layers) == 2 and layers[0].startswith("[0,")
        runs = [run for n in st["nodes"] for run in n["running"] if run["model"] == "m"]  # KV blocks, after a step
        assert all(256 // 16 <= run["blocks_total"] <= 4 * 256 // 16 for run in runs)
        assert all(run["blocks_used"] + run["blocks_cached"] + run["blocks_free"] == run["blocks_total"] for run in runs)
        assert all(run["format"] == "float32" for run in runs)  # how each stage holds its weights
        text = cairn("pool", "status").stdout
        assert "blocks used" in text and "as float32" in text

        assert cairn("pool", "leave", "--name", names[0]).returncode == 0
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="m", prompt="The river", max_tokens=12, temperature=0)
        assert e.value.status_code == 503 and e.value.body["code"] == "insufficient_capacity"
        assert "needs at least" in e.value.body["message"]

        assert cairn("pool", "join", address, "--token", token, "--memory", "15MB", "--num-cpus", 1).returncode == 0
        r = client.completions.create(model="m", prompt="The river", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == want.text
    finally:
        server.stop()
        cairn("pool", "leave")


def test_train_synth_and_merge_search_on_the_pool(pool, tiny_model, model_factory, tmp_path):
    cairn, address, token, _ = pool
    for _ in range(2):
        assert cairn("pool", "join", address, "--token", token, "--memory", "200MB", "--num-cpus", 1).returncode == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The river {w} runs past the mill and the stone bridge, {i} times a day."
                                  for i, w in enumerate(["slowly", "quickly", "quietly", "wide"] * 12)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"recipe: pretrain\nmodel: {tiny_model}\ndata: [{corpus}]\nout: {tmp_path / 'o'}\nseq_len: 32\n"
                   "batch_size: 4\nmax_steps: 4\nprogress: false\nthreads: 1\n"
                   f"distributed:\n  pool: {address}\n  workers: 2\n  inner_steps: 2\n  delta_dtype: int8\n")
    try:
        r = cairn("train", cfg, extra_env={"CAIRN_POOL_TOKEN": token})
        assert r.returncode == 0, r.stderr
        rounds = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
                  if "workers" in json.loads(line)]
        assert [m["workers"] for m in rounds] == [2, 2] and rounds[-1]["bytes_up"] > 0
        assert (tmp_path / "o" / "model.safetensors").is_file()
        cfg.write_text(cfg.read_text() + "  learning_rate: 1\n")
        r = cairn("train", cfg, "--out", tmp_path / "o2", extra_env={"CAIRN_POOL_TOKEN": token})
        assert r.returncode == 2 and "unknown distributed option 'learning_rate'" in r.stderr, r.stderr
        # `cairn synth --pool`: the teacher pipelined over the same two devices writes what a local run writes
        seeds = tmp_path / "seeds.txt"
        seeds.write_text("the river\nthe mill\nstone bridges\n")
        args = ["synth", tiny_model, "--seeds", seeds, "--per-source", 2, "--temperature", 0, "--max-tokens", 12,
                "--instruction-tokens", 12, "--min-chars", 1, "--threads", 1]
        local = cairn(*args, "--out", tmp_path / "local.jsonl")
        assert local.returncode == 0, local.stderr
        r = cairn(*args, "--out", tmp_path / "pool.jsonl", "--pool", address, extra_env={"CAIRN_POOL_TOKEN": token})
        assert r.returncode == 0, r.stderr
        r = cairn(*args, "--out", tmp_path / "replicas.jsonl", "--pool", address, "--replicas", 2,
                  extra_env={"CAIRN_POOL_TOKEN": token})  # a whole copy of the teacher on each device
        assert r.returncode == 0, r.stderr
        done = [(tmp_path / f"{w}.jsonl.progress").read_text().splitlines() for w in ("local", "pool", "replicas")]
        assert len(done[0]) == 6 and done[0] == done[1] == done[2]
        r = cairn(*args, "--out", tmp_path / "x.jsonl", "--pool", address, "--replicas", 3,
                  extra_env={"CAIRN_POOL_TOKEN": token})
        assert r.returncode == 2 and "has 2 device(s)" in r.stderr
        # `cairn merge search --pool`: one generation's candidates merged and scored on the two devices, the same
        # candidates and scores as a local search with the same seed
        recipe = tmp_path / "merge.yaml"
        recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_model}\n    parameters: {{weight: 0.5}}\n"
                          f"  - model: {model_factory('llama-untied')}\n    parameters: {{weight: 0.5}}\n")
        search = ["merge", "search", recipe, "--budget", 4, "--population", 4, "--choice", CHOICE, "--threads", 1]
        r = cairn(*search, "--out", tmp_path / "s-local")
        assert r.returncode == 0, r.stderr
        r = cairn(*search, "--out", tmp_path / "s-pool", "--pool", address, extra_env={"CAIRN_POOL_TOKEN": token})
        assert r.returncode == 0, r.stderr

        def scored(d):
            rows = [json.loads(x)["candidate"] for x in (tmp_path / d / "search.jsonl").read_text().splitlines()[1:]]
            return [(x["genes"], x["score"]) for x in rows]

        assert len(scored("s-local")) == 4 and scored("s-local") == scored("s-pool")
        assert (tmp_path / "s-pool" / "best" / "config.json").is_file()
    finally:
        cairn("pool", "leave")


def test_connecting_leaves_the_environment_as_it_was(pool):
    _, address, token, env = pool
    code = ("import os; from cairn.pool.control import connect; before = dict(os.environ); "
            f"connect({address!r}, {token!r}); import ray; "
            "auth = lambda env: {k: v for k, v in env.items() if k.startswith(('RAY_AUTH', 'RAY_NUM_REDIS'))}; "
            "assert auth(os.environ) == auth(before), auth(os.environ); "
            f"assert not any({token!r} in v for v in os.environ.values()); "
            "print(ray.get(ray.put(7)), ray.is_initialized())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["7", "True"]  # still connected and working without the token in the environment
