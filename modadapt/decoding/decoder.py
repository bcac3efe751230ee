"""`GraphedDecoder`: the public decode path: prefill eagerly, then replay captured steps.

It owns what outlives one step: the model's parts, the captured steps (keyed on batch, bucketed
capacities, new tokens and sampling, so that prompts of similar length reuse them), the prefill
that copies the prompt's cache into a step's static buffers, and `generate`'s end-of-sequence
handling, which follows `model.generate`. With `speculate=K` a step is a speculative round
(`speculate`: K draft tokens by the routing, one dense verification).
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ..dense import dense
from ..errors import ModAdaptError
from ..mod_layer import state_of
from ..plugins import find_adapter
from . import decode_linear
from .compiled import NoCompiler, StepCompiler, check_compile
from .sampling import Sampling, next_token
from .speculate import Draft, SpeculativeStep
from .step import (
    BRANCHES,
    CONDITIONAL,
    DecodeStep,
    StepLayer,
    auto_branches,
    conditional_nodes_available,
    merge_kept,
    none_kept,
    route_decision,
)

#: Capacities are rounded up to a multiple of this (captured steps are keyed on them).
BUCKET = 128
_MAX_STEPS = 4  # captured steps kept per decoder (each holds its buffers)
#: `generate` checks whether every row has ended once per this many steps (a host sync).
CHECK_EVERY = 32


class GraphedDecoder:
    """Generation (greedy or sampled) for a model whose adapter provides `decode_parts` (built in:
    Llama-style decoders and GPT-2), dense or converted, with a static, per-row compacted KV cache; on CUDA
    each decode step replays captured CUDA graphs (see `modadapt.decoding`).

    Greedy, `generate` gives the tokens `model.generate(..., do_sample=False)` gives, up to kernel
    rounding. `cuda_graphs=False` (the default off CUDA) runs the same pieces eagerly. A captured
    step reads the weights in place; when a router's parameters or buffers change in place
    (training, `load_state_dict`: their version moves) the next `prefill` captures afresh, since
    resolved cut-offs are tensors of their own. Replacing `.data` is not seen: call `reset()`.

    `branches` sets how a MoD layer's work is taken or skipped in the captured step (`BRANCHES`):
    `"host"` (the host reads each decision and replays the layer's graph or not), `"conditional"`
    (a CUDA conditional node: the GPU decides), `"select"` (every row computed, the skipping rows'
    input kept), `"gather"` / `"gather-conditional"` (only the rows that keep are computed,
    gathered into a batch of a captured bucket size: the host picks the bucket, or conditional
    nodes do), `"auto"` (`modadapt.decoding.step.auto_branches`: what the branch sweep measured
    fastest, chosen per prompt from what its rows kept; a speculative draft, whose prompt runs
    densely, gets the rule without that estimate). Every mode gives the same tokens; see
    `modadapt.decoding`.

    `speculate=K` (K >= 1; 0, the default, decodes one token per step) decodes a converted model
    speculatively: the converted model drafts K tokens, the dense computation of the same weights
    checks them in one forward of K + 1 tokens, and the output is the dense model's
    (`modadapt.unload(model)`'s): its greedy tokens, or draws from its distribution. `draft` sets
    how deep the draft runs (`modadapt.decoding.Draft`: every MoD layer skipped by default, the
    fastest draft measured; ``"routers"`` for the routers' own choice, a `margin` to keep fewer
    tokens, some MoD layers to `skip`). See `modadapt.decoding.speculate`.

    `compile=True` runs each layer's forward, the rotary embedding and the final norm through
    `torch.compile` (inductor, static shapes), so that their small elementwise kernels fuse (the
    static cache's write into the kernel that computes the new K/V); the attention that reads the
    cache stays eager, between compiled graphs.
    Each new step shape compiles in the step's warm-up, before its capture (the first `prefill`
    of a shape takes that long); nothing compiles after it. See `modadapt.decoding.compiled`.
    """

    def __init__(
        self,
        model: nn.Module,
        cuda_graphs: bool | None = None,
        branches: str = "auto",
        speculate: int = 0,
        draft: Draft | dict | str | None = None,
        compile: bool = False,
    ):
        if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 0:
            raise ModAdaptError(
                f"speculate must be an int >= 0 (draft tokens per verification; 0: off), got {speculate!r}"
            )
        state = state_of(model)
        if state is not None and state.config.scope != "block":
            raise ModAdaptError(
                f"graphed decoding runs MoD layers that route whole blocks, not "
                f"scope={state.config.scope!r}; decode with model.generate."
            )
        adapter = state.adapter if state is not None else find_adapter(model)
        parts = adapter.decode_parts(model)
        if branches not in BRANCHES:
            raise ModAdaptError(f"branches must be one of {', '.join(BRANCHES)}, got {branches!r}")
        if branches in CONDITIONAL and not conditional_nodes_available():
            other = "gather" if branches == "gather-conditional" else "host"
            raise ModAdaptError(
                f"branches={branches!r} needs CUDA graph conditional nodes, which neither this torch nor a CUDA "
                f"driver here provides; "
                f"use branches={other!r} (the host decides) or 'auto'."
            )
        self.model, self.parts, self.branches = model, parts, branches
        self.params = next(model.parameters())
        if cuda_graphs and parts.not_capturable:
            raise ModAdaptError(parts.not_capturable)
        self.cuda_graphs = self.params.is_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and parts.not_capturable:  # on CUDA by default: the same pieces, eagerly
            self.cuda_graphs = False
        if self.cuda_graphs and not self.params.is_cuda:
            raise ModAdaptError("cuda_graphs=True needs the model on a CUDA device.")
        self.compile = check_compile(compile, self.params.device)
        if decode_linear.LINEAR_KERNEL not in decode_linear.LINEAR_KERNELS:
            raise ModAdaptError(
                f"decode_linear.LINEAR_KERNEL must be one of {', '.join(decode_linear.LINEAR_KERNELS)}, "
                f"got {decode_linear.LINEAR_KERNEL!r}"
            )
        self.linear_kernel = decode_linear.LINEAR_KERNEL  # fixed per decoder: compiled steps trace it
        self.compiler = StepCompiler() if self.compile else NoCompiler()
        self.kv_heads, self.head_dim, self.windows = parts.kv_heads, parts.head_dim, tuple(parts.windows)
        self.head, self.norm = parts.head, self.compiler.part(parts.norm)
        self.route_decision = self.compiler.shared(route_decision)
        self.merge_kept = self.compiler.shared(merge_kept)
        self.rotary = self.compiler.part(parts.rotary) if parts.rotary is not None else None
        _, stack = adapter.layer_stack(model)
        mod = set(state.layer_indices) if state is not None else set()
        for i in sorted(mod):
            router = stack[i].router
            if not router.graphable:
                raise ModAdaptError(
                    f"router {router.name!r} (layer {i}) cannot run inside a captured decode step; decode with "
                    "model.generate instead."
                )
        self.layers = []
        for i, layer in enumerate(stack):
            names = layer.mod_state.call if i in mod else adapter.layer_call(model, layer, i)
            forward = getattr(type(layer), "_mod_original", type(layer)).forward
            key = parts.rotary_keys[i] if parts.rotary_keys is not None else None
            self.layers.append(StepLayer(layer, self.compiler.shared(forward), names, i in mod, key))
        if len(self.windows) != len(self.layers):
            raise ModAdaptError(
                f"the adapter gives {len(self.windows)} sliding windows (DecodeParts.windows) for {len(self.layers)} layers"
            )
        self.first_dense_by_window: dict = {}  # {window: its first dense layer}: dense layers share lengths
        for i, layer in enumerate(self.layers):
            if not layer.mod:
                self.first_dense_by_window.setdefault(self.windows[i], i)
        self.speculate, self.draft = speculate, None
        if speculate:
            if not mod:
                raise ModAdaptError(
                    "speculate needs a converted model: the draft is its routing and the dense computation of "
                    "the same weights verifies it; this model has no MoD layer, so there is nothing to draft "
                    "from (modadapt.convert it, or use speculate=0)."
                )
            self.draft = Draft.of(draft)
            self.draft.skipped(sorted(mod))  # checks the layers it names
        elif draft is not None:
            raise ModAdaptError("draft= sets how a speculative draft routes; pass speculate=K (K >= 1) with it.")
        self._router_tensors = [
            t
            for layer in self.layers
            if layer.mod
            for t in (*layer.module.router.parameters(), *layer.module.router.buffers())
        ]
        self._versions: tuple | None = None  # the router tensors' versions the captured steps saw
        self._steps: dict[tuple, DecodeStep] = {}
        self.last_step: DecodeStep | None = None

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden states `[B, T, D]` of `tokens` `[B, T]` at `positions`: the token
        embedding, plus the learned position embedding of a model that has one (GPT-2)."""
        h = self.parts.embed(tokens)
        return h if self.parts.position_embed is None else h + self.parts.position_embed(positions)

    def position_embeddings(self, h: torch.Tensor, positions: torch.Tensor) -> Any:
        """What the layers take as `position_embeddings` (rotary cos/sin; a dict of them with
        `rotary_keys`); None: a model without a rotary embedding (GPT-2)."""
        return None if self.rotary is None else self.rotary(h, positions)

    def reset(self) -> None:
        """Drop every captured step (the next `prefill` captures afresh)."""
        self._steps.clear()
        self.last_step = None

    def branches_for(self, batch: int, none_kept_chance: float | None = None) -> str:
        """The branch mode used at `batch` (see `modadapt.decoding`; "auto": `step.auto_branches`,
        given `none_kept_chance`, how often no row keeps a MoD layer's token, where the prompt says)."""
        if self.branches != "auto":
            return self.branches
        return auto_branches(batch, conditional_nodes_available(), none_kept_chance)

    # --- the public calls -------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        pixel_values: torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor:
        """The prompt (left padding allowed) and up to `max_new_tokens` new tokens, as
        `model.generate` returns them: greedy (the same tokens), or drawn with `do_sample`
        (temperature, top-k, top-p; seed with `torch.manual_seed`). After a row's end-of-sequence
        token come pad tokens, and generation stops once every row has ended (checked every
        `CHECK_EVERY` steps). Arguments left None come from the model's generation config, as in
        `model.generate` (transformers' defaults: temperature 1, top-k 50, top-p 1).
        `pixel_values` (LLaVA) go with the prompt, which runs eagerly; the text after it is
        decoded from the static cache like any other. Beam
        search (`num_beams` > 1) and other `model.generate` options are refused: use `model.generate`."""
        if num_beams != 1:
            raise ModAdaptError(
                f"GraphedDecoder has no beam search (num_beams={num_beams!r}): it decodes greedily or by "
                f"sampling; for beams use model.generate(input_ids, num_beams={num_beams!r}, ...)."
            )
        if options:
            raise ModAdaptError(
                f"GraphedDecoder.generate does not take {', '.join(sorted(options))}; use model.generate for them."
            )
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
            sampling = Sampling(
                pick(temperature, "temperature", 1.0), pick(top_k, "top_k", 50), None if top_p == 1.0 else top_p
            )
        step = self.prefill(input_ids, attention_mask, max_new_tokens, sampling, pixel_values=pixel_values)
        eos_ids = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
        if self.speculate:
            new = self._generate_speculative(step, max_new_tokens, eos_ids if eos else None)
        else:
            first = step.token.clone()
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

    def _generate_speculative(
        self, step: SpeculativeStep, max_new_tokens: int, eos_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Rounds until every row has `max_new_tokens` tokens or has ended: `[B, max_new_tokens]`
        (past a row's end whatever it drew; the caller pads there). Every round gives every row
        at least one token, so a row that still lacks `n` is done after at most `n` more rounds;
        the host reads the counts back once per `CHECK_EVERY // (K + 1)` rounds."""
        every = max(1, CHECK_EVERY // (self.speculate + 1))
        fewest = 1  # the prefill's token
        columns = torch.arange(step.out.shape[1], device=step.out.device)
        while fewest < max_new_tokens:
            self.decode(min(every, max_new_tokens - fewest))
            counts = step.count.clone()
            fewest = int(counts.min())
            if eos_ids is not None and fewest < max_new_tokens:
                emitted = torch.isin(step.out, eos_ids) & (columns < counts[:, None])
                if bool(emitted.any(1).all()):
                    break  # every row has ended: the rest would be padding
        return step.out[:, :max_new_tokens].clone()

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        sampling: Sampling | None = None,
        rows_per_pass: int | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> DecodeStep | SpeculativeStep:
        """Run the prompt eagerly, copy its cache into the static buffers of a (captured) step
        sized for `max_new_tokens`, and leave the first new token in the step's `token`
        (speculating: the prompt runs densely, and the step's `out[:, 0]` holds the token).

        `rows_per_pass` runs the prompt that many rows at a time, for a batch whose prompt does
        not fit one eager forward beside its static cache (long contexts at a large batch): each
        pass's dense-layer K/V go straight into the step's buffers, its MoD layers' kept K/V are
        held until every pass has set their capacities. The step is then made afresh (captured
        steps are dropped first, so that their buffers are free). Not with `speculate`, nor with
        `pixel_values` (a multimodal prompt, LLaVA's: it runs with the prompt)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ModAdaptError(f"input_ids must be [batch, tokens] with tokens > 0, got {tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ModAdaptError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if rows_per_pass is not None:
            if isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int) or rows_per_pass < 1:
                raise ModAdaptError(f"rows_per_pass must be a positive int or None, got {rows_per_pass!r}")
            if self.speculate:
                raise ModAdaptError(
                    "rows_per_pass prefills a plain decode step; a speculative prefill runs in one pass."
                )
            if pixel_values is not None:
                raise ModAdaptError("rows_per_pass prefills text prompts; a prompt with pixel_values runs in one pass.")
        if self.model.training:
            raise ModAdaptError("graphed decoding runs in eval mode; call model.eval() first.")
        state = state_of(self.model)
        if state is not None and state.dense:
            raise ModAdaptError(
                "graphed decoding routes by itself; decode outside modadapt.dense(model), or use "
                "model.generate inside it."
            )
        B, S = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ModAdaptError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, S)}")
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        inputs = {}
        if pixel_values is not None:
            if "pixel_values" not in inspect.signature(self.model.forward).parameters:
                raise ModAdaptError(f"{type(self.model).__name__} takes no pixel_values; pass input_ids only.")
            inputs["pixel_values"] = pixel_values
        if rows_per_pass is not None and rows_per_pass < B:
            step, first = self._prefill_in_passes(
                input_ids, attention_mask, real, positions, max_new_tokens, sampling, rows_per_pass
            )
        else:
            step, first = self._prefill_in_one_pass(
                input_ids, attention_mask, real, positions, max_new_tokens, sampling, inputs
            )
        self.last_step = step
        if self.speculate:
            step.start(first, real.long().sum(-1))  # each row's prompt tokens (what its dense layers hold)
            return step
        step.token.copy_(first)
        step.position.copy_(real.long().sum(-1, keepdim=True))
        step.out.zero_()
        step.count.zero_()
        step.steps_done = 0
        step.mark_start()
        return step

    def _prefill_in_one_pass(self, input_ids, attention_mask, real, positions, max_new_tokens, sampling, inputs):
        """The prompt's cache in one forward (with `inputs`: `pixel_values`), copied into a
        (cached or new) step; (step, first tokens)."""
        B = input_ids.shape[0]
        windowed = self._windowed_mod_layers()  # those keep each slot's position
        if self.speculate:  # the verifier's cache: the prompt through every layer densely
            with dense(self.model):
                logits, cache_layers = self.parts.prefill(input_ids, attention_mask, positions, **inputs)
            stored = [self._compacted(cache_layers[i], False, real, i in windowed) for i in range(len(self.layers))]
            # a row's writes reach `count - 1 + 2K` past its prompt (rows that are done still run)
            width = _round_up(int(stored[0][2].max()) + max_new_tokens + 2 * self.speculate + 1, BUCKET)
            capacities = (width,) * len(self.layers)
        else:
            logits, cache_layers = self.parts.prefill(input_ids, attention_mask, positions, **inputs)
            stored = [
                self._compacted(cache_layers[i], layer.mod, real, i in windowed) for i, layer in enumerate(self.layers)
            ]
            capacities = tuple(_round_up(int(n.max()) + max_new_tokens, BUCKET) for _, _, n, _ in stored)
        first = next_token(logits, sampling)
        self._check_router_versions()
        mode = self._mode_for(B, [n for _, _, n, _ in stored], real)
        step = self._step_for(B, capacities, max_new_tokens, sampling, mode)
        for i, (k, v, n, held) in enumerate(stored):
            step.keys[i].zero_()
            step.values[i].zero_()
            if k is not None:
                step.keys[i][:, : k.shape[2]].copy_(k.transpose(1, 2))
                step.values[i][:, : v.shape[2]].copy_(v.transpose(1, 2))
            if held is not None:
                step.slot_positions[i][:, : held.shape[1]].copy_(held)
            if not self.speculate:
                step.lengths[i].copy_(n)
        return step, first

    def _windowed_mod_layers(self) -> set[int]:
        """The MoD layers with a sliding window: their static cache keeps each slot's position."""
        return {i for i, layer in enumerate(self.layers) if layer.mod and self.windows[i] is not None}

    def _prefill_in_passes(self, input_ids, attention_mask, real, positions, max_new_tokens, sampling, rows):
        """`prefill` `rows` rows at a time; (a new step, first tokens). A dense layer's capacity
        follows from the prompt lengths, so its buffers are made first and each pass writes into
        them; a MoD layer's follows from what every row kept, so its passes' K/V wait."""
        B = input_ids.shape[0]
        self._check_router_versions()
        self.reset()  # the batch is one too large for two sets of buffers: free the cached steps'
        counts = real.long().sum(-1)  # what a dense layer stores per row
        dense_capacity = _round_up(int(counts.max()) + max_new_tokens, BUCKET)
        p = self.params
        buffers = {}
        for i, layer in enumerate(self.layers):
            if not layer.mod:
                k = torch.zeros(B, dense_capacity, self.kv_heads, self.head_dim, device=p.device, dtype=p.dtype)
                buffers[i] = (k, torch.zeros_like(k))
        held: dict[int, list] = {i: [] for i, layer in enumerate(self.layers) if layer.mod}
        windowed = self._windowed_mod_layers()
        logits = []
        for start in range(0, B, rows):
            part = slice(start, start + rows)
            mask = attention_mask[part] if attention_mask is not None else None
            last, cache_layers = self.parts.prefill(input_ids[part], mask, positions[part])
            logits.append(last)
            for i, layer in enumerate(self.layers):
                k, v, n, slot_positions = self._compacted(cache_layers[i], layer.mod, real[part], i in windowed)
                if layer.mod:
                    held[i].append((k, v, n, slot_positions))
                elif k is not None:
                    buffers[i][0][part, : k.shape[2]].copy_(k.transpose(1, 2))
                    buffers[i][1][part, : v.shape[2]].copy_(v.transpose(1, 2))
            del cache_layers, k, v
        first = next_token(torch.cat(logits), sampling)
        capacities = tuple(
            _round_up(max(int(n.max()) for _, _, n, _ in held[i]) + max_new_tokens, BUCKET)
            if layer.mod
            else dense_capacity
            for i, layer in enumerate(self.layers)
        )
        kept = [torch.cat([n for _, _, n, _ in held[i]]) if layer.mod else None for i, layer in enumerate(self.layers)]
        step = self._step_for(B, capacities, max_new_tokens, sampling, self._mode_for(B, kept, real), buffers)
        for i, layer in enumerate(self.layers):
            if not layer.mod:
                step.lengths[i].copy_(counts)
                continue
            start = 0
            for k, v, n, slot_positions in held.pop(i):  # the step's MoD buffers start zeroed
                if k is not None:
                    step.keys[i][start : start + len(n), : k.shape[2]].copy_(k.transpose(1, 2))
                    step.values[i][start : start + len(n), : v.shape[2]].copy_(v.transpose(1, 2))
                if slot_positions is not None:
                    rows = slice(start, start + len(n))
                    step.slot_positions[i][rows, : slot_positions.shape[1]].copy_(slot_positions)
                step.lengths[i][start : start + len(n)].copy_(n)
                start += len(n)
        return step, first

    def _check_router_versions(self) -> None:
        versions = tuple((id(t), t._version) for t in self._router_tensors)
        if versions != self._versions:  # routers changed: cut-offs resolved at capture may be stale
            self.reset()
            self._versions = versions

    @torch.inference_mode()
    def rewind(self) -> None:
        """Put the last prefilled step back where `prefill` left it, so that the same prompt
        decodes again without running it again (the prompt's K/V stay; the new tokens' slots are
        written afresh). What a benchmark of long prompts at a large batch wants. Not for
        speculative steps."""
        step = self.last_step
        if step is None:
            raise ModAdaptError("call prefill (or generate) before rewind.")
        if isinstance(step, SpeculativeStep):
            raise ModAdaptError("rewind is for plain decode steps; prefill a speculative step again.")
        step.rewind()

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        """`steps` decode steps after `prefill` (greedy or sampled, as the prefill chose).
        Speculating, `steps` rounds (K draft steps and a verification each); a row that has its
        `max_new_tokens` stops advancing, so any number of rounds fits the cache."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ModAdaptError(f"steps must be an int >= 0, got {steps!r}")
        step = self.last_step
        if step is None:
            raise ModAdaptError("call prefill (or generate) before decode.")
        if isinstance(step, SpeculativeStep):
            with self._stepping(), self.compiler.compiled():
                for _ in range(steps):
                    step.run_round()
            return
        if step.steps_done + steps > step.out.shape[1]:
            raise ModAdaptError(
                f"prefill sized the cache for {step.out.shape[1]} steps; {step.steps_done} are done, "
                f"{steps} more do not fit."
            )
        step.steps_done += steps
        with self._stepping(), self.compiler.compiled():
            for _ in range(steps):
                if step.graphs is not None:
                    step.replay()
                else:
                    step.run_eager()

    @contextmanager
    def _stepping(self) -> Iterator[None]:
        """Where decode steps run (eagerly, warmed up, captured): on the model's device (Triton
        launches its kernels, and a capture its streams, on the current device: a model on
        another GPU than the current one must still get them), the layers' attention reading the
        static cache, their few-row linear layers through `decode_linear`'s kernel where it applies."""
        device = self.params.device
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext(), self.parts.static_attention():
            if self.linear_kernel == "triton":
                with decode_linear.FewRowsLinear():
                    yield
            else:
                yield

    def speculation_stats(self) -> dict | None:
        """Speculating, what the rounds since the last `prefill` accepted (per row and overall:
        `acceptance` = accepted drafts / drafted tokens, `tokens_per_round`); else None."""
        step = self.last_step
        return step.stats() if isinstance(step, SpeculativeStep) else None

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
    def _compacted(self, layer, mod: bool, real: torch.Tensor, positions: bool = False):
        """(keys, values `[B, Hk, n, d]`, per-row counts `[B]`, slot positions `[B, n]`) of one
        prompt cache layer, each row's stored real slots moved to the front (left padding and
        filler slots dropped). The positions (each slot's token: the real tokens before it in its
        row, what the decode steps count) only if asked for, else None."""
        B = real.shape[0]
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            return None, None, torch.zeros(B, dtype=torch.long, device=real.device), None
        valid = layer.mod_valid if mod else real  # reading mod_valid converts a packed cache to rows
        keys, values = layer.keys, layer.values  # (after the conversion)
        held = None
        if positions:  # a MoD layer's slots hold the sequence indices it kept; a dense layer's all of them
            index = layer.mod_index if mod else torch.arange(keys.shape[2], device=keys.device).expand(B, -1)
            held = (real.long().cumsum(-1) - 1).gather(1, index.clamp(0, real.shape[1] - 1))
        if valid is None or bool(valid.all()):
            return keys, values, torch.full((B,), keys.shape[2], dtype=torch.long, device=keys.device), held
        counts = valid.long().sum(-1)
        order = torch.sort(valid.long(), dim=1, descending=True, stable=True).indices  # real slots first
        index = order.view(B, 1, -1, 1).expand(B, keys.shape[1], -1, keys.shape[3])
        width = int(counts.max())
        if held is not None:
            held = held.gather(1, order)[:, :width]
        return keys.gather(2, index)[:, :, :width], values.gather(2, index)[:, :, :width], counts, held

    def _mode_for(self, batch: int, counts: list, real: torch.Tensor) -> str:
        """The branch mode of a step after this prompt: `counts[i]` `[B]` is what layer `i` kept per
        row (read at the MoD layers only), `real` the prompt's mask; `auto` estimates from them how
        often no row keeps (`step.none_kept`), except speculating, where the prompt ran densely."""
        kept = [n for n, layer in zip(counts, self.layers) if layer.mod]
        if self.speculate or not kept:
            return self.branches_for(batch)
        return self.branches_for(batch, none_kept(torch.stack(kept), real.long().sum(-1)))

    def _step_for(
        self, batch: int, capacities: tuple[int, ...], new: int, sampling: Sampling | None, mode: str, buffers=None
    ):
        key = (batch, capacities, new, sampling, mode)
        step = self._steps.get(key)
        if step is not None and buffers is None:
            return step
        while len(self._steps) >= _MAX_STEPS:
            self._steps.pop(next(iter(self._steps)))
        if self.speculate:
            mod_layers = [i for i, layer in enumerate(self.layers) if layer.mod]
            step = SpeculativeStep(
                self,
                batch,
                capacities[0],
                new,
                self.speculate,
                mode,
                sampling,
                self.draft,
                mod_layers,
            )
        else:
            step = DecodeStep(self, batch, capacities, new, mode, sampling, buffers)
        if self.cuda_graphs:
            try:
                with self._stepping(), self.parts.capture_kernels(), collector_paused():
                    step.capture()
            except torch.OutOfMemoryError:
                raise  # the batch does not fit, whatever the routers do: say so as torch does
            except RuntimeError as error:
                raise ModAdaptError(
                    f"capturing the decode step failed ({error}); a router whose causal rule syncs with "
                    "the host, a rotary embedding that resizes itself, or modeling code that copies from the "
                    "host cannot be graphed: use cuda_graphs=False."
                ) from error
        elif self.compile:  # no capture: the warm-up alone compiles (and puts back the K/V it wrote)
            device = self.params.device
            rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
            try:
                with self._stepping():
                    step.warm_up()
            finally:  # its draws must not shift a sampled generation (as a capture's)
                torch.cuda.set_rng_state(rng, device) if device.type == "cuda" else torch.set_rng_state(rng)
        self._steps[key] = step
        return step


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's garbage collector paused for a capture (after one collection). Left running, it
    can fire mid-capture, once the capture's allocations pile up, and free an object whose
    destructor calls into the CUDA runtime, which a capturing stream forbids: the process aborts
    (seen on the H200: "Fatal Python error: Aborted" while garbage-collecting inside a speculative
    step's capture)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
