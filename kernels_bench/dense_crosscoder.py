"""The dense peer: a BatchTopK crosscoder written the way the paper's training code (science-of-finetuning's
fork of dictionary_learning, BatchTopKCrossCoder) writes it, in plain PyTorch.

Layout of the reference checkpoints: encoder weight [M, d, F], encoder bias [F], decoder weight [M, F, d],
decoder bias [M, d]. Encoding is one einsum over models and width (the paper's encoder einsums "bld,ldf->blf"
and then sums over l; contracting both at once, "bmd,mdf->bf", is the same math as a single GEMM and is the
kinder baseline), ReLU, scores scaled by the summed decoder norms, torch.topk on the flattened [B * F] scores,
a dense scatter back into a zeroed [B, F] tensor, and a dense einsum decoder. Everything backward is dense
autograd: the decoder and encoder weight gradients are full [B, F] GEMMs.
"""

import torch
from torch import nn


class DenseBatchTopKCrossCoder(nn.Module):
    def __init__(self, d_model, dict_size, n_models=2, k=32, *, dtype=torch.float32, device=None):
        super().__init__()
        self.d_model, self.dict_size, self.n_models, self.k = d_model, dict_size, n_models, k
        factory = dict(dtype=dtype, device=device)
        self.encoder_weight = nn.Parameter(torch.empty(n_models, d_model, dict_size, **factory))
        self.encoder_bias = nn.Parameter(torch.zeros(dict_size, **factory))
        self.decoder_weight = nn.Parameter(torch.empty(n_models, dict_size, d_model, **factory))
        self.decoder_bias = nn.Parameter(torch.zeros(n_models, d_model, **factory))
        with torch.no_grad():
            nn.init.normal_(self.encoder_weight, std=d_model**-0.5)
            self.decoder_weight.copy_(self.encoder_weight.transpose(1, 2))

    @torch.no_grad()
    def load_from_crosscoder(self, cc):
        """Copy the weights of a crossdiff_ext.CrossCoder (W_enc, W_dec [F, M, d]) into this layout."""
        self.encoder_weight.copy_(cc.W_enc.detach().permute(1, 2, 0))  # [F, M, d] -> [M, d, F]
        self.encoder_bias.copy_(cc.b_enc.detach())
        self.decoder_weight.copy_(cc.W_dec.detach().permute(1, 0, 2))  # [F, M, d] -> [M, F, d]
        self.decoder_bias.copy_(cc.b_dec.detach())
        return self

    def encode(self, x):
        """x [B, M, d] -> dense batch-top-k codes [B, F] (kept entries carry the unscaled f)."""
        B = x.shape[0]
        f = torch.relu(torch.einsum("bmd,mdf->bf", x, self.encoder_weight) + self.encoder_bias)
        scores = f * self.decoder_weight.norm(dim=2).sum(dim=0)
        flat = scores.flatten()
        top = flat.topk(self.k * B, sorted=False, dim=-1)
        kept = f.flatten()[top.indices]
        return torch.zeros_like(flat).scatter_(-1, top.indices, kept).reshape(B, -1)

    def decode(self, f):
        return torch.einsum("bf,mfd->bmd", f, self.decoder_weight) + self.decoder_bias

    def forward(self, x):
        return self.decode(self.encode(x))
