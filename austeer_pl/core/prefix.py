"""Reading contrastive pairs that share their prompt: the prompt once, the answers from its KV cache.

A pair's two sequences are ``prompt + right answer`` and ``prompt + wrong answer``. Read as two full sequences
(:class:`~austeer_pl.core.reading.ActivationReader` on ``2B`` rows) the prompt is computed twice. Here it is
computed once per distinct prompt (a prefill over ``U <= B`` rows that keeps the key/value cache of every
layer and stops after the last decoder layer, so no LM head), and the answers are continued from that cache,
reading the last answer token's units at the requested sites. The answers run in rounds over the same ``U``
cache rows (round ``r`` continues every prompt with its ``r``-th distinct answer; a pair gives two rounds),
and the cache is cut back to the prompt after each round: it is never copied per answer, so the pass holds
about one prompt cache at a time. On the default task (~70 prompt tokens, one answer token) this is about half
the work of the two-full-sequence pass.

The result has the same contract as :class:`~austeer_pl.core.reading.ActivationReader` on the concatenated ids
``prompt + answer``: the same ``(B, layers, units)`` float32 values, to float tolerance (the prompt's keys and
values are the same numbers, only the reduction order of a few matmuls differs).

Padding. Prompts of different lengths are prefilled right-padded (so no query row is fully masked, which keeps
float64 eager attention free of NaNs), then each cache row is rotated so that its real tokens end at the same
index: the cache becomes left-padded, and the answers continue right after it, right-padded among themselves
(a prompt with no answer in a round runs one dropped pad token). Keys are cached after their rotary embedding,
at their real positions, so rotating the cache rows changes nothing; the continuation gets position ids
``len(prompt) + t`` and a mask ``[left-padded prompt | right-padded answer]``. Because the cache is
left-aligned, the index distance between any two real tokens equals their real distance, so sliding-window
attention (Gemma 2/3, Mistral) masks exactly as on the full sequence; the prefill cache is a plain
:class:`transformers.DynamicCache` without a config, i.e. every layer keeps all its keys and the sliding
window is applied by the mask alone.

Duplicates are free: identical prompts in a batch (e.g. pairs from ``negatives="all"``) are prefilled once,
and an identical ``(prompt, answer)`` continuation (the shared right answer of those pairs) is computed once.

When the model's forward takes no cache argument, or its prefill with a plain ``DynamicCache`` fails or yields
layers other than ``DynamicLayer`` (linear-attention or other exotic caches), the reader falls back to the
full-sequence pass (same results, no speed-up) and warns once per model class.

Example:
    >>> with torch.inference_mode():
    ...     pos, neg = SharedPrefixReader(model, layout, ["attention", "ffn"]).read_pairs(prompt_ids, pos_ids, neg_ids, pad_id)
    >>> pos["attention"].shape  # (B, n_layers, n_heads * head_dim)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from austeer_pl.core import kvcache
from austeer_pl.core.kvcache import cache_kwarg, mark_unsupported, plain_cache
from austeer_pl.core.placement import input_device
from austeer_pl.core.reading import ActivationReader, StopForward
from austeer_pl.core.sites import ModelLayout, register_site_hook
from austeer_pl.core.tokens import pad_ids, truncate_pair_left
from austeer_pl.errors import AusteerError

__all__ = [
    "SharedPrefixReader",
    "split_shared_prefix",
    "use_shared_prefix",
]


def use_shared_prefix(setting: bool | str, device: torch.device | str) -> bool:
    """Whether the momentum pass on ``device`` reads pairs through the shared prefix.

    ``True`` and ``False`` are taken as given. ``"auto"`` (the default) shares on the CPU and reads
    full sequences on an accelerator. Both choices were measured with the embedded model
    (``benchmarks/README.md``). On 2 CPU cores the shared pass took 0.53x the time of two full
    sequences. On an H100 it took 3.3x: there a small model's forward is bound by kernel
    launches, not arithmetic, so a prefill plus one continuation forward per answer costs more
    than one forward over all the full sequences.

    Raises:
        AusteerError: ``setting`` is not ``True``, ``False`` or ``"auto"``.
    """
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return torch.device(device).type == "cpu"
    raise AusteerError(
        f"shared_prefix must be true, false or auto, not {setting!r}; set --data.shared_prefix to one of them"
    )


def split_shared_prefix(
    pos_ids: Sequence[Sequence[int]], neg_ids: Sequence[Sequence[int]]
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Split full positive and negative sequences into their longest common prefix and the rest.

    The prefix is capped so that both rests keep at least one token (the token whose units are
    read). ``prefix + pos_rest == pos`` and ``prefix + neg_rest == neg`` hold exactly, so reading
    the split pairs gives the values of the full sequences: token boundaries never move.

    Example:
        >>> split_shared_prefix([[5, 6, 7]], [[5, 6, 8, 9]])
        ([[5, 6]], [[7]], [[8, 9]])
    """
    if len(pos_ids) != len(neg_ids):
        raise ValueError(f"{len(pos_ids)} positive but {len(neg_ids)} negative sequences")
    prompts, pos_rest, neg_rest = [], [], []
    for p, n in zip(pos_ids, neg_ids):
        p, n = list(p), list(n)
        if not p or not n:
            raise AusteerError(
                "an empty sequence cannot be read; every pair needs a non-empty positive and negative text"
            )
        limit = min(len(p), len(n)) - 1
        c = 0
        while c < limit and p[c] == n[c]:
            c += 1
        prompts.append(p[:c])
        pos_rest.append(p[c:])
        neg_rest.append(n[c:])
    return prompts, pos_rest, neg_rest


class SharedPrefixReader:
    """Reads last-answer-token units of (prompt, answer) continuations, the prompt computed once.

    Args:
        model: a causal LM (transformers, with a ``cache``/``past_key_values`` forward argument).
        layout: its :class:`~austeer_pl.core.sites.ModelLayout`.
        sites: the sites to read.

    Example:
        >>> reader = SharedPrefixReader(model, layout, ["attention"])
        >>> pos, neg = reader.read_pairs(prompt_ids, pos_ids, neg_ids, pad_id=0)
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, sites: Sequence[str]) -> None:
        self.model = model
        self.layout = layout
        self.sites = tuple(sites)
        for name in self.sites:
            layout.site(name)
        self.cache_kwarg = cache_kwarg(model)
        self.fallback_reason: str | None = None if self.cache_kwarg else "the model's forward takes no cache argument"
        self._full_reader: ActivationReader | None = None

    # ------------------------------------------------------------------ public entry points
    def read_pairs(
        self,
        prompt_ids: Sequence[Sequence[int]],
        pos_ids: Sequence[Sequence[int]],
        neg_ids: Sequence[Sequence[int]],
        pad_id: int = 0,
        *,
        max_length: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(pos, neg)`` activations, each ``{site: (B, layers, units)}`` float32.

        Equal (to float tolerance) to :class:`ActivationReader` on ``prompt + pos`` and
        ``prompt + neg``; with ``max_length`` each sequence is first cut to its last ``max_length``
        tokens (as the Lightning collate does).
        """
        n = len(prompt_ids)
        if len(pos_ids) != n or len(neg_ids) != n:
            raise ValueError(
                f"expected as many positives and negatives as prompts ({n}), got {len(pos_ids)} and {len(neg_ids)}"
            )
        if n == 0:
            raise AusteerError("no pairs to read")
        seqs = [truncate_pair_left(list(p), list(a), max_length) for p, a in zip(prompt_ids, pos_ids)]
        seqs += [truncate_pair_left(list(p), list(a), max_length) for p, a in zip(prompt_ids, neg_ids)]
        acts = self.read_continuations(seqs, pad_id)
        return {s: a[:n] for s, a in acts.items()}, {s: a[n:] for s, a in acts.items()}

    def read_continuations(
        self, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0
    ) -> dict[str, torch.Tensor]:
        """Units at the last answer token of each ``(prompt, answer)``; ``{site: (N, layers, units)}``."""
        prompts: dict[tuple[int, ...], int] = {}
        conts: dict[tuple[int, tuple[int, ...]], int] = {}
        row_of: list[int] = []
        for prompt, answer in seqs:
            prompt, answer = tuple(int(t) for t in prompt), tuple(int(t) for t in answer)
            if not answer:  # the read token must be continued: move the prompt's last token over
                if not prompt:
                    raise AusteerError("an empty sequence cannot be read; every pair needs non-empty texts")
                prompt, answer = prompt[:-1], prompt[-1:]
            u = prompts.setdefault(prompt, len(prompts))
            row_of.append(conts.setdefault((u, answer), len(conts)))
        unique_prompts = list(prompts)
        cont_prompt = [u for u, _ in conts]
        cont_answer = [a for _, a in conts]
        if self.fallback_reason is None:
            self.fallback_reason = kvcache.UNSUPPORTED.get(type(self.model))
        acts = None
        if self.fallback_reason is None:
            acts = self._shared(unique_prompts, cont_prompt, cont_answer, pad_id)
        if acts is None:
            acts = self._full([list(unique_prompts[u]) + list(a) for u, a in conts], pad_id)
        if row_of == list(range(len(conts))):
            return acts
        index = torch.tensor(row_of).to(next(iter(acts.values())).device)
        return {s: a.index_select(0, index) for s, a in acts.items()}

    def _cache_name(self) -> str:
        assert self.cache_kwarg is not None, "the shared pass runs only for a model whose forward takes a cache"
        return self.cache_kwarg

    def _unsupported(self, reason: str) -> None:
        """Remember (per model class) that the cache cannot be shared; the full-sequence pass is used."""
        self.fallback_reason = reason
        mark_unsupported(self.model, reason)

    # ------------------------------------------------------------------ the two passes
    def _device(self) -> torch.device:
        return input_device(self.model)

    def _full(self, seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
        if self._full_reader is None:
            self._full_reader = ActivationReader(self.model, self.layout, self.sites)
        ids, mask = pad_ids(seqs, pad_id, side="right", device=self._device())
        return self._full_reader(ids, mask)

    def _run(self, hooks: list, **kwargs) -> None:
        def stop(_module, _args, _output):
            raise StopForward

        # Registered after any capture hooks, so the last layer's residual output is read first.
        hooks.append(self.layout.layers[-1].register_forward_hook(stop))
        try:
            self.model(**kwargs)
        except StopForward:
            pass
        finally:
            for handle in hooks:
                handle.remove()

    def _shared(
        self, prompts: list[tuple[int, ...]], cont_prompt: list[int], cont_answer: list[tuple[int, ...]], pad_id: int
    ) -> dict[str, torch.Tensor] | None:
        device = self._device()
        n_cont, n_prompts = len(cont_prompt), len(prompts)
        width = max(len(p) for p in prompts)
        n_layers = self.layout.n_layers
        # (layers, C, units) per site, filled round by round (one index_select per hook, as in ActivationReader).
        slabs = {
            name: torch.empty(n_layers, n_cont, self.layout.site(name).size, dtype=torch.float32, device=device)
            for name in self.sites
        }
        if width == 0:  # no shared tokens at all: every continuation is a whole sequence
            self._continue(
                None,
                torch.zeros(n_cont, 0, dtype=torch.long, device=device),
                [0] * n_cont,
                list(cont_answer),
                list(range(n_cont)),
                pad_id,
                slabs,
            )
            return {name: slab.transpose(0, 1).contiguous() for name, slab in slabs.items()}

        # 1. Prefill: the distinct prompts, right-padded, all layers, no LM head; keep the cache.
        # The mask is all ones: a right pad comes after every real token of its row, so causality
        # already hides it from them, and a pad query that sees real keys (instead of nothing, which
        # gives NaN rows in float64 eager attention under a sliding window, and 0 * NaN leaks through
        # the masked weights) stays finite. It also lets sdpa run its plain causal kernel.
        ids, _ = pad_ids([list(p) for p in prompts], pad_id, side="right", device=device)
        cache = DynamicCache()
        try:
            self._run(
                [],
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(width, device=device).unsqueeze(0).expand(n_prompts, -1),
                use_cache=True,
                **{self._cache_name(): cache},
            )
        except (AttributeError, NotImplementedError, TypeError) as err:  # e.g. linear-attention layers
            self._unsupported(f"its forward fails with a plain DynamicCache ({type(err).__name__}: {err})")
            return None
        layers = plain_cache(cache, self.model)
        if layers is None:
            self.fallback_reason = kvcache.UNSUPPORTED[type(self.model)]
            return None
        if len(layers) != n_layers:
            self._unsupported("its KV cache is not made of plain DynamicLayers")
            return None

        # 2. Rotate each prompt row so that every prompt ends at index width - 1 (a left-padded cache).
        # Index arithmetic on the host from Python lengths, then one copy each: no device syncs.
        lengths = [len(p) for p in prompts]
        shift = width - torch.tensor(lengths)  # (U,) left padding of each row
        positions = torch.arange(width)
        prompt_mask = (positions.unsqueeze(0) >= shift.unsqueeze(1)).long().to(device)  # (U, width): real tokens
        if any(n != width for n in lengths):
            cols = (positions.unsqueeze(0) - shift.unsqueeze(1)) % width  # (U, width)
            flat = (torch.arange(n_prompts).unsqueeze(1) * width + cols).reshape(-1).to(device)
            for layer in layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)  # (U, heads, width, head_dim)
                    u, h, w, d = t.shape
                    setattr(
                        layer,
                        name,
                        t.transpose(1, 2).reshape(u * w, h, d).index_select(0, flat).view(u, w, h, d).transpose(1, 2),
                    )

        # 3. Continuations in rounds over the same U cache rows, never copied per continuation: round r
        # continues each prompt with its r-th distinct answer (prompts with fewer answers run a dummy
        # pad token whose reads are dropped). After each round the cache is cut back to the prompt.
        rounds: list[dict[int, int]] = []  # per round: prompt row -> continuation index
        seen = [0] * n_prompts
        for c, u in enumerate(cont_prompt):
            if seen[u] == len(rounds):
                rounds.append({})
            rounds[seen[u]][u] = c
            seen[u] += 1
        for chosen in rounds:
            answers = [list(cont_answer[chosen[u]]) if u in chosen else [pad_id] for u in range(n_prompts)]
            targets = [chosen.get(u, -1) for u in range(n_prompts)]
            self._continue(cache, prompt_mask, lengths, answers, targets, pad_id, slabs)
            for layer in layers:
                layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]
        return {name: slab.transpose(0, 1).contiguous() for name, slab in slabs.items()}

    def _continue(
        self,
        cache,
        prompt_mask: torch.Tensor,
        starts: list[int],
        answers: Sequence[Sequence[int]],
        targets: list[int],
        pad_id: int,
        slabs: dict[str, torch.Tensor],
    ) -> None:
        """One batched continuation (row i: ``answers[i]`` after a cached prompt of ``starts[i]`` tokens);
        the last answer token's units of row i go to continuation ``targets[i]`` (rows with -1 are dropped)."""
        device = prompt_mask.device
        n_rows = len(answers)
        ans_ids, ans_mask = pad_ids(answers, pad_id, side="right", device=device)
        ans_width = ans_ids.shape[1]
        keep = [i for i, t in enumerate(targets) if t >= 0]
        last = torch.tensor([len(answers[i]) - 1 for i in keep])
        flat = (torch.tensor(keep) * ans_width + last).to(device)
        dest = torch.tensor([targets[i] for i in keep]).to(device)
        whole = len(keep) == n_rows and targets == list(range(slabs[self.sites[0]].shape[1]))

        def capture(name: str, layer: int):
            slab = slabs[name][layer]

            def fn(x: torch.Tensor) -> None:
                rows = x.reshape(n_rows * ans_width, slab.shape[1])
                if whole and x.dtype == slab.dtype and x.is_contiguous() and not x.requires_grad:
                    torch.index_select(rows, 0, flat, out=slab)
                else:
                    slab.index_copy_(0, dest, rows.index_select(0, flat).to(slab.dtype))

            return fn

        hooks = [
            register_site_hook(self.layout.site(name), layer, capture(name, layer))
            for name in self.sites
            for layer in range(self.layout.n_layers)
        ]
        start = torch.tensor(starts).to(device).unsqueeze(1)
        kwargs = dict(
            input_ids=ans_ids,
            # Answer pads are unmasked for the same reason as prompt pads; the read positions come from the lengths.
            attention_mask=torch.cat([prompt_mask, torch.ones_like(ans_mask)], dim=1),
            position_ids=start + torch.arange(ans_width, device=device).unsqueeze(0),
            use_cache=cache is not None,
        )
        if cache is not None:
            kwargs[self._cache_name()] = cache
        self._run(hooks, **kwargs)
