"""``Runner``: one provider in one mode over rotated input sets: eager calls, ``torch.compile``d calls, or CUDA
graphs of the call captured once per input set and replayed."""

from __future__ import annotations

import gc

import torch

from ..config import PPOLossConfig
from ..layout import HeadLayout
from ..loss import ppo_loss
from .providers import PROVIDERS
from .timing import sync

__all__ = ["MIB", "Runner"]

MIB = 2.0**20
_NAN = float("nan")


def _loss_fns(layout: HeadLayout, config: PPOLossConfig, backend: str):
    def call(b):
        return ppo_loss(
            b["logits"],
            b["action_masks"],
            b["actions"],
            b["old_log_probs"],
            b["advantages"],
            layout=layout,
            head_relevance=b["head_relevance"],
            weights=b["weights"],
            values=b.get("values"),
            returns=b.get("returns"),
            config=config,
            backend=backend,
            validate=False,
        )

    def loss_only(b):
        return call(b).loss

    def with_metrics(b):
        out = call(b)
        return out.loss, out.metrics.tensors()

    return loss_only, with_metrics


def _clear_grads(b: dict) -> None:
    b["logits"].grad = None
    if b.get("values") is not None:
        b["values"].grad = None


def _set_compile_limits() -> None:
    cfg = torch._dynamo.config
    for attr in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), 64))


class Runner:
    """One provider in one mode. ``setup()`` warms it up (compiles, captures); ``run()`` is the timed call."""

    def __init__(
        self,
        provider: str,
        mode: str,
        sets: list[dict],
        layout: HeadLayout,
        config: PPOLossConfig,
        device: torch.device,
    ):
        self.name = provider
        self.kind, self.backend, self.compile_mode = PROVIDERS[provider]
        self.mode = mode
        self.sets = sets
        self.device = device
        self.ro = self.compile_mode == "reduce-overhead"
        self._i = 0
        self.keep: object = None
        self.losses: list[torch.Tensor] = []
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.graph_keep: list[object] = []
        loss_only, with_metrics = _loss_fns(layout, config, self.backend)
        self._donated: bool | None = None
        if self.kind == "compile":  # close() resets dynamo; two compile runners may coexist (interleaved groups)
            _set_compile_limits()
            if mode == "backward":  # a compiled backward with donated buffers refuses retain_graph=True
                import torch._functorch.config as fc

                self._donated, fc.donated_buffer = fc.donated_buffer, False
            fn = with_metrics if mode == "full" else loss_only
            compiled = torch.compile(
                fn, mode=None if self.compile_mode == "default" else self.compile_mode, dynamic=False
            )
            if mode == "full":
                self.fwd_m, self.fwd = compiled, None
            else:
                self.fwd, self.fwd_m = compiled, None
        else:
            self.fwd, self.fwd_m = loss_only, with_metrics

    # one complete operation of this mode on set b (untimed uses: warm-up, memory probe, graph capture)
    def _op(self, b: dict) -> object:
        if self.ro:
            torch.compiler.cudagraph_mark_step_begin()
        _clear_grads(b)
        if self.mode == "forward":
            return self.fwd(b)
        if self.mode == "backward":
            self.fwd(b).backward()
            return None
        loss, metrics = self.fwd_m(b)
        loss.backward()
        return metrics

    def peak_extra_mb(self) -> float:
        """MiB above what is allocated now (the inputs) at the peak of three operations on set 0 (the first
        operation compiles or captures); NaN off the GPU, where it does nothing."""
        b = self.sets[0]
        if self.device.type != "cuda":  # setup() warms up
            return _NAN
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if self.kind == "graph":
            self._capture(1)  # warm-up and set 0's graph: one graph's pool, not every rotated set's
        else:
            for _ in range(3):
                self.keep = self._op(b)
                self.keep = None
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        if self.kind != "graph":
            _clear_grads(b)
        return peak / MIB

    def _capture(self, upto: int) -> None:
        """Capture a graph of ``_op`` for each of the first ``upto`` sets not captured yet (warm-up first)."""
        if not self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (lazy init, JIT compiles)
                for _ in range(3):
                    self._op(self.sets[0])
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        for b in self.sets[len(self.graphs) : upto]:
            _clear_grads(b)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                keep = self._op(b)
            self.graphs.append(g)
            self.graph_keep.append(keep)
        torch.cuda.synchronize()

    def setup(self) -> None:
        if self.kind == "graph":
            if self.mode == "backward":
                raise NotImplementedError("graph providers measure forward and full only")
            self._capture(len(self.sets))
            return
        if self.mode == "backward":
            for b in self.sets:
                _clear_grads(b)
                if self.ro:
                    torch.compiler.cudagraph_mark_step_begin()
                self.losses.append(self.fwd(b))
        self.run()
        sync(self.device)

    def run(self) -> None:
        i = self._i
        self._i = (i + 1) % len(self.sets)
        if self.kind == "graph":
            self.graphs[i].replay()
            return
        b = self.sets[i]
        if self.ro:
            torch.compiler.cudagraph_mark_step_begin()
        if self.mode == "forward":
            self.keep = self.fwd(b)
        elif self.mode == "backward":
            _clear_grads(b)
            self.losses[i].backward(retain_graph=True)
        else:
            _clear_grads(b)
            loss, metrics = self.fwd_m(b)
            loss.backward()
            self.keep = metrics

    def close(self) -> None:
        self.keep = None
        self.losses.clear()
        self.graphs.clear()
        self.graph_keep.clear()
        for b in self.sets:
            _clear_grads(b)
        if self.kind == "compile":
            self.fwd = self.fwd_m = None
            torch._dynamo.reset()
            if self._donated is not None:
                import torch._functorch.config as fc

                fc.donated_buffer, self._donated = self._donated, None
