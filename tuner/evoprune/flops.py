"""Analytic FLOPs of a ViT encoder whose layers see fewer tokens (the cost model behind predicted speedups).

Only the transformer layers are counted: patch embedding, layer norms, softmax, biases, the merge step itself and the
post-encoder projector are left out, so a FLOPs ratio is an upper bound on the encoder speedup a schedule can give
(docs/method.md, section 7: the paper's merging encoder was measured *slower* than native because of merge overhead).
"""

from __future__ import annotations

from collections.abc import Sequence

from tuner.evoprune.errors import EvoPruneError


def layer_macs(tokens_attention: int, tokens_mlp: int, hidden_size: int, intermediate_size: int) -> int:
    """Multiply-accumulates of one ViT layer.

    ``4 n C^2`` (q, k, v and output projections) ``+ 2 n^2 C`` (``Q K^T`` and ``A V``) ``+ 2 m C I`` (the two MLP
    matrices), with ``n`` tokens in attention and ``m`` tokens in the MLP (fewer when the layer merges in between).

    Args:
        tokens_attention: tokens entering the layer, all of them (patches plus CLS).
        tokens_mlp: tokens the MLP sees, after the layer's merge step.
        hidden_size: the model width C.
        intermediate_size: the MLP width I.

    Returns:
        The layer's multiply-accumulates.

    Example:
        >>> layer_macs(4, 2, hidden_size=8, intermediate_size=16)
        1792
    """
    n, m, c = tokens_attention, tokens_mlp, hidden_size
    return 4 * n * c * c + 2 * n * n * c + 2 * m * c * intermediate_size


def encoder_flops(
    tokens_in_per_layer: Sequence[int],
    tokens_mlp_per_layer: Sequence[int],
    hidden_size: int,
    intermediate_size: int,
    extra_tokens: int = 0,
) -> int:
    """FLOPs (2 per multiply-accumulate) of the encoder layers, given the token count each one sees.

    Args:
        tokens_in_per_layer: patch tokens entering each layer (what its attention sees).
        tokens_mlp_per_layer: patch tokens after each layer's merge step (what its MLP sees); equal to the entry of
            ``tokens_in_per_layer`` for a layer that does not merge.
        hidden_size: the model width C.
        intermediate_size: the MLP width I.
        extra_tokens: tokens that are never merged, added to every layer's count (1 for a CLS token).

    Returns:
        Total FLOPs of the layers, ``2 * sum(layer_macs)``.

    Raises:
        EvoPruneError: the two lists differ in length, a count is negative, an MLP count exceeds its layer's input, or
            a size is not a positive integer.

    Example:
        >>> encoder_flops([4, 2], [2, 2], hidden_size=8, intermediate_size=16)
        5760
        >>> encoder_flops([4, 2], [2, 2], hidden_size=8, intermediate_size=16, extra_tokens=1)
        8256
    """
    for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise EvoPruneError(f"{name} must be an integer >= 1, got {size!r}")
    if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens < 0:
        raise EvoPruneError(f"extra_tokens must be an integer >= 0, got {extra_tokens!r}")
    if len(tokens_in_per_layer) != len(tokens_mlp_per_layer):
        raise EvoPruneError(
            f"tokens_in_per_layer has {len(tokens_in_per_layer)} entries but tokens_mlp_per_layer has "
            f"{len(tokens_mlp_per_layer)}; give one entry per layer in both"
        )
    total_macs = 0
    for layer, (tokens_in, tokens_mlp) in enumerate(zip(tokens_in_per_layer, tokens_mlp_per_layer, strict=True)):
        if not 0 <= tokens_mlp <= tokens_in:
            raise EvoPruneError(
                f"layer {layer}: its MLP sees {tokens_mlp} tokens but must see between 0 and the {tokens_in} "
                "entering it"
            )
        total_macs += layer_macs(tokens_in + extra_tokens, tokens_mlp + extra_tokens, hidden_size, intermediate_size)
    return 2 * total_macs
