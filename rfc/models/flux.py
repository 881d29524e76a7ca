"""FLUX.1 as the harness sees it: diffusers' FluxTransformer2DModel, unmodified, behind the model
side of the cache protocol (rfc.cache.base.MODEL_PROTOCOL).

The transformer keeps its own weights, class and ``state_dict``; this file only says how one of its
forwards splits into embed / blocks / head, so that the sampler, the guidance hook and every caching
method see FLUX exactly as they see DiT:

- ``embed(x, t, y)``: latents (B, 16, h, w) are packed into 2x2 patches (B, n_img, 64) as
  FluxPipeline packs them; ``y`` holds each sample's prompt index, looked up in the encoded prompt
  table (T5 tokens and the pooled CLIP vector); ``t`` is the pipeline's ``timestep / 1000``. The
  residual stream is text tokens then image tokens, (B, n_txt + n_img, C), the order FLUX's joint
  attention and its single-stream blocks use; ``c`` is the time/guidance/pooled-text embedding.
- ``blocks``: the 19 double-stream blocks, then the 38 single-stream blocks (FLUX.1-dev sizes).
  A double-stream block has two sites, as a DiT block: ``attn`` (the joint attention; its output is
  the text part from ``to_add_out`` and the image part from ``to_out``) and ``mlp`` (``ff_context``
  on the text tokens and ``ff`` on the image tokens). A single-stream block has one site, ``total``
  (``proj_out`` of the attention and the MLP computed side by side). These are the modules the
  official TaylorSeer and ToCa FLUX code caches (img_attn + txt_attn, img_mlp + txt_mlp, total):
  caching a site here caches the same numbers, text and image parts side by side.
- ``head``: ``norm_out`` and ``proj_out`` on the image tokens, unpacked to (B, 16, h, w), fp32.

Text and image tokens of a double-stream block are modulated by different adaLN vectors, so its
shift / scale / gate are per token, (B, T, C) (the DiT's are (B, C) and broadcast); the arithmetic
per element is the one diffusers runs, so ``forward`` equals the transformer's own forward.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rfc.models.dit import BranchFn, BranchModulation, compute_branch
from rfc.models.hub import hf_snapshot
from rfc.utils.modulation import TokenSpans, gated_add, modulate

LATENT_CHANNELS = 16  # FLUX's VAE latent channels (64 after 2x2 packing)
VAE_DOWNSAMPLE = 8


@dataclass(frozen=True)
class FluxConfig:
    """Everything that fixes a FLUX transformer's shapes and a run's token counts."""

    image_size: int = 1024  # pixels (square)
    hidden_size: int = 3072
    num_heads: int = 24
    depth_double: int = 19
    depth_single: int = 38
    text_tokens: int = 512  # T5 max_sequence_length
    text_dim: int = 4096  # joint_attention_dim
    pooled_dim: int = 768
    guidance_embeds: bool = True  # FLUX.1-dev: distilled guidance is a model input
    in_channels: int = LATENT_CHANNELS
    num_classes: int = 0  # no class labels: y is a prompt index

    @property
    def input_size(self) -> int:
        """Latent side length."""
        return self.image_size // VAE_DOWNSAMPLE

    @property
    def image_tokens(self) -> int:
        return (self.input_size // 2) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens of the residual stream: text then image."""
        return self.text_tokens + self.image_tokens

    @property
    def depth(self) -> int:
        return self.depth_double + self.depth_single


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) -> (B, h/2 * w/2, 4c): FluxPipeline's 2x2 patch packing."""
    B, c, h, w = latents.shape
    x = latents.view(B, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4c) -> (B, c, h, w), the inverse of ``pack``."""
    B, _, ch = tokens.shape
    x = tokens.view(B, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, ch // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) of the packed image tokens, as FluxPipeline makes them."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class PromptTable(nn.Module):
    """Encoded prompts, one row per prompt index: T5 token embeddings (P, L, D) and pooled CLIP
    vectors (P, D_pool). A sample's ``y`` is its row. Buffers, not parameters: they are inputs."""

    def __init__(self, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        super().__init__()
        if embeds.shape[0] != pooled.shape[0]:
            raise ValueError(f"prompt table: {embeds.shape[0]} token embeddings but {pooled.shape[0]} pooled vectors")
        self.register_buffer("embeds", embeds, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


def random_prompt_table(prompts: Sequence[str], tokens: int, dim: int, pooled_dim: int) -> PromptTable:
    """flux-tiny's stand-in for the text encoders: each prompt's embeddings drawn from a generator
    seeded by the prompt's text, so a prompt always gets the same conditioning, in any run or order."""
    embeds, pooled = [], []
    for prompt in prompts:
        g = prompt_generator(prompt)
        embeds.append(torch.randn(tokens, dim, generator=g))
        pooled.append(torch.randn(pooled_dim, generator=g))
    return PromptTable(torch.stack(embeds), torch.stack(pooled))


def prompt_generator(prompt: str) -> torch.Generator:
    """A generator seeded by a prompt's text: the tiny models' random conditioning of that prompt."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@dataclass
class StepContext:
    """What one forward's blocks share besides (x, c): the rotary embedding of the text + image
    positions and the number of text tokens (set by ``embed``)."""

    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    n_txt: int = 0


class JointAttention(nn.Module):
    """A double-stream block's attention as one branch of the concatenated stream: input
    (B, n_txt + n_img, C) modulated tokens, output the text part (``to_add_out``) and the image part
    (``to_out``) side by side. Not registered under the model: it holds the block's own module."""

    def __init__(self, attn: nn.Module, ctx: StepContext) -> None:
        super().__init__()
        object.__setattr__(self, "inner", attn)  # not a submodule: no second copy of the weights in state_dict
        object.__setattr__(self, "ctx", ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.ctx.n_txt
        img, txt = self.inner(hidden_states=x[:, n:], encoder_hidden_states=x[:, :n],
                              image_rotary_emb=self.ctx.rope)
        return torch.cat([txt, img], dim=1)

    def with_received(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(x)`` with an explicit softmax, and the attention each token receives (B, T):
        what token-wise caching (ToCa) scores tokens by (``joint_attention_with_received``)."""
        return joint_attention_with_received(self, x)


class StreamMlp(nn.Module):
    """A double-stream block's two MLPs as one branch: ``ff_context`` on the text tokens, ``ff``
    on the image tokens."""

    def __init__(self, ff_txt: nn.Module, ff_img: nn.Module, ctx: StepContext) -> None:
        super().__init__()
        object.__setattr__(self, "ff_txt", ff_txt)
        object.__setattr__(self, "ff_img", ff_img)
        object.__setattr__(self, "ctx", ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spans = sorted(self.spans(x.shape[1]), key=lambda span: span[0])  # in stream order
        return torch.cat([ff(x[:, lo:hi]) for lo, hi, ff in spans], dim=1)

    def spans(self, tokens: int) -> tuple[tuple[int, int, nn.Module], ...]:
        """(first, end, MLP) of each token group of a ``tokens``-long stream, the image MLP first
        (the official FLUX ToCa code's order: img_mlp, then txt_mlp)."""
        n = self.ctx.n_txt
        return (n, tokens, self.ff_img), (0, n, self.ff_txt)


class SingleTotal(nn.Module):
    """A single-stream block's whole output before its gate: proj_out([attn(x), gelu(proj_mlp(x))])."""

    def __init__(self, block: nn.Module, ctx: StepContext) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "ctx", ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_attention(x, self.attention(x))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The block's attention output for tokens x, before proj_out (B, T, C): what a method that
        reuses attention alone (Pyramid Attention Broadcast, FasterCache) keeps of a full step."""
        return self.block.attn(hidden_states=x, image_rotary_emb=self.ctx.rope)

    def with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``self(x)``, its attention output before proj_out and the attention each token
        receives (``single_total_with_attention``): what ToCa keeps at a full step."""
        return single_total_with_attention(self, x)

    def from_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The output for tokens x with their attention output given (``single_total_from_attention``):
        ToCa's partial step from the attention cached at the last full step."""
        return single_total_from_attention(self, x, attn)


class DoubleStreamBlock:
    """diffusers' FluxTransformerBlock over the concatenated stream, with two sites (attn, mlp)."""

    branches = ("attn", "mlp")

    def __init__(self, block: nn.Module, ctx: StepContext, n_img: int) -> None:
        self.block, self.ctx, self.n_img = block, ctx, n_img
        self.attn = JointAttention(block.attn, ctx)
        self.mlp = StreamMlp(block.ff_context, block.ff, ctx)

    @property
    def norms(self) -> tuple[nn.Module, nn.Module]:
        """The layer norms in front of the two sites (text and image norms are the same op)."""
        return self.block.norm1.norm, self.block.norm2

    def modulation(self, c: torch.Tensor) -> tuple[BranchModulation, BranchModulation]:
        """Per-token shift, scale and gate of the attention and of the MLP site (TokenSpans: the text
        tokens' vectors, then the image tokens')."""
        b = self.block
        img = b.norm1.linear(b.norm1.silu(c)).chunk(6, dim=1)
        txt = b.norm1_context.linear(b.norm1_context.silu(c)).chunk(6, dim=1)
        lengths = (self.ctx.n_txt, self.n_img)
        vec = [TokenSpans((t, i), lengths) for t, i in zip(txt, img, strict=True)]
        return BranchModulation(*vec[:3]), BranchModulation(*vec[3:])

    def run(self, x: torch.Tensor, c: torch.Tensor, branch: BranchFn) -> torch.Tensor:
        attn, mlp = self.modulation(c)
        x = gated_add(x, attn.gate, branch(0, x, self.norms[0], attn.shift, attn.scale, self.attn))
        return gated_add(x, mlp.gate, branch(1, x, self.norms[1], mlp.shift, mlp.scale, self.mlp))


class SingleStreamBlock:
    """diffusers' FluxSingleTransformerBlock with one site (total)."""

    branches = ("total",)

    def __init__(self, block: nn.Module, ctx: StepContext) -> None:
        self.block, self.ctx = block, ctx
        self.total = SingleTotal(block, ctx)

    @property
    def norms(self) -> tuple[nn.Module]:
        return (self.block.norm.norm,)

    def modulation(self, c: torch.Tensor) -> tuple[BranchModulation]:
        n = self.block.norm
        return (BranchModulation(*n.linear(n.silu(c)).chunk(3, dim=1)),)

    def run(self, x: torch.Tensor, c: torch.Tensor, branch: BranchFn) -> torch.Tensor:
        (mod,) = self.modulation(c)
        return x + mod.gate.unsqueeze(1) * branch(0, x, self.norms[0], mod.shift, mod.scale, self.total)


def _heads(attn: nn.Module, x: torch.Tensor, added: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, T, H, D) of ``x`` through the attention module's own projections (fused or not, as
    diffusers' processor picks them) and RMS norms: the image-stream ones, or the text stream's
    ``add_*`` projections and ``norm_added_*`` norms when ``added``."""
    if getattr(attn, "fused_projections", False):
        q, k, v = (attn.to_added_qkv if added else attn.to_qkv)(x).chunk(3, dim=-1)
    elif added:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    if added:
        return attn.norm_added_q(q), attn.norm_added_k(k), v
    return attn.norm_q(q), attn.norm_k(k), v


def flux_attention_with_received(attn: nn.Module, hidden_states: torch.Tensor,
                                 encoder_hidden_states: torch.Tensor | None = None,
                                 rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 ) -> tuple[torch.Tensor, ...]:
    """diffusers' FluxAttention (the FluxAttnProcessor computation) with the softmax written out, and
    the attention each token receives: ``(image out, text out, received)`` when
    ``encoder_hidden_states`` are given (a double-stream block), else ``(out, received)`` (a
    single-stream block's pre-only attention, no output projection).

    Why: ToCa scores tokens by the attention map of the last full step, which fused attention
    (scaled_dot_product_attention) never materialises. Everything but the softmax is the module's
    own: its projections, its RMS norms on q and k (text tokens through the ``add_*`` ones), the text
    tokens first, diffusers' ``apply_rotary_emb`` on q and k, ``to_out`` / ``to_add_out``. The map is
    computed as the official FLUX ToCa code computes it (flux/math.py ``dot_product_attention``):
    q k^T first, then times 1/sqrt(D), softmax over keys, in the query's dtype; ``received`` (B, T),
    text then image tokens, is that map averaged over heads and then over queries
    (``attn_map.mean(dim=1).mean(dim=1)``: a mean, where the DiT code sums; ToCa L2-normalises it,
    so only the rounding differs). The output equals the fused module's to rounding (tests: 1e-5)."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k, v = _heads(attn, hidden_states, added=False)
    n_txt = 0
    if encoder_hidden_states is not None:
        tq, tk, tv = _heads(attn, encoder_hidden_states, added=True)
        n_txt = encoder_hidden_states.shape[1]
        q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
    if rope is not None:
        q = apply_rotary_emb(q, rope, sequence_dim=1)
        k = apply_rotary_emb(k, rope, sequence_dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    probs = (torch.matmul(q, k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]))).softmax(dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, T, C)
    received = probs.mean(dim=1).mean(dim=1)
    if encoder_hidden_states is None:
        return out, received
    txt, img = out[:, :n_txt], out[:, n_txt:]
    img = attn.to_out[1](attn.to_out[0](img.contiguous()))
    return img, attn.to_add_out(txt.contiguous()), received


def joint_attention_with_received(joint: JointAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``joint(x)`` returns (text part then image part, (B, T, C)), computed with an explicit
    softmax, and the attention each of the T = n_txt + n_img tokens receives (B, T)."""
    n = joint.ctx.n_txt
    img, txt, received = flux_attention_with_received(joint.inner, x[:, n:], x[:, :n], joint.ctx.rope)
    return torch.cat([txt, img], dim=1), received


def single_total_with_attention(total: SingleTotal, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``total(x)`` returns, with its attention computed by an explicit softmax, and the two
    things ToCa keeps of it: the attention output before ``proj_out`` (B, T, C) and the attention
    each token receives (B, T). The same proj_out of [attention, MLP] as SingleTotal."""
    attn, received = flux_attention_with_received(total.block.attn, x, rope=total.ctx.rope)
    return single_total_from_attention(total, x, attn), attn, received


def single_total_from_attention(total: SingleTotal, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """A single-stream block's output for tokens x (B, k, C) with their attention output ``attn``
    (B, k, C) given rather than computed: proj_out([attn, gelu(proj_mlp(x))]), as ToCa's partial step
    forms it from the attention cached at the last full step."""
    b = total.block
    return b.proj_out(torch.cat([attn, b.act_mlp(b.proj_mlp(x))], dim=2))


class GroupedModulation(nn.Module):
    """The adaLN vectors ``kinds`` (of shift, scale, gate) of every site of the model, for each
    token group (text then image; image then text with ``text_first=False``, HunyuanVideo's order),
    from one matmul of the blocks' stacked weights, copied once when built:
    forward(c) -> (B, sites, len(kinds), 2, C). A double-stream site's text vectors are
    ``norm1_context``'s rows and its image vectors ``norm1``'s; a single-stream site has one
    vector, the same for both groups, computed once. The values equal each block's own
    ``modulation(c)`` (the same rows of the same weights), which is how the step programs run
    FLUX's blocks without calling them."""

    def __init__(self, blocks: Sequence[DoubleStreamBlock | SingleStreamBlock], kinds: tuple[str, ...],
                 text_first: bool = True) -> None:
        super().__init__()
        fields = BranchModulation._fields
        unknown = set(kinds) - set(fields)
        if unknown or not kinds:
            raise ValueError(f"modulation kinds must be among {fields}, got {kinds}")
        weights, biases, index = [], [], []

        def row(linear: nn.Module, chunks: int, chunk: int) -> int:
            C = linear.in_features
            weights.append(linear.weight.view(chunks, C, C)[chunk])
            biases.append(linear.bias.view(chunks, C)[chunk])
            return len(weights) - 1

        with torch.no_grad():
            for block in blocks:
                b = block.block
                if len(block.branches) == 2:  # a double-stream block (FLUX's, or HunyuanVideo's: the same names)
                    for site in (0, 1):
                        for kind in kinds:
                            chunk = 3 * site + fields.index(kind)
                            txt, img = row(b.norm1_context.linear, 6, chunk), row(b.norm1.linear, 6, chunk)
                            index += [txt, img] if text_first else [img, txt]
                else:
                    for kind in kinds:
                        r = row(b.norm.linear, 3, fields.index(kind))
                        index += [r, r]
            w, bias = torch.cat(weights), torch.cat(biases)
        self.register_buffer("weight", w.clone(), persistent=False)
        self.register_buffer("bias", bias.clone(), persistent=False)
        self.register_buffer("index", torch.tensor(index), persistent=False)
        self.kinds, self.hidden = kinds, w.shape[1]
        self.sites = len(index) // (2 * len(kinds))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        rows = F.linear(F.silu(c), self.weight, self.bias).view(c.shape[0], -1, self.hidden)
        return rows[:, self.index].view(c.shape[0], self.sites, len(self.kinds), 2, self.hidden)


class StreamModel(nn.Module):
    """What the models of diffusers' two-stream transformers (FLUX.1, HunyuanVideo) share: a forward
    of embed, every block's ``run`` and head, and the diffusers blocks behind the block views. A
    subclass gives ``embed``, ``head`` and ``blocks`` (views with ``block``, the diffusers module)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block.run(tokens, c, compute_branch)
        return self.head(tokens, c)

    @property
    def native_blocks(self) -> list[nn.Module]:
        """diffusers' block modules in execution order, one per entry of ``blocks``."""
        return [view.block for view in self.blocks]


class FluxModel(StreamModel):
    """FLUX.1's transformer with its prompt table and distilled guidance, behind the cache
    protocol. ``forward(x, t, y)``: latents (B, 16, h, w), the pipeline's timestep / 1000 (B,), prompt
    indices (B,) -> the predicted velocity (B, 16, h, w) in fp32."""

    def __init__(self, transformer: nn.Module, prompts: PromptTable, config: FluxConfig,
                 guidance: float | None) -> None:
        super().__init__()
        self.transformer = transformer
        self.prompt_table = prompts
        self.config = config
        self.guidance = guidance if config.guidance_embeds else None
        self.ctx = StepContext()
        blocks: list[DoubleStreamBlock | SingleStreamBlock] = [
            DoubleStreamBlock(b, self.ctx, config.image_tokens) for b in transformer.transformer_blocks]
        blocks += [SingleStreamBlock(b, self.ctx) for b in transformer.single_transformer_blocks]
        object.__setattr__(self, "blocks", blocks)  # views of the transformer's blocks, not submodules
        self._rope_key: tuple | None = None
        self._hw = (config.input_size, config.input_size)
        self.step_counting = "up"  # the official FLUX caching code counts steps from 0 (DiT's counts down)

    @property
    def prompt_count(self) -> int:
        return len(self.prompt_table)

    def rope(self, n_txt: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of the text + image positions (computed once per shape)."""
        key = (n_txt, h, w, device)
        if self._rope_key != key:
            dtype = self.weight_dtype
            ids = torch.cat([torch.zeros(n_txt, 3, device=device, dtype=dtype), image_ids(h, w, device, dtype)])
            self._rope = self.transformer.pos_embed(ids)
            self._rope_key = key
        return self._rope

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, n_txt + n_img, C), text first, and the conditioning vector c (B, C)."""
        tr = self.transformer
        dtype = self.weight_dtype
        h, w = x.shape[-2:]
        img = tr.x_embedder(pack(x.to(dtype)))
        timestep = t.to(img.dtype) * 1000
        pooled = self.prompt_table.pooled[y].to(dtype)
        if self.guidance is not None:
            g = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32).to(img.dtype) * 1000
            c = tr.time_text_embed(timestep, g, pooled)
        else:
            c = tr.time_text_embed(timestep, pooled)
        txt = tr.context_embedder(self.prompt_table.embeds[y].to(dtype))
        self.ctx.n_txt = txt.shape[1]
        self.ctx.rope = self.rope(txt.shape[1], h, w, x.device)
        self._hw = (h, w)
        return torch.cat([txt, img], dim=1), c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """norm_out and proj_out on the image tokens, unpacked: (B, 16, h, w) in fp32."""
        tr = self.transformer
        img = tr.proj_out(tr.norm_out(tokens[:, self.ctx.n_txt:], c))
        return unpack(img, *self._hw).float()

    @property
    def image_slice(self) -> slice:
        """The image tokens' positions in the stream (after the text tokens), for methods that
        measure the image stream as the official FLUX caching code does (First-Block Cache,
        TeaCache)."""
        return slice(self.ctx.n_txt, None)

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.config.num_tokens, self.config.hidden_size

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    @property
    def token_groups(self) -> tuple[int, int]:
        """The spans of the stream that share adaLN vectors in a double-stream block: the text
        tokens, then the image tokens (of the latest ``embed``)."""
        h, w = self._hw
        return self.ctx.n_txt if self.ctx.n_txt else self.config.text_tokens, (h // 2) * (w // 2)

    def grouped_modulation(self, kinds: tuple[str, ...]) -> GroupedModulation:
        """The adaLN vectors ``kinds`` of every site per token group (text, image) from one
        matmul, for step programs that need them all at once (see GroupedModulation)."""
        return GroupedModulation(self.blocks, kinds)

    def stacked_modulation(self, kinds: tuple[str, ...]) -> nn.Module:
        raise NotImplementedError("FLUX modulates text and image tokens apart: step programs read "
                                  "grouped_modulation(kinds) (per token group) instead")

    def native_forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The same step through FluxTransformer2DModel's own forward, called as FluxPipeline calls it
        (packed latents, timestep / 1000, guidance, text and image position ids): what the cache
        hooks of diffusers and cache-dit wrap (peer methods). Equal to ``forward`` bit for bit."""
        dtype = self.weight_dtype
        h, w = x.shape[-2:]
        n_txt = self.prompt_table.embeds.shape[1]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack(x.to(dtype)), timestep=t.to(dtype), guidance=guidance,
            pooled_projections=self.prompt_table.pooled[y].to(dtype),
            encoder_hidden_states=self.prompt_table.embeds[y].to(dtype),
            txt_ids=torch.zeros(n_txt, 3, device=x.device, dtype=dtype), img_ids=image_ids(h, w, x.device, dtype),
            return_dict=False)[0]
        self._hw = (h, w)
        return unpack(out, h, w).float()


__all__ = ["FluxConfig", "FluxModel", "PromptTable", "flux_attention_with_received", "joint_attention_with_received",
           "modulate", "pack", "random_prompt_table", "single_total_from_attention", "single_total_with_attention",
           "unpack"]


# --------------------------------------------------------------------------------------------
# Building: diffusers' modules, random (flux-tiny) or from the Hugging Face cache (FLUX.1)
# --------------------------------------------------------------------------------------------

FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159  # FLUX.1's VAE scaling_factor and shift_factor


class FluxVAE(nn.Module):
    """FLUX's 16-channel AutoencoderKL with the pipeline's latent scaling: decode_images(latents
    (B, 16, h, w)) -> images (B, 3, 8h, 8w) in about [-1, 1], as FluxPipeline decodes them."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + cfg.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()


def random_transformer(config: FluxConfig, axes_dims_rope: Sequence[int], seed: int) -> nn.Module:
    """A FluxTransformer2DModel of ``config``'s sizes with diffusers' own random init, seeded."""
    from diffusers import FluxTransformer2DModel

    head = config.hidden_size // config.num_heads
    if sum(axes_dims_rope) != head:
        raise ValueError(f"model.axes_dims_rope {list(axes_dims_rope)} must sum to the head size {head} "
                         "(model.hidden_size / model.num_heads)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4 * config.in_channels, num_layers=config.depth_double,
            num_single_layers=config.depth_single, attention_head_dim=head, num_attention_heads=config.num_heads,
            joint_attention_dim=config.text_dim, pooled_projection_dim=config.pooled_dim,
            guidance_embeds=config.guidance_embeds, axes_dims_rope=tuple(axes_dims_rope)).eval()


def random_flux_vae(seed: int) -> FluxVAE:
    """A small random AutoencoderKL with FLUX's latent layout (16 channels, 8x downsampling) and
    latent scaling: the tiny model's decoder (images from it are not meaningful, only their shape)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                            scaling_factor=FLUX_VAE_SCALING, shift_factor=FLUX_VAE_SHIFT,
                            use_quant_conv=False, use_post_quant_conv=False)
    return FluxVAE(vae.eval())


def load_transformer(repo: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(hf_snapshot(repo), subfolder="transformer", torch_dtype=dtype).eval()


def load_flux_vae(repo: str) -> FluxVAE:
    """FLUX.1's VAE in fp32 (decoding is outside the timed loop; fp32 avoids bf16 banding)."""
    from diffusers import AutoencoderKL

    return FluxVAE(AutoencoderKL.from_pretrained(hf_snapshot(repo), subfolder="vae", torch_dtype=torch.float32).eval())


def encode_prompts(repo: str, prompts: Sequence[str], max_tokens: int, device: torch.device,
                   dtype: torch.dtype, batch: int = 16) -> PromptTable:
    """The prompts through FLUX.1's CLIP and T5 encoders (FluxPipeline.encode_prompt, so the
    tokenisation and truncation are the pipeline's), once per run; the encoders are freed after."""
    from diffusers import FluxPipeline

    outputs = encode_in_batches(FluxPipeline, repo, prompts, max_tokens, device, dtype, batch)
    return PromptTable(torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]))


@torch.no_grad()
def encode_in_batches(pipeline: type, repo: str, prompts: Sequence[str], max_tokens: int, device: torch.device,
                      dtype: torch.dtype, batch: int) -> list[tuple]:
    """``pipeline.encode_prompt``'s outputs for ``batch`` prompts at a time: the pipeline loaded from
    the cached snapshot of ``repo`` without its transformer and VAE, its two text encoders on
    ``device``, and freed after (FLUX.1's and HunyuanVideo's pipelines have this layout)."""
    pipe = pipeline.from_pretrained(hf_snapshot(repo), transformer=None, vae=None, torch_dtype=dtype)
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    outputs = [pipe.encode_prompt(prompt=list(prompts[start:start + batch]), prompt_2=None, device=device,
                                  max_sequence_length=max_tokens) for start in range(0, len(prompts), batch)]
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return outputs
