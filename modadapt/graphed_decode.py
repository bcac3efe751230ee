"""Decoding with a static KV cache and CUDA graphs, for dense and converted models alike.

Eager decoding of a ~1B model is bound by the host: Python and kernel launches take several
times the GPU's own time, and a MoD layer's decision needs a host sync, which eats most of what
skipping saves. `GraphedDecoder` captures the decode step and replays it. A MoD layer's work runs
only when some row keeps the token; how that branch is taken (`branches`):

- ``"conditional"``: a CUDA conditional node, the GPU skips the layer itself (torch builds that
  expose `CUDAGraph.begin_capture_to_if_node`; one graph per step);
- ``"host"``: the step is captured as pieces between MoD layers; after each routing piece the
  host polls the decision's byte in pinned memory and replays the layer's graph or not;
- ``"select"``: one graph, every MoD layer always runs and `where` keeps the input of rows that
  skip (no skipped work, no sync; what a large batch, where some row nearly always keeps, wants).

``"auto"`` picks conditional where available, else host at batch 1 and select above. In every
mode a row that skips writes no K/V that is kept and reads none, so each row generates what it
would alone (rows computed in a step that another row keeps are discarded).

The cache is static and compacted per row: a layer holds each row's kept tokens' K/V in slots
`[0, length)` (a dense layer: every real token; left padding is dropped) and attention reads only
those (flash attention with per-row used lengths on CUDA; elsewhere a length mask, over buffers
that start zeroed). A MoD layer's capacity is what its rows kept in the prompt plus the new
tokens, rounded up to `BUCKET` so that captured steps are reused across prompts; KV bytes shrink
with the skipped pairs. The prompt runs eagerly (packed MoD layers where they apply) and its
cache is copied in.

Supported: Llama-style decoders (token embedding, rotary embedding, final norm: Llama, Mistral,
Qwen2/3, Phi-3) without a sliding window in reach, and routers marked `graphable` (all built-in
ones but attention routing, which reads the previous layer's attention map).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.hf_decoder import HFDecoderAdapter, use_attention
from .errors import ModAdaptError
from .mod_layer import apply_gate, state_of
from .routers.base import RoutingContext

#: Capacities are rounded up to a multiple of this (captured steps are keyed on them).
BUCKET = 128
#: Name of the transformers attention function used by the decode step.
STATIC_ATTENTION = "modadapt_static_decode"
BRANCHES = ("auto", "conditional", "host", "select")
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_MAX_STEPS = 4  # captured steps kept per decoder (each holds its buffers)
_FLASH: dict[tuple, bool] = {}  # per (device, dtype, head size): whether flash with used lengths ran
_PENDING = 2  # a "host" branch decision not yet copied back
#: `generate` checks whether every row has ended once per this many steps (a host sync).
CHECK_EVERY = 32


def conditional_nodes_available() -> bool:
    """Whether this torch can capture a graph branch that the GPU takes or skips itself."""
    return hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


@dataclass
class _KeyLengths:
    """Passed where the layer expects its attention mask: each row's used cache slots."""

    used: torch.Tensor  # [B] int32: slots holding K/V, the token being decoded included
    cu_q: torch.Tensor  # [B + 1] int32 query offsets (one token per row)
    cu_k: torch.Tensor  # [B + 1] int32 row starts in the flattened cache (multiples of capacity)

    def mask(self, capacity: int) -> torch.Tensor:
        slots = torch.arange(capacity, device=self.used.device)
        return (slots < self.used[:, None]).view(-1, 1, 1, capacity)


def flash_key(query: torch.Tensor) -> tuple:
    """What flash support depends on: the device, the dtype and the head size."""
    return (str(query.device), query.dtype, query.shape[-1])


def _static_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """One query token per row against the static cache `[B, capacity, Hk, d]`, reading each
    row's used slots only. Returns `([B, 1, H, d], None)` like transformers' SDPA function."""
    lengths: _KeyLengths = attention_mask
    B, H, T, d = query.shape
    _, capacity, Hk, _ = key.shape
    if T != 1 or not isinstance(lengths, _KeyLengths):
        raise ModAdaptError(f"{STATIC_ATTENTION} attention only runs GraphedDecoder's decode steps.")
    q = query.transpose(1, 2).reshape(B, H, d)
    flash = flash_key(query)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _FLASH.get(flash) is not False:
        try:
            out = torch.ops.aten._flash_attention_forward(
                q, key.view(B * capacity, Hk, d), value.view(B * capacity, Hk, d), lengths.cu_q, lengths.cu_k,
                1, capacity, 0.0, False, False, scale=scaling, seqused_k=lengths.used,
            )[0]
            _FLASH[flash] = True
            return out.view(B, 1, H, d), None
        except (RuntimeError, TypeError):
            if _FLASH.get(flash):  # it ran before on such tensors: this is a real error
                raise
            _FLASH[flash] = False
    # The query heads of each K/V head go as that head's queries: no repeat_kv copy of the cache.
    out = F.scaled_dot_product_attention(
        q.view(B, Hk, H // Hk, d), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=lengths.mask(capacity), scale=scaling,
    )
    return out.reshape(B, 1, H, d), None


@functools.cache
def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(STATIC_ATTENTION, _static_decode_attention)


@dataclass(frozen=True)
class Sampling:
    """How a step picks its token when sampling: temperature, then top-k (0 or None: off), then
    top-p (nucleus; None or 1: off), in the order and with the cut-offs transformers uses. Part of
    a captured step (steps are keyed on it)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ModAdaptError(f"temperature must be a number > 0, got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ModAdaptError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ModAdaptError(f"top_p must be in (0, 1], got {self.top_p!r}")


def next_token(logits: torch.Tensor, sampling: Sampling | None) -> torch.Tensor:
    """`[B, 1]` tokens from `[B, V]` logits: the argmax, or a draw (static shapes, no host sync,
    so it can be captured; the draw uses the default generator, so `torch.manual_seed` repeats it)."""
    if sampling is None:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(sampling_logits(logits, sampling).softmax(-1), 1)


def sampling_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Float logits scaled by the temperature, with the tokens top-k and top-p drop at -inf."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= sampling.top_p  # the mass before the token already suffices
        logits = logits.scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
    return logits


class _StaticCache:
    """What the layers' attention sees as `past_key_values`: `update` writes each row's new K/V
    at that row's length in the layer's buffers and returns the whole buffers."""

    def __init__(self, keys: list, values: list, lengths: list):
        self.keys, self.values, self.lengths = keys, values, lengths

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v, length = self.keys[layer_idx], self.values[layer_idx], self.lengths[layer_idx]
        B, Hk, _, d = key.shape
        slot = length.view(B, 1, 1, 1).expand(B, 1, Hk, d)
        k.scatter_(1, slot, key.transpose(1, 2).to(k.dtype))
        v.scatter_(1, slot, value.transpose(1, 2).to(v.dtype))
        return k, v


@dataclass
class _Layer:
    module: nn.Module
    forward: object  # the layer's original forward (unbound)
    names: object  # its LayerCall (argument names)
    mod: bool


class _Step:
    """The buffers of one shape (batch, capacities), the decode step as pieces over them, and
    (on CUDA) its captured graphs. Pieces: `("run", fn)` always runs; `("if", i, fn)` runs MoD
    layer `i` when the `pred` its routing piece left holds."""

    def __init__(self, decoder: GraphedDecoder, batch: int, capacities: tuple[int, ...], new: int, mode: str,
                 sampling: Sampling | None = None):
        p = decoder.params
        device, dtype = p.device, p.dtype
        self.decoder, self.batch, self.capacities, self.sampling = decoder, batch, capacities, sampling
        self.keys = [torch.zeros(batch, c, decoder.kv_heads, decoder.head_dim, device=device, dtype=dtype)
                     for c in capacities]
        self.values = [torch.zeros_like(k) for k in self.keys]
        dense_length = torch.zeros(batch, dtype=torch.long, device=device)
        self.lengths = [torch.zeros(batch, dtype=torch.long, device=device) if layer.mod else dense_length
                        for layer in decoder.layers]
        self.dense_length = dense_length
        self.cache = _StaticCache(self.keys, self.values, self.lengths)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, new, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)
        self.steps_done = 0  # decode steps since the prefill (the host's count of `count`)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self._cu_k = {c: cu_q * c for c in set(capacities)}
        self._cu_q = cu_q
        self._used = [torch.zeros(batch, dtype=torch.int32, device=device) for _ in capacities]
        self.live: dict = {}  # tensors passed between pieces (kept referenced across graphs)
        self.flags = self._flags = None  # pinned host copies of each MoD layer's decision ("host" branches)
        self.graphs: list | None = None  # [(kind, graph, layer)] once captured
        self.mode = mode  # the branches mode (eagerly, "host" and "conditional" check on the host)
        self.pieces = self._pieces()

    @property
    def runs_only_when_kept(self) -> bool:
        """Batch 1 with the MoD work behind a branch: it runs only for a kept token (no `where`)."""
        return self.batch == 1 and self.mode != "select"

    def _lengths(self, i: int) -> _KeyLengths:
        used = torch.add(self.lengths[i], 1, out=self._used[i])  # one kernel: add and narrow to int32
        return _KeyLengths(used, self._cu_q, self._cu_k[self.capacities[i]])

    def _pieces(self) -> list:
        d, pieces = self.decoder, [("run", self._begin)]
        for i, layer in enumerate(d.layers):
            if layer.mod:
                pieces += [("run", functools.partial(self._route, i)), ("if", i, functools.partial(self._body, i))]
            else:
                pieces.append(("run", functools.partial(self._dense, i)))
        return pieces + [("run", self._end)]

    # --- the pieces ---------------------------------------------------------------------------
    def _begin(self) -> None:
        d, live = self.decoder, self.live
        live["h"] = d.embed(self.token)
        live["pe"] = d.rotary(live["h"], self.position)
        if d.first_dense is not None:
            live["dense"] = self._lengths(d.first_dense)

    def _dense(self, i: int) -> None:
        live = self.live
        live["h"] = self._call(self.decoder.layers[i], live["h"], live["dense"], live["pe"])

    def _route(self, i: int) -> None:
        layer, live, B = self.decoder.layers[i], self.live, self.batch
        router, h = layer.module.router, live["h"]
        ctx = RoutingContext(layer_index=i, real=None, forced=None, positions=self.position, causal=True,
                             training=False)
        logits = router.score(h, ctx)
        keep = router.causal_keep(logits, h, ctx).reshape(B, 1)
        live[("keep", i)], live[("gate", i)] = keep, router.gate(logits)
        if self.mode == "select":  # no branch: the layer always runs
            pred = None
        else:
            live[("pred", i)] = pred = keep.reshape(()) if B == 1 else keep.any()
        if self.flags is not None:  # the decision's byte (bool viewed as uint8: no kernel) to the host
            self.flags[i].copy_(pred.view(torch.uint8), non_blocking=True)
        # Needed only when the layer runs, but queued after the copy it runs while the host reacts.
        live[("lengths", i)] = lengths = self._lengths(i)
        if not self.runs_only_when_kept:
            lengths.used.mul_(keep.view(-1))  # rows that skip read no K/V (their result is dropped)

    def _body(self, i: int) -> None:
        live = self.live
        h, keep = live["h"], live[("keep", i)]
        out = apply_gate(self._call(self.decoder.layers[i], h, live[("lengths", i)], live["pe"]), live[("gate", i)], h)
        if self.runs_only_when_kept:  # batch 1, branch taken on the device or host: keep holds
            h.copy_(out)
            self.lengths[i].add_(1)
        else:
            torch.where(keep.unsqueeze(-1), out, h, out=h)  # rows that skip keep their input
            self.lengths[i].add_(keep.view(-1))  # and their K/V slot is not counted

    def _end(self) -> None:
        d, h, B = self.decoder, self.live["h"], self.batch
        self.dense_length += 1
        nxt = next_token(d.head(d.norm(h)[:, -1]), self.sampling)
        self.token.copy_(nxt)
        self.position += 1
        self.out.scatter_(1, self.count.expand(B, 1).clamp_max(self.out.shape[1] - 1), nxt)
        self.count += 1

    def _call(self, layer: _Layer, h, lengths: _KeyLengths, pe):
        c = layer.names
        kwargs = {c.hidden: h, c.mask: lengths, c.cache: self.cache, c.position_ids: self.position,
                  "position_embeddings": pe}
        out = layer.forward(layer.module, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # --- running ------------------------------------------------------------------------------
    def run_eager(self, warm: bool = False) -> None:
        """The step without graphs; `warm` runs every MoD layer's work (so both sides are planned)."""
        for piece in self.pieces:
            if piece[0] == "run":
                piece[1]()
            elif warm or self.mode == "select" or bool(self.live[("pred", piece[1])]):
                piece[2]()

    def capture(self) -> None:
        """Warm up on a side stream, then capture. The buffers hold scratch values here; the
        caller fills them after. The random state is put back, so that the warm-up's draws do not
        shift a sampled generation (the first with this step would differ from later ones)."""
        device = self.token.device
        rng = torch.cuda.get_rng_state(device)
        try:
            self._warm_up_and_capture()
        finally:
            torch.cuda.set_rng_state(rng, device)

    def _warm_up_and_capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run_eager(warm=True)
        torch.cuda.current_stream().wait_stream(stream)
        if self.mode == "host":
            # uint8 so that a value the GPU never writes (_PENDING) marks "not arrived yet"
            self.flags = torch.full((len(self.decoder.layers),), _PENDING, dtype=torch.uint8, pin_memory=True)
            self._flags = self.flags.numpy()  # polled without the tensor dispatcher
        graphs, pool, group = [], None, []

        def capture_group(fns, kind, layer=None):
            nonlocal pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                for fn in fns:
                    fn()
            pool = graph.pool()
            graphs.append((kind, graph, layer))

        if self.mode == "host":
            for piece in self.pieces:
                if piece[0] == "run":
                    group.append(piece[1])
                    continue
                capture_group(group, "run")
                group = []
                capture_group([piece[2]], "if", piece[1])
            capture_group(group, "run")
        else:
            capture_group([self._captured_step], "run")
        self.graphs = graphs

    def _captured_step(self) -> None:
        """The whole step in one capture: MoD work in conditional nodes, or always run ("select")."""
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph() if self.mode == "conditional" else None
        for piece in self.pieces:
            if piece[0] == "run":
                piece[1]()
            elif graph is not None:
                graph.begin_capture_to_if_node(self.live[("pred", piece[1])])
                try:
                    piece[2]()
                finally:
                    graph.end_capture_to_conditional_node()
            else:
                piece[2]()  # "select": computed for every row, `where` keeps the skipping rows' input

    def replay(self) -> None:
        """One step. With "host" branches the host waits once per MoD layer for the decision's
        byte (polling pinned memory is quicker than a stream sync) and replays the layer's graph
        or not; the GPU idles from the routing piece's end until the next graph starts, the
        overhead `benchmarks/speed.py` prices (decode_graphs)."""
        flags = self._flags
        if flags is not None:
            flags.fill(_PENDING)
        for kind, graph, layer in self.graphs:
            if kind == "run":
                graph.replay()
            else:
                spins = 0
                while flags[layer] == _PENDING:  # the copy lands after every earlier node ran
                    spins += 1
                    if spins > 1_000_000:  # slow, or the GPU failed: wait for it properly
                        torch.cuda.current_stream().synchronize()
                        if flags[layer] == _PENDING:
                            raise ModAdaptError(f"MoD layer {layer}'s decision never reached the host")
                if flags[layer]:
                    graph.replay()


class GraphedDecoder:
    """Generation (greedy or sampled) for a Llama-style model, dense or converted, with a
    static, per-row compacted KV cache; on CUDA each decode step replays captured CUDA graphs
    (module docs).

    Greedy, `generate` gives the tokens `model.generate(..., do_sample=False)` gives, up to kernel
    rounding. `cuda_graphs=False` (the default off CUDA) runs the same pieces eagerly. A captured
    step reads the weights in place; when a router's parameters or buffers change in place
    (training, `load_state_dict`: their version moves) the next `prefill` captures afresh, since
    resolved cut-offs are tensors of their own. Replacing `.data` is not seen: call `reset()`.
    """

    def __init__(self, model: nn.Module, cuda_graphs: bool | None = None, branches: str = "auto"):
        config = model.config.get_text_config(decoder=True)
        if getattr(config, "model_type", None) not in _FAMILIES or not hasattr(model, "get_decoder"):
            raise ModAdaptError(
                f"graphed decoding supports {', '.join(_FAMILIES)} decoders, not "
                f"{getattr(config, 'model_type', type(model).__name__)!r}."
            )
        if branches not in BRANCHES:
            raise ModAdaptError(f"branches must be one of {', '.join(BRANCHES)}, got {branches!r}")
        if branches == "conditional" and not conditional_nodes_available():
            raise ModAdaptError("this torch has no CUDA graph conditional nodes; use branches='host' or 'auto'.")
        decoder = model.get_decoder()
        for part in ("embed_tokens", "rotary_emb", "norm", "layers"):
            if not hasattr(decoder, part):
                raise ModAdaptError(f"{type(decoder).__name__} has no {part!r}: not a Llama-style decoder.")
        self.model, self.config, self.branches = model, config, branches
        self.params = next(model.parameters())
        self.cuda_graphs = self.params.is_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not self.params.is_cuda:
            raise ModAdaptError("cuda_graphs=True needs the model on a CUDA device.")
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.embed, self.norm, self.rotary = decoder.embed_tokens, decoder.norm, decoder.rotary_emb
        self.head = model.get_output_embeddings()
        state = state_of(model)
        adapter = state.adapter if state is not None else HFDecoderAdapter()
        mod = set(state.layer_indices) if state is not None else set()
        for i in sorted(mod):
            router = decoder.layers[i].router
            if not router.graphable:
                raise ModAdaptError(
                    f"router {router.name!r} (layer {i}) cannot run inside a captured decode step; decode with "
                    "model.generate instead."
                )
        self.layers = []
        for i, layer in enumerate(decoder.layers):
            names = layer.mod_state.call if i in mod else adapter.layer_call(model, layer, i)
            forward = getattr(type(layer), "_mod_original", type(layer)).forward
            self.layers.append(_Layer(layer, forward, names, i in mod))
        self.first_dense = next((i for i, layer in enumerate(self.layers) if not layer.mod), None)
        self._router_tensors = [t for layer in self.layers if layer.mod
                                for t in (*layer.module.router.parameters(), *layer.module.router.buffers())]
        self._versions: tuple | None = None  # the router tensors' versions the captured steps saw
        self._steps: dict[tuple, _Step] = {}
        self.last_step: _Step | None = None
        _register_attention()

    def reset(self) -> None:
        """Drop every captured step (the next `prefill` captures afresh)."""
        self._steps.clear()
        self.last_step = None

    def branches_for(self, batch: int) -> str:
        """The branch mode used at `batch` (see the module docs)."""
        if self.branches != "auto":
            return self.branches
        if conditional_nodes_available():
            return "conditional"
        return "host" if batch == 1 else "select"

    # --- the public calls -------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
        """The prompt (left padding allowed) and up to `max_new_tokens` new tokens, as
        `model.generate` returns them: greedy (the same tokens), or drawn with `do_sample`
        (temperature, top-k, top-p; seed with `torch.manual_seed`). After a row's end-of-sequence
        token come pad tokens, and generation stops once every row has ended (checked every
        `CHECK_EVERY` steps). Arguments left None come from the model's generation config, as in
        `model.generate` (transformers' defaults: temperature 1, top-k 50, top-p 1)."""
        config = getattr(self.model, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        pad = pad if pad is not None else (eos[0] if eos else 0)
        sampling = None
        if do_sample:
            def pick(value, name, default):
                for candidate in (value, getattr(config, name, None)):
                    if candidate is not None:
                        return candidate
                return default

            top_p = pick(top_p, "top_p", 1.0)
            sampling = Sampling(pick(temperature, "temperature", 1.0), pick(top_k, "top_k", 50),
                                None if top_p == 1.0 else top_p)
        step = self.prefill(input_ids, attention_mask, max_new_tokens, sampling)
        first = step.token.clone()
        eos_ids = torch.tensor(eos, device=first.device, dtype=first.dtype)
        done = 0
        while done < max_new_tokens - 1:
            chunk = min(CHECK_EVERY, max_new_tokens - 1 - done)
            self.decode(chunk)
            done += chunk
            if eos and bool(torch.isin(torch.cat([first, step.out[:, :done]], 1), eos_ids).any(1).all()):
                break  # every row has ended: the rest would be padding
        new = torch.cat([first, step.out[:, :done]], dim=1)
        if eos:
            ended = torch.isin(new, eos_ids)
            after = (ended.long().cumsum(1) - ended.long()) > 0  # past each row's first end token
            new = new.masked_fill(after, pad)
            if bool(ended.any(1).all()):  # as transformers: stop at the step the last row ended
                new = new[:, : int(ended.long().argmax(1).max()) + 1]
        return torch.cat([input_ids, new], dim=1)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                sampling: Sampling | None = None) -> _Step:
        """Run the prompt eagerly, copy its cache into the static buffers of a (captured) step
        sized for `max_new_tokens`, and leave the first new token in the step's `token`."""
        from transformers import DynamicCache

        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ModAdaptError(f"input_ids must be [batch, tokens] with tokens > 0, got {tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ModAdaptError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if self.model.training:
            raise ModAdaptError("graphed decoding runs in eval mode; call model.eval() first.")
        state = state_of(self.model)
        if state is not None and state.dense:
            raise ModAdaptError("graphed decoding routes by itself; decode outside modadapt.dense(model), or use "
                                "model.generate inside it.")
        B, S = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ModAdaptError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, S)}")
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if self.window is not None and S + max_new_tokens > self.window:
            raise ModAdaptError(
                f"the model's sliding window ({self.window}) is shorter than prompt + new tokens "
                f"({S + max_new_tokens}); graphed decoding has no windowed cache."
            )
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = next_token(out.logits[:, -1], sampling)
        stored = [self._compacted(cache.layers[i], layer.mod, real) for i, layer in enumerate(self.layers)]
        capacities = tuple(_round_up(int(n.max()) + max_new_tokens, BUCKET) for _, _, n in stored)
        versions = tuple((id(t), t._version) for t in self._router_tensors)
        if versions != self._versions:  # routers changed: cut-offs resolved at capture may be stale
            self.reset()
            self._versions = versions
        step = self._step_for(B, capacities, max_new_tokens, sampling)
        for i, (k, v, n) in enumerate(stored):
            step.keys[i].zero_()
            step.values[i].zero_()
            if k is not None:
                step.keys[i][:, : k.shape[2]].copy_(k.transpose(1, 2))
                step.values[i][:, : v.shape[2]].copy_(v.transpose(1, 2))
            step.lengths[i].copy_(n)
        step.token.copy_(first)
        step.position.copy_(real.long().sum(-1, keepdim=True))
        step.out.zero_()
        step.count.zero_()
        step.steps_done = 0
        self.last_step = step
        return step

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        """`steps` decode steps after `prefill` (greedy or sampled, as the prefill chose)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ModAdaptError(f"steps must be an int >= 0, got {steps!r}")
        step = self.last_step
        if step is None:
            raise ModAdaptError("call prefill (or generate) before decode.")
        if step.steps_done + steps > step.out.shape[1]:
            raise ModAdaptError(
                f"prefill sized the cache for {step.out.shape[1]} steps; {step.steps_done} are done, "
                f"{steps} more do not fit."
            )
        step.steps_done += steps
        with self._attention():
            for _ in range(steps):
                if step.graphs is not None:
                    step.replay()
                else:
                    step.run_eager()

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes allocated for K/V, bytes of K/V slots in use) of the last prefilled step."""
        step = self.last_step
        if step is None:
            return 0, 0
        allocated = sum(2 * k.numel() * k.element_size() for k in step.keys)
        per_slot = [2 * k.shape[2] * k.shape[3] * k.element_size() for k in step.keys]
        used = sum(int(n.sum()) * s for n, s in zip(step.lengths, per_slot))
        return allocated, used

    # --- internals ----------------------------------------------------------------------------
    def _attention(self):
        return use_attention(self.config, STATIC_ATTENTION)

    def _compacted(self, layer, mod: bool, real: torch.Tensor):
        """(keys, values `[B, Hk, n, d]`, per-row counts `[B]`) of one prompt cache layer, each
        row's stored real slots moved to the front (left padding and filler slots dropped)."""
        B = real.shape[0]
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            return None, None, torch.zeros(B, dtype=torch.long, device=real.device)
        valid = layer.mod_valid if mod else real  # reading mod_valid converts a packed cache to rows
        keys, values = layer.keys, layer.values  # (after the conversion)
        if valid is None or bool(valid.all()):
            return keys, values, torch.full((B,), keys.shape[2], dtype=torch.long, device=keys.device)
        counts = valid.long().sum(-1)
        order = torch.sort(valid.long(), dim=1, descending=True, stable=True).indices  # real slots first
        index = order.view(B, 1, -1, 1).expand(B, keys.shape[1], -1, keys.shape[3])
        width = int(counts.max())
        return keys.gather(2, index)[:, :, :width], values.gather(2, index)[:, :, :width], counts

    def _step_for(self, batch: int, capacities: tuple[int, ...], new: int, sampling: Sampling | None) -> _Step:
        key = (batch, capacities, new, sampling)
        step = self._steps.get(key)
        if step is not None:
            return step
        while len(self._steps) >= _MAX_STEPS:
            self._steps.pop(next(iter(self._steps)))
        step = _Step(self, batch, capacities, new, self.branches_for(batch), sampling)
        if self.cuda_graphs:
            try:
                with self._attention():
                    step.capture()
            except RuntimeError as error:
                raise ModAdaptError(
                    f"capturing the decode step failed ({error}); a router whose causal rule syncs with "
                    "the host, or a rotary embedding that resizes itself, cannot be graphed: use "
                    "cuda_graphs=False."
                ) from error
        self._steps[key] = step
        return step


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
