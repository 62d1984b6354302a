"""TPT: test-time prompt tuning of CLIP (CoOp-style context), for any open_clip CLIP model.

Paper: Shu, Nie, Huang, Yu, Goldstein, Anandkumar, Xiao, "Test-Time Prompt Tuning for Zero-Shot
Generalization in Vision-Language Models", NeurIPS 2022 (bibtex ``shu2022tpt``).  Upstream:
https://github.com/azshue/TPT; seed 002 (DavidC001/MEMO-TPT-DL2024, ``EasyTPT``) adds the view-ensemble
mode and ``align_steps``.

Per test image: reset the context (and optimizer); 64 views = the original (shorter side to the model's
resolution, bicubic, centre crop) + 63 random resized crops (scale 0.08-1, bilinear) with flips of the full
image (AugMix on top for fine-grained sets: ``augmix=True``, black fill as TPT's ``augmix_ops``); CLIP's
normalisation (mean 0.48145466, 0.4578275, 0.40821073; std 0.26862954, 0.26130258, 0.27577711, or the
model's own ``preprocess_cfg``); logits ``exp(logit_scale) * <img, text>`` with text from the prompt
``"{ctx} {class}."`` whose context tokens are learnable and initialised from the word embeddings of
``base_prompt`` ("a photo of a", 4 tokens); ImageNet class names are CLIP's curated ones
(:func:`tttlab.memo_tpt.data.class_names`, TPT's ``imagenet_classes``); keep the 10% lowest-entropy views
(``int(0.1 * 64) = 6``, chosen at step 0 and kept for later steps); loss = entropy of their average
probability (logsumexp); ``tts`` AdamW steps (lr 5e-3, wd 0.01) on the context only, with AMP +
GradScaler(init_scale=1000) on CUDA; then predict the original view with the tuned prompt.
``class_specific_context``: one context per class (CoOp's CSC) instead of one shared context.

Seed 002 additions (as its ``EasyTPT`` code): ``ensemble=True`` (view-ensemble): no tuning, argmax of the
mean softmax over the selected views (``align_steps`` is not used in this mode, as in seed 002's
``predict``); ``align_steps=k``: the views are selected with the initial prompt, then k AdamW steps
(lr 1e-4) on the visual encoder (all its parameters except a ResNet's ``attnpool``), in training mode (a
ResNet CLIP's BatchNorm uses the selected views' statistics and updates its running ones, once per step and
once more in the training-mode forward seed 002 runs after its steps), minimising ``1 - mean cosine
similarity`` over all pairs of the selected views' embeddings (the diagonal included, as seed 002's
``align_emb_loss``); prompt tuning then uses the same selected views; the visual encoder (parameters and
buffers) is restored after each image.

Deviations: image features of the views are computed once per image (the visual encoder is frozen during
prompt tuning, so this equals upstream's per-step recomputation and saves tts - 1 image passes); views
are built from the 8-bit image on the device (:mod:`tttlab.memo_tpt.augment`; resampling within one grey
level of PIL's).  The text encoder runs on each prompt's positions up to its end-of-text token, in up to
4 groups of similar lengths (:func:`prompt_lengths`, :func:`length_groups`), and with a shared context
the first 1 + n_ctx positions, the same in every prompt, once, their keys and values shared by all
prompts (:func:`encode_shared_prefix`; ImageNet: 4,541 positions per pass instead of 1,000 x 77): CLIP's
causal mask keeps later positions out of the pooled feature and out of earlier positions, so this equals
the full-length pass up to float rounding.  The GradScaler is new for every image (upstream creates one
for the whole run, so its scale grows after 2000 clean steps and shrinks after overflows across images); the scale cancels in an
unskipped step, so this changes only which rare fp16-overflowing steps are skipped, and keeps every image
independent of the order (resumable runs give the same numbers).  The context has one vector per BPE
token of ``base_prompt`` (upstream: one per space-separated word, ``n_ctx = len(ctx_init.split(" "))``,
tuning only the first n_ctx tokens when a word is several tokens); both give 4 for "a photo of a".  No
pretrained CLIP is downloaded: ``pretrained`` is a local file.

Options (not upstream): ``amp`` (``auto`` = upstream's precision above; ``none``; ``bf16`` autocast on any
device without a scaler; ``fp16`` = upstream's, CUDA only) and ``compile`` (``true`` or a ``torch.compile``
mode: ``torch.compile`` of the image encoder and the prompt -> text-feature path), see
:mod:`tttlab.memo_tpt.precision`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tttlab.core.errors import ConfigError, InvalidInputError

from . import augment as A
from .losses import check_rates, check_selection, marginal_entropy, marginal_log_probs, select_confident
from .precision import autocast, check_compile, compile_fn, resolve_amp

__all__ = [
    "TPT",
    "PromptLearner",
    "context_text",
    "encode_shared_prefix",
    "length_groups",
    "prompt_lengths",
    "tokenizer_for",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tokenizer_for(model) -> callable:
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel) at the model's context length.

    Raises ConfigError for a model trained with another tokenizer (open_clip's ``-worldwide`` and ``CLIPA``
    configs: Hugging Face tokenizers, other vocabulary sizes and end tokens): its ids would index the wrong
    (or no) embeddings, and an ``eos`` end token this tokenizer never writes would put every prompt's end at
    position 0 (the text feature read at the start token, an empty context)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=int(model.context_length))
    vocab = getattr(model, "vocab_size", tok.vocab_size)
    pool, eos = getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None)
    if int(vocab) != tok.vocab_size or (pool == "eos" and eos != tok.eot_token_id):
        raise ConfigError(
            f"{type(model).__name__} with vocab_size={vocab}, text_pool_type={pool!r}, text_eos_id={eos}: TPT "
            f"tokenises with open_clip's CLIP BPE tokenizer (vocab_size={tok.vocab_size}, end token "
            f"{tok.eot_token_id}); expected a CLIP model trained with it (RN50, ViT-B-16, ViT-L-14, ...), not "
            "one with its own tokenizer (open_clip's -worldwide and CLIPA models)"
        )
    return tok


#: seed 002 marks the class's place in its base prompt (``-p "a photo of a [CLS]"``); TPT's ``ctx_init`` also
#: takes ``[CLS]``
CLASS_MARK = "[CLS]"


def context_text(base_prompt) -> str:
    """The context words of ``base_prompt`` as they are tokenised here (``"{context} {class}."``).

    Written as the upstream command lines take it, the prompt is the same: TPT's ``--ctx_init a_photo_of_a``
    (TPT replaces ``_`` by spaces) and seed 002's ``"a photo of a [CLS]"`` (the class at the end, where it goes
    here) both give ``"a photo of a"``.  A ``[CLS]`` before other words (the class inside the prompt,
    TPT's and seed 002's middle position) is a ConfigError: the context is only ever before the class
    here.  Before, both forms were tokenised as they stand: ``"a photo of a [CLS]"`` made a 7-token context
    ``a photo of a [ cls ]`` before every class name, ``a_photo_of_a`` one of 7 tokens with the underscores."""
    if not isinstance(base_prompt, str):
        raise ConfigError(f"base_prompt={base_prompt!r}; expected the context words, e.g. 'a photo of a'")
    text = base_prompt.replace("_", " ").strip()
    if text.endswith(CLASS_MARK):
        text = text[: -len(CLASS_MARK)].strip()
    if CLASS_MARK in text:
        raise ConfigError(
            f"base_prompt={base_prompt!r}: the class goes after the context here ('{{context}} {{class}}.'); "
            f"expected {CLASS_MARK} only at the end (or not at all), e.g. 'a photo of a {CLASS_MARK}'"
        )
    return text


def _sot_eot(tok) -> tuple[int, int]:
    return tok.sot_token_id, tok.eot_token_id


class PromptLearner(nn.Module):
    """Learnable context vectors in CLIP's token-embedding space.

    Prompts are tokenised as ``"{base_prompt} {class}."``; the embeddings of ``base_prompt``'s tokens
    become the initial context (shared: (n_ctx, d); class-specific: (n_classes, n_ctx, d)); the start
    token's and the class tokens' embeddings are fixed buffers.
    """

    def __init__(self, model, classnames: Sequence[str], base_prompt: str = "a photo of a",
                 class_specific: bool = False):  # fmt: skip
        super().__init__()
        if isinstance(classnames, str) or not classnames:
            raise InvalidInputError(
                f"classnames={classnames!r}; expected a non-empty list of names, one per class"
            )
        if not all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer")):
            raise ConfigError(
                f"model: a {type(model).__name__} without open_clip CLIP's own text tower (token_embedding, "
                "positional_embedding, transformer); expected an open_clip CLIP (RN50, ViT-B-16, ...)"
            )
        tok = tokenizer_for(model)
        base_prompt = context_text(base_prompt)
        n_ctx = len(tok.encode(base_prompt))
        if n_ctx < 1:
            raise ConfigError(f"base_prompt={base_prompt!r} has no tokens; expected e.g. 'a photo of a'")
        if n_ctx > int(model.context_length) - 3:  # start token, context, >= 1 class token, end token
            raise ConfigError(
                f"base_prompt={base_prompt!r} has {n_ctx} tokens; expected at most context_length - 3 = "
                f"{int(model.context_length) - 3}, so that every prompt keeps its end token and a class token "
                "(longer: the tokenizer cuts the class names, every prompt the same)"
            )
        self.n_ctx, self.base_prompt, self.class_specific = n_ctx, base_prompt, class_specific
        self.classnames = [str(c).replace("_", " ") for c in classnames]
        tokens = tok([f"{base_prompt} {name}." for name in self.classnames])
        # the prompts end at their end-of-text token; with CLIP's causal mask a position never sees later ones
        # and the text feature is read at that token, so the padding after the longest prompt is cut, and
        # prompts of similar lengths are encoded together on their own longest length (exact)
        lengths = prompt_lengths(model, tokens)
        self.length = int(lengths.max())
        tokens = tokens[:, : self.length]
        groups = length_groups(lengths)
        #: (classes, positions) of each group of prompts encoded together; None: one group of all
        self.groups = None if len(groups) == 1 else groups
        order = torch.cat([idx for idx, _ in groups])
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.register_buffer("ends", lengths - 1, persistent=False)  # each prompt's end-of-text position
        for k, (idx, _) in enumerate(groups):
            self.register_buffer(f"group_{k}", idx, persistent=False)
        #: the start token and a shared context are the same first 1 + n_ctx positions of every prompt: with
        #: the causal mask they are encoded once and their keys/values shared (encode_shared_prefix)
        self.shared_prefix = (
            (not class_specific) and shared_prefix_ok(model) and int(lengths.min()) > 1 + n_ctx
        )
        emb_layer = model.token_embedding
        with torch.no_grad():
            emb = emb_layer(tokens.to(emb_layer.weight.device)).detach()
        init = emb[0, 1 : 1 + n_ctx].clone()
        if class_specific:
            init = init.unsqueeze(0).expand(len(self.classnames), -1, -1).clone()
        self.register_buffer("tokens", tokens.to(emb.device), persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("ctx_init", init.clone(), persistent=False)
        self.ctx = nn.Parameter(init)

    @torch.no_grad()
    def reset(self) -> None:
        self.ctx.copy_(self.ctx_init)

    def forward(self) -> torch.Tensor:
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    def group_list(self) -> list[tuple[torch.Tensor | None, int]]:
        """(class indices on the buffers' device, or None for all; positions) of each group."""
        if self.groups is None:
            return [(None, self.length)]
        return [(getattr(self, f"group_{k}"), n) for k, (_, n) in enumerate(self.groups)]

    def shared_parts(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """For :func:`encode_shared_prefix`: the shared first positions' embeddings (1 + n_ctx, d), and per
        group the rest of its prompts' embeddings (n_g, positions - 1 - n_ctx, d) and their end positions
        counted from the first position after the shared ones."""
        p = 1 + self.n_ctx
        prefix = torch.cat([self.prefix[0], self.ctx.to(self.prefix.dtype)])
        suffixes, ends = [], []
        for idx, n in self.group_list():
            suffixes.append(self.suffix[:, : n - p] if idx is None else self.suffix[idx, : n - p])
            ends.append((self.ends if idx is None else self.ends[idx]) - p)
        return prefix, suffixes, ends


def prompt_lengths(model, tokens: torch.Tensor) -> torch.Tensor:
    """How many positions of each (n, context_length) prompt the text encoder needs: up to its end-of-text
    token (the pooled one) when the model reads its text feature there through a causal mask (OpenAI CLIP
    and open_clip's ``CLIP``: ``text_pool_type`` argmax or eos), else all of them.

    ImageNet's prompts ``"a photo of a {class}."`` with CLIP's names need 8-18 of the 77 positions (9.2 on
    average): the text encoder (tuning forward + backward, then the prediction's forward: the larger part of
    TPT's work on 1,000 classes) runs on far fewer tokens, with the same result up to float rounding (a
    masked position adds an exact zero to the softmax)."""
    pool = getattr(model, "text_pool_type", "argmax")
    n, full = tokens.shape
    if getattr(model, "attn_mask", None) is None or pool not in ("argmax", "eos"):
        return torch.full((n,), int(full), dtype=torch.long)
    if pool == "argmax":
        end = tokens.argmax(dim=-1)
    else:
        end = (tokens == model.text_eos_id).int().argmax(dim=-1)
    return end.long().cpu() + 1


def length_groups(lengths: torch.Tensor, max_groups: int = 4) -> list[tuple[torch.Tensor, int]]:
    """The prompts split into at most ``max_groups`` groups of consecutive lengths, each encoded on its
    longest length, with the fewest positions in all (dynamic programming over the distinct lengths):
    ``[(class indices, positions), ...]`` by increasing length.  CLIP's 1,000 ImageNet prompts: 1 group
    18,000 positions, 4 groups 9,536 (the sum of their own lengths: 9,165).  A few groups keep the batches
    large and ``torch.compile`` to a few static shapes."""
    lengths = lengths.long().cpu()
    values, counts = torch.unique(lengths, return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    m, k = len(values), min(int(max_groups), len(values))
    inf = float("inf")
    # best[g][i]: fewest positions for the lengths values[i:] in at most g groups; cut[g][i]: its first group's end
    best = [[inf] * m + [0.0] for _ in range(k + 1)]
    cut = [[m] * (m + 1) for _ in range(k + 1)]
    for g in range(1, k + 1):
        for i in range(m - 1, -1, -1):
            n = 0
            for j in range(i, m):
                n += counts[j]
                cost = n * values[j] + best[g - 1][j + 1]
                if cost < best[g][i]:
                    best[g][i], cut[g][i] = cost, j + 1
    groups, i, g = [], 0, k
    while i < m:
        j = cut[g][i]
        idx = torch.nonzero((lengths >= values[i]) & (lengths <= values[j - 1])).flatten()
        groups.append((idx, int(values[j - 1])))
        i, g = j, g - 1
    return groups


def shared_prefix_ok(model) -> bool:
    """Whether :func:`encode_shared_prefix` computes what open_clip's text encoder does: the causal mask,
    the feature read at the end token, and every block open_clip's pre-norm ``ResidualAttentionBlock`` with
    ``nn.MultiheadAttention`` (self-attention, batch first) without gradient checkpointing."""
    t = getattr(model, "transformer", None)
    if getattr(model, "attn_mask", None) is None or getattr(model, "text_pool_type", "argmax") not in (
        "argmax",
        "eos",
    ):
        return False
    if t is None or not getattr(t, "batch_first", False) or getattr(t, "grad_checkpointing", False):
        return False
    for blk in getattr(t, "resblocks", ()):
        a = getattr(blk, "attn", None)
        if not (isinstance(a, nn.MultiheadAttention) and a.batch_first and a._qkv_same_embed_dim):
            return False
        if hasattr(blk, "ln_1_kv") or not all(
            hasattr(blk, m) for m in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")
        ):
            return False
    return len(getattr(t, "resblocks", ())) > 0


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def encode_shared_prefix(
    model, prefix: torch.Tensor, suffixes: Sequence[torch.Tensor], ends: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """open_clip ``CLIP.encode_text`` of prompts that all begin with the same ``prefix`` embeddings (P, d)
    (the start token and a shared context): each group's rest ``suffixes[g]`` (n_g, S_g, d), features read
    at ``ends[g]`` (positions counted after the prefix).  The prefix goes through each block once, and every
    prompt's later positions attend to its keys/values (the causal mask: the prefix never sees them), so
    the result equals the full prompts' pass up to float rounding with P fewer positions per prompt
    (TPT, ImageNet: 5 of 8-18).  Requires :func:`shared_prefix_ok`."""
    cast = model.transformer.get_cast_dtype()
    pos = model.positional_embedding.to(cast)
    p = prefix.shape[0]
    xp = (prefix.to(cast) + pos[:p])[None]
    xs = [s.to(cast) + pos[p : p + s.shape[1]] for s in suffixes]
    for blk in model.transformer.resblocks:
        a = blk.attn
        h = a.num_heads
        qp, kp, vp = (
            _heads(t, h) for t in F.linear(blk.ln_1(xp), a.in_proj_weight, a.in_proj_bias).chunk(3, -1)
        )
        out = []
        for x in xs:
            m, n, d = x.shape
            q, k, v = (
                _heads(t, h) for t in F.linear(blk.ln_1(x), a.in_proj_weight, a.in_proj_bias).chunk(3, -1)
            )
            k = torch.cat([kp.expand(m, -1, -1, -1), k], dim=2)
            v = torch.cat([vp.expand(m, -1, -1, -1), v], dim=2)
            # position p + j sees the prefix and its own group's positions up to p + j
            mask = torch.ones(n, p + n, dtype=torch.bool, device=x.device).tril(p)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(m, n, d)
            x = x + blk.ls_1(a.out_proj(o))
            out.append(x + blk.ls_2(blk.mlp(blk.ln_2(x))))
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True).transpose(1, 2).reshape(xp.shape)
        xp = xp + blk.ls_1(a.out_proj(o))
        xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
        xs = out
    feats = []
    for x, e in zip(xs, ends):
        feats.append(_project_text(model, model.ln_final(x)[torch.arange(x.shape[0], device=x.device), e]))
    return feats


def _project_text(model, x: torch.Tensor) -> torch.Tensor:
    """The pooled text tokens through open_clip's ``text_projection`` (a matrix, a Linear, or none)."""
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def encode_prompts(model, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` from prompt embeddings (n, L, d) instead of token ids; L may be shorter
    than the model's context length (:func:`prompt_lengths`): the first L positions and their causal mask."""
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    n = prompts.shape[1]
    x = prompts.to(cast) + model.positional_embedding[:n].to(cast)
    mask = model.attn_mask
    x = model.transformer(x, attn_mask=None if mask is None else mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return _project_text(model, x)


def check_options(
    *,
    n_views: int,
    tts: int,
    align_steps: int,
    lr,
    weight_decay,
    align_lr,
    selection,
    base_prompt="a photo of a",
    augmix=False,
) -> None:
    """The checks of :class:`TPT`'s option values that need no model: ``TPT`` runs them, and the paper
    command runs them before it reads any test set."""
    context_text(base_prompt)
    if augmix not in AUGMIX_MODES:  # any other string ("true", "augmix") is refused, not read as truthy
        raise ConfigError(
            f"augmix={augmix!r}; expected false, true (TPT's: crop + flip, then AugMix severity 1, 9 operations) "
            "or seed002 (seed 002's --augmix: torchvision AugMix(), severity 3, 13 operations, whole image)"
        )
    for key, value, least, what in (
        ("n_views", n_views, 1, "views per image, the original included"),
        ("tts", tts, 0, "prompt-tuning steps per image; 0: zero-shot CLIP"),
        ("align_steps", align_steps, 0, "visual-alignment steps per image; 0: none"),
    ):
        if value < least:
            raise ConfigError(f"{key}={value}: expected an integer >= {least} ({what})")
    check_rates(lr=lr, weight_decay=weight_decay, align_lr=align_lr)
    check_selection("selection", selection)


#: ``augmix`` values: none, TPT's (crop + flip + AugMix), seed 002's flag (:func:`augment.seed002_augmix_views`)
AUGMIX_MODES = (False, True, "seed002")


class TPT:
    """TPT around an open_clip CLIP ``model`` (frozen except the context; the visual encoder too when
    ``align_steps > 0``, restored per image).

    Args:
        classnames: one name per class, in label order.
        base_prompt: initial context ("a photo of a"; also as TPT's ``a_photo_of_a`` or seed 002's
            ``a photo of a [CLS]``: :func:`context_text`).
        n_views: views per image including the original (64).
        selection: fraction of lowest-entropy views kept (0.1).
        tts: prompt-tuning steps (1); 0 = zero-shot CLIP with ``base_prompt``.
        lr, weight_decay: AdamW on the context (5e-3, 0.01).
        class_specific_context: CoOp's class-specific context (seed 002's ``single_context=False``).
        augmix: AugMix on the augmented views (TPT: only for fine-grained sets); ``"seed002"``: seed 002's
            ``-A/--augmix`` instead, every view but the original torchvision's ``AugMix()`` of the whole image
            + resize + centre crop, no random crop or flip (:func:`~tttlab.memo_tpt.augment.seed002_augmix_views`).
        ensemble: seed 002's view-ensemble mode (no tuning).
        align_steps, align_lr: seed 002's visual alignment (0 steps; lr 1e-4).
        amp: ``auto`` (upstream: fp16 autocast + GradScaler on CUDA, float32 on CPU), ``none``, ``bf16``
            (bfloat16 autocast on any device, no scaler), ``fp16`` (upstream's mode, CUDA only); ``true`` /
            ``false`` read as ``auto`` / ``none`` (:mod:`tttlab.memo_tpt.precision`).
        compile: ``torch.compile`` the image encoder (``model.visual``: the views once per image, each
            alignment step) and the prompt -> text-feature path (:func:`encode_shared_prefix` with a shared
            context, else :func:`encode_prompts`: forward + backward every tuning step, one more forward to
            predict; on ImageNet 1000 classes in 4 groups of 9-18 tokens, the larger part), static shapes.
    """

    def __init__(
        self,
        model,
        classnames: Sequence[str],
        *,
        base_prompt: str = "a photo of a",
        n_views: int = 64,
        selection: float | int | None = 0.1,
        tts: int = 1,
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        class_specific_context: bool = False,
        augmix: bool | str = False,
        ensemble: bool = False,
        align_steps: int = 0,
        align_lr: float = 1e-4,
        amp: str | bool = "auto",
        compile: bool = False,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        flip: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        severity: float = 1.0,
        seed: int = 0,
    ):
        check_options(n_views=n_views, tts=tts, align_steps=align_steps, lr=lr, weight_decay=weight_decay,
                      align_lr=align_lr, selection=selection, base_prompt=base_prompt, augmix=augmix)  # fmt: skip
        self.model = model.eval()  # as upstream's model.eval(): a ResNet CLIP's BatchNorm uses its statistics
        for p in model.parameters():
            p.requires_grad_(False)
        self.device = next(model.parameters()).device
        self.prompts = PromptLearner(model, classnames, base_prompt, class_specific_context).to(self.device)
        self.n_views, self.selection, self.tts = int(n_views), selection, int(tts)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.ensemble, self.augmix, self.flip, self.scale, self.severity = (
            ensemble,
            augmix,
            flip,
            scale,
            severity,
        )
        self.align_steps, self.align_lr = int(align_steps), float(align_lr)
        visual = model.visual
        size = image_size or visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        mean = mean or pp.get("mean") or CLIP_MEAN
        std = std or pp.get("std") or CLIP_STD
        self.mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.precision = resolve_amp(amp, self.device, "tpt")
        self.amp = self.precision != "none"
        self.compile = check_compile(compile)
        self._encode_image, self._encode_text = model.encode_image, functools.partial(encode_prompts, model)
        self._encode_shared = functools.partial(encode_shared_prefix, model)
        if self.compile:
            self._encode_image = compile_fn(model.visual, self.compile)  # = encode_image(normalize=False)
            if self.prompts.shared_prefix:  # the text path text_features takes
                self._encode_shared = compile_fn(self._encode_shared, self.compile)
            else:
                # one batch cut to the longest prompt: a graph per length group (and grad on/off) would fill
                # dynamo's 8-entry cache of the function after one test set's TPT, and later ones run eager
                self.prompts.groups = None
                self._encode_text = compile_fn(self._encode_text, self.compile)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._visual_params = [p for n, p in visual.named_parameters() if "attnpool" not in n]
        #: BatchNorm layers that keep running statistics (a ResNet CLIP): training mode updates them
        self._visual_bn = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in visual.modules()
        )
        self._visual_snapshot = (
            {k: v.detach().clone() for k, v in visual.state_dict().items()} if self.align_steps else None
        )
        # the text features of the initial prompt, computed on first use (initial_text_features)
        self._initial_text: torch.Tensor | None = None
        self.reset()

    # -- state -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Context back to its initialisation, fresh optimizer and GradScaler, visual encoder restored."""
        self.prompts.reset()
        self.optimizer = torch.optim.AdamW([self.prompts.ctx], lr=self.lr, weight_decay=self.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", init_scale=1000) if self.precision == "fp16" else None
        if self._visual_snapshot is not None:
            with torch.no_grad():
                for k, v in self.model.visual.state_dict().items():
                    v.copy_(self._visual_snapshot[k])

    @property
    def adaptation_steps(self) -> int:
        """Prompt-tuning steps per image, as records' ``step``: ``tts``, the paper's ``tta_steps`` (upstream
        prints it as ``nstep``); 0 in view-ensemble mode (no tuning) and for zero-shot CLIP (``tts=0``).
        Seed 002's visual alignment steps are not counted here (another optimizer, on other parameters):
        :attr:`alignment_steps`, the records' ``extra.align_steps``."""
        return 0 if self.ensemble else self.tts

    @property
    def alignment_steps(self) -> int:
        """Seed 002's visual-encoder alignment steps per image before the prompt tuning: ``align_steps``; 0
        in view-ensemble mode (not used there)."""
        return 0 if self.ensemble else self.align_steps

    def parameters(self):
        return [self.prompts.ctx]

    def _autocast(self):
        return autocast(self.precision, self.device)

    # -- pieces ------------------------------------------------------------------------------------------
    def views(self, image) -> torch.Tensor:
        if self.augmix == "seed002":  # the original view, then seed 002's AugMix views (no crop, no flip)
            original = A.make_views(image, 1, self.size, include_original=True, device=self.device)
            if self.n_views == 1:
                return original
            augmented = A.seed002_augmix_views(
                image, self.n_views - 1, self.size, generator=self.generator, device=self.device
            )
            return torch.cat([original, augmented.contiguous(memory_format=torch.channels_last)])
        return A.make_views(
            image, self.n_views, self.size, include_original=True, augmix_views=self.augmix, flip=self.flip,
            scale=self.scale, severity=self.severity, generator=self.generator, device=self.device,
        )  # fmt: skip

    def image_features(self, views: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            f = self._encode_image((views - self.mean) / self.std)
        return F.normalize(f.float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        p = self.prompts
        with self._autocast():
            if p.shared_prefix:  # the shared first positions once (encode_shared_prefix), back in class order
                t = torch.cat(self._encode_shared(*p.shared_parts()))
                return F.normalize((t if p.groups is None else t[p.inverse]).float(), dim=-1)
            prompts = p()
            if p.groups is None:
                t = self._encode_text(prompts, p.tokens)
            else:  # each group of prompts on its own length (PromptLearner.groups), back in class order
                t = torch.cat([self._encode_text(prompts[i, :n], p.tokens[i, :n]) for i, n in p.group_list()])
                t = t[p.inverse]
        return F.normalize(t.float(), dim=-1)

    @torch.no_grad()
    def initial_text_features(self) -> torch.Tensor:
        """Text features of the initial prompt (``base_prompt`` + class names), computed once: the paths that
        never tune the prompt (zero-shot, ``tts=0``, and the view ensemble) read them for every image instead
        of running the text encoder over every class name again (1,000 prompts for ImageNet: far more work
        than the image's own encoding)."""
        if self._initial_text is None:
            ctx = self.prompts.ctx.detach().clone()
            self.prompts.reset()
            try:
                self._initial_text = self.text_features()
            finally:
                self.prompts.ctx.copy_(ctx)
        return self._initial_text

    def logits_from(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None):
        text = self.text_features() if text_features is None else text_features
        return self.model.logit_scale.exp().float() * image_features @ text.t()

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """Logits of views with the current prompt (gradient to the context only)."""
        with torch.no_grad():
            feats = self.image_features(views)
        return self.logits_from(feats)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        return select_confident(logits, self.selection)

    # -- seed 002: visual alignment ------------------------------------------------------------------------
    def align(self, views: torch.Tensor, selected: torch.Tensor) -> list[float]:
        """``align_steps`` AdamW steps on the visual encoder (training mode) minimising ``1 - mean(f f^T)``
        of the selected views' normalised embeddings f; the losses."""
        if not self.align_steps:
            return []
        for p in self._visual_params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(self._visual_params, lr=self.align_lr)
        losses = []
        self.model.visual.train()
        try:
            for _ in range(self.align_steps):
                f = self.image_features(views[selected])
                loss = 1 - (f @ f.t()).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            if self._visual_bn:
                # seed 002's align_embeddings ends with one more training-mode forward of the selected views
                # (its "distance after"): a BatchNorm's running statistics take one more update, at the
                # aligned weights, before the prompt step and the prediction read them in eval mode
                with torch.no_grad():
                    self.image_features(views[selected])
        finally:
            self.model.visual.eval()
            for p in self._visual_params:
                p.requires_grad_(False)
        return losses

    # -- TPT ----------------------------------------------------------------------------------------------
    def adapt(self, views: torch.Tensor) -> list[float]:
        """Prompt tuning on the views (original first); returns the losses.  With ``align_steps`` the views
        are selected with the initial prompt before the alignment and tuned on after it (seed 002)."""
        selected = None
        if self.align_steps:
            with torch.no_grad(), self._autocast():
                selected = self.select(self.logits(views))
            self.align(views, selected)
        with torch.no_grad():
            feats = self.image_features(views)
        losses = []
        for _ in range(self.tts):
            with self._autocast():
                logits = self.logits_from(feats)
            if selected is None:
                selected = self.select(logits)
            loss = marginal_entropy(logits[selected])
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def predict(self, views: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (1, classes) of the original view (``views[0]``) with the current prompt (or the given text
        features); in view-ensemble mode, log of the mean softmax over the selected views."""
        feats = self.image_features(views if self.ensemble else views[:1])
        logits = self.logits_from(feats, text_features)
        if self.ensemble:
            return marginal_log_probs(logits[self.select(logits)])[None]
        return logits

    def __call__(self, image, reset: bool = True) -> torch.Tensor:
        """Episodic TPT on one image: reset, views, (align,) tune, predict."""
        if reset:
            self.reset()
        if self.ensemble:  # seed 002's view-ensemble: no tuning, no alignment: the initial prompt
            return self.predict(self.views(image), self.initial_text_features() if reset else None)
        if self.tts == 0 and not self.align_steps:  # zero-shot CLIP
            return self.predict(self.original(image), self.initial_text_features() if reset else None)
        views = self.views(image)
        self.adapt(views)
        return self.predict(views)

    def original(self, image) -> torch.Tensor:
        """The original view (1, C, size, size) in [0, 1], exactly ``views(image)[0]``."""
        return A.original_view(image, self.size, device=self.device)

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor) -> torch.Tensor:
        """Plain CLIP logits of a batch of [0, 1] images (N, C, S, S) with the current prompt."""
        return self.logits_from(self.image_features(images))


def n_selected(n_views: int, selection) -> int:
    return max(1, int(n_views * selection)) if isinstance(selection, float) else int(selection or n_views)


# python -m tttlab.memo_tpt.tpt: the tttlab-memo-tpt-tpt command (it imported this module and did nothing)
if __name__ == "__main__":
    from tttlab.memo_tpt.main import tpt_main

    tpt_main()
