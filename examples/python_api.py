"""Use ChatLoop from a script: start the embedded SmolLM2 over 2 workers, ask, stream, chat.

    .venv/bin/python examples/python_api.py
"""

from chatloop import ChatLoop, load_config

if __name__ == "__main__":  # the workers are spawned processes: guard the entry point
    with ChatLoop.start(load_config(["cluster.num_workers=2"])) as llm:
        print(llm.generate("The capital of France is", max_new_tokens=8).text)
        for piece in llm.stream("Write a haiku about pipelines.", chat=True, max_new_tokens=40, temperature=0.7,
                                seed=1):
            print(piece, end="", flush=True)
        print()
        answer = llm.chat([{"role": "user", "content": "Name three primary colors."}], max_new_tokens=40)
        print(answer.text, f"({answer.completion_tokens} tokens, {answer.finish_reason})")
