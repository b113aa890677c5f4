"""DiT's reference weight initialisation ("adaLN-Zero"), which diffusers' ``DiTTransformer2DModel`` does not apply.

Peebles & Xie (2023), `initialize_weights` in the reference code: every linear xavier-uniform with zero bias, the
patch-embedding convolution xavier-uniform over its flattened kernel, label and timestep embeddings N(0, 0.02²), and
— the part that gives adaLN-*Zero* its name — every adaLN modulation linear and the output projection set to zero, so
each block starts as the identity and the model starts by predicting 0. The paper reports this as clearly better than
plain adaLN. diffusers builds the same modules with PyTorch's default init (random gates, label table N(0, 1)).
"""

from __future__ import annotations

from torch import nn

INITS = ("diffusers", "adaln-zero")


def adaln_zero_init(model: nn.Module) -> None:
    """Re-initialises a fresh ``DiTTransformer2DModel`` in place as the DiT reference does."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj  # Conv2d(C, D, kernel=patch, stride=patch): a linear over each patch
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb  # CombinedTimestepLabelEmbeddings of this block
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)  # shift/scale/gate of attention and MLP → 0: the block is the identity
        nn.init.zeros_(block.norm1.linear.bias)
    for final in (model.proj_out_1, model.proj_out_2):  # final adaLN modulation and output projection → 0
        nn.init.zeros_(final.weight)
        nn.init.zeros_(final.bias)
