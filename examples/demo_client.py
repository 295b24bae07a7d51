"""Start `cairn serve` on a model, ask it a question with the official openai client, print the answer, stop it.

    python examples/demo_client.py MODEL_DIR
"""

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai


def main(model_dir: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cairn", "serve", model_dir, "--port", str(port),
                               "--served-name", "demo"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        question = "What is a cairn?"
        print(f"user> {question}\nassistant> ", end="", flush=True)
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                max_tokens=40, temperature=0.7, seed=0, stream=True,
                                                stream_options={"include_usage": True})
        usage = None
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            usage = chunk.usage or usage
        print(f"\n({usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated)")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1])
