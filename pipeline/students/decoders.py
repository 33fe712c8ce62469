"""Caption decoders of the students. Each has ``forward`` (teacher forcing, for training) and ``init_state`` /
``step`` (one token at a time, batch-first state tensors) so one batched beam search serves all of them.

- ``GlobalGRU``: one image vector initialises the GRU state; with ``concat`` the vector is also concatenated to every
  word embedding (the course project's ResNet-101 global + GRU, and VGG19 + GRU: initialised from the image only,
  the demo's VGG student wrote one caption whatever the photo, as its 128-unit state forgets the image within a few
  words).
- ``AttentionGRU``: additive (Bahdanau) attention over image regions at every step with a sigmoid gate, a GRU cell,
  a causal self-attention layer over the GRU outputs, and the doubly-stochastic attention regulariser.
- ``TransformerCaptioner``: a causal Transformer decoder over ViT token memory.
Image features enter through a LayerNorm, which keeps random (demo) and pretrained features on one scale.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.archs import ARCHS

State = dict[str, torch.Tensor]


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.triu(torch.full((n, n), float("-inf"), device=device), diagonal=1)


def keys_values(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values ``attn`` makes of ``x`` (its packed input projection), kept by a decoding step so that
    earlier positions are projected once, not at every step. For the decoders' own attention layers: batch-first,
    one packed projection with biases, no extra key/value biases (checked)."""
    if not attn.batch_first or attn.in_proj_weight is None or attn.in_proj_bias is None or attn.bias_k is not None:
        raise ValueError("keys_values: needs a batch-first nn.MultiheadAttention with a packed, biased input "
                         "projection and no add_bias_kv")
    _, w_k, w_v = attn.in_proj_weight.chunk(3)
    _, b_k, b_v = attn.in_proj_bias.chunk(3)
    return nn.functional.linear(x, w_k, b_k), nn.functional.linear(x, w_v, b_v)


def attend(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``attn(query, x, x)`` in eval mode from ``keys_values(attn, x)``: batch-first ``query`` [B, Q, d]."""
    w_q, b_q = attn.in_proj_weight.chunk(3)[0], attn.in_proj_bias.chunk(3)[0]

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, heads, T, d / heads]
        return t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)

    out = nn.functional.scaled_dot_product_attention(heads(nn.functional.linear(query, w_q, b_q)), heads(keys),
                                                     heads(values))
    return attn.out_proj(out.transpose(1, 2).flatten(2))


class GlobalGRU(nn.Module):
    def __init__(self, feat_dim: int, vocab_size: int, embed_dim: int, hidden_dim: int, dropout: float,
                 num_layers: int = 1, concat: bool = False):
        super().__init__()
        self.concat, self.num_layers, self.hidden_dim = concat, num_layers, hidden_dim
        self.feat_norm = nn.LayerNorm(feat_dim)
        self.init_h = nn.Linear(feat_dim, hidden_dim * num_layers)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.feat_proj = nn.Linear(feat_dim, embed_dim) if concat else None  # image vector at word-embedding width
        self.gru = nn.GRU(embed_dim * (2 if concat else 1), hidden_dim, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def _h0(self, feats: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.init_h(feats))
        return h.view(feats.shape[0], self.num_layers, self.hidden_dim).transpose(0, 1).contiguous()

    def _inputs(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(tokens))
        if self.concat:
            x = torch.cat([x, self.feat_proj(feats)[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        return x

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None):
        feats = self.feat_norm(feats)
        out, _ = self.gru(self._inputs(feats, tokens), self._h0(feats))
        return self.out(self.drop(out)), None

    def init_state(self, feats: torch.Tensor) -> State:
        feats = self.feat_norm(feats)
        return {"feats": feats, "h": self._h0(feats).transpose(0, 1)}

    def step(self, state: State, tokens: torch.Tensor) -> tuple[torch.Tensor, State]:
        out, h = self.gru(self._inputs(state["feats"], tokens[:, None]), state["h"].transpose(0, 1).contiguous())
        return torch.log_softmax(self.out(out[:, 0]), -1), {**state, "h": h.transpose(0, 1)}


class AttentionGRU(nn.Module):
    def __init__(self, feat_dim: int, vocab_size: int, embed_dim: int, hidden_dim: int, dropout: float,
                 attn_dim: int = 256, heads: int = 4):
        super().__init__()
        self.feat_norm = nn.LayerNorm(feat_dim)
        self.regions = nn.Linear(feat_dim, hidden_dim)  # region features projected once, not at every step
        self.enc_att, self.dec_att = nn.Linear(hidden_dim, attn_dim), nn.Linear(hidden_dim, attn_dim)
        self.full_att = nn.Linear(attn_dim, 1)
        self.gate = nn.Linear(hidden_dim, hidden_dim)
        self.init_h = nn.Linear(hidden_dim, hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.cell = nn.GRUCell(embed_dim + hidden_dim, hidden_dim)
        self.self_attn = nn.MultiheadAttention(hidden_dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def _attend(self, feats: torch.Tensor, enc: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.softmax(self.full_att(torch.tanh(enc + self.dec_att(h)[:, None])).squeeze(-1), dim=-1)
        context = (alpha[..., None] * feats).sum(1) * torch.sigmoid(self.gate(h))
        return context, alpha

    def _cell(self, feats, enc, h, words):
        """One step of the GRU on the (dropped-out) word embeddings ``words`` and the attended image."""
        context, alpha = self._attend(feats, enc, h)
        h = self.cell(torch.cat([words, context], -1), h)
        return h, alpha

    def _self_attend(self, hs: torch.Tensor) -> torch.Tensor:
        attended, _ = self.self_attn(hs, hs, hs, attn_mask=causal_mask(hs.shape[1], hs.device), need_weights=False)
        return self.norm(hs + self.drop(attended))

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None):
        feats = torch.relu(self.regions(self.feat_norm(feats)))
        enc = self.enc_att(feats)
        h = torch.tanh(self.init_h(feats.mean(1)))
        words = self.drop(self.embed(tokens))  # every step's input at once: the loop runs only what needs h
        hs, alphas = [], []
        for t in range(tokens.shape[1]):
            h, alpha = self._cell(feats, enc, h, words[:, t])
            hs.append(h)
            alphas.append(alpha)
        out = self._self_attend(torch.stack(hs, 1))
        alphas = torch.stack(alphas, 1)  # [B, T, R]
        if mask is not None:
            alphas = alphas * mask[..., None]
        # doubly stochastic attention: every region should be looked at about once over the caption
        reg = ((1.0 - alphas.sum(1)) ** 2).mean()
        return self.out(self.drop(out)), reg

    def init_state(self, feats: torch.Tensor) -> State:
        feats = torch.relu(self.regions(self.feat_norm(feats)))
        empty = feats.new_zeros(feats.shape[0], 0, self.cell.hidden_size)
        return {"feats": feats, "enc": self.enc_att(feats), "h": torch.tanh(self.init_h(feats.mean(1))),
                "past_keys": empty, "past_values": empty}

    def step(self, state: State, tokens: torch.Tensor) -> tuple[torch.Tensor, State]:
        """One word (eval mode): the GRU step, then self-attention over the keys and values of every output so far."""
        h, _ = self._cell(state["feats"], state["enc"], state["h"], self.drop(self.embed(tokens)))
        k, v = keys_values(self.self_attn, h[:, None])
        keys, values = torch.cat([state["past_keys"], k], 1), torch.cat([state["past_values"], v], 1)
        out = self.norm(h + attend(self.self_attn, h[:, None], keys, values)[:, 0])
        return torch.log_softmax(self.out(out), -1), {**state, "h": h, "past_keys": keys, "past_values": values}


class TransformerCaptioner(nn.Module):
    def __init__(self, feat_dim: int, vocab_size: int, d_model: int, heads: int, layers: int, dropout: float,
                 max_length: int):
        super().__init__()
        self.feat_norm = nn.LayerNorm(feat_dim)
        self.memory = nn.Linear(feat_dim, d_model)
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.pos = nn.Embedding(max_length + 2, d_model)
        layer = nn.TransformerDecoderLayer(d_model, heads, d_model * 4, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def _decode(self, memory: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)[None]
        y = self.decoder(x, memory, tgt_mask=causal_mask(tokens.shape[1], tokens.device), tgt_is_causal=True,
                         tgt_key_padding_mask=pad)
        return self.out(self.norm(y))

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None):
        pad = None if mask is None else ~mask.bool()
        return self._decode(self.memory(self.feat_norm(feats)), tokens, pad), None

    def init_state(self, feats: torch.Tensor) -> State:
        """Per layer: the keys and values of the image memory (cross-attention, projected once) and of the positions
        decoded so far (self-attention, none yet)."""
        memory = self.memory(self.feat_norm(feats))
        empty = memory.new_zeros(feats.shape[0], 0, memory.shape[-1])
        state = {}
        for i, layer in enumerate(self.decoder.layers):
            state[f"memory_keys{i}"], state[f"memory_values{i}"] = keys_values(layer.multihead_attn, memory)
            state[f"keys{i}"], state[f"values{i}"] = empty, empty
        return state

    def step(self, state: State, tokens: torch.Tensor) -> tuple[torch.Tensor, State]:
        """One position through the (pre-norm, eval-mode) decoder layers with the earlier positions' keys and values:
        causal attention never changes earlier outputs, so this is the full forward pass at O(T) per step."""
        position = state["keys0"].shape[1]
        x = (self.embed(tokens) + self.pos.weight[position])[:, None]
        new = dict(state)
        for i, layer in enumerate(self.decoder.layers):
            q = layer.norm1(x)
            k, v = keys_values(layer.self_attn, q)
            new[f"keys{i}"] = torch.cat([state[f"keys{i}"], k], 1)
            new[f"values{i}"] = torch.cat([state[f"values{i}"], v], 1)
            x = x + attend(layer.self_attn, q, new[f"keys{i}"], new[f"values{i}"])
            x = x + attend(layer.multihead_attn, layer.norm2(x), state[f"memory_keys{i}"], state[f"memory_values{i}"])
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return torch.log_softmax(self.out(self.norm(x[:, 0])), -1), new


# the StudentsConfig fields build_decoder reads: a checkpoint records them (student.json "decoder") to rebuild itself
DECODER_SETTINGS = ("embed_dim", "hidden_dim", "num_layers", "dropout", "transformer_heads", "transformer_layers",
                    "max_length")


def build_decoder(arch: str, feat_dim: int, vocab_size: int, cfg) -> nn.Module:
    """The decoder of a student architecture (``cfg`` is the StudentsConfig)."""
    decoder = ARCHS[arch].decoder
    if decoder == "gru":
        return GlobalGRU(feat_dim, vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.dropout, cfg.num_layers,
                         concat=True)
    if decoder == "attention_gru":
        return AttentionGRU(feat_dim, vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.dropout,
                            attn_dim=cfg.hidden_dim // 2, heads=cfg.transformer_heads)
    return TransformerCaptioner(feat_dim, vocab_size, cfg.hidden_dim, cfg.transformer_heads,
                                    cfg.transformer_layers, min(cfg.dropout, 0.1), cfg.max_length)
