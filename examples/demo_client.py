"""Start `cairn serve` on a model, ask it a question with the official openai client, print the answer, stop it.

    python examples/demo_client.py MODEL_DIR ["QUESTION"]
"""

import sys
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.serverproc
from tests.serverproc import ServerProcess


def main(model_dir: str, question: str = "What is a cairn?") -> None:
    with ServerProcess([model_dir], "--served-name", "demo") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        print(f"user> {question}\nassistant> ", end="", flush=True)
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                max_tokens=60, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        usage = None
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            usage = chunk.usage or usage
        print(f"\n({usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
