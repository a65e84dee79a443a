"""A plainly written 3D mask decoder: the reference the optimised ``DecoderAdapters`` is tested against."""

from __future__ import annotations

import torch


def plain_decoder(adapters, decoder, emb, pe, sparse, dense, cls_tokens, depth):
    """The 3D decoder written out plainly, as a reference: slice embeddings and positional encodings
    copied per prompt, image tokens summed with the PE before each attention, and SAM's own
    ``output_upscaling`` and hypernetwork product for all four mask tokens."""
    n, (bt, c, h, w) = sparse.shape[0], emb.shape
    b, q = bt // depth, n // bt
    emb = emb.reshape(b, 1, depth, c, h, w).expand(b, q, depth, c, h, w).reshape(n, c, h, w)
    pe = pe.expand(depth, c, h, w).unsqueeze(0).expand(b * q, depth, c, h, w).reshape(n, c, h, w)
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse,
                        adapters.cls_token.expand(n, -1, -1) + cls_tokens.unsqueeze(1)], dim=1)
    keys = (emb + dense).flatten(2).transpose(1, 2)
    key_pe = pe.flatten(2).transpose(1, 2)
    queries = tokens
    for i, layer in enumerate(decoder.transformer.layers):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            queries = queries + layer.self_attn(q=queries + tokens, k=queries + tokens, v=queries)
        queries = layer.norm1(queries + adapters.self_attn_adapters[i](queries, depth))
        queries = queries + layer.cross_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        queries = layer.norm2(queries + adapters.cross_attn_adapters[i](queries, depth))
        mlp_out = layer.mlp(queries) + adapters.mlp_adapter_scale * adapters.mlp_adapters[i](queries, depth)
        queries = layer.norm3(queries + mlp_out)
        keys = keys + layer.cross_attn_image_to_token(q=keys + key_pe, k=queries + tokens, v=queries)
        keys = keys + adapters.image_adapters[i](keys.reshape(n, h, w, c), depth).reshape(n, h * w, c)
        keys = layer.norm4(keys)
    final = decoder.transformer.final_attn_token_to_image
    queries = queries + final(q=queries + tokens, k=keys + key_pe, v=keys)
    queries = decoder.transformer.norm_final_attn(queries + adapters.final_adapter(queries, depth))
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
    hyper = torch.stack([mlp(queries[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    masks = (hyper @ upscaled.flatten(2)).reshape(n, -1, *upscaled.shape[-2:])[:, :1]
    return masks, adapters.class_head(queries[:, -1])


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every trainable tensor moved off its init (adapters start at zero: make them act); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def compare_with_plain_decoder(model, *, device: str, pe_per_slice: bool = True) -> dict:
    """Run ``model.decoder_adapters`` and :func:`plain_decoder` on the same random inputs
    (B=2 volumes, Q=3 queries, T=4 slices) on ``device``.

    Returns the largest relative L2 error of masks and class logits in fp32 (``fp32``), of every
    gradient (the slice embeddings' and each trainable weight's, ``fp32_grad``), and under bf16
    autocast the pairs (error of ours vs fp32, error of the plain decoder vs fp32) for masks and
    logits (``bf16``).
    """
    torch.manual_seed(0)
    model = model.to(device)
    adapters, sam = model.decoder_adapters, model.sam
    b, q, t, d, h = 2, 3, 4, sam.prompt_dim, sam.embedding_size
    n = b * q * t
    emb = torch.randn(b * t, d, h, h, device=device, requires_grad=True)
    pe = torch.randn(t if pe_per_slice else 1, d, h, h, device=device)
    boxes = torch.rand(n, 2, 2, device=device).sort(dim=1).values.reshape(n, 4) * sam.image_size
    masks_in = torch.randn(n, 1, *sam.prompt_encoder.mask_input_size, device=device)
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=masks_in)
    cls_tokens = torch.randn(n, d, device=device)
    args = (sam.mask_decoder, emb, pe, sparse, dense, cls_tokens, t)

    def ours(adapters, *a):
        return adapters(*a)

    def run(fn):
        emb.grad = None
        adapters.zero_grad()
        masks, logits = fn(adapters, *args)
        ((masks ** 2).mean() + logits.square().mean()).backward()
        grads = [emb.grad.clone()] + [p.grad.clone() for p in adapters.parameters()]
        return (masks.detach(), logits.detach()), grads

    got, grads = run(ours)
    want, ref_grads = run(plain_decoder)
    if got[0].shape != (n, 1, 4 * h, 4 * h) or got[1].shape != (n, adapters.class_head.out_features):
        raise AssertionError(f"unexpected shapes {got[0].shape}, {got[1].shape}")
    errors = {"fp32": max(_rel(g, w) for g, w in zip(got, want, strict=True)),
              "fp32_grad": max(_rel(g, w) for g, w in zip(grads, ref_grads, strict=True))}
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        fast, plain = ours(adapters, *args), plain_decoder(adapters, *args)
    errors["bf16"] = [(_rel(f.float(), w), _rel(p.float(), w)) for f, p, w in zip(fast, plain, want, strict=True)]
    return errors
