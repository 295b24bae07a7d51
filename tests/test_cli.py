"""The `cairn` command as a user runs it: a subprocess, its stdout, its exit code."""

import json
import subprocess
import sys

import pytest


def cairn(*args, input=None):
    return subprocess.run([sys.executable, "-m", "cairn", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=300, check=False)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "m"
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("\n".join(f"line {i}: the river runs to the sea, {i * 7} boats." for i in range(300)))
    r = cairn("init-model", out, "--shape", "tiny", "--arch", "qwen2", "--seed", "3", "--corpus", corpus)
    assert r.returncode == 0, r.stderr
    return out


def test_init_model_writes_hf_layout(cli_model):
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (cli_model / f).is_file()
    assert json.loads((cli_model / "config.json").read_text())["model_type"] == "qwen2"
    assert "chat_template" in json.loads((cli_model / "tokenizer_config.json").read_text())


def test_generate_json_is_deterministic(cli_model):
    args = ["generate", cli_model, "--prompt", "the river", "--max-tokens", "12", "--ignore-eos", "--json"]
    a, b = cairn(*args), cairn(*args)
    assert a.returncode == 0, a.stderr
    out = json.loads(a.stdout)
    assert out == {**json.loads(b.stdout), **{k: out[k] for k in ("load_s", "time_to_first_token_s", "total_s",
                                                                   "decode_tokens_per_s")}}
    assert len(out["tokens"]) == 12 and out["finish_reason"] == "length" and out["prompt_tokens"] > 0


def test_generate_streams_plain_text(cli_model):
    r = cairn("generate", cli_model, "--prompt", "the river", "--max-tokens", "8", "--ignore-eos")
    j = json.loads(cairn("generate", cli_model, "--prompt", "the river", "--max-tokens", "8", "--ignore-eos",
                         "--json").stdout)
    assert r.returncode == 0 and r.stdout == j["text"] + "\n"


def test_chat_multi_turn_until_end_of_input(cli_model):
    r = cairn("chat", cli_model, "--max-tokens", "5", "--seed", "1", input="hello\nhow are you\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2


@pytest.mark.parametrize("args, needle", [
    (["generate", "/nonexistent/model", "--prompt", "x"], "does not exist"),
    (["generate", "{model}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "{model}", "--prompt", "x", "--max-tokens", "100000"], "context"),
    (["init-model", "{tmp}/m", "--corpus", "/nonexistent.txt"], "does not exist"),
    (["generate", "{model}"], "--prompt"),
])
def test_user_errors_exit_2_with_one_line(cli_model, tmp_path, args, needle):
    r = cairn(*[a.format(model=cli_model, tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_answers_the_openai_client_and_stops_on_sigterm(cli_model):
    import signal

    import openai

    from tests.serverproc import ServerProcess

    key = "cli-secret-key-42"
    server = ServerProcess([cli_model], "--api-key", key, "--served-name", "m", "--log-json", "--max-body-bytes",
                           "5000", timeout=60, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="m", prompt="x" * 6000)
        assert e.value.status_code == 413
    finally:
        server.stop()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught; -9 would mean it hung and was killed.
    assert server.proc.returncode in (0, -signal.SIGTERM)
    log = server.proc.stderr.read()
    assert key not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    chat = [x for x in lines if x.get("route") == "/v1/chat/completions"]
    assert chat and chat[0]["status"] == 200 and chat[0]["model"] == "m" and chat[0]["logger"] == "cairn.serve"
    assert chat[0]["completion_tokens"] == r.usage.completion_tokens
    assert any(x.get("route") == "/v1/completions" and x["status"] == 413 for x in lines)


def test_serve_bad_model_dir_exits_2():
    r = cairn("serve", "/nonexistent/model")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_tokenizer_train_writes_a_tokenizer_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    b.write_text("\n".join(json.dumps({"text": f"pack my box with {i} dozen liquor jugs"}) for i in range(200)))
    r = cairn("tokenizer", "train", a, b, "--vocab-size", "400", "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "the lazy fox packs 12 jugs, naïve café"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok("the quick brown fox")["input_ids"]) < len("the quick brown fox")  # merges were learned
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    r = cairn("tokenizer", "train", bad, "--vocab-size", "400", "--out", tmp_path / "t2")
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr


POOL_COMMANDS = [
    ["pool", "start"],
    ["pool", "join", "127.0.0.1:6380"],
    ["pool", "status", "--address", "127.0.0.1:6380"],
    ["pool", "token"],
    ["pool", "leave"],
    ["pool", "stop"],
    ["generate", "{model}", "--prompt", "x", "--pool", "127.0.0.1:6380"],
    ["serve", "{model}", "--pool", "127.0.0.1:6380"],
    ["train", "--recipe", "sft", "--model", "{model}", "--data", "d.jsonl", "--out", "{tmp}/o", "--pool",
     "127.0.0.1:6380", "--workers", "2"],
]


@pytest.mark.parametrize("args", POOL_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_pool_commands_without_ray_exit_2_with_the_install_hint(args, tiny_model, tmp_path, monkeypatch, capsys):
    """Without the pool extra (simulated: `import ray` fails), every pool command and --pool option says how to
    install it, on one line, exit 2."""
    import sys

    from cairn.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError, as when it is not installed
    monkeypatch.setenv("CAIRN_HOME", str(tmp_path / "home"))
    assert main([a.format(model=tiny_model, tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert "pip install 'cairn[pool]'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "home").exists() and not (tmp_path / "o").exists()


def test_pool_command_without_ray_as_a_user_runs_it(tmp_path):
    """The same through a real process: no traceback."""
    code = "import sys; sys.modules['ray'] = None; from cairn.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "pool", "status", "--address", "127.0.0.1:6380"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "cairn: error: this needs the pool extra (Ray), which is not installed here: " \
                               "pip install 'cairn[pool]'"
