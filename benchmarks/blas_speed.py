"""How much faster the demo MoE runs on Linux with Debian's OpenBLAS preloaded (README's
"Faster on Linux"), and whether the results are the same.

    python benchmarks/blas_speed.py [--tokens 2048] [--repeats 3] [--openblas PATH]

Runs the same forward passes of the bundled demo model in two fresh processes, one with the
`mlx[cpu]` wheel's bundled BLAS and one with LD_PRELOAD=OpenBLAS, and prints tokens/s of each,
the ratio, and the largest difference between their logits.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

WORKER = """
import json, sys, time
import mlx.core as mx
import numpy as np
from mlxfun.core.datasets import load_samples, tokenize_samples
from mlxfun.core.models import load_model

model_dir, data, tokens, repeats, out = sys.argv[1:6]
model, tokenizer, _ = load_model(model_dir)
ids = [t for s in tokenize_samples(load_samples([data]), tokenizer, 10**9) for t in s]
batch = mx.array(np.array(ids[: int(tokens)], dtype=np.int32).reshape(-1, 256))
mx.eval(model(batch[:1, :16]))  # warm-up
times = []
for _ in range(int(repeats)):
    start = time.perf_counter()
    logits = model(batch)
    mx.eval(logits)
    times.append(time.perf_counter() - start)
np.save(out, np.array(logits[:, -1].astype(mx.float32)))
print(json.dumps({"tokens_per_s": batch.size / min(times)}))
"""


def run(env_preload: str | None, opts, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if env_preload:
        env["LD_PRELOAD"] = env_preload
    args = [str(ROOT / "demo" / "model"), str(ROOT / "demo" / "data" / "eval_code.jsonl")]
    args += [str(opts.tokens), str(opts.repeats), str(out)]
    result = subprocess.run(
        [sys.executable, "-c", WORKER, *args], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"blas_speed: worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="a multiple of 256")
    parser.add_argument("--repeats", type=int, default=3, help="the fastest repeat counts")
    parser.add_argument("--openblas", default=OPENBLAS)
    opts = parser.parse_args()
    if not Path(opts.openblas).exists():
        sys.exit(
            f"blas_speed: {opts.openblas} not found; install it with "
            "`sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu) or pass --openblas PATH"
        )
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        bundled = run(None, opts, Path(tmp) / "bundled.npy")
        openblas = run(opts.openblas, opts, Path(tmp) / "openblas.npy")
        a, b = np.load(Path(tmp) / "bundled.npy"), np.load(Path(tmp) / "openblas.npy")
    diff = float(np.abs(a - b).max())
    print(
        f"demo model forward, {opts.tokens} tokens (batch of 256-token rows), best of {opts.repeats}"
    )
    print(f"  mlx[cpu] bundled BLAS : {bundled:8.0f} tokens/s")
    print(f"  OpenBLAS (LD_PRELOAD) : {openblas:8.0f} tokens/s")
    print(f"  speed-up              : {openblas / bundled:8.1f}x")
    print(f"  max |logit difference|: {diff:.2e} (last position of every row)")


if __name__ == "__main__":
    main()
