"""A chat loop with a merged model, through its chat template: for a person to try it after the smoke test.

Each line typed is a user message; `/think` or `/no_think` in it switch the thinking block, as the
donor's template does (the union chat template honours both). Replies are greedy. An empty line or
end of input ends the chat.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from ..errors import ZenithError


def chat(folder: str | Path, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
         max_new_tokens: int = 128, show_prompt: bool = False) -> int:
    """Run the loop; returns the number of exchanges."""
    import torch

    from .smoke import load_model

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tok, _ = load_model(Path(folder))
    if not tok.chat_template:
        raise ZenithError(f"{folder}: the tokenizer has no chat template")
    messages: list[dict[str, str]] = []
    exchanges = 0
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if show_prompt:
            stdout.write(f"prompt> {prompt!r}\n")
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        stdout.write(f"model> {reply}\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": reply})
        exchanges += 1
    return exchanges
