"""Routing statistics of a served model: every forward of the model feeds the scorers of
``mlxfun collect`` (``core.observe.Observer`` + ``core.stats.StatsCollector``), so the counts
after some requests equal ``collect`` on the same token sequences.

The observer hooks each MoE block (router-faithful: the adapter recomputes the routing and
checks it against what the block used); one more hook on the model itself takes what each
forward recorded, still lazy (``Observer.pending``). Evaluating and scoring every decode step on
its own would stop MLX from overlapping the next step with the current one and cost a numpy pass
per token, so the forwards are batched: once ``batch_tokens`` tokens are pending, or when the
server finishes a request (``flush``, before the client gets its answer), they are evaluated
together and fed to the scorers. A forward of mlx-lm's batched generation may hold padding (its
prefill right-pads the prompts of a batch); ``padding_mask`` marks the real tokens and only those
are counted. Its decode steps hold one real token per row (finished rows leave the batch). Only the generation thread runs the model and flushes;
readers (``snapshot``, ``save``, ``reset``) take the same lock as the update, so no count is
lost or read half-written (a snapshot during a request lacks its last pending tokens).
"""

import threading
import time

import numpy as np
from mlxfun.core.hooks import call_hooks
from mlxfun.core.observe import Observer
from mlxfun.core.stats import StatsCollector, model_fingerprint, save_stats


class LiveStats:
    def __init__(self, model, adapter, config: dict, scorers, model_path="", batch_tokens=64):
        self.model = model
        self.adapter = adapter
        self.scorers = list(scorers)
        self.layers = adapter.moe_layers(model)
        self.fingerprint = model_fingerprint(config, self.layers)
        self.model_path = str(model_path)
        self.num_experts = max(layer.num_experts for layer in self.layers)
        self.lock = threading.Lock()
        self.collector = self._new_collector()
        self.observer = Observer(model, adapter, self.collector.needs, layers=self.layers)
        self.forwards = 0
        self.since = time.time()
        self.batch_tokens = batch_tokens
        self._pending: list = []
        self._masks: list = []  # per pending forward: (batch, seq) real tokens, or None (all)
        self._pending_tokens = 0
        self._context = None

    def _new_collector(self) -> StatsCollector:
        return StatsCollector(self.scorers, len(self.layers), self.num_experts)

    # -- hooks ---------------------------------------------------------------------------------

    def _after_forward(self, module, call, inputs, *args, **kwargs):
        # read before the forward: the caches' padding describes this forward's inputs
        mask = padding_mask(inputs, kwargs.get("cache", args[0] if args else None))
        out = call(inputs, *args, **kwargs)
        pending = self.observer.pending()
        self._pending.append(pending)
        self._masks.append(mask)
        self._pending_tokens += int(np.prod(pending[0]["used"].shape[:-1]))
        if self._pending_tokens >= self.batch_tokens:
            self.flush()
        return out

    def flush(self) -> None:
        """Score what is pending (generation thread only: it evaluates MLX arrays)."""
        if not self._pending:
            return
        forwards, self._pending, self._pending_tokens = self._pending, [], 0
        masks, self._masks = self._masks, []
        merged = forwards[0] if len(forwards) == 1 else self.observer.concat_pending(forwards)
        keep = None
        if any(m is not None for m in masks):
            sizes = [int(np.prod(f[0]["used"].shape[:-1])) for f in forwards]
            keep = np.concatenate(
                [np.ones(n, bool) if m is None else m.reshape(-1) for m, n in zip(masks, sizes)]
            )
        observations = self.observer.finish(merged, keep)
        with self.lock:
            self.collector.update(observations)
            self.forwards += len(forwards)

    def install(self) -> None:
        """Hook the model for the rest of the process (``remove`` undoes it)."""
        self.observer.__enter__()
        self._context = call_hooks([(self.model, self._after_forward)])
        self._context.__enter__()

    def remove(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self.observer.__exit__(None, None, None)
            self._context = None

    # -- readers -------------------------------------------------------------------------------

    def reset(self) -> None:
        # pending forwards of a request still running count towards the new period
        with self.lock:
            self.collector = self._new_collector()
            self.forwards = 0
            self.since = time.time()

    def _copy(self):
        with self.lock:
            c = self.collector
            accumulators = {
                name: {k: np.array(v, copy=True) for k, v in acc.items()}
                for name, acc in c.accumulators.items()
            }
            return accumulators, c.token_counts.copy(), self.forwards, self.since

    def snapshot(self) -> dict:
        """The counters as JSON-ready data: one row per MoE layer, every scorer's scores."""
        accumulators, token_counts, forwards, since = self._copy()
        scores = _finalize(self.scorers, accumulators)
        return {
            "source": "live",
            "layers": [layer.index for layer in self.layers],
            "experts_per_layer": [layer.num_experts for layer in self.layers],
            "token_counts": token_counts.tolist(),
            "tokens": int(token_counts[0]) if len(token_counts) else 0,
            "forwards": forwards,
            "since": since,
            "scores": {name: _json_array(value) for name, value in scores.items()},
        }

    def save(self, path) -> dict:
        """Write the counters as an ordinary stats file (atomically); returns its summary."""
        accumulators, token_counts, forwards, _ = self._copy()
        scores = _finalize(self.scorers, accumulators)
        tokens = int(token_counts[0]) if len(token_counts) else 0
        metadata = {
            "fingerprint": self.fingerprint,
            "moe_layers": self.fingerprint["moe_layers"],
            "model": self.model_path,
            "adapter": self.adapter.name,
            "datasets": ["mlxfun serve (live requests)"],
            "samples": forwards,
            "tokens_seen": tokens,
            "source": "mlxfun serve",
        }
        save_stats(path, scores, accumulators, token_counts, metadata)
        return {"path": str(path), "tokens_seen": tokens, "scorers": sorted(scores)}


def padding_mask(inputs, cache):
    """The real tokens (batch, seq) of a forward of mlx-lm's ``BatchGenerator``, or None when
    every token is real. Its prefill right-pads the prompt chunks of a batch and hands each
    ``BatchKVCache`` the padding (``prepare(right_padding=...)``, kept until ``finalize``); the
    chunk is at most ``prefill_step_size`` tokens, so one forward sees it whole and row i's real
    tokens are its first ``seq - padding[i]``. The server batches only models whose caches are
    all ``KVCache`` (serve.py), so no other cache kind needs reading here."""
    padding = None
    for c in cache or ():
        padding = getattr(c, "_right_padding", None)
        if padding is not None:
            break
    if padding is None:
        return None
    seq = inputs.shape[1]
    real = seq - np.array(padding).reshape(-1, 1)
    return np.arange(seq)[None, :] < real


def _finalize(scorers, accumulators) -> dict:
    return {s.name: np.asarray(s.finalize(accumulators[s.name]), dtype=np.float64) for s in scorers}


def _json_array(value: np.ndarray) -> list:
    """Finite floats only (JSON has no NaN): NaN -> None."""
    value = np.asarray(value, dtype=np.float64)
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in value]


def stats_json(stats, source: str) -> dict:
    """A loaded stats file (``core.stats.Stats``) in the shape of ``LiveStats.snapshot``."""
    layers = stats.metadata.get("moe_layers") or list(range(len(stats.token_counts)))
    fingerprint = stats.metadata.get("fingerprint") or {}
    width = next(iter(stats.scores.values())).shape[1] if stats.scores else 0
    return {
        "source": source,
        "layers": list(layers),
        "experts_per_layer": fingerprint.get("experts_per_layer") or [width] * len(layers),
        "token_counts": np.asarray(stats.token_counts).tolist(),
        "tokens": int(stats.metadata.get("tokens_seen", 0)),
        "scores": {name: _json_array(value) for name, value in stats.scores.items()},
        "datasets": stats.metadata.get("datasets"),
        "merge_mode": stats.metadata.get("merge_mode"),
    }
