# SPDX-License-Identifier: Apache-2.0
"""Chat with a ``vllm serve`` running ReDrafter (see examples/serve.sh), streaming and not.

    python examples/openai_client.py --port 8000
"""

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="demo", help="the server's --served-model-name")
    args = parser.parse_args()

    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=args.model, messages=messages,
                                           temperature=0, max_tokens=32)
    print("non-streaming:", reply.choices[0].message.content)

    print("streaming:    ", end="", flush=True)
    stream = client.chat.completions.create(model=args.model, messages=messages,
                                            temperature=0, max_tokens=32, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
