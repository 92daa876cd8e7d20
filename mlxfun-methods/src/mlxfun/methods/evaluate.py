"""Checking a (pruned) model: a generation smoke test and a side-by-side evaluation.

``smoke_test`` generates greedily from a few prompts and flags degenerate output: no tokens,
blank text, or one token repeated (every generated token the same, with at least two tokens, or
one token making up at least 80% of eight or more).

``evaluate`` measures, for several models on the same token ids (tokenized once, with the first
model's tokenizer):

- perplexity: exp of the mean negative log-likelihood of every next token of the dataset
  samples (each cut to ``max_tokens``; padding excluded);
- top-1 agreement: the share of those positions where the model's most likely next token equals
  the first model's;
- greedy agreement: from the first ``prompt_tokens`` tokens of each sample, each model continues
  greedily for ``gen_tokens`` tokens (end-of-sequence tokens do not stop it); the share of
  continuation positions whose token equals the first model's, and the mean length of the
  identical prefix.

Models are loaded one at a time, so only one is in memory.
"""

import time
from collections import Counter

import numpy as np
from mlxfun.core.errors import MlxfunError

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Explain in one sentence why the sky is blue.",
)


def degenerate_reason(tokens: list[int], text: str) -> str | None:
    """Why an output is degenerate, or None."""
    if not tokens:
        return "no tokens"
    if not text.strip():
        return "blank text"
    token, count = Counter(tokens).most_common(1)[0]
    if len(tokens) >= 2 and count == len(tokens):
        return f"token {token} repeated {count} times"
    if len(tokens) >= 8 and count >= 0.8 * len(tokens):
        return f"token {token} is {count} of {len(tokens)} tokens"
    return None


def render_prompt(tokenizer, prompt: str, chat: bool) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def smoke_test(model, tokenizer, prompts=DEFAULT_PROMPTS, max_tokens: int = 32, chat=True):
    """One row per prompt: the text, the tokens, tokens/s and the degenerate flag."""
    from mlx_lm.generate import stream_generate

    rows = []
    for prompt in prompts:
        tokens, pieces, tps = [], [], 0.0
        start = time.perf_counter()
        for response in stream_generate(
            model, tokenizer, render_prompt(tokenizer, prompt, chat), max_tokens=max_tokens
        ):
            pieces.append(response.text)
            if response.finish_reason != "stop":  # the end-of-sequence token is not output
                tokens.append(int(response.token))
            tps = response.generation_tps
        elapsed = time.perf_counter() - start
        text = "".join(pieces)
        reason = degenerate_reason(tokens, text)
        rows.append(
            {
                "prompt": prompt,
                "text": text,
                "tokens": len(tokens),
                "tokens_per_s": round(float(tps), 2),
                "seconds": round(elapsed, 3),
                "degenerate": reason is not None,
                "reason": reason or "",
            }
        )
    return rows


def _nll(model, sequences, batch_size: int):
    """Per-position negative log-likelihood and argmax, for every sequence (float64 numpy)."""
    import mlx.core as mx
    from mlxfun.core.datasets import batches

    nll, top = [], []
    for tokens, mask in batches(sequences, batch_size):
        inputs = mx.array(tokens)
        logits = model(inputs[:, :-1]).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logprobs, inputs[:, 1:, None], axis=-1)[..., 0]
        best = mx.argmax(logits, axis=-1)
        mx.eval(picked, best)
        picked, best = np.array(picked, dtype=np.float64), np.array(best)
        for row, length in enumerate(mask.sum(axis=1)):
            nll.append(-picked[row, : length - 1])
            top.append(best[row, : length - 1])
    return nll, top


def _greedy(model, prompt: list[int], gen_tokens: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=gen_tokens):
        out.append(int(token))
        if len(out) == gen_tokens:
            break
    return out


def evaluate(
    model_dirs,
    dataset_paths,
    max_tokens: int = 256,
    max_samples: int | None = None,
    batch_size: int = 4,
    prompt_tokens: int = 16,
    gen_tokens: int = 16,
    seed: int = 0,
    progress=None,
) -> dict:
    """Perplexity and agreement with the first model, for each model (see the module doc)."""
    import gc

    from mlxfun.core.datasets import load_samples
    from mlxfun.core.models import load_model
    from mlxfun.core.slicing import check_weights

    if not model_dirs:
        raise MlxfunError("pass at least one --model")
    if max_tokens < 2 or batch_size < 1 or prompt_tokens < 1 or gen_tokens < 1:
        raise MlxfunError(
            "--max-tokens must be at least 2; --batch-size, --prompt-tokens and --gen-tokens "
            "at least 1"
        )
    samples = load_samples(dataset_paths, max_samples=max_samples, seed=seed)
    for model_dir in model_dirs:  # a damaged later model fails now, not after the others
        check_weights(model_dir)
    sequences = tokens = None
    reference = None
    rows = []
    for model_dir in model_dirs:
        if progress:
            progress(f"evaluating {model_dir}")
        model, tokenizer, config = load_model(model_dir)
        if sequences is None:
            sequences = _eval_sequences(samples, tokenizer, max_tokens)
            tokens = sum(len(s) - 1 for s in sequences)
        _check_vocabulary(model, model_dir, sequences)
        start = time.perf_counter()
        nll, top = _nll(model, sequences, batch_size)
        greedy = [_greedy(model, p, gen_tokens) for p in _prompts(sequences, prompt_tokens)]
        seconds = time.perf_counter() - start
        mean_nll = float(np.concatenate(nll).mean())
        row = {
            "model": str(model_dir),
            "perplexity": float(np.exp(mean_nll)),
            "nll": mean_nll,
            "tokens": int(tokens),
            "seconds": round(seconds, 3),
        }
        if reference is None:
            reference = {"top": top, "greedy": greedy}
            row.update(top1_agreement=1.0, greedy_agreement=1.0, greedy_prefix=float(gen_tokens))
        else:
            row.update(_agreement(top, greedy, reference, tokens))
        rows.append(row)
        del model, tokenizer, config
        gc.collect()
    return {
        "dataset": [str(p) for p in dataset_paths],
        "samples": len(sequences),
        "tokens": int(tokens),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "models": rows,
    }


def _eval_sequences(samples, tokenizer, max_tokens: int) -> list[list[int]]:
    """The samples' token ids (the first model's tokenizer), those with a next token to score."""
    from mlxfun.core.datasets import tokenize_samples

    sequences = [s for s in tokenize_samples(samples, tokenizer, max_tokens) if len(s) >= 2]
    if not sequences:
        raise MlxfunError("the dataset has no sample of at least 2 tokens")
    return sequences


def _check_vocabulary(model, model_dir, sequences) -> None:
    vocab = _vocab_size(model)
    highest = max(max(s) for s in sequences)
    if vocab is not None and highest >= vocab:
        raise MlxfunError(
            f"{model_dir} has a vocabulary of {vocab} tokens but the first model's tokenizer "
            f"produced token {highest}; compare models that share a tokenizer"
        )


def _prompts(sequences, prompt_tokens: int) -> list[list[int]]:
    """The first ``prompt_tokens`` of each longer sample; the first half of every sample when
    none is longer."""
    return [s[:prompt_tokens] for s in sequences if len(s) > prompt_tokens] or [
        s[: max(1, len(s) // 2)] for s in sequences
    ]


def _agreement(top, greedy, reference: dict, tokens: int) -> dict:
    """Top-1 and greedy agreement with the reference model, and the mean identical prefix."""
    same = sum(int((a == b).sum()) for a, b in zip(top, reference["top"]))
    matches, prefixes = 0, []
    for ours, theirs in zip(greedy, reference["greedy"]):
        matches += sum(int(a == b) for a, b in zip(ours, theirs))
        prefix = 0
        while prefix < min(len(ours), len(theirs)) and ours[prefix] == theirs[prefix]:
            prefix += 1
        prefixes.append(prefix)
    total = sum(len(g) for g in reference["greedy"])
    return {
        "top1_agreement": same / max(tokens, 1),
        "greedy_agreement": matches / max(total, 1),
        "greedy_prefix": float(np.mean(prefixes)),
    }


def _vocab_size(model) -> int | None:
    for path in ("model.embed_tokens", "language_model.model.embed_tokens", "backbone.embeddings"):
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None:
            return int(weight.shape[0])
    return None
